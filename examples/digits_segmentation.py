"""Semantic segmentation of handwritten-digit scenes: cross-entropy alone vs + PixelContrastLoss.

Scenes are composed from scikit-learn's bundled handwritten digits (``load_digits``: 1,797 real
8x8 scans, no download): a few digits, each scaled and placed on a noisy canvas. Every ink pixel is
labelled with its digit (0-9), every other pixel is background (10), and the anti-aliased rim of a
stroke is ``ignore_index`` (255), like the void pixels of Cityscapes. Training, validation and test
scenes are built from disjoint scans (the validation scans are carved from the training scans).

A small dilated fully-convolutional network with a :class:`pixcontrast.ProjectionHead` is trained
in each mode with the same steps, data order and initialisation per seed:

- ``ce``: cross-entropy only (the projection head exists but receives no gradient);
- ``ce+contrast``: the recipe: cross-entropy + ``w_t * PixelContrastLoss(exclude_classes=(10,))``,
  the background left out of the contrast only, ``w_t`` from a
  :class:`pixcontrast.ContrastWeightSchedule` (off during a warm-up, then a linear ramp to
  ``--contrast-weight``);
- ``ce+contrast-plain`` (not run by default): the library's defaults, background included, the
  weight on from step 1;
- ``ce+contrast-bg`` (not run by default): the recipe's schedule with the background included;
- ``ce+contrast+memory`` (not run by default): the recipe with a
  :class:`pixcontrast.ClassMemoryBank`.

Reported per run: test mIoU and per-class IoU, mIoU on a shifted test set (the same held-out
scans under twice the training noise), and a class-balanced linear probe of the backbone features
(logistic regression on equally many pixels per class, balanced accuracy on test pixels). During
training the curves record the cross-entropy, the weighted contrast term, the contrast/CE gradient
ratio at the backbone features (:func:`pixcontrast.gradient_ratio`), the loss's ``last_stats`` and
validation mIoU; the test split is evaluated once, at the end. Runs go to ``--workers``
processes with one torch thread each.

Writes under ``--output`` (default ``examples/output/``): ``digits_results.json``,
``digits_curves.png``, ``digits_panels.png`` (image / ground truth / prediction per mode) and
``digits_embeddings.png`` (t-SNE of test-pixel backbone features, one panel per mode).

The step budget and the learning rate were chosen on the validation split only (``ce`` and
``ce+contrast``, seed 0, ``--validation-only``: the test split is not evaluated); the JSON of
those runs is in ``examples/results/budget/``.

Usage::

    python examples/digits_segmentation.py --output examples/results     # the main job
    python examples/digits_segmentation.py --smoke                       # a few steps, for CI
    python examples/digits_segmentation.py --validation-only --steps 400 --seeds 0 \
        --modes ce ce+contrast                                           # a budget study
    python examples/digits_segmentation.py --modes ce+contrast-plain ce+contrast-bg
    python examples/digits_segmentation.py --train-scenes 100     # also --steps, --contrast-weight
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import platform
import queue as queue_module
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402
from sklearn.metrics import balanced_accuracy_score  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import pixcontrast  # noqa: E402

NUM_CLASSES = 11  # digits 0-9 and background
BACKGROUND = 10
IGNORE_INDEX = 255
CLASS_NAMES = [str(d) for d in range(10)] + ["bg"]
MODES = ("ce", "ce+contrast", "ce+contrast-plain", "ce+contrast-bg", "ce+contrast+memory")
DEFAULT_MODES = ("ce", "ce+contrast")


@dataclass(frozen=True)
class Config:
    """Everything that defines a run; the JSON output records it."""

    canvas: int = 48
    train_scenes: int = 2000
    val_scenes: int = 300
    test_scenes: int = 400
    train_noise: float = 0.15
    shifted_noise: float = 0.3  # the shifted test condition: twice the training noise
    batch_size: int = 16
    steps: int = 800
    eval_every: int = 80
    grad_every: int = 20  # steps between gradient_ratio measurements
    width: int = 16
    proj_dim: int = 32
    lr: float = 1e-2  # peak of the one-cycle schedule (chosen on the validation split)
    contrast_weight: float = 0.1
    temperature: float = 0.1
    warmup: float = 0.2  # fraction of the steps with the term off (recipe modes)
    ramp: float = 0.2  # fraction of the steps of the linear ramp after it
    max_samples: int = 1024
    max_views: int = 64
    probe_pixels: int = 150  # per class, for the probe's training and test sets each
    seeds: tuple[int, ...] = (0, 1, 2)
    tsne_pixels: int = 800
    panel_scenes: int = 3
    data_seed: int = 12345
    modes: tuple[str, ...] = DEFAULT_MODES


SMOKE = dict(
    canvas=32,
    train_scenes=64,
    val_scenes=16,
    test_scenes=24,
    batch_size=8,
    steps=6,
    eval_every=3,
    grad_every=2,
    width=8,
    proj_dim=16,
    max_samples=256,
    max_views=16,
    probe_pixels=10,
    seeds=(0,),
    tsne_pixels=110,
    panel_scenes=2,
)


# --------------------------------------------------------------------------- data


def split_digits(seed: int, test_fraction: float = 0.3,
                 val_fraction: float = 0.15) -> tuple[dict, dict, dict]:
    """The 1,797 scans split by source scan into training, validation and test: no scan is in
    two splits; the validation scans are ``val_fraction`` of the non-test ones."""
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    cut = int(round(len(order) * (1 - test_fraction)))
    val_cut = int(round(cut * (1 - val_fraction)))
    images = digits.images.astype(np.float32) / 16.0

    def part(index: np.ndarray) -> dict:
        return {"images": images[index], "targets": digits.target[index]}

    return part(order[:val_cut]), part(order[val_cut:cut]), part(order[cut:])


def compose_scenes(
    source: dict, count: int, canvas: int, rng: np.random.Generator, noise: float = 0.15
) -> tuple[Tensor, Tensor]:
    """``count`` scenes ``[count, 1, canvas, canvas]`` and their labels ``[count, canvas, canvas]``.

    Each scene holds 2-4 non-overlapping digits scaled to 1.5-3x (12-24 px); ink (> 0.4 after
    bilinear scaling) takes the digit's class, faint rims (0.1-0.4) are ignored, the rest is
    background. Gaussian noise of standard deviation ``noise`` is added to the image.
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
    sensor = torch.from_numpy(rng.normal(0.0, noise, size=images.shape).astype(np.float32))
    return images + sensor, labels


