"""Backend choice for :func:`pixcontrast.contrastive_loss`.

Every backend declares which inputs it supports and, when it does not, why. ``"auto"`` takes the
first backend of :data:`AUTO_ORDER` that may run on the inputs' device and supports them: Triton
for CUDA tensors when it is importable and takes the inputs, the chunked torch path otherwise. An
explicitly named backend that cannot run raises an error listing every reason.

The environment variable ``PIXCONTRAST_BACKEND`` (one of :data:`BACKEND_NAMES`) replaces
``"auto"``, so a user can force a backend without touching code (``PIXCONTRAST_BACKEND=torch``
to rule out a kernel problem, say); a backend named in code is never overridden. It is read at
every call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from torch import Tensor

from .ops import triton_fused
from .ops.reference import reference_contrastive_loss
from .ops.torch_fused import torch_contrastive_loss

__all__ = ["BACKENDS", "AUTO_ORDER", "BACKEND_NAMES", "ENV_VAR", "Backend", "select_backend"]

LossFn = Callable[..., Tensor]
ENV_VAR = "PIXCONTRAST_BACKEND"


@dataclass(frozen=True)
class Backend:
    """A loss implementation and the test of which inputs it can take.

    ``auto_devices``: device types on which ``"auto"`` considers this backend (``None``: all).
    """

    name: str
    loss: LossFn
    unsupported: Callable[[Tensor, Sequence[Tensor]], list[str]]
    auto_devices: Optional[tuple[str, ...]] = None


def _anything(anchors: Tensor, keys: Sequence[Tensor]) -> list[str]:
    return []


BACKENDS: dict[str, Backend] = {
    # triton_fused imports Triton only when unsupported() or the loss first runs.
    "triton": Backend(
        "triton", triton_fused.triton_contrastive_loss, triton_fused.unsupported, ("cuda",)
    ),
    "torch": Backend("torch", torch_contrastive_loss, _anything),
    "reference": Backend("reference", reference_contrastive_loss, _anything),
}
AUTO_ORDER: tuple[str, ...] = ("triton", "torch")
BACKEND_NAMES: tuple[str, ...] = ("auto", "triton", "torch", "reference")


def _requested(name: str) -> str:
    """``name``, or the environment's choice when ``name`` is ``"auto"``."""
    override = os.environ.get(ENV_VAR, "").strip()
    if name != "auto" or not override:
        return name
    if override not in BACKEND_NAMES:
        raise ValueError(
            f"environment variable {ENV_VAR}={override!r} is not a backend; "
            f"expected one of {', '.join(map(repr, BACKEND_NAMES))}"
        )
    return override


def select_backend(name: str, anchors: Tensor, keys: Sequence[Tensor]) -> Backend:
    """The backend that will run ``name`` on these inputs (``name`` already validated; ``keys``
    the key parts)."""
    name = _requested(name)
    if name == "auto":
        for candidate in AUTO_ORDER:
            backend = BACKENDS[candidate]
            devices = backend.auto_devices
            if devices is not None and anchors.device.type not in devices:
                continue
            if not backend.unsupported(anchors, keys):
                return backend
        raise RuntimeError("no backend supports these inputs")  # "torch" supports everything
    backend = BACKENDS[name]
    reasons = backend.unsupported(anchors, keys)
    if reasons:
        raise ValueError(f"backend={name!r} cannot run these inputs: " + "; ".join(reasons))
    return backend
