r"""The contrastive-loss engine: backends, their dispatch and operator, and the math they share.

``reference`` is the dense oracle; ``torch_fused`` and ``triton_fused`` share the contract of
:mod:`pixcontrast.ops._layout` and :mod:`pixcontrast.ops._autograd` and never build the
anchors x keys matrix. ``_dispatch`` picks a backend, ``_operator`` runs the fused ones as the
registered operator ``pixcontrast::contrastive_loss``, ``_inputs`` validates their data. The rest
of the package uses the names this module exports, never its private modules.

**Notation.** Anchors ``x_a`` (``a = 1..N``) with labels ``y_a``; keys ``k_j`` (``j = 1..M``)
with labels ``c_j``; ``s_aj = x_a . k_j / tau``. In-batch contrast means the keys are the
anchors themselves and the pair ``(a, a)`` is excluded. Invalid keys (a negative label: an
ignored pixel, an unfilled memory slot) are excluded everywhere. ``P(a)``: valid keys with
``c_j = y_a`` (positives); ``N(a)``: valid keys with ``c_j != y_a`` (negatives);
``rho = tau / base_tau`` (1 without a base temperature)::

    paper  (per-positive InfoNCE, Wang et al. 2021):
        nu_a  = log sum_{n in N(a)} exp(s_an)
        L_a   = rho / |P(a)| * sum_{p in P(a)} softplus(nu_a - s_ap)

    supcon (Khosla et al. 2020, L_out):
        lam_a = log sum_{j in P(a) u N(a)} exp(s_aj)
        L_a   = rho * (lam_a - 1 / |P(a)| * sum_p s_ap)

Reductions: ``mean`` over the anchors with ``|P(a)| > 0`` (the others neither count nor
contribute), ``sum``, or ``none`` (``[N]``, zero where ``|P(a)| = 0``). Without any anchor that
has a positive, the result is a zero that is still connected to the graph.

**Gradients** (upstream ``g_a``, ``sigma`` the logistic function)::

    paper:  dL_a/ds_ap = -rho / |P(a)| * sigma(nu_a - s_ap)
            dL_a/ds_an =  rho * w_a * exp(s_an - nu_a),  w_a = 1/|P(a)| sum_p sigma(nu_a - s_ap)
    supcon: dL_a/ds_aj =  rho * (exp(s_aj - lam_a) - [j in P(a)] / |P(a)|)

    with G_aj = g_a * dL_a/ds_aj:   dx_a = 1/tau sum_j G_aj k_j,   dk_j = 1/tau sum_a G_aj x_a

So forward only has to keep a few numbers per anchor (``nu_a`` or ``lam_a``, ``w_a``,
``|P(a)|``) and backward can recompute ``s`` a tile at a time, as flash attention does: extra
memory ``O((N + M) D)`` plus one tile.

**Cheap positive terms.** For supcon, ``sum_p s_ap = x_a . (S_{y_a} - [in-batch] x_a) / tau``
with the class sums ``S_c = sum_{j: c_j = c} k_j``: no pass over the positives at all. For
paper, the positives of anchor ``a`` are exactly the keys of class ``y_a``: with keys grouped
by class, the positive pass touches only that block.

**Two products, not three.** For a scalar reduction the upstream ``g_a`` is known in forward,
so forward can turn each chunk of scores into ``G`` in place and accumulate ``dx`` (and ``dk``)
at once; backward then only rescales by the upstream scalar.
"""

from ._autograd import first_derivatives_only
from ._dispatch import (
    BACKEND_NAMES,
    ENV_VAR,
    TRITON_MEASURED_WINS,
    explain_auto,
    select_backend,
)
from ._inputs import check_contrast_inputs, check_contrast_values, check_pair_index
from ._layout import compute_dtype
from ._options import ContrastInputs, ContrastOptions, KeySpace
from .pairs import pair_loss

__all__ = [
    "BACKEND_NAMES",
    "ENV_VAR",
    "TRITON_MEASURED_WINS",
    "ContrastInputs",
    "ContrastOptions",
    "KeySpace",
    "check_contrast_inputs",
    "check_contrast_values",
    "check_pair_index",
    "compute_dtype",
    "explain_auto",
    "first_derivatives_only",
    "pair_loss",
    "select_backend",
]
