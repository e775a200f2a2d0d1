"""``evaluate_detection``: lnm_evaluate with reference instance masks (``--ref_masks``).

Matches each detected case's components to its reference nodes (detection.py), writes
out_dir/detection_matches.csv and out_dir/detection_node_predictions.csv (every reference node with the probability
the detection gave it), then runs the ordinary report (``evaluate``) on the latter with a "detection" section in
metrics.json. How to read it: documentation/evaluation.md, "Evaluation of detection".
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from lnm_auto.evaluation.detection import (detection_summary, false_positives, match_rows, node_outcomes,
                                           overlap_pairs, patient_comparison)
from lnm_auto.evaluation.detection_inputs import detected_cases, detected_flags, read_case_masks
from lnm_auto.evaluation.inputs import read_predictions, read_reference_nodes
from lnm_auto.evaluation.levels import build_units
from lnm_auto.evaluation.plots import COMPARED
from lnm_auto.evaluation.report import evaluate, refuse_foreign_metrics
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import save_csv_atomic

MATCHES_FILE = "detection_matches.csv"
NODE_PREDICTIONS_FILE = "detection_node_predictions.csv"
MATCHING_RULE = ("a reference node is found when a detected component overlaps it by >= 1 voxel; each component is "
                 "matched to the reference node it overlaps most; a component overlapping none is a false positive")


def _folder(path, flag: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise LNMError(f"{flag} {path}: not a folder; give the folder of the instance masks (<case>.nii.gz or "
                       "<case>_nodes.nii.gz)")
    return path


def _patients(ref: pd.DataFrame, ref_path: Path, ref_patients_csv) -> tuple[dict[str, str], dict[str, int]]:
    """case -> patient and patient -> label, as the patient level of the report has them."""
    units = build_units(ref.assign(probability=0.0), ref_path, None, ref_patients_csv, "max", [])
    patient_of = dict(zip(units["node"]["case"], units["node"]["group"]))
    return patient_of, dict(zip(units["patient"]["patient"], units["patient"]["label"]))


def _match_cases(cases: list[str], ref: pd.DataFrame, pred: pd.DataFrame, ref_masks: Path, pred_masks: Path,
                 patient_of: dict[str, str]) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int], int]:
    """(reference-node outcomes, match rows, false positives per case, n detected components) of the cases."""
    outcomes, matches, fp_by_case, n_detected = [], [], {}, 0
    for case in cases:
        ref_rows, pred_rows = ref[ref["case"] == case], pred[pred["case"] == case]
        ref_nodes = ref_rows["node"].astype(int).tolist()
        probability = dict(zip(pred_rows["node"].astype(int), pred_rows["probability"].astype(float)))
        ref_arr, det_arr = read_case_masks(case, ref_masks, pred_masks, ref_nodes, list(probability))
        pairs = overlap_pairs(ref_arr, det_arr)
        nodes = node_outcomes(pairs, ref_nodes, probability)
        fps = false_positives(pairs, list(probability))
        labels = dict(zip(ref_nodes, ref_rows["label"].astype(int)))
        matches.append(match_rows(case, pairs, nodes, fps, labels, probability))
        outcomes.append(nodes.assign(case=case, label=[labels[n] for n in nodes["node"]], patient=patient_of[case]))
        fp_by_case[case] = len(fps)
        n_detected += len(probability)
    columns = ["case", "node", "label", "patient", "found", "best_dice", "best_iou", "n_matched_components",
               "probability"]
    nodes_df = pd.concat(outcomes, ignore_index=True)[columns] if outcomes else pd.DataFrame(columns=columns)
    matches_df = pd.concat(matches, ignore_index=True) if matches else pd.DataFrame()
    return nodes_df, matches_df, fp_by_case, n_detected


def _node_predictions(nodes: pd.DataFrame, pred: pd.DataFrame, given: list[str]) -> pd.DataFrame:
    """Every reference node of the detected cases with its detection's probability (a missed node 0: the pipeline
    never called it), then the given-mask cases' own rows."""
    detected = pd.DataFrame({"case": nodes["case"], "node": nodes["node"].astype(int),
                             "probability": nodes["probability"].fillna(0.0).astype(float),
                             "found": nodes["found"].astype(bool)})
    own = pred.loc[pred["case"].isin(set(given)), ["case", "node", "probability"]].assign(found=True)
    return pd.concat([detected, own.astype({"node": int})], ignore_index=True)


