"""Input validation. Every message names the offending argument."""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "CONVENTIONAL_IGNORE",
    "check_pixel_maps",
    "check_choice",
    "check_count",
    "check_fraction",
    "check_embeddings",
    "check_exclude_classes",
    "check_finite",
    "check_ignore_index",
    "check_label_values",
    "label_range_error",
    "check_labels",
    "check_mask",
    "check_positive",
    "check_same_device",
    "check_size",
    "check_tensor",
    "out_of_bounds",
]


def check_tensor(value: object, name: str, ndim: Optional[int] = None) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def check_embeddings(value: object, name: str, ndim: int) -> Tensor:
    tensor = check_tensor(value, name, ndim)
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    return tensor


def check_labels(value: object, name: str, ndim: int) -> Tensor:
    tensor = check_tensor(value, name, ndim)
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class ids, got dtype {tensor.dtype}")
    return tensor


def check_finite(tensor: Tensor, name: str) -> None:
    # A finite sum proves every entry finite at the cost of one read; only a non-finite sum
    # (a NaN/Inf entry, or an overflow of huge finite values) needs the exact elementwise test.
    if not tensor.numel() or bool(torch.isfinite(tensor.sum())):
        return
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def check_label_values(
    labels: Tensor, num_classes: int, ignore_index: int, name: str, bound: Optional[str] = None
) -> None:
    """Raise unless every entry of ``labels`` lies in ``[0, num_classes)`` or is ``ignore_index``.

    One elementwise pass and one host synchronisation; the values are gathered only to word
    the error, which says where the bound comes from (``bound``; default
    ``num_classes=<num_classes>``).
    """
    labels = labels.long()  # (a narrower dtype would wrap the Python ints it is compared with)
    outside = (labels < 0) | (labels >= num_classes)
    bad = outside & (labels != ignore_index)
    if not bool(bad.any()):
        return
    raise label_range_error(labels, bad, num_classes, ignore_index, name, bound)


CONVENTIONAL_IGNORE = (255, -100)
"""The labels that datasets and ``F.cross_entropy`` conventionally give unlabelled pixels."""


def label_range_error(
    labels: Tensor,
    bad: Tensor,
    num_classes: int,
    ignore_index: int,
    name: str = "labels",
    bound: Optional[str] = None,
) -> ValueError:
    """The error for the entries of ``labels`` where ``bad`` (outside the classes, not ignored).

    ``bound`` says where ``num_classes`` comes from, as the caller passed it. When a bad value
    is a conventional ignore label (:data:`CONVENTIONAL_IGNORE`), the error suggests it as
    ``ignore_index``. For error paths only: it synchronises with the host.
    """
    bound = f"num_classes={num_classes}" if bound is None else bound
    hint = "pass num_classes (of the loss or the sampler) that covers every class"
    for value in CONVENTIONAL_IGNORE:
        if value != ignore_index and bool((labels[bad] == value).any()):
            hint = f"if {value} marks unlabelled pixels, pass ignore_index={value}; else " + hint
    return ValueError(
        f"{name} must lie in [0, {num_classes}) ({bound}) or equal ignore_index={ignore_index}; "
        f"{out_of_bounds(labels, bad)}: {hint}"
    )


def out_of_bounds(labels: Tensor, bad: Tensor) -> str:
    """The error text for the entries of ``labels`` where ``bad``.

    Worded like ``F.cross_entropy``'s ("Target 300 is out of bounds"). For error paths only: it
    synchronises with the host.
    """
    values = labels[bad]
    first, low, high = torch.stack([values[0], values.min(), values.max()]).tolist()
    return f"target {first} is out of bounds ({values.numel()} such values, in [{low}, {high}])"


