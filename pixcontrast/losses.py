"""Loss modules: anchors sampled from label maps, contrasted with the keys of a hook.

:class:`SampledContrastLoss` holds what every such loss shares (validation of a batch, the
sampler, the memory, the miner, cross-process gathering, the order of a call); its subclasses
say which keys the anchors meet (:meth:`SampledContrastLoss.contrast_keys`).
"""

from __future__ import annotations

import abc
import dataclasses
import sys
import warnings
from types import FrameType
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks, diagnostics, distributed
from ._pixels import PixelMaps, exclude_labels, prepare_pixel_maps, region_means
from .functional import contrast_pairs_validated, contrast_validated, loss_options
from .memory import ClassMemoryBank
from .mining import MinedPairs
from .ops import BACKEND_NAMES, ContrastInputs, ContrastOptions
from .samplers import AnchorSample, AnchorSampler, HardAnchorSampler

__all__ = ["PixelContrastLoss", "RegionContrastLoss", "SampledContrastLoss"]

KeyParts = tuple[Optional[list[Tensor]], Optional[list[Tensor]], bool]
Miner = Callable[..., MinedPairs]


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning issued here at the user's line.

    The first frame outside this module and ``nn.Module.__call__``.
    """
    frame: Optional[FrameType] = sys._getframe(1)
    level = 1
    while frame is not None and (
        frame.f_globals.get("__name__") == __name__
        or frame.f_globals.get("__name__", "").startswith("torch.nn.modules.")
    ):
        frame, level = frame.f_back, level + 1
    return level


def _join(
    parts: list[tuple[Tensor, Tensor]],
) -> tuple[Optional[list[Tensor]], Optional[list[Tensor]]]:
    """``(keys, key_labels)`` of several key sets as ``contrastive_loss``'s sequences of parts.

    Parts, so that detached memory keys get no gradient work; ``(None, None)`` for none.
    """
    if not parts:
        return None, None
    return [keys for keys, _ in parts], [labels for _, labels in parts]


def _rank_keys(keys: Tensor, key_labels: Tensor, own: bool) -> list[tuple[Tensor, Tensor]]:
    """Every rank's ``(keys, key_labels)`` in rank order, this rank's own only when ``own``.

    The keys carry gradients back to the rank that owns them.
    """
    parts = list(
        zip(distributed.all_gather_with_grad(keys), distributed.all_gather(key_labels))
    )
    if not own:
        del parts[distributed.get_rank()]
    return parts


# Anchors of normalize=False whose L2 norms leave [1 / _NORM_FACTOR, _NORM_FACTOR] warn.
_NORM_FACTOR = 4.0


def _warn_far_from_unit(anchors: Tensor, temperature: float) -> None:
    """Warn when the L2 norms of ``anchors`` (``normalize=False``) are far from 1.

    The loss is designed for unit embeddings: raw features of norm ``r`` make the scores
    ``x . k / temperature`` reach ``r**2 / temperature`` and the loss grow with them. One host
    read; a module calls it at its first draw only.
    """
    if not anchors.shape[0]:
        return
    norms = torch.linalg.vector_norm(anchors.detach().float(), dim=1)
    low, high = torch.stack([norms.min(), norms.max()]).tolist()
    if 1 / _NORM_FACTOR <= low and high <= _NORM_FACTOR:
        return
    warnings.warn(
        f"normalize=False, but the anchors' L2 norms lie in [{low:.3g}, {high:.3g}], far from "
        f"1: scores x.k / temperature then reach {high**2 / temperature:.3g} instead of "
        f"1 / temperature = {1 / temperature:.3g}, and the loss grows with them (the loss is "
        "made for unit embeddings); pass normalize=True (the default) unless the embeddings "
        "are L2-normalised already. (Checked once, at the first batch.)",
        UserWarning,
        stacklevel=_caller_stacklevel(),
    )


class SampledContrastLoss(nn.Module, abc.ABC):
    r"""The common base of the pixel and region losses: sample anchors, contrast with keys.

    Labels (and predictions) are nearest-resized to the embeddings' resolution, anchors are
    sampled per image and class by ``sampler``, and :func:`~pixcontrast.contrastive_loss` contrasts
    them with the keys of :meth:`contrast_keys`, the one method a subclass provides (see that
    function for the math of the ``"paper"`` and ``"supcon"`` variants). With a ``miner``, each
    anchor meets only its mined keys (:func:`~pixcontrast.functional.pair_contrastive_loss`).

    With a :class:`~pixcontrast.ClassMemoryBank`, one call does, in this order:

    1. sample the anchors of the batch;
    2. take the memory's keys, which therefore come from previous steps only;
    3. compute the loss of the anchors against those keys (and, for the pixel loss,
       themselves);
    4. enqueue the batch (its embeddings detached, after normalisation) when training: only
       in ``train()`` mode with gradients enabled, never in ``eval()`` mode, under
       ``torch.no_grad()`` or ``torch.inference_mode()`` (validation batches stay out of the
       memory). ``enqueue=False`` at construction leaves enqueueing to the caller
       (``memory.enqueue``), and ``forward(..., enqueue=True/False)`` decides for one call.

    The memory is a submodule: it follows ``.to()`` and is part of ``state_dict()``. When two
    losses share one memory, let only one of them enqueue.

    Under ``DistributedDataParallel`` with ``gather=True``, every rank's anchors (or batch
    regions) are also keys of every other rank's anchors; they reach it through
    :func:`~pixcontrast.distributed.all_gather_with_grad` (their gradients flow back to the rank
    that owns them), so each anchor sees the same keys as in one process on the concatenated
    batch. The loss a rank returns is :func:`~pixcontrast.distributed.mean_across_ranks` of its
    anchors' summed losses: the sum times the world size :math:`W` over the number of anchors with
    a positive on all ranks. DDP's averaging of gradients (sum over ranks, divided by :math:`W`)
    then gives the parameter gradients of one process computing the mean over the concatenated
    batch (up to rounding), and the mean over ranks of the returned losses is that loss. (The
    embedding gradients on each rank, before DDP's division, are :math:`W` times the
    single-process ones.) The sampler still runs per rank, so ``max_samples`` is a budget per rank.
    Every rank must call the loss at every step, since it runs collectives; without a process
    group ``gather=True`` is ``gather=False``. The memory bank synchronises its entries
    across ranks on its own (its ``gather``, see :class:`~pixcontrast.ClassMemoryBank`).

    Args:
        temperature: :math:`\tau`.
        base_temperature: the loss is scaled by ``temperature / base_temperature`` (``None``: 1).
        variant: ``"paper"`` or ``"supcon"``.
        ignore_index: label of unlabelled pixels; they are never anchors.
        normalize: L2-normalise the embeddings over channels first. With ``False`` the
            embeddings must be unit already: the anchors of the first batch are checked once,
            and norms outside ``[1/4, 4]`` warn (raw features give scores of ``|x|^2 / tau``
            and a loss that grows with them).
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"``; see
            ``contrastive_loss`` (unused with a ``miner``).
        sampler: an :class:`~pixcontrast.samplers.AnchorSampler`; it gets the batch's
            validated maps: labels, the predicted label map and, when ``predictions`` are
            logits, the logits. Defaults
            to ``HardAnchorSampler(max_samples, max_views, num_classes=num_classes)``: half of
            each class's anchors mispredicted ("hard") pixels when predictions are given.
        max_samples: anchor budget per batch of the default sampler (``None``: 1024). Only
            without ``sampler`` (a sampler has its own budget; giving both raises).
        max_views: most anchors per image and class of the default sampler (``None``: 100).
            Only without ``sampler``.
        num_classes: labels outside ``[0, num_classes)`` (other than ``ignore_index``)
            raise. Taken from ``memory`` when there is one. ``None``: the logits' ``C`` when
            ``predictions`` are logits, else :data:`~pixcontrast.samplers.DEFAULT_NUM_CLASSES`
            (1024), and then a label 255 that is not ``ignore_index`` raises too (255 marks
            unlabelled pixels in most datasets): pass ``ignore_index=255``, or ``num_classes``
            if 255 is a class.
        memory: a :class:`~pixcontrast.ClassMemoryBank` of keys from previous steps, or ``None``.
        miner: a :class:`~pixcontrast.mining.KeyMiner` (or a callable with its signature,
            returning :class:`~pixcontrast.mining.MinedPairs`): each anchor is then contrasted
            with its mined positives and negatives among the keys of :meth:`contrast_keys` only,
            by :func:`~pixcontrast.functional.pair_contrastive_loss`; ``generator`` drives its
            draws too. ``None``: every key.
        enqueue: enqueue each training batch into ``memory`` after computing the loss (see
            step 4 above).
        gather: ``False`` (contrast within this process's batch) or ``True`` (with the anchors
            or batch regions of every rank of the default process group, see above).
        exclude_classes: classes left out of the contrast only: their pixels are never anchors
            nor keys, they are never enqueued into ``memory``, and memory keys of these classes
            are not used. Unlike ``ignore_index`` ("unlabelled everywhere") the pixels stay
            labelled for the caller's other losses. Use it for a catch-all class (background,
            "stuff" that is merely "not an object"): as anchors and keys its pixels pull every
            such pixel into one cluster opposite all objects, which erases the context near
            object boundaries. Integers in ``[0, num_classes)`` when ``num_classes`` is known.

    Every option but ``temperature`` is keyword-only.

    Shape:
        - embeddings: ``[B, D, h, w]``
        - labels: ``[B, H, W]`` integer class ids (any integer dtype), at the embeddings'
          resolution or larger by one integer stride ``s`` in both dimensions: ``h`` is
          ``H / s`` rounded down, or up to one more (513 x 513 labels for 65 x 65 embeddings at
          stride 8), or by one exact scale ``H / h = W / w``. Other sizes (another aspect ratio,
          fewer pixels than the embeddings) raise; labels are nearest-resized like
          ``F.interpolate(mode="nearest")``.
        - predictions (optional): logits ``[B, C, h', w']`` or a label map ``[B, h', w']``
        - output: scalar

    A batch with no valid pixel, or where no anchor has a positive, gives an exact zero that is
    connected to ``embeddings``. The anchors of the last call are kept, detached, in
    ``last_sample``, and its statistics in ``last_stats`` (both raise before the first call; see
    :func:`pixcontrast.diagnostics.contrast_stats`; they count every key, mined or not):
    detached tensors, computed without a host synchronisation, to ``.item()`` when logging.
    ``generator`` (a CPU ``torch.Generator``) drives the anchor sampling, the memory's pixel
    choice and the miner's draws.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        *,
        base_temperature: Optional[float] = None,
        variant: str = "paper",
        ignore_index: int = 255,
        normalize: bool = True,
        backend: str = "auto",
        sampler: Optional[AnchorSampler] = None,
        max_samples: Optional[int] = None,
        max_views: Optional[int] = None,
        num_classes: Optional[int] = None,
        memory: Optional[ClassMemoryBank] = None,
        miner: Optional[Miner] = None,
        enqueue: bool = True,
        gather: bool = False,
        exclude_classes: Sequence[int] = (),
    ) -> None:
        super().__init__()
        options = loss_options(temperature, base_temperature, variant, "mean")
        self.temperature = options.temperature
        self.base_temperature = base_temperature
        self.variant = options.variant
        self.ignore_index = _checks.check_ignore_index(ignore_index)
        self.normalize = bool(normalize)
        self._norms_checked = self.normalize  # (unnormalised anchors: checked at the first draw)
        self.backend = _checks.check_choice(backend, "backend", BACKEND_NAMES)
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes <= 0):
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if memory is not None:
            num_classes = self._check_memory(memory, num_classes)
        self.num_classes = num_classes
        if sampler is None:
            sampler = HardAnchorSampler(
                1024 if max_samples is None else max_samples,
                100 if max_views is None else max_views,
                num_classes=num_classes,
            )
        elif max_samples is not None or max_views is not None:
            raise ValueError(
                "max_samples and max_views configure the default sampler: with sampler=..., "
                "give them to the sampler instead"
            )
        if not isinstance(sampler, AnchorSampler):
            raise TypeError(
                "sampler must be an AnchorSampler (with a sample_maps method), e.g. "
                f"HardAnchorSampler(), got {type(sampler).__name__}"
            )
        self.sampler = sampler
        if miner is not None and not callable(miner):
            raise TypeError(f"miner must be a KeyMiner or None, got {type(miner).__name__}")
        self.miner = miner
        self.memory = memory
        self.enqueue = bool(enqueue)
        if not isinstance(gather, bool):
            raise TypeError(f"gather must be a bool, got {type(gather).__name__}")
        self.gather = gather
        self.exclude_classes = _checks.check_exclude_classes(
            exclude_classes, self.ignore_index, num_classes
        )
        self._last_sample: Optional[AnchorSample] = None
        self._last_stats: Optional[dict[str, Tensor]] = None

    @property
    def last_sample(self) -> AnchorSample:
        """The anchors of the last call, detached (raises before the first call)."""
        if self._last_sample is None:
            raise RuntimeError(f"{type(self).__name__}.last_sample is set by the first call")
        return self._last_sample

    @property
    def last_stats(self) -> dict[str, Tensor]:
        """The statistics of the last call (:func:`~pixcontrast.diagnostics.contrast_stats`).

        Raises before the first call.
        """
        if self._last_stats is None:
            raise RuntimeError(f"{type(self).__name__}.last_stats is set by the first call")
        return self._last_stats

    def _check_memory(self, memory: object, num_classes: Optional[int]) -> int:
        """The memory's number of classes, once it is known to agree with the loss."""
        if not isinstance(memory, ClassMemoryBank):
            raise TypeError(
                f"memory must be a ClassMemoryBank or None, got {type(memory).__name__}"
            )
        if num_classes is not None and num_classes != memory.num_classes:
            raise ValueError(
                f"num_classes={num_classes} but memory has {memory.num_classes} classes"
            )
        if self.ignore_index != memory.ignore_index:
            raise ValueError(
                f"ignore_index={self.ignore_index} but memory has "
                f"ignore_index={memory.ignore_index}"
            )
        return memory.num_classes

    @abc.abstractmethod
    def contrast_keys(self, embeddings: Tensor, labels: Tensor, sample: AnchorSample) -> KeyParts:
        """The keys of the ``sample`` of a prepared batch, the hook of a subclass.

        Args:
            embeddings: the batch's ``[B, D, h, w]`` embeddings (not normalised).
            labels: its ``[B, h, w]`` labels at that resolution, excluded classes relabelled
                ``ignore_index``.
            sample: the anchors drawn from it, embeddings normalised when ``normalize``.

        Returns:
            ``(keys, key_labels, in_batch)``: lists of key parts ``[M_i, D]`` and their labels
            ``[M_i]`` (negative: invalid), or ``(None, None)``, and whether the anchors are keys
            of each other, as ``contrastive_loss`` takes them.
        """

    def _prepare(
        self, embeddings: Tensor, labels: Tensor, predictions: Optional[Tensor]
    ) -> PixelMaps:
        """Validate a batch once (for the sampler and the memory too).

        Returns its maps at the embeddings' resolution.
        """
        maps = prepare_pixel_maps(
            embeddings, labels, predictions, self.ignore_index, self.num_classes
        )
        if self.memory is not None:
            self.memory.check_embeddings(embeddings)
        _checks.check_finite(embeddings, "embeddings")
        return dataclasses.replace(
            maps, labels=exclude_labels(maps.labels, self.exclude_classes, self.ignore_index)
        )

    def _memory_keys(self, pixels: bool, regions: bool) -> tuple[Tensor, Tensor]:
        """The memory's keys, those of ``exclude_classes`` marked invalid (label -1)."""
        assert self.memory is not None  # (called only with a memory)
        keys, key_labels = self.memory.keys(pixels, regions)
        return keys, exclude_labels(key_labels, self.exclude_classes, -1)

    def unit(self, embeddings: Tensor) -> Tensor:
        """``embeddings`` L2-normalised over channels when ``normalize``, else unchanged.

        Takes rows ``[N, D]`` or maps ``[B, D, h, w]``.
        """
        return F.normalize(embeddings, p=2, dim=1) if self.normalize else embeddings

    def sample(
        self,
        embeddings: Tensor,
        labels: Tensor,
        predictions: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> AnchorSample:
        """The anchors ``forward`` would contrast (after resizing, with normalised embeddings)."""
        maps = self._prepare(embeddings, labels, predictions)
        return self._draw(embeddings, maps, generator)

    def _draw(
        self,
        embeddings: Tensor,
        maps: PixelMaps,
        generator: Optional[torch.Generator],
    ) -> AnchorSample:
        sample = self.sampler.sample_maps(embeddings, maps, self.ignore_index, generator)
        if not self._norms_checked:
            self._norms_checked = True
            _warn_far_from_unit(sample.embeddings, self.temperature)
        # Normalising the N sampled rows instead of the whole map gives the same anchors.
        return dataclasses.replace(sample, embeddings=self.unit(sample.embeddings))

    def _contrast(
        self,
        sample: AnchorSample,
        keys: Optional[list[Tensor]],
        key_labels: Optional[list[Tensor]],
        in_batch: bool,
        generator: Optional[torch.Generator],
    ) -> Tensor:
        """The loss of the anchors against their keys (all, or the mined ones).

        Scaled for DDP when gathering.
        """
        # The batch is validated (see _prepare), and so are the keys built from it and the
        # memory's: the contrast takes them as they are.
        inputs = ContrastInputs(
            sample.embeddings, sample.labels, tuple(keys or ()),
            torch.cat(key_labels) if key_labels else None, in_batch,
        )
        rho = 1.0 if self.base_temperature is None else self.temperature / self.base_temperature
        reduction = "sum" if self.gather else "mean"
        options = ContrastOptions(self.temperature, rho, self.variant, reduction)
        if self.miner is None:
            loss = contrast_validated(inputs, options, self.backend)
            counted: Optional[Tensor] = None  # (counted below, only when gathering)
        else:
            pairs = self.miner(
                sample.embeddings, sample.labels, keys, key_labels, in_batch=in_batch,
                generator=generator,
            )
            loss = contrast_pairs_validated(
                inputs, pairs.positive_index, pairs.negative_index, options
            )
            counted = (pairs.positive_index >= 0).any(dim=1)
        if self.gather:
            # the denominator of the mean: the anchors with a (selected) positive, of all ranks
            if counted is None:
                counted = diagnostics.positive_counts(sample.labels, key_labels, in_batch) > 0
            loss = distributed.mean_across_ranks(loss, counted.sum())
        return loss

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        predictions: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        *,
        enqueue: Optional[bool] = None,
    ) -> Tensor:
        """The loss of a batch (see the class docstring for the steps and shapes).

        Args:
            embeddings: ``[B, D, h, w]``.
            labels: ``[B, H, W]`` integer class ids.
            predictions: logits ``[B, C, h', w']`` or a label map ``[B, h', w']``, or ``None``.
            generator: CPU random source of the anchor (memory pixel, miner) choices.
            enqueue: enqueue this batch into the memory; ``None`` (default): when the module
                was built with ``enqueue=True``, is in training mode and gradients are enabled
                (so validation under ``eval()``, ``torch.no_grad()`` or
                ``torch.inference_mode()`` leaves the memory as it was).
        """
        maps = self._prepare(embeddings, labels, predictions)
        labels = maps.labels
        sample = self._draw(embeddings, maps, generator)
        # Detached: holding the graph would keep it alive and make the module impossible to
        # deepcopy (EMA and teacher copies) after a training step.
        self._last_sample = dataclasses.replace(sample, embeddings=sample.embeddings.detach())
        keys, key_labels, in_batch = self.contrast_keys(embeddings, labels, sample)
        loss = self._contrast(sample, keys, key_labels, in_batch, generator)
        if enqueue is None:
            enqueue = self.enqueue and self.training and torch.is_grad_enabled()
        if self.memory is not None and enqueue:
            self.memory.enqueue_maps(embeddings, labels, generator, normalize=self.normalize)
        self._last_stats = diagnostics.contrast_stats(sample, key_labels, in_batch, loss,
                                                      self.memory)
        return loss

    def extra_repr(self) -> str:
        """The options shown by ``repr``."""
        text = (
            f"temperature={self.temperature}, base_temperature={self.base_temperature}, "
            f"variant={self.variant!r}, ignore_index={self.ignore_index}, "
            f"backend={self.backend!r}, gather={self.gather}"
        )
        if self.miner is not None:
            text += f", miner={self.miner!r}"
        if self.exclude_classes:
            text += f", exclude_classes={self.exclude_classes}"
        if self.memory is not None:
            text += f", enqueue={self.enqueue}"
        return text


