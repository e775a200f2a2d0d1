"""Networks (2d25, 3d_resenc), their topology planning and pretrained-weight loading.

Small on purpose (2 shared CPU cores): the smallest ladder rungs, in-plane ROIs of 32.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lnm_auto.configurations.networks import build_network
from lnm_auto.networks import count_parameters, load_pretrained_weights
from lnm_auto.plans.network_topology import (BACKBONES, CPU_BUDGET, GPU_BUDGET,
                                             TWO_STREAM_LADDER, ComputeBudget, ResEncTopology,
                                             TwoStreamTopology, estimate_resenc_gflops,
                                             estimate_two_stream_gflops, plan_resenc_axes,
                                             plan_resenc_topology, plan_two_stream_topology,
                                             resenc_topology_from_rung, slice_group_starts,
                                             topology_from_dict)
from lnm_auto.utils.errors import LNMError

warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(2)

ANISO = (5.0, 0.8, 0.8)


def tiny_two_stream(z: int, local_z: int | None = None) -> TwoStreamTopology:
    b, f, g = TWO_STREAM_LADDER[0]
    local = None if local_z is None or local_z == z else slice_group_starts(local_z)
    return TwoStreamTopology(b, f, g, slice_group_starts(z), dropout=0.2, local_slice_group_starts=local)


def tiny_resenc(roi, spacing=ANISO) -> ResEncTopology:
    strides, kernels = plan_resenc_axes(roi, spacing)
    return resenc_topology_from_rung(strides, kernels, 0)


def make_batch(b, c, roi, local_roi=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    local_roi = roi if local_roi is None else local_roi
    return {"image_global": torch.randn(b, c, *roi, generator=g), "image_local": torch.randn(b, c, *local_roi, generator=g)}


# ----------------------------------------------------------------------------------------- slices

@pytest.mark.parametrize("n", range(1, 61))
def test_slice_group_starts_cover_every_slice_and_stay_in_range(n):
    starts = slice_group_starts(n)
    assert starts[0] == 0
    assert list(starts) == sorted(set(starts))
    if n < 3:
        assert starts == (0,)
        return
    assert len(starts) == math.ceil(n / 3)
    assert starts[-1] == n - 3
    assert all(0 <= s <= n - 3 for s in starts)
    covered = {s + i for s in starts for i in range(3)}
    assert covered == set(range(n))


def test_slice_group_starts_values():
    assert slice_group_starts(16) == (0, 3, 5, 8, 10, 13)  # round(linspace(0, 13, 6)), half up
    assert slice_group_starts(5) == (0, 2)
    assert slice_group_starts(7) == (0, 2, 4)
    assert slice_group_starts(9) == (0, 3, 6)
    assert slice_group_starts(3) == (0,)
    with pytest.raises(ValueError):
        slice_group_starts(0)


# --------------------------------------------------------------------------------------- planning

def test_anisotropic_roi_does_not_pool_z_first():
    strides, kernels = plan_resenc_axes((16, 64, 64), ANISO)
    assert strides[0] == (1, 1, 1)
    assert strides[1] == (1, 2, 2) and strides[2] == (1, 2, 2)
    assert kernels[0] == (1, 3, 3) and kernels[1] == (1, 3, 3)
    assert strides[3] == (2, 2, 2)  # z spacing 5 vs in-plane 3.2 after two pools: within 2x
    # every axis stays >= 4 voxels
    size = [16, 64, 64]
    for s in strides:
        size = [math.ceil(n / k) for n, k in zip(size, s)]
    assert min(size) >= 4 and size == [4, 4, 4]


def test_isotropic_and_tiny_rois():
    strides, kernels = plan_resenc_axes((64, 64, 64), None)
    assert strides == ((1, 1, 1),) + ((2, 2, 2),) * 4
    assert all(k == (3, 3, 3) for k in kernels)
    strides, kernels = plan_resenc_axes((3, 32, 32), ANISO)
    assert all(s[0] == 1 for s in strides) and len(strides) == 4
    topo = plan_resenc_topology((3, 32, 32), ANISO, CPU_BUDGET)
    net = build_network(topo, 1).eval()
    assert net({"image_global": torch.randn(2, 1, 3, 32, 32)})["fused"].shape == (2,)
    t2 = plan_two_stream_topology((3, 32, 32), (3, 32, 32), CPU_BUDGET)
    assert t2.slice_group_starts == (0,)


ROIS = [((16, 64, 64), ANISO), ((3, 32, 32), ANISO), ((64, 64, 64), (1.0, 1.0, 1.0)),
        ((7, 48, 40), (2.5, 0.7, 0.7)), ((32, 128, 128), ANISO)]
BUDGETS = [0.01, 0.1, 0.3, 1.0, 2.0, 5.0, 20.0, 60.0, 150.0, 400.0, 1e4]


@pytest.mark.parametrize("roi,spacing", ROIS)
def test_bigger_budget_never_gives_smaller_network(roi, spacing):
    prev_r = prev_t = None
    for gf in BUDGETS:
        budget = ComputeBudget("b", gf)
        r = plan_resenc_topology(roi, spacing, budget)
        t = plan_two_stream_topology(roi, roi, budget)
        if prev_r is not None:
            assert all(a >= b for a, b in zip(r.features_per_stage, prev_r.features_per_stage))
            assert all(a >= b for a, b in zip(r.n_blocks_per_stage, prev_r.n_blocks_per_stage))
            rung = [x[0] for x in TWO_STREAM_LADDER].index
            assert rung(t.backbone) >= rung(prev_t.backbone)
            assert t.fpn_channels >= prev_t.fpn_channels and t.fused_channels >= prev_t.fused_channels
        assert r.strides == plan_resenc_axes(roi, spacing)[0]  # the budget sizes width/depth only
        prev_r, prev_t = r, t


def test_presets_at_paper_roi():
    gpu = plan_resenc_topology((16, 64, 64), ANISO, GPU_BUDGET)
    assert gpu.features_per_stage == (32, 64, 128, 256, 320)        # nnU-Net: min(32 * 2^i, 320)
    assert gpu.n_blocks_per_stage == (1, 3, 4, 6, 6)                 # (1, 3, 4, 6, 6, 6) truncated
    cpu = plan_resenc_topology((16, 64, 64), ANISO, CPU_BUDGET)
    assert estimate_resenc_gflops(cpu, (16, 64, 64)) <= CPU_BUDGET.max_gflops_per_sample
    assert cpu.features_per_stage[0] < gpu.features_per_stage[0]
    assert plan_two_stream_topology((16, 64, 64), None, GPU_BUDGET).backbone == "mobilenetv3_large_100"
    # the paper's network is cheap enough for 2 CPU cores at its own ROI, not at a larger one
    assert plan_two_stream_topology((16, 64, 64), None, "cpu").backbone == "mobilenetv3_large_100"
    assert plan_two_stream_topology((16, 96, 96), None, "cpu").backbone == "mobilenetv3_small_100"


def test_topologies_round_trip_through_json():
    topos = [plan_resenc_topology((16, 64, 64), ANISO, CPU_BUDGET),
             plan_two_stream_topology((16, 64, 64), (8, 64, 64), GPU_BUDGET)]
    for topo in topos:
        d = json.loads(json.dumps(dataclasses.asdict(topo)))
        assert type(topo).from_dict(d) == topo
        assert topology_from_dict(topo.config_name, d) == topo
    assert ComputeBudget.from_dict(json.loads(json.dumps(CPU_BUDGET.to_dict()))) == CPU_BUDGET
    assert topos[1].local_starts == slice_group_starts(8)


def test_backbone_table_matches_timm():
    import timm
    for spec in BACKBONES:
        m = timm.create_model(spec.name, pretrained=False, features_only=True, in_chans=3, out_indices=(-3, -2, -1))
        assert tuple(m.feature_info.channels()) == spec.feature_channels
        assert tuple(m.feature_info.reduction()) == (8, 16, 32)
        assert m.conv_stem.out_channels == spec.stem_channels
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            m.eval()(torch.randn(1, 3, 33, 47))
        assert spec.flops(33, 47) == pytest.approx(fc.get_total_flops(), rel=0.02)


def count_flops(net, batch) -> float:
    with FlopCounterMode(display=False) as fc:
        net(batch)
    return fc.get_total_flops() / 1e9


@pytest.mark.parametrize("roi,spacing,rung,c", [((7, 33, 31), (2.5, 0.7, 0.7), 0, 2), ((16, 32, 32), ANISO, 2, 1)])
def test_resenc_flop_estimate_matches_flop_counter(roi, spacing, rung, c):
    strides, kernels = plan_resenc_axes(roi, spacing)
    topo = resenc_topology_from_rung(strides, kernels, rung)
    net = build_network(topo, c).eval()
    measured = count_flops(net, {"image_global": torch.randn(2, c, *roi)}) / 2
    est = estimate_resenc_gflops(topo, roi, c)
    assert est == pytest.approx(measured, rel=0.05)  # exact: same conv arithmetic


@pytest.mark.parametrize("roi,local_roi,c", [((7, 32, 32), (5, 48, 48), 2), ((2, 17, 23), (16, 33, 31), 1)])
def test_two_stream_flop_estimate_matches_flop_counter(roi, local_roi, c):
    topo = tiny_two_stream(roi[0], local_z=local_roi[0])
    net = build_network(topo, c).eval()
    measured = count_flops(net, make_batch(2, c, roi, local_roi)) / 2
    est = estimate_two_stream_gflops(topo, roi, local_roi, in_channels=c)
    assert est == pytest.approx(measured, rel=0.05)  # exact with timm 1.0.22


# ---------------------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("z,b,c", [(5, 1, 1), (7, 3, 2), (16, 3, 1), (2, 2, 1), (1, 1, 2)])
def test_two_stream_outputs_are_b(z, b, c):
    net = build_network(tiny_two_stream(z), c).eval()
    with torch.no_grad():
        out = net(make_batch(b, c, (z, 32, 32)))
    assert set(out) == {"fused", "global", "local"}
    for v in out.values():
        assert v.shape == (b,) and torch.isfinite(v).all()


def test_two_stream_local_roi_with_other_slice_count_and_size():
    net = build_network(tiny_two_stream(7, local_z=4), 1).eval()
    with torch.no_grad():
        out = net(make_batch(1, 1, (7, 32, 32), (4, 48, 48)))
    assert all(v.shape == (1,) for v in out.values())
    with pytest.raises(ValueError, match="slices"):
        net(make_batch(1, 1, (9, 32, 32), (4, 48, 48)))


@pytest.mark.parametrize("roi,spacing,b,c", [((16, 32, 32), ANISO, 1, 1), ((5, 33, 30), ANISO, 3, 2),
                                             ((12, 24, 20), (1.0, 1.0, 1.0), 3, 1)])
def test_resenc_outputs_are_b(roi, spacing, b, c):
    net = build_network(tiny_resenc(roi, spacing), c)
    for mode in (net.eval, net.train):
        mode()
        out = net({"image_global": torch.randn(b, c, *roi)})
        assert set(out) == {"fused"} and out["fused"].shape == (b,)


def test_build_network_rejects_unknown_topology():
    with pytest.raises(TypeError):
        build_network(object(), 1)


# -------------------------------------------------------------------------------------- backward

def _bce_all(out, y):
    return sum(torch.nn.functional.binary_cross_entropy_with_logits(v, y) for v in out.values())


def test_two_stream_backward_reaches_all_heads():
    net = build_network(tiny_two_stream(5), 1).train()
    out = net(make_batch(2, 1, (5, 32, 32)))
    _bce_all(out, torch.tensor([0.0, 1.0])).backward()
    for name in ("fused_head", "global_head", "local_head", "stream_fusion", "global_stream.slice_fusion",
                 "local_stream.scale_fusion", "global_stream.fpn", "local_stream.backbone"):
        params = [p for n, p in net.named_parameters() if n.startswith(name + ".")]
        assert params, name
        assert all(p.grad is not None for p in params), name
        assert any(p.grad.abs().sum() > 0 for p in params), name


def test_resenc_backward_and_encoder_attribute():
    net = build_network(tiny_resenc((8, 32, 32)), 1).train()
    out = net({"image_global": torch.randn(2, 1, 8, 32, 32)})
    _bce_all(out, torch.tensor([0.0, 1.0])).backward()
    assert all(p.grad is not None for p in net.parameters())
    assert net.head.weight.grad.abs().sum() > 0
    assert net.encoder.stem.convs[0].conv.weight.grad.abs().sum() > 0
    assert count_parameters(net.encoder) < count_parameters(net)


# ------------------------------------------------------------------------------------ pretrained

def _perturb(net):
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))


def test_pretrained_encoder_round_trip(tmp_path):
    topo = tiny_resenc((8, 32, 32))
    trained = build_network(topo, 1)
    _perturb(trained)
    path = tmp_path / "encoder.pth"
    torch.save(trained.encoder.state_dict(), path)
    fresh = build_network(topo, 1)
    report = load_pretrained_weights(fresh, path)
    n_enc = len(trained.encoder.state_dict())
    assert len(report["matched"]) == n_enc and all(k.startswith("encoder.") for k in report["matched"])
    assert report["unexpected"] == [] and report["shape_mismatch"] == []
    assert set(report["missing"]) == {"head.weight", "head.bias"}
    for k, v in trained.encoder.state_dict().items():
        assert torch.equal(fresh.encoder.state_dict()[k], v)
    assert not torch.equal(fresh.head.weight, trained.head.weight)

    # a trainer checkpoint of a DDP-wrapped network: {"network_weights": {"module.…": …}}
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"network_weights": {"module." + k: v for k, v in trained.state_dict().items()}, "epoch": 3}, ckpt)
    fresh2 = build_network(topo, 1)
    report = load_pretrained_weights(fresh2, ckpt)
    assert report["missing"] == [] and len(report["matched"]) == len(trained.state_dict())
    assert torch.equal(fresh2.head.weight, trained.head.weight)

    # other input channels: the stem does not fit, the rest does
    report = load_pretrained_weights(build_network(topo, 2), path)
    # (DNA registers the stem conv twice: .conv and .all_modules.0)
    assert {m.split(":")[0] for m in report["shape_mismatch"]} == {"encoder.stem.convs.0.conv.weight",
                                                                   "encoder.stem.convs.0.all_modules.0.weight"}


def test_pretrained_backbone_goes_into_both_streams_or_the_hinted_one(tmp_path):
    topo = tiny_two_stream(5)
    src = build_network(topo, 1)
    _perturb(src)
    path = tmp_path / "mobilenet.pth"
    torch.save({"state_dict": src.global_stream.backbone.state_dict()}, path)
    net = build_network(topo, 1)
    report = load_pretrained_weights(net, path)
    assert sorted(report["target_prefixes"]) == ["global_stream.backbone.", "local_stream.backbone."]
    w = src.global_stream.backbone.conv_stem.weight
    assert torch.equal(net.global_stream.backbone.conv_stem.weight, w)
    assert torch.equal(net.local_stream.backbone.conv_stem.weight, w)
    net = build_network(topo, 1)
    report = load_pretrained_weights(net, path, prefix_hint="global_stream.backbone")
    assert report["target_prefixes"] == ["global_stream.backbone."]
    assert not torch.equal(net.local_stream.backbone.conv_stem.weight, w)


def test_pretrained_errors_are_one_line_lnm_errors(tmp_path):
    net = build_network(tiny_resenc((8, 32, 32)), 1)
    missing = tmp_path / "nope.pth"
    with pytest.raises(LNMError, match="nope.pth"):
        load_pretrained_weights(net, missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(LNMError, match="garbage.pth") as e:
        load_pretrained_weights(net, garbage)
    assert "\n" not in str(e.value)
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"foo.bar": torch.zeros(3), "baz": torch.ones(1)}, unrelated)
    with pytest.raises(LNMError, match="unrelated.pth") as e:
        load_pretrained_weights(net, unrelated)
    assert "\n" not in str(e.value)
