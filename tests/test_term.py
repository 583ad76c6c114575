"""ContrastTerm: the recipe as one module (warm-up skipped with a connected zero, steps only in
training, the weighted loss of its parts, checkpoints). Under DDP: tests/test_distributed.py."""

from __future__ import annotations

import copy

import pytest
import torch

from pixcontrast import ClassMemoryBank, ContrastTerm, PixelContrastLoss

from _helpers import make_maps

CLASSES = 4


def make_term(**options) -> ContrastTerm:
    torch.manual_seed(0)
    settings = dict(in_channels=6, num_classes=CLASSES, total_steps=10, proj_dim=5,
                    max_samples=40, max_views=6)
    return ContrastTerm(**{**settings, **options})


def batch(seed: int = 0):
    features, labels = make_maps(b=2, h=5, w=6, d=6, classes=CLASSES, seed=seed,
                                 dtype=torch.float32)
    logits = torch.randn(2, CLASSES, 5, 6, generator=torch.Generator().manual_seed(seed))
    return features.requires_grad_(), labels, logits


def on(device, dtype, features, labels, logits):
    features = features.detach().to(device, dtype).requires_grad_()
    return features, labels.to(device), logits.to(device, dtype)


def test_warmup_is_an_exact_zero_connected_to_features_and_head_and_skips_the_loss(
        device, dtype) -> None:
    bank = ClassMemoryBank(CLASSES, 5, pixels_per_class=8, regions_per_class=2)
    term = make_term(memory=bank).to(device, dtype)  # warm-up: round(0.2 * 10) = 2 steps
    with pytest.raises(RuntimeError, match="set by the first call"):
        _ = term.last_stats
    for step in range(2):
        features, labels, logits = on(device, dtype, *batch(step))
        features.data[0, 0, 0, 0] = float("inf")  # a 0 * x would make it NaN
        value = term(features, labels, logits)
        assert value.item() == 0.0 and value.dtype == features.dtype
        value.backward()
        assert features.grad is not None and not features.grad.any()
        assert all(p.grad is not None and not p.grad.any() for p in term.head.parameters())
        assert set(term.last_stats) == {"weight"} and term.last_stats["weight"] == 0
    with pytest.raises(RuntimeError, match="set by the first call"):
        _ = term.loss.last_stats  # the loss never ran
    assert int(bank.pixel_count.sum()) == int(bank.region_count.sum()) == 0
    assert term.weight == pytest.approx(0.05)  # the ramp's first step comes next


def test_after_the_warmup_it_is_the_weight_times_the_loss_of_its_parts(device, dtype) -> None:
    term = make_term(warmup=0.0, ramp=0.5, exclude_classes=(3,)).to(device, dtype)
    features, labels, logits = on(device, dtype, *batch())
    value = term(features, labels, logits, generator=torch.Generator().manual_seed(3))

    # independently: the same head and a fresh loss with the same options and random draws
    head = copy.deepcopy(term.head)
    loss = PixelContrastLoss(temperature=0.1, num_classes=CLASSES, exclude_classes=(3,),
                             max_samples=40, max_views=6, normalize=False)
    want = 0.02 * loss(head(features), labels, predictions=logits,
                       generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(value, want)
    assert term.last_stats["weight"].item() == pytest.approx(0.02)
    assert term.last_stats["anchors"] == loss.last_stats["anchors"] > 0
    assert not (term.loss.last_sample.labels == 3).any()


def test_schedule_steps_only_in_training_with_gradients() -> None:
    term = make_term(warmup=0.0, ramp=0.0)
    features, labels, logits = batch()
    term(features, labels, logits)
    term.eval()
    term(features, labels, logits)
    term.train()
    with torch.no_grad():
        term(features, labels, logits)
    assert term.schedule.step_count == 1


def test_state_dict_round_trips_schedule_and_memory() -> None:
    options = dict(memory=ClassMemoryBank(CLASSES, 5, pixels_per_class=8, regions_per_class=2))
    term = make_term(warmup=0.1, ramp=0.3, **options)
    for step in range(3):
        features, labels, logits = batch(step)
        term(features, labels, logits, generator=torch.Generator().manual_seed(step))
    resumed = make_term(**{**options, "memory": ClassMemoryBank(CLASSES, 5, pixels_per_class=8,
                                                                regions_per_class=2)})
    resumed.load_state_dict(term.state_dict())
    assert resumed.schedule.state_dict() == term.schedule.state_dict()
    assert resumed.schedule.step_count == 3 and resumed.weight == term.weight
    features, labels, logits = batch(7)
    values = [t(features, labels, logits, generator=torch.Generator().manual_seed(7))
              for t in (term, resumed)]
    torch.testing.assert_close(values[0], values[1])
    for name, buffer in term.loss.memory.state_dict().items():
        torch.testing.assert_close(resumed.loss.memory.state_dict()[name], buffer)


def test_bad_arguments_are_named_at_construction_and_first_call() -> None:
    with pytest.raises(ValueError, match="warmup"):
        make_term(warmup=1.5)
    with pytest.raises(ValueError, match="warmup \\+ ramp"):
        make_term(warmup=0.6, ramp=0.6)
    with pytest.raises(ValueError, match="proj_dim"):
        make_term(memory=ClassMemoryBank(CLASSES, 7, pixels_per_class=4, regions_per_class=1))
    with pytest.raises(TypeError):
        ContrastTerm(6, num_classes=CLASSES, total_steps=10)  # keyword-only
    term = make_term()
    features, labels, logits = batch()
    with pytest.raises(ValueError, match="in_channels=6"):
        term(features[:, :4], labels, logits)  # during the warm-up already
    with pytest.raises(TypeError, match="labels"):
        term(features, labels.float(), logits)
