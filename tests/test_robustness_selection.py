"""Hostile input to model selection and evaluation, built for real: results folders laid out as lnm_train writes
them (plans.json, dataset_fingerprint.json, fold_<k>/validation/predictions.csv) and evaluation CSVs, each broken
one way and run through the command-line programs. Every one either works as documented or stops with one line
naming the file, a non-zero exit, no traceback and no choice written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from conftest import run_cli

DS = "Dataset042_Tiny"
N_CASES = 10
RADIOMICS = "RadiomicsTrainer__LNMPlans__radiomics"
NETWORK = "LNMTrainer__LNMPlans__2d25"


def refused(proc, *fragments) -> str:
    """The run failed with a one-line reason holding every fragment (no traceback); returns that line."""
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    assert "Traceback" not in text, text
    lines = [line for line in proc.stderr.splitlines() if all(f in line for f in fragments)]
    assert lines, f"no line with {fragments} in:\n{proc.stderr}"
    return lines[0]


# ------------------------------------------------------------------------------------------------
# lnm_find_best_configuration
# ------------------------------------------------------------------------------------------------
def dataset_nodes() -> pd.DataFrame:
    """The tiny dataset's nodes (conftest.write_tiny_dataset): 2-3 per case, node 1 positive in odd cases."""
    rows = []
    for i in range(N_CASES):
        for k in range(1, 2 + i % 2 + 1):
            positive = int(k == 1 and i % 2 == 1)
            rows.append({"case": f"case_{i:03d}", "node": k, "station": "7" if k == 1 else "4R", "label": positive,
                         "station_label": positive if k == 1 else 0, "patient_label": i % 2})
    return pd.DataFrame(rows)


def write_model(results: Path, name: str, probability: np.ndarray, nodes: pd.DataFrame | None = None,
                folds=range(5)) -> Path:
    """A model folder as lnm_train leaves it: fold k validates the cases i with i % 5 == k."""
    nodes = dataset_nodes() if nodes is None else nodes
    folder = results / DS / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps({"plans_name": "LNMPlans", "n_folds": 5}))
    (folder / "dataset_fingerprint.json").write_text(json.dumps(
        {"nodes": [{"case": r.case, "node": int(r.node)} for r in nodes.itertuples()]}))
    fold_of = nodes["case"].str[-3:].astype(int) % 5
    for k in folds:
        out = folder / f"fold_{k}" / "validation"
        out.mkdir(parents=True, exist_ok=True)
        nodes[fold_of == k].assign(probability=probability[(fold_of == k).to_numpy()]).to_csv(
            out / "predictions.csv", index=False)
    return folder


