"""torch.compile: a training step with a pixcontrast loss inside runs step after step, with
changing label maps, resolutions and anchor counts, and equals the eager step.

The sampler and the miners run eagerly under compile (``torch.compiler.disable``: they need a
host synchronisation and draw tensors of data-dependent size), so with the same seed they draw
the same anchors and keys as in eager mode, from the global generator as from an explicit one.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pixcontrast import MinedContrastLoss, PixelContrastLoss

NUM_CLASSES = 4
IGNORE = 255
# (h, w) of the label maps: repeats (a cached graph is reused), new sizes (dynamo recompiles,
# then marks the sizes dynamic); the embeddings have half the resolution
SIZES = [(10, 9), (10, 9), (13, 9), (10, 9), (13, 9), (10, 9)]

BACKENDS = ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]


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


def batch(step, size):
    g = torch.Generator().manual_seed(100 + step)
    h, w = size
    images = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64)
    # a varying number of classes and ignored pixels: the anchor count changes from step to step
    labels = torch.randint(0, NUM_CLASSES - step % 3, (2, h, w), generator=g)
    labels[torch.rand(2, h, w, generator=g) < 0.25] = IGNORE
    return images, labels


def run_pixel_steps(step_fn, model, criterion):
    results = []
    for i, size in enumerate(SIZES):
        images, labels = batch(i, size)
        model.zero_grad(set_to_none=True)
        # the first steps draw from the global generator, the last ones from an explicit one
        torch.manual_seed(i)
        generator = torch.Generator().manual_seed(i) if i >= 4 else None
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_pixel_contrast_step_compiles_and_equals_eager(backend):
    torch.manual_seed(0)
    model = Segmenter().double()
    criterion = PixelContrastLoss(max_samples=40, max_views=5, num_classes=NUM_CLASSES,
                                  ignore_index=IGNORE)
    eager = run_pixel_steps(pixel_step, copy.deepcopy(model), copy.deepcopy(criterion))
    compiled_step = torch.compile(pixel_step, backend=backend)
    compiled = run_pixel_steps(compiled_step, model, criterion)

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


@pytest.mark.parametrize("miner", ["semi-hard", "class-relation"])
def test_mined_contrast_step_compiles_and_equals_eager(miner):
    # both miners draw at random, with sizes known only after a host synchronisation
    torch.manual_seed(0)
    projection = torch.nn.Linear(5, 6).double()
    criterion = MinedContrastLoss(miner, num_positives=2, num_negatives=3)

    def run(step_fn, projection):
        results = []
        for i, n in enumerate([10, 10, 13, 9, 10, 16]):
            g = torch.Generator().manual_seed(i)
            anchors = torch.randn(n, 5, generator=g, dtype=torch.float64)
            labels = torch.randint(0, 3, (n,), generator=g)
            projection.zero_grad(set_to_none=True)
            torch.manual_seed(i)
            loss = step_fn(projection, criterion, anchors, labels)
            results.append((loss.detach(), projection.weight.grad.clone()))
        return results

    eager = run(mined_step, copy.deepcopy(projection))
    compiled = run(torch.compile(mined_step, backend="aot_eager"), projection)
    for (loss_c, grad_c), (loss_e, grad_e) in zip(compiled, eager):
        assert_same(loss_c, loss_e)
        assert_same(grad_c, grad_e)


def test_eager_use_never_imports_dynamo():
    # the compile cooperation is lazy: torch._dynamo (which imports Triton) stays unloaded
    script = """
import sys, torch, pixcontrast
sample = pixcontrast.HardAnchorSampler()(torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4).long())
pixcontrast.mine_keys(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), miner="semi-hard",
                      num_positives=1, num_negatives=1)
assert sample.indices.numel() == 16
assert "torch._dynamo" not in sys.modules, "eager sampling imported torch._dynamo"
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
