"""Weak supervision: multiple-instance learning from station and patient labels (WeGA's setting:
no node labels at all), plus whatever node labels exist.

Bags: every node-labelled node is a bag of one; every LN station with a pathology label is a bag of its
nodes; every patient with an N label and no station labels is a bag of all its nodes. Bag probability
= noisy-OR of the node probabilities, P = 1 - prod(1 - p_i), computed in log space. For a negative bag
the loss is exactly the sum of the nodes' BCE against 0: a negative bag makes every node in it negative.
The node probabilities stay the model's output.
"""
from __future__ import annotations


import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from sklearn.metrics import roc_auc_score

from lnm_auto.training.data import NodeBatchLoader, load_batch
from lnm_auto.training.trainer import LNMTrainer, _json_safe
from lnm_auto.utils.io import save_csv_atomic, save_json
from lnm_auto.utils.errors import LNMError

MAX_BAG_SIZE = 12   # larger bags are subsampled (negative bags) or truncated to the most (positive) ...


def noisy_or_bag_log_probs(node_logits: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log P(bag positive), log P(bag negative)) per bag, from node logits, numerically stable.
    log(1 - p_i) = -softplus(z_i); log P_neg = sum_i log(1 - p_i); log P_pos = log(1 - exp(log P_neg))."""
    log_neg_nodes = -F.softplus(node_logits)
    log_neg = torch.zeros(n_bags, dtype=node_logits.dtype, device=node_logits.device).index_add(0, bag_index, log_neg_nodes)
    log_pos = torch.log(-torch.expm1(log_neg.clamp(max=-1e-7)))
    return log_pos, log_neg


def mil_loss(node_logits: torch.Tensor, bag_index: torch.Tensor, bag_labels: torch.Tensor) -> torch.Tensor:
    """Mean BCE of noisy-OR bag probabilities against bag labels."""
    log_pos, log_neg = noisy_or_bag_log_probs(node_logits, bag_index, len(bag_labels))
    return -(bag_labels * log_pos + (1 - bag_labels) * log_neg).mean()


def make_bags(nodes: pd.DataFrame) -> pd.DataFrame:
    """One row per bag: ``members`` (row positions in ``nodes``), ``label``, ``kind`` (node/station/patient)."""
    nodes = nodes.reset_index(drop=True)
    bags = [{"members": [i], "label": int(r.label), "kind": "node"} for i, r in enumerate(nodes.itertuples()) if r.label >= 0]
    with_station = nodes[nodes["station_label"] >= 0]
    for _, g in with_station.groupby(["case", "station"]):
        bags.append({"members": list(g.index), "label": int(g["station_label"].iloc[0]), "kind": "station"})
    for case, g in nodes.groupby("case"):
        if g["patient_label"].iloc[0] >= 0 and not (g["station_label"] >= 0).any():
            bags.append({"members": list(g.index), "label": int(g["patient_label"].iloc[0]), "kind": "patient"})
    return pd.DataFrame(bags, columns=["members", "label", "kind"])


class BagBatchLoader(NodeBatchLoader):
    """Batches of whole bags (positive bags oversampled) until ``batch_size`` nodes are reached."""

    def __init__(self, store, nodes: pd.DataFrame, bags: pd.DataFrame, scales, batch_size: int,
                 positive_fraction: float, seed: int, num_threads: int = 1):
        super().__init__(store, [], scales, seed, num_threads)
        self.nodes, self.bags = nodes.reset_index(drop=True), bags.reset_index(drop=True)
        self.batch_nodes, self.positive_fraction = batch_size, positive_fraction
        self.positive_bags = np.flatnonzero(self.bags["label"].to_numpy() == 1)

    def generate_train_batch(self) -> dict:
        rows, bag_of_row, labels = [], [], []
        while len(rows) < self.batch_nodes:
            want_pos = len(self.positive_bags) and self.rs.rand() < self.positive_fraction
            b = self.bags.iloc[self.rs.choice(self.positive_bags) if want_pos else self.rs.randint(len(self.bags))]
            members = list(b["members"])
            if len(members) > MAX_BAG_SIZE:
                members = list(self.rs.choice(members, MAX_BAG_SIZE, replace=False))
            rows += members
            bag_of_row += [len(labels)] * len(members)
            labels.append(float(b["label"]))
        batch = load_batch(self.store, self.nodes.iloc[rows], self.scales)
        batch["bag"] = np.asarray(bag_of_row)
        batch["bag_label"] = np.asarray(labels, dtype=np.float32)
        return batch


class LNMTrainerWeak(LNMTrainer):
    """Noisy-OR multiple-instance learning over node, station and patient bags."""

    def training_records(self) -> pd.DataFrame:
        """Every node of the training cases (labelled or not): the bags decide what is learnt."""
        df = self.nodes[self.nodes["case"].isin(self.train_cases)]
        if make_bags(df).empty:
            raise LNMError(f"{type(self).__name__} needs labels at some level (nodes.csv labels, stations.csv or "
                           f"patients.csv); fold {self.fold}'s training cases have none")
        return df

    def make_loader(self, records: pd.DataFrame, seed: int):
        r = self.config.recipe
        return BagBatchLoader(self.store, records, make_bags(records), self.config.scales, r.batch_size,
                              r.positive_fraction, seed, max(self.num_workers, 1))

    def train_step(self, batch: dict[str, torch.Tensor]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        out = self.network({k: v for k, v in batch.items() if k in self.config.scales})
        loss = sum(mil_loss(logits, batch["bag"], batch["bag_label"]) for logits in out.values())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12.0)
        self.optimizer.step()
        return float(loss.detach())

    def has_node_labelled_validation(self) -> bool:
        return bool((self.nodes[self.nodes["case"].isin(self.val_cases)]["label"] >= 0).any())

    def patient_level_validation(self) -> tuple[pd.DataFrame, np.ndarray]:
        """Without node labels: each validation patient's probability = max over its nodes (the roll-up
        rule), scored against the patient label. Returns (per-patient table, node probabilities)."""
        val = self.nodes[self.nodes["case"].isin(self.val_cases)]
        p = self.predict_records(val) if len(val) else np.zeros(0)
        per_case = val.assign(probability=p).groupby("case", as_index=False).agg(
            probability=("probability", "max"), label=("patient_label", "first"))
        return per_case[per_case["label"] >= 0], p

    def validate(self) -> dict:
        if self.has_node_labelled_validation():
            return super().validate()
        per_case, p = self.patient_level_validation()
        y, q = per_case["label"].to_numpy(float), per_case["probability"].to_numpy(float)
        if not len(y):
            return {"loss": float("nan"), "auroc": float("nan"), "probabilities": p}
        auroc = float(roc_auc_score(y, q)) if 0 < y.sum() < len(y) else float("nan")
        eps = 1e-7
        loss = float(-np.mean(y * np.log(q + eps) + (1 - y) * np.log(1 - q + eps)))
        return {"loss": loss, "auroc": auroc, "probabilities": p}

    def export_validation(self) -> None:
        if self.has_node_labelled_validation():
            return super().export_validation()
        from lnm_auto.evaluation.metrics import binary_metrics
        per_case, _ = self.patient_level_validation()
        out = self.output_folder / "validation"
        save_csv_atomic(per_case, out / "patients.csv")
        metrics = binary_metrics(per_case["label"].to_numpy(), per_case["probability"]) if len(per_case) else {}
        save_json({"fold": self.fold, "level": "patient (no node labels in the validation cases)",
                   "n_patients": len(per_case), **_json_safe(metrics)}, out / "metrics.json")
        self.log.print(f"validation of fold {self.fold} at patient level: AUROC "
                       f"{metrics.get('auroc', float('nan')):.4f} on {len(per_case)} patients -> {out}")
