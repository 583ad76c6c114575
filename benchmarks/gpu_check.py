"""One-GPU check of pixcontrast's Triton backend: correctness on CUDA, time against cuBLAS and the
torch path, the compiled kernels' registers and spills, host syncs per step.

Run from the repository root on a machine with one CUDA GPU (a few minutes)::

    PYTHONPATH=. python benchmarks/gpu_check.py            # everything
    PYTHONPATH=. python benchmarks/gpu_check.py --skip-tests

It writes ``benchmarks/results/gpu_check.json`` and prints, per point, which backend wins:

1. ``tests/ops/test_triton_fused.py`` on CUDA tensors (``TRITON_INTERPRET=0``; bf16 included,
   which the interpreter cannot run), without the compile sweep;
2. forward + backward of ``contrastive_loss`` for ``paper`` and ``supcon`` at N = 1024 anchors
   (in-batch, needing a gradient) against M memory keys (grouped by class, no gradient),
   M in {40k, 190k}, D in {128, 256}, bf16 and fp32, timed with ``triton.testing.do_bench``:
   ``backend="triton"``, ``backend="torch"`` and the floor, the two cuBLAS GEMMs ``x @ k.T`` and
   ``[N, M] @ [M, D]`` in the same dtype. fp32 runs with TF32 allowed for all three (Triton takes
   fp32 only then; ``"highest"`` precision is the torch path's job);
3. each launched Triton kernel's registers, spills and shared memory;
4. the host synchronisations of one step per backend (``torch.cuda.set_sync_debug_mode``).

Kept to APIs of torch >= 2.4 and Triton >= 3.0.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from _common import metadata
from _harness import write_result

import pixcontrast
from pixcontrast.ops import check_contrast_inputs, triton_fused
from pixcontrast.ops._autograd import apply_contrast
from pixcontrast.ops._options import ContrastOptions

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
RESULTS = HERE.parent / "results" / "gpu_check.json"
NUM_CLASSES = 19
TEMPERATURE = 0.1


@dataclass(frozen=True)
class Point:
    variant: str
    n: int
    m: int
    dim: int
    dtype: str  # a torch dtype's name


def points(
    ms: tuple[int, ...] = (40_000, 190_000),
    dims: tuple[int, ...] = (128, 256),
    dtypes: tuple[str, ...] = ("bfloat16", "float32"),
    variants: tuple[str, ...] = ("paper", "supcon"),
    n: int = 1024,
) -> list[Point]:
    return [Point(v, n, m, d, t) for t in dtypes for d in dims for m in ms for v in variants]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-tests", action="store_true",
                        help="skip tests/ops/test_triton_fused.py")
    parser.add_argument("--test-timeout", type=float, default=150.0, help="seconds for the tests")
    parser.add_argument("--ms", type=int, nargs="+", default=[40_000, 190_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                        choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def make_inputs(point: Point, device: str, seed: int = 0):
    """Anchors (requiring grad) of random classes and a memory of keys grouped by class, as a
    class memory bank holds them; unit vectors in the point's dtype."""
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
    """One forward + backward; ``launch`` replaces the Triton launcher (to inspect kernels)."""
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
            inputs = check_contrast_inputs(anchors, labels, keys, key_labels, True)
            # the backend's own sweep and key dtype, its launches recorded
            sweep, key_dtype = triton_fused.sweep_for(inputs)
            loss = apply_contrast(
                inputs, options, sweep=functools.partial(sweep, launch=launch),
                key_dtype=key_dtype,
            )
        loss.backward()

    return step


def floor_step(inputs):
    """The matrix work a fused loss cannot avoid: ``x @ k.T`` and one ``[N, M] @ [M, D]``."""
    anchors, _, keys, _ = inputs
    x = anchors.detach()

    def step():
        return (x @ keys.T) @ keys

    return step


def winner(row: dict) -> str:
    return "triton" if row["triton_ms"] < row["torch_ms"] else "torch"


def count_host_syncs(step: Callable[[], None]) -> int:
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
    return sum("synchronizing" in str(w.message) for w in caught)


