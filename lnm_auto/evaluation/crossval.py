"""Cross-validation results of trained models and the choice of the model (or ensemble) to use.

``accumulate_crossval_results`` (crossval_inputs.py): the out-of-fold predictions of a model folder's folds,
checked and pooled (every validation case is predicted once, by the fold that did not train on it).
``find_best_configuration``: scores every model whose folds are all complete and every ensemble of 2-3 of them
(mean probability), at node, station and patient level with patient-bootstrap 95% CIs, beside the size rule
(short axis) on the same nodes, and picks the best. A level the dataset lacks (converted datasets have no
stations; weakly labelled ones no node labels) is left out of the table with a line saying why.

Selection rule (documentation/model_selection.md, evaluation/selection.py): the within-fold AUROC (the per-fold
AUROC averaged with weights by labelled pairs, so no fold's calibration offset can decide) at node level (patient
level when the dataset has no node labels, then station level); the simplest candidate within one
patient-bootstrap standard error of the best wins (the size rule first, then fewest members, then the cheapest
configurations: radiomics < deep_radiomics < 3d_resenc < 2d25 < others, then the name). The size rule is a
candidate: when no model beats it by more than that noise, it is chosen. The chosen candidate's probabilities are
calibrated by a Platt map fitted on its out-of-fold node predictions (evaluation/calibration.py; stored in
``inference_instructions.json``); the table reports each candidate's node-level ECE before and after a
cross-fitted map. Choosing the best of many candidates on the same folds is optimistic: the chosen model's CV
AUROC overstates what it will do on new data, so the held-out test set (lnm_predict + lnm_evaluate) is the number
to report.

The table is written (and shown, ``show``) before ``inference_instructions.json``: lnm_predict -d never uses a
choice whose table was not computed.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from lnm_auto.configurations import simplicity
from lnm_auto.evaluation.crossval_inputs import (PREDICTIONS_FILE, accumulate_crossval_results, check_same_nodes,
                                                 fold_list, fold_model_digests, missing_folds, read_json)
from lnm_auto.evaluation.calibration import CALIBRATION_FILE, cross_fitted, fit_platt
from lnm_auto.evaluation.crossval_table import plot_reliability, plot_table, table_markdown
from lnm_auto.evaluation.metrics import auroc, expected_calibration_error
from lnm_auto.evaluation.rollup import rollup
from lnm_auto.evaluation.selection import FoldScore, one_standard_error_choice, within_fold_auroc
from lnm_auto.evaluation.size_rule import size_rule_score
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import atomic_write_text, save_json

__all__ = ["CALIBRATION_FILE", "INSTRUCTIONS_FILE", "LEVELS", "PREDICTIONS_FILE", "accumulate_crossval_results",
           "find_best_configuration",
           "level_notes", "level_units", "load_instructions", "model_folders", "score", "select_configuration",
           "size_rule_table"]

SIZE_RULE = "size rule (short axis)"
LEVELS = ("node", "station", "patient")
SELECTION_ORDER = ("node", "patient", "station")
INSTRUCTIONS_FILE = "inference_instructions.json"
TABLE_FILE = "crossval_table.md"
PLOT_FILE = "crossval_table.png"
RELIABILITY_FILE = "crossval_reliability.png"
KEY = ["case", "node"]
MIN_PATIENTS_IN_PAIRS = 5   # fewer: the table warns that the CV AUROCs rank within a few patients


def model_folders(dataset_results: Path) -> list[Path]:
    """Every ``<Trainer>__<Plans>__<configuration>`` folder of a dataset's results."""
    return sorted(p for p in Path(dataset_results).glob("*__*__*") if p.is_dir())


