"""HardAnchorSampler against a loop-per-image-and-class baseline with the same selection rule.

Batch of B = 8 embedding maps 128 x 256, D = 256, 19 classes (plus ignored pixels), predictions
that are wrong on about 30% of the pixels; ``HardAnchorSampler(1024, 100)``. The baseline,
:func:`loop_baseline`, is the released code's structure (per image ``unique``, per class
``nonzero`` of hard and easy pixels, ``randperm``), minus its defects; the script checks that
both sides draw the same number of anchors per (image, class, hard). Both sides return the same
things (anchor embeddings, labels, flat indices) and share the embedding gather
(:func:`~pixcontrast.functional.gather_pixels` given the anchors per image), which is also timed
alone, at the anchors of 16 draws in turn. Each side is also timed on D = 0 embeddings: the
same selection with nothing to gather. A last row reads as many values at random addresses
of the map (sorted, one ``index_select``): the memory system's floor for the gather. Sides
alternate in one process, medians of ``--repeats`` calls, of wall time and of CPU (process)
time; one thread by default (``--threads``): the machines are shared, and at one thread the CPU
time leaves out the waits for a core.

Run ``python benchmarks/bench_sampler.py`` (``--quick``: 3 repeats; the shared flags of
``_harness``). Writes ``benchmarks/results/bench_sampler.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import time_wall_and_cpu  # noqa: E402
from _harness import Column, parser, run  # noqa: E402

from pixcontrast.functional import gather_pixels  # noqa: E402
from pixcontrast.samplers import HardAnchorSampler  # noqa: E402

BATCH, DIM, HEIGHT, WIDTH, CLASSES, IGNORE = 8, 256, 128, 256, 19, 255
MAX_SAMPLES, MAX_VIEWS = 1024, 100
SPEEDUP_TARGET = 10.0
QUICK_REPEATS = 3
COLUMNS = [
    Column("side", "side"),
    Column("median wall ms", "median_ms", ".2f"),
    Column("median CPU ms", "median_cpu_ms", ".2f"),
    Column("speed-up wall (x)", "speedup", ".1f"),
    Column("speed-up CPU (x)", "speedup_cpu", ".1f"),
    Column("versus", "versus"),
]


def loop_baseline(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    predictions: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BASELINE (not library code): HardAnchorSampler's rule with a Python loop per image and
    class, as in the authors' released sampler. Returns (embeddings, labels, flat indices)."""
    b, _, h, w = embeddings.shape
    y = labels.reshape(b, h * w)
    p = predictions.reshape(b, h * w)
    classes = []
    for i in range(b):
        present = [c for c in torch.unique(y[i]).tolist() if c != IGNORE]
        classes.append(present)
    pairs = sum(len(c) for c in classes)
    n_view = min(MAX_SAMPLES // max(pairs, 1), MAX_VIEWS)
    quota_hard = n_view // 2
    quota_easy = n_view - quota_hard
    chosen, per_image = [], []
    for i in range(b):
        per_image.append(0)
        for c in classes[i]:
            in_class = y[i] == c
            hard = (in_class & (p[i] != c)).nonzero().squeeze(1)
            easy = (in_class & (p[i] == c)).nonzero().squeeze(1)
            n_hard, n_easy = hard.numel(), easy.numel()
            take_hard = min(n_hard, quota_hard + max(0, quota_easy - n_easy))
            take_easy = min(n_easy, quota_easy + max(0, quota_hard - n_hard))
            hard = hard[torch.randperm(n_hard, generator=generator)[:take_hard]]
            easy = easy[torch.randperm(n_easy, generator=generator)[:take_easy]]
            chosen.append(torch.cat([hard, easy]) + i * h * w)
            per_image[i] += take_hard + take_easy
    indices = torch.sort(torch.cat(chosen)).values
    return gather_pixels(embeddings, indices, per_image), labels.reshape(-1)[indices], indices


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(BATCH, DIM, HEIGHT, WIDTH, generator=g)
    # blocky class layout (16 x 16 cells), 5% ignored pixels, 30% wrong predictions
    cells = torch.randint(0, CLASSES, (BATCH, HEIGHT // 16, WIDTH // 16), generator=g)
    labels = cells.repeat_interleave(16, 1).repeat_interleave(16, 2)
    labels[torch.rand(labels.shape, generator=g) < 0.05] = IGNORE
    wrong = torch.rand(labels.shape, generator=g) < 0.3
    predictions = torch.where(wrong, torch.randint(0, CLASSES, labels.shape, generator=g), labels)
    predictions[labels == IGNORE] = 0
    return embeddings, labels, predictions


def group_counts(
    indices: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor
) -> torch.Tensor:
    """Anchors per (image, class, hard) of a selection: equal for both sides (same rule)."""
    hw = HEIGHT * WIDTH
    y, p = labels.reshape(-1)[indices], predictions.reshape(-1)[indices]
    key = ((indices // hw) * CLASSES + y) * 2 + (p != y).long()
    return torch.bincount(key, minlength=BATCH * CLASSES * 2)


def measure(args: argparse.Namespace) -> dict:
    embeddings, labels, predictions = batch(0)
    no_channels = embeddings[:, :0]  # D = 0: the same selection with nothing to gather
    samplers = {
        "HardAnchorSampler()": HardAnchorSampler(MAX_SAMPLES, MAX_VIEWS),
        "HardAnchorSampler(num_classes=19)": HardAnchorSampler(
            MAX_SAMPLES, MAX_VIEWS, num_classes=CLASSES
        ),
    }
    g = torch.Generator().manual_seed(1)
    draws = [samplers["HardAnchorSampler()"](embeddings, labels, predictions, IGNORE, g)
             for _ in range(16)]
    _, _, baseline_indices = loop_baseline(embeddings, labels, predictions, g)
    assert torch.equal(group_counts(baseline_indices, labels, predictions),
                       group_counts(draws[0].indices, labels, predictions))
    # the gather alone, at the anchors of 16 draws in turn (fresh pixels, as in each side's call)
    gathers = [
        (draw.indices, torch.bincount(draw.indices // (HEIGHT * WIDTH), minlength=BATCH).tolist())
        for draw in draws
    ]
    turn = iter(range(10**9))

    def gather_only() -> torch.Tensor:
        indices, counts = gathers[next(turn) % len(gathers)]
        return gather_pixels(embeddings, indices, counts)

    baseline, selection_baseline = "loop baseline", "loop baseline, selection only (D = 0)"
    fns = {
        baseline: lambda: loop_baseline(embeddings, labels, predictions, g),
        selection_baseline: lambda: loop_baseline(no_channels, labels, predictions, g),
    }
    versus = {baseline: baseline, selection_baseline: selection_baseline}
    for name, sampler in samplers.items():
        fns[name] = lambda s=sampler: s(embeddings, labels, predictions, IGNORE, g)
        fns[f"{name}, selection only (D = 0)"] = (
            lambda s=sampler: s(no_channels, labels, predictions, IGNORE, g)
        )
        versus[name] = baseline
        versus[f"{name}, selection only (D = 0)"] = selection_baseline
    fns["gather only (shared by both sides)"] = gather_only
    # as many reads at random addresses of the map, in increasing order, in one index_select: a
    # floor for any gather of D values at each of that many random pixels of an NCHW map
    reads = draws[0].indices.numel() * DIM
    offsets = [torch.randint(0, embeddings.numel(), (reads,), generator=g).sort().values
               for _ in range(16)]
    fns[f"floor: {reads:,} sorted random reads of the map"] = (
        lambda: embeddings.view(-1).index_select(0, offsets[next(turn) % len(offsets)])
    )
    times = time_wall_and_cpu(fns, repeats=args.repeats, warmup=2)

    rows = []
    for name, (wall, cpu) in times.items():
        other = versus.get(name)
        rows.append({
            "side": name,
            "median_ms": 1e3 * wall,
            "median_cpu_ms": 1e3 * cpu,
            "versus": other,
            "speedup": times[other][0] / wall if other else None,
            "speedup_cpu": times[other][1] / cpu if other else None,
        })
    config = {
        "batch": BATCH, "dim": DIM, "height": HEIGHT, "width": WIDTH, "classes": CLASSES,
        "max_samples": MAX_SAMPLES, "max_views": MAX_VIEWS, "anchors": draws[0].indices.numel(),
        "speedup_target": SPEEDUP_TARGET,
    }
    return {"config": config, "rows": rows}


def main(argv: Optional[list[str]] = None) -> Optional[dict]:
    flags = parser(__doc__, repeats=31, quick_repeats=QUICK_REPEATS, threads=1)
    return run(__file__, "sampler", flags, measure, COLUMNS, argv=argv)


if __name__ == "__main__":
    main()
