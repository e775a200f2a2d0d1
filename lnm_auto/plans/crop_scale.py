"""A crop scale: one resampled view of a node (the network's ROI and the larger crop the caches keep).

On its own (no other planning imports) so every topology module and the plans can use it without a cycle.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# Caches hold a larger crop so in-plane rotation/scaling augmentation does not sample outside it.
AUGMENTATION_MARGIN = 1.25


@dataclass
class CropScale:
    """One resampled view of a node: the network input and the (larger) crop kept in the caches."""
    name: str
    spacing_mm: tuple[float, float, float]   # (slice, row, col)
    roi_shape: tuple[int, int, int]          # voxels the network sees
    roi_size_mm: tuple[float, float, float]
    cache_shape: tuple[int, int, int]        # voxels stored: ROI + room for rotation/scaling augmentation


def round_up(x: float, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= x."""
    return int(math.ceil(x / multiple - 1e-9) * multiple)


def cache_shape_for(roi_shape) -> tuple[int, int, int]:
    """Shape of the cached crop: the ROI with an in-plane margin for augmentation."""
    inplane = [round_up(s * AUGMENTATION_MARGIN, 2) for s in roi_shape[1:]]
    return (int(roi_shape[0]), inplane[0], inplane[1])
