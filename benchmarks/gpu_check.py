"""One-GPU check of pixcontrast's Triton backend in one command under 7 minutes that keeps every
figure it measured: preflight, timings against cuBLAS and the torch path, then the tests.

Run from the repository root on a machine with one CUDA GPU::

    PYTHONPATH=. python benchmarks/gpu_check.py --out OUT       # grid, then tests
    PYTHONPATH=. python benchmarks/gpu_check.py --skip-tests --out OUT

In order, each stage's records appended to ``OUT/gpu_check.jsonl`` (one JSON object a line,
flushed to disk as soon as it is measured, so a run cut short keeps all it measured):

1. ``preflight``: one kernel (the statistics kernel on a tiny bf16 problem) compiled, launched
   and checked against torch; a broken compiler or driver stops the run here in seconds, with
   the failing step and its error (exit status 2).
2. The benchmark grid, the paper's shape first (N = 1024 in-batch anchors needing a gradient,
   M memory keys grouped by class, bf16 D = 256 before D = 128, M = 190k before 40k, fp32 with
   TF32 last): per point ``floor`` (the two cuBLAS GEMMs ``x @ k.T`` and ``G @ k`` timed each,
   and their flops at the GPU's datasheet peak), ``step`` (forward + backward of
   ``contrastive_loss``, median of ``triton.testing.do_bench``, and its host reads, for
   ``backend="torch"`` and ``"triton"``), ``kernels`` (every launch of one Triton step recorded
   through the backend's launcher and timed on its own, with registers and spills) and
   ``breakdown`` (one profiled step: the device time of the Triton kernels, of the other device
   work such as the layout's sorts and copies, and the rest of the step, host overhead).
3. ``tests``: ``tests/ops/test_triton_fused.py`` on CUDA tensors (``TRITON_INTERPRET=0``, bf16
   included; the compile sweep left out), its output streamed to ``OUT/tests.log``.

A global budget (``--budget``, 400 s from the interpreter's start) bounds the run: a point whose
estimated time no longer fits is recorded as ``skipped``, the tests get what is left, an alarm
stops a stage that overruns (record ``stopped``), and a watchdog ends the process a few seconds
later if a compile does not return to Python. At the end ``OUT/gpu_check.json`` summarises the
records in the benchmarks' JSON layout; ``--summarise OUT/gpu_check.jsonl`` rebuilds it from the
records of a run that did not get there.

Kept to APIs of torch >= 2.4 and Triton >= 3.0 (the GPU image has torch 2.11, Triton 3.6).
"""

from __future__ import annotations

import time

# The budget counts from here, before torch's import.
STARTED = time.monotonic()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import warnings  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Iterator, Optional  # noqa: E402

import torch  # noqa: E402
from _common import metadata  # noqa: E402

import pixcontrast  # noqa: E402
from pixcontrast.ops import check_contrast_inputs, triton_fused  # noqa: E402
from pixcontrast.ops._autograd import apply_contrast  # noqa: E402
from pixcontrast.ops._options import ContrastOptions  # noqa: E402

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
DEFAULT_OUT = HERE.parent / "results" / "gpu_check"
RECORDS, SUMMARY, TEST_LOG = "gpu_check.jsonl", "gpu_check.json", "tests.log"
NUM_CLASSES = 19
TEMPERATURE = 0.1
# Seven minutes for the whole command, less the interpreter's start and the summary.
DEFAULT_BUDGET_S = 400.0
# The watchdog's grace after the alarm: a compile in C++ only sees the alarm when it returns.
HARD_STOP_GRACE_S = 10.0
# Estimated seconds of a grid point before one of its kind was measured: compiling a variant's
# kernels for a new (variant, D, dtype) dominates a cold point.
COLD_POINT_S, WARM_POINT_S = 40.0, 10.0
# Seconds the grid leaves for the tests when they run, and the least the tests are started with.
TEST_RESERVE_S, MIN_TEST_S = 150.0, 30.0
# Dense tensor-core peaks from the datasheets, TFLOPS (16-bit, TF32); the first name found in the
# device's name applies.
PEAK_TFLOPS = [
    ("H200", 989.4, 494.7), ("H100 PCIe", 756.0, 378.0), ("H100 NVL", 835.0, 417.5),
    ("H100", 989.4, 494.7), ("A100", 312.0, 156.0),
]
# The kernels of the Triton backend (everything else in a profiled step is other device work).
TRITON_KERNELS = (
    "contrast_statistics_kernel", "combine_statistics_kernel", "paper_positive_kernel",
    "contrast_anchor_grad_kernel", "contrast_key_grad_kernel", "sum_splits_kernel",
)


