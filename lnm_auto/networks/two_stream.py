"""Configuration ``2d25``: the two-stream 2.5D multi-scale fusion network of Li et al. (MICCAI 2024).

Per stream (global = node ROI at plan scale, local = zoomed-in ROI):

1. the Z slices are cut into groups of 3 consecutive slices (``topology.slice_group_starts``);
   each group is a 2D image with 3 * C channels, ordered channel-major (c0 s0, c0 s1, c0 s2, c1 s0,
   ...), so for C = 1 the three slices take the place of RGB;
2. a timm MobileNetV3 (``features_only``, last three levels, strides 8 / 16 / 32; never
   pretrained here - load weights with ``lnm_auto.networks.load_pretrained_weights``);
3. an FPN over those three levels (torchvision); every level is globally average-pooled, the three
   vectors concatenated and fused by a 1x1 conv (multi-scale fusion);
4. the per-group features, stacked along channels, are fused by a 1x1 conv (slice fusion) into the
   stream feature; a side classifier gives the stream's logit.

The two stream features are concatenated and fused by a 1x1 conv; the fused classifier gives
``"fused"``, the prediction (with the plan's hybrid head, of [fused features, shape embedding]: shape_head.py). Outputs ``{"fused", "global", "local"}``, each (B,); the trainer sums
their BCE (eq. 1 of the paper). The fusion convs are followed by ReLU; dropout precedes every
classifier.
"""
from __future__ import annotations

from collections import OrderedDict

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from lnm_auto.networks.inputs import scale_input
from lnm_auto.networks.shape_head import shape_embedding
from lnm_auto.planning.network_topology import TwoStreamTopology
from lnm_auto.planning.planner import SHAPE_EMBEDDING_WIDTH
from lnm_auto.planning.plans import ShapeFeature


def group_slices(x: torch.Tensor, starts: tuple[int, ...]) -> torch.Tensor:
    """(B, C, Z, Y, X) -> (B * G, 3 * C, Y, X), one 2D image per group of 3 slices.

    Z < 3 is padded by repeating the edge slices (Z = 1: s0 s0 s0; Z = 2: s0 s1 s1). Otherwise Z
    must be exactly ``starts[-1] + 3`` (the plan's slice count).
    """
    if x.ndim != 5:
        raise ValueError(f"2d25 expects (B, C, Z, Y, X), got {tuple(x.shape)}")
    b, c, z, y, w = x.shape
    if z < 3:
        x = F.pad(x, (0, 0, 0, 0, 0, 3 - z), mode="replicate")
        z = 3
    if z != starts[-1] + 3 or starts[0] != 0:
        raise ValueError(f"2d25 input has {z} slices but the topology's slice groups {starts} were planned "
                         f"for {starts[-1] + 3}")
    idx = torch.tensor(starts, device=x.device)[:, None] + torch.arange(3, device=x.device)  # (G, 3)
    g = idx.shape[0]
    groups = x[:, :, idx]                                    # (B, C, G, 3, Y, X)
    groups = groups.permute(0, 2, 1, 3, 4, 5)                # (B, G, C, 3, Y, X)
    return groups.reshape(b * g, 3 * c, y, w)


class Stream(nn.Module):
    """One stream: MobileNetV3 + FPN + multi-scale fusion per group, then slice fusion."""

    def __init__(self, backbone: str, in_channels: int, fpn_channels: int, fused_channels: int,
                 starts: tuple[int, ...]):
        super().__init__()
        self.starts = tuple(int(s) for s in starts)
        self.backbone = timm.create_model(backbone, pretrained=False, features_only=True,
                                          in_chans=3 * in_channels, out_indices=(-3, -2, -1))
        channels = list(self.backbone.feature_info.channels())
        self.fpn = FeaturePyramidNetwork(channels, fpn_channels)
        self.scale_fusion = nn.Sequential(nn.Conv2d(3 * fpn_channels, fused_channels, 1), nn.ReLU(inplace=True))
        self.slice_fusion = nn.Sequential(nn.Conv2d(len(self.starts) * fused_channels, fused_channels, 1),
                                          nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, Z, Y, X) -> stream features (B, F)."""
        b = x.shape[0]
        images = group_slices(x, self.starts)                               # (B*G, 3C, Y, X)
        levels = self.backbone(images)
        pyramid = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(levels)))
        pooled = torch.cat([p.mean(dim=(2, 3), keepdim=True) for p in pyramid.values()], dim=1)
        per_group = self.scale_fusion(pooled)                               # (B*G, F, 1, 1)
        stacked = per_group.reshape(b, -1, 1, 1)                            # (B, G*F, 1, 1) group-major
        return self.slice_fusion(stacked).flatten(1)                        # (B, F)


class TwoStreamNet(nn.Module):
    """``forward({"image_global": (B,C,Z,Y,X), "image_local": (B,C,Z',Y',X')[, "mask_global", "mask_local"]})
    -> {"fused", "global", "local"}`` (logits (B,)); with ``mask_channel`` the node masks are appended as a
    channel, so C + 1 == ``in_channels``. ``shape_features`` (the plan's hybrid head; empty: off) adds their
    embedding to the fused classifier's input, read from the batch's ``shape_features``."""

    def __init__(self, topology: TwoStreamTopology, in_channels: int, mask_channel: bool = False,
                 shape_features: tuple[ShapeFeature, ...] | list[ShapeFeature] = ()):
        super().__init__()
        self.topology = topology
        self.in_channels = int(in_channels)
        self.mask_channel = bool(mask_channel)
        t = topology
        self.global_stream = Stream(t.backbone, self.in_channels, t.fpn_channels, t.fused_channels,
                                    t.slice_group_starts)
        self.local_stream = Stream(t.backbone, self.in_channels, t.fpn_channels, t.fused_channels, t.local_starts)
        self.stream_fusion = nn.Sequential(nn.Conv2d(2 * t.fused_channels, t.fused_channels, 1), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(p=t.dropout)
        self.global_head = nn.Linear(t.fused_channels, 1)
        self.local_head = nn.Linear(t.fused_channels, 1)
        # a module only when on (None otherwise): the head-off network keeps today's parameter names
        self.shape_embedding = shape_embedding(shape_features, SHAPE_EMBEDDING_WIDTH)
        self.fused_head = nn.Linear(t.fused_channels + (SHAPE_EMBEDDING_WIDTH if shape_features else 0), 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Batch dict -> ``{"fused", "global", "local"}`` logits (B,)."""
        xg, xl = (scale_input(batch, s, self.mask_channel, self.in_channels, "2d25") for s in ("global", "local"))
        if xg.shape[0] != xl.shape[0]:
            raise ValueError(f"2d25: global and local batch sizes differ ({xg.shape[0]} vs {xl.shape[0]})")
        b = xg.shape[0]
        fg = self.global_stream(xg)
        fl = self.local_stream(xl)
        fused = self.dropout(self.stream_fusion(torch.cat([fg, fl], dim=1)[:, :, None, None]).flatten(1))
        if self.shape_embedding is not None:
            fused = torch.cat([fused, self.shape_embedding(batch)], dim=1)
        return {
            "fused": self.fused_head(fused).reshape(b),
            "global": self.global_head(self.dropout(fg)).reshape(b),
            "local": self.local_head(self.dropout(fl)).reshape(b),
        }
