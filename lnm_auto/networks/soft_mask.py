"""Soft mask expansion (M2ANet): the node mask, softly dilated into a weight map over the crop.

``w = ramp(d)`` where ``d`` is the Euclidean distance from a voxel to the nearest node voxel measured
in units of the expansion width per axis (scipy's exact EDT with ``sampling = 1 / width``):

- ``"linear"`` (default): ``w = clip(1 - d, 0, 1)`` - 1 inside the node, a linear ramp over ``width``
  voxels outside, 0 beyond (the public analogue of M2ANet's expansion);
- ``"exp"``: ``w = exp(-d)`` - never 0, decays by 1/e per width.

Node voxels have ``d = 0`` and so weight exactly 1; a larger width shrinks every ``d``, so ``w`` is
non-decreasing in the width at every voxel. A crop without node voxels gets weight 1 everywhere
(pooling over the whole crop). The mask is data, not a learned quantity: no gradient flows here.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

KINDS = ("linear", "exp")


def _widths(width_vox: "float | Sequence[float]", ndim: int) -> np.ndarray:
    w = np.broadcast_to(np.asarray(width_vox, dtype=float), (ndim,)).copy()
    if not np.all(w > 0):
        raise ValueError(f"soft mask width must be > 0 voxels per axis, got {width_vox}")
    return w


def soft_mask_expansion_np(mask: np.ndarray, width_vox: "float | Sequence[float]", kind: str = "linear") -> np.ndarray:
    """One (S, R, C) mask (nonzero = node) -> float32 weight map of the same shape."""
    if kind not in KINDS:
        raise ValueError(f"soft mask kind must be one of {KINDS}, got {kind!r}")
    node = np.asarray(mask) > 0.5
    if not node.any():
        return np.ones(node.shape, dtype=np.float32)
    d = ndimage.distance_transform_edt(~node, sampling=1.0 / _widths(width_vox, node.ndim))
    w = np.clip(1.0 - d, 0.0, 1.0) if kind == "linear" else np.exp(-d)
    return w.astype(np.float32)


def soft_mask_expansion(mask: "torch.Tensor | np.ndarray", width_vox: "float | Sequence[float]",
                        kind: str = "linear") -> "torch.Tensor | np.ndarray":
    """Weight map of the softly expanded node mask; widths per spatial axis (the last 3), in voxels.

    ``mask``: (S, R, C) or batched (..., S, R, C), torch or numpy; returns the same type, shape,
    device (float32). See the module docstring for the formula.
    """
    if isinstance(mask, torch.Tensor):
        arr = mask.detach().to("cpu", torch.float32).numpy()
        return torch.from_numpy(soft_mask_expansion(arr, width_vox, kind)).to(mask.device)
    arr = np.asarray(mask)
    if arr.ndim < 3:
        raise ValueError(f"soft mask expansion needs (..., S, R, C), got shape {arr.shape}")
    flat = arr.reshape(-1, *arr.shape[-3:])
    out = np.stack([soft_mask_expansion_np(m, width_vox, kind) for m in flat])
    return out.reshape(arr.shape)
