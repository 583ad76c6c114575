"""The autograd glue shared by the fused backends.

A fused backend provides one function, its ``sweep``, with this contract::

    sweep(layout, temperature, rho, variant, weight, need_anchor_grad, key_grad_columns, saved)
        -> (loss [N], AnchorStatistics, grad_x [N, D] or None, grad_k [M, D] or None)

over the class-sorted :class:`~pixcontrast.ops._layout.ContrastLayout`: ``weight`` is the upstream
gradient ``g_a`` per sorted anchor (``None``: statistics only, no gradient work),
``key_grad_columns`` the sorted key column ranges whose gradient is wanted, and ``saved`` the
statistics of an earlier call, reused instead of being recomputed. Gradients are with respect to
the sorted anchors and keys; :func:`scatter_to_inputs` maps them back to the caller's tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ._layout import ContrastLayout, build_layout

__all__ = [
    "AnchorStatistics",
    "ContrastFunction",
    "InputSpec",
    "Sweep",
    "key_grad_columns",
    "reduction_weights",
    "scatter_to_inputs",
    "unsort",
]


@dataclass
class AnchorStatistics:
    """What forward keeps per sorted anchor so that backward can recompute one chunk at a time.

    Attributes:
        log_normalizer: ``nu_a`` (paper: log-sum-exp over negatives) or ``lam_a`` (supcon: over
            all valid keys); ``-inf`` when that set is empty.
        positive_weight: ``w_a = mean_p sigmoid(nu_a - s_ap)`` (paper; zeros for supcon).
    """

    log_normalizer: Tensor
    positive_weight: Tensor


Sweep = Callable[..., tuple[Tensor, AnchorStatistics, Optional[Tensor], Optional[Tensor]]]


def key_grad_columns(
    layout: ContrastLayout, need_anchor_grad: bool, need_key_grad: bool
) -> Optional[list[tuple[int, int]]]:
    """Sorted key columns that need a gradient.

    All columns when the caller's keys need one (or every key is an anchor). When only the
    anchors do, just the anchors' own columns: the stable sort puts them first in each class
    block, so the product ``G^T x`` skips the (possibly huge) memory keys.
    """
    num_keys = layout.keys.shape[0]
    num_anchor_keys = layout.anchors.shape[0] if layout.in_batch else 0
    if need_key_grad or (num_anchor_keys == num_keys and need_anchor_grad):
        return [(0, num_keys)]
    if not (layout.in_batch and need_anchor_grad):
        return None
    a, kk = layout.anchor_offsets, layout.key_offsets
    return [(kk[c], kk[c] + a[c + 1] - a[c]) for c in range(layout.num_classes) if a[c + 1] > a[c]]


def reduction_weights(layout: ContrastLayout, reduction: str) -> Tensor:
    """Upstream ``g_a`` per sorted anchor implied by a scalar reduction."""
    has_pos = (layout.positives > 0).to(layout.positives.dtype)
    if reduction == "mean":
        return has_pos / has_pos.sum().clamp(min=1)
    return has_pos


@dataclass(frozen=True)
class InputSpec:
    """What backward needs to know of the caller's tensors (not the tensors themselves)."""

    anchor_dtype: torch.dtype
    num_keys: int
    key_dtype: Optional[torch.dtype]
    need_anchor_grad: bool
    need_key_grad: bool


def scatter_to_inputs(
    layout: ContrastLayout, spec: InputSpec, grad_x: Optional[Tensor], grad_k: Optional[Tensor]
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Map sorted-space gradients back to the caller's anchors and keys (dtype included)."""
    n = layout.anchors.shape[0]
    offset = n if layout.in_batch else 0
    grad_anchors = grad_keys = None
    if spec.need_anchor_grad:
        grad_anchors = layout.anchors.new_zeros(layout.anchors.shape)
        if grad_x is not None:
            grad_anchors[layout.anchor_order] = grad_x
    if grad_k is not None and layout.in_batch and grad_anchors is not None:
        # An anchor's role as a key: its own column, in sorted-anchor order.
        grad_anchors[layout.anchor_order] += grad_k.index_select(0, layout.self_column)
    if grad_k is not None and spec.need_key_grad:
        grad_keys = grad_k.new_zeros((offset + spec.num_keys, grad_k.shape[1]))
        grad_keys[layout.key_source] = grad_k
        grad_keys = grad_keys[offset:].to(spec.key_dtype)
    if grad_anchors is not None:
        grad_anchors = grad_anchors.to(spec.anchor_dtype)
    return grad_anchors, grad_keys


def unsort(layout: ContrastLayout, per_anchor: Tensor) -> Tensor:
    out = torch.empty_like(per_anchor)
    out[layout.anchor_order] = per_anchor
    return out


class ContrastFunction(torch.autograd.Function):
    """``contrastive_loss`` for a fused backend, given that backend's ``sweep``.

    Scalar reductions: forward runs ``sweep`` with the reduction's weights and keeps the input
    gradients; backward rescales them by the upstream scalar. ``reduction="none"``: forward keeps
    the per-anchor statistics and backward runs ``sweep`` again with the upstream gradients.
    """

    @staticmethod
    def forward(
        ctx,
        anchors: Tensor,
        keys: Optional[Tensor],
        labels: Tensor,
        key_labels: Optional[Tensor],
        in_batch: bool,
        temperature: float,
        rho: float,
        variant: str,
        reduction: str,
        grad_enabled: bool,
        sweep: Sweep,
    ) -> Tensor:
        layout = build_layout(anchors, labels, keys, key_labels, in_batch)
        spec = InputSpec(
            anchor_dtype=anchors.dtype,
            num_keys=0 if keys is None else keys.shape[0],
            key_dtype=None if keys is None else keys.dtype,
            need_anchor_grad=grad_enabled and ctx.needs_input_grad[0],
            need_key_grad=grad_enabled and ctx.needs_input_grad[1],
        )
        columns = key_grad_columns(layout, spec.need_anchor_grad, spec.need_key_grad)
        ctx.layout, ctx.spec, ctx.columns = layout, spec, columns
        ctx.config = (temperature, rho, variant, sweep)
        any_grad = spec.need_anchor_grad or spec.need_key_grad
        if reduction != "none":
            weight = reduction_weights(layout, reduction)
            loss, _, grad_x, grad_k = sweep(
                layout, temperature, rho, variant, weight if any_grad else None,
                spec.need_anchor_grad, columns,
            )
            ctx.fused = scatter_to_inputs(layout, spec, grad_x, grad_k)
            return (loss * weight).sum()
        loss, stats, _, _ = sweep(layout, temperature, rho, variant, None, False, None)
        ctx.fused = None
        ctx.stats = stats
        return unsort(layout, loss)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        layout = ctx.layout
        if ctx.fused is not None:
            scale = grad_output.to(layout.anchors.dtype)
            grad_anchors, grad_keys = (
                None if g is None else g * scale.to(g.dtype) for g in ctx.fused
            )
        else:
            temperature, rho, variant, sweep = ctx.config
            weight = grad_output.to(layout.anchors.dtype).index_select(0, layout.anchor_order)
            weight = weight * (layout.positives > 0)
            _, _, grad_x, grad_k = sweep(
                layout, temperature, rho, variant, weight, ctx.spec.need_anchor_grad,
                ctx.columns, saved=ctx.stats,
            )
            grad_anchors, grad_keys = scatter_to_inputs(layout, ctx.spec, grad_x, grad_k)
        return grad_anchors, grad_keys, None, None, None, None, None, None, None, None, None
