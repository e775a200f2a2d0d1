"""The CPU variant of the node detector: one configuration, ``2d_cpu``, added to nnU-Net's own plans.

nnU-Net's planned ``2d`` is made for a GPU: on the demo phantom (224 x 288 slices at 0.8 mm) its network of
32-512 features on full slices takes 2-3 s per iteration on two CPU threads, and in 150 iterations it learned
nothing (pseudo Dice 0.0 throughout: nodes are too rare in a full slice for its one-in-three foreground patches).
This variant is planned from nnU-Net's ``2d`` so that a CPU learns nodes within minutes (measured in
benchmarks/results/detection_phantom.md):

* in-plane spacing at most twice as coarse as nnU-Net's, never coarser than ``MAX_SPACING_MM`` (a 5 mm short-axis
  node keeps at least three voxels across), never finer than nnU-Net's;
* a ``PATCH`` x ``PATCH`` patch (smaller only when the image is) and a batch of ``BATCH``;
* five stages of ``BASE_FEATURES``..``MAX_FEATURES`` features (nnU-Net: 32..512), 3 x 3 kernels;
* foreground oversampling ``FOREGROUND_OVERSAMPLING`` (nnU-Net: 0.33; with a batch of 8, nnU-Net's rounding puts
  a node in 5 of the 8 patches), and epochs of ``ITERATIONS_PER_EPOCH`` iterations with nnU-Net's shipped
  ``nnUNetTrainer_20epochs`` (``TRAINER``: lnm_train_detector's default trainer for this configuration).

nnU-Net's documented way to add a configuration is an entry in its plans file; its trainer and predictor read it
like their own. The two settings nnU-Net keeps outside plans (foreground oversampling, iterations per epoch) are
stored in the entry under ``lnm_training`` and applied by ``lnm_train_detector`` when it starts nnU-Net's trainer.
Everything here is a pure function of nnU-Net's plans.
"""
from __future__ import annotations

import copy
import math

from lnm_auto.utils.errors import LNMError

CONFIGURATION = "2d_cpu"
SOURCE_CONFIGURATION = "2d"
TRAINER = "nnUNetTrainer_20epochs"        # shipped with nnU-Net: its trainer with 20 epochs
MAX_SPACING_MM = 1.6
PATCH = 96
BATCH = 8
N_STAGES = 5
BASE_FEATURES, MAX_FEATURES = 16, 128
FOREGROUND_OVERSAMPLING = 0.66
ITERATIONS_PER_EPOCH = 40
TRAINING_KEY = "lnm_training"


def cpu_spacing(planned_spacing_mm: list[float]) -> list[float]:
    """Each in-plane spacing: twice nnU-Net's, capped at MAX_SPACING_MM, never finer than nnU-Net's."""
    return [max(s, min(2 * s, MAX_SPACING_MM)) for s in planned_spacing_mm]


def cpu_patch(median_size_voxels: list[float], planned_spacing_mm: list[float], spacing_mm: list[float]) -> list[int]:
    """PATCH per axis, or the median image at ``spacing_mm`` rounded up to what five stages can halve (16), at
    least twice that: a 1 x 1 bottleneck is refused by the instance norm nnU-Net plans (one value per channel)."""
    step = 2 ** (N_STAGES - 1)
    return [min(PATCH, step * max(2, math.ceil(n * s0 / s / step)))
            for n, s0, s in zip(median_size_voxels, planned_spacing_mm, spacing_mm)]


def encoder_depth(arch_kwargs: dict) -> dict:
    """The encoder's depth per stage under the key its network class takes: PlainConvUNet's ``n_conv_per_stage``
    (2 convolutions), or ResidualEncoderUNet's ``n_blocks_per_stage`` (nnU-Net's ResEnc planners: 1, 3, 4, 6, ...;
    its first N_STAGES counts, the last repeated when it planned fewer stages). Passing the other key, or a count
    per stage nnU-Net planned, would make the network class refuse its arguments."""
    if "n_blocks_per_stage" not in arch_kwargs:
        return {"n_conv_per_stage": [2] * N_STAGES}
    blocks = arch_kwargs["n_blocks_per_stage"]
    blocks = [int(b) for b in (blocks if isinstance(blocks, (list, tuple)) else [blocks])] or [1]
    return {"n_blocks_per_stage": (blocks + blocks[-1:] * N_STAGES)[:N_STAGES]}


def cpu_configuration(planned_2d: dict) -> dict:
    """The ``2d_cpu`` entry from nnU-Net's planned ``2d`` entry (normalisation, resampling, network class and
    operators kept; spacing, patch, batch and network size replaced)."""
    try:
        spacing0 = [float(s) for s in planned_2d["spacing"]]
        median = [float(n) for n in planned_2d["median_image_size_in_voxels"]]
        arch = planned_2d["architecture"]["arch_kwargs"]
    except (KeyError, TypeError, ValueError) as e:
        raise LNMError(f"nnU-Net's '{SOURCE_CONFIGURATION}' plan lacks {e}: not a plans file of nnU-Net v2") from None
    if len(spacing0) != 2 or len(median) != 2:
        raise LNMError(f"nnU-Net's '{SOURCE_CONFIGURATION}' plan has spacing {spacing0}: expected two in-plane axes")
    spacing = cpu_spacing(spacing0)
    config = copy.deepcopy(planned_2d)
    config.pop("inherits_from", None)
    config.update({
        "data_identifier": None,      # set by cpu_plans: it names the preprocessed folder
        "spacing": spacing,
        "median_image_size_in_voxels": [round(n * s0 / s, 1) for n, s0, s in zip(median, spacing0, spacing)],
        "patch_size": cpu_patch(median, spacing0, spacing),
        "batch_size": BATCH,
        TRAINING_KEY: {"foreground_oversampling": FOREGROUND_OVERSAMPLING,
                       "iterations_per_epoch": ITERATIONS_PER_EPOCH},
    })
    config["architecture"] = copy.deepcopy(planned_2d["architecture"])
    config["architecture"]["arch_kwargs"] = {
        **arch,
        "n_stages": N_STAGES,
        "features_per_stage": [min(BASE_FEATURES * 2 ** i, MAX_FEATURES) for i in range(N_STAGES)],
        "kernel_sizes": [[3, 3]] * N_STAGES,
        "strides": [[1, 1]] + [[2, 2]] * (N_STAGES - 1),
        **encoder_depth(arch),
        "n_conv_per_stage_decoder": [2] * (N_STAGES - 1),
    }
    return config


def add_cpu_configuration(nnunet_plans: dict) -> dict:
    """nnU-Net's plans with the ``2d_cpu`` entry added (a new dict; nnU-Net's own entries unchanged)."""
    configurations = nnunet_plans.get("configurations")
    if not isinstance(configurations, dict) or SOURCE_CONFIGURATION not in configurations:
        raise LNMError(f"nnU-Net planned no '{SOURCE_CONFIGURATION}' configuration, which '{CONFIGURATION}' "
                       "is made from")
    config = cpu_configuration(configurations[SOURCE_CONFIGURATION])
    config["data_identifier"] = f"{nnunet_plans.get('plans_name', 'nnUNetPlans')}_{CONFIGURATION}"
    plans = copy.deepcopy(nnunet_plans)
    plans["configurations"][CONFIGURATION] = config
    return plans


def training_settings(configuration: dict) -> dict:
    """The ``lnm_training`` settings of a configuration entry ({} for nnU-Net's own entries)."""
    settings = configuration.get(TRAINING_KEY)
    return dict(settings) if isinstance(settings, dict) else {}
