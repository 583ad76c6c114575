"""The fused backends as the registered operator ``pixcontrast::contrastive_loss``.

``torch.compile(fullgraph=True)`` traces a loss through it without a graph break and equals eager
mode, forward and backward; ``torch.library.opcheck`` validates the registration (schema, fake
shapes, autograd, AOT dispatch); the data-dependent checks still raise, from inside the operator.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pixcontrast

VARIANTS = ["paper", "supcon"]
REDUCTIONS = ["mean", "sum", "none"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    yield
    torch._dynamo.reset()


def unit(rows: int, seed: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(rows, 4, generator=generator, dtype=dtype)
    return F.normalize(rows, dim=1).to(device)


def make_inputs(device="cpu"):
    """Anchors of 3 classes; keys that need a gradient (one invalid, one of a class no anchor
    has) and memory keys that do not."""
    anchors = unit(10, seed=1, device=device).requires_grad_()
    labels = torch.arange(10, device=device) % 3
    keys = unit(7, seed=2, device=device).requires_grad_()
    key_labels = torch.tensor([0, 1, 2, -1, 3, 0, 1], device=device)
    memory = unit(9, seed=3, device=device)
    memory_labels = torch.arange(9, device=device) % 3
    return anchors, labels, keys, key_labels, memory, memory_labels


def losses(anchors, labels, keys, key_labels, memory, memory_labels, variant, reduction):
    """The loss in every key arrangement, through the torch backend."""
    options = dict(variant=variant, reduction=reduction, backend="torch")
    return (
        pixcontrast.contrastive_loss(anchors, labels, **options),  # in-batch only
        pixcontrast.contrastive_loss(  # in-batch, keys with and without a gradient
            anchors, labels, [keys, memory], [key_labels, memory_labels], in_batch=True,
            base_temperature=0.07, **options,
        ),
        pixcontrast.contrastive_loss(anchors, labels, memory, memory_labels, **options),
        pixcontrast.contrastive_loss(anchors, labels, keys, key_labels, **options),
    )


def loss_and_gradients(step, variant, reduction):
    anchors, labels, keys, key_labels, memory, memory_labels = make_inputs()
    results = step(anchors, labels, keys, key_labels, memory, memory_labels, variant, reduction)
    # a different upstream gradient per anchor and per arrangement
    total = sum(
        (loss * torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype).view(loss.shape) * i)
        .sum()
        for i, loss in enumerate(results, start=1)
    )
    grads = torch.autograd.grad(total, [anchors, keys])
    return [loss.detach() for loss in results] + list(grads)


def assert_same(got, want):
    # fp64: a compiled graph may reorder a few sums, an error of about 1e-15 of their size
    for g, w in zip(got, want):
        scale = 1.0 + float(w.abs().max()) if w.numel() else 1.0
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_fullgraph_compile_equals_eager(variant, reduction):
    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager")
    assert_same(
        loss_and_gradients(compiled, variant, reduction),
        loss_and_gradients(losses, variant, reduction),
    )


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fullgraph_compile_with_inductor_equals_eager(reduction):
    compiled = torch.compile(losses, fullgraph=True, backend="inductor")
    assert_same(
        loss_and_gradients(compiled, "paper", reduction),
        loss_and_gradients(losses, "paper", reduction),
    )


def test_no_graph_break_in_the_loss():
    anchors, labels, keys, key_labels, memory, memory_labels = make_inputs()
    explanation = torch._dynamo.explain(losses)(
        anchors, labels, keys, key_labels, memory, memory_labels, "paper", "none"
    )
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    (graph,) = explanation.graphs
    calls = [node.target for node in graph.graph.nodes if node.op == "call_function"]
    assert calls.count(torch.ops.pixcontrast.contrastive_loss) == 4  # one node per loss


def test_default_backend_compiles_fullgraph_on_cpu():
    # auto decides for CPU inputs without reading the float32 matmul precision, which dynamo
    # cannot trace
    def loss(anchors, labels):
        return pixcontrast.contrastive_loss(anchors, labels)

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    anchors, labels = unit(6, seed=5), torch.arange(6) % 2
    torch.testing.assert_close(compiled(anchors, labels), loss(anchors, labels))


def test_value_checks_raise_from_inside_the_compiled_operator():
    def loss(anchors, labels):
        return pixcontrast.contrastive_loss(anchors, labels, backend="torch")

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    anchors, labels = unit(6, seed=4), torch.arange(6) % 2
    torch.testing.assert_close(compiled(anchors, labels), loss(anchors, labels))
    with pytest.raises(ValueError, match="labels must be >= 0"):
        compiled(anchors, labels - 1)
    with pytest.raises(ValueError, match="anchors contains NaN or Inf values"):
        compiled(anchors.index_fill(0, torch.tensor([2]), torch.nan), labels)
    with pytest.raises(ValueError, match="would overflow torch.float32"):
        compiled(1e18 * anchors.float(), labels)


def operator_arguments(reduction, variant="paper", with_keys=True):
    anchors, labels, keys, key_labels, memory, memory_labels = make_inputs()
    if not with_keys:
        return (anchors, labels, [], None, True, 0.1, 1.0, variant, reduction, "torch", [True])
    return (
        anchors, labels, [keys, memory], torch.cat([key_labels, memory_labels]), True, 0.1,
        0.1 / 0.07, variant, reduction, "torch", [True, True, False],
    )


@pytest.mark.parametrize(
    "arguments",
    [
        operator_arguments("mean"),
        operator_arguments("none"),
        operator_arguments("sum", "supcon", with_keys=False),
    ],
    ids=["mean-keys", "none-keys", "sum-supcon-in-batch"],
)
def test_opcheck_forward(arguments):
    torch.library.opcheck(torch.ops.pixcontrast.contrastive_loss.default, arguments)


def test_opcheck_backward():
    arguments = operator_arguments("none")
    anchors, labels, keys, key_labels, in_batch, temperature, rho, variant, _, _, need_grad = (
        arguments
    )
    log_normalizer, positive_weight = torch.ops.pixcontrast.contrastive_loss(*arguments)[1]
    torch.library.opcheck(
        torch.ops.pixcontrast.contrastive_loss_backward.default,
        (
            torch.linspace(-1.0, 1.0, 10, dtype=torch.float64), anchors.detach(), labels,
            [key.detach() for key in keys], key_labels, log_normalizer, positive_weight, in_batch,
            temperature, rho, variant, "torch", need_grad,
        ),
    )


def test_the_fused_backends_run_as_the_operator(device):
    anchors, labels = make_inputs(device)[:2]
    name = type(pixcontrast.contrastive_loss(anchors, labels, backend="torch").grad_fn).__name__
    assert "pixcontrast_contrastive_loss" in name, name


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradients_only_where_needed_in_the_inputs_dtypes(reduction, device):
    anchors = unit(10, seed=5, dtype=torch.float32, device=device).requires_grad_()
    keys = unit(7, seed=6, dtype=torch.float16, device=device).requires_grad_()
    memory = unit(9, seed=7, dtype=torch.float32, device=device)
    # invalid keys only
    unfilled = unit(3, seed=8, dtype=torch.float64, device=device).requires_grad_()
    loss = pixcontrast.contrastive_loss(
        anchors, torch.arange(10, device=device) % 3, [keys, memory, unfilled],
        [torch.arange(7, device=device) % 3, torch.arange(9, device=device) % 3,
         torch.full((3,), -1, device=device)],
        in_batch=True, reduction=reduction, backend="torch",
    )
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert anchors.grad.dtype == torch.float32 and keys.grad.dtype == torch.float16
    assert anchors.grad.abs().sum() > 0 and keys.grad.abs().sum() > 0
    assert memory.grad is None
    assert torch.equal(unfilled.grad, torch.zeros_like(unfilled))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_without_grad_mode_the_loss_is_a_constant(reduction, device):
    anchors, labels = make_inputs(device)[:2]
    with torch.no_grad():
        constant = pixcontrast.contrastive_loss(anchors, labels, reduction=reduction,
                                                backend="torch")
    assert constant.grad_fn is None
    expected = pixcontrast.contrastive_loss(anchors, labels, reduction=reduction, backend="torch")
    assert torch.equal(constant, expected.detach())


def test_the_operator_refuses_double_backward_and_in_place_changes(device):
    anchors, labels, keys, key_labels = make_inputs(device)[:4]
    loss = pixcontrast.contrastive_loss(anchors, labels, backend="torch")
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(loss, anchors, create_graph=True)
    loss = pixcontrast.contrastive_loss(anchors, labels, keys, key_labels, reduction="none",
                                        backend="torch")
    with torch.no_grad():
        keys.mul_(0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()
