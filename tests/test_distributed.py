"""Multi-process training: gather helpers, cross-rank contrast under DDP and the gathered memory.

Two CPU processes (gloo, a file store in a temporary directory) are started once for the module,
forked from a fresh interpreter that has imported what they need; each runs every scenario of
:data:`SCENARIOS` and saves what it saw. The tests compare that with values computed here: closed
forms for the helpers, and one process training on the concatenated batch for the losses.
"""

from __future__ import annotations

import multiprocessing
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pixcontrast import ContrastTerm, FeatureCapture, distributed
from pixcontrast.losses import PixelContrastLoss, RegionContrastLoss
from pixcontrast.memory import ClassMemoryBank
from pixcontrast.mining import KeyMiner
from pixcontrast.samplers import HardAnchorSampler

from _helpers import torchrun

WORLD = 2
IGNORE = 255
IMAGES = (2, 1)  # images per rank: uneven on purpose
ROW_COUNTS = ((3, 0), (2, 4))  # rows per rank for the helper scenarios
STEPS = 3
ROOT = Path(__file__).resolve().parents[1]

# (loss class, variant, rank whose batch is entirely ignored)
TRAININGS = {
    "pixel-paper": (PixelContrastLoss, "paper", None, None),
    "pixel-supcon": (PixelContrastLoss, "supcon", None, None),
    "region-supcon": (RegionContrastLoss, "supcon", None, None),
    "pixel-empty-rank": (PixelContrastLoss, "paper", 1, None),
    # hardest mining picks the same keys whatever their order in the key space
    "pixel-hardest-miner": (
        PixelContrastLoss, "paper", None, KeyMiner("hardest", num_positives=3, num_negatives=5)
    ),
}


# ---------------------------------------------------------------------------------------------
# data and runs shared by the worker processes and the single-process oracle


def rows(rank: int, count: int) -> torch.Tensor:
    return torch.arange(2 * count, dtype=torch.float64).view(count, 2) + 100 * rank


def row_weight(receiver: int, owner: int) -> float:
    """The weight rank ``receiver``'s loss gives to the rows of rank ``owner``."""
    return (receiver + 1) * 10.0**owner


