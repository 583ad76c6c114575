"""The Triton backend against the dense reference, the torch path and the dispatcher's rules.

On CPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py): keep the sizes small.
"""

import os
import subprocess
import sys
from typing import NamedTuple, Optional

import pytest
import torch

pytest.importorskip("triton")

import pixcontrast  # noqa: E402
from pixcontrast import _dispatch  # noqa: E402
from pixcontrast.ops import torch_fused, triton_fused  # noqa: E402
from pixcontrast.ops._autograd import key_grad_columns  # noqa: E402
from pixcontrast.ops._layout import build_layout  # noqa: E402

from _helpers import as_double, assert_close_to_oracle, contrast_floors  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
if DEVICE == "cpu" and not INTERPRETED:
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

# The interpreter runs numpy on every lane, and numpy warns about values the kernels produce on
# purpose: exp of an excluded self score overflowing to inf, log(0) = -inf for an empty set, and
# 0 * inf in lanes that `where` then drops.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

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


CASES = [
    Case("paper", 37, 0, 40, True, "mean"),
    Case("paper", 130, 300, 16, False, "none", scale=3.0, temperature=0.05),
    Case("paper", 37, 65, 40, True, "sum", torch.float16),
    Case("paper", 37, 1, 16, False, "none"),
    Case("paper", 1, 65, 40, True, "mean"),
    Case("supcon", 130, 0, 16, True, "none", scale=2.0),
    Case("supcon", 37, 65, 40, False, "mean", torch.float16),
    Case("supcon", 130, 300, 40, True, "sum", temperature=0.5),
    Case("supcon", 1, 1, 16, False, "none"),
    Case("supcon", 1, 0, 40, True, "mean"),  # no key at all once the self pair is excluded
    Case("paper", 130, 1, 16, True, "none", torch.float16),
    Case("paper", 130, 65, 40, True, "mean", torch.bfloat16),
]


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


def _upstream(loss: torch.Tensor) -> torch.Tensor:
    """A gradient of the output that is not 1 (per anchor and of both signs for ``none``)."""
    if loss.ndim == 0:
        return torch.tensor(1.7, device=loss.device, dtype=loss.dtype)
    return torch.linspace(-1.0, 2.0, loss.numel(), device=loss.device, dtype=loss.dtype)


def _loss_and_grads(case: Case, backend: str, anchors, labels, keys, key_labels):
    """Loss, d anchors and d keys (in the inputs' dtypes) under :func:`_upstream`."""
    x = anchors.detach().requires_grad_()
    k = None if keys is None else keys.detach().requires_grad_()
    loss = pixcontrast.contrastive_loss(
        x, labels, k, key_labels, in_batch=case.in_batch, temperature=case.temperature,
        base_temperature=0.07, variant=case.variant, reduction=case.reduction, backend=backend,
    )
    inputs = [x] if k is None else [x, k]
    grads = torch.autograd.grad(loss, inputs, _upstream(loss))
    return [loss.detach(), *grads]


def _floors(case: Case, anchors, labels, keys, key_labels):
    """Rounding floors of the tolerance rule; half-precision kernels round ``G`` to the
    operands' dtype before the gradient products."""
    upstream = _upstream(torch.zeros(case.n if case.reduction == "none" else ()))
    floors = contrast_floors(
        anchors.cpu(), labels.cpu(), None if keys is None else keys.cpu(),
        None if key_labels is None else key_labels.cpu(), in_batch=case.in_batch,
        temperature=case.temperature, rho=case.temperature / 0.07, variant=case.variant,
        reduction=case.reduction, upstream=upstream,
        operand_dtype=case.dtype if case.dtype != torch.float32 else None,
    )
    return [floors.loss, floors.anchors] + ([] if keys is None else [floors.keys])


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_loss_and_gradients_match_reference_and_torch(case):
    if case.dtype == torch.bfloat16 and INTERPRETED:
        pytest.skip("the Triton interpreter has no bfloat16")
    inputs = _inputs(case)
    # Oracle: the dense reference in fp64 on the very same (possibly half-precision) values; the
    # reference on the inputs as given (fp32 arithmetic) sets the scale of the tolerance rule.
    oracle = _loss_and_grads(case, "reference", *as_double(inputs))
    reference = _loss_and_grads(case, "reference", *inputs)
    floors = _floors(case, *inputs)
    for backend in ("triton", "torch"):
        result = _loss_and_grads(case, backend, *inputs)
        for name, got, want, ref, floor in zip(
            ["loss", "d anchors", "d keys"], result, oracle, reference, floors
        ):
            assert_close_to_oracle(got.cpu(), want.cpu(), ref.cpu(), floor,
                                   what=f"{backend} {name}")


