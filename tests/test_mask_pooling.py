"""2d25's ``mask_use: "pooling"``: the node mask weights a second pooling of every FPN level instead of entering
the pretrained stem as extra planes. The pooling against numpy, the empty-mask fallback, the pure ImageNet stem,
the mask reaching the output, the FLOP estimate, and the plans field (round trip, old plans, hand-edited values).

Real weights, real networks, real plans of the tiny dataset; the CLI refusal runs lnm_train.
"""
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
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lnm_auto.configurations.networks import build_network, network_for
from lnm_auto.networks.imagenet_weights import (imagenet_state_dict, load_imagenet_backbones, load_into_backbone,
                                                pretrained_backbone_parameters)
from lnm_auto.networks.two_stream import SplitStem, group_mask_weights, group_slices, mask_weighted_mean
from lnm_auto.plans.network_topology import (TwoStreamTopology, estimate_two_stream_gflops, plan_two_stream_topology,
                                             slice_group_starts)
from lnm_auto.plans.plans import Plans
from lnm_auto.plans.two_stream_topology import EFFICIENTNET_LITE0_IMAGENET as LITE0, IMAGENET_INPUT_WINDOW, MASK_USES
from lnm_auto.utils.errors import LNMError
from conftest import refused, run_cli, run_train_cli

warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(2)
DS = "Dataset042_Tiny"


def pooling_topology(z: int = 6, fpn: int = 32, fused: int = 64, mask_use: str = "pooling") -> TwoStreamTopology:
    return TwoStreamTopology(LITE0.backbone, fpn, fused, slice_group_starts(z), pretrained_weights=LITE0.weights_id,
                             pretrained_sha256=LITE0.sha256, input_window=IMAGENET_INPUT_WINDOW, mask_use=mask_use)


@pytest.fixture(scope="module")
def imagenet():
    return imagenet_state_dict(LITE0)


def batch_with_mask(mask_box: tuple[slice, ...], z: int = 6, size: int = 32, seed: int = 0) -> dict:
    """The same random images every call, the node mask a box at ``mask_box`` (z, y, x) in both views."""
    g = torch.Generator().manual_seed(seed)
    batch = {k: torch.randn(2, 1, z, size, size, generator=g) for k in ("image_global", "image_local")}
    mask = torch.zeros(2, 1, z, size, size)
    mask[(slice(None), slice(None), *mask_box)] = 1.0
    return batch | {"mask_global": mask, "mask_local": mask.clone()}


# ---- the pooling itself ---------------------------------------------------------------------------------------
def test_weighted_mean_equals_numpy_at_the_level_and_at_twice_its_resolution():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(3, 4, 3, 5)).astype(np.float32)
    weights = (rng.random(size=(3, 1, 3, 5)) * (rng.random(size=(3, 1, 3, 5)) > 0.4)).astype(np.float32)
    weights[:, :, 1, 2] = 0.7          # every sample has some weight
    want = (features * weights).sum((2, 3)) / weights.sum((2, 3))
    got = mask_weighted_mean(torch.from_numpy(features), torch.from_numpy(weights))
    assert got.shape == (3, 4, 1, 1)
    np.testing.assert_allclose(got[:, :, 0, 0].numpy(), want, rtol=1e-5)
    # a mask at twice the level's resolution: each feature pixel weighted by the share of its 2 x 2 block covered
    fine = (rng.random(size=(3, 1, 6, 10)) > 0.5).astype(np.float32)
    fine[:, :, 2, 4] = 1.0
    block = fine.reshape(3, 1, 3, 2, 5, 2).mean(axis=(3, 5))
    want = (features * block).sum((2, 3)) / block.sum((2, 3))
    got = mask_weighted_mean(torch.from_numpy(features), torch.from_numpy(fine))
    np.testing.assert_allclose(got[:, :, 0, 0].numpy(), want, rtol=1e-5)
    assert not np.allclose(want, features.mean((2, 3)), atol=1e-3)     # the weighting is not the plain mean


