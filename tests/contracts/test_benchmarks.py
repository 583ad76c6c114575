"""benchmarks/: the harness's table writer and converter, the committed results in its layout
(with the figures the README cites), and each script's ``--quick`` run on one thread.

Scripts whose quick run starts many fresh measuring processes are marked slow."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from _harness import Column, convert, convert_files, markdown_table  # noqa: E402

LAYOUT = {"benchmark", "metadata", "config", "rows"}


def check_layout(result: dict) -> None:
    assert LAYOUT <= set(result) <= LAYOUT | {"summary"}
    assert isinstance(result["benchmark"], str)
    for key in ("date", "pixcontrast", "torch", "cpu", "torch_threads"):
        assert key in result["metadata"], key
    assert isinstance(result["config"], dict)
    assert result["rows"] and all(isinstance(row, dict) for row in result["rows"])


def test_markdown_table_formats_scales_and_leaves_missing_values_blank() -> None:
    columns = [Column("name", "name"), Column("N", "n", "d"),
               Column("time (ms)", "time_s", ".1f", 1e3)]
    rows = [{"name": "a", "n": 8, "time_s": 0.01234}, {"name": "b", "n": 8, "time_s": None},
            {"name": "c", "n": 8, "time_s": math.nan}, {"name": "d"}]
    assert markdown_table(rows, columns).splitlines() == [
        "| name | N | time (ms) |",
        "| --- | ---: | ---: |",
        "| a | 8 | 12.3 |",
        "| b | 8 |  |",
        "| c | 8 |  |",
        "| d |  |  |",
    ]


META = {"date": "2026-01-01T00:00:00+00:00", "pixcontrast": "0.1.0", "torch": "2.13.0",
        "cpu": "AMD EPYC", "torch_threads": 1}


@pytest.mark.parametrize("old, expected", [
    (
        {"metadata": META, "setting": {"kind": "full", "repeats": 5},
         "skipped": {"triton": ["no CUDA device"]}, "headline": {"time_s": {"torch": 1.0}},
         "rows": [{"provider": "torch", "time_s": 1.0}]},
        {"benchmark": "loss",
         "metadata": {**META, "skipped": {"triton": ["no CUDA device"]},
                      "converted_from": "metadata/setting/skipped/headline/rows"},
         "config": {"kind": "full", "repeats": 5},
         "rows": [{"provider": "torch", "time_s": 1.0}],
         "summary": {"headline": {"time_s": {"torch": 1.0}}}},
    ),
    (
        {"metadata": {**META, "config": {"dim": 256}}, "points": [{"point": "memory"}]},
        {"benchmark": "memory", "metadata": {**META, "converted_from": "metadata/points"},
         "config": {"dim": 256}, "rows": [{"point": "memory"}]},
    ),
    (
        {"benchmark": "mining", "metadata": META, "config": {"dim": 256},
         "memory_target": "<= 0.2", "memory_ratio": 0.13, "rows": [{"side": "dense"}]},
        {"benchmark": "mining",
         "metadata": {**META, "converted_from": "benchmark/metadata/config/rows"},
         "config": {"dim": 256, "memory_target": "<= 0.2"}, "rows": [{"side": "dense"}],
         "summary": {"memory_ratio": 0.13}},
    ),
])
def test_convert_keeps_every_value_of_each_earlier_layout(old: dict, expected: dict) -> None:
    assert convert(old) == expected
    check_layout(convert(old))


def test_convert_refuses_an_unknown_layout() -> None:
    with pytest.raises(ValueError, match="known layout"):
        convert({"metadata": META})


def committed() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text())
            for path in sorted((BENCHMARKS / "results").glob("*.json"))}


def test_committed_results_are_in_the_layout_and_left_alone_by_the_converter() -> None:
    results = committed()
    assert len(results) >= 5
    for result in results.values():
        check_layout(result)
    assert convert_files(sorted((BENCHMARKS / "results").glob("*.json"))) == []


def test_committed_results_hold_the_figures_the_readme_cites() -> None:
    results = committed()
    # (the figures live in benchmarks/README.md; the main README keeps a short table)
    readme = (ROOT / "README.md").read_text() + (BENCHMARKS / "README.md").read_text()
    headline = results["bench_loss_headline_threads1.json"]["summary"]["headline"]
    assert f"| 1 | {headline['speedup_torch_vs_reference']:.2f}x faster" in readme
    mining = {row["side"]: row for row in results["bench_mining.json"]["rows"]}
    assert (f"peak growth {mining['chunked hardest']['peak_rss_growth_bytes'] / 1e6:.1f} MB "
            f"against {mining['dense top-k']['peak_rss_growth_bytes'] / 1e6:.1f} MB") in readme
    sampler = {row["side"]: row for row in results["bench_sampler.json"]["rows"]}
    assert (f"({sampler['HardAnchorSampler()']['median_ms']:.2f} vs "
            f"{sampler['loop baseline']['median_ms']:.2f} ms") in readme
    memory = [row for row in results["bench_memory.json"]["rows"] if row["point"] == "memory"]
    assert f"peak growth {memory[0]['peak_rss_growth_bytes'] / 1e9:.2f} GB" in readme


@pytest.mark.parametrize("script", ["bench_loss", "bench_memory", "bench_mining",
                                    "bench_pixel_ops", "bench_sampler"])
def test_each_scripts_table_renders_its_committed_results(script: str) -> None:
    columns = importlib.import_module(script).COLUMNS
    for name, result in committed().items():
        if name.startswith(script):
            table = markdown_table(result["rows"], columns).splitlines()
            assert len(table) == 2 + len(result["rows"])


def run_quick(script: str, tmp_path: Path) -> dict:
    """``python benchmarks/SCRIPT --quick --threads 1`` to ``tmp_path``; the result written."""
    output = tmp_path / script.replace(".py", ".json")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--threads", "1",
         "--output", str(output)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| ---" in done.stdout  # the markdown table
    result = json.loads(output.read_text())
    check_layout(result)
    assert result["config"]["quick"] is True and result["config"]["threads"] == 1
    assert result["metadata"]["command"].startswith(f"python benchmarks/{script} --quick")
    return result


@pytest.mark.parametrize("script, name", [
    ("bench_sampler.py", "sampler"),
    ("bench_mining.py", "mining"),
    pytest.param("bench_memory.py", "memory", marks=pytest.mark.slow),
    pytest.param("bench_pixel_ops.py", "pixel_ops", marks=pytest.mark.slow),
    pytest.param("bench_loss.py", "loss", marks=pytest.mark.slow),
])
def test_quick_run_writes_the_layout(script: str, name: str, tmp_path: Path) -> None:
    assert run_quick(script, tmp_path)["benchmark"] == name
