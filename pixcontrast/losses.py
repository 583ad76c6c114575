"""Loss modules: configuration plus one call of :func:`pixcontrast.contrastive_loss`."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks
from ._dispatch import BACKEND_NAMES
from .functional import VARIANTS, contrastive_loss, resize_labels
from .memory import ClassMemoryBank, region_embeddings
from .samplers import AnchorSample, HardAnchorSampler

__all__ = ["PixelContrastLoss", "RegionContrastLoss", "prepare_pixel_inputs"]


def prepare_pixel_inputs(
    embeddings: Tensor,
    labels: Tensor,
    predictions: Optional[Tensor],
    ignore_index: int,
    num_classes: Optional[int] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Validate a batch and bring labels and predictions to the embeddings' resolution.

    Args:
        embeddings: ``[B, D, h, w]``.
        labels: ``[B, H, W]`` integer class ids (``ignore_index`` for unlabelled pixels).
        predictions: logits ``[B, C, h', w']`` or a label map ``[B, h', w']``, or ``None``.
        ignore_index: the label of unlabelled pixels.
        num_classes: when known, labels must lie in ``[0, num_classes)`` or be ``ignore_index``.

    Returns:
        ``(labels [B, h, w], predicted labels [B, h, w] or None)``.
    """
    _checks.check_embeddings(embeddings, "embeddings", 4)
    _checks.check_labels(labels, "labels", 3)
    _checks.check_same_device(
        [("embeddings", embeddings), ("labels", labels), ("predictions", predictions)]
    )
    batch, _, h, w = embeddings.shape
    if labels.shape[0] != batch:
        raise ValueError(
            f"labels has batch size {labels.shape[0]} but embeddings has {batch}"
        )
    predicted = None
    if predictions is not None:
        _checks.check_tensor(predictions, "predictions")
        if predictions.dim() == 4:
            if not predictions.is_floating_point():
                raise TypeError("predictions with 4 dimensions must be float logits [B, C, h, w]")
            classes = predictions.shape[1]
            if num_classes is not None and classes != num_classes:
                raise ValueError(
                    f"predictions has {classes} classes but num_classes is {num_classes}"
                )
            num_classes = classes
            predicted = predictions.detach().argmax(dim=1)
        elif predictions.dim() == 3:
            _checks.check_labels(predictions, "predictions", 3)
            predicted = predictions.detach()
        else:
            raise ValueError(
                "predictions must be logits [B, C, h, w] or a label map [B, h, w], "
                f"got shape {tuple(predictions.shape)}"
            )
        if predicted.shape[0] != batch:
            raise ValueError(
                f"predictions has batch size {predicted.shape[0]} but embeddings has {batch}"
            )
        predicted = resize_labels(predicted, (h, w))
    if num_classes is not None and labels.numel():
        valid = labels[labels != ignore_index]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_classes):
            raise ValueError(
                f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}; "
                f"found values in [{int(valid.min())}, {int(valid.max())}]"
            )
    return resize_labels(labels, (h, w)), predicted


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
    4. enqueue the batch (its embeddings detached, after normalisation) unless
       ``enqueue=False``, in which case the caller calls ``memory.enqueue`` when it sees fit.

    The memory is a submodule: it follows ``.to()`` and is part of ``state_dict()``. When two
    losses share one memory, let only one of them enqueue.

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
        sampler: an anchor sampler (see :mod:`pixcontrast.samplers` for the interface); it gets
            the predicted label map and, when ``predictions`` are logits, the logits. Defaults
            to ``HardAnchorSampler(max_samples, max_views, num_classes=num_classes)``: half of
            each class's anchors mispredicted ("hard") pixels when predictions are given.
        num_classes: when given, labels outside ``[0, num_classes)`` (other than
            ``ignore_index``) raise. Taken from ``memory`` when there is one.
        memory: a :class:`~pixcontrast.ClassMemoryBank` of keys from previous steps, or ``None``.
        use_pixel_memory: contrast with the memory's pixel keys.
        use_region_memory: contrast with the memory's region keys.
        enqueue: enqueue each batch into ``memory`` after computing the loss.

    Shape:
        - embeddings: ``[B, D, h, w]``
        - labels: ``[B, H, W]`` integer class ids
        - predictions (optional): logits ``[B, C, h', w']`` or a label map ``[B, h', w']``
        - output: scalar

    A batch with no valid pixel, or where no anchor has a positive, gives an exact zero that is
    connected to ``embeddings``. The anchors of the last call are kept in ``last_sample``.
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
        sampler=None,
        num_classes: Optional[int] = None,
        memory: Optional[ClassMemoryBank] = None,
        use_pixel_memory: bool = True,
        use_region_memory: bool = True,
        enqueue: bool = True,
    ) -> None:
        super().__init__()
        self.temperature = _checks.check_positive(temperature, "temperature")
        if base_temperature is not None:
            _checks.check_positive(base_temperature, "base_temperature")
        self.base_temperature = base_temperature
        self.variant = _checks.check_choice(variant, "variant", VARIANTS)
        self.ignore_index = int(ignore_index)
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
        self.last_sample: Optional[AnchorSample] = None

    def prepare(
        self, embeddings: Tensor, labels: Tensor, predictions: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Validated ``(embeddings, labels, predicted labels)`` at the embeddings' resolution,
        the embeddings normalised when ``normalize`` (still connected to the graph)."""
        labels, predicted = prepare_pixel_inputs(
            embeddings, labels, predictions, self.ignore_index, self.num_classes
        )
        if self.memory is not None:
            self.memory.check_batch(embeddings, labels)
        if self.normalize:
            embeddings = F.normalize(embeddings, p=2, dim=1)
        return embeddings, labels, predicted

    def sample(
        self,
        embeddings: Tensor,
        labels: Tensor,
        predictions: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> AnchorSample:
        """The anchors ``forward`` would contrast (after resizing and normalising)."""
        embeddings, labels, predicted = self.prepare(embeddings, labels, predictions)
        return self._draw(embeddings, labels, predicted, predictions, generator)

    def _draw(
        self,
        embeddings: Tensor,
        labels: Tensor,
        predicted: Optional[Tensor],
        predictions: Optional[Tensor],
        generator: Optional[torch.Generator],
    ) -> AnchorSample:
        logits = None
        if predictions is not None and predictions.dim() == 4:
            logits = predictions.detach()
        return self.sampler(
            embeddings, labels, predicted, self.ignore_index, generator, logits=logits
        )

    def contrast_keys(
        self, embeddings: Tensor, labels: Tensor
    ) -> tuple[Optional[Tensor], Optional[Tensor], bool]:
        """``(keys, key_labels, in_batch)`` for the anchors of a prepared batch: the memory's
        keys (if any) besides the anchors themselves."""
        if self.memory is None or not (self.use_pixel_memory or self.use_region_memory):
            return None, None, True
        keys, key_labels = self.memory.keys(self.use_pixel_memory, self.use_region_memory)
        return keys, key_labels, True

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        predictions: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        embeddings, labels, predicted = self.prepare(embeddings, labels, predictions)
        sample = self._draw(embeddings, labels, predicted, predictions, generator)
        self.last_sample = sample
        keys, key_labels, in_batch = self.contrast_keys(embeddings, labels)
        loss = contrastive_loss(
            sample.embeddings,
            sample.labels,
            keys,
            key_labels,
            in_batch=in_batch,
            temperature=self.temperature,
            base_temperature=self.base_temperature,
            variant=self.variant,
            reduction="mean",
            backend=self.backend,
        )
        if self.memory is not None and self.enqueue:
            self.memory.enqueue(embeddings.detach(), labels, generator)
        return loss

    def extra_repr(self) -> str:
        text = (
            f"temperature={self.temperature}, base_temperature={self.base_temperature}, "
            f"variant={self.variant!r}, ignore_index={self.ignore_index}, "
            f"backend={self.backend!r}"
        )
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
    unless ``enqueue=False``) are those of :class:`PixelContrastLoss`.

    Args:
        temperature, base_temperature, variant, max_samples, max_views, ignore_index, normalize,
        backend, sampler, num_classes, enqueue: as for :class:`PixelContrastLoss`.
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
        sampler=None,
        num_classes: Optional[int] = None,
        memory: Optional[ClassMemoryBank] = None,
        use_batch_regions: bool = True,
        enqueue: bool = True,
    ) -> None:
        if not use_batch_regions and memory is None:
            raise ValueError("use_batch_regions=False needs a memory to take region keys from")
        super().__init__(
            temperature, base_temperature, variant, max_samples, max_views, ignore_index,
            normalize, backend, sampler, num_classes, memory, use_pixel_memory=False,
            use_region_memory=memory is not None, enqueue=enqueue,
        )
        self.use_batch_regions = bool(use_batch_regions)

    def contrast_keys(
        self, embeddings: Tensor, labels: Tensor
    ) -> tuple[Optional[Tensor], Optional[Tensor], bool]:
        """``(keys, key_labels, False)``: batch regions first, then the memory's regions."""
        keys, key_labels = [], []
        if self.use_batch_regions:
            regions, region_labels = region_embeddings(embeddings, labels, self.ignore_index)
            keys.append(regions)
            key_labels.append(region_labels)
        if self.memory is not None:
            stored, stored_labels = self.memory.keys(pixels=False, regions=True)
            keys.append(stored)
            key_labels.append(stored_labels)
        if len(keys) == 1:
            return keys[0], key_labels[0], False
        return torch.cat(keys), torch.cat(key_labels), False

    def extra_repr(self) -> str:
        return super().extra_repr() + f", use_batch_regions={self.use_batch_regions}"
