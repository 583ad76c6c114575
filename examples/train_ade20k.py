"""Segformer on ADE20K, with and without pixcontrast's term: same seeds, any number of processes.

For a user with GPUs who wants to know what the term does at benchmark scale. Each seed trains
two arms from the same initialisation and the same data order:

- ``ce``: Segformer's own loss (cross-entropy on upsampled logits);
- ``ce+contrast``: the same plus a :class:`pixcontrast.ContrastTerm` on the fused decoder
  feature (``decode_head.activation``, taken by a :class:`pixcontrast.FeatureCapture`) with the
  recipe's defaults (weight 0.1 after a warm-up of 20 % of the steps and a ramp of 20 %), the
  anchors of every process contrasted with each other (``gather=True``).

Data: the ADE20K (SceneParsing, 150 classes) folder layout, ``ADEChallengeData2016/images/
{training,validation}/*.jpg`` and ``annotations/{training,validation}/*.png`` of the same stems.
Annotation 0 ("other") is ignored and the 150 classes are shifted to 0..149 with 255 ignored (as
Hugging Face's ``do_reduce_labels``). Training crops: random scale 0.5-2.0 of a shorter side of
``--crop``, a random ``crop x crop`` window (padding ignored), random flip. Validation: the
image resized to a shorter side of ``--crop`` (labels by nearest neighbour), one forward per
image, logits upsampled to that size; mIoU over the classes present (a single-scale protocol
at reduced resolution: lower than the paper's full-resolution numbers, the same for both arms).

Model: ``--model`` names a local directory or a model id that ``from_pretrained`` can fetch on
your machine (e.g. ``nvidia/mit-b0``: an ImageNet-pretrained encoder; its decode head is
re-initialised for 150 classes); without it a Segformer-B0 configuration is initialised at
random (``--tiny``: a very small one, for tests).

Output: a JSON file with, per arm and seed, the validation mIoU and the median seconds per
training step; per arm the mean and standard deviation over seeds; and the paired difference
``ce+contrast - ce`` per seed with its mean and standard deviation.

Usage::

    torchrun --nproc_per_node=8 examples/train_ade20k.py --data /data/ADEChallengeData2016 \\
        --model nvidia/mit-b0 --steps 160000 --batch-size 2 --seeds 0 1 2 \\
        --output ade20k_results.json
    python examples/train_ade20k.py --data tiny/ADEChallengeData2016 --tiny --steps 2  # 1 process

What it costs for real (a model, not a measurement: nothing here has been run at scale, only
the two-step test on a tiny dataset on CPU): Segformer's schedule is 160,000 steps at 16 images
of 512 x 512 per step (8 GPUs x 2). With ``t`` seconds per step on each of ``g`` GPUs, one arm of
one seed costs ``160000 * t * g / 3600`` GPU hours. Taking ``t = 0.25`` s for B0 at 2 images per
GPU (an assumption of the model, not a measured figure), that is 89 GPU hours per arm and seed,
533 GPU hours for two arms and three seeds; the contrast arm costs more by the term's share of
the step, which the JSON's ``seconds_per_step`` reports from the first steps (run a few hundred
steps with ``--steps`` and recompute before committing the budget).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from transformers import SegformerConfig, SegformerForSemanticSegmentation

import pixcontrast

NUM_CLASSES = 150
IGNORE_INDEX = 255
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)  # ImageNet, as Segformer's processor
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
ARMS = ("ce", "ce+contrast")


@dataclass
class Config:
    """Everything that defines a run; the JSON output records it."""

    data: str
    model: Optional[str] = None
    tiny: bool = False
    steps: int = 160000
    batch_size: int = 2  # per process
    crop: int = 512
    lr: float = 6e-5
    weight_decay: float = 0.01
    contrast_weight: float = 0.1
    proj_dim: int = 256
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = ARMS
    workers: int = 4
    max_val_images: Optional[int] = None


# --------------------------------------------------------------------------- data


def reduce_labels(annotation: np.ndarray) -> np.ndarray:
    """ADE20K annotation (0 "other", 1..150 classes) to 0..149 with 255 ignored."""
    labels = annotation.astype(np.int64) - 1
    labels[annotation == 0] = IGNORE_INDEX
    return labels


class ADE20KFolder(Dataset):
    """Image and reduced label pairs of one split of an ``ADEChallengeData2016`` folder."""

    def __init__(self, root: Path, split: str, crop: int, train: bool,
                 limit: Optional[int] = None) -> None:
        images = sorted((root / "images" / split).glob("*.jpg"))
        if not images:
            raise FileNotFoundError(f"no images in {root / 'images' / split}")
        self.pairs = [(image, root / "annotations" / split / f"{image.stem}.png")
                      for image in images[:limit]]
        missing = [str(label) for _, label in self.pairs if not label.exists()]
        if missing:
            raise FileNotFoundError(f"annotations missing, e.g. {missing[0]}")
        self.crop, self.train = crop, train

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image_path, label_path = self.pairs[index]
        image = Image.open(image_path).convert("RGB")
        label = Image.open(label_path)
        short = self.crop * (random.uniform(0.5, 2.0) if self.train else 1.0)
        scale = short / min(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.BILINEAR)
        label = label.resize(size, Image.NEAREST)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        labels = torch.from_numpy(reduce_labels(np.asarray(label)))
        pixels = (pixels - MEAN) / STD
        if self.train:
            pixels, labels = self.random_crop(pixels, labels)
            if random.random() < 0.5:
                pixels, labels = pixels.flip(-1), labels.flip(-1)
        return pixels, labels

    def random_crop(self, pixels: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """A ``crop x crop`` window; padding is 0 in the image and ignored in the labels."""
        height, width = labels.shape
        pad_h, pad_w = max(0, self.crop - height), max(0, self.crop - width)
        pixels = F.pad(pixels, (0, pad_w, 0, pad_h))
        labels = F.pad(labels, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        top = random.randint(0, labels.shape[0] - self.crop)
        left = random.randint(0, labels.shape[1] - self.crop)
        window = (slice(top, top + self.crop), slice(left, left + self.crop))
        return pixels[(slice(None), *window)], labels[window]


# --------------------------------------------------------------------------- model


def build_model(config: Config) -> SegformerForSemanticSegmentation:
    if config.model is not None:
        return SegformerForSemanticSegmentation.from_pretrained(
            config.model, num_labels=NUM_CLASSES, ignore_mismatched_sizes=True,
            semantic_loss_ignore_index=IGNORE_INDEX,
        )
    if config.tiny:
        settings = dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                        hidden_sizes=[8, 16], num_attention_heads=[1, 1], patch_sizes=[7, 3],
                        strides=[4, 2], mlp_ratios=[2, 2], decoder_hidden_size=16)
    else:  # Segformer-B0
        settings = dict(hidden_sizes=[32, 64, 160, 256], decoder_hidden_size=256)
    return SegformerForSemanticSegmentation(SegformerConfig(
        num_labels=NUM_CLASSES, semantic_loss_ignore_index=IGNORE_INDEX, **settings))


class Segmenter(nn.Module):
    """Segformer and, in the contrast arm, the term: the whole loss in one forward, for DDP."""

    def __init__(self, model: SegformerForSemanticSegmentation, config: Config,
                 contrast: bool) -> None:
        super().__init__()
        self.model = model
        self.term: Optional[pixcontrast.ContrastTerm] = None
        if contrast:
            self.capture = pixcontrast.FeatureCapture(model, "decode_head.activation")
            self.term = pixcontrast.ContrastTerm(
                in_channels=model.config.decoder_hidden_size, num_classes=NUM_CLASSES,
                total_steps=config.steps, weight=config.contrast_weight,
                proj_dim=config.proj_dim,
                ignore_index=model.config.semantic_loss_ignore_index,
                gather=dist.is_initialized(),
            )

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The training loss and the model's own loss."""
        outputs = self.model(pixel_values=images, labels=labels)
        if self.term is None:
            return outputs.loss, outputs.loss
        return outputs.loss + self.term(self.capture.take(), labels, outputs.logits), outputs.loss


