"""Compile the Triton path's launches for a GPU, without a GPU.

:func:`record_launches` runs :func:`pixcontrast.ops.triton_fused.sweep` on meta tensors with a
launcher that records each kernel launch instead of running it; as meta tensors hold no values,
this also proves that the launch path reads no device value on the host (a host sync would
raise). :func:`compile_launch` compiles one recorded launch with the argument specialisation the
JIT would give it at run time (16-byte aligned pointers and integers divisible by 16 carry
``tt.divisibility``; tensor allocations are aligned, as on CUDA) and reports registers and spills
from the bundled ``ptxas``, shared memory, whether the PTX uses wgmma, and the SASS instructions
of the kernel's main loop (:func:`loop_profile`, from the bundled ``nvdisasm``).

It checks the Triton that runs it: tile choices differ between Triton versions (see
:data:`pixcontrast.ops.triton_fused.TILE_OVERRIDES`), so run it under each version that matters,
e.g. a second environment with another Triton and ``PYTHONPATH`` at the repository.

Run (without ``TRITON_INTERPRET``) as::

    python tools/triton_compile.py ARCH DTYPE DIM VARIANT REDUCTION   # one configuration
    python tools/triton_compile.py --sweep                            # every configuration

Each prints one JSON line per distinct compiled kernel (with ``--sweep``, with its
configuration).
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from pixcontrast.ops import triton_fused
from pixcontrast.ops._layout import ContrastLayout, KeySegment
from pixcontrast.ops._options import ContrastOptions

__all__ = [
    "CONFIGURATIONS",
    "CompileReport",
    "Launch",
    "LoopProfile",
    "compile_configuration",
    "compile_launch",
    "loop_profile",
    "meta_layout",
    "record_launches",
]


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
class LoopProfile:
    """SASS instructions of a kernel's main loop (the backward branch that spans the most).

    Attributes:
        instructions: every instruction of the loop body, rare branches included.
        hot_path: instructions on the shortest path from the loop's head to its backward
            branch: an iteration that takes no optional branch (for the score kernels, an
            interior tile: no mask, no rescale).
        mufu: special-function instructions (``exp2``, ``log2``, reciprocals) on the hot path.
        barriers: block-wide barriers (``BAR``) on the hot path.
        mma: tensor-core instructions (``HGMMA``, ``HMMA``) on the hot path.
    """

    instructions: int
    hot_path: int
    mufu: int
    barriers: int
    mma: int


_SASS_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*);")
_SASS_LABEL = re.compile(r"^(\.L_x_\d+):")
_SASS_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def loop_profile(sass: str) -> Optional[LoopProfile]:
    """The main loop of ``nvdisasm -c`` output, ``None`` without a loop.

    Instructions are split into basic blocks at labels and after branches; forward branches
    inside the loop give the paths, and the hot path is the one with the fewest instructions.
    """
    labels: dict[str, int] = {}
    body: list[tuple[str, bool, Optional[str]]] = []  # (opcode, predicated, branch target)
    for line in sass.splitlines():
        label = _SASS_LABEL.match(line)
        if label:
            labels[label.group(1)] = len(body)
            continue
        instruction = _SASS_INSTRUCTION.match(line)
        if instruction:
            target = _SASS_TARGET.search(instruction.group(3))
            body.append((instruction.group(2), bool(instruction.group(1)),
                         target.group(1) if target else None))
    backward = [
        (labels[target], i) for i, (opcode, _, target) in enumerate(body)
        if opcode.startswith("BRA") and target in labels and labels[target] <= i
    ]
    if not backward:
        return None
    head, tail = max(backward, key=lambda edge: edge[1] - edge[0])
    loop = body[head:tail + 1]
    starts = {0} | {i - head for i in labels.values() if head < i <= tail}
    starts |= {i + 1 for i, (opcode, _, _) in enumerate(loop[:-1]) if opcode.startswith("BRA")}
    bounds = sorted(starts) + [len(loop)]
    blocks = list(zip(bounds[:-1], bounds[1:]))
    block_at = {start: b for b, (start, _) in enumerate(blocks)}

    def opcodes(b: int) -> Counter:
        return Counter(opcode.split(".")[0] for opcode, _, _ in loop[slice(*blocks[b])])

    best: list[Optional[Counter]] = [opcodes(0)] + [None] * (len(blocks) - 1)
    for b, (_, stop) in enumerate(blocks):
        if best[b] is None:
            continue
        opcode, predicated, target = loop[stop - 1]
        successors = []
        if not opcode.startswith("BRA") or predicated:
            successors.append(b + 1)
        if opcode.startswith("BRA") and target in labels:
            successors.append(block_at.get(labels[target] - head, -1))
        for after in successors:
            if b < after < len(blocks):
                path = best[b] + opcodes(after)
                current = best[after]
                if current is None or sum(path.values()) < sum(current.values()):
                    best[after] = path
    hot = best[-1] or Counter()
    return LoopProfile(
        len(loop), sum(hot.values()), hot["MUFU"], hot["BAR"], hot["HGMMA"] + hot["HMMA"]
    )


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
        triton: the version of the Triton that compiled it.
        loop: the SASS of the kernel's main loop (:class:`LoopProfile`), ``None`` without one.
        instructions_per_score: for the score kernels, the loop's hot path per score element and
            thread: ``hot_path * threads / (BLOCK_N * BLOCK_M)``.
    """

    kernel: str
    grid: tuple[int, ...]
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    wgmma: bool
    triton: str
    loop: Optional[LoopProfile]
    instructions_per_score: Optional[float]


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
    loop = loop_profile(_disassemble(compiled.asm["cubin"], capability))
    per_score = None
    if loop is not None and "BLOCK_N" in launch.meta and "BLOCK_M" in launch.meta:
        scores = launch.meta["BLOCK_N"] * launch.meta["BLOCK_M"]
        per_score = round(loop.hot_path * 32 * num_warps / scores, 2)
    return CompileReport(
        kernel.fn.__name__, launch.grid, num_warps, num_stages, registers, spills,
        compiled.metadata.shared, "wgmma" in ptx, triton.__version__, loop, per_score,
    )


