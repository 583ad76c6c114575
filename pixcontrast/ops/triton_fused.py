"""Fused contrastive loss on Triton kernels: the contract of :mod:`pixcontrast.ops.torch_fused`.

The forward kernel keeps per anchor only the statistics of DESIGN.md §1 (``nu`` or ``lam`` and,
for paper, the positive sums); the backward kernels recompute the scores tile by tile, flash
attention style, with ``dx = G k / tau`` over row blocks and ``dk = G^T x / tau`` over column
blocks. Scalar reductions therefore cost three products (scores, and each gradient product
recomputes them), ``reduction="none"`` the same split over forward and backward. The ``N x M``
matrix is never in memory. Supcon's positive part goes through class sums, shared with the torch
path.

Importing this module does not import Triton; the kernels are imported on first use (with
``TRITON_INTERPRET=1`` set before that, they run on CPU tensors through Triton's interpreter).
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Optional, Sequence

import torch
from torch import Tensor

from ._autograd import AnchorStatistics, apply_contrast
from ._layout import ContrastLayout
from ._options import ContrastOptions
from .torch_fused import add_supcon_positive_gradient, supcon_positive_sums

__all__ = ["sweep", "triton_contrastive_loss", "unsupported"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# D lives in one register tile per row block (padded to a power of two), as in flash attention.
MAX_DIM = 256


@functools.cache
def _load_kernels() -> tuple[Optional[ModuleType], bool, str]:
    """``(kernels, interpreted, why not)``, decided once: Triton reads ``TRITON_INTERPRET`` when
    the kernels are defined, so the answer of the first import holds for the process."""
    try:
        import triton

        from . import _kernels
    except ImportError as error:  # triton missing, or too old for the kernels
        return None, False, f"triton is not importable ({error}); pip install 'pixcontrast[triton]'"
    return _kernels, bool(triton.knobs.runtime.interpret), ""


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
    if anchors.shape[-1] > MAX_DIM:
        reasons.append(f"the feature dimension D={anchors.shape[-1]} exceeds {MAX_DIM}")
    return reasons


def _operand_dtype(anchors: Tensor, keys: Sequence[Tensor]) -> torch.dtype:
    """Products take half-precision operands when every input is in that dtype (the layout's fp32
    copy converts back exactly), and fp32 otherwise."""
    dtypes = {anchors.dtype} | {part.dtype for part in keys}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _dot_precision(operand_dtype: torch.dtype) -> str:
    """fp32 products follow torch's setting, IEEE unless the user allowed TF32 (the default
    ``"highest"`` does not); the setting means nothing for half-precision operands."""
    highest = torch.get_float32_matmul_precision() == "highest"
    return "ieee" if operand_dtype == torch.float32 and highest else "tf32"


def _tiles(block_d: int, operand_dtype: torch.dtype, interpreted: bool) -> tuple[int, ...]:
    """``(BLOCK_N, BLOCK_M, num_warps, num_stages)``.

    On GPUs the tiles target sm80+ (A100, H100, also RTX 30xx/40xx; untuned): 64 x 64 score
    tiles with the whole padded D in registers; at D = 256 fewer key rows per tile and more warps
    for the ``[64, D]`` fp32 accumulator, and 32 x 32 tiles for fp32 operands, so that every
    kernel's shared memory (two pipeline stages) stays under the 99 KiB of consumer GPUs. Under
    the interpreter 32 x 32 tiles make small test sizes span several tiles.
    """
    if interpreted:
        return 32, 32, 1, 1
    if block_d <= 128:
        return 64, 64, 4, 2
    if operand_dtype == torch.float32:
        return 32, 32, 4, 2
    return 64, 32, 8, 2


def _key_blocks(columns: list[tuple[int, int]], block: int, device) -> tuple[Tensor, Tensor]:
    """The table of column blocks of the ``dk`` kernel: ``[start, stop)`` per program."""
    starts, stops = [], []
    for lo, hi in columns:
        for start in range(lo, hi, block):
            starts.append(start)
            stops.append(hi)
    as_tensor = functools.partial(torch.tensor, dtype=torch.int32, device=device)
    return as_tensor(starts), as_tensor(stops)


def sweep(
    layout: ContrastLayout,
    temperature: float,
    rho: float,
    variant: str,
    weight: Optional[Tensor],
    need_anchor_grad: bool,
    key_grad_columns: Optional[list[tuple[int, int]]],
    saved: Optional[AnchorStatistics] = None,
    *,
    operand_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, AnchorStatistics, Optional[Tensor], Optional[Tensor]]:
    """The Triton ``sweep`` of :mod:`pixcontrast.ops._autograd` (see ``torch_fused.sweep``).

    With ``saved`` statistics the forward kernel is skipped and the returned loss is zeros (only
    backward passes ``saved``, and it uses the gradients alone). ``operand_dtype`` is the dtype
    of the products' operands.
    """
    x, k = layout.anchors, layout.keys
    n, m, dim = x.shape[0], k.shape[0], x.shape[1]
    loss = x.new_zeros(n)
    stats = saved
    if stats is None:
        stats = AnchorStatistics(x.new_full((n,), -torch.inf), x.new_zeros(n))
    want_grad_x = weight is not None and need_anchor_grad
    want_grad_k = weight is not None and bool(key_grad_columns)
    if n == 0 or m == 0:
        grad_x = x.new_zeros(x.shape) if want_grad_x else None
        grad_k = k.new_zeros(k.shape) if want_grad_k else None
        return loss, stats, grad_x, grad_k

    import triton  # importable: the dispatcher asked unsupported() first

    kernels, interpreted, _ = _load_kernels()
    block_d = max(16, triton.next_power_of_2(dim))
    block_n, block_m, num_warps, num_stages = _tiles(block_d, operand_dtype, interpreted)
    x_op = x.to(operand_dtype).contiguous()
    k_op = k.to(operand_dtype).contiguous()
    class_bounds = torch.tensor(layout.key_offsets, dtype=torch.int32, device=x.device)
    pos_lo = class_bounds.index_select(0, layout.anchor_class)
    pos_hi = class_bounds.index_select(0, layout.anchor_class + 1)
    self_col = (
        layout.self_column.to(torch.int32)
        if layout.self_column is not None
        else torch.full((n,), -1, dtype=torch.int32, device=x.device)
    )
    is_paper = variant == "paper"
    inv_pos = 1.0 / layout.positives.clamp(min=1)
    has_pos = layout.positives > 0
    positive_sums = None if is_paper else supcon_positive_sums(layout)
    common = dict(
        scale=1.0 / temperature, IS_PAPER=is_paper, PRECISION=_dot_precision(operand_dtype),
        BLOCK_N=block_n,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages,
    )
    row_blocks = (triton.cdiv(n, block_n),)

    if saved is None:
        lse = torch.empty(n, dtype=torch.float32, device=x.device)
        softplus_sum = torch.zeros_like(lse)
        sigmoid_sum = torch.zeros_like(lse)
        kernels.contrast_forward_kernel[row_blocks](
            x_op, k_op, pos_lo, pos_hi, self_col, lse, softplus_sum, sigmoid_sum,
            n, m, dim, x_op.stride(0), k_op.stride(0), **common,
        )
        if is_paper:
            loss = rho * softplus_sum * inv_pos
            stats = AnchorStatistics(lse, sigmoid_sum * inv_pos)
        else:
            positive_dot = (x * positive_sums).sum(dim=1) / temperature
            safe_lse = torch.where(has_pos, lse, torch.zeros_like(lse))
            loss = torch.where(has_pos, rho * (safe_lse - positive_dot * inv_pos), 0.0)
            stats = AnchorStatistics(lse, torch.zeros_like(lse))
    if weight is None:
        return loss, stats, None, None

    row_scale = rho * weight * has_pos
    if is_paper:
        neg_coef = row_scale * stats.positive_weight
        pos_coef = -row_scale * inv_pos
    else:
        neg_coef, pos_coef = row_scale, torch.zeros_like(row_scale)
    # G is cast to the operand dtype for the gradient products: in units of its largest row
    # coefficient it is at most ~1, so fp16 neither overflows nor flushes small upstream
    # gradients (1 / N for a mean) to zero. The factor is applied to the fp32 results.
    coef_unit = torch.maximum(neg_coef.abs().max(), pos_coef.abs().max()).clamp(
        min=torch.finfo(torch.float32).tiny
    )
    row_args = (
        pos_lo, pos_hi, self_col, stats.log_normalizer, neg_coef / coef_unit, pos_coef / coef_unit
    )
    grad_x = grad_k = None
    if want_grad_x:
        grad_x = torch.empty_like(x)
        kernels.contrast_anchor_grad_kernel[row_blocks](
            x_op, k_op, *row_args, grad_x,
            n, m, dim, x_op.stride(0), k_op.stride(0), grad_x.stride(0), **common,
        )
        grad_x *= coef_unit
    if want_grad_k:
        starts, stops = _key_blocks(key_grad_columns, block_m, x.device)
        grad_k = torch.zeros_like(k)  # columns outside key_grad_columns stay zero
        kernels.contrast_key_grad_kernel[(starts.numel(),)](
            x_op, k_op, *row_args, starts, stops, grad_k,
            n, dim, x_op.stride(0), k_op.stride(0), grad_k.stride(0), **common,
        )
        grad_k *= coef_unit
    if not is_paper:
        add_supcon_positive_gradient(
            layout, positive_sums, temperature, rho, weight, grad_x, grad_k
        )
    return loss, stats, grad_x, grad_k


def triton_contrastive_loss(
    anchors: Tensor,
    labels: Tensor,
    keys: tuple[Tensor, ...],
    key_labels: Optional[Tensor],
    in_batch: bool,
    options: ContrastOptions,
) -> Tensor:
    fused_sweep = functools.partial(sweep, operand_dtype=_operand_dtype(anchors, keys))
    return apply_contrast(anchors, labels, keys, key_labels, in_batch, options, sweep=fused_sweep)
