"""pixcontrast: supervised pixel-wise contrastive learning for semantic segmentation."""

from . import diagnostics, distributed
from .capture import FeatureCapture
from .diagnostics import GradientRatio, contrast_stats, gradient_ratio
from .functional import contrastive_loss, pair_contrastive_loss, resize_labels
from .heads import ProjectionHead
from .losses import PixelContrastLoss, RegionContrastLoss, SampledContrastLoss
from .memory import ClassMemoryBank, region_embeddings
from .mining import MINERS, KeyMiner, MinedContrastLoss, MinedPairs, mine_keys
from .samplers import (
    AnchorSample,
    AnchorSampler,
    ConfidenceAnchorSampler,
    HardAnchorSampler,
    RandomAnchorSampler,
    select_anchors,
)
from .schedule import ContrastWeightSchedule
from .term import ContrastTerm

__version__ = "0.1.0"

__all__ = [
    "MINERS",
    "AnchorSample",
    "AnchorSampler",
    "ClassMemoryBank",
    "ConfidenceAnchorSampler",
    "ContrastTerm",
    "ContrastWeightSchedule",
    "FeatureCapture",
    "GradientRatio",
    "HardAnchorSampler",
    "KeyMiner",
    "MinedContrastLoss",
    "MinedPairs",
    "PixelContrastLoss",
    "ProjectionHead",
    "RandomAnchorSampler",
    "RegionContrastLoss",
    "SampledContrastLoss",
    "__version__",
    "contrast_stats",
    "contrastive_loss",
    "diagnostics",
    "distributed",
    "gradient_ratio",
    "mine_keys",
    "pair_contrastive_loss",
    "region_embeddings",
    "resize_labels",
    "select_anchors",
]
