"""The ``deep_radiomics`` configuration: radiomics features + the frozen ImageNet backbone's node embeddings, fitted
by the radiomics classifier. Real datasets on disk, the real CLIs, the real pinned weights (no mocks)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lnm_auto.inference.cases import discover_cases
from lnm_auto.inference.predictor import load_and_preprocess
from lnm_auto.networks.frozen_embedding import embedding_columns, node_embeddings
from lnm_auto.plans.plans import Plans
from lnm_auto.radiomics.classifier import LEGACY_C, LOGISTIC_C_GRID, RadiomicsClassifier
from lnm_auto.radiomics.features import FEATURE_COLUMNS
from lnm_auto.training.run import setup_trainer
from lnm_auto.utils.errors import LNMError
from conftest import old_plans_identifier, run_cli, run_train_cli

DS = "Dataset042_Tiny"
MODEL = "DeepRadiomicsTrainer__LNMPlans__deep_radiomics"
OTHER_SHA256 = "0" * 64


def planned_copy(planned_tiny, target):
    """A private copy of the session's planned 8-case tiny dataset (raw/, pre/), free to write into."""
    for part in ("raw", "pre"):
        shutil.copytree(planned_tiny(8) / part, target / part)
    return target


def input_folder(root, cases, target):
    """An lnm_predict input folder holding raw training cases as they would arrive (image + node mask)."""
    target.mkdir(parents=True)
    for case in cases:
        shutil.copy(root / "raw" / DS / "imagesTr" / f"{case}_0000.nii.gz", target / f"{case}_0000.nii.gz")
        shutil.copy(root / "raw" / DS / "nodesTr" / f"{case}.nii.gz", target / f"{case}_nodes.nii.gz")
    return target




# ---- the embedding ----------------------------------------------------------------------------------------
def test_frozen_embeddings_identical_between_training_and_lnm_predict(planned_tiny, tmp_path):
    """The trainer's embedding of a case (cached crops through CropStore) equals what lnm_predict computes from the
    raw files (preprocess_images in load_and_preprocess), and is read back unchanged from the embedding cache."""
    root = planned_copy(planned_tiny, tmp_path)
    trainer = setup_trainer(42, "deep_radiomics", "0", root / "pre", tmp_path / "results", raw_root=root / "raw",
                            num_workers=0)
    computed = []
    trained = trainer.case_embeddings("case_001", computed)
    assert computed == ["case_001"] and trained.shape == (3, 640)
    assert (trainer.embedding_cache / "case_001.npz").is_file()
    again = trainer.case_embeddings("case_001", computed)             # from the cache, bit for bit
    assert computed == ["case_001"] and np.array_equal(again.to_numpy(), trained.to_numpy())

    inp = input_folder(root, ["case_001"], tmp_path / "input")
    (case,), problems = discover_cases(inp, 1)
    assert not problems
    prepared = load_and_preprocess(case, trainer.plans, tmp_path / "out", trainer.config)
    assert not prepared.error
    table = prepared.crops["radiomics_features"]
    assert list(table.columns) == list(FEATURE_COLUMNS) + embedding_columns(trainer.topology)
    assert table.index.tolist() == [1, 2, 3] == prepared.crops["node_ids"].tolist()
    predicted = table[embedding_columns(trainer.topology)].to_numpy()
    np.testing.assert_allclose(predicted, trained.loc["case_001"].to_numpy(), rtol=0, atol=1e-5)
    # real features: finite, every node its own
    assert np.isfinite(predicted).all() and predicted.std(axis=0).max() > 0.05
    assert not np.allclose(predicted[0], predicted[1])


