"""The options every loss backend takes, validated once."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ContrastOptions"]


@dataclass(frozen=True)
class ContrastOptions:
    """Validated loss options, made by :func:`pixcontrast.functional.loss_options` and passed
    unchanged to the chosen backend and its autograd Function.

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
