"""Fused contrastive loss on Triton kernels: the contract of :mod:`pixcontrast.ops.torch_fused`.

Forward keeps per anchor only the statistics of :mod:`pixcontrast.ops` (``nu`` or ``lam`` and,
for paper, ``w``). The key axis of the row kernels is split across programs as in
flash-decoding, so that few anchors and many keys still fill the GPU (:func:`launch_plan`); the
splits' partial log-sum-exps are merged in a fixed order.

Scalar reductions know the upstream weights in forward, so the statistics pass also streams the
softmax-weighted key average ``sum_j exp(s_aj - lse_a) k_j`` (attention with V = K): the negative
part of ``dx`` costs no pass of its own. Paper's positive terms (and the positive part of
``dx``) take one more pass, over row tiles that hold one class each (:func:`positive_tiles`),
each visiting its class's block of keys only, about M / C columns; supcon's
positive part goes through the class sums of :mod:`pixcontrast.ops._autograd`, as on the
torch path. ``reduction="none"`` recomputes the scores in backward, flash-attention style. The
key gradient ``dk = G^T x / tau`` is one kernel over key-column blocks. The ``N x M`` matrix is
never in memory.

Nothing in this module's launch path reads a device value on the host: row bounds come from
device-side searches, grids from shapes, upper bounds and the layout's host class offsets.

Importing this module does not import Triton; the kernels are imported on first use (with
``TRITON_INTERPRET=1`` set before that, they run on CPU tensors through Triton's interpreter).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ._autograd import (
    AnchorStatistics,
    FusedSweep,
    add_supcon_positive_gradient,
    supcon_positive_sums,
)
from ._layout import ContrastLayout
from ._options import ContrastInputs, ContrastOptions

__all__ = [
    "KernelLaunch",
    "MergedKeys",
    "TILE_OVERRIDES",
    "Target",
    "TileConfig",
    "launch_plan",
    "merge_segments",
    "operand_dtype",
    "positive_tiles",
    "sweep",
    "sweep_for",
    "tile_config",
    "triton_version",
    "unsupported",
]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# D lives in one register tile per row block (padded to a power of two), as in flash attention.
MAX_DIM = 256
_LOG2E = 1.4426950408889634
# fp32 operands reach the kernels only when TF32 is allowed (see unsupported()); the setting
# means nothing for half-precision operands.
_PRECISION = "tf32"


@functools.cache
def _load_kernels() -> tuple[Optional[ModuleType], bool, str]:
    """``(kernels, interpreted, why not)``, decided once.

    Triton reads ``TRITON_INTERPRET`` when the kernels are defined, so the answer of the first
    import holds for the process.
    """
    try:
        import triton

        from . import _kernels
    except ImportError as error:  # triton missing, or too old for the kernels
        return None, False, f"triton is not importable ({error}); pip install 'pixcontrast[triton]'"
    return _kernels, bool(triton.knobs.runtime.interpret), ""


def operand_dtype(anchors: Tensor, keys: Sequence[Tensor]) -> torch.dtype:
    """The dtype of the products' operands for these anchors and key parts.

    Products take half-precision operands when every input is in that dtype (the layout's fp32
    copy converts back exactly), and fp32 otherwise.
    """
    dtypes = {anchors.dtype} | {part.dtype for part in keys}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def unsupported(anchors: Tensor, keys: Sequence[Tensor]) -> list[str]:
    """Every reason why the Triton backend cannot take these inputs (empty: it can)."""
    kernels, interpreted, import_error = _load_kernels()
    reasons = [import_error] if kernels is None else []
    tensors = [("anchors", anchors)] + [("keys", part) for part in keys]
    for name, tensor in tensors:
        if tensor.device.type != "cuda" and not interpreted:
            reasons.append(
                f"{name} are on {tensor.device.type}, not CUDA (CPU tensors only with "
                "TRITON_INTERPRET=1 set before the first Triton call)"
            )
        if tensor.dtype not in _SUPPORTED_DTYPES:
            reasons.append(f"{name} have dtype {tensor.dtype}; supported: fp32, fp16, bf16")
        elif tensor.dtype == torch.bfloat16 and interpreted:
            reasons.append(f"{name} are bf16, which the Triton interpreter does not support")
    if operand_dtype(anchors, keys) == torch.float32 and _float32_highest():
        reasons.append(
            "fp32 products at 'highest' matmul precision would run on FMA units in Triton; allow "
            "TF32 (torch.set_float32_matmul_precision('high')) or use backend='torch' (cuBLAS)"
        )
    if anchors.shape[-1] > MAX_DIM:
        reasons.append(f"the feature dimension D={anchors.shape[-1]} exceeds {MAX_DIM}")
    return reasons


def _float32_highest() -> bool:
    return torch.get_float32_matmul_precision() == "highest"


class TileConfig(NamedTuple):
    """Tiles of the score kernels.

    The row kernels take ``rows`` anchors x ``cols`` keys per tile over ``num_warps``; the
    key-gradient kernel ``key_rows`` keys x ``cols`` anchors over ``key_warps``. Both pipeline
    ``num_stages`` deep.
    """

    rows: int
    cols: int
    num_warps: int
    num_stages: int
    key_rows: int
    key_warps: int


# Shared memory per block that each family of GPUs grants a kernel (opt-in maximum).
SHARED_MEMORY = {"sm80": 163 * 1024, "sm86": 99 * 1024, "sm90": 227 * 1024}

# (family, operand bytes, padded D) -> tiles, checked by compiling every entry for its family
# (test_triton_fused.py: zero spills, shared memory within SHARED_MEMORY). 64 rows per 4 warps
# are one warpgroup's wgmma height on sm90 (so no two warpgroups compute the same scores) and
# the score tile of 4 warps on sm80. The [rows, D] fp32 accumulators bound the rest: from
# D = 128 on, sm8x row kernels (whose mma.sync operands also sit in registers) and every
# key-gradient kernel but sm90's at D = 128 spread them over 8 warps. D = 256 takes fewer key
# columns on sm86/89 (99 KiB of shared memory). Untuned: to be timed on GPUs
# (benchmarks/gpu_check.py).
_TILES = {
    ("sm90", 2, 64): TileConfig(128, 64, 8, 3, 64, 4),
    ("sm90", 2, 128): TileConfig(128, 64, 8, 3, 64, 4),
    ("sm90", 2, 256): TileConfig(128, 64, 8, 2, 64, 8),
    ("sm90", 4, 64): TileConfig(128, 32, 8, 3, 64, 4),
    ("sm90", 4, 128): TileConfig(128, 32, 8, 2, 64, 4),
    ("sm90", 4, 256): TileConfig(128, 32, 8, 2, 64, 8),
    ("sm80", 2, 64): TileConfig(64, 64, 4, 3, 64, 4),
    ("sm80", 2, 128): TileConfig(64, 64, 8, 3, 64, 8),
    ("sm80", 2, 256): TileConfig(64, 64, 8, 2, 64, 8),
    ("sm80", 4, 64): TileConfig(64, 32, 4, 3, 64, 4),
    ("sm80", 4, 128): TileConfig(64, 32, 8, 2, 64, 8),
    ("sm80", 4, 256): TileConfig(64, 32, 8, 2, 64, 8),
    ("sm86", 2, 64): TileConfig(64, 64, 4, 2, 64, 4),
    ("sm86", 2, 128): TileConfig(64, 64, 8, 2, 64, 8),
    ("sm86", 2, 256): TileConfig(64, 32, 8, 2, 64, 8),
    ("sm86", 4, 64): TileConfig(64, 32, 4, 2, 64, 4),
    ("sm86", 4, 128): TileConfig(64, 32, 8, 2, 64, 8),
    ("sm86", 4, 256): TileConfig(64, 16, 8, 1, 64, 8),
}
# Tiles for Triton releases before a version, where their register allocation spills with the
# tiles above (found by the compile check, tools/triton_compile.py, run under each release):
# (first release that takes _TILES, family, operand bytes, padded D) -> tiles.
TILE_OVERRIDES: dict[tuple[tuple[int, int], str, int, int], TileConfig] = {
    # Triton 3.6 (the image of our GPU machines): tf32 at D = 256 on sm90 spills in every row
    # kernel at 128 rows; 64 rows over 8 warps split the [rows, D] accumulators over two
    # warpgroups instead.
    ((3, 9), "sm90", 4, 256): TileConfig(64, 32, 8, 2, 64, 8),
    # and 16-bit D = 256 on sm80 spills in the key gradient at 64 anchors per step.
    ((3, 9), "sm80", 2, 256): TileConfig(64, 32, 8, 2, 64, 8),
}
# Under the interpreter small tiles make small test sizes span several tiles and splits.
_INTERPRETER_TILES = TileConfig(32, 32, 1, 1, 32, 1)
# The combine and sum kernels are memory-bound and tiny: fixed tiles.
_COMBINE_ROWS, _SUM_BLOCK, _SMALL_WARPS = 16, 1024, 4
# A split below this many key tiles spends more on its prologue and partials than it saves.
_MIN_TILES_PER_SPLIT = 4
# Splits are searched up to this many waves' worth (the partials grow with the splits).
_MAX_WAVES = 4
# Splits whose wave efficiency is within this of the best count as equally good; the fewest win
# (fewer partials to write and merge).
_WAVE_SLACK = 0.05


def _positive_rows(tiles: TileConfig) -> int:
    """Rows of paper's positive kernel, on the row kernels' warps and key columns: at most 64.

    Its row tiles hold one class each (about N / C rows, 54 at the paper's shape), so 64 rows
    waste less of the product than 128; on sm90 64 rows are one warpgroup's wgmma height, and
    the 8 warps of the row kernels split the ``[rows, D]`` accumulator over two warpgroups
    (with 4 warps, or twice the columns, it spills at D = 256).
    """
    return min(tiles.rows, 64)


def arch_family(capability: tuple[int, int]) -> str:
    """The tile family of a CUDA compute capability.

    sm90 for Hopper and newer (untested beyond sm90), sm80 for A100, sm86 (99 KiB of shared
    memory) for the other sm8x GPUs and older.
    """
    if capability >= (9, 0):
        return "sm90"
    return "sm80" if capability == (8, 0) else "sm86"


def _block_d(dim: int) -> int:
    return max(16, 1 << max(dim - 1, 0).bit_length())


@functools.cache
def triton_version() -> Optional[tuple[int, int]]:
    """``(major, minor)`` of the installed Triton (``triton.__version__``), ``None`` without it."""
    try:
        import triton
    except ImportError:
        return None
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def tile_config(
    capability: tuple[int, int],
    dtype: torch.dtype,
    dim: int,
    version: Optional[tuple[int, int]] = None,
) -> TileConfig:
    """Score-kernel tiles for a GPU, operand dtype and feature dimension (``dim <= MAX_DIM``).

    ``version`` is the ``(major, minor)`` of the Triton that compiles the kernels (default: the
    installed one): releases before a version listed in :data:`TILE_OVERRIDES` take the tiles
    found not to spill under them.
    """
    key = (arch_family(capability), 4 if dtype == torch.float32 else 2, max(64, _block_d(dim)))
    version = version or triton_version()
    for (first, *override_key), tiles in sorted(TILE_OVERRIDES.items()):
        if tuple(override_key) == key and version is not None and version < first:
            return tiles
    return _TILES[key]


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch: its grid, tiles, warps, stages and key splits."""

    kernel: str
    grid: tuple[int, ...]
    block_rows: int
    block_cols: int
    block_d: int
    num_warps: int
    num_stages: int
    splits: int

    @property
    def programs(self) -> int:
        """The number of programs the launch runs, the product of its grid."""
        return math.prod(self.grid)


def choose_splits(row_tiles: int, col_tiles: int, sm_count: int) -> int:
    """Key splits per row tile, flash-decoding style.

    No split when the row tiles alone fill the GPU. Otherwise enough to fill at least one wave of
    ``sm_count`` programs (one per SM, a conservative occupancy), and among those counts the
    fewest whose wave efficiency (programs / (waves * sm_count)) is within ``_WAVE_SLACK`` of the
    best: a last wave that is nearly empty costs as much as a full one. Each split keeps at least
    ``_MIN_TILES_PER_SPLIT`` key tiles; with too few keys for a full wave, as many as that allows.
    """
    if row_tiles >= sm_count:
        return 1
    least = -(-sm_count // row_tiles)
    most = max(1, min(_MAX_WAVES * least, col_tiles // _MIN_TILES_PER_SPLIT))
    if most <= least:
        return most

    def efficiency(splits: int) -> float:
        programs = row_tiles * splits
        return programs / (-(-programs // sm_count) * sm_count)

    best = max(efficiency(s) for s in range(least, most + 1))
    return next(s for s in range(least, most + 1) if efficiency(s) >= best - _WAVE_SLACK)


def positive_tiles(
    anchor_offsets: Sequence[int], key_offsets: Sequence[int], block_rows: int
) -> list[tuple[int, int, int, int]]:
    """``(row_start, row_stop, col_lo, col_hi)`` per program of paper's positive kernel.

    Each class's sorted anchors in tiles of at most ``block_rows`` rows, with the class's block
    of key columns: a row tile never spans two classes, so it visits only its own positives.
    """
    return [
        (start, min(start + block_rows, stop), key_offsets[c], key_offsets[c + 1])
        for c, (begin, stop) in enumerate(zip(anchor_offsets[:-1], anchor_offsets[1:]))
        for start in range(begin, stop, block_rows)
    ]


def launch_plan(
    n: int,
    m: int,
    dim: int,
    dtype: torch.dtype,
    sm_count: int,
    *,
    capability: tuple[int, int] = (9, 0),
    num_splits: Optional[int] = None,
    interpreted: bool = False,
    class_offsets: Optional[tuple[Sequence[int], Sequence[int]]] = None,
    version: Optional[tuple[int, int]] = None,
) -> dict[str, KernelLaunch]:
    """Every kernel a loss evaluation over ``n`` sorted anchors and ``m`` sorted keys may launch.

    Planned without launching anything: grid, tiles, warps, stages and key splits, for features
    of dimension ``dim`` on a GPU of ``sm_count`` SMs and compute ``capability`` (the
    interpreter's small tiles when ``interpreted``). ``dtype`` is the products' operand dtype,
    ``num_splits`` overrides the split choice (tests). ``"key_grad"``'s grid is its upper bound,
    all ``m`` columns; ``"split_sum"``'s is that of an ``[n, dim]`` sum of partials (paper's
    positive terms are a smaller one). ``"anchor_grad"`` (backward of ``reduction="none"``) takes
    the split of ``"statistics"``. ``"positive"`` (paper only) runs over the class tiles of
    :func:`positive_tiles` for the layout's ``(anchor_offsets, key_offsets)`` (default: one
    class), split for the widest class block. ``version`` is the compiling Triton's (see
    :func:`tile_config`).
    """
    tiles = _INTERPRETER_TILES if interpreted else tile_config(capability, dtype, dim, version)
    block_d = _block_d(dim)
    row_tiles, col_tiles = -(-n // tiles.rows), -(-m // tiles.cols)
    wanted = num_splits if num_splits is not None else choose_splits(row_tiles, col_tiles, sm_count)
    splits = max(1, min(wanted, col_tiles))  # no empty split
    positive_rows = _positive_rows(tiles)
    class_tiles = positive_tiles(*(class_offsets or ([0, n], [0, m])), positive_rows)
    widest = max((-(-(hi - lo) // tiles.cols) for _, _, lo, hi in class_tiles), default=0)
    positive_splits = max(1, min(
        num_splits if num_splits is not None
        else choose_splits(len(class_tiles), widest, sm_count),
        widest,
    ))

    def score_kernel(name: str, grid: tuple[int, ...], kernel_splits: int) -> KernelLaunch:
        return KernelLaunch(
            name, grid, tiles.rows, tiles.cols, block_d, tiles.num_warps, tiles.num_stages,
            kernel_splits,
        )

    def small_kernel(name: str, grid: tuple[int, ...], rows: int) -> KernelLaunch:
        return KernelLaunch(name, grid, rows, 1, block_d, _SMALL_WARPS, 1, splits)

    row_grid = (row_tiles, splits)
    return {
        "statistics": score_kernel("contrast_statistics_kernel", row_grid, splits),
        "combine": small_kernel(
            "combine_statistics_kernel", (-(-n // _COMBINE_ROWS),), _COMBINE_ROWS
        ),
        "positive": KernelLaunch(
            "paper_positive_kernel", (len(class_tiles), positive_splits), positive_rows,
            tiles.cols, block_d, tiles.num_warps, tiles.num_stages, positive_splits,
        ),
        "split_sum": small_kernel("sum_splits_kernel", (-(-n * dim // _SUM_BLOCK),), _SUM_BLOCK),
        "anchor_grad": score_kernel("contrast_anchor_grad_kernel", row_grid, splits),
        "key_grad": KernelLaunch(
            "contrast_key_grad_kernel", (-(-m // tiles.key_rows),), tiles.key_rows, tiles.cols,
            block_d, tiles.key_warps, tiles.num_stages, 1,
        ),
    }


class Target(NamedTuple):
    """What the plan needs to know of the device."""

    capability: tuple[int, int]
    sm_count: int


@functools.cache
def _cuda_target(index: int) -> Target:
    properties = torch.cuda.get_device_properties(index)
    return Target((properties.major, properties.minor), properties.multi_processor_count)


def device_target(device: torch.device) -> Target:
    """The device's target; CPU tensors (interpreter) take one SM, so no split unless asked."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_target(index)
    return Target((9, 0), 1)


class MergedKeys(NamedTuple):
    """The kernels' operand: every key segment of a layout in one class-sorted table.

    Within class ``c`` the segments follow each other in the layout's order (the in-batch anchors
    first). The kernels read one table with contiguous class blocks, so the segments are copied
    into it, in the operand dtype.

    Attributes:
        keys: ``[M, D]`` the table.
        key_class: ``[M]`` compact class id of each column (non-decreasing).
        self_column: ``[N]`` column of each sorted anchor's own key, or ``None``.
        segment_columns: per segment, ``[m]`` the column of each of its keys.
        grad_columns: ranges of columns whose gradient is wanted (from ``key_grads``).
        key_offsets: host list, ``C + 1`` class boundaries in the table.
    """

    keys: Tensor
    key_class: Tensor
    self_column: Optional[Tensor]
    segment_columns: tuple[Tensor, ...]
    grad_columns: list[tuple[int, int]]
    key_offsets: list[int]


def merge_segments(
    layout: ContrastLayout, dtype: torch.dtype, key_grads: Sequence[bool]
) -> MergedKeys:
    """The :class:`MergedKeys` of ``layout`` in ``dtype``; ``key_grads`` as the sweep takes it."""
    x, segments = layout.anchors, layout.segments
    device = x.device
    classes = range(layout.num_classes)
    counts = [[s.offsets[c + 1] - s.offsets[c] for c in classes] for s in segments]
    class_start = [0]
    for c in classes:
        class_start.append(class_start[-1] + sum(count[c] for count in counts))
    table = torch.empty((layout.num_keys, x.shape[1]), dtype=dtype, device=device)
    key_class = torch.empty(layout.num_keys, dtype=torch.long, device=device)
    segment_columns, grad_columns = [], []
    before = list(class_start[:-1])  # the next free column of each class
    wanted = list(key_grads) + [False] * (len(segments) - len(key_grads))
    for segment, count, want in zip(segments, counts, wanted):
        shift = [before[c] - segment.offsets[c] for c in classes]
        if want:
            grad_columns += [(before[c], before[c] + count[c]) for c in classes if count[c]]
        for c in classes:
            before[c] += count[c]
        # (a host list to the device: the Triton path only, which never reads the device)
        rows = torch.arange(segment.keys.shape[0], device=device)
        column = rows + torch.tensor(shift, device=device)[segment.key_class]
        table.index_copy_(0, column, segment.keys.to(dtype))
        key_class.index_copy_(0, column, segment.key_class)
        segment_columns.append(column)
    self_column = segment_columns[0] if layout.in_batch else None
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(grad_columns):
        if merged and merged[-1][1] == lo:
            merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    return MergedKeys(
        table, key_class, self_column, tuple(segment_columns), merged, class_start
    )


def _row_bounds(layout: ContrastLayout, merged: MergedKeys) -> tuple[Tensor, Tensor, Tensor]:
    """``pos_lo, pos_hi, self_col`` (int32) per sorted anchor, found on the device.

    The class block of each anchor is where its class id sorts into the non-decreasing key
    classes.
    """
    key_class, anchor_class = merged.key_class, layout.anchor_class
    pos_lo = torch.searchsorted(key_class, anchor_class, out_int32=True)
    pos_hi = torch.searchsorted(key_class, anchor_class, right=True, out_int32=True)
    if merged.self_column is not None:
        self_col = merged.self_column.to(torch.int32)
    else:
        self_col = torch.full_like(pos_lo, -1)
    return pos_lo, pos_hi, self_col


def _device_table(entries: Sequence[Sequence[int]], device: torch.device) -> Tensor:
    """``[fields, len(entries)]`` int32 on ``device``: one column per program.

    Copied from pinned memory without waiting (the entries are host values already).
    """
    table = torch.tensor(entries, dtype=torch.int32).reshape(len(entries), -1).T.contiguous()
    if device.type == "cuda":
        table = table.pin_memory()
    return table.to(device, non_blocking=True)


def _key_blocks(columns: list[tuple[int, int]], block: int, device) -> tuple[Tensor, Tensor]:
    """The table of column blocks of the ``dk`` kernel, ``[start, stop)`` per program.

    The ``columns`` ranges are cut into blocks of ``block`` columns.
    """
    table = _device_table(
        [(start, hi) for lo, hi in columns for start in range(lo, hi, block)], device
    )
    return table[0], table[1]


Launch = Callable[..., None]


def _launch(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    kernel[grid](*args, **meta)


def sweep(
    layout: ContrastLayout,
    options: ContrastOptions,
    weight: Optional[Tensor],
    need_anchor_grad: bool,
    key_grads: Sequence[bool],
    saved: Optional[AnchorStatistics] = None,
    *,
    operand_dtype: torch.dtype = torch.float32,
    num_splits: Optional[int] = None,
    target: Optional[Target] = None,
    launch: Launch = _launch,
) -> tuple[Tensor, AnchorStatistics, Optional[Tensor], tuple[Optional[Tensor], ...]]:
    """The Triton ``sweep`` of :mod:`pixcontrast.ops._autograd` (see ``torch_fused.sweep``).

    With ``saved`` statistics the statistics kernels are skipped and the returned loss is zeros
    (only backward passes ``saved``, and it uses the gradients alone). ``operand_dtype`` is the
    dtype of the products' operands; ``num_splits`` overrides the planned key splits, ``target``
    the device's, and ``launch(kernel, grid, *args, **meta)`` runs a kernel (tests record).
    The kernels read the key segments merged into one table (:func:`merge_segments`).
    """
    temperature, rho = options.temperature, options.rho
    x = layout.anchors
    n, m, dim = x.shape[0], layout.num_keys, x.shape[1]
    loss = x.new_zeros(n)
    stats = saved
    if stats is None:
        stats = AnchorStatistics(x.new_full((n,), -torch.inf), x.new_zeros(n))
    want_grad_x = weight is not None and need_anchor_grad
    merged = merge_segments(layout, operand_dtype, key_grads)
    columns = merged.grad_columns
    want_grad_k = weight is not None and bool(columns)
    if n == 0 or m == 0:
        grad_x = x.new_zeros(x.shape) if want_grad_x else None
        return loss, stats, grad_x, _segment_grads(layout, merged, key_grads, weight, None)

    kernels, interpreted, import_error = _load_kernels()
    if kernels is None:
        raise RuntimeError(import_error)
    target = target or device_target(x.device)
    class_offsets = (layout.anchor_offsets, merged.key_offsets)
    plan = launch_plan(
        n, m, dim, operand_dtype, target.sm_count, capability=target.capability,
        num_splits=num_splits, interpreted=interpreted, class_offsets=class_offsets,
    )
    stats_plan = plan["statistics"]
    block_d, splits = stats_plan.block_d, stats_plan.splits
    x_op = x.to(operand_dtype).contiguous()
    k_op = merged.keys
    pos_lo, pos_hi, self_col = _row_bounds(layout, merged)
    is_paper = options.variant == "paper"
    inv_pos = 1.0 / layout.positives.clamp(min=1)
    has_pos = layout.positives > 0
    positive_sums = None if is_paper else supcon_positive_sums(layout)
    scale2 = _LOG2E / temperature

    def fp32_empty(*shape: int) -> Tensor:
        return torch.empty(shape, dtype=torch.float32, device=x.device)

    def run(name: str, kernel, *args, **constexprs) -> None:
        """A row kernel of the plan: anchors along ``BLOCK_N``, keys along ``BLOCK_M``."""
        step = plan[name]
        launch(
            kernel, step.grid, *args, **constexprs, BLOCK_N=step.block_rows,
            BLOCK_M=step.block_cols, BLOCK_D=block_d, num_warps=step.num_warps,
            num_stages=step.num_stages,
        )

    def sum_splits(partial: Tensor) -> Tensor:
        """``partial.sum(0)`` in split order, by the kernel."""
        out = fp32_empty(*partial.shape[1:])
        numel = out.numel()
        launch(
            kernels.sum_splits_kernel, (-(-numel // _SUM_BLOCK),), partial, out,
            partial.shape[0], numel, BLOCK=_SUM_BLOCK, num_warps=_SMALL_WARPS,
        )
        return out

    # Scalar reductions pass the weights to forward: the negative part of dx streams there.
    stream = saved is None and want_grad_x
    mean_key: Optional[Tensor] = None
    pos_acc: Optional[Tensor] = None
    if saved is None:
        part_max = fp32_empty(splits, n)
        part_sum = fp32_empty(splits, n)
        part_acc = fp32_empty(splits, n, dim) if stream else part_max
        run(
            "statistics", kernels.contrast_statistics_kernel,
            x_op, k_op, pos_lo, pos_hi, self_col, part_max, part_sum, part_acc,
            n, m, dim, x_op.stride(0), k_op.stride(0), scale2,
            IS_PAPER=is_paper, STREAM_GRAD=stream, PRECISION=_PRECISION,
        )
        lse = fp32_empty(n)
        mean_key = fp32_empty(n, dim) if stream else lse
        launch(
            kernels.combine_statistics_kernel, plan["combine"].grid,
            part_max, part_sum, part_acc, lse, mean_key, n, dim, splits,
            STREAM_GRAD=stream, BLOCK_N=_COMBINE_ROWS, BLOCK_D=block_d, num_warps=_SMALL_WARPS,
        )
        if is_paper:
            positive = plan["positive"]
            class_tiles = _device_table(
                positive_tiles(*class_offsets, positive.block_rows), x.device
            )
            part_terms = fp32_empty(positive.splits, 2, n)
            part_pos_acc = fp32_empty(positive.splits, n, dim) if stream else part_terms
            run(
                "positive", kernels.paper_positive_kernel,
                x_op, k_op, self_col, lse, class_tiles, part_terms, part_pos_acc,
                n, positive.grid[0], dim, x_op.stride(0), k_op.stride(0), scale2,
                STREAM_GRAD=stream, PRECISION=_PRECISION,
            )
            softplus_sum, sigmoid_sum = sum_splits(part_terms)
            pos_acc = sum_splits(part_pos_acc) if stream else None
            loss = rho * softplus_sum * inv_pos
            stats = AnchorStatistics(lse, sigmoid_sum * inv_pos)
        else:
            assert positive_sums is not None  # computed for every variant but paper
            positive_dot = (x * positive_sums).sum(dim=1) / temperature
            safe_lse = torch.where(has_pos, lse, torch.zeros_like(lse))
            loss = torch.where(has_pos, rho * (safe_lse - positive_dot * inv_pos), 0.0)
            stats = AnchorStatistics(lse, torch.zeros_like(lse))
    if weight is None:
        return loss, stats, None, (None,) * len(layout.segments)

    row_scale = rho * weight * has_pos
    if is_paper:
        neg_coef = row_scale * stats.positive_weight
        pos_coef = -row_scale * inv_pos
    else:
        neg_coef, pos_coef = row_scale, torch.zeros_like(row_scale)
    # The recomputing kernels cast G to the operand dtype for their products: in units of its
    # largest row coefficient it is at most ~1, so fp16 neither overflows nor flushes small
    # upstream gradients (1 / N for a mean) to zero. The factor is applied to the fp32 results.
    coef_unit = torch.maximum(neg_coef.abs().max(), pos_coef.abs().max()).clamp(
        min=torch.finfo(torch.float32).tiny
    )
    row_args = (
        pos_lo, pos_hi, self_col, stats.log_normalizer, neg_coef / coef_unit, pos_coef / coef_unit
    )
    grad_x = grad_k = None
    if want_grad_x and stream:
        assert mean_key is not None  # the forward above streamed it
        grad_x = neg_coef[:, None] * mean_key
        if is_paper:
            assert pos_acc is not None  # and paper's positive part with it
            grad_x += pos_coef[:, None] * pos_acc
        grad_x /= temperature
    elif want_grad_x:
        part_grad = fp32_empty(splits, n, dim)
        run(
            "anchor_grad", kernels.contrast_anchor_grad_kernel,
            x_op, k_op, *row_args, part_grad,
            n, m, dim, x_op.stride(0), k_op.stride(0), scale2,
            IS_PAPER=is_paper, PRECISION=_PRECISION,
        )
        grad_x = sum_splits(part_grad) * (coef_unit / temperature)
    if want_grad_k:
        use_table = columns != [(0, m)]
        block = plan["key_grad"].block_rows
        if use_table:
            starts, stops = _key_blocks(columns, block, x.device)
            grid: tuple[int, ...] = (starts.numel(),)
            # columns outside the wanted ones stay zero
            grad_k = torch.zeros(k_op.shape, dtype=torch.float32, device=x.device)
        else:
            starts = stops = pos_lo  # unused without the table
            grid = plan["key_grad"].grid
            grad_k = torch.empty(k_op.shape, dtype=torch.float32, device=x.device)  # all written
        launch(
            kernels.contrast_key_grad_kernel, grid,
            x_op, k_op, *row_args, starts, stops, grad_k,
            n, m, dim, x_op.stride(0), k_op.stride(0), grad_k.stride(0), scale2,
            USE_TABLE=use_table, IS_PAPER=is_paper, PRECISION=_PRECISION,
            BLOCK_M=block, BLOCK_N=plan["key_grad"].block_cols, BLOCK_D=block_d,
            num_warps=plan["key_grad"].num_warps, num_stages=plan["key_grad"].num_stages,
        )
        grad_k *= coef_unit / temperature
    grad_keys = _segment_grads(layout, merged, key_grads, weight, grad_k)
    if not is_paper:
        assert positive_sums is not None
        add_supcon_positive_gradient(layout, positive_sums, options, weight, grad_x, grad_keys)
    return loss, stats, grad_x, grad_keys


def _segment_grads(
    layout: ContrastLayout,
    merged: MergedKeys,
    key_grads: Sequence[bool],
    weight: Optional[Tensor],
    grad_k: Optional[Tensor],
) -> tuple[Optional[Tensor], ...]:
    """The key gradient of each segment that wants one, from the table's ``grad_k``."""
    wanted = list(key_grads) + [False] * (len(layout.segments) - len(key_grads))
    grads: list[Optional[Tensor]] = []
    for segment, column, want in zip(layout.segments, merged.segment_columns, wanted):
        if weight is None or not want:
            grads.append(None)
        elif grad_k is None:
            grads.append(layout.anchors.new_zeros((segment.keys.shape[0], layout.anchors.shape[1])))
        else:
            grads.append(grad_k.index_select(0, column))
    return tuple(grads)


def sweep_for(inputs: ContrastInputs) -> FusedSweep:
    """The Triton backend for these inputs: its products take :func:`operand_dtype` of them.

    The layout keeps the keys in their dtype; the kernels' table is built in the operand dtype
    (:func:`merge_segments`), so half-precision keys are never widened to fp32.
    """
    dtype = operand_dtype(inputs.anchors, inputs.keys)
    return FusedSweep(functools.partial(sweep, operand_dtype=dtype))
