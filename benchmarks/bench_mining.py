"""Chunked hardest mining against a dense top-k: peak memory growth and time on CPU.

N = 1024 anchors against M = 40,000 memory keys (19 classes, about 1/16 of them invalid slots),
D = 256, fp32; per anchor the ``K_pos = 64`` least similar positives and ``K_neg = 256`` most
similar negatives. The chunked side is ``mine_keys(miner="hardest")``; the dense side,
:func:`dense_hardest`, builds the full ``[N, M]`` similarity matrix and takes two top-k of it,
frugally (one masked copy, the other mask applied in place). Both return the same indices, which
the script asserts. ``mine_keys(miner="semi-hard")`` is measured alongside, for information.

- Peak memory: growth of the process's peak RSS over one call, each point in a fresh process
  (``_common.run_child``), after a warm-up call on a small problem; inputs are not counted. The
  children run with ``MALLOC_MMAP_THRESHOLD_=65536`` (large blocks are returned on free), and
  each reports its slack, peak minus current RSS before the call (near 0: nothing hidden).
- Time: the sides alternate in one process, medians of ``--repeats`` calls.

Run ``python benchmarks/bench_mining.py`` (one thread unless ``--threads``; ``--quick``: N = 256,
M = 4,000, one repeat, the three memory processes at once). Writes
``benchmarks/results/bench_mining.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import peak_growth_and_slack, run_child, time_alternating  # noqa: E402
from _harness import Column, parser, run  # noqa: E402

from pixcontrast.mining import mine_keys  # noqa: E402

ANCHORS, KEYS, DIM, CLASSES = 1024, 40_000, 256, 19
QUICK_ANCHORS, QUICK_KEYS = 256, 4000
NUM_POSITIVES, NUM_NEGATIVES = 64, 256
MEMORY_TARGET = 0.2  # chunked peak growth <= 1/5 of the dense one
SIDES = ("dense top-k", "chunked hardest", "chunked semi-hard")
COLUMNS = [
    Column("side", "side"),
    Column("peak RSS growth (MB)", "peak_rss_growth_bytes", ".1f", 1e-6),
    Column("vs dense", "memory_vs_dense", ".3f"),
    Column("median time (s)", "median_s", ".3f"),
    Column("time vs dense", "time_vs_dense", ".2f"),
]


def unit_rows(count: int, g: torch.Generator) -> torch.Tensor:
    """Random unit vectors, made in place: no temporary copy raises the peak RSS early."""
    rows = torch.empty(count, DIM).normal_(generator=g)
    return rows.div_(rows.norm(dim=1, keepdim=True))


def problem(
    seed: int, n: int = ANCHORS, m: int = KEYS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit anchors and memory keys; one key in 16 is an empty slot (label -1)."""
    g = torch.Generator().manual_seed(seed)
    anchors = unit_rows(n, g)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    keys = unit_rows(m, g)
    key_labels = torch.randint(0, CLASSES, (m,), generator=g)
    key_labels[torch.rand(m, generator=g) < 1 / 16] = -1
    return anchors, labels, keys, key_labels


def dense_hardest(
    anchors: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, key_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """BASELINE (not library code): the full [N, M] similarities, then two top-k. Every anchor
    of the benchmark has enough candidates, so no padding is handled."""
    scores = anchors @ keys.T
    same = labels[:, None] == key_labels
    positives = torch.where(same, scores, torch.inf).topk(NUM_POSITIVES, largest=False).indices
    scores.masked_fill_(same, -torch.inf).masked_fill_(key_labels < 0, -torch.inf)
    negatives = scores.topk(NUM_NEGATIVES).indices
    return positives, negatives


def side(name: str, seed: int) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor,
                                             torch.Tensor], object]:
    """The callable of one side (the semi-hard side draws with a seeded generator)."""
    if name == "dense top-k":
        return dense_hardest
    miner = "hardest" if name == "chunked hardest" else "semi-hard"
    return lambda *inputs: mine_keys(
        *inputs, miner=miner, num_positives=NUM_POSITIVES, num_negatives=NUM_NEGATIVES,
        generator=torch.Generator().manual_seed(seed),
    )


def memory_child(spec: dict) -> dict:
    """In a fresh process: peak RSS growth of one call of side ``spec["side"]`` on the problem of
    ``spec["anchors"]`` x ``spec["keys"]``, and the slack."""
    name = spec["side"]
    fn = side(name, 0)

    def setup() -> Callable[[], object]:
        inputs = problem(0, spec["anchors"], spec["keys"])
        return lambda: fn(*inputs)

    warm_up = functools.partial(fn, *problem(1, n=32, m=512))
    return {"side": name, **peak_growth_and_slack(warm_up, setup, spec["threads"])}


def measure(args: argparse.Namespace) -> dict:
    n, m = (QUICK_ANCHORS, QUICK_KEYS) if args.quick else (ANCHORS, KEYS)
    threads = torch.get_num_threads()
    # A fixed mmap threshold: every allocation of 64 KiB or more is its own mapping, returned
    # to the system when freed, so freed-but-resident heap memory cannot absorb the growth.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 16))
    if args.quick:  # the plumbing only: the children (each its own peak RSS) run side by side
        with ThreadPoolExecutor(len(SIDES)) as pool:
            started = {
                name: pool.submit(run_child, Path(__file__), {"side": name, "threads": threads,
                                                              "anchors": n, "keys": m})
                for name in SIDES
            }
        children = {name: child.result() for name, child in started.items()}
    else:
        children = {
            name: run_child(Path(__file__), {"side": name, "threads": threads, "anchors": n,
                                             "keys": m})
            for name in SIDES
        }
    memory = {name: child["peak_rss_growth_bytes"] for name, child in children.items()}

    inputs = problem(0, n, m)
    dense_pos, dense_neg = dense_hardest(*inputs)
    chunked = side("chunked hardest", 0)(*inputs)
    assert torch.equal(chunked.positive_index, dense_pos), "chunked != dense positives"
    assert torch.equal(chunked.negative_index, dense_neg), "chunked != dense negatives"
    fns = {name: functools.partial(side(name, 0), *inputs) for name in SIDES}
    times = time_alternating(fns, repeats=args.repeats, warmup=1)

    dense_bytes, dense_s = memory["dense top-k"], times["dense top-k"]
    rows = [
        {
            "side": name,
            "peak_rss_growth_bytes": memory[name],
            "slack_before_call_bytes": children[name]["slack_bytes"],
            "memory_vs_dense": memory[name] / dense_bytes,
            "median_s": times[name],
            "time_vs_dense": times[name] / dense_s,
        }
        for name in SIDES
    ]
    ratio = memory["chunked hardest"] / dense_bytes
    config = {
        "anchors": n, "keys": m, "dim": DIM, "classes": CLASSES,
        "num_positives": NUM_POSITIVES, "num_negatives": NUM_NEGATIVES, "dtype": "float32",
        "malloc_mmap_threshold": os.environ["MALLOC_MMAP_THRESHOLD_"],
        "memory_target": f"chunked hardest <= {MEMORY_TARGET:g} x dense",
    }
    summary = {"memory_ratio": ratio, "memory_target_met": ratio <= MEMORY_TARGET}
    return {"config": config, "rows": rows, "summary": summary}


def main(argv: Optional[list[str]] = None) -> Optional[dict]:
    flags = parser(__doc__, repeats=7, quick_repeats=1, threads=1)
    return run(__file__, "mining", flags, measure, COLUMNS, child=memory_child, argv=argv)


if __name__ == "__main__":
    main()
