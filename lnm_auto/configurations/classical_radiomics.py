"""``radiomics``: IBSI node features from the raw images + a scikit-learn classifier (RadiomicsTrainer)."""
from __future__ import annotations

from lnm_auto.configurations.base import ClassifierKind, PlanningContext
from lnm_auto.plans.radiomics_topology import RadiomicsTopology, plan_radiomics
from lnm_auto.plans.plans import ConfigurationPlan


class Radiomics(ClassifierKind):
    name = "radiomics"
    topology_type = RadiomicsTopology
    simplicity = 0
    default_trainer = "RadiomicsTrainer"

    def plan(self, context: PlanningContext) -> tuple[ConfigurationPlan, str]:
        topology = plan_radiomics(context.fingerprint, context.target_spacing_mm)
        return (ConfigurationPlan(self.name, topology, (), False, context.recipe, context.augmentation, 0.0), "")
