"""Training-loop contracts: no silently wrong result where a real loop can reach one.

Each test drives the library the way a training loop (or a careless one) does: keys changed
between forward and backward, gradient penalties, extreme but finite settings, evaluation
batches, checkpoints of another configuration, deep copies of a trained loss, a bank inside a
module whose buffers are overwritten.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from pixcontrast import (
    ClassMemoryBank,
    ConfidenceAnchorSampler,
    HardAnchorSampler,
    PixelContrastLoss,
    RegionContrastLoss,
    contrastive_loss,
)
from pixcontrast.functional import region_embeddings
from pixcontrast.samplers import pixel_maps, select_anchors

IGNORE = 255


def unit(*shape: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                                   dtype=dtype), dim=-1)


def full_bank(num_classes: int = 3, dim: int = 6, slots: int = 4) -> ClassMemoryBank:
    """A bank whose every pixel slot is filled, so that ``keys()`` is a view of the queue."""
    bank = ClassMemoryBank(num_classes, dim, pixels_per_class=slots, regions_per_class=0,
                           pixels_per_image=slots).double()
    labels = torch.arange(num_classes).repeat_interleave(slots).view(1, 1, -1)
    pixels = torch.randn(1, dim, 1, labels.shape[-1], dtype=torch.float64,
                         generator=torch.Generator().manual_seed(1))
    bank.enqueue(F.normalize(pixels, dim=1), labels)
    assert int(bank.pixel_count.min()) == slots
    return bank


# ---------------------------------------------------------------------------------------------
# keys changed between forward and backward


def test_loss_enqueue_backward_with_bank_keys_raises_on_the_recomputing_path() -> None:
    bank = full_bank()
    keys, key_labels = bank.keys()
    assert keys.data_ptr() == bank.queue.data_ptr()  # a view: enqueue writes into it
    x = unit(10, 6, seed=2).requires_grad_()
    y = torch.arange(10) % 3
    loss = contrastive_loss(x, y, keys, key_labels, reduction="none", backend="torch")
    bank.enqueue(torch.randn(1, 6, 2, 6, dtype=torch.float64), torch.arange(12).view(1, 2, 6) % 3)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()


@pytest.mark.parametrize("variant", ["paper", "supcon"])
def test_in_place_change_of_keys_before_backward_raises(variant) -> None:
    keys = unit(20, 6, seed=4)
    key_labels = torch.arange(20) % 3
    x = unit(7, 6, seed=5).requires_grad_()
    loss = contrastive_loss(x, torch.arange(7) % 3, keys, key_labels, reduction="none",
                            variant=variant, backend="torch")
    keys.mul_(0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward(torch.rand(7, dtype=torch.float64))


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_scalar_reduction_gradient_is_that_of_the_forward_keys(backend) -> None:
    # The documented order of PixelContrastLoss (loss, enqueue, backward) on a scalar loss:
    # the gradient must be the one at the keys the forward pass saw.
    bank = full_bank()
    keys, key_labels = bank.keys()
    frozen = keys.clone()
    x = unit(10, 6, seed=6).requires_grad_()
    y = torch.arange(10) % 3
    loss = contrastive_loss(x, y, keys, key_labels, backend=backend)
    bank.enqueue(torch.randn(1, 6, 2, 6, dtype=torch.float64), torch.arange(12).view(1, 2, 6) % 3)
    assert not torch.equal(keys, frozen)
    # (the scalar path computed its gradients in forward: backward reads no key)
    (grad,) = torch.autograd.grad(loss, x)
    expected = contrastive_loss(x, y, frozen, key_labels, backend="reference")
    (expected_grad,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_pixel_loss_loss_enqueue_backward_is_exact() -> None:
    bank = full_bank(dim=5)
    criterion = PixelContrastLoss(max_samples=40, max_views=5, memory=bank, backend="torch")
    frozen_keys, frozen_labels = (t.clone() for t in bank.keys())
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (2, 4, 4), generator=torch.Generator().manual_seed(8))
    loss = criterion(x, y, generator=torch.Generator().manual_seed(9))  # enqueues
    assert not torch.equal(bank.keys()[0], frozen_keys)
    (grad,) = torch.autograd.grad(loss, x)
    sample = criterion.last_sample
    anchors = F.normalize(x, dim=1).permute(0, 2, 3, 1).reshape(-1, 5)[sample.indices]
    expected = contrastive_loss(anchors, sample.labels, frozen_keys, frozen_labels,
                                in_batch=True, backend="reference")
    (expected_grad,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# mixed precision


def test_grad_scaler_never_skips_a_step_for_the_fp16_loss() -> None:
    # GradScaler starts at 2**16, above fp16's largest 65504, and doubles every 3 clean steps
    # here; the true gradients fit in fp16 at every scale reached, so no step may be skipped.
    head = torch.nn.Conv2d(8, 16, 1)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    criterion = PixelContrastLoss(0.1)
    scaler = torch.amp.GradScaler("cpu", growth_interval=3)
    g = torch.Generator().manual_seed(0)
    scales = []
    for _ in range(7):
        features = torch.randn(2, 8, 12, 12, generator=g)
        labels = torch.randint(0, 4, (2, 12, 12), generator=g)
        loss = criterion(head(features).half(), labels, generator=g)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        scales.append(scaler.get_scale())
    assert scales == [2.0**16] * 2 + [2.0**17] * 3 + [2.0**18] * 2


# ---------------------------------------------------------------------------------------------
# second derivatives


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("variant", ["paper", "supcon"])
def test_double_backward_is_refused_by_the_fused_path(variant, reduction) -> None:
    x = unit(9, 4, seed=10).requires_grad_()
    loss = contrastive_loss(x, torch.arange(9) % 3, variant=variant, reduction=reduction,
                            backend="torch")
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(loss.sum(), x, create_graph=True)


def test_gradient_penalty_through_a_head_is_refused_not_wrong() -> None:
    # The penalty's graph reaches the weights through the head alone; without the refusal
    # its gradient would silently miss the loss's second derivative.
    head = torch.nn.Linear(4, 4).double()
    x = unit(9, 4, seed=11).requires_grad_()
    loss = contrastive_loss(F.normalize(head(x), dim=1), torch.arange(9) % 3, backend="torch")
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["torch.func.jvp", "forward_ad"])
def test_forward_mode_is_refused_by_the_fused_path(backend, mode) -> None:
    dtype = torch.float16 if backend == "triton" else torch.float32  # (Triton: no fp32 FMA)
    x, y = unit(9, 4, seed=12).to(dtype), torch.arange(9) % 3
    keys, key_labels = unit(5, 4, seed=13).to(dtype), torch.arange(5) % 3
    if backend == "triton":
        from pixcontrast.ops import triton_fused

        reasons = triton_fused.unsupported(x, (keys,))
        if reasons:
            pytest.skip("; ".join(reasons))

    def loss(keys: torch.Tensor) -> torch.Tensor:  # (a tangent on the keys only)
        return contrastive_loss(x, y, keys, key_labels, backend=backend)

    tangent = torch.randn_like(keys)
    with pytest.raises(RuntimeError, match="no forward-mode derivative.*backend=\"reference\""):
        if mode == "forward_ad":
            with forward_ad.dual_level():
                loss(forward_ad.make_dual(keys, tangent))
        else:
            torch.func.jvp(loss, (keys,), (tangent,))


def test_forward_mode_of_the_reference_is_the_directional_derivative() -> None:
    x, y = unit(9, 4, seed=12), torch.arange(9) % 3
    tangent = torch.randn(9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    _, got = torch.func.jvp(lambda a: contrastive_loss(a, y, backend="reference"), (x,),
                            (tangent,))
    x.requires_grad_()
    (gradient,) = torch.autograd.grad(contrastive_loss(x, y, backend="torch"), x)
    torch.testing.assert_close(got, (gradient * tangent).sum(), rtol=1e-12, atol=1e-12)


def test_double_backward_of_the_reference_is_plain_autograd() -> None:
    x = unit(6, 3, seed=12).requires_grad_()

    def first(z):
        (g,) = torch.autograd.grad(contrastive_loss(z, torch.arange(6) % 2, backend="reference"),
                                   z, create_graph=True)
        return g.square().sum()

    assert torch.autograd.gradcheck(first, (x,))


# ---------------------------------------------------------------------------------------------
# extreme but finite settings


@pytest.mark.parametrize("kwargs", [
    dict(temperature=1e-40),
    dict(temperature=0.1, base_temperature=1e-300),
    dict(temperature=0.1, base_temperature=1e-320),
])
def test_overflowing_settings_raise_naming_the_cause(kwargs) -> None:
    x = unit(12, 5, seed=13, dtype=torch.float32)
    with pytest.raises(ValueError, match="temperature"):
        contrastive_loss(x, torch.arange(12) % 3, **kwargs)


def test_huge_embeddings_raise_in_float32_and_are_exact_in_float64() -> None:
    x = unit(12, 5, seed=14)
    y = torch.arange(12) % 3
    with pytest.raises(ValueError, match="largest \\|entry\\| of anchors"):
        contrastive_loss(1e18 * x.float(), y)
    big = contrastive_loss(1e18 * x, y, temperature=0.1)
    # an independent evaluation: the loss of the same directions at temperature 0.1 / 1e36
    exact = contrastive_loss(x, y, temperature=0.1 / 1e36, backend="reference")
    torch.testing.assert_close(big, exact, rtol=1e-12, atol=0)
    assert torch.isfinite(big)


def test_pixel_loss_with_huge_unnormalised_embeddings_raises() -> None:
    criterion = PixelContrastLoss(normalize=False, max_samples=32, max_views=4)
    with pytest.raises(ValueError, match="overflow"):
        criterion(1e18 * torch.randn(2, 6, 4, 4), torch.randint(0, 3, (2, 4, 4)))


@pytest.mark.parametrize("variant", ["paper", "supcon"])
@pytest.mark.parametrize("temperature", [1e-30, 0.01])
def test_small_temperatures_stay_finite(variant, temperature) -> None:
    x = unit(15, 4, seed=15, dtype=torch.float32).requires_grad_()
    loss = contrastive_loss(x, torch.arange(15) % 3, temperature=temperature, variant=variant)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------------
# evaluation leaves the memory alone


def enqueued(bank: ClassMemoryBank) -> int:
    return int(bank.pixel_count.sum() + bank.region_count.sum())


@pytest.mark.parametrize("loss_class", [PixelContrastLoss, RegionContrastLoss])
def test_evaluation_batches_are_not_enqueued(loss_class) -> None:
    bank = ClassMemoryBank(3, 4, pixels_per_class=20, regions_per_class=5)
    criterion = loss_class(max_samples=32, max_views=4, memory=bank)
    x = torch.randn(2, 4, 4, 4)
    y = torch.randint(0, 3, (2, 4, 4))
    criterion.eval()
    criterion(x, y)
    criterion.train()
    with torch.no_grad():
        criterion(x, y)
    with torch.inference_mode():
        criterion(x, y)
    assert enqueued(bank) == 0
    criterion(x, y, enqueue=True)  # explicit control still works, here under no_grad too
    assert enqueued(bank) > 0
    count = enqueued(bank)
    criterion(x, y, enqueue=False)
    assert enqueued(bank) == count
    criterion(x, y)  # training mode, gradients on
    assert enqueued(bank) > count


# ---------------------------------------------------------------------------------------------
# memory bank state


def trained_bank(**sizes) -> ClassMemoryBank:
    bank = ClassMemoryBank(3, 4, **sizes)
    generator = torch.Generator().manual_seed(16)
    for _ in range(3):
        bank.enqueue(torch.randn(2, 4, 3, 3, generator=generator),
                     torch.randint(0, 3, (2, 3, 3), generator=generator), generator)
    return bank


def snapshot(bank: ClassMemoryBank) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in bank.state_dict().items()}


def assert_unchanged(bank: ClassMemoryBank, before: dict[str, torch.Tensor]) -> None:
    for name, value in bank.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_state_of_another_split_is_refused_and_leaves_the_bank_unchanged() -> None:
    source = trained_bank(pixels_per_class=6, regions_per_class=2)
    target = trained_bank(pixels_per_class=5, regions_per_class=3)  # same 8 slots per class
    before = snapshot(target)
    with pytest.raises(ValueError, match="layout"):
        target.load_state_dict(source.state_dict())
    assert_unchanged(target, before)


@pytest.mark.parametrize(("name", "value", "match"), [
    ("pixel_count", torch.tensor([-1, 0, 0]), "pixel_count"),
    ("pixel_count", torch.tensor([7, 0, 0]), "pixel_count"),
    ("region_pointer", torch.tensor([0, 2, 0]), "region_pointer"),
    ("pixel_pointer", torch.tensor([1, 0, 0]), "disagree"),
    ("pixel_count", torch.tensor([0.0, 0.0, 0.0]), "integers"),
    ("queue", torch.zeros(3, 7, 4), "shape"),
])
def test_inconsistent_counters_are_refused(name, value, match) -> None:
    fresh = ClassMemoryBank(3, 4, pixels_per_class=6, regions_per_class=2)
    state = snapshot(fresh)
    state[name] = value
    target = trained_bank(pixels_per_class=6, regions_per_class=2)
    before = snapshot(target)
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(state)
    assert_unchanged(target, before)


def test_refusal_inside_a_loss_module_and_round_trip() -> None:
    bank = trained_bank(pixels_per_class=6, regions_per_class=2)
    criterion = PixelContrastLoss(memory=bank)
    other = PixelContrastLoss(memory=ClassMemoryBank(3, 4, pixels_per_class=2,
                                                     regions_per_class=6))
    with pytest.raises(ValueError, match="layout"):
        other.load_state_dict(criterion.state_dict())
    restored = PixelContrastLoss(memory=ClassMemoryBank(3, 4, pixels_per_class=6,
                                                        regions_per_class=2))
    restored.load_state_dict(criterion.state_dict())
    for got, want in zip(restored.memory.keys(), bank.keys()):
        assert torch.equal(got, want)


@pytest.mark.parametrize("strict", [True, False])
def test_state_without_layout_record_is_refused_until_the_record_is_added(strict) -> None:
    bank = trained_bank(pixels_per_class=6, regions_per_class=2)
    state = snapshot(bank)
    del state["_extra_state"]
    target = ClassMemoryBank(3, 4, pixels_per_class=6, regions_per_class=2)
    with pytest.raises(ValueError, match="layout record"):
        target.load_state_dict(state, strict=strict)
    assert not target.queue.any()
    state["_extra_state"] = target.get_extra_state()  # the remedy the message gives
    target.load_state_dict(state, strict=strict)
    assert torch.equal(target.queue, bank.queue)


# ---------------------------------------------------------------------------------------------
# copies of a trained loss


@pytest.mark.parametrize("loss_class", [PixelContrastLoss, RegionContrastLoss])
def test_deepcopy_after_a_training_forward(loss_class) -> None:
    bank = ClassMemoryBank(3, 4, pixels_per_class=20, regions_per_class=5)
    criterion = loss_class(max_samples=32, max_views=4, memory=bank)
    x = torch.randn(2, 4, 4, 4, requires_grad=True)
    y = torch.randint(0, 3, (2, 4, 4))
    criterion(x, y).backward()
    twin = copy.deepcopy(criterion)
    assert twin.memory is not bank and torch.equal(twin.memory.queue, bank.queue)
    assert torch.equal(twin.last_sample.indices, criterion.last_sample.indices)
    assert not criterion.last_sample.embeddings.requires_grad


# ---------------------------------------------------------------------------------------------
# buffers overwritten behind the bank's back (DDP's broadcast_buffers)


def test_foreign_write_into_the_queue_warns_once() -> None:
    bank = trained_bank(pixels_per_class=6, regions_per_class=2)

    def enqueue() -> None:
        bank.enqueue(torch.randn(1, 4, 2, 2, dtype=bank.queue.dtype), torch.zeros(1, 2, 2).long())

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enqueue()
        bank.load_state_dict(snapshot(bank))  # its own load is not foreign
        enqueue()
        bank.to(torch.float64)  # a new queue tensor is not foreign either
        enqueue()
    with torch.no_grad():
        state = trained_bank(pixels_per_class=6, regions_per_class=2).double().state_dict()
        for name in ("queue", "pixel_pointer", "pixel_count", "region_pointer", "region_count"):
            getattr(bank, name).copy_(state[name])  # what a buffer broadcast does
    with pytest.warns(UserWarning, match="broadcast_buffers"):
        enqueue()
    bank.queue.add_(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per bank
        enqueue()


# ---------------------------------------------------------------------------------------------
# arguments a module would silently reinterpret


@pytest.mark.parametrize("ignore_index", [None, 1.5, "255", True])
@pytest.mark.parametrize("build", [
    lambda ignore_index: PixelContrastLoss(ignore_index=ignore_index),
    lambda ignore_index: RegionContrastLoss(ignore_index=ignore_index),
    lambda ignore_index: ClassMemoryBank(3, 4, ignore_index=ignore_index),
    lambda ignore_index: region_embeddings(torch.randn(1, 2, 2, 2), torch.zeros(1, 2, 2).long(),
                                           ignore_index),
])
def test_modules_refuse_a_non_integer_ignore_index(build, ignore_index) -> None:
    with pytest.raises(TypeError, match="ignore_index"):
        build(ignore_index)


def test_empty_label_map_gives_a_connected_zero() -> None:
    x = torch.randn(2, 8, 0, 0, requires_grad=True)
    loss = PixelContrastLoss()(x, torch.zeros(2, 0, 0, dtype=torch.long))
    loss.backward()
    assert float(loss.detach()) == 0 and x.grad.shape == x.shape


# ---------------------------------------------------------------------------------------------
# label dtypes narrower than int64


NARROW_LABELS = [(torch.uint8, -100), (torch.int8, 255), (torch.int16, -100), (torch.int32, 255)]


def _labelled_batch(dtype: torch.dtype, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps whose labels are 0..3, and ``ignore_index`` in a row where ``dtype`` can hold it."""
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(2, 8, 6, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 6, 6), generator=g)
    if torch.iinfo(dtype).min <= ignore_index <= torch.iinfo(dtype).max:
        labels[:, 0] = ignore_index
    return embeddings, labels