def good_scores(nodes: pd.DataFrame, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(0.3 + 0.4 * nodes["label"].to_numpy() + rng.normal(0, 0.15, len(nodes)), 0.01, 0.99)


@pytest.fixture
def results(tmp_path) -> Path:
    nodes = dataset_nodes()
    write_model(tmp_path / "res", RADIOMICS, good_scores(nodes, 0))
    write_model(tmp_path / "res", NETWORK, good_scores(nodes, 1))
    return tmp_path / "res"


def find_best(results: Path, *args):
    return run_cli("find_best_configuration", "-d", "42", "--results", results, "--n_bootstrap", "20", *args,
                   env={"LNM_preprocessed": None})


def no_choice(results: Path) -> bool:
    return not (results / DS / "inference_instructions.json").exists()


def predictions_file(results: Path, model: str, fold: int) -> Path:
    return results / DS / model / f"fold_{fold}" / "validation" / "predictions.csv"


def test_nan_probability_in_a_fold_names_the_file(results):
    path = predictions_file(results, NETWORK, 2)
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    table.loc[1, "probability"] = "nan"
    table.to_csv(path, index=False)
    refused(find_best(results), str(path), "NaN", "line 3")
    assert no_choice(results)


def test_probability_above_one_in_a_fold_names_the_file(results):
    path = predictions_file(results, RADIOMICS, 0)
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    table.loc[0, "probability"] = "1.7"
    table.to_csv(path, index=False)
    refused(find_best(results), str(path), "[0, 1]")
    assert no_choice(results)


def test_rows_for_cases_not_in_the_dataset_are_refused(results):
    path = predictions_file(results, NETWORK, 1)
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    extra = table.iloc[:1].assign(case="case_999", label="1", probability="0.99")   # would raise the AUROC
    pd.concat([table, extra]).to_csv(path, index=False)
    refused(find_best(results), str(path), "not in the dataset", "case case_999 node 1")
    assert no_choice(results)


def test_a_validation_case_predicted_only_in_part_is_refused(results):
    path = predictions_file(results, RADIOMICS, 3)
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    table.iloc[1:].to_csv(path, index=False)          # case_003 node 1 dropped, its other nodes kept
    refused(find_best(results), str(path), "have no prediction", "case case_003 node 1")


def test_a_label_that_is_not_a_label_names_file_and_line(results):
    path = predictions_file(results, RADIOMICS, 4)
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    table.loc[2, "station_label"] = "yes"
    table.to_csv(path, index=False)
    refused(find_best(results), str(path), "line 4", "station_label", "'yes'")


def test_folds_are_a_list_as_in_nnunet(results):
    one = find_best(results, "-f", "0")
    assert one.returncode == 0, one.stderr
    instructions = json.loads((results / DS / "inference_instructions.json").read_text())
    nodes = dataset_nodes()
    fold0 = nodes[nodes["case"].str[-3:].astype(int) % 5 == 0]
    assert instructions["folds"] == ["0"] and instructions["cv"]["node"]["n"] == len(fold0)
    every = find_best(results, "-f", "0", "1", "2", "3", "4")
    assert every.returncode == 0, every.stderr
    instructions = json.loads((results / DS / "inference_instructions.json").read_text())
    assert instructions["folds"] == ["0", "1", "2", "3", "4"] and instructions["cv"]["node"]["n"] == len(nodes)
    chosen = instructions["chosen"][0]["model_folder"]
    scores = (good_scores(nodes, 0) if chosen == RADIOMICS else good_scores(nodes, 1))
    assert instructions["cv"]["node"]["pooled_auroc"] == pytest.approx(roc_auc_score(nodes["label"], scores))
    before = (results / DS / "inference_instructions.json").read_bytes()
    refused(find_best(results, "-f", "5"), "-f 5", "fold 5 is not a planned fold", "0..4")
    assert (results / DS / "inference_instructions.json").read_bytes() == before     # the old choice untouched


def test_accumulate_takes_a_fold_list_too(results):
    proc = run_cli("accumulate_crossval_results", "-d", "42", "-c", "2d25", "--results", results, "-f", "0", "1")
    assert proc.returncode == 0, proc.stderr
    pooled = pd.read_csv(results / DS / NETWORK / "crossval_results" / "nodes.csv", dtype={"case": str})
    assert sorted(pooled["fold"].unique()) == [0, 1] and set(pooled["case"].str[-3:].astype(int) % 5) == {0, 1}
    shutil.rmtree(results / DS / NETWORK / "fold_3")
    refused(run_cli("accumulate_crossval_results", "-d", "42", "-c", "2d25", "--results", results),
            "fold 3 has no validation/predictions.csv")


def test_a_model_with_a_fold_missing_is_named_on_the_console(results):
    nodes = dataset_nodes()
    write_model(results, "LNMTrainer__LNMPlans__3d_resenc", good_scores(nodes, 2), folds=range(4))
    proc = find_best(results)
    assert proc.returncode == 0, proc.stderr
    assert ("left out (incomplete): LNMTrainer__LNMPlans__3d_resenc (fold 4 has no validation/predictions.csv)"
            in proc.stdout)


def test_models_validated_on_different_nodes_are_refused(results):
    nodes = dataset_nodes()
    more = pd.concat([nodes, pd.DataFrame([{"case": "case_000", "node": 3, "station": "4R", "label": 0,
                                            "station_label": 0, "patient_label": 0}])], ignore_index=True)
    write_model(results, NETWORK, good_scores(more, 1), nodes=more)     # trained on another version of the data
    refused(find_best(results), "validated on different nodes", "case case_000 node 3 only in", NETWORK)
    assert no_choice(results)


def test_no_trained_model_and_max_members_zero_are_one_line(tmp_path, results):
    (tmp_path / "empty" / DS).mkdir(parents=True)
    refused(find_best(tmp_path / "empty"), "no model has all 5 folds", "no trained model folder found")
    refused(find_best(results, "--max_members", "0"), "--max_members must be at least 1")
    refused(find_best(results, "--n_bootstrap", "-5"), "--n_bootstrap must be 0")
    assert no_choice(results)


def test_a_damaged_fingerprint_in_a_model_folder_is_one_line(results):
    path = results / DS / RADIOMICS / "dataset_fingerprint.json"
    path.write_text('{"nodes": [')
    refused(find_best(results), str(path), "not valid JSON")


def test_node_labels_of_one_class_only_and_no_other_level(results):
    for model in (RADIOMICS, NETWORK):
        for k in range(5):
            path = predictions_file(results, model, k)
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
            table.assign(label="0", station="", station_label="-1", patient_label="-1").to_csv(path, index=False)
    line = refused(find_best(results), "no label level", "nothing to select by")
    assert "node: labels of one class only" in line and "station: not in the data" in line


def test_node_labels_only_with_the_size_rule(tmp_path, planned_tiny):
    """A converted dataset's validation: node labels, no stations, no station or patient labels; the size-rule
    row used to end in KeyError 'station' after the choice was written."""
    pre = planned_tiny(8, 0) / "pre"
    nodes = dataset_nodes()
    nodes = nodes[nodes["case"].str[-3:].astype(int) < 8].assign(station="", station_label=-1, patient_label=-1)
    for name, seed in ((RADIOMICS, 0), (NETWORK, 1)):
        write_model(tmp_path / "res", name, good_scores(nodes, seed), nodes=nodes.reset_index(drop=True))
    proc = run_cli("find_best_configuration", "-d", "42", "--results", tmp_path / "res", "--preprocessed", pre,
                   "--n_bootstrap", "20")
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "res" / DS / "crossval_table.md").read_text()
    assert table.splitlines()[0] == "| candidate | node AUROC | node ECE raw -> calibrated |"
    assert "size rule (short axis)" in table and table in proc.stdout
    assert "- station level: not in the data: no node has a station" in table
    assert "- patient level: not in the data: no patient is labelled 0 or 1" in table
    size = next(line for line in table.splitlines() if line.startswith("| size rule"))
    assert size.count("(n=") == 1 and "nan" not in size.lower()


