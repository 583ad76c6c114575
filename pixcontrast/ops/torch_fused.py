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

from typing import Optional, Sequence

import torch
from torch import Tensor

from ._autograd import (
    AnchorStatistics,
    add_supcon_positive_gradient,
    supcon_positive_sums,
)
from ._layout import ContrastLayout, compute_dtype
from ._options import ContrastOptions

__all__ = [
    "AnchorStatistics",
    "product_kind",
    "sweep",
]

# The one [rows, M] score buffer is the only O(rows * M) memory of the backend: up to 2**25
# elements (128 MiB in fp32) and half the keys' bytes, but at least 64 rows, below which the two
# products lose efficiency (BLAS re-streams all keys once per chunk).
_CHUNK_ELEMENTS = 1 << 25
_MIN_CHUNK_ROWS = 64
# Key rows widened to the compute dtype at a time (8 MiB at D = 256 in fp32).
_WIDEN_ROWS = 1 << 13
# Whether torch has the half-precision product with fp32 output (aten::mm.dtype, CUDA).
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


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
    columns: list[tuple[int, int]],
    scores: Tensor,
    start: int,
    weight: Optional[Tensor],
    rho: float,
    saved: Optional[AnchorStatistics],
) -> tuple[Tensor, AnchorStatistics]:
    """Paper variant on the rows ``start:start + len(scores)``; returns (loss, statistics).

    ``scores`` becomes ``G`` when ``weight`` (the upstream ``g_a`` of these rows) is given;
    ``columns`` are the score columns of each key segment. The positives of a row are one block
    per segment.
    """
    rows = scores.shape[0]
    stop = start + rows
    inv_pos = 1.0 / layout.positives[start:stop].clamp(min=1)
    blocks = []
    for lo, hi, c in layout.class_segments(start, stop):
        for segment, (c0, _) in zip(layout.segments, columns):
            b0, b1 = segment.offsets[c], segment.offsets[c + 1]
            if b0 == b1:
                continue
            view = scores[lo - start : hi - start, c0 + b0 : c0 + b1]
            positives = view.clone()
            view.fill_(-torch.inf)  # the positive block is not part of the negatives' lse
            if segment.is_anchors:
                # +inf makes nu - s = -inf: the self pair adds 0 to the loss and the gradient.
                local = torch.arange(hi - lo, device=scores.device)
                positives[local, local + (lo - b0)] = torch.inf
            blocks.append((lo - start, hi - start, c0 + b0, c0 + b1, positives))

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
            loss[a:b] += torch.logaddexp(margin, torch.zeros_like(margin)).sum(dim=1)
            sigmoid_sum[a:b] += sig.sum(dim=1)
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
    columns: list[tuple[int, int]],
    scores: Tensor,
    start: int,
    weight: Optional[Tensor],
    rho: float,
    saved: Optional[AnchorStatistics],
    positive_dot: Tensor,
) -> tuple[Tensor, AnchorStatistics]:
    """Supcon variant on one row chunk; returns (loss, statistics).

    ``scores`` becomes the softmax part of ``G`` only (the positive part is applied by the
    caller through class sums). ``positive_dot`` is ``sum_p s_ap`` of these rows; ``columns``
    are the score columns of each key segment.
    """
    rows = scores.shape[0]
    stop = start + rows
    if layout.in_batch:
        local = torch.arange(rows, device=scores.device)
        scores[local, columns[0][0] + start + local] = -torch.inf
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


