"""The inputs and options every loss backend takes, each validated once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["ContrastInputs", "ContrastOptions", "KeySpace"]


@dataclass(frozen=True)
class ContrastOptions:
    """Validated loss options.

    Made by :func:`pixcontrast.functional.loss_options` and passed unchanged to the chosen
    backend and its autograd Function.

    Attributes:
        temperature: ``tau > 0``.
        rho: ``tau / base_tau`` (1 without a base temperature), positive and finite.
        variant: ``"paper"`` or ``"supcon"``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    """

    temperature: float
    rho: float
    variant: str
    reduction: str


@dataclass(frozen=True)
class KeySpace:
    """The columns an anchor is contrasted with: ``[anchors (if in_batch); keys]``.

    In-batch, column ``j < N`` is anchor ``j`` (never paired with itself) and key ``i`` of the
    concatenated key parts is column ``N + i``; without in-batch, key ``i`` is column ``i``.
    Miners index this space, the dense reference and the pair loss score it.

    Attributes:
        parts: ``(first column, [m, D] rows in the compute dtype)`` per part, in column order;
            the rows are the caller's tensors where their dtype already is the compute dtype.
        labels: ``[M]`` int64 class ids of the columns (negative: an invalid key).
        in_batch: whether the anchors are the first ``N`` columns.
        dim: the feature dimension ``D``.
        dtype: the compute dtype of the rows.
    """

    parts: tuple[tuple[int, Tensor], ...]
    labels: Tensor
    in_batch: bool
    dim: int
    dtype: torch.dtype

    @property
    def size(self) -> int:
        """``M``, the number of columns."""
        return self.labels.numel()

    def dense(self) -> Tensor:
        """All columns as one new ``[M, D]`` tensor.

        Always a copy: autograd then saves it rather than the caller's keys, so that a key
        tensor changed in place after the loss (a memory bank's enqueue) cannot reach backward.
        """
        rows = [part for _, part in self.parts]
        if not rows:
            return self.labels.new_empty((0, self.dim), dtype=self.dtype)
        return torch.cat(rows)


@dataclass(frozen=True)
class ContrastInputs:
    """Validated data arguments of a contrastive loss.

    Made by :func:`pixcontrast.ops.check_contrast_inputs` and passed unchanged to the
    chosen backend (with :class:`ContrastOptions`) and to the miners.

    Attributes:
        anchors: ``[N, D]`` float embeddings.
        labels: ``[N]`` integer class ids, all ``>= 0``.
        keys: the key parts, ``[M_i, D]`` each (empty: no keys besides the anchors).
        key_labels: ``[M]`` class ids of the concatenated key parts (negative: invalid), or
            ``None`` without keys.
        in_batch: whether the anchors are keys as well (self-pairs excluded).
    """

    anchors: Tensor
    labels: Tensor
    keys: tuple[Tensor, ...]
    key_labels: Optional[Tensor]
    in_batch: bool

    def key_space(self, dtype: torch.dtype) -> KeySpace:
        """The :class:`KeySpace` of these inputs, its rows in ``dtype``."""
        parts: list[tuple[int, Tensor]] = []
        label_parts: list[Tensor] = []
        column = 0
        if self.in_batch:
            parts.append((0, self.anchors.to(dtype)))
            label_parts.append(self.labels.long())
            column = self.anchors.shape[0]
        if self.key_labels is not None:
            for part in self.keys:
                parts.append((column, part.to(dtype)))
                column += part.shape[0]
            label_parts.append(self.key_labels.long())
        labels = torch.cat(label_parts) if label_parts else self.labels.new_empty(0).long()
        return KeySpace(tuple(parts), labels, self.in_batch, self.anchors.shape[1], dtype)
