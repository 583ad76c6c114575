"""benchmarks/gpu_check.py without CUDA: its arguments, grid, streaming records, budget, preflight
(the real kernel under the interpreter, and each way it can fail), test runner and summary."""

import dataclasses
import importlib.util
import json
import os
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pixcontrast.ops import triton_fused

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
# numpy's warnings about the values the kernels produce on purpose (see test_triton_fused.py)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports its sibling _common
    spec = importlib.util.spec_from_file_location("gpu_check", BENCHMARKS / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_grid_measures_the_paper_shape_first(gpu_check):
    grid = gpu_check.points()
    assert len(grid) == len(set(grid)) == 16
    assert {(p.n, p.m, p.dim, p.dtype, p.variant) for p in grid} == {
        (1024, m, d, t, v) for m in (40_000, 190_000) for d in (128, 256)
        for t in ("bfloat16", "float32") for v in ("paper", "supcon")
    }
    # the goal's points (bf16, D = 256, M = 190k) first, fp32 last
    assert [(p.variant, p.m, p.dim, p.dtype) for p in grid[:2]] == [
        ("paper", 190_000, 256, "bfloat16"), ("supcon", 190_000, 256, "bfloat16")
    ]
    assert all(p.dtype == "float32" for p in grid[8:])
    # M does not change the compiled kernels: the 40k points follow their group's 190k points
    assert grid[2].compile_group() == grid[0].compile_group()


def test_arguments(gpu_check, tmp_path):
    args = gpu_check.parse_args([])
    assert args.out == gpu_check.DEFAULT_OUT and not args.skip_tests
    assert args.budget == gpu_check.DEFAULT_BUDGET_S < 7 * 60
    args = gpu_check.parse_args(["--skip-tests", "--out", str(tmp_path), "--ms", "1000",
                                 "--dtypes", "float16", "--budget", "60"])
    assert args.skip_tests and args.out == tmp_path and args.ms == [1000]
    assert args.dtypes == ["float16"] and args.budget == 60
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--budget", "0"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--dtypes", "float64"])


def test_each_record_is_on_disk_when_written(gpu_check, tmp_path):
    log = gpu_check.ResultLog(tmp_path / "sub" / "records.jsonl")
    log.write("floor", point={"m": 1}, gemm_ms=1.5)
    # read through another handle while the log is still open
    assert json.loads((tmp_path / "sub" / "records.jsonl").read_text())["gemm_ms"] == 1.5
    log.write("step", ms=2.0)
    log.close()
    with open(log.path, "a") as file:
        file.write('{"kind": "kernels", "cut sh')  # a process killed mid-line
    records = gpu_check.read_records(log.path)
    assert [r["kind"] for r in records] == ["floor", "step"]
    assert all(isinstance(r["t"], float) for r in records)


def test_budget_counts_from_the_start_and_keeps_a_reserve(gpu_check):
    clock = FakeClock(100.0)
    budget = gpu_check.Budget(60.0, start=100.0, clock=clock)
    assert budget.left() == 60.0 and budget.allows(60.0)
    clock.now = 130.0
    assert budget.elapsed() == 30.0 and budget.left() == 30.0
    assert budget.allows(20.0) and not budget.allows(20.0, reserve=15.0)
    assert not budget.allows(31.0)


def test_budget_alarm_interrupts_an_overrun(gpu_check):
    budget = gpu_check.Budget(0.2, start=time.monotonic())
    started = time.monotonic()
    with pytest.raises(gpu_check.BudgetExceeded):
        with budget.watch(lambda: None):
            time.sleep(5)
    assert time.monotonic() - started < 2


def test_watchdog_ends_a_run_that_never_returns_to_python(gpu_check, monkeypatch):
    """A compiler stuck in C++ never lets the alarm's handler run (simulated by no alarm): the
    watchdog writes its record and exits the process."""
    monkeypatch.setattr(gpu_check.signal, "setitimer", lambda *args: None)
    monkeypatch.setattr(gpu_check, "HARD_STOP_GRACE_S", 0.05)
    exited, recorded = threading.Event(), []
    monkeypatch.setattr(gpu_check.os, "_exit", lambda status: (recorded.append(status),
                                                               exited.set()))
    with gpu_check.Budget(0.05, start=time.monotonic()).watch(lambda: recorded.append("record")):
        assert exited.wait(5)
    assert recorded == ["record", 3]


def test_point_estimates_follow_what_was_measured(gpu_check):
    costs = gpu_check.PointCosts()
    cold = gpu_check.Point("paper", 8, 100, 16, "float32")
    warm = dataclasses.replace(cold, m=50)
    assert costs.estimate(cold) == gpu_check.COLD_POINT_S
    costs.add(cold, 12.0)
    assert costs.estimate(warm) == 12.0  # no warm point yet: at most a cold one
    costs.add(warm, 3.0)
    assert costs.estimate(warm) == 3.0
    assert costs.estimate(dataclasses.replace(cold, variant="supcon")) == 12.0


