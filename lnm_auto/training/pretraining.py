"""WSP: weakly-supervised positional contrastive pre-training (Sarfati et al.), adapted to node ROIs.

Each sample is a node ROI (for 2d25: its slice groups through both streams) with two augmented views.
Target similarity between samples a and b: W_ab = K(d_a - d_b) * [y_a == y_b], where d is the node's
normalised position along the slice axis of its volume (0 = first slice, 1 = last) and y its weak label
(the station's pathology label if known, else the patient's; unknown labels only match themselves);
self-pairs removed, W normalised per anchor. Loss = -(1/N) sum_ab W_ab log softmax_b(z_a . z_b / tau).
Kernel: RBF exp(-dd^2 / (2 sigma^2)) with sigma = 0.1 (a tenth of the volume's extent: our choice for
node positions; WSP's published bandwidths refer to its own slice-index scale), tau = 0.1.
Negatives come from other patients: one node per patient per batch.
The result is the network's weights (heads untrained), loaded by ``lnm_train -pretrained_weights``.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lnm_auto.training.data import BatchGroup, NodeBatchLoader, training_batches
from lnm_auto.training.trainer import LNMTrainer, to_tensors
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import atomic_path

SIGMA = 0.1
TAU = 0.1
PROJECTION_DIM = 64


def position_kernel(d: torch.Tensor, kind: str = "rbf", sigma: float = SIGMA) -> torch.Tensor:
    """K on pairwise position differences: rbf (default), laplacian or discrete (|dd| < sigma)."""
    dd = d[:, None] - d[None, :]
    if kind == "rbf":
        return torch.exp(-dd ** 2 / (2 * sigma ** 2))
    if kind == "laplacian":
        return torch.exp(-dd.abs() / sigma)
    if kind == "discrete":
        return (dd.abs() < sigma).to(d.dtype)
    raise ValueError(f"unknown kernel {kind}")


def wsp_loss(z: torch.Tensor, positions: torch.Tensor, weak_labels: torch.Tensor, sigma: float = SIGMA,
             tau: float = TAU, kernel: str = "rbf") -> torch.Tensor:
    """Kernel- and label-weighted InfoNCE over the batch (z: (N, D) embeddings, L2-normalised here)."""
    z = F.normalize(z, dim=1)
    n = len(z)
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    w = position_kernel(positions, kernel, sigma) * (weak_labels[:, None] == weak_labels[None, :]).to(z.dtype)
    w = w.masked_fill(eye, 0.0)
    w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
    logits = (z @ z.T / tau).masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -(w * log_prob.masked_fill(eye, 0.0)).sum(dim=1).mean()


def feature_layer(network: nn.Module) -> nn.Module:
    """The layer whose input is the network's final (fused) feature vector."""
    for name in ("fused_head", "head"):
        if hasattr(network, name):
            return getattr(network, name)
    raise LNMError(f"{type(network).__name__} has no fused_head/head: WSP pre-training cannot find its features")


class OnePerPatientLoader(NodeBatchLoader):
    """Batches of nodes from distinct patients (negatives from other patients only), two views each."""

    def __init__(self, store, records: pd.DataFrame, scales, batch_size: int, seed: int, num_threads: int = 1):
        super().__init__(store, [BatchGroup(records, batch_size, 0.0, views=2)], scales, seed, num_threads)
        self.by_case = {c: np.flatnonzero(records["case"].to_numpy() == c) for c in records["case"].unique()}

    def draw(self, g: BatchGroup, positives: np.ndarray) -> np.ndarray:
        cases = list(self.by_case)
        chosen = self.rs.choice(len(cases), min(g.n, len(cases)), replace=False)
        return np.asarray([self.rs.choice(self.by_case[cases[i]]) for i in chosen], dtype=int)


class WSPPretrainer(LNMTrainer, register=False):
    """Reuses the trainer's data pipeline, checkpoints and logging; replaces the loss and the output."""

    learning_rate = 1e-3

    def initial_num_epochs(self) -> int:
        return 20

    def configure_optimizers(self):
        n_features = feature_layer(self.network).in_features
        self.projection = nn.Sequential(nn.Linear(n_features, 128), nn.ReLU(inplace=True),
                                        nn.Linear(128, PROJECTION_DIM)).to(self.device)
        opt = torch.optim.Adam(list(self.network.parameters()) + list(self.projection.parameters()),
                               lr=self.learning_rate)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.num_epochs)

    def training_records(self) -> pd.DataFrame:
        """Every node of every training case, labelled or not; weak label = station label, else patient label."""
        df = self.nodes[self.nodes["case"].isin(self.train_cases)]
        if df["case"].nunique() < 2:
            raise LNMError("WSP pre-training needs nodes of at least 2 patients")
        weak = np.where(df["station_label"] >= 0, df["station_label"], df["patient_label"])
        return df.assign(weak_label=weak)

    def validation_records(self) -> pd.DataFrame:
        return self.nodes.iloc[:0]

    def make_loader(self, records: pd.DataFrame, seed: int):
        return OnePerPatientLoader(self.store, records, self.config.scales, self.config.recipe.batch_size, seed,
                                   max(self.num_workers, 1))

    def run_pretraining(self) -> Path:
        records = self.training_records()
        self.store.unpack(sorted(records["case"].unique()))
        captured = {}
        hook = feature_layer(self.network).register_forward_pre_hook(lambda m, args: captured.__setitem__("f", args[0]))
        positions = dict(zip(zip(records["case"], records["node"]), records["slice_position"]))
        weak = dict(zip(zip(records["case"], records["node"]), records["weak_label"]))
        self.log.print(f"WSP pre-training {self.config.name} on {len(records)} nodes of "
                       f"{records['case'].nunique()} patients, {self.num_epochs} epochs (sigma {SIGMA}, tau {TAU})")
        try:
            for epoch in range(self.num_epochs):
                self.network.train()
                seed = self.seed * 100003 + epoch
                torch.manual_seed(seed)
                batches = training_batches(self.plans, self.config, self.make_loader(records, seed), seed,
                                           self.num_workers)
                t0, losses = time.perf_counter(), []
                try:
                    for _ in tqdm(range(self.steps_per_epoch(records["case"].nunique())), leave=False,
                                  desc=f"WSP epoch {epoch + 1}/{self.num_epochs}"):
                        raw = next(batches)
                        batch = to_tensors(raw, self.config, self.device)
                        self.network({k: v for k, v in batch.items() if k in self.config.scales})
                        z = self.projection(captured["f"])
                        d = torch.tensor([positions[k] for k in raw["keys"]], dtype=torch.float32, device=z.device)
                        y = torch.tensor([weak[k] for k in raw["keys"]], dtype=torch.float32, device=z.device)
                        loss = wsp_loss(z, d, y)
                        self.optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        self.optimizer.step()
                        losses.append(float(loss.detach()))
                finally:
                    if hasattr(batches, "_finish"):
                        batches._finish()
                self.lr_scheduler.step()
                self.log.print(f"WSP epoch {epoch + 1}/{self.num_epochs}: loss {np.mean(losses):.4f}, "
                               f"{time.perf_counter() - t0:.1f} s")
        finally:
            hook.remove()
        out = self.output_folder / "pretrained_weights.pth"
        with atomic_path(out, suffix=".pth") as tmp:
            torch.save(self.network.state_dict(), tmp)
        self.log.print(f"pretrained weights written to {out}; use: lnm_train ... -pretrained_weights {out}")
        return out
