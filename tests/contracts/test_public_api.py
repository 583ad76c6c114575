"""The public surface, frozen: ``pixcontrast.__all__``, the signature of each of its callables,
and one public home per name. A change here is a change of the API: update the lists on purpose."""

from __future__ import annotations

import importlib
import inspect

import pixcontrast

PUBLIC = [
    "ClassMemoryBank",
    "ConfidenceAnchorSampler",
    "ContrastTerm",
    "ContrastWeightSchedule",
    "FeatureCapture",
    "HardAnchorSampler",
    "KeyMiner",
    "MinedContrastLoss",
    "PixelContrastLoss",
    "ProjectionHead",
    "RandomAnchorSampler",
    "RegionContrastLoss",
    "__version__",
    "contrastive_loss",
    "gradient_ratio",
]

SIGNATURES = {
    "ClassMemoryBank": (
        "(num_classes: 'int', dim: 'int', *, pixels_per_class: 'int' = 5000, regions_per_class: "
        "'int' = 5000, pixels_per_image: 'int' = 10, ignore_index: 'int' = 255, gather: 'bool' = "
        "True, exclude_classes: 'Sequence[int]' = ()) -> 'None'"
    ),
    "ConfidenceAnchorSampler": (
        "(max_views: 'int' = 100, threshold: 'float' = 0.97) -> 'None'"
    ),
    "ContrastTerm": (
        "(*, in_channels: 'int', num_classes: 'int', total_steps: 'int', weight: 'float' = 0.1, "
        "warmup: 'float' = 0.2, ramp: 'float' = 0.2, proj_dim: 'int' = 256, head: 'str' = "
        "'convmlp', temperature: 'float' = 0.1, ignore_index: 'int' = 255, exclude_classes: "
        "'Sequence[int]' = (), max_samples: 'int' = 1024, max_views: 'int' = 64, memory: "
        "'Optional[ClassMemoryBank]' = None, gather: 'bool' = False) -> 'None'"
    ),
    "ContrastWeightSchedule": (
        "(weight: 'float', warmup_steps: 'int' = 0, ramp_steps: 'int' = 0) -> 'None'"
    ),
    "FeatureCapture": (
        "(model: 'nn.Module', name: 'str', *, site: 'str' = 'output', index: 'Optional[int]' = "
        "None) -> 'None'"
    ),
    "HardAnchorSampler": (
        "(max_samples: 'int' = 1024, max_views: 'int' = 100, min_pixels: 'int' = 1, "
        "hard_fraction: 'float' = 0.5, num_classes: 'Optional[int]' = None) -> 'None'"
    ),
    "KeyMiner": (
        "(miner: 'str' = 'hardest', *, num_positives: 'int', num_negatives: 'int', fraction: "
        "'float' = 0.1, class_temperature: 'float' = 0.5) -> 'None'"
    ),
    "MinedContrastLoss": (
        "(miner: 'str' = 'hardest', *, num_positives: 'int', num_negatives: 'int', fraction: "
        "'float' = 0.1, class_temperature: 'float' = 0.5, temperature: 'float' = 0.1, "
        "base_temperature: 'Optional[float]' = None, variant: 'str' = 'paper', reduction: 'str' ="
        " 'mean') -> 'None'"
    ),
    "PixelContrastLoss": (
        "(temperature: 'float' = 0.1, *, use_pixel_memory: 'bool' = True, use_region_memory: "
        "'bool' = True, base_temperature: 'Optional[float]' = None, variant: 'str' = 'paper', "
        "ignore_index: 'int' = 255, normalize: 'bool' = True, backend: 'str' = 'auto', sampler: "
        "'Optional[AnchorSampler]' = None, max_samples: 'Optional[int]' = None, max_views: "
        "'Optional[int]' = None, num_classes: 'Optional[int]' = None, memory: "
        "'Optional[ClassMemoryBank]' = None, miner: 'Optional[Miner]' = None, enqueue: 'bool' = "
        "True, gather: 'bool' = False, exclude_classes: 'Sequence[int]' = ()) -> 'None'"
    ),
    "ProjectionHead": (
        "(in_channels: 'int', proj_dim: 'int' = 256, kind: 'str' = 'convmlp') -> 'None'"
    ),
    "RandomAnchorSampler": (
        "(max_samples: 'int' = 1024, max_views: 'int' = 100, num_classes: 'Optional[int]' = None)"
        " -> 'None'"
    ),
    "RegionContrastLoss": (
        "(temperature: 'float' = 0.1, *, use_batch_regions: 'bool' = True, base_temperature: "
        "'Optional[float]' = None, variant: 'str' = 'paper', ignore_index: 'int' = 255, "
        "normalize: 'bool' = True, backend: 'str' = 'auto', sampler: 'Optional[AnchorSampler]' = "
        "None, max_samples: 'Optional[int]' = None, max_views: 'Optional[int]' = None, "
        "num_classes: 'Optional[int]' = None, memory: 'Optional[ClassMemoryBank]' = None, miner: "
        "'Optional[Miner]' = None, enqueue: 'bool' = True, gather: 'bool' = False, "
        "exclude_classes: 'Sequence[int]' = ()) -> 'None'"
    ),
    "contrastive_loss": (
        "(anchors: 'Tensor', labels: 'Tensor', keys: 'Union[Tensor, Sequence[Tensor], None]' = "
        "None, key_labels: 'Union[Tensor, Sequence[Tensor], None]' = None, *, in_batch: "
        "'Optional[bool]' = None, temperature: 'float' = 0.1, base_temperature: 'Optional[float]'"
        " = None, variant: 'str' = 'paper', reduction: 'str' = 'mean', backend: 'str' = 'auto') "
        "-> 'Tensor'"
    ),
    "gradient_ratio": (
        "(contrast_loss: 'Tensor', other_loss: 'Tensor', tensor: 'Tensor') -> 'GradientRatio'"
    ),
}

# the public modules of building blocks (the top level re-exports some of their names)
MODULES = [
    "backends", "capture", "diagnostics", "distributed", "functional", "heads", "losses",
    "memory", "mining", "samplers", "schedule", "term",
]


def test_all_is_frozen():
    assert pixcontrast.__all__ == PUBLIC


def test_signatures_are_frozen():
    got = {
        name: str(inspect.signature(getattr(pixcontrast, name)))
        for name in pixcontrast.__all__ if callable(getattr(pixcontrast, name))
    }
    assert got == SIGNATURES


def test_every_public_name_has_one_home():
    homes: dict[str, list[str]] = {}
    for module in MODULES:
        for name in importlib.import_module(f"pixcontrast.{module}").__all__:
            homes.setdefault(name, []).append(module)
    shared = {name: where for name, where in homes.items() if len(where) > 1}
    assert shared == {}
    assert set(pixcontrast.__all__) - {"__version__"} <= set(homes)


def test_loss_options_are_keyword_only():
    for name in ("PixelContrastLoss", "RegionContrastLoss", "ClassMemoryBank"):
        parameters = list(inspect.signature(getattr(pixcontrast, name)).parameters.values())
        positional = [p.name for p in parameters if p.kind is not p.KEYWORD_ONLY]
        assert len(positional) <= 2, (name, positional)
        assert all(p.kind is not p.VAR_KEYWORD for p in parameters), name
