"""The harness every pixcontrast benchmark runs in: command line, result layout, markdown table.

A script defines its configuration and a ``measure(args) -> dict`` that returns its ``config``,
its ``rows`` (one flat dict per measured provider and point) and, optionally, a ``summary`` (ratios
derived from the rows, e.g. at a headline point) and ``metadata`` additions; :func:`run` does the
rest:

- flags shared by every script (:func:`parser`): ``--quick`` (a small configuration, written to a
  temporary folder so that it never overwrites the committed results), ``--repeats``,
  ``--threads`` (torch intra-op threads), ``--output`` (the result path, its suffix made ``.json``;
  a script may write beside it, e.g. a plot) and the hidden ``--child SPEC`` of the fresh
  processes that measure peak memory (``_common.run_child``);
- one JSON layout: ``{"benchmark": name, "metadata": {versions, CPU/GPU, threads, date, load
  average, command}, "config": {...}, "rows": [{...}, ...]}``, plus ``"summary"`` when the script
  derives one;
- one markdown table of the rows (:func:`markdown_table`), printed.

``python benchmarks/_harness.py FILE.json ...`` rewrites result files of the layouts used before
this harness into this one (:func:`convert`), values unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import metadata  # noqa: E402

RESULTS = Path(__file__).parent / "results"
QUICK_RESULTS = Path(tempfile.gettempdir()) / "pixcontrast-bench"

__all__ = ["Column", "convert", "convert_files", "markdown_table", "parser", "run"]


def parser(
    doc: str, *, repeats: Optional[int], quick_repeats: Optional[int], threads: Optional[int]
) -> argparse.ArgumentParser:
    """The shared flags; ``repeats`` (``quick_repeats`` with ``--quick``) and ``threads`` are the
    script's defaults (``None``: the script chooses the repeats by configuration, torch chooses
    the threads). Scripts add their own flags to the parser returned."""
    flags = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    flags.add_argument("--quick", action="store_true",
                       help="a small configuration, results to a temporary folder")
    flags.add_argument("--repeats", type=int, help="timed calls per provider (default: "
                       f"{repeats or 'by configuration'}; with --quick: {quick_repeats})")
    flags.set_defaults(default_repeats=(repeats, quick_repeats))
    flags.add_argument("--threads", type=int, default=threads,
                       help=f"torch intra-op threads (default: {threads or 'torch chooses'})")
    flags.add_argument("--output", type=Path, help="result path, its suffix made .json "
                       "(default: benchmarks/results/SCRIPT.json)")
    flags.add_argument("--child", type=json.loads, help=argparse.SUPPRESS)
    return flags


@dataclass(frozen=True)
class Column:
    """One column of :func:`markdown_table`: ``row[key] * scale`` formatted with ``fmt``; a
    missing, ``None`` or NaN value is left blank. Columns with a format are right-aligned."""

    header: str
    key: str
    fmt: str = ""
    scale: float = 1.0

    def cell(self, row: dict) -> str:
        value = row.get(self.key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        if self.scale != 1.0:  # unscaled integers stay integers, for formats such as "d"
            value = value * self.scale
        return format(value, self.fmt)


def markdown_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """The rows as a markdown table, one line per row."""
    lines = [
        "| " + " | ".join(column.header for column in columns) + " |",
        "| " + " | ".join("---:" if column.fmt else "---" for column in columns) + " |",
    ]
    lines += ["| " + " | ".join(column.cell(row) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_result(path: Path, result: dict) -> None:
    """``result`` as indented JSON at ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def run(
    script: str,
    name: str,
    flags: argparse.ArgumentParser,
    measure: Callable[[argparse.Namespace], dict],
    columns: Sequence[Column],
    child: Optional[Callable[[dict], dict]] = None,
    argv: Optional[list[str]] = None,
) -> Optional[dict]:
    """Parse the command line, then either answer a ``--child`` spec (print ``child(spec)`` as
    JSON, for ``_common.run_child``) or measure, write the result and print its table.

    ``args.output`` and ``args.repeats`` are resolved before ``measure`` sees them; the config
    records them with the thread count. Returns the result (``None`` in a child)."""
    args = flags.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child is not None:
        print(json.dumps(child(args.child)))
        return None
    if args.repeats is None:
        args.repeats = args.default_repeats[args.quick]
    if args.output is None:
        args.output = (QUICK_RESULTS if args.quick else RESULTS) / Path(script).stem
    args.output = args.output.with_suffix(".json")
    command = ["python", f"benchmarks/{Path(script).name}"]
    command += sys.argv[1:] if argv is None else argv
    measured = measure(args)
    result = {
        "benchmark": name,
        "metadata": {**metadata(), "command": shlex.join(command), **measured.get("metadata", {})},
        "config": {**measured["config"], "quick": args.quick, "repeats": args.repeats,
                   "threads": torch.get_num_threads()},
        "rows": measured["rows"],
    }
    if "summary" in measured:
        result["summary"] = measured["summary"]
    write_result(args.output, result)
    print(markdown_table(result["rows"], columns))
    for key, value in result.get("summary", {}).items():
        print(f"{key}: {json.dumps(value)}")
    print(f"wrote {args.output}")
    return result


