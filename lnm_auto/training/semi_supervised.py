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
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lnm_auto.networks.inputs import network_inputs
from lnm_auto.training.data import BatchGroup
from lnm_auto.training.registry import split_trainer_name
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
def supervised_checkpoint(trainer: LNMTrainer) -> Path:
    """The fold's supervised result of the same plans and configuration: the run with this trainer's epoch count
    first (``LNMTrainerPGLS_5epochs`` starts from ``LNMTrainer_5epochs``: one scheme run with ``--epochs``), then
    ``LNMTrainer``, then its runs with other epoch counts."""
    dataset_results = trainer.output_folder.parent.parent
    plans, config, fold = trainer.plans.plans_name, trainer.config.name, trainer.fold
    own_epochs = split_trainer_name(trainer.trainer_name)[1]
    found = []
    for path in dataset_results.glob(f"*__{plans}__{config}/fold_{fold}/checkpoint_final.pth"):
        run_name = path.parent.parent.name.split("__")[0]
        cls_name, epochs = split_trainer_name(run_name)
        if cls_name == LNMTrainer.__name__:
            found.append((epochs != own_epochs, run_name != LNMTrainer.__name__, run_name, path))
    if not found:
        raise LNMError(f"{type(trainer).__name__} starts from a supervised model, but {dataset_results} has no "
                       f"LNMTrainer*__{plans}__{config}/fold_{fold}/checkpoint_final.pth: run lnm_train with the "
                       f"default trainer first, or pass -pretrained_weights FILE")
    return sorted(found)[0][-1]


