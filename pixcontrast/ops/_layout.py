"""The class-grouped arrangement of anchors and keys that the fused backends share.

Anchors and keys are sorted by a compact class id, so that the positives of every anchor are one
contiguous block of key columns (``key_offsets[c]:key_offsets[c + 1]``) and consecutive anchors
share that block. In-batch contrast is expressed by putting the anchors among the keys and
remembering, per anchor, the column that holds its own key (``self_column``), which is excluded.
Invalid keys (negative labels) are dropped here, once, so no backend ever sees them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["ContrastLayout", "build_layout", "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; every other floating dtype accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class ContrastLayout:
    """Sorted, validated inputs of one loss evaluation.

    Attributes:
        anchors: ``[N, D]`` anchors sorted by class, in the compute dtype.
        anchor_order: ``[N]`` caller positions: ``anchors[i] = caller_anchors[anchor_order[i]]``.
        anchor_class: ``[N]`` compact class id of each sorted anchor (non-decreasing).
        keys: ``[M, D]`` valid keys sorted by class, in the compute dtype or the ``key_dtype``
            the backend asked :func:`build_layout` for (a half-precision operand dtype: then
            no fp32 copy of the keys is made, and grouped keys are not copied at all).
        key_source: ``[M]`` position of each sorted key in the caller's key space, which is
            ``[anchors (if in_batch); keys]``, so values ``< N`` are anchors acting as keys.
        key_class: ``[M]`` compact class id of each sorted key (non-decreasing).
        self_column: ``[N]`` column of each sorted anchor's own key, or ``None`` without in-batch.
        positives: ``[N]`` ``|P(a)|`` in the compute dtype.
        anchor_offsets: host list, ``C + 1`` class boundaries in ``anchors``.
        key_offsets: host list, ``C + 1`` class boundaries in ``keys``.
        key_part_sizes: rows of each of the caller's key parts (concatenated after the anchors
            in the caller's key space).
    """

    anchors: Tensor
    anchor_order: Tensor
    anchor_class: Tensor
    keys: Tensor
    key_source: Tensor
    key_class: Tensor
    self_column: Optional[Tensor]
    positives: Tensor
    anchor_offsets: list[int]
    key_offsets: list[int]
    key_part_sizes: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        """``C``: the anchors' classes, plus one shared by the keys of no anchor's class."""
        return len(self.key_offsets) - 1

    @property
    def in_batch(self) -> bool:
        """Whether the anchors are keys as well (each excluded from its own row)."""
        return self.self_column is not None

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
    key_dtype: Optional[torch.dtype] = None,
) -> ContrastLayout:
    """Arrange anchors and valid keys by class.

    Class ids are compacted over the anchors' classes only: keys of a class no anchor has can
    only ever be negatives, so they share one extra class after the anchors' classes. Keys that
    are already grouped by class in ascending order (a memory bank's ``keys()``) are not sorted
    again. In-batch anchors are merged into the key order by counting, anchors first within each
    class. Costs: a sort of the ``N`` anchors, a sort of the keys only when they are not grouped,
    one gather of the keys and one host synchronisation (the class boundaries; everything before
    it is sized by upper bounds, and no tensor is made from host values). ``key_dtype``
    (default: the compute dtype) is the dtype of the layout's keys; the anchors stay in the
    compute dtype.
    """
    dtype = compute_dtype(anchors.dtype)
    key_dtype = key_dtype or dtype
    device = anchors.device
    n = anchors.shape[0]
    labels = labels.long()
    keys = None
    if key_parts:
        keys = (
            key_parts[0] if len(key_parts) == 1
            else torch.cat([k.to(key_dtype) for k in key_parts])
        )

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

    if keys is not None and key_labels is not None and key_labels.numel() > 0:
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
        part_ids = torch.where(known, slot, num_anchor_classes)
        part_ids = torch.where(raw >= 0, part_ids, n + 1)
        grouped = (part_ids[1:] >= part_ids[:-1]).all().reshape(1)
        part_counts = _count(part_ids, n + 2)[: n + 1]
    else:
        grouped = torch.ones(1, dtype=torch.bool, device=device)
        part_counts = torch.zeros_like(anchor_counts)
    anchor_ends, part_ends = anchor_counts.cumsum(0), part_counts.cumsum(0)
    # The one host synchronisation: the class count and the class boundaries, for the
    # backends' per-class loops and the sizes below.
    host = torch.cat([num_anchor_classes, grouped.long(), anchor_ends, part_ends]).tolist()
    num_anchor_classes_host, is_grouped = host[0], host[1]
    width = num_anchor_classes_host + 1  # + one class for keys of no anchor's class
    anchor_offsets = [0] + host[2 : 2 + width]
    part_offsets = [0] + host[3 + n : 3 + n + width]
    num_valid = part_offsets[-1]

    # The caller's key space is [anchors (if in_batch); keys]: ``offset`` shifts the keys.
    offset = n if in_batch else 0
    if keys is not None and key_labels is not None and key_labels.numel() > 0:
        if is_grouped:
            part_order = torch.arange(num_valid, device=device)
            part_class = part_ids[:num_valid]
        else:
            part_class, part_order = torch.sort(part_ids, stable=True)
            part_class, part_order = part_class[:num_valid], part_order[:num_valid]
        part_keys = keys if is_grouped and num_valid == keys.shape[0] else keys[part_order]
        part_keys = part_keys.to(key_dtype)
        part_source = part_order + offset
    else:
        part_class = labels.new_empty(0)
        part_keys = anchors.new_empty((0, anchors.shape[1]), dtype=key_dtype)
        part_source = labels.new_empty(0)

    positives = (part_counts + (anchor_counts if in_batch else 0)).index_select(0, anchor_class)
    self_column = None
    if not in_batch:
        sorted_keys, key_source, key_class = part_keys, part_source, part_class
        key_offsets = part_offsets
    elif num_valid == 0:
        sorted_keys = sorted_anchors.to(key_dtype)
        key_source, key_class = anchor_order, anchor_class
        key_offsets = anchor_offsets
        self_column = torch.arange(n, device=device)
    else:
        # Within class c the anchors come first, then the keys: anchor i lands at
        # i + (keys of classes < c), key j at j + (anchors of classes <= c).
        key_offsets = [a + b for a, b in zip(anchor_offsets, part_offsets)]
        self_column = torch.arange(n, device=device) + (part_ends - part_counts)[anchor_class]
        key_column = torch.arange(num_valid, device=device) + anchor_ends[part_class]
        total = n + num_valid
        sorted_keys = sorted_anchors.new_empty((total, anchors.shape[1]), dtype=key_dtype)
        sorted_keys.index_copy_(0, self_column, sorted_anchors.to(key_dtype))
        sorted_keys.index_copy_(0, key_column, part_keys)
        key_source = labels.new_empty(total)
        key_source.index_copy_(0, self_column, anchor_order)
        key_source.index_copy_(0, key_column, part_source)
        key_class = labels.new_empty(total)
        key_class.index_copy_(0, self_column, anchor_class)
        key_class.index_copy_(0, key_column, part_class)
    if in_batch:
        positives = positives - 1

    return ContrastLayout(
        anchors=sorted_anchors,
        anchor_order=anchor_order,
        anchor_class=anchor_class,
        keys=sorted_keys,
        key_source=key_source,
        key_class=key_class,
        self_column=self_column,
        positives=positives.to(dtype),
        anchor_offsets=anchor_offsets,
        key_offsets=key_offsets,
        key_part_sizes=tuple(part.shape[0] for part in key_parts),
    )
