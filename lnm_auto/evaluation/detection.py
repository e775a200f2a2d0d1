"""Evaluation of node detection: detected components against reference nodes, by voxel overlap.

Pure functions on arrays and tables (reading the masks and CSVs: detection_inputs.py; the lnm_evaluate run that
writes the report: detection_report.py). The rules, documented in documentation/evaluation.md:

* a reference node is **found** when any detected component overlaps it by >= 1 voxel (its best Dice / IoU over
  those components is recorded);
* each detected component is **matched** to the reference node it overlaps most (ties: the lowest node id); a
  component overlapping no reference node is a **false positive**;
* a found node's **probability** is the max over the components matched to it; a node found only by a component
  matched to a neighbour (one component over two nodes) takes that component's probability.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from lnm_auto.evaluation import metrics as M
from lnm_auto.evaluation.report import level_metrics
from lnm_auto.evaluation.statistics import percentile_ci, resample_groups
from lnm_auto.utils.labels import UNKNOWN

PAIR_COLUMNS = ["reference_node", "detected_node", "overlap_voxels", "reference_voxels", "detected_voxels",
                "dice", "iou", "matched"]
LABEL_NAMES = {1: "metastatic", 0: "benign", UNKNOWN: "unknown"}


# ------------------------------------------------------------------------------------------------
# one case: overlap of two instance masks on the same grid
# ------------------------------------------------------------------------------------------------
def overlap_pairs(reference: np.ndarray, detected: np.ndarray) -> pd.DataFrame:
    """Every (reference node, detected component) pair sharing >= 1 voxel, with overlap, Dice, IoU and whether the
    pair is the component's match (the node it overlaps most; ties: the lowest node id). One row per pair."""
    ref = np.asarray(reference, dtype=np.int64).ravel()
    det = np.asarray(detected, dtype=np.int64).ravel()
    if ref.shape != det.shape:
        raise ValueError(f"masks of different shapes: {np.shape(reference)} and {np.shape(detected)}")
    both = np.flatnonzero((ref > 0) & (det > 0))
    if not both.size:
        return pd.DataFrame({c: pd.Series(dtype=bool if c == "matched" else float) for c in PAIR_COLUMNS})
    width = int(det.max()) + 1
    keys, overlap = np.unique(ref[both] * width + det[both], return_counts=True)
    ref_ids, det_ids = keys // width, keys % width
    ref_size = np.bincount(ref[ref > 0], minlength=int(ref.max()) + 1)[ref_ids]
    det_size = np.bincount(det[det > 0], minlength=width)[det_ids]
    pairs = pd.DataFrame({"reference_node": ref_ids, "detected_node": det_ids, "overlap_voxels": overlap,
                          "reference_voxels": ref_size, "detected_voxels": det_size})
    pairs["dice"] = 2.0 * overlap / (ref_size + det_size)
    pairs["iou"] = overlap / (ref_size + det_size - overlap)
    # the component's match: most overlap first, then the lowest reference id (np.unique sorted the ids)
    best = pairs.sort_values(["detected_node", "overlap_voxels", "reference_node"], ascending=[True, False, True],
                             kind="stable").drop_duplicates("detected_node").index
    pairs["matched"] = pairs.index.isin(best)
    return pairs.reset_index(drop=True)


def node_outcomes(pairs: pd.DataFrame, reference_nodes: list[int], probability: dict[int, float]) -> pd.DataFrame:
    """One row per reference node: found, best Dice / IoU, the probability it takes (NaN when missed) and how
    many components match it. ``probability``: detected component id -> its predicted probability."""
    rows = []
    for node in reference_nodes:
        mine = pairs[pairs["reference_node"] == node]
        matched = mine.loc[mine["matched"], "detected_node"].tolist()
        scoring = matched or mine["detected_node"].tolist()       # merged component: it speaks for this node too
        rows.append({"node": int(node), "found": bool(len(mine)),
                     "best_dice": float(mine["dice"].max()) if len(mine) else 0.0,
                     "best_iou": float(mine["iou"].max()) if len(mine) else 0.0,
                     "n_matched_components": len(matched),
                     "probability": max((probability[int(d)] for d in scoring), default=math.nan)})
    return pd.DataFrame(rows, columns=["node", "found", "best_dice", "best_iou", "n_matched_components",
                                       "probability"])


def false_positives(pairs: pd.DataFrame, detected_nodes: list[int]) -> list[int]:
    """Detected components that overlap no reference node."""
    touching = set(pairs["detected_node"].astype(int))
    return [int(d) for d in detected_nodes if int(d) not in touching]


