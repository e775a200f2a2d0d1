"""Network topologies and the compute-budget rule that sizes them.

Everything here is pure arithmetic on shapes: no torch import, deterministic, cheap. The networks
(``lnm_auto.networks``) are built from these dataclasses; the FLOP estimates are validated against
``torch.utils.flop_counter.FlopCounterMode`` in ``tests/test_networks.py``.

nnU-Net sizes its networks to GPU memory. lnm_auto also sizes to *compute*, because its users
often train on CPUs: a :class:`ComputeBudget` caps the estimated forward cost per sample, and the
planners pick the largest network from a discrete ladder that fits. A bigger budget never gives a
smaller network (the choice is the largest fitting ladder rung, and rungs grow monotonically).

Cost unit: "dense-equivalent GFLOPs". A 3D ResEnc's cost is its forward FLOPs (convolutions and
the linear head, counted like FlopCounterMode: 2 per multiply-add, no bias, no norms). A
MobileNetV3's FLOPs are multiplied by :data:`MOBILENET_COST_FACTOR`, because depthwise
convolutions, squeeze-excitation and hard-swish run at a fraction of the FLOP rate of dense
convolutions (measured on 2 CPU cores, see the constant). With one unit, one budget sizes both
configurations to about the same step time.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

# --------------------------------------------------------------------------------------------------
# Budgets
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComputeBudget:
    """Upper bound on the estimated forward cost of one sample, in dense-equivalent GFLOPs."""

    name: str
    max_gflops_per_sample: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ComputeBudget":
        return cls(name=str(d["name"]), max_gflops_per_sample=float(d["max_gflops_per_sample"]))


# GPU: large enough that the top rung of each ladder (nnU-Net's ResEnc: features min(32 * 2^i, 320),
# blocks (1, 3, 4, 6, 6, 6); two streams of mobilenetv3_large_100) fits the usual LN ROIs: the ResEnc
# top rung costs ~62 GFLOPs at 16 x 64 x 64 (5 x 0.8 x 0.8 mm), ~122 at 64^3 isotropic. Bigger ROIs
# get a narrower network, as nnU-Net would shrink the patch.
GPU_BUDGET = ComputeBudget(name="gpu", max_gflops_per_sample=400.0)

# CPU: one forward + backward of a batch of 16 nodes at ROI 16 x 64 x 64 in about 1 s on 2 cores
# (measured, see documentation/networks.md): the budget admits ResEnc rung 2 (8..128 features,
# blocks (1, 2, 2, 2, 2), 1.8 GFLOPs, ~0.9-1.1 s) but not rung 3 (7.3 GFLOPs, ~3-4 s), and the
# paper's two streams of mobilenetv3_large_100 (0.78 GFLOPs x 2 = 1.56, ~0.6-0.8 s). Larger ROIs
# get smaller networks (2d25 at 16 x 96 x 96: small_100; ResEnc at 16 x 128 x 128: 4..64 features).
CPU_BUDGET = ComputeBudget(name="cpu", max_gflops_per_sample=2.0)

BUDGETS = {b.name: b for b in (GPU_BUDGET, CPU_BUDGET)}


def get_budget(name_or_budget: "str | ComputeBudget") -> ComputeBudget:
    if isinstance(name_or_budget, ComputeBudget):
        return name_or_budget
    try:
        return BUDGETS[str(name_or_budget).lower()]
    except KeyError:
        raise ValueError(f"unknown compute budget {name_or_budget!r}; known: {sorted(BUDGETS)}") from None


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _tuple(x) -> tuple:
    """Lists (from JSON) -> tuples, recursively."""
    if isinstance(x, (list, tuple)):
        return tuple(_tuple(i) for i in x)
    return x


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _conv_out(n: int, k: int, s: int) -> int:
    """Output length of a conv with padding k // 2 (the convention of timm and DNA)."""
    return (n + 2 * (k // 2) - k) // s + 1


def _check_shape(name: str, shape: Sequence[int], ndim: int = 3) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != ndim or any(s < 1 for s in shape):
        raise ValueError(f"{name} must be {ndim} positive ints (z, y, x), got {shape}")
    return shape


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
        return self.slice_group_starts if self.local_slice_group_starts is None else self.local_slice_group_starts

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TwoStreamTopology":
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


# --------------------------------------------------------------------------------------------------
# 3D residual encoder (WeGA's local branch; nnU-Net's ResEnc)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResEncTopology:
    """Configuration ``3d_resenc``: a dynamic-network-architectures ResidualEncoder + linear head.

    ``strides[0]`` is (1, 1, 1) (the stem never strides). Per axis ``z, y, x``.
    """

    n_stages: int
    features_per_stage: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, int, int], ...]
    strides: tuple[tuple[int, int, int], ...]
    n_blocks_per_stage: tuple[int, ...]
    dropout: float = 0.2

    config_name = "3d_resenc"

    def __post_init__(self):
        n = self.n_stages
        for field in ("features_per_stage", "kernel_sizes", "strides", "n_blocks_per_stage"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"ResEncTopology.{field} needs {n} entries, got {getattr(self, field)}")

    @property
    def total_stride(self) -> tuple[int, int, int]:
        """Product of the strides per axis: inputs are padded to a multiple of this."""
        return tuple(math.prod(s[d] for s in self.strides) for d in range(3))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ResEncTopology":
        return cls(n_stages=int(d["n_stages"]),
                   features_per_stage=tuple(int(f) for f in d["features_per_stage"]),
                   kernel_sizes=_tuple(d["kernel_sizes"]), strides=_tuple(d["strides"]),
                   n_blocks_per_stage=tuple(int(b) for b in d["n_blocks_per_stage"]),
                   dropout=float(d.get("dropout", 0.2)))


