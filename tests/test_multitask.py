"""Multi-task head (node mask + soft-mask pooling) on every configuration, and the new losses."""
from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lnm_auto.configurations.networks import build_network
from lnm_auto.networks.multitask import MultiTaskNet
from lnm_auto.networks.soft_mask import soft_mask_expansion
from lnm_auto.networks.wega import WegaNet
from lnm_auto.plans.global_local_topology import WegaTopology
from lnm_auto.plans.multitask_topology import (SOFT_MASK_MARGIN_MM, MultiTaskTopology,
                                               plan_multitask_topology)
from lnm_auto.plans.network_topology import (CPU_BUDGET, GPU_BUDGET, TWO_STREAM_LADDER, TwoStreamTopology,
                                             plan_resenc_axes, resenc_topology_from_rung, slice_group_starts)
from lnm_auto.training.losses import (REGIONAL_MARGIN, dice_bce_loss, head_bce_sum, noisy_or_logit,
                                      regional_affinity_loss)

warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(1)

ROI = (8, 32, 32)
ANISO = (4.0, 0.8, 0.8)
HEAD = MultiTaskTopology(mask_scale="global", decoder_channels=8, soft_mask_width_vox=(1.0, 4.0, 4.0), dropout=0.0)


def node_masks(b: int, roi=ROI, seed: int = 0) -> torch.Tensor:
    """Boxes of varying size and position, one per sample."""
    rng = np.random.default_rng(seed)
    m = torch.zeros(b, 1, *roi)
    for i in range(b):
        r = int(rng.integers(3, 7))
        cy, cx = (int(v) for v in rng.integers(r + 1, roi[1] - r - 1, size=2))
        m[i, :, roi[0] // 2 - 1:roi[0] // 2 + 2, cy - r:cy + r, cx - r:cx + r] = 1
    return m


def inputs_for(b: int, roi=ROI, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m = node_masks(b, roi, seed)
    x = torch.randn(b, 1, *roi, generator=g) + 2.0 * m          # the node is brighter than its surroundings
    return {"image_global": x, "mask_global": m, "image_local": x.clone(), "mask_local": m.clone(),
            "image_context": torch.randn(b, 1, 3, 28, 28, generator=g), "mask_context": torch.zeros(b, 1, 3, 28, 28)}


def resenc_base(roi=ROI):
    strides, kernels = plan_resenc_axes(roi, ANISO)
    return build_network(resenc_topology_from_rung(strides, kernels, 0), 1)


def two_stream_base():
    b, f, g = TWO_STREAM_LADDER[0]
    return build_network(TwoStreamTopology(b, f, g, slice_group_starts(ROI[0])), 1)


def wega_base():
    strides, kernels = plan_resenc_axes(ROI, ANISO)
    topo = WegaTopology("micro", 32, 1, 2, 1.0, 28, (0,), resenc_topology_from_rung(strides, kernels, 0), 2)
    return WegaNet(topo, 1)


BASES = {"3d_resenc": resenc_base, "2d25": two_stream_base, "wega": wega_base}


# ------------------------------------------------------------------------------------------ soft mask

def test_soft_mask_keeps_node_voxels_at_one_and_is_monotone_in_its_width():
    mask = node_masks(2).numpy()[:, 0]
    previous = None
    for width in (1.0, 2.0, 4.0, 8.0):           # in-plane; through-plane a quarter of it
        for kind in ("linear", "exp"):
            w = soft_mask_expansion(mask, (width / 4, width, width), kind)
            assert w.shape == mask.shape and w.dtype == np.float32
            assert np.all(w[mask > 0] == 1.0)
            assert np.all((w >= 0) & (w <= 1))
            assert np.all(w[mask == 0] < 1.0)
        w = soft_mask_expansion(mask, (width / 4, width, width))
        if previous is not None:
            assert np.all(w >= previous) and np.any(w > previous)
        previous = w


def test_soft_mask_values_follow_the_distance_per_axis():
    mask = np.zeros((5, 11, 11))
    mask[2, 5, 5] = 1
    w = soft_mask_expansion(mask, (1.0, 4.0, 2.0))
    assert w[2, 5, 7] == pytest.approx(1 - 2 / 2)        # 2 voxels along x, width 2 -> 0
    assert w[2, 7, 5] == pytest.approx(1 - 2 / 4)        # 2 voxels along y, width 4 -> 0.5
    assert w[3, 5, 5] == pytest.approx(0.0)              # 1 slice away, width 1
    assert w[2, 6, 6] == pytest.approx(1 - math.hypot(1 / 4, 1 / 2))
    e = soft_mask_expansion(mask, 2.0, kind="exp")
    assert e[2, 5, 9] == pytest.approx(math.exp(-2.0))
    assert np.all(soft_mask_expansion(np.zeros((3, 4, 4)), 2.0) == 1.0)   # no node: pool everywhere
    torch_w = soft_mask_expansion(torch.from_numpy(mask)[None, None].float(), (1.0, 4.0, 2.0))
    assert torch_w.shape == (1, 1, 5, 11, 11)
    np.testing.assert_allclose(torch_w[0, 0].numpy(), w)
    with pytest.raises(ValueError, match="width"):
        soft_mask_expansion(mask, 0.0)


def test_mask_attention_pooling_sums_to_one_and_ignores_voxels_beyond_the_expansion():
    net = MultiTaskNet(resenc_base(), HEAD)
    m = node_masks(3)
    weights = net.soft_mask_weights(m)
    features = torch.randn(3, 8, *ROI)
    pooled, alpha = net.attention_pooling(features, weights)
    assert pooled.shape == (3, 8)
    torch.testing.assert_close(alpha.sum(1), torch.ones(3))
    assert torch.all(alpha[weights.flatten(1) == 0] == 0)
    torch.testing.assert_close(pooled, torch.einsum("bn,bwn->bw", alpha, features.flatten(2)))
    # with a zero attention layer the pooling is the soft-mask weighted mean
    torch.nn.init.zeros_(net.attention_logits.weight)
    torch.nn.init.zeros_(net.attention_logits.bias)
    pooled, _ = net.attention_pooling(features, weights)
    expected = (features * weights).sum((2, 3, 4)) / weights.sum((2, 3, 4))
    torch.testing.assert_close(pooled, expected)


# ------------------------------------------------------------------------------------------ networks

@pytest.mark.parametrize("name", sorted(BASES))
def test_multitask_head_on_every_configuration(name):
    torch.manual_seed(0)
    net = MultiTaskNet(BASES[name](), HEAD).eval()
    inputs = inputs_for(2)
    with torch.no_grad():
        out = net(inputs)
    assert out["mask_logits"].shape == (2, 1, *ROI)
    one_d = {k for k, v in out.items() if v.ndim == 1}
    assert {"fused", "base"} <= one_d and all(out[k].shape == (2,) for k in one_d)
    assert one_d == {"fused", "base"} | ({"global", "local"} if name != "3d_resenc" else set())
    # hooks are bound to modules inside the wrapper: a deep copy (the mean teacher) runs on its own
    teacher = copy.deepcopy(net)
    with torch.no_grad():
        torch.testing.assert_close(teacher(inputs)["fused"], out["fused"])
        torch.testing.assert_close(net(inputs)["mask_logits"], out["mask_logits"])


def test_odd_roi_sizes_give_a_mask_of_the_input_size():
    roi = (7, 30, 26)                     # the encoder pads to a multiple of its stride; the decoder crops back
    net = MultiTaskNet(resenc_base(roi), HEAD).eval()
    m = node_masks(2, roi)
    with torch.no_grad():
        out = net({"image_global": torch.randn(2, 1, *roi), "mask_global": m})
    assert out["mask_logits"].shape == (2, 1, *roi)


def test_a_base_fed_the_mask_is_refused():
    strides, kernels = plan_resenc_axes(ROI, ANISO)
    base = build_network(resenc_topology_from_rung(strides, kernels, 0), 2, mask_channel=True)
    with pytest.raises(ValueError, match="mask_channel=False"):
        MultiTaskNet(base, HEAD)


@pytest.mark.slow
def test_a_multitask_network_learns_the_label_and_the_mask():
    """16 nodes, all brighter than their surroundings; positives twice as bright. The mask is a second target."""
    torch.manual_seed(0)
    net = MultiTaskNet(resenc_base(), HEAD)
    inputs = inputs_for(16, seed=1)
    labels = torch.tensor([0.0, 1.0] * 8)
    m = inputs["mask_global"]
    inputs["image_global"] = 0.5 * torch.randn(16, 1, *ROI) + 2.0 * m * (1 + labels[:, None, None, None, None])
    opt = torch.optim.AdamW(net.parameters(), lr=2e-2)
    losses = []
    for _ in range(22):
        out = net(inputs)
        loss = head_bce_sum(out, labels) + dice_bce_loss(out["mask_logits"], m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    net.eval()
    with torch.no_grad():
        out = net(inputs)
    assert bool(((torch.sigmoid(out["fused"]) > 0.5).float() == labels).all())
    pred = (out["mask_logits"] > 0).float()
    dice = 2 * (pred * m).sum() / (pred.sum() + m.sum())
    assert dice > 0.8


# ------------------------------------------------------------------------------------------ planning

def test_multitask_plan_width_from_the_node_margin_and_decoder_from_the_budget():
    cpu = plan_multitask_topology("global", (5.0, 0.8, 0.8), CPU_BUDGET)
    gpu = plan_multitask_topology("global", (5.0, 0.8, 0.8), GPU_BUDGET)
    assert cpu.soft_mask_width_vox == pytest.approx((SOFT_MASK_MARGIN_MM / 5.0, SOFT_MASK_MARGIN_MM / 0.8,
                                                     SOFT_MASK_MARGIN_MM / 0.8))
    assert plan_multitask_topology("global", (20.0, 1.0, 1.0), CPU_BUDGET).soft_mask_width_vox[0] == 1.0
    assert cpu.decoder_channels < gpu.decoder_channels
    assert MultiTaskTopology.from_dict(json.loads(json.dumps(cpu.to_dict()))) == cpu


# ------------------------------------------------------------------------------------------ losses

def test_dice_bce_is_small_for_a_right_mask_and_large_for_a_wrong_one():
    m = node_masks(2)
    right = dice_bce_loss(20.0 * (2 * m - 1), m)
    wrong = dice_bce_loss(-20.0 * (2 * m - 1), m)
    assert right < 1e-3 and wrong > 10.0
    logits = torch.randn_like(m)
    p = torch.sigmoid(logits)
    dice = (2 * (p * m).sum((1, 2, 3, 4)) + 1) / (p.sum((1, 2, 3, 4)) + m.sum((1, 2, 3, 4)) + 1)
    expected = F.binary_cross_entropy_with_logits(logits, m) + (1 - dice).mean()
    torch.testing.assert_close(dice_bce_loss(logits, m), expected)
    with pytest.raises(ValueError, match="differ"):
        dice_bce_loss(logits, m[:, :, :4])


def test_head_bce_sum_skips_the_mask_logits():
    labels = torch.tensor([0.0, 1.0])
    out = {"fused": torch.tensor([0.3, -1.0]), "base": torch.tensor([2.0, 0.5]),
           "mask_logits": torch.zeros(2, 1, 2, 2, 2)}
    expected = (F.binary_cross_entropy_with_logits(out["fused"], labels)
                + F.binary_cross_entropy_with_logits(out["base"], labels))
    torch.testing.assert_close(head_bce_sum(out, labels), expected)


def test_noisy_or_logit_matches_the_probability_formula():
    z = torch.tensor([-1.0, 0.5, 2.0, -3.0])
    idx = torch.tensor([0, 0, 1, 1])
    p = torch.sigmoid(z)
    p_pos = torch.stack([1 - (1 - p[:2]).prod(), 1 - (1 - p[2:]).prod()])
    torch.testing.assert_close(noisy_or_logit(z, idx, 2), torch.log(p_pos / (1 - p_pos)))


def test_regional_loss_is_zero_when_nodes_agree_with_their_regions_and_grows_when_they_do_not():
    k = REGIONAL_MARGIN
    region_labels = torch.tensor([0.0, 1.0, -1.0])      # negative station, positive station, unknown
    region_ids = torch.tensor([0, 0, 1, 1, 1, 2, -1])
    # agreeing: negatives below -kappa; the positive region has one clearly malignant node and two benign ones
    agree = torch.tensor([-k - 0.5, -4.0, k + 1.0, -3.0, -3.0, 5.0, 5.0], requires_grad=True)
    loss = regional_affinity_loss(agree, region_ids, region_labels)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(agree.grad == 0)                    # benign members of a positive region are left alone
    previous = 0.0
    for z0 in (-k + 0.1, 0.0, 1.0, 3.0):                # a node of the negative region turns malignant
        z = agree.detach().clone()
        z[0] = z0
        value = regional_affinity_loss(z, region_ids, region_labels).item()
        assert value > previous
        previous = value
    assert previous == pytest.approx((3.0 + k) / 2 / 2)   # mean over 2 nodes, then over 2 known regions
    previous = 0.0
    for z2 in (k - 0.5, 0.0, -2.0, -5.0):               # the positive region's only malignant node fades
        z = agree.detach().clone()
        z[2] = z2
        value = regional_affinity_loss(z, region_ids, region_labels).item()
        assert value > previous
        previous = value
    # unknown regions and nodes outside any region never count
    z = agree.detach().clone()
    z[5:] = torch.tensor([-9.0, 9.0])
    assert regional_affinity_loss(z, region_ids, region_labels).item() == 0.0


def test_regional_loss_without_known_regions_is_zero_and_keeps_the_graph():
    z = torch.tensor([1.0, -2.0], requires_grad=True)
    loss = regional_affinity_loss(z, torch.tensor([0, -1]), torch.tensor([-1.0]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(z.grad == 0)


def test_running_the_base_alone_leaves_nothing_behind_for_the_next_multitask_pass():
    torch.manual_seed(0)
    net = MultiTaskNet(resenc_base(), HEAD).eval()
    inputs = inputs_for(2)
    with torch.no_grad():
        expected = net(inputs)["mask_logits"]
        net.base(inputs_for(2, seed=5))          # hooks fire outside the wrapper's forward
        torch.testing.assert_close(net(inputs)["mask_logits"], expected)
