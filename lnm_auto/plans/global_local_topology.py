"""Configuration ``wega``: the global-local topology (WeGA), its FLOP estimate and the context crop.

Pure arithmetic, no torch (like ``network_topology``). The network is
:class:`lnm_auto.networks.wega.WegaNet`; documentation/wega_multitask.md explains the rules.

- Global branch: a ViT with the DINOv2 architecture (patch 14, LayerScale, cls token) over a large
  in-plane *context* crop around the node, its slices fed as 3-channel images (3 consecutive slices
  of one image channel, exactly as RGB for DINOv2's patch embedding).
- Local branch: the ``3d_resenc`` residual encoder on the node ROI (scale ``"global"``).
- Fusion: one cross-attention block in which local tokens query the global tokens.

"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

from lnm_auto.plans.compute_budget import ComputeBudget, _check_shape, get_budget
from lnm_auto.plans.crop_scale import CropScale, cache_shape_for
from lnm_auto.plans.resenc_topology import (ResEncTopology, estimate_resenc_gflops, plan_resenc_axes,
                                            resenc_topology_from_rung)
from lnm_auto.plans.two_stream_topology import slice_group_starts

PATCH_SIZE = 14                 # DINOv2's patch; the context image side is a multiple of it


@dataclass(frozen=True)
class VitSpec:
    """One ViT size: ``timm.create_model('vit_small_patch14_dinov2', embed_dim=..., depth=..., num_heads=...)``.

    ``layer_scale_init``: DINOv2 initialises LayerScale at 1e-5; a ViT trained from scratch on a
    CPU learns faster with 1.0 (same architecture and keys, only the initial value differs).
    """

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    layer_scale_init: float


VIT_TINY = VitSpec("tiny", 192, 6, 3, 1.0)          # CPU: ~0.4 GFLOPs on a 126 x 126 context image
VIT_SMALL = VitSpec("small", 384, 12, 6, 1e-5)      # DINOv2 ViT-S/14: user-supplied weights load as is
VIT_SPECS = {v.name: v for v in (VIT_TINY, VIT_SMALL)}
MLP_RATIO = 4

# (ViT, ResEnc rung of network_topology.RESENC_LADDER), smallest first; both fields non-decreasing,
# so a bigger budget never gives a smaller network in either branch.
WEGA_LADDER: tuple[tuple[VitSpec, int], ...] = (
    (VIT_TINY, 0), (VIT_TINY, 1), (VIT_TINY, 2),
    (VIT_SMALL, 2), (VIT_SMALL, 3), (VIT_SMALL, 4), (VIT_SMALL, 5), (VIT_SMALL, 6),
)

# Context crop: CONTEXT_FOV_FACTOR x the node ROI's in-plane field of view (the node ROI is itself
# 2 x the 95th-percentile node extent), capped at MAX_CONTEXT_FOV_MM (about a body's width), over
# CONTEXT_SLICES slices at the node ROI's slice spacing (one 3-slice image per image channel).
CONTEXT_FOV_FACTOR = 4.0
MAX_CONTEXT_FOV_MM = 320.0
CONTEXT_SLICES = 3
# Token grid (side, in patches): at least MIN_CONTEXT_GRID; at most MAX_CONTEXT_GRID (224 px, DINOv2's
# training crop) and at most what the smallest ViT can afford with CONTEXT_BUDGET_SHARE of the budget
# (CPU budget 2.0 -> 9 patches = 126 px; GPU -> 16 = 224 px). Never finer than the node ROI's pixels.
MIN_CONTEXT_GRID = 4
MAX_CONTEXT_GRID = 16
CONTEXT_BUDGET_SHARE = 0.25


@dataclass(frozen=True)
class WegaTopology:
    """Configuration ``wega``: ViT global branch + ResEnc local branch + cross-attention fusion.

    ``context_image_size``: side (px, multiple of 14) of the context crop's in-plane grid.
    ``context_slice_group_starts``: groups of 3 consecutive context slices (as ``2d25``); each group
    and each image channel is one 3-channel ViT image. ``local``: the ``3d_resenc`` encoder of the
    node ROI. ``fusion_heads``: heads of the cross-attention (embed dim = the ViT's). Whether the
    node mask is fed is the configuration plan's ``use_mask_channel`` (the network's ``mask_channel``).
    """

    vit_name: str
    embed_dim: int
    depth: int
    num_heads: int
    layer_scale_init: float
    context_image_size: int
    context_slice_group_starts: tuple[int, ...]
    local: ResEncTopology
    fusion_heads: int
    context_scale: str = "context"
    node_scale: str = "global"
    side_heads: bool = True
    dropout: float = 0.2

    config_name = "wega"

    def __post_init__(self):
        if self.embed_dim % self.num_heads or self.embed_dim % self.fusion_heads:
            raise ValueError(f"WegaTopology: embed_dim {self.embed_dim} must be divisible by num_heads "
                             f"{self.num_heads} and fusion_heads {self.fusion_heads}")
        if self.context_image_size < PATCH_SIZE or self.context_image_size % PATCH_SIZE:
            raise ValueError(f"WegaTopology: context_image_size {self.context_image_size} must be a positive "
                             f"multiple of the patch size {PATCH_SIZE}")

    @property
    def scales(self) -> tuple[str, str]:
        """Crop scales the network consumes, in input order."""
        return (self.context_scale, self.node_scale)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the plans' form)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WegaTopology":
        """Inverse of :meth:`to_dict`."""
        return cls(vit_name=str(d["vit_name"]), embed_dim=int(d["embed_dim"]), depth=int(d["depth"]),
                   num_heads=int(d["num_heads"]), layer_scale_init=float(d["layer_scale_init"]),
                   context_image_size=int(d["context_image_size"]),
                   context_slice_group_starts=tuple(int(i) for i in d["context_slice_group_starts"]),
                   local=ResEncTopology.from_dict(d["local"]), fusion_heads=int(d["fusion_heads"]),
                   context_scale=str(d.get("context_scale", "context")), node_scale=str(d.get("node_scale", "global")),
                   side_heads=bool(d.get("side_heads", True)),
                   dropout=float(d.get("dropout", 0.2)))


# --------------------------------------------------------------------------------------------------
# FLOPs (counted like torch.utils.flop_counter.FlopCounterMode: 2 per multiply-add, convs and
# matmuls incl. attention, no bias / norm / softmax / activation)
# --------------------------------------------------------------------------------------------------


def estimate_vit_gflops(embed_dim: int, depth: int, grid_y: int, grid_x: int, n_images: int = 1) -> float:
    """Forward GFLOPs of ``n_images`` ViT images of ``grid_y x grid_x`` patches (+ the cls token)."""
    d, n = embed_dim, grid_y * grid_x + 1
    patch = 2 * 3 * PATCH_SIZE * PATCH_SIZE * d * grid_y * grid_x
    per_block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * MLP_RATIO * d
    return n_images * (patch + depth * per_block) / 1e9


def _resenc_bottleneck_tokens(topology: ResEncTopology, roi_shape_zyx: Sequence[int]) -> int:
    """Voxels of the ResEnc bottleneck (the input is padded to a multiple of the total stride)."""
    return math.prod(-(-n // t) for n, t in zip(roi_shape_zyx, topology.total_stride))


def estimate_wega_gflops(topology: WegaTopology, context_roi_shape_zyx: Sequence[int],
                         local_roi_shape_zyx: Sequence[int], in_channels: int = 1, mask_channel: bool = False) -> float:
    """Forward GFLOPs per sample of :class:`lnm_auto.networks.wega.WegaNet`.

    ``in_channels``, ``mask_channel``: as the network's constructor gets them (image channels + 1 with
    the mask); the ViT sees one image per slice group and image channel.
    ViT (one image per slice group and image channel) + ResEnc + token projection + cross-attention
    block (q/k/v/out projections, attention, MLP) + heads.
    """
    ctx = _check_shape("context_roi_shape_zyx", context_roi_shape_zyx)
    loc = _check_shape("local_roi_shape_zyx", local_roi_shape_zyx)
    image_channels = int(in_channels) - int(mask_channel)
    if image_channels < 1:
        raise ValueError(f"wega needs at least one image channel, got in_channels={in_channels}")
    d = topology.embed_dim
    gy, gx = ctx[1] // PATCH_SIZE, ctx[2] // PATCH_SIZE
    n_images = len(topology.context_slice_group_starts) * image_channels
    flops = estimate_vit_gflops(d, topology.depth, gy, gx, n_images) * 1e9
    flops += estimate_resenc_gflops(topology.local, loc, in_channels) * 1e9   # includes the local side head
    n_local = _resenc_bottleneck_tokens(topology.local, loc)
    n_global = n_images * (gy * gx + 1)
    f_last = topology.local.features_per_stage[-1]
    flops += 2 * n_local * f_last * d                                    # local token projection
    flops += 2 * n_local * d * d + 2 * 2 * n_global * d * d              # q, k, v projections
    flops += 2 * 2 * n_local * n_global * d + 2 * n_local * d * d        # attention + output projection
    flops += 2 * 2 * n_local * d * MLP_RATIO * d                         # MLP of the fusion block
    flops += 2 * 2 * d * d + 2 * d + 2 * d                               # fusion layer, fused + global heads
    if not topology.side_heads:
        flops -= 2 * d + 2 * f_last
    return flops / 1e9


# --------------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------------


def context_grid_cap(budget: "ComputeBudget | str", image_channels: int = 1) -> int:
    """Largest token grid side the smallest ViT affords with CONTEXT_BUDGET_SHARE of the budget."""
    budget = get_budget(budget)
    allowed = CONTEXT_BUDGET_SHARE * budget.max_gflops_per_sample
    grid = MIN_CONTEXT_GRID
    for g in range(MIN_CONTEXT_GRID, MAX_CONTEXT_GRID + 1):
        if estimate_vit_gflops(VIT_TINY.embed_dim, VIT_TINY.depth, g, g, image_channels) <= allowed:
            grid = g
    return grid


def plan_context_scale(node_roi_size_mm: Sequence[float], node_spacing_mm: Sequence[float],
                       budget: "ComputeBudget | str", image_channels: int = 1):
    """The ``"context"`` CropScale: CONTEXT_FOV_FACTOR x the node ROI's in-plane field of view (capped
    at MAX_CONTEXT_FOV_MM), CONTEXT_SLICES slices at the node ROI's slice spacing, a square grid of
    14 * g pixels, g = min(budget cap, the most patches that keep pixels no finer than the node ROI's),
    at least MIN_CONTEXT_GRID. Returns ``(CropScale, note)``.
    """
    size_mm = [float(s) for s in node_roi_size_mm]
    spacing = [float(s) for s in node_spacing_mm]
    if len(size_mm) != 3 or len(spacing) != 3 or min(size_mm + spacing) <= 0:
        raise ValueError(f"node ROI size and spacing must be 3 positive numbers, got {size_mm}, {spacing}")
    fov = min(CONTEXT_FOV_FACTOR * max(size_mm[1], size_mm[2]), MAX_CONTEXT_FOV_MM)
    finest = min(spacing[1], spacing[2])
    grid_by_pixels = int(math.floor(fov / (PATCH_SIZE * finest) + 1e-9))
    cap = context_grid_cap(budget, image_channels)
    grid = max(MIN_CONTEXT_GRID, min(cap, grid_by_pixels))
    side = PATCH_SIZE * grid
    pixel = fov / side
    shape = (CONTEXT_SLICES, side, side)
    scale_spacing = (spacing[0], pixel, pixel)
    scale = CropScale("context", scale_spacing, shape, tuple(float(n * s) for n, s in zip(shape, scale_spacing)),
                      cache_shape_for(shape))
    note = (f"context: {CONTEXT_FOV_FACTOR:g} x the node ROI's in-plane field ({fov:.1f} mm), {grid} x {grid} "
            f"patches of {PATCH_SIZE} px (budget cap {cap}) at {pixel:.3f} mm, {CONTEXT_SLICES} slices")
    return scale, note


def _topology_for_rung(rung: int, context_roi_shape_zyx, strides, kernels, dropout: float) -> WegaTopology:
    vit, resenc_rung = WEGA_LADDER[rung]
    return WegaTopology(vit_name=vit.name, embed_dim=vit.embed_dim, depth=vit.depth, num_heads=vit.num_heads,
                        layer_scale_init=vit.layer_scale_init, context_image_size=int(context_roi_shape_zyx[1]),
                        context_slice_group_starts=slice_group_starts(context_roi_shape_zyx[0]),
                        local=resenc_topology_from_rung(strides, kernels, resenc_rung, dropout),
                        fusion_heads=vit.num_heads, dropout=dropout)


def plan_wega_topology(context_roi_shape_zyx: Sequence[int], local_roi_shape_zyx: Sequence[int],
                       local_spacing: Sequence[float] | None, budget: "ComputeBudget | str",
                       in_channels: int = 2, mask_channel: bool = True, dropout: float = 0.2) -> WegaTopology:
    """The largest rung of :data:`WEGA_LADDER` whose forward cost fits the budget (else the smallest).

    ``in_channels``, ``mask_channel``: as the network gets them (default: one image channel + the mask).
    The context crop must be square in-plane and a multiple of 14 (what :func:`plan_context_scale` gives). ResEnc strides/kernels: ``3d_resenc``'s.
    """
    budget = get_budget(budget)
    ctx = _check_shape("context_roi_shape_zyx", context_roi_shape_zyx)
    loc = _check_shape("local_roi_shape_zyx", local_roi_shape_zyx)
    if ctx[1] != ctx[2] or ctx[1] % PATCH_SIZE:
        raise ValueError(f"the context ROI must be square in-plane and a multiple of {PATCH_SIZE}, got {ctx}")
    strides, kernels = plan_resenc_axes(loc, local_spacing)
    chosen = _topology_for_rung(0, ctx, strides, kernels, dropout)
    for rung in range(1, len(WEGA_LADDER)):
        topo = _topology_for_rung(rung, ctx, strides, kernels, dropout)
        if estimate_wega_gflops(topo, ctx, loc, in_channels, mask_channel) <= budget.max_gflops_per_sample:
            chosen = topo
    return chosen

