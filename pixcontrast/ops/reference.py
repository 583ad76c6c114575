"""Dense reference: builds the full anchors x keys similarity matrix and lets autograd do the rest.

It is the oracle of the tests and the baseline of the benchmarks: short, literal and
``O(N * M)`` in memory. Masks follow the math of :mod:`pixcontrast.ops` exactly; rows without
negatives (or without any valid key) are handled with the "double where" so that no NaN reaches
the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._layout import compute_dtype
from ._options import ContrastInputs, ContrastOptions

__all__ = ["masked_contrastive_loss", "reference_contrastive_loss"]


def _masked_logsumexp(scores: Tensor, mask: Tensor) -> Tensor:
    """Row-wise log-sum-exp over ``mask``; ``-inf`` for rows with an empty mask."""
    nonempty = mask.any(dim=1)
    safe = torch.where(mask & nonempty[:, None], scores, scores.new_tensor(-torch.inf))
    safe = torch.where(nonempty[:, None], safe, torch.zeros_like(scores))
    result = torch.logsumexp(safe, dim=1)
    return torch.where(nonempty, result, result.new_tensor(-torch.inf))


def reference_contrastive_loss(inputs: ContrastInputs, options: ContrastOptions) -> Tensor:
    """The loss from the full ``[N, M]`` score matrix of the key space, autograd for gradients."""
    dtype = compute_dtype(inputs.anchors.dtype)
    x = inputs.anchors.to(dtype)
    labels = inputs.labels.long()
    n = x.shape[0]
    space = inputs.key_space(dtype)
    scores = x @ space.dense().T / options.temperature
    valid = (space.labels >= 0)[None, :].expand(n, -1).clone()
    if inputs.in_batch:
        valid[:, :n] &= ~torch.eye(n, dtype=torch.bool, device=x.device)
    same = labels[:, None] == space.labels[None, :]
    return masked_contrastive_loss(
        scores, same & valid, scores, ~same & valid, options.rho, options.variant,
        options.reduction,
    )


def masked_contrastive_loss(
    pos_scores: Tensor,
    positive: Tensor,
    neg_scores: Tensor,
    negative: Tensor,
    rho: float,
    variant: str,
    reduction: str,
) -> Tensor:
    """The math of :mod:`pixcontrast.ops` from scores and masks.

    The positives of row ``a`` are ``pos_scores[a]`` where ``positive[a]``, its negatives
    ``neg_scores[a]`` where ``negative[a]``. The dense reference passes one score matrix twice;
    the pair loss passes the selected scores.
    """
    num_pos = positive.sum(dim=1).to(pos_scores.dtype)
    has_pos = num_pos > 0
    nu = _masked_logsumexp(neg_scores, negative)
    if variant == "paper":
        margin = nu[:, None] - pos_scores
        per_pair = torch.logaddexp(margin, torch.zeros_like(margin))  # exact softplus
        per_pair = torch.where(positive, per_pair, torch.zeros_like(per_pair))
        loss = rho * per_pair.sum(dim=1) / num_pos.clamp(min=1)
    else:
        # log-sum-exp over positives and negatives; rows without positives are masked out
        # before logaddexp so that no -inf - -inf reaches the gradient.
        lam_pos = _masked_logsumexp(pos_scores, positive)
        lam = torch.logaddexp(torch.where(has_pos, lam_pos, torch.zeros_like(lam_pos)), nu)
        pos_sum = torch.where(positive, pos_scores, torch.zeros_like(pos_scores)).sum(dim=1)
        loss = rho * (lam - pos_sum / num_pos.clamp(min=1))
    loss = torch.where(has_pos, loss, torch.zeros_like(loss))

    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / has_pos.sum().clamp(min=1)
