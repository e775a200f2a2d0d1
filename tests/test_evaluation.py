"""Tests for lnm_auto.evaluation: metrics (vs sklearn / naive computations), roll-up, report, errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, brier_score_loss, roc_auc_score, roc_curve

from lnm_auto.evaluation import metrics as M
from lnm_auto.evaluation.report import evaluate, format_table
from lnm_auto.evaluation.rollup import UNKNOWN, combine, derive_label, rollup
from lnm_auto.utils.errors import LNMError


# ------------------------------------------------------------------------------------------------
# independent reference computations
# ------------------------------------------------------------------------------------------------
def direct_metrics(y, p):
    """Every point metric straight from sklearn's roc_curve / plain numpy, following the documented rule."""
    y = np.asarray(y)
    p = np.asarray(p, dtype=float)
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    # S@R75: the highest threshold whose recall >= 0.75
    cand = [i for i in range(len(thr)) if tpr[i] >= 0.75]
    ir = max(cand, key=lambda i: thr[i])
    # R@S75: the lowest threshold whose specificity >= 0.75
    cand = [i for i in range(len(thr)) if 1.0 - fpr[i] >= 0.75]
    isp = min(cand, key=lambda i: thr[i])
    pos = y == 1
    half = p >= 0.5
    bins = np.minimum((p * 10).astype(int), 9)
    ece = sum(abs(y[bins == b].mean() - p[bins == b].mean()) * (bins == b).sum() / len(y)
              for b in range(10) if (bins == b).any())
    return {
        "auroc": roc_auc_score(y, p),
        "s_at_r75": 1.0 - fpr[ir], "a_at_r75": accuracy_score(y, p >= thr[ir]), "threshold_at_r75": thr[ir],
        "r_at_s75": tpr[isp], "a_at_s75": accuracy_score(y, p >= thr[isp]), "threshold_at_s75": thr[isp],
        "sensitivity_at_0.5": half[pos].mean(), "specificity_at_0.5": (~half[~pos]).mean(),
        "accuracy_at_0.5": accuracy_score(y, half), "brier": brier_score_loss(y, p), "ece": ece,
    }


def naive_delong(y, scores):
    """DeLong et al. 1988 structural components with O(m*n) loops; returns (aucs, covariance)."""
    y = np.asarray(y)
    S = np.atleast_2d(scores)
    X, Y = S[:, y == 1], S[:, y == 0]
    k, m, n = S.shape[0], X.shape[1], Y.shape[1]

    def psi(a, b):
        return 1.0 if a > b else (0.5 if a == b else 0.0)

    V10 = np.zeros((k, m))
    V01 = np.zeros((k, n))
    for r in range(k):
        for i in range(m):
            for j in range(n):
                s = psi(X[r, i], Y[r, j])
                V10[r, i] += s / n
                V01[r, j] += s / m
    aucs = V10.mean(axis=1)
    S10 = np.array([[np.sum((V10[a] - aucs[a]) * (V10[b] - aucs[b])) / (m - 1) for b in range(k)] for a in range(k)])
    S01 = np.array([[np.sum((V01[a] - aucs[a]) * (V01[b] - aucs[b])) / (n - 1) for b in range(k)] for a in range(k)])
    return aucs, S10 / m + S01 / n


def random_case(seed, n=300, tie_decimals=None):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.35).astype(int)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    if tie_decimals is not None:
        p = np.round(p, tie_decimals)
    return y, p


# ------------------------------------------------------------------------------------------------
# point metrics
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed,ties", [(0, None), (1, None), (2, 1), (3, 1), (4, 0), (5, 2)])
def test_point_metrics_match_direct_computation(seed, ties):
    y, p = random_case(seed, n=200 + 37 * seed, tie_decimals=ties)
    got = M.binary_metrics(y, p)
    want = direct_metrics(y, p)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-12), k
    assert got["n"] == len(y) and got["n_pos"] == y.sum() and got["warnings"] == []
    assert M.auroc(y, p) == pytest.approx(roc_auc_score(y, p), rel=1e-12)
    assert M.brier_score(y, p) == pytest.approx(want["brier"])
    assert M.expected_calibration_error(y, p) == pytest.approx(want["ece"])


