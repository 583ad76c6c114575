"""Semantic segmentation of handwritten-digit scenes: cross-entropy alone vs + PixelContrastLoss.

Scenes are composed from scikit-learn's bundled handwritten digits (``load_digits``: 1,797 real
8x8 scans, no download): a few digits, each scaled and placed on a noisy canvas. Every ink pixel is
labelled with its digit (0-9), every other pixel is background (10), and the anti-aliased rim of a
stroke is ``ignore_index`` (255), like the void pixels of Cityscapes. Training and test scenes use
disjoint source digits.

A small dilated fully-convolutional network with a :class:`pixcontrast.ProjectionHead` is trained
on CPU in each mode with the same steps, data order and initialisation per seed:

- ``ce``: cross-entropy only (the projection head exists but receives no gradient);
- ``ce+contrast``: cross-entropy + ``weight * PixelContrastLoss`` on the head's embeddings, with
  the network's predictions passed to the anchor sampler, switched on after a warm-up of
  cross-entropy alone (see below);
- ``ce+contrast+memory``: the same with a :class:`pixcontrast.ClassMemoryBank`, added
  automatically when the installed pixcontrast provides one.

Warm-up: the authors' released code switches the contrast term on only after 5,000 warm-up
iterations of cross-entropy alone, so that the classifier's predictions, which the hard-anchor
sampler uses to pick mispredicted pixels, mean something and the backbone has learnt features
before the term, whose gradient is scaled by ``1 / temperature``, acts on them. The example
follows that practice with the first third of the steps (``--contrast-warmup 0.333``, the
default; no tuning on the test split chose it). ``--contrast-warmup 0`` gives the plain
configuration, with the term from the first step.

It prints a table of test mIoU (mean +- std over seeds) and writes, under ``--output``
(default ``examples/output/``): ``digits_results.json``, ``digits_curves.png`` (training loss and
test mIoU against steps) and ``digits_embeddings.png`` (t-SNE of test-pixel features coloured by
class, one panel per mode).

Usage::

    python examples/digits_segmentation.py            # 10 minutes on a busy 2-core machine
    python examples/digits_segmentation.py --smoke    # a few steps, for CI
    python examples/digits_segmentation.py --contrast-warmup 0   # the term from step 1
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import pixcontrast  # noqa: E402

NUM_CLASSES = 11  # digits 0-9 and background
BACKGROUND = 10
IGNORE_INDEX = 255
CLASS_NAMES = [str(d) for d in range(10)] + ["bg"]


@dataclass(frozen=True)
class Config:
    """Everything that defines a run; the JSON output records it."""

    canvas: int = 48
    train_scenes: int = 2000
    test_scenes: int = 400
    batch_size: int = 16
    steps: int = 300
    eval_every: int = 50
    width: int = 32
    proj_dim: int = 32
    lr: float = 2e-3
    contrast_weight: float = 0.1
    temperature: float = 0.1
    contrast_warmup: float = 1 / 3  # fraction of the steps trained with cross-entropy alone
    max_samples: int = 1024
    max_views: int = 64
    seeds: tuple[int, ...] = (0, 1, 2)
    tsne_pixels: int = 1000
    data_seed: int = 12345
    modes: tuple[str, ...] = field(default=())


SMOKE = dict(
    canvas=32,
    train_scenes=64,
    test_scenes=32,
    batch_size=8,
    steps=6,
    eval_every=3,
    width=8,
    proj_dim=16,
    max_samples=256,
    max_views=16,
    seeds=(0,),
    tsne_pixels=150,
)


# --------------------------------------------------------------------------- data


def split_digits(seed: int, test_fraction: float = 0.3) -> tuple[dict, dict]:
    """The 1,797 scans split by source digit: no scan appears in both splits."""
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    cut = int(round(len(order) * (1 - test_fraction)))
    images = digits.images.astype(np.float32) / 16.0
    return (
        {"images": images[order[:cut]], "targets": digits.target[order[:cut]]},
        {"images": images[order[cut:]], "targets": digits.target[order[cut:]]},
    )


def compose_scenes(
    source: dict, count: int, canvas: int, rng: np.random.Generator
) -> tuple[Tensor, Tensor]:
    """``count`` scenes ``[count, 1, canvas, canvas]`` and their labels ``[count, canvas, canvas]``.

    Each scene holds 2-4 non-overlapping digits scaled to 1.5-3x (12-24 px); ink (> 0.4 after
    bilinear scaling) takes the digit's class, faint rims (0.1-0.4) are ignored, the rest is
    background. Gaussian noise (sigma 0.15) is added to the image.
    """
    images = torch.zeros(count, 1, canvas, canvas)
    labels = torch.full((count, canvas, canvas), BACKGROUND, dtype=torch.long)
    scans = torch.from_numpy(source["images"])[:, None]
    for i in range(count):
        boxes: list[tuple[int, int, int]] = []
        for _ in range(int(rng.integers(2, 5))):
            size = int(rng.integers(12, min(24, canvas // 2) + 1))
            for _attempt in range(20):
                y, x = (int(v) for v in rng.integers(0, canvas - size + 1, size=2))
                if all(
                    y + size <= by or by + bs <= y or x + size <= bx or bx + bs <= x
                    for by, bx, bs in boxes
                ):
                    break
            else:
                continue
            boxes.append((y, x, size))
            pick = int(rng.integers(len(scans)))
            glyph = F.interpolate(
                scans[pick : pick + 1], size=(size, size), mode="bilinear", align_corners=False
            )[0, 0]
            images[i, 0, y : y + size, x : x + size] = glyph
            patch = labels[i, y : y + size, x : x + size]
            patch[glyph > 0.1] = IGNORE_INDEX
            patch[glyph > 0.4] = int(source["targets"][pick])
    noise = torch.from_numpy(rng.normal(0.0, 0.15, size=images.shape).astype(np.float32))
    return images + noise, labels


# --------------------------------------------------------------------------- model


def conv_block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SegNet(nn.Module):
    """Dilated FCN at 1/2 resolution (receptive field 61 px), a 1x1 classifier and a projection
    head reading the same features."""

    def __init__(self, width: int, proj_dim: int) -> None:
        super().__init__()
        wide = 2 * width
        self.backbone = nn.Sequential(
            conv_block(1, width),
            conv_block(width, wide, stride=2),
            conv_block(wide, wide, dilation=2),
            conv_block(wide, wide, dilation=4),
            conv_block(wide, wide, dilation=8),
        )
        self.classifier = nn.Conv2d(wide, NUM_CLASSES, 1)
        self.head = pixcontrast.ProjectionHead(wide, proj_dim=proj_dim)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Features ``[B, 2w, H/2, W/2]``, logits at the same size, unit embeddings."""
        features = self.backbone(images)
        return features, self.classifier(features), self.head(features)


