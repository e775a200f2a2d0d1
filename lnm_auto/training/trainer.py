"""The trainer: one fixed recipe (the plan's), variants override small named hooks.

Recipe: SGD (momentum 0.9, Nesterov), the plan's learning rate with cosine annealing per epoch, the
plan's batch size with positive oversampling, gradient-norm clipping at 12, augmentation in background
workers; per epoch validation AUROC on the fold's validation patients, ``checkpoint_best`` by an EMA
(0.9 old + 0.1 new) of it, ``checkpoint_latest`` every epoch, ``checkpoint_final`` at the end.
Hooks a variant may override: ``training_records``, ``compute_loss``, ``train_step``, ``on_epoch_start``,
``on_epoch_end``, ``initial_num_epochs``, ``batch_groups``, ``make_loader``, ``checkpoint_state``.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm import tqdm

from lnm_auto.networks import build_network, load_pretrained_weights
from lnm_auto.inference.node_predictor import network_inputs, predict_crops
from lnm_auto.planning.plans import ConfigurationPlan, Plans
from lnm_auto.training.data import BatchGroup, CropStore, NodeBatchLoader, load_batch, training_batches
from lnm_auto.training.progress import TrainingLog
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import atomic_path, save_csv_atomic, save_json

TRAINERS: dict[str, type["LNMTrainer"]] = {}
GRAD_CLIP_NORM = 12.0
EMA_KEEP = 0.9


def get_trainer_class(name: str) -> type["LNMTrainer"]:
    import lnm_auto.training.semi_supervised  # noqa: F401  (registers its trainers)
    import lnm_auto.training.weak  # noqa: F401
    if name not in TRAINERS:
        raise LNMError(f"unknown trainer '{name}'; available: {', '.join(sorted(TRAINERS))}")
    return TRAINERS[name]


def to_tensors(batch: dict, config: ConfigurationPlan, device: torch.device) -> dict[str, torch.Tensor]:
    """A loader/augmenter batch -> network inputs plus the labels."""
    out = network_inputs({s: batch[f"data_{s}"] for s in config.scales}, {s: batch[f"seg_{s}"] for s in config.scales},
                         config, device)
    out["label"] = torch.from_numpy(np.asarray(batch["label"], dtype=np.float32)).to(device)
    for key in ("group", "view", "bag"):         # sample bookkeeping of the semi-/weakly-supervised loaders
        if key in batch:
            out[key] = torch.from_numpy(np.asarray(batch[key], dtype=np.int64)).to(device)
    if "bag_label" in batch:
        out["bag_label"] = torch.from_numpy(np.asarray(batch["bag_label"], dtype=np.float32)).to(device)
    return out


class LNMTrainer:
    """Supervised training on the node-labelled nodes of one fold."""

    needs_supervised_start = False   # semi-supervised variants start from a supervised model

    def __init_subclass__(cls, register: bool = True, **kwargs):
        super().__init_subclass__(**kwargs)
        if register:   # selectable with lnm_train -tr NAME
            TRAINERS[cls.__name__] = cls

    def __init__(self, plans: Plans, configuration: str, fold: int | str, preprocessed_dataset: Path,
                 output_folder: Path, device: str = "cpu", num_epochs: int | None = None, seed: int = 12345,
                 num_workers: int | None = None, splits: list[dict] | None = None):
        self.plans = plans
        self.config = plans.configuration(configuration)
        self.fold = fold
        self.preprocessed_dataset = Path(preprocessed_dataset)
        self.output_folder = Path(output_folder)
        self.device = torch.device(device)
        self.seed = seed
        self.num_epochs = int(num_epochs or self.initial_num_epochs())
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.crops_dir = self.preprocessed_dataset / f"{plans.plans_name}_crops"
        index_file = self.crops_dir / "nodes_index.csv"
        if not index_file.is_file():
            raise LNMError(f"{index_file}: missing; run lnm_plan_and_preprocess -d {plans.dataset_name} first")
        self.nodes = pd.read_csv(index_file, dtype={"case": str, "station": str}, keep_default_na=False)
        self.train_cases, self.val_cases = self._fold_cases(splits)
        self.store = CropStore(self.crops_dir, self.config.scales)
        n_in = len(plans.normalization) + int(self.config.use_mask_channel)
        torch.manual_seed(seed)  # same initial weights for the same seed
        self.network = build_network(self.config.network, n_in).to(self.device)
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.output_folder.mkdir(parents=True, exist_ok=True)
        self.log = TrainingLog(self.output_folder / "training_log.txt")
        self.current_epoch = 0
        self.best_ema: float | None = None
        self.ema_auroc: float | None = None

    # ---- recipe pieces (hooks) -------------------------------------------------------------------
    def initial_num_epochs(self) -> int:
        return self.plans.configuration(self.config.name).recipe.num_epochs

    def configure_optimizers(self):
        r = self.config.recipe
        opt = torch.optim.SGD(self.network.parameters(), lr=r.initial_lr, momentum=r.momentum,
                              weight_decay=r.weight_decay, nesterov=True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.num_epochs)
        return opt, sched

    def training_records(self) -> pd.DataFrame:
        """Nodes this trainer learns from: the node-labelled nodes of the training cases."""
        df = self.nodes[self.nodes["case"].isin(self.train_cases) & (self.nodes["label"] >= 0)]
        if df.empty:
            raise LNMError(f"fold {self.fold} has no node-labelled training nodes; this trainer needs node labels "
                           "(see documentation/trainers.md for weakly supervised trainers)")
        return df

    def validation_records(self) -> pd.DataFrame:
        return self.nodes[self.nodes["case"].isin(self.val_cases) & (self.nodes["label"] >= 0)]

    def make_loader(self, records: pd.DataFrame, seed: int):
        return NodeBatchLoader(self.store, self.batch_groups(records), self.config.scales, seed,
                               max(self.num_workers, 1))

    def batch_groups(self, records: pd.DataFrame) -> list[BatchGroup]:
        """What one batch is made of: here the plan's batch of labelled nodes with positive oversampling."""
        r = self.config.recipe
        return [BatchGroup(records, r.batch_size, r.positive_fraction)]

    def compute_loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Eq. 1 of Li et al.: the sum of BCE over every head (fused + side heads)."""
        return sum(self.loss_fn(logits, batch["label"]) for logits in outputs.values())

    def train_step(self, batch: dict[str, torch.Tensor]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.compute_loss(self.network(batch), batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), GRAD_CLIP_NORM)
        self.optimizer.step()
        return float(loss.detach())

    def on_epoch_start(self) -> None:
        pass

    def on_epoch_end(self) -> None:
        pass

    # ---- the loop ---------------------------------------------------------------------------------
    def steps_per_epoch(self, n_records: int) -> int:
        return max(1, math.ceil(n_records / self.config.recipe.batch_size))

    def run_training(self, stop_after_epoch: int | None = None) -> None:
        records = self.training_records()
        self.store.unpack(sorted(set(self.train_cases) | set(self.val_cases)))
        self.log.print(f"training {type(self).__name__} {self.plans.plans_name} {self.config.name} fold {self.fold}: "
                       f"{len(records)} training nodes ({int((records.label == 1).sum())} positive), "
                       f"{len(self.validation_records())} validation nodes, {self.num_epochs} epochs, "
                       f"batch {self.config.recipe.batch_size}, device {self.device}, {self.num_workers} data worker(s)")
        while self.current_epoch < self.num_epochs:
            if stop_after_epoch is not None and self.current_epoch >= stop_after_epoch:
                return
            self._train_one_epoch(records)
        self.save_checkpoint("checkpoint_final.pth")
        self.export_validation()

    def _train_one_epoch(self, records: pd.DataFrame) -> None:
        self.on_epoch_start()
        self.network.train()
        epoch_seed = self.seed * 100003 + self.current_epoch  # batches depend on (seed, epoch) only: exact resume
        torch.manual_seed(epoch_seed)
        loader = self.make_loader(records, epoch_seed)
        batches = training_batches(self.plans, self.config, loader, epoch_seed, self.num_workers)
        n_steps = self.steps_per_epoch(len(records))
        t0, wait, losses = time.perf_counter(), 0.0, []
        bar = tqdm(range(n_steps), desc=f"epoch {self.current_epoch + 1}/{self.num_epochs}", leave=False,
                   disable=not _show_progress())
        try:
            for _ in bar:
                tw = time.perf_counter()
                batch = to_tensors(next(batches), self.config, self.device)
                wait += time.perf_counter() - tw
                losses.append(self.train_step(batch))
                rate = len(losses) * self.config.recipe.batch_size / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{np.mean(losses):.4f}", nodes_per_s=f"{rate:.1f}")
        finally:
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
                       f"{val['loss']:.4f}, val AUROC {val['auroc']:.4f} (EMA {self.ema_auroc:.4f}), lr {lr:.2e}, "
                       f"{elapsed:.1f} s, waiting for data {100 * wait / elapsed:.0f}%")
        if not math.isnan(self.ema_auroc) and (self.best_ema is None or self.ema_auroc > self.best_ema):
            self.best_ema = self.ema_auroc
            self.save_checkpoint("checkpoint_best.pth")
            self.log.print(f"new best EMA AUROC {self.best_ema:.4f}: checkpoint_best.pth written", echo=False)
        self.on_epoch_end()
        self.save_checkpoint("checkpoint_latest.pth")
        self.log.plot(self.output_folder / "progress.png")

    # ---- validation -------------------------------------------------------------------------------
    def predict_records(self, records: pd.DataFrame, network: nn.Module | None = None) -> np.ndarray:
        """Probabilities (fused head) for cached nodes: the same code path as lnm_predict."""
        network = network or self.network
        bs = max(1, self.config.recipe.batch_size)
        probs = []
        for start in range(0, len(records), bs):
            batch = load_batch(self.store, records.iloc[start:start + bs], self.config.scales)
            crops = {k.replace("data_", "image_").replace("seg_", "mask_"): (v[:, 0] if k.startswith("seg_") else v)
                     for k, v in batch.items() if k.startswith(("data_", "seg_"))}
            probs.append(predict_crops(network, crops, self.plans, self.config, self.device, bs))
        return np.concatenate(probs) if probs else np.zeros(0)

    def validate(self) -> dict:
        records = self.validation_records()
        if records.empty:
            return {"loss": float("nan"), "auroc": float("nan"), "probabilities": np.zeros(0)}
        p = self.predict_records(records)
        y = records["label"].to_numpy(dtype=float)
        eps = 1e-7
        loss = float(-np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps)))
        auroc = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")
        return {"loss": loss, "auroc": auroc, "probabilities": p}

    def export_validation(self) -> None:
        """validation/nodes.csv (the fold's validation predictions) and validation/metrics.json."""
        from lnm_auto.evaluation.metrics import binary_metrics
        records = self.validation_records()
        out = self.output_folder / "validation"
        p = self.predict_records(records) if len(records) else np.zeros(0)
        df = records[["case", "node", "station", "label"]].assign(probability=p)
        save_csv_atomic(df, out / "nodes.csv")
        metrics = binary_metrics(df["label"].to_numpy(), p) if len(df) else {}
        save_json({"fold": self.fold, "checkpoint": "checkpoint_final.pth", "n_nodes": len(df),
                   "n_positive": int((df["label"] == 1).sum()), **_json_safe(metrics)}, out / "metrics.json")
        self.log.print(f"validation of fold {self.fold}: AUROC {metrics.get('auroc', float('nan')):.4f} on "
                       f"{len(df)} nodes -> {out}")

    # ---- checkpoints ------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        return {
            "network_weights": self.network.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "lr_scheduler_state": self.lr_scheduler.state_dict(),
            "logging": self.log.state(),
            "current_epoch": self.current_epoch,
            "num_epochs": self.num_epochs,
            "best_ema": self.best_ema,
            "ema_auroc": self.ema_auroc,
            "trainer_name": type(self).__name__,
            "configuration": self.config.name,
            "fold": self.fold,
            "rng_torch": torch.get_rng_state(),  # batches and augmentation are re-seeded from (seed, epoch)
        }

    def save_checkpoint(self, name: str) -> None:
        with atomic_path(self.output_folder / name, suffix=".pth") as tmp:
            torch.save(self.checkpoint_state(), tmp)

    def load_checkpoint(self, path: Path) -> dict:
        """Restore the run from a checkpoint; returns the checkpoint for variants' own state."""
        path = Path(path)
        try:
            ckpt = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is reported as such
            raise LNMError(f"{path}: cannot be loaded as a checkpoint ({str(e).splitlines()[0][:150]})") from None
        if ckpt.get("trainer_name") != type(self).__name__ or ckpt.get("configuration") != self.config.name:
            raise LNMError(f"{path}: written by {ckpt.get('trainer_name')} / {ckpt.get('configuration')}, not "
                           f"{type(self).__name__} / {self.config.name}")
        try:
            self.network.load_state_dict(ckpt["network_weights"])
            self.optimizer.load_state_dict(ckpt["optimizer_state"])
        except (RuntimeError, ValueError, KeyError):
            raise LNMError(f"{path}: does not fit the current network (were the plans changed after this run "
                           "started?); start again without --c, or restore the old plans") from None
        self.lr_scheduler.load_state_dict(ckpt["lr_scheduler_state"])
        self.log.load_state(ckpt["logging"])
        self.current_epoch = int(ckpt["current_epoch"])
        self.best_ema, self.ema_auroc = ckpt["best_ema"], ckpt["ema_auroc"]
        torch.set_rng_state(ckpt["rng_torch"].cpu())
        return ckpt

    def load_pretrained(self, path: Path) -> dict:
        report = load_pretrained_weights(self.network, path)
        self.log.print(f"pretrained weights {path}: {len(report['matched'])} tensors loaded, {len(report['missing'])} "
                       f"network tensors not in the file, {len(report['unexpected'])} file tensors unused, "
                       f"{len(report['shape_mismatch'])} shape mismatches")
        return report

    # ---- folds ------------------------------------------------------------------------------------
    def _fold_cases(self, splits: list[dict] | None) -> tuple[list[str], list[str]]:
        all_cases = sorted(self.nodes["case"].unique())
        if self.fold == "all":
            return all_cases, all_cases   # no held-out data: validation is on the training cases
        if splits is None:
            raise LNMError("splits are needed for a numbered fold")
        k = int(self.fold)
        if not 0 <= k < len(splits):
            raise LNMError(f"fold {k} is out of range: the splits have folds 0..{len(splits) - 1} (or use 'all')")
        return splits[k]["train"], splits[k]["val"]


TRAINERS[LNMTrainer.__name__] = LNMTrainer


class LNMTrainer_5epochs(LNMTrainer):
    """The recipe with 5 epochs: demos and smoke tests."""

    def initial_num_epochs(self) -> int:
        return 5


class LNMTrainer_2epochs(LNMTrainer):
    """The recipe with 2 epochs: unit tests."""

    def initial_num_epochs(self) -> int:
        return 2


def default_num_workers() -> int:
    """Background augmentation processes: $LNM_n_proc_DA, else one less than the cores (at least 1)."""
    env = os.environ.get("LNM_n_proc_DA")
    if env is not None:
        if not env.strip().isdigit():
            raise LNMError(f"$LNM_n_proc_DA must be a whole number of worker processes, got '{env}'")
        return int(env)
    return max(1, (os.cpu_count() or 2) - 1)


def _show_progress() -> bool:
    return os.environ.get("LNM_NO_PROGRESS", "0") != "1"


def _json_safe(obj):
    """NaN -> None (JSON has no NaN), numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item"):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
