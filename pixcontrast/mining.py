r"""Key mining: which positive and negative keys each anchor is contrasted with.

A *miner* (pytorch-metric-learning's word) selects, per anchor, a few positives (valid keys of
the anchor's class) and negatives (valid keys of other classes) among all keys, and
:func:`pair_contrastive_loss` evaluates the contrastive loss on the selected pairs only. The
paper (Wang et al. 2021) describes hardest and semi-hard mining but its authors never released
it; the class-relation miner follows ReCo (Liu et al. 2022).

Keys live in the *key space* ``[anchors (if in_batch); keys]`` of
:func:`~pixcontrast.contrastive_loss`: in-batch, column ``j < N`` is anchor ``j`` (never paired
with itself), and key ``i`` is column ``N + i``; without in-batch, key ``i`` is column ``i``. Keys
with a negative label (empty memory slots) are never selected. Similarity is the dot product
:math:`x_a \cdot k_j` (cosine for L2-normalised embeddings).

Mining runs without gradient and never builds the anchors x keys matrix: the hardest and
semi-hard miners go over chunks of anchor rows with one reused ``[rows, M]`` score buffer (plus a
second one and a mask of the same shape) and keep only a per-chunk top-k; the class-relation
miner needs no scores at all. Memory beyond the inputs is ``O(rows * M + N * K)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import _checks
from ._compile import eager_under_compile
from .functional import loss_options, pair_contrastive_loss
from .ops import KeySpace, check_contrast_inputs, check_contrast_values, compute_dtype

__all__ = [
    "MINERS",
    "KeyMiner",
    "MinedContrastLoss",
    "MinedPairs",
    "mine_keys",
]

MINERS = ("hardest", "semi-hard", "class-relation")

# Elements of each [rows, M] work buffer of the ranking miners: 2**22 fp32 values are 16 MiB.
# Rows per chunk = max(1, _CHUNK_ELEMENTS // M); the buffers are mining's only O(rows * M) memory.
_CHUNK_ELEMENTS = 1 << 22


@dataclass
class MinedPairs:
    """Per-anchor key indices chosen by a miner.

    Indices point into the key space ``[anchors (if in_batch); keys]`` (see the module
    docstring); ``-1`` pads a row whose anchor has fewer candidates than asked for, and padding
    always comes after the selected entries of a row.

    Attributes:
        positive_index: ``[N, K_pos]`` int64, keys of the anchor's class.
        negative_index: ``[N, K_neg]`` int64, keys of other classes.
    """

    positive_index: Tensor
    negative_index: Tensor


def _same_class_counts(space: KeySpace, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(|valid keys of the anchor's class|, |valid keys|)`` per anchor, without an N x M mask."""
    valid = space.labels[space.labels >= 0]
    classes, counts = torch.unique(valid, return_counts=True)
    if classes.numel() == 0:
        return torch.zeros_like(labels), labels.new_zeros(())
    slot = torch.searchsorted(classes, labels).clamp(max=classes.numel() - 1)
    same = torch.where(classes[slot] == labels, counts[slot], 0)
    return same, labels.new_tensor(valid.numel())


