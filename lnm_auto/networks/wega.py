"""Configuration ``wega``: global-local affinity network (WeGA, arXiv 2505.10502), as lnm_auto builds it.

``forward(inputs) -> {"fused", "global", "local"}`` (each (B,) logits). ``inputs`` holds
``image_<scale>`` (B, C, S, R, Cc) and ``mask_<scale>`` (B, 1, S, R, Cc) for the topology's
``context_scale`` (large in-plane field, few slices) and ``node_scale`` (the node ROI).

1. Global branch: a timm ViT with the DINOv2 architecture (``vit_small_patch14_dinov2``: patch 14,
   LayerScale, cls token; sized by the topology, never pretrained here). Every group of 3
   consecutive context slices of every image channel is one 3-channel image (the slices stand where
   RGB would be, so DINOv2's patch embedding fits as is). ``dynamic_img_size``: any context size
   works; the position embedding is interpolated when it differs from the planned one.
   With ``mask_channel`` the node mask marks the context tokens it covers: token +=
   (mask fraction of the patch) x a learned node embedding (the ViT itself stays an RGB DINOv2).
2. Local branch: ``3d_resenc``'s ResidualEncoder on the node ROI (+ the mask as last channel); its bottleneck
   voxels, linearly projected to the ViT width, are the local tokens.
3. Global-local affinity extractor: a pre-norm cross-attention block (``nn.MultiheadAttention``)
   in which the local tokens query all global tokens, + an MLP; the mean of the attended local
   tokens and the mean of the ViT cls tokens are fused (Linear + GELU) into the node representation.
4. Heads: ``fused`` on the node representation; side heads ``global`` (cls tokens) and ``local``
   (pooled encoder features).
"""
from __future__ import annotations

import os

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from lnm_auto.networks.inputs import image_key, mask_key, scale_input
from lnm_auto.networks.pretrained import _WRAPPER_KEYS, load_pretrained_weights
from lnm_auto.networks.resenc_classifier import build_resenc_encoder, pad_to_multiple
from lnm_auto.networks.two_stream import group_slices
from lnm_auto.plans.global_local_topology import MLP_RATIO, PATCH_SIZE, WegaTopology

TIMM_DINOV2_ARCHITECTURE = "vit_small_patch14_dinov2"


def build_dinov2_vit(topology: WegaTopology) -> nn.Module:
    """timm ViT with the DINOv2 architecture at the topology's size (no classifier, never pretrained)."""
    return timm.create_model(TIMM_DINOV2_ARCHITECTURE, pretrained=False, num_classes=0,
                             img_size=topology.context_image_size, embed_dim=topology.embed_dim,
                             depth=topology.depth, num_heads=topology.num_heads,
                             init_values=topology.layer_scale_init, dynamic_img_size=True)


class CrossAttentionBlock(nn.Module):
    """Pre-norm transformer block whose attention takes queries from one token set, keys/values from another."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = MLP_RATIO):
        super().__init__()
        self.norm_query = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Nq, D), (B, Nk, D) -> attended queries (B, Nq, D), weights (B, Nq, Nk) averaged over heads."""
        kv = self.norm_context(context)
        attended, weights = self.attention(self.norm_query(queries), kv, kv, need_weights=True,
                                           average_attn_weights=True)
        x = queries + attended
        return x + self.mlp(self.norm_mlp(x)), weights


