"""The recipe's per-epoch learning-rate schedule: cosine annealing, after a linear warm-up when the recipe plans
one (fine-tuning an ImageNet-pretrained backbone, documentation/pretrained_weights.md)."""
from __future__ import annotations

import math

import torch


def warmup_epochs(num_epochs: int, warmup_fraction: float) -> int:
    """Epochs of linear warm-up: the fraction of the run, rounded up, leaving at least one epoch after it."""
    return max(0, min(math.ceil(warmup_fraction * num_epochs - 1e-9), num_epochs - 1))


def warmup_cosine_schedule(opt: torch.optim.Optimizer, num_epochs: int, warmup_fraction: float):
    """Without warm-up: the cosine annealing of every plan so far (the same scheduler, so their checkpoints
    resume). With w warm-up epochs: epoch e < w runs at (e + 1) / (w + 1) x each group's lr, then cosine
    annealing over the other epochs, from the full lr."""
    w = warmup_epochs(num_epochs, warmup_fraction)
    if w == 0:
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=num_epochs)
    rest = num_epochs - w
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: (e + 1) / (w + 1) if e < w else 0.5 * (1 + math.cos(math.pi * (e - w) / rest)))