def build_data(config: Config) -> dict[str, Tensor]:
    """Training, validation, test and shifted-test scenes (disjoint scans, fixed seed)."""
    train_split, val_split, test_split = split_digits(config.data_seed)
    rng = np.random.default_rng(config.data_seed)
    data = {}
    for name, split, count, noise in (
        ("train", train_split, config.train_scenes, config.train_noise),
        ("val", val_split, config.val_scenes, config.train_noise),
        ("test", test_split, config.test_scenes, config.train_noise),
        ("shifted", test_split, config.test_scenes, config.shifted_noise),
    ):
        data[f"{name}_images"], data[f"{name}_labels"] = compose_scenes(
            split, count, config.canvas, rng, noise
        )
    data["scans"] = torch.tensor([len(s["targets"]) for s in (train_split, val_split,
                                                               test_split)])
    return data


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


def make_criterion(mode: str, config: Config) -> Optional[pixcontrast.PixelContrastLoss]:
    """The contrast loss of a mode (``None`` for ``ce``)."""
    if mode == "ce":
        return None
    memory = None
    # the recipe leaves the catch-all background out of the contrast (not out of the CE)
    exclude = () if mode in ("ce+contrast-plain", "ce+contrast-bg") else (BACKGROUND,)
    if mode == "ce+contrast+memory":
        memory = pixcontrast.ClassMemoryBank(
            num_classes=NUM_CLASSES, dim=config.proj_dim, pixels_per_class=500,
            regions_per_class=500, pixels_per_image=10, ignore_index=IGNORE_INDEX,
            exclude_classes=exclude,
        )
    return pixcontrast.PixelContrastLoss(
        temperature=config.temperature,
        max_samples=config.max_samples,
        max_views=config.max_views,
        ignore_index=IGNORE_INDEX,
        num_classes=NUM_CLASSES,
        normalize=False,  # ProjectionHead already returns unit vectors
        memory=memory,
        exclude_classes=exclude,
    )


