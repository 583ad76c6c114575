"""The per-pixel operations of a training step, forward + backward, against the plain-autograd
way of writing them: time and peak memory growth on CPU.

Batch of B = 8 embedding maps 128 x 256, D = 256, fp32, requiring gradients; the upstream
gradient is random. Two operations, each against a baseline written here:

- ``gather``: the anchor rows of a ``HardAnchorSampler(1024, 100)`` draw.
  :func:`~pixcontrast.functional.gather_pixels` (one ``index_select`` per image, a backward that
  fills one gradient map) against :func:`per_image_autograd`, the same reads left to autograd,
  whose backward gives every image's ``select`` a zero gradient of the whole batch's size.
- ``regions, K classes`` (K = 19 and 150, the class counts of Cityscapes and ADE20K):
  :func:`~pixcontrast.functional.region_embeddings` (on CPU, one scatter-add of the pixels) against
  :func:`one_hot_product`, a batched product with the ``[B, h * w, K]`` one-hot class map, whose
  cost grows with K.
- ``regions of normalised pixels``, as the losses and the memory bank take them when they
  normalise: ``region_embeddings(..., normalize_pixels=True)`` against
  :func:`normalized_one_hot_product`, ``F.normalize`` of the whole map first.

Each pair is checked to give the same output and gradient. Time: the providers of an operation
alternate in one process, medians of ``--repeats`` calls. Peak memory: growth of the peak RSS
over one call, in a fresh process per point (``_common.run_child``) with
``MALLOC_MMAP_THRESHOLD_=65536``, after a warm-up call on a small problem; inputs and the
upstream gradient are not counted.

Run ``python benchmarks/bench_pixel_ops.py`` (one thread unless ``--threads``; ``--quick``: maps
of 32 x 64, one repeat). Writes ``benchmarks/results/bench_pixel_ops.json`` and prints a markdown
table.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import peak_growth_and_slack, run_child, time_alternating  # noqa: E402
from _harness import Column, parser, run  # noqa: E402

from pixcontrast.functional import gather_pixels, region_embeddings  # noqa: E402
from pixcontrast.samplers import HardAnchorSampler  # noqa: E402

BATCH, DIM, HEIGHT, WIDTH, IGNORE = 8, 256, 128, 256, 255
QUICK_SIZE, WARM_UP_SIZE = (32, 64), (32, 32)
COLUMNS = [
    Column("operation", "operation"),
    Column("provider", "provider"),
    Column("median time (ms)", "median_s", ".1f", 1e3),
    Column("speed-up (x)", "speedup", ".2f"),
    Column("peak RSS growth (MB)", "peak_rss_growth_bytes", ".0f", 1e-6),
    Column("vs baseline", "memory_vs_baseline", ".2f"),
]


def per_image_autograd(
    embeddings: torch.Tensor, indices: torch.Tensor, counts: list[int]
) -> torch.Tensor:
    """BASELINE (not library code): gather_pixels's reads, differentiated by autograd."""
    b, d, h, w = embeddings.shape
    flat = embeddings.reshape(b, d, h * w)
    pixels = (indices % (h * w)).split(counts)
    return torch.cat([flat[i].index_select(1, part) for i, part in enumerate(pixels)], 1).t()


