"""Multi-task head (M2ANet, Med Biol Eng Comput 2025) around any configuration's network.

``MultiTaskNet(base, topology)`` wraps a built ``2d25`` (:class:`TwoStreamNet`), ``3d_resenc``
(:class:`ResEncClassifier`) or ``wega`` (:class:`WegaNet`) network without changing it:

1. forward hooks collect the base's *shared features* while it runs its own forward: the stage
   outputs of the ResidualEncoder (``3d_resenc``: ``encoder``; ``wega``: ``local_encoder``), or the
   finest FPN level (stride 8) of the 2.5D stream of the mask scale (``2d25``); a forward pre-hook
   collects the input of the base's final classifier (its node representation);
2. a light decoder turns those features into a map (B, W, S, R, Cc) at the mask scale's resolution:
   ResEnc - FPN-style top-down path of 1x1x1 lateral convs, upsample + add + LeakyReLU; 2.5D - a 3x3
   conv per group image, each group's map spread over its 3 slices (averaged where groups overlap)
   and upsampled in-plane;
3. ``mask_logits`` = 1x1x1 conv of that map (the node mask as a second task, Dice + BCE);
4. mask-weighted attention pooling: ``alpha = softmax_v(a_v + log w_v)`` over voxels v, with a_v a
   learned 1x1x1 attention logit and w the soft expansion of the node mask (``soft_mask.py``; w = 0
   voxels get no weight), pooled = sum_v alpha_v f_v;
5. ``fused`` = Linear([base representation, dropout(pooled)]) is the prediction; the base's own
   ``fused`` becomes the side head ``base``; its other side heads are kept.

Hooks are bound methods of modules inside this wrapper, so ``copy.deepcopy`` (the mean teacher)
rebinds them to the copy. The base must not be fed the node mask (``mask_channel=False``):
predicting a mask that is an input channel would be the identity.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lnm_auto.networks.resenc_classifier import ResEncClassifier
from lnm_auto.networks.soft_mask import soft_mask_expansion
from lnm_auto.networks.two_stream import TwoStreamNet
from lnm_auto.networks.wega import WegaNet
from lnm_auto.plans.multitask_topology import MultiTaskTopology


class ResEncMaskFeatures(nn.Module):
    """Top-down decoder over the stage outputs of a dynamic-network-architectures ResidualEncoder."""

    def __init__(self, encoder: nn.Module, width: int):
        super().__init__()
        self.laterals = nn.ModuleList(nn.Conv3d(c, width, 1) for c in encoder.output_channels)
        self.nonlin = nn.LeakyReLU(inplace=True)
        self._stage_outputs: list[torch.Tensor] = []
        encoder.stages[0].register_forward_hook(self._start_stage_outputs)
        for stage in encoder.stages[1:]:
            stage.register_forward_hook(self._keep_stage_output)

    def _start_stage_outputs(self, module, args, output) -> None:
        # a new encoder pass: drop what an earlier pass (e.g. the base run on its own) left behind
        self._stage_outputs = [output]

    def _keep_stage_output(self, module, args, output) -> None:
        self._stage_outputs.append(output)

    def feature_map(self, spatial_shape) -> torch.Tensor:
        """(B, W, S, R, Cc): decoder features at stage 0's resolution, centre-cropped from the padded input."""
        feats, self._stage_outputs = self._stage_outputs, []
        if len(feats) != len(self.laterals):
            raise RuntimeError(f"expected {len(self.laterals)} encoder stage outputs, got {len(feats)}")
        x = self.laterals[-1](feats[-1])
        for lateral, skip in zip(reversed(self.laterals[:-1]), reversed(feats[:-1])):
            up = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = self.nonlin(up + lateral(skip))
        # the classifiers zero-pad their input (centred) to a multiple of the total stride: undo it
        starts = [(n - s) // 2 for n, s in zip(x.shape[2:], spatial_shape)]
        return x[(...,) + tuple(slice(a, a + s) for a, s in zip(starts, spatial_shape))]


class TwoStreamMaskFeatures(nn.Module):
    """Decoder over the finest FPN level of one 2.5D stream (one map per group of 3 slices)."""

    def __init__(self, stream: nn.Module, fpn_channels: int, width: int):
        super().__init__()
        self.starts = tuple(stream.starts)
        self.project = nn.Sequential(nn.Conv2d(fpn_channels, width, 3, padding=1), nn.ReLU(inplace=True))
        self._level: torch.Tensor | None = None
        stream.fpn.register_forward_hook(self._keep_finest_level)

    def _keep_finest_level(self, module, args, output) -> None:
        self._level = next(iter(output.values()))      # stride 8, (B * G, fpn, R / 8, Cc / 8)

    def slice_assignment(self, n_slices: int, device) -> torch.Tensor:
        """(S, G): 1 / (number of groups covering slice s) where group g covers s (edges repeated for S < 3)."""
        a = torch.zeros(n_slices, len(self.starts), device=device)
        for g, s0 in enumerate(self.starts):
            for k in range(3):
                a[min(s0 + k, n_slices - 1), g] = 1.0
        return a / a.sum(dim=1, keepdim=True)

    def feature_map(self, spatial_shape) -> torch.Tensor:
        """(B, W, S, R, Cc): per-group maps spread over their slices, upsampled in-plane."""
        level, self._level = self._level, None
        if level is None:
            raise RuntimeError("the 2.5D stream did not run")
        maps = self.project(level)
        maps = maps.reshape(-1, len(self.starts), *maps.shape[1:])                     # (B, G, W, y, x)
        volume = torch.einsum("bgwyx,sg->bwsyx", maps, self.slice_assignment(spatial_shape[0], maps.device))
        return F.interpolate(volume, size=tuple(spatial_shape), mode="trilinear", align_corners=False)


def _features_and_head(base: nn.Module, topology: MultiTaskTopology, width: int) -> tuple[nn.Module, nn.Linear]:
    """The decoder for ``base``'s shared features and ``base``'s final classifier."""
    if isinstance(base, ResEncClassifier):
        return ResEncMaskFeatures(base.encoder, width), base.head
    if isinstance(base, WegaNet):
        if topology.mask_scale != base.topology.node_scale:
            raise ValueError(f"wega's local branch sees scale {base.topology.node_scale!r}; the mask head must "
                             f"use it, not {topology.mask_scale!r}")
        return ResEncMaskFeatures(base.local_encoder, width), base.fused_head
    if isinstance(base, TwoStreamNet):
        streams = {"global": base.global_stream, "local": base.local_stream}
        if topology.mask_scale not in streams:
            raise ValueError(f"2d25 streams are 'global' and 'local', not {topology.mask_scale!r}")
        return TwoStreamMaskFeatures(streams[topology.mask_scale], base.topology.fpn_channels, width), base.fused_head
    raise TypeError(f"no multi-task head for a {type(base).__name__}")


class MultiTaskNet(nn.Module):
    """Base network + node-mask decoder + soft-mask attention pooling; see the module docstring."""

    def __init__(self, base: nn.Module, topology: MultiTaskTopology):
        super().__init__()
        if getattr(base, "mask_channel", False):
            raise ValueError("multi-task head: build the base network with mask_channel=False (a mask fed as "
                             "input makes predicting it trivial)")
        self.topology = topology
        self.base = base
        width = topology.decoder_channels
        self.mask_features, base_head = _features_and_head(base, topology, width)
        self._representation: torch.Tensor | None = None
        base_head.register_forward_pre_hook(self._keep_representation)
        self.mask_head = nn.Conv3d(width, 1, 1)
        self.attention_logits = nn.Conv3d(width, 1, 1)
        self.dropout = nn.Dropout(p=topology.dropout)
        self.fused_head = nn.Linear(base_head.in_features + width, 1)

    def _keep_representation(self, module, args) -> None:
        if self._representation is None:       # the final classifier runs once per forward; keep that call
            self._representation = args[0]

    def soft_mask_weights(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, R, Cc) node mask -> soft expansion weights of the same shape (no gradient)."""
        t = self.topology
        return soft_mask_expansion(mask, t.soft_mask_width_vox, t.soft_mask_kind)

    def attention_pooling(self, features: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, W, S, R, Cc) features, (B, 1, S, R, Cc) weights -> pooled (B, W), alpha (B, S*R*Cc) summing to 1."""
        log_w = torch.where(weights > 0, weights.clamp_min(1e-12).log(), torch.full_like(weights, float("-inf")))
        alpha = torch.softmax(self.attention_logits(features).flatten(1) + log_w.flatten(1), dim=1)
        return torch.einsum("bn,bwn->bw", alpha, features.flatten(2)), alpha

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The base's outputs (its ``fused`` renamed ``base``) + the new ``fused`` + ``mask_logits``."""
        key = f"mask_{self.topology.mask_scale}"
        if key not in inputs:
            raise ValueError(f"multi-task head needs inputs[{key!r}] (the node mask); got {sorted(inputs)}")
        mask = inputs[key]
        self._representation = None
        base_out = self.base(inputs)
        representation, self._representation = self._representation, None
        features = self.mask_features.feature_map(mask.shape[2:])
        pooled, _ = self.attention_pooling(features, self.soft_mask_weights(mask))
        b = mask.shape[0]
        fused = self.fused_head(torch.cat([representation, self.dropout(pooled)], dim=1)).reshape(b)
        side = {k: v for k, v in base_out.items() if k != "fused"}
        return {"fused": fused, "base": base_out["fused"], **side, "mask_logits": self.mask_head(features)}