def match_rows(case: str, pairs: pd.DataFrame, outcomes: pd.DataFrame, fps: list[int],
               labels: dict[int, int], probability: dict[int, float]) -> pd.DataFrame:
    """detection_matches.csv rows of one case: every overlapping pair, each missed reference node (no detected
    node) and each false-positive component (no reference node)."""
    rows = [{"case": case, "reference_node": int(r.reference_node), "detected_node": int(r.detected_node),
             "overlap_voxels": int(r.overlap_voxels), "dice": float(r.dice), "iou": float(r.iou),
             "matched": bool(r.matched)} for r in pairs.itertuples(index=False)]
    rows += [{"case": case, "reference_node": int(n), "detected_node": None, "overlap_voxels": 0, "dice": 0.0,
              "iou": 0.0, "matched": False} for n in outcomes.loc[~outcomes["found"], "node"]]
    rows += [{"case": case, "reference_node": None, "detected_node": d, "overlap_voxels": 0, "dice": 0.0,
              "iou": 0.0, "matched": False} for d in fps]
    out = pd.DataFrame(rows, columns=["case", "reference_node", "detected_node", "overlap_voxels", "dice", "iou",
                                      "matched"])
    out["reference_label"] = [_label_text(labels.get(int(n), UNKNOWN)) if pd.notna(n) else ""
                              for n in out["reference_node"]]
    out["detected_probability"] = [probability.get(int(d), math.nan) if pd.notna(d) else math.nan
                                   for d in out["detected_node"]]
    return out.astype({"reference_node": "Int64", "detected_node": "Int64"})


def _label_text(label: int) -> str:
    return "" if label == UNKNOWN else str(int(label))


