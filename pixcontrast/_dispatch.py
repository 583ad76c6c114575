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

The fused backends run as the registered operator ``pixcontrast::contrastive_loss`` (with
``torch.library``, from torch 2.4 on; :data:`FUSED_OPERATOR` is the one switch): to
``torch.compile`` the loss is one node with static output shapes, and the host
synchronisations (the value checks, the class layout, the key-gradient columns) happen inside
it, eagerly, so a compiled step has no graph break in the loss. Every backend's loss runs the
data-dependent input checks itself (``_checks.check_contrast_values``): the operator inside,
the others before they start.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from . import _checks
from .ops import torch_fused, triton_fused
from .ops._autograd import (
    AnchorStatistics,
    FusedEvaluation,
    Gradients,
    Sweep,
    apply_contrast,
    first_derivatives_only,
)
from .ops._layout import compute_dtype
from .ops._options import ContrastInputs, ContrastOptions
from .ops.reference import reference_contrastive_loss

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "BACKEND_NAMES",
    "ENV_VAR",
    "FUSED_OPERATOR",
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
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return triton_auto_declines(
        capability, triton_fused.operand_dtype(anchors, keys),
        torch.get_float32_matmul_precision(),
    )


# Whether the fused backends run as the registered operator: torch.library registers a Python
# operator's fake (shape) function and autograd formula from torch 2.4 on. Before that they run
# through ContrastFunction, which dynamo traces around (graph breaks at the host syncs).
FUSED_OPERATOR = hasattr(torch.library, "register_fake") and hasattr(
    torch.library, "register_autograd"
)

# The sweep of each fused backend for given inputs (Triton's products take their dtype).
_SWEEPS: dict[str, Callable[[ContrastInputs], Sweep]] = {
    "torch": lambda inputs: torch_fused.sweep,
    "triton": triton_fused.sweep_for,
}


def _fused_loss(name: str, inputs: ContrastInputs, options: ContrastOptions) -> Tensor:
    """The loss of the fused backend ``name``: the registered operator where torch has one."""
    if not FUSED_OPERATOR:
        _checks.check_contrast_values(inputs, options.temperature, options.rho)
        return apply_contrast(inputs, options, sweep=_SWEEPS[name](inputs))
    need_grad = [
        torch.is_grad_enabled() and tensor.requires_grad
        for tensor in (inputs.anchors, *inputs.keys)
    ]
    loss, _ = torch.ops.pixcontrast.contrastive_loss(
        inputs.anchors, inputs.labels, list(inputs.keys), inputs.key_labels, inputs.in_batch,
        options.temperature, options.rho, options.variant, options.reduction, name, need_grad,
    )
    return loss


def _reference_loss(inputs: ContrastInputs, options: ContrastOptions) -> Tensor:
    """The dense reference, after the value checks.

    Plain torch, so that dynamo traces it and autograd differentiates it to any order (a
    registered operator would allow first derivatives only).
    """
    _checks.check_contrast_values(inputs, options.temperature, options.rho)
    return reference_contrastive_loss(inputs, options)