@pytest.mark.parametrize("dtype,ignore_index", NARROW_LABELS)
@pytest.mark.parametrize("loss_class", [PixelContrastLoss, RegionContrastLoss])
def test_narrow_label_dtypes_give_the_int64_loss(loss_class, dtype, ignore_index) -> None:
    # ignore_index is one the dtype cannot hold, and exclude_classes relabels class 1 to it
    embeddings, labels = _labelled_batch(dtype, ignore_index)
    results = []
    for labels_of_dtype in (labels, labels.to(dtype)):
        bank = ClassMemoryBank(4, 8, pixels_per_class=10, regions_per_class=2,
                               ignore_index=ignore_index).double()
        loss = loss_class(0.1, ignore_index=ignore_index, exclude_classes=(1,), memory=bank)
        value = loss(embeddings, labels_of_dtype, generator=torch.Generator().manual_seed(1))
        results.append((value, loss.last_sample.labels, bank.queue, bank.pixel_count))
    for wide, narrow in zip(*results):
        assert torch.equal(wide, narrow)
    assert int(results[0][3][1]) == 0  # class 1 was excluded, not enqueued


@pytest.mark.parametrize("dtype,ignore_index", NARROW_LABELS)
def test_narrow_label_dtypes_give_the_int64_sample_and_bank(dtype, ignore_index) -> None:
    embeddings, labels = _labelled_batch(dtype, ignore_index)
    samples, queues = [], []
    for labels_of_dtype in (labels, labels.to(dtype)):
        sampler = HardAnchorSampler(20, 4, num_classes=4)
        samples.append(sampler(embeddings, labels_of_dtype, labels_of_dtype, ignore_index,
                               torch.Generator().manual_seed(2)))
        samples.append(select_anchors(embeddings, labels_of_dtype, max_samples=20, max_views=4,
                                      ignore_index=ignore_index,
                                      generator=torch.Generator().manual_seed(2)))
        bank = ClassMemoryBank(4, 8, pixels_per_class=10, regions_per_class=2,
                               ignore_index=ignore_index, exclude_classes=(1,)).double()
        bank.enqueue(embeddings, labels_of_dtype, generator=torch.Generator().manual_seed(3))
        queues.append(bank.state_dict())
    for wide, narrow in zip(samples[:2], samples[2:]):
        assert torch.equal(wide.indices, narrow.indices)
        assert torch.equal(wide.labels, narrow.labels) and narrow.labels.dtype == torch.int64
    for name, wide in queues[0].items():
        assert torch.equal(wide, queues[1][name]), name


