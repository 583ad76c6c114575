"""segmentation_models_pytorch's Unet trained with cross-entropy plus pixcontrast's ContrastTerm.

smp's ``forward`` returns masks only; the decoder's pixel feature is the output of its
``decoder`` submodule (the input of ``segmentation_head``), ``[B, decoder_channels[-1], H, W]``
at full resolution, which a :class:`pixcontrast.FeatureCapture` takes from the model's own
forward. The same name works for ``FPN``, ``UnetPlusPlus``, ``DeepLabV3Plus`` and the other
smp architectures (their feature channels differ: ``model.segmentation_head[0].in_channels``
reads them from any of them).

The lines a training loop adds::

    capture = pixcontrast.FeatureCapture(model, "decoder")
    term = pixcontrast.ContrastTerm(in_channels=model.segmentation_head[0].in_channels,
                                    num_classes=classes, total_steps=steps)
    # optimiser over model.parameters() and term.parameters()
    logits = model(images)
    loss = F.cross_entropy(logits, labels, ignore_index=255) + term(capture.take(), labels, logits)

smp needs a torchvision built for the installed torch; a CPU-only torch with the (CUDA)
torchvision of the default package index fails at ``import torchvision`` ("operator
torchvision::nms does not exist"). Install torchvision from the index torch came from (e.g.
https://download.pytorch.org/whl/cpu). The test of this example skips where smp does not
import, and pixcontrast's CI environment is such a place (a CPU torch from a package index
without the matching torchvision).

Usage (``pip install segmentation-models-pytorch``; random initialisation, random images)::

    python examples/smp_segmentation.py --steps 20
"""

from __future__ import annotations

import argparse
from typing import Optional

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

import pixcontrast


def main(argv: Optional[list[str]] = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64, help="image side (a multiple of 32)")
    parser.add_argument("--classes", type=int, default=5)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None, classes=args.classes,
                     decoder_channels=(64, 32, 16, 16, 16))
    capture = pixcontrast.FeatureCapture(model, "decoder")
    term = pixcontrast.ContrastTerm(in_channels=model.segmentation_head[0].in_channels,
                                    num_classes=args.classes, total_steps=args.steps,
                                    proj_dim=32, max_samples=256, max_views=16)
    optimizer = torch.optim.AdamW([*model.parameters(), *term.parameters()], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    log = []
    model.train()
    for step in range(args.steps):
        images = torch.randn(2, 3, args.size, args.size, generator=generator)
        labels = torch.randint(0, args.classes, (2, args.size, args.size), generator=generator)
        logits = model(images)
        ce = F.cross_entropy(logits, labels, ignore_index=255)
        contrast = term(capture.take(), labels, logits)
        optimizer.zero_grad()
        (ce + contrast).backward()
        optimizer.step()
        log.append({"step": step, "ce": ce.item(), "weight": term.last_stats["weight"].item(),
                    "term": contrast.item()})
        print(log[-1])
    capture.remove()
    return log


if __name__ == "__main__":
    main()