def test_an_empty_mask_falls_back_to_the_plain_mean():
    features = torch.randn(2, 8, 4, 4)
    weights = torch.zeros(2, 1, 16, 16)
    weights[1, 0, 0:4, 0:4] = 1.0      # sample 1: the top-left feature pixel only; sample 0: nothing
    got = mask_weighted_mean(features, weights)
    torch.testing.assert_close(got[0], features[0].mean(dim=(1, 2), keepdim=True))
    torch.testing.assert_close(got[1], features[1, :, :1, :1])
    assert torch.isfinite(got).all()
    features.requires_grad_(True)
    mask_weighted_mean(features, weights).sum().backward()    # no NaN gradient through the empty sample
    assert torch.isfinite(features.grad).all()


def test_group_weights_are_the_mean_of_the_groups_slices():
    mask = torch.zeros(1, 1, 7, 4, 4)
    mask[0, 0, 2, 1, 1] = 1.0          # slice 2: in groups starting at 0 and 2 (starts of 7 slices: 0, 2, 4)
    mask[0, 0, 6, 3, 3] = 1.0          # slice 6: the last group only
    starts = slice_group_starts(7)
    assert starts == (0, 2, 4)
    w = group_mask_weights(mask, starts)
    assert w.shape == (3, 1, 4, 4)
    assert w[0, 0, 1, 1] == pytest.approx(1 / 3) and w[1, 0, 1, 1] == pytest.approx(1 / 3) and w[2, 0, 1, 1] == 0
    assert w[2, 0, 3, 3] == pytest.approx(1 / 3) and w[:2, 0, 3, 3].sum() == 0
    torch.testing.assert_close(w, group_slices(mask, starts).mean(1, keepdim=True))


# ---- the network ----------------------------------------------------------------------------------------------
def test_pooling_network_stems_are_exactly_the_pretrained_weights(imagenet):
    net = build_network(pooling_topology(), 2, mask_channel=True).eval()
    load_imagenet_backbones(net)
    bare = timm.create_model(LITE0.backbone, pretrained=False, features_only=True, in_chans=3,
                             out_indices=(-3, -2, -1))
    load_into_backbone(bare, imagenet)
    for stream in (net.global_stream, net.local_stream):
        stem = stream.backbone.conv_stem
        assert not isinstance(stem, SplitStem) and isinstance(stem, nn.Conv2d) and stem.in_channels == 3
        torch.testing.assert_close(stem.weight, imagenet["conv_stem.weight"])
        state = stream.backbone.state_dict()
        assert state.keys() == bare.state_dict().keys()      # the whole backbone is the ImageNet one, nothing new
        for k, v in bare.state_dict().items():
            assert torch.equal(state[k], v), k
    # every backbone parameter is a pretrained one (fine-tuned at the backbone's lr): no zero-initialised filters
    backbone = [p for s in (net.global_stream, net.local_stream) for p in s.backbone.parameters()]
    assert {id(p) for p in pretrained_backbone_parameters(net)} == {id(p) for p in backbone}
    # the stem-channel network of the same topology keeps its split stem
    stem_net = build_network(pooling_topology(mask_use="stem_channels"), 2, mask_channel=True)
    assert isinstance(stem_net.global_stream.backbone.conv_stem, SplitStem)


def test_the_mask_changes_the_output_in_pooling_mode_only():
    torch.manual_seed(0)
    pooling = build_network(pooling_topology(), 2, mask_channel=True).eval()
    torch.manual_seed(0)
    stem = build_network(pooling_topology(mask_use="stem_channels"), 2, mask_channel=True).eval()
    here = batch_with_mask((slice(1, 4), slice(4, 12), slice(4, 12)))
    there = batch_with_mask((slice(2, 5), slice(18, 30), slice(16, 28)))
    with torch.no_grad():
        for name in ("fused", "global", "local"):
            a, b = pooling(here)[name], pooling(there)[name]
            assert (a - b).abs().min() > 1e-5, name             # the node's place reaches every output
            # the zero-initialised stem channels: the untrained network cannot tell the node
            torch.testing.assert_close(stem(here)[name], stem(there)[name])
        # the backbone itself never sees the mask: the same image features either way
        stream = pooling.global_stream
        images = stream.input_transform(group_slices(here["image_global"], stream.starts))
        assert images.shape[1] == 3
    for name in ("mask_global", "mask_local"):        # an empty mask runs (the plain mean twice)
        here[name].zero_()
    with torch.no_grad():
        assert all(torch.isfinite(v).all() for v in pooling(here).values())