@dataclass(frozen=True)
class Point:
    """One point of the grid: ``n`` anchors (in-batch) against ``m`` memory keys."""

    variant: str
    n: int
    m: int
    dim: int
    dtype: str  # a torch dtype's name

    def compile_group(self) -> tuple[str, int, str]:
        """What decides the compiled kernels: a point of a group seen before compiles nothing."""
        return self.variant, self.dim, self.dtype


def points(
    ms: tuple[int, ...] = (40_000, 190_000),
    dims: tuple[int, ...] = (128, 256),
    dtypes: tuple[str, ...] = ("bfloat16", "float32"),
    variants: tuple[str, ...] = ("paper", "supcon"),
    n: int = 1024,
) -> list[Point]:
    """The grid, most telling first: dtypes in the order given, larger D and M first.

    A budget cut then drops the least telling points.
    """
    return [
        Point(variant, n, m, dim, dtype)
        for dtype in dtypes
        for dim in sorted(dims, reverse=True)
        for m in sorted(ms, reverse=True)
        for variant in variants
    ]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT,
        help=f"folder of {RECORDS}, {TEST_LOG} and {SUMMARY} (default: %(default)s)",
    )
    parser.add_argument("--skip-tests", action="store_true",
                        help="skip tests/ops/test_triton_fused.py")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds for the whole run, from the interpreter's start")
    parser.add_argument("--ms", type=int, nargs="+", default=[40_000, 190_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                        choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--variants", nargs="+", default=["paper", "supcon"],
                        choices=["paper", "supcon"])
    parser.add_argument("--summarise", type=Path, metavar="JSONL",
                        help=f"only rebuild {SUMMARY} beside these records of an earlier run")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error(f"--budget must be positive seconds, got {args.budget}")
    return args


# ------------------------------------------------------------------------- records and budget


class ResultLog:
    """Appends one JSON record a line to ``path``, flushed to disk before ``write`` returns.

    Every record has its ``kind`` and ``t``, the seconds since the run started; writes are
    serialised (the watchdog thread may write while the main thread does).
    """

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._clock = clock
        self._file = open(path, "a")
        self._lock = threading.Lock()

    def write(self, kind: str, **fields: Any) -> dict:
        record = dict(kind=kind, t=round(self._clock() - STARTED, 3), **fields)
        line = json.dumps(record, default=str)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        return record

    def close(self) -> None:
        self._file.close()


def read_records(path: Path) -> list[dict]:
    """The records of ``path``; a last line cut short by a killed process is left out."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class BudgetExceeded(Exception):
    """The run's budget ran out (raised by :meth:`Budget.watch`'s alarm)."""


class Budget:
    """Seconds left of ``seconds``, counted from ``start`` on ``clock``."""

    def __init__(
        self, seconds: float, start: float = STARTED, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.seconds, self.start, self.clock = seconds, start, clock

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, seconds: float, reserve: float = 0.0) -> bool:
        """Whether ``seconds`` of work fit, ``reserve`` seconds kept for later stages."""
        return self.left() - reserve >= seconds

    @contextlib.contextmanager
    def watch(self, on_hard_stop: Callable[[], None]) -> Iterator[None]:
        """Raises :class:`BudgetExceeded` in the main thread when the budget runs out.

        If Python does not get control back within ``HARD_STOP_GRACE_S`` (a compiler stuck in
        C++), ``on_hard_stop()`` runs and the process exits with status 3: whatever was written
        is on disk already.
        """

        def alarm(signum: int, frame: object) -> None:
            raise BudgetExceeded(f"the budget of {self.seconds:.0f} s ran out")

        def hard_stop() -> None:
            on_hard_stop()
            os._exit(3)

        left = max(self.left(), 0.001)
        previous = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, left)
        watchdog = threading.Timer(left + HARD_STOP_GRACE_S, hard_stop)
        watchdog.daemon = True
        watchdog.start()
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            watchdog.cancel()


class PointCosts:
    """Estimated seconds of a grid point, from the points measured so far.

    A point whose compile group was seen takes the longest warm point so far, else the longest
    cold one; before any measurement, ``COLD_POINT_S`` and ``WARM_POINT_S``.
    """

    def __init__(self) -> None:
        self.groups: set[tuple] = set()
        self.cold: list[float] = []
        self.warm: list[float] = []

    def estimate(self, point: Point) -> float:
        if point.compile_group() in self.groups:
            return max(self.warm, default=min(self.cold, default=WARM_POINT_S))
        return max(self.cold, default=COLD_POINT_S)

    def add(self, point: Point, seconds: float) -> None:
        warm = point.compile_group() in self.groups
        (self.warm if warm else self.cold).append(seconds)
        self.groups.add(point.compile_group())


# ------------------------------------------------------------------------------------ preflight


class PreflightError(RuntimeError):
    """The GPU, the driver or the compiler cannot run one kernel: nothing else would run."""


class _FirstLaunchDone(Exception):
    """Stops a sweep after its first launch (the statistics kernel)."""

    def __init__(self, named: dict[str, Any]) -> None:
        super().__init__("first launch done")
        self.named = named


def preflight(device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> dict:
    """Compile, launch and check one kernel: the statistics kernel on 48 anchors x 200 keys.

    Supcon without in-batch anchors and one class: each row's log-sum-exp runs over every key,
    which torch computes independently. Returns the seconds of each step; raises
    :class:`PreflightError` naming the step that failed and why.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise PreflightError(
            f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda}); nothing was measured"
        )
    kernels, interpreted, why_not = triton_fused._load_kernels()
    if kernels is None:
        raise PreflightError(why_not)
    import triton

    generator = torch.Generator().manual_seed(0)

    def unit(rows: int) -> torch.Tensor:
        x = torch.nn.functional.normalize(torch.randn(rows, 64, generator=generator), dim=1)
        return x.to(device=device, dtype=dtype)

    anchors, keys = unit(48), unit(200)
    labels = torch.zeros(48, dtype=torch.long, device=device)
    key_labels = torch.zeros(200, dtype=torch.long, device=device)
    steps: dict[str, float] = {}

    @contextlib.contextmanager
    def step(name: str, failure: str) -> Iterator[None]:
        """Times the step ``name``; an error in it becomes a :class:`PreflightError`."""
        started = time.perf_counter()
        try:
            yield
        except Exception as error:
            raise PreflightError(f"{failure}: {type(error).__name__}: {error}") from error
        steps[name] = time.perf_counter() - started

    def first_launch(kernel, grid, *args, **meta) -> None:
        name = kernel.fn.__name__
        # compiled on its own (the interpreter compiles nothing), so that a compiler error is
        # told apart from a driver error
        compiler = f"Triton {triton.__version__}"
        with step("compile_s", f"compiling {name} for {dtype} failed ({compiler})"):
            if not interpreted:
                kernel.warmup(*args, grid=grid, **meta)
        with step("run_s", f"launching {name} failed (driver or runtime; torch "
                           f"{torch.__version__}, CUDA {torch.version.cuda})"):
            kernel[grid](*args, **meta)
            if anchors.is_cuda:
                torch.cuda.synchronize()
        raise _FirstLaunchDone(dict(zip(kernel.arg_names, args)))

    options = ContrastOptions(TEMPERATURE, 1.0, "supcon", "mean")
    inputs = check_contrast_inputs(anchors, labels, keys, key_labels, False)
    sweep = triton_fused.sweep_for(inputs).sweep
    try:
        with torch.no_grad():
            apply_contrast(
                inputs, options,
                sweep=functools.partial(sweep, launch=first_launch, num_splits=1),
            )
    except _FirstLaunchDone as done:
        named = done.named
    else:
        raise PreflightError("the Triton sweep launched no kernel")
    got = (named["part_max_ptr"][0] + named["part_sum_ptr"][0].log2()) * math.log(2.0)
    scores = anchors.double() @ keys.double().T / TEMPERATURE
    want = torch.logsumexp(scores, dim=1)
    # Rows may come in the layout's order: compare the sorted values.
    error = (got.double().sort().values - want.sort().values).abs().max().item()
    tolerance = 0.05 if dtype != torch.float32 else 0.01
    if not error <= tolerance:
        raise PreflightError(
            f"the statistics kernel ran but its log-sum-exp is off by {error:.3g} (at most "
            f"{tolerance} expected): the compiled code is wrong on this GPU"
        )
    return dict(steps, max_error=error, triton=triton.__version__, torch=torch.__version__)