class LNMTrainerMeanTeacher(LNMTrainer):
    """Mean teacher on labelled + unlabelled nodes (the ablation of PGLS without label sharpening)."""

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

    @classmethod
    def default_num_epochs(cls, config) -> int:
        """The recipe's epochs for the semi-supervised stage (it continues a trained model), else its num_epochs."""
        return config.recipe.semi_supervised_epochs or config.recipe.num_epochs

    @classmethod
    def paired_default_epochs(cls, config) -> int:
        """The supervised stage's default epochs: given epochs name both stages alike (registry.trainer_name)."""
        return LNMTrainer.default_num_epochs(config)

    # -- data
    def unlabelled_records(self) -> pd.DataFrame:
        """Training-case nodes without a node label."""
        return self.nodes[self.nodes["case"].isin(self.train_cases) & (self.nodes["label"] < 0)]

    def training_records(self) -> pd.DataFrame:
        """The labelled nodes; refuses to run (rather than silently train supervised) without unlabelled ones."""
        if self.unlabelled_records().empty:
            raise LNMError(f"fold {self.fold} has no unlabelled training nodes, which {type(self).__name__} learns "
                           "from: every node has a label, so train with LNMTrainer")
        return super().training_records()

    def batch_groups(self, records: pd.DataFrame) -> list[BatchGroup]:
        """Labelled nodes, unlabelled nodes in two views (student, teacher), and this epoch's pseudo labels."""
        r = self.config.recipe
        groups = [BatchGroup("labelled", records, r.batch_size, r.positive_fraction),
                  BatchGroup("unlabelled", self.unlabelled_records(), int(round(r.batch_size * self.unlabelled_ratio)),
                             0.0, views=2)]
        if len(self.pseudo_records):
            groups.append(BatchGroup("pseudo_labelled", self.pseudo_records, max(1, r.batch_size // 2), 0.0))
        return groups

    # -- teacher
    def ensure_teacher(self) -> torch.nn.Module:
        """The EMA teacher (a frozen copy of the student at first use)."""
        if self.teacher is None:
            self.teacher = copy.deepcopy(self.network)
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        return self.teacher

    def rampup_length(self) -> float:
        """Epochs over which the consistency weight ramps up: 30 % of the run, at most 30."""
        return float(min(self.max_rampup_epochs, max(1, round(0.3 * self.num_epochs))))

    def on_train_start(self) -> None:
        """Start from the fold's supervised model unless --c or -pretrained_weights already set the weights."""
        if self.initial_weights is None:
            self.load_pretrained(supervised_checkpoint(self))
        self.ensure_teacher()
        super().on_train_start()

    def on_epoch_start(self) -> None:
        """This epoch's pseudo labels (none for plain mean teacher)."""
        self.ensure_teacher()
        self.pseudo_records = self.assign_pseudo_labels()

    def assign_pseudo_labels(self) -> pd.DataFrame:
        """Pseudo-labelled nodes for this epoch: none (PGLS overrides)."""
        return pd.DataFrame()

    # -- the step
    @staticmethod
    def _teacher_view(batch: dict) -> torch.Tensor:
        unlabelled = batch["parts"].get("unlabelled")
        if unlabelled is None:
            return torch.zeros_like(batch["view"], dtype=torch.bool)
        return unlabelled & (batch["view"] == 1)

    def network_outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """The student on every sample but the teacher's views; the teacher on those (no gradient)."""
        teacher_view = self._teacher_view(batch)
        crops = network_inputs(batch)
        outputs = self.forward_module({k: v[~teacher_view] for k, v in crops.items()})
        if teacher_view.any():
            teacher = self.ensure_teacher().train()   # the teacher sees its own augmented view with dropout
            with torch.no_grad():
                outputs["teacher_probability"] = torch.sigmoid(
                    teacher({k: v[teacher_view] for k, v in crops.items()})["fused"])
        return outputs

    def compute_loss(self, outputs: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
        """Eq. 3: BCE(labelled) + w(t) KL(teacher || student)(unlabelled) + omega BCE(pseudo-labelled)."""
        student = ~self._teacher_view(batch)
        heads = {k: v for k, v in outputs.items() if k != "teacher_probability"}
        labels = batch["label"][student]

        def part(name: str) -> torch.Tensor:
            """Mask of the student samples in batch part ``name`` (all False when the batch has no such part)."""
            mask = batch["parts"].get(name)
            return mask[student] if mask is not None else torch.zeros_like(labels, dtype=torch.bool)

        def supervised(mask: torch.Tensor) -> torch.Tensor:
            """The base trainer's supervised loss on the student samples in ``mask``."""
            return super(LNMTrainerMeanTeacher, self).compute_loss({h: o[mask] for h, o in heads.items()},
                                                                   {"label": labels[mask]})

        loss = supervised(part("labelled"))
        if "teacher_probability" in outputs:
            w = self.consistency_weight * sigmoid_rampup(self.current_epoch, self.rampup_length())
            loss = loss + w * binary_kl(outputs["teacher_probability"], heads["fused"][part("unlabelled")])
        if part("pseudo_labelled").any():
            loss = loss + self.pseudo_label_weight() * supervised(part("pseudo_labelled"))
        return loss

    def after_optimizer_step(self) -> None:
        """teacher <- EMA of the student."""
        ema_update(self.ensure_teacher(), self.network, ema_alpha(self.global_step, self.alpha))
        self.global_step += 1

    def pseudo_label_weight(self) -> float:
        """omega of eq. 3 (0: no pseudo labels)."""
        return 0.0

    # -- checkpoints carry the teacher
    def checkpoint_state(self) -> dict:
        """The base state + the teacher's weights and the EMA step."""
        state = super().checkpoint_state()
        state["teacher_weights"] = self.ensure_teacher().state_dict()
        state["global_step"] = self.global_step
        return state

    def restore_state(self, ckpt: dict, path: Path) -> None:
        """The base state + the teacher."""
        super().restore_state(ckpt, path)
        self.ensure_teacher().load_state_dict(ckpt["teacher_weights"])
        self.global_step = int(ckpt["global_step"])


class LNMTrainerPGLS(LNMTrainerMeanTeacher):
    """Mean teacher + pathology-guided label sharpening: teacher-confident nodes whose station's
    pathology agrees get pseudo labels, recomputed every epoch, weighted by omega."""

    beta = 0.7
    gamma = 0.3
    omega = 0.6

    def initialize(self) -> None:
        super().initialize()
        if not (self.unlabelled_records()["station_label"] >= 0).any():
            raise LNMError(f"{type(self).__name__} needs pathology labels of LN stations for unlabelled nodes, but "
                           "none are known: add stations.csv to the raw dataset (or use LNMTrainerMeanTeacher)")

    def pseudo_label_weight(self) -> float:
        """omega of eq. 3."""
        return self.omega

    def assign_pseudo_labels(self) -> pd.DataFrame:
        """Teacher-confident nodes whose station's pathology agrees, a fixed number drawn per epoch."""
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
        """Hidden true node labels, where a phantom dataset provides them (<raw root>/<dataset>/truth_nodes.csv):
        for logging how many pseudo labels are right, never for training."""
        path = self.raw_root / self.plans.dataset_name / "truth_nodes.csv" if self.raw_root else None
        if path is None or not path.is_file():
            return None
        df = pd.read_csv(path, dtype={"case": str}, keep_default_na=False)
        return pd.DataFrame({"case": df["case"], "node": df["node"].astype(int), "truth": df["label"].astype(int)})
