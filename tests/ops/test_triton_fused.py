"""The Triton backend: the launch plan, the launch path's freedom from host syncs, the kernels
against the dense reference, and compilation for real GPUs (the dispatcher's rules are in
test_dispatch.py).

On CPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py): keep the sizes small. The
plan tests need no Triton.
"""

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import pytest
import torch

import pixcontrast
from pixcontrast.ops import check_contrast_inputs, torch_fused, triton_fused
from pixcontrast.ops._autograd import apply_contrast
from pixcontrast.ops._layout import build_layout
from pixcontrast.ops._options import ContrastOptions

from _helpers import assert_close_to_oracle, contrast_floors
from triton_compile import CONFIGURATIONS

TOOLS = Path(__file__).resolve().parents[2] / "tools"
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
needs_kernels = pytest.mark.skipif(
    not HAS_TRITON or (DEVICE == "cpu" and not INTERPRETED),
    reason="the kernels need Triton, and CUDA or TRITON_INTERPRET=1",
)
# The interpreter runs numpy on every lane, and numpy warns about values the kernels produce on
# purpose: exp of an excluded self score overflowing to inf, log(0) = -inf for an empty set, and
# 0 * inf in lanes that `where` then drops.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


@pytest.fixture
def tf32_allowed():
    """The Triton backend takes fp32 only when TF32 is allowed; the references then run at the
    same setting (it changes nothing on CPU)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(previous)


# ------------------------------------------------------------------ launch plan (no Triton needed)


@pytest.mark.parametrize("m", [40_000, 190_000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("capability", [(9, 0), (8, 0), (8, 9)])
def test_paper_shape_fills_the_gpu(m, dtype, capability):
    classes = 19  # the anchors' classes (Cityscapes), evenly split; the keys likewise
    offsets = tuple([count * c // classes for c in range(classes + 1)] for count in (1024, m))
    plan = triton_fused.launch_plan(
        1024, m, 256, dtype, 132, capability=capability, class_offsets=offsets
    )
    for name in ["statistics", "positive", "anchor_grad", "key_grad"]:
        step = plan[name]
        assert step.programs >= 132, (name, step)
        tiles = triton_fused.tile_config(capability, dtype, 256)
        assert step.num_warps in (tiles.num_warps, tiles.key_warps)
    statistics = plan["statistics"]
    assert statistics.splits > 1
    tiles_per_split = (m // statistics.block_cols) // statistics.splits
    assert tiles_per_split >= triton_fused._MIN_TILES_PER_SPLIT


def test_older_triton_releases_take_their_own_tiles():
    """A Triton release before an override's version takes the override (found not to spill
    under it); that version and later ones take the common tiles; the default is the installed
    release."""
    capabilities = {"sm90": (9, 0), "sm80": (8, 0), "sm86": (8, 6)}
    for (first, family, size, dim), tiles in triton_fused.TILE_OVERRIDES.items():
        args = (capabilities[family], torch.float32 if size == 4 else torch.float16, dim)
        assert triton_fused.tile_config(*args, (first[0], first[1] - 1)) == tiles
        assert triton_fused.tile_config(*args, first) != tiles
        assert triton_fused.tile_config(*args) == triton_fused.tile_config(
            *args, triton_fused.triton_version()
        )


def test_no_split_when_row_tiles_fill_the_gpu():
    plan = triton_fused.launch_plan(64 * 132, 40_000, 128, torch.float16, 132, capability=(8, 0))
    assert plan["statistics"].splits == 1
    assert plan["statistics"].grid == (132, 1)


def test_splits_keep_enough_key_tiles():
    plan = triton_fused.launch_plan(1024, 1000, 128, torch.float16, 132, capability=(8, 0))
    # 16 key tiles of 64: at most 4 splits of >= 4 tiles, though that leaves SMs idle.
    assert plan["statistics"].splits == 4


def test_positive_tiles_hold_one_class_each():
    """Each row tile of paper's positive kernel holds rows of one class and visits only that
    class's key block; every anchor is in exactly one tile (classes 1 and 3 have no anchors,
    class 2 no key)."""
    anchor_offsets, key_offsets = [0, 5, 5, 9, 9, 30], [0, 40, 50, 50, 70, 71]
    tiles = triton_fused.positive_tiles(anchor_offsets, key_offsets, 8)
    assert tiles == [(0, 5, 0, 40), (5, 9, 50, 50), (9, 17, 70, 71), (17, 25, 70, 71),
                     (25, 30, 70, 71)]
    rows = [r for start, stop, _, _ in tiles for r in range(start, stop)]
    assert rows == list(range(30))


@pytest.mark.parametrize("sm_count", [1, 7, 46, 108, 132, 170])
@pytest.mark.parametrize("row_tiles", [1, 5, 16])
def test_split_choice_fills_a_wave_with_little_waste(sm_count, row_tiles):
    splits = triton_fused.choose_splits(row_tiles, 10_000, sm_count)
    if row_tiles >= sm_count:
        assert splits == 1
        return
    programs = row_tiles * splits
    waves = -(-programs // sm_count)
    assert programs >= sm_count
    assert programs / (waves * sm_count) >= 0.9


# ------------------------------------------------- the launch path reads no device value on host


@pytest.mark.skipif(not HAS_TRITON, reason="records launches of the Triton kernels")
@pytest.mark.parametrize("variant", ["paper", "supcon"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_launch_path_performs_no_host_sync(variant, reduction):
    """The whole launch path on meta tensors, which hold no values: a host sync (``.item()``,
    ``.tolist()``, a data-dependent shape) would raise. The launches follow the plan."""
    import triton_compile

    target = triton_fused.Target((9, 0), 132)
    launches = triton_compile.step_launches(target, torch.bfloat16, 256, variant, reduction)
    plan = triton_fused.launch_plan(
        1024, 190_000, 256, torch.bfloat16, 132, interpreted=INTERPRETED
    )
    names = [launch.kernel.fn.__name__ for launch in launches]
    expected = {"contrast_statistics_kernel", "combine_statistics_kernel",
                "contrast_key_grad_kernel"}
    expected |= {"paper_positive_kernel"} if variant == "paper" else set()
    if reduction == "none":
        expected |= {"contrast_anchor_grad_kernel", "sum_splits_kernel"}
    assert expected <= set(names)
    # the meta layout's classes: 19 even blocks of anchors, each a positive tile or two
    layout = triton_compile.meta_layout(1024, 190_000, 256, in_batch=False)
    class_tiles = triton_fused.positive_tiles(
        layout.anchor_offsets, layout.segments[0].offsets, plan["positive"].block_rows
    )
    for launch in launches:
        step = next((s for s in plan.values() if s.kernel == launch.kernel.fn.__name__), None)
        if step is not None and step.kernel != "sum_splits_kernel":
            assert launch.meta["num_warps"] == step.num_warps
            if step.kernel == "paper_positive_kernel":  # over the class tiles
                assert launch.grid[0] == len(class_tiles)
            elif step.kernel != "contrast_key_grad_kernel":  # its grid may come from a table
                assert launch.grid == step.grid, (step, launch.grid)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA's sync debug mode")
@pytest.mark.parametrize("variant", ["paper", "supcon"])
def test_cuda_launch_path_performs_no_host_sync(variant):
    """On a GPU: one sweep (forward and gradients, keys in bf16) under the sync debug mode's
    "error" setting; the layout, which synchronises today, is built before."""
    case = Case(variant, 300, 2000, 64, True, "mean", torch.bfloat16)
    anchors, labels, keys, key_labels = _inputs(case)
    layout = build_layout(anchors, labels, (keys,), key_labels, in_batch=True)
    weight = torch.rand(case.n, device=DEVICE)
    options = ContrastOptions(case.temperature, 1.0, variant, case.reduction)
    args = (layout, options, weight, True, (True, False))
    triton_fused.sweep(*args, operand_dtype=torch.bfloat16)  # compiles outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        triton_fused.sweep(*args, operand_dtype=torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------ kernels against the dense reference


class Case(NamedTuple):
    variant: str
    n: int
    m: int  # keys besides the anchors (0: none)
    dim: int
    in_batch: bool
    reduction: str
    dtype: torch.dtype = torch.float32
    scale: float = 1.0  # norm of the embeddings: not only unit vectors
    temperature: float = 0.1
    splits: Optional[int] = None  # None: the plan's


CASES = [
    Case("paper", 37, 0, 40, True, "mean"),
    Case("paper", 100, 300, 16, False, "none", scale=3.0, temperature=0.05, splits=7),
    Case("paper", 37, 65, 40, True, "sum", torch.float16, splits=2),
    Case("paper", 37, 1, 16, False, "none"),
    Case("paper", 1, 65, 40, True, "mean", splits=2),
    Case("supcon", 130, 0, 16, True, "none", scale=2.0, splits=2),
    Case("supcon", 37, 65, 40, False, "mean", torch.float16, splits=7),
    Case("supcon", 100, 300, 40, True, "sum", temperature=0.5),
    Case("supcon", 1, 1, 16, False, "none"),
    Case("supcon", 1, 0, 40, True, "mean"),  # no key at all once the self pair is excluded
    Case("paper", 130, 1, 16, True, "none", torch.float16),
    Case("paper", 130, 65, 40, True, "mean", torch.bfloat16),
    Case("supcon", 130, 65, 40, True, "none", torch.bfloat16, splits=7),
]
# Every split count, each on both the streaming (scalar) and recomputing ("none") paths.
_SPLITS = [
    ("paper", 1, True, "mean"), ("supcon", 2, False, "none"), ("paper", 7, True, "none"),
    ("supcon", 7, True, "mean"), ("paper", 16, False, "mean"), ("supcon", 16, True, "none"),
]
# 40 anchors (two row tiles) and enough keys for 16 splits of whole tiles (32 wide in the
# interpreter, up to 64 on GPUs).
_SPLIT_KEYS = 640 if INTERPRETED else 1300
SPLIT_CASES = [
    Case(variant, 40, _SPLIT_KEYS, 24, in_batch, reduction, splits=splits)
    for variant, splits, in_batch, reduction in _SPLITS
]
# The interpreter's time goes with the programs (row tiles x splits), so by default it takes 27
# anchors (one ragged row tile; CASES has splits over several row tiles) and, once the invalid
# keys are dropped, two key tiles more than splits, the last one ragged (88, 120, 280, 280, 568
# and 568 layout keys: every split gets one whole tile or more); the cases above are slow there.
_SMALL_SPLIT_CASES = [
    Case(variant, 27, keys, 24, in_batch, reduction, splits=splits)
    for (variant, splits, in_batch, reduction), keys in zip(_SPLITS, [67, 143, 299, 299, 685, 653])
]
SPLIT_PARAMS = (
    _SMALL_SPLIT_CASES + [pytest.param(case, marks=pytest.mark.slow) for case in SPLIT_CASES]
    if INTERPRETED else SPLIT_CASES
)


def _inputs(case: Case, seed: int = 0):
    """Anchors of 4 classes in uneven proportions, keys of 5 (one absent from the anchors) with
    some invalid (-1), so that class blocks straddle the tiles and some rows lack negatives."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(case.n, case.dim, generator=generator)
    x = case.scale * torch.nn.functional.normalize(x, dim=1)
    labels = torch.randint(0, 4, (case.n,), generator=generator) ** 2 % 5
    keys = key_labels = None
    if case.m:
        keys = torch.randn(case.m, case.dim, generator=generator)
        keys = case.scale * torch.nn.functional.normalize(keys, dim=1)
        key_labels = torch.randint(-1, 5, (case.m,), generator=generator)

    def to_device(t: Optional[torch.Tensor], dtype=None):
        return None if t is None else t.to(device=DEVICE, dtype=dtype or t.dtype)

    return (
        to_device(x, case.dtype), to_device(labels), to_device(keys, case.dtype),
        to_device(key_labels),
    )


