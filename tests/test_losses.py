"""PixelContrastLoss and ProjectionHead: module equals functional, resizing, edge cases, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pixcontrast import (
    PixelContrastLoss,
    ProjectionHead,
    RandomAnchorSampler,
    contrastive_loss,
)
from pixcontrast.functional import resize_labels

from _helpers import make_maps


@pytest.mark.parametrize("variant", ["paper", "supcon"])
def test_module_equals_functional_on_the_sampled_anchors(variant, device, dtype):
    embeddings, labels = make_maps(scale=2, dtype=dtype, device=device)
    labels[0, :4] = 255
    criterion = PixelContrastLoss(temperature=0.2, base_temperature=0.1, variant=variant,
                                  max_samples=40, max_views=5)
    x = embeddings.clone().requires_grad_(True)
    loss = criterion(x, labels, generator=torch.Generator().manual_seed(1))
    sample = criterion.last_sample

    # independent gather: normalise, move channels last, pick the flat pixel indices
    b, d, h, w = embeddings.shape
    y = embeddings.clone().requires_grad_(True)
    pixels = F.normalize(y, dim=1).permute(0, 2, 3, 1).reshape(-1, d)
    small = resize_labels(labels, (h, w)).reshape(-1)
    assert (small[sample.indices] != 255).all()
    torch.testing.assert_close(sample.labels, small[sample.indices])
    expected = contrastive_loss(pixels[sample.indices], small[sample.indices], temperature=0.2,
                                base_temperature=0.1, variant=variant, backend="reference")
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_resize_labels_matches_nearest_interpolation(device):
    labels = torch.randint(0, 200, (2, 37, 23)).to(device)
    for size in [(9, 5), (37, 23), (50, 40)]:
        expected = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
        torch.testing.assert_close(resize_labels(labels, size), expected)


def test_sampling_is_reproducible_with_a_generator(device):
    embeddings, labels = make_maps(scale=2, seed=3, device=device)
    criterion = PixelContrastLoss(max_samples=20, max_views=3)
    first = criterion.sample(embeddings, labels, generator=torch.Generator().manual_seed(5))
    second = criterion.sample(embeddings, labels, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(first.indices, second.indices)


def test_predictions_as_logits_or_label_map_agree(device):
    embeddings, labels = make_maps(scale=2, seed=4, device=device)
    logits = torch.randn(2, 3, 9, 7, dtype=torch.float64).to(device)
    criterion = PixelContrastLoss(max_samples=30, max_views=4)
    from_logits = criterion.sample(embeddings, labels, logits,
                                   generator=torch.Generator().manual_seed(2))
    from_map = criterion.sample(embeddings, labels, logits.argmax(1),
                                generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(from_logits.indices, from_map.indices)
    assert from_logits.num_hard > 0


@pytest.mark.parametrize("variant", ["paper", "supcon"])
def test_edge_cases_give_a_connected_zero_or_finite_loss(variant, device, dtype):
    criterion = PixelContrastLoss(variant=variant, sampler=RandomAnchorSampler(64, 8))
    x = torch.randn(2, 4, 3, 3, dtype=dtype).to(device).requires_grad_()
    # no valid pixel
    loss = criterion(x, torch.full((2, 3, 3), 255, device=device))
    loss.backward()
    assert loss.item() == 0.0 and loss.requires_grad and not x.grad.any()
    # one pixel per image, different classes: no positives
    labels = torch.full((2, 3, 3), 255, device=device)
    labels[0, 0, 0], labels[1, 2, 2] = 1, 2
    assert criterion(x, labels).item() == 0.0
    # a single class everywhere: positives, no negatives
    loss = criterion(x, torch.zeros(2, 3, 3, dtype=torch.long, device=device))
    assert torch.isfinite(loss)


def test_module_errors_name_the_argument():
    x = torch.randn(2, 4, 3, 3)
    y = torch.randint(0, 3, (2, 6, 6))
    criterion = PixelContrastLoss(num_classes=3)
    cases = [
        (lambda: criterion(torch.randn(4, 3, 3), y), ValueError, "embeddings"),
        (lambda: criterion(x, y[0]), ValueError, "labels"),
        (lambda: criterion(x, y[:1]), ValueError, "labels"),
        (lambda: criterion(x, y.float()), TypeError, "labels"),
        (lambda: criterion(x, y, torch.randn(1, 3, 3, 3)), ValueError, "predictions"),
        (lambda: criterion(x, y, torch.randn(2, 3)), ValueError, "predictions"),
        (lambda: criterion(x, y, torch.randn(2, 4, 3, 3)), ValueError, "predictions"),
        (lambda: criterion(x, torch.full((2, 6, 6), 7)), ValueError, "labels"),
        (lambda: criterion(x, y.to("meta")), ValueError, "labels"),
        (lambda: criterion(x.clone().index_fill_(1, torch.tensor([2]), float("nan")), y),
         ValueError, "embeddings"),
        (lambda: criterion(x.clone().index_fill_(3, torch.tensor([0]), float("inf")), y),
         ValueError, "embeddings"),
        (lambda: PixelContrastLoss(temperature=0), ValueError, "temperature"),
        (lambda: PixelContrastLoss(variant="x"), ValueError, "variant"),
        (lambda: PixelContrastLoss(backend="x"), ValueError, "backend"),
        (lambda: PixelContrastLoss(num_classes=0), ValueError, "num_classes"),
    ]
    for fn, error, name in cases:
        with pytest.raises(error, match=name):
            fn()


def test_projection_head_outputs_unit_vectors():
    features = torch.randn(2, 12, 5, 7)
    for kind in ("convmlp", "linear"):
        head = ProjectionHead(12, proj_dim=6, kind=kind)
        out = head(features)
        assert out.shape == (2, 6, 5, 7)
        torch.testing.assert_close(out.norm(dim=1), torch.ones(2, 5, 7))
    with pytest.raises(ValueError, match="kind"):
        ProjectionHead(12, kind="mlp")
    with pytest.raises(ValueError, match="proj_dim"):
        ProjectionHead(12, proj_dim=0)
    with pytest.raises(ValueError, match="features"):
        ProjectionHead(12)(torch.randn(12, 5, 7))


def test_label_check_with_narrow_dtypes():
    embeddings = torch.randn(1, 4, 2, 2)
    labels = torch.tensor([[[0, 1], [2, 255]]], dtype=torch.uint8)
    PixelContrastLoss(num_classes=300)(embeddings, labels)  # 300 does not fit in uint8
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) \(num_classes=3\) or equal "
                                         r"ignore_index=-1.*pass ignore_index=255"):
        PixelContrastLoss(num_classes=3, ignore_index=-1)(embeddings, labels)  # 255 is not -1
