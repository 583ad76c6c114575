"""The class-grouped arrangement of anchors and keys that the fused backends share.

Anchors and keys are sorted by a compact class id, so that the positives of every anchor are one
contiguous block of key columns (``key_offsets[c]:key_offsets[c + 1]``) and consecutive anchors
share that block. In-batch contrast is expressed by putting the anchors among the keys and
remembering, per anchor, the column that holds its own key (``self_column``), which is excluded.
Invalid keys (negative labels) are dropped here, once, so no backend ever sees them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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
        keys: ``[M, D]`` valid keys sorted by class, in the compute dtype.
        key_source: ``[M]`` position of each sorted key in the caller's key space, which is
            ``[anchors (if in_batch); keys]``, so values ``< N`` are anchors acting as keys.
        key_class: ``[M]`` compact class id of each sorted key (non-decreasing).
        self_column: ``[N]`` column of each sorted anchor's own key, or ``None`` without in-batch.
        positives: ``[N]`` ``|P(a)|`` in the compute dtype.
        anchor_offsets: host list, ``C + 1`` class boundaries in ``anchors``.
        key_offsets: host list, ``C + 1`` class boundaries in ``keys``.
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

    @property
    def num_classes(self) -> int:
        return len(self.key_offsets) - 1

    @property
    def in_batch(self) -> bool:
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


def build_layout(
    anchors: Tensor,
    labels: Tensor,
    keys: Optional[Tensor],
    key_labels: Optional[Tensor],
    in_batch: bool,
) -> ContrastLayout:
    """Sort anchors and valid keys by class. Costs two sorts, copies of ``O((N + M) * D)`` and
    one host synchronisation (the class boundaries)."""
    dtype = compute_dtype(anchors.dtype)
    device = anchors.device
    n = anchors.shape[0]
    labels = labels.long()

    # The caller's key space is [anchors (if in_batch); keys]; invalid keys are dropped by index.
    key_parts, label_parts, source_parts = [], [], []
    if in_batch:
        key_parts.append(anchors)
        label_parts.append(labels)
        source_parts.append(torch.arange(n, device=device))
    if keys is not None and key_labels is not None:
        key_labels = key_labels.long()
        valid = (key_labels >= 0).nonzero().squeeze(1)
        key_parts.append(keys)
        label_parts.append(key_labels.index_select(0, valid))
        source_parts.append(valid + (n if in_batch else 0))
    all_key_labels = torch.cat(label_parts) if label_parts else labels.new_empty(0)
    classes, inverse = torch.unique(torch.cat([labels, all_key_labels]), return_inverse=True)
    num_classes = classes.numel()
    anchor_ids, key_ids = inverse[:n], inverse[n:]

    anchor_class, anchor_order = torch.sort(anchor_ids, stable=True)
    key_class, key_perm = torch.sort(key_ids, stable=True)
    key_source = torch.cat(source_parts)[key_perm] if source_parts else key_perm

    anchor_counts = torch.bincount(anchor_ids, minlength=num_classes)
    key_counts = torch.bincount(key_ids, minlength=num_classes)
    zero = anchor_counts.new_zeros(1)
    bounds = torch.cat([zero, anchor_counts.cumsum(0), zero, key_counts.cumsum(0)]).tolist()

    sorted_anchors = anchors.index_select(0, anchor_order).to(dtype)
    if not key_parts:
        sorted_keys = anchors.new_empty((0, anchors.shape[1]), dtype=dtype)
    else:
        # One gather from the caller's key space (a single part needs no concatenation).
        key_space = key_parts[0] if len(key_parts) == 1 else torch.cat(key_parts)
        sorted_keys = key_space.index_select(0, key_source).to(dtype)
    positives = key_counts.index_select(0, anchor_class).to(dtype)
    self_column = None
    if in_batch:
        # The first n entries of the caller's key space are the anchors themselves.
        column_of_source = torch.empty_like(key_perm)
        column_of_source[key_perm] = torch.arange(key_perm.numel(), device=device)
        self_column = column_of_source.index_select(0, anchor_order)
        positives = positives - 1

    return ContrastLayout(
        anchors=sorted_anchors,
        anchor_order=anchor_order,
        anchor_class=anchor_class,
        keys=sorted_keys,
        key_source=key_source,
        key_class=key_class,
        self_column=self_column,
        positives=positives,
        anchor_offsets=bounds[: num_classes + 1],
        key_offsets=bounds[num_classes + 1 :],
    )
