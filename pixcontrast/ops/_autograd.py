"""The autograd glue shared by the fused backends.

A fused backend provides one function, its ``sweep``, with this contract::

    sweep(layout, options, weight, need_anchor_grad, key_grads, saved=None)
        -> (loss [N], AnchorStatistics, grad_x [N, D] or None, grad_keys)

over the class-sorted :class:`~pixcontrast.ops._layout.ContrastLayout`: ``options`` is the
frozen :class:`~pixcontrast.ops._options.ContrastOptions` (the sweep reads its temperature,
``rho`` and variant; the reduction is the glue's business), ``weight`` is the upstream
gradient ``g_a`` per sorted anchor (``None``: statistics only, no gradient work),
``key_grads`` says per key segment of the layout whether its gradient is wanted
(:func:`segment_key_grads`), and ``saved`` holds the statistics of an earlier call, reused
instead of being recomputed. ``grad_keys`` has one entry per segment: its ``[m, D]`` gradient,
or ``None`` where none is wanted (nothing is allocated for it). Gradients are with respect to the
sorted anchors and each segment's keys; :func:`scatter_to_inputs` maps them back to the caller's
tensors (still in the compute dtype), and :func:`scale_gradient` rounds each to its tensor's
dtype, once, after any scaling by the upstream gradient.

Both sweeps take supcon's positive terms from the class sums here
(:func:`supcon_positive_sums`, :func:`add_supcon_positive_gradient`), so neither backend imports
the other.

:class:`FusedEvaluation` drives a sweep for one loss evaluation, forward and backward. Two
autograd entries run it: the registered operator ``pixcontrast::contrastive_loss`` of
:mod:`pixcontrast.ops._operator` (opaque to ``torch.compile``), and
:class:`ContrastFunction` (any sweep that is not a registered backend's, such
as a test's with fixed key splits).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad

from ._inputs import check_contrast_values, contrast_value_peaks
from ._layout import ContrastLayout, build_layout
from ._options import ContrastInputs, ContrastOptions

__all__ = [
    "AnchorStatistics",
    "ContrastCall",
    "ContrastFunction",
    "FusedEvaluation",
    "Gradients",
    "apply_contrast",
    "first_derivatives_only",
    "reverse_mode_only",
    "InputSpec",
    "Sweep",
    "add_supcon_positive_gradient",
    "segment_key_grads",
    "reduction_weights",
    "scale_gradient",
    "scatter_to_inputs",
    "supcon_positive_sums",
    "to_input_dtypes",
    "unsort",
]


@dataclass
class AnchorStatistics:
    """What forward keeps per sorted anchor so that backward can recompute one chunk at a time.

    Attributes:
        log_normalizer: ``nu_a`` (paper: log-sum-exp over negatives) or ``lam_a`` (supcon: over
            all valid keys); ``-inf`` when that set is empty.
        positive_weight: ``w_a = mean_p sigmoid(nu_a - s_ap)`` (paper; zeros for supcon).
    """

    log_normalizer: Tensor
    positive_weight: Tensor


# Rows of half-precision keys converted at a time by supcon_positive_sums (16 MiB at D = 256).
_SUM_ROWS = 1 << 14

Sweep = Callable[
    ..., tuple[Tensor, AnchorStatistics, Optional[Tensor], tuple[Optional[Tensor], ...]]
]


class FusedSweep(NamedTuple):
    """A fused backend for given inputs: its ``sweep``."""

    sweep: Sweep


def segment_key_grads(
    layout: ContrastLayout, need_anchor_grad: bool, need_part_grad: Sequence[bool]
) -> tuple[bool, ...]:
    """Which key segments of ``layout`` need a key gradient.

    The in-batch anchors' segment when the anchors need a gradient, a key part's segment when
    that part does: a memory bank's keys, which need none, get no gradient buffer at all.
    """
    return tuple(
        need_anchor_grad if segment.part is None else need_part_grad[segment.part]
        for segment in layout.segments
    )


def supcon_positive_sums(layout: ContrastLayout) -> Tensor:
    """``[N, D]`` sum of the positive keys of each sorted anchor.

    That is ``S_{y_a} - [in-batch] x_a`` with the class sums ``S_c`` (:mod:`pixcontrast.ops`):
    supcon's positive term is linear in the keys. Each segment is read once.
    """
    x = layout.anchors
    class_sums = x.new_zeros((layout.num_classes, x.shape[1]))
    for segment in layout.segments:
        k = segment.keys
        if k.dtype == x.dtype:
            class_sums.index_add_(0, segment.key_class, k)
            continue
        # Keys in another dtype (a half-precision memory) are summed in the compute dtype, a
        # bounded block of rows at a time: no full-size copy.
        for start in range(0, k.shape[0], _SUM_ROWS):
            block = slice(start, start + _SUM_ROWS)
            class_sums.index_add_(0, segment.key_class[block], k[block].to(x.dtype))
    positive_sums = class_sums.index_select(0, layout.anchor_class)
    if layout.in_batch:
        positive_sums -= x
    return positive_sums


def add_supcon_positive_gradient(
    layout: ContrastLayout,
    positive_sums: Tensor,
    options: ContrastOptions,
    weight: Tensor,
    grad_x: Optional[Tensor],
    grad_keys: Sequence[Optional[Tensor]],
) -> None:
    """Add supcon's positive part of ``G`` to the input gradients, in place.

    The part is ``-rho * g_a / |P(a)|`` on every positive pair; the gradients are complete
    (``1/tau`` included). Class sums replace a pass over the pairs: ``dx_a -= beta_a S'_a``,
    ``dk_j -= sum_{a: y_a = c_j, a != j} beta_a x_a`` with ``beta_a = rho * g_a / (|P(a)| tau)``
    and ``S'_a`` = :func:`supcon_positive_sums` (``positive_sums``); ``weight`` is ``g_a`` per
    sorted anchor, ``grad_keys`` the key gradient of each segment, and a ``None`` gradient is
    left alone.
    """
    beta = (
        options.rho * weight * (layout.positives > 0)
        / (layout.positives.clamp(min=1) * options.temperature)
    )
    if grad_x is not None:
        grad_x -= beta[:, None] * positive_sums
    if not any(grad is not None for grad in grad_keys):
        return
    weighted = beta[:, None] * layout.anchors
    per_class = weighted.new_zeros((layout.num_classes, weighted.shape[1]))
    per_class.index_add_(0, layout.anchor_class, weighted)
    for segment, grad in zip(layout.segments, grad_keys):
        if grad is not None:
            grad -= per_class.index_select(0, segment.key_class)
            if segment.is_anchors:
                grad += weighted  # (the self pair is not a positive)


def reduction_weights(layout: ContrastLayout, reduction: str) -> Tensor:
    """Upstream ``g_a`` per sorted anchor implied by a scalar reduction."""
    has_pos = (layout.positives > 0).to(layout.positives.dtype)
    if reduction == "mean":
        return has_pos / has_pos.sum().clamp(min=1)
    return has_pos


Gradients = tuple[Optional[Tensor], tuple[Optional[Tensor], ...]]
"""Gradients of the anchors and of each key part; ``None`` for a tensor that needs none."""


@dataclass(frozen=True)
class InputSpec:
    """What backward needs to know of the caller's tensors (not the tensors themselves)."""

    anchor_dtype: torch.dtype
    key_dtypes: tuple[torch.dtype, ...]
    need_anchor_grad: bool
    need_part_grad: tuple[bool, ...]


