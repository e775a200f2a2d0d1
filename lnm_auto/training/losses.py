"""Losses of the multi-task head and of the global-local configuration.

- :func:`head_bce_sum`: eq. 1 of Li et al. over every (B,) output; 5-D outputs (``mask_logits``) skipped.
- :func:`dice_bce_loss`: the node-mask task of M2ANet.
- :func:`regional_affinity_loss`: WeGA's regional coherence - nodes of a region (LN station, or a label
  of ``regionsTr/``) whose status is known must agree with it. Formula in the function docstring and
  in documentation/wega_multitask.md.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Margin kappa of the regional loss, in logits: log(3) asks negatives for p <= 0.25 and positive
# regions for a noisy-OR probability >= 0.75 (the paper's pseudo-label thresholds are 0.3 / 0.7).
REGIONAL_MARGIN = math.log(3.0)
DICE_SMOOTH = 1.0


def head_bce_sum(outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Sum of BCE-with-logits over every 1-D (B,) output against the node labels (B,)."""
    heads = [v for v in outputs.values() if v.ndim == 1]
    if not heads:
        raise ValueError(f"no (B,) logits among the outputs {sorted(outputs)}")
    return sum(F.binary_cross_entropy_with_logits(v, labels) for v in heads)


def dice_bce_loss(mask_logits: torch.Tensor, mask_target: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Mean voxel BCE + (1 - soft Dice), Dice per sample then averaged; inputs (B, 1, S, R, Cc).

    ``dice_b = (2 sum p t + smooth) / (sum p + sum t + smooth)`` with p = sigmoid(logits); the smoothing
    term keeps a crop without node voxels well defined (Dice 1 when p ~ 0 there).
    """
    if mask_logits.shape != mask_target.shape:
        raise ValueError(f"mask logits {tuple(mask_logits.shape)} and target {tuple(mask_target.shape)} differ")
    target = mask_target.to(mask_logits.dtype)
    bce = F.binary_cross_entropy_with_logits(mask_logits, target)
    p = torch.sigmoid(mask_logits).flatten(1)
    t = target.flatten(1)
    dice = (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return bce + (1 - dice).mean()


def noisy_or_logit(node_logits: torch.Tensor, region_index: torch.Tensor, n_regions: int) -> torch.Tensor:
    """Logit of P(region positive) = 1 - prod_i (1 - p_i) per region, computed in log space."""
    # s = -log P_neg = sum_i softplus(z_i); logit = log(P_pos / P_neg) = log(expm1(s)) = s + log(1 - exp(-s))
    s = torch.zeros(n_regions, dtype=node_logits.dtype, device=node_logits.device).index_add(
        0, region_index, F.softplus(node_logits)).clamp_min(1e-30)
    return s + torch.log(-torch.expm1(-s))


def regional_affinity_loss(node_logits: torch.Tensor, region_ids: torch.Tensor, region_labels: torch.Tensor,
                           margin: float = REGIONAL_MARGIN) -> torch.Tensor:
    """Hinge penalty on nodes that disagree with the known status of their region.

    ``node_logits`` (B,); ``region_ids`` (B,) int, index into ``region_labels`` or -1 (no region);
    ``region_labels`` (R,) 1 positive, 0 negative, -1 unknown. With kappa = ``margin``:

    - negative region r: ``L_r = mean_{i in r} relu(z_i + kappa)`` - every node must be benign;
    - positive region r: ``L_r = relu(kappa - Z_r)``, Z_r = logit of the noisy-OR probability of its
      nodes - at least one node must be malignant (a positive station may hold benign nodes, so no
      node is forced up on its own and benign members are not pushed towards their neighbours);
    - loss = mean of L_r over the regions with known status and at least one node in the batch
      (0 if there is none, still attached to the graph).

    It is exactly 0 when every node of a negative region has p <= sigmoid(-kappa) and every positive
    region has a noisy-OR probability >= sigmoid(kappa), and grows linearly in the logits beyond.
    """
    if node_logits.ndim != 1 or region_ids.shape != node_logits.shape:
        raise ValueError(f"node_logits and region_ids must both be (B,), got {tuple(node_logits.shape)} "
                         f"and {tuple(region_ids.shape)}")
    region_ids = region_ids.long()
    labels = region_labels.to(node_logits.device)
    in_region = region_ids >= 0
    known = torch.zeros_like(in_region)
    known[in_region] = labels[region_ids[in_region]] >= 0
    if not known.any():
        return node_logits.sum() * 0.0
    z, r = node_logits[known], region_ids[known]
    regions, index = torch.unique(r, return_inverse=True)
    status = labels[regions]
    n = len(regions)
    counts = torch.zeros(n, dtype=z.dtype, device=z.device).index_add(0, index, torch.ones_like(z))
    negative = torch.zeros(n, dtype=z.dtype, device=z.device).index_add(0, index, F.relu(z + margin)) / counts
    positive = F.relu(margin - noisy_or_logit(z, index, n))
    return torch.where(status > 0, positive, negative).mean()
