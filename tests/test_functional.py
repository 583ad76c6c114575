"""contrastive_loss: golden loops, torch path against the dense reference, properties, stability,
edge cases and input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import pixcontrast
from pixcontrast import contrastive_loss
from pixcontrast.ops import torch_fused

from _helpers import (
    all_pairs,
    as_double,
    assert_close_to_oracle,
    contrast_floors,
    key_space,
    loop_loss,
    make_inputs,
    score_gradient,
)

VARIANTS = ("paper", "supcon")
REDUCTIONS = ("mean", "sum", "none")


MODES = {
    "in_batch": dict(with_keys=False, in_batch=True),
    "keys": dict(with_keys=True, in_batch=False),
    "in_batch+keys": dict(with_keys=True, in_batch=True),
}


def call(backend, anchors, labels, keys, key_labels, mode, **kwargs):
    spec = MODES[mode]
    if spec["with_keys"]:
        return contrastive_loss(
            anchors, labels, keys, key_labels, in_batch=spec["in_batch"], backend=backend, **kwargs
        )
    return contrastive_loss(anchors, labels, backend=backend, **kwargs)


# --- golden loops -------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_matches_golden_loops(variant, mode, reduction, backend, device):
    anchors, labels, keys, key_labels = make_inputs(9, 7, 4, 3, seed=1)
    tau, base = 0.5, 0.7
    spec = MODES[mode]
    keys_used, labels_used = (keys, key_labels) if spec["with_keys"] else (None, None)
    positives, negatives = all_pairs(labels, labels_used, spec["in_batch"])
    expected = loop_loss(anchors, key_space(anchors, keys_used, spec["in_batch"]), positives,
                         negatives, tau, tau / base, variant, reduction)
    got = call(
        backend, *(t.to(device) for t in (anchors, labels, keys, key_labels)), mode,
        temperature=tau, base_temperature=base, variant=variant, reduction=reduction,
    )
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-10, atol=1e-12)


# --- torch path against the dense reference ---------------------------------------------------


def grads_of(backend, anchors, labels, keys, key_labels, mode, upstream, **kwargs):
    a = anchors.detach().clone().requires_grad_(True)
    k = keys.detach().clone().requires_grad_(True)
    loss = call(backend, a, labels, k, key_labels, mode, **kwargs)
    (loss * upstream).sum().backward()
    return loss.detach(), a.grad, k.grad


def assert_matches_oracle(got, anchors, labels, keys, key_labels, mode, upstream,
                          operand_dtype=None, key_rows=slice(None), **kwargs):
    """``got`` (loss, d anchors, d keys of a low-precision run; d keys only for ``key_rows``)
    against the reference on fp64 copies of the same values, by the tolerance rule of
    ``_helpers``: the fp32 reference's own error sets the scale."""
    exact = grads_of("reference", *as_double([anchors, labels, keys, key_labels]), mode,
                     upstream.double(), **kwargs)
    ref_lowp = grads_of("reference", anchors, labels, keys, key_labels, mode, upstream, **kwargs)
    spec = MODES[mode]
    rho = kwargs.get("temperature", 0.1) / kwargs.get("base_temperature", kwargs.get(
        "temperature", 0.1))
    floors = contrast_floors(
        anchors, labels, keys if spec["with_keys"] else None,
        key_labels if spec["with_keys"] else None, in_batch=spec["in_batch"],
        temperature=kwargs.get("temperature", 0.1), rho=rho,
        variant=kwargs.get("variant", "paper"), reduction=kwargs.get("reduction", "mean"),
        upstream=upstream, operand_dtype=operand_dtype,
    )
    for name, g, e, r, f in zip(["loss", "d anchors", "d keys"], got, exact, ref_lowp, floors):
        if name == "d keys" and e is not None:
            e, r, f = e[key_rows], r[key_rows], f[key_rows]
        if e is None:
            assert g is None or not g.abs().any(), name
        else:
            assert_close_to_oracle(g, e, r, f, what=name)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,m", [(1, 1), (37, 4097), (1000, 1)])
