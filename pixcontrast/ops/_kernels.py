"""Triton kernels of the fused contrastive loss; launched by :mod:`pixcontrast.ops.triton_fused`.

All kernels work on the class-sorted layout of :mod:`pixcontrast.ops._layout`: sorted anchors
``x [N, D]`` and keys ``k [M, D]``, and per anchor row ``a`` its positive block of key columns
``[pos_lo[a], pos_hi[a])`` and its own column ``self_col[a]`` (``-1`` without in-batch keys; the
self column always lies inside the positive block). A row tile may span several classes, so the
block bounds are per row. Scores ``s = x . k^T / tau`` are recomputed tile by tile and never
written to memory; products take the operands' dtype and accumulate in fp32, and everything
after the product is fp32.

The "softmax columns" of a row are the set of its log-sum-exp (DESIGN.md §1):

    paper:  negatives, every column outside [pos_lo, pos_hi)   ->  nu_a
    supcon: every column but the self column                  ->  lam_a

The reference for every kernel is :func:`pixcontrast.ops.torch_fused.sweep`.
"""

import triton
import triton.language as tl


@triton.jit
def _load_rows(ptr, rows, num_rows, stride, dim, BLOCK_D: tl.constexpr):
    """``[len(rows), BLOCK_D]`` tile of a row-major matrix; rows past ``num_rows`` and the
    padding of ``D`` up to ``BLOCK_D`` read as 0 (zero padding adds nothing to a dot product)."""
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < num_rows) & (offs_d[None, :] < dim)
    offsets = rows[:, None].to(tl.int64) * stride + offs_d[None, :]
    return tl.load(ptr + offsets, mask=mask, other=0.0)


@triton.jit
def _softmax_columns(cols, num_cols, pos_lo, pos_hi, self_col, IS_PAPER: tl.constexpr):
    """``[rows, cols]`` mask of each row's log-sum-exp set (see the module docstring)."""
    col = cols[None, :]
    if IS_PAPER:
        members = (col < pos_lo[:, None]) | (col >= pos_hi[:, None])
    else:
        members = col != self_col[:, None]
    return members & (col < num_cols)


@triton.jit
def _positive_columns(cols, pos_lo, pos_hi, self_col):
    """``[rows, cols]`` mask of the positive pairs: the row's class block minus its own key."""
    col = cols[None, :]
    return (col >= pos_lo[:, None]) & (col < pos_hi[:, None]) & (col != self_col[:, None])


@triton.jit
def _score_gradient(
    scores, cols, num_cols, lse, neg_coef, pos_coef, pos_lo, pos_hi, self_col,
    IS_PAPER: tl.constexpr,
):
    """``G = g_a * dL_a / ds_aj`` on one tile, up to the factor the launcher divided out.

    DESIGN.md §1, with ``e = exp(s - lse)``:

        paper:  G_an = rho * g_a * w_a * e                        (neg_coef = rho * g_a * w_a)
                G_ap = -rho * g_a / |P(a)| * sigma(nu_a - s_ap)
                     = pos_coef / (1 + e)                         (pos_coef = -rho * g_a / |P(a)|)
        supcon: G_aj = rho * g_a * e on every column but the self column (neg_coef = rho * g_a);
                its positive part -rho * g_a / |P(a)| is added outside, through class sums.

    One exponential per element serves both parts. ``e`` may be ``inf`` (a row whose log-sum-exp
    set is empty has ``lse = -inf``, or a positive far above ``nu``): such elements are either
    masked out by ``where`` or give ``pos_coef / inf = 0 = sigma(-inf)``, never NaN.
    """
    e = tl.exp(scores - lse[:, None])
    grad = tl.where(
        _softmax_columns(cols, num_cols, pos_lo, pos_hi, self_col, IS_PAPER),
        neg_coef[:, None] * e,
        0.0,
    )
    if IS_PAPER:
        grad = tl.where(
            _positive_columns(cols, pos_lo, pos_hi, self_col), pos_coef[:, None] / (1.0 + e), grad
        )
    return grad


