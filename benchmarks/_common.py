"""Shared helpers of the pixcontrast benchmarks: metadata, timing, peak memory, child processes.

Measuring rules: a figure is a ratio of two things measured in the same run, with
the sides alternated and medians taken; peak memory on CPU is the growth of the peak resident set
size in a fresh process per point, on CUDA ``torch.cuda.max_memory_allocated``.

API:

- :func:`metadata` -> dict of versions, CPU/GPU model, thread count, date and load average, for
  result JSONs (``_harness.run`` writes them).
- :func:`time_wall_and_cpu` (fns, repeats, warmup) -> median wall and CPU seconds per name, the
  callables run in rotating order within each repeat; :func:`time_alternating`, the wall part.
- :func:`time_cuda` (fn) -> median seconds of a CUDA callable through ``triton.testing.do_bench``.
- :func:`peak_rss_bytes` -> the process's peak resident set size so far (``VmHWM`` on
  Linux, ``getrusage`` elsewhere).
- :func:`measure_peak_growth` (setup) -> bytes by which one call of the callable returned by
  ``setup()`` raised the peak RSS (CPU) or the peak allocated CUDA memory.
- :func:`peak_growth_and_slack` (warm_up, setup, threads) -> in a fresh process, the peak growth
  and wall seconds of one call, and the slack that would hide growth: what every child reports.
- :func:`run_child` (script, spec) -> the JSON dict a fresh ``python script --child SPEC`` process
  printed on its last line (``_harness.run`` answers ``--child`` with the script's child function).
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

__all__ = [
    "cpu_model",
    "measure_peak_growth",
    "metadata",
    "peak_growth_and_slack",
    "peak_rss_bytes",
    "run_child",
    "time_alternating",
    "time_wall_and_cpu",
    "time_cuda",
]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def metadata() -> dict:
    """Versions, hardware and date of a benchmark run."""
    import pixcontrast

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pixcontrast": pixcontrast.__version__,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "pytorch_metric_learning": _version("pytorch-metric-learning"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "cuda": torch.version.cuda if gpu else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def time_wall_and_cpu(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, tuple[float, float]]:
    """Median wall and CPU (process) seconds of each callable; in repeat ``r`` the order is
    rotated by ``r`` so that no callable always runs first or after the same neighbour. At one
    thread the CPU time leaves out the time the process waited for a core, most of the noise on
    a shared machine."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            fns[name]()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start_wall)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in names}


def time_alternating(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median wall time (seconds) of each callable, timed as by :func:`time_wall_and_cpu`."""
    return {name: both[0] for name, both in time_wall_and_cpu(fns, repeats, warmup).items()}


def time_cuda(fn: Callable[[], object]) -> float:
    """Median seconds of a CUDA callable (``triton.testing.do_bench`` flushes the L2 cache and
    synchronises)."""
    from triton.testing import do_bench

    return do_bench(fn, return_mode="median") / 1e3


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    On Linux this is ``VmHWM`` of ``/proc/self/status``, the high-water mark of this process's own
    memory map: ``getrusage``'s ``ru_maxrss`` is not used there because it starts a child at the
    resident size its parent had when it forked, which would hide the growth being measured.
    Elsewhere ``getrusage`` (``ru_maxrss``: bytes on macOS).
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def rss_and_peak_bytes() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process, from ``/proc/self/status`` (Linux)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            fields[line.split(":")[0]] = int(line.split()[1]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def measure_peak_growth(setup: Callable[[], Callable[[], object]], device: str = "cpu") -> int:
    """Bytes by which one call of ``setup()``'s callable raises the peak memory.

    The inputs made by ``setup`` are not counted. On CPU the peak RSS only grows, so this must
    be the first measurement of a fresh process (see :func:`run_child`) and the callable is not
    warmed up; on CUDA the allocator's peak counter is reset instead.
    """
    fn = setup()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = peak_rss_bytes()
    fn()
    return max(0, peak_rss_bytes() - before)


def peak_growth_and_slack(
    warm_up: Callable[[], object], setup: Callable[[], Callable[[], object]], threads: int
) -> dict:
    """In a fresh process (see :func:`run_child`): after ``warm_up()`` (library initialisation,
    not counted), the peak RSS growth and the wall seconds of one call of ``setup()``'s callable,
    and the slack (peak minus current RSS) before that call, which would hide part of the growth
    (near 0: nothing hidden)."""
    torch.set_num_threads(threads)
    measured = {}

    def prepared() -> Callable[[], object]:
        warm_up()
        run = setup()
        rss, peak = rss_and_peak_bytes()
        measured["slack_bytes"] = peak - rss

        def timed() -> None:
            start = time.perf_counter()
            run()
            measured["seconds"] = time.perf_counter() - start

        return timed

    growth = measure_peak_growth(prepared)
    return {"peak_rss_growth_bytes": growth, **measured}


def run_child(script: Path, spec: dict, timeout: float = 600.0) -> dict:
    """Run ``python script --child JSON(spec)`` in a fresh process; return the JSON object it
    printed on its last line of stdout. Raises ``RuntimeError`` with its stderr on failure."""
    done = subprocess.run(
        [sys.executable, str(script), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"{script.name} --child {spec} failed ({done.returncode}):\n{done.stderr[-2000:]}"
        )
    return json.loads(lines[-1])
