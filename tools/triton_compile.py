"""Compile the Triton path's launches for a GPU, without a GPU.

:func:`record_launches` runs :func:`pixcontrast.ops.triton_fused.sweep` on meta tensors with a
launcher that records each kernel launch instead of running it; as meta tensors hold no values,
this also proves that the launch path reads no device value on the host (a host sync would
raise). :func:`compile_launch` compiles one recorded launch with the argument specialisation the
JIT would give it at run time (16-byte aligned pointers and integers divisible by 16 carry
``tt.divisibility``; tensor allocations are aligned, as on CUDA) and reports registers and spills
from the bundled ``ptxas``, shared memory, and whether the PTX uses wgmma.

Run as ``python tools/triton_compile.py ARCH DTYPE DIM VARIANT REDUCTION`` (without
``TRITON_INTERPRET``): prints one JSON line per distinct compiled kernel.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pixcontrast.ops import triton_fused
from pixcontrast.ops._layout import ContrastLayout, KeySegment
from pixcontrast.ops._options import ContrastOptions

__all__ = ["CompileReport", "Launch", "compile_launch", "meta_layout", "record_launches"]


@dataclass(frozen=True)
class Launch:
    """One kernel launch, recorded by :func:`record_launches` instead of run.

    Attributes:
        kernel: the Triton kernel launched.
        grid: the launch grid.
        args: the kernel's positional arguments (tensors and scalars), in order.
        meta: its keyword arguments: the compile-time (``tl.constexpr``) ones and the launch
            options ``num_warps`` and ``num_stages``.
    """

    kernel: Any
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    meta: dict[str, Any]


@dataclass(frozen=True)
class CompileReport:
    """What :func:`compile_launch` reports of one compiled launch.

    Attributes:
        kernel: the kernel's name.
        grid: the launch grid.
        num_warps: warps per program.
        num_stages: pipelining stages of the kernel's loops.
        registers: registers per thread, as the bundled ``ptxas`` reports them.
        spill_bytes: spill stores plus spill loads per thread, in bytes, from ``ptxas``.
        shared_bytes: shared memory of the compiled kernel, in bytes.
        wgmma: whether the PTX uses wgmma.
    """

    kernel: str
    grid: tuple[int, ...]
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    wgmma: bool


def meta_layout(n: int, m: int, dim: int, in_batch: bool, num_classes: int = 19) -> ContrastLayout:
    """A class-sorted layout of ``n`` anchors and ``m`` keys (``+ n`` in-batch) on the meta device.

    The host offsets are an even split into ``num_classes`` classes.
    """

    def floats(*shape: int) -> torch.Tensor:
        return torch.empty(shape, device="meta")

    def index(size: int) -> torch.Tensor:
        return torch.empty(size, dtype=torch.long, device="meta")

    def offsets(count: int) -> list[int]:
        return [count * c // num_classes for c in range(num_classes + 1)]

    anchors, anchor_class = floats(n, dim), index(n)
    segments = [KeySegment(anchors, anchor_class, offsets(n), index(n), None)] if in_batch else []
    segments.append(KeySegment(floats(m, dim), index(m), offsets(m), None, 0))
    return ContrastLayout(
        anchors=anchors,
        anchor_order=index(n),
        anchor_class=anchor_class,
        positives=floats(n),
        anchor_offsets=offsets(n),
        segments=tuple(segments),
        key_part_sizes=(m,),
        anchor_dtype=torch.float32,
    )


def record_launches(
    layout: ContrastLayout,
    variant: str,
    reduction: str,
    operand_dtype: torch.dtype,
    target: triton_fused.Target,
    key_grads: tuple[bool, ...] | None = None,
) -> list[Launch]:
    """The launches of one training step on meta tensors.

    Forward and backward, anchor and key gradients (of the key segments flagged in
    ``key_grads``, default all): a scalar reduction does everything in forward, ``"none"``
    recomputes.
    """
    launches: list[Launch] = []

    def record(kernel: Any, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
        launches.append(Launch(kernel, tuple(grid), args, meta))

    n = layout.anchors.shape[0]
    wanted = key_grads or (True,) * len(layout.segments)
    weight = torch.empty(n, device="meta")
    sweep = functools.partial(
        triton_fused.sweep, operand_dtype=operand_dtype, target=target, launch=record
    )
    options = ContrastOptions(0.1, 1.0, variant, reduction)
    if reduction == "none":
        _, stats, _, _ = sweep(layout, options, None, False, ())
        sweep(layout, options, weight, True, wanted, saved=stats)
    else:
        sweep(layout, options, weight, True, wanted)
    return launches


def _ptxas_usage(ptx: str, capability: int) -> tuple[int, int]:
    """``(registers, spill bytes)`` per thread, as the bundled ptxas reports them."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as file:
            file.write(ptx)
        log = subprocess.run(
            [get_ptxas(capability).path, "-v", f"--gpu-name={sm_arch_from_capability(capability)}",
             path, "-o", path + ".o"],
            capture_output=True, text=True, check=True,
        ).stderr
    used = re.search(r"Used (\d+) registers", log)
    if used is None:
        raise RuntimeError(f"ptxas -v reported no register count:\n{log}")
    registers = int(used.group(1))
    spills = sum(int(count) for count in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills


def compile_launch(launch: Launch, capability: int) -> CompileReport:
    """Compile a recorded launch for ``sm{capability}`` as the JIT would specialise it."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    kernel = launch.kernel
    constexprs = {name: launch.meta[name] for name in kernel.arg_names if name in launch.meta}
    values = iter(launch.args)
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        kind, specialisation = native_specialize_impl(CUDABackend, next(values), False, True, True)
        signature[name] = kind
        if kind == "constexpr":  # the JIT turns an integer 1 into a constant
            constexprs[name] = specialisation
        elif isinstance(specialisation, str) and specialisation:
            attrs[(index,)] = CUDABackend.parse_attr(specialisation)
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    num_warps, num_stages = launch.meta["num_warps"], launch.meta.get("num_stages", 3)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", capability, 32),
        options=dict(num_warps=num_warps, num_stages=num_stages),
    )
    ptx = compiled.asm["ptx"]
    registers, spills = _ptxas_usage(ptx, capability)
    return CompileReport(
        kernel.fn.__name__, launch.grid, num_warps, num_stages, registers, spills,
        compiled.metadata.shared, "wgmma" in ptx,
    )


def distinct(launches: list[Launch]) -> list[Launch]:
    """One launch per distinct compiled binary (kernel and compile-time arguments)."""
    seen, kept = set(), []
    for launch in launches:
        meta = tuple(sorted((name, str(value)) for name, value in launch.meta.items()))
        key = (launch.kernel.fn.__name__, meta)
        if key not in seen:
            seen.add(key)
            kept.append(launch)
    return kept


def step_launches(
    target: triton_fused.Target, operand_dtype: torch.dtype, dim: int, variant: str,
    reduction: str, n: int = 1024, m: int = 190_000,
) -> list[Launch]:
    """Every launch of a step at the paper's shape.

    For both ways of choosing key-gradient columns: all of them, and a table of ranges (here the
    in-batch anchors' own columns among memory keys that need none).
    """
    launches = []
    for in_batch, key_grads in [(False, None), (True, (True, False))]:
        layout = meta_layout(n, m, dim, in_batch)
        launches += record_launches(layout, variant, reduction, operand_dtype, target, key_grads)
    return launches


def main(argv: list[str]) -> None:
    arch, dtype_name, dim, variant, reduction = argv
    capability = int(arch)
    target = triton_fused.Target((capability // 10, capability % 10), 132)
    for launch in distinct(step_launches(target, getattr(torch, dtype_name), int(dim), variant,
                                         reduction)):
        print(json.dumps(asdict(compile_launch(launch, capability))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
