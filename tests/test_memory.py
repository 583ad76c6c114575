"""ClassMemoryBank, region_embeddings and the losses that use them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pixcontrast.functional import contrastive_loss, region_embeddings, resize_labels
from pixcontrast.losses import PixelContrastLoss, RegionContrastLoss
from pixcontrast.memory import ClassMemoryBank

from _helpers import assert_close_to_oracle, gamma, unit_roundoff

IGNORE = 255


def row_batch(rows: list[list[int]], ids: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of one-row images: labels ``[B, 1, W]`` and 2-d embeddings ``[B, 2, 1, W]``
    whose first channel carries the given ids and whose second is 1."""
    labels = torch.tensor(rows)[:, None, :]
    first = torch.tensor(ids, dtype=torch.float64)[:, None, None, :]
    return torch.cat([first, torch.ones_like(first)], dim=1), labels


def expected_ring(history: list[float], slots: int) -> dict[int, float]:
    """Slot -> entry after a FIFO of ``slots`` has seen ``history``: entry ``i`` sits in slot
    ``i % slots`` while it is among the newest ``slots``."""
    return {i % slots: value for i, value in enumerate(history) if i >= len(history) - slots}


def test_pixel_rings_are_fifo_and_wrap_around(device) -> None:
    slots = 4
    bank = ClassMemoryBank(3, 2, pixels_per_class=slots, regions_per_class=0, pixels_per_image=99)
    bank.double().to(device)
    batches = [
        [[0, 0, 1, IGNORE, 2, 2], [1, 0, IGNORE, IGNORE, IGNORE, IGNORE]],
        [[0, 0, 0, 0, 0, 0], [2, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE]],  # 6 > 4 of class 0
        [[IGNORE] * 6, [IGNORE] * 6],  # nothing to enqueue
        [[1, 1, 1, 2, 0, IGNORE], [1, 1, 2, 2, 2, 0]],
    ]
    history: dict[int, list[float]] = {0: [], 1: [], 2: []}
    next_id = 0
    for rows in batches:
        ids = [[float(next_id + 6 * b + i) for i in range(6)] for b in range(2)]
        next_id += 12
        for row, row_ids in zip(rows, ids):
            for label, value in zip(row, row_ids):
                if label != IGNORE:
                    history[label].append(value)
        bank.enqueue(*(t.to(device) for t in row_batch(rows, ids)))
        for c in range(3):
            expected = expected_ring(history[c], slots)
            stored = {s: float(bank.pixel_queue[c, s, 0]) for s in range(int(bank.pixel_count[c]))}
            assert stored == expected, (c, rows)
            assert int(bank.pixel_count[c]) == min(len(history[c]), slots)
            assert int(bank.pixel_pointer[c]) == len(history[c]) % slots
    assert int(bank.region_count.sum()) == 0


def test_region_rings_are_fifo_and_wrap_around(device) -> None:
    slots = 3
    bank = ClassMemoryBank(2, 2, pixels_per_class=0, regions_per_class=slots)
    bank.double().to(device)
    history: dict[int, list[int]] = {0: [], 1: []}
    next_id = 0
    for rows in ([[1, 1, 0], [1, 1, 1], [IGNORE, 1, 1], [0, 0, 1]], [[0, 0, 0], [1, 0, 1]]):
        # Every (image, class) region gets one constant unit vector encoding its id as an angle.
        batch = torch.zeros(len(rows), 2, 1, 3, dtype=torch.float64)
        for b, row in enumerate(rows):
            for c in sorted(set(row) - {IGNORE}):
                angle = 0.1 * next_id
                for i, label in enumerate(row):
                    if label == c:
                        batch[b, :, 0, i] = torch.tensor([math.cos(angle), math.sin(angle)])
                history[c].append(next_id)
                next_id += 1
        bank.enqueue(batch.to(device), torch.tensor(rows, device=device)[:, None, :])
        for c in range(2):
            count = int(bank.region_count[c])
            stored = bank.region_queue[c, :count]
            decoded = torch.atan2(stored[:, 1], stored[:, 0]) / 0.1
            assert dict(enumerate(decoded.round().long().tolist())) == expected_ring(
                history[c], slots
            )
            assert count == min(len(history[c]), slots)
            assert int(bank.region_pointer[c]) == len(history[c]) % slots