def test_without_the_mask_channel_mask_use_changes_nothing():
    torch.manual_seed(0)
    pooling = build_network(pooling_topology(), 1, mask_channel=False)
    torch.manual_seed(0)
    stem = build_network(pooling_topology(mask_use="stem_channels"), 1, mask_channel=False)
    assert pooling.state_dict().keys() == stem.state_dict().keys()
    for k, v in pooling.state_dict().items():
        assert torch.equal(v, stem.state_dict()[k]), k


def test_flop_estimate_of_the_pooling_network():
    topo = pooling_topology(z=7, fpn=32, fused=64)
    net = build_network(topo, 2, mask_channel=True).eval()
    batch = {k: torch.randn(1, 1, 7, 40, 48) for k in ("image_global", "image_local")}
    batch |= {k.replace("image", "mask"): torch.ones(1, 1, 7, 40, 48) for k in batch}
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(batch)
    # the stem sees the image triplet only (in_channels = image channels); the fusion reads both poolings
    assert estimate_two_stream_gflops(topo, (7, 40, 48), in_channels=1) * 1e9 == pytest.approx(
        fc.get_total_flops(), rel=1e-6)
    assert estimate_two_stream_gflops(topo, (7, 40, 48)) > estimate_two_stream_gflops(
        dataclasses.replace(topo, mask_use="stem_channels"), (7, 40, 48))


# ---- the plans field ------------------------------------------------------------------------------------------
def test_topology_round_trip_and_the_planner_default():
    topo = pooling_topology()
    assert TwoStreamTopology.from_dict(json.loads(json.dumps(topo.to_dict()))) == topo
    old = topo.to_dict()
    del old["mask_use"]
    assert TwoStreamTopology.from_dict(old).mask_use == "stem_channels" == MASK_USES[0]
    planned = plan_two_stream_topology((8, 32, 32), None, "CPU", pretrained_weights=LITE0.weights_id)
    assert planned.mask_use == "stem_channels"     # the measured default (benchmarks/README.md, learning curve)
    assert plan_two_stream_topology((8, 32, 32), None, "CPU", pretrained_weights=LITE0.weights_id,
                                    mask_use="pooling").mask_use == "pooling"
    with pytest.raises(ValueError, match="mask_use"):
        plan_two_stream_topology((8, 32, 32), None, "CPU", mask_use="attention")


@pytest.fixture
def plans_file(planned_tiny, tmp_path) -> Path:
    """A copy of the tiny dataset's planned LNMPlans.json, free to edit."""
    return Path(shutil.copy(planned_tiny(8) / "pre" / DS / "LNMPlans.json", tmp_path / "LNMPlans.json"))


def edit_2d25(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data["configurations"]["2d25"])
    path.write_text(json.dumps(data))


def test_plans_round_trip_with_pooling_and_old_plans_load_as_stem_channels(plans_file, tmp_path):
    planned = Plans.load(plans_file)
    assert "mask_use" not in json.loads(plans_file.read_text())["configurations"]["2d25"]["network"]
    assert planned.configurations["2d25"].network.mask_use == "stem_channels"    # the file as plans were before
    edit_2d25(plans_file, lambda c: c["network"].update(mask_use="pooling"))
    plans = Plans.load(plans_file)
    assert plans.configurations["2d25"].network.mask_use == "pooling"
    assert plans.identifier() != planned.identifier()         # checkpoints of one do not load into the other
    plans.save(tmp_path / "again.json")
    assert Plans.load(tmp_path / "again.json") == plans
    assert json.loads((tmp_path / "again.json").read_text())["configurations"]["2d25"]["network"]["mask_use"] == \
        "pooling"
    net = network_for(plans, plans.configurations["2d25"])
    assert net.global_stream.mask_pooling and net.global_stream.backbone.conv_stem.in_channels == 3