def _loss_and_grads(case: Case, backend: str, anchors, labels, keys, key_labels):
    """Loss, d anchors and d keys under a non-unit upstream gradient."""
    x = anchors.detach().requires_grad_()
    k = None if keys is None else keys.detach().requires_grad_()
    options = dict(in_batch=case.in_batch, temperature=case.temperature, variant=case.variant,
                   reduction=case.reduction)
    if backend == "triton" and case.splits is None:  # the public entry point, planned splits
        loss = pixcontrast.contrastive_loss(
            x, labels, k, key_labels, base_temperature=0.07, backend="triton", **options
        )
    elif backend == "triton":
        sweep = functools.partial(
            triton_fused.sweep, operand_dtype=case.dtype, num_splits=case.splits
        )
        contrast = ContrastOptions(
            case.temperature, case.temperature / 0.07, case.variant, case.reduction
        )
        inputs = check_contrast_inputs(x, labels, k, key_labels, case.in_batch)
        loss = apply_contrast(inputs, contrast, sweep=sweep)
    else:
        loss = pixcontrast.contrastive_loss(
            x, labels, k, key_labels, base_temperature=0.07, backend=backend, **options
        )
    upstream = torch.linspace(-1.0, 2.0, loss.numel(), device=loss.device).reshape(loss.shape)
    if loss.ndim == 0:
        upstream = torch.tensor(1.7, device=loss.device)
    inputs = [x] if k is None else [x, k]
    grads = torch.autograd.grad(loss, inputs, upstream)
    return [loss.detach().double(), *(g.double() for g in grads)]


