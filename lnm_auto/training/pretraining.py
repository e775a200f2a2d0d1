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

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from lnm_auto.training.data import BatchGroup, NodeBatchLoader
from lnm_auto.training.trainer import LNMTrainer
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
    """Batches of nodes from distinct patients (negatives from other patients only), two views each; every
    sample carries its ``slice_position`` and ``weak_label``."""

    def __init__(self, store, records: pd.DataFrame, scales, batch_size: int, seed: int, num_threads: int = 1):
        super().__init__(store, [BatchGroup("unlabelled", records, batch_size, 0.0, views=2)], scales, seed,
                         num_threads)
        self.by_case = {c: np.flatnonzero(records["case"].to_numpy() == c) for c in records["case"].unique()}
        keys = zip(records["case"], records["node"].astype(int))
        self.position_and_label = dict(zip(keys, zip(records["slice_position"], records["weak_label"])))

    def draw(self, g: BatchGroup, positives: np.ndarray) -> np.ndarray:
        """Record indices of one batch group: one node from each of up to ``g.n`` distinct patients."""
        cases = list(self.by_case)
        chosen = self.rs.choice(len(cases), min(g.n, len(cases)), replace=False)
        return np.asarray([self.rs.choice(self.by_case[cases[i]]) for i in chosen], dtype=int)

    def generate_train_batch(self) -> dict:
        """The base batch plus each sample's ``slice_position`` and ``weak_label``."""
        batch = super().generate_train_batch()
        values = np.asarray([self.position_and_label[k] for k in batch["keys"]], dtype=np.float32)
        batch["slice_position"], batch["weak_label"] = values[:, 0], values[:, 1]
        return batch


class WSPPretrainer(LNMTrainer, register=False):
    """The trainer's loop with a contrastive loss: no labels, no validation; the result is the network's
    weights (``pretrained_weights.pth``) for ``lnm_train -pretrained_weights``."""

    learning_rate = 1e-3

    @classmethod
    def default_num_epochs(cls, config) -> int:
        """20 epochs."""
        return 20

    def configure_optimizers(self):
        """Adam over the network and a 2-layer projection head (discarded afterwards)."""
        n_features = feature_layer(self.network).in_features
        self.projection = nn.Sequential(nn.Linear(n_features, 128), nn.ReLU(inplace=True),
                                        nn.Linear(128, PROJECTION_DIM)).to(self.device)
        self._features: dict[str, torch.Tensor] = {}
        feature_layer(self.network).register_forward_pre_hook(lambda m, args: self._features.__setitem__("f", args[0]))
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
        """None: pre-training has no labels to validate against."""
        return self.nodes.iloc[:0]

    def make_loader(self, records: pd.DataFrame, seed: int):
        """One node per patient per batch."""
        return OnePerPatientLoader(self.store, records, self.config.scales, self.config.recipe.batch_size, seed,
                                   max(self.num_workers, 1))

    def steps_per_epoch(self, records: pd.DataFrame) -> int:
        """One pass over the patients."""
        return max(1, math.ceil(records["case"].nunique() / self.config.recipe.batch_size))

    def network_outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """The projected final feature vector of every view."""
        self.forward_module(batch)
        return {"embedding": self.projection(self._features["f"])}

    def compute_loss(self, outputs: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
        """The kernel- and label-weighted InfoNCE (module docstring)."""
        return wsp_loss(outputs["embedding"], batch["slice_position"], batch["weak_label"])

    def on_train_start(self) -> None:
        """Say what is pre-trained on (instead of the validation level)."""
        self.log.print(f"WSP pre-training {self.config.name} (sigma {SIGMA}, tau {TAU}); no validation")

    def validate(self) -> dict:
        """Nothing to validate."""
        return {"loss": float("nan"), "auroc": float("nan"), "level": "no", "units": None}

    def on_train_end(self) -> None:
        """The network's weights (heads untrained) -> pretrained_weights.pth."""
        out = self.output_folder / "pretrained_weights.pth"
        if self.distributed.is_main:   # rank 0 writes every file
            with atomic_path(out, suffix=".pth") as tmp:
                torch.save(self.network.state_dict(), tmp)
        self.log.print(f"pretrained weights written to {out}; use: lnm_train ... -pretrained_weights {out}")

    def run_pretraining(self) -> Path:
        """Pre-train; returns the weights file."""
        self.run_training()
        return self.output_folder / "pretrained_weights.pth"
