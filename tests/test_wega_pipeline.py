"""Configuration ``wega`` and the multi-task head wired into the pipeline: planning (context scale, tiny ViT
under the CPU budget, planned cost = FlopCounterMode), the context crops, the multi-task switch, wega's
AdamW recipe, the weak trainer's regional affinity term, DINOv2 weights through -pretrained_weights, and
(slow) training + lnm_predict with every trainer the issue names."""
from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from lnm_auto.configurations import wega as wega_kind
from lnm_auto.configurations.networks import network_for
from lnm_auto.networks import global_branch_for
from lnm_auto.networks.multitask import MultiTaskNet
from lnm_auto.networks.wega import TIMM_DINOV2_ARCHITECTURE, WegaNet
from lnm_auto.planning import planner
from lnm_auto.plans.global_local_topology import PATCH_SIZE, VIT_SMALL, VIT_TINY, WegaTopology
from lnm_auto.plans.plans import Plans
from lnm_auto.training.losses import regional_affinity_loss
from lnm_auto.training.run import run_training, setup_trainer
from lnm_auto.training.weak import (REGIONAL_AFFINITY_WEIGHT, BagBatchLoader, LNMTrainerWeak, make_bags, mil_loss,
                                    station_region_labels)
from lnm_auto.utils.errors import LNMError
from conftest import run_cli
from test_planning import make_fingerprint

warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(1)


def hand_plans(channels=None, planner_name="LNMPlannerCPU"):
    fp = make_fingerprint([(5.0, 0.8, 0.8)] * 6, [(60, 256, 256)] * 6, [(10, 12, 12), (15, 20, 20), (8, 9, 9)] * 4,
                          channel_names=channels)
    if channels:
        fp["intensity_statistics"] = {k: {"mean": 0.0, "std": 1.0, "percentile_00_5": -1.0, "percentile_99_5": 1.0}
                                      for k in channels}
    return planner.plan_experiment(fp, planner_name)


def counted_gflops(net, batch) -> float:
    for m in net.modules():   # FlopCounterMode does not see timm's fused attention on CPU: use the matmul path
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net.eval()(batch)
    return counter.get_total_flops() / 1e9


