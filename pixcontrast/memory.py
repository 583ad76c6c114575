"""Class-wise memory of pixel and region embeddings from earlier batches.

The memory gives every anchor keys from many more images than one batch holds (Wang et al. 2021,
§3.3). It keeps, per class, two first-in first-out rings: pixel embeddings and region embeddings
(the re-normalised mean embedding of one class in one image).
"""

from __future__ import annotations

import warnings
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
    region_embeddings,
)

__all__ = ["ClassMemoryBank", "region_embeddings"]


_STATE_VERSION = 1  # of the layout record in state_dict()
_COUNTERS = ("pixel_pointer", "pixel_count", "region_pointer", "region_count")


def _push(ring: Tensor, pointer: Tensor, count: Tensor, values: Tensor, classes: Tensor) -> None:
    """Write ``values`` (in order) into the per-class rings ``ring [C, S, D]`` in place.

    The ``i``-th value of a class goes to slot ``(pointer[c] + i) % S``, so the oldest entry is
    overwritten first; when one call brings more than ``S`` values of a class, only its newest
    ``S`` are written (each slot is written once, so the result does not depend on the order of
    scattered writes).
    """
    num_classes, slots = ring.shape[:2]
    if slots == 0 or classes.numel() == 0:
        return
    sorted_classes, order = torch.sort(classes, stable=True)
    arrivals = torch.bincount(classes, minlength=num_classes)
    first = arrivals.cumsum(0) - arrivals
    position = torch.arange(classes.numel(), device=classes.device) - first[sorted_classes]
    keep = position >= arrivals[sorted_classes] - slots
    slot = (pointer[sorted_classes] + position) % slots
    ring[sorted_classes[keep], slot[keep]] = values[order[keep]].to(ring.dtype)
    pointer.copy_((pointer + arrivals) % slots)
    count.copy_(torch.clamp(count + arrivals, max=slots))


