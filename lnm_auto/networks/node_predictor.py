"""Node crops -> probabilities: the one code path of validation (training) and lnm_predict (inference)."""
from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn

from lnm_auto.networks.inputs import image_key, mask_key
from lnm_auto.networks.shape_head import SHAPE_FEATURES_KEY, shape_measurements
from lnm_auto.plans.plans import ConfigurationPlan, Plans


def center_crop(x: np.ndarray, shape) -> np.ndarray:
    """Central ``shape`` of the last len(shape) axes (cache crop -> network ROI)."""
    slices = [slice(None)] * (x.ndim - len(shape))
    for n, s in zip(x.shape[-len(shape):], shape):
        if s > n:
            raise ValueError(f"cannot crop {n} voxels to {s}")
        start = (n - s) // 2
        slices.append(slice(start, start + s))
    return x[tuple(slices)]


def tta_flips(config: ConfigurationPlan) -> list[tuple[int, ...]]:
    """Every subset of the plan's test-time mirror axes, as tensor dims of a (B, C, S, R, Cc) batch."""
    axes = [2 + a for a in config.augmentation.test_time_mirror_axes]
    return [c for k in range(len(axes) + 1) for c in itertools.combinations(axes, k)]


def roi_batch(crops: dict[str, np.ndarray], plans: Plans, config: ConfigurationPlan, rows: slice,
              device: torch.device) -> dict[str, torch.Tensor]:
    """``image_<scale>`` (B, C, ...) and ``mask_<scale>`` (B, 1, ...) tensors of ``rows`` of node crops (masks as
    stored in the caches, (N, ...), or as batches hold them, (N, 1, ...)), centre-cropped to each scale's ROI,
    and the nodes' ``shape_features`` (B, 4) where the crops carry their measurements."""
    batch = {}
    for s in config.scales:
        roi = plans.scales[s].roi_shape
        image = center_crop(np.asarray(crops[image_key(s)][rows], dtype=np.float32), roi)
        mask = np.asarray(crops[mask_key(s)][rows], dtype=np.float32)
        mask = center_crop(mask if mask.ndim == image.ndim else mask[:, None], roi)
        batch[image_key(s)] = torch.from_numpy(np.ascontiguousarray(image)).to(device)
        batch[mask_key(s)] = torch.from_numpy(np.ascontiguousarray(mask)).to(device)
    measurements = shape_measurements(crops)
    if measurements is not None:
        batch[SHAPE_FEATURES_KEY] = torch.from_numpy(np.ascontiguousarray(measurements[rows])).to(device)
    return batch


@torch.no_grad()
def predict_node_crops(network: nn.Module, crops: dict[str, np.ndarray], plans: Plans, config: ConfigurationPlan,
                       device: torch.device, batch_size: int = 16, mirror: bool = False) -> np.ndarray:
    """Probabilities of the fused head for every node of ``crops`` (``image_<scale>``, ``mask_<scale>``);
    with ``mirror``, the mean over the plan's test-time flips."""
    network.eval()
    n = len(crops[image_key(config.scales[0])])
    probs = np.zeros(n, dtype=np.float64)
    flips = tta_flips(config) if mirror else [()]
    for start in range(0, n, max(1, batch_size)):
        rows = slice(start, start + batch_size)
        batch = roi_batch(crops, plans, config, rows, device)
        # flips mirror the crops; the shape measurements are the same for every flip
        p = sum(torch.sigmoid(network({k: torch.flip(x, f) if f and k != SHAPE_FEATURES_KEY else x
                                       for k, x in batch.items()})["fused"])
                for f in flips) / len(flips)
        probs[rows] = p.float().cpu().numpy()
    return probs