def check_ignore_index(value: object, name: str = "ignore_index") -> int:
    """An integer label (any sign) that marks unlabelled pixels.

    Never a float, bool or string, which a comparison with integer labels would silently
    reinterpret.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer label, got {type(value).__name__} {value!r}")
    return int(value)


def _check_number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def check_positive(value: float, name: str) -> float:
    number = _check_number(value, name)
    if not 0.0 < number < math.inf:  # (False for NaN)
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return number


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return str(value)


def check_same_device(named: Iterable[tuple[str, Optional[Tensor]]]) -> None:
    present = [(name, t) for name, t in named if t is not None]
    if not present:
        return
    first_name, first = present[0]
    for name, tensor in present[1:]:
        if tensor.device != first.device:
            raise ValueError(
                f"{name} is on {tensor.device} but {first_name} is on {first.device}; "
                "move them to one device"
            )


def check_count(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_fraction(value: object, name: str, allow_zero: bool = True) -> float:
    """A number in ``[0, 1]`` (``(0, 1]`` when ``allow_zero`` is false); never NaN."""
    number = _check_number(value, name)
    low_ok = number >= 0.0 if allow_zero else number > 0.0
    if not (low_ok and number <= 1.0):  # (False for NaN)
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return number


def check_size(value: object, name: str) -> tuple[int, int]:
    """A spatial size ``(h, w)`` of two non-negative integers."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (h, w) of integers, got {value!r}")
    for entry in value:
        if isinstance(entry, bool) or not isinstance(entry, numbers.Integral):
            raise TypeError(f"{name} must be a pair (h, w) of integers, got {value!r}")
        if entry < 0:
            raise ValueError(f"{name} must be a pair (h, w) of sizes >= 0, got {value!r}")
    return int(value[0]), int(value[1])


def check_mask(value: object, name: str, shape: Sequence[int], other: str) -> Tensor:
    """A bool tensor of ``shape``, the shape of the argument named ``other``."""
    mask = check_tensor(value, name)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"{name} must have the shape of {other}, {list(shape)}, got {list(mask.shape)}"
        )
    return mask




def check_pixel_maps(embeddings: object, labels: object) -> tuple[Tensor, Tensor]:
    """Embedding maps ``[B, D, h, w]`` and integer label maps ``[B, h, w]``, validated.

    The two must be of the same batch and resolution.
    """
    embeddings = check_embeddings(embeddings, "embeddings", 4)
    labels = check_labels(labels, "labels", 3)
    b, _, h, w = embeddings.shape
    if tuple(labels.shape) != (b, h, w):
        raise ValueError(
            f"labels must be [B, h, w] = {[b, h, w]} (the embeddings' batch and resolution), "
            f"got {list(labels.shape)}"
        )
    return embeddings, labels




def check_exclude_classes(
    exclude_classes: object, ignore_index: int, num_classes: Optional[int] = None
) -> tuple[int, ...]:
    """``exclude_classes`` as a sorted tuple of distinct class ids, validated.

    The ids are integers in ``[0, num_classes)`` when ``num_classes`` is known, else ``>= 0``,
    never ``ignore_index``.
    """
    if isinstance(exclude_classes, int) and not isinstance(exclude_classes, bool):
        raise TypeError(
            f"exclude_classes must be a sequence of class ids, e.g. ({exclude_classes},), "
            "not an int"
        )
    try:
        values = list(exclude_classes)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(
            "exclude_classes must be a sequence of class ids, got "
            f"{type(exclude_classes).__name__}"
        ) from None
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"exclude_classes must hold integers, got {value!r}")
        high = f", {num_classes})" if num_classes is not None else ", inf)"
        if value < 0 or (num_classes is not None and value >= num_classes):
            raise ValueError(f"exclude_classes must lie in [0{high}, got {value}")
        if value == ignore_index:
            raise ValueError(
                f"exclude_classes holds ignore_index={ignore_index}, which is never contrasted "
                "anyway"
            )
    if len(set(values)) != len(values):
        raise ValueError(f"exclude_classes holds a class twice: {values}")
    return tuple(sorted(values))