# ------------------------------------------------------------------------------------------------
# lnm_evaluate
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def eval_files(tmp_path) -> Path:
    ref = pd.DataFrame({"case": ["a", "a", "b", "b", "c", "c", "d"], "node": [1, 2, 1, 2, 1, 2, 1],
                        "station": ["7", "4R", "7", "4R", "7", "4R", "7"], "label": [1, 0, 0, 0, 1, 0, 0]})
    ref.to_csv(tmp_path / "ref.csv", index=False)
    ref[["case", "node"]].assign(probability=[0.9, 0.2, 0.3, 0.1, 0.8, 0.4, 0.35]).to_csv(tmp_path / "pred.csv",
                                                                                         index=False)
    return tmp_path


def evaluate(folder: Path, *args, pred: str = "pred.csv", ref: str = "ref.csv"):
    return run_cli("evaluate", "-ref", folder / ref, "-pred", folder / pred, "-o", folder / "out",
                   "--n_bootstrap", "20", *args)


def no_report(folder: Path) -> bool:
    return not (folder / "out" / "metrics.json").exists()


def test_patient_n0_with_a_positive_node_is_refused(eval_files):
    pd.DataFrame({"case": ["a", "b", "c", "d"], "label": [0, 0, 1, 0]}).to_csv(eval_files / "patients.csv",
                                                                              index=False)
    refused(evaluate(eval_files, "--ref_patients", eval_files / "patients.csv"), str(eval_files / "patients.csv"),
            "case 'a' is labelled N0 (0) but has a node labelled 1 in ref.csv")
    assert no_report(eval_files)


def test_negative_station_with_a_positive_node_is_refused(eval_files):
    pd.DataFrame({"case": ["a", "a", "c"], "station": ["7", "4R", "7"], "label": [1, 0, 0]}).to_csv(
        eval_files / "stations.csv", index=False)
    refused(evaluate(eval_files, "--ref_stations", eval_files / "stations.csv"), str(eval_files / "stations.csv"),
            "station '7' of case 'c' is labelled 0 but has a node labelled 1")
    assert no_report(eval_files)


def test_a_node_predicted_twice_and_a_probability_out_of_range(eval_files):
    pred = pd.read_csv(eval_files / "pred.csv")
    pd.concat([pred, pred.iloc[[2]].assign(probability=0.7)]).to_csv(eval_files / "twice.csv", index=False)
    refused(evaluate(eval_files, pred="twice.csv"), str(eval_files / "twice.csv"), "duplicate", "(b, 1)")
    pred.assign(probability=[0.9, 0.2, 1.3, 0.1, 0.8, 0.4, 0.35]).to_csv(eval_files / "range.csv", index=False)
    refused(evaluate(eval_files, pred="range.csv"), str(eval_files / "range.csv"), "[0, 1]", "line 4")
    assert no_report(eval_files)