class WegaNet(nn.Module):
    """ViT global branch + ResEnc local branch + cross-attention fusion; see the module docstring."""

    def __init__(self, topology: WegaTopology, in_channels: int, mask_channel: bool = False):
        super().__init__()
        t = topology
        self.topology = t
        self.in_channels = int(in_channels)
        self.mask_channel = bool(mask_channel)
        self.image_channels = self.in_channels - int(self.mask_channel)
        if self.image_channels < 1:
            raise ValueError(f"wega needs at least one image channel, got in_channels={in_channels} "
                             f"(mask_channel={self.mask_channel})")
        d, f_last = t.embed_dim, t.local.features_per_stage[-1]
        self.global_vit = build_dinov2_vit(t)
        self.local_encoder = build_resenc_encoder(t.local, self.in_channels)
        self.local_projection = nn.Linear(f_last, d)
        self.node_embedding = nn.Parameter(0.02 * torch.randn(d)) if self.mask_channel else None
        self.affinity = CrossAttentionBlock(d, t.fusion_heads)
        self.fusion = nn.Sequential(nn.Linear(2 * d, d), nn.GELU())
        self.dropout = nn.Dropout(p=t.dropout)
        self.fused_head = nn.Linear(d, 1)
        self.global_head = nn.Linear(d, 1) if t.side_heads else None
        self.local_head = nn.Linear(f_last, 1) if t.side_heads else None

    # ---- branches ---------------------------------------------------------------------------------
    def _context_input(self, inputs: dict[str, torch.Tensor], key: str, channels: int) -> torch.Tensor:
        if key not in inputs:
            raise ValueError(f"wega needs inputs[{key!r}]; got {sorted(inputs)}")
        x = inputs[key]
        if x.ndim != 5 or x.shape[1] != channels:
            raise ValueError(f"wega expects {key} of shape (B, {channels}, S, R, C), got {tuple(x.shape)}")
        return x

    def global_tokens(self, image: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Context (B, C, S, R, Cc) [+ mask (B, 1, ...)] -> tokens (B, C * G * (1 + patches), D).

        Token order: image channel, slice group, then the cls token followed by the patches.
        """
        b, c = image.shape[:2]
        starts = self.topology.context_slice_group_starts
        images = group_slices(image.reshape(b * c, 1, *image.shape[2:]), starts)     # (B*C*G, 3, R, Cc)
        tokens = self.global_vit.forward_features(images)                            # (B*C*G, 1 + N, D)
        n_tokens, d = tokens.shape[1:]
        tokens = tokens.reshape(b, c, -1, n_tokens, d)                               # (B, C, G, 1 + N, D)
        if mask is not None and self.node_embedding is not None:
            # fraction of each patch inside the node (mean over the group's 3 slices); 0 for the cls token
            frac = F.avg_pool2d(group_slices(mask, starts).mean(dim=1, keepdim=True), PATCH_SIZE)
            frac = F.pad(frac.flatten(1), (1, 0)).reshape(b, 1, -1, n_tokens, 1)     # (B, 1, G, 1 + N, 1)
            tokens = tokens + frac * self.node_embedding
        return tokens.reshape(b, -1, d)

    def local_features(self, x: torch.Tensor) -> torch.Tensor:
        """Node ROI input (B, in_channels, S, R, Cc) -> ResEnc bottleneck (B, F, s, r, c)."""
        return self.local_encoder(pad_to_multiple(x, self.topology.local.total_stride))

    def forward_features(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Node representation and what it is made of, incl. the attention weights (B, N_local, N_global)."""
        t = self.topology
        ctx_image = self._context_input(inputs, image_key(t.context_scale), self.image_channels)
        ctx_mask = self._context_input(inputs, mask_key(t.context_scale), 1) if self.mask_channel else None
        node_input = scale_input(inputs, t.node_scale, self.mask_channel, self.in_channels, "wega")
        if ctx_image.shape[0] != node_input.shape[0]:
            raise ValueError(f"wega: context and node batch sizes differ "
                             f"({ctx_image.shape[0]} vs {node_input.shape[0]})")
        global_tokens = self.global_tokens(ctx_image, ctx_mask)
        local_map = self.local_features(node_input)
        local_tokens = self.local_projection(local_map.flatten(2).transpose(1, 2))   # (B, N_local, D)
        attended, weights = self.affinity(local_tokens, global_tokens)
        n_per_image = global_tokens.shape[1] // (len(t.context_slice_group_starts) * self.image_channels)
        global_cls = global_tokens[:, ::n_per_image].mean(dim=1)                      # cls token of every image
        node = self.fusion(torch.cat([attended.mean(dim=1), global_cls], dim=1))
        return {"node": node, "global_cls": global_cls, "local_pooled": local_map.mean(dim=(2, 3, 4)),
                "attention": weights}

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"fused", "global", "local"}`` logits (B,); only ``"fused"`` without side heads."""
        feats = self.forward_features(inputs)
        b = feats["node"].shape[0]
        out = {"fused": self.fused_head(self.dropout(feats["node"])).reshape(b)}
        if self.global_head is not None:
            out["global"] = self.global_head(self.dropout(feats["global_cls"])).reshape(b)
            out["local"] = self.local_head(self.dropout(feats["local_pooled"])).reshape(b)
        return out

    # ---- pretrained global branch -----------------------------------------------------------------
    def load_global_weights(self, path: "str | os.PathLike", prefix_hint: str | None = None) -> dict:
        """Load a DINOv2 (ViT, patch 14) state dict file into the global branch; returns the key report.

        Keys as Meta's ``dinov2_vits14_pretrain.pth`` or timm's ViT (prefixes such as ``module.`` or
        ``teacher.backbone.`` are stripped). The position embedding is resampled (bicubic, timm) to
        the planned token grid when the file's grid differs (518 px -> 37 x 37 for DINOv2); it is then
        listed in ``matched`` and in ``resampled``. See ``load_pretrained_weights`` for the report.
        """
        report = load_pretrained_weights(self.global_vit, path, prefix_hint=prefix_hint)
        report["resampled"] = []
        mismatch = [m for m in report["shape_mismatch"] if m.startswith("pos_embed:")]
        if mismatch:
            source = _read_state_dict(path)[report["source_prefix"] + "pos_embed"]
            grid = self.global_vit.patch_embed.grid_size
            with torch.no_grad():
                self.global_vit.pos_embed.copy_(resample_abs_pos_embed(
                    source.to(self.global_vit.pos_embed.dtype), new_size=list(grid),
                    num_prefix_tokens=self.global_vit.num_prefix_tokens))
            report["shape_mismatch"].remove(mismatch[0])
            report["matched"] = sorted(report["matched"] + ["pos_embed"])
            report["missing"] = [k for k in report["missing"] if k != "pos_embed"]
            report["resampled"].append(f"pos_embed: {tuple(source.shape)} -> {tuple(self.global_vit.pos_embed.shape)}")
        return report


def _read_state_dict(path) -> dict:
    """The tensors of a weights file, unwrapped like ``load_pretrained_weights`` does (already validated there)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), dict):
            return obj[key]
    return obj
