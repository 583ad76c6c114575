"""Loss modules: configuration plus one call of :func:`pixcontrast.contrastive_loss`."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks, diagnostics, distributed
from ._dispatch import BACKEND_NAMES
from ._pixels import (
    PixelMaps,
    exclude_labels,
    prepare_pixel_inputs,
    prepare_pixel_maps,
    region_embeddings,
)
from .functional import VARIANTS, contrastive_loss
from .memory import ClassMemoryBank
from .samplers import AnchorSample, AnchorSampler, HardAnchorSampler, _MapSampler

__all__ = ["GATHER_MODES", "PixelContrastLoss", "RegionContrastLoss", "prepare_pixel_inputs"]

GATHER_MODES = ("none", "keys")


def _join(
    parts: list[tuple[Tensor, Tensor]],
) -> tuple[Optional[list[Tensor]], Optional[list[Tensor]]]:
    """``(keys, key_labels)`` of several key sets as ``contrastive_loss``'s sequences of parts
    (so that detached memory keys get no gradient work), ``(None, None)`` for none."""
    if not parts:
        return None, None
    return [keys for keys, _ in parts], [labels for _, labels in parts]


def _rank_keys(keys: Tensor, key_labels: Tensor, own: bool) -> list[tuple[Tensor, Tensor]]:
    """Every rank's ``(keys, key_labels)`` in rank order, this rank's own only when ``own``; the
    keys carry gradients back to the rank that owns them."""
    parts = list(
        zip(distributed.all_gather_with_grad(keys), distributed.all_gather(key_labels))
    )
    if not own:
        del parts[distributed.get_rank()]
    return parts


class PixelContrastLoss(nn.Module):
    r"""Supervised pixel-to-pixel contrastive loss over a batch of segmentation embeddings.

    Labels (and predictions) are nearest-resized to the embeddings' resolution, anchors are
    sampled per image and class by ``sampler``, and :func:`~pixcontrast.contrastive_loss` contrasts
    them with each other (in-batch, across images) and, with a ``memory``, with its pixel and
    region keys too. See that function for the math of the ``"paper"`` and ``"supcon"`` variants.

    With a :class:`~pixcontrast.ClassMemoryBank`, one call does, in this order:

    1. sample the anchors of the batch;
    2. take the memory's keys, which therefore come from previous steps only;
    3. compute the loss of the anchors against themselves and those keys;
    4. enqueue the batch (its embeddings detached, after normalisation) when training: only
       in ``train()`` mode with gradients enabled, never in ``eval()`` mode, under
       ``torch.no_grad()`` or ``torch.inference_mode()`` (validation batches stay out of the
       memory). ``enqueue=False`` at construction leaves enqueueing to the caller
       (``memory.enqueue``), and ``forward(..., enqueue=True/False)`` decides for one call.

    The memory is a submodule: it follows ``.to()`` and is part of ``state_dict()``. When two
    losses share one memory, let only one of them enqueue.

    Under ``DistributedDataParallel`` with ``gather="keys"``, every rank's anchors are also
    contrasted with the anchors of all other ranks, which reach it through
    :func:`~pixcontrast.distributed.all_gather_with_grad` (their gradients flow back to the rank
    that owns them), so each anchor sees the same keys as in one process on the concatenated
    batch. The loss a rank returns is :func:`~pixcontrast.distributed.mean_across_ranks` of its
    anchors' summed losses: the sum times the world size :math:`W` over the number of anchors with
    a positive on all ranks. DDP's averaging of gradients (sum over ranks, divided by :math:`W`)
    then gives the parameter gradients of one process computing the mean over the concatenated
    batch (up to rounding), and the mean over ranks of the returned losses is that loss. (The
    embedding gradients on each rank, before DDP's division, are :math:`W` times the
    single-process ones.) The sampler still runs per rank, so ``max_samples`` is a budget per rank.
    Every rank must call the loss at every step, since it runs collectives; without a process
    group ``gather="keys"`` is ``gather="none"``. The memory bank synchronises its entries
    across ranks on its own (see :class:`~pixcontrast.ClassMemoryBank`).

    Args:
        temperature: :math:`\tau`.
        base_temperature: the loss is scaled by ``temperature / base_temperature`` (``None``: 1).
        variant: ``"paper"`` or ``"supcon"``.
        max_samples: anchor budget per batch (used by the default sampler).
        max_views: most anchors per image and class (used by the default sampler).
        ignore_index: label of unlabelled pixels; they are never anchors.
        normalize: L2-normalise the embeddings over channels first.
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"``; see
            ``contrastive_loss``.
        sampler: an :class:`~pixcontrast.samplers.AnchorSampler`; it gets the predicted
            label map and, when ``predictions`` are logits, the logits. Defaults
            to ``HardAnchorSampler(max_samples, max_views, num_classes=num_classes)``: half of
            each class's anchors mispredicted ("hard") pixels when predictions are given.
        num_classes: when given, labels outside ``[0, num_classes)`` (other than
            ``ignore_index``) raise. Taken from ``memory`` when there is one.
        memory: a :class:`~pixcontrast.ClassMemoryBank` of keys from previous steps, or ``None``.
        use_pixel_memory: contrast with the memory's pixel keys.
        use_region_memory: contrast with the memory's region keys.
        enqueue: enqueue each training batch into ``memory`` after computing the loss (see
            step 4 above).
        gather: ``"none"`` (contrast within this process's batch) or ``"keys"`` (contrast with
            the anchors of every rank of the default process group, see above).
        exclude_classes: classes left out of the contrast only: their pixels are never anchors
            nor keys, they are never enqueued into ``memory``, and memory keys of these classes
            are not used. Unlike ``ignore_index`` ("unlabelled everywhere") the pixels stay
            labelled for the caller's other losses. Use it for a catch-all class (background,
            "stuff" that is merely "not an object"): as anchors and keys its pixels pull every
            such pixel into one cluster opposite all objects, which erases the context near
            object boundaries. Integers in ``[0, num_classes)`` when ``num_classes`` is known.

    Shape:
        - embeddings: ``[B, D, h, w]``
        - labels: ``[B, H, W]`` integer class ids
        - predictions (optional): logits ``[B, C, h', w']`` or a label map ``[B, h', w']``
        - output: scalar

    A batch with no valid pixel, or where no anchor has a positive, gives an exact zero that is
    connected to ``embeddings``. The anchors of the last call are kept, detached, in
    ``last_sample``, and its statistics in ``last_stats`` (see
    :func:`pixcontrast.diagnostics.contrast_stats`): detached tensors, computed without a host
    synchronisation, to ``.item()`` when logging.
    ``generator`` (a CPU ``torch.Generator``) drives both the anchor sampling and the memory's
    pixel choice.

    Example:
        >>> import torch
        >>> criterion = PixelContrastLoss(temperature=0.1, max_samples=64, max_views=8)
        >>> embeddings = torch.randn(2, 16, 8, 8, requires_grad=True)
        >>> labels = torch.randint(0, 3, (2, 32, 32))
        >>> loss = criterion(embeddings, labels)
        >>> loss.backward()

        With a memory of earlier batches:

        >>> from pixcontrast.memory import ClassMemoryBank
        >>> bank = ClassMemoryBank(num_classes=3, dim=16, pixels_per_class=100,
        ...                        regions_per_class=20)
        >>> criterion = PixelContrastLoss(max_samples=64, max_views=8, memory=bank)
        >>> for _ in range(2):
        ...     criterion(embeddings, labels).backward()
        >>> int(bank.region_count.sum())
        12
    """

    def __init__(
        self,
        temperature: float = 0.1,
        base_temperature: Optional[float] = None,
        variant: str = "paper",
        max_samples: int = 1024,
        max_views: int = 100,
        ignore_index: int = 255,
        normalize: bool = True,
        backend: str = "auto",
        sampler: Optional[AnchorSampler] = None,
        num_classes: Optional[int] = None,
        memory: Optional[ClassMemoryBank] = None,
        use_pixel_memory: bool = True,
        use_region_memory: bool = True,
        enqueue: bool = True,
        gather: str = "none",
        exclude_classes: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.temperature = _checks.check_positive(temperature, "temperature")
        if base_temperature is not None:
            _checks.check_positive(base_temperature, "base_temperature")
        self.base_temperature = base_temperature
        self.variant = _checks.check_choice(variant, "variant", VARIANTS)
        self.ignore_index = _checks.check_ignore_index(ignore_index)
        self.normalize = bool(normalize)
        self.backend = _checks.check_choice(backend, "backend", BACKEND_NAMES)
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes <= 0):
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if memory is not None:
            if not isinstance(memory, ClassMemoryBank):
                raise TypeError(
                    f"memory must be a ClassMemoryBank or None, got {type(memory).__name__}"
                )
            if num_classes is not None and num_classes != memory.num_classes:
                raise ValueError(
                    f"num_classes={num_classes} but memory has {memory.num_classes} classes"
                )
            if self.ignore_index != memory.ignore_index:
                raise ValueError(
                    f"ignore_index={self.ignore_index} but memory has "
                    f"ignore_index={memory.ignore_index}"
                )
            num_classes = memory.num_classes
        self.num_classes = num_classes
        if sampler is None:
            sampler = HardAnchorSampler(max_samples, max_views, num_classes=num_classes)
        self.sampler = sampler
        self.memory = memory
        self.use_pixel_memory = bool(use_pixel_memory)
        self.use_region_memory = bool(use_region_memory)
        self.enqueue = bool(enqueue)
        self.gather = _checks.check_choice(gather, "gather", GATHER_MODES)
        self.exclude_classes = _checks.check_exclude_classes(
            exclude_classes, self.ignore_index, num_classes
        )
        self.last_sample: Optional[AnchorSample] = None
        self.last_stats: Optional[dict[str, Tensor]] = None

    def prepare(
        self, embeddings: Tensor, labels: Tensor, predictions: Optional[Tensor] = None
    ) -> tuple[Tensor, Optional[Tensor]]:
        """Validate a batch; ``(labels, predicted labels)`` at the embeddings' resolution."""
        maps = self._prepare(embeddings, labels, predictions)
        return maps.labels, maps.predicted

    def _prepare(
        self, embeddings: Tensor, labels: Tensor, predictions: Optional[Tensor]
    ) -> PixelMaps:
        """Validate a batch once (for the sampler and the memory too): its maps at the
        embeddings' resolution."""
        if self.memory is not None:
            self.memory._check_embeddings(embeddings)
        maps = prepare_pixel_maps(
            embeddings, labels, predictions, self.ignore_index, self.num_classes
        )
        _checks.check_finite(embeddings, "embeddings")
        return dataclasses.replace(
            maps, labels=exclude_labels(maps.labels, self.exclude_classes, self.ignore_index)
        )

    def _memory_keys(self, pixels: bool, regions: bool) -> tuple[Tensor, Tensor]:
        """The memory's keys, those of ``exclude_classes`` marked invalid (label -1)."""
        assert self.memory is not None  # (called only with a memory)
        keys, key_labels = self.memory.keys(pixels, regions)
        return keys, exclude_labels(key_labels, self.exclude_classes, -1)

    def unit(self, embeddings: Tensor) -> Tensor:
        """``embeddings`` L2-normalised over channels when ``normalize`` (rows ``[N, D]`` or maps
        ``[B, D, h, w]``), else unchanged."""
        return F.normalize(embeddings, p=2, dim=1) if self.normalize else embeddings

    def sample(
        self,
        embeddings: Tensor,
        labels: Tensor,
        predictions: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> AnchorSample:
        """The anchors ``forward`` would contrast (after resizing, with normalised embeddings)."""
        maps = self._prepare(embeddings, labels, predictions)
        return self._draw(embeddings, maps, predictions, generator)

    def _draw(
        self,
        embeddings: Tensor,
        maps: PixelMaps,
        predictions: Optional[Tensor],
        generator: Optional[torch.Generator],
    ) -> AnchorSample:
        if isinstance(self.sampler, _MapSampler):
            sample = self.sampler.sample_maps(embeddings, maps, self.ignore_index, generator)
        else:
            logits = None
            if predictions is not None and predictions.dim() == 4:
                logits = predictions.detach()
            sample = self.sampler(
                embeddings, maps.labels, maps.predicted, self.ignore_index, generator,
                logits=logits,
            )
        # Normalising the N sampled rows instead of the whole map gives the same anchors.
        return dataclasses.replace(sample, embeddings=self.unit(sample.embeddings))

    def contrast_keys(
        self, embeddings: Tensor, labels: Tensor, sample: AnchorSample
    ) -> tuple[Optional[list[Tensor]], Optional[list[Tensor]], bool]:
        """``(keys, key_labels, in_batch)`` for the ``sample`` of a prepared batch: besides the
        anchors themselves, the other ranks' anchors (``gather="keys"``) and the memory's keys
        (if any)."""
        parts = []
        if self.gather == "keys":
            parts += _rank_keys(sample.embeddings, sample.labels, own=False)
        if self.memory is not None and (self.use_pixel_memory or self.use_region_memory):
            parts.append(self._memory_keys(self.use_pixel_memory, self.use_region_memory))
        return (*_join(parts), True)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        predictions: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        *,
        enqueue: Optional[bool] = None,
    ) -> Tensor:
        """The loss of a batch (see the class docstring for the steps and shapes).

        Args:
            embeddings: ``[B, D, h, w]``.
            labels: ``[B, H, W]`` integer class ids.
            predictions: logits ``[B, C, h', w']`` or a label map ``[B, h', w']``, or ``None``.
            generator: CPU random source of the anchor (and memory pixel) choice.
            enqueue: enqueue this batch into the memory; ``None`` (default): when the module
                was built with ``enqueue=True``, is in training mode and gradients are enabled
                (so validation under ``eval()``, ``torch.no_grad()`` or
                ``torch.inference_mode()`` leaves the memory as it was).
        """
        maps = self._prepare(embeddings, labels, predictions)
        labels = maps.labels
        sample = self._draw(embeddings, maps, predictions, generator)
        # Detached: holding the graph would keep it alive and make the module impossible to
        # deepcopy (EMA and teacher copies) after a training step.
        self.last_sample = dataclasses.replace(sample, embeddings=sample.embeddings.detach())
        keys, key_labels, in_batch = self.contrast_keys(embeddings, labels, sample)
        loss = contrastive_loss(
            sample.embeddings,
            sample.labels,
            keys,
            key_labels,
            in_batch=in_batch,
            temperature=self.temperature,
            base_temperature=self.base_temperature,
            variant=self.variant,
            reduction="mean" if self.gather == "none" else "sum",
            backend=self.backend,
        )
        if self.gather == "keys":
            # the denominator of contrastive_loss's mean, over all ranks' anchors
            count = (diagnostics.positive_counts(sample.labels, key_labels, in_batch) > 0).sum()
            loss = distributed.mean_across_ranks(loss, count)
        if enqueue is None:
            enqueue = self.enqueue and self.training and torch.is_grad_enabled()
        if self.memory is not None and enqueue:
            self.memory._enqueue_prepared(embeddings, labels, generator, normalize=self.normalize)
        self.last_stats = diagnostics.contrast_stats(sample, key_labels, in_batch, loss,
                                                     self.memory)
        return loss

    def extra_repr(self) -> str:
        text = (
            f"temperature={self.temperature}, base_temperature={self.base_temperature}, "
            f"variant={self.variant!r}, ignore_index={self.ignore_index}, "
            f"backend={self.backend!r}, gather={self.gather!r}"
        )
        if self.exclude_classes:
            text += f", exclude_classes={self.exclude_classes}"
        if self.memory is not None:
            text += (
                f", use_pixel_memory={self.use_pixel_memory}, "
                f"use_region_memory={self.use_region_memory}, enqueue={self.enqueue}"
            )
        return text


