"""Input validation. Every message names the offending argument."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "check_choice",
    "check_embeddings",
    "check_finite",
    "check_labels",
    "check_positive",
    "check_same_device",
    "check_tensor",
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


def check_positive(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return float(value)


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
