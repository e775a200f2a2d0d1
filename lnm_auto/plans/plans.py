"""The plans: a typed, versioned JSON file — the one contract between planning, preprocessing,
training and inference (like nnU-Net's nnUNetPlans.json). All axes are canonical (slice, row, col),
see lnm_auto.imaging.geometry."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from lnm_auto.plans.radiomics_topology import RadiomicsTopology
from lnm_auto.plans.deep_radiomics_topology import DeepRadiomicsTopology
from lnm_auto.plans.crop_scale import CropScale  # noqa: F401  (part of the plans; re-exported)
from lnm_auto.plans.global_local_topology import WegaTopology
from lnm_auto.plans.multitask_topology import MultiTaskTopology
from lnm_auto.plans.network_topology import ComputeBudget, ResEncTopology, TwoStreamTopology
from lnm_auto.plans.validation import plans_problems
from lnm_auto.utils.dataclass_json import from_dict, to_dict
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import load_json, save_json

PLANS_VERSION = 2   # 2: augmentation + test-time mirroring in the plans, real planned GFLOPs
DEFAULT_PLANS_NAME = "LNMPlans"


@dataclass
class ChannelNormalization:
    channel: int
    channel_name: str
    scheme: str                       # "CT" (global clip + z-score) or "zscore" (per case)
    clip_low: float | None = None     # CT only: dataset 0.5th percentile of node-neighbourhood intensities
    clip_high: float | None = None    # CT only: 99.5th percentile
    mean: float | None = None         # CT only: dataset mean (of the same samples)
    std: float | None = None          # CT only: dataset std


@dataclass
class AugmentationPlan:
    """Training augmentation and the matching test-time mirroring: written by the planner, read by the
    training data pipeline and by inference (one place, so the two cannot drift apart).
    Axes are canonical (slice, row, col) = 0, 1, 2 of a crop."""
    inplane_only: bool                      # anisotropic data: rotate/scale each slice in-plane only
    rotation_deg: float                     # +- in-plane rotation
    p_rotation: float
    scale_range: tuple[float, float]
    p_scale: float
    gamma_range: tuple[float, float]
    p_gamma: float
    noise_variance: tuple[float, float]
    p_noise: float
    mirror_axes: tuple[int, ...]            # random flips during training
    test_time_mirror_axes: tuple[int, ...]  # flips averaged at test time (subsets of these axes)


@dataclass
class TrainingRecipe:
    batch_size: int
    positive_fraction: float        # minimum share of positive nodes per training batch (oversampling)
    num_epochs: int
    initial_lr: float
    momentum: float
    weight_decay: float
    optimizer: str = "SGD"           # "SGD" (Nesterov, momentum) or "AdamW" (wega's ViT), read by configure_optimizers
    lr_schedule: str = "cosine"
    # fine-tuning an ImageNet-pretrained backbone (2d25): its parameters train at backbone_lr_factor x the lr, and
    # the first warmup_fraction of the epochs ramp the lr up linearly (documentation/pretrained_weights.md)
    backbone_lr_factor: float = 1.0
    warmup_fraction: float = 0.0
    # the pretrained backbone's depthwise filters stay fixed (a CPU speed choice: documentation/planning.md, "Epochs")
    freeze_depthwise: bool = False
    # epochs of the semi-supervised stage that continues the supervised model (PGLS, mean teacher); None: num_epochs
    semi_supervised_epochs: int | None = None


# Fields of a configuration's parts added after plans were first written, with the value that means "as before":
# not written at that value, so such plans are the same file and Plans.identifier() as before (checkpoints load).
ADDED_FIELD_DEFAULTS = {"recipe": {"backbone_lr_factor": 1.0, "warmup_fraction": 0.0, "freeze_depthwise": False,
                                   "semi_supervised_epochs": None},
                        "network": {"pretrained_weights": None, "pretrained_sha256": None, "input_window": None,
                                    "mask_use": "stem_channels"}}


def _without_added_defaults(config: dict) -> dict:
    """A configuration's dict without the ADDED_FIELD_DEFAULTS fields that hold their default (in place)."""
    for part, defaults in ADDED_FIELD_DEFAULTS.items():
        for key, default in defaults.items():
            if isinstance(config.get(part), dict) and key in config[part] and config[part][key] == default:
                del config[part][key]
    return config


SHAPE_EMBEDDING_WIDTH = 16   # the hybrid head: the shape features' embedding joins the pooled image features at this width


@dataclass
class ShapeFeature:
    """One physical shape measurement of the node fed to the classification head (the hybrid head), with its
    fixed scaling, written by the planner: ``(f(value) - centre) / scale``, f = natural log when ``log``."""
    name: str        # a per-node cache array: short_axis_mm, long_axis_mm, volume_mm3 or sphericity
    log: bool        # volumes span orders of magnitude: scaled on a log axis
    centre: float    # in the (log) unit of the measurement
    scale: float     # > 0, same unit


