"""Configuration ``2d25``: the two-stream 2.5D multi-scale fusion network of Li et al. (MICCAI 2024).

Per stream (global = node ROI at plan scale, local = zoomed-in ROI):

1. the Z slices are cut into groups of 3 consecutive slices (``topology.slice_group_starts``);
   each group is a 2D image with 3 * C channels, ordered channel-major (c0 s0, c0 s1, c0 s2, c1 s0,
   ...), so for C = 1 the three slices take the place of RGB;
2. a timm backbone (``features_only``, last three levels, strides 8 / 16 / 32; never downloaded): a
   MobileNetV3 from scratch, or the plan's ImageNet-pretrained ``efficientnet_lite0`` (its weights are loaded
   for training by ``networks.imagenet_weights``; checkpoints carry them). A pretrained backbone sees the image
   channels windowed (the topology's ``input_window`` of z-scores -> [0, 1]) and ImageNet-normalised, the
   slice triplet of the first image channel where RGB was; the node mask stays 0 / 1, and the stem's filters
   for the input planes after the first three (``SplitStem.extra``) start at zero;
3. an FPN over those three levels (torchvision); every level is globally average-pooled, the three
   vectors concatenated and fused by a 1x1 conv (multi-scale fusion). With the topology's ``mask_use``
   "pooling" the node mask is not an input plane: the backbone sees the image planes only, and every level is
   also pooled with the group's node mask as weights (:func:`mask_weighted_mean`), next to the plain mean;
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
from lnm_auto.plans.network_topology import TwoStreamTopology
from lnm_auto.plans.two_stream_topology import IMAGENET_WEIGHTS, MASK_USES
from lnm_auto.utils.errors import LNMError
from lnm_auto.plans.plans import SHAPE_EMBEDDING_WIDTH
from lnm_auto.plans.plans import ShapeFeature


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


class ImageNetInput(nn.Module):
    """Grouped 2D images (N, 3C, Y, X) as an ImageNet backbone expects them: the first ``3 * n_image_channels``
    planes (z-scores) windowed onto [0, 1] and normalised with the weights' mean / std by position in the slice
    triplet (slice 0, 1, 2 where R, G, B were); the planes after them (the node mask) unchanged. No parameters
    and non-persistent buffers: the state dict is the same as without it."""

    def __init__(self, n_image_channels: int, window: tuple[float, float], mean, std):
        super().__init__()
        self.n_planes = 3 * int(n_image_channels)
        self.low, self.width = float(window[0]), float(window[1]) - float(window[0])
        planes = torch.arange(self.n_planes) % 3
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32)[planes][:, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32)[planes][:, None, None], persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = ((images[:, :self.n_planes] - self.low) / self.width).clamp(0.0, 1.0)
        normalised = (pixels - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        return torch.cat([normalised, images[:, self.n_planes:]], dim=1)


def imagenet_input(topology: TwoStreamTopology, n_image_channels: int) -> ImageNetInput | None:
    """The input transform of a pretrained topology (None: raw z-scores, as a backbone trained from scratch)."""
    if not topology.pretrained_weights:
        return None
    window = topology.input_window
    if topology.pretrained_weights not in IMAGENET_WEIGHTS or window is None or not window[0] < window[1]:
        # only a hand-edited plans file gets here
        raise LNMError(f"the plans' 2d25 network: pretrained_weights {topology.pretrained_weights!r} needs a known id "
                       f"({', '.join(IMAGENET_WEIGHTS)}) and an input_window [low, high] with low < high, got "
                       f"{None if window is None else list(window)}; re-plan, or set all three pretrained fields to null")
    w = IMAGENET_WEIGHTS[topology.pretrained_weights]
    return ImageNetInput(n_image_channels, topology.input_window, w.mean, w.std)


class SplitStem(nn.Module):
    """The stem conv of a pretrained backbone over 3 + E input planes, as two convs whose outputs are summed
    (the same function and FLOPs as one conv over all planes): ``pretrained`` over the first 3 (ImageNet's
    filters) and ``extra`` over the other E (the node mask, further image channels), initialised to zero so the
    pretrained stem first sees exactly the image it was trained on. ``extra`` holds new weights, so the recipe
    trains it at the head's learning rate, not the backbone's."""

    def __init__(self, stem: nn.Conv2d):
        super().__init__()
        conv = dict(kernel_size=stem.kernel_size, stride=stem.stride, padding=stem.padding, bias=False)
        self.pretrained = nn.Conv2d(3, stem.out_channels, **conv)
        self.extra = nn.Conv2d(stem.in_channels - 3, stem.out_channels, **conv)
        nn.init.zeros_(self.extra.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pretrained(x[:, :3]) + self.extra(x[:, 3:])


def group_mask_weights(mask: torch.Tensor, starts: tuple[int, ...]) -> torch.Tensor:
    """(B, 1, Z, Y, X) node mask -> (B * G, 1, Y, X): per group of 3 slices the mean of its slices' masks."""
    return group_slices(mask, starts).mean(dim=1, keepdim=True)