# --------------------------------------------------------------------------- runs


def rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(config: Config, arm: str, seed: int, device: torch.device) -> dict:
    rank, world = rank_and_world()
    seed_everything(seed)  # the same initialisation in both arms: the model is built first
    segmenter = Segmenter(build_model(config), config, contrast=arm != "ce").to(device)
    wrapped: nn.Module = segmenter
    if dist.is_initialized():
        wrapped = DistributedDataParallel(
            segmenter, device_ids=[device.index] if device.type == "cuda" else None)
    data = ADE20KFolder(Path(config.data), "training", config.crop, train=True)
    sampler = DistributedSampler(data, world, rank, shuffle=True, seed=seed, drop_last=True)
    # The loader's workers seed their random modules from this generator: the same crops in
    # both arms (the term draws its anchors from the global generator).
    loader = DataLoader(data, batch_size=config.batch_size, sampler=sampler, drop_last=True,
                        num_workers=config.workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(seed * 1000 + rank))
    optimizer = torch.optim.AdamW(segmenter.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    poly = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                             lambda step: (1 - step / config.steps) ** 1.0)
    seconds, step, epoch = [], 0, 0
    segmenter.train()
    while step < config.steps:
        sampler.set_epoch(epoch)
        random.seed(seed * 7919 + epoch * 31 + rank)  # the crops of --workers 0
        for images, labels in loader:
            synchronize(device)
            start = time.perf_counter()
            loss, model_loss = wrapped(images.to(device), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            poly.step()
            synchronize(device)
            seconds.append(time.perf_counter() - start)
            step += 1
            if rank == 0 and (step % 50 == 0 or step == config.steps):
                print(f"[{arm} seed {seed}] step {step}/{config.steps} loss {loss.item():.4f} "
                      f"model loss {model_loss.item():.4f}", flush=True)
            if step == config.steps:
                break
        epoch += 1
    iou = evaluate(segmenter.model, config, device)
    return {"arm": arm, "seed": seed, "miou": float(np.nanmean(iou)) * 100,
            "seconds_per_step": statistics.median(seconds[1:] or seconds), "steps": step,
            "processes": world}


@torch.no_grad()
def evaluate(model: nn.Module, config: Config, device: torch.device) -> np.ndarray:
    """Per-class IoU on the validation split (NaN for classes absent from it)."""
    rank, world = rank_and_world()
    data = ADE20KFolder(Path(config.data), "validation", config.crop, train=False,
                        limit=config.max_val_images)
    model.eval()
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.float64, device=device)
    for index in range(rank, len(data), world):
        image, labels = data[index]
        logits = model(pixel_values=image[None].to(device)).logits
        logits = F.interpolate(logits, size=labels.shape, mode="bilinear", align_corners=False)
        predicted = logits.argmax(1)[0].cpu()
        valid = labels != IGNORE_INDEX
        pairs = labels[valid] * NUM_CLASSES + predicted[valid]
        counts = torch.bincount(pairs, minlength=NUM_CLASSES ** 2).view(NUM_CLASSES, NUM_CLASSES)
        confusion += counts.to(device, torch.float64)
    if dist.is_initialized():
        dist.all_reduce(confusion)
    model.train()
    confusion = confusion.cpu().numpy()
    true_positive = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, true_positive / union, np.nan)


