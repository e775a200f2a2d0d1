"""The configuration contract: what every configuration kind supplies, so the stages treat them alike.

A configuration kind (``2d25``, ``3d_resenc``, ``radiomics``, ...) is one object that says how it is planned
from the shared planning decisions, how its model is built, which trainer fits it, which file a fold keeps its
model in and how that file is loaded safely, how a loaded fold model scores one case's prepared inputs, its
simplicity rank (the one-standard-error rule prefers the simpler of two tied candidates) and its cost. The
stages ask the registry (``lnm_auto.configurations``) instead of testing topology types.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

from lnm_auto.plans.crop_scale import CropScale
from lnm_auto.plans.network_topology import ComputeBudget
from lnm_auto.plans.plans import AugmentationPlan, ConfigurationPlan, Plans, TrainingRecipe
from lnm_auto.utils.errors import LNMError

if TYPE_CHECKING:   # the registry is imported by planning and selection: torch and scikit-learn load when used
    import numpy as np
    import torch
    from torch import nn

    from lnm_auto.radiomics.classifier import RadiomicsClassifier

Scorer = Callable[[dict], "np.ndarray"]   # one case's prepared inputs -> its nodes' probabilities
CLASSIFIER_MODEL_FILE = "radiomics_model.json"   # = lnm_auto.radiomics.classifier.MODEL_FILE_NAME (a test keeps them equal)


@dataclass(frozen=True)
class PlanningContext:
    """The decisions every configuration is planned from (made once by the planner, from the fingerprint)."""
    fingerprint: dict
    budget: ComputeBudget
    target_spacing_mm: tuple[float, float, float]
    scales: dict[str, CropScale]          # "global", "local", "context"
    n_channels: int                       # image channels + the node mask, as the networks receive them
    recipe: TrainingRecipe
    augmentation: AugmentationPlan
    pretrained_backbone: bool             # 2d25 fine-tunes its ImageNet backbone (False: from scratch)
    pretrained_recipe: TrainingRecipe     # the recipe for a pretrained backbone: fewer steps (planning.md, "Epochs")


class ConfigurationKind:
    """The contract. Subclasses set the class attributes and implement ``plan`` and the model hooks."""
    name: ClassVar[str]
    topology_type: ClassVar[type]
    simplicity: ClassVar[int]             # 0 = simplest; ties within one SE go to the lowest sum over members
    default_trainer: ClassVar[str] = "LNMTrainer"
    hybrid_head: ClassVar[bool] = False   # takes the node's shape features in its final classifier (--shape_head)
    fitted_once: ClassVar[bool] = False   # a classifier fitted in one step (no epochs), not a network
    note_key: ClassVar[str | None] = None  # the plans' notes entry that records plan()'s note (None: not recorded)

    def plan(self, context: PlanningContext) -> tuple[ConfigurationPlan, str]:
        """This configuration's plan and a one-line note on what was decided ("" when nothing to say); pure: a
        function of the context only."""
        raise NotImplementedError

    def cost_gflops(self, config: ConfigurationPlan) -> float:
        """Forward GFLOPs of one node (what the planner sized it by)."""
        return float(config.estimated_gflops_per_sample)

    def model_file(self, checkpoint: str = "checkpoint_final.pth") -> str:
        """The file a fold folder keeps this configuration's model in."""
        raise NotImplementedError

    def build_model(self, plans: Plans, config: ConfigurationPlan) -> nn.Module | None:
        """A fresh, untrained model (None: nothing to build before fitting)."""
        raise NotImplementedError

    def load_fold_model(self, path: Path, plans: Plans, config: ConfigurationPlan, device: torch.device):
        """The fold model in ``path``, loaded without unpickling; a file that is not one is an LNMError naming it."""
        raise NotImplementedError

    def case_inputs(self, images: list, mask, plans: Plans, config: ConfigurationPlan) -> dict:
        """One case's inputs as ``scorer`` takes them, from its images and node instance mask (SimpleITK);
        always with ``node_ids``, in the order of the probabilities the scorer returns."""
        raise NotImplementedError

    def scorer(self, model, plans: Plans, config: ConfigurationPlan, device: torch.device,
               mirror: bool = True) -> Scorer:
        """A function from one case's prepared inputs to its nodes' probabilities."""
        raise NotImplementedError


class NetworkKind(ConfigurationKind):
    """A network trained by gradient descent; folds keep a checkpoint; cases are scored from their node crops."""

    def model_file(self, checkpoint: str = "checkpoint_final.pth") -> str:
        return checkpoint

    def network(self, topology, in_channels: int, mask_channel: bool, shape_features: tuple = ()) -> nn.Module:
        """The bare network of this kind's topology (``in_channels`` counts the mask channel when there is one;
        ``shape_features``: the hybrid head's, empty when off)."""
        raise NotImplementedError

    def build_model(self, plans: Plans, config: ConfigurationPlan) -> nn.Module:
        from lnm_auto.configurations.networks import network_for   # the one place networks are built
        return network_for(plans, config)

    def load_fold_model(self, path: Path, plans: Plans, config: ConfigurationPlan, device: torch.device) -> nn.Module:
        from lnm_auto.utils.checkpoints import load_checkpoint
        net = self.build_model(plans, config)
        state = load_checkpoint(path, plans.identifier())["network_weights"]   # weights-only, identifier checked
        try:
            net.load_state_dict(state)
        except (RuntimeError, KeyError) as e:
            raise LNMError(f"{path}: does not fit the planned {config.name} network "
                           f"({str(e).splitlines()[0][:150]})") from None
        return net.to(device).eval()

    def case_inputs(self, images: list, mask, plans: Plans, config: ConfigurationPlan) -> dict:
        from lnm_auto.preprocessing.crops import preprocess_images   # every planned scale's node crops
        return preprocess_images(images, mask, plans)

    def scorer(self, model: nn.Module, plans: Plans, config: ConfigurationPlan, device: torch.device,
               mirror: bool = True) -> Scorer:
        from lnm_auto.networks.node_predictor import predict_node_crops
        bs = config.recipe.batch_size
        return lambda crops: predict_node_crops(model, crops, plans, config, device, bs, mirror)


class ClassifierKind(ConfigurationKind):
    """A scikit-learn classifier on per-node features, fitted in one step and stored as JSON (no pickle)."""
    fitted_once = True

    def model_file(self, checkpoint: str = "checkpoint_final.pth") -> str:
        return CLASSIFIER_MODEL_FILE

    def build_model(self, plans: Plans, config: ConfigurationPlan) -> None:
        return None

    def load_fold_model(self, path: Path, plans: Plans, config: ConfigurationPlan,
                        device: torch.device) -> RadiomicsClassifier:
        from lnm_auto.radiomics.classifier import RadiomicsClassifier
        return RadiomicsClassifier.load(path)

    def case_inputs(self, images: list, mask, plans: Plans, config: ConfigurationPlan) -> dict:
        from lnm_auto.radiomics.dataset_features import case_inputs
        return case_inputs(images, mask, config.network)

    def scorer(self, model: RadiomicsClassifier, plans: Plans, config: ConfigurationPlan, device: torch.device,
               mirror: bool = True) -> Scorer:
        return lambda inputs: model.predict_proba(inputs["radiomics_features"])