def random_batch(plans, config, n=1):
    batch = {}
    for s in config.scales:
        shape = plans.scales[s].roi_shape
        mask = torch.zeros(n, 1, *shape)
        mask[..., shape[0] // 2, shape[1] // 2 - 3:shape[1] // 2 + 3, shape[2] // 2 - 3:shape[2] // 2 + 3] = 1
        batch[f"image_{s}"], batch[f"mask_{s}"] = torch.randn(n, len(plans.normalization), *shape), mask
    batch["shape_features"] = torch.tensor([[8.0, 12.0, 400.0, 0.8]]).repeat(n, 1)   # the hybrid head's input
    return batch


# ------------------------------------------------------------------------------------------ planning

@pytest.mark.parametrize("channels", [None, {"0": "T2", "1": "ADC"}])
def test_planned_wega_gflops_equal_flop_counter_with_real_channels(channels):
    plans = hand_plans(channels)
    config = plans.configuration("wega")
    net = network_for(plans, config)
    assert isinstance(net, WegaNet) and net.in_channels == len(plans.normalization) + 1
    assert config.estimated_gflops_per_sample <= plans.compute_budget.max_gflops_per_sample
    assert config.estimated_gflops_per_sample == pytest.approx(counted_gflops(net, random_batch(plans, config)),
                                                               rel=0.05)


def test_wega_plan_context_scale_tiny_vit_on_cpu_and_vit_s14_on_gpu():
    cpu, gpu = hand_plans(), hand_plans(planner_name="LNMPlanner")
    for plans, vit in ((cpu, VIT_TINY), (gpu, VIT_SMALL)):
        config = plans.configuration("wega")
        topo = config.network
        assert isinstance(topo, WegaTopology) and (topo.embed_dim, topo.depth) == (vit.embed_dim, vit.depth)
        assert config.scales == ("context", "global") and config.use_mask_channel
        context, node = plans.scales["context"], plans.scales["global"]
        assert context.roi_shape[1] == context.roi_shape[2] == topo.context_image_size
        assert context.roi_shape[1] % PATCH_SIZE == 0 and context.roi_shape[0] == 3
        assert context.roi_size_mm[1] == pytest.approx(4 * node.roi_size_mm[1])       # 4 x the node ROI's field
        assert config.recipe.optimizer == "AdamW" and config.recipe.initial_lr == wega_kind.WEGA_INITIAL_LR
        assert plans.configuration("3d_resenc").recipe.optimizer == "SGD"
    assert cpu.scales["context"].roi_shape[1] < gpu.scales["context"].roi_shape[1]      # 126 vs 224 px
    assert "context" in cpu.notes and "tiny" in cpu.notes["context"]


def test_plans_with_wega_and_the_multitask_switch_round_trip_through_json(tmp_path):
    plans = hand_plans()
    planner.switch_on_multitask(plans, "3d_resenc")
    plans.save(tmp_path / "plans.json")
    loaded = Plans.load(tmp_path / "plans.json")
    assert isinstance(loaded.configuration("wega").network, WegaTopology)
    assert loaded.configuration("wega").network == plans.configuration("wega").network
    head = loaded.configuration("3d_resenc").multitask
    assert head is not None and head.mask_scale == "global"
    assert head.soft_mask_width_vox == pytest.approx((2.0, 12.5, 12.5))       # 10 mm at 5 x 0.8 x 0.8 mm
    assert loaded.identifier() == plans.identifier()
    # the switch is a training choice: plans compare equal with or without it, but checkpoints (identifier) differ
    plain = hand_plans()
    assert plain == plans and plain.identifier() != plans.identifier()


def test_the_multitask_switch_builds_multitasknet_without_the_mask_channel():
    plans = hand_plans()
    for name in ("2d25", "3d_resenc", "wega"):
        config = planner.switch_on_multitask(plans, name)
        assert planner.switch_on_multitask(plans, name) is config            # switching twice keeps the head
        net = network_for(plans, config).eval()
        assert isinstance(net, MultiTaskNet) and not net.base.mask_channel
        batch = random_batch(plans, config, 2)
        with torch.no_grad():
            out = net(batch)
        assert out["fused"].shape == (2,) and out["base"].shape == (2,)
        assert out["mask_logits"].shape == batch[f"mask_{config.multitask.mask_scale}"].shape
    # a configuration without crops (radiomics) has no network to put the head on
    plans.configurations["features_only"] = dataclasses.replace(plans.configuration("3d_resenc"), scales=(),
                                                                multitask=None)
    with pytest.raises(LNMError, match="no network"):
        planner.switch_on_multitask(plans, "features_only")


# ------------------------------------------------------------------------------------------ on real caches

@pytest.fixture(scope="module")
def prepared(planned_tiny):
    return planned_tiny(8, hide_node_labels=3)        # shared, read-only: runs write under tmp_path


def test_context_crops_are_cached_and_padded_outside_the_image(prepared):
    plans = Plans.load(prepared / "pre" / "Dataset042_Tiny" / "LNMPlans.json")
    with np.load(prepared / "pre" / "Dataset042_Tiny" / "LNMPlans_crops" / "case_000.npz") as f:
        ctx, mask, glob = f["image_context"], f["mask_context"], f["image_global"]
    assert ctx.shape[2:] == tuple(plans.scales["context"].cache_shape) and mask.shape[1:] == ctx.shape[2:]
    # the 38 mm image is a small part of the ~150 mm context: outside it every voxel is the padding, i.e. the
    # image's darkest value (air, -1000 HU) normalized, the same value as the image's own air columns
    air = float(glob.min())
    assert np.all(ctx[:, :, :, :5, :] == ctx.min()) and float(ctx.min()) == pytest.approx(air, abs=1e-2)
    assert float(ctx.max()) > air + 1.0                                       # the image itself is inside
    assert mask.sum() > 0 and np.all(mask[:, :, :5, :] == 0)                  # the node is there, not in the padding


def test_wega_trains_with_adamw_and_no_decay_on_1d_tensors(prepared, tmp_path):
    tr = setup_trainer(42, "wega", "0", prepared / "pre", tmp_path, "LNMTrainer_2epochs", num_workers=0)
    assert isinstance(tr.optimizer, torch.optim.AdamW)
    decayed, plain = tr.optimizer.param_groups
    assert decayed["weight_decay"] == wega_kind.WEGA_WEIGHT_DECAY and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim <= 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(tr.network.parameters()))
    assert isinstance(setup_trainer(42, "3d_resenc", "0", prepared / "pre", tmp_path, "LNMTrainer_2epochs",
                                    num_workers=0).optimizer, torch.optim.SGD)