@dataclass
class ConfigurationPlan:
    name: str
    network: TwoStreamTopology | ResEncTopology | WegaTopology | RadiomicsTopology | DeepRadiomicsTopology
    scales: tuple[str, ...]          # CropScale names the network consumes, in input order
    use_mask_channel: bool           # feed the node's own mask as an extra input channel
    recipe: TrainingRecipe
    augmentation: AugmentationPlan
    estimated_gflops_per_sample: float      # forward FLOPs of one node with the real input channel count
    # The multi-task switch (M2ANet): None = off; a head = the network is MultiTaskNet(base, head), the
    # base built without the mask channel (the mask enters through the head's soft pooling instead).
    # LNMTrainerMultiTask turns it on for its runs and the model folder's plans.json records it. It is a
    # training choice over the same data and base network, so plans that differ only here compare equal
    # (lnm_train's "plans changed under trained folds" check); Plans.identifier(), which checkpoints
    # record, does include it, so a checkpoint never loads into the other kind of network.
    multitask: MultiTaskTopology | None = field(default=None, compare=False)
    # The hybrid head: physical shape measurements of the node (measured once at preprocessing, in the crop
    # caches) that join the pooled image features in the final classifier. Empty = off: the network is then
    # exactly the image-only one. A plan setting (lnm_plan_and_preprocess --shape_head), so unlike the
    # multi-task switch it takes part in plans equality.
    head_shape_features: list[ShapeFeature] = field(default_factory=list)

    def with_multitask(self, head: MultiTaskTopology | None) -> "ConfigurationPlan":
        """This configuration with the multi-task switch set to ``head`` (None: off)."""
        return replace(self, multitask=head)


@dataclass
class Plans:
    plans_version: int
    plans_name: str
    planner: str
    dataset_name: str
    compute_budget: ComputeBudget
    target_spacing_mm: tuple[float, float, float]   # (slice, row, col)
    anisotropic: bool
    normalization: list[ChannelNormalization]
    scales: dict[str, CropScale]
    configurations: dict[str, ConfigurationPlan]
    n_folds: int = 5
    split_seed: int = 12345
    notes: dict[str, str] = field(default_factory=dict)   # why each decision came out as it did
    # the learning scheme for the dataset's label mix: trainers run in order, each from the previous one
    recommended_trainers: list[str] = field(default_factory=lambda: ["LNMTrainer"])

    def to_dict(self) -> dict:
        """The plans as JSON-ready dicts and lists (fields added later only where they differ from "as before")."""
        data = to_dict(self)
        for config in data["configurations"].values():
            _without_added_defaults(config)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Plans":
        """Plans from their ``to_dict`` form; an unsupported version is one clear error."""
        version = data.get("plans_version")
        if version != PLANS_VERSION:
            raise LNMError(f"plans version {version} is not supported by this lnm_auto (expects {PLANS_VERSION}); "
                           "re-run lnm_plan_and_preprocess")
        return from_dict(cls, data)

    def identifier(self) -> str:
        """A short hash of everything in the plans: checkpoints and caches record it."""
        data = self.to_dict()
        for config in data["configurations"].values():
            # plans without a hybrid head hash as they did before the setting existed: their checkpoints still load
            if not config.get("head_shape_features"):
                config.pop("head_shape_features", None)
        return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        """Write the plans to ``path`` (JSON, atomically)."""
        save_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> "Plans":
        """The plans in ``path``; a missing or invalid file is one clear error."""
        path = Path(path)
        if not path.is_file():
            raise LNMError(f"{path}: plans not found; run lnm_plan_and_preprocess first")
        try:
            data = load_json(path)
        except (ValueError, UnicodeDecodeError) as e:
            raise LNMError(f"{path}: not valid JSON ({e}); re-run lnm_plan_and_preprocess to write it again") from None
        if not isinstance(data, dict):
            raise LNMError(f"{path}: not a plans file (a JSON {type(data).__name__}, not an object)")
        if data.get("plans_version") == PLANS_VERSION:   # another version is refused by from_dict, by name
            problems = plans_problems(cls, data)
            if problems:   # every bad field at once, each on its own line naming the file
                raise LNMError("\n".join(f"{path}: {p}" for p in problems) + f"\n{path}: {len(problems)} invalid "
                               "field(s); correct them, or re-run lnm_plan_and_preprocess to plan afresh")
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LNMError(f"{path}: not a valid plans file ({e})") from None

    def configuration(self, name: str) -> ConfigurationPlan:
        """The plan of configuration ``name``; an unknown name is one clear error."""
        if name not in self.configurations:
            raise LNMError(f"configuration '{name}' is not in the plans {self.plans_name}; "
                           f"available: {', '.join(self.configurations)}")
        return self.configurations[name]
