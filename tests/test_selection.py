"""Choosing by cross-validation: the within-fold AUROC, the one-SE rule, Platt calibration."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from lnm_auto.evaluation.calibration import apply_calibration, cross_fitted, fit_platt
from lnm_auto.evaluation.metrics import expected_calibration_error
from lnm_auto.evaluation.selection import FoldScore, one_standard_error_choice, within_fold_auroc


def _folds_with_offsets(seed: int = 0, n_folds: int = 5, per_fold: int = 40):
    """Units of five folds; fold k's positives are rarer the larger k, so fold offsets that grow with k
    anti-correlate with the labels when pooled."""
    rng = np.random.default_rng(seed)
    y, folds, patients = [], [], []
    for k in range(n_folds):
        prevalence = 0.6 - 0.1 * k
        yk = (rng.random(per_fold) < prevalence).astype(int)
        yk[:2] = (0, 1)
        y.append(yk)
        folds.append(np.full(per_fold, k))
        patients.append([f"f{k}_p{i // 4}" for i in range(per_fold)])
    return np.concatenate(y), np.concatenate(folds), np.concatenate(patients), rng


def test_within_fold_auroc_is_the_pair_weighted_mean_of_fold_aurocs():
    y, folds, patients, rng = _folds_with_offsets()
    p = rng.random(y.size) * 0.5 + 0.3 * y
    s = within_fold_auroc(y, p, folds, patients, n_bootstrap=200)
    pairs = [(y[folds == k].sum() * (1 - y[folds == k]).sum()) for k in range(5)]
    expected = sum(roc_auc_score(y[folds == k], p[folds == k]) * w for k, w in zip(range(5), pairs)) / sum(pairs)
    assert s.auroc == pytest.approx(expected, abs=1e-12)
    assert s.n_pairs == sum(pairs) and s.n == y.size and s.n_positive == y.sum()
    assert 0 < s.se < 0.1 and s.ci95[0] < s.auroc < s.ci95[1]


def test_a_fold_offset_cannot_change_the_score_but_changes_the_pooled_auroc():
    y, folds, patients, rng = _folds_with_offsets(seed=1)
    ranking = rng.random(y.size) * 0.5 + 0.35 * y       # a good ranker inside every fold
    offset = ranking * 0.2 + 0.15 * folds               # ... whose fold k is shifted by 0.15 k
    a = within_fold_auroc(y, ranking * 0.2, folds, patients, n_bootstrap=0)
    b = within_fold_auroc(y, offset, folds, patients, n_bootstrap=0)
    assert a.auroc == pytest.approx(b.auroc, abs=1e-12)
    assert roc_auc_score(y, offset) < a.auroc - 0.15    # pooling measures the folds, not the ranking


def test_pooling_misranks_two_candidates_where_the_within_fold_score_does_not():
    """Candidate 'ranker' ranks every fold well but each fold model is calibrated differently;
    'steady' ranks worse and is calibrated alike. Pooled AUROC prefers 'steady' (wrong); the within-fold
    score prefers 'ranker', and so does a fresh, fully labelled test set scored by one model."""
    y, folds, patients, rng = _folds_with_offsets(seed=2)
    ranker = 0.3 * (rng.random(y.size) * 0.4 + 0.45 * y) + 0.14 * folds
    steady = rng.random(y.size) * 0.8 + 0.25 * y
    pooled = {"ranker": roc_auc_score(y, ranker), "steady": roc_auc_score(y, steady)}
    assert pooled["steady"] > pooled["ranker"]
    scores = {name: within_fold_auroc(y, p, folds, patients, n_bootstrap=300)
              for name, p in (("ranker", ranker), ("steady", steady))}
    assert scores["ranker"].auroc > scores["steady"].auroc + 0.1
    chosen, why = one_standard_error_choice(scores, simplicity=lambda c: (0 if c == "steady" else 1, c))
    assert chosen == "ranker" and why["best"] == "ranker"


def test_folds_with_one_class_add_no_pairs():
    y = np.array([1, 1, 0, 0, 1, 1, 1])
    p = np.array([0.9, 0.8, 0.1, 0.2, 0.1, 0.2, 0.3])
    folds = np.array([0, 0, 0, 0, 1, 1, 1])            # fold 1: positives only
    s = within_fold_auroc(y, p, folds, [f"p{i}" for i in range(7)], n_bootstrap=0)
    assert s.auroc == 1.0 and s.n_pairs == 4


def test_no_fold_with_both_classes_gives_nan():
    s = within_fold_auroc([1, 0], [0.7, 0.2], [0, 1], ["a", "b"], n_bootstrap=50)
    assert math.isnan(s.auroc) and s.n_pairs == 0


def test_size_rule_is_chosen_when_nothing_beats_it_by_more_than_one_se():
    rank = {"size rule": (0, ""), "radiomics": (1, "radiomics"), "2d25": (3, "2d25")}.get
    scores = {"size rule": FoldScore(0.78, 0.04, (0.7, 0.86), 100, 30, 900),
              "radiomics": FoldScore(0.81, 0.04, (0.73, 0.89), 100, 30, 900),
              "2d25": FoldScore(0.80, 0.05, (0.7, 0.9), 100, 30, 900)}
    chosen, why = one_standard_error_choice(scores, rank)
    assert chosen == "size rule" and why["best"] == "radiomics"
    assert why["difference_se"]["size rule"] == pytest.approx(0.04)      # no replicates: the best's own SE
    assert why["tied"] == ["size rule", "radiomics", "2d25"]


def test_one_se_rule_keeps_the_best_when_it_wins_clearly_and_picks_the_simplest_inside_the_band():
    rank = {"size rule": (0,), "radiomics": (1,), "2d25": (3,), "ens": (5,)}.get
    scores = {"size rule": FoldScore(0.70, 0.03, (0.64, 0.76), 100, 30, 900),
              "radiomics": FoldScore(0.84, 0.02, (0.8, 0.88), 100, 30, 900),
              "2d25": FoldScore(0.87, 0.02, (0.83, 0.91), 100, 30, 900),
              "ens": FoldScore(0.88, 0.02, (0.84, 0.92), 100, 30, 900)}
    chosen, why = one_standard_error_choice(scores, rank)
    assert chosen == "2d25" and why["best"] == "ens"          # 0.87 >= 0.88 - 0.02 > 0.84
    scores["ens"] = FoldScore(0.95, 0.02, (0.91, 0.99), 100, 30, 900)
    assert one_standard_error_choice(scores, rank)[0] == "ens"
    scores["2d25"] = FoldScore(float("nan"), float("nan"), (float("nan"),) * 2, 0, 0, 0)
    assert one_standard_error_choice(scores, rank)[0] == "ens"


def test_the_band_is_the_paired_se_of_the_difference_not_the_best_ones_own():
    """Two candidates ranking the same units, one a little better on every resample: each has a wide SE of its
    own, but their difference is steady, so the better one is not 'within noise' of the simpler one."""
    y, folds, patients, rng = _folds_with_offsets(seed=4, per_fold=30)
    base = rng.random(y.size) * 0.8 + 0.25 * y
    better = base + 0.06 * y * (rng.random(y.size) < 0.5)       # lifts some positives: a small, consistent gain
    simple = within_fold_auroc(y, base, folds, patients, n_bootstrap=400)
    model = within_fold_auroc(y, better, folds, patients, n_bootstrap=400)
    gain = model.auroc - simple.auroc
    assert 0 < gain < simple.se                                   # inside the classic band of the best's own SE
    chosen, why = one_standard_error_choice({"size rule": simple, "model": model},
                                            simplicity=lambda c: (0,) if c == "size rule" else (1,))
    assert why["difference_se"]["size rule"] < gain < model.se    # ... but outside the paired band
    assert chosen == "model"


def _prior_shifted(seed: int = 0, n: int = 2000, prevalence: float = 0.3):
    """Labels at 30 % prevalence; scores of a model that saw 50 % (the oversampled batch): the true
    posterior's logit shifted by log(0.5/0.5) - log(0.3/0.7)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    x = rng.normal(1.2 * y, 1.0)                        # one feature, class-conditional normals
    true_logit = 1.2 * x - 0.72 + math.log(prevalence / (1 - prevalence))
    shift = -math.log(prevalence / (1 - prevalence))
    return y, 1 / (1 + np.exp(-(true_logit + shift))), shift