def mask_weighted_mean(features: torch.Tensor, weights: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(N, F, y, x) feature map, (N, 1, Y, X) weights >= 0 -> (N, F, 1, 1) weighted spatial mean, the weights
    resized to (y, x) by area averaging (the share of each feature pixel the node covers). A sample whose weights
    are (nearly) all zero, a group of slices the node is not in, gets the plain mean instead."""
    w = F.adaptive_avg_pool2d(weights.to(features.dtype), features.shape[-2:])
    total = w.sum(dim=(2, 3), keepdim=True)
    weighted = (features * w).sum(dim=(2, 3), keepdim=True) / total.clamp_min(eps)
    return torch.where(total > eps, weighted, features.mean(dim=(2, 3), keepdim=True))


class Stream(nn.Module):
    """One stream: backbone + FPN + multi-scale fusion per group, then slice fusion. ``in_channels`` counts the
    input's channels; with ``mask_pooling`` its last channel is the node mask, which the backbone does not see:
    it weights a second pooling of every FPN level instead."""

    def __init__(self, backbone: str, in_channels: int, fpn_channels: int, fused_channels: int,
                 starts: tuple[int, ...], input_transform: nn.Module | None = None, mask_pooling: bool = False):
        super().__init__()
        self.starts = tuple(int(s) for s in starts)
        self.input_transform = input_transform
        self.mask_pooling = bool(mask_pooling)
        backbone_channels = in_channels - int(self.mask_pooling)
        self.backbone = timm.create_model(backbone, pretrained=False, features_only=True,
                                          in_chans=3 * backbone_channels, out_indices=(-3, -2, -1))
        if input_transform is not None and 3 * backbone_channels > 3:
            self.backbone.conv_stem = SplitStem(self.backbone.conv_stem)
        channels = list(self.backbone.feature_info.channels())
        self.fpn = FeaturePyramidNetwork(channels, fpn_channels)
        # pooling: [plain mean, mask-weighted mean] per level; the plain mean keeps the context around the node
        pooled = 3 * fpn_channels * (2 if self.mask_pooling else 1)
        self.scale_fusion = nn.Sequential(nn.Conv2d(pooled, fused_channels, 1), nn.ReLU(inplace=True))
        self.slice_fusion = nn.Sequential(nn.Conv2d(len(self.starts) * fused_channels, fused_channels, 1),
                                          nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, Z, Y, X) -> stream features (B, F)."""
        b = x.shape[0]
        if self.mask_pooling:
            x, weights = x[:, :-1], group_mask_weights(x[:, -1:], self.starts)   # (B*G, 1, Y, X)
        images = group_slices(x, self.starts)                               # (B*G, 3C, Y, X)
        if self.input_transform is not None:
            images = self.input_transform(images)
        levels = self.backbone(images)
        pyramid = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(levels)))
        pooled = [p.mean(dim=(2, 3), keepdim=True) for p in pyramid.values()]
        if self.mask_pooling:
            pooled += [mask_weighted_mean(p, weights) for p in pyramid.values()]
        pooled = torch.cat(pooled, dim=1)
        per_group = self.scale_fusion(pooled)                               # (B*G, F, 1, 1)
        stacked = per_group.reshape(b, -1, 1, 1)                            # (B, G*F, 1, 1) group-major
        return self.slice_fusion(stacked).flatten(1)                        # (B, F)


class TwoStreamNet(nn.Module):
    """``forward({"image_global": (B,C,Z,Y,X), "image_local": (B,C,Z',Y',X')[, "mask_global", "mask_local"]})
    -> {"fused", "global", "local"}`` (logits (B,)); with ``mask_channel`` the node masks are appended as a
    channel, so C + 1 == ``in_channels``; the topology's ``mask_use`` says whether the backbones' stems see it or
    the FPN levels are pooled with it (without ``mask_channel`` there is no mask and ``mask_use`` changes nothing). ``shape_features`` (the plan's hybrid head; empty: off) adds their
    embedding to the fused classifier's input, read from the batch's ``shape_features``."""

    def __init__(self, topology: TwoStreamTopology, in_channels: int, mask_channel: bool = False,
                 shape_features: tuple[ShapeFeature, ...] | list[ShapeFeature] = ()):
        super().__init__()
        self.topology = topology
        self.in_channels = int(in_channels)
        self.mask_channel = bool(mask_channel)
        t = topology
        if t.mask_use not in MASK_USES:
            raise ValueError(f"2d25: unknown mask_use {t.mask_use!r}; known: {MASK_USES}")
        n_image = self.in_channels - int(self.mask_channel)
        pooling = self.mask_channel and t.mask_use == "pooling"
        self.global_stream = Stream(t.backbone, self.in_channels, t.fpn_channels, t.fused_channels,
                                    t.slice_group_starts, imagenet_input(t, n_image), pooling)
        self.local_stream = Stream(t.backbone, self.in_channels, t.fpn_channels, t.fused_channels, t.local_starts,
                                   imagenet_input(t, n_image), pooling)
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
