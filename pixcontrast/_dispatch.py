"""Backend choice for :func:`pixcontrast.contrastive_loss`.

Every backend declares which inputs it supports and, when it does not, why. ``"auto"`` takes the
first backend of :data:`AUTO_ORDER` that supports the inputs; an explicitly named backend that
cannot run raises an error listing every reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor

from .ops.reference import reference_contrastive_loss
from .ops.torch_fused import torch_contrastive_loss

__all__ = ["BACKENDS", "AUTO_ORDER", "Backend", "select_backend"]

LossFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Backend:
    """A loss implementation and the test of which inputs it can take."""

    name: str
    loss: LossFn
    unsupported: Callable[[Tensor, Optional[Tensor]], list[str]]


def _anything(anchors: Tensor, keys: Optional[Tensor]) -> list[str]:
    return []


BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", torch_contrastive_loss, _anything),
    "reference": Backend("reference", reference_contrastive_loss, _anything),
}
AUTO_ORDER: tuple[str, ...] = ("torch",)
BACKEND_NAMES: tuple[str, ...] = ("auto", "torch", "reference")


def select_backend(name: str, anchors: Tensor, keys: Optional[Tensor]) -> Backend:
    """The backend that will run ``name`` on these inputs (``name`` already validated)."""
    if name == "auto":
        for candidate in AUTO_ORDER:
            backend = BACKENDS[candidate]
            if not backend.unsupported(anchors, keys):
                return backend
        raise RuntimeError("no backend supports these inputs")  # "torch" supports everything
    backend = BACKENDS[name]
    reasons = backend.unsupported(anchors, keys)
    if reasons:
        raise ValueError(f"backend={name!r} cannot run these inputs: " + "; ".join(reasons))
    return backend
