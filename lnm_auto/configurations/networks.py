"""Building a configuration's network: the one place a topology becomes an ``nn.Module`` (through its kind)."""
from __future__ import annotations

import torch
from torch import nn

from lnm_auto.configurations import kind_for_topology
from lnm_auto.configurations.base import NetworkKind
from lnm_auto.networks.multitask import MultiTaskNet
from lnm_auto.plans.plans import ConfigurationPlan, Plans, ShapeFeature


def build_network(topology, in_channels: int, mask_channel: bool = False,
                  shape_features: "list[ShapeFeature] | tuple" = ()) -> nn.Module:
    """The bare network of a planned topology, built by its configuration kind. ``in_channels``: channels C the
    first layer sees (image channels, + 1 when ``mask_channel``: the network then appends ``mask_<scale>`` to
    ``image_<scale>`` itself). For ``2d25`` each 2D image then has 3 * C channels. ``shape_features``: the plan's
    hybrid head (kinds with ``hybrid_head``; empty: off)."""
    if int(in_channels) < 1 + int(mask_channel):
        raise ValueError(f"in_channels must be >= {1 + int(mask_channel)}, got {in_channels}")
    kind = kind_for_topology(topology)
    if not isinstance(kind, NetworkKind):
        raise TypeError(f"no network for topology of type {type(topology).__name__}")
    if shape_features and not kind.hybrid_head:
        raise ValueError(f"no hybrid shape head for a {type(topology).__name__} network "
                         "(2d25 and 3d_resenc have one)")
    return kind.network(topology, in_channels, mask_channel, tuple(shape_features))


def network_for(plans: Plans, config: ConfigurationPlan) -> nn.Module:
    """The network of one configuration of the plans, with the input channels the plans count. Randomly
    initialised: training then loads the plan's ImageNet backbone weights (``load_imagenet_backbones``), prediction
    a checkpoint.

    With the configuration's multi-task switch on (``config.multitask``): ``MultiTaskNet`` around the
    base network, the base built without the mask channel (the mask enters through the soft pooling)."""
    if config.multitask is not None:
        return prefer_channels_last(MultiTaskNet(build_network(config.network, len(plans.normalization), False,
                                                               config.head_shape_features), config.multitask))
    n_in = len(plans.normalization) + int(config.use_mask_channel)
    return prefer_channels_last(build_network(config.network, n_in, config.use_mask_channel,
                                              config.head_shape_features))


def prefer_channels_last(network: nn.Module) -> nn.Module:
    """2D convolution weights in channels_last memory format (values unchanged), so torch's oneDNN convolutions
    run channels-last: 2d25's training step was 1.11x, 1.21x and 1.24x faster on 2 CPU cores in three runs of
    benchmarks/cpu_levers.py; 3D convolutions gained nothing (1.00-1.04x) and are left as they are."""
    for m in network.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    return network
