"""``wega``: WeGA's global ViT branch on the wide context crop + residual-encoder local branch, cross-attention."""
from __future__ import annotations

import dataclasses

from lnm_auto.configurations.base import NetworkKind, PlanningContext
from lnm_auto.plans.global_local_topology import WegaTopology, estimate_wega_gflops, plan_wega_topology
from lnm_auto.plans.plans import ConfigurationPlan

# wega trains with AdamW: a ViT trained from scratch with SGD learns an order of magnitude more slowly
# (documentation/wega_multitask.md); 1e-3 with ViT-style weight decay, under the plan's cosine schedule.
WEGA_OPTIMIZER = "AdamW"
WEGA_INITIAL_LR = 1e-3
WEGA_WEIGHT_DECAY = 0.05


class Wega(NetworkKind):
    name = "wega"
    topology_type = WegaTopology
    simplicity = 4

    def plan(self, context: PlanningContext) -> tuple[ConfigurationPlan, str]:
        """Its global branch on the ``context`` scale, its local branch on the ``global`` node ROI."""
        global_scale, context_scale = context.scales["global"], context.scales["context"]
        topology = plan_wega_topology(context_scale.roi_shape, global_scale.roi_shape, global_scale.spacing_mm,
                                      context.budget, in_channels=context.n_channels, mask_channel=True)
        recipe = dataclasses.replace(context.recipe, optimizer=WEGA_OPTIMIZER, initial_lr=WEGA_INITIAL_LR,
                                     weight_decay=WEGA_WEIGHT_DECAY)
        gflops = estimate_wega_gflops(topology, context_scale.roi_shape, global_scale.roi_shape, context.n_channels,
                                      True)
        config = ConfigurationPlan(self.name, topology, topology.scales, True, recipe, context.augmentation, gflops)
        return config, f"ViT '{topology.vit_name}' (width {topology.embed_dim}, depth {topology.depth})"

    def network(self, topology, in_channels: int, mask_channel: bool, shape_features: tuple = ()) -> "nn.Module":
        from lnm_auto.networks.wega import WegaNet
        return WegaNet(topology, in_channels, mask_channel)