def _assert_close(actual, fp32_reference, oracle, operand_dtype, max_score, what):
    """The shared rule of ``_helpers.assert_close_to_oracle`` with a floor from the magnitudes of
    the summed terms: half-precision operands of the gradient products round to the operand
    dtype, and an fp32 score of size |s| is off by eps * |s|, and so is every exponential."""
    magnitude = oracle.abs().max().item() + 1.0 if oracle.numel() else 1.0
    epsilon = torch.finfo(operand_dtype).eps + torch.finfo(torch.float32).eps * max_score
    assert_close_to_oracle(
        actual, oracle, fp32_reference, 4 * epsilon * magnitude, multiple=4, what=what
    )


def _growing_inputs(case: Case, seed: int = 0):
    """Keys grouped by class (a memory bank's order, kept by the layout) whose norms grow tenfold
    along the key order, up to ``case.scale``: every row's maximum grows from key tile to key
    tile, by far more than the lazy rescale's threshold at small temperatures."""
    x, labels, _, _ = _inputs(case._replace(m=0), seed)
    generator = torch.Generator().manual_seed(seed + 1)
    norms = case.scale * torch.linspace(0.1, 1.0, case.m)[:, None]
    keys = norms * torch.nn.functional.normalize(torch.randn(case.m, case.dim, generator=generator))
    key_labels = torch.arange(case.m) * 5 // case.m
    return x, labels, keys.to(DEVICE, case.dtype), key_labels.to(DEVICE)