def test_skipped_points_are_recorded_when_the_budget_is_short(gpu_check, tmp_path, monkeypatch):
    measured = []
    monkeypatch.setattr(gpu_check, "measure_point", lambda point, log, name: measured.append(point))
    log = gpu_check.ResultLog(tmp_path / "r.jsonl")
    args = gpu_check.parse_args(["--skip-tests", "--ms", "100", "--dims", "16",
                                 "--dtypes", "float32"])
    clock = FakeClock(0.0)
    budget = gpu_check.Budget(gpu_check.COLD_POINT_S + 1, start=0.0, clock=clock)
    gpu_check.run_grid(args, log, budget, "cpu")
    log.close()
    # the first point fits the budget, and took no time: so does the second
    assert len(measured) == 2
    args = gpu_check.parse_args(["--ms", "100", "--dims", "16", "--dtypes", "float32"])
    measured.clear()
    gpu_check.run_grid(args, gpu_check.ResultLog(tmp_path / "s.jsonl"), budget, "cpu")
    assert measured == []  # the tests' reserve leaves no room for a cold point
    skipped = gpu_check.read_records(tmp_path / "s.jsonl")
    assert [r["reason"] for r in skipped] == ["budget", "budget"]


def test_preflight_without_cuda_says_so(gpu_check, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(gpu_check.PreflightError, match="no CUDA device"):
        gpu_check.preflight()


def test_main_without_cuda_records_the_preflight_error(gpu_check, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--skip-tests", "--out", str(tmp_path)]) == 2
    assert "preflight failed: no CUDA device" in capsys.readouterr().err
    records = gpu_check.read_records(tmp_path / gpu_check.RECORDS)
    assert [r["kind"] for r in records] == ["start", "preflight"]
    assert records[1]["ok"] is False and "no CUDA device" in records[1]["error"]


class FakeKernel:
    """A statistics kernel that fails where told: compiling, launching, or computing."""

    arg_names = ["x_ptr", "k_ptr", "pos_lo_ptr", "pos_hi_ptr", "self_col_ptr",
                 "part_max_ptr", "part_sum_ptr"]
    fn = SimpleNamespace(__name__="contrast_statistics_kernel")

    def __init__(self, fails: str) -> None:
        self.fails = fails

    def warmup(self, *args, grid, **meta):
        if self.fails == "compile":
            raise RuntimeError("PTX assembly aborted due to errors")

    def __getitem__(self, grid):
        def run(*args, **meta):
            if self.fails == "launch":
                raise RuntimeError("CUDA driver version is insufficient")
            args[5].zero_()  # a maximum of 0 and a sum of 1: the wrong log-sum-exp
            args[6].fill_(1.0)
        return run


@pytest.mark.skipif(not HAS_TRITON, reason="the preflight goes through the Triton sweep")
@pytest.mark.parametrize("fails, message", [
    ("compile", "compiling contrast_statistics_kernel for torch.float32 failed"),
    ("launch", "launching contrast_statistics_kernel failed"),
    ("result", "log-sum-exp is off by"),
])
def test_preflight_names_what_failed(gpu_check, monkeypatch, fails, message):
    kernels = SimpleNamespace(contrast_statistics_kernel=FakeKernel(fails))
    monkeypatch.setattr(triton_fused, "_load_kernels", lambda: (kernels, False, ""))
    with pytest.raises(gpu_check.PreflightError, match=message):
        gpu_check.preflight(device="cpu", dtype=torch.float32)


@pytest.mark.skipif(not (HAS_TRITON and INTERPRETED), reason="the kernel under the interpreter")
def test_preflight_runs_the_statistics_kernel(gpu_check):
    report = gpu_check.preflight(device="cpu", dtype=torch.float32)
    assert report["max_error"] < 1e-3 and report["run_s"] > 0


def test_tests_are_streamed_and_stopped_at_their_timeout(gpu_check, tmp_path):
    done = gpu_check.run_tests([sys.executable, "-c", "print('3 passed in 1.0s')"],
                               tmp_path / "ok.log", timeout=30)
    assert done["returncode"] == 0 and done["summary"] == "3 passed in 1.0s"
    hanging = [sys.executable, "-c",
               "print('PASSED first', flush=True); print('FAILED second'); import time; "
               "time.sleep(60)"]
    started = time.monotonic()
    stopped = gpu_check.run_tests(hanging, tmp_path / "hang.log", timeout=1.0)
    assert time.monotonic() - started < 10
    assert stopped["returncode"] is None and "stopped after" in stopped["summary"]
    assert stopped["failures"] == ["FAILED second"]  # what ran is in the log
    assert "PASSED first" in (tmp_path / "hang.log").read_text()


def test_pytest_command_runs_the_triton_tests_without_the_compile_sweep(gpu_check):
    command = gpu_check.pytest_command()
    assert command[-3].endswith("test_triton_fused.py")
    assert command[-2:] == ["-k", "not compile_without_spills"]


def test_summary_derives_ratios_from_the_records(gpu_check, tmp_path):
    point = dict(variant="paper", n=4, m=10, dim=8, dtype="bfloat16")
    other = dict(point, m=20)
    records = [
        dict(kind="start", argv=["--skip-tests"], budget_s=400, metadata={"gpu": "x"}),
        dict(kind="floor", point=point, gemm_ms=1.0, peak_ms=0.5),
        dict(kind="step", point=point, backend="torch", ms=4.0, host_reads=3),
        dict(kind="step", point=point, backend="triton", ms=2.0, host_reads=1),
        dict(kind="kernels", point=point, sum_ms=1.5, kernels=[dict(kernel="k", ms=1.5)]),
        dict(kind="breakdown", point=point, other_device_ms=0.3, host_overhead_ms=0.2),
        dict(kind="skipped", point=other, reason="budget"),
        dict(kind="stopped", reason="the budget of 400 s ran out"),
    ]
    summary = gpu_check.summarise(records)
    first, second = summary["rows"]
    assert first["triton_over_floor"] == 2.0 and first["torch_over_floor"] == 4.0
    assert first["winner"] == "triton" and first["kernels_ms"] == 1.5
    assert first["triton_host_reads"] == 1 and first["host_overhead_ms"] == 0.2
    assert second["skipped"] == "budget" and "winner" not in second
    assert summary["kernels"] == [dict(point=point, kernel="k", ms=1.5)]
    assert summary["events"]["stopped"][0]["reason"].startswith("the budget")
    path = tmp_path / gpu_check.RECORDS
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert gpu_check.main(["--summarise", str(path)]) == 0
    assert json.loads((tmp_path / gpu_check.SUMMARY).read_text())["rows"][0]["winner"] == "triton"


def test_device_time_is_told_apart(gpu_check):
    times = {"contrast_statistics_kernel_0d1": 600.0, "paper_positive_kernel": 200.0,
             "void at::native::elementwise_kernel": 150.0, "Memcpy DtoD": 50.0}
    split = gpu_check.split_device_time(times, step_ms=1.5)
    assert split["triton_kernels_ms"] == pytest.approx(0.8)
    assert split["other_device_ms"] == pytest.approx(0.2)
    assert split["host_overhead_ms"] == pytest.approx(0.5)
    assert list(split["other_device_work"]) == ["void at::native::elementwise_kernel",
                                                "Memcpy DtoD"]


def test_floor_flops_and_peaks(gpu_check):
    point = gpu_check.Point("paper", 1024, 190_000, 256, "bfloat16")
    assert gpu_check.floor_flops(point) == 4 * 1024 * 190_000 * 256
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe", "float32") == 378.0
    assert gpu_check.peak_tflops("NVIDIA H200", "float16") == 989.4
    assert gpu_check.peak_tflops("Some GPU", "bfloat16") is None


def test_steps_run_on_cpu(gpu_check):
    point = gpu_check.Point("paper", 12, 50, 8, "float32")
    anchors, labels, keys, key_labels = inputs = gpu_check.make_inputs(point, "cpu")
    assert (key_labels.diff() >= 0).all()  # a memory bank's keys, grouped by class
    gpu_check.loss_step(point, "torch", inputs)()
    assert anchors.grad is not None and anchors.grad.abs().sum() > 0


@pytest.mark.skipif(not (HAS_TRITON and INTERPRETED), reason="the kernels under the interpreter")
def test_recorded_launches_replay_the_step(gpu_check, monkeypatch):
    """Every kernel of a step passes through the launcher, and replaying a recorded launch
    recomputes the same values (no kernel reads what it writes)."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        point = gpu_check.Point("supcon", 12, 50, 8, "float32")
        inputs = gpu_check.make_inputs(point, "cpu")
        launches = gpu_check.record_step(point, inputs)
        names = [launch.describe()["kernel"] for launch in launches]
        assert {"contrast_statistics_kernel", "combine_statistics_kernel"} <= set(names)
        assert inputs[0].grad.abs().sum() > 0
        statistics = launches[0]
        part_sum = dict(zip(statistics.kernel.arg_names, statistics.args))["part_sum_ptr"]
        before = part_sum.clone()
        part_sum.zero_()
        statistics.run()
        assert torch.equal(part_sum, before)
    finally:
        torch.set_float32_matmul_precision(previous)
