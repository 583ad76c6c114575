"""Host synchronisations of a fused loss call, counted on CPU.

On a GPU every read of a device value by the host (``.tolist()``, ``.item()``, ``int()``, the
output size of ``unique``, ``nonzero`` or ``bincount``, a tensor made from a host list) stalls
the stream. Here the same calls are counted on CPU: a fused loss call reads the device once, the
value checks' bounds together with the class layout's boundaries, and nothing else does (not even
when some key parts need a gradient and others do not: each part is a key segment of its own).
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import pixcontrast
from pixcontrast.ops._layout import build_layout

# ops whose result size or value the host has to wait for
DATA_DEPENDENT = {
    "aten._local_scalar_dense.default", "aten._unique2.default", "aten.unique_dim.default",
    "aten.unique_consecutive.default", "aten.nonzero.default", "aten.bincount.default",
    "aten.masked_select.default",
}


class HostReads(TorchDispatchMode):
    """Counts the data-dependent ops, the tensors made from host lists and ``tolist()`` calls."""

    def __init__(self, monkeypatch) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        tolist = torch.Tensor.tolist

        def counted_tolist(tensor):
            self.counts["tolist"] += 1
            return tolist(tensor)

        monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if name in DATA_DEPENDENT:
            self.counts[name] += 1
        elif name == "aten.lift_fresh.default" and out.numel() > 1:
            self.counts["tensor from a host list"] += 1
        return out

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def unit(rows: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, 8, generator=generator, dtype=torch.float64), dim=1)


@pytest.mark.parametrize("in_batch", [False, True])
@pytest.mark.parametrize("keys", ["none", "grouped", "mixed", "invalid-only"])
@pytest.mark.parametrize("anchors", [0, 1, 40])
def test_the_layout_reads_the_device_once(in_batch, keys, anchors, monkeypatch):
    labels = torch.arange(anchors) % 5
    key_parts, key_labels = (), None
    if keys == "grouped":  # a memory bank's keys: sorted by class, invalid slots last
        key_parts, key_labels = (unit(30, 1),), torch.tensor([0] * 8 + [2] * 9 + [7] * 6 + [-1] * 7)
    elif keys == "mixed":
        key_parts, key_labels = (unit(30, 1), unit(20, 2)), torch.randint(-1, 7, (50,))
    elif keys == "invalid-only":
        key_parts, key_labels = (unit(6, 1),), torch.full((6,), -1)
    if not in_batch and keys == "none":
        pytest.skip("no key at all: nothing to lay out")
    with HostReads(monkeypatch) as reads:
        build_layout(unit(anchors, 0), labels, key_parts, key_labels, in_batch)
    assert dict(reads.counts) == {"tolist": 1}


@pytest.mark.parametrize("variant", ["paper", "supcon"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_training_step_reads_the_device_once(variant, reduction, monkeypatch):
    x = unit(50, 0).requires_grad_()
    y = torch.arange(50) % 4
    memory, memory_labels = unit(80, 1), torch.randint(-1, 5, (80,))
    with HostReads(monkeypatch) as reads:
        loss = pixcontrast.contrastive_loss(
            x, y, memory, memory_labels, in_batch=True, variant=variant, reduction=reduction,
            backend="torch",
        )
        loss.sum().backward()
    # the value checks with the layout; for reduction="none" the operator's backward lays the
    # inputs out again
    assert dict(reads.counts) == {"tolist": 2 if reduction == "none" else 1}


def test_key_parts_of_which_only_some_need_a_gradient_add_no_read(monkeypatch):
    x = unit(30, 0).requires_grad_()
    regions = unit(12, 1).requires_grad_()
    memory = unit(40, 2)
    labels = [torch.arange(12) % 4, torch.arange(40) % 4]
    with HostReads(monkeypatch) as reads:
        loss = pixcontrast.contrastive_loss(
            x, torch.arange(30) % 4, [regions, memory], labels, backend="torch"
        )
        loss.backward()
    assert dict(reads.counts) == {"tolist": 1}
