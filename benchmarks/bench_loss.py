"""Benchmark of pixcontrast's contrastive loss against the dense formula and the matrix floor.

Providers (all on the same inputs, alternated within one run):

- ``reference``: pixcontrast's dense implementation of the published formula (builds N x M);
- ``torch``: pixcontrast's chunked torch backend;
- ``triton``: pixcontrast's Triton backend (CUDA only; its rows are skipped without a GPU);
- ``pml``: pytorch-metric-learning's ``SupConLoss`` (only if importable; ``variant="supcon"``
  only, which is the loss it computes);
- ``floor``: the products a fused loss cannot avoid, ``x @ k.T`` and, with backward, one
  ``[N, M] @ [M, D]``.

Setting: N anchors, M keys with labels grouped by class as a memory bank holds them, D dims, unit
vectors, ``temperature=0.1``. ``fwd`` is the loss without gradients (nothing requires grad);
``fwd+bwd`` is loss and ``backward()`` with the anchors requiring grad and the keys not. Time is the
median of repeats with providers alternated; peak memory is the growth of the peak RSS in a fresh
process per point and provider on CPU (``torch.cuda.max_memory_allocated`` growth on CUDA),
measured for ``fwd+bwd``.

Usage::

    python benchmarks/bench_loss.py              # full sweep (about 10 minutes on 2 cores)
    python benchmarks/bench_loss.py --headline   # only the headline point of the core issue
    python benchmarks/bench_loss.py --quick      # small sweep, results to a temporary folder

Writes ``PREFIX.json`` (the harness's layout: metadata, config, every row, the headline ratios as
the summary) and ``PREFIX.png``; prints a markdown table. ``PREFIX`` (``--output``) defaults to
``benchmarks/results/bench_loss``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    measure_peak_growth,
    peak_growth_and_slack,
    run_child,
    time_alternating,
    time_cuda,
)
from _harness import Column, parser, run  # noqa: E402
from tqdm import tqdm  # noqa: E402

import pixcontrast  # noqa: E402
from pixcontrast.ops import triton_fused  # noqa: E402

HERE = Path(__file__).resolve()
COLORS = {"reference": "tab:green", "torch": "tab:purple", "triton": "tab:red", "pml": "tab:orange",
          "floor": "tab:blue"}
TEMPERATURE = 0.1
LOSS_PROVIDERS = ("reference", "torch", "triton")
REPEATS = {"quick": 3, "headline": 9, "full": 5}
COLUMNS = [
    Column("variant", "variant"),
    Column("mode", "mode"),
    Column("N", "n", "d"),
    Column("M", "m", "d"),
    Column("provider", "provider"),
    Column("time (ms)", "time_s", ".2f", 1e3),
    Column("/ floor", "over_floor", ".2f"),
    Column("peak growth (MiB)", "peak_bytes", ".1f", 2**-20),
    Column("loss", "loss", ".5f"),
]


@dataclass(frozen=True)
class Point:
    """One benchmark configuration."""

    n: int
    m: int
    d: int
    classes: int
    variant: str
    mode: str  # "fwd" or "fwd+bwd"
    device: str = "cpu"
    dtype: str = "float32"


# --------------------------------------------------------------------------- providers


def pml_supcon() -> Optional[type]:
    """pytorch-metric-learning's SupConLoss class, or None when it is not installed."""
    try:
        from pytorch_metric_learning.losses import SupConLoss
    except ImportError:
        return None
    return SupConLoss


def triton_unavailable(device: str) -> list[str]:
    """Why the Triton provider cannot run here (empty when it can)."""
    reasons = []
    if not device.startswith("cuda"):
        reasons.append("no CUDA device")
    try:
        import triton  # noqa: F401
    except ImportError:
        reasons.append("triton does not import")
    return reasons


def providers_for(point: Point) -> list[str]:
    names = ["reference", "torch"]
    if not triton_unavailable(point.device):
        # the backend's own refusals for this dtype (fp32 at "highest" precision is cuBLAS's)
        probe = torch.empty(1, point.d, dtype=getattr(torch, point.dtype), device=point.device)
        if not triton_fused.unsupported(probe, ()):
            names.append("triton")
    if point.variant == "supcon" and pml_supcon() is not None:
        names.append("pml")
    return names + ["floor"]