# ---------------------------------------------------------------------------------------------
# user mistakes that would otherwise run silently


@pytest.mark.parametrize("labels_size,embeddings_size", [
    ((513, 513), (65, 65)), ((513, 513), (129, 129)), ((512, 512), (64, 64)),
    ((513, 769), (65, 97)), ((512, 1024), (16, 32)), ((32, 32), (1, 1)), ((26, 39), (22, 33)),
    ((6, 5), (6, 5)),
])
def test_labels_at_one_stride_of_the_embeddings_are_taken(labels_size, embeddings_size) -> None:
    # what networks of output stride 4 to 32 give for even and odd input sizes
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(1, 2, *embeddings_size, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (1, *labels_size), generator=g)
    loss = PixelContrastLoss(0.1, max_samples=64)
    assert torch.isfinite(loss(embeddings, labels, generator=g))
    want = F.interpolate(labels[:, None].float(), embeddings_size, mode="nearest")
    assert torch.equal(pixel_maps(embeddings, labels).labels, want[:, 0].long())


@pytest.mark.parametrize("labels_size", [(30, 45), (4, 4), (8, 7), (16, 24), (64, 8)])
@pytest.mark.parametrize("entry", ["pixel loss", "region loss", "bank"])
def test_labels_of_another_aspect_or_a_lower_resolution_raise(labels_size, entry) -> None:
    embeddings = torch.randn(1, 4, 8, 8)
    labels = torch.zeros(1, *labels_size, dtype=torch.long)
    call = {
        "pixel loss": lambda: PixelContrastLoss()(embeddings, labels),
        "region loss": lambda: RegionContrastLoss()(embeddings, labels),
        "bank": lambda: ClassMemoryBank(3, 4).enqueue(embeddings, labels),
    }[entry]
    with pytest.raises(ValueError, match=r"labels of resolution .* do not fit embeddings of "
                                         r"resolution \(8, 8\)"):
        call()


