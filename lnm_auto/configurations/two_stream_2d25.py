"""``2d25``: Li et al.'s two-stream 2.5D network (global + zoomed-in local view), on an ImageNet-pretrained
2D backbone by default (documentation/pretrained_weights.md)."""
from __future__ import annotations

import dataclasses

from lnm_auto.configurations.base import NetworkKind, PlanningContext
from lnm_auto.plans.network_topology import (CPU_BUDGET, TwoStreamTopology, estimate_two_stream_gflops,
                                             plan_two_stream_topology, two_stream_cost)
from lnm_auto.plans.plans import ConfigurationPlan
from lnm_auto.plans.two_stream_topology import DEFAULT_PRETRAINED_WEIGHTS

# Fine-tuning the ImageNet backbone: its parameters at a tenth of the head's learning rate after a 5 % warm-up,
# so the first large gradients of the new head cannot wreck the pretrained features; on a CPU its depthwise
# filters stay as loaded (their weight gradient is most of a CPU step; documentation/planning.md, "Epochs").
DEFAULT_PRETRAINED_BACKBONE = True
BACKBONE_LR_FACTOR, WARMUP_FRACTION = 0.1, 0.05


class TwoStream25D(NetworkKind):
    name = "2d25"
    topology_type = TwoStreamTopology
    simplicity = 3
    hybrid_head = True
    note_key = "2d25_backbone"

    def plan(self, context: PlanningContext) -> tuple[ConfigurationPlan, str]:
        global_scale, local_scale = context.scales["global"], context.scales["local"]
        g, loc = global_scale.roi_shape, local_scale.roi_shape
        n_channels, budget, recipe = context.n_channels, context.budget, context.recipe
        weights = DEFAULT_PRETRAINED_WEIGHTS if context.pretrained_backbone else None
        topology = plan_two_stream_topology(g, loc, budget, in_channels=n_channels, pretrained_weights=weights)
        note = f"{topology.backbone} from scratch"
        if weights:
            recipe = dataclasses.replace(context.pretrained_recipe, backbone_lr_factor=BACKBONE_LR_FACTOR,
                                         warmup_fraction=WARMUP_FRACTION, freeze_depthwise=budget.name == CPU_BUDGET.name)
            cost = two_stream_cost(topology, g, loc, n_channels)
            note = (f"{topology.backbone} from ImageNet weights {weights}, FPN {topology.fpn_channels}, fused "
                    f"{topology.fused_channels}" + (f"; over the {budget.name} budget ({cost:.2f} GFLOPs) at its "
                                                     "narrowest" if cost > budget.max_gflops_per_sample else ""))
        gflops = estimate_two_stream_gflops(topology, g, loc, n_channels)
        return ConfigurationPlan(self.name, topology, ("global", "local"), True, recipe, context.augmentation,
                                 gflops), note

    def network(self, topology, in_channels: int, mask_channel: bool, shape_features: tuple = ()) -> "nn.Module":
        from lnm_auto.networks.two_stream import TwoStreamNet
        return TwoStreamNet(topology, in_channels, mask_channel, shape_features)