def make_inputs(point: Point, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Unit anchors ``[N, D]`` (requiring grad for fwd+bwd), labels, unit keys ``[M, D]`` and key
    labels grouped in contiguous class blocks."""
    generator = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, point.dtype)
    anchors = F.normalize(torch.randn(point.n, point.d, generator=generator), dim=1)
    labels = torch.randint(0, point.classes, (point.n,), generator=generator)
    keys = F.normalize(torch.randn(point.m, point.d, generator=generator), dim=1)
    key_labels = torch.arange(point.m) * point.classes // point.m
    anchors, keys = (t.to(device=point.device, dtype=dtype) for t in (anchors, keys))
    labels, key_labels = labels.to(point.device), key_labels.to(point.device)
    anchors.requires_grad_(point.mode == "fwd+bwd")
    return anchors, labels, keys, key_labels


def setup(provider: str, point: Point) -> Callable[[], float]:
    """The callable one measurement runs: a loss (and its backward), returning the loss value."""
    anchors, labels, keys, key_labels = make_inputs(point)
    backward = point.mode == "fwd+bwd"

    if provider == "floor":
        x = anchors.detach()

        def run() -> float:
            scores = x @ keys.T
            if backward:
                scores @ keys
            return float("nan")

        return run

    if provider == "pml":
        criterion = pml_supcon()(temperature=TEMPERATURE)

        def compute() -> torch.Tensor:
            return criterion(anchors, labels, ref_emb=keys, ref_labels=key_labels)

    elif provider in LOSS_PROVIDERS:

        def compute() -> torch.Tensor:
            return pixcontrast.contrastive_loss(
                anchors, labels, keys, key_labels, temperature=TEMPERATURE,
                variant=point.variant, backend=provider,
            )

    else:
        raise ValueError(f"unknown provider {provider!r}")

    def run() -> float:
        loss = compute()
        if backward:
            loss.backward()
            anchors.grad = None
        return float(loss.detach())

    return run


# --------------------------------------------------------------------------- measuring


def synchronized(fn: Callable[[], float], device: str) -> Callable[[], float]:
    if not device.startswith("cuda"):
        return fn

    def run() -> float:
        value = fn()
        torch.cuda.synchronize()
        return value

    return run


def measure_times(point: Point, names: list[str], repeats: int) -> tuple[dict, dict]:
    """Median seconds and the loss value of each provider at one point."""
    fns = {name: synchronized(setup(name, point), point.device) for name in names}
    values = {name: fn() for name, fn in fns.items()}  # also the warm-up
    if point.device.startswith("cuda"):
        samples: dict[str, list[float]] = {name: [] for name in names}
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                samples[name].append(time_cuda(fns[name]))
        times = {name: sorted(v)[len(v) // 2] for name, v in samples.items()}
    else:
        times = time_alternating(fns, repeats, warmup=0)
    return times, values


def measure_peak(point: Point, provider: str) -> int:
    """Peak memory growth of one call: a fresh process on CPU, the allocator's peak on CUDA."""
    if point.device.startswith("cuda"):
        return measure_peak_growth(lambda: setup(provider, point), point.device)
    spec = {"point": asdict(point), "provider": provider, "threads": torch.get_num_threads()}
    return run_child(HERE, spec)["peak_rss_growth_bytes"]


def warm_up() -> None:
    """Initialise BLAS and autograd before measuring."""
    warm = torch.ones(8, 8, requires_grad=True)
    (warm @ warm).sum().backward()


def child(spec: dict) -> dict:
    """A fresh measuring process's answer (see :func:`measure_peak`)."""
    point = Point(**spec["point"])
    return peak_growth_and_slack(warm_up, lambda: setup(spec["provider"], point), spec["threads"])


# --------------------------------------------------------------------------- sweeps


HEADLINE = dict(n=1024, m=40_000, d=256, classes=19, variant="paper", mode="fwd+bwd")


def sweep(kind: str, device: str) -> list[Point]:
    if kind == "headline":
        return [Point(**HEADLINE, device=device)]
    if kind == "quick":
        shapes, d, classes = [(128, 500), (128, 2000), (512, 2000)], 64, 5
    else:
        shapes = [(1024, 2500), (1024, 10_000), (1024, 40_000), (256, 10_000), (2048, 10_000)]
        d, classes = 256, 19
    return [
        Point(n, m, d, classes, variant, mode, device)
        for variant in ("paper", "supcon")
        for mode in ("fwd", "fwd+bwd")
        for n, m in shapes
    ]


def headline_ratios(rows: list[dict]) -> Optional[dict]:
    """torch/reference speed-up, torch/reference peak-memory ratio, torch/floor time ratio."""
    at = {r["provider"]: r for r in rows if all(r[k] == v for k, v in HEADLINE.items())}
    if not {"torch", "reference", "floor"} <= set(at):
        return None
    torch_row, reference, floor = at["torch"], at["reference"], at["floor"]
    return {
        "point": HEADLINE | {"device": torch_row["device"], "dtype": torch_row["dtype"]},
        "speedup_torch_vs_reference": reference["time_s"] / torch_row["time_s"],
        "peak_memory_torch_over_reference": torch_row["peak_bytes"] / reference["peak_bytes"],
        "time_torch_over_floor": torch_row["time_s"] / floor["time_s"],
        "time_s": {name: row["time_s"] for name, row in at.items()},
        "peak_bytes": {name: row["peak_bytes"] for name, row in at.items()},
    }


# --------------------------------------------------------------------------- reporting


def plot(rows: list[dict], path: Path) -> bool:
    """Time and peak memory of fwd+bwd against M (at the N with most M values) and against N (at
    the M with most N values); False (nothing written) when no curve has two points."""
    full = [r for r in rows if r["mode"] == "fwd+bwd"]
    if len({(r["n"], r["m"]) for r in full}) < 2:
        return False
    n_fixed = max({r["n"] for r in full}, key=lambda n: len({r["m"] for r in full if r["n"] == n}))
    m_fixed = max({r["m"] for r in full}, key=lambda m: len({r["n"] for r in full if r["m"] == m}))
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    series = sorted({(r["provider"], r["variant"]) for r in full})
    for row_axes, (axis, fixed_key, fixed) in zip(axes, [("m", "n", n_fixed), ("n", "m", m_fixed)]):
        for provider, variant in series:
            if provider == "floor" and variant == "supcon":
                continue  # the floor does not depend on the variant
            points = sorted(
                (r[axis], r) for r in full
                if r["provider"] == provider and r["variant"] == variant and r[fixed_key] == fixed
            )
            if len(points) < 2:
                continue
            xs = [x for x, _ in points]
            label = provider if provider == "floor" else f"{provider} ({variant})"
            style = "--" if variant == "supcon" else "-"
            look = dict(marker="o", color=COLORS[provider], label=label)
            row_axes[0].plot(xs, [1e3 * r["time_s"] for _, r in points], style, **look)
            if provider != "floor":
                row_axes[1].plot(xs, [r["peak_bytes"] / 2**20 for _, r in points], style, **look)
        other = "N" if axis == "m" else "M"
        for ax, ylabel in zip(row_axes, ["time (ms)", "peak memory growth (MiB)"]):
            ax.set(xscale="log", yscale="log", xlabel=axis.upper(), ylabel=ylabel,
                   title=f"fwd+bwd, {other} = {fixed}")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xticks(sorted({r[axis] for r in full if r[fixed_key] == fixed}))
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    meta = rows[0]
    fig.suptitle(f"contrastive loss, D = {meta['d']}, {meta['classes']} classes, {meta['dtype']}, "
                 f"{meta['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- main


def measure(args: argparse.Namespace) -> dict:
    if args.quick and args.headline:
        raise SystemExit("--quick and --headline exclude each other")
    kind = "quick" if args.quick else "headline" if args.headline else "full"
    if args.repeats is None:  # the harness knows the quick default only
        args.repeats = REPEATS[kind]

    skipped = triton_unavailable(args.device)
    if skipped:
        print(f"triton rows skipped: {'; '.join(skipped)}")
    if pml_supcon() is None:
        print("pml rows skipped: pytorch-metric-learning is not installed")

    points = sweep(kind, args.device)
    rows = []
    for point in tqdm(points, desc="bench_loss", unit="point", dynamic_ncols=True):
        names = providers_for(point)
        times, values = measure_times(point, names, args.repeats)
        for name in names:
            peak = None
            if point.mode == "fwd+bwd" and name != "floor":
                peak = measure_peak(point, name)
            rows.append(asdict(point) | {
                "provider": name,
                "time_s": times[name],
                "over_floor": times[name] / times["floor"],
                "peak_bytes": peak,
                "loss": values[name],
            })

    if plot(rows, args.output.with_suffix(".png")):
        print(f"wrote {args.output.with_suffix('.png')}")
    return {
        "metadata": {"skipped": {"triton": skipped,
                                 "pml": [] if pml_supcon() else ["not installed"]}},
        "config": {"kind": kind, "temperature": TEMPERATURE,
                   "keys": "unit vectors, labels in contiguous class blocks, no grad",
                   "anchors": "unit vectors, requires_grad for fwd+bwd"},
        "rows": rows,
        "summary": {"headline": headline_ratios(rows)},
    }


def main(argv: Optional[list[str]] = None) -> Optional[dict]:
    flags = parser(__doc__, repeats=None, quick_repeats=REPEATS["quick"], threads=None)
    flags.add_argument("--headline", action="store_true", help="only the headline point")
    flags.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return run(__file__, "loss", flags, measure, COLUMNS, child=child, argv=argv)


if __name__ == "__main__":
    main()
