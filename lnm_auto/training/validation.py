"""What a fold validates on, so validation never goes blind.

Level rule: node labels of the validation cases when they hold both classes; else the patients' labels
(N stage, the clinical end point) with each patient's probability = the max over its nodes (the roll-up rule
of documentation/evaluation.md); else the stations' pathology labels, rolled up the same way. When no level
holds both classes, the finest labelled level is kept: it gives no AUROC, and the trainer says so in the log.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from lnm_auto.evaluation.metrics import auroc
from lnm_auto.evaluation.rollup import rollup

LEVELS = ("node", "patient", "station")


def validation_level(val_nodes: pd.DataFrame) -> str | None:
    """The first level (node, patient, station) whose labels among the validation nodes (columns label,
    patient_label, station_label of nodes_index.csv) hold both classes; else the first with any label;
    None when nothing is labelled."""
    unit_labels = {"node": val_nodes["label"],
                   "patient": val_nodes.groupby("case")["patient_label"].first(),
                   "station": val_nodes.groupby(["case", "station"])["station_label"].first()}
    labelled = {level: labels[labels >= 0] for level, labels in unit_labels.items()}
    both_classes = [level for level in LEVELS if labelled[level].nunique() == 2]
    any_label = [level for level in LEVELS if len(labelled[level])]
    return (both_classes or any_label or [None])[0]


def passed_over(val_nodes: pd.DataFrame, level: str) -> str:
    """Why finer labelled levels than ``level`` were passed over, as a phrase for the log ('' when none were)."""
    columns = {"node": "label", "patient": "patient_label", "station": "station_label"}
    skipped = [lv for lv in LEVELS[:LEVELS.index(level)] if (val_nodes[columns[lv]] >= 0).any()]
    return f" (the {' and '.join(skipped)} labels here hold one class only)" if skipped else ""


def validation_units(val_nodes: pd.DataFrame, probabilities: np.ndarray, level: str) -> pd.DataFrame:
    """One row per labelled validation unit (node, patient or station) with ``label`` and ``probability``."""
    df = val_nodes.assign(probability=np.asarray(probabilities, dtype=float))
    if level == "node":
        return df.loc[df["label"] >= 0, ["case", "node", "station", "label", "probability"]].reset_index(drop=True)
    label_column = {"patient": "patient_label", "station": "station_label"}[level]
    units = rollup(df[["case", "station", "probability"]], level)
    labels = df.groupby(["case"] if level == "patient" else ["case", "station"])[label_column].first()
    units["label"] = labels.reindex(pd.MultiIndex.from_frame(units[labels.index.names])
                                    if level == "station" else units["case"]).to_numpy()
    return units[units["label"] >= 0].reset_index(drop=True)


def auroc_or_nan(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """AUROC, or NaN when the labels hold one class only (the package's one AUROC: evaluation.metrics.auroc)."""
    return auroc(np.asarray(labels, dtype=float), probabilities)


def bce(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities (NaN for no units)."""
    y, p = np.asarray(labels, dtype=float), np.clip(np.asarray(probabilities, dtype=float), 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))) if len(y) else float("nan")