def test_platt_undoes_a_known_prior_shift():
    y, shifted, shift = _prior_shifted()
    assert shifted.mean() > y.mean() + 0.12                 # uncalibrated: far above the prevalence
    cal = fit_platt(y, shifted)
    assert cal["method"] == "platt"
    assert cal["a"] == pytest.approx(1.0, abs=0.12) and cal["b"] == pytest.approx(-shift, abs=0.15)
    fixed = apply_calibration(cal, shifted)
    assert abs(fixed.mean() - y.mean()) < 0.01
    assert expected_calibration_error(y, fixed) < 0.03 < expected_calibration_error(y, shifted) - 0.1
    assert roc_auc_score(y, fixed) == pytest.approx(roc_auc_score(y, shifted), abs=1e-12)   # monotone


def test_cross_fitted_calibration_uses_other_folds_only():
    y, shifted, _ = _prior_shifted(seed=3, n=1000)
    folds = np.arange(y.size) % 5
    crossed = cross_fitted(y, shifted, folds)
    own = apply_calibration(fit_platt(y[folds != 0], shifted[folds != 0], folds[folds != 0]), shifted[folds == 0])
    np.testing.assert_allclose(crossed[folds == 0], own)
    assert expected_calibration_error(y, crossed) < 0.05


def test_platt_slope_is_fitted_within_folds_so_fold_offsets_cannot_flatten_it():
    """Five fold models that each rank well but are offset against each other: pooled, a higher score does not
    mean metastatic (the pooled slope is negative); within folds it does. The map keeps the slope positive."""
    rng = np.random.default_rng(4)
    folds = np.repeat(np.arange(5), 40)
    y = np.tile(np.r_[np.ones(10, int), np.zeros(30, int)], 5)
    offsets = np.array([2.5, 1.0, -0.5, -2.0, -3.5])[folds]
    prevalence_by_fold = np.array([0.1, 0.2, 0.25, 0.35, 0.5])   # offsets anti-correlated with prevalence
    y = (rng.random(200) < prevalence_by_fold[folds]).astype(int)
    scores = 1 / (1 + np.exp(-(offsets + 1.5 * y + rng.normal(0, 0.6, 200))))
    pooled = fit_platt(y, scores)
    within = fit_platt(y, scores, folds)
    assert pooled["a"] < 0.1 < 0.5 < within["a"]                    # pooled: flattened; within folds: the signal
    calibrated = apply_calibration(within, scores)
    assert roc_auc_score(y, calibrated) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    assert abs(calibrated.mean() - y.mean()) < 0.01                # b: the prevalence, with the slope fixed


