"""Shared test helpers: the scalar loop oracle of the loss, the tolerance rule for low-precision
results with the dense fp64 oracle of the score gradient it needs, and input factories.

The tolerance rule
------------------
A low-precision result ``got`` is compared with an fp64 oracle ``exact`` (the reference backend on
fp64 copies of the very same input values) and passes when, element by element,

    |got - exact| <= MULTIPLE * max|ref_lowp - exact| + floor

``ref_lowp`` is the reference backend's own result in the precision under test (flash attention's
rule): a fused path may err a few times as much as the dense computation does on the same inputs,
whatever order this CPU's kernels sum in, because the reference's error grows with the same sums.
That term alone fails where the reference happens to be exact and a correct fused path is not
(a gradient that is an exact 0 in the dense formula, ``exp(s - lam) - 1`` with ``lam = s``, is a
difference of two rounded numbers when the scores are recomputed). ``floor`` covers that case: an
elementwise bound on the rounding error of *any* correct computation in that precision, built from
the magnitudes of the summed terms, never from the result.

Its unit is the probabilistic rounding bound of Higham & Mary ("A new approach to probabilistic
rounding error analysis", SIAM J. Sci. Comput. 2019): a sum or dot product of ``n`` terms, in any
order, errs by at most ``gamma(n) * sum |term|`` with ``gamma(n) = LAMBDA * sqrt(n) * u`` (to
first order; ``u`` the unit roundoff), with probability at least ``1 - 2 n exp(-LAMBDA**2 / 2)``
when rounding errors are independent and of mean zero. The worst-case bound
``n * u * sum |term|`` holds always but grows as ``n``, not ``sqrt(n)`` (8 times looser at
n = 4096); :func:`gamma` takes it where it is the smaller one. :func:`contrast_floors` carries
the bound through the loss (scores, log-sum-exp, the gradient products); errors of different
anchors, whose signs are independent, are added in absolute value, a safe over-estimate.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import NamedTuple, Optional, Sequence, Union

import pytest
import torch
from torch import Tensor

#: The low-precision result may err this many times as much as the reference does.
MULTIPLE = 3.0
#: The probabilistic bound's lambda: a correct sum of n terms exceeds it with probability below
#: 2 n exp(-LAMBDA**2 / 2) = 2 n exp(-32), about 3e-10 for n = 1e4.
LAMBDA = 8.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u = eps / 2``: the relative error of one correctly rounded operation in ``dtype``."""
    return torch.finfo(dtype).eps / 2


def gamma(n: Union[int, Tensor], dtype: torch.dtype = torch.float32) -> Union[float, Tensor]:
    """Relative error bound of a sum of ``n`` terms in ``dtype`` (of ``sum |term|``), in any
    order: the probabilistic ``LAMBDA sqrt(n) u``, or the worst case ``n u`` where that is
    smaller (``n < LAMBDA**2``)."""
    if isinstance(n, Tensor):
        n = n.clamp(min=1).double()
        return torch.minimum(n, LAMBDA * n.sqrt()) * unit_roundoff(dtype)
    n = max(n, 1)
    return min(n, LAMBDA * math.sqrt(n)) * unit_roundoff(dtype)


def assert_close_to_oracle(
    got: Tensor,
    exact: Tensor,
    ref_lowp: Tensor,
    floor: Union[Tensor, float],
    *,
    multiple: float = MULTIPLE,
    what: str = "",
) -> None:
    """``|got - exact| <= multiple * max|ref_lowp - exact| + floor + u(got) |exact|`` everywhere.

    ``exact`` is the fp64 oracle, ``ref_lowp`` the reference in the precision under test,
    ``floor`` an elementwise bound on the rounding error of a correct computation (from
    :func:`contrast_floors`, or ``gamma(n) * sum |terms|`` for a plain sum). The last term is the
    rounding of the result to its own dtype (fp16 and bf16 gradients are returned in the inputs'
    dtype).
    """
    assert got.shape == exact.shape == ref_lowp.shape, (what, got.shape, exact.shape)
    exact = exact.double()
    error = (got.double() - exact).abs()
    if not error.numel():
        return
    reference_error = (ref_lowp.double() - exact).abs().max()
    floor = torch.as_tensor(floor, dtype=torch.float64)
    bound = multiple * reference_error + floor + unit_roundoff(got.dtype) * exact.abs()
    excess = error - bound
    worst = int(excess.argmax())
    assert excess.max() <= 0, (
        f"{what}: error {error.flatten()[worst]:.3g} at flat index {worst} exceeds "
        f"{bound.flatten()[worst]:.3g} ({multiple:g} x the reference's {reference_error:.3g} "
        f"+ floor {floor.expand_as(error).flatten()[worst]:.3g}); largest error {error.max():.3g}"
    )


