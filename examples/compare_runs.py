"""Paired differences between runs of ``digits_segmentation.py`` written to different folders.

Runs with the same seed, data and steps share their initialisation and data order, so a run of
one results file can be paired with the run of the same seed in another, e.g. the cases of the
README's "When the term hurts" against the main job's ``ce`` and ``ce+contrast`` runs::

    python examples/compare_runs.py examples/results/digits_results.json \\
        examples/results/cases/catch_all/digits_results.json

Pairs are made only between runs whose configurations agree on everything except the mode's own
options (``modes``, ``contrast_weight``); other runs are reported without pairs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import numpy as np

METRICS = ("miou", "shifted_miou", "probe")
OWN_OPTIONS = {"modes", "contrast_weight", "seeds"}


def comparable(a: dict, b: dict) -> bool:
    """Whether two configurations train their ``ce`` runs identically."""
    return all(a[k] == b[k] for k in a if k not in OWN_OPTIONS)


def paired(base: dict, other: dict) -> dict[str, dict[str, dict]]:
    """``{other mode: {base mode: {metric: per-seed differences (other - base)}}}``."""
    out: dict[str, dict[str, dict]] = {}
    base_runs = {(r["mode"], r["seed"]): r for r in base["runs"]}
    for mode in other["config"]["modes"]:
        for base_mode in base["config"]["modes"]:
            for metric in METRICS:
                diffs = [r[metric] - base_runs[(base_mode, r["seed"])][metric]
                         for r in other["runs"]
                         if r["mode"] == mode and (base_mode, r["seed"]) in base_runs]
                out.setdefault(mode, {}).setdefault(base_mode, {})[metric] = diffs
    return out


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path, help="results JSON of the runs to pair with")
    parser.add_argument("others", type=Path, nargs="+", help="results JSON of other runs")
    args = parser.parse_args(argv)
    base = json.loads(args.base.read_text())
    report = {}
    for path in args.others:
        other = json.loads(path.read_text())
        print(f"{path}: {other['command']}")
        if not all("miou" in r for r in other["runs"]):
            print("  (validation only: no test metrics to pair)")
            continue
        if not comparable(base["config"], other["config"]):
            print("  (different data or training: no pairs)")
            continue
        report[str(path)] = diffs = paired(base, other)
        for mode, by_base in diffs.items():
            for base_mode, by_metric in by_base.items():
                cells = []
                for metric, values in by_metric.items():
                    mean = 100 * float(np.mean(values))
                    each = ", ".join(f"{100 * v:+.2f}" for v in values)
                    cells.append(f"{metric} {mean:+.2f} ({each})")
                print(f"  {mode} - {base_mode}: " + "; ".join(cells))
    return report


if __name__ == "__main__":
    main()