def _check_against_reference(case: Case, inputs=None):
    if case.dtype == torch.bfloat16 and INTERPRETED:
        pytest.skip("the Triton interpreter has no bfloat16")
    inputs = inputs or _inputs(case)
    # Oracle: the dense reference in fp64 on the very same (possibly half-precision) values.
    as_fp64 = [t.double() if t is not None and t.is_floating_point() else t for t in inputs]
    oracle = _loss_and_grads(case, "reference", *as_fp64)
    fp32_reference = _loss_and_grads(case, "reference", *inputs)
    triton_result = _loss_and_grads(case, "triton", *inputs)
    # |s| <= |x| |k| / tau (Cauchy-Schwarz), over anchors and keys.
    norms = torch.cat([t.norm(dim=1) for t in (as_fp64[0], as_fp64[2]) if t is not None])
    max_score = (as_fp64[0].norm(dim=1).max() * norms.max()).item() / case.temperature
    for name, got, want, baseline in zip(
        ["loss", "d anchors", "d keys"], triton_result, oracle, fp32_reference
    ):
        assert got.shape == want.shape, name
        _assert_close(got, baseline, want, case.dtype, max_score, name)


def _case_id(case: Case) -> str:
    return "-".join(map(str, case)).replace("torch.", "")


@needs_kernels
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_loss_and_gradients_match_reference(case, tf32_allowed):
    _check_against_reference(case)


# Row maxima that grow across key tiles (lazy rescaling), non-normalised, tau in [0.01, 1]; one
# ragged row tile and six key tiles each.
RESCALE_CASES = [
    Case("paper", 27, 180, 16, False, "mean", scale=3.0, temperature=0.01),
    Case("supcon", 27, 180, 16, True, "none", scale=3.0, temperature=0.01, splits=2),
    Case("paper", 27, 180, 16, True, "none", torch.float16, scale=2.0, temperature=1.0),
    Case("supcon", 27, 180, 16, False, "mean", scale=0.5, temperature=0.1),
]


