"""Pixel plumbing shared by the losses, the samplers and the memory bank.

Resizing label maps (and logits) to the embeddings' resolution, predicted labels, rows of an
embedding map at pixel positions, random ranks within groups of pixels and per-region mean
embeddings. :func:`pixel_maps` is the one entry that validates a batch and brings its labels,
predictions and logits to the embedding resolution: public entry points call it once and hand
the prepared maps on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks
from .ops import first_derivatives_only

__all__ = [
    "PixelMaps",
    "exclude_labels",
    "check_label_resolution",
    "gather_pixels",
    "pixel_maps",
    "predicted_labels",
    "prepare_pixel_maps",
    "random_rank_in_group",
    "region_embeddings",
    "region_means",
    "resize_label_map",
    "resize_labels",
    "split_predictions",
]

_NORM_EPS = 1e-12  # F.normalize's: a pixel embedding x becomes x / max(|x|, eps)
_SCATTER_CHANNELS = 16  # channels per block when scattering scaled pixel embeddings


def predicted_labels(logits: Tensor) -> Tensor:
    """``[B, h, w]`` argmax over the classes of ``[B, C, h, w]`` logits.

    The first of equal maxima, taken as ``max``'s indices: on CPU ``argmax`` over this dimension
    is slower.
    """
    return logits.max(dim=1).indices


def resize_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of a ``[B, H, W]`` integer label map to ``size = (h, w)``.

    Picks exactly the source pixels of ``F.interpolate(mode="nearest")``, whose rule computes
    the scale in float32: row ``i`` reads row ``min(floor(i * s), H - 1)`` with
    ``s = float32(H) / float32(h)`` and the product rounded to float32 (which differs from
    ``floor(i * H / h)`` for, e.g., 26 -> 22 rows); columns likewise. It indexes instead of
    interpolating, so any integer id survives exactly. It resizes any size to any other; the
    losses, samplers and memory bank take labels only at the embeddings' resolution or larger
    by one integer stride ``s`` in both dimensions, ``h`` being ``H / s`` rounded down or up to
    one more (512 -> 64 and 513 -> 65 at stride 8), or by one exact scale ``H / h = W / w``;
    other sizes raise there.

    Args:
        labels: ``[B, H, W]`` integer class ids.
        size: ``(h, w)``, two integers.

    Returns:
        ``[B, h, w]`` labels; ``labels`` itself when ``size == (H, W)`` (an empty map
        included).

    Raises:
        TypeError: ``size`` is not a pair of integers, or ``labels`` not an integer tensor.
        ValueError: otherwise, for a negative entry of ``size``, a zero one, or a map with no
            pixel (``H`` or ``W`` is 0) to resize from, as ``F.interpolate`` would.
    """
    _checks.check_labels(labels, "labels", 3)
    return resize_label_map(labels, _checks.check_size(size, "size"))