class PixelContrastLoss(SampledContrastLoss):
    r"""Supervised pixel-to-pixel contrastive loss over a batch of segmentation embeddings.

    The sampled anchors are contrasted with each other (in-batch, across images), with the
    anchors of the other ranks (``gather=True``) and, with a ``memory``, with its pixel and
    region keys. Sampling, the order of a call with a memory, DDP, mining, the statistics and
    the edge cases are those of :class:`SampledContrastLoss`, which documents the other
    keyword-only options (``base_temperature``, ``variant``, ``ignore_index``, ``normalize``,
    ``backend``, ``sampler``, ``max_samples``, ``max_views``, ``num_classes``, ``memory``,
    ``miner``, ``enqueue``, ``gather``, ``exclude_classes``).

    Args:
        temperature: :math:`\tau`.
        use_pixel_memory: contrast with the memory's pixel keys.
        use_region_memory: contrast with the memory's region keys.

    The other keyword-only arguments are those of :class:`SampledContrastLoss`.

    Shape:
        - embeddings: ``[B, D, h, w]``
        - labels: ``[B, H, W]`` integer class ids, at the embeddings' resolution or larger by
          one stride (see :class:`SampledContrastLoss`)
        - predictions (optional): logits ``[B, C, h', w']`` or a label map ``[B, h', w']``
        - output: scalar

    Example:
        >>> import torch
        >>> criterion = PixelContrastLoss(temperature=0.1, max_samples=64, max_views=8)
        >>> embeddings = torch.randn(2, 16, 8, 8, requires_grad=True)
        >>> labels = torch.randint(0, 3, (2, 32, 32))
        >>> loss = criterion(embeddings, labels)
        >>> loss.backward()

        With a memory of earlier batches:

        >>> from pixcontrast.memory import ClassMemoryBank
        >>> bank = ClassMemoryBank(num_classes=3, dim=16, pixels_per_class=100,
        ...                        regions_per_class=20)
        >>> criterion = PixelContrastLoss(max_samples=64, max_views=8, memory=bank)
        >>> for _ in range(2):
        ...     criterion(embeddings, labels).backward()
        >>> int(bank.region_count.sum())
        12

        Hard mining against the memory, 4 positives and 16 negatives per anchor:

        >>> from pixcontrast.mining import KeyMiner
        >>> criterion = PixelContrastLoss(max_samples=64, max_views=8, memory=bank,
        ...                               miner=KeyMiner(num_positives=4, num_negatives=16))
        >>> criterion(embeddings, labels).backward()
    """

    def __init__(
        self,
        temperature: float = 0.1,
        *,
        use_pixel_memory: bool = True,
        use_region_memory: bool = True,
        base_temperature: Optional[float] = None,
        variant: str = "paper",
        ignore_index: int = 255,
        normalize: bool = True,
        backend: str = "auto",
        sampler: Optional[AnchorSampler] = None,
        max_samples: Optional[int] = None,
        max_views: Optional[int] = None,
        num_classes: Optional[int] = None,
        memory: Optional[ClassMemoryBank] = None,
        miner: Optional[Miner] = None,
        enqueue: bool = True,
        gather: bool = False,
        exclude_classes: Sequence[int] = (),
    ) -> None:
        super().__init__(
            temperature, base_temperature=base_temperature, variant=variant,
            ignore_index=ignore_index, normalize=normalize, backend=backend, sampler=sampler,
            max_samples=max_samples, max_views=max_views, num_classes=num_classes, memory=memory,
            miner=miner, enqueue=enqueue, gather=gather, exclude_classes=exclude_classes,
        )
        self.use_pixel_memory = bool(use_pixel_memory)
        self.use_region_memory = bool(use_region_memory)

    def contrast_keys(self, embeddings: Tensor, labels: Tensor, sample: AnchorSample) -> KeyParts:
        """The anchors themselves (in-batch), the other ranks' anchors, the memory's keys.

        The other ranks' anchors with ``gather=True``, the memory's keys when there is one.
        """
        parts = []
        if self.gather:
            parts += _rank_keys(sample.embeddings, sample.labels, own=False)
        if self.memory is not None and (self.use_pixel_memory or self.use_region_memory):
            parts.append(self._memory_keys(self.use_pixel_memory, self.use_region_memory))
        return (*_join(parts), True)

    def extra_repr(self) -> str:
        """The options shown by ``repr``."""
        text = super().extra_repr()
        if self.memory is not None:
            text += (
                f", use_pixel_memory={self.use_pixel_memory}, "
                f"use_region_memory={self.use_region_memory}"
            )
        return text


