"""Configuration ``2d25``: the 2.5D two-stream topology (Li et al. 2024), its FLOP estimate and planning.

Pure arithmetic: no torch import. The network is :class:`lnm_auto.networks.two_stream.TwoStreamNet`;
the budget rule is explained in :mod:`lnm_auto.planning.network_topology`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from lnm_auto.planning.compute_budget import ComputeBudget, _ceil_div, _check_shape, get_budget

# --------------------------------------------------------------------------------------------------
# 2.5D two-stream (Li et al. 2024)
# --------------------------------------------------------------------------------------------------


def slice_group_starts(n_slices: int) -> tuple[int, ...]:
    """Start indices of the groups of 3 consecutive slices that make the 2.5D images.

    ``ceil(n / 3)`` groups at ``round(linspace(0, n - 3, ceil(n / 3)))`` (round half up, computed in
    integers so it is exact). Consecutive starts differ by at most 3, so every slice is in a group,
    and groups overlap when ``n`` is not a multiple of 3. For Z = 16: (0, 3, 5, 8, 10, 13).

    ``n_slices < 3``: a single group starting at 0; the network pads the volume to 3 slices by
    repeating its edge slices (Z = 1: s0 s0 s0; Z = 2: s0 s1 s1).
    """
    n = int(n_slices)
    if n < 1:
        raise ValueError(f"n_slices must be >= 1, got {n_slices}")
    if n <= 3:
        return (0,)
    g = _ceil_div(n, 3)
    last = n - 3
    # round half up of i * last / (g - 1), exactly
    return tuple((2 * i * last + (g - 1)) // (2 * (g - 1)) for i in range(g))


@dataclass(frozen=True)
class TwoStreamTopology:
    """Configuration ``2d25``: two MobileNetV3 + FPN streams over groups of 3 slices.

    ``fpn_channels``: channels of each FPN level; ``fused_channels``: width of the multi-scale,
    slice and stream fusion features. ``local_slice_group_starts``: groups of the local (zoomed) ROI
    when its slice count differs from the global one; ``None`` means the same as the global.
    """

    backbone: str
    fpn_channels: int
    fused_channels: int
    slice_group_starts: tuple[int, ...]
    dropout: float = 0.2
    local_slice_group_starts: tuple[int, ...] | None = None

    config_name = "2d25"

    @property
    def local_starts(self) -> tuple[int, ...]:
        """Slice group starts of the local ROI."""
        return self.slice_group_starts if self.local_slice_group_starts is None else self.local_slice_group_starts

    def to_dict(self) -> dict[str, Any]:
        """The topology as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TwoStreamTopology":
        """The topology from its ``to_dict`` form (lists from JSON become tuples)."""
        local = d.get("local_slice_group_starts")
        return cls(backbone=str(d["backbone"]), fpn_channels=int(d["fpn_channels"]),
                   fused_channels=int(d["fused_channels"]),
                   slice_group_starts=tuple(int(i) for i in d["slice_group_starts"]),
                   dropout=float(d.get("dropout", 0.2)),
                   local_slice_group_starts=None if local is None else tuple(int(i) for i in local))


@dataclass(frozen=True)
class BackboneSpec:
    """What the planner needs to know about a timm MobileNetV3 without building it.

    Forward FLOPs of ``timm.create_model(name, features_only=True, in_chans=3, out_indices=(-3, -2,
    -1))`` on one Y x X image = ``flops_per_level[0] + sum_l flops_per_level[l] * ceil(Y / 2^l) *
    ceil(X / 2^l)`` for l = 1..5: every Conv2d's 2 * Cin / groups * Cout * kh * kw per output pixel,
    summed by the stride level of its output (level 0: squeeze-excitation convs on pooled 1 x 1
    maps). Measured once (timm 1.0.22) with forward hooks on every Conv2d at 64 x 64, and checked
    equal to FlopCounterMode at 17 x 23, 32 x 32, 48 x 48, 33 x 95 and 224 x 224 (exact). The
    script is in documentation/networks.md. ``stem_channels``: outputs of the 3 x 3 stride-2 stem,
    for the in_chans = 3 * C correction. ``feature_channels``: the last three levels (strides 8,
    16, 32).
    """

    name: str
    flops_per_level: tuple[int, int, int, int, int, int]
    stem_channels: int
    feature_channels: tuple[int, int, int]

    def flops(self, y: int, x: int, in_channels: int = 1) -> int:
        """Forward FLOPs of the backbone on one Y x X image of ``3 * in_channels`` channels."""
        f = self.flops_per_level[0]
        for level in range(1, 6):
            f += self.flops_per_level[level] * _ceil_div(y, 2 ** level) * _ceil_div(x, 2 ** level)
        # the stem sees 3 * C channels instead of 3
        f += 2 * 9 * self.stem_channels * 3 * (in_channels - 1) * _ceil_div(y, 2) * _ceil_div(x, 2)
        return f