def test_keys_returns_only_filled_slots_grouped_by_class() -> None:
    bank = ClassMemoryBank(4, 3, pixels_per_class=5, regions_per_class=2, pixels_per_image=2)
    bank.queue.fill_(float("nan"))  # an unfilled slot would show up as NaN
    assert bank.keys()[0].shape == (0, 3)
    labels = torch.tensor([[[0, 0, 0], [2, 2, IGNORE]], [[2, 2, 2], [0, IGNORE, 2]]])
    generator = torch.Generator().manual_seed(0)
    with pytest.warns(UserWarning, match="modified outside enqueue"):
        bank.enqueue(F.normalize(torch.randn(2, 3, 2, 3), dim=1), labels, generator)

    keys, key_labels = bank.keys()
    assert not torch.isnan(keys).any()
    # class 0: 2 + 1 pixels, 2 regions; class 2: 2 + 2 pixels, 2 regions; classes 1, 3: none.
    assert key_labels.tolist() == [0] * 5 + [2] * 6
    pixel_keys, pixel_labels = bank.keys(regions=False)
    region_keys, region_labels = bank.keys(pixels=False)
    assert pixel_labels.tolist() == [0] * 3 + [2] * 4
    assert region_labels.tolist() == [0] * 2 + [2] * 2
    assert torch.equal(keys[:3], pixel_keys[:3]) and torch.equal(keys[3:5], region_keys[:2])
    assert torch.equal(bank.pixel_count, torch.tensor([3, 0, 4, 0]))
    assert torch.equal(bank.region_count, torch.tensor([2, 0, 2, 0]))


def test_full_memory_keys_are_a_view() -> None:
    bank = ClassMemoryBank(2, 3, pixels_per_class=1, regions_per_class=1, pixels_per_image=1)
    bank.enqueue(torch.randn(1, 3, 1, 2), torch.tensor([[[0, 1]]]))
    keys, key_labels = bank.keys()
    assert keys.data_ptr() == bank.queue.data_ptr()
    assert key_labels.tolist() == [0, 0, 1, 1]


