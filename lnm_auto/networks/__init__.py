"""Classification networks and their weights (ImageNet backbones, ``load_pretrained_weights``). A topology
becomes a network through its configuration kind: ``lnm_auto.configurations.networks.network_for``.

Contract of every network: ``forward(batch: dict[str, Tensor]) -> dict[str, Tensor]``; each output
is a logit tensor of shape (B,) (also for B == 1); ``"fused"`` is always present and is the
prediction; side heads add ``"global"`` / ``"local"``. The trainer sums BCE over all keys.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lnm_auto.networks.imagenet_weights import backbone_lr_groups, freeze_depthwise_filters, load_imagenet_backbones
from lnm_auto.networks.pretrained import _WRAPPER_KEYS, load_pretrained_weights
from lnm_auto.networks.wega import WegaNet

__all__ = ["load_pretrained_weights", "count_parameters", "global_branch_for", "load_imagenet_backbones",
           "backbone_lr_groups", "freeze_depthwise_filters"]


def count_parameters(network: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in network.parameters())


# keys every ViT state dict has (Meta's DINOv2 files and timm's), after any prefix
_VIT_KEYS = ("pos_embed", "cls_token", "patch_embed.proj.weight")


def global_branch_for(network: nn.Module, path: "str | os.PathLike") -> nn.Module | None:
    """The ``WegaNet`` of ``network`` (itself, or the base of a multi-task net) when ``path`` holds the
    weights of a bare ViT (a DINOv2 file: ``pos_embed``, ``cls_token``, ``patch_embed.proj.weight`` and no
    ``global_vit.`` keys); else None, and the file is for :func:`load_pretrained_weights`.

    Such a file goes through ``WegaNet.load_global_weights``, which also resamples the position embedding
    to the planned token grid (DINOv2: 518 px -> 37 x 37 patches)."""
    wega = next((m for m in network.modules() if isinstance(m, WegaNet)), None)
    if wega is None or not Path(path).is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - unreadable files get load_pretrained_weights' one-line error
        return None
    if isinstance(obj, dict):
        obj = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), obj)
    keys = [k for k in obj if isinstance(k, str)] if isinstance(obj, dict) else []
    if any("global_vit." in k for k in keys):
        return None
    vit_like = all(any(k == v or k.endswith("." + v) for k in keys) for v in _VIT_KEYS)
    return wega if vit_like else None
