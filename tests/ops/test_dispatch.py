"""Backend choice, with or without Triton installed.

Whether Triton is importable (and whether it runs its interpreter) is decided by
``triton_fused._load_kernels``; these tests replace it, so they run the same on a machine without
Triton, with it, and on a GPU machine. No kernel is launched here.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import pixcontrast
from pixcontrast.ops import _dispatch, check_contrast_inputs, triton_fused


def inputs(anchors, keys=()):
    """Validated inputs of these anchors and keys (labels 0; selection reads devices and
    dtypes only)."""
    labels = torch.zeros(anchors.shape[0], dtype=torch.long)
    key_labels = [torch.zeros(part.shape[0], dtype=torch.long) for part in keys]
    return check_contrast_inputs(
        anchors, labels, list(keys) or None, key_labels or None, None
    )


MISSING = (None, False, "triton is not importable (No module named 'triton')")
INTERPRETED = (object(), True, "")  # a stand-in for the kernels module: selection never runs it
COMPILED = (object(), False, "")


@pytest.fixture(params=["missing", "interpreted", "compiled"])
def triton_state(request, monkeypatch):
    """Each of the three situations ``_load_kernels`` reports."""
    state = {"missing": MISSING, "interpreted": INTERPRETED, "compiled": COMPILED}[request.param]
    monkeypatch.setattr(triton_fused, "_load_kernels", lambda: state)
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    return request.param


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """Triton importable and ``"auto"`` declining it for nothing, as it will for measured
    (GPU, dtype) pairs (this machine may have no GPU): the selection rule, device aside."""
    monkeypatch.setattr(triton_fused, "_load_kernels", lambda: INTERPRETED)
    monkeypatch.setitem(
        _dispatch.BACKENDS, "triton",
        dataclasses.replace(_dispatch.BACKENDS["triton"], auto_declines=lambda x, k: []),
    )
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)


def test_auto_takes_torch_for_cpu_tensors_whatever_triton_is(triton_state):
    for dtype in (torch.float32, torch.float16, torch.float64):
        x = torch.randn(5, 8, dtype=dtype)
        assert _dispatch.select_backend("auto", inputs(x, (x,))).name == "torch"


def test_auto_on_cpu_never_asks_for_triton(monkeypatch):
    def forbidden():
        raise AssertionError("auto looked for Triton on CPU tensors")

    monkeypatch.setattr(triton_fused, "_load_kernels", forbidden)
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    x = torch.randn(6, 8, requires_grad=True)
    pixcontrast.contrastive_loss(x, torch.tensor([0, 0, 1, 1, 2, 2])).backward()
    assert x.grad is not None


def test_auto_prefers_triton_where_it_supports_the_inputs(triton_on_cpu):
    x = torch.randn(5, 8, dtype=torch.float16)
    assert _dispatch.select_backend("auto", inputs(x)).name == "triton"
    assert _dispatch.select_backend("auto", inputs(x, (x[:3],))).name == "triton"
    # and falls back to torch for anything it does not take, anchors or keys
    assert _dispatch.select_backend("auto", inputs(x.double())).name == "torch"
    assert _dispatch.select_backend("auto", inputs(x, (x[:3].double(),))).name == "torch"
    assert _dispatch.select_backend("auto", inputs(x.float())).name == "torch"  # fp32, "highest"
    wide = torch.randn(5, triton_fused.MAX_DIM + 1, dtype=torch.float16)
    assert _dispatch.select_backend("auto", inputs(wide)).name == "torch"


def test_explicit_backends_are_taken_as_named(triton_on_cpu):
    x = torch.randn(5, 8, dtype=torch.float16)
    for name in ("triton", "torch", "reference"):
        assert _dispatch.select_backend(name, inputs(x)).name == name


def test_explicit_triton_lists_every_reason(monkeypatch):
    monkeypatch.setattr(triton_fused, "_load_kernels", lambda: MISSING)
    x = torch.randn(5, 300, dtype=torch.float64)
    keys = torch.randn(4, 300, dtype=torch.float64)
    with pytest.raises(ValueError) as error:
        pixcontrast.contrastive_loss(x, torch.zeros(5, dtype=torch.long), keys,
                                     torch.zeros(4, dtype=torch.long), backend="triton")
    message = str(error.value)
    for reason in ["backend='triton'", "not importable", "anchors are on cpu, not CUDA",
                   "keys are on cpu, not CUDA", "anchors have dtype torch.float64",
                   "keys have dtype torch.float64", "D=300"]:
        assert reason in message, (reason, message)


@pytest.mark.parametrize(
    ("state", "dtype", "expected"),
    [
        (COMPILED, torch.float16, ["not CUDA"]),  # a GPU machine's Triton, CPU tensors
        (INTERPRETED, torch.float32, ["FMA"]),  # fp32 at "highest" precision: cuBLAS's job
        (INTERPRETED, torch.float16, []),
        (INTERPRETED, torch.bfloat16, ["interpreter does not support"]),
        (MISSING, torch.float32, ["not importable", "not CUDA", "FMA"]),
    ],
)
def test_reasons_for_cpu_tensors(monkeypatch, state, dtype, expected):
    monkeypatch.setattr(triton_fused, "_load_kernels", lambda: state)
    reasons = triton_fused.unsupported(torch.randn(5, 8, dtype=dtype), ())
    assert len(reasons) == len(expected), reasons
    for reason, words in zip(reasons, expected):
        assert words in reason, (words, reasons)


def test_environment_override(triton_on_cpu, monkeypatch):
    x = torch.randn(5, 8, dtype=torch.float16)
    monkeypatch.setenv(_dispatch.ENV_VAR, "reference")
    assert _dispatch.select_backend("auto", inputs(x)).name == "reference"
    assert _dispatch.select_backend("torch", inputs(x)).name == "torch"  # code wins
    monkeypatch.setenv(_dispatch.ENV_VAR, " torch ")
    assert _dispatch.select_backend("auto", inputs(x)).name == "torch"
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
    assert _dispatch.select_backend("auto", inputs(x)).name == "triton"
    monkeypatch.setenv(_dispatch.ENV_VAR, "")
    assert _dispatch.select_backend("auto", inputs(x)).name == "triton"
    monkeypatch.setenv(_dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="PIXCONTRAST_BACKEND='cuda'"):
        _dispatch.select_backend("auto", inputs(x))


def test_environment_triton_without_triton_explains(monkeypatch):
    monkeypatch.setattr(triton_fused, "_load_kernels", lambda: MISSING)
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
    with pytest.raises(ValueError, match="not importable"):
        pixcontrast.contrastive_loss(torch.randn(4, 8), torch.tensor([0, 0, 1, 1]))


def test_without_interpreter_cpu_never_touches_triton(fresh_eager_process):
    """A fresh process without TRITON_INTERPRET (conftest.py runs it, with test_compile's check):
    importing pixcontrast and running ``auto`` on CPU tensors import no Triton; naming ``triton``
    explains that the tensors are not on CUDA (and, where Triton is missing, that it is not
    importable)."""
    assert not fresh_eager_process["triton_after_auto"], "auto imported triton"
    error = fresh_eager_process["triton_backend_error"]
    assert error is not None, "backend='triton' ran on CPU without the interpreter"
    assert "not CUDA" in error, error


def test_auto_takes_torch_for_cpu_tensors():
    x = torch.randn(5, 8)
    assert _dispatch.select_backend("auto", inputs(x)).name == "torch"
    assert "CUDA tensors only" in _dispatch.explain_auto(x)


@pytest.mark.parametrize(
    "capability, dtype, precision, expected",
    [
        (None, torch.bfloat16, "highest", "CUDA tensors only"),
        ((9, 0), torch.float32, "highest", "cuBLAS"),
        ((9, 0), torch.bfloat16, "highest", "unmeasured on sm90"),
        ((8, 6), torch.float32, "high", "unmeasured on sm86"),
    ],
)
def test_auto_declines_triton_with_a_reason(capability, dtype, precision, expected):
    reasons = _dispatch.triton_auto_declines(capability, dtype, precision)
    assert len(reasons) == 1 and expected in reasons[0], reasons


def test_auto_takes_triton_only_where_measured():
    wins = frozenset({((9, 0), torch.bfloat16), ((9, 0), torch.float32)})
    assert _dispatch.triton_auto_declines((9, 0), torch.bfloat16, "highest", wins) == []
    assert _dispatch.triton_auto_declines((9, 0), torch.float32, "high", wins) == []
    # A measured fp32 win is still cuBLAS's job at "highest" precision.
    assert _dispatch.triton_auto_declines((9, 0), torch.float32, "highest", wins)
    assert _dispatch.triton_auto_declines((8, 0), torch.bfloat16, "highest", wins)


def test_triton_refuses_fp32_at_highest_precision(monkeypatch):
    monkeypatch.setattr(triton_fused, "_load_kernels", lambda: (object(), True, ""))
    x = torch.randn(5, 8)
    assert any("FMA" in r for r in triton_fused.unsupported(x, ()))
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert triton_fused.unsupported(x, ()) == []
