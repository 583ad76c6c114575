"""pixcontrast: supervised pixel-wise contrastive learning for semantic segmentation.

The names here are what a training loop writes: the losses, the memory bank, the projection
head, the samplers, the miner, the weight schedule, the one-object term and its feature capture,
the gradient diagnostic and the functional loss. Building blocks stay in their modules:
:mod:`pixcontrast.functional` (pixel-map functions, the loss on mined pairs),
:mod:`pixcontrast.samplers` (``select_anchors``, the sampler protocol), :mod:`pixcontrast.mining`
(``mine_keys``), :mod:`pixcontrast.diagnostics`, :mod:`pixcontrast.distributed` and
:mod:`pixcontrast.backends` (which backend runs, and why).
"""

from .capture import FeatureCapture
from .diagnostics import gradient_ratio
from .functional import contrastive_loss
from .heads import ProjectionHead
from .losses import PixelContrastLoss, RegionContrastLoss
from .memory import ClassMemoryBank
from .mining import KeyMiner, MinedContrastLoss
from .samplers import ConfidenceAnchorSampler, HardAnchorSampler, RandomAnchorSampler
from .schedule import ContrastWeightSchedule
from .term import ContrastTerm

__version__ = "0.1.0"

__all__ = [
    "ClassMemoryBank",
    "ConfidenceAnchorSampler",
    "ContrastTerm",
    "ContrastWeightSchedule",
    "FeatureCapture",
    "HardAnchorSampler",
    "KeyMiner",
    "MinedContrastLoss",
    "PixelContrastLoss",
    "ProjectionHead",
    "RandomAnchorSampler",
    "RegionContrastLoss",
    "__version__",
    "contrastive_loss",
    "gradient_ratio",
]