BACKENDS: dict[str, Backend] = {
    # triton_fused imports Triton only when unsupported() or the loss first runs.
    "triton": Backend(
        "triton", functools.partial(_fused_loss, "triton"), triton_fused.unsupported,
        _triton_auto_declines,
    ),
    "torch": Backend("torch", functools.partial(_fused_loss, "torch"), _nothing, _nothing),
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


# -------------------------------------------------- pixcontrast::contrastive_loss (torch.library)
#
# Forward: (anchors, labels, key parts, key labels, in_batch, options, backend, which tensors need
# a gradient) -> (loss, what backward needs). For a scalar reduction that is the input gradients
# for an upstream gradient of 1, computed in forward (FusedEvaluation.reduced); backward scales
# them. For reduction="none" it is the per-anchor statistics, and backward runs the second
# operator, which lays the inputs out again and recomputes the scores with them. Gradients come
# only for the tensors flagged in need_grad, in the order anchors, key parts.

_FORWARD_SCHEMA = (
    "(Tensor anchors, Tensor labels, Tensor[] keys, Tensor? key_labels, bool in_batch, "
    "float temperature, float rho, str variant, str reduction, str backend, bool[] need_grad) "
    "-> (Tensor, Tensor[])"
)
_BACKWARD_SCHEMA = (
    "(Tensor grad, Tensor anchors, Tensor labels, Tensor[] keys, Tensor? key_labels, "
    "Tensor log_normalizer, Tensor positive_weight, bool in_batch, float temperature, float rho, "
    "str variant, str backend, bool[] need_grad) -> Tensor[]"
)


def _evaluation(
    inputs: ContrastInputs, options: ContrastOptions, backend: str, need_grad: Sequence[bool]
) -> FusedEvaluation:
    return FusedEvaluation.prepare(inputs, options, _SWEEPS[backend](inputs), need_grad)


def _wanted(gradients: Gradients) -> list[Tensor]:
    """The gradients of the tensors that need one, anchors first."""
    grad_anchors, grad_parts = gradients
    return [grad for grad in (grad_anchors, *grad_parts) if grad is not None]


def _wanted_like(
    anchors: Tensor, keys: Sequence[Tensor], need_grad: Sequence[bool]
) -> list[Tensor]:
    """Fake tensors shaped like the gradients of :func:`_wanted`."""
    return [t.new_empty(t.shape) for t, need in zip((anchors, *keys), need_grad) if need]


def _operator_forward(
    anchors: Tensor,
    labels: Tensor,
    keys: list[Tensor],
    key_labels: Optional[Tensor],
    in_batch: bool,
    temperature: float,
    rho: float,
    variant: str,
    reduction: str,
    backend: str,
    need_grad: list[bool],
) -> tuple[Tensor, list[Tensor]]:
    """The forward kernel: the loss and what backward needs (see above)."""
    inputs = ContrastInputs(anchors, labels, tuple(keys), key_labels, in_batch)
    # (the kernel always sees real values: while torch.compile traces, the fake stands in)
    _checks.check_contrast_values(inputs, temperature, rho)
    options = ContrastOptions(temperature, rho, variant, reduction)
    evaluation = _evaluation(inputs, options, backend, need_grad)
    if reduction == "none":
        loss, statistics = evaluation.per_anchor()
        return loss, [statistics.log_normalizer, statistics.positive_weight]
    loss, gradients = evaluation.reduced()
    return loss, _wanted(gradients)


def _operator_forward_fake(*arguments: Any) -> tuple[Tensor, list[Tensor]]:
    """The outputs' shapes and dtypes, from those of ``_operator_forward``'s arguments."""
    anchors, _, keys, *_, reduction, _, need_grad = arguments
    dtype = compute_dtype(anchors.dtype)
    if reduction == "none":
        loss, *statistics = (anchors.new_empty(anchors.shape[:1], dtype=dtype) for _ in range(3))
        return loss, statistics
    return anchors.new_empty((), dtype=dtype), _wanted_like(anchors, keys, need_grad)


def _operator_backward(
    grad: Tensor,
    anchors: Tensor,
    labels: Tensor,
    keys: list[Tensor],
    key_labels: Optional[Tensor],
    log_normalizer: Tensor,
    positive_weight: Tensor,
    in_batch: bool,
    temperature: float,
    rho: float,
    variant: str,
    backend: str,
    need_grad: list[bool],
) -> list[Tensor]:
    """The backward kernel of ``reduction="none"``: the wanted gradients for upstream ``grad``."""
    inputs = ContrastInputs(anchors, labels, tuple(keys), key_labels, in_batch)
    options = ContrastOptions(temperature, rho, variant, "none")
    evaluation = _evaluation(inputs, options, backend, need_grad)
    return _wanted(evaluation.backward(AnchorStatistics(log_normalizer, positive_weight), grad))


def _operator_backward_fake(*arguments: Any) -> list[Tensor]:
    """The gradients' shapes and dtypes, from those of ``_operator_backward``'s arguments."""
    _, anchors, _, keys, *_, need_grad = arguments
    return _wanted_like(anchors, keys, need_grad)


def _setup_context(ctx, inputs: tuple, output: tuple[Tensor, list[Tensor]]) -> None:
    """Keep what :func:`_operator_gradients` needs of a forward call."""
    (anchors, labels, keys, key_labels, in_batch, temperature, rho, variant, reduction, backend,
     need_grad) = inputs
    kept = output[1]
    ctx.mark_non_differentiable(*kept)
    ctx.need_grad, ctx.scalar = need_grad, reduction != "none"
    ctx.arguments = (in_batch, temperature, rho, variant, backend)
    if ctx.scalar:
        ctx.save_for_backward(*kept)
    else:
        # Backward lays the inputs out again: saved as autograd saves inputs, an in-place change
        # before backward (a memory bank's enqueue into its keys() view) raises instead of
        # giving a wrong gradient.
        ctx.save_for_backward(*kept, anchors, labels, key_labels, *keys)


@first_derivatives_only("contrastive_loss")
def _operator_gradients(ctx, grad_loss: Tensor, _: list[Tensor]) -> tuple:
    """The forward operator's input gradients (``None`` for the arguments that need none)."""
    saved = ctx.saved_tensors
    if ctx.scalar:
        wanted = [grad * grad_loss.to(grad.dtype) for grad in saved]
    else:
        log_normalizer, positive_weight, anchors, labels, key_labels, *keys = saved
        wanted = torch.ops.pixcontrast.contrastive_loss_backward(
            grad_loss, anchors, labels, keys, key_labels, log_normalizer, positive_weight,
            *ctx.arguments, ctx.need_grad,
        )
    grads = iter(wanted)
    grad_anchors, *grad_keys = (next(grads) if need else None for need in ctx.need_grad)
    return (grad_anchors, None, grad_keys) + (None,) * 8


def _register_operator() -> None:
    operators: list[tuple[str, str, Callable[..., object], Callable[..., object]]] = [
        ("contrastive_loss", _FORWARD_SCHEMA, _operator_forward, _operator_forward_fake),
        ("contrastive_loss_backward", _BACKWARD_SCHEMA, _operator_backward,
         _operator_backward_fake),
    ]
    for name, schema, kernel, fake in operators:
        qualname = f"pixcontrast::{name}"
        torch.library.define(qualname, schema)
        # (the plain kernel: custom_op's would import torch._dynamo, and Triton, at the first call)
        torch.library.impl(qualname, "default", kernel)
        torch.library.register_fake(qualname, fake)
    torch.library.register_autograd(
        "pixcontrast::contrastive_loss", _operator_gradients, setup_context=_setup_context
    )


if FUSED_OPERATOR:
    _register_operator()