def batches(step: int, empty_rank: Optional[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per rank, inputs ``[b, 3, 4, 5]`` and labels ``[b, 4, 5]`` (classes 0..2, some ignored)."""
    generator = torch.Generator().manual_seed(step)
    out = []
    for rank, images in enumerate(IMAGES):
        x = torch.randn(images, 3, 4, 5, dtype=torch.float64, generator=generator)
        y = torch.randint(0, 3, (images, 4, 5), generator=generator)
        y[torch.rand(images, 4, 5, generator=generator) < 0.2] = IGNORE
        if rank == empty_rank:
            y.fill_(IGNORE)
        out.append((x, y))
    return out


def train(name: str, rank: Optional[int]) -> list[dict]:
    """A few SGD steps of a 1x1 conv "segmentation model" under a contrastive loss with memory.

    ``rank=None``: one process on the concatenated batch with ``gather=False``; otherwise this
    rank's part under DDP with ``gather=True``.
    """
    loss_class, variant, empty_rank, miner = TRAININGS[name]
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, kernel_size=1).double()
    trained = model if rank is None else DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    bank = ClassMemoryBank(3, 4, pixels_per_class=24, regions_per_class=5, pixels_per_image=99)
    criterion = loss_class(
        temperature=0.5, variant=variant, num_classes=3, memory=bank.double(),
        sampler=HardAnchorSampler(max_samples=10**6, max_views=10**6),  # every pixel
        gather=rank is not None, miner=miner,
    )
    records = []
    for step in range(STEPS):
        parts = batches(step, empty_rank)
        x, y = (torch.cat(t) for t in zip(*parts)) if rank is None else parts[rank]
        embeddings = trained(x)
        embeddings.retain_grad()
        loss = criterion(embeddings, y)
        loss.backward()
        records.append({
            "loss": loss.detach(),
            "anchors": criterion.last_sample.labels.numel(),
            "embedding_grad": embeddings.grad,
            "param_grads": [p.grad.clone() for p in model.parameters()],
            "memory": {k: v.clone() for k, v in bank.state_dict().items()},
        })
        optimizer.step()
        optimizer.zero_grad()
    return records


def random_memory(rank: Optional[int]) -> dict[str, torch.Tensor]:
    """Enqueue random pixels (two per image and class) with each rank's own generator; with
    ``rank=None``, enqueue the ranks' batches one after the other in one process."""
    bank = ClassMemoryBank(3, 3, pixels_per_class=7, regions_per_class=3, pixels_per_image=2)
    generators = [torch.Generator().manual_seed(10 + r) for r in range(WORLD)]
    for step in range(STEPS):
        for r, (x, y) in enumerate(batches(step, empty_rank=None)):
            if rank in (None, r):
                bank.enqueue(x.float(), y, generators[r])
    return bank.state_dict()


def gather_helpers(rank: int) -> list[dict]:
    out = []
    for counts in ROW_COUNTS:
        x = rows(rank, counts[rank]).requires_grad_()
        parts = distributed.all_gather_with_grad(x)
        sum(row_weight(rank, owner) * part.sum() for owner, part in enumerate(parts)).backward()
        labels = distributed.all_gather(torch.full((counts[rank],), rank))
        out.append({
            "parts": [p.detach() for p in parts],
            "parts_require_grad": [p.requires_grad for p in parts],
            "grad": x.grad,
            "labels": labels,
            "labels_require_grad": [t.requires_grad for t in labels],
        })
    total = torch.tensor(rank + 1.0, requires_grad=True)
    mean = distributed.mean_across_ranks(total, torch.tensor(ROW_COUNTS[-1][rank]))
    mean.backward()
    out.append({"mean": mean.detach(), "mean_grad": total.grad,
                "rank": distributed.get_rank(), "world": distributed.get_world_size()})
    return out


def double_backward(rank: int) -> str:
    """The error of a second derivative through the collective gather ('' if none)."""
    x = rows(rank, 2).requires_grad_()
    total = sum(part.square().sum() for part in distributed.all_gather_with_grad(x))
    try:
        torch.autograd.grad(total, x, create_graph=True)
    except RuntimeError as error:
        return str(error)
    return ""


class _SegmenterWithLoss(nn.Module):
    """A model that holds its contrastive loss (and so the bank) inside the DDP-wrapped module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=1).double()
        bank = ClassMemoryBank(3, 4, pixels_per_class=8, regions_per_class=2, gather=False)
        self.criterion = PixelContrastLoss(max_samples=20, max_views=5, memory=bank.double())

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.criterion(self.conv(x), y)


def broadcast_buffers(rank: int) -> list[str]:
    """Warnings seen while training a module that holds its bank under DDP's default
    ``broadcast_buffers=True``."""
    torch.manual_seed(0)
    model = DistributedDataParallel(_SegmenterWithLoss())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            x, y = batches(step, empty_rank=None)[rank]
            model(x, y).backward()
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


class _TinySegmenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(6, 3, kernel_size=1)
        # the term inside the wrapped model, so DDP averages its head's gradients
        self.term = ContrastTerm(in_channels=6, num_classes=3, total_steps=STEPS, warmup=0.34,
                                 ramp=0.0, proj_dim=4, max_samples=20, max_views=5, gather=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))


def term_under_ddp(rank: int) -> dict:
    """A ContrastTerm inside a DDP model without find_unused_parameters, features taken by a
    FeatureCapture through the wrapper: the head's gradients after the warm-up step (zeros,
    not None) and every parameter after the run (identical on every rank)."""
    torch.manual_seed(0)
    model = DistributedDataParallel(_TinySegmenter(), find_unused_parameters=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    capture = FeatureCapture(model, "backbone")
    term = model.module.term
    seen: dict = {"weights": []}
    for step in range(STEPS):
        x, y = batches(step, empty_rank=None)[rank]
        logits = model(x.float())
        loss = F.cross_entropy(logits, y, ignore_index=IGNORE)
        loss = loss + term(capture.take(), y, logits)
        seen["weights"].append(float(term.last_stats["weight"]))
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            seen["warmup_head_grads"] = [
                None if p.grad is None else p.grad.clone() for p in term.head.parameters()
            ]
        optimizer.step()
    seen["parameters"] = [p.detach().clone() for p in model.parameters()]
    capture.remove()
    return seen


SCENARIOS: dict[str, Callable[[int], object]] = {
    "helpers": gather_helpers,
    "term_under_ddp": term_under_ddp,
    "double_backward": double_backward,
    "broadcast_buffers": broadcast_buffers,
    "random_memory": random_memory,
    **{name: (lambda rank, name=name: train(name, rank)) for name in TRAININGS},
}


def worker(rank: int, directory: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{directory}/store", rank=rank, world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    torch.set_num_threads(1)
    results = {name: scenario(rank) for name, scenario in SCENARIOS.items()}
    torch.save(results, f"{directory}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    directory = tmp_path_factory.mktemp("ddp")
    # The ranks fork from one fresh interpreter that has imported torch, the torch._dynamo that
    # DDP and the optimiser load, and this module: once, where spawn imports them in every rank.
    # torch._dynamo before the process group also lets destroy_process_group free the group (see
    # examples/ddp_train.py).
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["torch", "torch._dynamo", "torch.distributed", __name__]
    )
    mp.start_processes(worker, args=(str(directory),), nprocs=WORLD, start_method="forkserver")
    return [torch.load(directory / f"rank{r}.pt") for r in range(WORLD)]


# ---------------------------------------------------------------------------------------------
# two processes


@pytest.mark.parametrize("case", range(len(ROW_COUNTS)))
def test_gather_uneven_rows_and_route_gradients_to_their_owner(ranks, case) -> None:
    counts = ROW_COUNTS[case]
    for rank, result in enumerate(ranks):
        got = result["helpers"][case]
        for owner, part in enumerate(got["parts"]):
            assert torch.equal(part, rows(owner, counts[owner]))
            assert torch.equal(got["labels"][owner], torch.full((counts[owner],), owner))
        assert all(got["parts_require_grad"]) and not any(got["labels_require_grad"])
        # d(sum_p L_p)/dx_rank with L_p = sum_owner weight(p, owner) * sum(rows of owner)
        expected = sum(row_weight(p, rank) for p in range(WORLD))
        want = torch.full((counts[rank], 2), expected, dtype=torch.float64)
        assert torch.equal(got["grad"], want)


def test_mean_across_ranks_scales_by_world_over_global_count(ranks) -> None:
    total_count = sum(ROW_COUNTS[-1])
    for rank, result in enumerate(ranks):
        got = result["helpers"][-1]
        assert (got["rank"], got["world"]) == (rank, WORLD)
        assert float(got["mean"]) == pytest.approx(WORLD * (rank + 1) / total_count)
        assert float(got["mean_grad"]) == pytest.approx(WORLD / total_count)


@pytest.mark.parametrize("name", list(TRAININGS))
def test_ddp_training_equals_one_process_on_the_concatenated_batch(ranks, name) -> None:
    single = train(name, rank=None)
    empty_rank = TRAININGS[name][2]
    for step in range(STEPS):
        want = single[step]
        got = [result[name][step] for result in ranks]
        assert want["anchors"] == sum(g["anchors"] for g in got) > 0
        if empty_rank is not None:
            assert got[empty_rank]["anchors"] == 0
        # the mean of the ranks' losses is the loss of the concatenated batch
        torch.testing.assert_close(sum(g["loss"] for g in got) / WORLD, want["loss"])
        # DDP's averaged parameter gradients are those of the concatenated batch
        for g in got:
            for grad, expected in zip(g["param_grads"], want["param_grads"]):
                torch.testing.assert_close(grad, expected)
        # before DDP's division by the world size, a rank's embedding gradients are W times
        # those of its images in the concatenated batch
        split = torch.split(want["embedding_grad"], IMAGES)
        for g, expected in zip(got, split):
            torch.testing.assert_close(g["embedding_grad"], WORLD * expected)
        # the memory of every rank is the memory of the concatenated batch
        for g in got:
            for key, value in want["memory"].items():
                torch.testing.assert_close(g["memory"][key], value, msg=f"{key} at step {step}")
        assert int(want["memory"]["pixel_count"].sum()) > 0


def test_memory_with_random_pixels_is_identical_on_every_rank(ranks) -> None:
    first, second = (result["random_memory"] for result in ranks)
    expected = random_memory(rank=None)  # rank 0's entries, then rank 1's, at every step
    for key, value in expected.items():
        assert torch.equal(first[key], value), key
        assert torch.equal(second[key], value), key
    assert int(expected["pixel_count"].sum()) > 0


def test_contrast_term_warmup_gives_every_head_parameter_a_gradient_under_ddp(ranks) -> None:
    # without find_unused_parameters, a head parameter without a gradient in the warm-up step
    # would stop DDP at the next step; the run reaching its end is half of the test
    for seen in ranks:
        outcome = seen["term_under_ddp"]
        assert outcome["weights"] == pytest.approx([0.0, 0.1, 0.1])
        grads = outcome["warmup_head_grads"]
        assert len(grads) > 0 and all(g is not None and not g.any() for g in grads)
    for mine, theirs in zip(*(seen["term_under_ddp"]["parameters"] for seen in ranks)):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_second_derivative_through_the_gather_is_refused(ranks) -> None:
    for result in ranks:
        assert "first derivatives only" in result["double_backward"]


def test_bank_inside_a_ddp_module_with_broadcast_buffers_warns_once(ranks) -> None:
    # rank 0 is the broadcast's source; every other rank has its queue overwritten
    for result in ranks[1:]:
        found = [m for m in result["broadcast_buffers"] if "broadcast_buffers" in m]
        assert len(found) == 1, result["broadcast_buffers"]


# ---------------------------------------------------------------------------------------------
# one process, no process group


def test_helpers_are_identities_without_a_process_group() -> None:
    assert not dist.is_initialized()
    assert (distributed.get_rank(), distributed.get_world_size()) == (0, 1)
    x = torch.randn(3, 2, requires_grad=True)
    (gathered,) = distributed.all_gather_with_grad(x)
    assert gathered is x
    (detached,) = distributed.all_gather(x)
    assert torch.equal(detached, x) and not detached.requires_grad
    total = torch.tensor(6.0)
    assert float(distributed.mean_across_ranks(total, torch.tensor(4))) == 1.5
    assert float(distributed.mean_across_ranks(total, torch.tensor(0))) == 6.0


@pytest.mark.parametrize("loss_class", [PixelContrastLoss, RegionContrastLoss])
@pytest.mark.parametrize("variant", ["paper", "supcon"])
def test_gather_is_no_gather_in_one_process(loss_class, variant) -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, generator=generator)
    y = torch.randint(0, 2, (2, 5, 6), generator=generator)
    y[0, 0, 0] = 2  # one pixel of class 2: without memory, its anchor has no positive
    results = []
    for gather in (False, True):
        bank = ClassMemoryBank(3, 4, pixels_per_class=9, regions_per_class=2).double()
        criterion = loss_class(variant=variant, max_samples=40, max_views=5, memory=bank,
                               gather=gather)
        steps = []
        for seed in range(2):
            embeddings = x.clone().requires_grad_()
            loss = criterion(embeddings, y, generator=torch.Generator().manual_seed(seed))
            loss.backward()
            steps.append((loss.detach(), embeddings.grad, bank.queue.clone()))
        results.append(steps)
    for (loss, grad, queue), (want_loss, want_grad, want_queue) in zip(results[1], results[0]):
        torch.testing.assert_close(loss, want_loss)
        torch.testing.assert_close(grad, want_grad)
        assert torch.equal(queue, want_queue)
    assert float(results[0][-1][0]) > 0


def test_gather_is_one_bool() -> None:
    for spelling in ("none", "keys"):
        for loss_class in (PixelContrastLoss, RegionContrastLoss):
            with pytest.raises(TypeError, match="gather must be a bool"):
                loss_class(gather=spelling)
    assert "gather=True" in repr(PixelContrastLoss(gather=True))


def test_errors_name_the_argument() -> None:
    with pytest.raises(TypeError, match="gather"):
        PixelContrastLoss(gather="all")
    with pytest.raises(TypeError, match="gather"):
        RegionContrastLoss(gather="anchors")
    with pytest.raises(TypeError, match="gather must be a bool"):
        PixelContrastLoss(gather=1)
    with pytest.raises(TypeError, match="tensor must be a floating-point"):
        distributed.all_gather_with_grad(torch.arange(3))
    with pytest.raises(ValueError, match="tensor must have a leading row dimension"):
        distributed.all_gather(torch.tensor(1.0))
    with pytest.raises(ValueError, match="count must have 0 dimensions"):
        distributed.mean_across_ranks(torch.tensor(1.0), torch.tensor([1]))


def test_ddp_example_exits_cleanly_under_torchrun(tmp_path: Path) -> None:
    """The README's command, with few steps: it trains and every rank exits cleanly."""
    run = torchrun(["examples/ddp_train.py", "--steps", "2"], WORLD, cwd=ROOT, scratch=tmp_path)
    run.assert_clean_exit()
    steps = [line for line in run.completed.stdout.splitlines() if line.startswith("step")]
    assert len(steps) == 2, run.completed.stdout
    assert "identical on all ranks: True" in run.completed.stdout, run.completed.stdout
