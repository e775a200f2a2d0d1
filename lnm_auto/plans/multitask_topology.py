"""The multi-task head (M2ANet) as a plan entry: decoder width, soft-mask width, loss weight.

Pure arithmetic, no torch. The head is :class:`lnm_auto.networks.multitask.MultiTaskNet`; it wraps
any configuration's network (``2d25``, ``3d_resenc``, ``wega``). documentation/wega_multitask.md.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from lnm_auto.plans.network_topology import ComputeBudget, get_budget

# The soft mask reaches SOFT_MASK_MARGIN_MM around the node: the same "node surroundings" margin the
# fingerprint samples intensities from (preprocessing/crops.py INTENSITY_MARGIN_MM), i.e. the tissue a reader looks at.
SOFT_MASK_MARGIN_MM = 10.0
# Decoder width: all convolutions of the decoder run at full resolution (1x1x1 only), so its cost is
# linear in the width; 16 keeps it < 5 % of the CPU budget at 16 x 64 x 64.
DECODER_CHANNELS_CPU = 16
DECODER_CHANNELS_GPU = 32
GPU_CLASS_BUDGET_GFLOPS = 10.0


@dataclass(frozen=True)
class MultiTaskTopology:
    """Multi-task head: a light decoder predicting the node mask of ``mask_scale`` + soft-mask pooling.

    ``soft_mask_width_vox``: expansion width per axis (slice, row, col) in voxels of ``mask_scale``.
    ``mask_loss_weight``: weight of Dice + BCE of the mask next to the classification BCE.
    """

    mask_scale: str
    decoder_channels: int
    soft_mask_width_vox: tuple[float, float, float]
    soft_mask_kind: str = "linear"
    mask_loss_weight: float = 1.0
    dropout: float = 0.2

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the plans' form)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MultiTaskTopology":
        """Inverse of :meth:`to_dict`."""
        return cls(mask_scale=str(d["mask_scale"]), decoder_channels=int(d["decoder_channels"]),
                   soft_mask_width_vox=tuple(float(w) for w in d["soft_mask_width_vox"]),
                   soft_mask_kind=str(d.get("soft_mask_kind", "linear")),
                   mask_loss_weight=float(d.get("mask_loss_weight", 1.0)), dropout=float(d.get("dropout", 0.2)))


def plan_multitask_topology(mask_scale_name: str, mask_spacing_mm: Sequence[float],
                            budget: "ComputeBudget | str") -> MultiTaskTopology:
    """Soft-mask width = SOFT_MASK_MARGIN_MM / spacing per axis (>= 1 voxel); decoder width by budget."""
    budget = get_budget(budget)
    spacing = [float(s) for s in mask_spacing_mm]
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"mask_spacing_mm must be 3 positive numbers, got {mask_spacing_mm}")
    width = tuple(max(1.0, SOFT_MASK_MARGIN_MM / s) for s in spacing)
    channels = DECODER_CHANNELS_GPU if budget.max_gflops_per_sample >= GPU_CLASS_BUDGET_GFLOPS else DECODER_CHANNELS_CPU
    return MultiTaskTopology(mask_scale=mask_scale_name, decoder_channels=channels, soft_mask_width_vox=width)
