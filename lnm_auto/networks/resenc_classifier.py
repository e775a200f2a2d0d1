"""Configuration ``3d_resenc``: nnU-Net's residual encoder + global average pooling + a linear head.

With the plan's hybrid head the linear head reads [pooled features, shape embedding] (shape_head.py).
This is WeGA's local branch; ``self.encoder`` is a plain dynamic-network-architectures
``ResidualEncoder`` so that its weights can be reused (a global-local configuration, pretrained
nnU-Net ResEnc encoders).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from torch import nn

from lnm_auto.networks.inputs import scale_input
from lnm_auto.networks.shape_head import shape_embedding
from lnm_auto.plans.network_topology import ResEncTopology
from lnm_auto.plans.plans import SHAPE_EMBEDDING_WIDTH
from lnm_auto.plans.plans import ShapeFeature


def build_resenc_encoder(topology: ResEncTopology, in_channels: int) -> ResidualEncoder:
    """The dynamic-network-architectures ResidualEncoder of a ResEnc topology."""
    return ResidualEncoder(
        input_channels=in_channels,
        n_stages=topology.n_stages,
        features_per_stage=list(topology.features_per_stage),
        conv_op=nn.Conv3d,
        kernel_sizes=[list(k) for k in topology.kernel_sizes],
        strides=[list(s) for s in topology.strides],
        n_blocks_per_stage=list(topology.n_blocks_per_stage),
        conv_bias=True,
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        return_skips=False,
    )


def pad_to_multiple(x: torch.Tensor, multiple: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad the spatial axes of (B, C, *spatial) to a multiple of ``multiple``, centred.

    DNA's BasicBlockD adds a strided conv (ceil) to an average-pooled skip (floor): odd sizes at a
    strided stage would not add up. Inputs are z-scored, so zero is the mean intensity.
    """
    pads = []
    for n, m in zip(reversed(x.shape[2:]), reversed(multiple)):
        extra = (-n) % m
        pads += [extra // 2, extra - extra // 2]
    if any(pads):
        x = F.pad(x, pads)
    return x


class ResEncClassifier(nn.Module):
    """``forward({"image_global": (B, C, Z, Y, X)[, "mask_global"]}) -> {"fused": (B,)}``; with
    ``mask_channel`` the node mask is appended as a channel, so C + 1 == ``in_channels``. ``shape_features``
    (the plan's hybrid head; empty: off) adds their embedding to the head's input, read from the batch's
    ``shape_features``."""

    def __init__(self, topology: ResEncTopology, in_channels: int, mask_channel: bool = False,
                 shape_features: tuple[ShapeFeature, ...] | list[ShapeFeature] = ()):
        super().__init__()
        self.topology = topology
        self.in_channels = int(in_channels)
        self.mask_channel = bool(mask_channel)
        self.encoder = build_resenc_encoder(topology, self.in_channels)
        self.total_stride = topology.total_stride
        self.dropout = nn.Dropout(p=topology.dropout)
        # a module only when on (None otherwise): the head-off network keeps today's parameter names
        self.shape_embedding = shape_embedding(shape_features, SHAPE_EMBEDDING_WIDTH)
        self.head = nn.Linear(topology.features_per_stage[-1] + (SHAPE_EMBEDDING_WIDTH if shape_features else 0), 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, Z, Y, X) -> pooled encoder features (B, F)."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"3d_resenc expects (B, {self.in_channels}, Z, Y, X), got {tuple(x.shape)}")
        x = pad_to_multiple(x, self.total_stride)
        x = self.encoder(x)
        return x.mean(dim=(2, 3, 4))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Batch dict -> ``{"fused"}`` logits (B,)."""
        x = scale_input(batch, "global", self.mask_channel, self.in_channels, "3d_resenc")
        feats = self.dropout(self.features(x))
        if self.shape_embedding is not None:
            feats = torch.cat([feats, self.shape_embedding(batch)], dim=1)
        logit = self.head(feats)
        return {"fused": logit.reshape(x.shape[0])}
