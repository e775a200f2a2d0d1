"""The batch vocabulary networks read: ``image_<scale>`` (B, C, S, R, Cc), ``mask_<scale>`` (B, 1, S, R, Cc) and
``shape_features`` (B, 4), the node's physical shape measurements the plan's hybrid head reads (shape_head.py).

The same names are used from the data loader through augmentation and the trainer to the networks and the
node predictor (see documentation/architecture.md).
"""
from __future__ import annotations

import torch

from lnm_auto.networks.shape_head import SHAPE_FEATURES_KEY


def image_key(scale: str) -> str:
    """Batch key of a scale's image crops."""
    return f"image_{scale}"


def mask_key(scale: str) -> str:
    """Batch key of a scale's node-mask crops."""
    return f"mask_{scale}"


def network_inputs(batch: dict) -> dict:
    """The per-sample parts of ``batch`` a network reads (``image_<scale>``, ``mask_<scale>``, ``shape_features``),
    e.g. to run a network on a subset of the samples."""
    return {k: v for k, v in batch.items() if k.startswith(("image_", "mask_")) or k == SHAPE_FEATURES_KEY}


def scale_input(batch: dict[str, torch.Tensor], scale: str, mask_channel: bool, in_channels: int,
                network_name: str) -> torch.Tensor:
    """The network input of one scale: its image channels, plus the node mask as the last channel when
    ``mask_channel``; checked against the channel count the network was built for."""
    x = batch[image_key(scale)]
    if mask_channel:
        x = torch.cat([x, batch[mask_key(scale)].to(x.dtype)], dim=1)
    if x.ndim != 5 or x.shape[1] != in_channels:
        raise ValueError(f"{network_name} expects {image_key(scale)} (+ mask channel: {mask_channel}) of shape "
                         f"(B, {in_channels}, Z, Y, X) in total, got {tuple(x.shape)}")
    return x
