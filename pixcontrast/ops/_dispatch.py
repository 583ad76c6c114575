"""Backend choice for :func:`pixcontrast.contrastive_loss`.

Every backend declares which inputs it supports and, when it does not, why. ``"auto"`` takes the
first backend of :data:`AUTO_ORDER` that supports the inputs and that ``auto`` does not decline
for them, and says why it declined the others (:func:`explain_auto`). An explicitly named
backend that cannot run raises an error listing every reason.

``auto`` takes Triton only where committed GPU measurements show it faster than the torch path:
the pairs of :data:`TRITON_MEASURED_WINS`, empty until the kernels have been timed on a GPU
(``benchmarks/gpu_check.py``). Until then CUDA tensors go to the torch path and Triton is opt-in.
fp32 at ``"highest"`` matmul precision is never auto's Triton case: exact fp32 products run on
FMA units in Triton, which is cuBLAS's job (the torch path).

The environment variable ``PIXCONTRAST_BACKEND`` (one of :data:`BACKEND_NAMES`) replaces
``"auto"``, so a user can force a backend without touching code (``PIXCONTRAST_BACKEND=triton``
to opt in, ``PIXCONTRAST_BACKEND=torch`` to rule out a kernel problem); a backend named in code
is never overridden. It is read at every call.

The fused backends run as the registered operator ``pixcontrast::contrastive_loss``
(:mod:`pixcontrast.ops._operator`). Every backend's loss runs the data-dependent input checks itself
(``_inputs.check_contrast_values``): the operator inside, the others before they start.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import _inputs, triton_fused
from ._operator import fused_loss
from ._options import ContrastInputs, ContrastOptions
from .reference import reference_contrastive_loss

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "BACKEND_NAMES",
    "ENV_VAR",
    "TRITON_MEASURED_WINS",
    "Backend",
    "explain_auto",
    "select_backend",
    "triton_auto_declines",
]

LossFn = Callable[[ContrastInputs, ContrastOptions], Tensor]
Reasons = Callable[[Tensor, Sequence[Tensor]], list[str]]
ENV_VAR = "PIXCONTRAST_BACKEND"

# (CUDA compute capability, operand dtype) where figures committed under benchmarks/results/
# show Triton faster than the torch path at the paper's shapes; auto takes Triton only there.
# Flipping the default for a GPU is one entry here, next to the measurement that justifies it.
TRITON_MEASURED_WINS: frozenset[tuple[tuple[int, int], torch.dtype]] = frozenset()


@dataclass(frozen=True)
class Backend:
    """A loss implementation and what it can take.

    Attributes:
        name: the ``backend=`` name.
        loss: ``loss(inputs, options)``, the loss of inputs whose shapes, dtypes and devices
            are validated; it checks their values itself (labels ``>= 0``, a finite loss).
        unsupported: ``unsupported(anchors, key parts)``, every reason why the backend cannot
            take such tensors (empty: it can).
        auto_declines: the reasons why ``"auto"`` does not pick it for tensors it could take
            (empty: auto may pick it).
    """

    name: str
    loss: LossFn
    unsupported: Reasons
    auto_declines: Reasons


def _nothing(anchors: Tensor, keys: Sequence[Tensor]) -> list[str]:
    return []


def triton_auto_declines(
    capability: Optional[tuple[int, int]],
    operand_dtype: torch.dtype,
    float32_precision: str,
    measured_wins: frozenset = TRITON_MEASURED_WINS,
) -> list[str]:
    """Why ``auto`` does not take Triton for inputs on a GPU of ``capability``.

    ``capability`` ``None`` means not a CUDA device; the inputs' products take
    ``operand_dtype``, at torch's fp32 matmul precision ``float32_precision``; ``measured_wins``
    are the (capability, dtype) pairs where Triton was measured faster.
    """
    if capability is None:
        return ["auto takes Triton for CUDA tensors only"]
    reasons = []
    if operand_dtype == torch.float32 and float32_precision == "highest":
        reasons.append(
            "fp32 at 'highest' matmul precision is cuBLAS's job (the torch path): Triton takes "
            "bf16/fp16, and fp32 only when TF32 is allowed (torch.backends.cuda.matmul."
            "allow_tf32 or torch.set_float32_matmul_precision('high'))"
        )
    elif (capability, operand_dtype) not in measured_wins:
        reasons.append(
            f"Triton is unmeasured on sm{capability[0]}{capability[1]} with {operand_dtype}: no "
            "committed GPU figures show it faster than the torch path there (opt in with "
            f"backend='triton' or {ENV_VAR}=triton; benchmarks/gpu_check.py measures it)"
        )
    return reasons


def _triton_auto_declines(anchors: Tensor, keys: Sequence[Tensor]) -> list[str]:
    device = anchors.device
    if device.type != "cuda":
        # Decided without reading the matmul precision: dynamo cannot trace
        # torch.get_float32_matmul_precision, and the default backend must compile fullgraph.
        return triton_auto_declines(None, anchors.dtype, "")
    return triton_auto_declines(
        torch.cuda.get_device_capability(device), triton_fused.operand_dtype(anchors, keys),
        torch.get_float32_matmul_precision(),
    )


def _reference_loss(inputs: ContrastInputs, options: ContrastOptions) -> Tensor:
    """The dense reference, after the value checks.

    Plain torch, so that dynamo traces it and autograd differentiates it to any order (a
    registered operator would allow first derivatives only).
    """
    _inputs.check_contrast_values(inputs, options.temperature, options.rho)
    return reference_contrastive_loss(inputs, options)


BACKENDS: dict[str, Backend] = {
    # triton_fused imports Triton only when unsupported() or the loss first runs.
    "triton": Backend(
        "triton", functools.partial(fused_loss, "triton"), triton_fused.unsupported,
        _triton_auto_declines,
    ),
    "torch": Backend("torch", functools.partial(fused_loss, "torch"), _nothing, _nothing),
    "reference": Backend("reference", _reference_loss, _nothing, _nothing),
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


def _auto(anchors: Tensor, keys: Sequence[Tensor]) -> tuple[Backend, dict[str, list[str]]]:
    """Auto's backend and, per backend it passed over, the reasons."""
    passed_over: dict[str, list[str]] = {}
    for candidate in AUTO_ORDER:
        backend = BACKENDS[candidate]
        # Declines first: they need no Triton import, so CPU tensors never load it.
        reasons = backend.auto_declines(anchors, keys) or backend.unsupported(anchors, keys)
        if not reasons:
            return backend, passed_over
        passed_over[candidate] = reasons
    raise RuntimeError("no backend supports these inputs")  # "torch" supports everything


def explain_auto(anchors: Tensor, keys: Sequence[Tensor] = ()) -> str:
    """Which backend ``"auto"`` takes for these inputs and why it passed over the others."""
    backend, passed_over = _auto(anchors, keys)
    lines = [f"auto -> {backend.name!r}"]
    lines += [f"  not {name!r}: " + "; ".join(reasons) for name, reasons in passed_over.items()]
    return "\n".join(lines)


def select_backend(name: str, inputs: ContrastInputs) -> Backend:
    """The backend that will run ``name`` on these inputs (``name`` already validated)."""
    name = _requested(name)
    if name == "auto":
        return _auto(inputs.anchors, inputs.keys)[0]
    backend = BACKENDS[name]
    reasons = backend.unsupported(inputs.anchors, inputs.keys)
    if reasons:
        raise ValueError(f"backend={name!r} cannot run these inputs: " + "; ".join(reasons))
    return backend
