"""Every field of a plans file checked before the plans are used: a hand-edited LNMPlans.json (batch size 0,
learning rate NaN, -1 epochs, an unknown backbone) is one line per bad field, all at once, instead of a
ZeroDivisionError, dead data workers or a run that trains nothing.

The plans' dataclasses are walked generically from their type hints (nested dataclasses, tuples, lists, dicts,
optionals, the configuration's network union), so a field added to a topology is type-checked without a line
here; its numeric range is declared in :data:`RANGES` ("Class.field"), and ``tests`` fail for a numeric field
without one. String fields with a closed set of values are in :data:`CHOICES`; the rules that tie fields
together (a configuration's scales exist, a CT normalization has its clip values ...) in :func:`reference_problems`.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, get_args, get_origin, get_type_hints

INF = math.inf


@dataclass(frozen=True)
class Range:
    """The values a numeric field may take (every number must also be finite)."""
    low: float
    high: float
    low_open: bool = False     # low itself is not allowed
    high_open: bool = False

    def holds(self, v: float) -> bool:
        above = v > self.low if self.low_open else v >= self.low
        below = v < self.high if self.high_open else v <= self.high
        return above and below

    def describe(self) -> str:
        return f"{'(' if self.low_open else '['}{_bound(self.low)}, {_bound(self.high)}{')' if self.high_open else ']'}"


def _bound(v: float) -> str:
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


POSITIVE = Range(0, INF, low_open=True)
ANY_FINITE = Range(-INF, INF, low_open=True, high_open=True)
PROBABILITY = Range(0, 1)
DROPOUT = Range(0, 1, high_open=True)
CHANNELS = Range(1, 8192)
SHAPE_VOXELS = Range(1, 4096)
SLICE_START = Range(0, 4095)

# The numeric fields of every plans dataclass (tuples and lists: each element). Bounds are what the code can
# run with and a little beyond what any planner writes, not what is wise.
RANGES: dict[str, Range] = {
    "Plans.plans_version": Range(1, 1000),
    "Plans.n_folds": Range(2, 100),
    "Plans.split_seed": Range(0, 2 ** 32 - 1),            # scikit-learn's random_state
    "Plans.target_spacing_mm": Range(0.01, 50),            # the image spacings lnm_auto reads (raw_dataset)
    "ComputeBudget.max_gflops_per_sample": Range(0, 1e6, low_open=True),
    "ChannelNormalization.channel": Range(0, 999),
    "ChannelNormalization.clip_low": ANY_FINITE,
    "ChannelNormalization.clip_high": ANY_FINITE,
    "ChannelNormalization.mean": ANY_FINITE,
    "ChannelNormalization.std": POSITIVE,
    "CropScale.spacing_mm": Range(0, 100, low_open=True),
    "CropScale.roi_shape": SHAPE_VOXELS,
    "CropScale.roi_size_mm": Range(0, 1e4, low_open=True),
    "CropScale.cache_shape": SHAPE_VOXELS,
    "ConfigurationPlan.estimated_gflops_per_sample": Range(0, 1e6),
    "TrainingRecipe.batch_size": Range(1, 65536),
    "TrainingRecipe.positive_fraction": PROBABILITY,
    "TrainingRecipe.num_epochs": Range(1, 1_000_000),
    "TrainingRecipe.initial_lr": Range(0, 10, low_open=True),
    "TrainingRecipe.momentum": Range(0, 1, high_open=True),
    "TrainingRecipe.weight_decay": Range(0, 1),
    "TrainingRecipe.backbone_lr_factor": Range(0, 10),    # 0: a frozen backbone
    "TrainingRecipe.warmup_fraction": Range(0, 1, high_open=True),
    "TrainingRecipe.semi_supervised_epochs": Range(1, 1_000_000),
    "AugmentationPlan.rotation_deg": Range(0, 180),
    "AugmentationPlan.p_rotation": PROBABILITY,
    "AugmentationPlan.scale_range": Range(0, 10, low_open=True),
    "AugmentationPlan.p_scale": PROBABILITY,
    "AugmentationPlan.gamma_range": Range(0, 10, low_open=True),
    "AugmentationPlan.p_gamma": PROBABILITY,
    "AugmentationPlan.noise_variance": Range(0, 10),
    "AugmentationPlan.p_noise": PROBABILITY,
    "AugmentationPlan.mirror_axes": Range(0, 2),           # canonical crop axes (slice, row, col)
    "AugmentationPlan.test_time_mirror_axes": Range(0, 2),
    "ShapeFeature.centre": ANY_FINITE,
    "ShapeFeature.scale": POSITIVE,
    "TwoStreamTopology.fpn_channels": CHANNELS,
    "TwoStreamTopology.fused_channels": CHANNELS,
    "TwoStreamTopology.slice_group_starts": SLICE_START,
    "TwoStreamTopology.local_slice_group_starts": SLICE_START,
    "TwoStreamTopology.dropout": DROPOUT,
    "TwoStreamTopology.input_window": Range(-100, 100),    # z-scores
    "ResEncTopology.n_stages": Range(1, 12),
    "ResEncTopology.features_per_stage": CHANNELS,
    "ResEncTopology.kernel_sizes": Range(1, 15),
    "ResEncTopology.strides": Range(1, 16),
    "ResEncTopology.n_blocks_per_stage": Range(1, 64),
    "ResEncTopology.dropout": DROPOUT,
    "WegaTopology.embed_dim": CHANNELS,
    "WegaTopology.depth": Range(1, 128),
    "WegaTopology.num_heads": Range(1, 256),
    "WegaTopology.layer_scale_init": Range(0, 10, low_open=True),
    "WegaTopology.context_image_size": Range(14, 4096),
    "WegaTopology.context_slice_group_starts": SLICE_START,
    "WegaTopology.fusion_heads": Range(1, 256),
    "WegaTopology.dropout": DROPOUT,
    "MultiTaskTopology.decoder_channels": CHANNELS,
    "MultiTaskTopology.soft_mask_width_vox": Range(0, 1000, low_open=True),
    "MultiTaskTopology.mask_loss_weight": Range(0, 1000),
    "MultiTaskTopology.dropout": DROPOUT,
    "RadiomicsTopology.image_channel": Range(0, 999),
    "DeepRadiomicsTopology.image_channel": Range(0, 999),
    "DeepRadiomicsTopology.image_window": Range(-100, 100),   # z-scores
    "DeepRadiomicsTopology.feature_levels": Range(-5, 4),     # timm features_only levels (strides 2 ... 32)
}

# networks.shape_head.SHAPE_MEASUREMENTS and networks.soft_mask.KINDS (networks import torch and the plans, so
# they are repeated here; tests/test_robustness_training.py checks they agree)
SHAPE_FEATURE_NAMES = ("short_axis_mm", "long_axis_mm", "volume_mm3", "sphericity")
SOFT_MASK_KINDS = ("linear", "exp")


def _backbones() -> list[str]:
    from lnm_auto.plans.two_stream_topology import BACKBONE_SPECS   # the backbones the code can build
    return sorted(BACKBONE_SPECS)


def _imagenet_weights() -> list[str]:
    from lnm_auto.plans.two_stream_topology import IMAGENET_WEIGHTS  # the weights the code can find
    return sorted(IMAGENET_WEIGHTS)


def _imagenet_backbones() -> list[str]:
    from lnm_auto.plans.two_stream_topology import IMAGENET_WEIGHTS  # the backbones those weights fit
    return sorted({w.backbone for w in IMAGENET_WEIGHTS.values()})


def _mask_uses() -> tuple[str, ...]:
    from lnm_auto.plans.two_stream_topology import MASK_USES       # how a 2d25 network can use the node mask
    return MASK_USES


# String fields with a closed set of values (a callable: read when checked, so new entries count at once)
CHOICES: dict[str, Callable[[], typing.Sequence[str]]] = {
    "ChannelNormalization.scheme": lambda: ("CT", "zscore"),
    "TrainingRecipe.optimizer": lambda: ("SGD", "AdamW"),
    "TrainingRecipe.lr_schedule": lambda: ("cosine",),
    "TwoStreamTopology.backbone": _backbones,
    "TwoStreamTopology.pretrained_weights": _imagenet_weights,
    "TwoStreamTopology.mask_use": _mask_uses,
    "MultiTaskTopology.soft_mask_kind": lambda: SOFT_MASK_KINDS,
    "RadiomicsTopology.texture_mode": lambda: ("3d", "2.5d"),
    "DeepRadiomicsTopology.texture_mode": lambda: ("3d", "2.5d"),
    "DeepRadiomicsTopology.backbone": _imagenet_backbones,
    "DeepRadiomicsTopology.weights_id": _imagenet_weights,
    "ShapeFeature.name": lambda: SHAPE_FEATURE_NAMES,
}


def plans_problems(plans_cls: type, data: Any) -> list[str]:
    """One line per bad field of ``data`` (a plans file's JSON) read as ``plans_cls``: "where = value: why"."""
    problems = _value_problems(plans_cls, data, "", None)
    if not problems:
        problems = reference_problems(data)
    return problems


def numeric_fields(cls: type) -> list[str]:
    """Every "Class.field" holding numbers in ``cls`` and the dataclasses it contains (what RANGES must cover)."""
    found: list[str] = []
    _collect_numeric(cls, found, set())
    return sorted(set(found))


# ---- the generic walk -------------------------------------------------------------------------------------
def _value_problems(tp, value, where: str, rule: str | None) -> list[str]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _union_problems(tp, value, where, rule)
    if dataclasses.is_dataclass(tp):
        return _dataclass_problems(tp, value, where)
    if origin is tuple:
        return _sequence_problems(tp, value, where, rule)
    if origin is list:
        if not isinstance(value, list):
            return [_line(where, value, "must be a list")]
        (item,) = get_args(tp) or (Any,)
        return [p for i, v in enumerate(value) for p in _value_problems(item, v, f"{where}[{i}]", rule)]
    if origin is dict:
        if not isinstance(value, dict):
            return [_line(where, value, "must be an object")]
        _, item = get_args(tp) or (Any, Any)
        return [p for k, v in value.items() for p in _value_problems(item, v, f"{where}.{k}", rule)]
    return _leaf_problems(tp, value, where, rule)


def _union_problems(tp, value, where: str, rule: str | None) -> list[str]:
    args = [a for a in get_args(tp) if a is not type(None)]
    if value is None:
        return [] if len(args) < len(get_args(tp)) else [_line(where, value, "must be given")]
    if len(args) == 1:
        return _value_problems(args[0], value, where, rule)
    # the configuration's network: the topology whose fields the object has (as dataclass_json picks it)
    fitting = [a for a in args if dataclasses.is_dataclass(a) and isinstance(value, dict) and _has_fields_of(a, value)]
    if not fitting:
        names = ", ".join(a.__name__ for a in args)
        keys = ", ".join(sorted(value)) if isinstance(value, dict) else type(value).__name__
        return [f"{where.lstrip('.')}: its fields ({keys}) fit none of {names}"]
    return _value_problems(fitting[0], value, where, rule)


def _has_fields_of(cls, value: dict) -> bool:
    fields = dataclasses.fields(cls)
    required = {f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    return required <= set(value) <= {f.name for f in fields}


def _dataclass_problems(cls, value, where: str) -> list[str]:
    if not isinstance(value, dict):
        return [_line(where, value, f"must be an object ({cls.__name__})")]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems = [f"{where.lstrip('.')}{'.' if where else ''}{k}: unknown field of {cls.__name__}"
                for k in sorted(set(value) - set(fields))]
    hints = get_type_hints(cls)
    for name, f in fields.items():
        here = f"{where}.{name}"
        if name not in value:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"{here.lstrip('.')}: missing")
            continue
        problems += _value_problems(hints[name], value[name], here, f"{cls.__name__}.{name}")
    return problems


def _sequence_problems(tp, value, where: str, rule: str | None) -> list[str]:
    if not isinstance(value, list):
        return [_line(where, value, "must be a list")]
    args = get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
        items = [args[0]] * len(value)
    else:
        if len(value) != len(args):
            return [_line(where, value, f"must have {len(args)} entries")]
        items = list(args)
    return [p for i, (a, v) in enumerate(zip(items, value)) for p in _value_problems(a, v, f"{where}[{i}]", rule)]


def _leaf_problems(tp, value, where: str, rule: str | None) -> list[str]:
    if tp is bool:
        return [] if isinstance(value, bool) else [_line(where, value, "must be true or false")]
    if tp is str:
        if not isinstance(value, str):
            return [_line(where, value, "must be a string")]
        allowed = CHOICES.get(rule or "")
        if allowed is not None and value not in allowed():
            return [_line(where, value, f"must be one of {', '.join(allowed())}")]
        return []
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return [_line(where, value, "must be a number")]
        if not math.isfinite(value):
            return [_line(where, value, "must be a finite number")]
        if tp is int and not isinstance(value, int):
            return [_line(where, value, "must be a whole number, written without a decimal point or exponent")]
        allowed_range = RANGES.get(rule or "", ANY_FINITE)
        if not allowed_range.holds(value):
            return [_line(where, value, f"must be in {allowed_range.describe()}")]
    return []


def _line(where: str, value, why: str) -> str:
    return f"{where.lstrip('.') or 'the file'} = {_shown(value)}: {why}"


def _shown(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _collect_numeric(tp, found: list[str], seen: set, rule: str | None = None) -> None:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if tp in seen:
            return
        seen.add(tp)
        hints = get_type_hints(tp)
        for f in dataclasses.fields(tp):
            _collect_numeric(hints[f.name], found, seen, f"{tp.__name__}.{f.name}")
    elif origin is not None:
        for a in get_args(tp):
            if a is not Ellipsis:
                _collect_numeric(a, found, seen, rule)
    elif tp in (int, float) and rule:
        found.append(rule)


# ---- rules that tie fields together (on data whose every field passed) ------------------------------------
def reference_problems(data: dict) -> list[str]:
    """Names that must point at something, and fields that must agree with each other."""
    problems: list[str] = []
    scales = data["scales"]
    for key, scale in scales.items():
        if scale["name"] != key:
            problems.append(f"scales.{key}.name = {scale['name']!r}: must be the scale's key, {key!r}")
        if any(c < r for c, r in zip(scale["cache_shape"], scale["roi_shape"])):
            problems.append(f"scales.{key}.cache_shape = {scale['cache_shape']}: must hold the roi_shape "
                            f"{scale['roi_shape']}")
    for i, norm in enumerate(data["normalization"]):
        where = f"normalization[{i}]"
        if norm["channel"] != i:
            problems.append(f"{where}.channel = {norm['channel']}: must be {i} (channels in order)")
        if norm["scheme"] == "CT":
            missing = [k for k in ("clip_low", "clip_high", "mean", "std") if norm.get(k) is None]
            if missing:
                problems.append(f"{where}: scheme CT needs {', '.join(missing)}")
            elif norm["clip_low"] > norm["clip_high"]:
                problems.append(f"{where}.clip_low = {norm['clip_low']:g}: must not exceed clip_high "
                                f"{norm['clip_high']:g}")
    if not data["configurations"]:
        problems.append("configurations = {}: must plan at least one configuration")
    if not data.get("recommended_trainers", ["LNMTrainer"]):
        problems.append("recommended_trainers = []: must name at least one trainer")
    for name, config in data["configurations"].items():
        problems += _configuration_problems(name, config, scales, len(data["normalization"]))
    return problems


def _configuration_problems(name: str, config: dict, scales: dict, n_channels: int) -> list[str]:
    where = f"configurations.{name}"
    problems = [] if config["name"] == name else [f"{where}.name = {config['name']!r}: must be its key, {name!r}"]
    problems += [f"{where}.scales: scale {s!r} is not among the plans' scales ({', '.join(scales)})"
                 for s in config["scales"] if s not in scales]
    network, multitask = config["network"], config.get("multitask")
    for key in ("context_scale", "node_scale"):
        if key in network and network[key] not in scales:
            problems.append(f"{where}.network.{key} = {network[key]!r}: not among the plans' scales")
    if multitask and multitask["mask_scale"] not in scales:
        problems.append(f"{where}.multitask.mask_scale = {multitask['mask_scale']!r}: not among the plans' scales")
    if "image_channel" in network and network["image_channel"] >= n_channels:
        problems.append(f"{where}.network.image_channel = {network['image_channel']}: the plans have {n_channels} "
                        "channel(s)")
    for at, resenc in ((f"{where}.network", network), (f"{where}.network.local", network.get("local"))):
        for key in ("features_per_stage", "kernel_sizes", "strides", "n_blocks_per_stage"):
            if isinstance(resenc, dict) and "n_stages" in resenc and len(resenc[key]) != resenc["n_stages"]:
                problems.append(f"{at}.{key}: {len(resenc[key])} entries, n_stages says {resenc['n_stages']}")
    if "embed_dim" in network:
        for key in ("num_heads", "fusion_heads"):
            if network["embed_dim"] % network[key]:
                problems.append(f"{where}.network.{key} = {network[key]}: must divide embed_dim {network['embed_dim']}")
        if network["context_image_size"] % 14:
            problems.append(f"{where}.network.context_image_size = {network['context_image_size']}: must be a "
                            "multiple of the ViT patch, 14")
    for key in ("scale_range", "gamma_range", "noise_variance"):
        low, high = config["augmentation"][key]
        if low > high:
            problems.append(f"{where}.augmentation.{key} = [{low:g}, {high:g}]: low above high")
    if network.get("mask_use") == "pooling" and not config["use_mask_channel"]:
        problems.append(f"{where}.network.mask_use = 'pooling': pools with the node mask, which use_mask_channel "
                        "false leaves out; set use_mask_channel true or mask_use 'stem_channels'")
    for key in ("input_window", "image_window"):
        window = network.get(key)
        if window is not None and window[0] >= window[1]:
            problems.append(f"{where}.network.{key} = [{window[0]:g}, {window[1]:g}]: low must be below high")
    if "embedding_scales" in network:
        problems += _embedding_problems(f"{where}.network", network, scales)
    return problems


def _embedding_problems(where: str, network: dict, scales: dict) -> list[str]:
    """deep_radiomics: its scales exist, scales and levels are each named once (every one gives its own
    columns), and the weights are those of its backbone."""
    from lnm_auto.plans.two_stream_topology import IMAGENET_WEIGHTS
    problems = [f"{where}.embedding_scales: scale {s!r} is not among the plans' scales ({', '.join(scales)})"
                for s in network["embedding_scales"] if s not in scales]
    for key in ("embedding_scales", "feature_levels"):
        values = network[key]
        if not values or len(set(values)) != len(values):
            problems.append(f"{where}.{key} = {values}: must name at least one, each once")
    weights = IMAGENET_WEIGHTS.get(network["weights_id"])
    if weights is not None and weights.backbone != network["backbone"]:
        problems.append(f"{where}.weights_id = {network['weights_id']!r}: weights of {weights.backbone}, not of the "
                        f"backbone {network['backbone']!r}")
    return problems