def test_torch_matches_reference(variant, mode, reduction, dtype, n, m):
    anchors, labels, keys, key_labels = make_inputs(n, m, 16, 5, dtype=dtype, seed=n + m)
    anchors = F.normalize(anchors, dim=1)
    keys = F.normalize(keys, dim=1)
    g = torch.Generator().manual_seed(3)
    upstream = torch.rand(n if reduction == "none" else (), generator=g, dtype=dtype) + 0.5
    kwargs = dict(temperature=0.1, base_temperature=0.07, variant=variant, reduction=reduction)
    got = grads_of("torch", anchors, labels, keys, key_labels, mode, upstream, **kwargs)
    if dtype == torch.float32:
        assert_matches_oracle(got, anchors, labels, keys, key_labels, mode, upstream, **kwargs)
        return
    # fp64 against fp64: rounding (~1e-16 per operation, a few thousand terms) stays orders of
    # magnitude below these tolerances in any summation order.
    ref = grads_of("reference", anchors, labels, keys, key_labels, mode, upstream, **kwargs)
    for r, t in zip(ref, got):
        if r is None:
            assert t is None or not t.abs().any()
        else:
            torch.testing.assert_close(t, r, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("in_batch", [False, True])
def test_score_gradient_oracle_matches_reference(variant, in_batch):
    """The tolerance rule's dense G (``_helpers.score_gradient``) gives the reference's input
    gradients: dx = G K / tau (+ the anchors' columns), dk = G^T x / tau."""
    anchors, labels, keys, key_labels = make_inputs(23, 31, 6, 4, seed=17)
    up = torch.rand(23, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    mode = "in_batch+keys" if in_batch else "keys"
    kw = dict(temperature=0.3, base_temperature=0.5, variant=variant, reduction="none")
    _, want_x, want_k = grads_of("reference", anchors, labels, keys, key_labels, mode, up, **kw)
    grad = score_gradient(anchors, labels, keys, key_labels, in_batch, 0.3, 0.6, variant, up)
    columns = grad.signed.T @ anchors / 0.3
    got_x = grad.signed @ grad.key_space / 0.3 + (columns[:23] if in_batch else 0)
    torch.testing.assert_close(got_x, want_x, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(columns[-31:], want_k, rtol=1e-9, atol=1e-10)
    assert (grad.pieces >= grad.signed.abs()).all()
    assert (grad.pieces > grad.signed.abs() + 1e-3).any() == (variant == "supcon")


@pytest.mark.parametrize("mode", list(MODES))
def test_tolerance_rule_passes_other_summation_orders_and_fails_wrong_results(mode):
    """Permuting anchors and keys changes every summation order of the fused path (as another
    CPU's kernels would): the rule accepts the result. A temperature off by 1e-4, one dropped key
    or an anchor's gradient off by 1e-3 of its largest entry are rejected."""
    anchors, labels, keys, key_labels = make_inputs(300, 200, 16, 5, dtype=torch.float32, seed=4)
    anchors, keys = F.normalize(anchors, dim=1), F.normalize(keys, dim=1)
    up = torch.rand(300, generator=torch.Generator().manual_seed(2)) + 0.5
    kw = dict(temperature=0.1, base_temperature=0.07, variant="supcon", reduction="none")
    g = torch.Generator().manual_seed(0)
    pa, pk = torch.randperm(300, generator=g), torch.randperm(200, generator=g)
    loss, dx, dk = grads_of("torch", anchors[pa], labels[pa], keys[pk], key_labels[pk], mode,
                            up[pa], **kw)
    dk = None if dk is None else dk[torch.argsort(pk)]
    unpermuted = (loss[torch.argsort(pa)], dx[torch.argsort(pa)], dk)
    args = (anchors, labels, keys, key_labels, mode, up)
    assert_matches_oracle(unpermuted, *args, **kw)

    hotter = grads_of("torch", *args, **{**kw, "temperature": 0.1 * (1 + 1e-4)})
    dropped_labels = key_labels.clone()
    dropped_labels[int((key_labels >= 0).nonzero()[0])] = -1
    dropped = grads_of("torch", anchors, labels, keys, dropped_labels, mode, up, **kw)
    _, dx_true, _ = grads_of("reference", *as_double(args[:4]), mode, up.double(), **kw)
    nudged = dx_true.float().clone()
    nudged[7] += 1e-3 * dx_true[7].abs().max()
    wrong = [hotter, dropped, (unpermuted[0], nudged, unpermuted[2])]
    for result in wrong if MODES[mode]["with_keys"] else [hotter, wrong[2]]:
        with pytest.raises(AssertionError, match="exceeds"):
            assert_matches_oracle(result, *args, **kw)


@pytest.mark.parametrize("variant", VARIANTS)
def test_many_chunks_and_classes_spanning_chunks(variant, monkeypatch):
    # A tiny buffer forces many row chunks, most of them cutting through a class.
    monkeypatch.setattr(torch_fused, "_CHUNK_ELEMENTS", 3 * 50)
    monkeypatch.setattr(torch_fused, "_MIN_CHUNK_ROWS", 1)
    anchors, labels, keys, key_labels = make_inputs(41, 50, 6, 4, seed=7)
    upstream = torch.rand(41, dtype=torch.float64) + 0.5
    for mode in MODES:
        for reduction in ("none", "mean"):
            up = upstream if reduction == "none" else upstream[0]
            kw = dict(temperature=0.3, variant=variant, reduction=reduction)
            ref = grads_of("reference", anchors, labels, keys, key_labels, mode, up, **kw)
            got = grads_of("torch", anchors, labels, keys, key_labels, mode, up, **kw)
            for r, t in zip(ref, got):
                if r is not None:
                    torch.testing.assert_close(t, r, rtol=1e-9, atol=1e-10)


def test_non_contiguous_inputs():
    base = torch.randn(30, 20, dtype=torch.float64)
    anchors = base[:, ::2]  # [30, 10], strided
    keys = torch.randn(10, 50, dtype=torch.float64).T  # [50, 10], transposed
    labels = torch.arange(60)[::2] % 4
    key_labels = torch.randint(0, 4, (50,))
    assert not anchors.is_contiguous() and not keys.is_contiguous()
    for variant in VARIANTS:
        kw = dict(variant=variant, reduction="none", temperature=0.2)
        up = torch.rand(30, dtype=torch.float64)
        ref = grads_of("reference", anchors, labels, keys, key_labels, "in_batch+keys", up, **kw)
        got = grads_of("torch", anchors, labels, keys, key_labels, "in_batch+keys", up, **kw)
        for r, t in zip(ref, got):
            torch.testing.assert_close(t, r, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", list(MODES))
def test_gradcheck_fp64(variant, reduction, mode, device):
    anchors, labels, keys, key_labels = make_inputs(11, 9, 5, 3, seed=5, device=device)
    anchors.requires_grad_(True)
    keys.requires_grad_(True)

    def fn(a, k):
        return call("torch", a, labels, k, key_labels, mode, temperature=0.5, variant=variant,
                    reduction=reduction)

    assert torch.autograd.gradcheck(fn, (anchors, keys))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_fp32(dtype):
    anchors, labels, keys, key_labels = make_inputs(50, 80, 16, 4, dtype=torch.float32, seed=2)
    anchors, keys = F.normalize(anchors, dim=1).to(dtype), F.normalize(keys, dim=1).to(dtype)
    a = anchors.clone().requires_grad_(True)
    k = keys.clone().requires_grad_(True)
    loss = contrastive_loss(a, labels, k, key_labels, in_batch=True, backend="torch")
    loss.backward()
    assert loss.dtype == torch.float32 and a.grad.dtype == dtype and k.grad.dtype == dtype
    # The oracle runs on the half-precision values themselves; the fp32 reference (which
    # upcasts them) sets the scale, the rounding of the gradients to `dtype` adds its own.
    assert_matches_oracle((loss.detach(), a.grad, k.grad), anchors, labels, keys, key_labels,
                          "in_batch+keys", torch.tensor(1.0, dtype=dtype))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("upstream", [2.0**16, 1e5, 2.0**-12])
def test_half_precision_gradients_under_an_upstream_fp16_cannot_hold(
    backend, variant, reduction, upstream
):
    # GradScaler's initial scale 2**16 (and 1e5) exceed fp16's largest 65504; 2**-12 makes
    # gradients subnormal in fp16. The true gradients fit in fp16 (rho keeps the sum's as small
    # as the mean's), so they must come out finite and by the tolerance rule.
    n = 40
    anchors, labels, keys, key_labels = make_inputs(n, 30, 16, 4, dtype=torch.float32, seed=5)
    anchors = F.normalize(anchors, dim=1).half()
    keys = F.normalize(keys, dim=1).half()
    operand_dtype = None
    if backend == "triton":
        _triton_or_skip(anchors, keys)
        operand_dtype = torch.float16  # (its products take the keys' dtype)
    scale = 1.0 if reduction == "mean" else 1.0 / n
    kwargs = dict(temperature=0.1, base_temperature=0.1 / scale, variant=variant,
                  reduction=reduction)
    shape = (n,) if reduction == "none" else ()
    up = torch.full(shape, upstream, dtype=torch.float32)
    got = grads_of(backend, anchors, labels, keys, key_labels, "in_batch+keys", up, **kwargs)
    assert got[1].dtype == got[2].dtype == torch.float16
    assert bool(torch.isfinite(got[1]).all() and torch.isfinite(got[2]).all())
    assert_matches_oracle(got, anchors, labels, keys, key_labels, "in_batch+keys", up,
                          operand_dtype=operand_dtype, **kwargs)


def test_no_grad_and_detached_inputs(device, dtype):
    anchors, labels, keys, key_labels = make_inputs(20, 30, 8, 3, dtype, seed=4, device=device)
    expected = contrastive_loss(anchors, labels, keys, key_labels, backend="reference")
    with torch.no_grad():
        got = contrastive_loss(anchors.requires_grad_(True), labels, keys, key_labels)
    assert not got.requires_grad
    torch.testing.assert_close(got, expected)
    got = contrastive_loss(anchors.detach(), labels, keys, key_labels)
    torch.testing.assert_close(got, expected)


# --- properties ---------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 24),
    m=st.integers(0, 24),
    classes=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    variant=st.sampled_from(VARIANTS),
    mode=st.sampled_from(list(MODES)),
)
def test_properties(n, m, classes, seed, variant, mode):
    anchors, labels, keys, key_labels = make_inputs(n, m, 6, classes, seed=seed)
    kw = dict(temperature=0.4, variant=variant, reduction="none")
    base = call("torch", anchors, labels, keys, key_labels, mode, **kw)
    assert torch.isfinite(base).all()
    # torch == reference
    torch.testing.assert_close(
        base, call("reference", anchors, labels, keys, key_labels, mode, **kw),
        rtol=1e-9, atol=1e-10,
    )
    # permuting anchors permutes the per-anchor losses; permuting keys changes nothing
    g = torch.Generator().manual_seed(seed)
    pa, pk = torch.randperm(n, generator=g), torch.randperm(m, generator=g)
    permuted = call("torch", anchors[pa], labels[pa], keys[pk], key_labels[pk], mode, **kw)
    torch.testing.assert_close(permuted, base[pa], rtol=1e-9, atol=1e-10)
    # renaming classes (a bijection, invalid keys stay invalid) changes nothing
    rename = torch.randperm(classes, generator=g) * 3 + 2
    renamed_keys = torch.where(key_labels >= 0, rename[key_labels.clamp(min=0)], key_labels)
    renamed = call("torch", anchors, rename[labels], keys, renamed_keys, mode, **kw)
    torch.testing.assert_close(renamed, base, rtol=1e-9, atol=1e-10)


# --- stability ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.01, 0.05, 0.1, 1.0])
@pytest.mark.parametrize("norm", [1.0, 100.0])
@pytest.mark.parametrize("variant", VARIANTS)
def test_stable_for_small_temperature_and_large_norms(tau, norm, variant):
    anchors, labels, keys, key_labels = make_inputs(40, 60, 8, 4, dtype=torch.float32, seed=9)
    anchors = F.normalize(anchors, dim=1) * norm
    keys = F.normalize(keys, dim=1) * torch.linspace(1.0, norm, 60)[:, None]
    kw = dict(temperature=tau, variant=variant, reduction="none")
    up = torch.rand(40) + 0.5
    got = grads_of("torch", anchors, labels, keys, key_labels, "in_batch+keys", up, **kw)
    for t in got:
        assert torch.isfinite(t).all()
    # Scores reach norm^2 / tau = 1e6, which fp32 rounds by up to 0.06: the floor grows with
    # them (through expm1 of the scores' error), the reference's own error with it.
    assert_matches_oracle(got, anchors, labels, keys, key_labels, "in_batch+keys", up, **kw)


# --- edge cases ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_edge_cases_are_finite_zero_and_connected(backend, variant, device):
    kw = dict(variant=variant, backend=backend)
    # N = 1: no key at all
    x = torch.randn(1, 4, device=device, requires_grad=True)
    loss = contrastive_loss(x, torch.tensor([2], device=device), **kw)
    loss.backward()
    assert loss.item() == 0.0 and loss.requires_grad and not x.grad.any()
    # every anchor of its own class: no positives anywhere
    x = torch.randn(4, 3, device=device, requires_grad=True)
    loss = contrastive_loss(x, torch.arange(4, device=device), **kw)
    loss.backward()
    assert loss.item() == 0.0 and not x.grad.any()
    # no anchors at all
    x = torch.zeros(0, 3, device=device, requires_grad=True)
    loss = contrastive_loss(x, torch.zeros(0, dtype=torch.long, device=device), **kw)
    loss.backward()
    assert loss.item() == 0.0
    # only invalid keys
    x = torch.randn(3, 3, device=device, requires_grad=True)
    loss = contrastive_loss(x, torch.zeros(3, dtype=torch.long, device=device),
                            torch.randn(5, 3, device=device), torch.full((5,), -1, device=device),
                            **kw)
    assert loss.item() == 0.0
    # a single class: positives but no negatives
    x = torch.randn(5, 3, device=device, requires_grad=True)
    loss = contrastive_loss(x, torch.zeros(5, dtype=torch.long, device=device), **kw)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    if variant == "paper":
        assert loss.item() == 0.0  # -log(e^p / e^p): nothing to push away from
    else:
        assert loss.item() > 0.0


def test_anchor_without_positive_is_left_out_of_the_mean(device):
    x = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=1).to(device)
    y = torch.tensor([0, 0, 1, 1, 2], device=device)  # anchor 4 has no positive
    per_anchor = contrastive_loss(x, y, reduction="none")
    assert per_anchor[4] == 0
    torch.testing.assert_close(contrastive_loss(x, y), per_anchor[:4].mean())


# --- input errors -------------------------------------------------------------------------------


def test_errors_name_the_argument():
    x, y = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    k, c = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 0])
    cases = [
        (dict(anchors=torch.randn(4)), ValueError, "anchors"),
        (dict(anchors=torch.ones(4, 3, dtype=torch.long)), TypeError, "anchors"),
        (dict(labels=y.float()), TypeError, "labels"),
        (dict(labels=torch.tensor([0, 1])), ValueError, "labels"),
        (dict(labels=torch.tensor([0, -1, 1, 1])), ValueError, "labels"),
        (dict(keys=k), ValueError, "key_labels"),
        (dict(keys=k, key_labels=c[:3]), ValueError, "key_labels"),
        (dict(keys=torch.randn(5, 2), key_labels=c), ValueError, "keys"),
        (dict(key_labels=c), ValueError, "key_labels"),
        (dict(keys=k, key_labels=c.float()), TypeError, "key_labels"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(base_temperature=0.0), ValueError, "base_temperature"),
        (dict(variant="infonce"), ValueError, "variant"),
        (dict(reduction="max"), ValueError, "reduction"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(anchors=torch.tensor([[0.0, float("nan"), 1.0]] * 4)), ValueError, "anchors"),
        (dict(anchors=torch.tensor([[0.0, float("inf"), 1.0]] * 4)), ValueError, "anchors"),
        (dict(keys=torch.full((5, 3), float("nan")), key_labels=c), ValueError, "keys"),
        (dict(labels=y.to("meta")), ValueError, "labels"),
    ]
    for override, error, name in cases:
        args = dict(anchors=x, labels=y, keys=None, key_labels=None)
        args.update(override)
        with pytest.raises(error, match=name):
            contrastive_loss(**args)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_every_backend_checks_the_values(backend):
    # The data-dependent checks run in the backend's loss: the fused operator's kernel and the
    # reference alike.
    x, y = F.normalize(torch.randn(4, 3), dim=1), torch.tensor([0, 0, 1, 1])
    k, c = F.normalize(torch.randn(5, 3), dim=1), torch.tensor([0, 1, 0, 1, -1])
    for anchors, labels, keys, message in [
        (x, torch.tensor([0, -1, 1, 1]), k, r"labels must be >= 0 \(filter ignored pixels out"),
        (x, y, k.index_fill(0, torch.tensor([3]), torch.inf), "keys contains NaN or Inf values"),
        (1e18 * x, y, 1e18 * k, "the loss would overflow torch.float32"),
    ]:
        with pytest.raises(ValueError, match=message):
            contrastive_loss(anchors, labels, keys, c, backend=backend)


