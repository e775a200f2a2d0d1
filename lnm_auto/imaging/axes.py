"""The canonical (slice, row, col) frame from a voxel spacing alone (numpy only: the plans layer uses it)."""
from __future__ import annotations

import numpy as np

# An axis is "the slice axis" only when clearly coarser than the others; else numpy axis 0 (index k).
SLICE_AXIS_MIN_RATIO = 1.5


def slice_axis(spacing_zyx: tuple[float, float, float]) -> int:
    """Numpy axis (0, 1, 2) of the through-plane direction, from the voxel spacing in numpy order."""
    sp = np.asarray(spacing_zyx, dtype=float)
    coarsest = int(np.argmax(sp))
    others = np.delete(sp, coarsest)
    if sp[coarsest] >= SLICE_AXIS_MIN_RATIO * others.max():
        return coarsest
    return 0


def canonical_axes(spacing_zyx) -> tuple[int, int, int]:
    """Numpy axes in canonical order (slice, row, column)."""
    a = slice_axis(spacing_zyx)
    rest = [i for i in range(3) if i != a]
    return (a, rest[0], rest[1])
