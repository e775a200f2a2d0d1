"""Planning rules: every decision is a pure function of the fingerprint (and the compute budget).

Nothing here reads images; the unit tests drive each rule with hand-made fingerprints.
Axes are canonical (slice, row, col): see lnm_auto.imaging.geometry.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from lnm_auto.configurations import KINDS, PlanningContext
from lnm_auto.configurations.two_stream_2d25 import DEFAULT_PRETRAINED_BACKBONE
from lnm_auto.plans.crop_scale import cache_shape_for, round_up
from lnm_auto.plans.global_local_topology import plan_context_scale
from lnm_auto.plans.multitask_topology import plan_multitask_topology
from lnm_auto.planning.learning_scheme import plan_learning_scheme
from lnm_auto.planning.recipe import PRETRAINED_STEP_FACTOR, budget_for_planner, describe_epoch_rule, plan_recipe
from lnm_auto.plans.plans import (DEFAULT_PLANS_NAME, PLANS_VERSION, AugmentationPlan, ChannelNormalization,
                                  ConfigurationPlan, CropScale, Plans, SHAPE_EMBEDDING_WIDTH, ShapeFeature)
from lnm_auto.utils.errors import LNMError

# nnU-Net's anisotropy rule: the slice axis is "anisotropic" when its spacing is > 3x the in-plane one.
ANISOTROPY_THRESHOLD = 3.0
# Node ROI: the field of view is CONTEXT_FACTOR x the 95th-percentile node extent (the node plus as much
# surrounding tissue again), never less than MIN_FOV_MM in-plane or MIN_SLICES through-plane.
CONTEXT_FACTOR = 2.0
NODE_EXTENT_PERCENTILE = 95.0
MIN_FOV_MM = 24.0
MIN_INPLANE_VOXELS = 32
INPLANE_MULTIPLE = 8          # in-plane ROI divisible by 8 so 2D backbones pool cleanly
MAX_INPLANE_VOXELS = 128      # larger fields are sampled coarser instead (cost grows with voxels)
MIN_SLICES = 3                # one 2.5D slice group
MAX_SLICES = 32
# The zoom-in (local) view: the node itself with a 25% margin, between 1x and 2x zoom of the global view.
LOCAL_MARGIN_FACTOR = 1.25
MAX_ZOOM = 2.0
# ---- spacing ----------------------------------------------------------------------------------------
def canonical_case_spacings(fingerprint: dict) -> np.ndarray:
    """(n_cases, 3) spacings in canonical (slice, row, col) order."""
    rows = []
    for case in fingerprint["cases"].values():
        sp = np.asarray(case["spacing_zyx_mm"], dtype=float)
        a = int(case["slice_axis"])
        rest = [i for i in range(3) if i != a]
        rows.append(sp[[a] + rest])
    if not rows:
        raise LNMError("the fingerprint has no cases; the dataset is empty")
    return np.asarray(rows)


def canonical_case_shapes(fingerprint: dict) -> np.ndarray:
    """(n_cases, 3) image shapes in canonical (slice, row, col) order."""
    rows = []
    for case in fingerprint["cases"].values():
        sh = np.asarray(case["shape_zyx"], dtype=float)
        a = int(case["slice_axis"])
        rows.append(sh[[a] + [i for i in range(3) if i != a]])
    return np.asarray(rows)


def plan_target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> tuple[tuple[float, float, float], bool]:
    """Per-axis median spacing; for anisotropic data nnU-Net's rule keeps the slice axis coarse:
    if the median slice spacing is > 3x the in-plane spacing and the median slice count x 3 is below the
    smallest in-plane size, use the 10th percentile of slice spacings (never finer than in-plane)."""
    target = np.median(spacings, axis=0)
    median_shape = np.median(shapes, axis=0)
    anisotropic = bool(target[0] > ANISOTROPY_THRESHOLD * max(target[1], target[2])
                       and median_shape[0] * ANISOTROPY_THRESHOLD < min(median_shape[1], median_shape[2]))
    if anisotropic:
        target[0] = max(float(np.percentile(spacings[:, 0], 10)), float(max(target[1], target[2])))
    return tuple(float(v) for v in target), anisotropic


# ---- ROI --------------------------------------------------------------------------------------------
def node_extent_percentiles(fingerprint: dict) -> tuple[float, float]:
    """95th percentile of node extent (mm) through-plane and in-plane (the larger in-plane axis)."""
    ext = np.asarray([n["extent_mm"] for n in fingerprint["nodes"]], dtype=float)
    if ext.size == 0:
        raise LNMError("the fingerprint has no nodes: every node mask is empty")
    return (float(np.percentile(ext[:, 0], NODE_EXTENT_PERCENTILE)),
            float(np.percentile(ext[:, 1:].max(axis=1), NODE_EXTENT_PERCENTILE)))


def plan_global_scale(target_spacing, slice_extent_mm: float, inplane_extent_mm: float) -> tuple[CropScale, list[str]]:
    """The node-context view (field, voxels, spacing) and notes on where the voxel caps changed the spacing."""
    notes = []
    spacing = list(target_spacing)
    fov_inplane = max(MIN_FOV_MM, CONTEXT_FACTOR * inplane_extent_mm)
    n_inplane = max(MIN_INPLANE_VOXELS, round_up(fov_inplane / spacing[1], INPLANE_MULTIPLE))
    if n_inplane > MAX_INPLANE_VOXELS:
        n_inplane = MAX_INPLANE_VOXELS
        spacing[1] = spacing[2] = fov_inplane / n_inplane
        notes.append(f"in-plane field {fov_inplane:.1f} mm needs more than {MAX_INPLANE_VOXELS} voxels: "
                     f"sampled at {spacing[1]:.3f} mm instead")
    fov_slice = CONTEXT_FACTOR * slice_extent_mm
    n_slices = max(MIN_SLICES, int(math.ceil(fov_slice / spacing[0] - 1e-9)))
    if n_slices > MAX_SLICES:
        n_slices = MAX_SLICES
        spacing[0] = fov_slice / n_slices
        notes.append(f"through-plane field {fov_slice:.1f} mm needs more than {MAX_SLICES} slices: "
                     f"sampled at {spacing[0]:.3f} mm instead")
    shape = (n_slices, n_inplane, n_inplane)
    scale = CropScale("global", tuple(float(s) for s in spacing), shape,
                      tuple(float(n * s) for n, s in zip(shape, spacing)), cache_shape_for(shape))
    return scale, notes


def plan_local_scale(global_scale: CropScale, inplane_extent_mm: float) -> CropScale:
    """The zoom-in view (two-stream 2.5D): same voxels as the global view, a smaller in-plane field
    (the node plus 25%), zoom between 1x and 2x; through-plane unchanged."""
    fov_global = global_scale.roi_size_mm[1]
    fov_local = min(fov_global, max(fov_global / MAX_ZOOM, LOCAL_MARGIN_FACTOR * inplane_extent_mm))
    n = global_scale.roi_shape[1]
    spacing = (global_scale.spacing_mm[0], fov_local / n, fov_local / n)
    shape = global_scale.roi_shape
    return CropScale("local", spacing, shape, tuple(float(a * b) for a, b in zip(shape, spacing)), cache_shape_for(shape))


# ---- normalization ----------------------------------------------------------------------------------
def plan_normalization(fingerprint: dict) -> list[ChannelNormalization]:
    """'CT' channels: clip to the dataset's 0.5/99.5 percentiles (node neighbourhoods), z-score with the
    dataset's statistics. Everything else (MRI, PET ...): z-score per case."""
    out = []
    for key, name in sorted(fingerprint["channel_names"].items(), key=lambda kv: int(kv[0])):
        if name.strip().upper() == "CT":
            st = fingerprint["intensity_statistics"][key]
            out.append(ChannelNormalization(int(key), name, "CT", st["percentile_00_5"], st["percentile_99_5"],
                                            st["mean"], max(st["std"], 1e-8)))
        else:
            out.append(ChannelNormalization(int(key), name, "zscore"))
    return out


