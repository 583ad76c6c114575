"""The class-grouped arrangement of anchors and keys that the fused backends share.

Anchors are sorted by a compact class id, so that consecutive anchors share their positives. The
keys are read where they live, as class-sorted segments: the in-batch anchors (the sorted anchors
themselves, each excluded from its own row: the pair ``(i, i)`` of that segment) and one segment
per key part of the caller (a memory bank's class-grouped keys, the gathered keys of other ranks).
Within a segment the keys of class ``c`` are the rows ``offsets[c]:offsets[c + 1]``, so the
positives of an anchor are one contiguous block of each segment. A part whose keys are already
grouped by class (a memory bank's ``keys()``) is read in place, in its own dtype: no copy, no
widening. Invalid keys (negative labels) are dropped here, once, so no backend ever sees them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["ContrastLayout", "KeySegment", "build_layout", "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; every other floating dtype accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class KeySegment:
    """Valid keys of one source, sorted by class.

    Attributes:
        keys: ``[m, D]`` the keys, in their own dtype: the caller's tensor itself (or a leading
            slice of it) when its keys are grouped by class already, else a sorted copy.
        key_class: ``[m]`` compact class id of each key (non-decreasing).
        offsets: host list, ``C + 1`` class boundaries in ``keys``.
        source: ``[m]`` row of each key in its source (the caller's anchor position for the
            in-batch anchors, the row of the key part otherwise), or ``None`` when ``keys`` are
            the part's leading rows in order (read in place).
        part: index of the caller's key part, or ``None`` for the in-batch anchors.
    """

    keys: Tensor
    key_class: Tensor
    offsets: list[int]
    source: Optional[Tensor]
    part: Optional[int]

    @property
    def is_anchors(self) -> bool:
        """Whether these are the in-batch anchors (row ``i`` is sorted anchor ``i``)."""
        return self.part is None


@dataclass(frozen=True)
class ContrastLayout:
    """Sorted, validated inputs of one loss evaluation.

    Attributes:
        anchors: ``[N, D]`` anchors sorted by class, in the compute dtype.
        anchor_order: ``[N]`` caller positions: ``anchors[i] = caller_anchors[anchor_order[i]]``.
        anchor_class: ``[N]`` compact class id of each sorted anchor (non-decreasing).
        positives: ``[N]`` ``|P(a)|`` in the compute dtype.
        anchor_offsets: host list, ``C + 1`` class boundaries in ``anchors``.
        segments: the key segments: the in-batch anchors first (when ``in_batch``), then one per
            key part that has a valid key, in the caller's order.
        key_part_sizes: rows of each of the caller's key parts.
        anchor_dtype: the caller's anchor dtype.
        read_along: host values of :func:`build_layout`'s ``read_along``, read with the class
            boundaries in its one host synchronisation.
    """

    anchors: Tensor
    anchor_order: Tensor
    anchor_class: Tensor
    positives: Tensor
    anchor_offsets: list[int]
    segments: tuple[KeySegment, ...]
    key_part_sizes: tuple[int, ...]
    anchor_dtype: torch.dtype
    read_along: tuple[float, ...] = ()

    @property
    def num_classes(self) -> int:
        """``C``: the anchors' classes, plus one shared by the keys of no anchor's class."""
        return len(self.anchor_offsets) - 1

    @property
    def num_keys(self) -> int:
        """``M``: the valid keys of every segment."""
        return sum(segment.keys.shape[0] for segment in self.segments)

    @property
    def in_batch(self) -> bool:
        """Whether the anchors are keys as well (each excluded from its own row)."""
        return bool(self.segments) and self.segments[0].is_anchors

    def class_segments(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """``(row_start, row_stop, class)`` runs of the sorted anchors ``start:stop``."""
        segments = []
        offsets = self.anchor_offsets
        for c in range(self.num_classes):
            lo, hi = max(offsets[c], start), min(offsets[c + 1], stop)
            if lo < hi:
                segments.append((lo, hi, c))
        return segments


def _count(ids: Tensor, size: int) -> Tensor:
    """``bincount(ids, minlength=size)`` for ids below ``size``, without reading ``ids.max()``."""
    return torch.zeros(size, dtype=torch.long, device=ids.device).scatter_add_(
        0, ids, torch.ones_like(ids)
    )


def build_layout(
    anchors: Tensor,
    labels: Tensor,
    key_parts: Sequence[Tensor],
    key_labels: Optional[Tensor],
    in_batch: bool,
    read_along: Optional[Tensor] = None,
) -> ContrastLayout:
    """Arrange anchors and valid keys by class.

    Class ids are compacted over the anchors' classes only: keys of a class no anchor has can
    only ever be negatives, so they share one extra class after the anchors' classes. A key part
    that is already grouped by class in ascending order with its invalid keys last (a memory
    bank's ``keys()``) is read in place; any other is sorted (a gather of its valid keys). Costs:
    a sort of the ``N`` anchors, a sort of each ungrouped part and one host synchronisation (the
    class boundaries; everything before it is sized by upper bounds, and no tensor is made from
    host values). The anchors are converted to the compute dtype; keys keep theirs. The values
    of ``read_along`` (a 1-D tensor on the device, such as the value checks' bounds) are read in
    the same synchronisation, into the layout's ``read_along``.
    """
    dtype = compute_dtype(anchors.dtype)
    n = anchors.shape[0]
    labels = labels.long()
    sizes = [part.shape[0] for part in key_parts]

    # Everything up to the one host transfer below is sized by the upper bound of N anchor
    # classes (ids 0..C-1 for the C <= N classes, C for keys of no anchor's class, N + 1 for
    # invalid keys), so that nothing waits for the device before it.
    sorted_labels, anchor_order = torch.sort(labels, stable=True)
    is_new = torch.ones_like(sorted_labels, dtype=torch.bool)
    is_new[1:] = sorted_labels[1:] != sorted_labels[:-1]
    anchor_class = is_new.cumsum(0) - 1
    num_anchor_classes = (anchor_class[-1:] + 1) if n else anchor_class.new_zeros(1)
    sorted_anchors = anchors.index_select(0, anchor_order).to(dtype)
    anchor_counts = _count(anchor_class, n + 1)

    part_ids: list[Tensor] = []
    if key_labels is not None and key_labels.numel() > 0:
        raw = key_labels.long()
        if n:
            # the anchors' classes in ascending order, padded after the last with a value that
            # no label reaches (searchsorted needs ascending values)
            classes = torch.full_like(sorted_labels, torch.iinfo(torch.int64).max)
            classes.scatter_(0, anchor_class, sorted_labels)
            slot = torch.searchsorted(classes, raw).clamp(max=n - 1)
            known = (classes[slot] == raw) & (slot < num_anchor_classes)
        else:
            slot, known = torch.zeros_like(raw), torch.zeros_like(raw, dtype=torch.bool)
        # Invalid keys get id N + 1: counted in a bin that is dropped, sorted last.
        ids = torch.where(known, slot, num_anchor_classes)
        part_ids = list(torch.where(raw >= 0, ids, n + 1).split(sizes))
    grouped = [(ids[1:] >= ids[:-1]).all().reshape(1) for ids in part_ids]
    part_counts = [_count(ids, n + 2)[: n + 1] for ids in part_ids]
    anchor_ends = anchor_counts.cumsum(0)
    part_ends = [counts.cumsum(0) for counts in part_counts]
    # The one host synchronisation: the class count, which parts are grouped, and the class
    # boundaries, for the backends' per-class loops and the sizes below (fp64 when values are
    # read along: counts below 2**53 are exact there).
    counts = torch.cat(
        [num_anchor_classes, *(flag.long() for flag in grouped), anchor_ends, *part_ends]
    )
    along: list[float] = []
    if read_along is None:
        host = counts.tolist()
    else:
        values = torch.cat([read_along.to(torch.float64), counts.to(torch.float64)]).tolist()
        along, host = values[: read_along.numel()], [int(v) for v in values[read_along.numel() :]]
    width = host[0] + 1  # + one class for keys of no anchor's class
    is_grouped, host = host[1 : 1 + len(part_ids)], host[1 + len(part_ids) :]
    anchor_offsets = [0] + host[:width]
    part_offsets = [[0] + host[(p + 1) * (n + 1) :][:width] for p in range(len(part_ids))]

    positives = anchor_counts if in_batch else torch.zeros_like(anchor_counts)
    segments = []
    if in_batch:
        segments.append(KeySegment(
            sorted_anchors, anchor_class, anchor_offsets, anchor_order, None
        ))
    for p, (part, ids) in enumerate(zip(key_parts, part_ids)):
        positives = positives + part_counts[p]
        offsets = part_offsets[p]
        valid = offsets[-1]
        if valid == 0:
            continue
        if is_grouped[p]:  # invalid keys (largest id) are the last rows
            segments.append(KeySegment(part[:valid], ids[:valid], offsets, None, p))
        else:
            part_class, order = torch.sort(ids, stable=True)
            order = order[:valid]
            segments.append(KeySegment(part[order], part_class[:valid], offsets, order, p))
    positives = positives.index_select(0, anchor_class) - (1 if in_batch else 0)

    return ContrastLayout(
        anchors=sorted_anchors,
        anchor_order=anchor_order,
        anchor_class=anchor_class,
        positives=positives.to(dtype),
        anchor_offsets=anchor_offsets,
        segments=tuple(segments),
        key_part_sizes=tuple(sizes),
        anchor_dtype=anchors.dtype,
        read_along=tuple(along),
    )
