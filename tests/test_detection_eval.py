"""lnm_evaluate --ref_masks: detection sensitivity, false positives, classification on found nodes and the patient
AUROC with detected masks beside given masks, on hand-made instance masks whose every number is worked out by hand.

The five cases (masks of shape (2, 10, 10), z y x):
  a: reference nodes 1 (met), 2 (benign), 3 (met); components 1 (0.9, half over node 1), 2 (0.3, exactly node 2),
     3 (0.8, over nothing: false positive) -> nodes 1, 2 found, node 3 missed.
  b: reference nodes 1 (benign, 9 voxels), 2 (met, 6 voxels); one component (0.6, a row of 6 voxels) over 3 voxels of
     node 1 and 2 of node 2 -> matched to node 1, both found, node 2 scored by it too.
  c: reference nodes 1 (met), 2 (benign); nothing detected (an all-zero mask, no rows in nodes.csv).
  d: reference node 1 (benign) detected exactly (0.2).
  e: reference node 1 (benign) missed; one false positive (0.95).
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from sklearn.metrics import roc_auc_score

from lnm_auto.evaluation.detection import node_outcomes, overlap_pairs, patient_comparison

SHAPE = (2, 10, 10)


def _mask(blocks: dict[int, tuple]) -> np.ndarray:
    arr = np.zeros(SHAPE, np.uint16)
    for node, block in blocks.items():
        arr[block] = node
    return arr


REFERENCE = {
    "a": _mask({1: np.s_[0, 0:2, 0:2], 2: np.s_[0, 5:7, 5:7], 3: np.s_[1, 8:10, 8:10]}),
    "b": _mask({1: np.s_[0, 0:3, 0:3], 2: np.s_[0, 0:3, 4:6]}),
    "c": _mask({1: np.s_[0, 0:2, 0:2], 2: np.s_[1, 4:6, 4:6]}),
    "d": _mask({1: np.s_[0, 0:2, 0:2]}),
    "e": _mask({1: np.s_[0, 0:2, 0:2]}),
}
DETECTED = {
    "a": _mask({1: np.s_[0, 0:2, 1:3], 2: np.s_[0, 5:7, 5:7], 3: np.s_[1, 0:2, 5:7]}),
    "b": _mask({1: np.s_[0, 1:2, 0:6]}),
    "c": _mask({}),
    "d": _mask({1: np.s_[0, 0:2, 0:2]}),
    "e": _mask({1: np.s_[1, 5:7, 5:7]}),
}
LABELS = {("a", 1): 1, ("a", 2): 0, ("a", 3): 1, ("b", 1): 0, ("b", 2): 1, ("c", 1): 1, ("c", 2): 0,
          ("d", 1): 0, ("e", 1): 0}
DETECTED_PROBABILITY = {("a", 1): 0.9, ("a", 2): 0.3, ("a", 3): 0.8, ("b", 1): 0.6, ("d", 1): 0.2, ("e", 1): 0.95}
GIVEN_PROBABILITY = {("a", 1): 0.8, ("a", 2): 0.1, ("a", 3): 0.7, ("b", 1): 0.5, ("b", 2): 0.4, ("c", 1): 0.6,
                     ("c", 2): 0.1, ("d", 1): 0.3, ("e", 1): 0.2}


def write_mask(arr: np.ndarray, path: Path, spacing=(0.8, 0.8, 4.0)) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin((10.0, -5.0, 30.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


@pytest.fixture
def files(tmp_path) -> Path:
    """ds/nodesTs/<case>.nii.gz + ds/nodesTs.csv (reference), preds/<case>_nodes.nii.gz + preds/nodes.csv
    (detected run), given.csv (predictions with the given masks)."""
    for case in REFERENCE:
        write_mask(REFERENCE[case], tmp_path / "ds" / "nodesTs" / f"{case}.nii.gz")
        write_mask(DETECTED[case], tmp_path / "preds" / f"{case}_nodes.nii.gz")
    rows = [{"case": c, "node": n, "station": "7", "label": y} for (c, n), y in LABELS.items()]
    pd.DataFrame(rows).to_csv(tmp_path / "ds" / "nodesTs.csv", index=False)
    pd.DataFrame([{"case": c, "node": n, "station": "unknown", "probability": p, "detected": "true",
                   "detection_confidence": 0.7} for (c, n), p in DETECTED_PROBABILITY.items()]).to_csv(
        tmp_path / "preds" / "nodes.csv", index=False)
    pd.DataFrame([{"case": c, "node": n, "probability": p} for (c, n), p in GIVEN_PROBABILITY.items()]).to_csv(
        tmp_path / "given.csv", index=False)
    return tmp_path


def run_evaluate(folder: Path, *extra, capsys, pred: str = "preds/nodes.csv") -> tuple[int, str, str]:
    from lnm_auto.cli import evaluate_entry
    code = evaluate_entry(["-ref", str(folder / "ds" / "nodesTs.csv"), "-pred", str(folder / pred),
                           "-o", str(folder / "out"), "--ref_masks", str(folder / "ds" / "nodesTs"),
                           "--n_bootstrap", "200", *map(str, extra)])
    out, err = capsys.readouterr()
    return code, out, err


def refused_line(code: int, err: str, *fragments) -> str:
    assert code == 1 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if all(f in line for f in fragments)]
    assert len(err.strip().splitlines()) == 1 and lines, err
    return lines[0]


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- matching: pure functions --------------------------------------------------------------------------
def test_three_reference_nodes_two_found_one_false_positive():
    pairs = overlap_pairs(REFERENCE["a"], DETECTED["a"])
    assert pairs[["reference_node", "detected_node", "overlap_voxels"]].values.tolist() == [[1, 1, 2], [2, 2, 4]]
    assert pairs["dice"].tolist() == [0.5, 1.0]                 # 2 * 2 / (4 + 4), 2 * 4 / (4 + 4)
    assert pairs["iou"].tolist() == [pytest.approx(2 / 6), 1.0]
    assert pairs["matched"].tolist() == [True, True]
    nodes = node_outcomes(pairs, [1, 2, 3], {1: 0.9, 2: 0.3, 3: 0.8})
    assert nodes["found"].tolist() == [True, True, False]
    assert nodes["best_dice"].tolist() == [0.5, 1.0, 0.0]
    assert nodes["probability"].tolist()[:2] == [0.9, 0.3] and math.isnan(nodes["probability"].iloc[2])


def test_a_component_over_two_nodes_finds_both_and_is_matched_to_the_larger_overlap():
    pairs = overlap_pairs(REFERENCE["b"], DETECTED["b"])
    assert pairs[["reference_node", "detected_node", "overlap_voxels", "matched"]].values.tolist() == [
        [1, 1, 3, True], [2, 1, 2, False]]
    assert pairs["dice"].tolist() == [pytest.approx(6 / 15), pytest.approx(4 / 12)]
    nodes = node_outcomes(pairs, [1, 2], {1: 0.6})
    assert nodes["found"].tolist() == [True, True] and nodes["probability"].tolist() == [0.6, 0.6]
    assert nodes["n_matched_components"].tolist() == [1, 0]
    # equal overlap with two nodes: matched to the lowest node id; a node with two matched components takes the max
    ref = _mask({1: np.s_[0, 0:2, 0:2], 2: np.s_[0, 0:2, 3:5]})
    det = _mask({5: np.s_[0, 0, 1:4], 6: np.s_[0, 1, 0:2], 7: np.s_[1, 0, 0]})
    pairs = overlap_pairs(ref, det)
    assert pairs[pairs["matched"]][["reference_node", "detected_node"]].values.tolist() == [[1, 5], [1, 6]]
    assert node_outcomes(pairs, [1, 2], {5: 0.4, 6: 0.7, 7: 0.1})["probability"].tolist() == [0.7, 0.4]


def test_an_empty_detection_finds_nothing():
    pairs = overlap_pairs(REFERENCE["c"], DETECTED["c"])
    assert pairs.empty
    nodes = node_outcomes(pairs, [1, 2], {})
    assert nodes["found"].tolist() == [False, False] and nodes["best_dice"].tolist() == [0.0, 0.0]


def test_patient_comparison_uses_the_patients_both_cover():
    detected = {"a": 0.9, "b": 0.6, "c": 0.0, "d": 0.2, "e": 0.95}
    given = {"a": 0.8, "b": 0.5, "d": 0.3, "e": 0.2}             # c not predicted with its given mask
    labels = {"a": 1, "b": 1, "c": 1, "d": 0, "e": 0}
    res = patient_comparison(detected, given, {c: c for c in detected}, labels, 0, 0)
    assert res["n_patients"] == 4 and res["n_left_out_no_given_prediction"] == 1
    assert res["detected"] == pytest.approx(roc_auc_score([1, 1, 0, 0], [0.9, 0.6, 0.2, 0.95]))
    assert res["given"] == 1.0


# ---- lnm_evaluate end to end --------------------------------------------------------------------------
def test_lnm_evaluate_reports_detection_with_hand_computed_values(files, capsys):
    before = tree_hashes(files)
    code, out, err = run_evaluate(files, "--compare", files / "given.csv", capsys=capsys)
    assert code == 0, err
    assert tree_hashes(files / "ds") == {k[3:]: v for k, v in before.items() if k.startswith("ds/")}
    assert all(tree_hashes(files)[k] == v for k, v in before.items())      # no input changed
    det = json.loads((files / "out" / "metrics.json").read_text())["detection"]
    assert (det["n_cases"], det["n_reference_nodes"], det["n_detected"], det["n_found"],
            det["n_false_positives"]) == (5, 9, 6, 5, 2)
    assert det["sensitivity"]["value"] == pytest.approx(5 / 9)
    lo, hi = det["sensitivity"]["ci95"]
    assert 0 <= lo <= 5 / 9 <= hi <= 1
    assert (det["sensitivity_by_label"]["metastatic"]["n_found"], det["sensitivity_by_label"]["metastatic"]["n"]) \
        == (2, 4)
    assert det["sensitivity_by_label"]["metastatic"]["value"] == 0.5
    assert det["sensitivity_by_label"]["benign"]["value"] == pytest.approx(3 / 5)
    assert det["false_positives_per_case"]["value"] == pytest.approx(2 / 5)
    assert det["false_positives_by_case"] == {"a": 1, "b": 0, "c": 0, "d": 0, "e": 1}
    assert det["dice_of_found_nodes"]["mean"] == pytest.approx((0.5 + 1.0 + 6 / 15 + 4 / 12 + 1.0) / 5)
    found_y, found_p = [1, 0, 0, 1, 0], [0.9, 0.3, 0.6, 0.6, 0.2]          # a1, a2, b1, b2, d1
    cls = det["classification_on_found_nodes"]
    assert (cls["n"], cls["n_pos"], cls["n_neg"]) == (5, 2, 3)
    assert cls["auroc"]["value"] == pytest.approx(roc_auc_score(found_y, found_p)) == pytest.approx(5.5 / 6)
    pat = det["patient_auroc"]                # patients a..e: max over every detected component, c nothing -> 0
    assert pat["n_patients"] == 5
    assert pat["detected"] == pytest.approx(roc_auc_score([1, 1, 1, 0, 0], [0.9, 0.6, 0.0, 0.2, 0.95]))
    assert pat["given"] == pytest.approx(roc_auc_score([1, 1, 1, 0, 0], [0.8, 0.5, 0.6, 0.3, 0.2]))
    # the matching table: every overlapping pair, the missed nodes and the false positives
    matches = pd.read_csv(files / "out" / "detection_matches.csv", dtype={"reference_node": "Int64",
                                                                         "detected_node": "Int64"})
    assert len(matches) == 11      # a: 2 pairs + missed 3 + fp 3; b: 2 pairs; c: 2 missed; d: 1 pair; e: missed + fp
    b = matches[matches["case"] == "b"]
    assert b[["reference_node", "detected_node", "overlap_voxels", "matched"]].values.tolist() == [
        [1, 1, 3, True], [2, 1, 2, False]]
    fp = matches[matches["reference_node"].isna()]
    assert sorted(zip(fp["case"], fp["detected_node"].astype(int))) == [("a", 3), ("e", 1)]
    # the ordinary levels score each reference node by its detection, a missed node 0
    node_pred = pd.read_csv(files / "out" / "detection_node_predictions.csv")
    assert dict(zip(zip(node_pred["case"], node_pred["node"]), node_pred["probability"])) == {
        ("a", 1): 0.9, ("a", 2): 0.3, ("a", 3): 0.0, ("b", 1): 0.6, ("b", 2): 0.6, ("c", 1): 0.0, ("c", 2): 0.0,
        ("d", 1): 0.2, ("e", 1): 0.0}
    assert "sensitivity (per node)" in out and "0.556" in out and "patient AUROC, given masks" in out


def test_given_mask_cases_are_left_out_of_detection(files, capsys):
    pred = pd.read_csv(files / "preds" / "nodes.csv")
    given_d = pd.DataFrame({"case": ["d"], "node": [1], "station": ["7"], "probability": [0.25], "detected": ["false"],
                            "detection_confidence": [None]})
    pd.concat([pred[pred["case"] != "d"], given_d]).to_csv(files / "preds" / "mixed.csv", index=False)
    code, out, err = run_evaluate(files, capsys=capsys, pred="preds/mixed.csv")
    assert code == 0, err
    document = json.loads((files / "out" / "metrics.json").read_text())
    det = document["detection"]
    assert (det["n_cases"], det["n_reference_nodes"], det["n_found"], det["n_cases_given_masks"]) == (4, 8, 4, 1)
    assert det["patient_auroc"]["given"] is None and "no --compare" in det["patient_auroc"]["note"]
    assert any("1 case(s) predicted on their given masks (detected=false)" in n for n in det["notes"])
    node_pred = pd.read_csv(files / "out" / "detection_node_predictions.csv")
    assert node_pred.loc[node_pred["case"] == "d", "probability"].tolist() == [0.25]


# ---- hostile input: one line naming the file -----------------------------------------------------------
def test_detected_mask_on_another_grid_is_refused(files, capsys):
    write_mask(DETECTED["b"], files / "preds" / "b_nodes.nii.gz", spacing=(0.8, 0.8, 5.0))
    line = refused_line(*run_evaluate(files, capsys=capsys)[::2], "not on the grid of the reference mask")
    assert str(files / "preds" / "b_nodes.nii.gz") in line and str(files / "ds" / "nodesTs" / "b.nii.gz") in line
    assert not (files / "out" / "metrics.json").exists()


def test_missing_masks_and_cases_in_one_table_only_are_refused(files, capsys):
    (files / "ds" / "nodesTs" / "d.nii.gz").unlink()
    refused_line(*run_evaluate(files, capsys=capsys)[::2], str(files / "ds" / "nodesTs"),
                 "no reference mask for case d")
    write_mask(REFERENCE["d"], files / "ds" / "nodesTs" / "d.nii.gz")
    (files / "preds" / "c_nodes.nii.gz").unlink()            # c has no rows and now no detected mask either
    refused_line(*run_evaluate(files, capsys=capsys)[::2], str(files / "preds" / "nodes.csv"),
                 "case c of nodesTs.csv has no rows")
    write_mask(DETECTED["c"], files / "preds" / "c_nodes.nii.gz")
    pred = pd.read_csv(files / "preds" / "nodes.csv")
    extra = pred.iloc[[0]].assign(case="z")
    pd.concat([pred, extra]).to_csv(files / "preds" / "extra.csv", index=False)
    refused_line(*run_evaluate(files, capsys=capsys, pred="preds/extra.csv")[::2], str(files / "preds" / "extra.csv"),
                 "detected case(s) z have no nodes in nodesTs.csv")
    pd.concat([pred, pred.iloc[[0]].assign(node=7)]).to_csv(files / "preds" / "seven.csv", index=False)
    refused_line(*run_evaluate(files, capsys=capsys, pred="preds/seven.csv")[::2],
                 str(files / "preds" / "a_nodes.nii.gz"), "node id(s) [7] of the predictions are not in this mask")
    pred.assign(detected="maybe").to_csv(files / "preds" / "maybe.csv", index=False)
    refused_line(*run_evaluate(files, capsys=capsys, pred="preds/maybe.csv")[::2], str(files / "preds" / "maybe.csv"),
                 "line 2: column 'detected' must be true or false")
    assert not (files / "out" / "metrics.json").exists()


def test_pred_masks_without_ref_masks_and_a_ref_masks_file_are_refused(files, capsys):
    from lnm_auto.cli import evaluate_entry
    code = evaluate_entry(["-ref", str(files / "ds" / "nodesTs.csv"), "-pred", str(files / "given.csv"),
                           "-o", str(files / "out"), "--pred_masks", str(files / "preds")])
    refused_line(code, capsys.readouterr()[1], "--pred_masks needs --ref_masks")
    code, _, err = run_evaluate(files, "--pred_masks", files / "given.csv", capsys=capsys)
    refused_line(code, err, f"--pred_masks {files / 'given.csv'}: not a folder")
