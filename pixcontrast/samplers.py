"""Anchor samplers: which pixels of a batch become anchors of the contrastive loss.

Samplers work on label maps at the embedding resolution, select pixels without gradient, then
gather the selected embeddings (with gradient). All of them are configurations of one vectorised
selection, :func:`select_anchors`: per image and per ground-truth class, a quota of random pixels,
split between "hard" and "easy" pixels.

A sampler has ``sample_maps(embeddings, maps, ignore_index, generator) -> AnchorSample`` (typed as
:class:`AnchorSampler`), which the losses call on the maps they validated; the samplers here are
also callable on a raw batch::

    sampler(embeddings, labels, predictions=None, ignore_index=255, generator=None, *, logits=None)
        -> AnchorSample

with ``embeddings [B, D, h, w]``, ``labels [B, h, w]`` (class ids at the embedding resolution),
``predictions`` a predicted label map ``[B, h', w']`` and ``logits`` the classifier's scores
``[B, C, h', w']`` (both nearest-resized to ``(h, w)``; either may be ``None``).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import NamedTuple, Optional, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks
from ._compile import eager_under_compile
from ._pixels import PixelMaps, _true_positions, gather_pixels, pixel_maps

__all__ = [
    "DEFAULT_NUM_CLASSES",
    "AnchorSample",
    "AnchorSampler",
    "ConfidenceAnchorSampler",
    "HardAnchorSampler",
    "PixelMaps",
    "RandomAnchorSampler",
    "anchor_quotas",
    "pixel_maps",
    "select_anchors",
]

DEFAULT_NUM_CLASSES = 1024
"""Class ids a sampler accepts when it is told neither ``num_classes`` nor logits: ``[0, 1024)``
(label 255 then raises unless it is ``ignore_index``). Selection keeps about
``18 * num_classes`` counters per image, so a tight ``num_classes`` is also faster."""

_LEVELS = 8  # random levels of a pixel in select_anchors
_FIRST_EXPONENT = 127  # float32 exponent field of 1.0, select_anchors's level 0


@dataclass
class AnchorSample:
    """Anchors drawn from a batch of pixel embeddings.

    When nothing can be sampled (no labelled pixel, no class with enough pixels, a quota of
    zero) every tensor is empty (``embeddings`` is ``[0, D]`` and still connected to the input's
    graph) and both counts are 0; :func:`~pixcontrast.contrastive_loss` turns such a sample into
    an exact zero.

    Attributes:
        embeddings: ``[N, D]`` anchor embeddings (connected to the input's graph).
        labels: ``[N]`` class ids (int64).
        indices: ``[N]`` flat pixel indices into ``B * h * w`` (``b * h * w + y * w + x``),
            increasing.
        num_hard: anchors counted as hard by the sampler (prediction != label for
            :class:`HardAnchorSampler`, low confidence for :class:`ConfidenceAnchorSampler`).
        num_easy: the other anchors.
    """

    embeddings: Tensor
    labels: Tensor
    indices: Tensor
    num_hard: int
    num_easy: int


@runtime_checkable
class AnchorSampler(Protocol):
    """What :class:`~pixcontrast.PixelContrastLoss` takes as its ``sampler``.

    An object with :meth:`sample_maps`, which the loss calls with the batch it has validated
    (the three samplers here satisfy it, and are also callable on a raw batch, see the module
    docstring).

    Example:
        >>> isinstance(HardAnchorSampler(), AnchorSampler)
        True
    """

    def sample_maps(self, embeddings: Tensor, maps: PixelMaps, ignore_index: int,
                    generator: Optional[torch.Generator]) -> AnchorSample:
        """Anchors of a batch whose maps are validated.

        Args:
            embeddings: ``[B, D, h, w]``.
            maps: the batch's :class:`PixelMaps` at ``(h, w)``, as :func:`pixel_maps` returns
                them: labels, and the predicted label map and logits when given.
            ignore_index: label of pixels never sampled.
            generator: random source, for reproducible sampling.

        Returns:
            The :class:`AnchorSample`.
        """
        ...


class _MapSampler(abc.ABC):
    """The common base of the samplers of this module: :meth:`sample_maps` on validated maps.

    Calling one validates a raw batch first (the signature of the module docstring).
    """

    def __call__(self, embeddings: Tensor, labels: Tensor, predictions: Optional[Tensor] = None,
                 ignore_index: int = 255, generator: Optional[torch.Generator] = None, *,
                 logits: Optional[Tensor] = None) -> AnchorSample:
        """Sample anchors of a raw batch (see the module docstring for the arguments).

        Raises:
            TypeError, ValueError: invalid maps (see :func:`select_anchors`).
        """
        _checks.check_pixel_maps(embeddings, labels)
        maps = pixel_maps(embeddings, labels, predictions, logits, ignore_index=ignore_index)
        return self.sample_maps(embeddings, maps, ignore_index, generator)

    @abc.abstractmethod
    def sample_maps(self, embeddings: Tensor, maps: PixelMaps, ignore_index: int,
                    generator: Optional[torch.Generator]) -> AnchorSample:
        """Sample anchors of a batch whose ``maps`` are validated and at its resolution."""


class _SlotTable(NamedTuple):
    """The random-level histogram of :func:`select_anchors`.

    A slot is one (image, label column, state) triple, ``state = hard + 2 * (not eligible)``;
    label columns run over the values ``low..high`` (``ignored`` is the column of ignored
    pixels). ``bins`` holds each pixel's histogram bin ``(1 + level) * slots + slot`` and
    ``below [_LEVELS + 1, B, span, states]`` each slot's pixels below each level (row 0: none;
    the last row: all of them).
    """

    bins: Tensor
    below: Tensor
    low: int
    high: int
    ignored: int
    states: int

    @property
    def slots(self) -> int:
        """The number of slots, ``B * span * states``."""
        return self.below[0].numel()


def _level_histogram(
    labels: Tensor,
    hard: Optional[Tensor],
    eligible: Optional[Tensor],
    ignore_index: int,
    width: int,
    generator: Optional[torch.Generator],
) -> _SlotTable:
    """Every pixel's random level and slot, and one histogram over (level, slot)."""
    b, h, w = labels.shape
    n = b * h * w
    device = labels.device
    flat = labels.reshape(b, h * w).long()  # (room for the clamp bounds below)
    # a table column per label value in [low, high]; other values are clamped onto low or
    # high, which are neither class ids nor ignore_index (so they count as bad below)
    low, high = min(-1, ignore_index - 1), max(width, ignore_index + 1)
    ignored = ignore_index  # the label of ignored pixels in `flat`
    if high - low > width + 1024:  # a far-away ignore_index: relabel to the next column
        flat = flat.clamp(-1, width).masked_fill_(flat == ignore_index, width + 1)
        ignored, low, high = width + 1, -1, width + 1
    span = high - low + 1
    states = 2 if eligible is None else 4
    slots = b * span * states
    fits_int32 = (_FIRST_EXPONENT + _LEVELS) * slots <= torch.iinfo(torch.int32).max
    index_dtype = torch.int32 if fits_int32 else torch.int64

    # a random level per pixel, from one random byte with its lowest bit set: the byte's
    # float exponent is _FIRST_EXPONENT + level, P(level <= j) = 2^(j + 1) / 256
    random_device = generator.device if generator is not None else device
    words = torch.empty((n + 7) // 8, dtype=torch.int64, device=random_device)
    words.random_(-(2**63), None, generator=generator).bitwise_or_(0x0101010101010101)
    bins = words.to(device).view(torch.uint8)[:n].float().view(torch.int32)
    bins = bins.bitwise_right_shift_(23).to(index_dtype).view(b, h * w)
    # histogram bin of a pixel: (1 + level) * slots + slot, built in place (fresh memory
    # for every temporary costs page faults that show in the sampler's time)
    image_start = torch.arange(b, dtype=index_dtype, device=device).view(b, 1)
    image_start.mul_(span * states).sub_(low * states + (_FIRST_EXPONENT - 1) * slots)
    bins.mul_(slots).add_(image_start).add_(flat.clamp(low, high).to(index_dtype), alpha=states)
    if hard is not None:
        bins.add_(hard.reshape(b, h * w))
    if eligible is not None:
        bins.add_(~eligible.reshape(b, h * w), alpha=2)
    bins = bins.view(-1)
    histogram = torch.zeros((_LEVELS + 1) * slots, dtype=torch.int32, device=device)
    histogram.index_add_(0, bins, histogram.new_ones(1).expand(n))
    below = histogram.view(_LEVELS + 1, b, span, states).cumsum_(dim=0)
    return _SlotTable(bins, below, low, high, ignored, states)


def _class_counts(table: _SlotTable, ignore_index: int, width: int) -> tuple[Tensor, Tensor]:
    """``(counted [B, width, 2], bad)``: eligible pixels per image and class, and bad labels.

    ``counted`` holds the eligible ``[easy, hard]`` pixels per image and class, ``bad`` the
    number of pixels whose label is neither a class id nor ``ignore_index``.
    """
    members = table.below[-1]
    classes = slice(-table.low, width - table.low)  # the columns of class ids
    per_column = members.sum(dim=(0, 2))
    per_column[classes] = 0
    per_column[table.ignored - table.low] = 0
    counted = members[:, classes, :2]
    if 0 <= table.ignored < width:
        counted = counted.clone()
        counted[:, table.ignored] = 0
    return counted, per_column.sum()


def anchor_quotas(
    counted: Tensor,
    min_pixels: int,
    max_samples: Optional[int],
    max_views: int,
    hard_fraction: float,
) -> Tensor:
    """How many easy and hard anchors every (image, class) pair gives.

    The rule is that of :func:`select_anchors`. A pair qualifies with at least ``min_pixels``
    pixels; with ``pairs`` the qualifying pairs, ``n_view = min(max_samples // pairs,
    max_views)`` (``max_views`` without ``max_samples``), ``q_hard = floor(hard_fraction *
    n_view)``, ``q_easy = n_view - q_hard``, and a pair takes ``min(n_easy, q_easy + max(0,
    q_hard - n_hard))`` easy and ``min(n_hard, q_hard + max(0, q_easy - n_easy))`` hard pixels.
    A pure function of its arguments (validated by :func:`select_anchors`), with no host
    synchronisation.

    Args:
        counted: ``[B, C, 2]`` integer counts of the pairs' eligible ``[easy, hard]`` pixels.
        min_pixels: fewest pixels a pair needs to qualify.
        max_samples: anchor budget shared by the qualifying pairs; ``None``: no budget.
        max_views: most anchors per pair.
        hard_fraction: the share of hard anchors in a pair's quota, in ``[0, 1]``.

    Returns:
        ``[B, C, 2]`` int64: the ``[easy, hard]`` anchors each pair gives (0 where it does not
        qualify).

    Example:
        >>> anchor_quotas(torch.tensor([[[5, 1], [0, 0], [1, 2]]]), 1, 8, 3, 0.5).tolist()
        [[[2, 1], [0, 0], [1, 2]]]
    """
    qualifies = counted.sum(dim=2) >= min_pixels
    if max_samples is None:
        n_view = torch.tensor(max_views, device=counted.device)
    else:
        n_view = (max_samples // qualifies.sum().clamp(min=1)).clamp(max=max_views)
    quota_hard = torch.floor(n_view.double() * hard_fraction).long()
    quota = torch.stack([n_view - quota_hard, quota_hard])
    short = (quota - counted).clamp(min=0)
    return torch.minimum(counted, quota + short.flip(2)) * qualifies.unsqueeze(2)


def _candidate_bins(below: Tensor, take: Tensor) -> tuple[Tensor, Tensor]:
    """Which histogram bins hold candidates, and how many candidates each slot has.

    Returns ``(is_candidate_bin, candidates)``. A slot's candidates are its pixels at the lowest
    levels, up to the first level that brings their number to its ``take``.
    """
    levels, b, span, states = below.shape
    is_candidate_bin = torch.zeros(levels * b * span * states, dtype=torch.bool,
                                   device=below.device)
    chosen_levels = is_candidate_bin[b * span * states:].view(levels - 1, b, span, states)
    torch.lt(below[:-1], take, out=chosen_levels)
    candidates = below.gather(0, chosen_levels.sum(dim=0, keepdim=True)).view(-1)
    return is_candidate_bin, candidates


def _draw_candidates(
    table: _SlotTable,
    is_candidate_bin: Tensor,
    candidates: Tensor,
    take: Tensor,
    num_candidates: int,
    num_anchors: int,
    generator: Optional[torch.Generator],
) -> Tensor:
    """The increasing flat indices of the anchors.

    Each slot's ``take`` candidates of smallest fresh uniform key.
    """
    device = table.bins.device
    chosen = _true_positions(is_candidate_bin.index_select(0, table.bins), num_candidates)
    chosen_slot = table.bins.index_select(0, chosen).long() % table.slots
    # order the candidates by slot, at random within a slot; keep a slot's first `take`
    random_device = generator.device if generator is not None else device
    key = torch.rand(num_candidates, dtype=torch.float64, generator=generator,
                     device=random_device).to(device)
    order = torch.argsort(chosen_slot + key)
    position = torch.empty_like(order).scatter_(
        0, order, torch.arange(num_candidates, device=device)
    )
    end = candidates.cumsum(0) - candidates + take.view(-1)  # a slot's first rank not kept
    keep = position < end[chosen_slot]
    return chosen[_true_positions(keep, num_anchors)]


def select_anchors(
    embeddings: Tensor,
    labels: Tensor,
    *,
    hard: Optional[Tensor] = None,
    eligible: Optional[Tensor] = None,
    max_samples: Optional[int] = 1024,
    max_views: int = 100,
    min_pixels: int = 1,
    hard_fraction: float = 0.5,
    ignore_index: int = 255,
    num_classes: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> AnchorSample:
    r"""Vectorised per-image, per-class anchor selection with a hard/easy split.

    For every (image, class) pair with at least ``min_pixels`` eligible pixels (labelled, not
    ``ignore_index``, and ``eligible``), with ``pairs`` the number of such pairs in the batch:

    - ``n_view = min(max_samples // pairs, max_views)`` (``max_views`` when ``max_samples`` is
      ``None``);
    - quotas ``q_hard = floor(hard_fraction * n_view)`` and ``q_easy = n_view - q_hard``;
    - ``min(n_hard, q_hard + max(0, q_easy - n_easy))`` hard pixels and
      ``min(n_easy, q_easy + max(0, q_hard - n_hard))`` easy pixels, drawn uniformly without
      replacement: a group that is short is topped up from the other one, and a pair with fewer
      than ``n_view`` pixels gives all of them.

    It never loops over images or classes and synchronises with the host once (to learn how
    many anchors there are); under ``torch.compile`` it runs eagerly, between graphs. Every
    pixel gets a random level ``j`` in ``0..7`` with ``P(level <= j) = 2^(j + 1) / 256``
    (from one random byte), and one histogram over (level,
    image, label value, hard) gives both the size of every hard or easy group and, per group,
    the fewest lowest levels that together hold the ``take`` pixels it gives. The pixels at those
    levels are its candidates (typically ``take`` to ``2 * take`` of them, and about
    ``size / 128`` at least), and the draw is the ``take`` candidates of smallest fresh uniform
    key: a uniform draw, since given the level counts the candidates are a uniform subset of the
    group. The histogram has ``9 * B * 2`` counters (``* 4`` with ``eligible``) per label value
    from ``min(-1, ignore_index)`` to ``max(num_classes, ignore_index)`` (``num_classes + 2``
    values when ``ignore_index`` lies more than 1024 outside them).

    Args:
        embeddings: ``[B, D, h, w]`` pixel embeddings.
        labels: ``[B, h, w]`` class ids in ``[0, num_classes)`` or ``ignore_index``.
        hard: ``[B, h, w]`` bool, the pixels counted as hard; ``None``: every pixel is easy.
        eligible: ``[B, h, w]`` bool, the pixels that may be drawn at all; ``None``: all.
        max_samples: anchor budget of the batch, shared by its pairs; ``None``: no budget.
        max_views: most anchors per pair.
        min_pixels: fewest eligible pixels a pair needs to be sampled.
        hard_fraction: the share of hard anchors in a pair's quota, in ``[0, 1]``.
        ignore_index: label of pixels never sampled.
        num_classes: class ids lie in ``[0, num_classes)``; ``None``: ``DEFAULT_NUM_CLASSES``,
            and a label 255 that is not ``ignore_index`` raises (it marks unlabelled pixels
            in most datasets: pass ``ignore_index=255``, or ``num_classes`` if it is a class).
        generator: random source (on any device), for reproducible sampling.

    Returns:
        An :class:`AnchorSample`; its tensors are empty when nothing qualifies.

    Raises:
        TypeError: non-tensor or float ``embeddings``/``labels``, a ``hard`` or ``eligible``
            mask that is not bool, a non-integer count or ``ignore_index``, a non-number
            ``hard_fraction``.
        ValueError: mismatched shapes or devices, counts below 1, ``hard_fraction`` outside
            ``[0, 1]`` (or NaN), and a label outside ``[0, num_classes)`` other than
            ``ignore_index``, or 255 without ``num_classes`` (found at the one
            synchronisation, so after the selection work).

    Example:
        >>> labels = torch.tensor([[[0, 0, 1, 255]]])
        >>> sample = select_anchors(torch.randn(1, 4, 1, 4), labels, max_samples=4, max_views=2)
        >>> sample.labels.tolist(), sample.num_easy
        ([0, 0, 1], 3)
    """
    _checks.check_pixel_maps(embeddings, labels)
    if hard is not None:
        _checks.check_mask(hard, "hard", labels.shape, "labels")
    if eligible is not None:
        _checks.check_mask(eligible, "eligible", labels.shape, "labels")
    _checks.check_same_device(
        [("embeddings", embeddings), ("labels", labels), ("hard", hard), ("eligible", eligible)]
    )
    if max_samples is not None:
        max_samples = _checks.check_count(max_samples, "max_samples")
    max_views = _checks.check_count(max_views, "max_views")
    min_pixels = _checks.check_count(min_pixels, "min_pixels")
    hard_fraction = _checks.check_fraction(hard_fraction, "hard_fraction")
    ignore_index = _checks.check_ignore_index(ignore_index)
    if num_classes is not None:
        num_classes = _checks.check_count(num_classes, "num_classes")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return _select_anchors(
        embeddings, labels, hard, eligible, max_samples, max_views, min_pixels, hard_fraction,
        ignore_index, num_classes, generator,
    )


# The selection needs one host synchronisation (the anchor count) and draws tensors of that
# data-dependent size, which fake-tensor tracing cannot: under torch.compile it runs eagerly, with
# a graph break before and after it.
@eager_under_compile
def _select_anchors(
    embeddings: Tensor,
    labels: Tensor,
    hard: Optional[Tensor],
    eligible: Optional[Tensor],
    max_samples: Optional[int],
    max_views: int,
    min_pixels: int,
    hard_fraction: float,
    ignore_index: int,
    num_classes: Optional[int],
    generator: Optional[torch.Generator],
) -> AnchorSample:
    """:func:`select_anchors` of validated arguments (the samplers' maps and options)."""
    width = DEFAULT_NUM_CLASSES if num_classes is None else num_classes
    with torch.no_grad():
        table = _level_histogram(labels, hard, eligible, ignore_index, width, generator)
        counted, num_bad = _class_counts(table, ignore_index, width)
        take = anchor_quotas(counted, min_pixels, max_samples, max_views, hard_fraction)
        num_easy_hard = take.sum(dim=(0, 1))
        anchors_per_image = take.sum(dim=(1, 2))
        # per slot [b, span, states]: nothing from other columns or ineligible pixels
        take = F.pad(take.int(), (0, table.states - 2, -table.low, table.high - width + 1))
        is_candidate_bin, candidates = _candidate_bins(table.below, take)
        # Without num_classes, label 255 (the usual ignore label) under another ignore_index
        # is far more often a mistaken ignore_index than class 255: counted, and refused below.
        stray_ignore = (
            table.below[-1][:, 255 - table.low].sum().view(1)
            if num_classes is None and ignore_index != 255
            else num_bad.new_zeros(1)
        )
        stats = torch.cat([
            candidates.sum().view(1), num_easy_hard, num_bad.view(1), stray_ignore.to(num_bad),
            anchors_per_image,
        ])
        # the one synchronisation
        num_candidates, num_easy, num_hard, bad_pixels, stray, *per_image = stats.tolist()
        if bad_pixels:
            original = labels.reshape(-1).long()
            bad = ((original < 0) | (original >= width)) & (original != ignore_index)
            bound = (
                f"num_classes={num_classes}" if num_classes is not None else
                f"DEFAULT_NUM_CLASSES={width}, the bound when num_classes is not given"
            )
            raise _checks.label_range_error(original, bad, width, ignore_index, bound=bound)
        if stray:
            raise ValueError(
                f"labels hold 255 at {stray} pixels, the usual label of unlabelled pixels, but "
                f"ignore_index={ignore_index} and no num_classes says that 255 is a class: pass "
                "ignore_index=255 if these pixels are unlabelled, or num_classes (above 255) if "
                "255 is a class"
            )
        indices = _draw_candidates(
            table, is_candidate_bin, candidates, take, num_candidates, num_easy + num_hard,
            generator,
        )
    return AnchorSample(
        embeddings=gather_pixels(embeddings, indices, per_image),
        labels=labels.reshape(-1)[indices].long(),
        indices=indices,
        num_hard=num_hard,
        num_easy=num_easy,
    )


class HardAnchorSampler(_MapSampler):
    """Segmentation-aware anchors: per image and class, hard (misclassified) and easy pixels.

    Per image and per ground-truth class present (never ``ignore_index``) with at least
    ``min_pixels`` pixels at the embedding resolution, ``n_view = min(max_samples // pairs,
    max_views)`` anchors (``pairs``: the number of such (image, class) pairs in the batch),
    ``hard_fraction`` of them hard (prediction != label) and the rest easy, each group topped
    up from the other when it is short; a class with fewer than ``n_view`` pixels contributes
    all of them. See :func:`select_anchors` for the exact quotas.

    ``min_pixels=max_views + 1`` reproduces the selection rule of the authors' released code
    (only classes with more than ``max_views`` pixels are sampled), without its failure when no
    class qualifies. The default ``min_pixels=1`` also samples small classes.

    Without predictions (and without logits) every pixel counts as easy. Given ``logits`` but
    no ``predictions``, the predicted label map is their argmax.

    Args:
        max_samples: anchor budget of a batch, shared by its (image, class) pairs.
        max_views: most anchors per (image, class) pair.
        min_pixels: fewest pixels of a class in an image for it to be sampled.
        hard_fraction: share of hard anchors per pair, in ``[0, 1]``.
        num_classes: class ids lie in ``[0, num_classes)``; ``None``: the logits' classes
            when the sampler gets logits, else :data:`DEFAULT_NUM_CLASSES`, and then a label
            255 that is not ``ignore_index`` raises (see :func:`select_anchors`). A tight
            value makes sampling faster.

    Example:
        >>> sampler = HardAnchorSampler(max_samples=8, max_views=4)
        >>> labels = torch.tensor([[[0, 0, 0, 0], [1, 1, 1, 1]]])
        >>> predictions = torch.tensor([[[0, 0, 1, 1], [1, 1, 1, 1]]])
        >>> sample = sampler(torch.randn(1, 3, 2, 4), labels, predictions)
        >>> sample.num_hard, sample.num_easy
        (2, 6)
    """

    def __init__(
        self,
        max_samples: int = 1024,
        max_views: int = 100,
        min_pixels: int = 1,
        hard_fraction: float = 0.5,
        num_classes: Optional[int] = None,
    ) -> None:
        self.max_samples = _checks.check_count(max_samples, "max_samples")
        self.max_views = _checks.check_count(max_views, "max_views")
        self.min_pixels = _checks.check_count(min_pixels, "min_pixels")
        self.hard_fraction = _checks.check_fraction(hard_fraction, "hard_fraction")
        if num_classes is not None:
            num_classes = _checks.check_count(num_classes, "num_classes")
        self.num_classes = num_classes

    def sample_maps(self, embeddings: Tensor, maps: PixelMaps, ignore_index: int,
                    generator: Optional[torch.Generator]) -> AnchorSample:
        """Anchors of prepared maps: hard where the predicted labels differ from the labels."""
        labels, predictions = maps.labels, maps.predicted
        hard = None if predictions is None else predictions != labels
        return _select_anchors(
            embeddings, labels, hard, None, self.max_samples, self.max_views, self.min_pixels,
            self.hard_fraction, ignore_index, self._class_bound(maps), generator,
        )

    def _class_bound(self, maps: PixelMaps) -> Optional[int]:
        """``num_classes``, else the bound the maps were checked against (the logits' classes)."""
        return self.num_classes if self.num_classes is not None else maps.num_classes

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(max_samples={self.max_samples}, max_views={self.max_views}, "
            f"min_pixels={self.min_pixels}, hard_fraction={self.hard_fraction}, "
            f"num_classes={self.num_classes})"
        )


class RandomAnchorSampler(HardAnchorSampler):
    """Uniform anchors per image and class, blind to predictions.

    Every (image, class) pair present (never ``ignore_index``) contributes
    ``n_view = min(max_samples // pairs, max_views)`` random pixels, or all of its pixels when it
    has fewer: :class:`HardAnchorSampler` with every pixel counted as easy.

    Args:
        max_samples: anchor budget of a batch, shared by its (image, class) pairs.
        max_views: most anchors per (image, class) pair.
        num_classes: class ids lie in ``[0, num_classes)``; ``None``: the logits' classes
            when the sampler gets logits, else :data:`DEFAULT_NUM_CLASSES`, and then a label
            255 that is not ``ignore_index`` raises (see :func:`select_anchors`).

    Example:
        >>> sampler = RandomAnchorSampler(max_samples=4, max_views=3)
        >>> sample = sampler(torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))
        >>> sample.indices.shape
        torch.Size([4])
    """

    def __init__(
        self, max_samples: int = 1024, max_views: int = 100, num_classes: Optional[int] = None
    ) -> None:
        super().__init__(max_samples, max_views, num_classes=num_classes)

    def sample_maps(self, embeddings: Tensor, maps: PixelMaps, ignore_index: int,
                    generator: Optional[torch.Generator]) -> AnchorSample:
        """Anchors of prepared maps; their predictions and logits are not used."""
        return _select_anchors(
            embeddings, maps.labels, None, None, self.max_samples, self.max_views,
            self.min_pixels, self.hard_fraction, ignore_index, self._class_bound(maps), generator,
        )

    def __repr__(self) -> str:
        return (
            f"RandomAnchorSampler(max_samples={self.max_samples}, max_views={self.max_views}, "
            f"num_classes={self.num_classes})"
        )


def _refuse_probabilities(logits: Tensor) -> None:
    """Raise when ``logits [B, C, h, w]`` are softmax probabilities (``C >= 2``).

    That is: every entry in ``[0, 1]`` and every pixel's sum over the classes 1 (to ``1e-2``,
    far beyond the rounding of a half-precision softmax), which raw logits never are.
    """
    if logits.shape[1] < 2 or not logits.numel():
        return
    scores = logits.detach()
    low, high, off = torch.stack([
        scores.min().float(), scores.max().float(),
        (scores.float().sum(dim=1) - 1).abs().max(),
    ]).tolist()
    if low >= 0 and high <= 1 and off <= 1e-2:
        raise ValueError(
            "logits look like softmax probabilities (every entry in [0, 1], each pixel's sum "
            "over the classes 1): ConfidenceAnchorSampler takes the classifier's raw logits "
            "(for a loss: predictions=logits), before any softmax"
        )


class ConfidenceAnchorSampler(_MapSampler):
    """Hard queries: pixels whose predicted probability of their true class is low (after ReCo).

    Per image and per ground-truth class, up to ``max_views`` random pixels among those with
    ``softmax(logits)[label] < threshold``; all of them count as hard. Classes without such a
    pixel contribute nothing, so a batch the model already gets right gives an empty sample.

    Needs ``logits`` (pass them as ``logits=``; they are nearest-resized to the embedding
    resolution, and their class dimension must cover every label): raw scores, not softmax
    probabilities, whose softmax is nearly uniform and would make every pixel a low-confidence
    one. The first logits a sampler gets are checked (one host read): probabilities raise.

    Args:
        max_views: most anchors per (image, class) pair.
        threshold: confidence below which a pixel may be drawn, in ``[0, 1]``.

    Example:
        >>> sampler = ConfidenceAnchorSampler(max_views=2, threshold=0.9)
        >>> labels = torch.tensor([[[0, 0, 1, 1]]])
        >>> logits = torch.tensor([[[[9.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 9.0, 0.0]]]])
        >>> sampler(torch.randn(1, 3, 1, 4), labels, logits=logits).indices.tolist()
        [1, 3]
    """

    def __init__(self, max_views: int = 100, threshold: float = 0.97) -> None:
        self.max_views = _checks.check_count(max_views, "max_views")
        self.threshold = _checks.check_fraction(threshold, "threshold")
        self._logits_checked = False  # (the first logits are checked not to be probabilities)

    def sample_maps(self, embeddings: Tensor, maps: PixelMaps, ignore_index: int,
                    generator: Optional[torch.Generator]) -> AnchorSample:
        """Anchors of prepared maps, among the pixels of low confidence under ``maps.logits``.

        Raises:
            ValueError: without logits, or when a label is ``>= C``.
        """
        labels, logits = maps.labels, maps.logits
        if logits is None:
            raise ValueError("ConfidenceAnchorSampler needs logits=[B, C, h, w]")
        if not self._logits_checked:
            _refuse_probabilities(logits)
            self._logits_checked = True
        num_classes = logits.shape[1]
        with torch.no_grad():
            valid = labels != ignore_index
            target = torch.where(valid, labels.long(), 0).clamp(0, num_classes - 1)
            log_probs = torch.log_softmax(logits.detach().float(), dim=1)
            confidence = log_probs.gather(1, target.unsqueeze(1)).squeeze(1).exp()
            low_confidence = confidence < self.threshold
        return _select_anchors(
            embeddings, labels, low_confidence, low_confidence, None, self.max_views, 1, 1.0,
            ignore_index, num_classes, generator,
        )

    def __repr__(self) -> str:
        return f"ConfidenceAnchorSampler(max_views={self.max_views}, threshold={self.threshold})"