def level_units(nodes: pd.DataFrame, level: str) -> pd.DataFrame:
    """Labelled units of a level with their probability (max roll-up), their patient (bootstrap group) and, when
    ``nodes`` has one, the fold that predicted them. Nodes without a station are not part of any station."""
    folds = nodes.groupby("case")["fold"].first() if "fold" in nodes.columns else None
    if level == "node":
        units = nodes[nodes["label"] >= 0][["case", "probability", "label"]]
    else:
        column = f"{level}_label"
        if level == "station":
            nodes = nodes[nodes["station"].astype(str) != ""]
        if nodes.empty:
            return pd.DataFrame(columns=["case", "probability", "label", "fold"])
        units = rollup(nodes[["case", "station", "probability"]], level)
        keys = ["case", "station"] if level == "station" else ["case"]
        labels = nodes.groupby(keys)[column].first().reset_index()
        units = units.merge(labels, on=keys).rename(columns={column: "label"})
        units = units[units["label"] >= 0]
    units = units.reset_index(drop=True)
    return units.assign(fold=0 if folds is None else units["case"].map(folds).to_numpy())


def level_notes(nodes: pd.DataFrame) -> dict[str, str]:
    """Why a level has no CV AUROC, for each level without one: absent from the data, or one class only."""
    notes = {}
    for level in LEVELS:
        if level == "station" and (nodes["station"].astype(str) == "").all():
            notes[level] = "not in the data: no node has a station (nodes.csv's station column is empty)"
            continue
        y = level_units(nodes.assign(probability=0.0), level)["label"].to_numpy(int)
        source = {"node": "nodes.csv", "station": "stations.csv", "patient": "patients.csv"}[level]
        if len(y) == 0:
            notes[level] = f"not in the data: no {level} is labelled 0 or 1 ({source})"
        elif not 0 < y.sum() < len(y):
            notes[level] = (f"labels of one class only ({len(y)} labelled {level}s, {int(y.sum())} positive): "
                            "no AUROC")
    return notes


def score(nodes: pd.DataFrame, n_bootstrap: int = 1000, seed: int = 0,
          fold_scores: dict[str, FoldScore] | None = None) -> dict:
    """{level: {"n", "n_positive", "auroc", "se", "ci95", "n_pairs", "pooled_auroc"}} of one set of out-of-fold
    node predictions (levels with both classes): ``auroc`` is the within-fold AUROC (selection.py) with its
    patient-bootstrap SE and CI, ``pooled_auroc`` the AUROC of all folds' predictions pooled (shown for reference:
    it mixes the folds' calibrations). The node level also gets ``ece`` (raw probabilities) and
    ``ece_calibrated`` (each fold's nodes through a Platt map fitted on the other folds). ``fold_scores``, when
    given, receives each level's FoldScore (with its bootstrap replicates, for paired comparisons)."""
    out = {}
    for level in LEVELS:
        units = level_units(nodes, level)
        y, p = units["label"].to_numpy(int), units["probability"].to_numpy(float)
        if not (len(y) and 0 < y.sum() < len(y)):
            continue
        fold_score = within_fold_auroc(y, p, units["fold"].to_numpy(), units["case"].to_numpy(), n_bootstrap, seed)
        if not np.isfinite(fold_score.auroc):
            continue                      # no fold holds both classes: nothing ranks, nothing to choose by
        out[level] = {**fold_score.to_dict(), "pooled_auroc": auroc(y, p)}
        if fold_scores is not None:
            fold_scores[level] = fold_score
        if level == "node":
            out[level]["ece"] = expected_calibration_error(y, p)
            out[level]["ece_calibrated"] = expected_calibration_error(y, cross_fitted(y, p, units["fold"].to_numpy()))
    return out


def patients_in_pairs(units: pd.DataFrame) -> int:
    """How many patients the within-fold AUROC's labelled pairs come from: the patients of folds holding both
    classes. A handful means the AUROC ranks nodes within those patients only - not what a new patient sees."""
    both = units.groupby("fold")["label"].nunique()
    return int(units[units["fold"].isin(both[both == 2].index)]["case"].nunique())


def _complexity(members: tuple[str, ...]) -> tuple:
    """Simplest first: the size rule (no member), then fewest members, the cheapest configurations, the name."""
    if not members:
        return (0, 0, members)
    configs = [m.split("__")[2] for m in members]
    return (len(members), sum(simplicity(c) for c in configs), members)


