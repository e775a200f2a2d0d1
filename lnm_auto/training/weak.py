"""Weak supervision: multiple-instance learning from station and patient labels (WeGA's setting:
no node labels at all), plus whatever node labels exist.

Bags: every node-labelled node is a bag of one; every LN station with a pathology label is a bag of its
nodes; every patient with an N label and no station labels is a bag of all its nodes. Bag probability
= noisy-OR of the node probabilities, P = 1 - prod(1 - p_i), computed in log space. For a negative bag
the loss is exactly the sum of the nodes' BCE against 0: a negative bag makes every node in it negative.
The node probabilities stay the model's output.

Regional affinity (WeGA): LN stations with a pathology label are anatomical regions of known status, so
the fused head also pays ``REGIONAL_AFFINITY_WEIGHT x regional_affinity_loss`` over the station bags of the
batch (training/losses.py: a hinge that is exactly 0 once every node of a negative station has p <= 0.25
and every positive station a noisy-OR >= 0.75). Node and patient bags are not regions.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from lnm_auto.training.data import NodeBatchLoader, load_batch
from lnm_auto.training.losses import regional_affinity_loss
from lnm_auto.training.trainer import LNMTrainer
from lnm_auto.utils.errors import LNMError

MAX_BAG_SIZE = 12   # larger bags are subsampled, positive bags keeping their evidence (subsample_bag)
# Weight of the regional affinity loss next to the noisy-OR bag BCE. 0.5: at the start (p ~ 0.5, z ~ 0) a
# station costs relu(log 3) = 1.1 against a bag BCE of ~0.7-1.5, so the coherence term stays the smaller
# one and only keeps pushing where a station still disagrees with its label (it is 0 where it agrees).
REGIONAL_AFFINITY_WEIGHT = 0.5
REGION_BAG_KIND = "station"


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


def subsample_bag(members: list[int], nodes: pd.DataFrame, bag_label: int, rs: np.random.RandomState,
                  max_size: int = MAX_BAG_SIZE) -> list[int]:
    """At most ``max_size`` members; a positive bag always keeps its evidence (nodes labelled 1, then nodes
    in pathology-positive stations), so it is never taught positive without the node that makes it so."""
    if len(members) <= max_size:
        return list(members)
    members = np.asarray(members)
    if bag_label == 1:
        evidence = members[(nodes["label"].to_numpy()[members] == 1) | (nodes["station_label"].to_numpy()[members] == 1)]
    else:
        evidence = members[:0]
    evidence = rs.permutation(evidence)[:max_size]
    rest = np.setdiff1d(members, evidence)
    fill = rs.choice(rest, max_size - len(evidence), replace=False) if max_size > len(evidence) else rest[:0]
    return [int(i) for i in np.concatenate([evidence, fill])]


class BagBatchLoader(NodeBatchLoader):
    """Batches of whole bags (positive bags oversampled) until ``batch_size`` nodes are reached; every
    sample is part ``bag``, ``batch["bag"]`` its bag's index, ``batch["bag_label"]`` the bags' labels and
    ``batch["bag_kind"]`` the bags' kinds (node / station / patient)."""

    def __init__(self, store, nodes: pd.DataFrame, bags: pd.DataFrame, scales, batch_size: int,
                 positive_fraction: float, seed: int, num_threads: int = 1):
        super().__init__(store, [], scales, seed, num_threads)
        self.nodes, self.bags = nodes.reset_index(drop=True), bags.reset_index(drop=True)
        self.batch_nodes, self.positive_fraction = batch_size, positive_fraction
        self.positive_bags = np.flatnonzero(self.bags["label"].to_numpy() == 1)

    def generate_train_batch(self) -> dict:
        """One batch of whole bags, with each sample's bag index and the bags' labels and kinds."""
        rows, bag_of_row, labels, kinds = [], [], [], []
        while len(rows) < self.batch_nodes:
            want_pos = len(self.positive_bags) and self.rs.rand() < self.positive_fraction
            b = self.bags.iloc[self.rs.choice(self.positive_bags) if want_pos else self.rs.randint(len(self.bags))]
            members = subsample_bag(list(b["members"]), self.nodes, int(b["label"]), self.rs)
            rows += members
            bag_of_row += [len(labels)] * len(members)
            labels.append(float(b["label"]))
            kinds.append(str(b["kind"]))
        batch = load_batch(self.store, self.nodes.iloc[rows], self.scales)
        batch["part"] = np.full(len(rows), "bag")
        batch["bag"] = np.asarray(bag_of_row)
        batch["bag_label"] = np.asarray(labels, dtype=np.float32)
        batch["bag_kind"] = np.asarray(kinds, dtype=str)
        return batch


class LNMTrainerWeak(LNMTrainer):
    """Noisy-OR multiple-instance learning over node, station and patient bags, + regional affinity."""

    regional_affinity_weight = REGIONAL_AFFINITY_WEIGHT

    def training_records(self) -> pd.DataFrame:
        """Every node of the training cases (labelled or not): the bags decide what is learnt."""
        df = self.nodes[self.nodes["case"].isin(self.train_cases)]
        if make_bags(df).empty:
            raise LNMError(f"{type(self).__name__} needs labels at some level (nodes.csv labels, stations.csv or "
                           f"patients.csv); fold {self.fold}'s training cases have none")
        return df

    def make_loader(self, records: pd.DataFrame, seed: int):
        """Batches of whole bags."""
        r = self.config.recipe
        return BagBatchLoader(self.store, records, make_bags(records), self.config.scales, r.batch_size,
                              r.positive_fraction, seed, max(self.num_workers, 1))

    def compute_loss(self, outputs: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
        """Sum over the classification heads of the noisy-OR bag BCE, + the weighted regional affinity loss of
        the fused head over the station bags."""
        loss = sum(mil_loss(logits, batch["bag"], batch["bag_label"]) for logits in outputs.values()
                   if logits.ndim == 1)
        if self.regional_affinity_weight and "bag_kind" in batch:
            loss = loss + self.regional_affinity_weight * regional_affinity_loss(
                outputs["fused"], batch["bag"], station_region_labels(batch["bag_kind"], batch["bag_label"]))
        return loss


def station_region_labels(bag_kinds, bag_labels: torch.Tensor) -> torch.Tensor:
    """Per bag: its label where it is a station bag (a region of known status), else -1 (not a region)."""
    is_region = torch.as_tensor(np.asarray(bag_kinds) == REGION_BAG_KIND, device=bag_labels.device)
    return torch.where(is_region, bag_labels, torch.full_like(bag_labels, -1.0))
