"""Node crops -> probabilities: the one code path used by validation (training) and by lnm_predict."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lnm_auto.planning.plans import ConfigurationPlan, Plans

# in-plane flips averaged at test time (the training augmentation mirrors the same axes)
MIRROR_AXES = ((), (-1,), (-2,), (-2, -1))


def center_crop(x: np.ndarray, shape) -> np.ndarray:
    """Central ``shape`` of the last len(shape) axes (cache crop -> network ROI)."""
    slices = [slice(None)] * (x.ndim - len(shape))
    for n, s in zip(x.shape[-len(shape):], shape):
        if s > n:
            raise ValueError(f"cannot crop {n} voxels to {s}")
        start = (n - s) // 2
        slices.append(slice(start, start + s))
    return x[tuple(slices)]


def network_inputs(images: dict[str, np.ndarray], masks: dict[str, np.ndarray], config: ConfigurationPlan,
                   device: torch.device) -> dict[str, torch.Tensor]:
    """{scale: (B, C[+1 mask], S, R, C) float tensor} from per-scale image (B, C, ...) and mask (B, 1, ...) arrays."""
    out = {}
    for s in config.scales:
        x = torch.from_numpy(np.ascontiguousarray(images[s], dtype=np.float32))
        if config.use_mask_channel:
            x = torch.cat([x, torch.from_numpy(np.ascontiguousarray(masks[s], dtype=np.float32))], dim=1)
        out[s] = x.to(device, non_blocking=True)
    return out


@torch.no_grad()
def predict_crops(network: nn.Module, crops: dict[str, np.ndarray], plans: Plans, config: ConfigurationPlan,
                  device: torch.device, batch_size: int = 16, mirror: bool = False) -> np.ndarray:
    """Probabilities of the fused head for every node in ``crops`` (the npz layout: image_<scale>
    (N, C, ...), mask_<scale> (N, ...)), centre-cropped to the ROI; optional mirroring TTA."""
    network.eval()
    n = len(crops[f"image_{config.scales[0]}"])
    probs = np.zeros(n, dtype=np.float64)
    for start in range(0, n, max(1, batch_size)):
        sl = slice(start, start + batch_size)
        images = {s: center_crop(np.asarray(crops[f"image_{s}"][sl], dtype=np.float32), plans.scales[s].roi_shape)
                  for s in config.scales}
        masks = {s: center_crop(np.asarray(crops[f"mask_{s}"][sl], dtype=np.float32)[:, None], plans.scales[s].roi_shape)
                 for s in config.scales}
        batch = network_inputs(images, masks, config, device)
        flips = MIRROR_AXES if mirror else ((),)
        p = sum(torch.sigmoid(network({s: torch.flip(x, f) if f else x for s, x in batch.items()})["fused"])
                for f in flips) / len(flips)
        probs[sl] = p.float().cpu().numpy()
    return probs
