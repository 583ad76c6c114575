"""Loss modules: configuration plus one call of :func:`pixcontrast.contrastive_loss`."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks
from ._dispatch import BACKEND_NAMES
from .functional import VARIANTS, contrastive_loss, resize_labels
from .samplers import AnchorSample, RandomAnchorSampler

__all__ = ["PixelContrastLoss", "prepare_pixel_inputs"]


def prepare_pixel_inputs(
    embeddings: Tensor,
    labels: Tensor,
    predictions: Optional[Tensor],
    ignore_index: int,
    num_classes: Optional[int] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Validate a batch and bring labels and predictions to the embeddings' resolution.

    Args:
        embeddings: ``[B, D, h, w]``.
        labels: ``[B, H, W]`` integer class ids (``ignore_index`` for unlabelled pixels).
        predictions: logits ``[B, C, h', w']`` or a label map ``[B, h', w']``, or ``None``.
        ignore_index: the label of unlabelled pixels.
        num_classes: when known, labels must lie in ``[0, num_classes)`` or be ``ignore_index``.

    Returns:
        ``(labels [B, h, w], predicted labels [B, h, w] or None)``.
    """
    _checks.check_embeddings(embeddings, "embeddings", 4)
    _checks.check_labels(labels, "labels", 3)
    _checks.check_same_device(
        [("embeddings", embeddings), ("labels", labels), ("predictions", predictions)]
    )
    batch, _, h, w = embeddings.shape
    if labels.shape[0] != batch:
        raise ValueError(
            f"labels has batch size {labels.shape[0]} but embeddings has {batch}"
        )
    predicted = None
    if predictions is not None:
        _checks.check_tensor(predictions, "predictions")
        if predictions.dim() == 4:
            if not predictions.is_floating_point():
                raise TypeError("predictions with 4 dimensions must be float logits [B, C, h, w]")
            classes = predictions.shape[1]
            if num_classes is not None and classes != num_classes:
                raise ValueError(
                    f"predictions has {classes} classes but num_classes is {num_classes}"
                )
            num_classes = classes
            predicted = predictions.detach().argmax(dim=1)
        elif predictions.dim() == 3:
            _checks.check_labels(predictions, "predictions", 3)
            predicted = predictions.detach()
        else:
            raise ValueError(
                "predictions must be logits [B, C, h, w] or a label map [B, h, w], "
                f"got shape {tuple(predictions.shape)}"
            )
        if predicted.shape[0] != batch:
            raise ValueError(
                f"predictions has batch size {predicted.shape[0]} but embeddings has {batch}"
            )
        predicted = resize_labels(predicted, (h, w))
    if num_classes is not None and labels.numel():
        valid = labels[labels != ignore_index]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_classes):
            raise ValueError(
                f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}; "
                f"found values in [{int(valid.min())}, {int(valid.max())}]"
            )
    return resize_labels(labels, (h, w)), predicted


class PixelContrastLoss(nn.Module):
    r"""Supervised pixel-to-pixel contrastive loss over a batch of segmentation embeddings.

    Labels (and predictions) are nearest-resized to the embeddings' resolution, anchors are
    sampled per image and class by ``sampler``, and :func:`~pixcontrast.contrastive_loss` contrasts
    them with each other (in-batch, across images). See that function for the math of the
    ``"paper"`` and ``"supcon"`` variants.

    Args:
        temperature: :math:`\tau`.
        base_temperature: the loss is scaled by ``temperature / base_temperature`` (``None``: 1).
        variant: ``"paper"`` or ``"supcon"``.
        max_samples: anchor budget per batch (used by the default sampler).
        max_views: most anchors per image and class (used by the default sampler).
        ignore_index: label of unlabelled pixels; they are never anchors.
        normalize: L2-normalise the embeddings over channels first.
        backend: ``"auto"``, ``"torch"`` or ``"reference"``; see ``contrastive_loss``.
        sampler: a callable ``(embeddings, labels, predictions, ignore_index, generator) ->``
            :class:`~pixcontrast.samplers.AnchorSample`; defaults to
            ``RandomAnchorSampler(max_samples, max_views)``.
        num_classes: when given, labels outside ``[0, num_classes)`` (other than
            ``ignore_index``) raise.

    Shape:
        - embeddings: ``[B, D, h, w]``
        - labels: ``[B, H, W]`` integer class ids
        - predictions (optional): logits ``[B, C, h', w']`` or a label map ``[B, h', w']``
        - output: scalar

    A batch with no valid pixel, or where no anchor has a positive, gives an exact zero that is
    connected to ``embeddings``. The anchors of the last call are kept in ``last_sample``.

    Example:
        >>> import torch
        >>> criterion = PixelContrastLoss(temperature=0.1, max_samples=64, max_views=8)
        >>> embeddings = torch.randn(2, 16, 8, 8, requires_grad=True)
        >>> labels = torch.randint(0, 3, (2, 32, 32))
        >>> loss = criterion(embeddings, labels)
        >>> loss.backward()
    """

    def __init__(
        self,
        temperature: float = 0.1,
        base_temperature: Optional[float] = None,
        variant: str = "paper",
        max_samples: int = 1024,
        max_views: int = 100,
        ignore_index: int = 255,
        normalize: bool = True,
        backend: str = "auto",
        sampler=None,
        num_classes: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.temperature = _checks.check_positive(temperature, "temperature")
        if base_temperature is not None:
            _checks.check_positive(base_temperature, "base_temperature")
        self.base_temperature = base_temperature
        self.variant = _checks.check_choice(variant, "variant", VARIANTS)
        self.ignore_index = int(ignore_index)
        self.normalize = bool(normalize)
        self.backend = _checks.check_choice(backend, "backend", BACKEND_NAMES)
        if sampler is None:
            sampler = RandomAnchorSampler(max_samples, max_views)
        self.sampler = sampler
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes <= 0):
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = num_classes
        self.last_sample: Optional[AnchorSample] = None

    def sample(
        self,
        embeddings: Tensor,
        labels: Tensor,
        predictions: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> AnchorSample:
        """The anchors ``forward`` would contrast (after resizing and normalising)."""
        labels, predicted = prepare_pixel_inputs(
            embeddings, labels, predictions, self.ignore_index, self.num_classes
        )
        if self.normalize:
            embeddings = F.normalize(embeddings, p=2, dim=1)
        return self.sampler(embeddings, labels, predicted, self.ignore_index, generator)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        predictions: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        sample = self.sample(embeddings, labels, predictions, generator)
        self.last_sample = sample
        return contrastive_loss(
            sample.embeddings,
            sample.labels,
            temperature=self.temperature,
            base_temperature=self.base_temperature,
            variant=self.variant,
            reduction="mean",
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, base_temperature={self.base_temperature}, "
            f"variant={self.variant!r}, ignore_index={self.ignore_index}, "
            f"backend={self.backend!r}"
        )