def test_platt_without_signal_keeps_the_ranking():
    """Scores that rank backwards get the smallest slope, never zero: probabilities near the prevalence, still
    in their order (a flat map would tie every node and turn any AUROC into 0.5)."""
    rng = np.random.default_rng(5)
    y = (rng.random(300) < 0.3).astype(int)
    scores = 1 / (1 + np.exp(-(-1.0 * y + rng.normal(0, 1, 300))))
    cal = fit_platt(y, scores, np.arange(300) % 5)
    assert cal["a"] == pytest.approx(0.01)
    calibrated = apply_calibration(cal, scores)
    assert len(np.unique(calibrated)) == len(np.unique(scores))
    assert roc_auc_score(y, calibrated) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    assert abs(calibrated.mean() - y.mean()) < 0.01


def test_too_few_labelled_units_give_the_identity_map():
    cal = fit_platt([1, 1, 0, 0, 0, 0], [0.9, 0.8, 0.3, 0.2, 0.1, 0.4])
    assert cal["method"] == "identity"
    np.testing.assert_array_equal(apply_calibration(cal, [0.2, 0.7]), [0.2, 0.7])


# ------------------------------------------------------------------------------------------------
# the choice, end to end: lnm_find_best_configuration -> lnm_predict -d
# ------------------------------------------------------------------------------------------------
def _model_folder(results, planned, name: str, scores_of) -> None:
    """A cross-validated model folder as lnm_train leaves it (real plans, dataset.json and fingerprint of the
    planned tiny dataset), whose out-of-fold probabilities are ``scores_of(nodes)``."""
    import json
    import shutil

    import pandas as pd
    pre = planned / "pre" / "Dataset042_Tiny"
    folder = results / "Dataset042_Tiny" / name
    folder.mkdir(parents=True)
    shutil.copy(pre / "LNMPlans.json", folder / "plans.json")
    shutil.copy(pre / "dataset.json", folder / "dataset.json")
    shutil.copy(pre / "dataset_fingerprint.json", folder / "dataset_fingerprint.json")
    nodes = pd.read_csv(pre / "LNMPlans_crops" / "nodes_index.csv", dtype={"case": str, "station": str},
                        keep_default_na=False)
    splits = json.loads((pre / "splits_final.json").read_text())
    for k, split in enumerate(splits):
        val = nodes[nodes["case"].isin(split["val"])]
        out = folder / f"fold_{k}" / "validation"
        out.mkdir(parents=True)
        val[["case", "node", "station", "label", "station_label", "patient_label"]].assign(
            probability=scores_of(val)).to_csv(out / "predictions.csv", index=False)