class RegionContrastLoss(SampledContrastLoss):
    r"""Pixel-to-region contrastive loss: sampled pixel anchors against region embeddings.

    A region is one class in one image; its embedding is the re-normalised mean of its pixel
    embeddings (:func:`~pixcontrast.functional.region_embeddings`). The keys are the regions of the
    current batch (with gradient: they are differentiated like the anchors) and/or the region
    keys of ``memory`` (previous steps, no gradient). An anchor's positives are the regions of its
    class, its own image's included; anchors are not keys of each other (``in_batch=False``).
    With ``gather=True`` the batch regions of every rank are keys (with gradient to the rank
    that owns them). Sampling, resizing, variants, mining, DDP scaling and the memory's order
    (keys taken first, batch enqueued after unless ``enqueue=False``) are those of
    :class:`SampledContrastLoss`, which documents the other keyword-only options (an excluded
    class has no region key either).

    Args:
        temperature: :math:`\tau`.
        use_batch_regions: contrast with the regions of the current batch.

    The other keyword-only arguments are those of :class:`SampledContrastLoss`; a ``memory``
    contributes its region keys.

    Shape:
        - embeddings: ``[B, D, h, w]``
        - labels: ``[B, H, W]`` integer class ids, at the embeddings' resolution or larger by
          one stride (see :class:`SampledContrastLoss`)
        - output: scalar

    Example:
        >>> import torch
        >>> criterion = RegionContrastLoss(max_samples=64, max_views=8)
        >>> embeddings = torch.randn(2, 16, 8, 8, requires_grad=True)
        >>> labels = torch.randint(0, 3, (2, 32, 32))
        >>> criterion(embeddings, labels).backward()
    """

    def __init__(
        self,
        temperature: float = 0.1,
        *,
        use_batch_regions: bool = True,
        base_temperature: Optional[float] = None,
        variant: str = "paper",
        ignore_index: int = 255,
        normalize: bool = True,
        backend: str = "auto",
        sampler: Optional[AnchorSampler] = None,
        max_samples: Optional[int] = None,
        max_views: Optional[int] = None,
        num_classes: Optional[int] = None,
        memory: Optional[ClassMemoryBank] = None,
        miner: Optional[Miner] = None,
        enqueue: bool = True,
        gather: bool = False,
        exclude_classes: Sequence[int] = (),
    ) -> None:
        if not use_batch_regions and memory is None:
            raise ValueError("use_batch_regions=False needs a memory to take region keys from")
        super().__init__(
            temperature, base_temperature=base_temperature, variant=variant,
            ignore_index=ignore_index, normalize=normalize, backend=backend, sampler=sampler,
            max_samples=max_samples, max_views=max_views, num_classes=num_classes, memory=memory,
            miner=miner, enqueue=enqueue, gather=gather, exclude_classes=exclude_classes,
        )
        self.use_batch_regions = bool(use_batch_regions)

    def contrast_keys(self, embeddings: Tensor, labels: Tensor, sample: AnchorSample) -> KeyParts:
        """Batch regions first, then the memory's regions; the anchors are not keys.

        With ``gather=True`` the batch regions of every rank, in rank order.
        """
        parts = []
        if self.use_batch_regions:
            regions = region_means(embeddings, labels, self.ignore_index, self.normalize)
            parts += _rank_keys(*regions, own=True) if self.gather else [regions]
        if self.memory is not None:
            parts.append(self._memory_keys(pixels=False, regions=True))
        return (*_join(parts), False)

    def extra_repr(self) -> str:
        """The options shown by ``repr``."""
        return super().extra_repr() + f", use_batch_regions={self.use_batch_regions}"
