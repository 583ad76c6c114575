"""Loss against a full class-wise memory on CPU: peak memory and time against the matrix floor.

The paper's Cityscapes memory: 19 classes x (5000 pixel + 5000 region) slots, D = 256, i.e.
M = 190,000 memory keys, plus N = 1024 anchors that are keys of each other (in-batch). One point is
forward + backward of ``contrastive_loss(anchors, labels, *bank.keys(), in_batch=True)`` with
gradients for the anchors only (memory keys are detached).

- Peak memory: growth of the process's peak RSS over one forward + backward, each point in a fresh
  process (``_common.run_child``), after a small warm-up call that loads the math libraries.
- Time: the torch backend against the products no implementation can avoid, ``x @ k.T`` and one
  ``[N, M] @ [M, D]`` (k: the N + M keys), alternated in one fresh process; medians and their
  ratio.

Peak growth is also reported in units of the keys' own bytes (the N anchors and the M memory keys
in their dtypes): ``peak / keys``.

Run ``python benchmarks/bench_memory.py`` (add ``--skip-reference`` to leave out the dense
reference, which needs several GB; ``--threads`` sets torch's intra-op threads; ``--slots`` the
slots per class and kind, for other M; ``--bank-dtype bfloat16`` a half-precision memory with fp32
anchors; ``--quick``: 250 slots per class and kind, 256 anchors, one repeat). Writes
``benchmarks/results/bench_memory.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import peak_growth_and_slack, run_child, time_alternating  # noqa: E402
from _harness import Column, parser, run  # noqa: E402

from pixcontrast.functional import contrastive_loss  # noqa: E402
from pixcontrast.memory import ClassMemoryBank  # noqa: E402

NUM_CLASSES, DIM, SLOTS, ANCHORS = 19, 256, 5000, 1024
QUICK_SLOTS, QUICK_ANCHORS = 250, 256
MEMORY_TARGET_BYTES = 1.5e9
TIME_TARGET = 1.6
COLUMNS = [
    Column("measure", "point"),
    Column("variant", "variant"),
    Column("backend", "backend"),
    Column("peak RSS growth (GB)", "peak_rss_growth_bytes", ".2f", 1e-9),
    Column("peak / keys", "peak_per_key_bytes", ".2f"),
    Column("seconds", "seconds", ".2f"),
    Column("fused median (s)", "fused_median_s", ".2f"),
    Column("floor median (s)", "floor_median_s", ".2f"),
    Column("fused / floor", "ratio", ".2f"),
]


def full_bank(seed: int, slots: int, dtype: torch.dtype = torch.float32) -> ClassMemoryBank:
    """A memory with every slot filled by random unit vectors (what many enqueues would give).

    Filled a class at a time in ``dtype``: no full-size fp32 queue raises the process's peak
    before the measured call.
    """
    with torch.device("meta"):
        bank = ClassMemoryBank(NUM_CLASSES, DIM, pixels_per_class=slots, regions_per_class=slots)
    bank.to_empty(device="cpu")
    bank.queue = torch.empty(bank.queue.shape, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    for c in range(NUM_CLASSES):
        bank.queue[c] = F.normalize(torch.randn(bank.queue.shape[1:], generator=generator), dim=-1)
    for counter in (bank.pixel_pointer, bank.region_pointer):
        counter.zero_()
    bank.pixel_count.fill_(slots)
    bank.region_count.fill_(slots)
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


def memory_point(spec: dict) -> dict:
    """Runs in a fresh process: peak RSS growth of one forward + backward."""
    variant, backend = spec["variant"], spec["backend"]
    small = ClassMemoryBank(NUM_CLASSES, DIM, pixels_per_class=8, regions_per_class=8)
    small.queue.normal_()
    small.pixel_count.fill_(8)
    small.region_count.fill_(8)

    def setup() -> Callable[[], None]:
        bank = full_bank(0, spec["slots"], getattr(torch, spec["bank_dtype"]))
        x, labels = anchors(1, spec["anchors"])
        return lambda: loss_step(bank, x, labels, variant, backend)

    def warm_up() -> None:  # library initialisation
        loss_step(small, *anchors(1, n=32), variant, backend)

    measured = peak_growth_and_slack(warm_up, setup, spec["threads"])
    memory_keys = 2 * NUM_CLASSES * spec["slots"]
    bank_bytes = torch.empty((), dtype=getattr(torch, spec["bank_dtype"])).element_size()
    key_bytes = (memory_keys * bank_bytes + spec["anchors"] * 4) * DIM
    return {"point": "memory", "variant": variant, "backend": backend, "key_bytes": key_bytes,
            "peak_per_key_bytes": measured["peak_rss_growth_bytes"] / key_bytes, **measured}


def floor_step(x: torch.Tensor, all_keys: torch.Tensor) -> None:
    with torch.no_grad():
        scores = x @ all_keys.T
        scores @ all_keys


def time_point(spec: dict) -> dict:
    """Runs in a fresh process: the torch backend and the floor, alternated."""
    torch.set_num_threads(spec["threads"])
    variant, repeats = spec["variant"], spec["repeats"]
    bank = full_bank(0, spec["slots"], getattr(torch, spec["bank_dtype"]))
    x, labels = anchors(1, spec["anchors"])
    all_keys = torch.cat([x.detach(), bank.keys()[0].float()])
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


def child(spec: dict) -> dict:
    return memory_point(spec) if spec["point"] == "memory" else time_point(spec)


def measure(args: argparse.Namespace) -> dict:
    slots, n = (QUICK_SLOTS, QUICK_ANCHORS) if args.quick else (SLOTS, ANCHORS)
    slots = args.slots or slots
    script = Path(__file__)
    base = {"threads": torch.get_num_threads(), "repeats": args.repeats, "slots": slots,
            "anchors": n, "bank_dtype": args.bank_dtype}
    rows = []
    for variant in args.variants:
        rows.append(run_child(script, {**base, "point": "memory", "variant": variant,
                                       "backend": "torch"}))
    if not args.skip_reference:
        rows.append(run_child(script, {**base, "point": "memory", "variant": "paper",
                                       "backend": "reference"}, timeout=1800))
    for variant in args.variants:
        rows.append(run_child(script, {**base, "point": "time", "variant": variant,
                                       "backend": "torch"}, timeout=1800))
    torch_peaks = [r["peak_rss_growth_bytes"] for r in rows if r["point"] == "memory"
                   and r["backend"] == "torch"]
    config = {
        "num_classes": NUM_CLASSES, "dim": DIM, "pixels_per_class": slots,
        "regions_per_class": slots, "memory_keys": 2 * NUM_CLASSES * slots, "anchors": n,
        "temperature": 0.1, "dtype": "float32", "bank_dtype": args.bank_dtype,
        "memory_target_bytes": MEMORY_TARGET_BYTES, "time_target": TIME_TARGET,
    }
    summary = {
        "memory_target_met": all(peak <= MEMORY_TARGET_BYTES for peak in torch_peaks),
        "time_target_met": all(r["ratio"] <= TIME_TARGET for r in rows if r["point"] == "time"),
    }
    return {"config": config, "rows": rows, "summary": summary}


def main(argv: Optional[list[str]] = None) -> Optional[dict]:
    flags = parser(__doc__, repeats=5, quick_repeats=1, threads=None)
    flags.add_argument("--variants", nargs="+", default=["paper", "supcon"])
    flags.add_argument("--skip-reference", action="store_true")
    flags.add_argument("--slots", type=int, help=f"slots per class and kind (default: {SLOTS})")
    flags.add_argument("--bank-dtype", default="float32", choices=["float32", "bfloat16"],
                       help="dtype of the memory (the anchors stay float32)")
    return run(__file__, "memory", flags, measure, COLUMNS, child=child, argv=argv)


if __name__ == "__main__":
    main()
