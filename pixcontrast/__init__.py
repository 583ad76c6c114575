"""pixcontrast: supervised pixel-wise contrastive learning for semantic segmentation."""

from .functional import contrastive_loss, resize_labels
from .heads import ProjectionHead
from .losses import PixelContrastLoss, RegionContrastLoss
from .memory import ClassMemoryBank, region_embeddings
from .samplers import (
    AnchorSample,
    ConfidenceAnchorSampler,
    HardAnchorSampler,
    RandomAnchorSampler,
    select_anchors,
)

__version__ = "0.1.0"

__all__ = [
    "AnchorSample",
    "ClassMemoryBank",
    "ConfidenceAnchorSampler",
    "HardAnchorSampler",
    "PixelContrastLoss",
    "ProjectionHead",
    "RandomAnchorSampler",
    "RegionContrastLoss",
    "__version__",
    "contrastive_loss",
    "region_embeddings",
    "resize_labels",
    "select_anchors",
]
