"""Cross-validation folds at the *patient* level, stratified by the patient label where known.

nnU-Net splits case ids with plain KFold; here nodes of one patient never straddle train and
validation (they are not independent), and the rare N+ patients are spread evenly over the folds.
"""
from __future__ import annotations

import hashlib
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from lnm_auto.datasets.raw_dataset import UNKNOWN
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import atomic_write_text, load_json, save_json


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


def node_label_availability(fingerprint: dict) -> dict[str, tuple[bool, bool]]:
    """Per case: (has a node labelled 1, has a node labelled 0)."""
    out = {c: (False, False) for c in fingerprint["cases"]}
    for n in fingerprint["nodes"]:
        pos, neg = out[n["case"]]
        out[n["case"]] = (pos or n["label"] == 1, neg or n["label"] == 0)
    return out


def stratification_keys(fingerprint: dict, patients: np.ndarray, case_ids: list[str], n_folds: int) -> np.ndarray:
    """One stratum per case: (patient label, node-label availability), coarsened until every stratum has at
    least ``n_folds`` patients, so each fold gets labelled nodes of both classes whenever the data allows.
    Coarsening order: drop the patient label first (node labels are what validation needs), then merge the
    remaining small strata into the largest."""
    strata, available = case_strata(fingerprint), node_label_availability(fingerprint)
    candidates = [
        [f"{strata[c]}|{int(available[c][0])}{int(available[c][1])}" for c in case_ids],
        [f"{int(available[c][0])}{int(available[c][1])}" for c in case_ids],
        [str(strata[c]) for c in case_ids],
    ]
    for keys in candidates:
        keys = np.asarray(keys)
        small = [k for k in set(keys.tolist()) if len(set(patients[keys == k])) < n_folds]
        if not small:
            return keys
    keys = np.asarray(candidates[-1])
    counts = {k: len(set(patients[keys == k])) for k in set(keys.tolist())}
    largest = max(counts, key=counts.get)
    for k, n in counts.items():
        if n < n_folds:
            keys[keys == k] = largest
    return keys


def make_patient_splits(fingerprint: dict, n_folds: int = 5, seed: int = 12345) -> list[dict[str, list[str]]]:
    """[{"train": [case ids], "val": [case ids]}, ...] with no patient in two validation folds."""
    case_ids = sorted(fingerprint["cases"])
    patients = np.asarray([fingerprint["cases"][c].get("patient", c) for c in case_ids])
    n_patients = len(set(patients))
    if n_patients < 2:
        raise LNMError(f"cross-validation needs at least 2 patients, the dataset has {n_patients}")
    n_folds = min(n_folds, n_patients)
    y = stratification_keys(fingerprint, patients, case_ids, n_folds)
    from sklearn.model_selection import StratifiedGroupKFold   # here: importing scikit-learn takes a second
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has fewer members than n_splits"
        folds = [{"train": sorted(np.asarray(case_ids)[tr].tolist()), "val": sorted(np.asarray(case_ids)[va].tolist())}
                 for tr, va in splitter.split(np.zeros(len(case_ids)), y, groups=patients)]
    return folds


def split_problems(fingerprint: dict, folds: list[dict[str, list[str]]]) -> list[str]:
    """One line per fold whose validation cases lack node-labelled nodes of a class (said loudly by
    lnm_plan_and_preprocess: such a fold validates on station/patient labels instead)."""
    available = node_label_availability(fingerprint)
    problems = []
    for k, fold in enumerate(folds):
        pos = any(available[c][0] for c in fold["val"])
        neg = any(available[c][1] for c in fold["val"])
        if not (pos and neg):
            missing = " and ".join(w for w, has in (("positive", pos), ("negative", neg)) if not has)
            problems.append(f"fold {k}: no node-labelled {missing} node among its {len(fold['val'])} validation "
                            "cases (the dataset has too few node-labelled patients to spread over the folds); it "
                            "validates on patient or station labels instead")
    return problems


def load_splits(path, case_ids=None, patients: dict[str, str] | None = None) -> list[dict[str, list[str]]]:
    """splits_final.json, checked: a list of {"train": [...], "val": [...]} whose folds validate on cases they do
    not train on, with no case validated in two folds. ``case_ids``: the dataset's cases (unknown ids refused);
    ``patients``: case -> patient (a patient on both sides of a fold refused). A hand-edited file that breaks a
    rule is one line naming it: trained-on cases in validation would report an optimistic AUROC, silently."""
    try:
        splits = load_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise LNMError(f"{path}: not valid JSON ({e}); delete it and re-run lnm_plan_and_preprocess") from None
    problems = split_file_problems(splits, case_ids, patients)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise LNMError(f"{path}: {problems[0]}{more}; correct it, or delete it and re-run lnm_plan_and_preprocess "
                       "(which writes new folds; models trained on the old ones no longer match)")
    return splits


