"""The digits example's recipe as a LightningModule, logging pixcontrast's diagnostics.

The training step of ``digits_segmentation.py``'s ``ce+contrast`` mode: cross-entropy plus a
scheduled ``PixelContrastLoss`` that leaves the background out, with the loss's ``last_stats``
logged every step the term is on and :func:`pixcontrast.gradient_ratio` at the backbone features
every ``grad_every`` steps. The weight schedule is saved in and restored from Lightning
checkpoints, so a resumed run continues its warm-up where it stopped.

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
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits_segmentation as digits  # noqa: E402

import pixcontrast  # noqa: E402


class ContrastSegmenter(L.LightningModule):
    """Segmentation network trained with cross-entropy + a scheduled pixel contrast term.

    Args:
        width, proj_dim: of :class:`digits_segmentation.SegNet`.
        lr: AdamW learning rate.
        contrast_weight, warmup_steps, ramp_steps: of the
            :class:`pixcontrast.ContrastWeightSchedule`.
        grad_every: steps between :func:`pixcontrast.gradient_ratio` measurements.
        max_samples, max_views: of the anchor sampler.
    """

    def __init__(self, width: int = 16, proj_dim: int = 32, lr: float = 1e-2,
                 contrast_weight: float = 0.1, warmup_steps: int = 120, ramp_steps: int = 120,
                 grad_every: int = 20, max_samples: int = 1024, max_views: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = digits.SegNet(width, proj_dim)
        self.criterion = pixcontrast.PixelContrastLoss(
            temperature=0.1, max_samples=max_samples, max_views=max_views,
            ignore_index=digits.IGNORE_INDEX, num_classes=digits.NUM_CLASSES, normalize=False,
            exclude_classes=(digits.BACKGROUND,),  # the catch-all class stays in the CE only
        )
        self.schedule = pixcontrast.ContrastWeightSchedule(contrast_weight, warmup_steps,
                                                           ramp_steps)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_index: int) -> Tensor:
        images, labels = batch
        features, logits, embeddings = self.model(images)
        ce = F.cross_entropy(digits.upsample(logits, images.shape[-2:]), labels,
                             ignore_index=digits.IGNORE_INDEX)
        weight = self.schedule.value
        loss = ce
        self.log("train/ce", ce, prog_bar=True)
        self.log("train/contrast_weight", weight)
        if self.schedule.active:  # during the warm-up the term is skipped (and costs nothing)
            contrast = self.criterion(embeddings, labels, predictions=logits)
            loss = ce + weight * contrast
            stats = self.criterion.last_stats  # detached tensors: logging them costs no graph
            self.log_dict({f"contrast/{name}": value.float() for name, value in stats.items()
                           if value.dim() == 0})  # (Lightning averages floats)
            if self.global_step % self.hparams.grad_every == 0:
                ratio = pixcontrast.gradient_ratio(weight * contrast, ce, features)
                self.log_dict(ratio.as_dict("grad/"))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_index: int) -> None:
        self.schedule.step()  # once per optimiser step (no gradient accumulation here)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["contrast_schedule"] = self.schedule.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.schedule.load_state_dict(checkpoint["contrast_schedule"])

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
    warmup = int(round(config.warmup * args.steps))
    module = ContrastSegmenter(
        config.width, config.proj_dim, config.lr, config.contrast_weight, warmup,
        int(round(config.ramp * args.steps)), max(1, min(config.grad_every, args.steps // 2)),
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