def _random(shape: tuple[int, ...], generator: Optional[torch.Generator], device) -> Tensor:
    """Uniform ``[0, 1)`` values drawn on the generator's device, returned on ``device``."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


def _select(
    hardness: Tensor,
    pool: Tensor,
    count: int,
    top: int,
    sample: bool,
    generator: Optional[torch.Generator],
) -> Tensor:
    """``[rows, count]`` columns among the ``pool[a]`` hardest of row ``a``.

    ``-inf`` in ``hardness`` marks a non-candidate. The first ones, or a uniform draw without
    replacement when ``sample``; in order of decreasing hardness, ``-1`` padded. ``top`` bounds
    every pool (and the columns).
    """
    rows = hardness.shape[0]
    order = hardness.topk(top, dim=1).indices  # columns by decreasing hardness
    rank = torch.arange(top, device=hardness.device)
    take = min(count, top)
    if sample:
        # the `take` smallest i.i.d. uniform keys among the pool are a uniform subset of it
        draw = _random((rows, top), generator, hardness.device)
        draw.masked_fill_(rank >= pool[:, None], 2.0)
        picked = draw.topk(take, dim=1, largest=False).indices.sort(dim=1).values
    else:
        picked = rank[:take].expand(rows, take)
    chosen = order.gather(1, picked).masked_fill_(picked >= pool[:, None], -1)
    if take == count:
        return chosen
    return torch.cat([chosen, chosen.new_full((rows, count - take), -1)], dim=1)


def _mine_ranked(
    x: Tensor,
    labels: Tensor,
    space: KeySpace,
    num_positives: int,
    num_negatives: int,
    fraction: Optional[float],
    generator: Optional[torch.Generator],
) -> MinedPairs:
    """Hardest (``fraction=None``) or semi-hard mining, chunked over anchor rows."""
    n, m = x.shape[0], space.size
    class_keys, valid_total = _same_class_counts(space, labels)
    positives = class_keys - int(space.in_batch)
    negatives = valid_total - class_keys
    positive_index = labels.new_full((n, num_positives), -1)
    negative_index = labels.new_full((n, num_negatives), -1)
    if n == 0 or m == 0:
        return MinedPairs(positive_index, negative_index)
    if fraction is None:
        positive_pool, negative_pool = positives, negatives
        positive_top, negative_top = min(num_positives, m), min(num_negatives, m)
    else:
        positive_pool, negative_pool = (
            torch.where(c > 0, torch.round(c.double() * fraction).long().clamp(min=1), 0)
            for c in (positives, negatives)
        )
        # how many columns the per-chunk top-k must keep (a host synchronisation)
        pool_max = torch.stack([positive_pool.max(), negative_pool.max()])
        positive_top, negative_top = pool_max.tolist()
    invalid = space.labels < 0
    has_invalid = bool(invalid.any())

    rows = max(1, _CHUNK_ELEMENTS // m)
    score_buffer = x.new_empty((min(rows, n), m))  # reused by every chunk
    work_buffer = torch.empty_like(score_buffer)
    infinity = x.new_tensor(torch.inf)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        scores, work = score_buffer[: stop - start], work_buffer[: stop - start]
        for lo, part in space.parts:
            torch.mm(x[start:stop], part.T, out=scores[:, lo : lo + part.shape[0]])
        same_class = labels[start:stop, None] == space.labels  # invalid keys never match
        # positives: hardness -s, -inf off the anchor's class and on the anchor itself
        torch.where(same_class, scores, infinity, out=work)
        if space.in_batch:
            local = torch.arange(stop - start, device=x.device)
            work[local, local + start] = torch.inf
        work.neg_()
        positive_index[start:stop] = _select(
            work, positive_pool[start:stop], num_positives, positive_top, fraction is not None,
            generator,
        )
        # negatives: hardness s, -inf on the anchor's class (itself included) and invalid keys
        scores.masked_fill_(same_class, -torch.inf)
        if has_invalid:
            scores.masked_fill_(invalid, -torch.inf)
        negative_index[start:stop] = _select(
            scores, negative_pool[start:stop], num_negatives, negative_top, fraction is not None,
            generator,
        )
    return MinedPairs(positive_index, negative_index)


def _mine_class_relation(
    x: Tensor,
    labels: Tensor,
    space: KeySpace,
    num_positives: int,
    num_negatives: int,
    class_temperature: float,
    generator: Optional[torch.Generator],
) -> MinedPairs:
    """ReCo's negatives drawn by class relation, uniform positives; both with replacement."""
    n, device = x.shape[0], x.device
    valid_columns = (space.labels >= 0).nonzero().squeeze(1)
    classes, key_class, class_size = torch.unique(
        space.labels[valid_columns], return_inverse=True, return_counts=True
    )
    num_classes = classes.numel()
    positive_index = labels.new_full((n, num_positives), -1)
    negative_index = labels.new_full((n, num_negatives), -1)
    if n == 0 or num_classes == 0:
        return MinedPairs(positive_index, negative_index)

    # valid columns grouped by class: class c holds by_class[offset[c] : offset[c] + size[c]]
    order = torch.argsort(key_class, stable=True)
    by_class = valid_columns[order]
    offset = class_size.cumsum(0) - class_size

    # prototypes: class means of the valid keys (invalid rows add into a dropped extra row)
    column_class = torch.full((space.size,), num_classes, dtype=torch.long, device=device)
    column_class[valid_columns] = key_class
    sums = x.new_zeros((num_classes + 1, x.shape[1]))
    for lo, part in space.parts:
        sums.index_add_(0, column_class[lo : lo + part.shape[0]], part)
    unit = torch.nn.functional.normalize(sums[:num_classes], dim=1)
    logits = unit @ unit.T / class_temperature
    logits.fill_diagonal_(-torch.inf)
    # row num_classes: anchors of a class without keys (they have no positive), uniform
    logits = torch.cat([logits, logits.new_zeros((1, num_classes))])
    has_negative_class = torch.isfinite(logits).any(dim=1)
    probs = torch.softmax(torch.where(has_negative_class[:, None], logits, 0.0), dim=1)

    slot = torch.searchsorted(classes, labels).clamp(max=num_classes - 1)
    anchor_class = torch.where(classes[slot] == labels, slot, num_classes)
    source = generator.device if generator is not None else device
    drawn = torch.multinomial(
        probs.to(source)[anchor_class.to(source)], num_negatives, replacement=True,
        generator=generator,
    ).to(device)  # [N, K_neg]: an independent class per negative slot
    within = (_random((n, num_negatives), generator, device) * class_size[drawn]).long()
    within = torch.minimum(within, class_size[drawn] - 1)
    negative_index = by_class[offset[drawn] + within]
    negative_index.masked_fill_(~has_negative_class[anchor_class, None], -1)

    own = anchor_class.clamp(max=num_classes - 1)
    own_size = torch.where(anchor_class < num_classes, class_size[own], 0)
    available = own_size - int(space.in_batch)
    within = (_random((n, num_positives), generator, device) * available[:, None]).long()
    within = torch.minimum(within, (available - 1).clamp(min=0)[:, None])
    if space.in_batch:
        # skip the anchor's own position in its class block
        position = torch.empty_like(order)
        position[order] = torch.arange(order.numel(), device=device)
        own_rank = position[:n] - offset[own]
        within += (within >= own_rank[:, None]).long()
    positive_index = by_class[(offset[own][:, None] + within).clamp(max=by_class.numel() - 1)]
    positive_index.masked_fill_((available <= 0)[:, None], -1)
    return MinedPairs(positive_index, negative_index)


