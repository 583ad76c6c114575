"""Checks of a contrastive loss's data: shapes, dtypes, devices, label values, pair indices.

Every message names the offending argument.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, cast

import torch
from torch import Tensor

from .._checks import check_embeddings, check_finite, check_labels, check_same_device, check_tensor
from ._layout import compute_dtype
from ._options import ContrastInputs

__all__ = [
    "check_contrast_inputs", "check_contrast_values", "check_pair_index", "contrast_value_peaks",
]


def check_contrast_inputs(
    anchors: object,
    labels: object,
    keys: object,
    key_labels: object,
    in_batch: object,
) -> ContrastInputs:
    """The data arguments of a contrastive loss, validated into :class:`ContrastInputs`.

    Checks shapes, dtypes and devices, with no host synchronisation: the caller then runs
    :func:`check_contrast_values` (labels ``>= 0``, a finite loss) where the values are known
    (the fused loss runs it inside its registered operator). ``keys`` and
    ``key_labels`` are a tensor each, or sequences of matching parts; ``in_batch`` ``None``
    means ``True`` without keys and ``False`` with them.
    """
    anchors = check_embeddings(anchors, "anchors", 2)
    labels = check_labels(labels, "labels", 1)
    if labels.shape[0] != anchors.shape[0]:
        raise ValueError(
            f"labels must have one entry per anchor: got {labels.shape[0]} labels for "
            f"{anchors.shape[0]} anchors"
        )
    if keys is None and key_labels is not None:
        raise ValueError("key_labels was given without keys")
    if keys is not None and key_labels is None:
        raise ValueError("keys requires key_labels")
    single = keys is None or isinstance(keys, Tensor)
    # (tuple() raises TypeError for anything that is not iterable)
    key_parts: tuple[object, ...] = (
        () if keys is None else (keys,) if single else tuple(cast("Iterable[object]", keys))
    )
    label_parts: tuple[object, ...] = (
        ()
        if key_labels is None
        else (key_labels,)
        if single
        else tuple(cast("Iterable[object]", key_labels))
    )
    if not single and (
        isinstance(key_labels, Tensor) or len(label_parts) != len(key_parts) or not key_parts
    ):
        raise ValueError(
            "key_labels must be a sequence with one label tensor per part of keys when keys is "
            "a sequence of tensors"
        )
    named = [("anchors", anchors), ("labels", labels)]
    checked_keys: list[Tensor] = []
    checked_labels: list[Tensor] = []
    for i, (raw_part, raw_labels) in enumerate(zip(key_parts, label_parts)):
        suffix = "" if single else f"[{i}]"
        part = check_embeddings(raw_part, f"keys{suffix}", 2)
        part_labels = check_labels(raw_labels, f"key_labels{suffix}", 1)
        checked_keys.append(part)
        checked_labels.append(part_labels)
        if part_labels.shape[0] != part.shape[0]:
            raise ValueError(
                f"key_labels{suffix} must have one entry per key: got {part_labels.shape[0]} "
                f"labels for {part.shape[0]} keys"
            )
        if part.shape[1] != anchors.shape[1]:
            raise ValueError(
                f"keys{suffix} must have the anchors' dimension D={anchors.shape[1]}, got "
                f"{part.shape[1]}"
            )
        named += [(f"keys{suffix}", part), (f"key_labels{suffix}", part_labels)]
    check_same_device(named)
    concatenated = None
    if checked_labels:
        concatenated = checked_labels[0] if single else torch.cat(checked_labels)
    in_batch = keys is None if in_batch is None else bool(in_batch)
    return ContrastInputs(anchors, labels, tuple(checked_keys), concatenated, in_batch)


def contrast_value_peaks(inputs: ContrastInputs) -> Tensor:
    """What :func:`check_contrast_values` reads, as one fp64 tensor on the inputs' device.

    ``[smallest anchor label, largest |entry| of the anchors, of each key part]``, without a
    host synchronisation: a caller that reads the device anyway reads these along with its own
    values and passes them to :func:`check_contrast_values` (the fused backends read them with
    the class layout's boundaries).
    """
    anchors = inputs.anchors
    zero = torch.zeros((), dtype=torch.float64, device=anchors.device)
    labels = inputs.labels
    # (unsigned labels, which torch has no min for beyond uint8, are never negative)
    lowest = labels.min().to(torch.float64) if labels.numel() and labels.is_signed() else zero
    return torch.stack([lowest] + [
        torch.linalg.vector_norm(t, ord=float("inf")).to(torch.float64) if t.numel() else zero
        for t in (anchors, *inputs.keys)
    ])


def check_contrast_values(
    inputs: ContrastInputs,
    temperature: float,
    rho: float,
    peaks: Optional[Sequence[float]] = None,
) -> None:
    """Raise unless the anchor labels are ``>= 0`` and the loss and its gradients are finite.

    Finite in the compute dtype. With ``A`` and ``K`` the largest ``|entry|`` of the anchors and
    of the keys (the anchors among them when ``in_batch``), every score obeys
    ``|s| <= S = D * A * K / temperature``, every loss term ``L_a <= rho * (2 S + log M + 1)``,
    a reduction adds ``N`` of them, and the backends form ``x / temperature`` and sums of up to
    ``N + M`` scores. Requiring
    ``(N + M + 1) * max(rho, 1) * (2 S + log(M + 1) + 1)``, ``A / temperature`` and
    ``K / temperature`` to stay below a quarter of the dtype's largest value rules out overflow
    (and the NaN of ``inf - inf`` that would follow) for any finite inputs; unit embeddings at
    any ``temperature >= 1e-30`` are far inside it. NaN or Inf entries raise too, naming the
    tensor: one pass over the inputs (the largest ``|entry|`` propagates NaN) and one host
    synchronisation for all of them and the smallest anchor label (checked first), unless
    ``peaks``, the host values of :func:`contrast_value_peaks`, were read already.
    """
    anchors, key_parts, in_batch = inputs.anchors, inputs.keys, inputs.in_batch
    tensors = [anchors, *key_parts]
    dtype = compute_dtype(anchors.dtype)
    if peaks is None:
        peaks = contrast_value_peaks(inputs).tolist()
    lowest_label, *peaks = peaks
    if lowest_label < 0:
        raise ValueError("labels must be >= 0 (filter ignored pixels out first)")
    names = ["anchors"] + [
        "keys" if len(key_parts) == 1 else f"keys[{i}]" for i in range(len(key_parts))
    ]
    for name, peak, tensor in zip(names, peaks, tensors):
        if not math.isfinite(peak):
            check_finite(tensor, name)  # raises, naming the tensor
    n, dim = anchors.shape
    m = sum(part.shape[0] for part in key_parts) + (n if in_batch else 0)
    a = peaks[0]
    k = max(peaks[1:] + ([a] if in_batch else []), default=0.0)
    score = dim * a * k / temperature
    largest = max(
        (n + m + 1) * max(rho, 1.0) * (2 * score + math.log(m + 1) + 1),
        a / temperature,
        k / temperature,
    )
    limit = torch.finfo(dtype).max / 4
    if largest > limit:
        raise ValueError(
            f"the loss would overflow {dtype}: scores x.k / temperature can reach {score:.3g} "
            f"(largest |entry| of anchors {a:.3g}, of keys {k:.3g}, D={dim}, "
            f"temperature={temperature:.3g}, temperature / base_temperature={rho:.3g}), and "
            f"the terms summed from them {largest:.3g}, beyond the safe limit {limit:.3g}; "
            "normalise the embeddings, raise temperature (or base_temperature), or pass "
            "float64 inputs"
        )


def check_pair_index(
    index: object, name: str, labels: Tensor, space_labels: Tensor, in_batch: bool, positive: bool
) -> Tensor:
    """Shape, dtype, range and class relation of a ``[N, K]`` pair index into the key space."""
    index = check_tensor(index, name, 2)
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer key indices, got dtype {index.dtype}")
    if index.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{name} must have one row per anchor: got shape {tuple(index.shape)} for "
            f"{labels.shape[0]} anchors"
        )
    if index.device != labels.device:
        raise ValueError(f"{name} is on {index.device} but labels is on {labels.device}")
    index = index.long()
    m = space_labels.numel()
    selected = index >= 0
    # (clamped so that an out-of-range index, refused below, cannot fault the gather)
    key_class = (
        space_labels[index.clamp(0, m - 1)] if m else torch.full_like(index, -1)
    )
    same = key_class == labels[:, None]
    if positive:
        wrong = ~same
        if in_batch:
            wrong |= index == torch.arange(labels.shape[0], device=index.device)[:, None]
        relation = "keys of the anchor's class, other than the anchor itself"
    else:
        wrong = same | (key_class < 0)
        relation = "valid keys (key label >= 0) of another class than the anchor's"
    wrong &= selected
    if not index.numel():
        return index
    # one host read for the range and the class relation
    low, high, count = torch.stack([index.min(), index.max(), wrong.sum()]).tolist()
    if low < -1 or high >= m:
        raise ValueError(
            f"{name} must hold key-space indices in [0, {m}) or -1 (padding), got values in "
            f"[{low}, {high}]"
        )
    if count:
        a, i = wrong.nonzero()[0].tolist()
        raise ValueError(
            f"{name} must select {relation}: {name}[{a}, {i}] = {int(index[a, i])} has key label "
            f"{int(key_class[a, i])}, anchor label {int(labels[a])} ({count} such entries)"
        )
    return index