def loop_regions(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Region embeddings by explicit loops, ordered by class then image."""
    rows, region_labels = [], []
    for c in sorted(set(labels.unique().tolist()) - {IGNORE}):
        for b in range(embeddings.shape[0]):
            mask = labels[b] == c
            if mask.any():
                mean = embeddings[b][:, mask].mean(dim=1)
                rows.append(mean / mean.norm())
                region_labels.append(c)
    return torch.stack(rows), region_labels


def region_floors(
    embeddings: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype, normalized: bool = False
) -> torch.Tensor:
    """Rounding floors of :func:`loop_regions`' rows for means accumulated in fp32, rounded to
    ``dtype`` and then normalised: a mean of ``c`` pixels errs by at most ``gamma(c)`` times the
    mean of their absolute values (``gamma(D + 1)`` more when each pixel was normalised first),
    its rounding by ``u`` of itself; dividing by the mean's norm turns an error ``e`` into at most
    ``2 |e| / |mean|``, and the norm adds ``gamma(D + 1)``."""
    rounding = unit_roundoff(dtype) if dtype != torch.float32 else 0.0
    floors = []
    dim = embeddings.shape[1]
    for c in sorted(set(labels.unique().tolist()) - {IGNORE}):
        for b in range(embeddings.shape[0]):
            mask = labels[b] == c
            if mask.any():
                pixels = embeddings[b][:, mask].double()
                relative = gamma(pixels.shape[1]) + (gamma(dim + 1) if normalized else 0.0)
                mean_error = relative * pixels.abs().mean(dim=1)
                norm = pixels.mean(dim=1).norm()
                floor = 2 * mean_error.norm() / norm + 2 * rounding + gamma(dim + 1)
                floors.append(floor.expand(dim))
    return torch.stack(floors)


@pytest.fixture(params=["scatter", "product"])
def region_means(request, monkeypatch):
    """Run a test with each way of computing region means (on CPU the product is not the
    default)."""
    import pixcontrast._pixels

    monkeypatch.setattr(
        pixcontrast._pixels, "_region_means_by_product", lambda device: request.param == "product"
    )
    return request.param


def test_region_embeddings_match_loops_and_gradients(region_means) -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 3, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    labels = torch.randint(0, 4, (3, 6, 8), generator=generator)
    labels[0, :3] = IGNORE
    labels[2] = 1
    small = resize_labels(labels, (3, 4))
    regions, region_labels = region_embeddings(x, small, IGNORE)
    expected, expected_labels = loop_regions(x, small)
    assert region_labels.tolist() == expected_labels
    torch.testing.assert_close(regions, expected)
    weights = torch.randn(regions.shape, dtype=torch.float64, generator=generator)
    (grad,) = torch.autograd.grad((regions * weights).sum(), x)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), x)
    torch.testing.assert_close(grad, expected_grad)

    bank = ClassMemoryBank(4, 5, pixels_per_class=0, regions_per_class=3).double()
    bank.enqueue(x, labels)  # full resolution labels: the bank resizes them like the loss
    stored, stored_labels = bank.keys()
    assert stored_labels.tolist() == expected_labels
    torch.testing.assert_close(stored, expected.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_region_embeddings_many_classes_and_16_bit(dtype, region_means) -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 37, 61, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 40, (2, 37, 61), generator=generator)
    labels[1, :20] = 7  # a region of more than 1,220 pixels
    labels[0, :, :3] = IGNORE
    regions, region_labels = region_embeddings(x.to(dtype), labels, IGNORE)
    expected, expected_labels = loop_regions(x.to(dtype).double(), labels)
    assert regions.dtype == dtype and region_labels.tolist() == expected_labels
    # means of up to 1,220 pixels: the loop in fp32 sets the scale, results round to `dtype`
    reference, _ = loop_regions(x.to(dtype).float(), labels)
    floors = region_floors(x.to(dtype), labels, dtype)
    assert_close_to_oracle(regions, expected, reference, floors)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_region_embeddings_of_normalised_pixels(dtype, region_means) -> None:
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(3, 19, 5, 7, dtype=torch.float64, generator=generator)
    x[0, :, 1, 2] = 0  # a zero pixel: F.normalize leaves it zero, its gradient is g / eps
    x[1, :, 0, 0] *= 1e-14
    x = x.to(dtype).requires_grad_()
    labels = torch.randint(0, 4, (3, 5, 7), generator=generator)
    labels[2, :2] = IGNORE
    regions, region_labels = region_embeddings(x, labels, IGNORE, normalize_pixels=True)
    # the reference normalises the map in float64 (in float16 F.normalize's eps underflows)
    x64 = x.detach().double().requires_grad_()
    expected, expected_labels = region_embeddings(F.normalize(x64, dim=1), labels, IGNORE)
    assert regions.dtype == dtype and torch.equal(region_labels, expected_labels)
    if dtype == torch.float64:
        torch.testing.assert_close(regions, expected)
    else:  # normalised in fp32 (the oracle in fp64), means of up to 35 pixels
        reference, _ = region_embeddings(F.normalize(x.detach().float(), dim=1), labels, IGNORE)
        floors = region_floors(F.normalize(x64.detach(), dim=1), labels, dtype, normalized=True)
        assert_close_to_oracle(regions, expected, reference, floors)
    # Gradients: a pixel's entry is its region's gradient over the count, through two
    # normalisations (dot products of D = 19 terms), not a sum over pixels: fixed tolerances.
    tolerance = {"rtol": 2e-3, "atol": 2e-3} if dtype == torch.float16 else {}
    weights = torch.randn(regions.shape, dtype=torch.float64, generator=generator)
    (grad,) = torch.autograd.grad((regions * weights.to(dtype)).sum(), x)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), x64)
    if dtype == torch.float16:  # the zero pixels' gradient, g / eps, overflows float16
        grad, expected_grad = grad.clone(), expected_grad.clone()
        for pixel in ((0, slice(None), 1, 2), (1, slice(None), 0, 0)):
            grad[pixel] = expected_grad[pixel] = 0
    torch.testing.assert_close(grad, expected_grad.to(dtype), **tolerance)


@pytest.mark.parametrize("normalize_pixels", [False, True])
def test_region_embeddings_gradcheck(normalize_pixels, region_means) -> None:
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    labels = torch.randint(0, 3, (2, 3, 4), generator=generator)
    labels[0, 0] = IGNORE
    assert torch.autograd.gradcheck(
        lambda t: region_embeddings(t, labels, IGNORE, normalize_pixels)[0], (x,)
    )


def test_enqueued_pixels_belong_to_their_class_and_follow_the_generator() -> None:
    labels = torch.randint(0, 3, (2, 8, 8), generator=torch.Generator().manual_seed(2))
    labels[:, :, :2] = IGNORE
    x = torch.randn(2, 4, 8, 8)
    x[:, 0] = labels.float()  # channel 0 carries the pixel's label
    per_image = 3

    def run(seed: int) -> ClassMemoryBank:
        bank = ClassMemoryBank(3, 4, pixels_per_class=50, regions_per_class=0,
                               pixels_per_image=per_image)
        bank.enqueue(x, labels, torch.Generator().manual_seed(seed))
        return bank

    bank = run(0)
    keys, key_labels = bank.keys()
    assert torch.equal(keys[:, 0], key_labels.float())
    expected = [
        sum(min(per_image, int((labels[b] == c).sum())) for b in range(2)) for c in range(3)
    ]
    assert bank.pixel_count.tolist() == expected
    assert torch.equal(run(0).queue, bank.queue)
    assert not torch.equal(run(1).queue, bank.queue)


def test_batch_without_valid_pixel_enqueues_nothing() -> None:
    bank = ClassMemoryBank(3, 4, pixels_per_class=4, regions_per_class=4)
    bank.enqueue(torch.randn(1, 4, 2, 2), torch.tensor([[[0, 1], [2, 2]]]))
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    bank.enqueue(torch.randn(2, 4, 2, 2), torch.full((2, 4, 4), IGNORE))
    for name, value in bank.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_state_dict_round_trip_and_to() -> None:
    bank = ClassMemoryBank(3, 4, pixels_per_class=4, regions_per_class=2)
    bank.enqueue(torch.randn(2, 4, 3, 3), torch.randint(0, 3, (2, 3, 3)))
    state = bank.state_dict()
    assert set(state) == {
        "queue", "pixel_pointer", "pixel_count", "region_pointer", "region_count", "_extra_state"
    }
    restored = ClassMemoryBank(3, 4, pixels_per_class=4, regions_per_class=2)
    restored.load_state_dict(state)
    for got, want in zip(restored.keys(), bank.keys()):
        assert torch.equal(got, want)
    bank.to(torch.float64)
    assert bank.queue.dtype == torch.float64 and bank.pixel_count.dtype == torch.long
    bank.to("meta")
    assert all(t.device.type == "meta" for t in bank.buffers())


def run_steps(criterion: PixelContrastLoss, batches, generator: torch.Generator) -> list[float]:
    return [float(criterion(x, y, generator=generator)) for x, y in batches]


def test_resumed_run_equals_uninterrupted_run() -> None:
    data = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(2, 6, 4, 4, generator=data), torch.randint(0, 4, (2, 8, 8), generator=data))
        for _ in range(6)
    ]

    def make() -> PixelContrastLoss:
        bank = ClassMemoryBank(4, 6, pixels_per_class=7, regions_per_class=3, pixels_per_image=2)
        return PixelContrastLoss(max_samples=24, max_views=4, memory=bank)

    straight = make()
    expected = run_steps(straight, batches, torch.Generator().manual_seed(4))

    first = make()
    generator = torch.Generator().manual_seed(4)
    losses = run_steps(first, batches[:3], generator)
    checkpoint = {"loss": first.state_dict(), "rng": generator.get_state()}
    resumed = make()
    resumed.load_state_dict(checkpoint["loss"])
    generator = torch.Generator()
    generator.set_state(checkpoint["rng"])
    losses += run_steps(resumed, batches[3:], generator)

    assert losses == expected
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def filled_bank(
    num_classes: int, dim: int, steps: int, seed: int, device="cpu", **sizes
) -> ClassMemoryBank:
    bank = ClassMemoryBank(num_classes, dim, **sizes).double().to(device)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = F.normalize(torch.randn(2, dim, 4, 4, generator=generator, dtype=torch.float64), dim=1)
        y = torch.randint(0, num_classes, (2, 4, 4), generator=generator)
        bank.enqueue(x.to(device), y.to(device), generator)
    return bank


def anchor_rows(x: torch.Tensor, sample, normalize: bool = True) -> torch.Tensor:
    """The rows of ``x [B, D, h, w]`` at the sample's pixels (normalised), with gradient."""
    rows = (F.normalize(x, dim=1) if normalize else x).permute(0, 2, 3, 1)
    return rows.reshape(-1, x.shape[1])[sample.indices]


@pytest.mark.parametrize("variant", ["paper", "supcon"])
@pytest.mark.parametrize(
    ("pixels", "regions", "steps"),
    [(True, True, 2), (True, False, 2), (False, True, 2), (True, True, 9)],  # 9 steps: full
)
def test_pixel_loss_with_memory_equals_reference(
    variant, pixels, regions, steps, device
) -> None:
    bank = filled_bank(3, 5, steps, seed=5, device=device, pixels_per_class=12,
                       regions_per_class=6, pixels_per_image=2)
    keys, key_labels = (t.clone() for t in bank.keys(pixels, regions))
    counts = bank.pixel_count.clone(), bank.region_count.clone()
    criterion = PixelContrastLoss(
        temperature=0.2, base_temperature=0.1, variant=variant, max_samples=30, max_views=5,
        backend="torch", memory=bank, use_pixel_memory=pixels, use_region_memory=regions,
    )
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64, generator=generator).to(device)
    x.requires_grad_()
    y = torch.randint(0, 3, (2, 8, 8), generator=generator).to(device)
    loss = criterion(x, y, generator=generator)
    (grad,) = torch.autograd.grad(loss, x, retain_graph=True)

    sample = criterion.last_sample
    expected = contrastive_loss(
        anchor_rows(x, sample), sample.labels, keys, key_labels, in_batch=True, temperature=0.2,
        base_temperature=0.1, variant=variant, backend="reference",
    )
    (expected_grad,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
    enqueued = bank.pixel_count.sum() + bank.region_count.sum()
    assert enqueued > counts[0].sum() + counts[1].sum() or steps == 9


def test_enqueue_false_leaves_memory_to_the_caller() -> None:
    bank = ClassMemoryBank(3, 5, pixels_per_class=6, regions_per_class=6)
    criterion = PixelContrastLoss(max_samples=16, max_views=4, memory=bank, enqueue=False)
    x, y = torch.randn(2, 5, 4, 4), torch.randint(0, 3, (2, 4, 4))
    criterion(x, y)
    assert int(bank.pixel_count.sum() + bank.region_count.sum()) == 0
    bank.enqueue(F.normalize(x, dim=1), y)
    assert int(bank.region_count.sum()) > 0


@pytest.mark.parametrize(("use_batch_regions", "normalize"), [(True, True), (False, True),
                                                              (True, False)])
def test_region_loss_equals_reference(use_batch_regions, normalize, device) -> None:
    bank = filled_bank(3, 5, 3, seed=7, device=device, pixels_per_class=0, regions_per_class=4)
    stored, stored_labels = (t.clone() for t in bank.keys())
    criterion = RegionContrastLoss(
        max_samples=30, max_views=5, backend="torch", memory=bank,
        use_batch_regions=use_batch_regions, normalize=normalize,
    )
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64, generator=generator).to(device)
    x.requires_grad_()
    y = torch.randint(0, 3, (2, 4, 4), generator=generator).to(device)
    y[0, 0] = IGNORE
    loss = criterion(x, y, generator=generator)
    (grad,) = torch.autograd.grad(loss, x, retain_graph=True)

    keys, key_labels = stored, stored_labels
    if use_batch_regions:
        regions, region_labels = loop_regions(F.normalize(x, dim=1) if normalize else x, y)
        keys = torch.cat([regions, stored])
        key_labels = torch.cat([torch.tensor(region_labels, device=device), stored_labels])
    sample = criterion.last_sample
    expected = contrastive_loss(
        anchor_rows(x, sample, normalize), sample.labels, keys, key_labels, in_batch=False,
        backend="reference",
    )
    (expected_grad,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 0, "dim": 4}, "num_classes"),
        ({"num_classes": 3, "dim": 0}, "dim"),
        ({"num_classes": 3, "dim": 4, "pixels_per_image": 0}, "pixels_per_image"),
        ({"num_classes": 3, "dim": 4, "pixels_per_class": 0, "regions_per_class": 0}, "both"),
        ({"num_classes": 3, "dim": 4, "ignore_index": 2}, "ignore_index"),
    ],
)
def test_bank_constructor_errors(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        ClassMemoryBank(**kwargs)


def test_enqueue_errors() -> None:
    bank = ClassMemoryBank(3, 4, pixels_per_class=4, regions_per_class=4)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="embeddings has D=5 .* dim is 4"):
        bank.enqueue(torch.randn(2, 5, 4, 4), labels)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        bank.enqueue(torch.randn(2, 4, 4, 4), labels + 3)
    with pytest.raises(ValueError, match="embeddings is on meta"):
        bank.enqueue(torch.randn(2, 4, 4, 4, device="meta"), labels)
    with pytest.raises(ValueError, match="labels is on meta"):
        bank.enqueue(torch.randn(2, 4, 4, 4), labels.to("meta"))
    with pytest.raises(ValueError, match="labels has batch size 1"):
        bank.enqueue(torch.randn(2, 4, 4, 4), labels[:1])


