"""The loss modules as parts: a miner composed like a sampler and a memory, keyword-only options,
one spelling for gathering."""

from __future__ import annotations

import pytest
import torch

from pixcontrast import (
    ClassMemoryBank,
    HardAnchorSampler,
    KeyMiner,
    MinedContrastLoss,
    PixelContrastLoss,
    RegionContrastLoss,
    contrastive_loss,
)
from pixcontrast.functional import pair_contrastive_loss, region_embeddings
from pixcontrast.losses import SampledContrastLoss
from pixcontrast.mining import mine_keys

from _helpers import make_maps


def batch(seed=0):
    return make_maps(d=6, h=5, w=4, seed=seed)


def filled_bank(d=6, classes=3):
    bank = ClassMemoryBank(classes, d, pixels_per_class=12, regions_per_class=4).double()
    for seed in range(3):
        bank.enqueue(*make_maps(d=d, h=5, w=4, classes=classes, seed=10 + seed))
    return bank


def grad_of(loss, x):
    (grad,) = torch.autograd.grad(loss, x)
    return grad


@pytest.mark.parametrize("miner_name", ["hardest", "semi-hard", "class-relation"])
def test_pixel_loss_with_a_miner_is_mining_then_the_pair_loss_on_its_keys(miner_name):
    # The composed module against the plain calls on the anchors it drew and the memory's keys
    # as they were before its enqueue, the generator replayed for the miner's draws.
    bank = filled_bank()
    keys, key_labels = (t.clone() for t in bank.keys())
    miner = KeyMiner(miner_name, num_positives=2, num_negatives=3, fraction=0.5)
    criterion = PixelContrastLoss(max_samples=30, max_views=4, memory=bank, miner=miner,
                                  variant="supcon", temperature=0.2)
    embeddings, labels = batch()
    x = embeddings.clone().requires_grad_()
    generator = torch.Generator().manual_seed(5)
    loss = criterion(x, labels, generator=generator)
    got_grad = grad_of(loss, x)

    replay = torch.Generator().manual_seed(5)
    x2 = embeddings.clone().requires_grad_()
    sample = criterion.sampler(x2, labels, None, 255, replay)
    anchors = torch.nn.functional.normalize(sample.embeddings, dim=1)
    pairs = mine_keys(anchors, sample.labels, keys, key_labels, miner=miner_name,
                      num_positives=2, num_negatives=3, fraction=0.5, in_batch=True,
                      generator=replay)
    want = pair_contrastive_loss(anchors, sample.labels, keys, key_labels,
                                 pairs.positive_index, pairs.negative_index, in_batch=True,
                                 temperature=0.2, variant="supcon")
    assert torch.equal(criterion.last_sample.indices, sample.indices)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(got_grad, grad_of(want, x2), rtol=1e-10, atol=1e-14)
    every_key = contrastive_loss(anchors.detach(), sample.labels, keys, key_labels,
                                 in_batch=True, temperature=0.2, variant="supcon")
    assert abs(float(loss.detach()) - float(every_key)) > 1e-3  # the miner did restrict


def test_a_miner_that_keeps_every_key_gives_the_plain_loss():
    # With at least as many slots as candidates, the hardest miner selects every positive and
    # negative: the pair loss is then contrastive_loss, for the pixel and the region loss.
    bank = filled_bank()
    every = KeyMiner("hardest", num_positives=500, num_negatives=500)
    embeddings, labels = batch(seed=2)
    for loss_class in (PixelContrastLoss, RegionContrastLoss):
        results = []
        for miner in (None, every):
            criterion = loss_class(max_samples=40, max_views=5, memory=bank, miner=miner,
                                   enqueue=False)
            x = embeddings.clone().requires_grad_()
            loss = criterion(x, labels, generator=torch.Generator().manual_seed(1))
            results.append((loss, grad_of(loss, x)))
        (loss, grad), (mined, mined_grad) = results
        torch.testing.assert_close(mined, loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(mined_grad, grad, rtol=1e-10, atol=1e-14)


def test_region_loss_with_a_miner_mines_among_batch_and_memory_regions():
    bank = filled_bank()
    keys, key_labels = (t.clone() for t in bank.keys(pixels=False, regions=True))
    miner = KeyMiner("hardest", num_positives=1, num_negatives=2)
    criterion = RegionContrastLoss(max_samples=30, max_views=4, memory=bank, miner=miner)
    embeddings, labels = batch(seed=3)
    x = embeddings.clone().requires_grad_()
    loss = criterion(x, labels, generator=torch.Generator().manual_seed(2))
    sample = criterion.last_sample
    x2 = embeddings.clone().requires_grad_()
    anchors = torch.nn.functional.normalize(
        x2.permute(0, 2, 3, 1).reshape(-1, 6)[sample.indices], dim=1
    )
    regions, region_labels = region_embeddings(x2, labels, normalize_pixels=True)
    parts, part_labels = [regions, keys], [region_labels, key_labels]
    pairs = mine_keys(anchors, sample.labels, parts, part_labels, num_positives=1,
                      num_negatives=2, in_batch=False)
    want = pair_contrastive_loss(anchors, sample.labels, parts, part_labels,
                                 pairs.positive_index, pairs.negative_index, in_batch=False)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_of(loss, x), grad_of(want, x2), rtol=1e-10, atol=1e-14)


