"""The recipes for the libraries people train with, against the real packages (small random
configurations, no download): Hugging Face transformers' Segformer and UperNet, and
segmentation_models_pytorch where it imports."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _helpers import load_example


def smp_import_error() -> str:
    try:
        import segmentation_models_pytorch  # noqa: F401
    except Exception as error:  # torchvision built for another torch raises a RuntimeError
        return f"{type(error).__name__}: {error}"
    return ""


@pytest.mark.parametrize("name", ["segformer", "upernet"])
def test_transformers_capture_is_the_classifiers_input(name) -> None:
    pytest.importorskip("transformers")
    example = load_example("transformers_segmentation")
    torch.manual_seed(0)
    model = example.build_model(name, num_labels=4)
    capture, term = example.attach_term(model, name, steps=4)
    model.eval()
    model.decode_head.train()  # features kept (training mode), dropout off (p applies in train)
    if name == "segformer":
        model.decode_head.dropout.p = 0.0
    images = torch.randn(2, 3, 32, 32)
    logits = model(pixel_values=images).logits
    features = capture.take()
    # independent: the classifier applied to the captured feature gives the model's logits
    # (UperNet upsamples them to the input's size, Segformer keeps 1/4)
    expected = model.decode_head.classifier(features)
    if name == "upernet":
        expected = F.interpolate(expected, size=images.shape[-2:], mode="bilinear",
                                 align_corners=False)
    torch.testing.assert_close(expected, logits)
    assert features.shape[1] == term.in_channels
    assert term.loss.ignore_index == 255  # from the model's config


@pytest.mark.parametrize("name", ["segformer", "upernet"])
def test_transformers_example_trains_with_the_models_loss_and_the_term(name) -> None:
    pytest.importorskip("transformers")
    example = load_example("transformers_segmentation")
    log = example.main(["--model", name, "--steps", "3", "--size", "32"])
    # total_steps 3: warm-up round(0.6) = 1 step, ramp round(0.6) = 1 step
    assert [entry["weight"] for entry in log] == pytest.approx([0.0, 0.1, 0.1])
    assert log[0]["term"] == 0.0 and all(entry["term"] > 0 for entry in log[1:])


def test_smp_example() -> None:
    error = smp_import_error()
    if error:
        pytest.skip(f"segmentation_models_pytorch does not import here ({error[:160]})")
    example = load_example("smp_segmentation")
    log = example.main(["--steps", "3", "--size", "32"])
    assert [entry["weight"] for entry in log] == pytest.approx([0.0, 0.1, 0.1])
