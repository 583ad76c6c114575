"""What the contrast term is doing: per-call statistics and its gradient next to another loss's.

Two questions come up in every training run with a contrastive term: "does the term see what I
think it sees?" (anchors, classes, positives, memory fill) and "does it dominate the other loss?"
(gradient norms at a shared tensor). :func:`contrast_stats` answers the first after every call of
a loss (the losses store it in ``last_stats``); :func:`gradient_ratio` the second, when asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _checks

__all__ = ["GradientRatio", "contrast_stats", "gradient_ratio", "positive_counts"]


def _matches(labels: Tensor, key_labels: Tensor) -> Tensor:
    """``[N]`` how many entries of ``key_labels`` equal each entry of ``labels``.

    Counted by a sort and two binary searches: no ``[N, M]`` mask, no host synchronisation.
    """
    ordered = key_labels.reshape(-1).sort().values
    right = torch.searchsorted(ordered, labels, right=True)
    return right - torch.searchsorted(ordered, labels)


def positive_counts(
    labels: Tensor, key_labels: Optional[Sequence[Tensor]], in_batch: bool
) -> Tensor:
    """``[N]`` ``|P(a)|``, the number of positives of each anchor.

    Anchors with ``labels`` are counted against keys with ``key_labels`` (a sequence of parts;
    negative ids never match) and, when ``in_batch``, the other anchors.
    """
    positives = torch.zeros(labels.numel(), dtype=torch.long, device=labels.device)
    if in_batch:
        positives += _matches(labels, labels) - 1  # minus the anchor itself
    for part in key_labels or ():
        positives += _matches(labels, part.to(labels.device))  # invalid (< 0) never match
    return positives


def contrast_stats(
    sample,
    key_labels: Optional[Sequence[Tensor]],
    in_batch: bool,
    loss: Tensor,
    memory=None,
) -> dict[str, Tensor]:
    r"""Statistics of one call of a contrastive loss, as detached tensors.

    With anchor labels :math:`y_a` (:math:`a = 1..N`) and the valid keys' labels :math:`c_j`,
    :math:`|P(a)| = \#\{j : c_j = y_a\}`, plus :math:`\#\{b \ne a : y_b = y_a\}` in-batch.

    Nothing here reads a value back to the host: counts the sampler already knows as Python ints
    become CPU tensors, the others stay on the labels' device. Call ``.item()`` (one
    synchronisation each) only when logging.

    Args:
        sample: the :class:`~pixcontrast.samplers.AnchorSample` of the call.
        key_labels: the labels of the keys besides the anchors (a sequence of ``[M_i]``; negative
            ids are invalid keys), or ``None``.
        in_batch: whether the anchors were keys of each other.
        loss: the value the loss returned.
        memory: the :class:`~pixcontrast.ClassMemoryBank` of the loss, or ``None``.

    Returns:
        A dict of 0-dim tensors: ``loss``; ``anchors``, ``hard_anchors``, ``easy_anchors``
        (CPU); ``classes`` (distinct anchor classes); ``anchors_with_positives``;
        ``mean_positives`` (mean :math:`|P(a)|` over the anchors, 0 without anchors); and with a
        memory ``memory_fill`` (filled fraction of all slots) and the ``[C]`` tensor
        ``memory_fill_per_class`` (filled pixel + region slots of each class, after this call's
        enqueue).

    Example:
        >>> import torch, pixcontrast
        >>> criterion = pixcontrast.PixelContrastLoss(max_samples=32, max_views=4)
        >>> loss = criterion(torch.randn(2, 8, 6, 6), torch.randint(0, 3, (2, 6, 6)))
        >>> stats = criterion.last_stats
        >>> int(stats["anchors"]) == int(stats["hard_anchors"]) + int(stats["easy_anchors"])
        True
    """
    labels = sample.labels
    count = labels.numel()
    positives = positive_counts(labels, key_labels, in_batch)
    ordered = labels.sort().values
    classes = (ordered[1:] != ordered[:-1]).sum() + int(count > 0)
    stats = {
        "loss": loss.detach().clone(),
        "anchors": torch.tensor(count),
        "hard_anchors": torch.tensor(int(sample.num_hard)),
        "easy_anchors": torch.tensor(int(sample.num_easy)),
        "classes": classes,
        "anchors_with_positives": (positives > 0).sum(),
        "mean_positives": positives.double().sum() / max(count, 1),
    }
    if memory is not None:
        per_class = memory.pixel_count + memory.region_count
        stats["memory_fill_per_class"] = per_class.clone()
        slots = memory.num_classes * (memory.pixels_per_class + memory.regions_per_class)
        stats["memory_fill"] = per_class.sum().double() / slots
    return stats


@dataclass(frozen=True)
class GradientRatio:
    r"""Gradients of two losses at one tensor (0-dim detached tensors).

    Attributes:
        contrast_norm: :math:`\lVert g_c \rVert_2`, the contrast loss's gradient norm.
        other_norm: :math:`\lVert g_o \rVert_2`, the other loss's gradient norm.
        ratio: ``contrast_norm / other_norm`` (``inf`` when only the other is 0, NaN when both
            are).
        cosine: :math:`g_c \cdot g_o / (\lVert g_c \rVert \lVert g_o \rVert)`, 0 when either
            gradient is 0.
    """

    contrast_norm: Tensor
    other_norm: Tensor
    ratio: Tensor
    cosine: Tensor

    def as_dict(self, prefix: str = "") -> dict[str, Tensor]:
        """The four numbers under ``prefix + name``, e.g. for ``LightningModule.log_dict``."""
        return {prefix + name: getattr(self, name)
                for name in ("contrast_norm", "other_norm", "ratio", "cosine")}


def gradient_ratio(contrast_loss: Tensor, other_loss: Tensor, tensor: Tensor) -> GradientRatio:
    r"""How large the contrast term's gradient is next to another loss's, at ``tensor``.

    With :math:`g_c = \partial L_c / \partial t` and :math:`g_o = \partial L_o / \partial t` at
    the tensor :math:`t` (e.g. the backbone features that feed both the classifier and the
    projection head), returns :math:`\lVert g_c \rVert`, :math:`\lVert g_o \rVert`, their ratio
    and cosine. Pass the *weighted* term (``weight * contrast``) to see what the optimiser sees:
    a ratio well above 1 with a cosine near 0 says the term dominates the update in directions the
    other loss does not ask for.

    Two :func:`torch.autograd.grad` calls with ``retain_graph=True``: the graph stays usable for
    the ``backward()`` that follows, and each call only runs the part of the graph between the
    loss and ``tensor`` (the heads, not the backbone). Log it every k steps, not every step.

    Args:
        contrast_loss: scalar.
        other_loss: scalar (e.g. the cross-entropy).
        tensor: a tensor both losses may depend on, part of their graph (a loss that does not
            depend on it has gradient 0 there).

    Returns:
        :class:`~pixcontrast.diagnostics.GradientRatio`.

    Example:
        >>> import torch
        >>> t = torch.randn(3, requires_grad=True)
        >>> r = gradient_ratio((2 * t).sum(), t.sum(), t)
        >>> round(float(r.ratio), 4), round(float(r.cosine), 4)
        (2.0, 1.0)
    """
    for name, value in (("contrast_loss", contrast_loss), ("other_loss", other_loss)):
        _checks.check_tensor(value, name)
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
    _checks.check_tensor(tensor, "tensor")
    if not tensor.requires_grad:
        raise ValueError("tensor must require grad (be part of the losses' graph)")
    grads = []
    for loss in (contrast_loss, other_loss):
        if not loss.requires_grad:
            grads.append(torch.zeros_like(tensor))
            continue
        (grad,) = torch.autograd.grad(loss, tensor, retain_graph=True, allow_unused=True)
        grads.append(torch.zeros_like(tensor) if grad is None else grad)
    contrast, other = (g.detach().reshape(-1).double() for g in grads)
    contrast_norm, other_norm = contrast.norm(), other.norm()
    product = contrast_norm * other_norm
    cosine = torch.where(product > 0, contrast.dot(other) / product, torch.zeros_like(product))
    return GradientRatio(contrast_norm, other_norm, contrast_norm / other_norm, cosine)