# Mining synchronises with the host (class counts, pool sizes) and draws tensors of those
# data-dependent sizes, which fake-tensor tracing cannot: under torch.compile it runs eagerly,
# with a graph break before and after it.
@eager_under_compile
def mine_keys(
    anchors: Tensor,
    labels: Tensor,
    keys: Union[Tensor, Sequence[Tensor], None] = None,
    key_labels: Union[Tensor, Sequence[Tensor], None] = None,
    *,
    miner: str = "hardest",
    num_positives: int,
    num_negatives: int,
    fraction: float = 0.1,
    class_temperature: float = 0.5,
    in_batch: Optional[bool] = None,
    generator: Optional[torch.Generator] = None,
) -> MinedPairs:
    r"""Selects per anchor ``num_positives`` positive and ``num_negatives`` negative keys.

    With :math:`s_{aj} = x_a \cdot k_j`, positives :math:`P(a)` (valid keys of class
    :math:`y_a`, the anchor itself excluded) and negatives :math:`N(a)` (valid keys of other
    classes):

    - ``"hardest"``: the :math:`K_{neg}` negatives of largest :math:`s_{aj}` (most similar
      first) and the :math:`K_{pos}` positives of smallest :math:`s_{aj}` (least similar first).
    - ``"semi-hard"`` (the paper's semi-hard sampling): the hardest
      :math:`\max(1, \mathrm{round}(f |N(a)|))` negatives form a pool (likewise for positives),
      and :math:`\min(K, |\text{pool}|)` of them are drawn uniformly without replacement;
      listed from the hardest.
    - ``"class-relation"`` (ReCo): with class prototypes :math:`p_c` (mean of the valid keys of
      class :math:`c`), each of the :math:`K_{neg}` negatives draws a class :math:`c \ne y_a`
      with probability :math:`\mathrm{softmax}_c(\cos(p_{y_a}, p_c) / t)` and then a key of
      that class uniformly; the :math:`K_{pos}` positives are uniform draws from :math:`P(a)`.
      Draws are with replacement, as in ReCo, so indices may repeat and a row is only padded
      when it has no candidate at all. An anchor whose class has no key draws its negative
      classes uniformly.

    The hardest and semi-hard miners rank similarities in chunks of anchor rows (one
    ``[rows, M]`` buffer with ``rows * M`` about ``2**22``, plus a second buffer and a mask of
    that shape); the class-relation miner only needs ``[C, D]`` prototypes. Runs without
    gradient, and eagerly (between graphs) under ``torch.compile``.

    Args:
        anchors: ``[N, D]`` float embeddings.
        labels: ``[N]`` integer class ids, all ``>= 0``.
        keys: ``[M, D]`` extra keys (e.g. a memory bank), a sequence of parts ``[M_i, D]``
            (indexed as their concatenation), or ``None``.
        key_labels: ``[M]`` integer class ids of ``keys`` (a sequence of ``[M_i]`` for a
            sequence of keys); negative marks an invalid key.
        miner: one of :data:`MINERS`: ``"hardest"``, ``"semi-hard"`` or ``"class-relation"``.
        num_positives: :math:`K_{pos} \ge 1`, columns of ``positive_index``.
        num_negatives: :math:`K_{neg} \ge 1`, columns of ``negative_index``.
        fraction: :math:`f \in (0, 1]`, the share of candidates in the semi-hard pools.
        class_temperature: :math:`t > 0` of the class-relation softmax (ReCo uses 0.5).
        in_batch: whether the anchors are keys as well; defaults to ``True`` without ``keys``
            and ``False`` with them, as in :func:`~pixcontrast.contrastive_loss`.
        generator: random source (on any device) of the semi-hard and class-relation draws.

    Returns:
        :class:`MinedPairs` with ``positive_index [N, K_pos]`` and ``negative_index
        [N, K_neg]`` (int64, ``-1`` padded) into the key space; ``[0, K]`` for no anchor.

    Raises:
        TypeError: a non-tensor, non-float embedding, non-integer labels or counts.
        ValueError: ``num_positives``/``num_negatives`` ``< 1``, ``fraction`` outside
            ``(0, 1]``, a non-positive ``class_temperature``, an unknown ``miner``, mismatched
            shapes or dimensions, negative ``labels``, non-finite embeddings.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.8, 0.2]])
        >>> y = torch.tensor([0, 0, 1, 1])
        >>> pairs = mine_keys(x, y, num_positives=1, num_negatives=1)
        >>> pairs.positive_index.tolist(), pairs.negative_index.tolist()
        ([[1], [0], [3], [2]], [[3], [3], [1], [0]])
    """
    inputs = check_contrast_inputs(anchors, labels, keys, key_labels, in_batch)
    check_contrast_values(inputs, 1.0, 1.0)  # (scores x . k)
    _checks.check_choice(miner, "miner", MINERS)
    num_positives = _checks.check_count(num_positives, "num_positives")
    num_negatives = _checks.check_count(num_negatives, "num_negatives")
    fraction = _checks.check_fraction(fraction, "fraction", allow_zero=False)
    class_temperature = _checks.check_positive(class_temperature, "class_temperature")

    with torch.no_grad():
        dtype = compute_dtype(anchors.dtype)
        x = anchors.detach().to(dtype)
        labels = inputs.labels.long()
        space = dataclasses.replace(inputs, anchors=x).key_space(dtype)
        if miner == "class-relation":
            return _mine_class_relation(
                x, labels, space, num_positives, num_negatives, class_temperature, generator
            )
        return _mine_ranked(
            x, labels, space, num_positives, num_negatives,
            fraction if miner == "semi-hard" else None, generator,
        )


