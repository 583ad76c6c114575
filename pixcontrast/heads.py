"""Projection heads mapping backbone features to L2-normalised pixel embeddings."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks

__all__ = ["ProjectionHead"]


class ProjectionHead(nn.Module):
    """Per-pixel projection to a unit-norm embedding, as in Wang et al. (2021).

    ``kind="convmlp"`` is conv1x1 -> BatchNorm -> ReLU -> conv1x1 (the paper's head);
    ``kind="linear"`` is a single conv1x1. The output is L2-normalised over channels.

    Args:
        in_channels: channels of the input feature map.
        proj_dim: embedding dimension ``D``.
        kind: ``"convmlp"`` or ``"linear"``.

    Shape:
        - Input: ``[B, in_channels, h, w]``
        - Output: ``[B, proj_dim, h, w]`` with unit norm along dimension 1.

    Example:
        >>> import torch
        >>> head = ProjectionHead(in_channels=32, proj_dim=16)
        >>> head(torch.randn(2, 32, 5, 7)).shape
        torch.Size([2, 16, 5, 7])
    """

    def __init__(self, in_channels: int, proj_dim: int = 256, kind: str = "convmlp") -> None:
        super().__init__()
        _checks.check_count(in_channels, "in_channels")
        _checks.check_count(proj_dim, "proj_dim")
        _checks.check_choice(kind, "kind", ("convmlp", "linear"))
        self.kind = kind
        if kind == "linear":
            self.proj: nn.Module = nn.Conv2d(in_channels, proj_dim, kernel_size=1)
        else:
            self.proj = nn.Sequential(
                nn.Conv2d(in_channels, in_channels, kernel_size=1),
                nn.BatchNorm2d(in_channels),
                nn.ReLU(inplace=True),
                nn.Conv2d(in_channels, proj_dim, kernel_size=1),
            )

    def forward(self, features: Tensor) -> Tensor:
        """Unit-norm embeddings ``[B, proj_dim, h, w]`` of ``features [B, in_channels, h, w]``."""
        _checks.check_embeddings(features, "features", 4)
        return F.normalize(self.proj(features), p=2, dim=1)
