"""The detector's CPU configuration 2d_cpu: a pure function of nnU-Net's planned 2d, checked on hand-made plans and
read back by nnU-Net's own plans handler and network builder."""
from __future__ import annotations

import copy

import pytest

from lnm_auto.detection import cpu_variant
from lnm_auto.detection.cpu_variant import add_cpu_configuration, cpu_configuration, cpu_patch, cpu_spacing
from lnm_auto.utils.errors import LNMError


def nnunet_2d(spacing=(0.8, 0.8), median=(224, 288)) -> dict:
    """nnU-Net v2's 2d entry as its planner writes it (the keys that matter here)."""
    return {
        "data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 51,
        "patch_size": [224, 288], "median_image_size_in_voxels": list(median), "spacing": list(spacing),
        "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 7, "features_per_stage": [32, 64, 128, 256, 512, 512, 512],
                            "conv_op": "torch.nn.modules.conv.Conv2d", "kernel_sizes": [[3, 3]] * 7,
                            "strides": [[1, 1]] + [[2, 2]] * 6, "n_conv_per_stage": [2] * 7,
                            "n_conv_per_stage_decoder": [2] * 6, "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": True,
    }


def nnunet_plans(**kw) -> dict:
    return {"dataset_name": "Dataset001_XLN", "plans_name": "nnUNetPlans", "transpose_forward": [0, 1, 2],
            "transpose_backward": [0, 1, 2], "image_reader_writer": "SimpleITKIO", "label_manager": "LabelManager",
            "experiment_planner_used": "ExperimentPlanner",
            "original_median_spacing_after_transp": [5.0, 0.8, 0.8],
            "original_median_shape_after_transp": [32, 224, 288],
            "foreground_intensity_properties_per_channel": {"0": {"max": 300.0, "mean": 10.0, "median": 5.0,
                                                                  "min": -500.0, "percentile_00_5": -400.0,
                                                                  "percentile_99_5": 200.0, "std": 80.0}},
            "configurations": {"2d": nnunet_2d(**kw), "3d_fullres": {"spacing": [5.0, 0.8, 0.8]}}}


@pytest.mark.parametrize("planned, expected", [
    ([0.8, 0.8], [1.6, 1.6]),      # twice as coarse
    ([0.5, 0.7], [1.0, 1.4]),      # each axis on its own
    ([1.0, 1.0], [1.6, 1.6]),      # capped: a 5 mm node keeps 3 voxels
    ([2.0, 2.5], [2.0, 2.5]),      # never finer than nnU-Net's (and never coarser than it is)
])
def test_spacing_rule(planned, expected):
    assert cpu_spacing(planned) == pytest.approx(expected)


def test_patch_is_96_or_the_image_rounded_up_to_what_five_stages_halve():
    assert cpu_patch([224, 288], [0.8, 0.8], [1.6, 1.6]) == [96, 96]
    assert cpu_patch([48, 100], [1.0, 1.0], [1.6, 1.6]) == [32, 64]     # 30 -> 32, 62.5 -> 64
    assert cpu_patch([10, 10], [1.0, 1.0], [1.0, 1.0]) == [32, 32]     # a bottleneck of 2 x 2, not 1 x 1


def test_configuration_from_nnunets_2d():
    planned = nnunet_2d()
    config = cpu_configuration(planned)
    assert config["spacing"] == pytest.approx([1.6, 1.6]) and config["patch_size"] == [96, 96]
    assert config["median_image_size_in_voxels"] == [112.0, 144.0] and config["batch_size"] == cpu_variant.BATCH
    arch = config["architecture"]["arch_kwargs"]
    assert arch["features_per_stage"] == [16, 32, 64, 128, 128] and arch["n_stages"] == 5
    assert len(arch["strides"]) == len(arch["kernel_sizes"]) == len(arch["n_conv_per_stage"]) == 5
    assert len(arch["n_conv_per_stage_decoder"]) == 4
    for key in ("normalization_schemes", "resampling_fn_data_kwargs", "batch_dice"):
        assert config[key] == planned[key]             # nnU-Net's choices kept
    assert arch["norm_op"] == planned["architecture"]["arch_kwargs"]["norm_op"]
    assert cpu_variant.training_settings(config) == {"foreground_oversampling": 0.66, "iterations_per_epoch": 40}
    assert planned == nnunet_2d()                      # the input is not changed


def test_added_to_nnunets_plans_without_touching_its_entries():
    plans = nnunet_plans()
    before = copy.deepcopy(plans)
    added = add_cpu_configuration(plans)
    assert plans == before
    assert {k: v for k, v in added["configurations"].items() if k != "2d_cpu"} == before["configurations"]
    assert added["configurations"]["2d_cpu"]["data_identifier"] == "nnUNetPlans_2d_cpu"
    with pytest.raises(LNMError, match="planned no '2d' configuration"):
        add_cpu_configuration({"plans_name": "nnUNetPlans", "configurations": {"3d_fullres": {}}})
    broken = nnunet_plans()
    del broken["configurations"]["2d"]["spacing"]
    with pytest.raises(LNMError, match="lacks 'spacing'"):
        add_cpu_configuration(broken)