def test_operating_points_on_hand_example():
    # scores descending: 0.9(+) 0.8(+) 0.7(-) 0.6(+) 0.5(-) 0.4(+) 0.3(-) 0.2(-)
    y = np.array([1, 1, 0, 1, 0, 1, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    m = M.binary_metrics(y, p)
    # recall reaches 3/4 first at t=0.6, where 1 of 4 negatives is above: spec 0.75, acc (3+3)/8
    assert m["threshold_at_r75"] == 0.6 and m["s_at_r75"] == 0.75 and m["a_at_r75"] == 0.75
    # FPR <= 0.25 holds down to t=0.6 (t=0.5 would make FPR 0.5): recall 0.75
    assert m["threshold_at_s75"] == 0.6 and m["r_at_s75"] == 0.75 and m["a_at_s75"] == 0.75
    assert m["sensitivity_at_0.5"] == 0.75 and m["specificity_at_0.5"] == 0.5
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p))


def test_all_tied_scores_and_inf_threshold():
    y = np.array([1, 0, 1, 0, 1, 0])
    p = np.full(6, 0.3)
    m = M.binary_metrics(y, p)
    assert m["auroc"] == 0.5
    # only ROC points: (0,0) at t=inf and (1,1) at t=0.3
    assert m["s_at_r75"] == 0.0 and m["threshold_at_r75"] == 0.3
    assert m["r_at_s75"] == 0.0 and m["threshold_at_s75"] == math.inf and m["a_at_s75"] == 0.5


def test_degenerate_inputs_give_nan_and_warning():
    m = M.binary_metrics([1, 1, 1], [0.2, 0.6, 0.9])
    for k in ("auroc", "s_at_r75", "a_at_r75", "r_at_s75", "a_at_s75", "specificity_at_0.5"):
        assert math.isnan(m[k]), k
    assert m["sensitivity_at_0.5"] == pytest.approx(2 / 3)
    assert m["accuracy_at_0.5"] == pytest.approx(2 / 3)
    assert m["warnings"] and "one class" in m["warnings"][0]
    e = M.binary_metrics([], [])
    assert math.isnan(e["auroc"]) and e["warnings"]
    assert math.isnan(M.auroc([0, 0], [0.1, 0.2]))
    with pytest.raises(ValueError):
        M.binary_metrics([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError):
        M.binary_metrics([0, 2], [0.1, 0.2])


def test_calibration_bins():
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.05, 0.15, 0.19, 0.95, 1.0])
    cal = M.calibration_bins(y, p)
    assert cal["count"] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert cal["mean_probability"][1] == pytest.approx(0.17)
    assert cal["fraction_positive"][9] == pytest.approx(0.5)
    assert math.isnan(cal["fraction_positive"][5])
    # ECE = (1/5)|0-0.05| + (2/5)|1-0.17| + (2/5)|0.5-0.975|
    assert M.expected_calibration_error(y, p) == pytest.approx(0.05 / 5 + 2 / 5 * 0.83 + 2 / 5 * 0.475)


# ------------------------------------------------------------------------------------------------
# bootstrap
# ------------------------------------------------------------------------------------------------
def grouped_case(seed=0, n_patients=80):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 9, n_patients)
    groups = np.repeat([f"p{i:03d}" for i in range(n_patients)], sizes)
    patient_pos = rng.random(n_patients) < 0.4
    y = (np.repeat(patient_pos, sizes) & (rng.random(groups.size) < 0.6)).astype(int)
    p = np.round(np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1), 2)
    return y, p, groups