class RegionContrastLoss(PixelContrastLoss):
    r"""Pixel-to-region contrastive loss: sampled pixel anchors against region embeddings.

    A region is one class in one image; its embedding is the re-normalised mean of its pixel
    embeddings (:func:`~pixcontrast.memory.region_embeddings`). The keys are the regions of the
    current batch (with gradient: they are differentiated like the anchors) and/or the region
    keys of ``memory`` (previous steps, no gradient). An anchor's positives are the regions of its
    class, its own image's included; anchors are not keys of each other (``in_batch=False``).
    Sampling, resizing, variants and the memory's order (keys taken first, batch enqueued after
    unless ``enqueue=False``) are those of :class:`PixelContrastLoss`. With ``gather="keys"``
    the batch regions of every rank are keys (with gradient to the rank that owns them) and the
    loss is scaled for DDP as in :class:`PixelContrastLoss`.

    Args:
        temperature, base_temperature, variant, max_samples, max_views, ignore_index, normalize,
        backend, sampler, num_classes, enqueue, gather, exclude_classes: as for
        :class:`PixelContrastLoss` (an excluded class has no region key either).
        memory: a :class:`~pixcontrast.ClassMemoryBank` whose region keys are contrasted too.
        use_batch_regions: contrast with the regions of the current batch.

    Shape:
        - embeddings: ``[B, D, h, w]``
        - labels: ``[B, H, W]`` integer class ids
        - output: scalar

    Example:
        >>> import torch
        >>> criterion = RegionContrastLoss(max_samples=64, max_views=8)
        >>> embeddings = torch.randn(2, 16, 8, 8, requires_grad=True)
        >>> labels = torch.randint(0, 3, (2, 32, 32))
        >>> criterion(embeddings, labels).backward()
    """

    def __init__(
        self,
        temperature: float = 0.1,
        base_temperature: Optional[float] = None,
        variant: str = "paper",
        max_samples: int = 1024,
        max_views: int = 100,
        ignore_index: int = 255,
        normalize: bool = True,
        backend: str = "auto",
        sampler: Optional[AnchorSampler] = None,
        num_classes: Optional[int] = None,
        memory: Optional[ClassMemoryBank] = None,
        use_batch_regions: bool = True,
        enqueue: bool = True,
        gather: str = "none",
        exclude_classes: Sequence[int] = (),
    ) -> None:
        if not use_batch_regions and memory is None:
            raise ValueError("use_batch_regions=False needs a memory to take region keys from")
        super().__init__(
            temperature, base_temperature, variant, max_samples, max_views, ignore_index,
            normalize, backend, sampler, num_classes, memory, use_pixel_memory=False,
            use_region_memory=memory is not None, enqueue=enqueue, gather=gather,
            exclude_classes=exclude_classes,
        )
        self.use_batch_regions = bool(use_batch_regions)

    def contrast_keys(
        self, embeddings: Tensor, labels: Tensor, sample: AnchorSample
    ) -> tuple[Optional[list[Tensor]], Optional[list[Tensor]], bool]:
        """``(keys, key_labels, False)``: batch regions first (of every rank in rank order with
        ``gather="keys"``), then the memory's regions."""
        parts = []
        if self.use_batch_regions:
            regions = region_embeddings(
                embeddings, labels, self.ignore_index, normalize_pixels=self.normalize
            )
            parts += _rank_keys(*regions, own=True) if self.gather == "keys" else [regions]
        if self.memory is not None:
            parts.append(self._memory_keys(pixels=False, regions=True))
        return (*_join(parts), False)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", use_batch_regions={self.use_batch_regions}"
