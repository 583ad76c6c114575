"""The fused backends as the registered operator ``pixcontrast::contrastive_loss``.

Through ``torch.library`` the loss of the ``"torch"`` and ``"triton"`` backends is one operator
to ``torch.compile``: one node with static output shapes, whose host synchronisations (the value
checks, the class layout, the key-gradient columns) happen inside it, eagerly, so a compiled step
has no graph break in the loss.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from . import torch_fused, triton_fused
from ._autograd import (
    AnchorStatistics,
    FusedEvaluation,
    FusedSweep,
    Gradients,
    first_derivatives_only,
    reverse_mode_only,
    scale_gradient,
)
from ._layout import compute_dtype
from ._options import ContrastInputs, ContrastOptions

__all__ = ["fused_loss"]

# Each fused backend for given inputs (Triton's products take their dtype).
_SWEEPS: dict[str, Callable[[ContrastInputs], FusedSweep]] = {
    "torch": lambda inputs: FusedSweep(torch_fused.sweep),
    "triton": triton_fused.sweep_for,
}


class ForwardArguments(NamedTuple):
    """The arguments of ``pixcontrast::contrastive_loss``: its schema is written from these."""

    anchors: Tensor
    labels: Tensor
    keys: list[Tensor]
    key_labels: Optional[Tensor]
    in_batch: bool
    temperature: float
    rho: float
    variant: str
    reduction: str
    backend: str
    need_grad: list[bool]  # which of anchors, key parts get a gradient


class BackwardArguments(NamedTuple):
    """The arguments of ``pixcontrast::contrastive_loss_backward`` (``reduction="none"``)."""

    grad: Tensor
    anchors: Tensor
    labels: Tensor
    keys: list[Tensor]
    key_labels: Optional[Tensor]
    log_normalizer: Tensor
    positive_weight: Tensor
    in_batch: bool
    temperature: float
    rho: float
    variant: str
    backend: str
    need_grad: list[bool]


# (the annotations are strings, or forward references to them: ``from __future__ import
# annotations``)
_SCHEMA_TYPES = {
    "Tensor": "Tensor", "list[Tensor]": "Tensor[]", "Optional[Tensor]": "Tensor?",
    "bool": "bool", "float": "float", "str": "str", "list[bool]": "bool[]",
}


def _schema(arguments: type, returns: str) -> str:
    """The ``torch.library`` schema of a function taking ``arguments`` (a NamedTuple)."""
    types = {
        name: str(getattr(hint, "__forward_arg__", hint))
        for name, hint in arguments.__annotations__.items()
    }
    listed = ", ".join(f"{_SCHEMA_TYPES[types[name]]} {name}" for name in types)
    return f"({listed}) -> {returns}"


def fused_loss(name: str, inputs: ContrastInputs, options: ContrastOptions) -> Tensor:
    """The loss of the fused backend ``name``, through the registered operator."""
    reverse_mode_only("contrastive_loss", (inputs.anchors, *inputs.keys))
    need_grad = [
        torch.is_grad_enabled() and tensor.requires_grad
        for tensor in (inputs.anchors, *inputs.keys)
    ]
    arguments = ForwardArguments(
        inputs.anchors, inputs.labels, list(inputs.keys), inputs.key_labels, inputs.in_batch,
        options.temperature, options.rho, options.variant, options.reduction, name, need_grad,
    )
    loss, _ = torch.ops.pixcontrast.contrastive_loss(*arguments)
    return loss


# -------------------------------------------------- pixcontrast::contrastive_loss (torch.library)
#
# Forward: (anchors, labels, key parts, key labels, in_batch, options, backend, which tensors need
# a gradient) -> (loss, what backward needs). For a scalar reduction that is the input gradients
# for an upstream gradient of 1 in the compute dtype, computed in forward
# (FusedEvaluation.reduced); backward scales them and rounds them to the inputs' dtypes. For
# reduction="none" it is the per-anchor statistics, and backward runs the second operator, which
# lays the inputs out again and recomputes the scores with them. Gradients come
# only for the tensors flagged in need_grad, in the order anchors, key parts.

_FORWARD_SCHEMA = _schema(ForwardArguments, "(Tensor, Tensor[])")
_BACKWARD_SCHEMA = _schema(BackwardArguments, "Tensor[]")


def _evaluation(
    inputs: ContrastInputs,
    options: ContrastOptions,
    backend: str,
    need_grad: Sequence[bool],
    check_values: bool = False,
) -> FusedEvaluation:
    return FusedEvaluation.prepare(
        inputs, options, _SWEEPS[backend](inputs), need_grad, check_values
    )


def _wanted(gradients: Gradients) -> list[Tensor]:
    """The gradients of the tensors that need one, anchors first."""
    grad_anchors, grad_parts = gradients
    return [grad for grad in (grad_anchors, *grad_parts) if grad is not None]


def _wanted_like(
    anchors: Tensor,
    keys: Sequence[Tensor],
    need_grad: Sequence[bool],
    dtype: Optional[torch.dtype] = None,
) -> list[Tensor]:
    """Fake tensors shaped like the gradients of :func:`_wanted` (in ``dtype``: each tensor's)."""
    return [
        t.new_empty(t.shape, dtype=dtype or t.dtype)
        for t, need in zip((anchors, *keys), need_grad)
        if need
    ]


def _operator_forward(*arguments: Any) -> tuple[Tensor, list[Tensor]]:
    """The forward kernel: the loss and what backward needs (see above)."""
    a = ForwardArguments(*arguments)
    inputs = ContrastInputs(a.anchors, a.labels, tuple(a.keys), a.key_labels, a.in_batch)
    # The value checks, their bounds read with the layout's (the kernel always sees real values:
    # while torch.compile traces, the fake stands in).
    options = ContrastOptions(a.temperature, a.rho, a.variant, a.reduction)
    evaluation = _evaluation(inputs, options, a.backend, a.need_grad, check_values=True)
    if a.reduction == "none":
        loss, statistics = evaluation.per_anchor()
        return loss, [statistics.log_normalizer, statistics.positive_weight]
    loss, gradients = evaluation.reduced()
    return loss, _wanted(gradients)


def _operator_forward_fake(*arguments: Any) -> tuple[Tensor, list[Tensor]]:
    """The outputs' shapes and dtypes, from those of ``_operator_forward``'s arguments."""
    a = ForwardArguments(*arguments)
    dtype = compute_dtype(a.anchors.dtype)
    if a.reduction == "none":
        loss, *statistics = (
            a.anchors.new_empty(a.anchors.shape[:1], dtype=dtype) for _ in range(3)
        )
        return loss, statistics
    return a.anchors.new_empty((), dtype=dtype), _wanted_like(
        a.anchors, a.keys, a.need_grad, dtype
    )


def _operator_backward(*arguments: Any) -> list[Tensor]:
    """The backward kernel of ``reduction="none"``: the wanted gradients for upstream ``grad``."""
    a = BackwardArguments(*arguments)
    inputs = ContrastInputs(a.anchors, a.labels, tuple(a.keys), a.key_labels, a.in_batch)
    options = ContrastOptions(a.temperature, a.rho, a.variant, "none")
    evaluation = _evaluation(inputs, options, a.backend, a.need_grad)
    statistics = AnchorStatistics(a.log_normalizer, a.positive_weight)
    return _wanted(evaluation.backward(statistics, a.grad))


def _operator_backward_fake(*arguments: Any) -> list[Tensor]:
    """The gradients' shapes and dtypes, from those of ``_operator_backward``'s arguments."""
    a = BackwardArguments(*arguments)
    return _wanted_like(a.anchors, a.keys, a.need_grad)


def _setup_context(ctx, inputs: tuple, output: tuple[Tensor, list[Tensor]]) -> None:
    """Keep what :func:`_operator_gradients` needs of a forward call."""
    a = ForwardArguments(*inputs)
    kept = output[1]
    ctx.mark_non_differentiable(*kept)
    ctx.need_grad, ctx.scalar = a.need_grad, a.reduction != "none"
    ctx.dtypes = [t.dtype for t, need in zip((a.anchors, *a.keys), a.need_grad) if need]
    ctx.arguments = (a.in_batch, a.temperature, a.rho, a.variant, a.backend)
    if ctx.scalar:
        ctx.save_for_backward(*kept)
    else:
        # Backward lays the inputs out again: saved as autograd saves inputs, an in-place change
        # before backward (a memory bank's enqueue into its keys() view) raises instead of
        # giving a wrong gradient.
        ctx.save_for_backward(*kept, a.anchors, a.labels, a.key_labels, *a.keys)


@first_derivatives_only("contrastive_loss")
def _operator_gradients(ctx, grad_loss: Tensor, _: list[Tensor]) -> tuple:
    """The forward operator's input gradients (``None`` for the arguments that need none)."""
    saved = ctx.saved_tensors
    if ctx.scalar:
        wanted = [
            scale_gradient(grad, dtype, grad_loss) for grad, dtype in zip(saved, ctx.dtypes)
        ]
    else:
        log_normalizer, positive_weight, anchors, labels, key_labels, *keys = saved
        wanted = torch.ops.pixcontrast.contrastive_loss_backward(
            grad_loss, anchors, labels, keys, key_labels, log_normalizer, positive_weight,
            *ctx.arguments, ctx.need_grad,
        )
    grads = iter(wanted)
    grad_anchors, *grad_keys = (next(grads) if need else None for need in ctx.need_grad)
    gradients: dict[str, Any] = dict.fromkeys(ForwardArguments._fields)
    gradients.update(anchors=grad_anchors, keys=grad_keys)
    return tuple(gradients.values())


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


_register_operator()