# --- the loop oracle --------------------------------------------------------------------------


def key_space(anchors: Tensor, keys: Optional[Tensor], in_batch: bool) -> Tensor:
    """The columns an anchor is contrasted with: the anchors (when in-batch), then the keys."""
    parts = ([anchors] if in_batch else []) + ([keys] if keys is not None else [])
    return torch.cat(parts) if parts else anchors.new_zeros((0, anchors.shape[1]))


def all_pairs(
    labels: Tensor, key_labels: Optional[Tensor], in_batch: bool
) -> tuple[list[list[int]], list[list[int]]]:
    """Per anchor, the columns of :func:`key_space` that are its positives and its negatives: the
    valid keys (label >= 0) of its class and of other classes, its own column excluded."""
    space = ([labels] if in_batch else []) + ([key_labels] if key_labels is not None else [])
    columns = torch.cat(space).tolist() if space else []
    positives, negatives = [], []
    for a, y in enumerate(labels.tolist()):
        usable = [(j, c) for j, c in enumerate(columns) if c >= 0 and not (in_batch and j == a)]
        positives.append([j for j, c in usable if c == y])
        negatives.append([j for j, c in usable if c != y])
    return positives, negatives


def loop_loss(
    anchors: Tensor,
    space: Tensor,
    positives: Sequence[Sequence[int]],
    negatives: Sequence[Sequence[int]],
    temperature: float,
    rho: float,
    variant: str,
    reduction: str,
) -> Tensor:
    """The loss read literally, one anchor and one pair at a time, on the listed columns of
    ``space`` (a column listed twice counts twice); differentiable:

        paper:  L_a = rho / |P| sum_p -log(e^{s_ap} / (e^{s_ap} + sum_n e^{s_an}))
        supcon: L_a = rho (log sum_{j in P u N} e^{s_aj} - 1/|P| sum_p s_ap)

    An anchor without positives has L_a = 0 and is left out of the mean."""
    losses = []
    for a in range(anchors.shape[0]):
        pos, neg = list(positives[a]), list(negatives[a])

        def s(j: int, a: int = a) -> Tensor:
            return (anchors[a] * space[j]).sum() / temperature

        if not pos:
            losses.append(anchors.new_zeros(()))
        elif variant == "paper":
            terms = []
            for q in pos:
                denominator = torch.exp(s(q)) + sum(torch.exp(s(n)) for n in neg)
                terms.append(-torch.log(torch.exp(s(q)) / denominator))
            losses.append(rho * sum(terms) / len(pos))
        else:
            log_total = torch.log(sum(torch.exp(s(j)) for j in pos + neg))
            losses.append(rho * (log_total - sum(s(q) for q in pos) / len(pos)))
    loss = torch.stack(losses) if losses else anchors.new_zeros(0)
    if reduction == "none":
        return loss
    counted = sum(1 for pos in positives if len(pos))
    return loss.sum() if reduction == "sum" else loss.sum() / max(counted, 1)


# --- the dense fp64 oracle of the score gradient ------------------------------------------------


class ScoreGradient(NamedTuple):
    """The loss's gradient with respect to the scores ``s = x K^T / tau`` (``K`` the key space:
    the anchors when in-batch, then the keys), from the closed forms of the ``ops`` package:

        paper:  G_ap = -rho g_a / |P(a)| sigmoid(nu_a - s_ap),  G_an = rho g_a w_a exp(s_an - nu_a)
        supcon: G_aj = rho g_a (exp(s_aj - lam_a) - [j in P(a)] / |P(a)|)

    ``pieces`` is the same with every piece taken in absolute value (supcon's two pieces
    added, not subtracted): the magnitude of what a low-precision computation rounds.
    """

    signed: Tensor  # [N, K]
    pieces: Tensor  # [N, K]
    key_space: Tensor  # [K, D]
    abs_scores: Tensor  # [N, K]: sum_d |x_ad| |k_jd| / tau, the magnitude of each score's terms
    has_positive: Tensor  # [N] bool: the anchors that count
    losses: Tensor  # [N]: the per-anchor loss


