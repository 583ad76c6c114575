"""Chunked, memory-efficient contrastive loss in plain torch (any device, any float dtype).

Rows of the class-sorted anchors are processed in chunks; a chunk holds one ``[rows, M]`` buffer of
scores and never more. Per row the buffer is turned, in place, into the gradient of the loss with
respect to the scores (the gradients of :mod:`pixcontrast.ops`)::

    paper:  G_an = rho * g_a * w_a * exp(s_an - nu_a)           (negatives)
            G_ap = -rho * g_a / |P(a)| * sigmoid(nu_a - s_ap)    (positives, one block per class)
    supcon: G_aj = rho * g_a * (exp(s_aj - lam_a) - [j in P(a)] / |P(a)|)

and ``dx = G k / tau``, ``dk = G^T x / tau`` are accumulated right away. For scalar reductions the
upstream weights ``g_a`` are known in forward, so forward does everything (two products when the
keys need no gradient) and backward only rescales. For ``reduction="none"`` forward keeps the
per-anchor statistics ``(nu or lam, w, |P|)`` and backward recomputes the scores, as flash
attention does. For supcon the positive part of ``G`` is applied analytically through per-class
key sums, so it costs no pass over the buffer at all.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._autograd import (
    AnchorStatistics,
    add_supcon_positive_gradient,
    supcon_positive_sums,
)
from ._layout import ContrastLayout
from ._options import ContrastOptions

__all__ = [
    "AnchorStatistics",
    "sweep",
]

# The one [rows, M] score buffer is the only O(rows * M) memory of the backend: up to 2**25
# elements (128 MiB in fp32), but at least 256 rows, below which the two products lose
# efficiency (BLAS re-streams all keys once per chunk).
_CHUNK_ELEMENTS = 1 << 25
_MIN_CHUNK_ROWS = 256


def _exponentiate(
    scores: Tensor, saved_normalizer: Optional[Tensor]
) -> tuple[Tensor, Optional[Tensor]]:
    """In place ``exp(scores - shift)`` row-wise; returns ``(log-normaliser, row sums or None)``.

    Without a saved log-normaliser the shift is the row maximum, and the result is
    ``(shift + log z, z)`` with ``z`` the row sums of the exponentials. With one, the shift is
    the saved log-normaliser itself (it bounds every score it sums over), so the rows already
    hold the softmax: the result is ``(saved_normalizer, None)``. A shift of ``-inf`` (a row
    without any finite score) is replaced by 0, so that such rows become exact zeros instead of
    NaN.
    """
    shift = scores.amax(dim=1) if saved_normalizer is None else saved_normalizer
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    scores.sub_(shift[:, None]).exp_()
    if saved_normalizer is not None:
        return saved_normalizer, None
    total = scores.sum(dim=1)
    return shift + total.log(), total


def _softmax_coefficient(coef: Tensor, total: Optional[Tensor]) -> Tensor:
    """The row factors that turn the exponentials of :func:`_exponentiate` into ``coef`` x softmax.

    That is ``coef / z`` (``total`` holds ``z``), or ``coef`` itself when the rows hold the
    softmax already (``total`` ``None``).
    """
    if total is None:
        return coef
    return coef / total.clamp(min=torch.finfo(total.dtype).tiny)


def _paper_rows(
    layout: ContrastLayout,
    scores: Tensor,
    start: int,
    weight: Optional[Tensor],
    rho: float,
    saved: Optional[AnchorStatistics],
) -> tuple[Tensor, AnchorStatistics]:
    """Paper variant on the rows ``start:start + len(scores)``; returns (loss, statistics).

    ``scores`` becomes ``G`` when ``weight`` (the upstream ``g_a`` of these rows) is given.
    """
    rows = scores.shape[0]
    stop = start + rows
    inv_pos = 1.0 / layout.positives[start:stop].clamp(min=1)
    blocks = []
    for lo, hi, c in layout.class_segments(start, stop):
        b0, b1 = layout.key_offsets[c], layout.key_offsets[c + 1]
        if b0 == b1:
            continue
        view = scores[lo - start : hi - start, b0:b1]
        positives = view.clone()
        view.fill_(-torch.inf)  # the positive block is not part of the negatives' log-sum-exp
        if layout.self_column is not None:
            # +inf makes nu - s = -inf: the self pair adds 0 to the loss and to the gradient.
            local = torch.arange(hi - lo, device=scores.device)
            positives[local, layout.self_column[lo:hi] - b0] = torch.inf
        blocks.append((lo - start, hi - start, b0, b1, positives))

    nu, total = _exponentiate(scores, None if saved is None else saved.log_normalizer[start:stop])

    loss = scores.new_zeros(rows)
    sigmoid_sum = scores.new_zeros(rows)
    sigmoids = []
    for a, b, _, _, positives in blocks:
        margin = nu[a:b, None] - positives
        sig = torch.sigmoid(margin)
        sigmoids.append(sig)
        if saved is None:
            # softplus(t) = logaddexp(t, 0), exact for every t (F.softplus linearises t > 20).
            loss[a:b] = torch.logaddexp(margin, torch.zeros_like(margin)).sum(dim=1)
            sigmoid_sum[a:b] = sig.sum(dim=1)
    loss = rho * loss * inv_pos
    w = sigmoid_sum * inv_pos if saved is None else saved.positive_weight[start:stop]
    stats = AnchorStatistics(nu, w)
    if weight is None:
        return loss, stats

    has_negatives = torch.isfinite(nu)
    coef = _softmax_coefficient(rho * weight * w, total)
    scores.mul_(torch.where(has_negatives, coef, torch.zeros_like(coef))[:, None])
    pos_coef = -rho * weight * inv_pos
    for (a, b, b0, b1, _), sig in zip(blocks, sigmoids):
        scores[a:b, b0:b1] = sig * pos_coef[a:b, None]
    return loss, stats


def _supcon_rows(
    layout: ContrastLayout,
    scores: Tensor,
    start: int,
    weight: Optional[Tensor],
    rho: float,
    saved: Optional[AnchorStatistics],
    positive_dot: Tensor,
) -> tuple[Tensor, AnchorStatistics]:
    """Supcon variant on one row chunk; returns (loss, statistics).

    ``scores`` becomes the softmax part of ``G`` only (the positive part is applied by the
    caller through class sums). ``positive_dot`` is ``sum_p s_ap`` of these rows.
    """
    rows = scores.shape[0]
    stop = start + rows
    if layout.self_column is not None:
        local = torch.arange(rows, device=scores.device)
        scores[local, layout.self_column[start:stop]] = -torch.inf
    positives = layout.positives[start:stop]
    has_pos = positives > 0
    lam, total = _exponentiate(scores, None if saved is None else saved.log_normalizer[start:stop])
    safe_lam = torch.where(has_pos, lam, torch.zeros_like(lam))
    loss = torch.where(has_pos, rho * (safe_lam - positive_dot / positives.clamp(min=1)), 0.0)
    stats = AnchorStatistics(lam, torch.zeros_like(lam))
    if weight is None:
        return loss, stats
    scores.mul_(_softmax_coefficient(rho * weight * has_pos, total)[:, None])
    return loss, stats


def sweep(
    layout: ContrastLayout,
    options: ContrastOptions,
    weight: Optional[Tensor],
    need_anchor_grad: bool,
    key_grad_columns: Optional[list[tuple[int, int]]],
    saved: Optional[AnchorStatistics] = None,
) -> tuple[Tensor, AnchorStatistics, Optional[Tensor], Optional[Tensor]]:
    """One pass over all row chunks, in the sorted order of ``layout``.

    Args:
        layout: the class-sorted inputs.
        options: the loss options (temperature, ``rho`` and variant are read).
        weight: ``[N]`` upstream gradient per sorted anchor, or ``None`` for statistics only.
        need_anchor_grad: whether to compute the gradient of the anchors (with ``weight``).
        key_grad_columns: ranges of sorted key columns whose gradient is wanted (``None``: none).
        saved: statistics of an earlier forward; when given, the per-row normalisers are reused.

    Returns:
        ``(loss [N], statistics, d anchors [N, D] or None, d keys [M, D] or None)``.
    """
    temperature, rho, variant = options.temperature, options.rho, options.variant
    x, k = layout.anchors, layout.keys
    n, m = x.shape[0], k.shape[0]
    scaled = x / temperature
    loss = x.new_zeros(n)
    normalizer = x.new_full((n,), -torch.inf)
    positive_weight = x.new_zeros(n)
    grad_x = x.new_zeros(x.shape) if weight is not None and need_anchor_grad else None
    grad_k = k.new_zeros(k.shape) if weight is not None and key_grad_columns else None
    if n == 0 or m == 0:
        return loss, AnchorStatistics(normalizer, positive_weight), grad_x, grad_k

    # (supcon only; paper never reads it)
    positive_sums = supcon_positive_sums(layout) if variant == "supcon" else x.new_empty((n, 0))

    num_chunks = -(-n // max(_MIN_CHUNK_ROWS, _CHUNK_ELEMENTS // m))
    step = -(-n // num_chunks)  # equal chunks rather than a small remainder
    buffer = x.new_empty((step, m))  # reused: a fresh allocation per chunk costs page faults
    # Key gradients of a few column ranges (the anchors' own columns among memory keys) take one
    # gather and one product per chunk instead of one product per range.
    gathered = grad_gathered = None
    if grad_k is not None and key_grad_columns and key_grad_columns != [(0, m)]:
        gathered = torch.cat(
            [torch.arange(lo, hi, device=k.device) for lo, hi in key_grad_columns]
        )
        grad_gathered = k.new_zeros((gathered.numel(), k.shape[1]))
    for start in range(0, n, step):
        stop = min(start + step, n)
        scores = torch.mm(scaled[start:stop], k.T, out=buffer[: stop - start])
        rows_weight = None if weight is None else weight[start:stop]
        if variant == "paper":
            rows_loss, stats = _paper_rows(layout, scores, start, rows_weight, rho, saved)
        else:
            dot = (scaled[start:stop] * positive_sums[start:stop]).sum(dim=1)
            rows_loss, stats = _supcon_rows(layout, scores, start, rows_weight, rho, saved, dot)
        loss[start:stop] = rows_loss
        normalizer[start:stop] = stats.log_normalizer
        positive_weight[start:stop] = stats.positive_weight
        if rows_weight is None:
            continue
        if grad_x is not None:
            torch.mm(scores, k, out=grad_x[start:stop])
        if gathered is not None and grad_gathered is not None:
            grad_gathered.addmm_(scores.index_select(1, gathered).T, scaled[start:stop])
        elif grad_k is not None:
            grad_k.addmm_(scores.T, scaled[start:stop])
    if grad_k is not None and gathered is not None and grad_gathered is not None:
        grad_k.index_copy_(0, gathered, grad_gathered)

    if grad_x is not None:
        grad_x /= temperature
    if weight is not None and variant == "supcon":
        add_supcon_positive_gradient(layout, positive_sums, options, weight, grad_x, grad_k)
    return loss, AnchorStatistics(normalizer, positive_weight), grad_x, grad_k