def split_file_problems(splits, case_ids=None, patients: dict[str, str] | None = None) -> list[str]:
    """What is wrong with the folds of a splits file (empty: nothing)."""
    if not isinstance(splits, list) or not splits or not all(
            isinstance(f, dict) and {"train", "val"} <= set(f) and all(
                isinstance(f[k], list) and all(isinstance(c, str) for c in f[k]) for k in ("train", "val"))
            for f in splits):
        return ["not valid folds (expected a non-empty list of {\"train\": [case ids], \"val\": [case ids]})"]
    known = None if case_ids is None else set(case_ids)
    problems, validated_in = [], {}
    for k, fold in enumerate(splits):
        train, val = fold["train"], fold["val"]
        if not val:
            problems.append(f"fold {k} has no validation cases")
        if not train:
            problems.append(f"fold {k} has no training cases")
        for side in ("train", "val"):
            repeated = sorted(c for c, n in Counter(fold[side]).items() if n > 1)
            if repeated:
                problems.append(f"fold {k} lists case '{repeated[0]}' twice in '{side}'")
            if known is not None:
                problems += [f"fold {k} '{side}': case '{c}' is not a case of the dataset"
                             for c in sorted(set(fold[side]) - known)]
        problems += [f"fold {k}: case '{c}' is in both 'train' and 'val' (validation would score trained-on data)"
                     for c in sorted(set(train) & set(val))]
        if patients:
            only_train, only_val = set(train) - set(val), set(val) - set(train)
            straddling = sorted({patients.get(c, c) for c in only_train} & {patients.get(c, c) for c in only_val})
            problems += [f"fold {k}: patient '{p}' has cases in both 'train' and 'val'" for p in straddling]
        for c in val:
            if c in validated_in and validated_in[c] != k:
                problems.append(f"case '{c}' is validated in folds {validated_in[c]} and {k}")
            validated_in.setdefault(c, k)
    return problems


def splits_record(path: Path) -> Path:
    """Where the job notes the SHA-256 of the folds it wrote (``splits_final.json.sha256``): the file is the
    job's own exactly while its bytes still match, so a hand-written or edited file is never taken for it."""
    return path.with_name(path.name + ".sha256")


def written_here(path: Path) -> bool:
    record = splits_record(path)
    try:
        return record.read_text().strip() == hashlib.sha256(path.read_bytes()).hexdigest()
    except (OSError, UnicodeDecodeError):
        return False


def check_users_splits(path: Path) -> None:
    """Refuse, before any work, a splits file the job did not write that is not valid folds (one line)."""
    if path.is_file() and not written_here(path):
        load_splits(path)


def keep_or_write_splits(path: Path, fingerprint: dict, n_folds: int, seed: int, redo: bool = False) -> str | None:
    """Write the folds unless ``path`` holds folds to keep; returns a line for the user, or None.

    Folds the job wrote (``written_here``) are kept while they validate on exactly the dataset's cases (trained
    models depend on them; nnU-Net does the same) and replaced when the cases changed or ``redo`` (--clean). Any
    other file is the user's (hand-written or edited) and is kept byte for byte, with a warning when its folds
    miss cases or name unknown ones: a command never overwrites what it did not write."""
    path = Path(path)
    ours = False
    if path.is_file():
        ours = written_here(path)
        listed = {c for fold in (load_json(path) if ours else load_splits(path)) for c in fold["val"]}
        cases = set(fingerprint["cases"])
        if not ours and listed != cases:
            missing, unknown = sorted(cases - listed), sorted(listed - cases)
            what = ([f"{len(missing)} case(s) in no validation fold, e.g. '{missing[0]}'"] if missing else []) + \
                ([f"{len(unknown)} unknown case(s), e.g. '{unknown[0]}'"] if unknown else [])
            return (f"WARNING: {path} is not folds lnm_plan_and_preprocess wrote (or was edited since) and is kept "
                    f"as it is: {'; '.join(what)}. Edit it, or move it away to have folds written")
        if not ours or (listed == cases and not redo):
            return None
    save_json(make_patient_splits(fingerprint, n_folds, seed), path)
    atomic_write_text(splits_record(path), hashlib.sha256(path.read_bytes()).hexdigest() + "\n")
    if ours and not redo:
        return (f"{path}: the dataset's cases changed, so new folds were written (models trained on the old folds "
                "no longer match them)")
    return None