MAX_RESENC_STAGES = 6
MIN_FEATURE_MAP_SIZE = 4  # pool an axis only while it stays >= 4 voxels (nnU-Net's rule)

# (base features, max features, blocks per stage), smallest first; features of stage i are
# min(base * 2^i, max); blocks truncated to the number of stages. Every field non-decreasing.
# The top rung is nnU-Net's ResEnc (M) encoder.
RESENC_LADDER: tuple[tuple[int, int, tuple[int, ...]], ...] = (
    (4, 64, (1, 1, 1, 1, 1, 1)),
    (8, 128, (1, 1, 1, 1, 1, 1)),
    (8, 128, (1, 2, 2, 2, 2, 2)),
    (16, 256, (1, 2, 2, 2, 2, 2)),
    (16, 256, (1, 3, 4, 6, 6, 6)),
    (24, 320, (1, 3, 4, 6, 6, 6)),
    (32, 320, (1, 3, 4, 6, 6, 6)),
)


def plan_resenc_axes(roi_shape_zyx: Sequence[int], spacing_zyx_mm: Sequence[float] | None = None
                     ) -> tuple[tuple[tuple[int, int, int], ...], tuple[tuple[int, int, int], ...]]:
    """Strides and kernel sizes per stage, as nnU-Net v2's ``get_pool_and_conv_props``.

    Pooling: the next stage pools (stride 2) every axis that (a) is >= 2 * 4 voxels, so it stays
    >= 4, and (b) has a spacing < 2x the finest spacing among the axes that can still be pooled
    (the coarse axis of an anisotropic ROI waits until in-plane pooling has caught up). A single
    poolable axis must be >= 3 * 4 voxels. Stops when nothing can be pooled, or at 6 stages.
    Kernels: 3 on axes whose spacing is < 2x the finest, else 1; once 3, an axis stays 3.
    Odd sizes are fine: the network pads its input to a multiple of the total stride.
    ``spacing_zyx_mm=None`` means isotropic. Returns (strides, kernel_sizes), one entry per stage.
    """
    size = list(_check_shape("roi_shape_zyx", roi_shape_zyx))
    spacing = [1.0, 1.0, 1.0] if spacing_zyx_mm is None else [float(s) for s in spacing_zyx_mm]
    if len(spacing) != 3 or any(not s > 0 for s in spacing):
        raise ValueError(f"spacing_zyx_mm must be 3 positive numbers, got {spacing_zyx_mm}")

    def update_kernel(kernel: list[int]) -> tuple[int, int, int]:
        finest = min(spacing)
        for d in range(3):
            if spacing[d] / finest < 2:
                kernel[d] = 3
        return tuple(kernel)

    kernel = [1, 1, 1]
    strides: list[tuple[int, int, int]] = [(1, 1, 1)]
    kernels: list[tuple[int, int, int]] = [update_kernel(kernel)]
    while len(strides) < MAX_RESENC_STAGES:
        valid = [d for d in range(3) if size[d] >= 2 * MIN_FEATURE_MAP_SIZE]
        if not valid:
            break
        finest_valid = min(spacing[d] for d in valid)
        valid = [d for d in valid if spacing[d] / finest_valid < 2]
        if len(valid) == 1 and size[valid[0]] < 3 * MIN_FEATURE_MAP_SIZE:
            break
        strides.append(tuple(2 if d in valid else 1 for d in range(3)))
        for d in valid:
            size[d] = _ceil_div(size[d], 2)
            spacing[d] *= 2
        kernels.append(update_kernel(kernel))
    return tuple(strides), tuple(kernels)