def test_bags_carry_their_kind_and_only_station_bags_are_regions(prepared, tmp_path):
    tr = setup_trainer(42, "3d_resenc", "0", prepared / "pre", tmp_path, "LNMTrainerWeak_2epochs", num_workers=0)
    records = tr.training_records()
    tr.store.unpack(records.case.unique())
    bags = make_bags(records)
    loader = BagBatchLoader(tr.store, records, bags, tr.config.scales, 12, 0.5, seed=0)
    batch = loader.generate_train_batch()
    assert len(batch["bag_kind"]) == len(batch["bag_label"]) and set(batch["bag_kind"]) <= {"node", "station", "patient"}
    kinds = np.asarray(["node", "station", "patient", "station"])
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert station_region_labels(kinds, labels).tolist() == [-1.0, 0.0, -1.0, 1.0]
    # the weak loss = noisy-OR bag BCE of every head + the weight x regional loss of the fused head
    logits = {"fused": torch.tensor([2.0, 0.5, -1.0, 3.0, -2.0]), "global": torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])}
    bag = torch.tensor([0, 1, 1, 2, 3])
    b = {"bag": bag, "bag_label": labels, "bag_kind": kinds}
    expected = (mil_loss(logits["fused"], bag, labels) + mil_loss(logits["global"], bag, labels)
                + REGIONAL_AFFINITY_WEIGHT * regional_affinity_loss(logits["fused"], bag,
                                                                    torch.tensor([-1.0, 0.0, -1.0, 1.0])))
    assert torch.allclose(tr.compute_loss(logits, b), expected)
    # the negative station (bag 1) holds a node at p > 0.25, so the regional term is not zero here
    assert float(regional_affinity_loss(logits["fused"], bag, torch.tensor([-1.0, 0.0, -1.0, 1.0]))) > 0
    assert REGIONAL_AFFINITY_WEIGHT == LNMTrainerWeak.regional_affinity_weight


def _dinov2_like_file(path, topology: WegaTopology, img_size: int = 518):
    """A DINOv2-style state dict at the topology's width/depth made at 518 px (37 x 37 patches) with a mask token."""
    vit = timm.create_model(TIMM_DINOV2_ARCHITECTURE, pretrained=False, num_classes=0, img_size=img_size,
                            embed_dim=topology.embed_dim, depth=topology.depth, num_heads=topology.num_heads,
                            init_values=1e-5)
    state = dict(vit.state_dict(), mask_token=torch.zeros(1, topology.embed_dim))
    torch.save(state, path)
    return vit


def test_a_dinov2_file_is_routed_into_the_global_branch_and_a_checkpoint_is_not(prepared, tmp_path):
    plans = Plans.load(prepared / "pre" / "Dataset042_Tiny" / "LNMPlans.json")
    net = network_for(plans, plans.configuration("wega"))
    dinov2 = tmp_path / "dinov2.pth"
    vit = _dinov2_like_file(dinov2, plans.configuration("wega").network)
    assert global_branch_for(net, dinov2) is net
    wrapped = network_for(plans, planner.switch_on_multitask(plans, "wega"))
    assert global_branch_for(wrapped, dinov2) is wrapped.base
    whole = tmp_path / "whole.pth"
    torch.save({"network_weights": net.state_dict()}, whole)
    assert global_branch_for(net, whole) is None                       # a whole wega network: the generic loader
    resenc = network_for(plans, plans.configuration("3d_resenc"))
    assert global_branch_for(resenc, dinov2) is None                    # no ViT to load into
    report = net.load_global_weights(dinov2)
    assert report["resampled"] and report["unexpected"] == ["mask_token"]
    torch.testing.assert_close(net.global_vit.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)


# ------------------------------------------------------------------------------------------ end to end (slow)

def _prediction_input(raw: Path, cases, target: Path) -> Path:
    """imagesTs/ + nodesTs/ holding some training cases, as lnm_predict reads a raw dataset's test folder."""
    for case in cases:
        for f in (raw / "imagesTr").glob(f"{case}_*.nii.gz"):
            (target / "imagesTs").mkdir(parents=True, exist_ok=True)
            shutil.copy(f, target / "imagesTs" / f.name)
        (target / "nodesTs").mkdir(parents=True, exist_ok=True)
        shutil.copy(raw / "nodesTr" / f"{case}.nii.gz", target / "nodesTs" / f"{case}.nii.gz")
    return target / "imagesTs"