def test_planned_cost_is_the_backbone_flops_of_one_node(planned_tiny):
    plans = Plans.load(planned_tiny(8) / "pre" / DS / "LNMPlans.json")
    config = plans.configuration("deep_radiomics")
    topology = config.network
    assert topology.radiomics == plans.configuration("radiomics").network          # one radiomics feature cache
    assert (topology.embedding_scales, topology.feature_levels, config.use_mask_channel) == (("global", "local"),
                                                                                            (-1,), False)
    crops = {f"image_{s}": np.random.default_rng(0).normal(size=(1, 1, *plans.scales[s].cache_shape))
             for s in topology.embedding_scales}
    node_embeddings(crops, topology, plans)                            # built outside the count
    with FlopCounterMode(display=False) as counter:
        out = node_embeddings(crops, topology, plans)
    assert out.shape == (1, 640) and out.dtype == np.float32
    assert config.estimated_gflops_per_sample == pytest.approx(counter.get_total_flops() / 1e9, rel=1e-9)
    assert torch.is_grad_enabled()     # no_grad stays inside the backbone's forward


# ---- plans --------------------------------------------------------------------------------------------------
def test_plans_without_deep_radiomics_load_with_their_identifier(planned_tiny, tmp_path):
    """Plans written before the configuration existed load, unchanged, with the identifier their checkpoints
    recorded; training it is one line naming what is planned."""
    root = planned_copy(planned_tiny, tmp_path)
    plans_file = root / "pre" / DS / "LNMPlans.json"
    data = json.loads(plans_file.read_text())
    del data["configurations"]["deep_radiomics"]
    plans_file.write_text(json.dumps(data))
    old = Plans.load(plans_file)
    assert "deep_radiomics" not in old.configurations and old.to_dict() == data
    assert old.identifier() == old_plans_identifier(data)
    proc = run_train_cli("42", "deep_radiomics", "0", preprocessed=root / "pre", results=tmp_path / "results")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "configuration 'deep_radiomics' is not in the plans LNMPlans" in proc.stderr
    assert "planned: 2d25, 3d_resenc, radiomics, wega" in proc.stderr


def test_hand_edited_deep_radiomics_plan_is_refused_field_by_field(planned_tiny, tmp_path):
    root = planned_copy(planned_tiny, tmp_path)
    plans_file = root / "pre" / DS / "LNMPlans.json"
    data = json.loads(plans_file.read_text())
    network = data["configurations"]["deep_radiomics"]["network"]
    network.update(embedding_scales=["global", "zoom"], feature_levels=[-1, -1], image_window=[2.0, -2.0],
                   weights_id="dinov2")
    plans_file.write_text(json.dumps(data))
    with pytest.raises(LNMError) as error:
        Plans.load(plans_file)
    lines = str(error.value).splitlines()
    assert all(line.startswith(str(plans_file)) for line in lines)
    assert "configurations.deep_radiomics.network.weights_id = 'dinov2': must be one of efficientnet_lite0.imagenet" \
           in lines[0]
    network["weights_id"] = "efficientnet_lite0.imagenet"
    plans_file.write_text(json.dumps(data))
    with pytest.raises(LNMError) as error:
        Plans.load(plans_file)
    text = str(error.value)
    assert "network.image_window = [2, -2]: low must be below high" in text
    assert "network.embedding_scales: scale 'zoom' is not among the plans' scales" in text
    assert "network.feature_levels = [-1, -1]: must name at least one, each once" in text


def test_weights_refused_when_the_plans_sha256_differs(planned_tiny, tmp_path):
    root = planned_copy(planned_tiny, tmp_path)
    plans_file = root / "pre" / DS / "LNMPlans.json"
    data = json.loads(plans_file.read_text())
    data["configurations"]["deep_radiomics"]["network"]["weights_sha256"] = OTHER_SHA256
    plans_file.write_text(json.dumps(data))
    proc = run_train_cli("42", "deep_radiomics", "0", "--raw", root / "raw", preprocessed=root / "pre",
                         results=tmp_path / "results")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "efficientnet-lite0-57934424.pth: SHA-256 5793442" in line and f"not the {OTHER_SHA256}" in line
    assert "weights_sha256" in line
    assert not (root / "pre" / DS / "LNMPlans_deep_radiomics").exists()       # refused before any embedding