def test_bootstrap_replicates_equal_naive_gather_and_recompute():
    y, p, groups = grouped_case(1)
    reps = M.bootstrap_replicates(y, p, groups, n_bootstrap=40, seed=7)
    codes, draws = M.resample_groups(groups, y.size, 40, 7)
    uniq = np.unique(groups)
    assert np.array_equal(uniq[codes], groups)  # codes index the sorted unique ids
    members = [np.flatnonzero(codes == g) for g in range(len(uniq))]
    for b in range(40):
        idx = np.concatenate([members[g] for g in draws[b]])
        yb, pb = y[idx], p[idx]
        if yb.min() == yb.max():
            assert not reps["valid"][b]
            continue
        want = direct_metrics(yb, pb)
        for name in M.METRIC_NAMES:
            assert reps[name][b] == pytest.approx(want[name], rel=1e-9, abs=1e-12), (b, name)


def test_bootstrap_ci_contains_estimate_and_is_reproducible():
    y, p, groups = grouped_case(2)
    point = M.binary_metrics(y, p)
    a = M.bootstrap_ci(y, p, groups, n_bootstrap=500, seed=3)
    b = M.bootstrap_ci(y, p, groups, n_bootstrap=500, seed=3)
    c = M.bootstrap_ci(y, p, groups, n_bootstrap=500, seed=4)
    assert a == b
    assert a["ci"]["auroc"] != c["ci"]["auroc"]
    assert a["n_groups"] == len(np.unique(groups)) and a["n_valid"] == 500
    for name in M.METRIC_NAMES:
        lo, hi = a["ci"][name]
        assert lo <= point[name] <= hi, name
        assert hi > lo, name
    # row order does not change the resamples (groups are coded in sorted order)
    perm = np.random.default_rng(0).permutation(y.size)
    d = M.bootstrap_ci(y[perm], p[perm], groups[perm], n_bootstrap=500, seed=3)
    for name in M.METRIC_NAMES:
        assert d["ci"][name] == pytest.approx(a["ci"][name], rel=1e-12)


def test_bootstrap_resamples_patients_not_nodes():
    # 60 single-node patients plus one patient with 50 identical positive nodes
    rng = np.random.default_rng(5)
    y_small = (rng.random(60) < 0.5).astype(int)
    p_small = np.clip(rng.normal(0.3 + 0.4 * y_small, 0.15), 0, 1)
    y = np.r_[y_small, np.ones(50, dtype=int)]
    p = np.r_[p_small, np.full(50, 0.2)]  # the big patient is missed: every node below 0.5
    groups = np.r_[[f"s{i}" for i in range(60)], ["big"] * 50]
    by_patient = M.bootstrap_ci(y, p, groups, n_bootstrap=1000, seed=0)["ci"]["sensitivity_at_0.5"]
    by_node = M.bootstrap_ci(y, p, None, n_bootstrap=1000, seed=0)["ci"]["sensitivity_at_0.5"]
    w_patient, w_node = by_patient[1] - by_patient[0], by_node[1] - by_node[0]
    # the 50 nodes come and go together, so the patient bootstrap is far wider
    assert w_patient > 2.0 * w_node
    # the same group ids get identical results whatever they are called
    same = M.bootstrap_ci(y, p, np.r_[[f"s{i}" for i in range(60)], ["big"] * 50], n_bootstrap=1000, seed=0)
    assert same["ci"]["sensitivity_at_0.5"] == by_patient


def test_bootstrap_skips_one_class_resamples_and_is_fast():
    import time
    y = np.r_[np.zeros(480, dtype=int), np.ones(20, dtype=int)]
    p = np.random.default_rng(0).random(500)
    groups = np.arange(500) // 5  # 100 patients, positives in only 4
    t = time.perf_counter()
    res = M.bootstrap_ci(y, p, groups, n_bootstrap=1000, seed=0)
    assert time.perf_counter() - t < 3.0
    assert 0 < res["n_valid"] < 1000
    assert any("skipped" in w for w in res["warnings"])
    assert all(np.isfinite(res["ci"]["auroc"]))


