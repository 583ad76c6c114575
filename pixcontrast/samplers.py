"""Anchor samplers: which pixels of a batch become anchors of the contrastive loss.

Samplers work on label maps already resized to the embedding resolution, select pixels without
gradient, then gather the selected embeddings (with gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import _checks

__all__ = ["AnchorSample", "RandomAnchorSampler", "gather_pixels"]


@dataclass
class AnchorSample:
    """Anchors drawn from a batch of pixel embeddings.

    Attributes:
        embeddings: ``[N, D]`` anchor embeddings (connected to the input's graph).
        labels: ``[N]`` class ids.
        indices: ``[N]`` flat pixel indices into ``B * h * w`` (``b * h * w + y * w + x``).
        num_hard: anchors whose prediction differed from the label (0 without predictions).
        num_easy: the other anchors.
    """

    embeddings: Tensor
    labels: Tensor
    indices: Tensor
    num_hard: int
    num_easy: int


def gather_pixels(embeddings: Tensor, indices: Tensor) -> Tensor:
    """Rows ``[N, D]`` of ``embeddings [B, D, h, w]`` at flat pixel ``indices``, without copying
    the whole map."""
    b, d, h, w = embeddings.shape
    flat = embeddings.reshape(b, d, h * w)
    return flat[indices // (h * w), :, indices % (h * w)]


def random_rank_in_group(groups: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """A uniformly random rank ``0..count-1`` for each element within its group id."""
    n = groups.numel()
    perm = torch.randperm(n, generator=generator, device="cpu").to(groups.device)
    sorted_groups, order = torch.sort(groups[perm], stable=True)
    members = perm[order]
    first = torch.ones_like(sorted_groups, dtype=torch.bool)
    first[1:] = sorted_groups[1:] != sorted_groups[:-1]
    position = torch.arange(n, device=groups.device)
    start = torch.cummax(torch.where(first, position, 0), dim=0).values
    rank = torch.empty_like(position)
    rank[members] = position - start
    return rank


class RandomAnchorSampler:
    """Uniform anchors per image and class.

    Every (image, class) pair present (never ``ignore_index``) contributes
    ``n_view = min(max_samples // pairs, max_views)`` random pixels, or all of its pixels when it
    has fewer.

    Args:
        max_samples: anchor budget of a batch, shared by its (image, class) pairs.
        max_views: most anchors per (image, class) pair.
    """

    def __init__(self, max_samples: int = 1024, max_views: int = 100) -> None:
        for name, value in (("max_samples", max_samples), ("max_views", max_views)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.max_samples = max_samples
        self.max_views = max_views

    def __call__(
        self,
        embeddings: Tensor,
        labels: Tensor,
        predictions: Optional[Tensor] = None,
        ignore_index: int = 255,
        generator: Optional[torch.Generator] = None,
    ) -> AnchorSample:
        """Sample anchors.

        Args:
            embeddings: ``[B, D, h, w]``.
            labels: ``[B, h, w]`` class ids at embedding resolution.
            predictions: unused by this sampler (accepted for a common interface).
            ignore_index: label of pixels never sampled.
            generator: random source, for reproducible sampling.
        """
        _checks.check_embeddings(embeddings, "embeddings", 4)
        _checks.check_labels(labels, "labels", 3)
        b, _, h, w = embeddings.shape
        flat = labels.reshape(-1).long()
        with torch.no_grad():
            valid = flat != ignore_index
            image = torch.arange(b, device=flat.device).repeat_interleave(h * w)
            pairs, groups = torch.unique(
                torch.stack([image, flat]), dim=1, return_inverse=True
            )
            qualifying = (pairs[1] != ignore_index).sum().clamp(min=1)
            n_view = torch.clamp(self.max_samples // qualifying, max=self.max_views)
            rank = random_rank_in_group(groups, generator)
            indices = (valid & (rank < n_view)).nonzero().squeeze(1)
        return AnchorSample(
            embeddings=gather_pixels(embeddings, indices),
            labels=flat[indices],
            indices=indices,
            num_hard=0,
            num_easy=indices.numel(),
        )
