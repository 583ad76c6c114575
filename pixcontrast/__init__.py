"""pixcontrast: supervised pixel-wise contrastive learning for semantic segmentation."""

from .functional import contrastive_loss, resize_labels
from .heads import ProjectionHead
from .losses import PixelContrastLoss
from .samplers import AnchorSample, RandomAnchorSampler

__version__ = "0.1.0"

__all__ = [
    "AnchorSample",
    "PixelContrastLoss",
    "ProjectionHead",
    "RandomAnchorSampler",
    "__version__",
    "contrastive_loss",
    "resize_labels",
]
