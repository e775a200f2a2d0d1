"""The radiomics configuration through the same trainer interface, folds and outputs as the networks; the
label-aware scheme; the validation predictions that model selection pools."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from lnm_auto.planning.plan_and_preprocess import plan_and_preprocess
from lnm_auto.radiomics.classifier import RadiomicsClassifier
from lnm_auto.training.run import recommended_scheme, run_training, setup_trainer
from lnm_auto.utils.errors import LNMError
from conftest import write_tiny_dataset


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("radiomics")
    write_tiny_dataset(root / "raw", n_cases=10)
    plan_and_preprocess(42, root / "raw", root / "pre", planner="LNMPlannerCPU", progress=False)
    return root


@pytest.mark.slow
def test_radiomics_fold_writes_the_standard_outputs(prepared, tmp_path):
    tr = setup_trainer(42, "radiomics", "0", prepared / "pre", tmp_path, raw_root=prepared / "raw", num_workers=0)
    assert type(tr).__name__ == "RadiomicsTrainer"
    run_training(tr)
    fold = tmp_path / "Dataset042_Tiny" / "RadiomicsTrainer__LNMPlans__radiomics" / "fold_0"
    model = RadiomicsClassifier.load(fold / "radiomics_model.json")          # JSON, no pickle
    nodes = pd.read_csv(fold / "validation" / "nodes.csv", dtype={"case": str})
    predictions = pd.read_csv(fold / "validation" / "predictions.csv", dtype={"case": str})
    assert set(nodes.case) == set(tr.val_cases) and set(predictions.case) == set(tr.val_cases)
    metrics = json.loads((fold / "validation" / "metrics.json").read_text())
    assert metrics["levels"]["node"]["auroc"]["value"] == pytest.approx(roc_auc_score(nodes.label, nodes.probability))
    assert model.chosen_model in ("logistic_regression", "gradient_boosting")
    # features are cached per case in the preprocessed folder and reused
    cache = prepared / "pre" / "Dataset042_Tiny" / "LNMPlans_radiomics"
    assert len(list(cache.glob("*.csv"))) == 10
    stamps = {p: p.stat().st_mtime_ns for p in cache.glob("*.csv")}
    again = setup_trainer(42, "radiomics", "1", prepared / "pre", tmp_path, raw_root=prepared / "raw", num_workers=0)
    run_training(again)
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*.csv")} == stamps


def test_trainers_and_configurations_that_do_not_fit_are_one_line(planned_tiny, tmp_path):
    pre = planned_tiny(8) / "pre"           # shared, read-only: only the plans are read
    with pytest.raises(LNMError, match="radiomics is fitted by RadiomicsTrainer"):
        setup_trainer(42, "radiomics", "0", pre, tmp_path, "LNMTrainerPGLS")
    with pytest.raises(LNMError, match="RadiomicsTrainer only fits the radiomics configuration"):
        setup_trainer(42, "3d_resenc", "0", pre, tmp_path, "RadiomicsTrainer")


def test_recommended_scheme_comes_from_the_plans(planned_tiny):
    from lnm_auto.plans.plans import Plans
    plans = Plans.load(planned_tiny(8) / "pre" / "Dataset042_Tiny" / "LNMPlans.json")
    assert recommended_scheme(plans, "radiomics") == ["RadiomicsTrainer"]
    assert recommended_scheme(plans, "2d25") == plans.recommended_trainers
    assert plans.notes["learning_scheme"]


@pytest.mark.slow
def test_radiomics_learns_from_station_labels_when_node_labels_hold_one_class(tmp_path):
    root = write_tiny_dataset(tmp_path / "raw", n_cases=10)
    nodes = pd.read_csv(root / "nodes.csv", dtype=str, keep_default_na=False)
    nodes.loc[nodes["label"] == "1", "label"] = ""                   # only benign node labels remain
    nodes.to_csv(root / "nodes.csv", index=False)
    plan_and_preprocess(42, tmp_path / "raw", tmp_path / "pre", planner="LNMPlannerCPU", progress=False)
    tr = setup_trainer(42, "radiomics", "0", tmp_path / "pre", tmp_path / "res", raw_root=tmp_path / "raw",
                       num_workers=0)
    records = tr.training_records()
    assert set(records["label"]) == {0, 1} and (records["label"] == records["station_label"]).all()
    run_training(tr)
    log = next(tr.output_folder.glob("training_log_*.txt")).read_text()
    assert "learns from station labels" in log