def test_loss_memory_errors() -> None:
    bank = ClassMemoryBank(3, 4, pixels_per_class=4, regions_per_class=4)
    with pytest.raises(ValueError, match="num_classes=5 but memory has 3"):
        PixelContrastLoss(num_classes=5, memory=bank)
    with pytest.raises(ValueError, match="ignore_index=-1"):
        PixelContrastLoss(ignore_index=-1, memory=bank)
    with pytest.raises(TypeError, match="memory must be a ClassMemoryBank"):
        PixelContrastLoss(memory=torch.zeros(3))
    with pytest.raises(ValueError, match="use_batch_regions=False"):
        RegionContrastLoss(use_batch_regions=False)
    criterion = PixelContrastLoss(memory=bank)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="memory bank's dim"):
        criterion(torch.randn(2, 6, 4, 4), labels)
    with pytest.raises(ValueError, match="predictions has 5 classes but num_classes is 3"):
        criterion(torch.randn(2, 4, 4, 4), labels, predictions=torch.randn(2, 5, 4, 4))
    assert int(bank.pixel_count.sum()) == 0


def test_enqueue_normalize_equals_enqueueing_the_normalised_map() -> None:
    generator = torch.Generator().manual_seed(6)
    x = 3 * torch.randn(2, 5, 6, 7, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 3, (2, 12, 14), generator=generator)
    labels[1, :4] = IGNORE
    banks = [
        ClassMemoryBank(3, 5, pixels_per_class=40, regions_per_class=8, pixels_per_image=4).double()
        for _ in range(2)
    ]
    banks[0].enqueue(F.normalize(x, dim=1), labels, torch.Generator().manual_seed(0))
    banks[1].enqueue(x, labels, torch.Generator().manual_seed(0), normalize=True)
    torch.testing.assert_close(banks[1].queue, banks[0].queue)
    assert banks[1].queue.abs().sum() > 0
    assert torch.equal(banks[1].pixel_count, banks[0].pixel_count)
    assert torch.equal(banks[1].region_count, banks[0].region_count)