def test_only_its_own_trainer_fits_it(planned_tiny, tmp_path):
    from lnm_auto.training.run import check_fits_processes, recommended_scheme
    pre = planned_tiny(8) / "pre"           # shared, read-only: only the plans are read
    with pytest.raises(LNMError, match="-tr LNMTrainerPGLS cannot train the configuration 'deep_radiomics': "
                                       "deep_radiomics is fitted by DeepRadiomicsTrainer"):
        setup_trainer(42, "deep_radiomics", "0", pre, tmp_path, "LNMTrainerPGLS")
    with pytest.raises(LNMError, match="radiomics is fitted by RadiomicsTrainer$"):
        setup_trainer(42, "radiomics", "0", pre, tmp_path, "DeepRadiomicsTrainer")
    with pytest.raises(LNMError, match="DeepRadiomicsTrainer only fits the deep_radiomics configuration"):
        setup_trainer(42, "2d25", "0", pre, tmp_path, "DeepRadiomicsTrainer")
    assert not (tmp_path / DS).exists()
    plans = Plans.load(pre / DS / "LNMPlans.json")
    assert recommended_scheme(plans, "deep_radiomics") == ["DeepRadiomicsTrainer"]
    with pytest.raises(LNMError, match="the deep_radiomics configuration is fitted in one step by one process"):
        check_fits_processes(plans.configuration("deep_radiomics"), 2)


