"""Distributed training with PixelContrastLoss: DistributedDataParallel, cross-rank contrast and a
class memory kept identical on every rank.

A small fully convolutional network segments synthetic scenes (coloured rectangles of three
classes on a noisy background, rectangle borders ignored) with cross-entropy plus
``0.1 * PixelContrastLoss``. Each rank draws its own batches, as with a ``DistributedSampler``.

- ``PixelContrastLoss(gather=True)``: every rank's anchors are contrasted with the anchors of
  all ranks; the gradients that DDP averages are those of one process on the concatenated batch.
- :class:`pixcontrast.ClassMemoryBank`: each rank's enqueued entries are all-gathered, so the
  memories stay identical (checked at the end).
- The loss (and the memory inside it) lives outside the DDP-wrapped model, so DDP's buffer
  broadcast does not touch the memory.

Usage::

    torchrun --nproc_per_node=2 examples/ddp_train.py            # CPU, gloo
    torchrun --nproc_per_node=2 examples/ddp_train.py --steps 5
    python examples/ddp_train.py                                 # one process, same code
"""

from __future__ import annotations

import argparse
import os
from typing import Optional

import torch

# Before the process group exists: torch.optim and DDP import torch._dynamo on first use, and with
# it modules (torch.distributed.nn.functional, ...) whose default arguments hold the default group
# from their import on. Imported after init_process_group they keep the group, and its gloo worker
# threads, alive past destroy_process_group into interpreter shutdown, where a worker releasing the
# last collective's tensors needs the GIL and aborts the process ("terminate called without an
# active exception"). Imported first, destroy_process_group frees the group and joins its workers.
import torch._dynamo  # noqa: F401
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import pixcontrast
from pixcontrast import distributed
from pixcontrast.memory import ClassMemoryBank

NUM_CLASSES = 4  # background and three rectangle classes
IGNORE_INDEX = 255
COLOURS = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.2, 0.2, 1.0]])


def synthetic_batch(
    batch_size: int, size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Images ``[B, 3, size, size]`` and labels ``[B, size, size]``: up to three rectangles of
    random classes on a background, their one-pixel borders ignored, Gaussian noise on top."""
    labels = torch.zeros(batch_size, size, size, dtype=torch.long)
    for b in range(batch_size):
        for _ in range(3):
            cls = int(torch.randint(1, NUM_CLASSES, (1,), generator=generator))
            y0, x0 = torch.randint(0, size - 8, (2,), generator=generator).tolist()
            h, w = torch.randint(6, size // 2, (2,), generator=generator).tolist()
            labels[b, y0 : y0 + h, x0 : x0 + w] = IGNORE_INDEX
            labels[b, y0 + 1 : y0 + h - 1, x0 + 1 : x0 + w - 1] = cls
    colours = COLOURS[labels.clamp(max=NUM_CLASSES - 1)].permute(0, 3, 1, 2)
    noise = 0.4 * torch.randn(batch_size, 3, size, size, generator=generator)
    return colours + noise, labels


class SegmentationNet(nn.Module):
    """Two strided convolutions, a classifier and a projection head at 1/4 resolution."""

    def __init__(self, width: int = 32, proj_dim: int = 16) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        )
        self.classifier = nn.Conv2d(width, NUM_CLASSES, 1)
        self.head = pixcontrast.ProjectionHead(width, proj_dim)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.backbone(images)
        return self.classifier(features), self.head(features)


def mean_over_ranks(value: Tensor) -> float:
    """The mean of a scalar over all ranks (the value itself in one process)."""
    return float(torch.cat(distributed.all_gather(value.detach().view(1))).mean())


def train(args: argparse.Namespace, distributed_run: bool) -> None:
    rank, world = distributed.get_rank(), distributed.get_world_size()
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    net = SegmentationNet()
    model = DistributedDataParallel(net) if distributed_run else net
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    memory = ClassMemoryBank(
        NUM_CLASSES, dim=16, pixels_per_class=400, regions_per_class=40, pixels_per_image=8,
        ignore_index=IGNORE_INDEX,
    )
    criterion = pixcontrast.PixelContrastLoss(
        temperature=0.1, max_samples=256, max_views=32, ignore_index=IGNORE_INDEX,
        memory=memory, gather=True,
    )
    generator = torch.Generator().manual_seed(args.seed + 1000 * (rank + 1))  # data, sampling

    for step in range(args.steps):
        images, labels = synthetic_batch(args.batch_size, args.size, generator)
        logits, embeddings = model(images)
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear")
        ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        contrast = criterion(embeddings, labels, predictions=logits, generator=generator)
        loss = ce + 0.1 * contrast
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ce, contrast = mean_over_ranks(ce), mean_over_ranks(contrast)
        if rank == 0:
            print(f"step {step:3d}  loss {ce + 0.1 * contrast:.4f}  ce {ce:.4f}  "
                  f"contrast {contrast:.4f}", flush=True)

    queues = distributed.all_gather(memory.queue)
    if rank == 0:
        identical = all(torch.equal(queue, queues[0]) for queue in queues)
        print(f"{world} process(es); memory entries per class "
              f"{memory.pixel_count.tolist()} pixels, {memory.region_count.tolist()} regions; "
              f"identical on all ranks: {identical}", flush=True)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    parser.add_argument("--batch-size", type=int, default=4, help="images per rank and step")
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # several processes share the CPU cores
    distributed_run = "RANK" in os.environ  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, ...
    if not distributed_run:
        train(args, distributed_run)
        return
    dist.init_process_group("gloo")
    train(args, distributed_run)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
