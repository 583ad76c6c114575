"""The examples run end to end: the digits example in its smoke mode, and the quickstart."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import pytest

from _helpers import EXAMPLES, load_example

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")


def test_digits_segmentation_smoke(tmp_path: Path) -> None:
    example = load_example("digits_segmentation")
    result = example.main(["--smoke", "--modes", "ce", "ce+contrast", "ce+contrast-plain",
                           "--output", str(tmp_path)])

    for name in ("digits_results.json", "digits_curves.png", "digits_panels.png",
                 "digits_embeddings.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "digits_results.json").read_text())
    assert saved["summary"] == result["summary"] and saved["workers"] == 2

    config = result["config"]
    modes = config["modes"]
    assert list(modes) == ["ce", "ce+contrast", "ce+contrast-plain"]
    runs = {(r["mode"], r["seed"]): r for r in result["runs"]}
    assert set(runs) == {(m, s) for m in modes for s in config["seeds"]}
    for (mode, seed), run in runs.items():
        for metric in ("miou", "shifted_miou", "probe", "val_miou"):
            assert 0.0 <= run[metric] <= 1.0, metric
        assert set(run["iou"]) == set(example.CLASS_NAMES)
        curve = run["curve"]
        assert len(curve["ce"]) == config["steps"] and all(map(math.isfinite, curve["ce"]))
        assert curve["eval_step"][-1] == config["steps"]
        if mode == "ce":
            assert all(math.isnan(v) for v in curve["contrast"]) and not curve["grad_step"]
            assert run["first_contrast_step"] is None
            continue
        # the term is off (NaN, weight 0) before its first step, then on and positive
        first = run["first_contrast_step"]
        assert first == (1 if mode == "ce+contrast-plain" else 2)
        assert all(math.isnan(v) for v in curve["contrast"][: first - 1])
        assert all(math.isfinite(v) and v > 0.0 for v in curve["contrast"][first - 1 :])
        assert all(w == 0.0 for w in curve["weight"][: first - 1])
        assert curve["weight"][-1] == pytest.approx(config["contrast_weight"])
        assert curve["grad_step"] and all(r > 0 for r in curve["grad_ratio"])
        assert all(-1.0 <= c <= 1.0 for c in curve["grad_cosine"])
        # Same seed, same initialisation and first batch: the modes differ only by the term.
        assert curve["ce"][0] == pytest.approx(runs[("ce", seed)]["curve"]["ce"][0])
    for mode in modes:
        values = [runs[(mode, s)]["miou"] for s in config["seeds"]]
        assert result["summary"][mode]["miou"]["mean"] == pytest.approx(sum(values) / len(values))
        if mode != "ce":
            diffs = result["summary"][mode]["miou"]["paired_diff"]["values"]
            assert diffs == pytest.approx([runs[(mode, s)]["miou"] - runs[("ce", s)]["miou"]
                                           for s in config["seeds"]])


def test_digits_segmentation_in_one_process_matches_the_workers(tmp_path: Path) -> None:
    example = load_example("digits_segmentation")
    options = ["--smoke", "--steps", "3", "--modes", "ce", "ce+contrast", "--no-figures"]
    forked = example.main(options + ["--output", str(tmp_path / "a")])
    inline = example.main(options + ["--workers", "1", "--output", str(tmp_path / "b")])
    for a, b in zip(forked["runs"], inline["runs"]):
        assert (a["mode"], a["seed"]) == (b["mode"], b["seed"])
        assert a["curve"]["ce"] == pytest.approx(b["curve"]["ce"])
        assert a["miou"] == pytest.approx(b["miou"])


def test_digits_segmentation_validation_only_never_evaluates_the_test_split(tmp_path):
    example = load_example("digits_segmentation")
    result = example.main(["--smoke", "--steps", "2", "--validation-only", "--workers", "1",
                           "--modes", "ce", "ce+contrast-bg", "--output", str(tmp_path)])
    for run in result["runs"]:
        assert "miou" not in run and "probe" not in run and 0.0 <= run["val_miou"] <= 1.0
    assert not (tmp_path / "digits_curves.png").exists()


def test_recipe_modes_exclude_the_background_only_from_the_contrast() -> None:
    example = load_example("digits_segmentation")
    config = example.Config(**example.SMOKE)
    assert example.make_criterion("ce+contrast", config).exclude_classes == (example.BACKGROUND,)
    assert example.make_criterion("ce+contrast-plain", config).exclude_classes == ()
    assert example.make_criterion("ce+contrast-bg", config).exclude_classes == ()
    memory = example.make_criterion("ce+contrast+memory", config).memory
    assert memory.exclude_classes == (example.BACKGROUND,)
    schedule = example.make_schedule("ce+contrast", example.Config(steps=100))
    assert (schedule.warmup_steps, schedule.ramp_steps) == (20, 20)
    assert example.make_schedule("ce+contrast-plain", config).active


def test_scenes_are_labelled_from_their_digits() -> None:
    example = load_example("digits_segmentation")
    train, val, test = example.split_digits(seed=0)
    assert len(train["targets"]) + len(val["targets"]) + len(test["targets"]) == 1797
    assert 0.1 < len(val["targets"]) / (len(train["targets"]) + len(val["targets"])) < 0.2
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


def test_compare_runs_pairs_seeds_of_identical_training(tmp_path: Path) -> None:
    example = load_example("digits_segmentation")
    compare = load_example("compare_runs")
    base = example.main(["--smoke", "--steps", "2", "--modes", "ce", "ce+contrast",
                         "--workers", "1", "--no-figures", "--output", str(tmp_path / "a")])
    other = example.main(["--smoke", "--steps", "2", "--modes", "ce+contrast-plain",
                          "--contrast-weight", "0.5", "--workers", "1", "--no-figures",
                          "--output", str(tmp_path / "b")])
    report = compare.main([str(tmp_path / "a" / "digits_results.json"),
                           str(tmp_path / "b" / "digits_results.json")])
    diffs = report[str(tmp_path / "b" / "digits_results.json")]["ce+contrast-plain"]
    by_mode = {r["mode"]: r for r in base["runs"]}
    (plain,) = other["runs"]
    for base_mode in ("ce", "ce+contrast"):
        for metric in ("miou", "shifted_miou", "probe"):
            assert diffs[base_mode][metric] == pytest.approx(
                [plain[metric] - by_mode[base_mode][metric]])
    fewer = example.main(["--smoke", "--steps", "2", "--modes", "ce", "--train-scenes", "32",
                          "--workers", "1", "--no-figures", "--output", str(tmp_path / "c")])
    assert fewer["runs"]
    assert compare.main([str(tmp_path / "a" / "digits_results.json"),
                         str(tmp_path / "c" / "digits_results.json")]) == {}