def scatter_to_inputs(
    layout: ContrastLayout,
    spec: InputSpec,
    grad_x: Optional[Tensor],
    grad_keys: Sequence[Optional[Tensor]],
) -> Gradients:
    """Map sorted-space gradients back to the caller's anchors and key parts.

    ``grad_keys`` holds the gradient of each key segment (``None`` where none was wanted). They
    stay in the compute dtype: :func:`to_input_dtypes` rounds them to the caller's.
    """
    by_part = {
        segment.part: (segment, grad) for segment, grad in zip(layout.segments, grad_keys)
    }
    grad_anchors = None
    if spec.need_anchor_grad:
        total = grad_x if grad_x is not None else torch.zeros_like(layout.anchors)
        _, anchor_key_grad = by_part.get(None, (None, None))
        if anchor_key_grad is not None:  # an anchor's role as a key, in sorted-anchor order
            total = total + anchor_key_grad
        grad_anchors = torch.empty_like(total).index_copy_(0, layout.anchor_order, total)
    grad_parts: list[Optional[Tensor]] = []
    for p, (need, size) in enumerate(zip(spec.need_part_grad, layout.key_part_sizes)):
        segment, grad = by_part.get(p, (None, None))
        if not need:
            grad_parts.append(None)
        elif segment is not None and grad is not None and segment.source is None and (
            grad.shape[0] == size
        ):
            grad_parts.append(grad)
        else:
            # (zeros for the part's invalid keys, or all of them)
            full = layout.anchors.new_zeros((size, layout.anchors.shape[1]))
            if segment is not None and grad is not None:
                if segment.source is None:
                    full[: grad.shape[0]] = grad
                else:
                    full.index_copy_(0, segment.source, grad)
            grad_parts.append(full)
    return grad_anchors, tuple(grad_parts)