def score_gradient(
    anchors: Tensor,
    labels: Tensor,
    keys: Optional[Tensor],
    key_labels: Optional[Tensor],
    in_batch: bool,
    temperature: float,
    rho: float,
    variant: str,
    upstream: Tensor,
) -> ScoreGradient:
    """:class:`ScoreGradient` in fp64; ``upstream`` is ``g_a`` (``[N]``, or a scalar for all)."""
    x = anchors.detach().double()
    n = x.shape[0]
    space, space_labels = [], []
    if in_batch:
        space.append(x)
        space_labels.append(labels)
    if keys is not None:
        space.append(keys.detach().double())
        space_labels.append(key_labels)
    k = torch.cat(space) if space else x.new_zeros((0, x.shape[1]))
    c = torch.cat(space_labels) if space_labels else labels.new_zeros(0)
    scores = x @ k.T / temperature
    valid = (c >= 0)[None, :].expand(n, -1).clone()
    if in_batch:
        valid[:, :n] &= ~torch.eye(n, dtype=torch.bool)
    positive = valid & (labels[:, None] == c[None, :])
    negative = valid & ~positive
    num_pos = positive.sum(dim=1).double()
    has_pos = num_pos > 0
    g = torch.as_tensor(upstream, dtype=torch.float64).expand(n) * has_pos
    minus_inf = torch.tensor(-math.inf, dtype=torch.float64)

    def logsumexp(mask: Tensor) -> Tensor:
        return torch.logsumexp(torch.where(mask, scores, minus_inf), dim=1)

    zero = torch.zeros_like(scores)
    if variant == "paper":
        nu = logsumexp(negative)
        sig = torch.where(positive, torch.sigmoid(nu[:, None] - scores), zero)
        w = sig.sum(dim=1) / num_pos.clamp(min=1)
        has_neg = negative.any(dim=1)
        softmax = torch.where(negative & has_neg[:, None],
                              torch.exp(scores - torch.where(has_neg, nu, 0)[:, None]), zero)
        pos_part = -rho * g[:, None] * sig / num_pos.clamp(min=1)[:, None]
        neg_part = rho * (g * w)[:, None] * softmax
        signed = pos_part + neg_part
        pieces = pos_part.abs() + neg_part.abs()
        softplus = torch.where(positive, torch.logaddexp(nu[:, None] - scores, zero), zero)
        losses = rho * softplus.sum(dim=1) / num_pos.clamp(min=1)
    else:
        lam = logsumexp(valid)
        softmax = torch.where(valid & has_pos[:, None], torch.exp(scores - lam[:, None]), zero)
        share = positive / num_pos.clamp(min=1)[:, None]
        signed = rho * g[:, None] * (softmax - share)
        pieces = rho * g.abs()[:, None] * (softmax + share)
        pos_mean = torch.where(positive, scores, zero).sum(dim=1) / num_pos.clamp(min=1)
        losses = rho * (torch.where(has_pos, lam, 0) - pos_mean)
    losses = torch.where(has_pos, losses, 0)
    abs_scores = x.abs() @ k.abs().T / temperature
    return ScoreGradient(signed, pieces, k, abs_scores, has_pos, losses)


class ContrastFloors(NamedTuple):
    """Rounding-error floors, each shaped like the quantity it bounds."""

    loss: Tensor  # the loss, reduced as asked
    anchors: Tensor  # [N, D] d anchors (their rows, plus their columns when in-batch)
    keys: Optional[Tensor]  # [M, D] d keys
    rows: Tensor  # [N, D] the part sum_j G_aj k_j / tau of d anchors
    columns: Tensor  # [K, D] sum_a G_aj x_a / tau for every column of the key space
    log_normalizer: Tensor  # [N] nu_a (paper) or lam_a (supcon)


