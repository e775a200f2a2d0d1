"""Intensity normalization per channel, as the plans say (nnU-Net's CTNormalization / ZScoreNormalization)."""
from __future__ import annotations

import numpy as np

from lnm_auto.plans.plans import ChannelNormalization


def normalize(array: np.ndarray, norm: ChannelNormalization, case_mean: float = 0.0, case_std: float = 1.0) -> np.ndarray:
    """The plans' normalization of intensities, float32. CT: clip to [p0.5, p99.5] of the dataset, then
    (x - mean) / std with the dataset's statistics. z-score: (x - case mean) / case std."""
    x = np.array(array, dtype=np.float32)
    if norm.scheme == "CT":
        np.clip(x, norm.clip_low, norm.clip_high, out=x)
        x -= norm.mean
        x /= max(norm.std, 1e-8)
        return x
    if norm.scheme == "zscore":
        x -= case_mean
        x /= case_std
        return x
    raise ValueError(f"unknown normalization scheme {norm.scheme}")


def normalize_stored(stored: np.ndarray, norm: ChannelNormalization, case_mean: float, case_std: float) -> np.ndarray:
    """The plans' normalization of crops stored z-scored with the case's own statistics (the crop caches):
    float32. z-score: they already are; CT: back to intensities, then clipped and z-scored with the dataset's
    statistics (which exist only once every image has been read, after the crops were cut)."""
    x = np.asarray(stored, dtype=np.float32)
    if norm.scheme == "zscore":
        return x           # normalize(x * case_std + case_mean, norm, case_mean, case_std), without the round trip
    return normalize(x * np.float32(case_std) + np.float32(case_mean), norm)


def normalize_channels(stored: np.ndarray, norms: list[ChannelNormalization], case_mean, case_std,
                       axis: int) -> np.ndarray:
    """:func:`normalize_stored` of every channel of ``stored`` (channels along ``axis``), float32."""
    return np.stack([normalize_stored(np.take(stored, c, axis=axis), norm, case_mean[c], case_std[c])
                     for c, norm in enumerate(norms)], axis=axis)


def normalize_node_crops(arrays: dict[str, np.ndarray], norms: list[ChannelNormalization]) -> dict[str, np.ndarray]:
    """``arrays`` (one case's crops, as cut or cached) with every ``image_<scale>`` (N, C, ...) normalized."""
    return {k: normalize_channels(v, norms, arrays["intensity_mean"], arrays["intensity_std"], axis=1)
            if k.startswith("image_") else v for k, v in arrays.items()}