# ---------------------------------------------------------------------------------- the grid


def make_inputs(point: Point, device: str, seed: int = 0):
    """Anchors (requiring grad) of random classes and keys grouped by class, as a class memory
    bank holds them; unit vectors in the point's dtype."""
    generator = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, point.dtype)

    def unit(rows: int) -> torch.Tensor:
        x = torch.nn.functional.normalize(torch.randn(rows, point.dim, generator=generator), dim=1)
        return x.to(device=device, dtype=dtype)

    anchors = unit(point.n).requires_grad_()
    labels = torch.randint(0, NUM_CLASSES, (point.n,), generator=generator).to(device)
    keys = unit(point.m)
    key_labels = (torch.arange(point.m) * NUM_CLASSES // point.m).to(device)
    return anchors, labels, keys, key_labels


def loss_step(point: Point, backend: str, inputs, launch: Optional[Callable] = None):
    """One forward + backward; ``launch`` replaces the Triton launcher (to record kernels)."""
    anchors, labels, keys, key_labels = inputs

    def step():
        anchors.grad = None
        if launch is None:
            loss = pixcontrast.contrastive_loss(
                anchors, labels, keys, key_labels, in_batch=True, temperature=TEMPERATURE,
                variant=point.variant, backend=backend,
            )
        else:
            options = ContrastOptions(TEMPERATURE, 1.0, point.variant, "mean")
            checked = check_contrast_inputs(anchors, labels, keys, key_labels, True)
            # the backend's own sweep, its launches recorded
            sweep = triton_fused.sweep_for(checked).sweep
            loss = apply_contrast(checked, options, sweep=functools.partial(sweep, launch=launch))
        loss.backward()

    return step


def floor_flops(point: Point) -> float:
    """The flops of the two products a fused loss cannot avoid, ``x @ k.T`` and ``G @ k``."""
    return 2 * (2.0 * point.n * point.m * point.dim)


def peak_tflops(device_name: str, dtype: str) -> Optional[float]:
    """The datasheet's dense tensor-core peak of this GPU for the dtype's products (fp32: TF32)."""
    for name, half, tf32 in PEAK_TFLOPS:
        if name in device_name:
            return tf32 if dtype == "float32" else half
    return None


def count_host_reads(step: Callable[[], None]) -> int:
    """Synchronising CUDA calls in one call of ``step`` (after a warm-up call)."""
    step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@dataclass
class RecordedLaunch:
    """A launch of a Triton step, kept to be replayed: its tensors hold the step's values."""

    kernel: Any
    grid: tuple
    args: tuple
    meta: dict
    compiled: Any

    def run(self) -> None:
        self.kernel[self.grid](*self.args, **self.meta)

    def describe(self) -> dict:
        compiled = self.compiled
        return dict(
            kernel=self.kernel.fn.__name__, grid=list(self.grid),
            num_warps=self.meta.get("num_warps"), num_stages=self.meta.get("num_stages"),
            registers=getattr(compiled, "n_regs", None), spills=getattr(compiled, "n_spills", None),
            shared_bytes=getattr(getattr(compiled, "metadata", None), "shared", None),
            **{k: v for k, v in self.meta.items() if k.startswith("BLOCK")},
        )


def record_step(point: Point, inputs) -> list[RecordedLaunch]:
    """Every launch of one Triton step, run and kept (no kernel reads what it writes, so
    replaying one recomputes the same values)."""
    launches: list[RecordedLaunch] = []

    def launch(kernel, grid, *args, **meta):
        compiled = kernel[grid](*args, **meta)
        launches.append(RecordedLaunch(kernel, tuple(grid), args, meta, compiled))

    loss_step(point, "triton", inputs, launch)()
    torch.cuda.synchronize()
    return launches


def device_times_us(step: Callable[[], None]) -> dict[str, float]:
    """Device microseconds per kernel name in one profiled call of ``step`` (CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiled:
        step()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for event in profiled.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name] = times.get(event.name, 0.0) + event.time_range.elapsed_us()
    return times


def split_device_time(times_us: dict[str, float], step_ms: float) -> dict:
    """A profiled step's time told apart: Triton kernels, other device work, the rest (host)."""
    triton_us = sum(us for name, us in times_us.items() if name.startswith(TRITON_KERNELS))
    other_us = sum(times_us.values()) - triton_us
    return dict(
        triton_kernels_ms=triton_us / 1e3, other_device_ms=other_us / 1e3,
        host_overhead_ms=max(step_ms - (triton_us + other_us) / 1e3, 0.0),
        other_device_work={name: round(us, 1) for name, us in sorted(
            times_us.items(), key=lambda item: -item[1]) if not name.startswith(TRITON_KERNELS)},
    )


def bench_ms(fn: Callable[[], object], rep: int = 100) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def measure_point(point: Point, log: ResultLog, device_name: str) -> None:
    """Every measurement of one point, each written as soon as it is taken."""
    where = asdict(point)
    inputs = make_inputs(point, "cuda")
    x, keys = inputs[0].detach(), inputs[2]
    scores = x @ keys.T
    x_kt_ms = bench_ms(lambda: x @ keys.T)
    g_k_ms = bench_ms(lambda: scores @ keys)
    peak = peak_tflops(device_name, point.dtype)
    flops = floor_flops(point)
    log.write(
        "floor", point=where, x_kT_ms=x_kt_ms, G_k_ms=g_k_ms, gemm_ms=x_kt_ms + g_k_ms,
        flops=flops, peak_tflops=peak, peak_ms=None if peak is None else flops / peak / 1e9,
    )
    step_ms = {}
    for backend in ("torch", "triton"):
        step = loss_step(point, backend, inputs)
        started = time.perf_counter()
        step()  # compiles on the first point of a group
        torch.cuda.synchronize()
        first_s = time.perf_counter() - started
        step_ms[backend] = bench_ms(step)
        log.write("step", point=where, backend=backend, ms=step_ms[backend],
                  first_call_s=first_s, host_reads=count_host_reads(step))
    launches = record_step(point, inputs)
    kernels = [dict(launch.describe(), ms=bench_ms(launch.run, rep=50)) for launch in launches]
    log.write("kernels", point=where, kernels=kernels, sum_ms=sum(k["ms"] for k in kernels))
    try:
        times = device_times_us(loss_step(point, "triton", inputs))
        log.write("breakdown", point=where, step_ms=step_ms["triton"],
                  **split_device_time(times, step_ms["triton"]))
    except Exception as error:  # a profiler without CUPTI: the other figures stand
        log.write("breakdown", point=where, error=f"{type(error).__name__}: {error}")
    del inputs, launches, kernels
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- the tests


def pytest_command() -> list[str]:
    """``tests/ops/test_triton_fused.py`` on CUDA tensors, one line per test, the compile sweep
    left out."""
    return [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--durations=10",
            str(ROOT / "tests" / "ops" / "test_triton_fused.py"),
            "-k", "not compile_without_spills"]


def run_tests(command: list[str], log_path: Path, timeout: float) -> dict:
    """Runs ``command`` with its output streamed to ``log_path``; stops it after ``timeout``."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    started = time.monotonic()
    with open(log_path, "w") as output:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode: Optional[int] = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:  # after the timeout, or the budget's alarm: stop the whole group
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    lines = log_path.read_text(errors="replace").splitlines()
    return dict(
        returncode=returncode, seconds=round(time.monotonic() - started, 1), log=str(log_path),
        summary=lines[-1] if lines and returncode is not None else f"stopped after {timeout:.0f} s",
        failures=[line for line in lines if line.startswith(("FAILED", "ERROR"))],
    )


# ------------------------------------------------------------------------------------ summary


def summarise(records: list[dict]) -> dict:
    """The benchmarks' JSON layout from the records: one row per point measured."""
    rows: dict[tuple, dict] = {}
    kernels: list[dict] = []
    other: dict[str, Any] = {}
    for record in records:
        kind = record["kind"]
        if "point" not in record:
            other.setdefault(kind, []).append(record)
            continue
        point = record["point"]
        row = rows.setdefault(tuple(point.values()), dict(point))
        if kind == "floor":
            row.update(floor_ms=record["gemm_ms"], peak_ms=record["peak_ms"])
        elif kind == "step":
            row[f"{record['backend']}_ms"] = record["ms"]
            row[f"{record['backend']}_host_reads"] = record["host_reads"]
        elif kind == "kernels":
            row["kernels_ms"] = record["sum_ms"]
            kernels += [dict(point=point, **k) for k in record["kernels"]]
        elif kind == "breakdown" and "error" not in record:
            row.update(other_device_ms=record["other_device_ms"],
                       host_overhead_ms=record["host_overhead_ms"])
        elif kind == "skipped":
            row["skipped"] = record["reason"]
    for row in rows.values():
        for backend in ("triton", "torch"):
            if f"{backend}_ms" in row and row.get("floor_ms"):
                row[f"{backend}_over_floor"] = row[f"{backend}_ms"] / row["floor_ms"]
        if "triton_ms" in row and "torch_ms" in row:
            row["winner"] = "triton" if row["triton_ms"] < row["torch_ms"] else "torch"
    start = other.get("start", [{}])[0]
    return {
        "benchmark": "gpu_check",
        "metadata": start.get("metadata", {}),
        "config": dict(argv=start.get("argv"), budget_s=start.get("budget_s")),
        "rows": list(rows.values()),
        "kernels": kernels,
        "events": {kind: found for kind, found in other.items() if kind != "start"},
    }


def write_summary(records_path: Path) -> dict:
    summary = summarise(read_records(records_path))
    path = records_path.with_name(SUMMARY)
    path.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def print_rows(rows: list[dict]) -> None:
    print(f"{'variant':7s} {'M':>7s} {'D':>4s} {'dtype':9s} {'floor':>8s} {'torch':>8s} "
          f"{'triton':>8s} {'kernels':>8s} {'tri/floor':>9s}  winner")

    def cell(row: dict, key: str, fmt: str = "8.3f") -> str:
        value = row.get(key)
        return format(value, fmt) if isinstance(value, float) else format("-", ">8s")

    for row in rows:
        print(f"{row['variant']:7s} {row['m']:7d} {row['dim']:4d} {row['dtype']:9s} "
              f"{cell(row, 'floor_ms')} {cell(row, 'torch_ms')} {cell(row, 'triton_ms')} "
              f"{cell(row, 'kernels_ms')} {cell(row, 'triton_over_floor', '9.2f')}  "
              f"{row.get('winner', row.get('skipped', '-'))}")


# --------------------------------------------------------------------------------------- main


def run_grid(args: argparse.Namespace, log: ResultLog, budget: Budget, device_name: str) -> None:
    reserve = 0.0 if args.skip_tests else TEST_RESERVE_S
    costs = PointCosts()
    grid = points(tuple(args.ms), tuple(args.dims), tuple(args.dtypes), tuple(args.variants))
    for point in grid:
        estimate = costs.estimate(point)
        if not budget.allows(estimate, reserve):
            log.write("skipped", point=asdict(point), reason="budget",
                      estimate_s=round(estimate, 1), left_s=round(budget.left(), 1))
            continue
        started = time.monotonic()
        try:
            measure_point(point, log, device_name)
        except torch.cuda.OutOfMemoryError as error:
            log.write("skipped", point=asdict(point), reason=f"out of memory: {error}")
            torch.cuda.empty_cache()
        costs.add(point, time.monotonic() - started)
        print(f"  {point} measured in {time.monotonic() - started:.1f} s", flush=True)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.summarise is not None:
        print_rows(write_summary(args.summarise)["rows"])
        return 0
    budget = Budget(args.budget)
    log = ResultLog(args.out / RECORDS)
    log.write("start", argv=argv, budget_s=args.budget, metadata=metadata())
    status = 0
    try:
        with budget.watch(lambda: log.write("stopped", reason="hard stop: no return to Python")):
            try:
                log.write("preflight", ok=True, **preflight())
            except PreflightError as error:
                log.write("preflight", ok=False, error=str(error))
                print(f"gpu_check: preflight failed: {error}", file=sys.stderr)
                return 2
            # Triton takes fp32 only with TF32 allowed; cuBLAS and the torch path then use it too.
            torch.set_float32_matmul_precision("high")
            properties = torch.cuda.get_device_properties(0)
            log.write("device", name=properties.name,
                      capability=[properties.major, properties.minor],
                      sm_count=properties.multi_processor_count,
                      float32_matmul_precision="high")
            run_grid(args, log, budget, properties.name)
            if not args.skip_tests:
                timeout = budget.left() - 5.0
                if timeout < MIN_TEST_S:
                    log.write("skipped", stage="tests", reason="budget",
                              left_s=round(budget.left(), 1))
                else:
                    print(f"the Triton tests on CUDA, log in {args.out / TEST_LOG} ...",
                          flush=True)
                    log.write("tests", **run_tests(pytest_command(), args.out / TEST_LOG, timeout))
    except BudgetExceeded as error:
        log.write("stopped", reason=str(error))
        status = 3
    finally:
        log.close()
    summary = write_summary(args.out / RECORDS)
    print_rows(summary["rows"])
    print(f"wrote {args.out / RECORDS} and {args.out / SUMMARY}")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
