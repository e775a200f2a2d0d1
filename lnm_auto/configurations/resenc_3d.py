"""``3d_resenc``: a 3D residual-encoder classifier on the global node crop (nnU-Net's ResEnc encoder)."""
from __future__ import annotations

from lnm_auto.configurations.base import NetworkKind, PlanningContext
from lnm_auto.plans.network_topology import ResEncTopology, estimate_resenc_gflops, plan_resenc_topology
from lnm_auto.plans.plans import ConfigurationPlan


class ResEnc3D(NetworkKind):
    name = "3d_resenc"
    topology_type = ResEncTopology
    simplicity = 2
    hybrid_head = True

    def plan(self, context: PlanningContext) -> tuple[ConfigurationPlan, str]:
        scale = context.scales["global"]
        topology = plan_resenc_topology(scale.roi_shape, scale.spacing_mm, context.budget,
                                        in_channels=context.n_channels)
        gflops = estimate_resenc_gflops(topology, scale.roi_shape, context.n_channels)
        config = ConfigurationPlan(self.name, topology, ("global",), True, context.recipe, context.augmentation, gflops)
        return config, ""

    def network(self, topology, in_channels: int, mask_channel: bool, shape_features: tuple = ()) -> "nn.Module":
        from lnm_auto.networks.resenc_classifier import ResEncClassifier
        return ResEncClassifier(topology, in_channels, mask_channel, shape_features)