class ClassMemoryBank(nn.Module):
    r"""Per-class FIFO memory of pixel and region embeddings (keys for the contrastive loss).

    Every class :math:`c` owns two rings: ``pixels_per_class`` pixel slots and
    ``regions_per_class`` region slots. :meth:`enqueue` adds, per image of the batch and class
    present in it, up to ``pixels_per_image`` random pixels of that class and the region
    embedding of that class (see :func:`region_embeddings`); :meth:`keys` returns the filled
    slots, grouped by class.

    Rules:

    - only filled slots are ever returned: an empty memory has no keys (nothing is initialised
      with random vectors, and no zero block is added);
    - each ring advances its pointer by the number of entries written, and the oldest entry is
      overwritten first;
    - class 0 is a class like any other; ``ignore_index`` is never enqueued, and the pixels
      enqueued for a class are pixels of that class;
    - labels are nearest-resized to the embeddings' resolution with
      :func:`~pixcontrast.resize_labels`, exactly as the losses resize them, whatever the
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

    ``DistributedDataParallel(broadcast_buffers=True)`` (its default) copies rank 0's buffers to
    all ranks before each forward of the wrapped module. For a gathered bank that copy changes
    nothing, since the banks are already identical, but it sends the whole ``queue`` at every
    step; for a bank with ``gather=False`` it throws the other ranks' entries away. Keep the bank
    out of the wrapped module (hold the loss outside it, as usual) or pass
    ``broadcast_buffers=False``. A bank whose state changes between its own writes (the
    counters or the newest entries differ from what it last wrote) warns once, naming this
    recipe.

    ``state_dict()`` also holds the bank's layout (``num_classes``, ``dim``,
    ``pixels_per_class``, ``regions_per_class``) as ``_extra_state``; ``load_state_dict``
    refuses a state of another layout, counters outside their rings or pointers that disagree
    with them, before it changes anything.

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
        pixels_per_class: int = 5000,
        regions_per_class: int = 5000,
        pixels_per_image: int = 10,
        ignore_index: int = 255,
        gather: bool = True,
        exclude_classes: Sequence[int] = (),
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("num_classes", num_classes, 1),
            ("dim", dim, 1),
            ("pixels_per_class", pixels_per_class, 0),
            ("regions_per_class", regions_per_class, 0),
            ("pixels_per_image", pixels_per_image, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if pixels_per_class + regions_per_class == 0:
            raise ValueError("pixels_per_class and regions_per_class cannot both be 0")
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
        slots = pixels_per_class + regions_per_class
        self.register_buffer("queue", torch.zeros(num_classes, slots, dim))
        for name in _COUNTERS:
            self.register_buffer(name, torch.zeros(num_classes, dtype=torch.long))
        self._foreign_write_warned = False
        self._record_own_write()

    def _layout(self) -> dict[str, int]:
        """The configuration that fixes what every slot of the state means."""
        return {
            "num_classes": self.num_classes,
            "dim": self.dim,
            "pixels_per_class": self.pixels_per_class,
            "regions_per_class": self.regions_per_class,
        }

    def get_extra_state(self) -> Tensor:
        """The bank's layout record, saved in ``state_dict()`` beside the buffers.

        A tensor like them, ``[version, num_classes, dim, pixels_per_class, regions_per_class]``,
        so that :meth:`load_state_dict` can refuse the state of a bank with another layout.
        """
        return torch.tensor([_STATE_VERSION, *self._layout().values()])

    def set_extra_state(self, state: Tensor) -> None:
        """Nothing to restore from a loaded layout record: the bank's layout is fixed at creation.

        The record must match this bank's own (:meth:`get_extra_state`), which
        :meth:`load_state_dict` checks.
        """
        # (validated, with the buffers, before anything is loaded: see _load_from_state_dict)
        pass

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
        error_msgs,
    ) -> None:
        # Everything is checked before anything is copied, so a failed load leaves the bank
        # as it was (torch would copy the valid buffers and report the others at the end).
        self._check_state(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
            error_msgs,
        )
        self._record_own_write()

    def _check_state(self, state_dict: dict, prefix: str) -> None:
        """Raise unless ``state_dict`` (entries under ``prefix``) is a state of this layout."""
        extra = state_dict.get(prefix + "_extra_state")
        if extra is None:
            # (torch tells a module nothing of strict=False, and a state without the record
            # could be of any split: refused rather than guessed)
            raise ValueError(
                f"state_dict has no {prefix + '_extra_state'!r}, the memory bank's layout "
                "record, so its slots cannot be checked against this bank's layout; if you know "
                "the layouts match, add it first: "
                f"state_dict[{prefix + '_extra_state'!r}] = bank.get_extra_state()"
            )
        else:
            record = extra.tolist() if isinstance(extra, Tensor) and extra.dim() == 1 else None
            if record is None or len(record) != 5 or record[0] != _STATE_VERSION:
                raise ValueError(
                    f"state_dict[{prefix + '_extra_state'!r}] is not a ClassMemoryBank layout "
                    f"record of version {_STATE_VERSION}, got {extra!r}"
                )
            saved = dict(zip(self._layout(), record[1:]))
            if saved != self._layout():
                raise ValueError(
                    f"the memory bank state in state_dict was saved with layout {saved}, but "
                    f"this bank has {self._layout()}: its slots would be reinterpreted"
                )
        shapes = {"queue": tuple(self.queue.shape)}
        shapes.update({name: (self.num_classes,) for name in _COUNTERS})
        loaded = {}
        for name, shape in shapes.items():
            value = state_dict.get(prefix + name)
            if value is None:
                continue  # (a missing key is reported by torch under strict loading)
            if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                found = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"state_dict[{prefix + name!r}] must be a tensor of shape {shape}, got {found}"
                )
            if name != "queue" and (value.is_floating_point() or value.dtype == torch.bool):
                raise ValueError(
                    f"state_dict[{prefix + name!r}] must hold integers, got dtype {value.dtype}"
                )
            loaded[name] = value
        for ring, capacity in (("pixel", self.pixels_per_class),
                               ("region", self.regions_per_class)):
            count, pointer = loaded.get(f"{ring}_count"), loaded.get(f"{ring}_pointer")
            if count is not None and bool(((count < 0) | (count > capacity)).any()):
                raise ValueError(
                    f"state_dict[{prefix}{ring}_count] must lie in [0, {capacity}] "
                    f"({ring}s_per_class), got {count.tolist()}"
                )
            if pointer is not None and bool(
                ((pointer < 0) | (pointer >= max(capacity, 1))).any()
            ):
                raise ValueError(
                    f"state_dict[{prefix}{ring}_pointer] must lie in [0, {max(capacity, 1)}), "
                    f"got {pointer.tolist()}"
                )
            if count is not None and pointer is not None and bool(
                ((count < capacity) & (pointer.to(count.device) != count)).any()
            ):
                raise ValueError(
                    f"state_dict[{prefix}{ring}_pointer] and [{prefix}{ring}_count] disagree: a "
                    "ring that is not full has its pointer at its count"
                )

    def _fingerprint(self) -> Tensor:
        """The counters and each ring's newest entry per class, flattened.

        What any overwrite of the bank by another bank's state (another rank's) changes, read
        cheaply.
        """
        parts = [torch.stack([getattr(self, name) for name in _COUNTERS]).to(self.queue.dtype)]
        classes = torch.arange(self.num_classes, device=self.queue.device)
        for ring, pointer in ((self.pixel_queue, self.pixel_pointer),
                              (self.region_queue, self.region_pointer)):
            if ring.shape[1]:
                parts.append(ring[classes, (pointer - 1) % ring.shape[1]])
        return torch.cat([part.reshape(-1) for part in parts])

    def _record_own_write(self) -> None:
        """Remember the state as this bank last wrote it (see :meth:`_check_foreign_write`)."""
        self._own_write = (self.queue.data_ptr(), self.queue._version, self._fingerprint())

    def _check_foreign_write(self) -> None:
        """Warn once when the state changed since the bank last wrote it.

        ``DistributedDataParallel(broadcast_buffers=True)`` does that before every forward of
        a module holding the bank (below autograd's version counters, so the newest entries
        and the counters are compared too): it resends the whole queue each step and, with
        ``gather=False``, overwrites this rank's entries with rank 0's. A new queue tensor,
        as ``.to()`` makes, is not a foreign write. Checked once per :meth:`enqueue` (one small
        comparison and one host synchronisation), which every training step runs.
        """
        if self._foreign_write_warned:
            return
        pointer, version, fingerprint = self._own_write
        if pointer != self.queue.data_ptr() or self.queue.device.type == "meta":
            self._record_own_write()
            return
        if version == self.queue._version and torch.equal(fingerprint, self._fingerprint()):
            return
        self._foreign_write_warned = True
        warnings.warn(
            "ClassMemoryBank: its state was modified outside enqueue() and load_state_dict(). "
            "DistributedDataParallel(broadcast_buffers=True) does this when the bank is inside "
            "the wrapped module: it resends the whole queue at every step and, with "
            "gather=False, overwrites this rank's entries with rank 0's. Keep the loss and its "
            "bank outside the wrapped module, or pass broadcast_buffers=False.",
            stacklevel=3,
        )

    @property
    def pixel_queue(self) -> Tensor:
        """``[C, pixels_per_class, D]`` view of the pixel rings (unfilled slots included)."""
        return self.queue[:, : self.pixels_per_class]

    @property
    def region_queue(self) -> Tensor:
        """``[C, regions_per_class, D]`` view of the region rings (unfilled slots included)."""
        return self.queue[:, self.pixels_per_class :]

    def check_batch(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Validate a batch against the memory; returns the labels at embedding resolution.

        Raises if ``embeddings`` is not ``[B, dim, h, w]``, if either tensor is on another device
        than the memory, or if a label is neither in ``[0, num_classes)`` nor ``ignore_index``.
        """
        self._check_embeddings(embeddings)
        return pixel_maps(
            embeddings, labels, ignore_index=self.ignore_index, num_classes=self.num_classes
        ).labels

    def _check_embeddings(self, embeddings: Tensor) -> None:
        """Raise unless ``embeddings`` is a ``[B, dim, h, w]`` float map on the memory's device.

        This is what a batch whose labels are validated elsewhere must still fit.
        """
        _checks.check_embeddings(embeddings, "embeddings", 4)
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
        labels = self.check_batch(embeddings, labels)
        _checks.check_finite(embeddings, "embeddings")
        self._enqueue_prepared(embeddings, labels, generator, normalize=normalize)

    @torch.no_grad()
    def _enqueue_prepared(self, embeddings: Tensor, labels: Tensor,
                          generator: Optional[torch.Generator], *, normalize: bool) -> None:
        """:meth:`enqueue` a batch validated already.

        ``embeddings`` are finite and pass :meth:`_check_embeddings`, ``labels`` are as
        :meth:`check_batch` returns them (the losses validate once and call this).
        """
        self._check_foreign_write()
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
                        *region_embeddings(embeddings, labels, self.ignore_index, normalize))
        self._record_own_write()

    def _write(
        self, ring: Tensor, pointer: Tensor, count: Tensor, values: Tensor, classes: Tensor
    ) -> None:
        """:func:`_push` this rank's entries, or with ``gather`` those of every rank."""
        if self.gather:
            values = torch.cat(distributed.all_gather(values.to(ring.dtype)))
            classes = torch.cat(distributed.all_gather(classes))
        _push(ring, pointer, count, values, classes)

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
