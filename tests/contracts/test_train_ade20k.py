"""The ADE20K reproduction script runs end to end, in one process and under torchrun with two,
on a tiny dataset in the ADE20K folder layout written here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

from _helpers import EXAMPLES, load_example, torchrun  # noqa: E402

TINY = ["--tiny", "--steps", "2", "--crop", "32", "--batch-size", "2", "--seeds", "0",
        "--workers", "0", "--proj-dim", "8"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 training and 2 validation pairs: JPEG images, PNG annotations in 0..150."""
    root = tmp_path_factory.mktemp("ade") / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    for split, count in (("training", 4), ("validation", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for index in range(count):
            stem = f"ADE_{split[:5]}_{index:08d}"
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / split / f"{stem}.jpg")
            blocks = rng.integers(0, 6, (5, 6)).astype(np.uint8)  # 0 ("other") and 1..5
            blocks[0, 0] = 150
            annotation = np.kron(blocks, np.ones((8, 8), dtype=np.uint8))
            Image.fromarray(annotation).save(root / "annotations" / split / f"{stem}.png")
    return root


def check_result(result: dict, processes: int) -> None:
    assert [(run["arm"], run["seed"]) for run in result["runs"]] == \
        [("ce", 0), ("ce+contrast", 0)]
    for run in result["runs"]:
        assert run["steps"] == 2 and run["processes"] == processes
        assert 0 <= run["miou"] <= 100 and run["seconds_per_step"] > 0
    summary = result["summary"]
    ce, contrast = (run["miou"] for run in result["runs"])
    assert summary["paired_difference"]["values"] == pytest.approx([contrast - ce])
    assert summary["ce"]["miou"]["std"] == 0.0 and math.isfinite(summary["ce"]["miou"]["mean"])


def test_labels_are_reduced_as_hugging_face_does() -> None:
    example = load_example("train_ade20k")
    annotation = np.array([[0, 1, 2], [150, 0, 75]], dtype=np.uint8)
    # do_reduce_labels: 0 -> 255, every other label - 1
    expected = np.where(annotation == 0, 255, annotation.astype(np.int64) - 1)
    np.testing.assert_array_equal(example.reduce_labels(annotation), expected)


def test_one_process(dataset: Path, tmp_path: Path) -> None:
    example = load_example("train_ade20k")
    output = tmp_path / "result.json"
    result = example.main(["--data", str(dataset), *TINY, "--output", str(output)])
    check_result(result, processes=1)
    assert json.loads(output.read_text()) == json.loads(json.dumps(result))


def test_two_processes_under_torchrun(dataset: Path, tmp_path: Path) -> None:
    output = tmp_path / "result.json"
    run = torchrun(
        [str(EXAMPLES / "train_ade20k.py"), "--data", str(dataset), *TINY, "--output", str(output)],
        2, cwd=tmp_path, scratch=tmp_path,
    )
    run.assert_clean_exit()
    check_result(json.loads(output.read_text()), processes=2)


def test_miou_is_the_plain_count_over_classes_present(dataset: Path) -> None:
    example = load_example("train_ade20k")
    config = example.Config(data=str(dataset), crop=32)
    data = example.ADE20KFolder(dataset, "validation", 32, train=False)
    torch = pytest.importorskip("torch")

    class Fixed(torch.nn.Module):
        """Predicts class (row // 8) % 4 at 1/4 resolution, whatever the image."""

        def forward(self, pixel_values):
            height, width = pixel_values.shape[-2:]
            rows = torch.arange(height // 4)[:, None].expand(height // 4, width // 4)
            classes = (rows * 4 // 8) % 4
            logits = torch.nn.functional.one_hot(classes, 150).permute(2, 0, 1)[None].float()
            return type("Outputs", (), {"logits": logits})

    iou = example.evaluate(Fixed(), config, torch.device("cpu"))

    # a plain loop over pixels, with the prediction upsampled the same way
    hits, predicted_count, label_count = {}, {}, {}
    for index in range(len(data)):
        image, labels = data[index]
        logits = Fixed()(image[None]).logits
        logits = torch.nn.functional.interpolate(logits, size=labels.shape, mode="bilinear",
                                                 align_corners=False)
        predicted = logits.argmax(1)[0]
        for truth, guess in zip(labels.flatten().tolist(), predicted.flatten().tolist()):
            if truth == 255:
                continue
            label_count[truth] = label_count.get(truth, 0) + 1
            predicted_count[guess] = predicted_count.get(guess, 0) + 1
            hits[truth] = hits.get(truth, 0) + (truth == guess)
    for c in range(150):
        union = label_count.get(c, 0) + predicted_count.get(c, 0) - hits.get(c, 0)
        if union == 0:
            assert math.isnan(iou[c])
        else:
            assert iou[c] == pytest.approx(hits.get(c, 0) / union)