def _case_maxima(pred: pd.DataFrame, cases: list[str]) -> dict[str, float]:
    """case -> max probability over its rows (0 for a case without rows: nothing detected, nothing called)."""
    maxima = pred.groupby("case")["probability"].max().to_dict()
    return {c: float(maxima.get(c, 0.0)) for c in cases}


def _notes(n_given: int, n_fp: int, has_flags: bool) -> list[str]:
    notes = [f"node, station and patient levels above: each reference node of a detected case takes the "
             f"probability of its matched component, a missed node 0 (never called); the {n_fp} false-positive "
             "component(s) are in no level above; the patient AUROC with detected masks here counts every component"]
    if n_given:
        notes.append(f"{n_given} case(s) predicted on their given masks (detected=false) are not in the detection "
                     "numbers; the levels above include them with their own predictions")
    if not has_flags:
        notes.append("the predictions have no 'detected' column: every case was matched by overlap")
    return notes


def evaluate_detection(ref_nodes_csv, pred_nodes_csv, out_dir, ref_masks, pred_masks=None, ref_stations_csv=None,
                       ref_patients_csv=None, compare_pred_csv=None, n_bootstrap: int = 1000, seed: int = 0,
                       compare_name: str = COMPARED) -> dict[str, Any]:
    """The ordinary report of ``evaluate`` on the detected predictions mapped onto the reference nodes, with a
    "detection" section (sensitivity, false positives per case, classification on found nodes, patient AUROC with
    detected masks beside the --compare predictions made with the given masks). Returns metrics.json's dict."""
    out_dir, ref_path, pred_path = Path(out_dir), Path(ref_nodes_csv), Path(pred_nodes_csv)
    if out_dir.exists() and not out_dir.is_dir():
        raise LNMError(f"-o {out_dir}: is a file, not a folder")
    if int(n_bootstrap) < 0:
        raise LNMError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    refuse_foreign_metrics(out_dir)
    ref_masks = _folder(ref_masks, "--ref_masks")
    pred_masks = _folder(pred_masks if pred_masks is not None else pred_path.parent, "--pred_masks")
    ref, pred = read_reference_nodes(ref_path), read_predictions(pred_path)
    flags = detected_flags(pred, pred_path)
    detected, given = detected_cases(ref, pred, flags, pred_path, ref_path, pred_masks)
    patient_of, patient_label = _patients(ref, ref_path, ref_patients_csv)
    nodes, matches, fp_by_case, n_detected = _match_cases(detected, ref, pred, ref_masks, pred_masks, patient_of)
    section = {"predictions": str(pred_path), "reference_masks": str(ref_masks), "predicted_masks": str(pred_masks),
               "matching": MATCHING_RULE, "n_cases_given_masks": len(given)}
    section.update(detection_summary(nodes, fp_by_case, patient_of, n_detected, int(n_bootstrap), int(seed)))
    given_maxima = None
    if compare_pred_csv is not None:
        compared = read_predictions(compare_pred_csv)
        given_maxima = {c: float(p) for c, p in compared.groupby("case")["probability"].max().items()}
    section["patient_auroc"] = patient_comparison(_case_maxima(pred, detected), given_maxima, patient_of,
                                                  patient_label, int(n_bootstrap), int(seed))
    section["notes"] = _notes(len(given), section["n_false_positives"], flags is not None)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_csv_atomic(matches, out_dir / MATCHES_FILE)
    save_csv_atomic(_node_predictions(nodes, pred, given), out_dir / NODE_PREDICTIONS_FILE)
    return evaluate(ref_path, out_dir / NODE_PREDICTIONS_FILE, out_dir, ref_stations_csv, ref_patients_csv,
                    compare_pred_csv, n_bootstrap, seed, compare_name=compare_name, sections={"detection": section})