@pytest.mark.slow
def test_size_rule_chosen_is_what_lnm_predict_uses_with_its_calibration(tmp_path, planned_tiny):
    """Models that rank worse than the short axis: the size rule is chosen, and lnm_predict -d scores every node by
    its short axis (measured as the crop caches measured it), through the choice's calibration map."""
    import json

    import pandas as pd

    from conftest import run_cli
    from lnm_auto.evaluation.crossval import size_rule_table
    from lnm_auto.evaluation.size_rule import size_rule_score
    planned = planned_tiny(8, 0)
    rng = np.random.default_rng(0)
    for name in ("RadiomicsTrainer__LNMPlans__radiomics", "LNMTrainer__LNMPlans__2d25"):
        _model_folder(tmp_path / "res", planned, name, lambda v: np.clip(rng.random(len(v)), 0.01, 0.99))
    locations = ["--results", tmp_path / "res", "--preprocessed", planned / "pre"]
    found = run_cli("find_best_configuration", "-d", "42", "--n_bootstrap", "50", *locations)
    assert found.returncode == 0, found.stderr
    instructions = json.loads((tmp_path / "res" / "Dataset042_Tiny" / "inference_instructions.json").read_text())
    assert instructions["size_rule"] is True and instructions["chosen"] == []
    assert "size rule (short axis)" in found.stdout and "no model beats it" in found.stdout
    calibration = instructions["calibration"]
    assert calibration["method"] in ("platt", "identity")

    images = planned / "raw" / "Dataset042_Tiny" / "imagesTr"
    out = tmp_path / "preds"
    predicted = run_cli("predict", "-i", images, "-o", out, "-d", "42", "-npp", "0", "--quiet", *locations[:2])
    assert predicted.returncode == 0, predicted.stderr
    assert "the size rule (short axis)" in predicted.stdout
    nodes = pd.read_csv(out / "nodes.csv", dtype={"case": str})
    cached = size_rule_table(planned / "pre" / "Dataset042_Tiny" / "LNMPlans_crops")
    both = nodes.merge(cached, on=["case", "node"], suffixes=("", "_cache"))
    assert len(both) == len(nodes) == len(cached)
    np.testing.assert_allclose(both["short_axis_mm"], both["short_axis_mm_cache"], atol=1e-3)
    raw = np.asarray([size_rule_score(s) for s in nodes["short_axis_mm"]])
    expected = apply_calibration(calibration, raw)
    np.testing.assert_allclose(nodes["probability"], expected, atol=1e-9)
    if calibration["method"] == "platt":
        np.testing.assert_allclose(nodes["probability_uncalibrated"], raw, atol=1e-9)


