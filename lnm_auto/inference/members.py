"""What scores a case: one member (a model's fold ensemble, or the size rule) or several (an ensemble of models).

A single model and an ensemble go through the same prediction loop (``case_loop.py``): a list of members. Each
member turns its own prepared inputs of a case into one score per node (the mean over its folds; the size rule:
the short axis s -> s / (s + 10 mm)); the probability written is the mean over the members, through the
calibration map. Every member must score exactly the same nodes of a case (they read the same node mask): a
member that scores other nodes fails that case with one line instead of joining silently.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lnm_auto.evaluation.calibration import is_identity
from lnm_auto.evaluation.size_rule import size_rule_score
from lnm_auto.inference.model import TrainedModel, model_origin
from lnm_auto.utils.errors import LNMError

SIZE_RULE_COLUMN = "short_axis_mm"     # the size rule's one "fold": the node's short axis, mapped by size_rule_score
UNCALIBRATED = "probability_uncalibrated"
SIZE_RULE_NAME = "size rule (short axis)"


class NodeMismatch(LNMError):
    """Members scoring different nodes of one case: that case fails (one line), the others go on."""


@dataclass
class Member:
    """One scorer of an ensemble: a model with its loaded folds, or the size rule (``size_rule``: the model then
    only says how many channels a case has and what its training intensities looked like)."""
    model: TrainedModel
    scorers: dict[str, Callable[[dict], np.ndarray]]
    checkpoint: str
    size_rule: bool = False

    @property
    def name(self) -> str:
        return "size_rule" if self.size_rule else self.model.folder.name

    @property
    def folds(self) -> list[str]:
        return list(self.scorers)

    def spec(self) -> tuple:
        """What a worker process needs to prepare a case for this member (picklable): plans, configuration
        (None for the size rule), size_rule."""
        return self.model.plans, None if self.size_rule else self.model.configuration, self.size_rule

    def fold_columns(self) -> list[str]:
        return [SIZE_RULE_COLUMN] if self.size_rule else [f"probability_fold{f}" for f in self.scorers]

    def score(self, inputs: dict, case_id: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(the member's score of each node before calibration, its per-fold columns)."""
        per_fold = score_case(self.scorers, inputs, case_id, self.model, self.checkpoint)
        mean = np.mean(list(per_fold.values()), axis=0)
        raw = np.asarray([size_rule_score(v) for v in mean], dtype=float) if self.size_rule else mean
        return raw, dict(zip(self.fold_columns(), per_fold.values()))


def load_member(folder: Path, folds: list[str] | None, checkpoint: str = "checkpoint_final.pth",
                device: str = "cpu", mirror: bool = True, size_rule: bool = False) -> Member:
    """A model folder's folds (``folds``; default every planned fold) ready to score, or the size rule."""
    model = TrainedModel.load(folder)
    if size_rule:
        scorers = {SIZE_RULE_COLUMN: lambda crops: np.asarray(crops["short_axis_mm"], dtype=np.float64)}
    else:
        scorers = model.load_scorers(folds, checkpoint, torch.device(device), mirror)
    return Member(model, scorers, checkpoint, size_rule)


def score_case(scorers: dict, crops: dict, case_id: str, model: TrainedModel, checkpoint: str) -> dict[str, np.ndarray]:
    """Every fold's probabilities of one case's nodes, refused before anything is written when a fold's model
    gives a non-finite one (a damaged model file: e.g. radiomics coefficients of 1e308)."""
    per_fold = {}
    for fold, score in scorers.items():
        with np.errstate(over="ignore", invalid="ignore"):   # checked just below
            p = np.asarray(score(crops), dtype=np.float64)
        bad = int(np.count_nonzero(~np.isfinite(p)))
        if bad:
            raise LNMError(f"{model.folder / f'fold_{fold}' / model.model_file(checkpoint)}: gives {bad} non-finite "
                           f"probability(ies) (NaN/Inf) for the {p.size} node(s) of case '{case_id}': the model file "
                           "is damaged; retrain that fold or export the model again")
        per_fold[fold] = p
    return per_fold


def value_columns(members: list[Member]) -> list[str]:
    """The node table's per-member / per-fold columns (after probability and probability_uncalibrated)."""
    if len(members) == 1:
        return members[0].fold_columns()
    return ([f"probability_{m.name}" for m in members]
            + [f"probability_{m.name}_{c.removeprefix('probability_')}" for m in members for c in m.fold_columns()])


def table_columns(members: list[Member], calibration: dict | None) -> list[str]:
    """The node table's columns after case and node (station goes in between)."""
    return ["probability"] + ([UNCALIBRATED] if not is_identity(calibration) else []) + value_columns(members)


def combine(members: list[Member], inputs: list[dict], case_id: str, mask_file: Path | None
            ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(node ids, the mean of the members' scores before calibration, the value columns) of one case. A member
    scoring other nodes than the first is one line naming the case and both members (no silent join)."""
    ids = np.asarray(inputs[0]["node_ids"], dtype=np.int64)
    if len(members) == 1:
        raw, columns = members[0].score(inputs[0], case_id)
        return ids, raw, columns
    scores, folds = {}, {}
    for member, member_inputs in zip(members, inputs):
        own = np.asarray(member_inputs["node_ids"], dtype=np.int64)
        if sorted(own.tolist()) != sorted(ids.tolist()) or len(set(own.tolist())) != len(own):
            raise NodeMismatch(f"case '{case_id}': ensemble member {member.name} scores node(s) "
                           f"{sorted(own.tolist())} but {members[0].name} scores {sorted(ids.tolist())} of "
                           f"{mask_file}; every member must score the same nodes")
        row_of = {node: row for row, node in enumerate(own.tolist())}
        order = np.asarray([row_of[node] for node in ids.tolist()], dtype=np.int64)   # the first member's order
        raw, columns = member.score(member_inputs, case_id)
        scores[f"probability_{member.name}"] = raw[order]
        for column, values in columns.items():
            folds[f"probability_{member.name}_{column.removeprefix('probability_')}"] = values[order]
    mean = np.mean([scores[f"probability_{m.name}"] for m in members], axis=0)
    return ids, mean, {**scores, **folds}


def run_settings(members: list[Member], mirror: bool, save_probmaps: bool, calibration: dict | None) -> dict:
    """What a rerun into the same -o must share to resume (one model: the settings lnm_predict always recorded)."""
    models = [SIZE_RULE_NAME if m.size_rule else str(model_origin(m.model.folder)) for m in members]
    plans = [m.model.plans.identifier() for m in members]
    folds = {m.name: m.folds for m in members}
    checkpoints = sorted({m.checkpoint for m in members})
    one = len(members) == 1
    return {"model": models[0] if one else models, "plans_identifier": plans[0] if one else plans,
            "folds": members[0].folds if one else folds, "checkpoint": checkpoints[0] if len(checkpoints) == 1
            else checkpoints, "test_time_mirroring": mirror, "probability_maps": save_probmaps,
            "calibration": calibration}


def channel_count(members: list[Member]) -> int:
    """The channels every member reads; members that disagree are one line."""
    counts = {m.name: len(m.model.plans.normalization) for m in members}
    if len(set(counts.values())) > 1:
        raise LNMError(f"ensemble members read different numbers of channels ({counts}); an ensemble's members "
                       "must be models of one dataset")
    return next(iter(counts.values()))
