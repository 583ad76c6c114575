r"""Contrastive loss restricted to per-anchor selected keys (the output of a miner).

Each anchor ``a`` has its own positive columns ``P'(a)`` (``positive_index[a]``) and negative
columns ``N'(a)`` (``negative_index[a]``) in a key matrix; ``-1`` is padding. The selected keys
are gathered into ``[N, K, D]`` tensors and the scores ``s_aj = x_a . k_j / tau`` are ``[N, K]``,
so memory is ``O(N * K * D)`` and autograd gives exact gradients (the gathers scatter back into
the keys). The formulas are those of :mod:`pixcontrast.ops` with ``P(a), N(a)`` replaced by
``P'(a), N'(a)``; an index listed twice counts twice. Empty rows use the "double where" of the
dense reference, so no NaN reaches the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._layout import compute_dtype
from ._options import ContrastOptions
from .reference import masked_contrastive_loss

__all__ = ["pair_loss"]


def _selected_scores(x: Tensor, keys: Tensor, index: Tensor, temperature: float) -> Tensor:
    """``[N, K]`` scores ``x_a . keys[index[a, i]] / tau`` (padding gathers key 0, to be masked)."""
    n, count = index.shape
    if keys.shape[0] == 0:  # every entry is padding; a zero key keeps the graph connected
        keys = x.new_zeros((1, x.shape[1]))
    gathered = keys.index_select(0, index.clamp(min=0).reshape(-1)).view(n, count, x.shape[1])
    return torch.bmm(gathered, x.unsqueeze(2)).squeeze(2) / temperature


def pair_loss(
    anchors: Tensor,
    keys: Tensor,
    positive_index: Tensor,
    negative_index: Tensor,
    options: ContrastOptions,
) -> Tensor:
    """Loss of ``anchors [N, D]`` against their selected rows of ``keys [M, D]``.

    ``positive_index [N, K_pos]`` and ``negative_index [N, K_neg]`` hold rows of ``keys`` or
    ``-1``; they are trusted (the public wrapper validates them). Returns a scalar, or ``[N]``
    for ``reduction="none"``, in the compute dtype.
    """
    dtype = compute_dtype(anchors.dtype)
    x, k = anchors.to(dtype), keys.to(dtype)
    positive = positive_index >= 0
    negative = negative_index >= 0
    pos_scores = _selected_scores(x, k, positive_index, options.temperature)
    neg_scores = _selected_scores(x, k, negative_index, options.temperature)
    return masked_contrastive_loss(
        pos_scores, positive, neg_scores, negative, options.rho, options.variant,
        options.reduction,
    )
