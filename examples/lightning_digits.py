"""The digits example's recipe as a LightningModule, logging pixcontrast's diagnostics.

The training step of ``digits_segmentation.py``'s ``ce+contrast`` mode: cross-entropy plus a
:class:`pixcontrast.ContrastTerm` that leaves the background out, with the term's ``last_stats``
logged every step it is on and :func:`pixcontrast.gradient_ratio` at the backbone features
every ``grad_every`` steps. The term's weight schedule is part of its ``state_dict()``, so a run
resumed from a Lightning checkpoint continues its warm-up where it stopped.

The lines a LightningModule adds: ``self.term = pixcontrast.ContrastTerm(in_channels=...,
num_classes=..., total_steps=...)`` in ``__init__`` and ``return ce + self.term(features,
labels, logits)`` in ``training_step``.

Usage (needs ``pip install lightning``)::

    python examples/lightning_digits.py --steps 200
    python examples/lightning_digits.py --smoke       # a few steps on tiny data
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits_segmentation as digits  # noqa: E402

import pixcontrast  # noqa: E402


class Network(nn.Module):
    """:class:`digits_segmentation.SegNet`'s backbone and classifier (the term brings the head)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        segnet = digits.SegNet(width, proj_dim=1)
        self.backbone, self.classifier = segnet.backbone, segnet.classifier

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Features ``[B, 2w, H/2, W/2]`` and logits at the same size."""
        features = self.backbone(images)
        return features, self.classifier(features)


class ContrastSegmenter(L.LightningModule):
    """Segmentation network trained with cross-entropy + a :class:`pixcontrast.ContrastTerm`.

    The term steps its schedule in every training call and keeps it in ``state_dict()``, so
    Lightning's checkpoints resume the warm-up and ramp with no hook of ours.

    Args:
        width: of :class:`digits_segmentation.SegNet`.
        proj_dim: of the term's projection head.
        lr: AdamW learning rate.
        total_steps, contrast_weight, warmup, ramp: of the term's schedule (fractions of
            ``total_steps``).
        grad_every: steps between :func:`pixcontrast.gradient_ratio` measurements.
        max_samples, max_views: of the anchor sampler.
    """

    def __init__(self, width: int = 16, proj_dim: int = 32, lr: float = 1e-2,
                 total_steps: int = 200, contrast_weight: float = 0.1, warmup: float = 0.2,
                 ramp: float = 0.2, grad_every: int = 20, max_samples: int = 1024,
                 max_views: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = Network(width)
        self.term = pixcontrast.ContrastTerm(
            in_channels=2 * width, num_classes=digits.NUM_CLASSES, total_steps=total_steps,
            weight=contrast_weight, warmup=warmup, ramp=ramp, proj_dim=proj_dim,
            ignore_index=digits.IGNORE_INDEX, max_samples=max_samples, max_views=max_views,
            exclude_classes=(digits.BACKGROUND,),  # the catch-all class stays in the CE only
        )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_index: int) -> Tensor:
        images, labels = batch
        features, logits = self.model(images)
        ce = F.cross_entropy(digits.upsample(logits, images.shape[-2:]), labels,
                             ignore_index=digits.IGNORE_INDEX)
        contrast = self.term(features, labels, logits)  # 0 during the warm-up, not computed
        stats = dict(self.term.last_stats)  # detached tensors: logging them costs no graph
        self.log("train/ce", ce, prog_bar=True)
        self.log("train/contrast_weight", stats.pop("weight"))
        if stats:  # after the warm-up
            self.log_dict({f"contrast/{name}": value.float() for name, value in stats.items()
                           if value.dim() == 0})  # (Lightning averages floats)
            if self.global_step % self.hparams.grad_every == 0:
                self.log_dict(pixcontrast.gradient_ratio(contrast, ce, features).as_dict("grad/"))
        return ce + contrast

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=1e-4)


def make_trainer(steps: int, output: Path, **options: Any) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=CSVLogger(output),
                     log_every_n_steps=1, enable_checkpointing=False,
                     enable_model_summary=False, **options)


def main(argv: Optional[list[str]] = None) -> tuple[ContrastSegmenter, L.Trainer]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps on tiny data")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--output", type=Path,
                        default=Path(__file__).parent / "output" / "lightning")
    args = parser.parse_args(argv)
    config = digits.Config(**digits.SMOKE) if args.smoke else digits.Config()
    config = replace(config, steps=args.steps)
    data = digits.build_data(config)
    loader = DataLoader(TensorDataset(data["train_images"], data["train_labels"]),
                        batch_size=config.batch_size, shuffle=True, drop_last=True)
    module = ContrastSegmenter(
        config.width, config.proj_dim, config.lr, args.steps, config.contrast_weight,
        config.warmup, config.ramp, max(1, min(config.grad_every, args.steps // 2)),
        config.max_samples, config.max_views,
    )
    trainer = make_trainer(args.steps, args.output)
    trainer.fit(module, loader)
    iou = digits.evaluate(module.model, data["test_images"], data["test_labels"])
    print(f"test mIoU after {args.steps} steps: {100 * float(iou.nanmean()):.2f}; "
          f"logs in {trainer.logger.log_dir}")
    return module, trainer


if __name__ == "__main__":
    main()