def kernel_reports(point: Point, inputs) -> list[dict]:
    """Registers, spills and shared memory of each distinct kernel one Triton step launches."""
    reports: dict[tuple, dict] = {}

    def launch(kernel, grid, *args, **meta):
        compiled = kernel[grid](*args, **meta)
        name = kernel.fn.__name__
        key = (name, tuple(sorted((k, str(v)) for k, v in meta.items())))
        reports[key] = dict(
            kernel=name, grid=list(grid), num_warps=meta.get("num_warps"),
            num_stages=meta.get("num_stages"), registers=compiled.n_regs,
            spills=compiled.n_spills, shared_bytes=compiled.metadata.shared,
            **{k: v for k, v in meta.items() if k.startswith("BLOCK")},
        )

    loss_step(point, "triton", inputs, launch)()
    return [dict(point=asdict(point), **report) for report in reports.values()]


def run_tests(timeout: float) -> dict:
    """``tests/ops/test_triton_fused.py`` on CUDA tensors, the compile sweep left out."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               str(ROOT / "tests" / "ops" / "test_triton_fused.py"), "-k",
               "not compile_without_spills"]
    try:
        result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(returncode=None, summary=f"timed out after {timeout:.0f} s")
    lines = result.stdout.strip().splitlines()
    failures = [line for line in lines if line.startswith("FAILED")]
    return dict(returncode=result.returncode, summary=lines[-1] if lines else "",
                failures=failures, tail=result.stdout[-4000:] if result.returncode else "")


def time_point(point: Point) -> dict:
    from triton.testing import do_bench

    inputs = make_inputs(point, "cuda")
    row = dict(asdict(point))
    for name, step in [("floor", floor_step(inputs)), ("torch", loss_step(point, "torch", inputs)),
                       ("triton", loss_step(point, "triton", inputs))]:
        row[f"{name}_ms"] = do_bench(step, warmup=25, rep=100, return_mode="median")
    row["triton_over_floor"] = row["triton_ms"] / row["floor_ms"]
    row["torch_over_floor"] = row["torch_ms"] / row["floor_ms"]
    row["winner"] = winner(row)
    return row


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU (torch.cuda.is_available() is False); nothing was run.",
              file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("gpu_check needs Triton (pip install 'pixcontrast[triton]').", file=sys.stderr)
        return 2
    # Triton takes fp32 only with TF32 allowed; cuBLAS and the torch path then use it too.
    torch.set_float32_matmul_precision("high")
    result: dict = dict(metadata=metadata(), float32_matmul_precision="high")
    result["device"] = dict(
        name=torch.cuda.get_device_name(0),
        capability=list(torch.cuda.get_device_capability(0)),
        sm_count=torch.cuda.get_device_properties(0).multi_processor_count,
    )
    if not args.skip_tests:
        print("tests/ops/test_triton_fused.py on CUDA ...", flush=True)
        result["tests"] = run_tests(args.test_timeout)
        print("  ", result["tests"]["summary"], flush=True)

    grid = points(tuple(args.ms), tuple(args.dims), tuple(args.dtypes))
    result["points"], result["kernels"] = [], []
    print(f"{'variant':7s} {'M':>7s} {'D':>4s} {'dtype':9s} {'floor':>8s} {'torch':>8s} "
          f"{'triton':>8s} {'tri/floor':>9s}  winner", flush=True)
    for point in grid:
        row = time_point(point)
        result["points"].append(row)
        print(f"{point.variant:7s} {point.m:7d} {point.dim:4d} {point.dtype:9s} "
              f"{row['floor_ms']:8.3f} {row['torch_ms']:8.3f} {row['triton_ms']:8.3f} "
              f"{row['triton_over_floor']:9.2f}  {row['winner']}", flush=True)
        result["kernels"] += kernel_reports(point, make_inputs(point, "cuda"))
        torch.cuda.empty_cache()

    first = make_inputs(grid[0], "cuda")
    result["host_syncs_per_step"] = {
        backend: count_host_syncs(loss_step(grid[0], backend, first))
        for backend in ("triton", "torch")
    }
    print("host syncs per step:", result["host_syncs_per_step"])
    spilling = [k for k in result["kernels"] if k["spills"]]
    print(f"kernels compiled: {len(result['kernels'])}, with spills: {len(spilling)}")
    wins = [dtype for dtype in args.dtypes
            if all(r["winner"] == "triton" for r in result["points"] if r["dtype"] == dtype)]
    capability = tuple(result["device"]["capability"])
    print("triton wins at every point for:", ", ".join(wins) or "no dtype",
          f"(candidates for TRITON_MEASURED_WINS on sm{capability[0]}{capability[1]})")
    write_result(args.output, result)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
