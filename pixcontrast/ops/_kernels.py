"""Triton kernels of the fused contrastive loss; launched by :mod:`pixcontrast.ops.triton_fused`.

All kernels work on the class-sorted layout of :mod:`pixcontrast.ops._layout`: sorted anchors
``x [N, D]`` and keys ``k [M, D]``, and per anchor row ``a`` its positive block of key columns
``[pos_lo[a], pos_hi[a])`` and its own column ``self_col[a]`` (``-1`` without in-batch keys; the
self column always lies inside the positive block). A row tile may span several classes, so the
block bounds are per row. Scores are recomputed tile by tile and never written to memory;
products take the operands' dtype and accumulate in fp32, everything after the product is fp32.

Scores are kept in base 2: ``s2 = x . k^T * scale2`` with ``scale2 = log2(e) / tau`` (folded by
the launcher), and the product ``x . k^T`` is scaled inside the exponent, so that each
exponential is one fused multiply-add and one ``exp2``: ``exp2(dot * scale2 - shift2)``.
Statistics written to memory are natural logarithms, the contract shared with the torch path.

The statistics loop rescales lazily (FlashAttention-4): exponentials are taken against a
reference maximum that is raised only when some row's maximum grows past it by more than
``RESCALE_THRESHOLD`` (base 2), so that the ``[rows, D]`` accumulator is rescaled on a few
tiles, not on every one. Every term stays at most ``2 ** RESCALE_THRESHOLD`` times its row's
reference, far from fp32's (and fp16's) range, and the result is the same sum up to rounding.

The "softmax columns" of a row are the set of its log-sum-exp (the math of :mod:`pixcontrast.ops`):

    paper:  negatives, every column outside [pos_lo, pos_hi)   ->  nu_a
    supcon: every column but the self column                  ->  lam_a

Only tiles that touch a boundary (the rows' positive blocks for paper, their self columns for
supcon, the end of the keys) evaluate that membership mask; every other tile is all members.

Flash-decoding split: the row kernels run on a grid of ``(row tiles, splits)``; each split takes
an even share of whole key tiles and writes partial results, which
:func:`combine_statistics_kernel` and :func:`sum_splits_kernel` reduce in the fixed order of the
splits (deterministic, no atomics).

The reference for every kernel is :func:`pixcontrast.ops.torch_fused.sweep`.
"""

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)
LOG2E = tl.constexpr(1.4426950408889634)
# Base-2 growth of a row's maximum past its reference that triggers a rescale (FlashAttention-4's
# value): terms are at most 2^8 times the reference, so fp16 casts of them cannot overflow.
RESCALE_THRESHOLD = tl.constexpr(8.0)


