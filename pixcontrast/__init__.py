"""pixcontrast: supervised pixel-wise contrastive learning for semantic segmentation."""

from .functional import contrastive_loss

__version__ = "0.1.0"

__all__ = ["__version__", "contrastive_loss"]