def test_huge_finite_values_are_not_mistaken_for_inf():
    x = torch.full((4, 3), 3e38)  # the sum overflows, every entry is finite
    loss = contrastive_loss(x / 3e38 * 1.0, torch.tensor([0, 0, 1, 1]))
    assert torch.isfinite(loss)
    pixcontrast._checks.check_finite(x, "anchors")  # must not raise


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("in_batch", [False, True])
def test_keys_grouped_by_class_match_shuffled_keys_and_reference(variant, in_batch):
    # Keys grouped by class (as a memory bank returns them), with a class no anchor has (7) in
    # the middle and invalid keys at the end: the layout skips the key sort in the first case.
    anchors, labels, keys, _ = make_inputs(23, 40, 6, 4, seed=11)
    key_labels = torch.tensor([0] * 8 + [1] * 6 + [7] * 5 + [2] * 9 + [3] * 7 + [-1] * 5)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    up = torch.rand(23, dtype=torch.float64) + 0.5
    mode = "in_batch+keys" if in_batch else "keys"
    kw = dict(temperature=0.3, variant=variant, reduction="none")
    ref = grads_of("reference", anchors, labels, keys, key_labels, mode, up, **kw)
    grouped = grads_of("torch", anchors, labels, keys, key_labels, mode, up, **kw)
    shuffled = grads_of("torch", anchors, labels, keys[perm], key_labels[perm], mode, up, **kw)
    for r, g in zip(ref, grouped):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(shuffled[0], ref[0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(shuffled[2][torch.argsort(perm)], ref[2], rtol=1e-9, atol=1e-10)


def _triton_or_skip(anchors=None, keys=None):
    from pixcontrast.ops import triton_fused

    anchors = torch.zeros(1, 4) if anchors is None else anchors
    reasons = triton_fused.unsupported(anchors, () if keys is None else (keys,))
    if reasons:
        pytest.skip("; ".join(reasons))


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("in_batch", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_key_parts_get_gradients_only_where_required(backend, variant, in_batch, reduction):
    # keys given as [part that needs a gradient, detached part (a memory)]: the result is that of
    # the concatenation, the first part gets its gradient, the second none.
    if backend == "triton":
        _triton_or_skip()
    dtype = torch.float32 if backend == "triton" else torch.float64
    anchors, labels, keys, key_labels = make_inputs(29, 50, 6, 4, dtype=dtype, seed=13)
    up = torch.rand(29, dtype=dtype) + 0.5 if reduction == "none" else torch.full((), 1.7)
    up = up.to(dtype)
    kw = dict(in_batch=in_batch, temperature=0.4, variant=variant, reduction=reduction)
    a_ref, k_ref = anchors.clone().requires_grad_(True), keys.clone().requires_grad_(True)
    ref = contrastive_loss(a_ref, labels, k_ref, key_labels, backend="reference", **kw)
    (ref * up).sum().backward()

    a = anchors.clone().requires_grad_(True)
    first, memory = keys[:20].clone().requires_grad_(True), keys[20:].clone()
    loss = contrastive_loss(a, labels, [first, memory], [key_labels[:20], key_labels[20:]],
                            backend=backend, **kw)
    (loss * up).sum().backward()
    assert memory.grad is None
    if dtype == torch.float32:
        mode = "in_batch+keys" if in_batch else "keys"
        options = {k: v for k, v in kw.items() if k != "in_batch"}
        assert_matches_oracle((loss.detach(), a.grad, first.grad), anchors, labels, keys,
                              key_labels, mode, up, key_rows=slice(0, 20), **options)
        return
    tol = dict(rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(loss, ref.detach(), **tol)
    torch.testing.assert_close(a.grad, a_ref.grad, **tol)
    torch.testing.assert_close(first.grad, k_ref.grad[:20], **tol)


def test_key_gradients_only_for_the_key_segments_that_need_one():
    # Each key part is a segment of the layout read in place; a part that needs no gradient (a
    # memory bank) gets no gradient buffer at all.
    from pixcontrast.ops._autograd import segment_key_grads
    from pixcontrast.ops._layout import build_layout
    from pixcontrast.ops._options import ContrastOptions

    anchors, labels, keys, key_labels = make_inputs(17, 40, 5, 3, seed=21)
    parts = (keys[:15], keys[15:])
    layout = build_layout(anchors, labels, parts, key_labels, in_batch=True)
    assert [segment.part for segment in layout.segments] == [None, 0, 1]
    options = ContrastOptions(0.5, 1.0, "paper", "mean")
    weight = torch.ones(17, dtype=anchors.dtype)
    for need_anchor in (False, True):
        for need_parts in [(True, False), (False, True), (False, False)]:
            key_grads = segment_key_grads(layout, need_anchor, need_parts)
            assert key_grads == (need_anchor, *need_parts)
            _, _, _, grads = torch_fused.sweep(layout, options, weight, need_anchor, key_grads)
            assert [grad is not None for grad in grads] == list(key_grads)


def test_product_kind_by_device_and_dtypes(monkeypatch):
    # Tensor cores on CUDA for half-precision anchors and keys of that dtype, where torch has the
    # fp32-output product; keys in another dtype are widened a block at a time, never in full.
    kind = torch_fused.product_kind
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    bf16, fp16, fp32, fp64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
    monkeypatch.setattr(torch_fused, "_MM_OUT_DTYPE", True)
    assert kind(cpu, fp32, fp32) == kind(cuda, fp64, fp64) == kind(cuda, bf16, fp32) == "native"
    assert kind(cuda, bf16, bf16) == kind(cuda, fp16, fp16) == "half"
    assert kind(cpu, bf16, bf16) == kind(cuda, fp32, bf16) == kind(cuda, bf16, fp16) == "widen"
    monkeypatch.setattr(torch_fused, "_MM_OUT_DTYPE", False)
    assert kind(cuda, bf16, bf16) == "widen"


@pytest.mark.parametrize("kind", ["widen", "half"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_half_precision_keys_read_in_their_dtype(kind, variant, monkeypatch):
    # bf16 anchors and keys through each product kind; "half" runs on CPU with a product that
    # does what the CUDA one does (exact products of the operands, fp32 sums). Small blocks of
    # widened keys, and several chunks of rows.
    monkeypatch.setattr(torch_fused, "_WIDEN_ROWS", 7)
    monkeypatch.setattr(torch_fused, "_MIN_CHUNK_ROWS", 8)
    monkeypatch.setattr(torch_fused, "_CHUNK_ELEMENTS", 8 * 90)
    if kind == "half":
        monkeypatch.setattr(torch_fused, "product_kind", lambda device, a, k: (
            "native" if k == torch.float32 else "half"
        ))
        monkeypatch.setattr(torch_fused, "_half_mm", lambda a, b: torch.mm(a.float(), b.float()))
    anchors, labels, keys, key_labels = make_inputs(
        30, 50, 6, 4, dtype=torch.bfloat16, seed=5
    )
    up = torch.rand(30, dtype=torch.bfloat16) + 0.5
    kw = dict(temperature=0.5, variant=variant, reduction="none")
    got = grads_of("torch", anchors, labels, keys, key_labels, "in_batch+keys", up, **kw)
    assert_matches_oracle(got, anchors, labels, keys, key_labels, "in_batch+keys", up,
                          operand_dtype=torch.bfloat16 if kind == "half" else None, **kw)


def test_key_parts_errors_name_the_argument():
    x, y = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    k, c = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="key_labels"):
        contrastive_loss(x, y, [k, k], c)
    with pytest.raises(ValueError, match="key_labels"):
        contrastive_loss(x, y, [k, k], [c])
    with pytest.raises(ValueError, match=r"keys\[1\]"):
        contrastive_loss(x, y, [k, torch.randn(5, 2)], [c, c])
    with pytest.raises(ValueError, match=r"key_labels\[0\]"):
        contrastive_loss(x, y, [k, k], [c[:2], c])
