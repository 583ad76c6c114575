"""Step-driven weight of the contrast term: off during a warm-up, then a linear ramp."""

from __future__ import annotations

from typing import Any

from . import _checks

__all__ = ["ContrastWeightSchedule"]


class ContrastWeightSchedule:
    r"""Weight of the contrast term as a function of the training step.

    With final weight :math:`w`, warm-up :math:`W` and ramp :math:`R` steps, the weight at step
    :math:`t` (0-based: the number of :meth:`step` calls so far) is

    .. math::
        w_t = \begin{cases} 0 & t < W \\
              w \cdot \min\!\big(1, \frac{t - W + 1}{R}\big) & t \ge W,\ R > 0 \\
              w & t \ge W,\ R = 0 \end{cases}

    so the term is off for the first :math:`W` steps and reaches :math:`w` at step
    :math:`W + R - 1`.

    Why a warm-up: the hard-anchor sampler picks mispredicted pixels, which only means something
    once the classifier predicts; and the term's gradient, scaled by :math:`1/\tau`, can dwarf the
    cross-entropy's on features that are still random. The ramp avoids a jump in the loss when the
    term switches on.

    The memory bank during warm-up: skip the contrast call altogether while :attr:`active` is
    false, so the bank is not filled then. The projection head is trained only by the contrast
    term, so during the warm-up its embeddings are projections by an untrained head; enqueued,
    they would be the first keys of every class when the term switches on. Left empty, the bank
    fills with current embeddings from the first active step (in-batch keys exist from that step
    anyway) and the ramp keeps the weight small while it fills. Skipping also saves the term's
    cost during the warm-up.

    Resuming: :meth:`state_dict` / :meth:`load_state_dict` hold the step and the configuration,
    so a restored schedule continues where it was.

    Args:
        weight: final weight :math:`w \ge 0`.
        warmup_steps: steps with weight 0, :math:`W \ge 0`.
        ramp_steps: steps of the linear ramp after the warm-up, :math:`R \ge 0` (0: a jump).

    Example:
        >>> schedule = ContrastWeightSchedule(0.1, warmup_steps=2, ramp_steps=2)
        >>> values = []
        >>> for _ in range(5):
        ...     values.append(round(schedule.value, 3))
        ...     schedule.step()
        >>> values
        [0.0, 0.0, 0.05, 0.1, 0.1]
    """

    def __init__(self, weight: float, warmup_steps: int = 0, ramp_steps: int = 0) -> None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"weight must be a number, got {type(weight).__name__}")
        if not 0.0 <= weight < float("inf"):
            raise ValueError(f"weight must be a finite number >= 0, got {weight}")
        self.weight = float(weight)
        self.warmup_steps = _checks.check_count(warmup_steps, "warmup_steps", minimum=0)
        self.ramp_steps = _checks.check_count(ramp_steps, "ramp_steps", minimum=0)
        self.step_count = 0

    def weight_at(self, step: int) -> float:
        """The weight at a given 0-based ``step`` (the formula above)."""
        _checks.check_count(step, "step", minimum=0)
        if step < self.warmup_steps:
            return 0.0
        if self.ramp_steps == 0:
            return self.weight
        return self.weight * min(1.0, (step - self.warmup_steps + 1) / self.ramp_steps)

    @property
    def value(self) -> float:
        """The weight at the current step."""
        return self.weight_at(self.step_count)

    def __call__(self) -> float:
        """The weight at the current step (same as :attr:`value`)."""
        return self.value

    @property
    def active(self) -> bool:
        """Whether the term is on at the current step (weight > 0)."""
        return self.value > 0.0

    @property
    def first_active_step(self) -> int:
        """The first 0-based step with a non-zero weight (when ``weight > 0``)."""
        return self.warmup_steps

    def step(self) -> None:
        """Advance by one training step (call it once per optimiser step)."""
        self.step_count += 1

    def state_dict(self) -> dict[str, Any]:
        """The step and the configuration, for a checkpoint."""
        return {"weight": self.weight, "warmup_steps": self.warmup_steps,
                "ramp_steps": self.ramp_steps, "step_count": self.step_count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (validated as the constructor validates)."""
        expected = {"weight", "warmup_steps", "ramp_steps", "step_count"}
        if not isinstance(state_dict, dict) or set(state_dict) != expected:
            keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict)
            raise ValueError(f"state_dict must have the keys {sorted(expected)}, got {keys}")
        restored = ContrastWeightSchedule(
            state_dict["weight"], state_dict["warmup_steps"], state_dict["ramp_steps"]
        )
        restored.step_count = _checks.check_count(state_dict["step_count"], "step_count", 0)
        self.__dict__.update(restored.__dict__)

    def __repr__(self) -> str:
        return (
            f"ContrastWeightSchedule(weight={self.weight}, warmup_steps={self.warmup_steps}, "
            f"ramp_steps={self.ramp_steps}, step_count={self.step_count})"
        )
