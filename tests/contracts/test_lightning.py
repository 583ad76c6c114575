"""The LightningModule version of the digits recipe trains a few steps, logs the diagnostics and
resumes its weight schedule from a checkpoint."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

L = pytest.importorskip("lightning")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from _helpers import load_example  # noqa: E402


def logged(trainer) -> list[dict[str, str]]:
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def small_loader(seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(16, 1, 24, 24, generator=g)
    labels = torch.randint(0, 11, (16, 24, 24), generator=g)
    return DataLoader(TensorDataset(images, labels), batch_size=4)


def test_training_step_logs_the_diagnostics_after_the_warmup(tmp_path: Path) -> None:
    example = load_example("lightning_digits")
    torch.manual_seed(0)
    module = example.ContrastSegmenter(width=4, proj_dim=8, total_steps=10, warmup=0.2, ramp=0.2,
                                       grad_every=1, max_samples=64, max_views=8)
    trainer = example.make_trainer(4, tmp_path)
    trainer.fit(module, small_loader())

    rows = logged(trainer)
    assert len(rows) == 4 and [float(r["train/contrast_weight"]) for r in rows] == \
        pytest.approx([0.0, 0.0, 0.05, 0.1])
    for row in rows[:2]:  # warm-up: no contrast statistics
        assert row["contrast/anchors"] == "" and row["grad/ratio"] == ""
    for row in rows[2:]:
        assert 0 < float(row["contrast/anchors"]) <= 64
        assert float(row["contrast/anchors"]) == pytest.approx(
            float(row["contrast/hard_anchors"]) + float(row["contrast/easy_anchors"]))
        assert math.isfinite(float(row["contrast/loss"])) and float(row["contrast/loss"]) > 0
        assert float(row["grad/contrast_norm"]) > 0 and float(row["grad/other_norm"]) > 0
        assert float(row["grad/ratio"]) == pytest.approx(
            float(row["grad/contrast_norm"]) / float(row["grad/other_norm"]), rel=1e-5)
    # background (10) is left out: no anchor of it in the last call
    assert not (module.term.loss.last_sample.labels == 10).any()
    assert module.term.schedule.step_count == 4


def test_checkpoint_resumes_the_schedule(tmp_path: Path) -> None:
    example = load_example("lightning_digits")
    module = example.ContrastSegmenter(width=4, proj_dim=8, total_steps=10, warmup=0.3, ramp=0.4,
                                       max_samples=32, max_views=4)
    trainer = example.make_trainer(3, tmp_path / "first")
    trainer.fit(module, small_loader())
    path = tmp_path / "three.ckpt"
    trainer.save_checkpoint(path)

    resumed = example.ContrastSegmenter(width=4, proj_dim=8, total_steps=10, warmup=0.3,
                                        ramp=0.4, max_samples=32, max_views=4)
    trainer = example.make_trainer(5, tmp_path / "second")
    trainer.fit(resumed, small_loader(), ckpt_path=path)
    assert resumed.term.schedule.step_count == 5 == trainer.global_step
    rows = logged(trainer)
    assert [float(r["train/contrast_weight"]) for r in rows] == pytest.approx([0.025, 0.05])


def test_lightning_example_smoke(tmp_path: Path) -> None:
    example = load_example("lightning_digits")
    module, trainer = example.main(["--smoke", "--steps", "3", "--output", str(tmp_path)])
    assert trainer.global_step == 3 and module.term.schedule.step_count == 3