# ---- augmentation ---------------------------------------------------------------------------------
def plan_augmentation(anisotropic: bool) -> AugmentationPlan:
    """In-plane rotation (+-15 deg) and scaling (0.85-1.15), gamma, noise, in-plane mirroring; tested at
    inference by averaging the same in-plane flips. Anisotropic data (thick slices) is augmented slice by
    slice (nnU-Net's "dummy 2D"), so no voxel is ever interpolated from a neighbouring slice."""
    return AugmentationPlan(inplane_only=bool(anisotropic), rotation_deg=15.0, p_rotation=0.3,
                            scale_range=(0.85, 1.15), p_scale=0.3, gamma_range=(0.7, 1.5), p_gamma=0.3,
                            noise_variance=(0.0, 0.05), p_noise=0.15, mirror_axes=(1, 2),
                            test_time_mirror_axes=(1, 2))


# ---- the multi-task switch (M2ANet) ---------------------------------------------------------------------
def multitask_mask_scale(config: ConfigurationPlan) -> str:
    """The scale whose node mask the head predicts: wega's node ROI, else the first (``global``) scale."""
    return getattr(config.network, "node_scale", None) or config.scales[0]


def switch_on_multitask(plans: Plans, configuration: str) -> ConfigurationPlan:
    """Turn the multi-task switch of ``configuration`` on in ``plans`` (in place; kept if already on) and
    return the configuration: the head planned for the mask scale's spacing and the plans' budget."""
    config = plans.configuration(configuration)
    if config.multitask is None:
        if not config.scales:
            raise LNMError(f"configuration '{configuration}' has no network: the multi-task head needs one "
                           "(2d25, 3d_resenc or wega)")
        scale = multitask_mask_scale(config)
        head = plan_multitask_topology(scale, plans.scales[scale].spacing_mm, plans.compute_budget)
        plans.configurations[configuration] = config = config.with_multitask(head)
    return config