@pytest.mark.parametrize("labels_size", [(8, 12), (64, 96)])
def test_channels_last_embeddings_raise_with_the_permute(labels_size) -> None:
    embeddings = torch.randn(2, 8, 12, 16)  # [B, h, w, D]
    labels = torch.zeros(2, *labels_size, dtype=torch.long)
    with pytest.raises(ValueError, match=r"channels-last.*embeddings\.permute\(0, 3, 1, 2\)"):
        PixelContrastLoss()(embeddings, labels)
    PixelContrastLoss()(embeddings.permute(0, 3, 1, 2), labels)  # the fix runs


def test_softmax_probabilities_as_logits_raise() -> None:
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(2, 4, 6, 6, generator=g)
    labels = torch.randint(0, 3, (2, 6, 6), generator=g)
    logits = 3 * torch.randn(2, 3, 6, 6, generator=g)
    for probabilities in (logits.softmax(dim=1), logits.half().softmax(dim=1)):
        with pytest.raises(ValueError, match="softmax probabilities.*raw logits"):
            ConfidenceAnchorSampler()(embeddings, labels, logits=probabilities)
        loss = PixelContrastLoss(sampler=ConfidenceAnchorSampler())
        with pytest.raises(ValueError, match="softmax probabilities"):
            loss(embeddings, labels, probabilities)
    # logits never do, even squashed into [0, 1], or log-probabilities
    for scores in (logits, logits.sigmoid(), logits.log_softmax(dim=1),
                   torch.full_like(logits, 1 / 3) + 0.05 * torch.rand(logits.shape, generator=g)):
        ConfidenceAnchorSampler()(embeddings, labels, logits=scores)


