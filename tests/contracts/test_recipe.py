"""The recipe as API: exclude_classes, ContrastWeightSchedule, last_stats and gradient_ratio,
each against an independent computation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import pixcontrast
from pixcontrast import (
    ClassMemoryBank,
    ContrastWeightSchedule,
    PixelContrastLoss,
    RegionContrastLoss,
    contrastive_loss,
    gradient_ratio,
)

from _helpers import make_maps

IGNORE = 255


def batch(classes=4, seed=0):
    embeddings, labels = make_maps(b=3, h=6, w=7, classes=classes, seed=seed)
    labels[0, :2] = IGNORE
    return embeddings, labels


def relabelled(labels, classes):
    out = labels.clone()
    for c in classes:
        out[labels == c] = IGNORE
    return out


def run(criterion, embeddings, labels, seed=1, steps=1):
    """Loss values and the embedding gradient of the last of ``steps`` calls."""
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(steps):
        x = embeddings.clone().requires_grad_(True)
        loss = criterion(x, labels, generator=generator)
        loss.backward()
        values.append(loss.detach())
    return torch.stack(values), x.grad


# --------------------------------------------------------------------------- exclude_classes


@pytest.mark.parametrize("variant", ["paper", "supcon"])
@pytest.mark.parametrize("excluded", [(3,), (0, 2)])
def test_exclude_classes_equals_relabelling_them_ignored(variant, excluded):
    embeddings, labels = batch()
    options = dict(variant=variant, max_samples=60, max_views=6, num_classes=4)
    got, got_grad = run(PixelContrastLoss(exclude_classes=excluded, **options), embeddings,
                        labels)
    want, want_grad = run(PixelContrastLoss(**options), embeddings, relabelled(labels, excluded))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


def test_excluded_classes_are_never_anchors_and_the_loss_is_the_dense_formula():
    embeddings, labels = batch(classes=3)
    criterion = PixelContrastLoss(max_samples=80, max_views=10, exclude_classes=(1,))
    x = embeddings.clone().requires_grad_(True)
    loss = criterion(x, labels, generator=torch.Generator().manual_seed(0))
    sample = criterion.last_sample
    assert len(sample.labels) > 0 and not (sample.labels == 1).any()
    small = labels.reshape(-1)  # labels already at the embeddings' resolution
    assert (small[sample.indices] == sample.labels).all()

    # independent: a plain loop of the paper's formula over the sampled anchors (in-batch keys)
    d = embeddings.shape[1]
    rows = F.normalize(embeddings.permute(0, 2, 3, 1).reshape(-1, d), dim=1)[sample.indices]
    y = sample.labels
    total, counted = 0.0, 0
    for a in range(len(y)):
        s = rows @ rows[a] / 0.1
        pos = [j for j in range(len(y)) if j != a and y[j] == y[a]]
        neg = [j for j in range(len(y)) if y[j] != y[a]]
        if not pos:
            continue
        nu = torch.logsumexp(s[neg], 0) if neg else torch.tensor(-math.inf, dtype=s.dtype)
        total += sum(F.softplus(nu - s[p]) for p in pos) / len(pos)
        counted += 1
    torch.testing.assert_close(loss.detach(), (total / counted).reshape(()))


def test_exclude_classes_with_memory_equals_relabelling_and_never_enqueues_them():
    embeddings, labels = batch()

    def bank(**extra):
        return ClassMemoryBank(num_classes=4, dim=8, pixels_per_class=30, regions_per_class=6,
                               pixels_per_image=3, **extra)

    excluded_bank, plain_bank = bank(), bank()
    got, got_grad = run(PixelContrastLoss(max_samples=60, max_views=6, memory=excluded_bank,
                                          exclude_classes=(2,)), embeddings, labels, steps=3)
    want, want_grad = run(PixelContrastLoss(max_samples=60, max_views=6, memory=plain_bank),
                          embeddings, relabelled(labels, (2,)), steps=3)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
    assert excluded_bank.pixel_count[2] == 0 and excluded_bank.region_count[2] == 0
    for name, buffer in plain_bank.state_dict().items():
        torch.testing.assert_close(excluded_bank.state_dict()[name], buffer, msg=name)


def test_memory_keys_of_an_excluded_class_are_not_used():
    embeddings, labels = batch()
    bank = ClassMemoryBank(num_classes=4, dim=8, pixels_per_class=20, regions_per_class=5)
    bank.enqueue(F.normalize(torch.randn(3, 8, 6, 7, dtype=torch.float64), dim=1), labels)
    assert bank.pixel_count[1] > 0  # a bank filled by someone who does not exclude class 1
    criterion = PixelContrastLoss(max_samples=60, max_views=6, memory=bank, enqueue=False,
                                  exclude_classes=(1,))
    loss = criterion(embeddings, labels, generator=torch.Generator().manual_seed(0))
    sample = criterion.last_sample
    keys, key_labels = bank.keys()
    keep = key_labels != 1
    want = contrastive_loss(sample.embeddings, sample.labels, keys[keep], key_labels[keep],
                            in_batch=True, temperature=0.1, backend="reference")
    torch.testing.assert_close(loss, want)


def test_region_loss_exclude_classes_equals_relabelling():
    embeddings, labels = batch()
    options = dict(max_samples=60, max_views=6)
    got, got_grad = run(RegionContrastLoss(exclude_classes=(0,), **options), embeddings, labels)
    want, want_grad = run(RegionContrastLoss(**options), embeddings, relabelled(labels, (0,)))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


def test_bank_exclude_classes_equals_enqueueing_relabelled_labels():
    embeddings, labels = batch()
    excluded = ClassMemoryBank(num_classes=4, dim=8, pixels_per_class=10, regions_per_class=4,
                               exclude_classes=(3,))
    plain = ClassMemoryBank(num_classes=4, dim=8, pixels_per_class=10, regions_per_class=4)
    excluded.enqueue(embeddings.float(), labels, torch.Generator().manual_seed(0))
    plain.enqueue(embeddings.float(), relabelled(labels, (3,)), torch.Generator().manual_seed(0))
    assert excluded.pixel_count.tolist()[3] == 0
    assert set(excluded.keys()[1].tolist()) == {0, 1, 2}
    for name, buffer in plain.state_dict().items():
        torch.testing.assert_close(excluded.state_dict()[name], buffer, msg=name)


def test_the_cross_entropy_is_unaffected_and_labels_are_not_modified():
    embeddings, labels = batch()
    before = labels.clone()
    PixelContrastLoss(max_samples=20, max_views=4, exclude_classes=(1,))(embeddings, labels)
    assert torch.equal(labels, before)


@pytest.mark.parametrize(
    "value, num_classes, error, words",
    [
        (5, 4, TypeError, "exclude_classes must be a sequence"),
        ((4,), 4, ValueError, "exclude_classes must lie in [0, 4)"),
        ((-1,), None, ValueError, "exclude_classes must lie in [0, inf)"),
        ((1.0,), 4, TypeError, "exclude_classes must hold integers"),
        ((True,), 4, TypeError, "exclude_classes must hold integers"),
        ((1, 1), 4, ValueError, "exclude_classes holds a class twice"),
        ((255,), None, ValueError, "exclude_classes holds ignore_index=255"),
        (None, 4, TypeError, "exclude_classes must be a sequence"),
    ],
)
def test_exclude_classes_is_validated(value, num_classes, error, words):
    with pytest.raises(error, match=words.replace("[", r"\[").replace("(", r"\(").replace(
            ")", r"\)")):
        PixelContrastLoss(num_classes=num_classes, exclude_classes=value)
    if num_classes is not None:
        with pytest.raises(error, match="exclude_classes"):
            ClassMemoryBank(num_classes=num_classes, dim=4, exclude_classes=value)
        with pytest.raises(error, match="exclude_classes"):
            RegionContrastLoss(num_classes=num_classes, exclude_classes=value)


def test_exclude_classes_is_checked_against_the_memorys_classes():
    bank = ClassMemoryBank(num_classes=3, dim=4)
    with pytest.raises(ValueError, match=r"exclude_classes must lie in \[0, 3\)"):
        PixelContrastLoss(memory=bank, exclude_classes=(3,))
    assert "exclude_classes=(0, 2)" in repr(PixelContrastLoss(memory=bank,
                                                              exclude_classes=[2, 0]))


# --------------------------------------------------------------------------- schedule


def test_schedule_values_by_hand():
    schedule = ContrastWeightSchedule(0.3, warmup_steps=3, ramp_steps=4)
    seen = []
    for _ in range(9):
        seen.append((schedule.value, schedule.active))
        schedule.step()
    want = [0, 0, 0, 0.075, 0.15, 0.225, 0.3, 0.3, 0.3]
    assert [v for v, _ in seen] == pytest.approx(want)
    assert [a for _, a in seen] == [w > 0 for w in want]
    assert schedule() == schedule.value == pytest.approx(0.3)


def test_schedule_without_ramp_or_warmup():
    jump = ContrastWeightSchedule(2.0, warmup_steps=2)
    assert [jump.weight_at(t) for t in range(4)] == [0.0, 0.0, 2.0, 2.0]
    assert ContrastWeightSchedule(0.1).value == 0.1  # no warm-up: on from step 0
    assert ContrastWeightSchedule(0.1, 0, ramp_steps=2).value == pytest.approx(0.05)


def test_schedule_state_dict_resumes():
    schedule = ContrastWeightSchedule(0.1, warmup_steps=5, ramp_steps=10)
    for _ in range(7):
        schedule.step()
    state = copy.deepcopy(schedule.state_dict())
    resumed = ContrastWeightSchedule(1.0)
    resumed.load_state_dict(state)
    for _ in range(12):
        assert resumed.value == schedule.value
        resumed.step()
        schedule.step()
    assert resumed.step_count == 19 and repr(resumed) == repr(schedule)


@pytest.mark.parametrize(
    "args, error, words",
    [
        ((-0.1,), ValueError, "weight must be"),
        ((float("nan"),), ValueError, "weight must be"),
        (("0.1",), TypeError, "weight must be a number"),
        ((0.1, -1), ValueError, "warmup_steps must be >= 0"),
        ((0.1, 1.5), TypeError, "warmup_steps must be an integer"),
        ((0.1, 0, -2), ValueError, "ramp_steps must be >= 0"),
    ],
)
def test_schedule_arguments_are_validated(args, error, words):
    with pytest.raises(error, match=words):
        ContrastWeightSchedule(*args)


def test_schedule_load_state_dict_is_validated():
    schedule = ContrastWeightSchedule(0.1, 2)
    with pytest.raises(ValueError, match="state_dict must have the keys"):
        schedule.load_state_dict({"step_count": 3})
    bad = dict(schedule.state_dict(), step_count=-1)
    with pytest.raises(ValueError, match="step_count must be >= 0"):
        schedule.load_state_dict(bad)
    assert schedule.step_count == 0  # unchanged by a failed load


# --------------------------------------------------------------------------- last_stats


def positives_by_loop(labels, key_label_parts, in_batch):
    counts = []
    for a in range(len(labels)):
        n = sum(int(labels[j] == labels[a]) for j in range(len(labels)) if j != a) * in_batch
        for part in key_label_parts:
            n += sum(int(v == labels[a]) for v in part.tolist())
        counts.append(n)
    return counts


@pytest.mark.parametrize("with_memory", [False, True])
def test_last_stats_match_counts_from_last_sample(with_memory):
    embeddings, labels = batch(classes=5)
    predictions = torch.randint(0, 5, labels.shape, generator=torch.Generator().manual_seed(3))
    bank = ClassMemoryBank(num_classes=5, dim=8, pixels_per_class=12, regions_per_class=3,
                           pixels_per_image=2) if with_memory else None
    criterion = PixelContrastLoss(max_samples=50, max_views=5, memory=bank, num_classes=5,
                                  exclude_classes=(4,))
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):  # the second call sees the memory filled by the first
        keys_before = bank.keys() if with_memory else None
        loss = criterion(embeddings, labels, predictions=predictions, generator=generator)
    stats = criterion.last_stats
    sample = criterion.last_sample
    y = sample.labels.tolist()
    parts = []
    if with_memory:
        key_labels = keys_before[1]
        parts = [key_labels[key_labels != 4]]
    positives = positives_by_loop(y, parts, in_batch=True)
    hard = int((predictions.reshape(-1)[sample.indices] != sample.labels).sum())

    assert stats["loss"].item() == loss.item()
    assert stats["anchors"].item() == len(y)
    assert stats["hard_anchors"].item() == hard
    assert stats["easy_anchors"].item() == len(y) - hard
    assert stats["classes"].item() == len(set(y))
    assert stats["anchors_with_positives"].item() == sum(p > 0 for p in positives)
    assert stats["mean_positives"].item() == pytest.approx(sum(positives) / len(y))
    if with_memory:
        per_class = [int(bank.pixel_count[c] + bank.region_count[c]) for c in range(5)]
        assert stats["memory_fill_per_class"].tolist() == per_class and per_class[4] == 0
        assert stats["memory_fill"].item() == pytest.approx(sum(per_class) / (5 * 15))
    else:
        assert "memory_fill" not in stats
    for name, value in stats.items():
        assert not value.requires_grad, name
        assert value.dim() == (1 if name == "memory_fill_per_class" else 0), name
    copy.deepcopy(stats)  # detached: copies without the graph


def test_last_stats_of_the_region_loss_count_region_positives():
    embeddings, labels = batch()
    criterion = RegionContrastLoss(max_samples=40, max_views=5)
    criterion(embeddings, labels, generator=torch.Generator().manual_seed(0))
    region_labels = pixcontrast.functional.region_embeddings(embeddings, labels, IGNORE)[1]
    want = positives_by_loop(criterion.last_sample.labels.tolist(), [region_labels],
                             in_batch=False)
    assert criterion.last_stats["mean_positives"].item() == pytest.approx(
        sum(want) / len(want))


def test_last_stats_of_an_empty_batch():
    criterion = PixelContrastLoss()
    criterion(torch.randn(1, 4, 3, 3), torch.full((1, 3, 3), IGNORE))
    stats = criterion.last_stats
    assert [stats[k].item() for k in ("anchors", "classes", "mean_positives", "loss")] == [
        0, 0, 0.0, 0.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stats_cost_no_host_synchronisation_on_cuda():
    from pixcontrast.diagnostics import contrast_stats
    from pixcontrast.samplers import AnchorSample

    labels = torch.randint(0, 5, (300,), device="cuda")
    sample = AnchorSample(torch.randn(300, 4, device="cuda"), labels, labels, 100, 200)
    keys = [torch.randint(-1, 5, (1000,), device="cuda")]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = contrast_stats(sample, keys, True, torch.ones((), device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats["anchors"].item() == 300


# --------------------------------------------------------------------------- gradient_ratio


def test_gradient_ratio_against_known_gradients():
    t = torch.randn(4, 5, requires_grad=True)
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    r = gradient_ratio((a * t).sum(), (b * t).sum(), t)
    assert r.contrast_norm.item() == pytest.approx(a.norm().item(), rel=1e-6)
    assert r.other_norm.item() == pytest.approx(b.norm().item(), rel=1e-6)
    assert r.ratio.item() == pytest.approx((a.norm() / b.norm()).item(), rel=1e-6)
    want_cos = ((a * b).sum() / (a.norm() * b.norm())).item()
    assert r.cosine.item() == pytest.approx(want_cos, rel=1e-5, abs=1e-7)


def test_gradient_ratio_in_a_segmentation_step_matches_autograd_and_keeps_the_graph():
    torch.manual_seed(0)
    backbone = torch.nn.Conv2d(3, 8, 3, padding=1)
    classifier = torch.nn.Conv2d(8, 4, 1)
    head = pixcontrast.ProjectionHead(8, proj_dim=6)
    images, labels = torch.randn(2, 3, 10, 10), torch.randint(0, 4, (2, 10, 10))
    features = backbone(images)
    logits = classifier(features)
    ce = F.cross_entropy(logits, labels)
    criterion = PixelContrastLoss(max_samples=64, max_views=8)
    contrast = 0.1 * criterion(head(features), labels, predictions=logits,
                               generator=torch.Generator().manual_seed(0))
    r = gradient_ratio(contrast, ce, features)

    g_c = torch.autograd.grad(contrast, features, retain_graph=True)[0]
    g_o = torch.autograd.grad(ce, features, retain_graph=True)[0]
    torch.testing.assert_close(r.contrast_norm.float(), g_c.norm())
    torch.testing.assert_close(r.other_norm.float(), g_o.norm())
    torch.testing.assert_close(r.cosine.float(), F.cosine_similarity(g_c.reshape(1, -1),
                                                                    g_o.reshape(1, -1))[0])
    (ce + contrast).backward()  # the graph survived
    assert backbone.weight.grad is not None
    assert set(r.as_dict("grad/")) == {"grad/contrast_norm", "grad/other_norm", "grad/ratio",
                                       "grad/cosine"}


def test_gradient_ratio_when_a_loss_does_not_reach_the_tensor():
    t = torch.randn(3, requires_grad=True)
    u = torch.randn(3, requires_grad=True)
    r = gradient_ratio((u * 2).sum(), t.sum(), t)
    assert r.contrast_norm.item() == 0.0 and r.cosine.item() == 0.0 and r.ratio.item() == 0.0
    r = gradient_ratio(t.sum(), torch.zeros(()), t)
    assert math.isinf(r.ratio.item())


def test_gradient_ratio_arguments_are_validated():
    t = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="contrast_loss must be a scalar"):
        gradient_ratio(t * 2, t.sum(), t)
    with pytest.raises(ValueError, match="tensor must require grad"):
        gradient_ratio(t.sum(), t.sum(), torch.randn(3))
    with pytest.raises(TypeError, match="other_loss must be a torch.Tensor"):
        gradient_ratio(t.sum(), 1.0, t)
