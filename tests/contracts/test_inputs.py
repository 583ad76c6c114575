"""Input contracts: every argument is validated with an error that names it, out-of-range
labels raise instead of being ignored, empty inputs give documented results, and
``resize_labels`` picks the pixels of ``F.interpolate(mode="nearest")``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pixcontrast import MinedContrastLoss, PixelContrastLoss, _checks, contrastive_loss
from pixcontrast.functional import pair_contrastive_loss, resize_labels
from pixcontrast.mining import MINERS, mine_keys
from pixcontrast.samplers import (
    ConfidenceAnchorSampler,
    HardAnchorSampler,
    RandomAnchorSampler,
    pixel_maps,
    select_anchors,
)

NUM_CLASSES = 19


def label_map(values, ignore_index):
    """``[1, 2, 4]`` labels: classes 0..3, then the pixels listed in ``values``, the rest
    ``ignore_index``."""
    flat = [0, 1, 2, 3] + list(values)
    flat += [ignore_index] * (8 - len(flat))
    return torch.tensor(flat).view(1, 2, 4)


# ---------------------------------------------------------------------------------------------
# out-of-range labels raise like F.cross_entropy ("Target 300 is out of bounds")

IGNORE_INDICES = [-(10**6), -2, -1, 0, NUM_CLASSES - 1, NUM_CLASSES, NUM_CLASSES + 1, 255, 10**6]
BAD_VALUES = [-(10**6) - 1, -3, -2, -1, NUM_CLASSES, NUM_CLASSES + 1, NUM_CLASSES + 2, 256, 300,
              10**6 + 1]


def samplers_under_test():
    return [
        ("HardAnchorSampler", lambda e, y, ignore: HardAnchorSampler(
            num_classes=NUM_CLASSES)(e, y, ignore_index=ignore)),
        ("RandomAnchorSampler", lambda e, y, ignore: RandomAnchorSampler(
            num_classes=NUM_CLASSES)(e, y, ignore_index=ignore)),
        ("select_anchors", lambda e, y, ignore: select_anchors(
            e, y, num_classes=NUM_CLASSES, ignore_index=ignore)),
        ("select_anchors(eligible)", lambda e, y, ignore: select_anchors(
            e, y, eligible=torch.ones_like(y, dtype=torch.bool), num_classes=NUM_CLASSES,
            ignore_index=ignore)),
        # the logits' class dimension is the class range
        ("ConfidenceAnchorSampler", lambda e, y, ignore: ConfidenceAnchorSampler(
            threshold=1.0)(e, y, ignore_index=ignore, logits=torch.zeros(1, NUM_CLASSES, 2, 4))),
    ]


@pytest.mark.parametrize("name, sample", samplers_under_test())
@pytest.mark.parametrize("ignore_index", IGNORE_INDICES)
def test_every_out_of_range_label_raises(name, sample, ignore_index):
    embeddings = torch.randn(1, 3, 2, 4)
    for bad in BAD_VALUES:
        if bad == ignore_index:
            continue
        labels = label_map([bad], ignore_index)
        with pytest.raises(ValueError, match=f"target {bad} is out of bounds"):
            sample(embeddings, labels, ignore_index)


@pytest.mark.parametrize("name, sample", samplers_under_test())
@pytest.mark.parametrize("ignore_index", IGNORE_INDICES)
def test_in_range_labels_and_ignored_pixels_still_sample(name, sample, ignore_index):
    # the wider clamp bounds must not change which pixels are drawn: every labelled pixel
    # (1 per class, budgets far above) and no ignored one
    labels = label_map([NUM_CLASSES - 1], ignore_index)
    got = sample(torch.randn(1, 3, 2, 4), labels, ignore_index)
    want = [i for i, v in enumerate(labels.flatten().tolist()) if v != ignore_index]
    assert got.indices.tolist() == want


@pytest.mark.parametrize("bad", [300, -2])
def test_out_of_range_message_names_labels_and_range(bad):
    ignore_index = 255 if bad > 0 else -1
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, 19\) \(num_classes=19\) or "
                                         rf"equal ignore_index={ignore_index}; target {bad} is "
                                         r"out of bounds \(1 such values"):
        HardAnchorSampler(num_classes=NUM_CLASSES)(
            torch.randn(1, 3, 2, 4), label_map([bad], ignore_index), ignore_index=ignore_index
        )


def test_check_label_values_reports_the_target():
    labels = torch.tensor([0, 300, 255, 1, -5])
    with pytest.raises(ValueError, match=r"target 300 is out of bounds \(2 such values, in "
                                         r"\[-5, 300\]\)"):
        _checks.check_label_values(labels, NUM_CLASSES, 255, "labels")
    _checks.check_label_values(labels[[0, 2, 3]], NUM_CLASSES, 255, "labels")


# ---------------------------------------------------------------------------------------------
# select_anchors validates its arguments as the sampler classes do

CONFIGURATIONS = [
    dict(max_samples=0), dict(max_samples=2.5), dict(max_samples=True), dict(max_views=-1),
    dict(max_views=0), dict(max_views=1.0), dict(min_pixels=0), dict(hard_fraction=math.nan),
    dict(hard_fraction=math.inf), dict(hard_fraction=1.5), dict(hard_fraction=-0.1),
    dict(hard_fraction="0.5"), dict(num_classes=0), dict(num_classes=3.0),
]


@pytest.mark.parametrize("kwargs", CONFIGURATIONS, ids=str)
def test_select_anchors_rejects_what_the_sampler_rejects(kwargs):
    with pytest.raises((TypeError, ValueError)) as by_sampler:
        HardAnchorSampler(**kwargs)
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(type(by_sampler.value)) as by_function:
        select_anchors(torch.randn(1, 3, 2, 2), labels, **kwargs)
    assert str(by_function.value) == str(by_sampler.value)
    assert next(iter(kwargs)) in str(by_function.value)


def test_select_anchors_hard_fraction_nan_used_to_oversample():
    # 4 pixels, and yet a NaN quota once gave 200 anchors
    with pytest.raises(ValueError, match="hard_fraction"):
        select_anchors(torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long),
                       hard_fraction=float("nan"), max_views=100)


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(labels=torch.zeros(1, 2, 2)), TypeError, "labels"),
        (dict(labels=torch.zeros(1, 2, 3, dtype=torch.long)), ValueError, "labels"),
        (dict(labels=torch.zeros(2, 2, dtype=torch.long)), ValueError, "labels"),
        (dict(embeddings=torch.zeros(1, 3, 2, 2, dtype=torch.long)), TypeError, "embeddings"),
        (dict(hard=torch.tensor([[[0, 2], [0, 2]]])), TypeError, "hard"),
        (dict(hard=torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])), TypeError, "hard"),
        (dict(hard=torch.zeros(1, 2, 3, dtype=torch.bool)), ValueError, "hard"),
        (dict(hard=[[True, False], [True, False]]), TypeError, "hard"),
        (dict(eligible=torch.ones(1, 2, 2, dtype=torch.long)), TypeError, "eligible"),
        (dict(eligible=torch.ones(2, 2, dtype=torch.bool)), ValueError, "eligible"),
        (dict(ignore_index=None), TypeError, "ignore_index"),
        (dict(ignore_index=1.5), TypeError, "ignore_index"),
        (dict(ignore_index="255"), TypeError, "ignore_index"),
        (dict(ignore_index=True), TypeError, "ignore_index"),
        (dict(generator=0), TypeError, "generator"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_select_anchors_rejects_bad_inputs(kwargs, error, name):
    arguments = dict(embeddings=torch.randn(1, 3, 2, 2), labels=torch.zeros(1, 2, 2,
                                                                             dtype=torch.long))
    arguments.update(kwargs)
    with pytest.raises(error, match=name):
        select_anchors(arguments.pop("embeddings"), arguments.pop("labels"), **arguments)


def test_select_anchors_hard_mask_counts_like_the_rule():
    # a bool mask: pixels 1 and 3 hard; quota 2 with hard_fraction 0.5 takes one of each
    labels = torch.zeros(1, 1, 4, dtype=torch.long)
    hard = torch.tensor([[[False, True, False, True]]])
    sample = select_anchors(torch.randn(1, 2, 1, 4), labels, hard=hard, max_samples=None,
                            max_views=2, hard_fraction=0.5)
    assert (sample.num_hard, sample.num_easy) == (1, 1)
    picked = sample.indices.tolist()
    assert sum(hard.flatten()[picked].tolist()) == 1


@pytest.mark.parametrize("value", [None, 1.5, "255", True])
@pytest.mark.parametrize("sampler", [HardAnchorSampler(), RandomAnchorSampler(),
                                     ConfidenceAnchorSampler()], ids=type)
def test_samplers_reject_a_non_integer_ignore_index(sampler, value):
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(TypeError, match="ignore_index"):
        sampler(torch.randn(1, 3, 2, 2), labels, ignore_index=value,
                logits=torch.zeros(1, 2, 2, 2))


def test_numpy_integer_ignore_index_is_accepted():
    labels = torch.tensor([[[0, 7], [1, 7]]])
    sample = HardAnchorSampler()(torch.randn(1, 3, 2, 2), labels, ignore_index=np.int64(7))
    assert sample.indices.tolist() == [0, 2]


# ---------------------------------------------------------------------------------------------
# the option checks: NaN, infinities, bools, numpy scalars

@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -0.5, 1.5])
def test_check_fraction_rejects_nan_and_out_of_range(value):
    with pytest.raises(ValueError, match="share"):
        _checks.check_fraction(value, "share")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 0.0, -1.0])
def test_check_positive_rejects_nan_inf_and_non_positive(value):
    with pytest.raises(ValueError, match="tau"):
        _checks.check_positive(value, "tau")


@pytest.mark.parametrize("check", [_checks.check_fraction, _checks.check_positive,
                                   _checks.check_count, _checks.check_ignore_index])
@pytest.mark.parametrize("value", [True, False, None, "1", np.bool_(True)])
def test_checks_reject_bools_and_non_numbers(check, value):
    with pytest.raises(TypeError, match="arg"):
        check(value, "arg")


@pytest.mark.parametrize("value", [math.nan, math.inf, 2.0])
def test_check_count_rejects_floats(value):
    with pytest.raises(TypeError, match="count"):
        _checks.check_count(value, "count")


def test_checks_accept_numpy_scalars_as_python_numbers():
    assert type(_checks.check_count(np.int64(3), "n")) is int
    assert _checks.check_count(np.int32(3), "n") == 3
    assert _checks.check_fraction(np.float32(0.5), "f") == 0.5
    assert _checks.check_positive(np.float32(0.25), "t") == 0.25
    assert _checks.check_ignore_index(np.uint8(255)) == 255
    assert HardAnchorSampler(max_views=np.int64(5)).max_views == 5


# ---------------------------------------------------------------------------------------------
# resize_labels == F.interpolate(mode="nearest")

def test_resize_labels_matches_interpolate_for_every_size_pair():
    # all (in, out) pairs in 1..64 for the rows, and the transposed pair for the columns; ids
    # below 2**24 survive the float conversion of the reference exactly
    g = torch.Generator().manual_seed(0)
    for size_in in range(1, 65):
        for size_out in range(1, 65):
            labels = torch.randint(0, 2**20, (2, size_in, size_out), generator=g)
            size = (size_out, size_in)
            want = F.interpolate(labels.double()[:, None], size, mode="nearest")[:, 0].long()
            assert torch.equal(resize_labels(labels, size), want), (size_in, size_out)


@pytest.mark.parametrize("size_in, size_out", [(26, 22), (39, 33)])
def test_resize_labels_uses_the_float32_scale(size_in, size_out):
    # the fp32 scale 26/22 rounds up, so rows 11 and 22 * k / 26 land one row further than
    # floor(i * 26 / 22); the source row of output i is floor(fp32(i) * fp32(in / out))
    scale = np.float32(size_in) / np.float32(size_out)
    rows = [min(int(np.floor(np.float32(i) * scale)), size_in - 1) for i in range(size_out)]
    assert rows != [i * size_in // size_out for i in range(size_out)]
    labels = torch.arange(size_in).view(1, size_in, 1)
    assert resize_labels(labels, (size_out, 1)).flatten().tolist() == rows


def test_losses_resize_labels_like_interpolate():
    # the contrast term must label the pixels a cross-entropy on interpolated labels uses
    labels = torch.randint(0, 5, (2, 26, 39))
    embeddings = torch.randn(2, 4, 22, 33)
    resized = pixel_maps(embeddings, labels).labels  # the losses' one resizing entry
    want = F.interpolate(labels.float()[:, None], (22, 33), mode="nearest")[:, 0].long()
    assert torch.equal(resized, want)


@pytest.mark.parametrize(
    "size, error",
    [(4, TypeError), ((4,), TypeError), ((4, 4, 4), TypeError), ((2.0, 2), TypeError),
     ((2, 2.5), TypeError), ("44", TypeError), ((True, 2), TypeError), ((-1, 2), ValueError),
     ((2, -3), ValueError), ((2, 0), ValueError), ((0, 0), ValueError)],
    ids=str,
)
def test_resize_labels_rejects_a_bad_size(size, error):
    with pytest.raises(error, match="size"):
        resize_labels(torch.zeros(1, 4, 4, dtype=torch.long), size)


def test_resize_labels_accepts_sequences_of_integers():
    labels = torch.arange(16).view(1, 4, 4)
    want = resize_labels(labels, (2, 3))
    assert torch.equal(resize_labels(labels, [2, 3]), want)
    assert torch.equal(resize_labels(labels, torch.Size([2, 3])), want)
    assert torch.equal(resize_labels(labels, (np.int64(2), 3)), want)


def test_empty_label_map():
    # nothing to resize from is an error naming labels; an empty map at its own size is itself
    with pytest.raises(ValueError, match="labels"):
        resize_labels(torch.zeros(2, 0, 0, dtype=torch.long), (4, 4))
    with pytest.raises(ValueError, match="labels"):
        PixelContrastLoss()(torch.randn(2, 3, 4, 4), torch.zeros(2, 0, 0, dtype=torch.long))
    empty = torch.zeros(2, 0, 5, dtype=torch.long)
    assert resize_labels(empty, (0, 5)) is empty
    with pytest.raises(ValueError, match="size"):
        resize_labels(torch.zeros(2, 3, 5, dtype=torch.long), (0, 5))
    # and an empty batch of maps at the embeddings' size gives the loss's connected zero
    embeddings = torch.randn(2, 3, 0, 0, requires_grad=True)
    loss = PixelContrastLoss()(embeddings, torch.zeros(2, 0, 0, dtype=torch.long))
    assert_exact_zero_connected(loss, embeddings)


# ---------------------------------------------------------------------------------------------
# empty mining and pair inputs give an exact zero connected to the graph

def assert_exact_zero_connected(loss, leaf, shape=()):
    assert loss.shape == shape and torch.equal(loss, torch.zeros(shape, dtype=loss.dtype))
    assert loss.requires_grad
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    assert torch.equal(grad, torch.zeros_like(leaf))


@pytest.mark.parametrize("miner", MINERS)
@pytest.mark.parametrize("with_keys", [False, True])
def test_mined_loss_of_no_anchor_is_a_connected_zero(miner, with_keys):
    anchors = torch.randn(0, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long)
    keys = torch.randn(5, 3, dtype=torch.float64) if with_keys else None
    key_labels = torch.tensor([0, 1, 1, -1, 2]) if with_keys else None
    pairs = mine_keys(anchors, labels, keys, key_labels, miner=miner, num_positives=2,
                      num_negatives=3)
    assert pairs.positive_index.shape == (0, 2) and pairs.negative_index.shape == (0, 3)
    for variant in ("paper", "supcon"):
        criterion = MinedContrastLoss(miner, num_positives=2, num_negatives=3, variant=variant)
        assert_exact_zero_connected(criterion(anchors, labels, keys, key_labels), anchors)


@pytest.mark.parametrize("variant", ["paper", "supcon"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_pair_loss_of_empty_indices_is_a_connected_zero(variant, reduction):
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])
    no_column = torch.zeros(4, 0, dtype=torch.long)
    loss = pair_contrastive_loss(x, y, None, None, no_column, no_column, variant=variant,
                                 reduction=reduction)
    assert_exact_zero_connected(loss, x, (4,) if reduction == "none" else ())
    # one positive and no negative column: paper's L_a is 0 by definition, supcon's is
    # log(e^s) - s, which log-sum-exp computes as s + log(1) - s = 0 exactly
    positives = torch.tensor([[1], [0], [3], [2]])
    loss = pair_contrastive_loss(x, y, None, None, positives, no_column, variant=variant,
                                 reduction="none")
    assert torch.equal(loss, torch.zeros(4, dtype=torch.float64))
    empty = torch.randn(0, 3, dtype=torch.float64, requires_grad=True)
    index = torch.zeros(0, 2, dtype=torch.long)
    loss = pair_contrastive_loss(empty, y[:0], None, None, index, index, variant=variant,
                                 reduction=reduction)
    assert_exact_zero_connected(loss, empty, (0,) if reduction == "none" else ())


# ---------------------------------------------------------------------------------------------
# unsigned label dtypes

@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32])
@pytest.mark.parametrize("in_batch", [True, False])
def test_unsigned_labels_give_the_int64_result(dtype, in_batch):
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(12, 5, generator=g, dtype=torch.float64), dim=1)
    y = torch.randint(0, 3, (12,), generator=g)
    keys = None if in_batch else torch.randn(7, 5, generator=g, dtype=torch.float64)
    key_labels = None if in_batch else torch.randint(0, 3, (7,), generator=g)
    want = contrastive_loss(x, y, keys, key_labels)
    got = contrastive_loss(x, y.to(dtype), keys,
                           None if in_batch else key_labels.to(dtype))
    assert torch.equal(got, want)
    pairs = mine_keys(x, y, keys, key_labels, num_positives=2, num_negatives=2)
    unsigned = mine_keys(x, y.to(dtype), keys, None if in_batch else key_labels.to(dtype),
                         num_positives=2, num_negatives=2)
    assert torch.equal(unsigned.positive_index, pairs.positive_index)
    assert torch.equal(unsigned.negative_index, pairs.negative_index)


def test_unsigned_label_maps_sample_like_int64():
    g = torch.Generator().manual_seed(1)
    embeddings = torch.randn(2, 3, 5, 6, generator=g)
    labels = torch.randint(0, 4, (2, 5, 6), generator=g)
    predictions = torch.randint(0, 4, (2, 5, 6), generator=g)
    sampler = HardAnchorSampler(12, 4, num_classes=4)
    want = sampler(embeddings, labels, predictions, generator=torch.Generator().manual_seed(2))
    got = sampler(embeddings, labels.to(torch.uint16), predictions.to(torch.uint16),
                  generator=torch.Generator().manual_seed(2))
    assert torch.equal(got.indices, want.indices) and torch.equal(got.labels, want.labels)
    criterion = PixelContrastLoss(max_samples=12, max_views=4, num_classes=4)
    assert torch.equal(
        criterion(embeddings, labels.to(torch.uint16), generator=torch.Generator().manual_seed(3)),
        criterion(embeddings, labels, generator=torch.Generator().manual_seed(3)),
    )

