"""``deep_radiomics``: the radiomics features joined to each node's embedding by the frozen ImageNet backbone
(both 2.5D streams, pooled over slice groups), fed to the radiomics classifier (DeepRadiomicsTrainer)."""
from __future__ import annotations

from lnm_auto.configurations.base import ClassifierKind, PlanningContext
from lnm_auto.plans.deep_radiomics_topology import (DeepRadiomicsTopology, estimate_embedding_gflops,
                                                    plan_deep_radiomics)
from lnm_auto.plans.radiomics_topology import plan_radiomics
from lnm_auto.plans.plans import ConfigurationPlan


class DeepRadiomics(ClassifierKind):
    name = "deep_radiomics"
    topology_type = DeepRadiomicsTopology
    simplicity = 1
    default_trainer = "DeepRadiomicsTrainer"

    def plan(self, context: PlanningContext) -> tuple[ConfigurationPlan, str]:
        """Reads the crops of its embedding scales; the recipe and augmentation are carried but unused."""
        topology = plan_deep_radiomics(plan_radiomics(context.fingerprint, context.target_spacing_mm))
        return (ConfigurationPlan(self.name, topology, topology.embedding_scales, False, context.recipe,
                                  context.augmentation, estimate_embedding_gflops(topology, context.scales)), "")

    def load_fold_model(self, path, plans, config, device):
        from lnm_auto.networks.frozen_embedding import check_weights
        check_weights(config.network)   # the frozen backbone's file, refused when it is not the plans' (SHA-256)
        return super().load_fold_model(path, plans, config, device)

    def case_inputs(self, images: list, mask, plans, config) -> dict:
        from lnm_auto.radiomics.deep_features import case_inputs   # radiomics + the frozen embedding of the crops
        return case_inputs(images, mask, plans, config.network)
