"""torch.compile: a training step with a pixcontrast loss inside runs step after step, with
changing label maps, resolutions and anchor counts, and equals the eager step.

The sampler and the miners run eagerly under compile (``torch.compiler.disable``: they need a
host synchronisation and draw tensors of data-dependent size), so with the same seed they draw
the same anchors and keys as in eager mode, from the global generator as from an explicit one.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pixcontrast import MinedContrastLoss, PixelContrastLoss

NUM_CLASSES = 4
IGNORE = 255
# Steps of (batch, (h, w) of the label maps, classes drawn, explicit generator); the embeddings
# have half the resolution. Step 1 changes every size and the label map (dynamo recompiles, then
# marks the sizes dynamic); step 2 returns to the first size with an explicit generator (the
# graphs the generator passes through recompile, and so does the loss's, which specialises on the
# anchors per class); step 3 repeats step 2's batch with a new draw: every graph is reused. Three
# anchor counts; the first steps draw from the global generator, the last ones from an explicit
# one.
STEPS = [(0, (10, 9), 4, False), (1, (13, 9), 3, False), (2, (10, 9), 3, True),
         (2, (10, 9), 3, True)]
# The longer run (slow): more class counts, and the explicit generator at both sizes
LONG_STEPS = [(0, (10, 9), 4, False), (1, (10, 9), 3, False), (2, (13, 9), 2, False),
              (3, (10, 9), 4, False), (4, (13, 9), 3, True), (5, (10, 9), 2, True)]
# Anchor counts of the miner steps: a repeat (the cached graph), a new count (dynamo recompiles
# with a dynamic size), then another one (the dynamic graph)
MINED_SIZES = [10, 10, 13, 9]
LONG_MINED_SIZES = [10, 10, 13, 9, 10, 16]

BACKENDS = [
    pytest.param("aot_eager", STEPS, id="aot_eager"),
    pytest.param("aot_eager", LONG_STEPS, id="aot_eager-long", marks=pytest.mark.slow),
    pytest.param("inductor", LONG_STEPS, id="inductor", marks=pytest.mark.slow),
]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def assert_same(compiled, eager):
    # fp64 throughout: a compiled graph may only reorder sums of at most a few hundred terms,
    # an error of about n * 2.2e-16 of their magnitude; 1e-12 of it bounds that, while a
    # different sample or a wrong gradient would differ in the leading digits
    scale = 1.0 + float(eager.abs().max()) if eager.numel() else 1.0
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-12 * scale)


class Segmenter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)  # labels get resized
        self.classify = torch.nn.Conv2d(8, NUM_CLASSES, 1)


def batch(seed, size, classes):
    g = torch.Generator().manual_seed(100 + seed)
    h, w = size
    images = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64)
    # a varying number of classes and ignored pixels: the anchor count changes from step to step
    labels = torch.randint(0, classes, (2, h, w), generator=g)
    labels[torch.rand(2, h, w, generator=g) < 0.25] = IGNORE
    return images, labels


def run_pixel_steps(step_fn, model, criterion, steps):
    results = []
    for i, (seed, size, classes, explicit) in enumerate(steps):
        images, labels = batch(seed, size, classes)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(i)
        generator = torch.Generator().manual_seed(i) if explicit else None
        loss = step_fn(model, criterion, images, labels, generator)
        sample = criterion.last_sample
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()],
                        sample.indices.clone()))
    return results


def pixel_step(model, criterion, images, labels, generator):
    embeddings = model.embed(images)
    logits = model.classify(embeddings)
    contrast = criterion(embeddings, labels, logits, generator=generator)
    full = F.interpolate(logits, labels.shape[-2:], mode="bilinear", align_corners=False)
    (F.cross_entropy(full, labels, ignore_index=IGNORE) + 0.1 * contrast).backward()
    return contrast


@pytest.mark.parametrize("backend, steps", BACKENDS)
def test_pixel_contrast_step_compiles_and_equals_eager(backend, steps):
    torch.manual_seed(0)
    model = Segmenter().double()
    criterion = PixelContrastLoss(max_samples=40, max_views=5, num_classes=NUM_CLASSES,
                                  ignore_index=IGNORE)
    eager = run_pixel_steps(pixel_step, copy.deepcopy(model), copy.deepcopy(criterion), steps)
    compiled_step = torch.compile(pixel_step, backend=backend)
    compiled = run_pixel_steps(compiled_step, model, criterion, steps)

    counts = [indices.numel() for _, _, indices in eager]
    assert len(set(counts)) > 2, counts  # the steps really change the anchor count
    for (loss_c, grads_c, indices_c), (loss_e, grads_e, indices_e) in zip(compiled, eager):
        assert torch.equal(indices_c, indices_e)  # the same anchors
        assert_same(loss_c, loss_e)
        for grad_c, grad_e in zip(grads_c, grads_e):
            assert_same(grad_c, grad_e)


def mined_step(projection, criterion, anchors, labels):
    loss = criterion(F.normalize(projection(anchors), dim=1), labels)
    loss.backward()
    return loss


def run_mined_steps(step_fn, miner, sizes):
    """Steps of a projection under ``MinedContrastLoss(miner)``: (loss, weight gradient) each."""
    torch.manual_seed(0)
    projection = torch.nn.Linear(5, 6).double()
    criterion = MinedContrastLoss(miner, num_positives=2, num_negatives=3)
    results = []
    for i, n in enumerate(sizes):
        g = torch.Generator().manual_seed(i)
        anchors = torch.randn(n, 5, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 3, (n,), generator=g)
        projection.zero_grad(set_to_none=True)
        torch.manual_seed(i)
        loss = step_fn(projection, criterion, anchors, labels)
        results.append((loss.detach(), projection.weight.grad.clone()))
    return results


def assert_mined_steps_equal_eager(compiled_step, miner, sizes):
    eager = run_mined_steps(mined_step, miner, sizes)
    compiled = run_mined_steps(compiled_step, miner, sizes)
    for (loss_c, grad_c), (loss_e, grad_e) in zip(compiled, eager):
        assert_same(loss_c, loss_e)
        assert_same(grad_c, grad_e)


def test_mined_contrast_steps_compile_and_equal_eager():
    # both miners draw at random, with sizes known only after a host synchronisation. One
    # compiled step for both: the first miner's steps compile (and recompile for a new size),
    # the second's reuse those graphs but not the first miner's call (dynamo guards the miner)
    compiled_step = torch.compile(mined_step, backend="aot_eager")
    for miner in ["semi-hard", "class-relation"]:
        assert_mined_steps_equal_eager(compiled_step, miner, MINED_SIZES)


@pytest.mark.slow
@pytest.mark.parametrize("miner", ["semi-hard", "class-relation"])
def test_mined_contrast_step_compiles_and_equals_eager(miner):
    # each miner on its own, from a fresh dynamo
    compiled_step = torch.compile(mined_step, backend="aot_eager")
    assert_mined_steps_equal_eager(compiled_step, miner, LONG_MINED_SIZES)


def test_eager_use_never_imports_dynamo(fresh_eager_process):
    # the compile cooperation is lazy: torch._dynamo (which imports Triton) stays unloaded by
    # sampling and mining in a fresh process (conftest.py runs it, with test_dispatch's checks)
    assert fresh_eager_process["sampled"] == 16
    assert not fresh_eager_process["dynamo_after_sampling_and_mining"], \
        "eager sampling imported torch._dynamo"