# ---- the hybrid head: physical shape features into the final classifier ----------------------------------
# On: in the accuracy benchmark (benchmarks/results/accuracy_quick_*.md) the head raised the test AUROC of 2d25 /
# 3d_resenc on three of four datasets (t50 +44 / +17, t80 +4 / +4, LIDC shapes +10 / +0.2) and lowered both by
# 3 points on one (t20). lnm_plan_and_preprocess --no_shape_head turns it off.
DEFAULT_SHAPE_HEAD = True
MIN_SIZE_SCALE_MM = 1.0           # a dataset of equal-sized nodes still gets a finite, physical scale
MIN_LOG_VOLUME_SCALE = 0.1
# (centre, scale) when the fingerprint holds no node measurements: a typical lymph node (~8 x 12 mm, ~400 mm3)
TYPICAL_NODE_MM = {"short_axis_mm": (8.0, 4.0), "long_axis_mm": (12.0, 5.0), "log_volume": (6.0, 1.0)}
SPHERICITY_CENTRE, SPHERICITY_SCALE = 0.8, 0.1   # dimensionless, in (0, 1]: a fixed scale (not in the fingerprint)


def plan_shape_features(fingerprint: dict) -> list[ShapeFeature]:
    """The hybrid head's features and their scaling: sizes centred on the median training node and scaled by
    the robust spread (IQR / 1.349) of the fingerprint's nodes (the training cases only, like the CT
    normalization), the volume on a log axis; sphericity on a fixed scale."""
    nodes = fingerprint["nodes"]

    def robust(values, minimum: float, fallback: tuple[float, float]) -> tuple[float, float]:
        v = np.asarray(values, dtype=float)
        if not len(v):   # a fingerprint without node measurements: a typical lymph node's scale
            return fallback
        q25, q50, q75 = np.percentile(v, [25, 50, 75])
        return float(q50), float(max((q75 - q25) / 1.349, minimum))

    def measured(name: str) -> list[float]:
        return [n[name] for n in nodes if name in n]

    out = [ShapeFeature(name, False, *robust(measured(name), MIN_SIZE_SCALE_MM, TYPICAL_NODE_MM[name]))
           for name in ("short_axis_mm", "long_axis_mm")]
    volumes = np.log(np.maximum(measured("volume_mm3"), 1e-3)) if measured("volume_mm3") else []
    out.append(ShapeFeature("volume_mm3", True, *robust(volumes, MIN_LOG_VOLUME_SCALE, TYPICAL_NODE_MM["log_volume"])))
    out.append(ShapeFeature("sphericity", False, SPHERICITY_CENTRE, SPHERICITY_SCALE))
    return out


def shape_head_gflops(n_features: int, width: int = SHAPE_EMBEDDING_WIDTH) -> float:
    """What the hybrid head adds to a forward pass (counted like FlopCounterMode, 2 per multiply-add): the
    embedding Linear(n_features, width) and ``width`` more inputs of the final Linear(., 1)."""
    return 2.0 * (n_features * width + width) / 1e9 if n_features else 0.0


def with_shape_head(config: ConfigurationPlan, features: list[ShapeFeature]) -> ConfigurationPlan:
    """``config`` with the hybrid head's ``features`` (empty: off) and its planned cost updated to match."""
    extra = shape_head_gflops(len(features)) - shape_head_gflops(len(config.head_shape_features))
    return dataclasses.replace(config, head_shape_features=list(features),
                               estimated_gflops_per_sample=config.estimated_gflops_per_sample + extra)


# ---- the crop scales: what preprocessing needs before any image voxel is read ----------------------
@dataclasses.dataclass(frozen=True)
class CropScalePlan:
    """The node views every configuration is cut from, with how they were decided."""
    target_spacing_mm: tuple[float, float, float]
    anisotropic: bool
    scales: dict[str, CropScale]          # global, local, context
    n_cases: int
    node_extent_mm: tuple[float, float]   # 95th percentile node extent (through-plane, in-plane)
    roi_notes: list[str]
    context_note: str


