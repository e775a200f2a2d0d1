"""The hybrid head: physical shape measurements of the node join the pooled image features in the final classifier.

Batch part ``shape_features``: (B, 4) float, the node's measurements in physical units, columns
:data:`SHAPE_MEASUREMENTS` (short axis mm, long axis mm, volume mm^3, sphericity), measured once at
preprocessing (``preprocessing.preprocessor``: the crop caches and ``nodes_index.csv``) and put into every
batch by ``training.data.load_batch`` and ``networks.node_predictor.roi_batch`` whatever the plans say, so a
plan with the head on needs nothing else. A network whose plan lists ``head_shape_features`` picks those
columns, scales them with the plan's fixed constants (:class:`ShapeEmbedding`; no statistics are ever taken
from the data it predicts) and embeds them; with an empty list the network does not read them at all.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from lnm_auto.plans.plans import ShapeFeature

SHAPE_FEATURES_KEY = "shape_features"
SHAPE_MEASUREMENTS = ("short_axis_mm", "long_axis_mm", "volume_mm3", "sphericity")
LOG_FLOOR = 1e-3          # a measurement of 0 (an empty node) stays finite on a log axis


def shape_measurements(source: Mapping) -> np.ndarray | None:
    """(N, 4) float32 measurements (columns :data:`SHAPE_MEASUREMENTS`) from a crop cache's arrays or the rows of
    nodes_index.csv; an existing ``shape_features`` part is passed on; None when the source lacks one of them
    (a cache written before they were stored). NaN (a node too thin for a surface) becomes the column's
    neutral value at scaling time."""
    if SHAPE_FEATURES_KEY in source:
        return np.asarray(source[SHAPE_FEATURES_KEY], dtype=np.float32)
    if not all(name in source for name in SHAPE_MEASUREMENTS):
        return None
    return np.stack([np.asarray(source[name], dtype=np.float32) for name in SHAPE_MEASUREMENTS], axis=1)


class ShapeEmbedding(nn.Module):
    """(B, 4) measurements -> (B, width): the plan's features picked and scaled, ``(f(x) - centre) / scale``
    (f = log for volumes; a missing value (NaN) becomes 0, the centre), then Linear + ReLU. The constants
    are non-persistent buffers: they come from the plans, so checkpoints hold only the learned weights."""

    def __init__(self, features: Sequence[ShapeFeature], width: int):
        super().__init__()
        unknown = [f.name for f in features if f.name not in SHAPE_MEASUREMENTS]
        if unknown:
            raise ValueError(f"unknown shape feature(s) {unknown}; known: {', '.join(SHAPE_MEASUREMENTS)}")
        if any(not f.scale > 0 for f in features):
            raise ValueError("every shape feature's scale must be > 0")
        self.names = tuple(f.name for f in features)
        self.register_buffer("columns", torch.tensor([SHAPE_MEASUREMENTS.index(f.name) for f in features]),
                             persistent=False)
        self.register_buffer("log", torch.tensor([bool(f.log) for f in features]), persistent=False)
        self.register_buffer("centre", torch.tensor([float(f.centre) for f in features]), persistent=False)
        self.register_buffer("scale", torch.tensor([float(f.scale) for f in features]), persistent=False)
        self.embed = nn.Sequential(nn.Linear(len(features), width), nn.ReLU(inplace=True))
        self.width = int(width)

    def scaled(self, measurements: torch.Tensor) -> torch.Tensor:
        """(B, 4) physical measurements -> (B, F) scaled features of the plan."""
        if measurements.ndim != 2 or measurements.shape[1] != len(SHAPE_MEASUREMENTS):
            raise ValueError(f"{SHAPE_FEATURES_KEY} must be (B, {len(SHAPE_MEASUREMENTS)}) "
                             f"({', '.join(SHAPE_MEASUREMENTS)}), got {tuple(measurements.shape)}")
        x = measurements[:, self.columns].float()
        x = torch.where(self.log, torch.log(x.clamp_min(LOG_FLOOR)), x)
        x = (x - self.centre) / self.scale
        return torch.nan_to_num(x, nan=0.0)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Batch dict -> (B, width) embedding of its ``shape_features``."""
        if SHAPE_FEATURES_KEY not in batch:
            raise ValueError(f"the plan's hybrid head needs the batch part '{SHAPE_FEATURES_KEY}' (node shape "
                             "measurements): caches written before they were stored need lnm_plan_and_preprocess "
                             "again; code passing a network only some batch parts should use "
                             "networks.inputs.network_inputs")
        return self.embed(self.scaled(batch[SHAPE_FEATURES_KEY]))


def shape_embedding(features: Sequence[ShapeFeature], width: int) -> ShapeEmbedding | None:
    """The embedding of a plan's hybrid-head features, or None when the plan lists none (head off)."""
    return ShapeEmbedding(features, width) if features else None