def test_key_parts_are_mined_and_scored_as_their_concatenation():
    g = torch.Generator().manual_seed(4)
    anchors = torch.nn.functional.normalize(torch.randn(9, 5, generator=g, dtype=torch.float64))
    labels = torch.arange(9) % 3
    first, second = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(
        4, 5, generator=g, dtype=torch.float64
    )
    first_labels, second_labels = torch.tensor([0, 1, 2, -1, 0, 1, 2]), torch.tensor([2, 2, 0, 1])
    whole, whole_labels = torch.cat([first, second]), torch.cat([first_labels, second_labels])
    for miner in ("hardest", "semi-hard", "class-relation"):
        split = mine_keys(anchors, labels, [first, second], [first_labels, second_labels],
                          miner=miner, num_positives=2, num_negatives=3,
                          generator=torch.Generator().manual_seed(0))
        joined = mine_keys(anchors, labels, whole, whole_labels, miner=miner, num_positives=2,
                           num_negatives=3, generator=torch.Generator().manual_seed(0))
        assert torch.equal(split.positive_index, joined.positive_index)
        assert torch.equal(split.negative_index, joined.negative_index)
    loss = pair_contrastive_loss(anchors, labels, [first, second], [first_labels, second_labels],
                                 split.positive_index, split.negative_index)
    want = pair_contrastive_loss(anchors, labels, whole, whole_labels, split.positive_index,
                                 split.negative_index)
    torch.testing.assert_close(loss, want, rtol=1e-14, atol=0)


def test_mined_contrast_loss_composes_a_key_miner():
    criterion = MinedContrastLoss("semi-hard", num_positives=2, num_negatives=3, fraction=0.5)
    assert isinstance(criterion.key_miner, KeyMiner)
    assert (criterion.miner, criterion.num_positives, criterion.num_negatives) == (
        "semi-hard", 2, 3
    )
    assert criterion.fraction == 0.5 and criterion.class_temperature == 0.5
    assert "KeyMiner('semi-hard', num_positives=2, num_negatives=3, fraction=0.5)" in repr(
        criterion
    )
    assert "miner=KeyMiner('hardest'" in repr(
        PixelContrastLoss(miner=KeyMiner(num_positives=1, num_negatives=1))
    )


def test_both_losses_share_one_base_and_its_options():
    with pytest.raises(TypeError, match="abstract"):
        SampledContrastLoss()  # a subclass says which keys the anchors meet
    for loss_class in (PixelContrastLoss, RegionContrastLoss):
        criterion = loss_class(0.2, variant="supcon", ignore_index=-1, gather=True)
        assert isinstance(criterion, SampledContrastLoss)
        assert (criterion.temperature, criterion.variant, criterion.ignore_index) == (
            0.2, "supcon", -1
        )
        assert criterion.gather is True


def test_every_option_but_temperature_is_keyword_only():
    for loss_class in (PixelContrastLoss, RegionContrastLoss):
        with pytest.raises(TypeError, match="positional"):
            loss_class(0.3, 0.6)
        assert loss_class(0.3, base_temperature=0.6).base_temperature == 0.6


def test_sampler_options_are_not_silently_dropped():
    with pytest.raises(ValueError, match="max_samples and max_views configure the default"):
        PixelContrastLoss(sampler=HardAnchorSampler(10, 2), max_samples=64)
    with pytest.raises(ValueError, match="max_samples and max_views"):
        RegionContrastLoss(sampler=HardAnchorSampler(10, 2), max_views=3)
    criterion = PixelContrastLoss(max_samples=64, max_views=3)
    assert (criterion.sampler.max_samples, criterion.sampler.max_views) == (64, 3)
    default = PixelContrastLoss().sampler
    assert (default.max_samples, default.max_views) == (1024, 100)


def test_miner_errors_name_the_argument():
    cases = [
        (lambda: PixelContrastLoss(miner="hardest"), TypeError, "miner"),
        (lambda: KeyMiner("hard", num_positives=1, num_negatives=1), ValueError, "miner"),
        (lambda: KeyMiner(num_positives=0, num_negatives=1), ValueError, "num_positives"),
        (lambda: KeyMiner(num_positives=1, num_negatives=0), ValueError, "num_negatives"),
        (lambda: KeyMiner("semi-hard", num_positives=1, num_negatives=1, fraction=0),
         ValueError, "fraction"),
        (lambda: KeyMiner(num_positives=1, num_negatives=1, class_temperature=0), ValueError,
         "class_temperature"),
    ]
    for fn, error, name in cases:
        with pytest.raises(error, match=name):
            fn()


def test_a_miner_in_a_batch_without_positives_gives_a_connected_zero():
    embeddings = torch.randn(1, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[[0, 1], [2, 255]]])  # one pixel per class: no positive
    criterion = PixelContrastLoss(miner=KeyMiner(num_positives=2, num_negatives=2))
    loss = criterion(embeddings, labels)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(embeddings.grad, torch.zeros_like(embeddings))