def make_schedule(mode: str, config: Config) -> pixcontrast.ContrastWeightSchedule:
    """The plain mode has the weight from step 1; the others a warm-up and a ramp."""
    if mode == "ce":
        return pixcontrast.ContrastWeightSchedule(0.0)
    if mode == "ce+contrast-plain":
        return pixcontrast.ContrastWeightSchedule(config.contrast_weight)
    return pixcontrast.ContrastWeightSchedule(
        config.contrast_weight,
        warmup_steps=int(round(config.warmup * config.steps)),
        ramp_steps=int(round(config.ramp * config.steps)),
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
def predict(model: SegNet, images: Tensor, batch_size: int = 64) -> Tensor:
    """Predicted label maps at the images' resolution (model in eval mode, restored after)."""
    was_training = model.training
    model.eval()
    parts = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        parts.append(upsample(model(batch)[1], batch.shape[-2:]).argmax(1))
    model.train(was_training)
    return torch.cat(parts)


def evaluate(model: SegNet, images: Tensor, labels: Tensor) -> Tensor:
    """Per-class IoU on a set of scenes."""
    return iou_per_class(confusion(predict(model, images), labels))


@torch.no_grad()
def pixel_features(model: SegNet, images: Tensor, labels: Tensor, per_class: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Backbone features of ``per_class`` random pixels of each class (none ignored)."""
    was_training = model.training
    model.eval()
    features = torch.cat([model.backbone(images[i : i + 64]) for i in range(0, len(images), 64)])
    model.train(was_training)
    small = pixcontrast.functional.resize_labels(labels, tuple(features.shape[-2:])).reshape(-1)
    flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation((small == c).nonzero().squeeze(1).numpy())[:per_class]
              for c in range(NUM_CLASSES)]
    index = torch.from_numpy(np.concatenate(chosen))
    return flat[index].numpy(), small[index].numpy()


def linear_probe(model: SegNet, data: dict[str, Tensor], config: Config, seed: int) -> float:
    """Balanced accuracy of a logistic regression on backbone features: trained on equally many
    pixels per class of training scenes, tested on equally many of test scenes."""
    x_train, y_train = pixel_features(model, data["train_images"][:300],
                                      data["train_labels"][:300], config.probe_pixels, seed)
    x_test, y_test = pixel_features(model, data["test_images"], data["test_labels"],
                                    config.probe_pixels, seed + 1)
    scaler = StandardScaler().fit(x_train)
    probe = LogisticRegression(max_iter=500).fit(scaler.transform(x_train), y_train)
    return float(balanced_accuracy_score(y_test, probe.predict(scaler.transform(x_test))))


def train_one(mode: str, seed: int, config: Config, data: dict[str, Tensor],
              progress: Callable[[int], None], final_test: bool = True,
              extras: bool = False) -> dict:
    """Train one model; returns its record (curves, metrics, time; figures' data if ``extras``)."""
    torch.manual_seed(seed)
    model = SegNet(config.width, config.proj_dim)
    criterion = make_criterion(mode, config)
    schedule = make_schedule(mode, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.steps, pct_start=0.1
    )
    order = np.random.default_rng(seed)
    sampling = torch.Generator().manual_seed(seed)
    train_images, train_labels = data["train_images"], data["train_labels"]
    curve: dict[str, list[float]] = {
        key: [] for key in ("step", "ce", "contrast", "weight", "grad_step", "grad_ratio",
                            "grad_cosine", "anchors", "mean_positives", "eval_step", "val_miou")
    }
    start, cpu_start = time.perf_counter(), time.process_time()
    reported = 0
    for step in range(1, config.steps + 1):
        pick = torch.from_numpy(order.choice(len(train_images), config.batch_size, replace=False))
        images, labels = train_images[pick], train_labels[pick]
        features, logits, embeddings = model(images)
        ce = F.cross_entropy(upsample(logits, images.shape[-2:]), labels,
                             ignore_index=IGNORE_INDEX)
        loss, contrast, weight = ce, float("nan"), schedule.value
        if criterion is not None and schedule.active:  # off: not computed, the bank not filled
            term = criterion(embeddings, labels, predictions=logits, generator=sampling)
            contrast = term.item()
            if step % config.grad_every == 0:
                ratio = pixcontrast.gradient_ratio(weight * term, ce, features)
                stats = criterion.last_stats
                curve["grad_step"].append(step)
                curve["grad_ratio"].append(ratio.ratio.item())
                curve["grad_cosine"].append(ratio.cosine.item())
                curve["anchors"].append(stats["anchors"].item())
                curve["mean_positives"].append(stats["mean_positives"].item())
            loss = ce + weight * term
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        schedule.step()
        curve["step"].append(step)
        curve["ce"].append(ce.item())
        curve["contrast"].append(contrast)
        curve["weight"].append(weight)
        if step % config.eval_every == 0 or step == config.steps:
            curve["eval_step"].append(step)
            curve["val_miou"].append(float(evaluate(model, data["val_images"],
                                                    data["val_labels"]).nanmean()))
        if step % 10 == 0 or step == config.steps:
            progress(step - reported)
            reported = step
    record = {
        "mode": mode,
        "seed": seed,
        "val_miou": curve["val_miou"][-1],
        "first_contrast_step": schedule.first_active_step + 1 if criterion is not None else None,
        "curve": curve,
        "train_seconds": time.perf_counter() - start,
    }
    if final_test:
        iou = evaluate(model, data["test_images"], data["test_labels"])
        record.update(
            miou=float(iou.nanmean()),
            iou=dict(zip(CLASS_NAMES, iou.tolist())),
            shifted_miou=float(evaluate(model, data["shifted_images"],
                                        data["shifted_labels"]).nanmean()),
            probe=linear_probe(model, data, config, seed),
        )
    if extras and final_test:
        points, classes = pixel_features(model, data["test_images"], data["test_labels"],
                                         config.tsne_pixels // NUM_CLASSES, seed)
        perplexity = min(30.0, max(5.0, (len(points) - 1) / 4))
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca",
                  random_state=0).fit_transform(points)
        record["tsne"] = {"xy": xy.tolist(), "classes": classes.tolist()}
        record["panel_predictions"] = predict(
            model, data["test_images"][: config.panel_scenes]).tolist()
    record["seconds"] = time.perf_counter() - start
    record["cpu_seconds"] = time.process_time() - cpu_start
    return record


# --------------------------------------------------------------------------- parallel runs

_SHARED: dict = {}  # set before the worker processes fork: config, data, progress queue


def _run_job(job: tuple[str, int, bool, bool]) -> dict:
    torch.set_num_threads(1)
    mode, seed, final_test, extras = job
    return train_one(mode, seed, _SHARED["config"], _SHARED["data"], _SHARED["queue"].put,
                     final_test, extras)


def run_all(jobs: list[tuple[str, int, bool, bool]], config: Config, data: dict[str, Tensor],
            workers: int) -> list[dict]:
    """Every job, in ``workers`` forked processes (in this one for ``workers=1``), with one
    progress bar over all training steps."""
    bar = tqdm(total=len(jobs) * config.steps, desc="training steps", unit="step",
               dynamic_ncols=True)
    if workers > 1 and "fork" not in multiprocessing.get_all_start_methods():
        print("this platform cannot fork worker processes: running the jobs in this one")
        workers = 1
    try:
        if workers == 1:
            return [train_one(*job[:2], config, data, bar.update, *job[2:]) for job in jobs]
        context = multiprocessing.get_context("fork")
        _SHARED.update(config=config, data=data, queue=context.Queue())
        with context.Pool(workers) as pool:
            pending = pool.map_async(_run_job, jobs, chunksize=1)
            while not pending.ready():
                try:
                    bar.update(_SHARED["queue"].get(timeout=0.25))
                except queue_module.Empty:
                    pass
            records = pending.get()
        bar.update(bar.total - bar.n)
        return records
    finally:
        bar.close()
        _SHARED.clear()


# --------------------------------------------------------------------------- reporting


def mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def summarise(records: list[dict], modes: tuple[str, ...], final_test: bool) -> dict:
    summary = {}
    base = {r["seed"]: r for r in records if r["mode"] == modes[0]}
    for mode in modes:
        runs = sorted((r for r in records if r["mode"] == mode), key=lambda r: r["seed"])
        entry = {"seeds": [r["seed"] for r in runs]}
        metrics = ("val_miou", "miou", "shifted_miou", "probe") if final_test else ("val_miou",)
        for metric in metrics:
            values = [r[metric] for r in runs]
            mean, std = mean_std(values)
            entry[metric] = {"mean": mean, "std": std, "values": values}
            if mode != modes[0]:
                diffs = [r[metric] - base[r["seed"]][metric] for r in runs]
                mean, std = mean_std(diffs)
                entry[metric]["paired_diff"] = {"mean": mean, "std": std, "values": diffs}
        if final_test:
            entry["iou"] = {name: float(np.nanmean([r["iou"][name] for r in runs]))
                            for name in CLASS_NAMES}
        summary[mode] = entry
    return summary


def _pm(entry: dict, key: str = "") -> str:
    value = entry[key] if key else entry
    return f"{100 * value['mean']:.2f} +- {100 * value['std']:.2f}"


def summary_tables(summary: dict, modes: tuple[str, ...], final_test: bool) -> str:
    if not final_test:
        lines = [f"| mode | validation mIoU | - {modes[0]} (paired) |", "| --- | --- | --- |"]
        for mode in modes:
            e = summary[mode]["val_miou"]
            diff = _pm(e, "paired_diff") if "paired_diff" in e else ""
            lines.append(f"| {mode} | {_pm(e)} | {diff} |")
        return "\n".join(lines)
    paired = f"- {modes[0]} (paired)"
    lines = [
        f"| mode | test mIoU | {paired} | shifted test mIoU | {paired} | probe "
        f"(balanced acc.) | {paired} |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode in modes:
        cells = [mode]
        for metric in ("miou", "shifted_miou", "probe"):
            e = summary[mode][metric]
            cells += [_pm(e), _pm(e, "paired_diff") if "paired_diff" in e else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| mode | " + " | ".join(CLASS_NAMES) + " |",
              "| --- |" + " ---: |" * NUM_CLASSES]
    for mode in modes:
        lines.append(f"| {mode} | " + " | ".join(f"{100 * summary[mode]['iou'][c]:.1f}"
                                                 for c in CLASS_NAMES) + " |")
    return "\n".join(lines)


def plot_curves(records: list[dict], modes: tuple[str, ...], config: Config, path: Path) -> None:
    """Cross-entropy and the weighted contrast term on one log axis, the gradient ratio, and
    validation mIoU; the recipe's warm-up and ramp shaded."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.3))
    ax_loss, ax_grad, ax_miou = axes
    window = max(1, config.steps // 40)
    kernel = np.ones(window) / window

    def smooth(values: np.ndarray) -> np.ndarray:
        return np.convolve(values, kernel, mode="valid")

    for color, mode in zip(plt.get_cmap("tab10").colors, modes):
        runs = [r["curve"] for r in records if r["mode"] == mode]
        steps = np.asarray(runs[0]["step"])[window - 1 :]
        ce = np.mean([r["ce"] for r in runs], axis=0)
        ax_loss.plot(steps, smooth(ce), color=color, label=f"{mode}: CE")
        if mode != "ce":
            term = np.mean([np.asarray(r["contrast"]) * np.asarray(r["weight"]) for r in runs],
                           axis=0)  # NaN while the term is off
            ax_loss.plot(steps, smooth(term), color=color, linestyle="--",
                         label=f"{mode}: weight x contrast")
            grad_steps = runs[0]["grad_step"]
            if grad_steps:
                ratio = np.mean([r["grad_ratio"] for r in runs], axis=0)
                ax_grad.plot(grad_steps, ratio, color=color, marker=".", label=mode)
        val = np.array([r["val_miou"] for r in runs])
        ax_miou.plot(runs[0]["eval_step"], 100 * val.mean(0), color=color, marker="o",
                     label=mode)
        ax_miou.fill_between(runs[0]["eval_step"], 100 * val.min(0), 100 * val.max(0),
                             color=color, alpha=0.2)
    warmup = int(round(config.warmup * config.steps))
    ramp = int(round(config.ramp * config.steps))
    for ax in axes:
        ax.axvspan(0, warmup, color="0.85", zorder=0)
        ax.axvspan(warmup, warmup + ramp, color="0.93", zorder=0)
        ax.set_xlabel("step (grey: recipe warm-up, light grey: ramp)")
    ax_loss.set(yscale="log", ylabel="training loss (smoothed, mean over seeds)",
                title="the terms the optimiser adds")
    ax_grad.axhline(1.0, color="k", linewidth=0.8)
    ax_grad.set(yscale="log", ylabel="|grad weight x contrast| / |grad CE|",
                title="gradient ratio at the backbone features")
    ax_miou.set(ylabel="validation mIoU (mean, min-max over seeds)", title="validation mIoU")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _colour_labels(labels: np.ndarray) -> np.ndarray:
    colours = np.asarray(plt.get_cmap("tab20", NUM_CLASSES).colors)[:, :3]
    out = np.ones(labels.shape + (3,))  # ignored pixels white
    valid = labels != IGNORE_INDEX
    out[valid] = colours[labels[valid]]
    out[labels == BACKGROUND] = 0.15
    return out


def plot_panels(records: list[dict], modes: tuple[str, ...], data: dict[str, Tensor],
                path: Path) -> None:
    """Image, ground truth and each mode's prediction for the first test scenes (seed 0)."""
    runs = {r["mode"]: r for r in records if "panel_predictions" in r}
    count = len(next(iter(runs.values()))["panel_predictions"])
    columns = ["image", "ground truth"] + list(modes)
    fig, axes = plt.subplots(count, len(columns), figsize=(2.2 * len(columns), 2.3 * count),
                             squeeze=False)
    for row in range(count):
        pictures = [data["test_images"][row, 0].numpy(),
                    _colour_labels(data["test_labels"][row].numpy())]
        pictures += [_colour_labels(np.asarray(runs[m]["panel_predictions"][row])) for m in modes]
        for ax, picture, title in zip(axes[row], pictures, columns):
            ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
    fig.suptitle("test scenes (seed 0); ignored rims white, background dark", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_embeddings(records: list[dict], modes: tuple[str, ...], path: Path) -> None:
    runs = {r["mode"]: r for r in records if "tsne" in r}
    fig, axes = plt.subplots(1, len(modes), figsize=(4.6 * len(modes), 4.4), squeeze=False)
    cmap = plt.get_cmap("tab20", NUM_CLASSES)
    for ax, mode in zip(axes[0], modes):
        xy = np.asarray(runs[mode]["tsne"]["xy"])
        scatter = ax.scatter(xy[:, 0], xy[:, 1], c=runs[mode]["tsne"]["classes"], cmap=cmap,
                             vmin=-0.5, vmax=NUM_CLASSES - 0.5, s=3)
        ax.set_title(f"{mode} (seed {runs[mode]['seed']})")
        ax.set_xticks([])
        ax.set_yticks([])
    colorbar = fig.colorbar(scatter, ax=list(axes[0]), ticks=range(NUM_CLASSES))
    colorbar.ax.set_yticklabels(CLASS_NAMES)
    fig.suptitle("t-SNE of test-pixel backbone features (input of classifier and head)")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def dump_results(result: dict) -> str:
    """JSON of the results, indented, with each run's curves on one line and rounded (the file
    stays small enough to commit)."""
    result = copy.deepcopy(result)
    curves = []
    for run in result["runs"]:
        curves.append(json.dumps({k: [None if isinstance(v, float) and np.isnan(v)
                                      else round(v, 5) for v in values]
                                  for k, values in run["curve"].items()}))
        run["curve"] = f"@curve{len(curves) - 1}@"
    text = json.dumps(result, indent=1)
    for index, curve in enumerate(curves):
        text = text.replace(f'"@curve{index}@"', curve)
    return text


# --------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps on tiny data (CI)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "output")
    parser.add_argument("--steps", type=int, help="training steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (one run per mode and seed)")
    parser.add_argument("--modes", nargs="+", choices=MODES,
                        help="modes, the first is the baseline (default: "
                        f"{' '.join(DEFAULT_MODES)})")
    parser.add_argument("--contrast-weight", type=float, help="final weight of the contrast term")
    parser.add_argument("--warmup", type=float,
                        help="fraction of the steps with the term off (recipe modes)")
    parser.add_argument("--ramp", type=float, help="fraction of the steps of the weight's ramp")
    parser.add_argument("--train-scenes", type=int, help="labelled training scenes")
    parser.add_argument("--width", type=int, help="channels of the network's first layer")
    parser.add_argument("--lr", type=float, help="peak learning rate (one-cycle schedule)")
    parser.add_argument("--validation-only", action="store_true",
                        help="report validation mIoU only; the test split is not evaluated")
    parser.add_argument("--workers", type=int, default=2,
                        help="parallel processes, one torch thread each (default 2)")
    parser.add_argument("--no-figures", action="store_true", help="write the JSON only")
    args = parser.parse_args(argv)

    config = Config(**SMOKE) if args.smoke else Config()
    overrides = {
        "steps": args.steps,
        "seeds": tuple(args.seeds) if args.seeds else None,
        "modes": tuple(args.modes) if args.modes else None,
        "contrast_weight": args.contrast_weight,
        "warmup": args.warmup,
        "ramp": args.ramp,
        "train_scenes": args.train_scenes,
        "width": args.width,
        "lr": args.lr,
    }
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    config = replace(config, eval_every=min(config.eval_every, config.steps))
    for name in ("warmup", "ramp"):
        if not 0.0 <= getattr(config, name) <= 1.0:
            raise ValueError(f"--{name} must lie in [0, 1], got {getattr(config, name)}")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    final_test = not args.validation_only
    figures = final_test and not args.no_figures
    args.output.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    started, cpu_started, load_before = time.perf_counter(), time.process_time(), os.getloadavg()
    data = build_data(config)
    scans = data.pop("scans").tolist()
    print(
        f"{scans[0]} training / {scans[1]} validation / {scans[2]} test scans; "
        f"{config.train_scenes} / {config.val_scenes} / {config.test_scenes} scenes of "
        f"{config.canvas}x{config.canvas} (+ {config.test_scenes} shifted test scenes, noise "
        f"{config.shifted_noise} instead of {config.train_noise}); modes "
        f"{', '.join(config.modes)}; {config.steps} steps x {len(config.seeds)} seeds; "
        f"{args.workers} workers"
    )
    # contrast runs first: they take longest, and the workers then finish together
    jobs = [(mode, seed, final_test, figures and seed == config.seeds[0])
            for mode in sorted(config.modes, key=lambda m: m == "ce") for seed in config.seeds]
    records = run_all(jobs, config, data, args.workers)
    summary = summarise(records, config.modes, final_test)
    table = summary_tables(summary, config.modes, final_test)
    print()
    print(table)

    written = ["digits_results.json"]
    if figures:
        plot_curves(records, config.modes, config, args.output / "digits_curves.png")
        plot_panels(records, config.modes, data, args.output / "digits_panels.png")
        plot_embeddings(records, config.modes, args.output / "digits_embeddings.png")
        written += ["digits_curves.png", "digits_panels.png", "digits_embeddings.png"]
    for record in records:  # figure data stays out of the JSON
        record.pop("tsne", None)
        record.pop("panel_predictions", None)
    result = {
        "command": " ".join(["python examples/digits_segmentation.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "config": asdict(config),
        "workers": args.workers,
        "summary": summary,
        "table": table,
        "runs": sorted(records, key=lambda r: (config.modes.index(r["mode"]), r["seed"])),
        "seconds_total": time.perf_counter() - started,
        # CPU time of this process and of every run: what an idle machine needs, whatever the
        # load of a shared one was
        "cpu_seconds_total": time.process_time() - cpu_started
        + (sum(r["cpu_seconds"] for r in records) if args.workers > 1 else 0.0),
        "load_average": {"start": load_before[0], "end": os.getloadavg()[0]},
        "versions": {"pixcontrast": pixcontrast.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "machine": {"processor": platform.processor() or platform.machine(),
                    "cpus": multiprocessing.cpu_count()},
    }
    (args.output / "digits_results.json").write_text(dump_results(result))
    print(f"\nwrote {', '.join(written)} to {args.output}: {result['seconds_total']:.0f} s wall, "
          f"{result['cpu_seconds_total']:.0f} CPU s, load average "
          f"{load_before[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    return result


if __name__ == "__main__":
    main()
