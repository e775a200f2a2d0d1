"""Model selection on hand-made out-of-fold predictions: known winner, ensembles averaged, incomplete models out."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from lnm_auto.evaluation.crossval import accumulate_crossval_results, find_best_configuration, level_units
from lnm_auto.utils.errors import LNMError

N_CASES, NODES_PER_CASE = 30, 4


def truth(seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(N_CASES):
        case_positive = c % 3 == 0
        for k in range(1, NODES_PER_CASE + 1):
            label = int(case_positive and k == 1)
            rows.append({"case": f"c{c:02d}", "node": k, "station": "7" if k <= 2 else "4R", "label": label,
                         "station_label": int(case_positive and k <= 2), "patient_label": int(case_positive),
                         "noise": rng.normal()})
    return pd.DataFrame(rows)


def write_model(results, name, probabilities, folds=range(5), nodes=None):
    nodes = truth() if nodes is None else nodes
    for k in folds:
        val = nodes[nodes["case"].str[1:].astype(int) % 5 == k]
        out = results / name / f"fold_{k}" / "validation"
        out.mkdir(parents=True, exist_ok=True)
        val.drop(columns="noise").assign(probability=probabilities[val.index]).to_csv(out / "predictions.csv",
                                                                                          index=False)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def within_fold(y, p, folds) -> float:
    """Per-fold AUROC (scikit-learn) averaged with weights by labelled pairs: the score the choice uses."""
    y, p, folds = np.asarray(y), np.asarray(p), np.asarray(folds)
    pairs = {k: y[folds == k].sum() * (1 - y[folds == k]).sum() for k in np.unique(folds)}
    return sum(roc_auc_score(y[folds == k], p[folds == k]) * w for k, w in pairs.items() if w) / sum(pairs.values())


def fold_of(cases) -> np.ndarray:
    return np.asarray([int(c[1:]) % 5 for c in cases])


@pytest.fixture
def results(tmp_path):
    t = truth()
    good = sigmoid(2.5 * t["label"] + 0.8 * t["noise"])
    weak = sigmoid(0.8 * t["label"] + 1.0 * np.random.default_rng(1).normal(size=len(t)))
    write_model(tmp_path, "LNMTrainer__LNMPlans__2d25", good.to_numpy())
    write_model(tmp_path, "RadiomicsTrainer__LNMPlans__radiomics", weak.to_numpy())
    write_model(tmp_path, "LNMTrainer__LNMPlans__3d_resenc", good.to_numpy(), folds=range(4))   # fold 4 missing
    return tmp_path, t, good.to_numpy(), weak.to_numpy()


def test_known_winner_and_incomplete_models_excluded(results):
    root, t, good, weak = results
    out = find_best_configuration(root, n_bootstrap=50)
    assert out["chosen"] == ("LNMTrainer__LNMPlans__2d25",)
    instructions = json.loads((root / "inference_instructions.json").read_text())
    assert [m["configuration"] for m in instructions["chosen"]] == ["2d25"]
    assert instructions["incomplete_models"] == ["LNMTrainer__LNMPlans__3d_resenc"]
    labelled = t["label"] >= 0
    assert instructions["cv"]["node"]["pooled_auroc"] == pytest.approx(roc_auc_score(t.label[labelled],
                                                                                     good[labelled]))
    assert instructions["cv"]["node"]["auroc"] == pytest.approx(within_fold(t.label, good, fold_of(t.case)))
    lo, hi = instructions["cv"]["node"]["ci95"]
    assert lo <= instructions["cv"]["node"]["auroc"] <= hi
    assert (root / "crossval_table.md").read_text().count("|") > 10 and (root / "crossval_table.png").is_file()


def test_ensemble_is_the_mean_of_its_members(results):
    root, t, good, weak = results
    out = find_best_configuration(root, n_bootstrap=0)
    row = next(r for r in out["rows"] if len(r["members"]) == 2)
    mean = (good + weak) / 2
    assert row["node"]["pooled_auroc"] == pytest.approx(roc_auc_score(t["label"], mean))
    assert row["node"]["auroc"] == pytest.approx(within_fold(t["label"], mean, fold_of(t["case"])))
    # patient level: max over each patient's nodes of the mean probability
    patient = pd.DataFrame({"case": t["case"], "p": mean, "y": t["patient_label"]}).groupby("case").agg(
        p=("p", "max"), y=("y", "first"))
    assert row["patient"]["pooled_auroc"] == pytest.approx(roc_auc_score(patient.y, patient.p))
    assert row["patient"]["auroc"] == pytest.approx(within_fold(patient.y, patient.p, fold_of(patient.index)))


def test_tie_goes_to_the_simpler_candidate(tmp_path):
    t = truth()
    same = sigmoid(2.0 * t["label"] + t["noise"]).to_numpy()
    write_model(tmp_path, "LNMTrainer__LNMPlans__2d25", same)
    write_model(tmp_path, "RadiomicsTrainer__LNMPlans__radiomics", same)
    assert find_best_configuration(tmp_path, n_bootstrap=0)["chosen"] == ("RadiomicsTrainer__LNMPlans__radiomics",)


def test_nothing_complete_is_one_line(tmp_path):
    write_model(tmp_path, "LNMTrainer__LNMPlans__2d25", np.full(len(truth()), 0.5), folds=range(3))
    with pytest.raises(LNMError, match="no model has all 5 folds"):
        find_best_configuration(tmp_path)


def test_pooled_predictions_cover_every_case_once(results):
    root, t, *_ = results
    pooled = accumulate_crossval_results(root / "LNMTrainer__LNMPlans__2d25", 5)
    assert len(pooled) == len(t) and not pooled.duplicated(["case", "node"]).any()
    assert (root / "LNMTrainer__LNMPlans__2d25" / "crossval_results" / "nodes.csv").is_file()
    stations = level_units(pooled, "station")
    assert len(stations) == N_CASES * 2 and set(stations["label"]) == {0, 1}