def test_region_embeddings_second_derivative_raises() -> None:
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    regions, _ = region_embeddings(x, torch.tensor([[[0, 0], [1, 1]]]))
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(regions.sum(), x, create_graph=True)


@pytest.mark.parametrize("normalize", [True, False])
def test_pixel_loss_enqueues_what_it_contrasts(normalize) -> None:
    bank = ClassMemoryBank(3, 5, pixels_per_class=40, regions_per_class=0, pixels_per_image=3)
    criterion = PixelContrastLoss(max_samples=16, max_views=4, memory=bank, normalize=normalize)
    x = 3 * torch.randn(2, 5, 4, 4, generator=torch.Generator().manual_seed(9))
    criterion(x, torch.randint(0, 3, (2, 4, 4), generator=torch.Generator().manual_seed(10)))
    pixels = x.permute(0, 2, 3, 1).reshape(-1, 5)
    pixels = F.normalize(pixels, dim=1) if normalize else pixels
    keys, _ = bank.keys()
    assert len(keys) > 0
    distances = (keys[:, None] - pixels).norm(dim=2).min(dim=1).values  # each key is a pixel
    torch.testing.assert_close(distances, torch.zeros_like(distances), atol=1e-5, rtol=0)


def test_region_embeddings_of_normalised_pixels_allocate_little(region_means) -> None:
    """Forward + backward allocate in all about three maps' worth (the gradient map, scaled
    blocks or the one-hot weights), against about ten when the normalised map is built."""
    x = torch.randn(4, 32, 16, 16, requires_grad=True)
    labels = torch.randint(0, 5, (4, 16, 16), generator=torch.Generator().manual_seed(11))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        regions, _ = region_embeddings(x, labels, IGNORE, normalize_pixels=True)
        regions.backward(torch.randn_like(regions))
    allocated = sum(max(event.self_cpu_memory_usage, 0) for event in prof.events())
    assert allocated < 4 * x.numel() * x.element_size()


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"num_classes": 0}, ValueError, "num_classes must be >= 1, got 0"),
        ({"dim": 2.0}, TypeError, "dim must be an integer, got float"),
        ({"pixels_per_class": -1}, ValueError, "pixels_per_class must be >= 0, got -1"),
        ({"regions_per_class": True}, TypeError, "regions_per_class must be an integer"),
        ({"pixels_per_image": 0}, ValueError, "pixels_per_image must be >= 1, got 0"),
        ({"pixels_per_class": 0, "regions_per_class": 0}, ValueError, "cannot both be 0"),
    ],
)
def test_constructor_names_the_bad_count(options, error, message) -> None:
    arguments = {"num_classes": 3, "dim": 4, **options}
    num_classes, dim = arguments.pop("num_classes"), arguments.pop("dim")
    with pytest.raises(error, match=message):
        ClassMemoryBank(num_classes, dim, **arguments)