def scale_gradient(grad: Tensor, dtype: torch.dtype, upstream: Optional[Tensor] = None) -> Tensor:
    """A compute-dtype gradient, times the scalar ``upstream`` when given, rounded to ``dtype``.

    The product is formed in the compute dtype and rounded once: an upstream that a half
    precision cannot hold (``GradScaler``'s initial ``2**16``, above fp16's largest 65504) or a
    gradient below its smallest normal then still gives the gradient, whenever that fits
    ``dtype``.
    """
    if upstream is not None:
        grad = grad * upstream.to(grad.dtype)
    return grad.to(dtype)


def to_input_dtypes(
    gradients: Gradients, spec: InputSpec, upstream: Optional[Tensor] = None
) -> Gradients:
    """Each gradient of :func:`scatter_to_inputs` through :func:`scale_gradient`."""
    grad_anchors, grad_parts = gradients
    if grad_anchors is not None:
        grad_anchors = scale_gradient(grad_anchors, spec.anchor_dtype, upstream)
    return grad_anchors, tuple(
        None if grad is None else scale_gradient(grad, dtype, upstream)
        for grad, dtype in zip(grad_parts, spec.key_dtypes)
    )


def unsort(layout: ContrastLayout, per_anchor: Tensor) -> Tensor:
    """A per-sorted-anchor tensor in the caller's anchor order."""
    out = torch.empty_like(per_anchor)
    out[layout.anchor_order] = per_anchor
    return out


def first_derivatives_only(name: str) -> Callable[[Callable], Callable]:
    """Decorate the ``backward`` of an autograd Function that is not itself differentiable.

    Its gradients are constants to autograd; ``name`` names the Function in the error. Autograd
    runs ``backward`` with gradients enabled exactly when the caller asked for
    ``create_graph=True``. ``once_differentiable`` alone raises only if the second derivative
    is taken through an output that requires grad; when it does not (a loss's upstream
    gradient is a constant one), a gradient penalty would silently miss this Function's part.
    So ``create_graph=True`` is refused outright, and the backward runs without a graph.
    """

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError(
                    f"{name} supports first derivatives only: differentiating its backward pass "
                    "(create_graph=True, double backward, gradient penalties) is not supported"
                )
            return backward(ctx, *grads)

        return wrapper

    return decorate