def _pool_models(dataset_results: Path, folds: list[int]) -> tuple[dict[str, pd.DataFrame], dict[str, list[int]]]:
    """{model: pooled predictions sorted by (case, node)} of the complete models; {model: missing folds} of the rest."""
    pooled, incomplete = {}, {}
    for folder in model_folders(dataset_results):
        missing = missing_folds(folder, folds)
        if missing:
            incomplete[folder.name] = missing
        else:
            pooled[folder.name] = accumulate_crossval_results(folder, folds).sort_values(KEY).reset_index(drop=True)
    if not pooled:
        shown = "; ".join(f"{m}: fold {', '.join(map(str, f))} missing" for m, f in incomplete.items())
        raise LNMError(f"{dataset_results}: no model has all {len(folds)} folds ({' '.join(map(str, folds))}) trained "
                       f"with validation predictions ({PREDICTIONS_FILE}); train every fold (lnm_train DATASET CONFIG "
                       f"FOLD) or name the trained ones with -f" + (f" (incomplete: {shown})" if shown else "")
                       + ("" if incomplete else " (no trained model folder found)"))
    check_same_nodes(pooled, dataset_results)
    return pooled, incomplete


def _size_rule_nodes(reference: pd.DataFrame, size_rule: pd.DataFrame | None) -> tuple[pd.DataFrame | None, str | None]:
    """The reference nodes scored by the size rule (short axis -> s / (s + 10 mm)), or why it is left out."""
    if size_rule is None:
        return None, None
    merged = reference.drop(columns="probability").merge(size_rule.astype({"node": np.int64}), on=KEY)
    if len(merged) < len(reference):
        return None, (f"size rule: left out, {len(reference) - len(merged)} of {len(reference)} nodes have no crop "
                      "cache with their short axis (re-run lnm_plan_and_preprocess)")
    merged = merged.sort_values(KEY).reset_index(drop=True)
    return merged.assign(probability=[size_rule_score(v) for v in merged["short_axis_mm"]]), None


def _calibration(nodes: pd.DataFrame) -> dict:
    """The Platt map of a candidate, fitted on every labelled out-of-fold node, its slope within folds (identity
    when too few)."""
    units = level_units(nodes, "node")
    return fit_platt(units["label"].to_numpy(int), units["probability"].to_numpy(float), units["fold"].to_numpy())