# ------------------------------------------------------------------------------------------------
# DeLong
# ------------------------------------------------------------------------------------------------
def test_delong_single_auc_variance_equals_naive_structural_components():
    y, p = random_case(11, n=60, tie_decimals=1)  # with ties
    auc, var = M.delong_variance(y, p)
    aucs_n, cov_n = naive_delong(y, p)
    assert auc == pytest.approx(roc_auc_score(y, p), rel=1e-12)
    assert auc == pytest.approx(aucs_n[0], rel=1e-12)
    assert var == pytest.approx(cov_n[0, 0], rel=1e-10)


def test_delong_paired_test_equals_naive():
    rng = np.random.default_rng(12)
    y = (rng.random(70) < 0.4).astype(int)
    a = np.round(rng.normal(y * 0.8, 1.0), 1)
    b = np.round(0.5 * a + rng.normal(y * 0.3, 1.0), 1)
    res = M.delong_test(y, a, b)
    aucs, cov = naive_delong(y, np.vstack([a, b]))
    var_diff = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    z = (aucs[0] - aucs[1]) / math.sqrt(var_diff)
    from scipy.stats import norm
    assert res["auc_a"] == pytest.approx(roc_auc_score(y, a)) and res["auc_b"] == pytest.approx(roc_auc_score(y, b))
    assert res["cov_ab"] == pytest.approx(cov[0, 1], rel=1e-10)
    assert res["var_diff"] == pytest.approx(var_diff, rel=1e-10)
    assert res["z"] == pytest.approx(z, rel=1e-10)
    assert res["p_value"] == pytest.approx(2 * norm.sf(abs(z)), rel=1e-10)
    assert 0 < res["p_value"] < 1
    lo, hi = res["ci95_diff"]
    assert lo < res["auc_diff"] < hi


def test_delong_edge_cases():
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    same = M.delong_test(y, p, p * 0.5)  # same ranking
    assert same["z"] == 0.0 and same["p_value"] == 1.0 and same["warnings"]
    few = M.delong_test([0, 1, 0], [0.1, 0.9, 0.3], [0.2, 0.1, 0.3])
    assert math.isnan(few["p_value"]) and few["warnings"]


# ------------------------------------------------------------------------------------------------
# roll-up
# ------------------------------------------------------------------------------------------------
def node_table():
    return pd.DataFrame({
        "case": ["a", "a", "a", "b", "b", "c"],
        "station": ["1R", "1R", "2L", "1R", "1R", "4"],
        "probability": [0.2, 0.5, 0.1, 0.9, 1.0, 0.3],
        "probability_fold0": [0.1, 0.4, 0.0, 0.5, 0.5, 0.3],
        "label": [0, 1, UNKNOWN, 0, np.nan, 0],
    })


def test_rollup_station_max():
    st = rollup(node_table(), "station")
    assert list(st.columns) == ["case", "station", "probability", "probability_fold0", "n_nodes", "label"]
    assert st[["case", "station"]].values.tolist() == [["a", "1R"], ["a", "2L"], ["b", "1R"], ["c", "4"]]
    assert st["probability"].tolist() == [0.5, 0.1, 1.0, 0.3]
    assert st["probability_fold0"].tolist() == [0.4, 0.0, 0.5, 0.3]
    assert st["n_nodes"].tolist() == [2, 1, 2, 1]
    assert st["label"].tolist() == [1, UNKNOWN, UNKNOWN, 0]


def test_rollup_patient_noisy_or_and_patient_column():
    pt = rollup(node_table(), "patient", method="noisy_or")
    assert pt["case"].tolist() == ["a", "b", "c"]
    assert pt["probability"].tolist() == pytest.approx([1 - 0.8 * 0.5 * 0.9, 1.0, 0.3])
    assert pt["label"].tolist() == [1, UNKNOWN, 0]
    df = node_table().assign(patient=["P1", "P1", "P1", "P1", "P1", "P2"])
    pt = rollup(df, "patient")
    assert pt["patient"].tolist() == ["P1", "P2"]
    assert pt["probability"].tolist() == [1.0, 0.3] and pt["n_nodes"].tolist() == [5, 1]
    assert pt["label"].tolist() == [1, 0]