class KeyMiner:
    r"""A miner: :func:`mine_keys` with its options fixed, the ``miner=`` of the losses.

    Give one to :class:`~pixcontrast.PixelContrastLoss` or
    :class:`~pixcontrast.RegionContrastLoss` (``miner=KeyMiner(...)``) to contrast each sampled
    anchor with its mined keys only (:func:`~pixcontrast.functional.pair_contrastive_loss`)
    instead of every key, or call it on anchors and keys of your own.

    Args:
        miner: one of :data:`MINERS`: ``"hardest"``, ``"semi-hard"`` or ``"class-relation"``.
        num_positives: positives per anchor, :math:`K_{pos} \ge 1`.
        num_negatives: negatives per anchor, :math:`K_{neg} \ge 1`.
        fraction: semi-hard pool share, in ``(0, 1]``.
        class_temperature: temperature of the class-relation softmax, ``> 0``.

    Example:
        >>> miner = KeyMiner("semi-hard", num_positives=1, num_negatives=2, fraction=0.5)
        >>> x = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
        >>> pairs = miner(x, torch.tensor([0, 0, 1, 1, 2, 2]))
        >>> pairs.positive_index.shape, pairs.negative_index.shape
        (torch.Size([6, 1]), torch.Size([6, 2]))
    """

    def __init__(
        self,
        miner: str = "hardest",
        *,
        num_positives: int,
        num_negatives: int,
        fraction: float = 0.1,
        class_temperature: float = 0.5,
    ) -> None:
        self.miner = _checks.check_choice(miner, "miner", MINERS)
        self.num_positives = _checks.check_count(num_positives, "num_positives")
        self.num_negatives = _checks.check_count(num_negatives, "num_negatives")
        self.fraction = _checks.check_fraction(fraction, "fraction", allow_zero=False)
        self.class_temperature = _checks.check_positive(class_temperature, "class_temperature")

    def __call__(
        self,
        anchors: Tensor,
        labels: Tensor,
        keys: Union[Tensor, Sequence[Tensor], None] = None,
        key_labels: Union[Tensor, Sequence[Tensor], None] = None,
        *,
        in_batch: Optional[bool] = None,
        generator: Optional[torch.Generator] = None,
    ) -> MinedPairs:
        """The :class:`MinedPairs` of ``anchors`` among their key space (see :func:`mine_keys`)."""
        return mine_keys(
            anchors, labels, keys, key_labels, miner=self.miner,
            num_positives=self.num_positives, num_negatives=self.num_negatives,
            fraction=self.fraction, class_temperature=self.class_temperature,
            in_batch=in_batch, generator=generator,
        )

    def __repr__(self) -> str:
        text = (
            f"KeyMiner({self.miner!r}, num_positives={self.num_positives}, "
            f"num_negatives={self.num_negatives}"
        )
        if self.miner == "semi-hard":
            text += f", fraction={self.fraction}"
        if self.miner == "class-relation":
            text += f", class_temperature={self.class_temperature}"
        return text + ")"