def plan_crop_scales(fingerprint: dict, planner: str = "LNMPlannerCPU") -> CropScalePlan:
    """Spacing, fields of view and voxels of the crop scales. They use the cases' geometry and the nodes'
    extents only, never intensities: preprocessing plans them from the node masks, then cuts the crops in
    the one pass over the images that also gathers the intensity statistics."""
    budget = budget_for_planner(planner)
    spacings = canonical_case_spacings(fingerprint)
    target, anisotropic = plan_target_spacing(spacings, canonical_case_shapes(fingerprint))
    slice_extent, inplane_extent = node_extent_percentiles(fingerprint)
    global_scale, notes = plan_global_scale(target, slice_extent, inplane_extent)
    local_scale = plan_local_scale(global_scale, inplane_extent)
    context_scale, context_note = plan_context_scale(global_scale.roi_size_mm, global_scale.spacing_mm, budget,
                                                     len(fingerprint["channel_names"]))
    return CropScalePlan(target, anisotropic, {"global": global_scale, "local": local_scale, "context": context_scale},
                         len(spacings), (slice_extent, inplane_extent), notes, context_note)



# ---- the whole plan ---------------------------------------------------------------------------------
def plan_experiment(fingerprint: dict, planner: str = "LNMPlannerCPU", plans_name: str = DEFAULT_PLANS_NAME,
                    n_folds: int = 5, split_seed: int = 12345, shape_head: bool | None = None,
                    pretrained_backbone: bool | None = None) -> Plans:
    """The plans of every configuration for a dataset fingerprint. ``shape_head``: feed the node's shape
    features into the final classifier of 2d25 and 3d_resenc (None: ``DEFAULT_SHAPE_HEAD``).
    ``pretrained_backbone``: 2d25 fine-tunes an ImageNet-pretrained backbone (None: ``DEFAULT_PRETRAINED_BACKBONE``;
    False: the MobileNetV3 ladder from scratch)."""
    budget = budget_for_planner(planner)
    crop = plan_crop_scales(fingerprint, planner)
    target, anisotropic, notes = crop.target_spacing_mm, crop.anisotropic, crop.roi_notes
    slice_extent, inplane_extent = crop.node_extent_mm
    n_channels = len(fingerprint["channel_names"]) + 1  # + node mask channel: the networks see both
    pretrained = DEFAULT_PRETRAINED_BACKBONE if pretrained_backbone is None else bool(pretrained_backbone)
    recipe = plan_recipe(fingerprint, n_folds, planner)
    context = PlanningContext(fingerprint, budget, target, crop.scales, n_channels, recipe,
                              plan_augmentation(anisotropic), pretrained,
                              plan_recipe(fingerprint, n_folds, planner, PRETRAINED_STEP_FACTOR))
    configurations, kind_notes = {}, {}
    for kind in KINDS:   # every registered configuration, planned by its own rule
        configurations[kind.name], kind_notes[kind.name] = kind.plan(context)
    shape_head = DEFAULT_SHAPE_HEAD if shape_head is None else bool(shape_head)
    hybrid = [k.name for k in KINDS if k.hybrid_head]
    if shape_head:
        features = plan_shape_features(fingerprint)
        for name in hybrid:
            configurations[name] = with_shape_head(configurations[name], features)
    context_note = f"{crop.context_note}; {kind_notes['wega']}"   # the context scale is planned for wega's ViT
    trainers, why_trainers = plan_learning_scheme(fingerprint)
    notes_out = {
        "target_spacing": f"per-axis median of {crop.n_cases} cases" + (
            "; anisotropic: slice spacing = 10th percentile of slice spacings" if anisotropic else ""),
        "roi": f"field of view = {CONTEXT_FACTOR} x the {NODE_EXTENT_PERCENTILE:.0f}th percentile node extent "
               f"({slice_extent:.1f} mm through-plane, {inplane_extent:.1f} mm in-plane)",
        "input_channels": f"{n_channels - 1} image channel(s) + the node mask",
        "learning_scheme": why_trainers,
        "epochs": describe_epoch_rule(fingerprint, n_folds, planner, recipe, 1.0) + (
            f"; 2d25's pretrained backbone: {configurations['2d25'].recipe.num_epochs} epochs "
            f"({PRETRAINED_STEP_FACTOR:g} x the steps)" if pretrained else ""),
        "context": context_note,
        **{kind.note_key: kind_notes[kind.name] for kind in KINDS if kind.note_key},
    }
    if notes:
        notes_out["roi_capped"] = "; ".join(notes)
    if shape_head:   # (no note when off: plans without the head stay as they were before the setting existed)
        notes_out["shape_head"] = (f"{', '.join(f.name for f in features)} join the final classifier of "
                                   f"{' and '.join(hybrid)}")
    return Plans(PLANS_VERSION, plans_name, planner, fingerprint["dataset_name"], budget, target, anisotropic,
                 plan_normalization(fingerprint), dict(crop.scales),
                 configurations,
                 n_folds, split_seed, notes_out, trainers)