# ------------------------------------------------------------------------------------------------
# over cases: sensitivity, false positives, classification on found nodes
# ------------------------------------------------------------------------------------------------
def ratio_with_ci(numerator: np.ndarray, denominator: np.ndarray, groups: np.ndarray, n_bootstrap: int,
                  seed: int) -> dict[str, Any]:
    """sum(numerator) / sum(denominator) with a 95 % percentile CI from resampling ``groups`` (patients) with
    replacement, as the other metrics' CIs ([null, null] without resamples or units)."""
    num, den = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    value = float(num.sum() / den.sum()) if den.sum() > 0 else math.nan
    if n_bootstrap <= 0 or not num.size:
        return {"value": value, "ci95": [math.nan, math.nan]}
    codes, draws = resample_groups(np.asarray(groups), num.size, n_bootstrap, seed)
    n_groups = draws.shape[1]
    num_g = np.bincount(codes, weights=num, minlength=n_groups)
    den_g = np.bincount(codes, weights=den, minlength=n_groups)
    flat = (draws.astype(np.int64) + np.arange(n_bootstrap)[:, None] * n_groups).ravel()
    counts = np.bincount(flat, minlength=n_bootstrap * n_groups).reshape(n_bootstrap, n_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        replicates = (counts @ num_g) / (counts @ den_g)
    return {"value": value, "ci95": list(percentile_ci(replicates))}


def sensitivity_by_label(nodes: pd.DataFrame, n_bootstrap: int, seed: int) -> dict[str, dict]:
    """Per reference label (metastatic, benign, unknown): n, n_found and the sensitivity with its patient CI."""
    out = {}
    for label, name in LABEL_NAMES.items():
        part = nodes[nodes["label"] == label]
        found = part["found"].to_numpy(dtype=float)
        out[name] = {"n": int(len(part)), "n_found": int(found.sum()),
                     **ratio_with_ci(found, np.ones(len(part)), part["patient"].to_numpy(), n_bootstrap, seed)}
    return out


def found_node_classification(nodes: pd.DataFrame, n_bootstrap: int, seed: int) -> dict[str, Any]:
    """level_metrics on the found reference nodes with a known label, scored by their matched components."""
    found = nodes[nodes["found"]]
    known = found["label"].to_numpy() != UNKNOWN
    if not known.any():
        return {"n": 0, "n_pos": 0, "n_neg": 0, "skipped": "no found node is labelled 0 or 1", "warnings": []}
    return level_metrics(found["label"].to_numpy()[known].astype(int), found["probability"].to_numpy()[known],
                         found["patient"].to_numpy()[known], int((~known).sum()), n_bootstrap, seed)


def detection_summary(nodes: pd.DataFrame, fp_by_case: dict[str, int], patient_of: dict[str, str],
                      n_detected: int, n_bootstrap: int, seed: int) -> dict[str, Any]:
    """The numbers of the detection section. ``nodes``: one row per reference node of the detected cases (case,
    node, label, patient, found, best_dice, probability); ``fp_by_case``: every evaluated case (0 included)."""
    cases = sorted(fp_by_case)
    found = nodes["found"].to_numpy(dtype=float)
    dice = nodes.loc[nodes["found"], "best_dice"]
    return {
        "n_cases": len(cases), "n_reference_nodes": int(len(nodes)), "n_detected": int(n_detected),
        "n_found": int(found.sum()), "n_false_positives": int(sum(fp_by_case.values())),
        "sensitivity": ratio_with_ci(found, np.ones(len(nodes)), nodes["patient"].to_numpy(), n_bootstrap, seed),
        "sensitivity_by_label": sensitivity_by_label(nodes, n_bootstrap, seed),
        "false_positives_per_case": ratio_with_ci(np.array([fp_by_case[c] for c in cases], dtype=float),
                                                  np.ones(len(cases)), np.array([patient_of[c] for c in cases]),
                                                  n_bootstrap, seed),
        "false_positives_by_case": {c: int(fp_by_case[c]) for c in cases},
        "dice_of_found_nodes": {"mean": float(dice.mean()) if len(dice) else math.nan,
                                "median": float(dice.median()) if len(dice) else math.nan},
        "classification_on_found_nodes": found_node_classification(nodes, n_bootstrap, seed),
    }


# ------------------------------------------------------------------------------------------------
# patient level: detected masks beside given masks, on the same patients
# ------------------------------------------------------------------------------------------------
def patient_comparison(detected: dict[str, float], given: dict[str, float] | None, patient_of: dict[str, str],
                       patient_label: dict[str, int], n_bootstrap: int, seed: int) -> dict[str, Any]:
    """Patient AUROC from the detected cases' probabilities (``detected``: case -> max over its detected
    components, 0 for none) beside the given-mask prediction's (``given``: case -> max over its nodes; None when
    no --compare), on the labelled patients both cover; DeLong and the paired patient-bootstrap CI of the
    difference when both are there."""
    cases_of: dict[str, list[str]] = {}
    for case in detected:
        cases_of.setdefault(patient_of[case], []).append(case)
    labelled = sorted(p for p in cases_of if patient_label.get(p, UNKNOWN) != UNKNOWN)
    both = [p for p in labelled if given is None or all(c in given for c in cases_of[p])]
    y = np.array([patient_label[p] for p in both], dtype=int)
    p_det = np.array([max(detected[c] for c in cases_of[p]) for p in both], dtype=float)
    res: dict[str, Any] = {"n_patients": len(both), "n_pos": int(y.sum()), "n_neg": int(len(y) - y.sum()),
                           "n_unlabelled_left_out": len(cases_of) - len(labelled),
                           "n_left_out_no_given_prediction": len(labelled) - len(both),
                           "detected": M.auroc(y, p_det) if len(y) else math.nan, "given": None,
                           "patients": "the labelled patients of the detected cases"
                                       + (" that the --compare predictions also cover" if given is not None else "")}
    if given is None:
        res["note"] = "no --compare: give the predictions made with the given masks to compare with them"
        return res
    p_giv = np.array([max(given[c] for c in cases_of[p]) for p in both], dtype=float)
    res["given"] = M.auroc(y, p_giv) if len(y) else math.nan
    if res["n_pos"] and res["n_neg"]:
        dl = M.delong_test(y, p_det, p_giv)
        res["delong"] = {k: dl[k] for k in ("z", "p_value", "ci95_diff")}
        res["warnings"] = dl["warnings"]
        if n_bootstrap > 0:
            boot = M.paired_bootstrap_auroc_difference(y, p_det, p_giv, np.array(both), n_bootstrap, seed)
            res["bootstrap_diff_ci95"] = list(boot["ci95"])
    return res


# ------------------------------------------------------------------------------------------------
# text
# ------------------------------------------------------------------------------------------------
def _value_ci(entry: dict) -> str:
    v, ci = entry.get("value"), entry.get("ci95") or [None, None]
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if None in ci or any(isinstance(c, float) and not math.isfinite(c) for c in ci):
        return f"{v:.3f}"
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _number(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def format_detection(det: dict) -> str:
    """The detection section as console lines (accepts the dict as written to metrics.json)."""
    rows = [("cases (detected masks)", str(det["n_cases"])),
            ("reference nodes", str(det["n_reference_nodes"])),
            ("detected components", str(det["n_detected"])),
            ("found reference nodes", str(det["n_found"])),
            ("sensitivity (per node)", _value_ci(det["sensitivity"]))]
    for name, entry in det["sensitivity_by_label"].items():
        if entry["n"]:
            rows.append((f"  sensitivity, {name}", f"{_value_ci(entry)}  ({entry['n_found']}/{entry['n']})"))
    rows.append(("false positives / case", _value_ci(det["false_positives_per_case"])))
    rows.append(("Dice of found nodes (mean)", _number(det["dice_of_found_nodes"]["mean"])))
    cls = det["classification_on_found_nodes"]
    rows.append(("found nodes: n (pos/neg)", f"{cls['n']} ({cls['n_pos']}/{cls['n_neg']})"))
    rows.append(("found nodes: AUROC", f"skipped ({cls['skipped']})" if "skipped" in cls else _value_ci(cls["auroc"])))
    pat = det["patient_auroc"]
    rows.append(("patient AUROC, detected masks", _number(pat["detected"])))
    rows.append(("patient AUROC, given masks", "n/a (no --compare)" if pat["given"] is None and "note" in pat
                 else _number(pat["given"])))
    rows.append(("  on patients (pos/neg)", f"{pat['n_patients']} ({pat['n_pos']}/{pat['n_neg']})"))
    if pat.get("delong"):
        rows.append(("  DeLong p (detected - given)", _number(pat["delong"]["p_value"])))
    width = max(len(r[0]) for r in rows)
    out = ["detection", "-" * width] + [f"{k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(out + [f"note: {n}" for n in det.get("notes", [])])