def test_empty_predictions_and_renumbered_nodes(eval_files):
    pd.DataFrame(columns=["case", "node", "probability"]).to_csv(eval_files / "empty.csv", index=False)
    refused(evaluate(eval_files, pred="empty.csv"), str(eval_files / "empty.csv"), "has no rows")
    pred = pd.read_csv(eval_files / "pred.csv")
    pred.assign(node=pred["node"] + 10).to_csv(eval_files / "renumbered.csv", index=False)
    refused(evaluate(eval_files, pred="renumbered.csv"), "7 node(s) of the reference ref.csv have no prediction",
            "case a is predicted with node ids [11, 12] but the reference lists [1, 2]")
    assert no_report(eval_files)


def test_predicted_nodes_the_reference_does_not_list_are_said(eval_files):
    pred = pd.read_csv(eval_files / "pred.csv")
    pd.concat([pred, pd.DataFrame({"case": ["b"], "node": [3], "probability": [0.99]})]).to_csv(
        eval_files / "more.csv", index=False)
    proc = evaluate(eval_files, pred="more.csv")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((eval_files / "out" / "metrics.json").read_text())
    said = "more.csv: 1 predicted node(s) of the evaluated cases are not listed in ref.csv (first: case b node 3)"
    assert any(w.startswith(said) for w in metrics["warnings"]) and f"warning: {said}" in proc.stdout
    # the extra node is in no roll-up: patient b's probability stays the max of its listed nodes (0.3)
    assert metrics["levels"]["patient"]["n"] == 4
    assert metrics["levels"]["patient"]["auroc"]["value"] == pytest.approx(roc_auc_score([1, 0, 1, 0],
                                                                                         [0.9, 0.3, 0.8, 0.35]))


def test_reference_of_one_class_is_skipped_with_its_reason(eval_files):
    pd.read_csv(eval_files / "ref.csv").assign(label=0).to_csv(eval_files / "negative.csv", index=False)
    proc = evaluate(eval_files, ref="negative.csv")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    levels = json.loads((eval_files / "out" / "metrics.json").read_text())["levels"]
    for level, n in (("node", 7), ("station", 7), ("patient", 4)):
        assert levels[level]["n"] == n and levels[level]["n_pos"] == 0 and "auroc" not in levels[level]
        assert f"{level}: skipped (needs at least one positive and one negative reference label" in proc.stdout
    table = proc.stdout.split("95% CI")[0]
    assert "nan" not in table.lower() and table.count("skipped") == 3 * 10    # every metric row says skipped


def test_unlabelled_reference_and_missing_stations(eval_files):
    pd.read_csv(eval_files / "ref.csv").drop(columns="station").assign(label="").to_csv(
        eval_files / "unlabelled.csv", index=False)
    line = refused(evaluate(eval_files, ref="unlabelled.csv"), str(eval_files / "unlabelled.csv"),
                   "nothing to evaluate")
    assert "node: no node of unlabelled.csv is labelled 0 or 1" in line
    pd.read_csv(eval_files / "ref.csv").assign(station="").to_csv(eval_files / "blank.csv", index=False)
    pd.DataFrame({"case": ["a"], "station": ["7"], "label": [1]}).to_csv(eval_files / "stations.csv", index=False)
    refused(evaluate(eval_files, "--ref_stations", eval_files / "stations.csv", ref="blank.csv"),
            str(eval_files / "blank.csv"), "no node has a station", "stations.csv")
    assert no_report(eval_files)
    # without a stations file the same reference is evaluated; the station level says it is not in the data
    proc = evaluate(eval_files, ref="blank.csv")
    assert proc.returncode == 0, proc.stderr
    assert "station: skipped (not in the data: no node of blank.csv has a station)" in proc.stdout
    assert proc.stdout.splitlines()[0].split() == ["metric", "node", "patient"]


def test_output_naming_a_file_is_refused_and_left_alone(eval_files):
    target = eval_files / "out"
    target.write_text("my notes")
    refused(evaluate(eval_files), f"-o {target}: is a file, not a folder")
    assert target.read_text() == "my notes"


@pytest.mark.slow
def test_the_same_checks_hold_through_the_console_script(eval_files):
    """The console entry as installed (a real subprocess), once: one line and exit 1."""
    import subprocess
    import sys
    pd.DataFrame({"case": ["a"], "label": [0]}).to_csv(eval_files / "patients.csv", index=False)
    proc = subprocess.run([sys.executable, "-m", "lnm_auto", "evaluate", "-ref", eval_files / "ref.csv", "-pred",
                           eval_files / "pred.csv", "-o", eval_files / "out", "--ref_patients",
                           eval_files / "patients.csv"], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "N0" in proc.stderr
    shutil.rmtree(eval_files / "out", ignore_errors=True)