def upsample(logits: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- training


def available_modes() -> tuple[str, ...]:
    modes = ("ce", "ce+contrast")
    if hasattr(pixcontrast, "ClassMemoryBank"):
        modes += ("ce+contrast+memory",)
    return modes


def make_criterion(mode: str, config: Config) -> Optional[nn.Module]:
    if mode == "ce":
        return None
    memory = None
    if mode == "ce+contrast+memory":
        memory = pixcontrast.ClassMemoryBank(
            num_classes=NUM_CLASSES,
            dim=config.proj_dim,
            pixels_per_class=500,
            regions_per_class=500,
            pixels_per_image=10,
            ignore_index=IGNORE_INDEX,
        )
    options = {"memory": memory} if memory is not None else {}
    return pixcontrast.PixelContrastLoss(
        temperature=config.temperature,
        max_samples=config.max_samples,
        max_views=config.max_views,
        ignore_index=IGNORE_INDEX,
        num_classes=NUM_CLASSES,
        normalize=False,  # ProjectionHead already returns unit vectors
        **options,
    )


def confusion(pred: Tensor, target: Tensor) -> Tensor:
    keep = target != IGNORE_INDEX
    index = target[keep] * NUM_CLASSES + pred[keep]
    return torch.bincount(index, minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)


def iou_per_class(matrix: Tensor) -> Tensor:
    """IoU of each class from a confusion matrix (rows: truth); NaN for a class never seen."""
    matrix = matrix.double()
    hits = matrix.diag()
    union = matrix.sum(0) + matrix.sum(1) - hits
    return torch.where(union > 0, hits / union.clamp(min=1), torch.nan)


@torch.no_grad()
def evaluate(model: SegNet, images: Tensor, labels: Tensor, batch_size: int) -> Tensor:
    """Per-class IoU on a set of scenes (model in eval mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    matrix = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    for start in range(0, len(images), 4 * batch_size):
        batch = images[start : start + 4 * batch_size]
        _, logits, _ = model(batch)
        pred = upsample(logits, batch.shape[-2:]).argmax(1)
        matrix += confusion(pred, labels[start : start + 4 * batch_size])
    model.train(was_training)
    return iou_per_class(matrix)


def contrast_start(config: Config) -> int:
    """The first step (1-based) at which the contrast term is on."""
    if not 0.0 <= config.contrast_warmup < 1.0:
        raise ValueError(f"contrast_warmup must lie in [0, 1), got {config.contrast_warmup}")
    return int(round(config.contrast_warmup * config.steps)) + 1


def train_one(mode: str, seed: int, config: Config, data: dict[str, Tensor]) -> tuple[SegNet, dict]:
    """Train one model; returns it and its record (curves, final per-class IoU, time)."""
    torch.manual_seed(seed)
    model = SegNet(config.width, config.proj_dim)
    criterion = make_criterion(mode, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.steps, pct_start=0.1
    )
    order = np.random.default_rng(seed)
    sampling = torch.Generator().manual_seed(seed)
    train_images, train_labels = data["train_images"], data["train_labels"]
    curve: dict[str, list[float]] = {"step": [], "ce": [], "contrast": [], "eval_step": [],
                                     "miou": []}
    first_contrast_step = contrast_start(config)
    start = time.perf_counter()
    bar = tqdm(range(1, config.steps + 1), desc=f"{mode:>18} seed {seed}", dynamic_ncols=True)
    for step in bar:
        pick = torch.from_numpy(order.choice(len(train_images), config.batch_size, replace=False))
        images, labels = train_images[pick], train_labels[pick]
        _, logits, embeddings = model(images)
        ce = F.cross_entropy(upsample(logits, images.shape[-2:]), labels,
                             ignore_index=IGNORE_INDEX)
        loss = ce
        contrast = torch.zeros(())
        if criterion is not None and step < first_contrast_step:
            contrast = torch.full((), float("nan"))  # warm-up: the term is off, not computed
        elif criterion is not None:
            contrast = criterion(embeddings, labels, predictions=logits, generator=sampling)
            loss = ce + config.contrast_weight * contrast
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        curve["step"].append(step)
        curve["ce"].append(ce.item())
        curve["contrast"].append(contrast.item())
        if step % config.eval_every == 0 or step == config.steps:
            iou = evaluate(model, data["test_images"], data["test_labels"], config.batch_size)
            curve["eval_step"].append(step)
            curve["miou"].append(float(iou.nanmean()))
            bar.set_postfix(ce=f"{curve['ce'][-1]:.3f}", contrast=f"{curve['contrast'][-1]:.3f}",
                            miou=f"{curve['miou'][-1]:.3f}")
    bar.close()
    iou = evaluate(model, data["test_images"], data["test_labels"], config.batch_size)
    record = {
        "mode": mode,
        "seed": seed,
        "miou": float(iou.nanmean()),
        "iou": dict(zip(CLASS_NAMES, iou.tolist())),
        "seconds": time.perf_counter() - start,
        "first_contrast_step": first_contrast_step if criterion is not None else None,
        "curve": curve,
    }
    return model, record


# --------------------------------------------------------------------------- reporting


@torch.no_grad()
def embedding_points(
    model: SegNet, images: Tensor, labels: Tensor, count: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Features of up to ``count`` test pixels, about equally many per class (no ignored pixel)."""
    model.eval()
    features, _, _ = model(images)
    small = pixcontrast.resize_labels(labels, tuple(features.shape[-2:])).reshape(-1)
    flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in range(NUM_CLASSES):
        where = (small == cls).nonzero().squeeze(1).numpy()
        chosen.append(rng.permutation(where)[: count // NUM_CLASSES])
    index = torch.from_numpy(np.concatenate(chosen))
    return flat[index].numpy(), small[index].numpy()


def plot_embeddings(panels: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.8), squeeze=False)
    cmap = plt.get_cmap("tab20", NUM_CLASSES)
    for ax, (mode, (points, classes)) in zip(axes[0], panels.items()):
        perplexity = min(30.0, max(5.0, (len(points) - 1) / 4))
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=0).fit_transform(
            points
        )
        scatter = ax.scatter(xy[:, 0], xy[:, 1], c=classes, cmap=cmap, vmin=-0.5,
                             vmax=NUM_CLASSES - 0.5, s=4)
        ax.set_title(f"{mode} (seed 0)")
        ax.set_xticks([])
        ax.set_yticks([])
    colorbar = fig.colorbar(scatter, ax=list(axes[0]), ticks=range(NUM_CLASSES))
    colorbar.ax.set_yticklabels(CLASS_NAMES)
    fig.suptitle("t-SNE of test-pixel features (input of classifier and projection head)")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(records: list[dict], modes: tuple[str, ...], path: Path) -> None:
    fig, (ax_loss, ax_contrast, ax_miou) = plt.subplots(1, 3, figsize=(16, 4))
    for color, mode in zip(plt.get_cmap("tab10").colors, modes):
        runs = [r["curve"] for r in records if r["mode"] == mode]
        steps = runs[0]["step"]
        ce = np.array([r["ce"] for r in runs])
        window = max(1, len(steps) // 40)
        kernel = np.ones(window) / window
        smooth = np.convolve(ce.mean(0), kernel, mode="valid")
        ax_loss.plot(steps[window - 1 :], smooth, color=color, label=mode)
        contrast = np.array([r["contrast"] for r in runs]).mean(0)  # NaN during the warm-up
        if mode != "ce":
            ax_contrast.plot(steps[window - 1 :], np.convolve(contrast, kernel, mode="valid"),
                             color=color, label=mode)
        miou = np.array([r["miou"] for r in runs])
        ax_miou.plot(runs[0]["eval_step"], miou.mean(0), color=color, marker="o", label=mode)
        ax_miou.fill_between(runs[0]["eval_step"], miou.min(0), miou.max(0), color=color,
                             alpha=0.2)
    ax_loss.set(xlabel="step", ylabel="train cross-entropy (smoothed, mean over seeds)",
                yscale="log")
    ax_contrast.set(xlabel="step", ylabel="train contrast loss (smoothed, mean over seeds)")
    ax_miou.set(xlabel="step", ylabel="test mIoU (mean, min-max over seeds)")
    ax_contrast.legend()
    ax_loss.legend()
    ax_miou.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_table(records: list[dict], modes: tuple[str, ...]) -> tuple[str, dict]:
    lines = [
        "| mode | seeds | test mIoU (mean +- std) | min | max | seconds per run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    summary = {}
    for mode in modes:
        values = np.array([r["miou"] for r in records if r["mode"] == mode])
        seconds = np.mean([r["seconds"] for r in records if r["mode"] == mode])
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        summary[mode] = {"mean": float(values.mean()), "std": std, "values": values.tolist()}
        lines.append(
            f"| {mode} | {len(values)} | {100 * values.mean():.2f} +- {100 * std:.2f} | "
            f"{100 * values.min():.2f} | {100 * values.max():.2f} | {seconds:.0f} |"
        )
    return "\n".join(lines), summary


# --------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps on tiny data (CI)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "output")
    parser.add_argument("--steps", type=int, help="training steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (one run per mode and seed)")
    parser.add_argument("--contrast-weight", type=float, help="weight of the contrastive term")
    parser.add_argument(
        "--contrast-warmup", type=float,
        help="fraction of the steps trained with cross-entropy alone before the contrast term "
        "is switched on (default 1/3, after the published code's warm-up; 0: from step 1)",
    )
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (default 1: the convolutions are small, and on a busy "
        "machine threads waiting on each other made a step up to 10x slower)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    config = Config(**SMOKE) if args.smoke else Config()
    overrides = {
        "steps": args.steps,
        "seeds": tuple(args.seeds) if args.seeds else None,
        "contrast_weight": args.contrast_weight,
        "contrast_warmup": args.contrast_warmup,
    }
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    config = replace(config, modes=available_modes(), eval_every=min(config.eval_every,
                                                                      config.steps))
    args.output.mkdir(parents=True, exist_ok=True)

    train_split, test_split = split_digits(config.data_seed)
    rng = np.random.default_rng(config.data_seed)
    train_images, train_labels = compose_scenes(train_split, config.train_scenes, config.canvas,
                                                rng)
    test_images, test_labels = compose_scenes(test_split, config.test_scenes, config.canvas, rng)
    data = {"train_images": train_images, "train_labels": train_labels,
            "test_images": test_images, "test_labels": test_labels}
    print(
        f"{len(train_split['targets'])} training / {len(test_split['targets'])} held-out scans; "
        f"{config.train_scenes} training / {config.test_scenes} test scenes of "
        f"{config.canvas}x{config.canvas}; modes {', '.join(config.modes)}; "
        f"{config.steps} steps x {len(config.seeds)} seeds each, contrast term from step "
        f"{contrast_start(config)}; torch threads "
        f"{torch.get_num_threads()}"
    )

    started = time.perf_counter()
    records, panels = [], {}
    for seed in config.seeds:
        for mode in config.modes:
            model, record = train_one(mode, seed, config, data)
            records.append(record)
            if seed == config.seeds[0]:
                panels[mode] = embedding_points(model, test_images, test_labels,
                                                config.tsne_pixels, seed)
    table, summary = summary_table(records, config.modes)
    print()
    print(table)

    plot_curves(records, config.modes, args.output / "digits_curves.png")
    plot_embeddings(panels, args.output / "digits_embeddings.png")
    result = {
        "config": asdict(config),
        "summary": summary,
        "runs": records,
        "seconds_total": time.perf_counter() - started,
        "versions": {"pixcontrast": pixcontrast.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
    }
    (args.output / "digits_results.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.output}/digits_results.json, digits_curves.png, digits_embeddings.png "
          f"({result['seconds_total']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
