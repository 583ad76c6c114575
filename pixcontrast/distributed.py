"""Collectives for multi-process training with :mod:`torch.distributed`.

Every rank may hold a different number of rows (zero included): :func:`all_gather` and
:func:`all_gather_with_grad` exchange the row counts first, pad to the longest, gather and trim.
Without an initialised process group, or with a world of one process, they are identities (they
return ``[tensor]``), and :func:`mean_across_ranks` is a plain mean: code written for several
processes runs unchanged in one.

Each of these is a collective: every rank of the group must call it, in the same order.

Ending a gloo run cleanly (torch 2.13): import ``torch._dynamo`` before ``init_process_group``,
as ``examples/ddp_train.py`` does. ``torch.optim`` and DDP import it on first use, and modules it
loads keep the default group in default arguments; loaded after the group exists, they keep its
gloo worker threads alive past ``destroy_process_group``, and a worker still releasing the last
collective (often a gather of this module) at interpreter shutdown aborts the process
("terminate called without an active exception").
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import _checks
from .ops import first_derivatives_only

__all__ = ["all_gather", "all_gather_with_grad", "get_rank", "get_world_size", "mean_across_ranks"]


def _active(group: Optional[dist.ProcessGroup]) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def get_world_size(group: Optional[dist.ProcessGroup] = None) -> int:
    """Processes in ``group`` (the default group for ``None``); 1 without a process group."""
    return dist.get_world_size(group) if _active(group) else 1


def get_rank(group: Optional[dist.ProcessGroup] = None) -> int:
    """This process's rank in ``group``; 0 without a process group."""
    return dist.get_rank(group) if _active(group) else 0


def _check_rows(tensor: Tensor) -> None:
    _checks.check_tensor(tensor, "tensor")
    if tensor.dim() == 0:
        raise ValueError("tensor must have a leading row dimension, got a 0-dimensional tensor")


def _gather_padded(tensor: Tensor, group: Optional[dist.ProcessGroup]) -> list[Tensor]:
    """Every rank's ``tensor`` (same trailing shape and dtype on all ranks), in rank order."""
    tensor = tensor.detach()
    size = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    counts = torch.cat(sizes).tolist()
    longest = max(counts)
    if longest == 0:
        return [tensor.new_empty((0, *tensor.shape[1:])) for _ in counts]
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded, group=group)
    return [rows[:count] for rows, count in zip(gathered, counts)]


class _AllGatherRows(torch.autograd.Function):
    """The all-gather of rows behind :func:`all_gather_with_grad`.

    Forward: every rank's rows. Backward: each rank's rows receive the sum over all ranks of the
    gradients with respect to their copies (the derivative of the sum of all ranks' losses).
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, group: Optional[dist.ProcessGroup]) -> tuple[Tensor, ...]:
        parts = _gather_padded(tensor, group)
        ctx.group = group
        ctx.counts = [part.shape[0] for part in parts]
        return tuple(parts)

    @staticmethod
    @first_derivatives_only("all_gather_with_grad")  # (all_reduce is invisible to autograd)
    def backward(ctx, *grads: Tensor):
        counts, group = ctx.counts, ctx.group
        rank, longest = dist.get_rank(group), max(counts)
        if longest == 0:
            return grads[rank], None
        stacked = grads[0].new_zeros((len(counts), longest, *grads[0].shape[1:]))
        for r, grad in enumerate(grads):
            stacked[r, : counts[r]] = grad
        dist.all_reduce(stacked, group=group)
        return stacked[rank, : counts[rank]], None


def all_gather(tensor: Tensor, group: Optional[dist.ProcessGroup] = None) -> list[Tensor]:
    """Every rank's rows, without gradient.

    Args:
        tensor: ``[n, ...]``; ``n`` may differ between ranks (zero included), the trailing shape
            and the dtype may not.
        group: the process group (``None``: the default group).

    Returns:
        One tensor per rank, in rank order, detached (``[tensor.detach()]`` without a process
        group).

    Example:
        >>> all_gather(torch.arange(3))
        [tensor([0, 1, 2])]
    """
    _check_rows(tensor)
    if not _active(group):
        return [tensor.detach()]
    return _gather_padded(tensor, group)


def all_gather_with_grad(
    tensor: Tensor, group: Optional[dist.ProcessGroup] = None
) -> list[Tensor]:
    r"""Every rank's rows, differentiable: gradients flow back to the rank that owns the rows.

    Each rank ``p`` computes its own loss :math:`L_p` from the gathered rows. Backward sums, over
    all ranks, the gradients with respect to the copies of rank ``r``'s rows and returns that sum
    to rank ``r``, so each rank's ``tensor.grad`` is :math:`\partial (\sum_p L_p) / \partial
    x_r`: the gradient of the sum of all ranks' losses, whatever the ranks do with the rows. The
    backward pass is one ``all_reduce`` of ``world_size x max_rows`` rows, so every rank must
    run backward through the result (as it does under ``DistributedDataParallel``).

    Args:
        tensor: ``[n, ...]`` float; ``n`` may differ between ranks (zero included).
        group: the process group (``None``: the default group).

    Returns:
        One tensor per rank, in rank order; ``[tensor]`` itself without a process group.
    """
    _check_rows(tensor)
    if not tensor.is_floating_point():
        raise TypeError(f"tensor must be a floating-point tensor, got dtype {tensor.dtype}")
    if not _active(group):
        return [tensor]
    return list(_AllGatherRows.apply(tensor, group))


def mean_across_ranks(
    total: Tensor, count: Tensor, group: Optional[dist.ProcessGroup] = None
) -> Tensor:
    r"""This rank's share of a mean over the items of all ranks, for gradient-averaging DDP.

    With :math:`S_p` this rank's ``total`` (a sum of per-item losses), :math:`n_p` its ``count``
    (the items that enter the mean) and :math:`W` the world size, it returns

    .. math::
        L_p = \frac{W \, S_p}{\max(1, \sum_r n_r)},

    so that :math:`\frac{1}{W} \sum_p L_p` is the mean over every rank's items. DDP averages
    gradients (sums them over ranks and divides by :math:`W`), hence the factor :math:`W`: the
    averaged parameter gradients are those of the mean over the concatenated batch, and the mean
    of the ranks' :math:`L_p` is its value. Items shared across ranks (through
    :func:`all_gather_with_grad`) get gradients :math:`W` times those of the single-process mean
    on the owning rank before DDP's division.

    Args:
        total: scalar sum of this rank's per-item losses.
        count: scalar number of this rank's items in the mean (not differentiated).
        group: the process group (``None``: the default group).

    Returns:
        The scalar :math:`L_p`; ``total / max(count, 1)`` without a process group.
    """
    _checks.check_tensor(total, "total", 0)
    _checks.check_tensor(count, "count", 0)
    count = count.detach().to(device=total.device, dtype=torch.long)
    if _active(group):
        count = count.clone()
        dist.all_reduce(count, group=group)
    return total * (get_world_size(group) / count.clamp(min=1).to(total.dtype))