# ------------------------------------------------------------------ results of earlier layouts

# The layouts of the results written before this harness, by their top-level keys.
LOSS_LAYOUT = "metadata/setting/skipped/headline/rows"
POINTS_LAYOUT = "metadata/points"
FLAT_LAYOUT = "benchmark/metadata/config/rows"


def convert(old: dict) -> dict:
    """An earlier result in this harness's layout, every value kept: the bench_loss layout
    (``setting`` becomes the config, ``skipped`` goes to the metadata, ``headline`` to the
    summary), the bench_memory layout (``metadata.config`` becomes the config, ``points`` the
    rows) and the flat layout of the other scripts (their ``*_target`` keys go to the config, other
    extra keys to the summary). The metadata records ``converted_from``: the old layout."""
    if "benchmark" in old and "rows" in old:
        extra = {k: v for k, v in old.items() if k not in ("benchmark", "metadata", "config",
                                                           "rows")}
        new = {
            "benchmark": old["benchmark"],
            "metadata": {**old["metadata"], "converted_from": FLAT_LAYOUT},
            "config": {**old["config"], **{k: v for k, v in extra.items()
                                           if k.endswith("_target")}},
            "rows": old["rows"],
        }
        summary = {k: v for k, v in extra.items() if not k.endswith("_target")}
        return new | ({"summary": summary} if summary else {})
    if "setting" in old:
        return {
            "benchmark": "loss",
            "metadata": {**old["metadata"], "skipped": old["skipped"],
                         "converted_from": LOSS_LAYOUT},
            "config": old["setting"],
            "rows": old["rows"],
            "summary": {"headline": old["headline"]},
        }
    if "points" in old:
        info = dict(old["metadata"])
        config = info.pop("config")
        return {
            "benchmark": "memory",
            "metadata": {**info, "converted_from": POINTS_LAYOUT},
            "config": config,
            "rows": old["points"],
        }
    raise ValueError(f"not a benchmark result of a known layout: keys {sorted(old)}")


def convert_files(paths: Sequence[Path]) -> list[Path]:
    """Rewrite each result file in place in this layout; files already in it are left alone.
    Returns the files rewritten."""
    rewritten = []
    for path in paths:
        old = json.loads(path.read_text())
        if "converted_from" in old.get("metadata", {}) or "command" in old.get("metadata", {}):
            continue
        write_result(path, convert(old))
        rewritten.append(path)
    return rewritten


if __name__ == "__main__":
    for path in convert_files([Path(p) for p in sys.argv[1:]]):
        print(f"converted {path}")