@triton.jit
def _load_row_terms(
    pos_lo_ptr, pos_hi_ptr, self_col_ptr, lse_ptr, neg_coef_ptr, pos_coef_ptr, rows, row_ok
):
    """Per-row inputs of ``_score_gradient``: positive block, self column, coefficients."""
    pos_lo = tl.load(pos_lo_ptr + rows, mask=row_ok, other=0)
    pos_hi = tl.load(pos_hi_ptr + rows, mask=row_ok, other=0)
    self_col = tl.load(self_col_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    neg_coef = tl.load(neg_coef_ptr + rows, mask=row_ok, other=0.0)
    pos_coef = tl.load(pos_coef_ptr + rows, mask=row_ok, other=0.0)
    return pos_lo, pos_hi, self_col, lse, neg_coef, pos_coef


@triton.jit
def contrast_forward_kernel(
    x_ptr, k_ptr, pos_lo_ptr, pos_hi_ptr, self_col_ptr,
    lse_ptr, softplus_sum_ptr, sigmoid_sum_ptr,
    num_rows, num_cols, dim, stride_x, stride_k, scale,
    IS_PAPER: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per-anchor statistics for one tile of ``BLOCK_N`` rows.

    Writes ``lse`` (nu or lam, ``-inf`` for an empty set) and, for paper,
    ``sum_p softplus(nu - s_ap)`` and ``sum_p sigma(nu - s_ap)`` over the row's positives.
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_rows
    x = _load_rows(x_ptr, rows, num_rows, stride_x, dim, BLOCK_D)
    pos_lo = tl.load(pos_lo_ptr + rows, mask=row_ok, other=0)
    pos_hi = tl.load(pos_hi_ptr + rows, mask=row_ok, other=0)
    self_col = tl.load(self_col_ptr + rows, mask=row_ok, other=-1)

    # Online log-sum-exp over all columns: running maximum and sum of exp(s - maximum).
    running_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, num_cols, BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)
        k = _load_rows(k_ptr, cols, num_cols, stride_k, dim, BLOCK_D)
        scores = tl.dot(x, tl.trans(k), input_precision=PRECISION) * scale
        in_set = _softmax_columns(cols, num_cols, pos_lo, pos_hi, self_col, IS_PAPER)
        scores = tl.where(in_set, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        # While a row has met no member its maximum is -inf; shifting by 0 then keeps
        # exp(-inf - shift) = 0 instead of exp(-inf + inf) = NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(
            tl.exp(scores - shift[:, None]), 1
        )
        running_max = new_max
    lse = running_max + tl.log(running_sum)  # -inf + log(0) = -inf for an empty set
    tl.store(lse_ptr + rows, lse, mask=row_ok)

    if IS_PAPER:
        # Positive pass: only the columns of the tile's positive blocks, which are contiguous
        # because rows and columns are both sorted by class (about M / C columns, not M).
        first = tl.min(tl.where(row_ok, pos_lo, num_cols), 0)
        last = tl.max(tl.where(row_ok, pos_hi, 0), 0)
        softplus_sum = tl.zeros([BLOCK_N], tl.float32)
        sigmoid_sum = tl.zeros([BLOCK_N], tl.float32)
        for start in range(first, last, BLOCK_M):
            cols = start + tl.arange(0, BLOCK_M)
            k = _load_rows(k_ptr, cols, num_cols, stride_k, dim, BLOCK_D)
            scores = tl.dot(x, tl.trans(k), input_precision=PRECISION) * scale
            # t = nu - s_ap. With e = exp(-|t|) <= 1 nothing overflows:
            # softplus(t) = max(t, 0) + log(1 + e), sigma(t) = 1 / (1 + e) for t >= 0 and
            # e / (1 + e) for t < 0. nu = -inf (no negatives) gives 0 for both.
            margin = lse[:, None] - scores
            e = tl.exp(-tl.abs(margin))
            softplus = tl.maximum(margin, 0.0) + tl.log(1.0 + e)
            sigmoid = tl.where(margin >= 0, 1.0, e) / (1.0 + e)
            is_positive = _positive_columns(cols, pos_lo, pos_hi, self_col)
            softplus_sum += tl.sum(tl.where(is_positive, softplus, 0.0), 1)
            sigmoid_sum += tl.sum(tl.where(is_positive, sigmoid, 0.0), 1)
        tl.store(softplus_sum_ptr + rows, softplus_sum, mask=row_ok)
        tl.store(sigmoid_sum_ptr + rows, sigmoid_sum, mask=row_ok)


@triton.jit
def contrast_anchor_grad_kernel(
    x_ptr, k_ptr, pos_lo_ptr, pos_hi_ptr, self_col_ptr, lse_ptr, neg_coef_ptr, pos_coef_ptr,
    grad_x_ptr,
    num_rows, num_cols, dim, stride_x, stride_k, stride_grad, scale,
    IS_PAPER: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``dx_a = 1/tau * sum_j G_aj k_j`` for one tile of rows, recomputing ``s`` tile by tile."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_rows
    x = _load_rows(x_ptr, rows, num_rows, stride_x, dim, BLOCK_D)
    pos_lo, pos_hi, self_col, lse, neg_coef, pos_coef = _load_row_terms(
        pos_lo_ptr, pos_hi_ptr, self_col_ptr, lse_ptr, neg_coef_ptr, pos_coef_ptr, rows, row_ok
    )

    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, num_cols, BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)
        k = _load_rows(k_ptr, cols, num_cols, stride_k, dim, BLOCK_D)
        scores = tl.dot(x, tl.trans(k), input_precision=PRECISION) * scale
        grad = _score_gradient(
            scores, cols, num_cols, lse, neg_coef, pos_coef, pos_lo, pos_hi, self_col, IS_PAPER
        )
        acc = tl.dot(grad.to(k.dtype), k, acc, input_precision=PRECISION)

    offs_d = tl.arange(0, BLOCK_D)
    out = grad_x_ptr + rows[:, None].to(tl.int64) * stride_grad + offs_d[None, :]
    tl.store(out, acc * scale, mask=row_ok[:, None] & (offs_d[None, :] < dim))


@triton.jit
def contrast_key_grad_kernel(
    x_ptr, k_ptr, pos_lo_ptr, pos_hi_ptr, self_col_ptr, lse_ptr, neg_coef_ptr, pos_coef_ptr,
    block_start_ptr, block_stop_ptr, grad_k_ptr,
    num_rows, dim, stride_x, stride_k, stride_grad, scale,
    IS_PAPER: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``dk_j = 1/tau * sum_a G_aj x_a`` for one block of key columns, looping over all rows.

    Each program owns its columns ``[block_start, block_stop)`` (a table, so that only the
    columns that need a gradient are visited) and writes them once: no atomics.
    """
    block = tl.program_id(0)
    col_stop = tl.load(block_stop_ptr + block)
    cols = tl.load(block_start_ptr + block) + tl.arange(0, BLOCK_M)
    k = _load_rows(k_ptr, cols, col_stop, stride_k, dim, BLOCK_D)

    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, num_rows, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        row_ok = rows < num_rows
        x = _load_rows(x_ptr, rows, num_rows, stride_x, dim, BLOCK_D)
        pos_lo, pos_hi, self_col, lse, neg_coef, pos_coef = _load_row_terms(
            pos_lo_ptr, pos_hi_ptr, self_col_ptr, lse_ptr, neg_coef_ptr, pos_coef_ptr, rows, row_ok
        )
        scores = tl.dot(x, tl.trans(k), input_precision=PRECISION) * scale
        grad = _score_gradient(
            scores, cols, col_stop, lse, neg_coef, pos_coef, pos_lo, pos_hi, self_col, IS_PAPER
        )
        acc = tl.dot(tl.trans(grad.to(x.dtype)), x, acc, input_precision=PRECISION)

    offs_d = tl.arange(0, BLOCK_D)
    out = grad_k_ptr + cols[:, None].to(tl.int64) * stride_grad + offs_d[None, :]
    tl.store(out, acc * scale, mask=(cols[:, None] < col_stop) & (offs_d[None, :] < dim))
