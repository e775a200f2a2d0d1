"""Configuration ``3d_resenc``: the 3D residual-encoder topology (nnU-Net's ResEnc), its FLOP estimate
and planning.

Pure arithmetic: no torch import. The network is
:class:`lnm_auto.networks.resenc_classifier.ResEncClassifier`; the budget rule is explained in
:mod:`lnm_auto.plans.network_topology`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

from lnm_auto.plans.compute_budget import (ComputeBudget, _ceil_div, _check_shape, _conv_out, _tuple,
                                           get_budget)

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
        """The topology as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ResEncTopology":
        """The topology from its ``to_dict`` form (lists from JSON become tuples)."""
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
        """The next stage's kernel sizes for the current spacing."""
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
    """The ResEnc topology of ladder rung ``rung`` with the planned strides and kernels."""
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