def select_configuration(dataset_results: Path, folds: int | Iterable[int] | None = None, max_members: int = 3,
                         n_bootstrap: int = 1000, size_rule: pd.DataFrame | None = None) -> dict:
    """Score every complete model and ensemble on ``folds`` (a count n: 0..n-1; None: the planned folds) and choose
    one; writes nothing but the pooled predictions. Returns rows, chosen, level, notes, incomplete, instructions."""
    if int(max_members) < 1:
        raise LNMError(f"--max_members must be at least 1 (a single model), got {max_members}")
    if int(n_bootstrap) < 0:
        raise LNMError(f"--n_bootstrap must be 0 (no CIs) or more, got {n_bootstrap}")
    dataset_results = Path(dataset_results)
    if not dataset_results.is_dir():
        raise LNMError(f"{dataset_results}: no such results folder; train a model first (lnm_train)")
    folds = fold_list(folds, model_folders(dataset_results))
    pooled, incomplete = _pool_models(dataset_results, folds)
    reference = next(iter(pooled.values()))
    notes = level_notes(reference)
    scored = [lv for lv in SELECTION_ORDER if lv not in notes]
    if not scored:
        raise LNMError(f"{dataset_results}: no label level of the cross-validation predictions holds both classes "
                       f"({'; '.join(f'{lv}: {why}' for lv, why in notes.items())}): nothing to select by")
    level = scored[0]
    scored_nodes: dict[tuple[str, ...], pd.DataFrame] = {}
    for r in range(1, min(int(max_members), len(pooled)) + 1):
        for members in itertools.combinations(sorted(pooled), r):
            mean = sum(pooled[m]["probability"].to_numpy() for m in members) / len(members)
            scored_nodes[members] = reference.assign(probability=mean)
    size_nodes, size_note = _size_rule_nodes(reference, size_rule)
    if size_nodes is not None:
        scored_nodes[()] = size_nodes
    fold_scores: dict[tuple[str, ...], dict[str, FoldScore]] = {m: {} for m in scored_nodes}
    candidates = {m: score(nodes, n_bootstrap, fold_scores=fold_scores[m]) for m, nodes in scored_nodes.items()}
    ranked = {m: f[level] for m, f in fold_scores.items() if level in f}
    if not ranked:
        raise LNMError(f"{dataset_results}: no fold of the cross-validation holds {level}s of both classes, so no "
                       "candidate can be ranked; use more folds' worth of labelled data or fewer folds")
    chosen, why = one_standard_error_choice(ranked, _complexity)
    name = lambda m: " + ".join(m) if m else SIZE_RULE    # noqa: E731
    rows = [{"candidate": name(m), "members": list(m), **{lv: s.get(lv) for lv in LEVELS}}
            for m, s in sorted(candidates.items(), key=lambda kv: -kv[1].get(level, {}).get("auroc", -1.0))]
    calibration = _calibration(scored_nodes[chosen])
    model_calibrations = {m[0]: (calibration if m == chosen else _calibration(nodes))
                          for m, nodes in scored_nodes.items() if len(m) == 1}
    support = {lv: patients_in_pairs(level_units(reference, lv)) for lv in LEVELS if lv not in notes}
    instructions = {
        "selected_by": (f"{level}-level within-fold cross-validation AUROC; the simplest candidate within one paired "
                        "patient-bootstrap standard error of the best (the size rule counts as the simplest)"),
        "chosen": [{"model_folder": m, "trainer": m.split("__")[0], "plans": m.split("__")[1],
                    "configuration": m.split("__")[2]} for m in chosen],
        "size_rule": not chosen,
        "folds": [str(k) for k in folds],
        "ensemble": "mean of the members' fold-ensemble probabilities",
        "calibration": calibration,
        "model_files": {m: fold_model_digests(dataset_results / m, folds) for m in chosen},
        "cv": candidates[chosen],
        "choice": {"best": name(why["best"]), "best_auroc": why["best_auroc"], "best_se": why["best_se"],
                   "difference_se": {name(m): se for m, se in why["difference_se"].items()},
                   "within_one_se": [name(m) for m in why["tied"]]},
        "levels_not_scored": notes,
        "patients_in_pairs": {lv: int(k) for lv, k in support.items()},
        "optimism": "the chosen candidate's CV AUROC is the best of several tried on the same folds, so it is "
                    "optimistic; report the held-out test set",
        "incomplete_models": sorted(incomplete),
    }
    lines = [f"{lv} level: {why}" for lv, why in notes.items()]
    lines += [f"left out (incomplete): {m} (fold {', '.join(map(str, f))} has no {PREDICTIONS_FILE})"
              for m, f in incomplete.items()]
    lines += [size_note] if size_note else []
    lines += [_choice_line(level, name(chosen), why, name)]
    if support[level] < MIN_PATIENTS_IN_PAIRS:
        others = ", ".join(f"{lv} level {k}" for lv, k in support.items() if lv != level)
        lines += [f"warning: the {level}-level AUROCs rest on the labelled {level}s of {support[level]} patient(s) in "
                  "folds holding both classes: they rank within those few patients, not across new patients, so the "
                  "choice is provisional; label more patients" + (f" (patients in pairs: {others})" if others else "")]
    if calibration["method"] == "identity":
        lines += [f"probabilities not calibrated: {calibration['n_positive']} positive of {calibration['n']} "
                  "node-labelled out-of-fold nodes are too few to fit a map"]
    shown = [lv for lv in LEVELS if not notes.get(lv, "").startswith("not in the data")]
    return {"rows": rows, "chosen": chosen, "level": level, "notes": notes, "incomplete": incomplete,
            "instructions": instructions, "folds": folds, "chosen_nodes": scored_nodes[chosen],
            "model_calibrations": model_calibrations,
            "table": table_markdown(rows, chosen, shown, lines)}


