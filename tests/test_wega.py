"""Configuration ``wega``: context-crop and topology planning, the network, its FLOP estimate, DINOv2 weights.

Tiny on purpose (2 shared CPU cores): a 32-wide, 2-block ViT and the smallest ResEnc rung.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lnm_auto.networks.wega import TIMM_DINOV2_ARCHITECTURE, WegaNet
from lnm_auto.plans.global_local_topology import (CONTEXT_FOV_FACTOR, CONTEXT_SLICES, MAX_CONTEXT_FOV_MM,
                                                  MIN_CONTEXT_GRID, PATCH_SIZE, VIT_SMALL, VIT_TINY, WEGA_LADDER,
                                                  WegaTopology, estimate_wega_gflops, plan_context_scale,
                                                  plan_wega_topology)
from lnm_auto.plans.network_topology import (CPU_BUDGET, GPU_BUDGET, ComputeBudget, plan_resenc_axes,
                                             resenc_topology_from_rung, slice_group_starts)
from lnm_auto.utils.dataclass_json import from_dict, to_dict
from lnm_auto.utils.errors import LNMError

warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(1)

ANISO = (4.0, 0.8, 0.8)
NODE_ROI = (8, 32, 32)


def micro_topology(context_size: int = 28, context_slices: int = 3, side_heads: bool = True) -> WegaTopology:
    strides, kernels = plan_resenc_axes(NODE_ROI, ANISO)
    return WegaTopology(vit_name="micro", embed_dim=32, depth=2, num_heads=2, layer_scale_init=1.0,
                        context_image_size=context_size, context_slice_group_starts=slice_group_starts(context_slices),
                        local=resenc_topology_from_rung(strides, kernels, 0), fusion_heads=4, side_heads=side_heads,
                        dropout=0.0)


def make_inputs(b: int, context_shape, image_channels: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    node_mask = torch.zeros(b, 1, *NODE_ROI)
    node_mask[:, :, 3:5, 12:20, 12:20] = 1
    ctx_mask = torch.zeros(b, 1, *context_shape)
    cy, cx = context_shape[1] // 2, context_shape[2] // 2
    ctx_mask[:, :, :, cy - 3:cy + 3, cx - 3:cx + 3] = 1
    return {"image_context": torch.randn(b, image_channels, *context_shape, generator=g), "mask_context": ctx_mask,
            "image_global": torch.randn(b, image_channels, *NODE_ROI, generator=g), "mask_global": node_mask}


# ------------------------------------------------------------------------------------------ planning

def test_context_scale_is_a_patch_aligned_multiple_of_the_node_field_and_capped_by_the_budget():
    node_size, node_spacing = (80.0, 51.2, 51.2), (5.0, 0.8, 0.8)
    cpu, note = plan_context_scale(node_size, node_spacing, CPU_BUDGET)
    gpu, _ = plan_context_scale(node_size, node_spacing, GPU_BUDGET)
    for scale in (cpu, gpu):
        assert scale.name == "context"
        s, r, c = scale.roi_shape
        assert s == CONTEXT_SLICES and r == c and r % PATCH_SIZE == 0
        assert scale.spacing_mm[0] == 5.0
        assert scale.roi_size_mm[1] == pytest.approx(CONTEXT_FOV_FACTOR * 51.2)
        assert scale.spacing_mm[1] >= 0.8                              # never finer than the node ROI
        assert scale.cache_shape[0] == s and scale.cache_shape[1] >= r
    assert cpu.roi_shape[1] == 9 * PATCH_SIZE and gpu.roi_shape[1] == 16 * PATCH_SIZE   # budget caps: 126 / 224 px
    assert "204.8 mm" in note
    # a small node field: the grid stops where pixels would get finer than the node ROI's (4 x 24 mm / 0.8 mm)
    small, _ = plan_context_scale((9.0, 24.0, 24.0), (3.0, 0.8, 0.8), GPU_BUDGET)
    assert small.roi_shape[1] == PATCH_SIZE * math.floor(96 / (PATCH_SIZE * 0.8))
    tiny_field, _ = plan_context_scale((9.0, 4.0, 4.0), (3.0, 0.8, 0.8), GPU_BUDGET)
    assert tiny_field.roi_shape[1] == MIN_CONTEXT_GRID * PATCH_SIZE
    huge, _ = plan_context_scale((9.0, 200.0, 200.0), (3.0, 0.8, 0.8), GPU_BUDGET)
    assert huge.roi_size_mm[1] == pytest.approx(MAX_CONTEXT_FOV_MM)


def test_tiny_vit_under_the_cpu_budget_and_dinov2_vit_s14_under_the_gpu_budget():
    cpu = plan_wega_topology((3, 126, 126), (16, 64, 64), (5.0, 0.8, 0.8), CPU_BUDGET)
    gpu = plan_wega_topology((3, 224, 224), (16, 64, 64), (5.0, 0.8, 0.8), GPU_BUDGET)
    assert (cpu.vit_name, cpu.embed_dim, cpu.depth) == ("tiny", VIT_TINY.embed_dim, VIT_TINY.depth)
    assert (gpu.embed_dim, gpu.depth, gpu.num_heads, gpu.layer_scale_init) == (384, 12, 6, 1e-5)   # ViT-S/14
    assert estimate_wega_gflops(cpu, (3, 126, 126), (16, 64, 64), 2, True) <= CPU_BUDGET.max_gflops_per_sample
    assert gpu.local.features_per_stage[-1] == 320                       # nnU-Net's ResEnc on the GPU
    assert cpu.context_slice_group_starts == (0,) and cpu.context_image_size == 126


def test_a_bigger_budget_never_gives_a_smaller_wega_network():
    previous = None
    for gflops in (0.01, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 100.0, 400.0, 2000.0):
        topo = plan_wega_topology((3, 126, 126), (16, 64, 64), (5.0, 0.8, 0.8), ComputeBudget("b", gflops))
        size = (topo.embed_dim, topo.depth, topo.local.features_per_stage, topo.local.n_blocks_per_stage)
        if previous is not None:
            assert all(a >= b for a, b in zip(size[:2], previous[:2]))
            assert all(a >= b for a, b in zip(size[2] + size[3], previous[2] + previous[3]))
        previous = size
    assert [v for v, _ in WEGA_LADDER][-1] == VIT_SMALL


def test_topology_round_trips_through_json_both_ways():
    topo = plan_wega_topology((3, 126, 126), (16, 64, 64), (5.0, 0.8, 0.8), CPU_BUDGET)
    text = json.dumps(topo.to_dict())
    assert WegaTopology.from_dict(json.loads(text)) == topo
    assert from_dict(WegaTopology, json.loads(json.dumps(to_dict(topo)))) == topo     # the plans' converter
    assert WegaTopology.config_name == "wega" and topo.scales == ("context", "global")
    with pytest.raises(ValueError, match="multiple of the patch size"):
        dataclasses.replace(topo, context_image_size=100)


# ------------------------------------------------------------------------------------------ network

@pytest.mark.parametrize("context_shape,channels,mask", [((3, 28, 28), 1, True), ((3, 42, 42), 1, True),
                                                          ((5, 56, 28), 2, True), ((1, 70, 70), 1, False)])
def test_cross_attention_shapes_and_weights_for_several_context_sizes(context_shape, channels, mask):
    torch.manual_seed(0)
    net = WegaNet(micro_topology(28, context_shape[0]), channels + int(mask), mask_channel=mask).eval()
    inputs = make_inputs(3, context_shape, channels)
    with torch.no_grad():
        feats = net.forward_features(inputs)
        out = net(inputs)
    n_images = len(slice_group_starts(context_shape[0])) * channels
    n_global = n_images * ((context_shape[1] // PATCH_SIZE) * (context_shape[2] // PATCH_SIZE) + 1)
    n_local = math.prod(n // t for n, t in zip(NODE_ROI, net.topology.local.total_stride))
    assert feats["attention"].shape == (3, n_local, n_global)
    assert torch.all(feats["attention"] >= 0)
    torch.testing.assert_close(feats["attention"].sum(-1), torch.ones(3, n_local))
    assert feats["node"].shape == (3, 32)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"fused": (3,), "global": (3,), "local": (3,)}


def test_the_context_mask_marks_the_node_tokens():
    torch.manual_seed(0)
    net = WegaNet(micro_topology(28), 2, mask_channel=True).eval()
    inputs = make_inputs(2, (3, 28, 28))
    moved = dict(inputs, mask_context=torch.roll(inputs["mask_context"], shifts=10, dims=-1))
    with torch.no_grad():
        assert not torch.allclose(net(inputs)["fused"], net(moved)["fused"])
    with pytest.raises(ValueError, match="mask_context"):
        net({k: v for k, v in inputs.items() if k != "mask_context"})


def _count_flops(net, inputs) -> float:
    for m in net.modules():        # timm's fused SDPA is not counted by FlopCounterMode on CPU: use the matmul path
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(inputs)
    return counter.get_total_flops() / next(iter(inputs.values())).shape[0] / 1e9


@pytest.mark.parametrize("context_shape,channels,mask,side_heads", [((3, 28, 28), 1, True, True),
                                                                     ((5, 42, 56), 2, True, True),
                                                                     ((3, 56, 56), 1, False, False)])
def test_flop_estimate_matches_flop_counter(context_shape, channels, mask, side_heads):
    topo = micro_topology(context_shape[1], context_shape[0], side_heads)
    net = WegaNet(topo, channels + int(mask), mask_channel=mask).eval()
    counted = _count_flops(net, make_inputs(2, context_shape, channels))
    estimated = estimate_wega_gflops(topo, context_shape, NODE_ROI, channels + int(mask), mask)
    assert estimated == pytest.approx(counted, rel=0.10)


def test_flop_estimate_of_the_planned_cpu_network():
    topo = plan_wega_topology((3, 56, 56), NODE_ROI, ANISO, ComputeBudget("small", 0.3))
    assert topo.vit_name == "tiny"
    net = WegaNet(topo, 2, mask_channel=True).eval()
    counted = _count_flops(net, make_inputs(1, (3, 56, 56)))
    assert estimate_wega_gflops(topo, (3, 56, 56), NODE_ROI, 2, True) == pytest.approx(counted, rel=0.10)


# ------------------------------------------------------------------------------------------ DINOv2 weights

def test_dinov2_state_dict_loads_into_the_global_branch_with_a_report(tmp_path):
    torch.manual_seed(0)
    net = WegaNet(micro_topology(28), 2, mask_channel=True)
    # a DINOv2-style file from another crop size (3 x 3 grid instead of 2 x 2), with a DDP prefix and
    # DINOv2's mask token, which the ViT does not have
    vit = timm.create_model(TIMM_DINOV2_ARCHITECTURE, pretrained=False, num_classes=0, img_size=42, embed_dim=32,
                            depth=2, num_heads=2, init_values=1e-5)
    state = {f"module.{k}": v for k, v in vit.state_dict().items()}
    state["module.mask_token"] = torch.zeros(1, 32)
    path = tmp_path / "dinov2_micro.pth"
    torch.save({"model": state}, path)

    report = net.load_global_weights(path)
    assert report["source_prefix"] == "module."
    assert report["missing"] == [] and report["shape_mismatch"] == []
    assert report["unexpected"] == ["module.mask_token"]
    assert set(report["matched"]) == set(net.global_vit.state_dict())
    assert report["resampled"] == ["pos_embed: (1, 10, 32) -> (1, 5, 32)"]
    torch.testing.assert_close(net.global_vit.blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
    torch.testing.assert_close(net.global_vit.blocks[0].ls1.gamma, vit.blocks[0].ls1.gamma)
    # the cls position is kept, the 3 x 3 grid interpolated to 2 x 2 (bicubic, as timm resamples)
    torch.testing.assert_close(net.global_vit.pos_embed[:, 0], vit.pos_embed[:, 0])
    grid = vit.pos_embed[:, 1:].reshape(1, 3, 3, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(2, 2), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(net.global_vit.pos_embed[0, 1:].reshape(2, 2, 32), expected[0].permute(1, 2, 0))


def test_a_wrong_sized_vit_file_is_reported_and_an_unrelated_file_is_refused(tmp_path):
    net = WegaNet(micro_topology(28), 2, mask_channel=True)
    wider = timm.create_model(TIMM_DINOV2_ARCHITECTURE, pretrained=False, num_classes=0, img_size=28, embed_dim=64,
                              depth=1, num_heads=2)
    path = tmp_path / "wider.pth"
    torch.save(wider.state_dict(), path)
    with pytest.raises(LNMError, match="none by shape"):
        net.load_global_weights(path)
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, other)
    with pytest.raises(LNMError, match="match the network"):
        net.load_global_weights(other)


# ------------------------------------------------------------------------------------------ learning

@pytest.mark.slow
def test_a_tiny_wega_net_learns_a_label_only_its_context_shows():
    """16 nodes with the same node ROI; positives have a bright square far from the node in the context."""
    torch.manual_seed(0)
    net = WegaNet(micro_topology(28), 2, mask_channel=True)
    inputs = make_inputs(16, (3, 28, 28))
    inputs["image_global"] = inputs["image_global"][:1].expand(16, -1, -1, -1, -1).contiguous()
    labels = torch.tensor([0.0, 1.0] * 8)
    inputs["image_context"][labels == 1, :, :, :8, :8] += 3.0
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        out = net(inputs)
        loss = F.binary_cross_entropy_with_logits(out["fused"], labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    with torch.no_grad():
        p = torch.sigmoid(net.eval()(inputs)["fused"])
    assert bool(((p > 0.5).float() == labels).all())
