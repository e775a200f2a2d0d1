"""The trainer: one fixed recipe (the plan's), one epoch loop, one training step; variants override hooks.

Recipe: SGD (momentum 0.9, Nesterov), the plan's learning rate with cosine annealing per epoch, the
plan's batch size with positive oversampling, gradient-norm clipping at 12, the plan's augmentation in
background workers; per epoch validation AUROC on the fold's validation patients (at the finest labelled
level, see training/validation.py), ``checkpoint_best`` by an EMA (0.9 old + 0.1 new) of it,
``checkpoint_latest`` every epoch, ``checkpoint_final`` at the end.

The fold's cases, log and validation export are FoldTrainer's (training/fold_trainer.py), shared with the
classifier trainers. Hooks a variant overrides (nothing else; see ``TRAINER_HOOKS``): ``default_num_epochs``,
``paired_default_epochs``, ``build_network``, ``configure_optimizers``, ``training_records``, ``validation_records``,
``batch_groups``, ``make_loader``, ``steps_per_epoch``, ``network_outputs``, ``compute_loss``, ``after_optimizer_step``,
``on_train_start``, ``on_epoch_start``, ``on_epoch_end``, ``on_train_end``, ``checkpoint_state`` /
``restore_state``, ``validate`` (WSP pre-training has nothing to validate).

Under torchrun / ``-num_gpus`` every process runs this loop; ``self.distributed`` (training/distributed.py) splits
batches and validation over the ranks, and only rank 0 writes files (documentation/scaling.md).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from lnm_auto.configurations.networks import network_for
from lnm_auto.networks import (backbone_lr_groups, freeze_depthwise_filters, load_imagenet_backbones,
                               load_pretrained_weights)
from lnm_auto.networks.node_predictor import predict_node_crops
from lnm_auto.plans.plans import Plans
from lnm_auto.training.data import BatchGroup, NodeBatchLoader, batch_to_device, load_batch, training_batches
from lnm_auto.training.fold_trainer import FoldTrainer
from lnm_auto.training.lr_schedule import warmup_cosine_schedule
from lnm_auto.training.progress import progress_bar
from lnm_auto.utils.checkpoints import load_checkpoint, save_checkpoint
from lnm_auto.utils.errors import LNMError

GRAD_CLIP_NORM = 12.0
# what a network trainer variant may override (a test holds every registered trainer to it)
TRAINER_HOOKS = ("default_num_epochs", "paired_default_epochs", "build_network", "configure_optimizers",
                 "training_records", "validation_records", "batch_groups", "make_loader", "steps_per_epoch",
                 "network_outputs", "compute_loss", "after_optimizer_step", "on_train_start", "on_epoch_start",
                 "on_epoch_end", "on_train_end", "checkpoint_state", "restore_state", "validate", "initialize")
EMA_KEEP = 0.9


class LNMTrainer(FoldTrainer):
    """Supervised training of the configuration's network on the node-labelled nodes of one fold."""

    imagenet_weights = ""   # build_network's line on the plan's ImageNet backbone weights ("": none loaded)

    def __init__(self, plans: Plans, configuration: str, fold: int | str, preprocessed_dataset: Path,
                 output_folder: Path, device: str = "cpu", num_epochs: int | None = None, seed: int = 12345,
                 num_workers: int | None = None, splits: list[dict] | None = None, raw_root: Path | None = None):
        super().__init__(plans, configuration, fold, preprocessed_dataset, output_folder, device, num_epochs, seed,
                         num_workers, splits, raw_root)
        self.best_ema: float | None = None
        self.ema_auroc: float | None = None

    def initialize(self) -> None:
        """The fold's data and log (FoldTrainer), then the network (ImageNet backbone weights loaded), optimizer
        and schedule."""
        super().initialize()
        torch.manual_seed(self.seed)  # same initial weights for the same seed
        self.network = self.build_network()
        self.forward_module = self.network   # what a training step's forward goes through (see _replicated_network)
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        self.loss_fn = nn.BCEWithLogitsLoss()
        if self.imagenet_weights:
            self.log.print(self.imagenet_weights)

    # ---- hooks: what to learn from ------------------------------------------------------------------
    def build_network(self) -> nn.Module:
        """The configuration's network, as the plans size it, with the plan's ImageNet backbone weights if any (their
        depthwise filters fixed where the recipe says so)."""
        network = network_for(self.plans, self.config)
        self.imagenet_weights = load_imagenet_backbones(network)   # "" without; prediction loads checkpoints instead
        if self.imagenet_weights and self.config.recipe.freeze_depthwise:
            self.imagenet_weights += f"; {freeze_depthwise_filters(network)} depthwise filters kept as loaded"
        return network.to(self.device)

    def configure_optimizers(self):
        """(optimizer, per-epoch lr scheduler): the recipe's optimizer (SGD with Nesterov momentum, or AdamW for
        wega's ViT) at its learning rate, cosine-annealed per epoch; a pretrained backbone at the recipe's
        ``backbone_lr_factor`` x that lr, and the recipe's ``warmup_fraction`` of the epochs ramping up first."""
        r = self.config.recipe
        if r.optimizer == "SGD":
            trained = [p for p in self.network.parameters() if p.requires_grad]
            params = backbone_lr_groups(trained, self.network, r.initial_lr, r.backbone_lr_factor)
            opt = torch.optim.SGD(params, lr=r.initial_lr, momentum=r.momentum,
                                  weight_decay=r.weight_decay, nesterov=True)
        elif r.optimizer == "AdamW":
            # as ViTs are trained: no weight decay on biases, norms and LayerScale (1-D tensors)
            params = [p for p in self.network.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(backbone_lr_groups(
                [{"params": [p for p in params if p.ndim > 1], "weight_decay": r.weight_decay},
                 {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
                self.network, r.initial_lr, r.backbone_lr_factor), lr=r.initial_lr)
        else:
            raise LNMError(f"plans {self.plans.plans_name}, configuration {self.config.name}: unknown recipe optimizer "
                           f"'{r.optimizer}' (use SGD or AdamW)")
        return opt, warmup_cosine_schedule(opt, self.num_epochs, r.warmup_fraction)

    def batch_groups(self, records: pd.DataFrame) -> list[BatchGroup]:
        """What one batch is made of: the plan's batch of labelled nodes with positive oversampling."""
        r = self.config.recipe
        return [BatchGroup("labelled", records, r.batch_size, r.positive_fraction)]

    def make_loader(self, records: pd.DataFrame, seed: int):
        """The endless batch source of one epoch."""
        return NodeBatchLoader(self.store, self.batch_groups(records), self.config.scales, seed,
                               max(self.num_workers, 1))

    def steps_per_epoch(self, records: pd.DataFrame) -> int:
        """One pass over the training nodes."""
        return max(1, math.ceil(len(records) / self.config.recipe.batch_size))

    # ---- hooks: the step ----------------------------------------------------------------------------
    def network_outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """The forward pass of a training step (through ``forward_module``: under torchrun the DDP replica)."""
        return self.forward_module(batch)

    def compute_loss(self, outputs: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
        """Eq. 1 of Li et al.: the sum of BCE over every classification head (every (B,) output)."""
        return sum(self.loss_fn(logits, batch["label"]) for logits in outputs.values() if logits.ndim == 1)

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step (mean teacher: the EMA update)."""

    def on_epoch_start(self) -> None:
        """Called before each epoch."""

    def on_epoch_end(self) -> None:
        """Called after each epoch's validation, before checkpoint_latest is written."""

    def on_train_end(self) -> None:
        """checkpoint_final.pth (checkpoint_latest.pth then goes, as in nnU-Net: --c resumes from final), then
        the fold's validation predictions."""
        self.save_checkpoint("checkpoint_final.pth")
        if self.distributed.is_main:
            (self.output_folder / "checkpoint_latest.pth").unlink(missing_ok=True)
        self.export_validation("checkpoint_final.pth")

    # ---- the loop -----------------------------------------------------------------------------------
    def train_step(self, batch: dict) -> float:
        """forward -> loss -> backward -> clip -> step: the only place any trainer updates weights."""
        self.optimizer.zero_grad(set_to_none=True)
        with self._replicated_network():
            loss = self.compute_loss(self.network_outputs(batch), batch)
            loss.backward()
        self.distributed.synchronize_step(self.network, self.optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], GRAD_CLIP_NORM)
        self.optimizer.step()
        self.after_optimizer_step()
        return float(loss.detach())

    @contextmanager
    def _replicated_network(self):
        """In a step's forward and backward ``forward_module`` is the DDP replica of ``network`` (gradients averaged
        over the ranks); ``network`` itself is never replaced (checkpoints, EMA teacher and validation use it)."""
        self.forward_module = self.distributed.replica(self.network)
        try:
            yield
        finally:
            self.forward_module = self.network

    def run_training(self, stop_after_epoch: int | None = None) -> None:
        """Train from ``current_epoch`` to ``num_epochs`` (or stop early after ``stop_after_epoch``)."""
        records = self.training_records()
        # once per node under torchrun (the other ranks wait)
        self.distributed.node_leader_first(self.store.unpack, sorted(set(self.train_cases) | set(self.val_cases)))
        val = self.validation_records()
        batch = self.config.recipe.batch_size
        self.distributed.batch_share(self.config)   # refuses more ranks than the batch has nodes, before any work
        self.log.print(f"training {self.trainer_name} {self.plans.plans_name} {self.config.name} fold {self.fold}: "
                       f"{len(records)} training nodes ({int((records.label == 1).sum())} positive), "
                       f"{len(val)} validation nodes, {self.num_epochs} epochs, batch {batch}, device {self.device}, "
                       f"{self.num_workers} data worker(s){self.distributed.describe_batch(batch)}")
        self.on_train_start()
        while self.current_epoch < self.num_epochs:
            if stop_after_epoch is not None and self.current_epoch >= stop_after_epoch:
                break
            self._train_one_epoch(records)
        if self.current_epoch >= self.num_epochs:
            self.on_train_end()
        self.distributed.barrier()   # the other ranks leave once rank 0 has written everything

    def _train_one_epoch(self, records: pd.DataFrame) -> None:
        self.on_epoch_start()
        self.network.train()
        # batches depend on (seed, epoch, rank) only: exact resume
        epoch_seed = self.distributed.seed(self.seed * 100003 + self.current_epoch)
        torch.manual_seed(epoch_seed)
        batches = training_batches(self.plans, self.config, self._rank_loader(records, epoch_seed), epoch_seed,
                                   self.num_workers)
        n_steps = self.steps_per_epoch(records)
        t0, wait, losses, crops = time.perf_counter(), 0.0, [], 0
        bar = progress_bar(n_steps, f"epoch {self.current_epoch + 1}/{self.num_epochs}")
        try:
            for _ in range(n_steps):
                tw = time.perf_counter()
                batch = batch_to_device(next(batches), self.device)
                wait += time.perf_counter() - tw
                # every sample the step's forward passes see (teacher views too); x world size below: all ranks'
                crops += int(batch["label"].shape[0])
                losses.append(self.train_step(batch))
                bar.update()
                bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        finally:
            bar.close()
            if hasattr(batches, "_finish"):
                batches._finish()
        lr = self.optimizer.param_groups[0]["lr"]
        self.lr_scheduler.step()
        val = self.validate()
        self.ema_auroc = val["auroc"] if self.ema_auroc is None or math.isnan(self.ema_auroc) else \
            EMA_KEEP * self.ema_auroc + (1 - EMA_KEEP) * val["auroc"]
        elapsed = time.perf_counter() - t0
        self.log.append(train_loss=np.mean(losses), val_loss=val["loss"], val_auroc=val["auroc"],
                        ema_auroc=self.ema_auroc, lr=lr, epoch_time_s=elapsed, data_wait_fraction=wait / elapsed)
        self.current_epoch += 1
        self.log.print(f"epoch {self.current_epoch}/{self.num_epochs}: train loss {np.mean(losses):.4f}, val loss "
                       f"{val['loss']:.4f}, val AUROC {val['auroc']:.4f} (EMA {self.ema_auroc:.4f}, {val['level']} level)"
                       f", lr {lr:.2e}, {elapsed:.1f} s, {crops * self.distributed.world_size / elapsed:.1f} crops/s, "
                       f"waiting for data {100 * wait / elapsed:.0f}%")
        if not math.isnan(self.ema_auroc) and (self.best_ema is None or self.ema_auroc > self.best_ema):
            self.best_ema = self.ema_auroc
            self.save_checkpoint("checkpoint_best.pth")
            self.log.print(f"new best EMA AUROC {self.best_ema:.4f}: checkpoint_best.pth written", echo=False)
        self.on_epoch_end()
        self.save_checkpoint("checkpoint_latest.pth")
        self.log.plot(self.output_folder / "progress.png", force=self.current_epoch >= self.num_epochs)

    def _rank_loader(self, records: pd.DataFrame, seed: int):
        """This rank's batch source: ``make_loader`` sees this rank's share of the plan's batch in
        ``self.config`` (all of it in one process); steps per epoch and the rest keep the plan's global batch."""
        plan_config, self.config = self.config, self.distributed.batch_share(self.config)
        try:
            return self.make_loader(records, seed)
        finally:
            self.config = plan_config

    # ---- validation -----------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        """Called once before the first epoch of this process (also after --c): says what validation is on."""
        self.say_validation_level()

    def predict_records(self, records: pd.DataFrame, network: nn.Module | None = None) -> np.ndarray:
        """Probabilities (fused head) of cached nodes: the same code path as lnm_predict. Under torchrun each rank
        predicts its shard and every rank gets all of them (every rank must call this with the same records)."""
        network = network or self.network
        bs = max(1, self.config.recipe.batch_size)
        mine = self.distributed.shard(records)
        probs = [predict_node_crops(network, load_batch(self.store, mine.iloc[i:i + bs], self.config.scales),
                                    self.plans, self.config, self.device, bs)
                 for i in range(0, len(mine), bs)]
        return self.distributed.gather(np.concatenate(probs) if probs else np.zeros(0), len(records), self.device)

    # ---- checkpoints -------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        """What a checkpoint holds: tensors, numbers and strings only (loadable with weights_only=True)."""
        return {
            "network_weights": self.network.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "lr_scheduler_state": self.lr_scheduler.state_dict(),
            "logging": self.log.state(),
            "current_epoch": self.current_epoch,
            "num_epochs": self.num_epochs,
            "best_ema": None if self.best_ema is None else float(self.best_ema),
            "ema_auroc": None if self.ema_auroc is None else float(self.ema_auroc),
            "trainer_name": self.trainer_name,
            "configuration": self.config.name,
            "plans_identifier": self.plans.identifier(),
            "fold": str(self.fold),
            "rng_torch": torch.get_rng_state(),  # batches and augmentation are re-seeded from (seed, epoch)
        }

    def save_checkpoint(self, name: str) -> None:
        """Write ``checkpoint_state()`` atomically into the fold folder (rank 0 only: every rank holds the same)."""
        if self.distributed.is_main:
            save_checkpoint(self.checkpoint_state(), self.output_folder / name)

    def load_checkpoint(self, path: Path) -> dict:
        """Restore the run from one of its own checkpoints (``--c``)."""
        path = Path(path)
        ckpt = load_checkpoint(path, self.plans.identifier(), self.device)
        if ckpt.get("trainer_name") != self.trainer_name or ckpt.get("configuration") != self.config.name:
            raise LNMError(f"{path}: written by {ckpt.get('trainer_name')} / {ckpt.get('configuration')}, not "
                           f"{self.trainer_name} / {self.config.name}")
        if "fold" in ckpt and str(ckpt["fold"]) != str(self.fold):   # it has trained on this fold's validation cases
            raise LNMError(f"{path}: written by a run of fold {ckpt['fold']}, not fold {self.fold}; continue each fold "
                           "from its own checkpoint")
        self.restore_state(ckpt, path)
        self.initial_weights = str(path)
        return ckpt

    def restore_state(self, ckpt: dict, path: Path) -> None:
        """Put a checkpoint's state back (variants restore their own parts after calling this)."""
        try:
            self.network.load_state_dict(ckpt["network_weights"])
            self.optimizer.load_state_dict(ckpt["optimizer_state"])
        except (RuntimeError, ValueError, KeyError):
            raise LNMError(f"{path}: does not fit the current network; start again without --c") from None
        self.lr_scheduler.load_state_dict(ckpt["lr_scheduler_state"])
        self.log.load_state(ckpt["logging"])
        self.current_epoch = int(ckpt["current_epoch"])
        self.best_ema, self.ema_auroc = ckpt["best_ema"], ckpt["ema_auroc"]
        torch.set_rng_state(ckpt["rng_torch"].cpu())

    def load_pretrained(self, path: Path) -> dict:
        """Initialise the network from the matching tensors of a weights file (-pretrained_weights)."""
        report = load_pretrained_weights(self.network, path)
        self.initial_weights = str(path)
        self.log.print(f"pretrained weights {path}: {len(report['matched'])} tensors loaded, {len(report['missing'])} "
                       f"network tensors not in the file, {len(report['unexpected'])} file tensors unused, "
                       f"{len(report['shape_mismatch'])} shape mismatches")
        return report