# Ladder, smallest first.
BACKBONES: tuple[BackboneSpec, ...] = (
    BackboneSpec("mobilenetv3_small_050", (253440, 864, 1184, 8640, 76256, 188064), 16, (16, 24, 288)),
    BackboneSpec("mobilenetv3_small_075", (556544, 864, 3104, 19392, 142320, 400800), 16, (24, 40, 432)),
    BackboneSpec("mobilenetv3_small_100", (917504, 864, 3104, 19392, 202896, 680256), 16, (24, 48, 576)),
    BackboneSpec("mobilenetv3_large_075", (1807104, 3712, 15888, 54672, 562720, 1089120), 16, (32, 88, 720)),
    BackboneSpec("mobilenetv3_large_100", (3014400, 3712, 15888, 78960, 891344, 1880640), 16, (40, 112, 960)),
)
BACKBONE_SPECS = {b.name: b for b in BACKBONES}

# (backbone, fpn_channels, fused_channels), smallest first; every field non-decreasing.
TWO_STREAM_LADDER: tuple[tuple[str, int, int], ...] = (
    ("mobilenetv3_small_050", 32, 64),
    ("mobilenetv3_small_075", 48, 96),
    ("mobilenetv3_small_100", 64, 128),
    ("mobilenetv3_large_075", 96, 192),
    ("mobilenetv3_large_100", 128, 256),
)

# MobileNetV3 FLOPs cost this many dense-3D-conv FLOPs of time. Measured on 2 CPU cores (torch 2.14,
# shared machine, batch 16 at 16 x 64 x 64, forward + backward counted as 3 x forward FLOPs): the 2d25
# network runs at ~40-57 GFLOP/s (large_075, large_100), the 3D ResEnc rung 2 at ~80-97 GFLOP/s.
MOBILENET_COST_FACTOR = 2.0


def estimate_two_stream_gflops(topology: TwoStreamTopology, roi_shape_zyx: Sequence[int],
                               local_roi_shape_zyx: Sequence[int] | None = None,
                               in_channels: int = 1) -> float:
    """Forward GFLOPs per sample (raw FLOPs, as FlopCounterMode counts them; no cost factor)."""
    roi = _check_shape("roi_shape_zyx", roi_shape_zyx)
    local = roi if local_roi_shape_zyx is None else _check_shape("local_roi_shape_zyx", local_roi_shape_zyx)
    spec = BACKBONE_SPECS[topology.backbone]
    fpn, fused = topology.fpn_channels, topology.fused_channels
    total = 0.0
    for shape, starts in ((roi, topology.slice_group_starts), (local, topology.local_starts)):
        _, y, x = shape
        g = len(starts)
        per_image = spec.flops(y, x, in_channels)
        # FPN (torchvision): 1x1 lateral + 3x3 output conv per level
        for level, cin in enumerate(spec.feature_channels):
            r = 2 ** (level + 3)
            hw = _ceil_div(y, r) * _ceil_div(x, r)
            per_image += 2 * hw * fpn * (cin + 9 * fpn)
        per_image += 2 * 3 * fpn * fused          # multi-scale fusion (1x1 conv on pooled levels)
        total += g * per_image
        total += 2 * g * fused * fused            # slice fusion
        total += 2 * fused                        # side classifier
    total += 2 * 2 * fused * fused + 2 * fused    # stream fusion + fused classifier
    return total / 1e9


def two_stream_cost(topology: TwoStreamTopology, roi_shape_zyx, local_roi_shape_zyx=None,
                    in_channels: int = 1) -> float:
    """Dense-equivalent GFLOPs per sample: what the budget is compared with."""
    return MOBILENET_COST_FACTOR * estimate_two_stream_gflops(topology, roi_shape_zyx, local_roi_shape_zyx,
                                                              in_channels)


def plan_two_stream_topology(roi_shape_zyx: Sequence[int], local_roi_shape_zyx: Sequence[int] | None,
                             budget: "ComputeBudget | str", in_channels: int = 1,
                             dropout: float = 0.2) -> TwoStreamTopology:
    """The largest rung of :data:`TWO_STREAM_LADDER` whose cost fits the budget (else the smallest)."""
    budget = get_budget(budget)
    roi = _check_shape("roi_shape_zyx", roi_shape_zyx)
    local = roi if local_roi_shape_zyx is None else _check_shape("local_roi_shape_zyx", local_roi_shape_zyx)
    starts = slice_group_starts(roi[0])
    local_starts = slice_group_starts(local[0])
    chosen = None
    for backbone, fpn, fused in TWO_STREAM_LADDER:
        topo = TwoStreamTopology(backbone=backbone, fpn_channels=fpn, fused_channels=fused,
                                 slice_group_starts=starts, dropout=dropout,
                                 local_slice_group_starts=None if local_starts == starts else local_starts)
        if chosen is None or two_stream_cost(topo, roi, local, in_channels) <= budget.max_gflops_per_sample:
            chosen = topo
    return chosen