def test_rollup_helpers_and_errors():
    assert combine([0.2, 0.7]) == 0.7
    assert combine([0.5, 0.5], "noisy_or") == pytest.approx(0.75)
    assert combine([]) == 0.0 and combine([], "noisy_or") == 0.0
    assert derive_label([0, 1, UNKNOWN]) == 1
    assert derive_label([0, 0]) == 0
    assert derive_label([0, UNKNOWN]) == UNKNOWN and derive_label([]) == UNKNOWN
    with pytest.raises(ValueError):
        rollup(node_table(), "station", method="mean")
    with pytest.raises(ValueError):
        rollup(node_table(), "hospital")
    with pytest.raises(LNMError):
        rollup(node_table().drop(columns="station"), "station")
    with pytest.raises(LNMError):
        rollup(node_table().assign(probability=1.5), "patient")


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def write_dataset(folder: Path, seed=0, n_cases=40):
    rng = np.random.default_rng(seed)
    ref, pred, comp = [], [], []
    for c in range(n_cases):
        case = f"case_{c:03d}"
        for node in range(1, int(rng.integers(1, 8)) + 1):
            lab = int(rng.random() < 0.3 and c % 3 == 0)    # positive nodes only in N+ patients (else refused)
            st = f"S{rng.integers(1, 4)}"
            ref.append({"case": case, "node": node, "station": st, "label": "" if rng.random() < 0.1 else lab})
            pr = float(np.round(np.clip(rng.normal(0.3 + 0.35 * lab, 0.2), 0, 1), 3))
            pred.append({"case": case, "node": f"{node}.0", "station": st, "probability": pr,
                         "probability_fold0": pr})
            comp.append({"case": case, "node": node, "station": st, "probability": float(rng.random())})
    pred.append({"case": "extra", "node": 1, "station": "S1", "probability": 0.5, "probability_fold0": 0.5})
    pd.DataFrame(ref).to_csv(folder / "ref.csv", index=False)
    pd.DataFrame(pred).sample(frac=1, random_state=0).to_csv(folder / "pred.csv", index=False)
    pd.DataFrame(comp).to_csv(folder / "comp.csv", index=False)
    pats = pd.DataFrame({"case": [f"case_{c:03d}" for c in range(n_cases)] + ["not_evaluated"],
                         "patient": [f"P{c // 2}" for c in range(n_cases)] + ["PX"],
                         "label": [1 if c % 3 == 0 else 0 for c in range(n_cases)] + [1]})
    pats.to_csv(folder / "patients.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def report_run(tmp_path_factory):
    folder = write_dataset(tmp_path_factory.mktemp("eval"))
    out = folder / "out"
    res = evaluate(folder / "ref.csv", folder / "pred.csv", out, ref_patients_csv=folder / "patients.csv",
                   compare_pred_csv=folder / "comp.csv", n_bootstrap=200, seed=1)
    return folder, out, res


def test_report_writes_files_and_numbers_match(report_run):
    folder, out, res = report_run
    assert sorted(f.name for f in out.iterdir()) == ["calibration.png", "metrics.json", "roc.png"]
    for png in ("roc.png", "calibration.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == res

    ref = pd.read_csv(folder / "ref.csv", dtype={"label": "Int64"})
    pred = pd.read_csv(folder / "pred.csv")
    pred["node"] = pred["node"].astype(int)
    nodes = ref.merge(pred[["case", "node", "probability"]], on=["case", "node"])
    pats = pd.read_csv(folder / "patients.csv")
    nodes["patient"] = nodes["case"].map(dict(zip(pats["case"], pats["patient"])))
    known = nodes[nodes["label"].notna()]
    y, p, g = known["label"].to_numpy(int), known["probability"].to_numpy(), known["patient"].to_numpy()

    node = res["levels"]["node"]
    assert node["n"] == len(known) and node["n_pos"] == y.sum() and node["n_unknown_excluded"] == len(nodes) - len(known)
    point = M.binary_metrics(y, p)
    ci = M.bootstrap_ci(y, p, g, n_bootstrap=200, seed=1)["ci"]
    for name in M.METRIC_NAMES:
        assert node[name]["value"] == pytest.approx(point[name], rel=1e-12), name
        assert node[name]["ci95"] == pytest.approx(list(ci[name]), rel=1e-12), name
    assert node["auroc"]["value"] == pytest.approx(roc_auc_score(y, p))

    # station level: max roll-up, labels derived from nodes
    st = rollup(nodes.assign(label=nodes["label"].fillna(UNKNOWN)), "station")
    st = st[st["label"] != UNKNOWN]
    assert res["levels"]["station"]["n"] == len(st)
    assert res["levels"]["station"]["auroc"]["value"] == pytest.approx(roc_auc_score(st["label"], st["probability"]))

    # patient level: grouped by the patient column, labels from patients.csv (any case positive)
    pt = rollup(nodes[["case", "patient", "probability"]], "patient")
    plab = pats[pats["case"] != "not_evaluated"].groupby("patient")["label"].max()
    assert res["levels"]["patient"]["n"] == len(pt) == len(plab)
    want = roc_auc_score(plab.loc[pt["patient"]].to_numpy(), pt["probability"])
    assert res["levels"]["patient"]["auroc"]["value"] == pytest.approx(want)
    assert any("not_evaluated" in w or "ignored" in w for w in res["warnings"])

    # comparison: DeLong on the node level equals delong_test
    comp = pd.read_csv(folder / "comp.csv")
    pb = known[["case", "node"]].merge(comp, on=["case", "node"])["probability"].to_numpy()
    dl = M.delong_test(y, p, pb)
    c = res["comparison"]["node"]
    assert c["auroc_a"] == pytest.approx(dl["auc_a"]) and c["auroc_b"] == pytest.approx(dl["auc_b"])
    assert c["delong"]["z"] == pytest.approx(dl["z"]) and c["delong"]["p_value"] == pytest.approx(dl["p_value"])
    lo, hi = c["bootstrap_diff_ci95"]
    assert lo <= c["auroc_diff"] <= hi
    assert set(res["comparison"]) == {"node", "station", "patient"}


def test_format_table(report_run):
    _, _, res = report_run
    text = format_table(res)
    assert "node" in text and "station" in text and "patient" in text
    a = res["levels"]["node"]["auroc"]
    assert f"{a['value']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]" in text
    assert "DeLong" in text and "S@R75" in text and "R@S75" in text
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "node", "station", "patient"]


def test_report_station_reference_and_skipped_level(tmp_path):
    ref = pd.DataFrame({"case": ["a", "a", "b", "b", "c"], "node": [1, 2, 1, 2, 1],
                        "station": ["1", "2", "1", "1", "2"], "label": ["", "", "", "", ""]})
    pred = ref[["case", "node"]].assign(probability=[0.9, 0.2, 0.4, 0.1, 0.7])
    stations = pd.DataFrame({"case": ["a", "a", "b", "c", "c", "zz"], "station": ["1", "2", "1", "2", "7", "1"],
                             "label": [1, 0, 0, 1, 0, 1]})
    ref.to_csv(tmp_path / "ref.csv", index=False)
    pred.to_csv(tmp_path / "pred.csv", index=False)
    stations.to_csv(tmp_path / "stations.csv", index=False)
    res = evaluate(tmp_path / "ref.csv", tmp_path / "pred.csv", tmp_path / "out",
                   ref_stations_csv=tmp_path / "stations.csv", n_bootstrap=50)
    # node labels all unknown -> node and patient levels skipped, station level from stations.csv
    assert "skipped" in res["levels"]["node"] and "skipped" in res["levels"]["patient"]
    s = res["levels"]["station"]
    # stations: a/1 p=.9 y=1, a/2 p=.2 y=0, b/1 p=.4 y=0, c/2 p=.7 y=1, c/7 (no node) p=0 y=0
    assert s["n"] == 5 and s["n_pos"] == 2
    assert s["auroc"]["value"] == pytest.approx(roc_auc_score([1, 0, 0, 1, 0], [0.9, 0.2, 0.4, 0.7, 0.0]))
    assert any("contain no node" in w for w in res["warnings"])
    assert (tmp_path / "out" / "roc.png").is_file()
    assert "skipped" in format_table(res)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
@pytest.fixture()
def small_files(tmp_path):
    ref = pd.DataFrame({"case": ["a", "a", "b", "c"], "node": [1, 2, 1, 1], "station": ["1", "1", "2", "2"],
                        "label": [1, 0, 0, 1]})
    ref.to_csv(tmp_path / "ref.csv", index=False)
    pred = ref[["case", "node", "station"]].assign(probability=[0.8, 0.3, 0.2, 0.6])
    return tmp_path, pred


def run_with_pred(folder, pred, **kw):
    pred.to_csv(folder / "pred.csv", index=False)
    return evaluate(folder / "ref.csv", folder / "pred.csv", folder / "out", n_bootstrap=0, **kw)


def test_small_run_ok(small_files):
    folder, pred = small_files
    res = run_with_pred(folder, pred)
    assert res["levels"]["node"]["auroc"]["value"] == 1.0 and res["levels"]["node"]["auroc"]["ci95"] == [None, None]


def test_missing_node_in_predictions(small_files):
    folder, pred = small_files
    with pytest.raises(LNMError, match=r"pred\.csv.*1 node\(s\).*\(b, 1\)"):
        run_with_pred(folder, pred.drop(index=2))
    assert not (folder / "out" / "metrics.json").exists()


def test_nan_probability(small_files):
    folder, pred = small_files
    pred.loc[1, "probability"] = np.nan
    with pytest.raises(LNMError, match=r"pred\.csv.*probability.*line 3 \(case a, node 2\)"):
        run_with_pred(folder, pred)


def test_probability_out_of_range(small_files):
    folder, pred = small_files
    pred.loc[0, "probability"] = 1.7
    with pytest.raises(LNMError, match=r"\[0, 1\]"):
        run_with_pred(folder, pred)


def test_missing_column(small_files):
    folder, pred = small_files
    with pytest.raises(LNMError, match=r"pred\.csv: column\(s\) probability missing"):
        run_with_pred(folder, pred.rename(columns={"probability": "prob"}))
    pd.read_csv(folder / "ref.csv").drop(columns="label").to_csv(folder / "ref.csv", index=False)
    with pytest.raises(LNMError, match=r"ref\.csv: column\(s\) label missing"):
        run_with_pred(folder, pred)


def test_missing_file_bad_label_duplicates(small_files):
    folder, pred = small_files
    pred.to_csv(folder / "pred.csv", index=False)
    with pytest.raises(LNMError, match="not found"):
        evaluate(folder / "nope.csv", folder / "pred.csv", folder / "out")
    with pytest.raises(LNMError, match="not found"):
        evaluate(folder / "ref.csv", folder / "pred.csv", folder / "out", compare_pred_csv=folder / "nope.csv")
    with pytest.raises(LNMError, match="duplicate"):
        run_with_pred(folder, pd.concat([pred, pred.iloc[:1]]))
    ref = pd.read_csv(folder / "ref.csv")
    ref.loc[2, "label"] = 2
    ref.to_csv(folder / "ref.csv", index=False)
    with pytest.raises(LNMError, match=r"line 4: label must be 1, 0 or empty"):
        run_with_pred(folder, pred)