def contrast_floors(
    anchors: Tensor,
    labels: Tensor,
    keys: Optional[Tensor],
    key_labels: Optional[Tensor],
    *,
    in_batch: bool,
    temperature: float,
    rho: float,
    variant: str,
    reduction: str,
    upstream: Tensor,
    dtype: torch.dtype = torch.float32,
    operand_dtype: Optional[torch.dtype] = None,
) -> ContrastFloors:
    """Rounding-error floors of the loss and of ``d anchors``, ``d keys`` under ``upstream``
    (the tensor the loss is multiplied by before ``.sum().backward()``), for a computation that
    accumulates in ``dtype`` and may round the gradient to ``operand_dtype`` before its products.

    With :func:`gamma` the relative bound of a sum, ``D`` the dimension, ``M`` the width of the
    key space and ``A_aj = sum_d |x_ad k_jd| / tau`` the magnitude of a score's terms, first order:

    - a score ``s_aj`` errs by at most ``e_a = gamma(D + 1) max_j A_aj`` (``D`` products and the
      division by ``tau``);
    - a log-sum-exp of a row is 1-Lipschitz in its scores and adds ``gamma(M)`` (its sum of
      exponentials, relatively; the log turns that into an absolute error);
    - each piece of ``G`` is an exponential or sigmoid of scores and log-normalisers, times the
      paper variant's ``w_a`` (a mean of sigmoids), so an absolute error ``t`` of those
      arguments is a relative error of at most ``expm1(t)``: ``r_a = expm1(4 e_a + 2 gamma(M))
      + u(operand_dtype)``, the last when ``G`` is rounded for the products (``expm1``, not
      ``t``, keeps the bound valid for scores so large that fp32 rounds them by ~0.1);
    - ``dx_a = sum_j G_aj k_j / tau`` then errs by ``sum_j |G_aj| (r_a + gamma(M)) |k_j| / tau``,
      ``dk_j`` likewise over the ``N`` anchors, and in-batch anchors get both (row and column);
    - ``L_a`` errs by ``rho (2 e_a + gamma(M)) + gamma(M) |L_a|``, plus, for supcon, whose
      positive term goes through class sums of up to ``M`` keys, ``rho gamma(D + M) max_j A_aj``;
      a ``sum`` or ``mean`` adds ``gamma(N) sum_a |L_a|``.

    These bound every summed term, not their (cancelling) sums, so they are pessimistic: over
    the fp32 cases of ``test_torch_matches_reference`` (AVX2 and the portable default) the
    errors seen stay below 1/20 of the floor, most below 1/1000. They still sit far below any one
    term of the gradient: a dropped key, a temperature off by 1e-4 or an entry off by 1e-3 of
    its row's largest fails (``test_tolerance_rule_passes_other_summation_orders_and_fails_...``).
    """
    n, dim = anchors.shape
    m = keys.shape[0] if keys is not None else 0
    up = torch.as_tensor(upstream, dtype=torch.float64)
    scalar = reduction != "none"
    grad = score_gradient(anchors, labels, keys, key_labels, in_batch, temperature, rho, variant,
                          torch.ones(()) if scalar else up)
    count = int(grad.has_positive.sum())
    width = grad.key_space.shape[0]
    largest_score = grad.abs_scores.amax(dim=1) if width else torch.zeros(n, dtype=torch.float64)
    score_error = gamma(dim + 1, dtype) * largest_score  # [N]
    u_op = unit_roundoff(operand_dtype) if operand_dtype is not None else 0.0
    relative = torch.expm1(4 * score_error + 2 * gamma(width, dtype)) + u_op  # [N]

    loss_terms = rho * (2 * score_error + gamma(width, dtype)) + gamma(width, dtype) * grad.losses
    if variant == "supcon":
        loss_terms = loss_terms + rho * gamma(dim + width, dtype) * largest_score
    loss_terms = torch.where(grad.has_positive, loss_terms, 0)
    if reduction == "none":
        loss_floor = loss_terms
    else:
        loss_floor = loss_terms.sum() + gamma(n, dtype) * grad.losses.abs().sum()
        if reduction == "mean":
            loss_floor = loss_floor / max(count, 1)

    # for a scalar reduction every G_aj carries the same factor: the upstream (over the count)
    factor = (up.abs() / (max(count, 1) if reduction == "mean" else 1)) if scalar else 1.0
    pieces = grad.pieces * factor
    x_abs = anchors.detach().double().abs()
    k_abs = grad.key_space.abs()
    rows = (pieces * (relative + gamma(width, dtype))[:, None]) @ k_abs / temperature
    columns = (pieces * (relative + gamma(n, dtype))[:, None]).T @ x_abs / temperature
    anchor_floor = rows
    if in_batch:
        anchor_floor = anchor_floor + columns[:n]
    key_floor = columns[width - m:] if keys is not None else None
    normalizer = score_error + gamma(width, dtype)
    return ContrastFloors(loss_floor, anchor_floor, key_floor, rows, columns, normalizer)


# --- input factories --------------------------------------------------------------------------