def reverse_mode_only(name: str, tensors: Iterable[Tensor]) -> None:
    """Raise if one of ``tensors`` carries a forward-mode tangent.

    The fused backends have a backward formula only; forward-mode AD (``torch.func.jvp``,
    ``jacfwd``, ``torch.autograd.forward_ad``) through them would give a zero or missing tangent
    without a word. ``name`` names the loss in the error.
    """
    if any(forward_ad.unpack_dual(tensor).tangent is not None for tensor in tensors):
        raise RuntimeError(
            f"{name} of the fused backends has no forward-mode derivative (torch.func.jvp, "
            "jacfwd, torch.autograd.forward_ad): pass backend=\"reference\", whose plain "
            "autograd has one, or use reverse mode (backward, torch.func.grad, jacrev)"
        )


@dataclass(frozen=True)
class FusedEvaluation:
    """One loss evaluation of a fused backend: what its forward and its backward share.

    Both :class:`ContrastFunction` and the registered operator of :mod:`pixcontrast.ops._operator`
    run a fused backend through it.

    Attributes:
        layout: the class-sorted inputs.
        spec: the caller's dtypes and which of its tensors need a gradient.
        key_grads: which key segments need a gradient (:func:`segment_key_grads`).
        options: the loss options.
        sweep: the backend's sweep.
    """

    layout: ContrastLayout
    spec: InputSpec
    key_grads: tuple[bool, ...]
    options: ContrastOptions
    sweep: Sweep

    @classmethod
    def prepare(
        cls,
        inputs: ContrastInputs,
        options: ContrastOptions,
        fused: FusedSweep,
        need_grad: Sequence[bool],
        check_values: bool = False,
    ) -> FusedEvaluation:
        """Lay ``inputs`` out by class; ``need_grad``: the anchors', then each key part's.

        With ``check_values`` the value checks run first
        (:func:`~pixcontrast.ops._inputs.check_contrast_values`), their bounds read in the
        layout's one host synchronisation: one read for both.
        """
        peaks = contrast_value_peaks(inputs) if check_values else None
        layout = build_layout(
            inputs.anchors, inputs.labels, inputs.keys, inputs.key_labels, inputs.in_batch,
            read_along=peaks,
        )
        if check_values:
            check_contrast_values(inputs, options.temperature, options.rho, layout.read_along)
        spec = InputSpec(
            anchor_dtype=inputs.anchors.dtype,
            key_dtypes=tuple(part.dtype for part in inputs.keys),
            need_anchor_grad=need_grad[0],
            need_part_grad=tuple(need_grad[1:]),
        )
        key_grads = segment_key_grads(layout, spec.need_anchor_grad, spec.need_part_grad)
        return cls(layout, spec, key_grads, options, fused.sweep)

    def reduced(self) -> tuple[Tensor, Gradients]:
        """A scalar reduction's loss and the input gradients for an upstream gradient of 1.

        The reduction's weights are the upstream ``g_a``, known here: one sweep gives both. The
        gradients stay in the compute dtype (see :func:`scale_gradient`).
        """
        layout, spec = self.layout, self.spec
        weight = reduction_weights(layout, self.options.reduction)
        any_grad = spec.need_anchor_grad or any(spec.need_part_grad)
        loss, _, grad_x, grad_k = self.sweep(
            layout, self.options, weight if any_grad else None, spec.need_anchor_grad,
            self.key_grads,
        )
        return (loss * weight).sum(), scatter_to_inputs(layout, spec, grad_x, grad_k)

    def per_anchor(self) -> tuple[Tensor, AnchorStatistics]:
        """``reduction="none"``: the ``[N]`` losses and the statistics :meth:`backward` takes.

        Both are in the caller's anchor order.
        """
        loss, stats, _, _ = self.sweep(self.layout, self.options, None, False, ())
        return unsort(self.layout, loss), AnchorStatistics(
            unsort(self.layout, stats.log_normalizer), unsort(self.layout, stats.positive_weight)
        )

    def backward(self, statistics: AnchorStatistics, grad_output: Tensor) -> Gradients:
        """``reduction="none"``: the input gradients for the upstream ``grad_output`` (``[N]``).

        The scores are recomputed with the ``statistics`` of :meth:`per_anchor`.
        """
        layout = self.layout
        order = layout.anchor_order
        saved = AnchorStatistics(
            statistics.log_normalizer.index_select(0, order),
            statistics.positive_weight.index_select(0, order),
        )
        weight = grad_output.to(layout.anchors.dtype).index_select(0, order)
        weight = weight * (layout.positives > 0)
        _, _, grad_x, grad_k = self.sweep(
            layout, self.options, weight, self.spec.need_anchor_grad, self.key_grads, saved=saved
        )
        return to_input_dtypes(scatter_to_inputs(layout, self.spec, grad_x, grad_k), self.spec)