@pytest.mark.slow
@pytest.mark.parametrize("configuration,trainer", [("wega", "LNMTrainer"), ("3d_resenc", "LNMTrainerMultiTask"),
                                                   ("2d25", "LNMTrainerMultiTask"), ("wega", "LNMTrainerMultiTask")])
def test_train_then_lnm_predict_gives_the_validation_probabilities(prepared, tmp_path, configuration, trainer):
    """One epoch through lnm_train, then lnm_predict (-f 0, no TTA) on the fold's validation cases: the
    network rebuilt from the model folder's plans gives the probabilities the trainer validated with."""
    env = {"LNM_preprocessed": prepared / "pre", "LNM_results": tmp_path / "res"}
    r = run_cli("train", "42", configuration, "0", "-tr", f"{trainer}_1epochs", env=env)
    assert r.returncode == 0, r.stderr
    model = tmp_path / "res" / "Dataset042_Tiny" / f"{trainer}_1epochs__LNMPlans__{configuration}"
    saved = Plans.load(model / "plans.json").configuration(configuration)
    assert (saved.multitask is not None) == (trainer == "LNMTrainerMultiTask")
    val = pd.read_csv(model / "fold_0" / "validation" / "nodes.csv", dtype={"case": str})
    images = _prediction_input(prepared / "raw" / "Dataset042_Tiny", sorted(val.case.unique()), tmp_path / "in")
    r = run_cli("predict", "-i", images, "-o", tmp_path / "pred", "-d", "42", "-c", configuration, "-tr",
                f"{trainer}_1epochs", "-f", "0", "--disable_tta", "--no_probmaps", "--quiet", env=env)
    assert r.returncode == 0, r.stderr
    pred = pd.read_csv(tmp_path / "pred" / "nodes.csv", dtype={"case": str}).merge(val, on=["case", "node"])
    assert len(pred) == len(val) > 0
    np.testing.assert_allclose(pred["probability_x"], pred["probability_y"], atol=2e-3)


@pytest.mark.slow
def test_wega_trains_with_pgls_and_weak_and_takes_dinov2_weights(prepared, tmp_path):
    supervised = run_training(setup_trainer(42, "wega", "0", prepared / "pre", tmp_path, "LNMTrainer_1epochs",
                                            num_workers=0))
    pgls = run_training(setup_trainer(42, "wega", "0", prepared / "pre", tmp_path, "LNMTrainerPGLS_1epochs",
                                      num_workers=0))
    assert pgls.initial_weights == str(supervised.output_folder / "checkpoint_final.pth")
    weak = run_training(setup_trainer(42, "wega", "0", prepared / "pre", tmp_path, "LNMTrainerWeak_1epochs",
                                      num_workers=0))
    for tr in (pgls, weak):
        metrics = json.loads((tr.output_folder / "validation" / "metrics.json").read_text())
        assert (tr.output_folder / "checkpoint_final.pth").is_file() and metrics
    # -pretrained_weights with a DINOv2 file: into the global branch, the position embedding resampled
    dinov2 = tmp_path / "dinov2.pth"
    _dinov2_like_file(dinov2, supervised.config.network)
    tr = setup_trainer(42, "wega", "0", prepared / "pre", tmp_path / "dino", "LNMTrainer_1epochs", num_workers=0)
    before = tr.network.local_encoder.stem.convs[0].conv.weight.detach().clone() \
        if hasattr(tr.network.local_encoder, "stem") else None
    run_training(tr, pretrained_weights=dinov2, stop_after_epoch=0)
    log = "".join(p.read_text() for p in tr.output_folder.glob("training_log*.txt"))
    assert "DINOv2 weights" in log and "pos_embed: (1, 1370, " in log and tr.initial_weights == str(dinov2)
    vit = torch.load(dinov2, weights_only=True)
    torch.testing.assert_close(tr.network.global_vit.blocks[2].mlp.fc1.weight, vit["blocks.2.mlp.fc1.weight"])
    if before is not None:   # the local branch is not touched by a ViT file
        torch.testing.assert_close(tr.network.local_encoder.stem.convs[0].conv.weight, before)
