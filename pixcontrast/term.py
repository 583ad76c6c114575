"""The measured recipe as one module: ``loss = ce + term(features, labels, logits)``."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from . import _checks
from .heads import ProjectionHead
from .losses import PixelContrastLoss
from .memory import ClassMemoryBank
from .schedule import ContrastWeightSchedule

__all__ = ["ContrastTerm"]


class ContrastTerm(nn.Module):
    r"""The pixel contrast term of a segmentation loss, with the recipe built in.

    One module carries the :class:`~pixcontrast.ProjectionHead`, the
    :class:`~pixcontrast.PixelContrastLoss` and the
    :class:`~pixcontrast.ContrastWeightSchedule`, so that adding the term to a training loop
    is one line, ``loss = ce + term(features, labels, logits)``. A call returns

    .. math::
        w_t \cdot \mathcal{L}_\text{pixel}\big(\operatorname{head}(F), y, \text{logits}\big)

    with :math:`w_t` the schedule's weight at step :math:`t`: 0 for the first
    ``round(warmup * total_steps)`` steps, then a linear ramp over ``round(ramp * total_steps)``
    steps to ``weight``.

    The defaults are the recipe measured on the digit scenes of the README (weight 0.1 after a
    warm-up of 20 % of the steps and a ramp of 20 %, temperature 0.1, hard anchors from the
    logits, 1024 anchors per batch and at most 64 per image and class); without warm-up the
    same term cost 24 mIoU points there. Pass a catch-all class (a "background" that only means
    "not an object") in ``exclude_classes``: it stays in your cross-entropy and out of the
    contrast (3.6 mIoU points there). Datasets whose void pixels are ``ignore_index``
    (ADE20K, Cityscapes) need nothing.

    Behaviour:

    - **Steps.** A call in training mode with gradients enabled advances the schedule by one
      step, after computing the term (one call per optimiser step; with ``k`` accumulated
      micro-batches, count ``total_steps`` in calls). In ``eval()`` mode or under
      ``torch.no_grad()`` the schedule stands still and, with a ``memory``, nothing is
      enqueued.
    - **Warm-up.** While the weight is 0 nothing is computed (no head, no sampling, a memory
      not filled) and the call returns an exact zero connected to the graph of ``features`` and
      of every head parameter, so that ``DistributedDataParallel`` without
      ``find_unused_parameters`` sees a (zero) gradient for each of them. The input shapes are
      checked at every call, so a wrong ``in_channels`` fails at the first step, not after
      the warm-up.
    - **Logging.** :attr:`weight` is the weight the next training call applies;
      ``last_stats`` the last call's statistics (those of
      :attr:`PixelContrastLoss.last_stats <pixcontrast.PixelContrastLoss>` and ``weight``, its
      weight; only ``weight`` during the warm-up), detached tensors to ``.item()`` when logging.
      When the term switches on, :func:`~pixcontrast.gradient_ratio` of the returned value and
      the other loss at ``features`` says whether it dominates (lengthen the warm-up at a ratio
      above 1 with a cosine near 0; lower ``weight`` at a ratio in the tens).
    - **Checkpoints.** ``state_dict()`` holds the head, the schedule's step and configuration
      (as the module's extra state) and a memory bank's queue, so a resumed run continues its
      warm-up, ramp and memory where it stopped.
    - **DDP.** Put the term inside the wrapped model (or wrap it too) so its head's gradients are
      averaged; with ``gather=True`` each rank's anchors are contrasted with every rank's. A
      ``memory`` inside a DDP module needs ``broadcast_buffers=False`` (see
      :class:`~pixcontrast.ClassMemoryBank`).

    Args:
        in_channels: channels of the features ``[B, in_channels, h, w]`` (the decoder feature
            that the classifier reads; :class:`~pixcontrast.capture.FeatureCapture` takes it out
            of a model).
        num_classes: number of classes; labels outside ``[0, num_classes)`` other than
            ``ignore_index`` raise.
        total_steps: the run's training steps, which the warm-up and ramp are fractions of.
        weight: final weight of the term.
        warmup: fraction of ``total_steps`` with the term off.
        ramp: fraction of ``total_steps`` of the linear ramp after the warm-up.
        proj_dim: embedding dimension of the projection head (the paper's 256).
        head: ``"convmlp"`` (conv-BN-ReLU-conv, the paper's) or ``"linear"``.
        temperature: :math:`\tau` of the loss.
        ignore_index: label of unlabelled pixels (take the model's, e.g. a Hugging Face
            config's ``semantic_loss_ignore_index``).
        exclude_classes: classes left out of the contrast only (catch-all classes).
        max_samples: anchors per batch.
        max_views: most anchors per image and class.
        memory: a :class:`~pixcontrast.ClassMemoryBank` of ``proj_dim``-dimensional keys, or
            ``None``.
        gather: contrast with the anchors of every rank under ``torch.distributed``.

    Shape:
        - features: ``[B, in_channels, h, w]``
        - labels: ``[B, H, W]`` class ids (nearest-resized to ``h x w``)
        - logits (optional): ``[B, num_classes, h', w']``, for the hard anchors
        - output: scalar, the weighted term

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> backbone = torch.nn.Conv2d(3, 32, 3, padding=1)
        >>> classifier = torch.nn.Conv2d(32, 5, 1)
        >>> term = ContrastTerm(in_channels=32, num_classes=5, total_steps=10, proj_dim=16,
        ...                     exclude_classes=(4,), max_samples=256, max_views=32)
        >>> model = torch.nn.ModuleList([backbone, classifier, term])
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> weights = []
        >>> for step in range(10):
        ...     images, labels = torch.randn(2, 3, 16, 16), torch.randint(0, 5, (2, 16, 16))
        ...     features = backbone(images)
        ...     logits = classifier(features)
        ...     loss = F.cross_entropy(logits, labels) + term(features, labels, logits)
        ...     weights.append(round(term.last_stats["weight"].item(), 3))
        ...     optimizer.zero_grad()
        ...     loss.backward()
        ...     optimizer.step()
        >>> weights
        [0.0, 0.0, 0.05, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
        >>> term.state_dict()["_extra_state"]["step_count"]
        10
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        total_steps: int,
        weight: float = 0.1,
        warmup: float = 0.2,
        ramp: float = 0.2,
        proj_dim: int = 256,
        head: str = "convmlp",
        temperature: float = 0.1,
        ignore_index: int = 255,
        exclude_classes: Sequence[int] = (),
        max_samples: int = 1024,
        max_views: int = 64,
        memory: Optional[ClassMemoryBank] = None,
        gather: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = _checks.check_count(in_channels, "in_channels")
        total_steps = _checks.check_count(total_steps, "total_steps")
        for name, fraction in (("warmup", warmup), ("ramp", ramp)):
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
                    or not 0.0 <= fraction <= 1.0:
                raise ValueError(
                    f"{name} must be a fraction of total_steps in [0, 1], got {fraction!r}"
                )
        if warmup + ramp > 1.0:
            raise ValueError(
                f"warmup + ramp must be at most 1 (fractions of total_steps), got {warmup + ramp}"
            )
        if memory is not None and memory.dim != proj_dim:
            raise ValueError(f"memory holds {memory.dim}-dimensional keys but proj_dim={proj_dim}")
        self.head = ProjectionHead(in_channels, proj_dim=proj_dim, kind=head)
        self.loss = PixelContrastLoss(
            temperature, ignore_index=ignore_index, num_classes=num_classes,
            exclude_classes=exclude_classes, max_samples=max_samples, max_views=max_views,
            memory=memory, gather=gather,
            normalize=False,  # the head returns unit vectors
        )
        self.schedule = ContrastWeightSchedule(
            weight, warmup_steps=round(warmup * total_steps), ramp_steps=round(ramp * total_steps)
        )
        self._last_stats: Optional[dict[str, Tensor]] = None

    @property
    def last_stats(self) -> dict[str, Tensor]:
        """The last call's statistics and its ``weight`` (only ``weight`` during the warm-up).

        Raises before the first call.
        """
        if self._last_stats is None:
            raise RuntimeError("ContrastTerm.last_stats is set by the first call")
        return self._last_stats

    @property
    def weight(self) -> float:
        """The weight the next training call applies (0 during the warm-up)."""
        return self.schedule.value

    def forward(
        self,
        features: Tensor,
        labels: Tensor,
        logits: Optional[Tensor] = None,
        *,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """The weighted term of a batch (see the class docstring).

        Args:
            features: ``[B, in_channels, h, w]`` decoder features.
            labels: ``[B, H, W]`` integer class ids.
            logits: ``[B, num_classes, h', w']`` logits of the same batch, or ``None``
                (anchors are then drawn at random instead of half from mispredicted pixels).
            generator: CPU random source of the anchor choice.
        """
        _checks.check_embeddings(features, "features", 4)
        if features.shape[1] != self.in_channels:
            raise ValueError(
                f"features have {features.shape[1]} channels but the term was built with "
                f"in_channels={self.in_channels}"
            )
        _checks.check_labels(labels, "labels", 3)
        weight = self.schedule.value
        if weight == 0.0:
            term = self._connected_zero(features)
            self._last_stats = {"weight": torch.zeros(())}
        else:
            term = weight * self.loss(self.head(features), labels, predictions=logits,
                                      generator=generator)
            self._last_stats = {**self.loss.last_stats, "weight": torch.tensor(weight)}
        if self.training and torch.is_grad_enabled():
            self.schedule.step()
        return term

    def _connected_zero(self, features: Tensor) -> Tensor:
        """An exact 0 whose backward gives a zero gradient to ``features`` and every parameter.

        Sums of empty slices: exact whatever the values (a ``0 * x`` would be NaN at an
        infinite ``x``), and autograd still reaches every leaf, so DDP's reducer hears from
        each head parameter.
        """
        parts = [features, *self.head.parameters()]
        zero = sum(part.reshape(-1)[:0].sum() for part in parts)
        assert isinstance(zero, Tensor)  # (features are one of the parts)
        return zero.to(features.dtype)

    def get_extra_state(self) -> dict[str, Any]:
        """The schedule's state, saved by ``state_dict()``."""
        return self.schedule.state_dict()

    def set_extra_state(self, state: Any) -> None:
        """Restore the schedule from ``load_state_dict()``."""
        self.schedule.load_state_dict(state)

    def extra_repr(self) -> str:
        """The schedule, shown by ``repr``."""
        return f"schedule={self.schedule!r}"
