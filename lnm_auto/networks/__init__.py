"""Classification networks: ``build_network`` (topology -> nn.Module) and ``load_pretrained_weights``.

Contract of every network: ``forward(batch: dict[str, Tensor]) -> dict[str, Tensor]``; each output
is a logit tensor of shape (B,) (also for B == 1); ``"fused"`` is always present and is the
prediction; side heads add ``"global"`` / ``"local"``. The trainer sums BCE over all keys.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lnm_auto.networks.imagenet_weights import backbone_lr_groups, load_imagenet_backbones
from lnm_auto.networks.multitask import MultiTaskNet
from lnm_auto.networks.pretrained import _WRAPPER_KEYS, load_pretrained_weights
from lnm_auto.networks.resenc_classifier import ResEncClassifier
from lnm_auto.networks.two_stream import TwoStreamNet
from lnm_auto.networks.wega import WegaNet
from lnm_auto.planning.global_local_topology import WegaTopology
from lnm_auto.planning.network_topology import ResEncTopology, TwoStreamTopology
from lnm_auto.planning.plans import ConfigurationPlan, Plans, ShapeFeature

__all__ = ["build_network", "network_for", "load_pretrained_weights", "count_parameters", "global_branch_for",
           "load_imagenet_backbones", "backbone_lr_groups"]


def build_network(topology: "TwoStreamTopology | ResEncTopology | WegaTopology", in_channels: int,
                  mask_channel: bool = False, shape_features: "list[ShapeFeature] | tuple" = ()) -> nn.Module:
    """Build the network of a planned topology.

    ``in_channels``: channels C the first layer sees (image channels, + 1 when ``mask_channel``: the
    network then appends ``mask_<scale>`` to ``image_<scale>`` itself). For ``2d25`` each 2D image then
    has 3 * C channels. ``shape_features``: the plan's hybrid head (2d25 and 3d_resenc; empty: off).
    """
    if int(in_channels) < 1 + int(mask_channel):
        raise ValueError(f"in_channels must be >= {1 + int(mask_channel)}, got {in_channels}")
    if isinstance(topology, TwoStreamTopology):
        return TwoStreamNet(topology, in_channels, mask_channel, shape_features)
    if isinstance(topology, ResEncTopology):
        return ResEncClassifier(topology, in_channels, mask_channel, shape_features)
    if shape_features:
        raise ValueError(f"no hybrid shape head for a {type(topology).__name__} network (2d25 and 3d_resenc have one)")
    if isinstance(topology, WegaTopology):
        return WegaNet(topology, in_channels, mask_channel)
    raise TypeError(f"no network for topology of type {type(topology).__name__}")


def network_for(plans: "Plans", config: "ConfigurationPlan") -> nn.Module:
    """The network of one configuration of the plans, with the input channels the plans count. Randomly
    initialised: training then loads the plan's ImageNet backbone weights (``load_imagenet_backbones``), prediction
    a checkpoint.

    With the configuration's multi-task switch on (``config.multitask``): ``MultiTaskNet`` around the
    base network, the base built without the mask channel (the mask enters through the soft pooling)."""
    shape = config.head_shape_features
    if config.multitask is not None:
        return prefer_channels_last(MultiTaskNet(build_network(config.network, len(plans.normalization), False, shape),
                                                 config.multitask))
    n_in = len(plans.normalization) + int(config.use_mask_channel)
    return prefer_channels_last(build_network(config.network, n_in, config.use_mask_channel, shape))


def prefer_channels_last(network: nn.Module) -> nn.Module:
    """2D convolution weights in channels_last memory format (values unchanged), so torch's oneDNN convolutions
    run channels-last: 2d25's training step was 1.11x, 1.21x and 1.24x faster on 2 CPU cores in three runs of
    benchmarks/cpu_levers.py; 3D convolutions gained nothing (1.00-1.04x) and are left as they are."""
    for m in network.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    return network


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
