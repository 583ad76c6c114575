"""pixel_maps, the one entry that validates a batch and brings its maps to the embedding
resolution, and its single use per forward of a loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pixcontrast._checks
from pixcontrast import ClassMemoryBank, HardAnchorSampler, PixelContrastLoss
from pixcontrast._pixels import pixel_maps, prepare_pixel_maps


def nearest(value, size):
    """``F.interpolate(mode="nearest")`` of a ``[B, H, W]`` or ``[B, C, H, W]`` map."""
    if value.dim() == 3:
        return F.interpolate(value[:, None].double(), size, mode="nearest")[:, 0].long()
    return F.interpolate(value, size, mode="nearest")


def test_pixel_maps_resize_labels_predictions_and_logits_like_interpolate(device, dtype):
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(2, 4, 7, 5, generator=g, dtype=dtype).to(device)
    labels = torch.randint(0, 3, (2, 26, 19), generator=g).to(device)
    predictions = torch.randint(0, 3, (2, 9, 11), generator=g).to(device)
    logits = torch.randn(2, 3, 13, 6, generator=g, dtype=dtype).to(device)
    maps = pixel_maps(embeddings, labels, predictions, logits, num_classes=3)
    assert torch.equal(maps.labels, nearest(labels, (7, 5)))
    assert torch.equal(maps.predictions, nearest(predictions, (7, 5)))
    assert torch.equal(maps.logits, nearest(logits, (7, 5)))
    assert torch.equal(maps.predicted, maps.predictions)


def test_pixel_maps_keep_maps_at_the_resolution_and_take_the_argmax_of_logits(device):
    embeddings = torch.randn(1, 2, 3, 3).to(device)
    labels = torch.zeros(1, 3, 3, dtype=torch.long, device=device)
    logits = torch.randn(1, 4, 3, 3).to(device)
    maps = pixel_maps(embeddings, labels, logits=logits)
    assert maps.labels is labels and maps.logits is logits
    assert torch.equal(maps.predicted, logits.argmax(dim=1))
    assert pixel_maps(embeddings, labels).predicted is None


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"labels": torch.zeros(3, 4, 4, dtype=torch.long)}, ValueError, "labels has batch size 3"),
        ({"labels": torch.zeros(2, 4, 4)}, TypeError, "labels"),
        ({"predictions": torch.zeros(2, 4, 0, dtype=torch.long)}, ValueError, "predictions"),
        ({"logits": torch.zeros(2, 0, 4, 4)}, ValueError, "logits must have at least one class"),
        ({"logits": torch.zeros(1, 3, 4, 4)}, ValueError, "logits of shape"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index"),
        ({"num_classes": 1, "labels": torch.ones(2, 8, 8, dtype=torch.long)}, ValueError,
         r"labels must lie in \[0, 1\)"),
    ],
)
def test_pixel_maps_errors(kwargs, error, match):
    arguments = {"labels": torch.zeros(2, 8, 8, dtype=torch.long), **kwargs}
    with pytest.raises(error, match=match):
        pixel_maps(torch.randn(2, 3, 4, 4), **arguments)


def test_prepare_pixel_maps_takes_logits_or_a_label_map_as_predictions():
    embeddings, labels = torch.randn(1, 2, 2, 2), torch.zeros(1, 4, 4, dtype=torch.long)
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    maps = prepare_pixel_maps(embeddings, labels, logits, 255)
    assert maps.predictions is None and not maps.logits.requires_grad
    assert torch.equal(maps.logits, nearest(logits.detach(), (2, 2)))
    label_map = prepare_pixel_maps(embeddings, labels, logits.argmax(dim=1), 255)
    assert torch.equal(label_map.predicted, maps.predicted) and label_map.logits is None
    with pytest.raises(ValueError, match="predictions of shape"):
        prepare_pixel_maps(embeddings, labels, torch.randn(2, 3, 4, 4), 255)
    with pytest.raises(ValueError, match="labels must lie in"):  # the logits' classes bound them
        prepare_pixel_maps(embeddings, labels + 3, logits, 255)


def count_label_checks(monkeypatch):
    calls = []
    check = pixcontrast._checks.check_label_values
    monkeypatch.setattr(
        pixcontrast._checks, "check_label_values", lambda *a: calls.append(1) or check(*a)
    )
    return calls


def test_a_loss_with_memory_validates_the_labels_once(monkeypatch):
    bank = ClassMemoryBank(3, 4, pixels_per_class=8, regions_per_class=4)
    criterion = PixelContrastLoss(max_samples=16, max_views=4, memory=bank)
    embeddings = torch.randn(2, 4, 4, 4, requires_grad=True)
    labels = torch.randint(0, 3, (2, 8, 8))
    calls = count_label_checks(monkeypatch)
    criterion(embeddings, labels, torch.randn(2, 3, 8, 8)).backward()
    assert len(calls) == 1
    assert int(bank.region_count.sum()) > 0


def test_public_sampler_and_enqueue_still_validate(monkeypatch):
    calls = count_label_checks(monkeypatch)
    bank = ClassMemoryBank(3, 4, pixels_per_class=8, regions_per_class=4)
    with pytest.raises(ValueError, match="labels must lie in"):
        bank.enqueue(torch.randn(1, 4, 2, 2), torch.full((1, 4, 4), 3))
    assert len(calls) == 1
    with pytest.raises(ValueError, match="predictions of shape"):
        HardAnchorSampler()(
            torch.randn(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long),
            torch.zeros(2, 2, 2, dtype=torch.long),
        )