def _disassemble(cubin: bytes, capability: int) -> str:
    """SASS of a cubin, from the ``nvdisasm`` bundled beside Triton's ``ptxas``."""
    from triton.backends.nvidia.compiler import get_ptxas

    nvdisasm = os.path.join(os.path.dirname(get_ptxas(capability).path), "nvdisasm")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as file:
            file.write(cubin)
        return subprocess.run(
            [nvdisasm, "-c", path], capture_output=True, text=True, check=True
        ).stdout


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


# Every configuration the compile check covers: (arch, operand dtype, D, variant, reduction),
# the largest accumulators (the likeliest to spill) first.
CONFIGURATIONS = [
    (arch, dtype, dim, variant, reduction)
    for dim in (256, 128, 64, 32)
    for arch in (90, 80, 86)
    for dtype in ("bfloat16", "float16", "float32")
    for variant in ("paper", "supcon")
    for reduction in ("mean", "none")
]


def compile_configuration(
    arch: int, dtype: str, dim: int, variant: str, reduction: str
) -> list[CompileReport]:
    """Every distinct binary of a step at the paper's shape, compiled for ``sm{arch}``."""
    target = triton_fused.Target((arch // 10, arch % 10), 132)
    launches = step_launches(target, getattr(torch, dtype), dim, variant, reduction)
    return [compile_launch(launch, arch) for launch in distinct(launches)]


def main(argv: list[str]) -> None:
    if argv == ["--sweep"]:
        for config in CONFIGURATIONS:
            named = dict(zip(["arch", "dtype", "dim", "variant", "reduction"], config))
            for report in compile_configuration(*config):
                print(json.dumps(dict(named, **asdict(report))), flush=True)
        return
    arch, dtype, dim, variant, reduction = argv
    for report in compile_configuration(int(arch), dtype, int(dim), variant, reduction):
        print(json.dumps(asdict(report)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