@pytest.mark.parametrize("change,message", [
    (lambda c: c["network"].update(mask_use="attention"),
     "configurations.2d25.network.mask_use = 'attention': must be one of stem_channels, pooling"),
    (lambda c: c["network"].update(mask_use=1),
     "configurations.2d25.network.mask_use = 1: must be a string"),
    (lambda c: (c["network"].update(mask_use="pooling"), c.update(use_mask_channel=False)),
     "configurations.2d25.network.mask_use = 'pooling': pools with the node mask, which use_mask_channel false "
     "leaves out"),
])
def test_bad_mask_use_is_one_line_naming_the_file(plans_file, change, message):
    edit_2d25(plans_file, change)
    before = plans_file.read_bytes()
    with pytest.raises(LNMError) as e:
        Plans.load(plans_file)
    lines = str(e.value).splitlines()
    assert lines[0] == f"{plans_file}: {message}" or lines[0].startswith(f"{plans_file}: {message}")
    assert lines[-1].startswith(f"{plans_file}: 1 invalid field(s)")
    assert plans_file.read_bytes() == before


@pytest.mark.slow
def test_lnm_train_refuses_a_hand_edited_mask_use(planned_tiny, tmp_path):
    pre = Path(shutil.copytree(planned_tiny(8) / "pre", tmp_path / "pre"))
    plans = pre / DS / "LNMPlans.json"
    edit_2d25(plans, lambda c: c["network"].update(mask_use="attention"))
    proc = run_train_cli("42", "2d25", "0", "-tr", "LNMTrainer_1epochs", "-device", "cpu", preprocessed=pre,
                         results=tmp_path / "res")
    assert proc.returncode == 1
    refused(proc, str(plans), "mask_use = 'attention': must be one of stem_channels, pooling")
    assert not list((tmp_path / "res").rglob("checkpoint_*.pth"))


@pytest.mark.slow
def test_lnm_train_trains_and_predicts_with_mask_pooling(planned_tiny, tmp_path):
    pre = Path(shutil.copytree(planned_tiny(8) / "pre", tmp_path / "pre"))
    plans = pre / DS / "LNMPlans.json"
    edit_2d25(plans, lambda c: c["network"].update(mask_use="pooling"))
    proc = run_train_cli("42", "2d25", "0", "-tr", "LNMTrainer_1epochs", "-device", "cpu", preprocessed=pre,
                         results=tmp_path / "res")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (checkpoint,) = (tmp_path / "res").rglob("checkpoint_final.pth")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]
    stems = [k for k in state if k.endswith("backbone.conv_stem.weight")]
    assert len(stems) == 2 and all(state[k].shape[1] == 3 for k in stems)      # image planes only, no split stem
    assert not any(".extra." in k for k in state)
    out = tmp_path / "out"
    proc = run_cli("predict", "-i", planned_tiny(8) / "raw" / DS / "imagesTr", "-o", out, "-d", "42", "-c", "2d25",
                   "-tr", "LNMTrainer_1epochs", "-f", "0", "--results", tmp_path / "res", "-device", "cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    probabilities = pd.read_csv(out / "nodes.csv")["probability"]
    assert len(probabilities) > 0 and probabilities.between(0, 1).all()


# ---- the benchmark's mask-pooling plans -----------------------------------------------------------------------
def test_benchmark_writes_mask_pooling_plans_and_filters_methods(plans_file):
    import argparse
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from learning_curve import MASKPOOL_PLANS, METHODS, selected_methods, switch_to_mask_pooling
    before = Plans.load(plans_file)
    switch_to_mask_pooling(plans_file)
    after = Plans.load(plans_file)
    assert after.configurations["2d25"].network == dataclasses.replace(before.configurations["2d25"].network,
                                                                       mask_use="pooling")
    assert after.configurations["3d_resenc"] == before.configurations["3d_resenc"]
    assert METHODS["2d25 pretrained, mask pooling"] == ("2d25", "LNMTrainer", MASKPOOL_PLANS, "net")
    wanted = ["2d25 pretrained, mask pooling", "2d25 scratch"]
    assert selected_methods(argparse.Namespace(methods=wanted)) == ["2d25 scratch", "2d25 pretrained, mask pooling"]
    assert selected_methods(argparse.Namespace(methods=None)) == list(METHODS)