@pytest.mark.parametrize("variant", ["paper", "supcon"])
def test_sweep_statistics_match_torch(variant):
    """The saved per-anchor statistics are part of the contract: those of the torch path, both
    against the torch path's own sweep in fp64, by the tolerance rule."""
    case = Case(variant, 37, 65, 40, True, "none")
    anchors, labels, keys, key_labels = _inputs(case, seed=1)
    layout = build_layout(anchors, labels, (keys,), key_labels, in_batch=True)
    layout64 = build_layout(anchors.double(), labels, (keys.double(),), key_labels, True)
    columns = key_grad_columns(layout, need_anchor_grad=True, need_part_grad=(False,))
    weight = torch.rand(case.n, device=DEVICE) * (layout.positives > 0)
    args = (case.temperature, 1.0, variant, weight, True, columns)
    got = triton_fused.sweep(layout, *args)
    ref = torch_fused.sweep(layout, *args)
    exact = torch_fused.sweep(layout64, case.temperature, 1.0, variant, weight.double(), True,
                              columns)
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
        (lambda r: r[3], "grad_k (anchor columns only)", floors.columns[layout.key_source.cpu()]),
    ]:
        g, r, e = (pick(result).cpu() for result in (got, ref, exact))
        finite = torch.isfinite(e)
        assert torch.equal(finite, torch.isfinite(g)), what
        floor = floor if floor.shape == e.shape else floor.expand_as(e)
        assert_close_to_oracle(g[finite], e[finite], r[finite], floor[finite], what=what)


def test_only_requested_key_columns_get_a_gradient():
    """With in-batch anchors and memory keys of which only the anchors need a gradient, the dk
    kernel visits only the anchors' columns: the memory columns stay exactly zero."""
    case = Case("paper", 37, 65, 16, True, "mean")
    anchors, labels, keys, key_labels = _inputs(case, seed=2)
    layout = build_layout(anchors, labels, (keys,), key_labels, in_batch=True)
    columns = key_grad_columns(layout, need_anchor_grad=True, need_part_grad=(False,))
    weight = torch.ones(case.n, device=DEVICE)
    _, _, _, grad_k = triton_fused.sweep(layout, 0.1, 1.0, "paper", weight, True, columns)
    visited = torch.zeros(layout.keys.shape[0], dtype=torch.bool, device=DEVICE)
    for lo, hi in columns:
        visited[lo:hi] = True
    assert (grad_k[~visited] == 0).all()
    assert (grad_k[visited] != 0).any()


@pytest.mark.skipif(not INTERPRETED, reason="bf16 is only refused by the interpreter")
def test_interpreter_refuses_bf16():
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    assert any("interpreter" in r for r in triton_fused.unsupported(x, ()))


def test_environment_override_runs_triton(monkeypatch):
    """With Triton installed, PIXCONTRAST_BACKEND=triton makes ``auto`` run the kernels (the
    selection rules themselves are in test_dispatch.py, with or without Triton)."""
    x = torch.randn(6, 8, device=DEVICE)
    y = torch.tensor([0, 0, 1, 1, 2, 2], device=DEVICE)
    want = pixcontrast.contrastive_loss(x, y, backend="triton")
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
    assert _dispatch.select_backend("auto", x, ()).name == "triton"
    assert torch.equal(pixcontrast.contrastive_loss(x, y), want)


_COMPILE_SCRIPT = """
import sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pixcontrast.ops import _kernels, triton_fused

arch, dtype_name, dim, variant = sys.argv[1:]
arch, dim, dtype, is_paper = int(arch), int(dim), getattr(torch, dtype_name), variant == "paper"
POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
INDEX_POINTERS = {"pos_lo_ptr", "pos_hi_ptr", "self_col_ptr", "block_start_ptr", "block_stop_ptr"}
block_d = max(16, triton.next_power_of_2(dim))
block_n, block_m, num_warps, num_stages = triton_fused._tiles(block_d, dtype, False)
constexprs = dict(IS_PAPER=is_paper, PRECISION=triton_fused._dot_precision(dtype),
                  BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d)
for kernel in [_kernels.contrast_forward_kernel, _kernels.contrast_anchor_grad_kernel,
               _kernels.contrast_key_grad_kernel]:
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("x_ptr", "k_ptr"):
            signature[name] = POINTER[dtype]
        elif name.endswith("_ptr"):
            signature[name] = "*i32" if name in INDEX_POINTERS else "*fp32"
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
    source = ASTSource(kernel, signature, constexprs={
        (kernel.arg_names.index(name),): value for name, value in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    assert compiled.metadata.shared <= 99 * 1024, (kernel.fn.__name__, compiled.metadata.shared)
"""


@pytest.mark.parametrize(
    "arch, dtype, dim, variant",
    [
        (80, "float16", 40, "paper"),
        (90, "float32", 256, "supcon"),
        pytest.param(90, "float16", 128, "supcon", marks=pytest.mark.slow),
        pytest.param(80, "float32", 128, "paper", marks=pytest.mark.slow),
        pytest.param(90, "bfloat16", 256, "paper", marks=pytest.mark.slow),
        pytest.param(80, "float16", 256, "supcon", marks=pytest.mark.slow),
    ],
)
def test_kernels_compile_for_gpus(arch, dtype, dim, variant):
    """The interpreter runs plain Python; this compiles the real launch configuration for an
    sm80 / sm90 GPU (no GPU needed: Triton ships ptxas) and checks that each kernel fits in the
    99 KiB of shared memory of consumer GPUs. About 10 s per configuration without a cache."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, str(arch), dtype, str(dim), variant],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
