"""Class-wise memory of pixel and region embeddings from earlier batches.

The memory gives every anchor keys from many more images than one batch holds (Wang et al. 2021,
§3.3). It keeps, per class, two first-in first-out rings: pixel embeddings and region embeddings
(the re-normalised mean embedding of one class in one image).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks, distributed
from ._pixels import (
    exclude_labels,
    gather_pixels,
    pixel_maps,
    random_rank_in_group,
    region_means,
)
from ._ring import ForeignWriteGuard, RingLayout, push

__all__ = ["ClassMemoryBank"]


class ClassMemoryBank(nn.Module):
    r"""Per-class FIFO memory of pixel and region embeddings (keys for the contrastive loss).

    Every class :math:`c` owns two rings: ``pixels_per_class`` pixel slots and
    ``regions_per_class`` region slots. :meth:`enqueue` adds, per image of the batch and class
    present in it, up to ``pixels_per_image`` random pixels of that class and the region
    embedding of that class (see :func:`~pixcontrast.functional.region_embeddings`);
    :meth:`keys` returns the filled slots, grouped by class.

    Rules:

    - only filled slots are ever returned: an empty memory has no keys (nothing is initialised
      with random vectors, and no zero block is added);
    - each ring advances its pointer by the number of entries written, and the oldest entry is
      overwritten first;
    - class 0 is a class like any other; ``ignore_index`` is never enqueued, and the pixels
      enqueued for a class are pixels of that class;
    - labels are nearest-resized to the embeddings' resolution with
      :func:`~pixcontrast.functional.resize_labels`, exactly as the losses resize them, whatever the
      ratio of the two resolutions.

    Within one call, entries of a class are written in order of image, then pixel position
    (pixels) or image (regions).

    All state lives in registered buffers, so ``state_dict()`` / ``load_state_dict()`` and
    ``.to(device)`` cover it (``.to(dtype)`` converts the stored embeddings only):

    - ``queue``: ``[C, pixels_per_class + regions_per_class, D]``; slots ``[:, :pixels_per_class]``
      are the pixel rings, the rest the region rings;
    - ``pixel_pointer``, ``pixel_count``, ``region_pointer``, ``region_count``: ``[C]`` next slot
      to write and number of filled slots of each ring.

    The only randomness (which pixels are enqueued) comes from the ``generator`` argument of
    :meth:`enqueue`: restoring the state dict and the generator's state resumes a run exactly.

    Under :mod:`torch.distributed` (a process group of several ranks) and with ``gather=True``,
    :meth:`enqueue` is a collective: each rank selects the entries of its own batch (pixels with
    its own ``generator``, regions), then the selected entries of all ranks are all-gathered and
    written in rank order on every rank. Banks that start identical (fresh, or loaded from one
    checkpoint) therefore stay identical after every step, and hold what one process would hold
    after enqueuing the ranks' batches one after the other, in rank order, each with its rank's
    ``generator``. Every rank must call :meth:`enqueue` at every step, with a batch or an empty
    one. With ``gather=False`` each rank keeps a memory of its own batches.

    Keep the bank out of a module wrapped in ``DistributedDataParallel`` (hold the loss outside
    it) or pass ``broadcast_buffers=False``: DDP's default copies rank 0's buffers to all ranks
    before each forward, resending the whole ``queue`` and, with ``gather=False``, throwing the
    other ranks' entries away. A bank whose state changed behind its back warns once.

    ``state_dict()`` also holds the bank's layout (``num_classes``, ``dim``,
    ``pixels_per_class``, ``regions_per_class``) as ``_extra_state``; ``load_state_dict``
    refuses a state of another layout, counters outside their rings or pointers that disagree
    with them, before it changes anything.

    Every argument but ``num_classes`` and ``dim`` is keyword-only.

    Args:
        num_classes: number of classes ``C``; labels lie in ``[0, C)`` or equal ``ignore_index``.
        dim: embedding dimension ``D``.
        pixels_per_class: slots of each class's pixel ring (``0`` disables pixel memory).
        regions_per_class: slots of each class's region ring (``0`` disables region memory).
        pixels_per_image: most pixels enqueued per image and class.
        ignore_index: label of pixels never enqueued.
        gather: under :mod:`torch.distributed`, enqueue every rank's entries on every rank.
        exclude_classes: classes never enqueued (their rings stay empty), e.g. a catch-all
            background class that the losses leave out too; see
            :class:`~pixcontrast.PixelContrastLoss`.

    Example:
        >>> bank = ClassMemoryBank(num_classes=3, dim=8, pixels_per_class=20, regions_per_class=4)
        >>> x = torch.nn.functional.normalize(torch.randn(2, 8, 4, 4), dim=1)
        >>> y = torch.randint(0, 3, (2, 16, 16))
        >>> bank.enqueue(x, y)
        >>> keys, key_labels = bank.keys()
        >>> keys.shape[1], bool((key_labels[1:] >= key_labels[:-1]).all())
        (8, True)
    """

    queue: Tensor
    pixel_pointer: Tensor
    pixel_count: Tensor
    region_pointer: Tensor
    region_count: Tensor

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        pixels_per_class: int = 5000,
        regions_per_class: int = 5000,
        pixels_per_image: int = 10,
        ignore_index: int = 255,
        gather: bool = True,
        exclude_classes: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self._ring_layout = RingLayout(num_classes, dim, pixels_per_class, regions_per_class)
        _checks.check_count(pixels_per_image, "pixels_per_image")
        ignore_index = _checks.check_ignore_index(ignore_index)
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index={ignore_index} is a valid class id for num_classes={num_classes}"
            )
        self.num_classes = num_classes
        self.dim = dim
        self.pixels_per_class = pixels_per_class
        self.regions_per_class = regions_per_class
        self.pixels_per_image = pixels_per_image
        self.ignore_index = ignore_index
        self.gather = bool(gather)
        self.exclude_classes = _checks.check_exclude_classes(
            exclude_classes, self.ignore_index, num_classes
        )
        for name, buffer in self._ring_layout.new_state().items():
            self.register_buffer(name, buffer)
        self._write_guard = ForeignWriteGuard()
        self._write_guard.record(self)

    def get_extra_state(self) -> Tensor:
        """``[version, num_classes, dim, pixels_per_class, regions_per_class]``, for a load."""
        return self._ring_layout.record()

    def set_extra_state(self, state: Tensor) -> None:
        """Nothing to restore: the layout is fixed at creation (a load checks the record first)."""

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
        error_msgs,
    ) -> None:
        # Everything is checked before anything is copied, so a failed load leaves the bank
        # as it was (torch would copy the valid buffers and report the others at the end).
        self._ring_layout.check_state(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
            error_msgs,
        )
        self._write_guard.record(self)

    @property
    def pixel_queue(self) -> Tensor:
        """``[C, pixels_per_class, D]`` view of the pixel rings (unfilled slots included)."""
        return self.queue[:, : self.pixels_per_class]

    @property
    def region_queue(self) -> Tensor:
        """``[C, regions_per_class, D]`` view of the region rings (unfilled slots included)."""
        return self.queue[:, self.pixels_per_class :]

    def check_embeddings(self, embeddings: Tensor) -> None:
        """Raise unless a ``[B, D, h, w]`` embedding map has ``D = dim`` and the memory's device.

        What a batch must fit besides what :func:`~pixcontrast.samplers.pixel_maps` checks (the
        losses call both, once per batch).
        """
        if embeddings.shape[1] != self.dim:
            raise ValueError(
                f"embeddings has D={embeddings.shape[1]} channels but the memory bank's dim is "
                f"{self.dim}"
            )
        _checks.check_same_device([("the memory bank", self.queue), ("embeddings", embeddings)])

    @torch.no_grad()
    def enqueue(
        self,
        embeddings: Tensor,
        labels: Tensor,
        generator: Optional[torch.Generator] = None,
        *,
        normalize: bool = False,
    ) -> None:
        """Add a batch to the memory (the embeddings are detached; nothing is differentiated).

        Args:
            embeddings: ``[B, dim, h, w]`` pixel embeddings.
            labels: ``[B, H, W]`` class ids, nearest-resized to ``(h, w)``.
            generator: CPU random source of the pixel choice, for reproducible runs.
            normalize: store what ``F.normalize(embeddings, dim=1)`` would give (the chosen
                pixels normalised, regions averaged over normalised pixels) without building
                that map: the losses pass their ``normalize``.

        A batch without any labelled pixel adds nothing (under :mod:`torch.distributed` with
        ``gather=True``, the other ranks' entries are still added).
        """
        labels = pixel_maps(
            embeddings, labels, ignore_index=self.ignore_index, num_classes=self.num_classes
        ).labels
        self.check_embeddings(embeddings)
        _checks.check_finite(embeddings, "embeddings")
        self.enqueue_maps(embeddings, labels, generator, normalize=normalize)

    @torch.no_grad()
    def enqueue_maps(
        self,
        embeddings: Tensor,
        labels: Tensor,
        generator: Optional[torch.Generator] = None,
        *,
        normalize: bool = False,
    ) -> None:
        """:meth:`enqueue` a batch validated already, as the losses do.

        ``embeddings`` are finite and pass :meth:`check_embeddings`; ``labels`` are ``[B, h, w]``
        at their resolution, in ``[0, num_classes)`` or ``ignore_index`` (as
        :func:`~pixcontrast.samplers.pixel_maps` returns them).
        """
        self._write_guard.check(self)
        labels = exclude_labels(labels, self.exclude_classes, self.ignore_index)
        embeddings = embeddings.detach()
        b, _, h, w = embeddings.shape
        flat = labels.reshape(-1).long()
        valid = flat != self.ignore_index
        if self.pixels_per_class:
            image = torch.arange(b, device=flat.device).repeat_interleave(h * w)
            group = image * (self.num_classes + 1) + torch.where(valid, flat, self.num_classes)
            rank = random_rank_in_group(group, generator)
            chosen = (valid & (rank < self.pixels_per_image)).nonzero().squeeze(1)
            pixels = gather_pixels(embeddings, chosen)
            if normalize:
                pixels = F.normalize(pixels, p=2, dim=1)
            self._write(self.pixel_queue, self.pixel_pointer, self.pixel_count, pixels,
                        flat[chosen])
        if self.regions_per_class:
            self._write(self.region_queue, self.region_pointer, self.region_count,
                        *region_means(embeddings, labels, self.ignore_index, normalize))
        self._write_guard.record(self)

    def _write(
        self, ring: Tensor, pointer: Tensor, count: Tensor, values: Tensor, classes: Tensor
    ) -> None:
        """:func:`~pixcontrast._ring.push` this rank's entries, or with ``gather`` every rank's."""
        if self.gather and distributed.get_world_size() > 1:  # (one process: its own entries)
            values = torch.cat(distributed.all_gather(values.to(ring.dtype)))
            classes = torch.cat(distributed.all_gather(classes))
        push(ring, pointer, count, values, classes)

    def keys(self, pixels: bool = True, regions: bool = True) -> tuple[Tensor, Tensor]:
        """The filled slots as keys for :func:`~pixcontrast.contrastive_loss`.

        Args:
            pixels: include the pixel rings.
            regions: include the region rings.

        Returns:
            ``(keys [M, dim], key_labels [M])``, grouped by class in contiguous blocks (class by
            class; within a class, pixel slots then region slots, in slot order). When every
            requested slot is filled and both rings are requested, ``keys`` is a view of
            ``queue`` (no copy): it changes with the next :meth:`enqueue`.
        """
        slots = self.queue.shape[1]
        index = torch.arange(slots, device=self.queue.device)
        is_pixel = index < self.pixels_per_class
        filled = torch.where(
            is_pixel,
            index < self.pixel_count[:, None],
            index - self.pixels_per_class < self.region_count[:, None],
        )
        filled &= (is_pixel & pixels) | (~is_pixel & regions)
        classes = torch.arange(self.num_classes, device=self.queue.device)
        if bool(filled.all()):
            return self.queue.reshape(-1, self.dim), classes.repeat_interleave(slots)
        return self.queue[filled], classes[:, None].expand(-1, slots)[filled]

    def extra_repr(self) -> str:
        """The constructor's arguments, for the module's ``repr`` (``exclude_classes`` if set)."""
        return (
            f"num_classes={self.num_classes}, dim={self.dim}, "
            f"pixels_per_class={self.pixels_per_class}, "
            f"regions_per_class={self.regions_per_class}, "
            f"pixels_per_image={self.pixels_per_image}, ignore_index={self.ignore_index}, "
            f"gather={self.gather}"
            + (f", exclude_classes={self.exclude_classes}" if self.exclude_classes else "")
        )
