"""Hugging Face Segformer or UperNet, trained with its own loss plus pixcontrast's ContrastTerm.

Neither model returns its decoder's pixel features, so a :class:`pixcontrast.FeatureCapture`
takes them out of the model's own forward (verified against transformers' source):

- ``SegformerForSemanticSegmentation``: ``decode_head.activation``, the fused decoder feature
  ``[B, decoder_hidden_size, H/4, W/4]`` after ``linear_fuse``, batch norm and ReLU, before the
  dropout and the classifier (``output_hidden_states`` gives the encoder's stages only);
- ``UperNetForSemanticSegmentation``: ``decode_head.fpn_bottleneck``, the FPN's fused feature
  ``[B, hidden_size, H/4, W/4]`` that the classifier reads.

``ignore_index`` comes from the model's config (``semantic_loss_ignore_index`` for Segformer,
``loss_ignore_index`` for UperNet), so the term and the model's cross-entropy ignore the same
pixels. Segformer's logits are at 1/4 resolution, like its features; the term resizes labels
and logits to the features' size.

The lines a training loop adds::

    capture = pixcontrast.FeatureCapture(model, "decode_head.activation")
    term = pixcontrast.ContrastTerm(in_channels=model.config.decoder_hidden_size,
                                    num_classes=model.config.num_labels, total_steps=steps,
                                    ignore_index=model.config.semantic_loss_ignore_index)
    # optimiser over model.parameters() and term.parameters()
    outputs = model(pixel_values=images, labels=labels)
    loss = outputs.loss + term(capture.take(), labels, outputs.logits)

Usage (``pip install transformers``; random initialisation of a small configuration, random
images, no download; the same code takes ``from_pretrained`` models)::

    python examples/transformers_segmentation.py --model segformer --steps 20
    python examples/transformers_segmentation.py --model upernet --steps 20
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch
from torch import nn
from transformers import (
    ConvNextConfig,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

import pixcontrast

# model -> (the submodule whose output is the decoder feature, its channels, ignore_index)
FEATURES = {
    "segformer": ("decode_head.activation", "decoder_hidden_size", "semantic_loss_ignore_index"),
    "upernet": ("decode_head.fpn_bottleneck", "hidden_size", "loss_ignore_index"),
}


def build_model(name: str, num_labels: int) -> nn.Module:
    """A small randomly initialised Segformer or UperNet (ConvNeXt backbone)."""
    if name == "segformer":
        return SegformerForSemanticSegmentation(SegformerConfig(
            num_labels=num_labels, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
            hidden_sizes=[16, 32], num_attention_heads=[1, 2], patch_sizes=[7, 3],
            strides=[4, 2], mlp_ratios=[2, 2], decoder_hidden_size=32,
        ))
    backbone = ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    return UperNetForSemanticSegmentation(UperNetConfig(
        backbone_config=backbone, num_labels=num_labels, hidden_size=32, pool_scales=[1, 2],
        use_auxiliary_head=True, auxiliary_in_channels=24, auxiliary_channels=8,
    ))


def attach_term(model: nn.Module, name: str, steps: int, **options) -> tuple[
        pixcontrast.FeatureCapture, pixcontrast.ContrastTerm]:
    """The capture of the model's decoder feature and a term that reads it."""
    feature, channels, ignore = FEATURES[name]
    config = model.config
    capture = pixcontrast.FeatureCapture(model, feature)
    term = pixcontrast.ContrastTerm(
        in_channels=getattr(config, channels), num_classes=config.num_labels,
        total_steps=steps, ignore_index=getattr(config, ignore), **options,
    )
    return capture, term


def main(argv: Optional[list[str]] = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(FEATURES), default="segformer")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64, help="image side")
    parser.add_argument("--num-labels", type=int, default=5)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = build_model(args.model, args.num_labels)
    capture, term = attach_term(model, args.model, args.steps, proj_dim=32, max_samples=256,
                                max_views=16)
    optimizer = torch.optim.AdamW([*model.parameters(), *term.parameters()], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    log = []
    model.train()
    for step in range(args.steps):
        images = torch.randn(2, 3, args.size, args.size, generator=generator)
        labels = torch.randint(0, args.num_labels, (2, args.size, args.size), generator=generator)
        outputs = model(pixel_values=images, labels=labels)
        contrast = term(capture.take(), labels, outputs.logits)
        loss = outputs.loss + contrast
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        log.append({"step": step, "model_loss": outputs.loss.item(),
                    "weight": term.last_stats["weight"].item(), "term": contrast.item()})
        print(log[-1])
    capture.remove()
    return log


if __name__ == "__main__":
    main()
