"""The batch vocabulary networks read: ``image_<scale>`` (B, C, S, R, Cc) and ``mask_<scale>`` (B, 1, S, R, Cc).

The same names are used from the data loader through augmentation and the trainer to the networks and the
node predictor (see documentation/architecture.md).
"""
from __future__ import annotations

import torch


def image_key(scale: str) -> str:
    """Batch key of a scale's image crops."""
    return f"image_{scale}"


def mask_key(scale: str) -> str:
    """Batch key of a scale's node-mask crops."""
    return f"mask_{scale}"


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
