"""Anchor samplers: counts, class balance, hard/easy split, edge cases, reproducibility."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pixcontrast import contrastive_loss
from pixcontrast.functional import gather_pixels
from pixcontrast.samplers import (
    ConfidenceAnchorSampler,
    HardAnchorSampler,
    RandomAnchorSampler,
    anchor_quotas,
    select_anchors,
)

IGNORE = 255


def expected_counts(labels, predictions, max_samples, max_views, min_pixels, hard_fraction):
    """The selection rule, pair by pair with plain Python loops: {(image, class, hard): count}."""
    b = labels.shape[0]
    pairs = {}
    for i in range(b):
        y = labels[i].flatten().tolist()
        p = y if predictions is None else predictions[i].flatten().tolist()
        for c in set(y) - {IGNORE}:
            n_hard = sum(1 for a, q in zip(y, p) if a == c and q != c)
            n_easy = sum(1 for a, q in zip(y, p) if a == c and q == c)
            pairs[(i, c)] = (n_hard, n_easy)
    out = quotas_by_loop(pairs, max_samples, max_views, min_pixels, hard_fraction)
    return {k: v for k, v in out.items() if v}


def quotas_by_loop(pairs, max_samples, max_views, min_pixels, hard_fraction):
    """The documented quotas of {pair: (n_hard, n_easy)}: {(*pair, hard): count} for the pairs
    with at least ``min_pixels`` pixels."""
    pairs = {key: counts for key, counts in pairs.items() if sum(counts) >= min_pixels}
    if max_samples is None:
        n_view = max_views
    else:
        n_view = min(max_samples // max(len(pairs), 1), max_views)
    q_hard = math.floor(n_view * hard_fraction)
    q_easy = n_view - q_hard
    out = {}
    for key, (n_hard, n_easy) in pairs.items():
        out[(*key, True)] = min(n_hard, q_hard + max(0, q_easy - n_easy))
        out[(*key, False)] = min(n_easy, q_easy + max(0, q_hard - n_hard))
    return out


def observed_counts(sample, labels, predictions):
    hw = labels.shape[1] * labels.shape[2]
    flat_y = labels.flatten()
    flat_p = flat_y if predictions is None else predictions.flatten()
    return Counter(
        (i // hw, int(flat_y[i]), bool(flat_p[i] != flat_y[i])) for i in sample.indices.tolist()
    )


def hand_built():
    """Two 4 x 8 images. Image 0: class 0 (16 px, 4 misclassified), class 1 (12 px, 10
    misclassified), 4 ignored px. Image 1: class 2 (30 px, none misclassified), class 3 (2 px)."""
    labels = torch.full((2, 4, 8), IGNORE)
    labels[0, :2] = 0
    labels[0, 2:, :6] = 1
    labels[1] = 2
    labels[1, 3, :2] = 3
    predictions = labels.clone()
    predictions[0, 0, :4] = 5
    predictions[0, 2:, :5] = 0
    predictions[predictions == IGNORE] = 0
    return labels, predictions


@pytest.mark.parametrize(
    "max_samples, max_views, min_pixels, hard_fraction",
    [(24, 6, 1, 0.5), (24, 6, 7, 0.5), (1000, 8, 1, 0.25), (12, 100, 3, 1.0), (40, 9, 1, 0.0)],
)
def test_counts_follow_the_rule(max_samples, max_views, min_pixels, hard_fraction, device):
    labels, predictions = (t.to(device) for t in hand_built())
    embeddings = torch.randn(2, 3, 4, 8).to(device)
    sampler = HardAnchorSampler(max_samples, max_views, min_pixels, hard_fraction)
    sample = sampler(embeddings, labels, predictions, IGNORE, torch.Generator().manual_seed(0))
    want = expected_counts(labels, predictions, max_samples, max_views, min_pixels, hard_fraction)
    assert observed_counts(sample, labels, predictions) == Counter(want)
    assert sample.num_hard == sum(v for k, v in want.items() if k[2])
    assert sample.num_easy == sum(v for k, v in want.items() if not k[2])


def test_hand_built_split(device):
    labels, predictions = (t.to(device) for t in hand_built())
    # 4 pairs -> n_view = min(24 // 4, 6) = 6: 3 hard + 3 easy where both groups are large
    sample = HardAnchorSampler(24, 6)(torch.randn(2, 3, 4, 8).to(device), labels, predictions)
    counts = observed_counts(sample, labels, predictions)
    assert counts[(0, 0, True)] == 3 and counts[(0, 0, False)] == 3
    assert counts[(0, 1, True)] == 4 and counts[(0, 1, False)] == 2  # 2 easy only: top-up
    assert counts[(1, 2, False)] == 6 and counts[(1, 2, True)] == 0  # no hard pixel: top-up
    assert counts[(1, 3, False)] == 2  # small class: all of its pixels
    assert sample.num_hard == 7 and sample.num_easy == 13


def test_published_rule_skips_small_classes():
    labels, predictions = hand_built()
    sample = HardAnchorSampler(24, 6, min_pixels=7)(torch.randn(2, 3, 4, 8), labels, predictions)
    assert 3 not in sample.labels.tolist()
    # 3 qualifying pairs: n_view = min(24 // 3, 6) = 6 per pair
    assert Counter(sample.labels.tolist()) == {0: 6, 1: 6, 2: 6}


@pytest.mark.parametrize("seed", range(6))
def test_random_maps_match_the_rule(seed, device, dtype):
    g = torch.Generator().manual_seed(seed)
    b, h, w = 3, 5, 7
    labels = torch.randint(0, 4, (b, h, w), generator=g)
    labels[torch.rand(b, h, w, generator=g) < 0.2] = IGNORE
    predictions = torch.where(
        torch.rand(b, h, w, generator=g) < 0.4, torch.randint(0, 4, (b, h, w), generator=g),
        labels,
    )
    embeddings = torch.randn(b, 2, h, w, generator=g, dtype=dtype)
    labels, predictions = labels.to(device), predictions.to(device)
    embeddings = embeddings.to(device)
    max_samples, max_views, min_pixels = int(torch.randint(1, 40, (1,), generator=g)), 5, 2
    fraction = float(torch.rand(1, generator=g))
    sampler = HardAnchorSampler(max_samples, max_views, min_pixels, fraction, num_classes=4)
    sample = sampler(embeddings, labels, predictions, IGNORE, g)
    want = expected_counts(labels, predictions, max_samples, max_views, min_pixels, fraction)
    assert observed_counts(sample, labels, predictions) == Counter(want)
    assert sample.indices.unique().numel() == sample.indices.numel()
    assert torch.equal(sample.labels, labels.flatten()[sample.indices])
    flat = embeddings.permute(0, 2, 3, 1).reshape(-1, 2)
    assert torch.equal(sample.embeddings, flat[sample.indices])


def test_ignore_never_sampled_and_no_predictions_is_all_easy():
    labels = torch.full((2, 6, 6), IGNORE)
    labels[:, :2] = 1
    sample = RandomAnchorSampler(1000, 100)(torch.randn(2, 4, 6, 6), labels)
    assert set(sample.labels.tolist()) == {1}
    assert sample.indices.numel() == 24 and sample.num_hard == 0
    sample = HardAnchorSampler(1000, 100)(torch.randn(2, 4, 6, 6), labels)
    assert sample.num_hard == 0 and sample.num_easy == 24


def test_ignore_index_negative_one():
    labels = torch.tensor([[[-1, 0, 0, 1]]])
    sample = RandomAnchorSampler(10, 10)(torch.randn(1, 2, 1, 4), labels, ignore_index=-1)
    assert sample.indices.tolist() == [1, 2, 3]


def test_random_sampler_ignores_predictions():
    labels, predictions = hand_built()
    sample = RandomAnchorSampler(24, 6)(torch.randn(2, 3, 4, 8), labels, predictions)
    assert Counter(sample.labels.tolist()) == {0: 6, 1: 6, 2: 6, 3: 2}
    assert sample.num_hard == 0


def test_reproducible_with_generator():
    labels = torch.randint(0, 5, (2, 16, 16))
    predictions = torch.randint(0, 5, (2, 16, 16))
    embeddings = torch.randn(2, 3, 16, 16)
    sampler = HardAnchorSampler(64, 10)

    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return sampler(embeddings, labels, predictions, generator=generator)

    assert torch.equal(draw(1).indices, draw(1).indices)
    assert not torch.equal(draw(1).indices, draw(2).indices)


def draws_per_image(sampler_size, pixels, calls, images, seed=0):
    """``[calls * images, sampler_size]``: the pixels that ``RandomAnchorSampler`` draws from
    each of ``images`` one-class images of ``pixels`` pixels (``sampler_size`` per image), over
    ``calls`` calls with one generator; the draws are independent within a call and from call to
    call. (A few images per call: the sampler's tensors, such as its histogram of 9 x 2 x 257
    counters per image, then stay small enough for torch to run them on one thread, which on a
    busy 2-core machine is faster than two.)"""
    labels = torch.zeros(images, 1, pixels, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    sampler = RandomAnchorSampler(sampler_size * images, sampler_size)  # n_view = sampler_size
    draws = []
    for _ in range(calls):
        indices = sampler(torch.randn(images, 1, 1, pixels), labels, generator=g).indices
        assert bool((indices.diff() > 0).all())  # increasing, as documented
        image = torch.arange(images).repeat_interleave(sampler_size)
        assert torch.equal(indices // pixels, image)
        draws.append((indices % pixels).view(images, sampler_size))
    return torch.cat(draws)


def test_draws_are_uniform_within_a_group():
    draws = 600  # 100 calls of 6 images
    hits = torch.bincount(draws_per_image(3, 12, calls=100, images=6).flatten(), minlength=12)
    # each pixel is drawn with probability 3 / 12; binomial sd = sqrt(600 * 0.25 * 0.75) ~ 10.6
    assert (hits - draws * 3 / 12).abs().max() < 45


def test_empty_sample_gives_zero_loss():
    embeddings = torch.randn(2, 4, 3, 3, requires_grad=True)
    labels = torch.full((2, 3, 3), IGNORE)
    sample = HardAnchorSampler()(embeddings, labels, labels)
    assert sample.embeddings.shape == (0, 4) and sample.indices.numel() == 0
    assert sample.num_hard == 0 and sample.num_easy == 0
    loss = contrastive_loss(sample.embeddings, sample.labels)
    assert loss.item() == 0.0
    loss.backward()
    assert embeddings.grad is not None and not embeddings.grad.any()


def test_too_many_pairs_for_the_budget_is_empty():
    labels = torch.arange(8).view(1, 2, 4)
    sample = RandomAnchorSampler(max_samples=4, max_views=2)(torch.randn(1, 3, 2, 4), labels)
    assert sample.indices.numel() == 0  # n_view = 4 // 8 = 0


def test_logits_give_predictions_and_are_resized():
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    logits = torch.zeros(1, 2, 4, 4)
    logits[0, 1, :2, :2] = 5.0  # top-left pixel (at 2 x 2) predicted as class 1
    sample = HardAnchorSampler(100, 100)(torch.randn(1, 3, 2, 2), labels, logits=logits)
    assert sample.num_hard == 1 and sample.num_easy == 3


def test_confidence_sampler():
    labels = torch.tensor([[[0, 0, 0, 1, 1, 1, 255, 2]]])
    logits = torch.zeros(1, 3, 1, 8)
    logits[0, 0, 0, :2] = 10.0  # confident and right
    logits[0, 1, 0, 3] = 10.0  # confident and right
    logits[0, 2, 0, 7] = 10.0
    # pixels 2, 4, 5 (and the ignored 6) are uncertain
    sampler = ConfidenceAnchorSampler(max_views=5, threshold=0.9)
    sample = sampler(torch.randn(1, 2, 1, 8), labels, logits=logits)
    assert sample.indices.tolist() == [2, 4, 5]
    assert sample.num_hard == 3 and sample.num_easy == 0
    capped = ConfidenceAnchorSampler(max_views=1, threshold=0.9)(
        torch.randn(1, 2, 1, 8), labels, logits=logits
    )
    assert Counter(capped.labels.tolist()) == {0: 1, 1: 1}
    assert ConfidenceAnchorSampler(5, 0.0)(torch.randn(1, 2, 1, 8), labels, logits=logits)\
        .indices.numel() == 0


def test_module_accepts_the_hard_sampler():
    from pixcontrast import PixelContrastLoss

    embeddings = torch.randn(2, 8, 4, 4, requires_grad=True)
    labels = torch.randint(0, 3, (2, 8, 8))
    criterion = PixelContrastLoss(sampler=HardAnchorSampler(32, 8))
    loss = criterion(embeddings, labels, predictions=torch.randint(0, 3, (2, 4, 4)))
    loss.backward()
    assert torch.isfinite(loss) and embeddings.grad is not None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_samples=0), "max_samples"),
        (dict(max_views=-1), "max_views"),
        (dict(min_pixels=0), "min_pixels"),
        (dict(hard_fraction=1.5), "hard_fraction"),
        (dict(hard_fraction=-0.1), "hard_fraction"),
        (dict(num_classes=0), "num_classes"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HardAnchorSampler(**kwargs)


def test_bad_configuration_types_and_confidence():
    with pytest.raises(TypeError, match="max_views"):
        HardAnchorSampler(max_views=2.5)
    with pytest.raises(ValueError, match="threshold"):
        ConfidenceAnchorSampler(10, threshold=1.2)
    with pytest.raises(ValueError, match="max_views"):
        ConfidenceAnchorSampler(0, 0.5)


def test_bad_inputs():
    embeddings = torch.randn(2, 3, 4, 4)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    sampler = HardAnchorSampler()
    with pytest.raises(ValueError, match="predictions"):
        sampler(embeddings, labels, torch.zeros(3, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="predictions"):
        sampler(embeddings, labels, torch.zeros(2, 0, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="predictions"):
        sampler(embeddings, labels, torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="logits"):
        sampler(embeddings, labels, logits=torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="labels"):
        sampler(embeddings, torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="labels"):
        sampler(embeddings, labels.float())
    with pytest.raises(ValueError, match="labels"):
        sampler(embeddings, torch.full((2, 4, 4), 2000))
    with pytest.raises(ValueError, match="labels"):
        HardAnchorSampler(num_classes=3)(embeddings, torch.full((2, 4, 4), 3))
    confidence = ConfidenceAnchorSampler(4, 0.5)
    with pytest.raises(ValueError, match="logits"):
        confidence(embeddings, labels)
    with pytest.raises(ValueError, match="logits"):
        confidence(embeddings, torch.full((2, 4, 4), 3), logits=torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="logits"):
        confidence(embeddings, labels, logits=torch.zeros(2, 3, 4, 0))


def test_select_anchors_eligible_mask():
    labels = torch.zeros(1, 1, 6, dtype=torch.long)
    eligible = torch.tensor([[[True, False, True, False, True, False]]])
    sample = select_anchors(
        torch.randn(1, 2, 1, 6), labels, eligible=eligible, max_samples=None, max_views=10
    )
    assert sample.indices.tolist() == [0, 2, 4]


@pytest.mark.parametrize("seed", range(3))
def test_large_groups_match_the_rule(seed):
    # groups of hundreds of pixels and quotas of a few: the draw starts from a small random
    # subset of each group (its lowest random levels), which must still give the exact counts
    g = torch.Generator().manual_seed(seed)
    b, h, w = 2, 48, 64
    labels = torch.randint(0, 5, (b, h // 8, w // 8), generator=g)
    labels = labels.repeat_interleave(8, 1).repeat_interleave(8, 2)
    labels[torch.rand(b, h, w, generator=g) < 0.1] = IGNORE
    predictions = torch.where(
        torch.rand(b, h, w, generator=g) < 0.3, torch.randint(0, 5, (b, h, w), generator=g),
        labels,
    )
    embeddings = torch.randn(b, 3, h, w, generator=g)
    sampler = HardAnchorSampler(40, 10, num_classes=5)
    sample = sampler(embeddings, labels, predictions, IGNORE, g)
    want = expected_counts(labels, predictions, 40, 10, 1, 0.5)
    assert observed_counts(sample, labels, predictions) == Counter(want)
    assert sample.indices.unique().numel() == sample.indices.numel()
    flat = embeddings.permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.equal(sample.embeddings, flat[sample.indices])


def test_draws_are_uniform_in_a_large_group():
    # 4 of 4096 pixels: by 16 blocks of 256 pixels, 1000 draws (200 calls of 5 images) give 250
    # hits per block
    drawn = draws_per_image(4, 4096, calls=200, images=5)
    hits = torch.bincount(drawn.flatten() // 256, minlength=16)
    # binomial sd = sqrt(4000 * (1 / 16) * (15 / 16)) ~ 15.3
    assert (hits - 250).abs().max() < 80


def test_draws_are_uniform_subsets():
    # 2 of 5 pixels: each of the 10 pairs with probability 1 / 10, over 3000 draws (500 calls of
    # 6 images)
    pairs = Counter(map(tuple, draws_per_image(2, 5, calls=500, images=6).tolist()))
    assert len(pairs) == 10
    # binomial sd = sqrt(3000 * 0.1 * 0.9) ~ 16.4
    assert all(abs(count - 300) < 82 for count in pairs.values())


@pytest.mark.parametrize("ignore_index", [10**6, -(10**6)])
def test_far_away_ignore_index(ignore_index):
    labels = torch.tensor([[[0, ignore_index, 1, 2, ignore_index, 2]]])
    sampler = HardAnchorSampler(100, 100, num_classes=3)
    sample = sampler(torch.randn(1, 2, 1, 6), labels, ignore_index=ignore_index)
    assert sample.indices.tolist() == [0, 2, 3, 5]
    labels[0, 0, 0] = 3
    with pytest.raises(ValueError, match=rf"ignore_index={ignore_index}; target 3 is out of bounds "
                                         r"\(1 such"):
        sampler(torch.randn(1, 2, 1, 6), labels, ignore_index=ignore_index)


def test_empty_batch():
    embeddings = torch.randn(0, 3, 4, 4, requires_grad=True)
    labels = torch.zeros(0, 4, 4, dtype=torch.long)
    sample = HardAnchorSampler()(embeddings, labels, labels)
    assert sample.embeddings.shape == (0, 3) and sample.num_easy == 0
    assert sample.embeddings.requires_grad


def test_gather_pixels_with_counts():
    embeddings = torch.randn(3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([2, 7, 29, 61, 62, 89])  # images 0, 0, 0, 2, 2, 2
    fast = gather_pixels(embeddings, indices, [3, 0, 3])
    general = gather_pixels(embeddings, indices)
    flat = embeddings.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal(fast, flat[indices]) and torch.equal(general, flat[indices])
    assert fast.is_contiguous()
    upstream = torch.randn(6, 4, dtype=torch.float64)
    (grad_fast,) = torch.autograd.grad(fast, embeddings, upstream)
    (grad_general,) = torch.autograd.grad(general, embeddings, upstream)
    assert torch.equal(grad_fast, grad_general)


def test_gather_pixels_gradgradcheck():
    embeddings = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([0, 4, 7, 11])
    assert torch.autograd.gradgradcheck(lambda x: gather_pixels(x, indices, [2, 2]), (embeddings,))


def test_gather_pixels_channels_last():
    embeddings = torch.randn(2, 5, 3, 4, dtype=torch.float64).to(
        memory_format=torch.channels_last).requires_grad_()
    indices = torch.tensor([1, 11, 12, 20])
    fast = gather_pixels(embeddings, indices, [2, 2])
    assert torch.equal(fast, embeddings.detach().permute(0, 2, 3, 1).reshape(-1, 5)[indices])
    upstream = torch.randn(4, 5, dtype=torch.float64)
    (grad_fast,) = torch.autograd.grad(fast, embeddings, upstream)
    (grad_general,) = torch.autograd.grad(gather_pixels(embeddings, indices), embeddings, upstream)
    assert torch.equal(grad_fast, grad_general)


def test_gather_pixels_backward_allocates_one_gradient_map():
    embeddings = torch.randn(6, 8, 16, 16, requires_grad=True)
    indices = torch.tensor([3, 300, 600, 900, 1000, 1300, 1536])
    rows = gather_pixels(embeddings, indices, [1, 1, 1, 2, 1, 1])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        rows.backward(torch.randn_like(rows))
    allocated = sum(max(event.self_cpu_memory_usage, 0) for event in prof.events())
    map_bytes = embeddings.numel() * embeddings.element_size()
    assert map_bytes <= allocated < 1.5 * map_bytes  # not one zero map per image


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_narrow_label_dtypes(dtype):
    labels = torch.tensor([[[0, 0, 1, 2]], [[2, 2, 1, IGNORE]]])
    predictions = torch.tensor([[[0, 1, 1, 2]], [[2, 0, 1, 0]]])
    embeddings = torch.randn(2, 3, 1, 4)
    sampler = HardAnchorSampler(40, 2)
    want = sampler(embeddings, labels, predictions, generator=torch.Generator().manual_seed(0))
    ignore = IGNORE if dtype == torch.uint8 else -1
    narrow = torch.where(labels == IGNORE, ignore, labels).to(dtype)
    got = sampler(embeddings, narrow, predictions.to(dtype), ignore,
                  torch.Generator().manual_seed(0))
    assert torch.equal(got.indices, want.indices) and torch.equal(got.labels, want.labels)
    assert (got.num_hard, got.num_easy) == (want.num_hard, want.num_easy)


def test_the_samplers_satisfy_the_sampler_protocol():
    from pixcontrast import PixelContrastLoss
    from pixcontrast.samplers import AnchorSampler

    for sampler in (HardAnchorSampler(), RandomAnchorSampler(), ConfidenceAnchorSampler()):
        assert isinstance(sampler, AnchorSampler)
    assert not isinstance(object(), AnchorSampler)
    # the loss hands a sampler validated maps: a bare callable has no sample_maps to take them
    with pytest.raises(TypeError, match="sampler must be an AnchorSampler"):
        PixelContrastLoss(sampler=lambda *args, **kwargs: None)


@settings(max_examples=200, deadline=None)
@given(
    counts=st.lists(st.integers(0, 12), min_size=2, max_size=24).filter(lambda c: len(c) % 2 == 0),
    images=st.integers(1, 2),
    min_pixels=st.integers(1, 6),
    max_samples=st.one_of(st.none(), st.integers(1, 60)),
    max_views=st.integers(1, 20),
    hard_fraction=st.sampled_from([0.0, 0.25, 0.3, 0.5, 2 / 3, 1.0]),
)
def test_anchor_quotas_follow_the_documented_rule(
    counts, images, min_pixels, max_samples, max_views, hard_fraction
):
    pairs_per_image = len(counts) // 2 // images or 1
    counts = counts[: 2 * images * pairs_per_image]
    images = len(counts) // (2 * pairs_per_image)
    counted = torch.tensor(counts).view(images, pairs_per_image, 2)  # [easy, hard]
    take = anchor_quotas(counted, min_pixels, max_samples, max_views, hard_fraction)
    pairs = {
        (i, c): (int(counted[i, c, 1]), int(counted[i, c, 0]))
        for i in range(images) for c in range(pairs_per_image)
    }
    want = quotas_by_loop(pairs, max_samples, max_views, min_pixels, hard_fraction)
    got = {(i, c, bool(hard)): int(take[i, c, hard]) for i, c in pairs for hard in (0, 1)}
    assert take.dtype == torch.int64
    assert got == {key: want.get(key, 0) for key in got}


def test_level_histogram_and_candidates():
    from pixcontrast.samplers import _candidate_bins, _class_counts, _level_histogram

    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 4, (2, 16, 16), generator=g)
    labels[0, :2] = IGNORE
    hard = torch.rand(2, 16, 16, generator=g) < 0.4
    table = _level_histogram(labels, hard, None, IGNORE, 4, torch.Generator().manual_seed(4))
    counted, bad = _class_counts(table, IGNORE, 4)
    for i in range(2):
        for c in range(4):
            mine = labels[i] == c
            easy, hard_ = int((mine & ~hard[i]).sum()), int((mine & hard[i]).sum())
            assert counted[i, c].tolist() == [easy, hard_]
    assert int(bad) == 0
    # levels: P(level <= j) = 2^(j + 1) / 256, so about half the pixels are at the top level
    top = table.below[-1] - table.below[-2]
    assert 0.4 < int(top.sum()) / labels.numel() < 0.6
    take = torch.zeros_like(table.below[-1])
    take[:, -table.low : 4 - table.low, :2] = counted.clamp(max=3)
    is_candidate_bin, candidates = _candidate_bins(table.below, take)
    assert bool((candidates.view_as(take) >= take).all())
    assert int(is_candidate_bin.index_select(0, table.bins).sum()) == int(candidates.sum())
