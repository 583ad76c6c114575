"""Stateless contrastive losses (over every key, over selected pairs) and pixel-map functions.

The pixel-map functions (``resize_labels``, ``gather_pixels``, ``region_embeddings``) are the
ones the modules use to resize label maps, read rows of an embedding map and average regions.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

from torch import Tensor

from . import _checks
from ._pixels import gather_pixels, region_embeddings, resize_labels
from .ops import (
    BACKEND_NAMES,
    ContrastInputs,
    ContrastOptions,
    check_contrast_inputs,
    check_contrast_values,
    check_pair_index,
    compute_dtype,
    pair_loss,
    select_backend,
)

__all__ = [
    "REDUCTIONS",
    "VARIANTS",
    "contrast_pairs_validated",
    "contrast_validated",
    "contrastive_loss",
    "gather_pixels",
    "loss_options",
    "pair_contrastive_loss",
    "region_embeddings",
    "resize_labels",
]

VARIANTS = ("paper", "supcon")
REDUCTIONS = ("mean", "sum", "none")


def contrastive_loss(
    anchors: Tensor,
    labels: Tensor,
    keys: Union[Tensor, Sequence[Tensor], None] = None,
    key_labels: Union[Tensor, Sequence[Tensor], None] = None,
    *,
    in_batch: Optional[bool] = None,
    temperature: float = 0.1,
    base_temperature: Optional[float] = None,
    variant: str = "paper",
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    r"""Supervised InfoNCE between anchors and keys, without the anchors x keys matrix.

    With :math:`s_{aj} = x_a \cdot k_j / \tau`, positives :math:`P(a)` (valid keys of the anchor's
    class, the anchor itself excluded), negatives :math:`N(a)` (valid keys of other classes) and
    :math:`\rho = \tau / \tau_{base}`:

    - ``variant="paper"`` (Wang et al. 2021; per-positive InfoNCE):
      :math:`L_a = \frac{\rho}{|P(a)|} \sum_{p} -\log
      \frac{e^{s_{ap}}}{e^{s_{ap}} + \sum_{n \in N(a)} e^{s_{an}}}`
    - ``variant="supcon"`` (Khosla et al. 2020, :math:`L_{out}`):
      :math:`L_a = \rho \big(\log \sum_{j \in P(a) \cup N(a)} e^{s_{aj}}
      - \frac{1}{|P(a)|} \sum_{p} s_{ap}\big)`

    An anchor without positives has :math:`L_a = 0` and is left out of the mean; an anchor without
    negatives has :math:`L_a = 0` under ``"paper"``. With no anchor that has a positive the result
    is an exact zero that is still connected to the graph. The result is never NaN for finite
    inputs.

    Args:
        anchors: ``[N, D]`` float embeddings (normalise them first if you want cosine similarity).
        labels: ``[N]`` integer class ids, all ``>= 0``.
        keys: ``[M, D]`` extra keys (e.g. a memory bank), or ``None``. A sequence of tensors
            ``[M_i, D]`` is contrasted as their concatenation, and only the parts that require
            grad get a gradient (a memory's keys cost no key-gradient product next to keys
            that need one).
        key_labels: ``[M]`` integer class ids of ``keys`` (a sequence of ``[M_i]`` for a
            sequence of keys); a negative id marks an invalid key (an empty memory slot), which
            is excluded everywhere. Required with ``keys``.
        in_batch: whether the anchors are keys as well (self-pairs excluded). Defaults to ``True``
            without ``keys`` and ``False`` with them.
        temperature: :math:`\tau > 0`.
        base_temperature: the loss is scaled by ``temperature / base_temperature``; ``None``
            means no scaling (:math:`\rho = 1`).
        variant: ``"paper"`` or ``"supcon"``.
        reduction: ``"mean"`` over anchors with at least one positive, ``"sum"``, or ``"none"``
            (``[N]``, zero where an anchor has no positive).
        backend: ``"auto"`` (``"torch"``, and ``"triton"`` for CUDA inputs only where
            committed GPU measurements show it faster, see
            :func:`pixcontrast.backends.explain_auto`; the environment variable
            ``PIXCONTRAST_BACKEND`` replaces it), ``"triton"`` (fused kernels on CUDA;
            fp16/bf16, fp32 when TF32 is allowed, D <= 256), ``"torch"`` (chunked, any device)
            or ``"reference"`` (dense).

    Returns:
        A scalar, or ``[N]`` for ``reduction="none"``; fp32 for half-precision inputs, fp64 for
        fp64 inputs. Gradients flow to ``anchors`` and, when they require grad, to ``keys``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> x = F.normalize(torch.randn(6, 8), dim=1).requires_grad_()
        >>> y = torch.tensor([0, 0, 1, 1, 2, 2])
        >>> loss = contrastive_loss(x, y, temperature=0.1)
        >>> loss.backward()
        >>> loss.ndim, x.grad.shape
        (0, torch.Size([6, 8]))
    """
    # The backend checks the values (labels >= 0, a finite loss): the fused ones inside their
    # registered operator, where the host synchronisations break no compiled graph.
    inputs = check_contrast_inputs(anchors, labels, keys, key_labels, in_batch)
    options = loss_options(temperature, base_temperature, variant, reduction)
    _checks.check_choice(backend, "backend", BACKEND_NAMES)
    return contrast_validated(inputs, options, backend)


def contrast_validated(inputs: ContrastInputs, options: ContrastOptions, backend: str) -> Tensor:
    """:func:`contrastive_loss` of inputs and options validated already.

    The entry of the loss modules, which validate their batch once and build the inputs from it;
    the backend still checks the values (labels ``>= 0``, a finite loss), which only it reads.
    """
    return select_backend(backend, inputs).loss(inputs, options)


def pair_contrastive_loss(
    anchors: Tensor,
    labels: Tensor,
    keys: Union[Tensor, Sequence[Tensor], None],
    key_labels: Union[Tensor, Sequence[Tensor], None],
    positive_index: Tensor,
    negative_index: Tensor,
    *,
    in_batch: Optional[bool] = None,
    temperature: float = 0.1,
    base_temperature: Optional[float] = None,
    variant: str = "paper",
    reduction: str = "mean",
) -> Tensor:
    r"""The loss of :func:`~pixcontrast.contrastive_loss` on selected pairs only.

    With :math:`s_{aj} = x_a \cdot k_j / \tau`, :math:`\rho = \tau / \tau_{base}`, the selected
    positives :math:`P'(a)` (the entries of ``positive_index[a]`` other than ``-1``) and
    negatives :math:`N'(a)` (likewise):

    - ``variant="paper"``: :math:`L_a = \frac{\rho}{|P'(a)|} \sum_{p \in P'(a)} -\log
      \frac{e^{s_{ap}}}{e^{s_{ap}} + \sum_{n \in N'(a)} e^{s_{an}}}`
    - ``variant="supcon"``: :math:`L_a = \rho \big(\log \sum_{j \in P'(a) \cup N'(a)}
      e^{s_{aj}} - \frac{1}{|P'(a)|} \sum_{p \in P'(a)} s_{ap}\big)`

    An index listed twice counts twice (the class-relation miner draws with replacement). The
    edge cases are those of ``contrastive_loss``: an anchor without a selected positive has
    :math:`L_a = 0` and is left out of the mean, one without a selected negative has
    :math:`L_a = 0` under ``"paper"``, nothing counting (no anchor, or index tensors with no
    column) gives an exact zero connected to the graph (``[N]`` zeros for ``reduction="none"``),
    and the result is finite for finite inputs. With every positive and every negative selected it
    equals ``contrastive_loss``.

    Selected keys are gathered into ``[N, K, D]`` tensors: memory is
    :math:`O(N (K_{pos} + K_{neg}) D)` and the gradients are exact, for the anchors and (when
    they require grad) the keys.

    Args:
        anchors: ``[N, D]`` float embeddings.
        labels: ``[N]`` integer class ids, all ``>= 0``.
        keys: ``[M, D]`` extra keys, a sequence of parts ``[M_i, D]`` (indexed as their
            concatenation), or ``None``.
        key_labels: ``[M]`` class ids of ``keys`` (negative: invalid), a sequence of ``[M_i]``
            for a sequence of keys; required with ``keys``.
        positive_index: ``[N, K_pos]`` integer indices into the key space
            ``[anchors (if in_batch); keys]``, ``-1`` for padding; each must be a key of the
            anchor's class other than the anchor itself (e.g. from
            :func:`~pixcontrast.mining.mine_keys`).
        negative_index: ``[N, K_neg]`` likewise, each a valid key of another class.
        in_batch: whether the anchors are keys as well (must match the mining); defaults to
            ``True`` without ``keys`` and ``False`` with them.
        temperature: :math:`\tau > 0`.
        base_temperature: scales the loss by ``temperature / base_temperature``; ``None``:
            :math:`\rho = 1`.
        variant: ``"paper"`` or ``"supcon"``.
        reduction: ``"mean"`` over anchors with a selected positive, ``"sum"`` or ``"none"``.

    Returns:
        A scalar, or ``[N]`` for ``reduction="none"``; fp32 for half-precision inputs.

    Raises:
        TypeError: non-tensor arguments, non-float embeddings, non-integer labels or indices.
        ValueError: mismatched shapes or ``D``, indices outside ``[-1, M)``, an index that
            breaks the class relation above, or the checks of ``contrastive_loss``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> x = F.normalize(torch.randn(6, 8), dim=1).requires_grad_()
        >>> y = torch.tensor([0, 0, 1, 1, 2, 2])
        >>> from pixcontrast.mining import mine_keys
        >>> pairs = mine_keys(x, y, num_positives=1, num_negatives=2)
        >>> loss = pair_contrastive_loss(
        ...     x, y, None, None, pairs.positive_index, pairs.negative_index, temperature=0.1
        ... )
        >>> loss.backward()
        >>> loss.ndim, x.grad.shape
        (0, torch.Size([6, 8]))
    """
    inputs = check_contrast_inputs(anchors, labels, keys, key_labels, in_batch)
    options = loss_options(temperature, base_temperature, variant, reduction)
    return contrast_pairs_validated(inputs, positive_index, negative_index, options)


def contrast_pairs_validated(
    inputs: ContrastInputs, positive_index: Tensor, negative_index: Tensor, options: ContrastOptions
) -> Tensor:
    """:func:`pair_contrastive_loss` of inputs and options validated already.

    Checks what only it sees: the values of the inputs and the pair indices.
    """
    check_contrast_values(inputs, options.temperature, options.rho)
    anchors, labels = inputs.anchors, inputs.labels.long()
    space = inputs.key_space(compute_dtype(anchors.dtype))
    positive_index = check_pair_index(
        positive_index, "positive_index", labels, space.labels, inputs.in_batch, positive=True
    )
    negative_index = check_pair_index(
        negative_index, "negative_index", labels, space.labels, inputs.in_batch, positive=False
    )
    return pair_loss(anchors, space.dense(), positive_index, negative_index, options)


def loss_options(
    temperature: float, base_temperature: Optional[float], variant: str, reduction: str
) -> ContrastOptions:
    """Validate the options every contrastive loss shares, once, into the object backends take.

    ``rho = temperature / base_temperature``, 1 without a base temperature.
    """
    temperature = _checks.check_positive(temperature, "temperature")
    rho = 1.0
    if base_temperature is not None:
        rho = temperature / _checks.check_positive(base_temperature, "base_temperature")
        if not math.isfinite(rho) or rho == 0:
            raise ValueError(
                f"temperature / base_temperature = {temperature!r} / {base_temperature!r} is not "
                "a positive finite number"
            )
    _checks.check_choice(variant, "variant", VARIANTS)
    _checks.check_choice(reduction, "reduction", REDUCTIONS)
    return ContrastOptions(temperature, rho, variant, reduction)