@pytest.mark.parametrize("ignore_index,stray", [(-100, 255), (255, -100)])
def test_the_other_conventional_ignore_label_raises(ignore_index, stray) -> None:
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(1, 4, 6, 6, generator=g)
    labels = torch.randint(0, 3, (1, 6, 6), generator=g)
    labels[0, 0] = stray
    for call in (lambda: PixelContrastLoss(ignore_index=ignore_index)(embeddings, labels),
                 lambda: select_anchors(embeddings, labels, ignore_index=ignore_index)):
        with pytest.raises(ValueError, match=f"pass ignore_index={stray}"):
            call()
    if stray == 255:  # a class when num_classes says so
        PixelContrastLoss(ignore_index=ignore_index, num_classes=256)(embeddings, labels)


def test_out_of_range_labels_name_the_bound_the_user_set() -> None:
    embeddings = torch.randn(1, 4, 2, 2)
    labels = torch.tensor([[[0, 1], [2, 2000]]])
    with pytest.raises(ValueError) as error:
        PixelContrastLoss()(embeddings, labels)
    message = str(error.value)
    assert "DEFAULT_NUM_CLASSES=1024, the bound when num_classes is not given" in message
    assert "num_classes=1024" not in message and "Confidence" not in message
    with pytest.raises(ValueError, match=r"\[0, 3\) \(the 3 classes of predictions, its "
                                         r"dimension 1\).*target 2000"):
        PixelContrastLoss()(embeddings, labels, torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"\[0, 5\) \(num_classes=5\)"):
        PixelContrastLoss(num_classes=5)(embeddings, labels)


def test_unnormalised_raw_features_warn_once() -> None:
    g = torch.Generator().manual_seed(0)
    raw = 30 * torch.randn(2, 8, 6, 6, generator=g)
    labels = torch.randint(0, 3, (2, 6, 6), generator=g)
    loss = PixelContrastLoss(0.1, normalize=False)
    with pytest.warns(UserWarning, match=r"normalize=False.*reach .*normalize=True") as record:
        value = loss(raw, labels, generator=g)
    assert record[0].filename == __file__  # (the caller's line, not nn.Module's)
    assert float(value) > 100  # the magnitude the warning explains
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss(raw, labels, generator=g)  # once
        unit_loss = PixelContrastLoss(0.1, normalize=False)
        unit_loss(F.normalize(raw, dim=1), labels, generator=g)  # unit: no warning
        PixelContrastLoss(0.1)(raw, labels, generator=g)  # normalized: no check