@triton.jit
def _load_rows(ptr, rows, num_rows, stride, dim, BLOCK_D: tl.constexpr):
    """``[len(rows), BLOCK_D]`` tile of a row-major matrix.

    Rows past ``num_rows`` and the padding of ``D`` up to ``BLOCK_D`` read as 0 (zero padding adds
    nothing to a dot product).
    """
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < num_rows) & (offs_d[None, :] < dim)
    offsets = rows[:, None].to(tl.int64) * stride + offs_d[None, :]
    return tl.load(ptr + offsets, mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, value, rows, num_rows, stride, dim, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offsets = rows[:, None].to(tl.int64) * stride + offs_d[None, :]
    tl.store(ptr + offsets, value, mask=(rows[:, None] < num_rows) & (offs_d[None, :] < dim))


@triton.jit
def _row_tile(
    start, x_ptr, pos_lo_ptr, pos_hi_ptr, self_col_ptr, num_rows, stride_x, dim,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The anchor rows ``start:start + BLOCK_N`` of a row tile.

    Returns their indices, validity, embeddings and positive block ``[pos_lo, pos_hi)`` with own
    column ``self_col`` (-1: none).
    """
    rows = start + tl.arange(0, BLOCK_N)
    row_ok = rows < num_rows
    x = _load_rows(x_ptr, rows, num_rows, stride_x, dim, BLOCK_D)
    pos_lo = tl.load(pos_lo_ptr + rows, mask=row_ok, other=0)
    pos_hi = tl.load(pos_hi_ptr + rows, mask=row_ok, other=0)
    self_col = tl.load(self_col_ptr + rows, mask=row_ok, other=-1)
    return rows, row_ok, x, pos_lo, pos_hi, self_col


@triton.jit
def _positive_range(pos_lo, pos_hi, row_ok, num_cols):
    """``[first, last)``: the union of the tile rows' positive blocks.

    One contiguous range, because rows and columns are both sorted by class.
    """
    first = tl.min(tl.where(row_ok, pos_lo, num_cols), 0)
    last = tl.max(tl.where(row_ok, pos_hi, 0), 0)
    return first, last


@triton.jit
def _masked_range(pos_lo, pos_hi, self_col, row_ok, num_cols, IS_PAPER: tl.constexpr):
    """``[lo, hi)``: the columns where some tile row's membership is not "all members"."""
    if IS_PAPER:
        lo, hi = _positive_range(pos_lo, pos_hi, row_ok, num_cols)
    else:
        has_self = row_ok & (self_col >= 0)
        lo = tl.min(tl.where(has_self, self_col, num_cols), 0)
        hi = tl.max(tl.where(has_self, self_col + 1, 0), 0)
    return lo, hi


@triton.jit
def _split_columns(split, num_splits, num_cols, BLOCK_M: tl.constexpr):
    """``[begin, end)``: split ``split``'s share of whole key tiles, as even as it gets.

    No split is empty while there are at least as many tiles as splits.
    """
    num_tiles = tl.cdiv(num_cols, BLOCK_M)
    begin = (split * num_tiles // num_splits) * BLOCK_M
    end = tl.minimum(((split + 1) * num_tiles // num_splits) * BLOCK_M, num_cols)
    return begin, end


@triton.jit
def _touches(start, BLOCK: tl.constexpr, lo, hi):
    """Whether the tile of columns ``[start, start + BLOCK)`` intersects ``[lo, hi)``."""
    return (start < hi) & (start + BLOCK > lo)


@triton.jit
def _members(col, pos_lo, pos_hi, self_col, num_cols, IS_PAPER: tl.constexpr):
    """Membership of each (row, column) pair in the row's log-sum-exp set.

    ``col`` and the row terms come broadcast to the tile's orientation.
    """
    if IS_PAPER:
        members = (col < pos_lo) | (col >= pos_hi)
    else:
        members = col != self_col
    return members & (col < num_cols)


@triton.jit
def _positives(col, pos_lo, pos_hi, self_col):
    """The positive pairs: the row's class block minus its own key (broadcast as ``_members``)."""
    return (col >= pos_lo) & (col < pos_hi) & (col != self_col)


@triton.jit
def _score_gradient(
    s2, col, num_cols, lse2, neg_coef, pos_coef, pos_lo, pos_hi, self_col,
    MASKED, HAS_POSITIVES, IS_PAPER: tl.constexpr,
):
    """``G = g_a * dL_a / ds_aj`` on one tile, up to the factor the launcher divided out.

    the gradients of :mod:`pixcontrast.ops`, with ``e = exp(s - lse)``:

        paper:  G_an = rho * g_a * w_a * e                        (neg_coef = rho * g_a * w_a)
                G_ap = -rho * g_a / |P(a)| * sigma(nu_a - s_ap)
                     = pos_coef / (1 + e)                         (pos_coef = -rho * g_a / |P(a)|)
        supcon: G_aj = rho * g_a * e on every column but the self column (neg_coef = rho * g_a);
                its positive part -rho * g_a / |P(a)| is added outside, through class sums.

    Row terms and ``col`` come broadcast to the tile's orientation. ``MASKED``: the tile touches
    a boundary; ``HAS_POSITIVES``: it intersects a positive block (paper). ``e`` may be ``inf``
    (a row whose log-sum-exp set is empty has ``lse = -inf``, or a positive far above ``nu``):
    such elements are masked out by ``where`` or give ``pos_coef / inf = 0 = sigma(-inf)``.
    """
    e = tl.exp2(s2 - lse2)
    grad = neg_coef * e
    if MASKED:
        grad = tl.where(_members(col, pos_lo, pos_hi, self_col, num_cols, IS_PAPER), grad, 0.0)
    if IS_PAPER:
        if HAS_POSITIVES:
            grad = tl.where(_positives(col, pos_lo, pos_hi, self_col), pos_coef / (1.0 + e), grad)
    return grad


@triton.jit
def contrast_statistics_kernel(
    x_ptr, k_ptr, pos_lo_ptr, pos_hi_ptr, self_col_ptr,
    part_max_ptr, part_sum_ptr, part_acc_ptr,
    num_rows, num_cols, dim, stride_x, stride_k, scale2,
    IS_PAPER: tl.constexpr, STREAM_GRAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partial online log-sum-exp of one row tile over one split's key columns.

    Writes, per split and row, a reference ``m`` of ``s2`` (``-inf``: the row met no member in
    the split), ``l = sum exp2(s2 - m)`` over the row's members and, with ``STREAM_GRAD``,
    ``acc = sum exp2(s2 - m) k`` ``[D]``: attention with V = K, so that the negative part of
    ``dx`` costs no second pass. ``m`` is within ``RESCALE_THRESHOLD`` below the split's maximum
    (lazy rescaling); :func:`combine_statistics_kernel` takes any reference.
    """
    split = tl.program_id(1)
    rows, row_ok, x, pos_lo, pos_hi, self_col = _row_tile(
        tl.program_id(0) * BLOCK_N, x_ptr, pos_lo_ptr, pos_hi_ptr, self_col_ptr, num_rows,
        stride_x, dim, BLOCK_N, BLOCK_D,
    )
    mask_lo, mask_hi = _masked_range(pos_lo, pos_hi, self_col, row_ok, num_cols, IS_PAPER)
    col_begin, col_end = _split_columns(split, tl.num_programs(1), num_cols, BLOCK_M)

    reference = tl.full([BLOCK_N], float("-inf"), tl.float32)  # base 2
    # The reference, or 0 while it is -inf (then every term so far was a non-member's
    # exp2(-inf) = 0, and 0 keeps exp2(-inf - shift) = 0 instead of NaN).
    shift = tl.zeros([BLOCK_N], tl.float32)
    running_sum = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(col_begin, col_end, BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)
        k = _load_rows(k_ptr, cols, num_cols, stride_k, dim, BLOCK_D)
        dot = tl.dot(x, tl.trans(k), input_precision=PRECISION)
        if _touches(start, BLOCK_M, mask_lo, mask_hi) | (start + BLOCK_M > num_cols):
            members = _members(
                cols[None, :], pos_lo[:, None], pos_hi[:, None], self_col[:, None], num_cols,
                IS_PAPER,
            )
            dot = tl.where(members, dot, float("-inf"))
        tile_max = tl.max(dot, 1) * scale2
        # -inf + threshold stays -inf: a row's first member always raises its reference.
        grown = tile_max > reference + RESCALE_THRESHOLD
        if tl.max(grown.to(tl.int32), 0) > 0:
            new_reference = tl.maximum(reference, tile_max)
            new_shift = tl.where(new_reference == float("-inf"), 0.0, new_reference)
            alpha = tl.exp2(reference - new_shift)
            running_sum = running_sum * alpha
            if STREAM_GRAD:
                acc = acc * alpha[:, None]
            reference = new_reference
            shift = new_shift
        p = tl.exp2(dot * scale2 - shift[:, None])
        running_sum += tl.sum(p, 1)
        if STREAM_GRAD:
            acc = tl.dot(p.to(k.dtype), k, acc, input_precision=PRECISION)
    out = split * num_rows + rows
    tl.store(part_max_ptr + out, reference, mask=row_ok)
    tl.store(part_sum_ptr + out, running_sum, mask=row_ok)
    if STREAM_GRAD:
        _store_rows(part_acc_ptr + split * num_rows * dim, acc, rows, num_rows, dim, dim, BLOCK_D)


@triton.jit
def combine_statistics_kernel(
    part_max_ptr, part_sum_ptr, part_acc_ptr, lse_ptr, mean_key_ptr,
    num_rows, dim, num_splits,
    STREAM_GRAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merges the splits of :func:`contrast_statistics_kernel`, in split order.

    Writes ``lse`` (natural log; ``-inf`` for an empty set) and, with ``STREAM_GRAD``,
    ``mean_key = sum_j exp(s_aj - lse_a) k_j`` over the row's set (0 for an empty set).
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_rows
    running_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for split in range(num_splits):
        part = split * num_rows + rows
        part_max = tl.load(part_max_ptr + part, mask=row_ok, other=float("-inf"))
        part_sum = tl.load(part_sum_ptr + part, mask=row_ok, other=0.0)
        new_max = tl.maximum(running_max, part_max)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = tl.exp2(running_max - shift)
        beta = tl.exp2(part_max - shift)
        running_sum = running_sum * alpha + part_sum * beta
        if STREAM_GRAD:
            part_acc = _load_rows(
                part_acc_ptr + split * num_rows * dim, rows, num_rows, dim, dim, BLOCK_D
            )
            acc = acc * alpha[:, None] + part_acc * beta[:, None]
        running_max = new_max
    tl.store(lse_ptr + rows, (running_max + tl.log2(running_sum)) * LN2, mask=row_ok)
    if STREAM_GRAD:
        inverse = tl.where(running_sum > 0, 1.0 / running_sum, 0.0)
        _store_rows(mean_key_ptr, acc * inverse[:, None], rows, num_rows, dim, dim, BLOCK_D)


@triton.jit
def _multiply(a, b):
    return a * b


@triton.jit
def paper_positive_kernel(
    x_ptr, k_ptr, self_col_ptr, lse_ptr, tiles_ptr,
    part_terms_ptr, part_acc_ptr,
    num_rows, num_tiles, dim, stride_x, stride_k, scale2,
    STREAM_GRAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Paper's positive terms of one class tile of rows over one split of its class block.

    ``tiles [4, num_tiles]`` holds per program ``program_id(0)`` the rows ``[row_start,
    row_stop)`` (at most ``BLOCK_N``, all of one class) and their positive block ``[col_lo,
    col_hi)``: each row visits its own class block only, about M / C columns, split evenly
    across ``program_id(1)``. Writes per split ``sum_p softplus(nu - s_ap)`` and
    ``sum_p sigma(nu - s_ap)`` (``part_terms [splits, 2, N]``) and, with ``STREAM_GRAD``,
    ``sum_p sigma(nu - s_ap) k_p`` ``[D]``. Only tiles that hold a row's own column (in-batch) or
    the end of the block evaluate a mask.
    """
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    tile = tl.program_id(0)
    row_start = tl.load(tiles_ptr + tile)
    row_stop = tl.load(tiles_ptr + num_tiles + tile)
    col_lo = tl.load(tiles_ptr + 2 * num_tiles + tile)
    col_hi = tl.load(tiles_ptr + 3 * num_tiles + tile)
    rows = row_start + tl.arange(0, BLOCK_N)
    row_ok = rows < row_stop
    x = _load_rows(x_ptr, rows, row_stop, stride_x, dim, BLOCK_D)
    self_col = tl.load(self_col_ptr + rows, mask=row_ok, other=-1)
    # Padded rows take lse = -inf: their terms are exactly 0 (and never stored).
    lse2 = tl.load(lse_ptr + rows, mask=row_ok, other=float("-inf")) * LOG2E
    has_self = row_ok & (self_col >= 0)
    self_lo = tl.min(tl.where(has_self, self_col, col_hi), 0)
    self_hi = tl.max(tl.where(has_self, self_col + 1, 0), 0)
    tiles_per_split = tl.cdiv(tl.cdiv(col_hi - col_lo, BLOCK_M), num_splits)
    begin = col_lo + split * tiles_per_split * BLOCK_M
    end = tl.minimum(begin + tiles_per_split * BLOCK_M, col_hi)

    # t = nu - s_ap (base 2) and e = exp2(-|t|) <= 1, so nothing overflows:
    #   softplus(t) = max(t, 0) + log(1 + e), summed as sum max(t, 0) + log2(prod (1 + e)) per
    #   tile (a product of factors in (1, 2]: no log per element);
    #   sigma(t) = 1 / (1 + e) for t >= 0 and e / (1 + e) for t < 0.
    # nu = -inf (no negatives) gives t = -inf, e = 0: both terms 0.
    # The sums of max(t, 0) and sigma(t) are kept per tile element and reduced over the columns
    # once, after the loop: one row reduction per tile (the product's), not three.
    hinge = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    sigmoids = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    log2_sum = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(begin, end, BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)
        k = _load_rows(k_ptr, cols, col_hi, stride_k, dim, BLOCK_D)
        margin2 = lse2[:, None] - tl.dot(x, tl.trans(k), input_precision=PRECISION) * scale2
        if _touches(start, BLOCK_M, self_lo, self_hi) | (start + BLOCK_M > col_hi):
            positive = (cols[None, :] != self_col[:, None]) & (cols[None, :] < col_hi)
            margin2 = tl.where(positive, margin2, float("-inf"))
        e = tl.exp2(-tl.abs(margin2))
        one_plus_e = 1.0 + e
        sigmoid = tl.where(margin2 >= 0, 1.0, e) / one_plus_e
        hinge += tl.maximum(margin2, 0.0)
        sigmoids += sigmoid
        log2_sum += tl.log2(tl.reduce(one_plus_e, 1, _multiply))
        if STREAM_GRAD:
            acc = tl.dot(sigmoid.to(k.dtype), k, acc, input_precision=PRECISION)
    out = split * 2 * num_rows + rows
    tl.store(part_terms_ptr + out, (tl.sum(hinge, 1) + log2_sum) * LN2, mask=row_ok)
    tl.store(part_terms_ptr + out + num_rows, tl.sum(sigmoids, 1), mask=row_ok)
    if STREAM_GRAD:
        _store_rows(part_acc_ptr + split * num_rows * dim, acc, rows, row_stop, dim, dim, BLOCK_D)


@triton.jit
def contrast_anchor_grad_kernel(
    x_ptr, k_ptr, pos_lo_ptr, pos_hi_ptr, self_col_ptr, lse_ptr, neg_coef_ptr, pos_coef_ptr,
    part_grad_ptr,
    num_rows, num_cols, dim, stride_x, stride_k, scale2,
    IS_PAPER: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``sum_j G_aj k_j`` of one row tile over one split's key columns.

    ``s`` is recomputed from saved statistics (``reduction="none"``); the splits are summed by
    :func:`sum_splits_kernel`.
    """
    split = tl.program_id(1)
    rows, row_ok, x, pos_lo, pos_hi, self_col = _row_tile(
        tl.program_id(0) * BLOCK_N, x_ptr, pos_lo_ptr, pos_hi_ptr, self_col_ptr, num_rows,
        stride_x, dim, BLOCK_N, BLOCK_D,
    )
    lse2 = tl.load(lse_ptr + rows, mask=row_ok, other=0.0) * LOG2E
    neg_coef = tl.load(neg_coef_ptr + rows, mask=row_ok, other=0.0)
    pos_coef = tl.load(pos_coef_ptr + rows, mask=row_ok, other=0.0)
    mask_lo, mask_hi = _masked_range(pos_lo, pos_hi, self_col, row_ok, num_cols, IS_PAPER)
    first, last = _positive_range(pos_lo, pos_hi, row_ok, num_cols)
    col_begin, col_end = _split_columns(split, tl.num_programs(1), num_cols, BLOCK_M)

    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(col_begin, col_end, BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)
        k = _load_rows(k_ptr, cols, num_cols, stride_k, dim, BLOCK_D)
        s2 = tl.dot(x, tl.trans(k), input_precision=PRECISION) * scale2
        grad = _score_gradient(
            s2, cols[None, :], num_cols, lse2[:, None], neg_coef[:, None], pos_coef[:, None],
            pos_lo[:, None], pos_hi[:, None], self_col[:, None],
            _touches(start, BLOCK_M, mask_lo, mask_hi) | (start + BLOCK_M > num_cols),
            _touches(start, BLOCK_M, first, last), IS_PAPER,
        )
        acc = tl.dot(grad.to(k.dtype), k, acc, input_precision=PRECISION)
    _store_rows(part_grad_ptr + split * num_rows * dim, acc, rows, num_rows, dim, dim, BLOCK_D)


@triton.jit
def contrast_key_grad_kernel(
    x_ptr, k_ptr, pos_lo_ptr, pos_hi_ptr, self_col_ptr, lse_ptr, neg_coef_ptr, pos_coef_ptr,
    block_start_ptr, block_stop_ptr, grad_k_ptr,
    num_rows, num_cols, dim, stride_x, stride_k, stride_grad, scale2,
    USE_TABLE: tl.constexpr, IS_PAPER: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``sum_a G_aj x_a`` for one block of ``BLOCK_M`` key columns, looping over all rows.

    The tile is computed as ``k x^T`` (keys along the rows), the orientation in which both
    products take their operands as stored, as wgmma wants them. Blocks are ``[start, stop)``
    from a table (``USE_TABLE``: only the columns that need a gradient), or consecutive blocks of
    all columns; each program writes its columns once: no atomics.
    """
    block = tl.program_id(0)
    if USE_TABLE:
        col_stop = tl.load(block_stop_ptr + block)
        col_start = tl.load(block_start_ptr + block)
    else:
        col_stop = num_cols
        col_start = block * BLOCK_M
    cols = col_start + tl.arange(0, BLOCK_M)
    k = _load_rows(k_ptr, cols, col_stop, stride_k, dim, BLOCK_D)

    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, num_rows, BLOCK_N):
        rows, row_ok, x, pos_lo, pos_hi, self_col = _row_tile(
            start, x_ptr, pos_lo_ptr, pos_hi_ptr, self_col_ptr, num_rows, stride_x, dim, BLOCK_N,
            BLOCK_D,
        )
        # Padded rows have zero coefficients and a finite lse: their G is exactly 0.
        lse2 = tl.load(lse_ptr + rows, mask=row_ok, other=0.0) * LOG2E
        neg_coef = tl.load(neg_coef_ptr + rows, mask=row_ok, other=0.0)
        pos_coef = tl.load(pos_coef_ptr + rows, mask=row_ok, other=0.0)
        mask_lo, mask_hi = _masked_range(pos_lo, pos_hi, self_col, row_ok, num_cols, IS_PAPER)
        first, last = _positive_range(pos_lo, pos_hi, row_ok, num_cols)
        s2_t = tl.dot(k, tl.trans(x), input_precision=PRECISION) * scale2
        grad_t = _score_gradient(
            s2_t, cols[:, None], col_stop, lse2[None, :], neg_coef[None, :], pos_coef[None, :],
            pos_lo[None, :], pos_hi[None, :], self_col[None, :],
            _touches(col_start, BLOCK_M, mask_lo, mask_hi) | (col_start + BLOCK_M > col_stop),
            _touches(col_start, BLOCK_M, first, last), IS_PAPER,
        )
        acc = tl.dot(grad_t.to(x.dtype), x, acc, input_precision=PRECISION)
    _store_rows(grad_k_ptr, acc, cols, col_stop, stride_grad, dim, BLOCK_D)


@triton.jit
def sum_splits_kernel(part_ptr, out_ptr, num_splits, numel, BLOCK: tl.constexpr):
    """``out[i] = sum_s part[s, i]``, adding the splits in order (deterministic)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    total = tl.zeros([BLOCK], tl.float32)
    for split in range(num_splits):
        total += tl.load(part_ptr + split * numel + offs.to(tl.int64), mask=ok, other=0.0)
    tl.store(out_ptr + offs, total, mask=ok)