def resize_label_map(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """:func:`~pixcontrast.functional.resize_labels` of a validated label map and size."""
    h, w = size
    height, width = labels.shape[-2:]
    if (h, w) == (height, width):
        return labels
    if h == 0 or w == 0:
        raise ValueError(f"size must be positive to resize labels of shape "
                         f"{list(labels.shape)}, got {(h, w)}")
    if height == 0 or width == 0:
        raise ValueError(
            f"labels of shape {list(labels.shape)} has no pixel to resize to size {(h, w)}"
        )
    rows = _nearest_source(height, h, labels.device)
    cols = _nearest_source(width, w, labels.device)
    return labels.index_select(1, rows).index_select(2, cols)


def _nearest_source(in_size: int, out_size: int, device: torch.device) -> Tensor:
    """Source index of every output index of a nearest resize, by ATen's float32 rule."""
    # float32(in_size / out_size): the double quotient rounded to a 24-bit significand, half to
    # even, equals the float32 quotient (double rounding cannot differ for sizes below 2**28)
    mantissa, exponent = math.frexp(in_size / out_size)
    scale = math.ldexp(round(math.ldexp(mantissa, 24)), exponent - 24)
    # a float32 product of two float32 values, correctly rounded like ATen's
    position = torch.arange(out_size, dtype=torch.float32, device=device).mul_(scale)
    return position.floor_().long().clamp_(max=in_size - 1)


def check_label_resolution(embeddings: Tensor, labels: Tensor) -> None:
    """Raise unless ``labels [B, H, W]`` fit ``embeddings [B, D, h, w]`` by one stride.

    The rule: labels at least as large as the embeddings, with one integer stride ``s`` for
    both dimensions such that ``floor(H / s) <= h <= floor(H / s) + 1`` and the same for
    ``W, w``: what a network of output stride ``s`` gives for any input size, odd ones included
    (512 -> 64 and 513 -> 65 at stride 8, 513 -> 129 at stride 4, 32 -> 1 at stride 32); or
    one exact scale ``H / h = W / w`` (26 x 39 labels for 22 x 33 embeddings). Labels at a
    lower resolution than the embeddings, or of another aspect ratio (30 x 45 labels for 8 x 8
    embeddings), are refused; when the embeddings' dimensions 1 and 2 fit the labels instead,
    the error says that they are channels-last ``[B, h, w, D]``. Empty maps pass (the resize
    refuses what it cannot do).
    """
    _, _, h, w = embeddings.shape
    height, width = labels.shape[-2:]
    if 0 in (h, w, height, width) or _one_stride((height, width), (h, w)):
        return
    message = (
        f"labels of resolution {(height, width)} do not fit embeddings of resolution {(h, w)} "
        "(embeddings are [B, D, h, w]): labels must be at the embeddings' resolution or larger "
        "by one integer stride s in both dimensions (h = H / s and w = W / s, rounded either "
        "way), or by one exact scale (H / h = W / w)"
    )
    if _one_stride((height, width), tuple(embeddings.shape[1:3])):
        raise ValueError(
            f"{message}; embeddings of shape {list(embeddings.shape)} look channels-last "
            "[B, h, w, D]: pass embeddings.permute(0, 3, 1, 2)"
        )
    raise ValueError(message)


def _one_stride(label_size: Sequence[int], embedding_size: Sequence[int]) -> bool:
    """Whether one integer stride, or one exact scale, takes every label size to its embedding's.

    ``floor(H / s) <= h <= floor(H / s) + 1`` holds for the integers ``s`` from
    ``floor(H / (h + 1)) + 1`` to ``floor(H / (h - 1))`` (no upper end for ``h = 1``).
    """
    if any(small > big for big, small in zip(label_size, embedding_size)):
        return False
    (height, width), (h, w) = label_size, embedding_size
    if height * w == width * h:
        return True
    low = max(big // (small + 1) + 1 for big, small in zip(label_size, embedding_size))
    high = min((big // (small - 1) for big, small in zip(label_size, embedding_size)
                if small > 1), default=low)
    return low <= high


class _GatherByImage(torch.autograd.Function):
    """Rows ``[N, D]`` of ``flat [B, D, P]`` at per-image pixel positions.

    Autograd through ``flat[image].index_select(...)`` would give every image's ``select`` a
    zero gradient the size of the whole batch; the backward here fills one.
    """

    @staticmethod
    def forward(ctx, flat: Tensor, pixels: tuple[Tensor, ...]) -> Tensor:  # type: ignore[override]
        ctx.pixels, ctx.shape = pixels, flat.shape
        out = flat.new_empty(sum(part.numel() for part in pixels), flat.shape[1])
        start = 0
        for image, part in enumerate(pixels):
            stop = start + part.numel()
            # [D, n] read channel row by channel row, written transposed into the rows
            out[start:stop].t().copy_(flat[image].index_select(1, part))
            start = stop
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        # (linear in grad and made of differentiable ops: double backward works)
        grad_flat = grad.new_zeros(ctx.shape)
        start = 0
        for image, part in enumerate(ctx.pixels):
            stop = start + part.numel()
            grad_flat[image].index_add_(1, part, grad[start:stop].t())
            start = stop
        return grad_flat, None


def gather_pixels(
    embeddings: Tensor, indices: Tensor, counts: Optional[Sequence[int]] = None
) -> Tensor:
    """Rows ``[N, D]`` of ``embeddings [B, D, h, w]`` at flat pixel ``indices``.

    The whole map is not copied. Given ``counts``, how many of ``indices`` fall in each image
    (which must then come grouped by image, in image order, as increasing indices do), each
    image's ``[D, h * w]`` map is read with one ``index_select`` along its pixels, walking every
    channel row in order: faster than the general gather used without ``counts``, which takes
    the indices in any order. Either way the backward pass writes one gradient map, the size of
    ``embeddings``.
    """
    b, d, h, w = embeddings.shape
    flat = embeddings.reshape(b, d, h * w)
    if counts is None or b == 0:  # (an empty batch has no image map to read)
        return flat[indices // (h * w), :, indices % (h * w)]
    pixels = tuple((indices % (h * w)).split(list(counts)))
    return _GatherByImage.apply(flat, pixels)


def _rank_in_sorted_groups(sorted_groups: Tensor) -> Tensor:
    """Position ``0..count-1`` of each element within its run of equal values of a sorted tensor."""
    n = sorted_groups.numel()
    first = torch.ones_like(sorted_groups, dtype=torch.bool)
    first[1:] = sorted_groups[1:] != sorted_groups[:-1]
    position = torch.arange(n, device=sorted_groups.device)
    return position - torch.cummax(torch.where(first, position, 0), dim=0).values


# torch.nonzero_static exists on CPU since torch 2.1 and on CUDA since 2.6.
_NONZERO_STATIC_ANY_DEVICE = torch.__version__ >= "2.6"


def _true_positions(mask: Tensor, count: int) -> Tensor:
    """Positions of the ``count`` true entries of a 1-D mask whose count the host already knows.

    No synchronisation where ``nonzero_static`` runs on the mask's device.
    """
    if mask.device.type == "cpu" or _NONZERO_STATIC_ANY_DEVICE:
        return torch.nonzero_static(mask, size=count).squeeze(1)
    return mask.nonzero().squeeze(1)


def random_rank_in_group(groups: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """A uniformly random rank ``0..count-1`` for each element within its group id."""
    n = groups.numel()
    perm = torch.randperm(n, generator=generator, device="cpu").to(groups.device)
    sorted_groups, order = torch.sort(groups[perm], stable=True)
    rank = torch.empty(n, dtype=torch.long, device=groups.device)
    rank[perm[order]] = _rank_in_sorted_groups(sorted_groups)
    return rank



def _channel_dot(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """``sum_d a[:, d] * b[:, d]`` of two ``[B, D, P]`` CPU maps, as ``[B, P]`` in ``dtype``.

    A loop of in-place products over the channels, each a contiguous ``[B, P]`` plane, with no
    temporary the size of the map (on CPU a reduction over the strided channel dimension is
    slow).
    """
    out = torch.zeros((a.shape[0], a.shape[2]), dtype=dtype, device=a.device)
    for channel in range(a.shape[1]):
        out.addcmul_(a[:, channel].to(dtype), b[:, channel].to(dtype))
    return out


def _pixel_norms(flat: Tensor, dtype: torch.dtype) -> Tensor:
    """``[B, P]`` L2 norms over the channels of ``flat [B, D, P]``, in ``dtype``."""
    if flat.device.type == "cpu":
        return _channel_dot(flat, flat, dtype).sqrt_()
    return torch.linalg.vector_norm(flat, dim=1, dtype=dtype)


def _region_means_by_product(device: torch.device) -> bool:
    """Which way :class:`_RegionMeans` takes on ``device``.

    The scatter on CPU, the product elsewhere.
    """
    return device.type != "cpu"


class _RegionMeans(torch.autograd.Function):
    r"""Per (image, column) means ``[B, D, K]`` of the pixel embeddings ``flat [B, D, P]``.

    The means are of the embeddings or of their L2-normalised versions, without a copy of the
    (normalised) map.

    ``column [B, P]`` holds each pixel's column in ``[0, K]`` (column ``K`` is dropped) and
    ``counts [B, K]`` the pixels per column (a mean over no pixel is 0).

    With :math:`n` the count of pixel :math:`i`'s column and :math:`g_i` the output gradient
    there, unnormalised means give :math:`\partial L / \partial x_i = g_i / n`. Normalised ones
    average :math:`u_i = s_i x_i`, :math:`s_i = 1 / \max(\lVert x_i \rVert, \epsilon)`, and
    :math:`\partial u_i / \partial x_i = s_i (I - u_i u_i^\top)` where
    :math:`\lVert x_i \rVert > \epsilon` (:math:`s_i I` otherwise), so
    :math:`\partial L / \partial x_i = (s_i g_i - s_i^3 (x_i \cdot g_i)\, x_i) / n`.

    Two ways to the same numbers:

    - on CPU, a scatter-add of the pixels into the ``[B, D, K]`` sums, whose cost does not grow
      with K; its backward gathers one gradient map and updates it in place;
    - elsewhere, a batched product with the ``[B, P, K]`` one-hot map holding each pixel's
      weight :math:`s_i / n` (GPU atomics contend when many pixels add into the same few sums);
      its backward is the transposed product, plus one more for the :math:`x_i \cdot g_i`.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, flat: Tensor, column: Tensor, counts: Tensor, normalize: bool, product: bool
    ) -> Tensor:
        b, d, p = flat.shape
        width = counts.shape[1]
        scale = unit_sphere = None
        if normalize:
            norm = _pixel_norms(flat, counts.dtype)
            scale = norm.clamp(min=_NORM_EPS).reciprocal_()
            # where |x| <= eps the scale is constant, and the Jacobian's second term is 0
            unit_sphere = norm > _NORM_EPS
        ctx.product = product
        if product:
            # w_i = s_i / n, the weight of pixel i in its column's mean
            weight = F.pad(counts.clamp(min=1), (0, 1), value=1).gather(1, column).reciprocal_()
            if scale is not None:
                weight.mul_(scale)
            one_hot = flat.new_zeros((b, p, width + 1))
            # (finite in 16 bits: a weight beyond the range belongs to a pixel of norm ~0)
            cap = torch.finfo(flat.dtype).max
            one_hot.scatter_(2, column[..., None], weight.clamp(max=cap)[..., None].to(flat.dtype))
            one_hot = one_hot[..., :width]
            ctx.save_for_backward(flat, column, counts, one_hot, weight, scale, unit_sphere)
            return torch.bmm(flat, one_hot).to(counts.dtype)
        sums = flat.new_zeros((b, d, width + 1), dtype=counts.dtype)
        index = column[:, None, :]
        for start in range(0, d, _SCATTER_CHANNELS):
            block = flat[:, start : start + _SCATTER_CHANNELS].to(counts.dtype)
            if scale is not None:
                block = block * scale[:, None]
            sums[:, start : start + block.shape[1]].scatter_add_(
                2, index.expand(b, block.shape[1], p), block
            )
        ctx.save_for_backward(flat, column, counts, None, None, scale, unit_sphere)
        return sums[..., :width] / counts.clamp(min=1)[:, None]

    @staticmethod
    @first_derivatives_only("region_embeddings")
    def backward(  # type: ignore[override]
        ctx, grad_means: Tensor
    ) -> tuple[Tensor, None, None, None, None]:
        flat, column, counts, one_hot, weight, scale, unit_sphere = ctx.saved_tensors
        b, d, p = flat.shape
        if ctx.product:
            grad_means = grad_means.to(flat.dtype)
            grad = torch.bmm(grad_means, one_hot.transpose(1, 2))  # w_i g_i = s_i g_i / n
            if scale is not None:
                dots = F.pad(torch.bmm(flat.transpose(1, 2), grad_means), (0, 1))  # [B, P, K + 1]
                dot = dots.gather(2, column[..., None]).squeeze(2).to(scale.dtype)  # x_i . g_i
                coefficient = (dot * weight * scale.square()).masked_fill_(~unit_sphere, 0)
                grad.addcmul_(flat, coefficient[:, None].to(flat.dtype), value=-1)
            return grad, None, None, None, None
        # g_i / n at every pixel, then the normalisation's Jacobian
        per_column = F.pad(grad_means / counts.clamp(min=1)[:, None], (0, 1))
        grad = per_column.gather(2, column[:, None, :].expand(b, d, p))
        if scale is not None:
            coefficient = _channel_dot(flat, grad, grad.dtype).mul_(scale.pow(3))
            coefficient.masked_fill_(~unit_sphere, 0)
            grad.mul_(scale[:, None]).addcmul_(flat, coefficient[:, None], value=-1)
        return grad.to(flat.dtype), None, None, None, None


def region_embeddings(
    embeddings: Tensor, labels: Tensor, ignore_index: int = 255, normalize_pixels: bool = False
) -> tuple[Tensor, Tensor]:
    r"""Re-normalised mean embedding of every (image, class) region of a batch.

    For image :math:`b` and class :math:`c` with pixels :math:`\Omega_{bc}` (never
    ``ignore_index``):

    .. math::
        r_{bc} = \frac{m_{bc}}{\lVert m_{bc} \rVert_2}, \qquad
        m_{bc} = \frac{1}{|\Omega_{bc}|} \sum_{i \in \Omega_{bc}} u_i

    with :math:`u_i = x_i`, or with ``normalize_pixels`` :math:`u_i = x_i / \max(\lVert x_i
    \rVert_2, \epsilon)` as ``F.normalize(embeddings, dim=1)`` gives, without building that
    normalised map.

    No copy of the (normalised) map and no loop over images or classes: on CPU one scatter-add
    of the pixels into per-(image, class) sums, whose cost does not grow with the number of
    classes; on other devices one batched product with the one-hot class map (a scatter's
    atomic adds would contend there). Means of 16-bit inputs are accumulated in float32 on CPU
    (in the product's own float32 accumulation elsewhere). Gradients flow to
    ``embeddings`` (first derivatives only: ``create_graph=True`` raises), and the
    backward pass writes one gradient map.

    Args:
        embeddings: ``[B, D, h, w]`` pixel embeddings.
        labels: ``[B, h, w]`` class ids at the embeddings' resolution.
        ignore_index: label of pixels that belong to no region.
        normalize_pixels: average the L2-normalised pixel embeddings.

    Returns:
        ``(regions [R, D], region_labels [R])``, one row per (image, class) present, ordered by
        class, then image.

    Example:
        >>> x = torch.randn(2, 8, 4, 4)
        >>> y = torch.randint(0, 3, (2, 4, 4))
        >>> regions, region_labels = region_embeddings(x, y)
        >>> regions.shape[1], bool((region_labels[1:] >= region_labels[:-1]).all())
        (8, True)
    """
    _checks.check_pixel_maps(embeddings, labels)
    ignore_index = _checks.check_ignore_index(ignore_index)
    return region_means(embeddings, labels, ignore_index, normalize_pixels)


def region_means(
    embeddings: Tensor, labels: Tensor, ignore_index: int, normalize_pixels: bool
) -> tuple[Tensor, Tensor]:
    """:func:`region_embeddings` of validated maps (the losses' and the memory's)."""
    b, d, h, w = embeddings.shape
    flat = labels.reshape(b, h * w).long()
    valid = flat != ignore_index
    classes = torch.unique(flat[valid])
    k = classes.numel()
    # column of a pixel: its class's rank among `classes`, or k (dropped) when ignored
    column = torch.where(valid, torch.searchsorted(classes, flat), k)
    accumulate = torch.promote_types(embeddings.dtype, torch.float32)
    counts = torch.zeros((b, k + 1), dtype=accumulate, device=flat.device).scatter_add_(
        1, column, torch.ones((), dtype=accumulate, device=flat.device).expand(b, h * w)
    )[:, :k]  # [B, K]
    means = _RegionMeans.apply(
        embeddings.reshape(b, d, h * w), column, counts, normalize_pixels,
        _region_means_by_product(embeddings.device),
    )
    present = (counts > 0).T  # [K, B]: class-major order
    means = means.permute(2, 0, 1)[present].to(embeddings.dtype)
    region_labels = classes[:, None].expand(-1, b)[present]
    return F.normalize(means, p=2, dim=1), region_labels



@dataclass(frozen=True)
class PixelMaps:
    """A batch's maps at the embeddings' resolution ``(h, w)``, validated.

    Attributes:
        labels: ``[B, h, w]`` int64 class ids.
        predictions: ``[B, h, w]`` int64 predicted class ids, or ``None``.
        logits: ``[B, C, h, w]`` class scores, or ``None``.
        num_classes: the bound the labels were checked against (``num_classes``, else the
            logits' ``C``), or ``None``.
    """

    labels: Tensor
    predictions: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    num_classes: Optional[int] = None

    @property
    def predicted(self) -> Optional[Tensor]:
        """The predicted label map, or ``None``.

        ``predictions``, else the argmax of ``logits``, else ``None``.
        """
        if self.predictions is None and self.logits is not None:
            return predicted_labels(self.logits.detach())
        return self.predictions


def pixel_maps(
    embeddings: Tensor,
    labels: Tensor,
    predictions: Optional[Tensor] = None,
    logits: Optional[Tensor] = None,
    *,
    ignore_index: int = 255,
    num_classes: Optional[int] = None,
    logits_name: str = "logits",
) -> PixelMaps:
    """Validate a batch and bring labels, predictions and logits to the embeddings' resolution.

    Labels must be at the embeddings' resolution or larger by one integer stride ``s`` in both
    dimensions, ``h`` being ``H / s`` rounded down or up to one more (512 x 512 or 513 x 513
    labels for 64 x 64 or 65 x 65 embeddings), or by one exact scale ``H / h = W / w``. Every
    map is nearest-resized by the rule of :func:`~pixcontrast.functional.resize_labels` (logits
    pick the same source pixels as labels), so a map already at ``(h, w)`` is returned as it
    is. The labels and predictions come out as int64 whatever their integer dtype: relabelling
    labels (``exclude_classes`` to ``ignore_index``, which a ``uint8`` or ``int8`` map may not
    hold) then never wraps around.

    Args:
        embeddings: ``[B, D, h, w]`` float pixel embeddings.
        labels: ``[B, H, W]`` integer class ids (``ignore_index`` for unlabelled pixels).
        predictions: ``[B, h', w']`` predicted class ids, or ``None``.
        logits: ``[B, C, h'', w'']`` float class scores (``C >= 1``), or ``None``.
        ignore_index: the label of unlabelled pixels.
        num_classes: when known, labels must lie in ``[0, num_classes)`` or be ``ignore_index``
            (one host synchronisation). ``None``: the logits' ``C`` when there are logits.
        logits_name: what errors call ``logits`` (the name of the caller's argument).

    Returns:
        The :class:`PixelMaps` at ``(h, w)``.

    Raises:
        TypeError: a map of the wrong kind (float labels or predictions, integer embeddings or
            logits), a non-integer ``ignore_index``.
        ValueError: wrong numbers of dimensions, batch sizes that differ from the embeddings',
            maps on different devices, an empty map, logits without classes, labels that are
            not at one stride of the embeddings' resolution (or channels-last
            embeddings), or a label outside ``[0, num_classes)`` other than ``ignore_index``.

    Example:
        >>> maps = pixel_maps(torch.randn(1, 4, 2, 2), torch.tensor([[[0, 0, 1, 1]] * 4]))
        >>> maps.labels.tolist()
        [[[0, 1], [0, 1]]]
    """
    _checks.check_embeddings(embeddings, "embeddings", 4)
    _checks.check_labels(labels, "labels", 3)
    ignore_index = _checks.check_ignore_index(ignore_index)
    if predictions is not None:
        _checks.check_labels(predictions, "predictions", 3)
    if logits is not None:
        _checks.check_embeddings(logits, logits_name, 4)
        if logits.shape[1] == 0:
            raise ValueError(f"{logits_name} must have at least one class, got shape [B, 0, h, w]")
    _checks.check_same_device(
        [("embeddings", embeddings), ("labels", labels), ("predictions", predictions),
         (logits_name, logits)]
    )
    b, _, h, w = embeddings.shape
    if labels.shape[0] != b:
        raise ValueError(f"labels has batch size {labels.shape[0]} but embeddings has {b}")
    for name, value in (("predictions", predictions), (logits_name, logits)):
        if value is not None and (value.shape[0] != b or 0 in value.shape[-2:]):
            raise ValueError(
                f"{name} of shape {list(value.shape)} cannot match embeddings of batch {b} and "
                f"resolution {(h, w)}: the batch must be equal and the spatial size non-empty"
            )
    check_label_resolution(embeddings, labels)
    bound = None
    if num_classes is None and logits is not None:
        num_classes = logits.shape[1]
        bound = f"the {num_classes} classes of {logits_name}, its dimension 1"
    if num_classes is not None:
        _checks.check_label_values(labels, num_classes, ignore_index, "labels", bound)
    if predictions is not None:
        predictions = resize_label_map(predictions, (h, w)).long()
    if logits is not None and tuple(logits.shape[-2:]) != (h, w):
        # the source pixel of every target pixel, by the same rule as the labels' resize
        size = logits.shape[-2:]
        source = torch.arange(size[0] * size[1], device=logits.device).view(1, *size)
        source = resize_label_map(source, (h, w)).reshape(-1)
        logits = logits.flatten(2)[:, :, source].view(b, -1, h, w)
    return PixelMaps(resize_label_map(labels, (h, w)).long(), predictions, logits, num_classes)


def split_predictions(
    predictions: Optional[Tensor], num_classes: Optional[int]
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The losses' ``predictions`` argument (logits or a label map) as ``(label map, logits)``.

    Args:
        predictions: logits ``[B, C, h', w']`` (detached here) or a label map ``[B, h', w']``,
            or ``None``.
        num_classes: when known, the number of classes logits must have.

    Returns:
        ``(predictions, None)`` for a label map, ``(None, logits)`` for logits, ``(None, None)``
        for ``None``.

    Raises:
        TypeError: integer predictions with 4 dimensions.
        ValueError: logits with another number of classes than ``num_classes``, or predictions
            with neither 3 nor 4 dimensions.
    """
    if predictions is None:
        return None, None
    _checks.check_tensor(predictions, "predictions")
    if predictions.dim() == 3:
        return predictions, None
    if predictions.dim() != 4:
        raise ValueError(
            "predictions must be logits [B, C, h, w] or a label map [B, h, w], "
            f"got shape {tuple(predictions.shape)}"
        )
    if not predictions.is_floating_point():
        raise TypeError("predictions with 4 dimensions must be float logits [B, C, h, w]")
    if num_classes is not None and predictions.shape[1] != num_classes:
        raise ValueError(
            f"predictions has {predictions.shape[1]} classes but num_classes is {num_classes}"
        )
    return None, predictions.detach()


def prepare_pixel_maps(
    embeddings: Tensor,
    labels: Tensor,
    predictions: Optional[Tensor],
    ignore_index: int,
    num_classes: Optional[int] = None,
) -> PixelMaps:
    """:func:`pixel_maps` for the losses' arguments.

    ``predictions`` are logits or a label map (see :func:`split_predictions`).
    """
    predicted, logits = split_predictions(predictions, num_classes)
    return pixel_maps(
        embeddings, labels, predicted, logits, ignore_index=ignore_index, num_classes=num_classes,
        logits_name="predictions",
    )


def exclude_labels(labels: Tensor, exclude_classes: tuple[int, ...], ignore_index: int) -> Tensor:
    """``labels`` with every class of ``exclude_classes`` replaced by ``ignore_index``.

    A copy; one elementwise pass per excluded class, no host synchronisation.
    """
    for cls in exclude_classes:
        labels = labels.masked_fill(labels == cls, ignore_index)
    return labels
