"""The storage machinery of :class:`~pixcontrast.ClassMemoryBank`: per-class rings.

A bank keeps its state in registered buffers (``queue [C, S, D]`` and ``[C]`` counters per
ring); what here works on them takes the bank, since ``.to()`` replaces its buffers.
:func:`push` writes into a ring, :class:`RingLayout` fixes what every slot means and checks a
checkpoint against it, :class:`ForeignWriteGuard` notices a state changed behind the bank's back.
"""

from __future__ import annotations

import warnings
from dataclasses import astuple, dataclass, fields
from typing import Any, Optional

import torch
from torch import Tensor

from . import _checks

__all__ = ["COUNTERS", "ForeignWriteGuard", "RingLayout", "push"]

COUNTERS = ("pixel_pointer", "pixel_count", "region_pointer", "region_count")
_STATE_VERSION = 1  # of the layout record in state_dict()


def push(ring: Tensor, pointer: Tensor, count: Tensor, values: Tensor, classes: Tensor) -> None:
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


@dataclass(frozen=True)
class RingLayout:
    """The configuration that fixes what every slot of a bank's state means (validated)."""

    num_classes: int
    dim: int
    pixels_per_class: int
    regions_per_class: int

    def __post_init__(self) -> None:
        for name, low in (("num_classes", 1), ("dim", 1), ("pixels_per_class", 0),
                          ("regions_per_class", 0)):
            _checks.check_count(getattr(self, name), name, minimum=low)
        if self.pixels_per_class + self.regions_per_class == 0:
            raise ValueError("pixels_per_class and regions_per_class cannot both be 0")

    def new_state(self) -> dict[str, Tensor]:
        """An empty bank's buffers: ``queue [C, S, D]`` zeros, and zero ``[C]`` counters."""
        slots = self.pixels_per_class + self.regions_per_class
        state = {"queue": torch.zeros(self.num_classes, slots, self.dim)}
        state.update({name: torch.zeros(self.num_classes, dtype=torch.long) for name in COUNTERS})
        return state

    def record(self) -> Tensor:
        """``[version, num_classes, dim, pixels_per_class, regions_per_class]``."""
        return torch.tensor([_STATE_VERSION, *astuple(self)])

    def check_state(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Raise unless ``state_dict`` (entries under ``prefix``) is a state of this layout.

        Checks the layout record, the buffers' shapes and dtypes, the counters' ranges and the
        agreement of each ring's pointer with its count, before anything is loaded.
        """
        self._check_record(state_dict.get(prefix + "_extra_state"), prefix + "_extra_state")
        slots = self.pixels_per_class + self.regions_per_class
        shapes: dict[str, tuple[int, ...]] = {"queue": (self.num_classes, slots, self.dim)}
        shapes.update({name: (self.num_classes,) for name in COUNTERS})
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
            _check_counters(ring, capacity, loaded.get(f"{ring}_count"),
                            loaded.get(f"{ring}_pointer"), prefix)

    def _check_record(self, extra: object, key: str) -> None:
        if extra is None:
            # (torch tells a module nothing of strict=False, and a state without the record
            # could be of any split: refused rather than guessed)
            raise ValueError(
                f"state_dict has no {key!r}, the memory bank's layout record, so its slots cannot "
                "be checked against this bank's layout; if you know the layouts match, add it "
                f"first: state_dict[{key!r}] = bank.get_extra_state()"
            )
        record = extra.tolist() if isinstance(extra, Tensor) and extra.dim() == 1 else None
        if record is None or len(record) != 5 or record[0] != _STATE_VERSION:
            raise ValueError(
                f"state_dict[{key!r}] is not a ClassMemoryBank layout record of version "
                f"{_STATE_VERSION}, got {extra!r}"
            )
        saved = dict(zip([f.name for f in fields(self)], record[1:]))
        mine = dict(zip(saved, astuple(self)))
        if saved != mine:
            raise ValueError(
                f"the memory bank state in state_dict was saved with layout {saved}, but this "
                f"bank has {mine}: its slots would be reinterpreted"
            )


def _check_counters(
    ring: str, capacity: int, count: Optional[Tensor], pointer: Optional[Tensor], prefix: str
) -> None:
    """Raise unless a ring's loaded count and pointer are within it and agree."""
    if count is not None and bool(((count < 0) | (count > capacity)).any()):
        raise ValueError(
            f"state_dict[{prefix}{ring}_count] must lie in [0, {capacity}] ({ring}s_per_class), "
            f"got {count.tolist()}"
        )
    if pointer is not None and bool(((pointer < 0) | (pointer >= max(capacity, 1))).any()):
        raise ValueError(
            f"state_dict[{prefix}{ring}_pointer] must lie in [0, {max(capacity, 1)}), got "
            f"{pointer.tolist()}"
        )
    if count is not None and pointer is not None and bool(
        ((count < capacity) & (pointer.to(count.device) != count)).any()
    ):
        raise ValueError(
            f"state_dict[{prefix}{ring}_pointer] and [{prefix}{ring}_count] disagree: a ring "
            "that is not full has its pointer at its count"
        )


class ForeignWriteGuard:
    """Warns once when a bank's state changed since the bank last wrote it.

    ``DistributedDataParallel(broadcast_buffers=True)`` does that before every forward of a
    module holding the bank (below autograd's version counters, so the newest entries and the
    counters are compared too): it resends the whole queue each step and, with
    ``gather=False``, overwrites this rank's entries with rank 0's. A new queue tensor, as
    ``.to()`` makes, is not a foreign write. Checked once per enqueue (one small comparison and
    one host synchronisation), which every training step runs.
    """

    def __init__(self) -> None:
        self.warned = False
        self._own_write: tuple[int, int, Tensor] = (0, 0, torch.empty(0))

    @staticmethod
    def _fingerprint(bank: Any) -> Tensor:
        """The counters and each ring's newest entry per class, flattened: cheap to read."""
        parts = [torch.stack([getattr(bank, name) for name in COUNTERS]).to(bank.queue.dtype)]
        classes = torch.arange(bank.num_classes, device=bank.queue.device)
        for ring, pointer in ((bank.pixel_queue, bank.pixel_pointer),
                              (bank.region_queue, bank.region_pointer)):
            if ring.shape[1]:
                parts.append(ring[classes, (pointer - 1) % ring.shape[1]])
        return torch.cat([part.reshape(-1) for part in parts])

    def record(self, bank: Any) -> None:
        """Remember ``bank``'s state as it wrote it."""
        self._own_write = (bank.queue.data_ptr(), bank.queue._version, self._fingerprint(bank))

    def check(self, bank: Any) -> None:
        """Warn (once) if ``bank``'s state is not the one it last recorded."""
        if self.warned:
            return
        pointer, version, fingerprint = self._own_write
        if pointer != bank.queue.data_ptr() or bank.queue.device.type == "meta":
            self.record(bank)
            return
        if version == bank.queue._version and torch.equal(fingerprint, self._fingerprint(bank)):
            return
        self.warned = True
        warnings.warn(
            "ClassMemoryBank: its state was modified outside enqueue() and load_state_dict(). "
            "DistributedDataParallel(broadcast_buffers=True) does this when the bank is inside "
            "the wrapped module: it resends the whole queue at every step and, with "
            "gather=False, overwrites this rank's entries with rank 0's. Keep the loss and its "
            "bank outside the wrapped module, or pass broadcast_buffers=False.",
            stacklevel=4,
        )