def find_best_configuration(dataset_results: Path, folds: int | Iterable[int] | None = None, max_members: int = 3,
                            n_bootstrap: int = 1000, size_rule: pd.DataFrame | None = None,
                            show: Callable[[str], None] | None = None) -> dict:
    """Choose (``select_configuration``), write ``crossval_table.md`` / ``.png``, show the table (``show``, e.g.
    print), and only then write ``inference_instructions.json`` (atomically)."""
    dataset_results = Path(dataset_results)
    selection = select_configuration(dataset_results, folds, max_members, n_bootstrap, size_rule)
    atomic_write_text(dataset_results / TABLE_FILE, selection["table"])
    plot_table(selection["rows"], dataset_results / PLOT_FILE, selection["chosen"], selection["level"])
    units = level_units(selection["chosen_nodes"], "node")
    if units["label"].nunique() == 2:
        y, p = units["label"].to_numpy(int), units["probability"].to_numpy(float)
        plot_reliability(y, p, cross_fitted(y, p, units["fold"].to_numpy()), dataset_results / RELIABILITY_FILE,
                         " + ".join(selection["chosen"]) or SIZE_RULE)
    if show is not None:
        show(selection["table"])
    for model, calibration in selection["model_calibrations"].items():   # each model's own map travels with it
        save_json({**calibration, "fitted_on": "out-of-fold node predictions of folds "
                   + " ".join(map(str, selection["folds"])),
                   "model_files": fold_model_digests(dataset_results / model, selection["folds"])},
                  dataset_results / model / CALIBRATION_FILE)
    save_json(selection["instructions"], dataset_results / INSTRUCTIONS_FILE)
    return selection


def _choice_line(level: str, chosen: str, why: dict, name) -> str:
    """One line saying why the chosen candidate was chosen (the one-SE rule, in words)."""
    best = name(why["best"])
    best_text = f"{best}, {why['best_auroc']:.3f}"
    se = {name(m): v for m, v in why["difference_se"].items()}
    if chosen == SIZE_RULE and chosen == best:
        return (f"chosen: {SIZE_RULE}: no model beats it (the best {level}-level within-fold AUROC, "
                f"{why['best_auroc']:.3f}); the models' probabilities add nothing the short axis does not say here")
    if chosen == SIZE_RULE:
        return (f"chosen: {SIZE_RULE}: no model beats it by more than noise (best {level}-level within-fold AUROC: "
                f"{best_text}; the size rule is within one paired bootstrap SE, {se[chosen]:.3f}, of it)")
    if chosen == best:
        return (f"chosen: {chosen}, the best {level}-level within-fold AUROC ({why['best_auroc']:.3f}); nothing "
                "simpler is within one paired bootstrap SE of it")
    return (f"chosen: {chosen}, the simplest candidate within one paired bootstrap SE ({se[chosen]:.3f}) of the "
            f"best ({best_text})")


def size_rule_table(crops_dir: Path) -> pd.DataFrame:
    """(case, node, short_axis_mm) of every cached node: the clinician's size rule as a score."""
    rows = []
    for path in sorted(Path(crops_dir).glob("*.npz")):
        with np.load(path, allow_pickle=False) as f:
            rows += [{"case": str(f["case_id"]), "node": int(k), "short_axis_mm": float(s)}
                     for k, s in zip(f["node_ids"], f["short_axis_mm"])]
    return pd.DataFrame(rows, columns=["case", "node", "short_axis_mm"])


def load_instructions(dataset_results: Path) -> dict | None:
    """The chosen model(s) of a dataset, or None when lnm_find_best_configuration has not run."""
    path = Path(dataset_results) / INSTRUCTIONS_FILE
    return read_json(path) if path.is_file() else None
