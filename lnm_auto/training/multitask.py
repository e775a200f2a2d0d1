"""Multi-task training (M2ANet): the node mask as a second task next to the metastasis label.

``-tr LNMTrainerMultiTask`` on ``2d25``, ``3d_resenc`` or ``wega`` turns the configuration's multi-task
switch on (``planner.switch_on_multitask``: the head planned from the plans, unless the plans already
hold one), so the network is ``MultiTaskNet`` around the configuration's network. ``setup_trainer`` turns it
on in its own copy of the plans, before the trainer is built, and saves that copy into the model folder, so
``lnm_predict`` builds the same network from the folder's plans.json (``network_for``). Loss:

    sum of BCE over the classification heads (fused, base, side heads)
    + mask_loss_weight * (voxel BCE + (1 - Dice)) of ``mask_logits`` against the batch's ``mask_<scale>``

``mask_loss_weight`` is the head's (planned 1.0). documentation/wega_multitask.md.
"""
from __future__ import annotations

import torch

from lnm_auto.networks.inputs import mask_key
from lnm_auto.training.losses import dice_bce_loss
from lnm_auto.training.trainer import LNMTrainer


class LNMTrainerMultiTask(LNMTrainer):
    """Supervised training of the configuration's network with the multi-task (node mask) head."""

    multitask = True   # setup_trainer gives it plans with the configuration's multi-task switch on

    def compute_loss(self, outputs: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
        """BCE over every (B,) head + the head's weight x Dice-BCE of the predicted node mask."""
        head = self.config.multitask
        mask_loss = dice_bce_loss(outputs["mask_logits"], batch[mask_key(head.mask_scale)])
        return super().compute_loss(outputs, batch) + head.mask_loss_weight * mask_loss
