"""Cross-validation folds at the *patient* level, stratified by the patient label where known.

nnU-Net splits case ids with plain KFold; here nodes of one patient never straddle train and
validation (they are not independent), and the rare N+ patients are spread evenly over the folds.
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from lnm_auto.datasets.raw_dataset import UNKNOWN
from lnm_auto.utils.errors import LNMError


def case_strata(fingerprint: dict) -> dict[str, int]:
    """Per case: the patient label if given, else positive if any node or station is positive,
    negative if every node is known negative, else UNKNOWN (its own stratum)."""
    by_case: dict[str, list[dict]] = {}
    for n in fingerprint["nodes"]:
        by_case.setdefault(n["case"], []).append(n)
    out = {}
    for case_id, entry in fingerprint["cases"].items():
        label = entry.get("patient_label", UNKNOWN)
        nodes = by_case.get(case_id, [])
        if label == UNKNOWN:
            if any(n["label"] == 1 or n.get("station_label") == 1 for n in nodes):
                label = 1
            elif nodes and all(n["label"] == 0 for n in nodes):
                label = 0
        out[case_id] = int(label)
    return out


def make_patient_splits(fingerprint: dict, n_folds: int = 5, seed: int = 12345) -> list[dict[str, list[str]]]:
    """[{"train": [case ids], "val": [case ids]}, ...] with no patient in two validation folds."""
    case_ids = sorted(fingerprint["cases"])
    patients = np.asarray([fingerprint["cases"][c].get("patient", c) for c in case_ids])
    n_patients = len(set(patients))
    if n_patients < 2:
        raise LNMError(f"cross-validation needs at least 2 patients, the dataset has {n_patients}")
    n_folds = min(n_folds, n_patients)
    strata = case_strata(fingerprint)
    y = np.asarray([strata[c] for c in case_ids])
    # A stratum with fewer patients than folds cannot be spread one per fold: fold it into the largest.
    patients_per_stratum = {v: len(set(patients[y == v])) for v in set(y.tolist())}
    largest = max(patients_per_stratum, key=patients_per_stratum.get)
    for v, count in patients_per_stratum.items():
        if count < n_folds:
            y[y == v] = largest
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has fewer members than n_splits"
        folds = [{"train": sorted(np.asarray(case_ids)[tr].tolist()), "val": sorted(np.asarray(case_ids)[va].tolist())}
                 for tr, va in splitter.split(np.zeros(len(case_ids)), y, groups=patients)]
    return folds


def load_splits(path) -> list[dict[str, list[str]]]:
    """splits_final.json, checked: a list of {"train": [...], "val": [...]}."""
    from lnm_auto.utils.io import load_json
    try:
        splits = load_json(path)
        if not isinstance(splits, list) or not all(isinstance(f, dict) and {"train", "val"} <= set(f) for f in splits):
            raise ValueError("expected a list of {\"train\": [...], \"val\": [...]}")
        return splits
    except ValueError as e:
        raise LNMError(f"{path}: not valid folds ({e}); delete it and re-run lnm_plan_and_preprocess") from None