@needs_kernels
@pytest.mark.parametrize("case", RESCALE_CASES, ids=_case_id)
def test_growing_row_maxima_match_reference(case, tf32_allowed):
    _check_against_reference(case, _growing_inputs(case))


@needs_kernels
@pytest.mark.parametrize("case", SPLIT_PARAMS, ids=_case_id)
def test_every_split_count_matches_reference(case, tf32_allowed):
    anchors, labels, keys, key_labels = _inputs(case)
    layout = build_layout(anchors, labels, (keys,), key_labels, case.in_batch)
    target = triton_fused.device_target(torch.device(DEVICE))
    plan = triton_fused.launch_plan(
        case.n, layout.num_keys, case.dim, case.dtype, target.sm_count,
        capability=target.capability, num_splits=case.splits, interpreted=INTERPRETED,
    )
    assert plan["statistics"].splits == case.splits
    _check_against_reference(case)


@needs_kernels
@pytest.mark.parametrize("variant", ["paper", "supcon"])
def test_sweep_statistics_match_torch(variant, tf32_allowed):
    """The saved per-anchor statistics are part of the contract: the same as the torch path's."""
    case = Case(variant, 37, 65, 40, True, "none")
    anchors, labels, keys, key_labels = _inputs(case, seed=1)
    layout = build_layout(anchors, labels, (keys,), key_labels, in_batch=True)
    layout64 = build_layout(anchors.double(), labels, (keys.double(),), key_labels, True)
    key_grads = (True, False)  # the in-batch anchors' keys, not the memory's
    weight = torch.rand(case.n, device=DEVICE) * (layout.positives > 0)
    options = ContrastOptions(case.temperature, 1.0, variant, case.reduction)
    args = (options, weight, True, key_grads)
    got = triton_fused.sweep(layout, *args, num_splits=3)
    ref = torch_fused.sweep(layout, *args)
    exact = torch_fused.sweep(layout64, options, weight.double(), True, key_grads)
    # floors in the layout's order: anchors sorted by class, keys by class over [anchors; keys]
    order = layout.anchor_order.cpu()
    upstream = torch.empty(case.n, dtype=torch.float64)
    upstream[order] = weight.double().cpu()
    floors = contrast_floors(
        anchors.cpu(), labels.cpu(), keys.cpu(), key_labels.cpu(), in_batch=True,
        temperature=case.temperature, rho=1.0, variant=variant, reduction="none",
        upstream=upstream,
    )
    normalizer = floors.log_normalizer[order]
    for pick, what, floor in [
        (lambda r: r[0], "loss", floors.loss[order]),
        (lambda r: r[1].log_normalizer, "log_normalizer", normalizer),
        # a mean of sigmoids of (log-normaliser - score): twice the log-normaliser's error
        (lambda r: r[1].positive_weight, "positive_weight", 2 * normalizer),
        (lambda r: r[2], "grad_x", floors.rows[order]),
        (lambda r: r[3][0], "grad_k (the anchors' keys)", floors.columns[order]),
    ]:
        g, r, e = (pick(result).cpu() for result in (got, ref, exact))
        finite = torch.isfinite(e)
        assert torch.equal(finite, torch.isfinite(g)), what
        floor = floor if floor.shape == e.shape else floor.expand_as(e)
        assert_close_to_oracle(g[finite], e[finite], r[finite], floor[finite], what=what)