def product_kind(device: torch.device, anchor_dtype: torch.dtype, key_dtype: torch.dtype) -> str:
    """How the score product ``x k^T`` and ``dx = G k`` read keys of ``key_dtype``.

    - ``"native"``: keys in the compute dtype of the anchors, one product per chunk of rows;
    - ``"half"``: half-precision anchors and keys of that same dtype on CUDA where torch has
      ``torch.mm(..., out_dtype=torch.float32)``: tensor-core products, fp32 accumulation and
      output (the scores and ``G`` stay fp32; ``G`` enters ``dx`` in the keys' dtype, each
      row in units of its weight so that fp16 loses no small entry);
    - ``"widen"``: any other keys (a half-precision memory on CPU, or with fp32 anchors): a
      block of key rows at a time is widened to the compute dtype, never the whole set.
    """
    if key_dtype == compute_dtype(anchor_dtype):
        return "native"
    if (
        device.type == "cuda" and key_dtype == anchor_dtype
        and key_dtype in (torch.float16, torch.bfloat16) and _MM_OUT_DTYPE
    ):
        return "half"
    return "widen"


def _half_mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` of half-precision operands with fp32 accumulation and output."""
    return torch.mm(a, b, out_dtype=torch.float32)


def _chunk_rows(n: int, m: int, key_bytes: int, element_bytes: int) -> int:
    """Rows per chunk of ``n`` anchors against ``m`` keys of ``key_bytes`` in all.

    The ``[rows, m]`` buffer holds at most :data:`_CHUNK_ELEMENTS` elements and half the keys'
    own bytes (so the loss's memory grows with the keys, not beyond), but at least
    :data:`_MIN_CHUNK_ROWS` rows; chunks are equal rather than leaving a small rest.
    """
    budget = min(_CHUNK_ELEMENTS, key_bytes // (2 * element_bytes)) // max(m, 1)
    num_chunks = -(-n // max(_MIN_CHUNK_ROWS, budget))
    return -(-n // num_chunks)


def sweep(
    layout: ContrastLayout,
    options: ContrastOptions,
    weight: Optional[Tensor],
    need_anchor_grad: bool,
    key_grads: Sequence[bool],
    saved: Optional[AnchorStatistics] = None,
) -> tuple[Tensor, AnchorStatistics, Optional[Tensor], tuple[Optional[Tensor], ...]]:
    """One pass over all row chunks, in the sorted order of ``layout``.

    Args:
        layout: the class-sorted inputs; each key segment fills its own columns of the score
            buffer, read where it lives (see :func:`product_kind`).
        options: the loss options (temperature, ``rho`` and variant are read).
        weight: ``[N]`` upstream gradient per sorted anchor, or ``None`` for statistics only.
        need_anchor_grad: whether to compute the gradient of the anchors (with ``weight``).
        key_grads: per key segment, whether its gradient is wanted (with ``weight``).
        saved: statistics of an earlier forward; when given, the per-row normalisers are reused.

    Returns:
        ``(loss [N], statistics, d anchors [N, D] or None, d keys of each segment or None)``.
    """
    temperature, rho, variant = options.temperature, options.rho, options.variant
    x, segments = layout.anchors, layout.segments
    n, m = x.shape[0], layout.num_keys
    scaled = x / temperature
    loss = x.new_zeros(n)
    normalizer = x.new_full((n,), -torch.inf)
    positive_weight = x.new_zeros(n)
    grad_x = x.new_zeros(x.shape) if weight is not None and need_anchor_grad else None
    # (a key gradient only for the segments that need one: none for a memory bank)
    wanted = list(key_grads) + [False] * (len(segments) - len(key_grads))
    grad_keys = tuple(
        x.new_zeros((segment.keys.shape[0], x.shape[1])) if weight is not None and want
        else None
        for segment, want in zip(segments, wanted)
    )
    if n == 0 or m == 0:
        return loss, AnchorStatistics(normalizer, positive_weight), grad_x, grad_keys

    # (supcon only; paper never reads it)
    positive_sums = supcon_positive_sums(layout) if variant == "supcon" else x.new_empty((n, 0))

    kinds = [product_kind(x.device, layout.anchor_dtype, s.keys.dtype) for s in segments]
    half_anchors = {
        s.keys.dtype: x.to(s.keys.dtype) for s, kind in zip(segments, kinds) if kind == "half"
    }
    columns: list[tuple[int, int]] = []
    for segment in segments:
        begin = columns[-1][1] if columns else 0
        columns.append((begin, begin + segment.keys.shape[0]))
    key_bytes = sum(s.keys.numel() * s.keys.element_size() for s in segments)
    step = _chunk_rows(n, m, key_bytes, x.element_size())
    buffer = x.new_empty((step, m))  # reused: a fresh allocation per chunk costs page faults
    for start in range(0, n, step):
        stop = min(start + step, n)
        rows = slice(start, stop)
        scores = buffer[: stop - start]
        for segment, (c0, c1), kind in zip(segments, columns, kinds):
            _score_product(
                scaled[rows], half_anchors.get(segment.keys.dtype), rows, segment.keys,
                scores[:, c0:c1], kind, temperature,
            )
        rows_weight = None if weight is None else weight[rows]
        if variant == "paper":
            rows_loss, stats = _paper_rows(layout, columns, scores, start, rows_weight, rho, saved)
        else:
            dot = (scaled[rows] * positive_sums[rows]).sum(dim=1)
            rows_loss, stats = _supcon_rows(
                layout, columns, scores, start, rows_weight, rho, saved, dot
            )
        loss[rows] = rows_loss
        normalizer[rows] = stats.log_normalizer
        positive_weight[rows] = stats.positive_weight
        if rows_weight is None:
            continue
        unit = None
        for segment, (c0, c1), kind, grad_k in zip(segments, columns, kinds, grad_keys):
            g = scores[:, c0:c1]
            if grad_x is not None:
                if kind == "half" and unit is None:
                    # |G_aj| <= rho g_a: rows in those units lose no small entry in fp16
                    unit = rho * rows_weight.abs()
                    unit = torch.where(unit > 0, unit, torch.ones_like(unit))
                _gradient_product(g, segment.keys, grad_x[rows], kind, unit)
            if grad_k is not None:
                grad_k.addmm_(g.T, scaled[rows])

    if grad_x is not None:
        grad_x /= temperature
    if weight is not None and variant == "supcon":
        add_supcon_positive_gradient(layout, positive_sums, options, weight, grad_x, grad_keys)
    return loss, AnchorStatistics(normalizer, positive_weight), grad_x, grad_keys


def _score_product(
    scaled_rows: Tensor,
    half_anchors: Optional[Tensor],
    rows: slice,
    keys: Tensor,
    out: Tensor,
    kind: str,
    temperature: float,
) -> None:
    """``out = x k^T / tau`` for one chunk of rows and one segment (see :func:`product_kind`)."""
    if kind == "native":
        torch.mm(scaled_rows, keys.T, out=out)
    elif kind == "half":
        assert half_anchors is not None  # made for every segment of this kind
        out.copy_(_half_mm(half_anchors[rows], keys.T)).mul_(1.0 / temperature)
    else:
        for lo in range(0, keys.shape[0], _WIDEN_ROWS):
            block = keys[lo : lo + _WIDEN_ROWS].to(scaled_rows.dtype)
            torch.mm(scaled_rows, block.T, out=out[:, lo : lo + block.shape[0]])


def _gradient_product(
    g: Tensor, keys: Tensor, out: Tensor, kind: str, unit: Optional[Tensor]
) -> None:
    """``out += g k`` for one chunk of rows and one key segment (see :func:`product_kind`).

    ``unit`` (kind ``"half"``) bounds each row of ``g``, which enters the product in those
    units and in the keys' dtype.
    """
    if kind == "native":
        out.addmm_(g, keys)
    elif kind == "half":
        assert unit is not None
        scaled_g = (g / unit[:, None]).to(keys.dtype)
        out.add_(_half_mm(scaled_g, keys).mul_(unit[:, None]))
    else:
        for lo in range(0, keys.shape[0], _WIDEN_ROWS):
            block = keys[lo : lo + _WIDEN_ROWS]
            out.addmm_(g[:, lo : lo + block.shape[0]], block.to(g.dtype))
