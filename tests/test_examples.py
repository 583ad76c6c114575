"""The examples run end to end: the digits example in its smoke mode, and the quickstart."""

from __future__ import annotations

import importlib.util
import json
import math
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_digits_segmentation_smoke(tmp_path: Path) -> None:
    example = load_example("digits_segmentation")
    result = example.main(["--smoke", "--output", str(tmp_path)])

    for name in ("digits_results.json", "digits_curves.png", "digits_embeddings.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "digits_results.json").read_text())["summary"] == (
        result["summary"]
    )

    config = result["config"]
    modes = config["modes"]
    assert list(modes[:2]) == ["ce", "ce+contrast"]
    runs = {(r["mode"], r["seed"]): r for r in result["runs"]}
    assert set(runs) == {(m, s) for m in modes for s in config["seeds"]}
    for (mode, seed), run in runs.items():
        assert 0.0 <= run["miou"] <= 1.0
        assert len(run["curve"]["ce"]) == config["steps"]
        assert all(math.isfinite(v) for v in run["curve"]["ce"])
        if mode == "ce":
            assert all(v == 0.0 for v in run["curve"]["contrast"])
            assert run["first_contrast_step"] is None
        else:
            # the term is off (NaN in the curve) during the warm-up, then on and positive
            first = run["first_contrast_step"]
            assert 1 < first <= config["steps"]
            contrast = run["curve"]["contrast"]
            assert all(math.isnan(v) for v in contrast[: first - 1])
            assert all(math.isfinite(v) and v > 0.0 for v in contrast[first - 1 :])
            # Same seed, same initialisation and first batch: the modes differ only by the term.
            assert run["curve"]["ce"][0] == pytest.approx(runs[("ce", seed)]["curve"]["ce"][0])
    for mode in modes:
        values = [runs[(mode, s)]["miou"] for s in config["seeds"]]
        assert result["summary"][mode]["mean"] == pytest.approx(sum(values) / len(values))


def test_digits_segmentation_without_warmup(tmp_path: Path) -> None:
    example = load_example("digits_segmentation")
    result = example.main(["--smoke", "--steps", "2", "--contrast-warmup", "0",
                           "--output", str(tmp_path)])
    for run in result["runs"]:
        if run["mode"] != "ce":
            assert run["first_contrast_step"] == 1
            assert all(math.isfinite(v) and v > 0.0 for v in run["curve"]["contrast"])


def test_scenes_are_labelled_from_their_digits() -> None:
    example = load_example("digits_segmentation")
    train, test = example.split_digits(seed=0)
    assert len(train["targets"]) + len(test["targets"]) == 1797
    images, labels = example.compose_scenes(test, 4, 48, example.np.random.default_rng(0))
    assert images.shape == (4, 1, 48, 48) and labels.shape == (4, 48, 48)
    values = set(labels.unique().tolist())
    assert example.BACKGROUND in values and example.IGNORE_INDEX in values
    assert values - {example.BACKGROUND, example.IGNORE_INDEX} <= set(test["targets"].tolist())
    assert values & set(range(10))


def test_iou_from_confusion_matrix() -> None:
    example = load_example("digits_segmentation")
    torch = example.torch
    target = torch.tensor([[0, 0, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 3]])
    iou = example.iou_per_class(example.confusion(pred, target))
    assert iou[0].item() == pytest.approx(1 / 2)  # 1 hit; union {pixel 0, pixel 1}
    assert iou[1].item() == pytest.approx(1 / 2)
    assert math.isnan(iou[5].item())  # never present nor predicted


def test_quickstart(capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    assert capsys.readouterr().out.startswith("loss ")