@needs_kernels
def test_only_requested_key_columns_get_a_gradient(tf32_allowed):
    """With in-batch anchors and memory keys of which only the anchors need a gradient, the dk
    kernel visits only the anchors' columns of the merged table, and the memory gets none."""
    case = Case("paper", 37, 65, 16, True, "mean")
    anchors, labels, keys, key_labels = _inputs(case, seed=2)
    layout = build_layout(anchors, labels, (keys,), key_labels, in_batch=True)
    merged = triton_fused.merge_segments(layout, torch.float32, (True, False))
    visited = torch.zeros(layout.num_keys, dtype=torch.bool, device=DEVICE)
    for lo, hi in merged.grad_columns:
        visited[lo:hi] = True
    anchor_columns = torch.zeros_like(visited)
    anchor_columns[merged.segment_columns[0]] = True
    assert torch.equal(visited, anchor_columns)
    weight = torch.ones(case.n, device=DEVICE)
    options = ContrastOptions(0.1, 1.0, "paper", case.reduction)
    _, _, _, grad_keys = triton_fused.sweep(layout, options, weight, True, (True, False))
    assert grad_keys[1] is None and (grad_keys[0] != 0).any()


@needs_kernels
def test_split_results_are_deterministic(tf32_allowed):
    """The splits are merged in a fixed order: two runs give identical bits (one ragged row tile:
    the interpreter's time goes with the programs)."""
    case = Case("paper", 27, 200, 24, True, "mean", splits=7)
    inputs = _inputs(case, seed=3)
    first, second = (_loss_and_grads(case, "triton", *inputs) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.skipif(not INTERPRETED or not HAS_TRITON, reason="only the interpreter refuses bf16")
def test_interpreter_refuses_bf16():
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    assert any("interpreter" in r for r in triton_fused.unsupported(x, ()))


# ------------------------------------------------------------- compilation for real GPUs, no GPU


def _compile(arch: int, dtype: str, dim: int, variant: str, reduction: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, str(TOOLS / "triton_compile.py"), str(arch), dtype, str(dim),
         variant, reduction],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


_SCORE_KERNELS = {"contrast_statistics_kernel", "paper_positive_kernel",
                  "contrast_anchor_grad_kernel", "contrast_key_grad_kernel"}
_REPRESENTATIVE = [(90, "bfloat16", 256, "paper", "mean"), (80, "float16", 128, "supcon", "none")]
_SWEEP = [config for config in CONFIGURATIONS if config not in _REPRESENTATIVE]


@pytest.mark.skipif(not HAS_TRITON, reason="compiles with Triton")
@pytest.mark.parametrize(
    "arch, dtype, dim, variant, reduction",
    _REPRESENTATIVE + [pytest.param(*config, marks=pytest.mark.slow) for config in _SWEEP],
)
def test_kernels_compile_without_spills(arch, dtype, dim, variant, reduction):
    """Every launch of a step at the paper's shape (1024 anchors, 190,000 keys), compiled for an
    sm80 / sm86 / sm90 GPU with the specialisation of a real launch (no GPU needed: Triton ships
    ptxas): no register spills, shared memory within the family's limit, and wgmma for half
    precision on sm90. 10-30 s per configuration without a cache. The tiles depend on the
    Triton version: run it under every Triton that matters (the tool checks the one it runs
    under)."""
    family = triton_fused.arch_family((arch // 10, arch % 10))
    reports = _compile(arch, dtype, dim, variant, reduction)
    assert _SCORE_KERNELS & {r["kernel"] for r in reports}
    for report in reports:
        assert report["spill_bytes"] == 0, report
        assert report["shared_bytes"] <= triton_fused.SHARED_MEMORY[family], report
        if arch == 90 and dtype != "float32" and report["kernel"] in _SCORE_KERNELS:
            assert report["wgmma"], report


def test_half_precision_keys_stay_in_their_dtype_without_a_copy():
    # The layout reads a memory bank's keys (grouped by class) in place, in their dtype; the
    # kernels' table holds them in the operand dtype, half-precision keys unwidened.
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(40, 16, generator=g).half()
    key_labels = torch.arange(40) // 10
    anchors = torch.randn(12, 16, generator=g).half()
    labels = torch.arange(12) % 4
    for in_batch in (False, True):
        layout = build_layout(anchors, labels, (keys,), key_labels, in_batch)
        memory = layout.segments[-1]
        assert memory.keys.dtype == torch.float16 and layout.anchors.dtype == torch.float32
        assert memory.keys.data_ptr() == keys.data_ptr() and memory.source is None
        merged = triton_fused.merge_segments(layout, torch.float16, ())
        assert merged.keys.dtype == torch.float16
        torch.testing.assert_close(
            merged.keys[merged.segment_columns[-1]], keys, rtol=0, atol=0
        )