def test_nnunet_reads_the_entry_and_builds_its_network():
    torch = pytest.importorskip("torch")
    pytest.importorskip("nnunetv2")
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    config = PlansManager(add_cpu_configuration(nnunet_plans())).get_configuration("2d_cpu")
    assert config.patch_size == [96, 96] and config.batch_size == 8 and config.spacing == pytest.approx([1.6, 1.6])
    network = get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs,
                                     config.network_arch_init_kwargs_req_import, 1, 2, deep_supervision=False)
    with torch.no_grad():
        out = network(torch.zeros(1, 1, *config.patch_size))
    assert tuple(out.shape) == (1, 2, 96, 96)
    assert sum(p.numel() for p in network.parameters()) < 2_000_000      # nnU-Net's 2d here: 33 million


def resenc_plans() -> dict:
    """nnU-Net's plans as its ResEnc M planner writes the 2d entry: ResidualEncoderUNet, whose encoder takes
    n_blocks_per_stage (1, 3, 4, 6, 6, ...) instead of PlainConvUNet's n_conv_per_stage, one conv per decoder stage."""
    plans = nnunet_plans()
    plans["plans_name"] = "nnUNetResEncUNetMPlans"
    plans["experiment_planner_used"] = "nnUNetPlannerResEncM"
    arch = plans["configurations"]["2d"]["architecture"]
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    kwargs = arch["arch_kwargs"]
    del kwargs["n_conv_per_stage"]
    kwargs.update({"n_blocks_per_stage": [1, 3, 4, 6, 6, 6, 6], "n_conv_per_stage_decoder": [1] * 6})
    return plans


def test_resenc_plans_keep_their_encoder_key_and_nnunet_builds_the_network():
    added = add_cpu_configuration(resenc_plans())
    arch = added["configurations"]["2d_cpu"]["architecture"]
    assert arch["network_class_name"].endswith(".ResidualEncoderUNet")
    assert "n_conv_per_stage" not in arch["arch_kwargs"]             # ResidualEncoderUNet refuses that argument
    assert arch["arch_kwargs"]["n_blocks_per_stage"] == [1, 3, 4, 6, 6]     # nnU-Net's counts, five stages
    assert added["configurations"]["2d_cpu"]["data_identifier"] == "nnUNetResEncUNetMPlans_2d_cpu"
    few = resenc_plans()       # a small image: nnU-Net planned fewer stages than 2d_cpu has
    few["configurations"]["2d"]["architecture"]["arch_kwargs"]["n_blocks_per_stage"] = [1, 3, 4]
    assert cpu_configuration(few["configurations"]["2d"])["architecture"]["arch_kwargs"]["n_blocks_per_stage"] == \
        [1, 3, 4, 4, 4]
    torch = pytest.importorskip("torch")
    pytest.importorskip("nnunetv2")
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    config = PlansManager(added).get_configuration("2d_cpu")
    network = get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs,
                                     config.network_arch_init_kwargs_req_import, 1, 2, deep_supervision=False)
    with torch.no_grad():
        out = network(torch.zeros(1, 1, *config.patch_size))
    assert tuple(out.shape) == (1, 2, 96, 96)


@pytest.mark.parametrize("spacing, median", [((0.8, 0.8), (10, 10)), ((0.5, 2.0), (300, 12))])
def test_tiny_or_anisotropic_slices_give_a_network_that_runs(spacing, median):
    """Slices of 10 x 10 voxels (or 12 on one axis): the patch stays >= 32 so the five-stage network's bottleneck
    keeps more than one value per channel, which nnU-Net's instance norm needs (a 16 x 16 patch raised there)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("nnunetv2")
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    config = PlansManager(add_cpu_configuration(nnunet_plans(spacing=spacing, median=median))).get_configuration(
        "2d_cpu")
    assert all(32 <= n <= 96 and n % 16 == 0 for n in config.patch_size)
    network = get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs,
                                     config.network_arch_init_kwargs_req_import, 1, 2, deep_supervision=True)
    out = network(torch.zeros(2, 1, *config.patch_size))      # training mode, as nnU-Net's trainer runs it
    assert tuple(out[0].shape) == (2, 2, *config.patch_size)


def test_negative_iterations_per_epoch_refused_before_any_export(tiny_dataset, tmp_path):
    """Refused before the export and nnU-Net's planning (minutes), as -gpu_memory_target and the folds are."""
    pytest.importorskip("nnunetv2")
    from conftest import refused, run_cli
    proc = run_cli("train_detector", "42", "0", "--iterations_per_epoch", "-1", "--raw", tiny_dataset.parent,
                   "--preprocessed", tmp_path / "pre", "--results", tmp_path / "res", "-device", "cpu")
    refused(proc, "--iterations_per_epoch must be 0 (nnU-Net's) or more, got -1")
    assert not (tmp_path / "pre").exists() and not (tmp_path / "res").exists()