def _from_key_miner(name: str) -> property:
    """A read-only attribute of :class:`MinedContrastLoss` that is its ``key_miner``'s."""
    return property(lambda self: getattr(self.key_miner, name), doc=f"``key_miner.{name}``.")


class MinedContrastLoss(nn.Module):
    r"""Mine keys with a :class:`KeyMiner`, then :func:`pair_contrastive_loss` on the pairs.

    For anchors and keys you have as rows; for label maps, give the miner to
    :class:`~pixcontrast.PixelContrastLoss` (``miner=``) instead.

    Args:
        miner: ``"hardest"``, ``"semi-hard"`` or ``"class-relation"``.
        num_positives: positives per anchor.
        num_negatives: negatives per anchor.
        fraction: semi-hard pool share, in ``(0, 1]``.
        class_temperature: temperature of the class-relation softmax.
        temperature: :math:`\tau` of the loss.
        base_temperature: the loss is scaled by ``temperature / base_temperature``.
        variant: ``"paper"`` or ``"supcon"``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> import torch.nn.functional as F
        >>> criterion = MinedContrastLoss("hardest", num_positives=2, num_negatives=4)
        >>> x = F.normalize(torch.randn(8, 16), dim=1)
        >>> criterion(x, torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])).ndim
        0
    """

    def __init__(
        self,
        miner: str = "hardest",
        *,
        num_positives: int,
        num_negatives: int,
        fraction: float = 0.1,
        class_temperature: float = 0.5,
        temperature: float = 0.1,
        base_temperature: Optional[float] = None,
        variant: str = "paper",
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.key_miner = KeyMiner(
            miner, num_positives=num_positives, num_negatives=num_negatives, fraction=fraction,
            class_temperature=class_temperature,
        )
        options = loss_options(temperature, base_temperature, variant, reduction)
        self.temperature = options.temperature
        self.base_temperature = base_temperature
        self.variant = variant
        self.reduction = reduction

    def forward(
        self,
        anchors: Tensor,
        labels: Tensor,
        keys: Optional[Tensor] = None,
        key_labels: Optional[Tensor] = None,
        *,
        in_batch: Optional[bool] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Loss of ``anchors [N, D]`` (labels ``[N]``) against their mined keys.

        The keys are mined among ``[anchors (if in_batch); keys]``; arguments as in
        :func:`mine_keys`.
        """
        pairs = self.key_miner(
            anchors, labels, keys, key_labels, in_batch=in_batch, generator=generator
        )
        return pair_contrastive_loss(
            anchors, labels, keys, key_labels, pairs.positive_index, pairs.negative_index,
            in_batch=in_batch, temperature=self.temperature,
            base_temperature=self.base_temperature, variant=self.variant,
            reduction=self.reduction,
        )

    # the miner's options, read from the KeyMiner it composes
    miner = _from_key_miner("miner")
    num_positives = _from_key_miner("num_positives")
    num_negatives = _from_key_miner("num_negatives")
    fraction = _from_key_miner("fraction")
    class_temperature = _from_key_miner("class_temperature")

    def extra_repr(self) -> str:
        """The options shown by ``repr``."""
        return (
            f"key_miner={self.key_miner!r}, temperature={self.temperature}, "
            f"variant={self.variant!r}"
        )