def one_hot_product(
    embeddings: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """BASELINE (not library code): region_embeddings as a product with the one-hot map."""
    b, d, h, w = embeddings.shape
    flat = labels.reshape(b, h * w)
    valid = flat != IGNORE
    classes = torch.unique(flat[valid])
    one_hot = ((flat[..., None] == classes) & valid[..., None]).to(embeddings.dtype)
    sums = torch.bmm(embeddings.reshape(b, d, h * w), one_hot)  # [B, D, K]
    counts = one_hot.sum(dim=1)  # [B, K]
    present = (counts > 0).T
    means = sums.permute(2, 0, 1)[present] / counts.T[present][:, None]
    return F.normalize(means, dim=1), classes[:, None].expand(-1, b)[present]


def normalized_one_hot_product(
    embeddings: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """BASELINE (not library code): the normalised map, then :func:`one_hot_product`."""
    return one_hot_product(F.normalize(embeddings, dim=1), labels)


def maps(
    seed: int, classes: int, height: int = HEIGHT, width: int = WIDTH
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings (requiring grad), a blocky label map with 5% ignored pixels, predictions
    wrong on about 30% of the pixels."""
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.empty(BATCH, DIM, height, width).normal_(generator=g).requires_grad_()
    cells = torch.randint(0, classes, (BATCH, height // 16, width // 16), generator=g)
    labels = cells.repeat_interleave(16, 1).repeat_interleave(16, 2)
    labels[torch.rand(labels.shape, generator=g) < 0.05] = IGNORE
    wrong = torch.rand(labels.shape, generator=g) < 0.3
    predictions = torch.where(wrong, torch.randint(0, classes, labels.shape, generator=g), labels)
    return embeddings, labels, predictions


OPERATIONS = {
    "gather": (19, {"gather_pixels": gather_pixels, "per-image autograd": per_image_autograd}),
    "regions, 19 classes": (
        19, {"region_embeddings": region_embeddings, "one-hot product": one_hot_product}
    ),
    "regions, 150 classes": (
        150, {"region_embeddings": region_embeddings, "one-hot product": one_hot_product}
    ),
    "regions of normalised pixels, 19 classes": (19, {
        "region_embeddings": functools.partial(region_embeddings, normalize_pixels=True),
        "F.normalize, one-hot product": normalized_one_hot_product,
    }),
}


def step(operation: str, provider: str, seed: int, size: tuple[int, int]) -> Callable[[], tuple]:
    """Forward + backward of one provider on fresh inputs of maps ``size``; returns (output,
    gradient)."""
    classes, providers = OPERATIONS[operation]
    embeddings, labels, predictions = maps(seed, classes, *size)
    fn = providers[provider]
    if operation == "gather":
        sample = HardAnchorSampler(1024, 100)(
            embeddings.detach(), labels, predictions, IGNORE, torch.Generator().manual_seed(seed)
        )
        counts = torch.bincount(sample.indices // (size[0] * size[1]), minlength=BATCH).tolist()
        inputs = (embeddings, sample.indices, counts)
    else:
        inputs = (embeddings, labels)
        image = torch.arange(BATCH).view(-1, 1, 1)
        counts = [torch.unique((image * classes + labels)[labels != IGNORE]).numel()]  # regions
    g = torch.Generator().manual_seed(seed + 1)
    upstream = torch.empty(sum(counts), DIM).normal_(generator=g)

    def run() -> tuple:
        out = fn(*inputs)
        rows = out if operation == "gather" else out[0]
        (grad,) = torch.autograd.grad(rows, embeddings, upstream)
        return rows.detach(), grad

    return run


def memory_child(spec: dict) -> dict:
    """In a fresh process: peak RSS growth of one call, and the slack."""
    operation, provider, size = spec["operation"], spec["provider"], tuple(spec["size"])
    warm_up = step(operation, provider, 1, WARM_UP_SIZE)
    return peak_growth_and_slack(warm_up, lambda: step(operation, provider, 0, size),
                                 spec["threads"])


def measure(args: argparse.Namespace) -> dict:
    size = QUICK_SIZE if args.quick else (HEIGHT, WIDTH)
    threads = torch.get_num_threads()
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 16))

    rows = []
    for operation, (_, providers) in OPERATIONS.items():
        library, baseline = providers
        runs = {provider: step(operation, provider, 0, size) for provider in providers}
        (out, grad), (base_out, base_grad) = runs[library](), runs[baseline]()
        torch.testing.assert_close(out, base_out, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad, base_grad, rtol=1e-4, atol=1e-5)
        del out, grad, base_out, base_grad
        times = time_alternating(runs, repeats=args.repeats, warmup=1)
        del runs
        for provider in providers:
            child = run_child(Path(__file__), {
                "operation": operation, "provider": provider, "threads": threads, "size": size
            })
            rows.append({
                "operation": operation, "provider": provider, "median_s": times[provider],
                "speedup": times[baseline] / times[provider], **child,
            })
        base_bytes = rows[-1]["peak_rss_growth_bytes"]
        for row in rows[-2:]:
            row["memory_vs_baseline"] = row["peak_rss_growth_bytes"] / base_bytes

    config = {
        "batch": BATCH, "dim": DIM, "height": size[0], "width": size[1], "dtype": "float32",
        "malloc_mmap_threshold": os.environ["MALLOC_MMAP_THRESHOLD_"],
    }
    return {"config": config, "rows": rows}


def main(argv: Optional[list[str]] = None) -> Optional[dict]:
    flags = parser(__doc__, repeats=5, quick_repeats=1, threads=1)
    return run(__file__, "pixel_ops", flags, measure, COLUMNS, child=memory_child, argv=argv)


if __name__ == "__main__":
    main()