@dataclass(frozen=True)
class ContrastCall:
    """Everything :class:`ContrastFunction` takes besides the differentiable tensors, in one.

    The differentiable tensors are the anchors and the key parts.
    """

    labels: Tensor
    key_labels: Optional[Tensor]
    in_batch: bool
    options: ContrastOptions
    fused: FusedSweep
    grad_enabled: bool


class ContrastFunction(torch.autograd.Function):
    """``contrastive_loss`` for a fused backend, given that backend's ``sweep``.

    Scalar reductions: forward runs ``sweep`` with the reduction's weights and keeps the input
    gradients; backward rescales them by the upstream scalar. ``reduction="none"``: forward keeps
    the per-anchor statistics and backward runs ``sweep`` again with the upstream gradients;
    the inputs are then saved with ``save_for_backward``, so modifying one in place between
    forward and backward raises autograd's usual error. First derivatives only: differentiating
    the backward pass again raises.
    """

    @staticmethod
    def forward(ctx, call: ContrastCall, anchors: Tensor, *key_parts: Tensor) -> Tensor:
        inputs = ContrastInputs(anchors, call.labels, key_parts, call.key_labels, call.in_batch)
        need_grad = [call.grad_enabled and need for need in ctx.needs_input_grad[1:]]
        evaluation = FusedEvaluation.prepare(
            inputs, call.options, call.fused, need_grad, check_values=True
        )
        ctx.evaluation = evaluation
        if call.options.reduction != "none":
            loss, ctx.gradients = evaluation.reduced()
            return loss
        loss, ctx.statistics = evaluation.per_anchor()
        ctx.gradients = None
        # Backward recomputes the scores from the layout, which may alias the caller's tensors
        # (a memory bank's keys() is a view of its queue): saved as autograd saves inputs, an
        # in-place change before backward raises instead of giving a wrong gradient.
        ctx.save_for_backward(anchors, *key_parts)
        return loss

    @staticmethod
    @first_derivatives_only("contrastive_loss")
    def backward(ctx, grad_output: Tensor):
        if ctx.gradients is not None:
            grad_anchors, grad_parts = to_input_dtypes(
                ctx.gradients, ctx.evaluation.spec, grad_output
            )
        else:
            _ = ctx.saved_tensors  # raises if an input was modified in place since forward
            grad_anchors, grad_parts = ctx.evaluation.backward(ctx.statistics, grad_output)
        return (None, grad_anchors, *grad_parts)


def apply_contrast(
    inputs: ContrastInputs,
    options: ContrastOptions,
    *,
    sweep: Sweep,
) -> Tensor:
    """``contrastive_loss`` through :class:`ContrastFunction` with a backend's ``sweep``."""
    call = ContrastCall(
        inputs.labels, inputs.key_labels, inputs.in_batch, options,
        FusedSweep(sweep), torch.is_grad_enabled(),
    )
    return ContrastFunction.apply(call, inputs.anchors, *inputs.keys)