def resenc_topology_from_rung(strides, kernels, rung: int, dropout: float = 0.2) -> ResEncTopology:
    base, cap, blocks = RESENC_LADDER[rung]
    n = len(strides)
    return ResEncTopology(n_stages=n, features_per_stage=tuple(min(base * 2 ** i, cap) for i in range(n)),
                          kernel_sizes=tuple(kernels), strides=tuple(strides),
                          n_blocks_per_stage=tuple(blocks[:n]), dropout=dropout)


def estimate_resenc_gflops(topology: ResEncTopology, roi_shape_zyx: Sequence[int], in_channels: int = 1) -> float:
    """Forward GFLOPs per sample of :class:`lnm_auto.networks.resenc_classifier.ResEncClassifier`.

    Counts what FlopCounterMode counts: every convolution (2 x MACs, no bias) and the linear head.
    Follows DNA's BasicBlockD: conv1 (stride) + conv2, a 1x1 projection on the skip where the
    channels change; padding k // 2. The input is first padded to a multiple of the total stride.
    """
    size = [_ceil_div(n, t) * t for n, t in zip(_check_shape("roi_shape_zyx", roi_shape_zyx), topology.total_stride)]
    flops = 0
    cin = in_channels
    f0 = topology.features_per_stage[0]
    k0 = topology.kernel_sizes[0]
    flops += 2 * cin * f0 * math.prod(k0) * math.prod(size)  # stem (stride 1, same padding)
    cin = f0
    for s in range(topology.n_stages):
        k, st, f = topology.kernel_sizes[s], topology.strides[s], topology.features_per_stage[s]
        for b in range(topology.n_blocks_per_stage[s]):
            stride = st if b == 0 else (1, 1, 1)
            out = [_conv_out(n, kk, ss) for n, kk, ss in zip(size, k, stride)]
            vox = math.prod(out)
            flops += 2 * cin * f * math.prod(k) * vox   # conv1
            flops += 2 * f * f * math.prod(k) * vox     # conv2
            if cin != f:
                flops += 2 * cin * f * vox              # 1x1 projection on the skip
            size, cin = out, f
    flops += 2 * cin  # linear head to one logit
    return flops / 1e9


def plan_resenc_topology(roi_shape_zyx: Sequence[int], spacing_zyx_mm: Sequence[float] | None,
                         budget: "ComputeBudget | str", in_channels: int = 1, dropout: float = 0.2
                         ) -> ResEncTopology:
    """nnU-Net-style strides/kernels from the ROI and spacing, then the largest rung of
    :data:`RESENC_LADDER` whose forward GFLOPs per sample fit the budget (else the smallest)."""
    budget = get_budget(budget)
    strides, kernels = plan_resenc_axes(roi_shape_zyx, spacing_zyx_mm)
    chosen = resenc_topology_from_rung(strides, kernels, 0, dropout)
    for rung in range(1, len(RESENC_LADDER)):
        topo = resenc_topology_from_rung(strides, kernels, rung, dropout)
        if estimate_resenc_gflops(topo, roi_shape_zyx, in_channels) <= budget.max_gflops_per_sample:
            chosen = topo
    return chosen


TOPOLOGY_TYPES = {TwoStreamTopology.config_name: TwoStreamTopology, ResEncTopology.config_name: ResEncTopology}


def topology_from_dict(config_name: str, d: dict[str, Any]):
    """Rebuild a topology from its ``asdict`` form (plans.json) given the configuration name."""
    if "wega" not in TOPOLOGY_TYPES:   # registered lazily: global_local_topology imports this module
        from lnm_auto.planning.global_local_topology import WegaTopology
        TOPOLOGY_TYPES[WegaTopology.config_name] = WegaTopology
    try:
        return TOPOLOGY_TYPES[config_name].from_dict(d)
    except KeyError:
        raise ValueError(f"unknown configuration {config_name!r}; known: {sorted(TOPOLOGY_TYPES)}") from None
