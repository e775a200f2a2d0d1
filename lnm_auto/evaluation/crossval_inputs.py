"""Reading and checking the out-of-fold predictions that model selection pools.

Each fold of a trained model writes ``fold_<k>/validation/predictions.csv`` (every validation node with its
labels and probability). Before any AUROC is computed, every file is checked: probabilities finite and in
[0, 1], one row per node, labels 1 / 0 / empty, and only nodes of the dataset the model was trained on (its
``dataset_fingerprint.json``); the models compared must have been validated on the same nodes with the same
labels. Each problem is one LNMError line naming the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from lnm_auto.evaluation.inputs import parse_labels, read_predictions
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import load_json, save_csv_atomic
from lnm_auto.utils.labels import UNKNOWN

PREDICTIONS_FILE = "validation/predictions.csv"
LABEL_COLUMNS = ("label", "station_label", "patient_label")
POOLED_COLUMNS = ["case", "node", "station", *LABEL_COLUMNS, "probability", "fold"]
DEFAULT_N_FOLDS = 5
_SHOW = 3


def fold_list(folds: int | Iterable[int] | None, model_folders: list[Path]) -> list[int]:
    """The folds to pool: a number n means 0..n-1, a sequence the folds it names (as nnU-Net's ``-f``), None the
    planned folds (``plans.json`` of the models, else 5). LNMError for a negative or unplanned fold."""
    planned = planned_fold_count(model_folders)
    if folds is None:
        return list(range(planned or DEFAULT_N_FOLDS))
    if isinstance(folds, (int, np.integer)):
        chosen = list(range(int(folds)))
    else:
        chosen = sorted({int(k) for k in folds})
    if not chosen:
        raise LNMError("-f: no fold given; name the folds to pool, e.g. -f 0 1 2 3 4")
    bad = [k for k in chosen if k < 0 or (planned is not None and k >= planned)]
    if bad:
        allowed = f"0..{planned - 1}" if planned else "0 or more"
        raise LNMError(f"-f {' '.join(map(str, chosen))}: fold {bad[0]} is not a planned fold (the plans have folds "
                       f"{allowed}); -f takes fold numbers, e.g. -f 0 1 2 3 4")
    return chosen


def planned_fold_count(model_folders: list[Path]) -> int | None:
    """``n_folds`` of the models' plans.json (the largest when they differ); None when no model has one."""
    counts = []
    for folder in model_folders:
        path = Path(folder) / "plans.json"
        plans = read_json(path) if path.is_file() else None
        if isinstance(plans, dict):
            n = plans.get("n_folds")
            if isinstance(n, int) and n > 0:
                counts.append(n)
    return max(counts) if counts else None


def read_json(path: Path):
    """A JSON file of a model folder; one LNMError line when it is damaged."""
    try:
        return load_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise LNMError(f"{path}: not valid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def missing_folds(model_folder: Path, folds: list[int]) -> list[int]:
    """The folds of ``folds`` that have no validation predictions in ``model_folder``."""
    return [k for k in folds if not (Path(model_folder) / f"fold_{k}" / PREDICTIONS_FILE).is_file()]


def _label_column(df: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    """A label column as 1 / 0 / UNKNOWN (UNKNOWN throughout when the file has no such column)."""
    if column not in df.columns:
        return np.full(len(df), UNKNOWN, dtype=int)
    return parse_labels(df, path, column, "1, 0, -1 or empty (unknown)")


def _parse_unknown(raw) -> str:
    """Validation files write unknown labels as -1; parse_label reads empty as unknown."""
    return "" if str(raw).strip() in ("-1", "-1.0") else raw


def read_fold_predictions(path: Path, fold: int) -> pd.DataFrame:
    """One fold's validation predictions as POOLED_COLUMNS, every value checked (LNMError naming the file)."""
    df = read_predictions(path)          # finite probabilities in [0, 1], one row per (case, node)
    for column in LABEL_COLUMNS:
        if column in df.columns:
            df[column] = df[column].map(_parse_unknown)
    out = pd.DataFrame({"case": df["case"], "node": df["node"].astype(np.int64),
                        "station": df["station"] if "station" in df.columns else ""})
    for column in LABEL_COLUMNS:
        out[column] = _label_column(df, column, path)
    out["probability"] = df["probability"].to_numpy(dtype=float)
    out["fold"] = fold
    return out


def dataset_nodes(model_folder: Path) -> pd.DataFrame | None:
    """(case, node) of every node of the dataset the model was trained on (its dataset_fingerprint.json copy);
    None for a folder without one (not made by lnm_train)."""
    path = Path(model_folder) / "dataset_fingerprint.json"
    if not path.is_file():
        return None
    fingerprint = read_json(path)
    nodes = fingerprint.get("nodes") if isinstance(fingerprint, dict) else None
    if not isinstance(nodes, list) or not all(isinstance(n, dict) and "case" in n and "node" in n for n in nodes):
        raise LNMError(f"{path}: has no list of nodes (case, node); was it written by lnm_plan_and_preprocess?")
    return pd.DataFrame({"case": [str(n["case"]) for n in nodes], "node": [int(n["node"]) for n in nodes]},
                        columns=["case", "node"])


def _pairs(df: pd.DataFrame) -> pd.MultiIndex:
    return pd.MultiIndex.from_arrays([df["case"].astype(str), df["node"].astype(np.int64)], names=["case", "node"])


def _shown(pairs) -> str:
    items = [f"case {c} node {n}" for c, n in list(pairs)[:_SHOW]]
    return ", ".join(items) + (" ..." if len(pairs) > _SHOW else "")


def check_fold_against_dataset(part: pd.DataFrame, path: Path, known: pd.DataFrame) -> None:
    """Rows of nodes outside the dataset, or a validation case predicted only in part: one line naming the file."""
    known_pairs = _pairs(known)
    extra = _pairs(part).difference(known_pairs)
    if len(extra):
        raise LNMError(f"{path}: {len(extra)} row(s) for nodes not in the dataset this model was trained on "
                       f"({_shown(extra)}; the model folder's dataset_fingerprint.json lists its nodes); remove them "
                       "or retrain the fold")
    cases = set(part["case"])
    expected = _pairs(known[known["case"].isin(cases)])
    missing = expected.difference(_pairs(part))
    if len(missing):
        raise LNMError(f"{path}: {len(missing)} node(s) of its validation cases have no prediction "
                       f"({_shown(missing)}); re-run the fold's validation (lnm_train ... --val)")


def accumulate_crossval_results(model_folder: Path, folds: int | Iterable[int] = DEFAULT_N_FOLDS
                                ) -> pd.DataFrame | None:
    """Out-of-fold predictions of ``folds`` (a count n: 0..n-1) pooled as POOLED_COLUMNS, checked and written to
    ``crossval_results/nodes.csv``; None when a fold has none yet."""
    model_folder = Path(model_folder)
    folds = list(range(folds)) if isinstance(folds, (int, np.integer)) else list(folds)
    if missing_folds(model_folder, folds):
        return None
    known = dataset_nodes(model_folder)
    parts = []
    for k in folds:
        path = model_folder / f"fold_{k}" / PREDICTIONS_FILE
        part = read_fold_predictions(path, k)
        if known is not None:
            check_fold_against_dataset(part, path, known)
        parts.append(part)
    pooled = pd.concat(parts, ignore_index=True)
    if pooled.duplicated(["case", "node"]).any():
        first = pooled.loc[pooled.duplicated(["case", "node"]), ["case", "node"]].iloc[0]
        raise LNMError(f"{model_folder}: case {first['case']} node {first['node']} is predicted by two folds; the "
                       "folds' validation sets overlap (were the splits changed after training?)")
    if known is not None and set(folds) == set(range(planned_fold_count([model_folder]) or -1)):
        unpredicted = _pairs(known).difference(_pairs(pooled))
        if len(unpredicted):
            raise LNMError(f"{model_folder}: {len(unpredicted)} node(s) of the dataset are in no fold's validation "
                           f"predictions ({_shown(unpredicted)}); were the splits changed after training?")
    save_csv_atomic(pooled, model_folder / "crossval_results" / "nodes.csv")
    return pooled


def check_same_nodes(pooled: dict[str, pd.DataFrame], where: Path) -> None:
    """Candidates are compared (and averaged) node by node: every model must hold the same nodes and labels."""
    names = sorted(pooled)
    columns = ["case", "node", "station", *LABEL_COLUMNS]
    first = pooled[names[0]][columns].sort_values(["case", "node"]).reset_index(drop=True)
    for name in names[1:]:
        other = pooled[name][columns].sort_values(["case", "node"]).reset_index(drop=True)
        only_first = _pairs(first).difference(_pairs(other))
        only_other = _pairs(other).difference(_pairs(first))
        if len(only_first) or len(only_other):
            example = (f"{_shown(only_first)} only in {names[0]}" if len(only_first)
                       else f"{_shown(only_other)} only in {name}")
            raise LNMError(f"{where}: models {names[0]} and {name} were validated on different nodes ({example}); "
                           "were they trained on different versions of the dataset? Retrain the stale one or move it "
                           "out of this folder")
        if not first.equals(other):
            raise LNMError(f"{where}: models {names[0]} and {name} hold different labels or stations for the same "
                           "nodes; was the dataset relabelled between their trainings? Retrain the stale one")


# what a fold's validation predictions were made with: a calibration map or a choice fitted on them applies to these
# exact files only (a retrained fold, another checkpoint, another model file: the map is out of date)
FOLD_MODEL_FILES = ("checkpoint_final.pth", "radiomics_model.json")


def fold_model_digests(model_folder: Path, folds) -> dict[str, dict]:
    """{fold: {"file", "sha256"}} of the model file each fold's validation predictions came from."""
    import hashlib
    out = {}
    for k in folds:
        fold = Path(model_folder) / f"fold_{k}"
        path = next((fold / f for f in FOLD_MODEL_FILES if (fold / f).is_file()), None)
        if path is not None:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            out[str(k)] = {"file": path.name, "sha256": digest.hexdigest()}
    return out


def changed_folds(recorded: dict | None, model_folder: Path, folds, model_file: str) -> list[str]:
    """The folds (of ``folds``) whose ``model_file`` is not the one ``recorded`` (fold_model_digests) names."""
    recorded = recorded if isinstance(recorded, dict) else {}
    now = fold_model_digests(model_folder, folds)
    return [str(k) for k in folds
            if not isinstance(recorded.get(str(k)), dict) or recorded[str(k)].get("file") != model_file
            or now.get(str(k)) != recorded[str(k)]]