def make_inputs(
    n: int,
    m: int,
    d: int,
    classes: int,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    invalid_keys: bool = True,
    device: Union[str, torch.device] = "cpu",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gaussian anchors ``[n, d]`` with labels in ``[0, classes)`` and keys ``[m, d]`` whose
    labels may be -1 (invalid) when ``invalid_keys``; drawn on CPU (the same values on every
    device), then moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    anchors = torch.randn(n, d, generator=g, dtype=dtype)
    labels = torch.randint(0, classes, (n,), generator=g)
    keys = torch.randn(m, d, generator=g, dtype=dtype)
    low = -1 if invalid_keys else 0
    key_labels = torch.randint(low, classes, (m,), generator=g)
    return anchors.to(device), labels.to(device), keys.to(device), key_labels.to(device)


def make_maps(
    b: int = 2,
    d: int = 8,
    h: int = 6,
    w: int = 5,
    classes: int = 3,
    scale: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: Union[str, torch.device] = "cpu",
) -> tuple[Tensor, Tensor]:
    """Gaussian embedding maps ``[b, d, h, w]`` and label maps ``[b, h * scale, w * scale]`` in
    ``[0, classes)``; drawn on CPU, then moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(b, d, h, w, generator=g, dtype=dtype)
    labels = torch.randint(0, classes, (b, h * scale, w * scale), generator=g)
    return embeddings.to(device), labels.to(device)


def as_double(tensors: Sequence[Optional[Tensor]]) -> list[Optional[Tensor]]:
    """fp64 copies of the floating-point tensors (the oracle's inputs), others as they are."""
    return [t.detach().double() if t is not None and t.is_floating_point() else t
            for t in tensors]


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> ModuleType:
    """The script ``examples/<name>.py`` as a module (registered in ``sys.modules``, which
    dataclasses look their module up in while a class is built)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# Put on PYTHONPATH as sitecustomize, it runs in every process torchrun starts: at exit (before
# interpreter shutdown), each rank writes the names of the threads it still has.
_RECORD_THREADS_AT_EXIT = """
import atexit, os

def record_threads():
    names = [open(f"/proc/self/task/{task}/comm").read().strip()
             for task in os.listdir("/proc/self/task")]
    path = os.path.join(os.environ["THREADS_AT_EXIT"], "rank" + os.environ["RANK"])
    with open(path, "w") as out:
        out.write("\\n".join(names))

if "RANK" in os.environ:
    atexit.register(record_threads)
"""


class TorchrunRun(NamedTuple):
    """What :func:`torchrun` saw: the finished command and, per rank, its threads at exit."""

    completed: subprocess.CompletedProcess
    threads_at_exit: list[list[str]]

    def assert_clean_exit(self) -> None:
        """Every rank exited 0 with no gloo thread left to race interpreter shutdown."""
        assert self.completed.returncode == 0, self.completed.stderr[-3000:]
        for rank, threads in enumerate(self.threads_at_exit):
            gloo = [name for name in threads if "gloo" in name]
            assert threads and not gloo, f"rank {rank} threads at exit: {threads}"


def torchrun(args: Sequence[str], processes: int, cwd: Path, scratch: Path) -> TorchrunRun:
    """``torchrun --standalone --nproc_per_node=<processes> <args>`` from ``cwd``.

    ``--standalone`` takes a free port, not the default one that other runs may hold. The names
    of each rank's threads at exit (read from ``/proc``: skipped elsewhere than Linux) show a gloo
    worker that outlives ``destroy_process_group`` every time, where the exit code fails only
    when such a worker loses its race with interpreter shutdown (releasing a collective's tensors
    there needs the GIL, and the process aborts).
    """
    if not Path("/proc/self/task").is_dir():
        pytest.skip("threads at exit are read from /proc")
    (scratch / "sitecustomize.py").write_text(_RECORD_THREADS_AT_EXIT)
    path = os.pathsep.join(filter(None, [str(scratch), os.environ.get("PYTHONPATH")]))
    completed = subprocess.run(
        [str(Path(sys.executable).with_name("torchrun")), "--standalone",
         f"--nproc_per_node={processes}", *args],
        cwd=cwd, env={**os.environ, "PYTHONPATH": path, "THREADS_AT_EXIT": str(scratch)},
        capture_output=True, text=True, timeout=300,
    )
    records = [scratch / f"rank{rank}" for rank in range(processes)]
    threads = [record.read_text().split() if record.exists() else [] for record in records]
    return TorchrunRun(completed, threads)