def summarise(runs: list[dict], arms: tuple[str, ...]) -> dict:
    def spread(values: list[float]) -> dict:
        return {"mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}

    summary: dict = {}
    for arm in arms:
        mine = [run for run in runs if run["arm"] == arm]
        summary[arm] = {"miou": spread([run["miou"] for run in mine]),
                        "seconds_per_step": spread([run["seconds_per_step"] for run in mine])}
    if set(ARMS) <= set(arms):
        by_seed = {(run["arm"], run["seed"]): run["miou"] for run in runs}
        seeds = sorted({run["seed"] for run in runs})
        summary["paired_difference"] = spread(
            [by_seed["ce+contrast", s] - by_seed["ce", s] for s in seeds])
    return summary


def parse(argv: Optional[list[str]]) -> tuple[Config, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the ADEChallengeData2016 folder")
    parser.add_argument("--model", default=None,
                        help="a local path or model id for from_pretrained (default: random B0)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (tests)")
    parser.add_argument("--steps", type=int, default=Config.steps)
    parser.add_argument("--batch-size", type=int, default=Config.batch_size,
                        help="images per process")
    parser.add_argument("--crop", type=int, default=Config.crop)
    parser.add_argument("--lr", type=float, default=Config.lr)
    parser.add_argument("--contrast-weight", type=float, default=Config.contrast_weight)
    parser.add_argument("--proj-dim", type=int, default=Config.proj_dim)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(Config.seeds))
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--workers", type=int, default=Config.workers)
    parser.add_argument("--max-val-images", type=int, default=None)
    parser.add_argument("--output", type=Path, default=Path("ade20k_results.json"))
    args = parser.parse_args(argv)
    config = Config(data=args.data, model=args.model, tiny=args.tiny, steps=args.steps,
                    batch_size=args.batch_size, crop=args.crop, lr=args.lr,
                    contrast_weight=args.contrast_weight, proj_dim=args.proj_dim,
                    seeds=tuple(args.seeds), arms=tuple(args.arms), workers=args.workers,
                    max_val_images=args.max_val_images)
    return config, args.output


def main(argv: Optional[list[str]] = None) -> dict:
    config, output = parse(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        runs = [train(config, arm, seed, device) for seed in config.seeds for arm in config.arms]
        result = {"config": asdict(config), "runs": runs,
                  "summary": summarise(runs, config.arms)}
        if rank_and_world()[0] == 0:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(result, indent=2))
            for arm in config.arms:
                miou = result["summary"][arm]["miou"]
                step = result["summary"][arm]["seconds_per_step"]["mean"]
                print(f"{arm}: mIoU {miou['mean']:.2f} +- {miou['std']:.2f}, "
                      f"{step:.3f} s/step")
            print(f"written to {output}")
    finally:
        if distributed:
            dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