@pytest.mark.parametrize("bad", [[1, 2], {"method": "isotonic"}, {"method": "platt", "a": "x", "b": 0},
                                 {"method": "platt", "a": float("nan"), "b": 0}, {"method": "platt", "a": -1, "b": 0},
                                 {"method": "platt", "a": 1, "b": 1e400}])
def test_a_damaged_calibration_map_is_one_line_naming_its_file(bad):
    from lnm_auto.evaluation.calibration import checked_calibration
    from lnm_auto.utils.errors import LNMError
    with pytest.raises(LNMError, match="calibration.json"):
        checked_calibration(bad, "model/crossval_results/calibration.json")
    assert checked_calibration({"method": "platt", "a": 0.8, "b": -0.4}, "x")["a"] == 0.8


def test_a_models_map_is_not_applied_to_fold_models_it_was_not_fitted_for(tmp_path, planned_tiny):
    """A retrained fold (other checkpoint bytes) or another -chk: the stored Platt map is left out, with the reason."""
    import json
    import shutil

    from lnm_auto.evaluation.crossval_inputs import fold_model_digests
    from lnm_auto.inference.model import TrainedModel
    pre = planned_tiny(8, 0) / "pre" / "Dataset042_Tiny"
    folder = tmp_path / "LNMTrainer__LNMPlans__3d_resenc"
    (folder / "fold_0").mkdir(parents=True)
    shutil.copy(pre / "LNMPlans.json", folder / "plans.json")
    shutil.copy(pre / "dataset.json", folder / "dataset.json")
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint.write_bytes(b"weights of the cross-validated fold 0")
    (folder / "crossval_results").mkdir()
    (folder / "crossval_results" / "calibration.json").write_text(json.dumps(
        {"method": "platt", "a": 0.9, "b": -0.7, "model_files": fold_model_digests(folder, [0])}))
    model = TrainedModel.load(folder)
    calibration, why_not = model.calibration(["0"])
    assert calibration["a"] == 0.9 and why_not == ""
    assert model.calibration(["0"], "checkpoint_best.pth")[0] is None
    checkpoint.write_bytes(b"weights of fold 0 trained again")
    calibration, why_not = model.calibration(["0"])
    assert calibration is None and "fold(s) 0" in why_not and "re-run lnm_find_best_configuration" in why_not


def test_patients_in_pairs_counts_the_patients_of_folds_holding_both_classes():
    """The within-fold AUROC's support: two folds with both classes hold 3 patients; a one-class fold adds none. Below
    MIN_PATIENTS_IN_PAIRS the selection table warns (the AUROC then ranks nodes within a few patients only)."""
    import pandas as pd

    from lnm_auto.evaluation.crossval import MIN_PATIENTS_IN_PAIRS, patients_in_pairs
    units = pd.DataFrame({"case": ["a", "a", "b", "c", "c", "d", "e"], "label": [1, 0, 0, 1, 0, 0, 0],
                          "fold": [0, 0, 0, 1, 1, 2, 2], "probability": 0.5})
    assert patients_in_pairs(units) == 3
    assert patients_in_pairs(units.assign(label=0)) == 0
    assert MIN_PATIENTS_IN_PAIRS > 3
