"""Loss against a full class-wise memory on CPU: peak memory and time against the matrix floor.

The paper's Cityscapes memory: 19 classes x (5000 pixel + 5000 region) slots, D = 256, i.e.
M = 190,000 memory keys, plus N = 1024 anchors that are keys of each other (in-batch). One point is
forward + backward of ``contrastive_loss(anchors, labels, *bank.keys(), in_batch=True)`` with
gradients for the anchors only (memory keys are detached).

- Peak memory: growth of the process's peak RSS over one forward + backward, each point in a fresh
  process (``--point memory``), after a small warm-up call that loads the math libraries.
- Time: the torch backend against the products no implementation can avoid, ``x @ k.T`` and one
  ``[N, M] @ [M, D]`` (k: the N + M keys), alternated in one fresh process; medians and their
  ratio.

Run ``python benchmarks/bench_memory.py`` (add ``--skip-reference`` to leave out the dense
reference, which needs several GB; ``--threads`` sets torch's intra-op threads). Writes
``benchmarks/results/bench_memory.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    child_spec,
    metadata,
    peak_rss_bytes,
    run_child,
    time_alternating,
    write_results,
)

from pixcontrast.functional import contrastive_loss  # noqa: E402
from pixcontrast.memory import ClassMemoryBank  # noqa: E402

NUM_CLASSES, DIM, SLOTS, ANCHORS = 19, 256, 5000, 1024
MEMORY_TARGET_BYTES = 1.5e9
TIME_TARGET = 1.6
RESULTS = Path(__file__).parent / "results" / "bench_memory.json"


def full_bank(seed: int) -> ClassMemoryBank:
    """A memory with every slot filled by random unit vectors (what many enqueues would give)."""
    bank = ClassMemoryBank(NUM_CLASSES, DIM, pixels_per_class=SLOTS, regions_per_class=SLOTS)
    generator = torch.Generator().manual_seed(seed)
    bank.queue.normal_(generator=generator)
    bank.queue.div_(bank.queue.norm(dim=-1, keepdim=True))
    bank.pixel_count.fill_(SLOTS)
    bank.region_count.fill_(SLOTS)
    return bank


def anchors(seed: int, n: int = ANCHORS, dim: int = DIM) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, dim, generator=generator), dim=1).requires_grad_()
    return x, torch.randint(0, NUM_CLASSES, (n,), generator=generator)


def loss_step(bank: ClassMemoryBank, x, labels, variant: str, backend: str) -> None:
    keys, key_labels = bank.keys()
    loss = contrastive_loss(
        x, labels, keys, key_labels, in_batch=True, temperature=0.1, variant=variant,
        backend=backend,
    )
    loss.backward()
    x.grad = None


def memory_point(variant: str, backend: str) -> dict:
    """Runs in a fresh process: peak RSS growth of one forward + backward."""
    small = ClassMemoryBank(NUM_CLASSES, DIM, pixels_per_class=8, regions_per_class=8)
    small.queue.normal_()
    small.pixel_count.fill_(8)
    small.region_count.fill_(8)
    loss_step(small, *anchors(1, n=32), variant, backend)  # warm-up: library initialisation
    bank = full_bank(0)
    x, labels = anchors(1)
    before = peak_rss_bytes()
    start = time.perf_counter()
    loss_step(bank, x, labels, variant, backend)
    seconds = time.perf_counter() - start
    return {
        "point": "memory", "variant": variant, "backend": backend,
        "peak_rss_growth_bytes": peak_rss_bytes() - before, "seconds": seconds,
    }


def floor_step(x: torch.Tensor, all_keys: torch.Tensor) -> None:
    with torch.no_grad():
        scores = x @ all_keys.T
        scores @ all_keys


def time_point(variant: str, repeats: int) -> dict:
    bank = full_bank(0)
    x, labels = anchors(1)
    all_keys = torch.cat([x.detach(), bank.keys()[0]])
    times = time_alternating(
        {
            "fused": lambda: loss_step(bank, x, labels, variant, "torch"),
            "floor": lambda: floor_step(x, all_keys),
        },
        repeats,
    )
    return {
        "point": "time", "variant": variant, "backend": "torch", "repeats": repeats,
        "fused_median_s": times["fused"], "floor_median_s": times["floor"],
        "ratio": times["fused"] / times["floor"],
    }


def config() -> dict:
    return {"num_classes": NUM_CLASSES, "dim": DIM, "pixels_per_class": SLOTS,
            "regions_per_class": SLOTS, "memory_keys": 2 * NUM_CLASSES * SLOTS,
            "anchors": ANCHORS, "temperature": 0.1, "dtype": "float32"}


def table(points: list[dict]) -> str:
    lines = [
        "| measure | variant | backend | value | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for p in points:
        if p["point"] == "memory":
            gb = p["peak_rss_growth_bytes"] / 1e9
            target = f"<= {MEMORY_TARGET_BYTES / 1e9:.1f} GB" if p["backend"] == "torch" else "-"
            met = "-" if p["backend"] != "torch" else (
                "yes" if p["peak_rss_growth_bytes"] <= MEMORY_TARGET_BYTES else "no"
            )
            value = f"{gb:.2f} GB peak RSS growth ({p['seconds']:.2f} s)"
        else:
            value = (
                f"{p['ratio']:.2f}x ({p['fused_median_s']:.2f} s fused / "
                f"{p['floor_median_s']:.2f} s floor, median of {p['repeats']})"
            )
            target = f"<= {TIME_TARGET}x"
            met = "yes" if p["ratio"] <= TIME_TARGET else "no"
        lines.append(f"| {p['point']} | {p['variant']} | {p['backend']} | {value} | {target} "
                     f"| {met} |")
    return "\n".join(lines)


def main() -> None:
    spec = child_spec(sys.argv)
    if spec is not None:
        torch.set_num_threads(spec["threads"])
        if spec["point"] == "memory":
            print(json.dumps(memory_point(spec["variant"], spec["backend"])))
        else:
            print(json.dumps(time_point(spec["variant"], spec["repeats"])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["paper", "supcon"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()

    script = Path(__file__)
    base = {"threads": args.threads, "repeats": args.repeats}
    points = []
    for variant in args.variants:
        points.append(run_child(script, {**base, "point": "memory", "variant": variant,
                                         "backend": "torch"}))
    if not args.skip_reference:
        points.append(run_child(script, {**base, "point": "memory", "variant": "paper",
                                         "backend": "reference"}, timeout=1800))
    for variant in args.variants:
        points.append(run_child(script, {**base, "point": "time", "variant": variant,
                                         "backend": "torch"}, timeout=1800))
    info = {**metadata(), "torch_threads": args.threads, "config": config()}
    write_results(RESULTS, {"metadata": info, "points": points})
    print(table(points))


if __name__ == "__main__":
    main()
