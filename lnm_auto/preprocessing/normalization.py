"""Intensity normalization per channel, as the plans say (nnU-Net's CTNormalization / ZScoreNormalization)."""
from __future__ import annotations

import numpy as np

from lnm_auto.planning.plans import ChannelNormalization


def case_zscore_statistics(values: np.ndarray) -> tuple[float, float]:
    """Mean and std used by per-case z-score (computed on the node neighbourhoods of the case)."""
    if values.size == 0:
        return 0.0, 1.0
    return float(values.mean()), float(max(values.std(), 1e-8))


def normalize(array: np.ndarray, norm: ChannelNormalization, case_stats: tuple[float, float] | None = None) -> np.ndarray:
    """CT: clip to [p0.5, p99.5] of the dataset, then (x - mean) / std with dataset statistics.
    z-score: (x - case mean) / case std, with the case's statistics (``case_stats``)."""
    x = array.astype(np.float32, copy=True)
    if norm.scheme == "CT":
        np.clip(x, norm.clip_low, norm.clip_high, out=x)
        x -= norm.mean
        x /= max(norm.std, 1e-8)
        return x
    if norm.scheme == "zscore":
        mean, std = case_stats if case_stats is not None else case_zscore_statistics(array)
        x -= mean
        x /= max(std, 1e-8)
        return x
    raise ValueError(f"unknown normalization scheme {norm.scheme}")