# ---- the classifier's penalty grid ---------------------------------------------------------------------------
def test_inner_cv_chooses_the_logistic_penalty_and_old_models_still_load(tmp_path):
    rng = np.random.default_rng(3)
    n = 80
    groups = np.repeat(np.arange(20), 4)
    labels = (np.arange(n) % 2).astype(int)
    features = pd.DataFrame(rng.normal(size=(n, 30)), columns=[f"f{i}" for i in range(30)])
    for i in range(8):                                                   # an additive signal spread over 8 of 30
        features[f"f{i}"] += 0.7 * labels
    model = RadiomicsClassifier(seed=7).fit(features, labels, groups)
    grid = model.params["inner_cv"]["grid"]
    assert [(g["model"], g["C"]) for g in grid] == [("logistic_regression", c) for c in LOGISTIC_C_GRID] + [
        ("gradient_boosting", None)]
    best = max(g["auroc"] for g in grid)
    assert model.chosen_model == "logistic_regression"
    # the best inner-CV AUROC wins; ties go to the strongest penalty, listed first
    assert model.logistic_c == min(g["C"] for g in grid if g["C"] is not None and g["auroc"] == best)
    assert model.inner_cv_auroc["logistic_regression"] == best
    assert model._sklearn_pipeline.named_steps["model"].C == model.logistic_c
    np.testing.assert_allclose(model.predict_proba(features),
                               model._sklearn_pipeline.predict_proba(features.to_numpy())[:, 1], rtol=1e-10)
    model.save(tmp_path / "new.json")
    # a model saved before the grid existed: no C (it was 0.1), no grid; it loads and predicts the same
    old = json.loads((tmp_path / "new.json").read_text())
    del old["logistic_regression"]["C"], old["inner_cv"]["grid"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = RadiomicsClassifier.load(tmp_path / "old.json")
    assert loaded.logistic_c == LEGACY_C and loaded.chosen == "logistic_regression (C=0.1)"
    np.testing.assert_array_equal(loaded.predict_proba(features), model.predict_proba(features))
    old["logistic_regression"]["C"] = -1.0
    (tmp_path / "bad.json").write_text(json.dumps(old))
    with pytest.raises(LNMError, match=r"bad.json: not a valid radiomics model: logistic_regression's C must be a "
                                       "positive number"):
        RadiomicsClassifier.load(tmp_path / "bad.json")


# ---- a fold through the CLIs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Fold 0 of deep_radiomics trained with lnm_train on a private copy of the planned tiny dataset."""
    from conftest import write_tiny_dataset
    from lnm_auto.planning.plan_and_preprocess import plan_and_preprocess
    root = tmp_path_factory.mktemp("deep_radiomics")
    write_tiny_dataset(root / "raw", n_cases=8)
    plan_and_preprocess(42, root / "raw", root / "pre", planner="LNMPlannerCPU", progress=False)
    proc = run_train_cli("42", "deep_radiomics", "0", "--raw", root / "raw", preprocessed=root / "pre",
                         results=root / "results")
    assert proc.returncode == 0, proc.stderr
    return root, proc


@pytest.mark.slow
def test_a_fold_trains_and_predicts_through_the_clis(trained, tmp_path):
    root, proc = trained
    model = root / "results" / DS / MODEL
    fold = model / "fold_0"
    assert "DeepRadiomicsTrainer" in proc.stdout and "727 features" in proc.stdout
    # the classifier: JSON holding the radiomics and the embedding columns; no pickle anywhere in the model
    params = json.loads((fold / "radiomics_model.json").read_text())
    deep = [c for c in params["feature_columns"] if c.startswith("deep_")]
    assert params["feature_columns"][:87] == list(FEATURE_COLUMNS) and len(deep) == 640
    assert deep[0] == "deep_global_000" and deep[-1] == "deep_local_319"
    assert not [p for p in model.rglob("*") if p.suffix in (".pkl", ".pickle", ".pth", ".joblib", ".npy")]
    for p in model.rglob("*.json"):
        json.loads(p.read_text())
    # the embeddings are cached per case and reused by the next fold
    cache = root / "pre" / DS / "LNMPlans_deep_radiomics"
    splits = json.loads((root / "pre" / DS / "splits_final.json").read_text())
    assert {p.stem for p in cache.glob("*.npz")} == set(splits[0]["train"]) | set(splits[0]["val"])
    stamps = {p: p.stat().st_mtime_ns for p in cache.glob("*.npz")}
    again = run_train_cli("42", "deep_radiomics", "1", "--raw", root / "raw", preprocessed=root / "pre",
                          results=tmp_path / "results")
    assert again.returncode == 0, again.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and "0 case(s) computed" in again.stdout

    # lnm_predict on fold 0's validation cases gives the probabilities its validation wrote
    val = splits[0]["val"]
    inp = input_folder(root, val, tmp_path / "input")
    env = {"LNM_results": root / "results"}
    out = run_cli("predict", "-i", inp, "-o", tmp_path / "out", "-d", "42", "-c", "deep_radiomics", "-tr",
                  "DeepRadiomicsTrainer", "-f", "0", "--quiet", env=env)
    assert out.returncode == 0, out.stderr
    nodes = pd.read_csv(tmp_path / "out" / "nodes.csv", dtype={"case": str})
    validation = pd.read_csv(fold / "validation" / "predictions.csv", dtype={"case": str})
    assert len(nodes) == len(validation) == 6 and ((nodes.probability > 0) & (nodes.probability < 1)).all()
    merged = nodes.merge(validation, on=["case", "node"], suffixes=("", "_validation"))
    assert len(merged) == 6
    np.testing.assert_allclose(merged.probability, merged.probability_validation, rtol=1e-12, atol=0)

    # lnm_export_model packs it; the zip predicts the same
    export = run_cli("export_model", "-d", "42", "-c", "deep_radiomics", "-tr", "DeepRadiomicsTrainer", "-o",
                     tmp_path / "model.zip", env=env)
    assert export.returncode == 0, export.stderr
    zipped = run_cli("predict", "-i", inp, "-o", tmp_path / "z", "-m", tmp_path / "model.zip", "-f", "0", "--quiet",
                     env={"LNM_results": None})
    assert zipped.returncode == 0, zipped.stderr
    np.testing.assert_array_equal(pd.read_csv(tmp_path / "z" / "nodes.csv").probability, nodes.probability)


@pytest.mark.slow
def test_lnm_predict_refuses_other_weights_before_writing(trained, tmp_path):
    root, _ = trained
    model = shutil.copytree(root / "results" / DS / MODEL, tmp_path / "results" / DS / MODEL)
    data = json.loads((model / "plans.json").read_text())
    data["configurations"]["deep_radiomics"]["network"]["weights_sha256"] = OTHER_SHA256
    (model / "plans.json").write_text(json.dumps(data))
    inp = input_folder(root, ["case_003"], tmp_path / "input")
    proc = run_cli("predict", "-i", inp, "-o", tmp_path / "out", "-m", model, "-f", "0", "--quiet")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"is not the {OTHER_SHA256} the deep_radiomics plan records (weights_sha256)" in proc.stderr
    assert not (tmp_path / "out").exists()
