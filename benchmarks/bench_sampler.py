"""HardAnchorSampler against a loop-per-image-and-class baseline with the same selection rule.

Batch of B = 8 embedding maps 128 x 256, D = 256, 19 classes (plus ignored pixels), predictions
that are wrong on about 30% of the pixels; ``HardAnchorSampler(1024, 100)``. The baseline,
:func:`loop_baseline`, is the released code's structure (per image ``unique``, per class
``nonzero`` of hard and easy pixels, ``randperm``), minus its defects. Both sides return the same
things (anchor embeddings, labels, flat indices) and share the strided embedding gather, which is
also timed alone. Sides alternate in one process, medians of ``--repeats`` calls (DESIGN.md §4).

Run ``python benchmarks/bench_sampler.py``. Writes ``benchmarks/results/bench_sampler.json`` and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import metadata, time_alternating  # noqa: E402

from pixcontrast.samplers import HardAnchorSampler, gather_pixels  # noqa: E402

BATCH, DIM, HEIGHT, WIDTH, CLASSES, IGNORE = 8, 256, 128, 256, 19, 255
MAX_SAMPLES, MAX_VIEWS = 1024, 100
SPEEDUP_TARGET = 10.0
RESULTS = Path(__file__).parent / "results" / "bench_sampler.json"


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
    chosen = []
    for i in range(b):
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
    indices = torch.sort(torch.cat(chosen)).values
    return gather_pixels(embeddings, indices), labels.reshape(-1)[indices], indices


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    embeddings, labels, predictions = batch(0)
    samplers = {
        "HardAnchorSampler()": HardAnchorSampler(MAX_SAMPLES, MAX_VIEWS),
        "HardAnchorSampler(num_classes=19)": HardAnchorSampler(
            MAX_SAMPLES, MAX_VIEWS, num_classes=CLASSES
        ),
    }
    g = torch.Generator().manual_seed(1)
    reference = samplers["HardAnchorSampler()"](embeddings, labels, predictions, IGNORE, g)
    _, _, baseline_indices = loop_baseline(embeddings, labels, predictions, g)
    assert baseline_indices.numel() == reference.indices.numel()
    fixed = reference.indices

    fns = {"loop baseline": lambda: loop_baseline(embeddings, labels, predictions, g)}
    for name, sampler in samplers.items():
        fns[name] = lambda s=sampler: s(embeddings, labels, predictions, IGNORE, g)
    fns["gather only (shared by both)"] = lambda: gather_pixels(embeddings, fixed)
    times = time_alternating(fns, repeats=args.repeats, warmup=2)

    base = times["loop baseline"]
    rows = [
        {"side": name, "median_ms": 1e3 * t, "speedup_vs_baseline": base / t}
        for name, t in times.items()
    ]
    result = {
        "benchmark": "sampler",
        "metadata": {**metadata(), "load_average": os.getloadavg()},
        "config": {
            "batch": BATCH, "dim": DIM, "height": HEIGHT, "width": WIDTH, "classes": CLASSES,
            "max_samples": MAX_SAMPLES, "max_views": MAX_VIEWS, "anchors": fixed.numel(),
            "repeats": args.repeats, "threads": args.threads,
        },
        "speedup_target": SPEEDUP_TARGET,
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| side | median ms | speed-up vs loop baseline (target >= {SPEEDUP_TARGET:g}x) |")
    print("|---|---:|---:|")
    for row in rows:
        print(f"| {row['side']} | {row['median_ms']:.1f} | {row['speedup_vs_baseline']:.1f}x |")


if __name__ == "__main__":
    main()
