"""Learning from unlabelled nodes: mean teacher, and mean teacher with pathology-guided label
sharpening (PGLS, Li et al. MICCAI 2024, sec. 2.2).

Both start from a supervised model of the same configuration and fold (``-pretrained_weights``, or the
fold's own ``LNMTrainer*`` result found automatically). Loss (eq. 3):
    BCE(labelled) + w(t) * KL(teacher || student)(unlabelled) + omega * BCE(pseudo-labelled)
with the teacher an EMA of the student (alpha 0.999, warm-up alpha_t = min(1 - 1/(t+1), alpha)).
"""
from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lnm_auto.training.data import BatchGroup
from lnm_auto.training.trainer import LNMTrainer
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.labels import UNKNOWN



# ---- the arithmetic, as pure functions (unit-tested) ------------------------------------------------
def ema_alpha(step: int, alpha: float) -> float:
    """Mean-teacher EMA coefficient with warm-up: the teacher follows the student closely at first."""
    return min(1.0 - 1.0 / (step + 1), alpha)


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, alpha: float) -> None:
    """teacher <- alpha * teacher + (1 - alpha) * student, parameters only (buffers are copied)."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


def sigmoid_rampup(epoch: float, length: float) -> float:
    """w(t) = exp(-5 (1 - clip(t, 0, L) / L)^2) (Laine & Aila; Tarvainen & Valpola)."""
    if length <= 0:
        return 1.0
    t = min(max(epoch, 0.0), length) / length
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def binary_kl(teacher_p: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(Bernoulli(teacher) || Bernoulli(student)); gradients flow into the student only."""
    eps = 1e-6
    t = teacher_p.detach().clamp(eps, 1 - eps)
    log_s, log_1s = torch.nn.functional.logsigmoid(student_logits), torch.nn.functional.logsigmoid(-student_logits)
    return (t * (torch.log(t) - log_s) + (1 - t) * (torch.log(1 - t) - log_1s)).mean()


def pathology_guided_pseudo_labels(teacher_scores: np.ndarray, station_labels: np.ndarray,
                                   beta: float = 0.7, gamma: float = 0.3) -> np.ndarray:
    """1 where the station is pathology-positive and the score is > beta; 0 where the station is
    pathology-negative and the score is < gamma; UNKNOWN elsewhere (strict inequalities)."""
    scores, stations = np.asarray(teacher_scores, float), np.asarray(station_labels)
    out = np.full(len(scores), UNKNOWN, dtype=np.int8)
    out[(stations == 1) & (scores > beta)] = 1
    out[(stations == 0) & (scores < gamma)] = 0
    return out


# ---- trainers ---------------------------------------------------------------------------------------
class LNMTrainerMeanTeacher(LNMTrainer):
    """Mean teacher on labelled + unlabelled nodes (the ablation of PGLS without label sharpening)."""

    needs_supervised_start = True
    alpha = 0.999
    consistency_weight = 1.0
    max_rampup_epochs = 30
    # unlabelled nodes per labelled node in a batch (the paper: 112 / 16 = 7 on a GPU; 1 keeps CPU steps cheap)
    unlabelled_ratio = 1.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher: torch.nn.Module | None = None
        self.global_step = 0
        self.pseudo_records = pd.DataFrame()

    # -- data
    def unlabelled_records(self) -> pd.DataFrame:
        return self.nodes[self.nodes["case"].isin(self.train_cases) & (self.nodes["label"] < 0)]

    def batch_groups(self, records: pd.DataFrame) -> list[BatchGroup]:
        r = self.config.recipe
        groups = [BatchGroup(records, r.batch_size, r.positive_fraction),
                  BatchGroup(self.unlabelled_records(), int(round(r.batch_size * self.unlabelled_ratio)), 0.0, views=2)]
        if len(self.pseudo_records):
            groups.append(BatchGroup(self.pseudo_records, max(1, r.batch_size // 2), 0.0))
        return groups

    # -- teacher
    def ensure_teacher(self) -> torch.nn.Module:
        if self.teacher is None:
            self.teacher = copy.deepcopy(self.network)
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        return self.teacher

    def rampup_length(self) -> float:
        return float(min(self.max_rampup_epochs, max(1, round(0.3 * self.num_epochs))))

    def on_epoch_start(self) -> None:
        self.ensure_teacher()
        self.pseudo_records = self.assign_pseudo_labels()

    def assign_pseudo_labels(self) -> pd.DataFrame:
        return pd.DataFrame()

    # -- the step
    def train_step(self, batch: dict[str, torch.Tensor]) -> float:
        teacher = self.ensure_teacher()
        group, view = batch["group"], batch["view"]
        student_idx = torch.nonzero(~((group == 1) & (view == 1))).flatten()
        teacher_idx = torch.nonzero((group == 1) & (view == 1)).flatten()
        inputs = {k: v for k, v in batch.items() if k in self.config.scales}
        self.optimizer.zero_grad(set_to_none=True)
        out = self.network({k: v[student_idx] for k, v in inputs.items()})
        g, y = group[student_idx], batch["label"][student_idx]
        loss = self.compute_loss({h: o[g == 0] for h, o in out.items()}, {"label": y[g == 0]})
        if len(teacher_idx):
            teacher.train()   # the teacher sees its own augmented view with dropout, like the student
            with torch.no_grad():
                t = torch.sigmoid(teacher({k: v[teacher_idx] for k, v in inputs.items()})["fused"])
            w = self.consistency_weight * sigmoid_rampup(self.current_epoch, self.rampup_length())
            loss = loss + w * binary_kl(t, out["fused"][g == 1])
        if (g == 2).any():
            loss = loss + self.pseudo_label_weight() * self.compute_loss({h: o[g == 2] for h, o in out.items()},
                                                                        {"label": y[g == 2]})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12.0)
        self.optimizer.step()
        ema_update(teacher, self.network, ema_alpha(self.global_step, self.alpha))
        self.global_step += 1
        return float(loss.detach())

    def pseudo_label_weight(self) -> float:
        return 0.0

    # -- checkpoints carry the teacher
    def checkpoint_state(self) -> dict:
        state = super().checkpoint_state()
        state["teacher_weights"] = self.ensure_teacher().state_dict()
        state["global_step"] = self.global_step
        return state

    def load_checkpoint(self, path: Path) -> dict:
        ckpt = super().load_checkpoint(path)
        self.ensure_teacher().load_state_dict(ckpt["teacher_weights"])
        self.global_step = int(ckpt["global_step"])
        return ckpt


class LNMTrainerPGLS(LNMTrainerMeanTeacher):
    """Mean teacher + pathology-guided label sharpening: teacher-confident nodes whose station's
    pathology agrees get pseudo labels, recomputed every epoch, weighted by omega."""

    beta = 0.7
    gamma = 0.3
    omega = 0.6

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not (self.unlabelled_records()["station_label"] >= 0).any():
            raise LNMError(f"{type(self).__name__} needs pathology labels of LN stations for unlabelled nodes, but "
                           "none are known: add stations.csv to the raw dataset (or use LNMTrainerMeanTeacher)")

    def pseudo_label_weight(self) -> float:
        return self.omega

    def assign_pseudo_labels(self) -> pd.DataFrame:
        pool = self.unlabelled_records()
        pool = pool[pool["station_label"] >= 0]
        if pool.empty:
            return pd.DataFrame()
        scores = self.predict_records(pool, self.ensure_teacher())
        labels = pathology_guided_pseudo_labels(scores, pool["station_label"].to_numpy(), self.beta, self.gamma)
        assigned = pool.assign(label=labels)[labels >= 0]
        # a fixed number per epoch (as many as there are labelled training nodes), drawn anew each epoch
        n = min(len(assigned), len(self.training_records()))
        rng = np.random.RandomState(self.seed + self.current_epoch)
        chosen = assigned.iloc[rng.choice(len(assigned), n, replace=False)] if n else assigned
        self._log_pseudo_labels(assigned, chosen)
        return chosen

    def _log_pseudo_labels(self, assigned: pd.DataFrame, chosen: pd.DataFrame) -> None:
        n1, n0 = int((assigned["label"] == 1).sum()), int((assigned["label"] == 0).sum())
        msg = f"pseudo labels: {n1} positive, {n0} negative assigned; {len(chosen)} used this epoch"
        truth = self.truth_labels()
        if truth is not None and len(assigned):
            merged = assigned.merge(truth, on=["case", "node"], how="left")
            ok1 = int(((merged["label"] == 1) & (merged["truth"] == 1)).sum())
            ok0 = int(((merged["label"] == 0) & (merged["truth"] == 0)).sum())
            msg += f"; correct vs truth: {ok1}/{n1} positive, {ok0}/{n0} negative"
        self.log.print(msg)

    def truth_labels(self) -> pd.DataFrame | None:
        """Hidden true node labels, where a phantom dataset provides them ($LNM_raw/<dataset>/truth_nodes.csv):
        for logging how many pseudo labels are right, never for training."""
        raw = os.environ.get("LNM_raw")
        path = Path(raw) / self.plans.dataset_name / "truth_nodes.csv" if raw else None
        if path is None or not path.is_file():
            return None
        df = pd.read_csv(path, dtype={"case": str}, keep_default_na=False)
        return pd.DataFrame({"case": df["case"], "node": df["node"].astype(int), "truth": df["label"].astype(int)})
