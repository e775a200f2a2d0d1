"""Pure metric functions for binary lymph node metastasis classification.

The metric set is that of the seed paper (Li et al., MICCAI 2024): AUROC plus two operating points
read off the ROC curve, S@R75 / A@R75 and R@S75 / A@S75, with sensitivity/specificity/accuracy at the
fixed threshold 0.5 and two calibration numbers (Brier score, expected calibration error).

Operating-point rule (no interpolation between ROC points; see documentation/evaluation.md):
  the ROC points are those of ``sklearn.metrics.roc_curve(y, p, drop_intermediate=False)``, i.e. one
  point per distinct score, ``p >= threshold`` counting as positive.
  * S@R75 = specificity at the highest threshold whose recall (TPR) >= 0.75; A@R75 = accuracy there.
  * R@S75 = recall at the lowest threshold whose specificity >= 0.75 (the largest TPR among points with
    FPR <= 0.25); A@S75 = accuracy there.

Every metric is computed by one weighted engine (``_SortedScores``): a resample that draws patient g
``c_g`` times is the original data with node weights ``c_g``, so the point estimate (all weights 1)
and 1000 bootstrap resamples run through the same vectorised code.

Degenerate input (one class only) gives NaN for the metrics that need both classes plus a warning
string in the result; it never raises.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy.stats import norm, rankdata

RECALL_TARGET = 0.75
SPECIFICITY_TARGET = 0.75
FIXED_THRESHOLD = 0.5
N_CALIBRATION_BINS = 10
CONFIDENCE = 0.95

METRIC_NAMES: tuple[str, ...] = (
    "auroc", "s_at_r75", "a_at_r75", "r_at_s75", "a_at_s75",
    "sensitivity_at_0.5", "specificity_at_0.5", "accuracy_at_0.5", "brier", "ece",
)
# metrics that are undefined unless both classes are present
_NEED_BOTH = ("auroc", "s_at_r75", "a_at_r75", "r_at_s75", "a_at_s75")

# bootstrap: at most this many (resample x node) float64 cells per chunk (~32 MB each array)
_CHUNK_CELLS = 4_000_000


# ------------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------------
def _as_arrays(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(scores, dtype=float)
    if y.ndim != 1 or p.shape != y.shape:
        raise ValueError(f"labels and scores must be 1-D of equal length, got {y.shape} and {p.shape}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1 (drop unknown labels first)")
    if not np.isfinite(p).all():
        raise ValueError("scores must be finite (no NaN / inf)")
    return y.astype(np.float64), p


def _class_warning(n_pos: int, n_neg: int) -> str | None:
    if n_pos == 0 or n_neg == 0:
        return (f"only one class present (n_pos={n_pos}, n_neg={n_neg}): AUROC and the operating "
                f"points are undefined (NaN)")
    return None


# ------------------------------------------------------------------------------------------------
# the weighted engine
# ------------------------------------------------------------------------------------------------
class _SortedScores:
    """Scores sorted once (descending) so that any number of weight vectors can be evaluated.

    ``metrics(W)`` takes W of shape (B, n) -- weights in *sorted* order -- and returns a dict of
    (B,) arrays for every name in METRIC_NAMES plus the threshold indices of the operating points.
    """

    def __init__(self, y: np.ndarray, p: np.ndarray, n_bins: int = N_CALIBRATION_BINS):
        self.order = np.argsort(-p, kind="mergesort")
        self.p = p[self.order]
        self.y = y[self.order]
        n = self.p.size
        # last index of each block of equal scores == sklearn's threshold_idxs
        self.ends = np.r_[np.flatnonzero(np.diff(self.p)), n - 1] if n else np.zeros(0, dtype=int)
        self.thresholds = np.r_[np.inf, self.p[self.ends]]          # as roc_curve (first = inf)
        pos_pred = self.p >= FIXED_THRESHOLD
        self.tp_half = self.y * pos_pred                            # (n,)
        self.fp_half = (1.0 - self.y) * pos_pred
        self.sq_err = (self.p - self.y) ** 2
        bins = calibration_bin_index(self.p, n_bins)
        onehot = np.zeros((n, n_bins))
        onehot[np.arange(n), bins] = 1.0
        # per bin: sum of (p - y), so |sum_b(p - y)| / total summed over bins is the ECE
        self.bin_resid = onehot * (self.p - self.y)[:, None]       # (n, n_bins)

    def metrics(self, W: np.ndarray) -> dict[str, np.ndarray]:
        W = np.atleast_2d(np.asarray(W, dtype=np.float64))
        B = W.shape[0]
        Wp = W * self.y
        Wn = W - Wp
        zeros = np.zeros((B, 1))
        TP = np.concatenate([zeros, np.cumsum(Wp, axis=1)[:, self.ends]], axis=1)
        FP = np.concatenate([zeros, np.cumsum(Wn, axis=1)[:, self.ends]], axis=1)
        P = TP[:, -1]
        N = FP[:, -1]
        T = P + N
        rows = np.arange(B)
        out: dict[str, np.ndarray] = {}
        with np.errstate(divide="ignore", invalid="ignore"):
            tpr = TP / P[:, None]
            fpr = FP / N[:, None]
            out["auroc"] = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]), axis=1) / 2.0
            # highest threshold with recall >= target = first ROC point (descending thresholds)
            ir = np.argmax(tpr >= RECALL_TARGET, axis=1)
            out["s_at_r75"] = 1.0 - fpr[rows, ir]
            out["a_at_r75"] = (TP[rows, ir] + N - FP[rows, ir]) / T
            # lowest threshold with specificity >= target = last point with FPR <= 1 - target
            isp = np.maximum(np.sum(fpr <= 1.0 - SPECIFICITY_TARGET, axis=1) - 1, 0)
            out["r_at_s75"] = tpr[rows, isp]
            out["a_at_s75"] = (TP[rows, isp] + N - FP[rows, isp]) / T
            tp5 = W @ self.tp_half
            fp5 = W @ self.fp_half
            out["sensitivity_at_0.5"] = np.where(P > 0, tp5 / P, np.nan)
            out["specificity_at_0.5"] = np.where(N > 0, (N - fp5) / N, np.nan)
            out["accuracy_at_0.5"] = np.where(T > 0, (tp5 + N - fp5) / T, np.nan)
            out["brier"] = np.where(T > 0, (W @ self.sq_err) / T, np.nan)
            out["ece"] = np.where(T > 0, np.abs(W @ self.bin_resid).sum(axis=1) / T, np.nan)
        both = (P > 0) & (N > 0)
        for name in _NEED_BOTH:
            out[name] = np.where(both, out[name], np.nan)
        out["_idx_r75"] = np.where(both, ir, -1)
        out["_idx_s75"] = np.where(both, isp, -1)
        out["_n_pos"] = P
        out["_n_neg"] = N
        return out


# ------------------------------------------------------------------------------------------------
# point estimates
# ------------------------------------------------------------------------------------------------
def binary_metrics(y_true: Sequence, scores: Sequence) -> dict[str, Any]:
    """All point metrics for one set of labels (0/1) and scores.

    Returns {name: float for name in METRIC_NAMES, "threshold_at_r75", "threshold_at_s75" (the score
    thresholds of the two operating points; inf means "nothing called positive"), "n", "n_pos",
    "n_neg", "warnings": [str]}.
    """
    y, p = _as_arrays(y_true, scores)
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    res: dict[str, Any] = {"n": int(y.size), "n_pos": n_pos, "n_neg": n_neg}
    warnings: list[str] = []
    if y.size == 0:
        res.update({name: math.nan for name in METRIC_NAMES})
        res.update(threshold_at_r75=math.nan, threshold_at_s75=math.nan,
                   warnings=["no labelled samples: every metric is undefined (NaN)"])
        return res
    eng = _SortedScores(y, p)
    m = eng.metrics(np.ones((1, y.size)))
    for name in METRIC_NAMES:
        res[name] = float(m[name][0])
    ir, isp = int(m["_idx_r75"][0]), int(m["_idx_s75"][0])
    res["threshold_at_r75"] = float(eng.thresholds[ir]) if ir >= 0 else math.nan
    res["threshold_at_s75"] = float(eng.thresholds[isp]) if isp >= 0 else math.nan
    w = _class_warning(n_pos, n_neg)
    if w:
        warnings.append(w)
    res["warnings"] = warnings
    return res


def auroc(y_true: Sequence, scores: Sequence) -> float:
    """AUROC from midranks (Mann-Whitney U / (m n)); ties count 1/2. NaN if one class only."""
    y, p = _as_arrays(y_true, scores)
    m = int(y.sum())
    n = y.size - m
    if m == 0 or n == 0:
        return math.nan
    r = rankdata(p)
    return float((r[y == 1].sum() - m * (m + 1) / 2.0) / (m * n))


def operating_points(y_true: Sequence, scores: Sequence) -> dict[str, float]:
    """S@R75, A@R75, R@S75, A@S75 and their thresholds (subset of ``binary_metrics``)."""
    m = binary_metrics(y_true, scores)
    return {k: m[k] for k in ("s_at_r75", "a_at_r75", "threshold_at_r75",
                              "r_at_s75", "a_at_s75", "threshold_at_s75")}


# ------------------------------------------------------------------------------------------------
# calibration
# ------------------------------------------------------------------------------------------------
def calibration_bin_index(scores: np.ndarray, n_bins: int = N_CALIBRATION_BINS) -> np.ndarray:
    """Equal-width bins on [0, 1]: bin k holds k/n_bins <= p < (k+1)/n_bins; p = 1 is in the last."""
    return np.clip(np.floor(np.asarray(scores, dtype=float) * n_bins).astype(int), 0, n_bins - 1)


def brier_score(y_true: Sequence, scores: Sequence) -> float:
    y, p = _as_arrays(y_true, scores)
    return float(np.mean((p - y) ** 2)) if y.size else math.nan


def expected_calibration_error(y_true: Sequence, scores: Sequence, n_bins: int = N_CALIBRATION_BINS) -> float:
    """ECE = sum_b (n_b / n) |mean(y in b) - mean(p in b)| over the 10 equal-width bins."""
    y, p = _as_arrays(y_true, scores)
    if y.size == 0:
        return math.nan
    b = calibration_bin_index(p, n_bins)
    resid = np.bincount(b, weights=p - y, minlength=n_bins)
    return float(np.abs(resid).sum() / y.size)


def calibration_bins(y_true: Sequence, scores: Sequence, n_bins: int = N_CALIBRATION_BINS) -> dict[str, list]:
    """Reliability-diagram table: bin edges, count, mean predicted probability, observed fraction
    positive (NaN for empty bins)."""
    y, p = _as_arrays(y_true, scores)
    b = calibration_bin_index(p, n_bins)
    count = np.bincount(b, minlength=n_bins).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_p = np.bincount(b, weights=p, minlength=n_bins) / count
        frac = np.bincount(b, weights=y, minlength=n_bins) / count
    return {"edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
            "count": count.astype(int).tolist(),
            "mean_probability": mean_p.tolist(),
            "fraction_positive": frac.tolist()}


# ------------------------------------------------------------------------------------------------
# bootstrap over groups (patients)
# ------------------------------------------------------------------------------------------------
def resample_groups(groups: Sequence | None, n_samples: int, n_bootstrap: int, seed: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The group resamples the bootstrap uses.

    Returns (codes, draws): codes[i] is node i's group index into the *sorted* unique group ids
    (so the draws do not depend on row order); draws is (n_bootstrap, n_groups): resample b consists
    of groups draws[b, 0], draws[b, 1], ... (with replacement), each bringing all of its nodes.
    ``groups=None`` means every node is its own group (ordinary node-level bootstrap).
    """
    if groups is None:
        codes = np.arange(n_samples)
        G = n_samples
    else:
        g = np.asarray(groups)
        if g.shape != (n_samples,):
            raise ValueError(f"groups must have one entry per sample ({n_samples}), got shape {g.shape}")
        _, codes = np.unique(g.astype(str), return_inverse=True)
        codes = codes.reshape(-1)
        G = int(codes.max()) + 1 if n_samples else 0
    rng = np.random.default_rng(seed)
    dtype = np.int32 if G < 2**31 else np.int64
    draws = rng.integers(0, max(G, 1), size=(n_bootstrap, G), dtype=dtype)
    return codes, draws


def _count_chunks(draws: np.ndarray, n_nodes: int):
    """Yield (start, counts) with counts (b, G): how often each group was drawn in each resample."""
    B, G = draws.shape
    step = max(1, _CHUNK_CELLS // max(n_nodes, G, 1))
    for s in range(0, B, step):
        d = draws[s:s + step].astype(np.int64)
        b = d.shape[0]
        flat = (d + np.arange(b)[:, None] * G).ravel()
        yield s, np.bincount(flat, minlength=b * G).reshape(b, G).astype(np.float64)


def bootstrap_replicates(y_true: Sequence, scores: Sequence, groups: Sequence | None = None,
                         n_bootstrap: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """Every metric on every group resample: {name: (n_bootstrap,) array}; resamples with one class
    only are NaN for every metric (they are skipped, not retried). Also "valid": bool array."""
    y, p = _as_arrays(y_true, scores)
    codes, draws = resample_groups(groups, y.size, n_bootstrap, seed)
    out = {name: np.full(n_bootstrap, np.nan) for name in METRIC_NAMES}
    valid = np.zeros(n_bootstrap, dtype=bool)
    if y.size == 0 or n_bootstrap == 0:
        out["valid"] = valid
        return out
    eng = _SortedScores(y, p)
    node_group = codes[eng.order]
    for s, counts in _count_chunks(draws, y.size):
        m = eng.metrics(counts[:, node_group])
        ok = (m["_n_pos"] > 0) & (m["_n_neg"] > 0)
        valid[s:s + ok.size] = ok
        for name in METRIC_NAMES:
            out[name][s:s + ok.size] = np.where(ok, m[name], np.nan)
    out["valid"] = valid
    return out


def percentile_ci(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return (math.nan, math.nan)
    a = (1.0 - confidence) / 2.0 * 100.0
    lo, hi = np.percentile(v, [a, 100.0 - a])
    return (float(lo), float(hi))


def bootstrap_ci(y_true: Sequence, scores: Sequence, groups: Sequence | None = None,
                 n_bootstrap: int = 1000, seed: int = 0, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Percentile bootstrap CIs that resample *groups* (patients) with replacement.

    Returns {"ci": {name: (lo, hi)}, "n_bootstrap", "n_valid", "n_groups", "warnings"}.
    """
    y, p = _as_arrays(y_true, scores)
    reps = bootstrap_replicates(y, p, groups, n_bootstrap, seed)
    n_groups = y.size if groups is None else len(np.unique(np.asarray(groups).astype(str)))
    n_valid = int(reps["valid"].sum())
    warnings: list[str] = []
    if n_bootstrap and n_valid < n_bootstrap:
        warnings.append(f"{n_bootstrap - n_valid} of {n_bootstrap} bootstrap resamples had one class only "
                        f"and were skipped")
    if n_bootstrap and n_groups < 20:
        warnings.append(f"only {n_groups} patient group(s): bootstrap CIs are unreliable")
    ci = {name: percentile_ci(reps[name], confidence) for name in METRIC_NAMES}
    return {"ci": ci, "n_bootstrap": int(n_bootstrap), "n_valid": n_valid, "n_groups": int(n_groups),
            "warnings": warnings}


def paired_bootstrap_auroc_difference(y_true: Sequence, scores_a: Sequence, scores_b: Sequence,
                                      groups: Sequence | None = None, n_bootstrap: int = 1000,
                                      seed: int = 0, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """AUROC(a) - AUROC(b) with a percentile CI from the *same* group resamples for both models."""
    y, pa = _as_arrays(y_true, scores_a)
    _, pb = _as_arrays(y_true, scores_b)
    if pb.shape != pa.shape:
        raise ValueError("scores_a and scores_b must have the same length")
    codes, draws = resample_groups(groups, y.size, n_bootstrap, seed)
    diff = np.full(n_bootstrap, np.nan)
    if y.size and n_bootstrap:
        ea, eb = _SortedScores(y, pa), _SortedScores(y, pb)
        ga, gb = codes[ea.order], codes[eb.order]
        for s, counts in _count_chunks(draws, y.size):
            d = ea.metrics(counts[:, ga])["auroc"] - eb.metrics(counts[:, gb])["auroc"]
            diff[s:s + d.size] = d
    point = binary_metrics(y, pa)["auroc"] - binary_metrics(y, pb)["auroc"] if y.size else math.nan
    return {"auroc_diff": float(point), "ci95": percentile_ci(diff, confidence),
            "n_valid": int(np.isfinite(diff).sum())}


# ------------------------------------------------------------------------------------------------
# DeLong (fast midrank algorithm, Sun & Xu 2014)
# ------------------------------------------------------------------------------------------------
def delong_auc_covariance(y_true: Sequence, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and their DeLong covariance matrix for k score vectors on the same samples.

    scores: (k, n) or (n,). Returns (aucs (k,), cov (k, k)). Needs >= 2 positives and >= 2 negatives
    for the covariance (NaN otherwise); the AUCs need one of each.
    """
    S = np.atleast_2d(np.asarray(scores, dtype=float))
    y = np.asarray(y_true)
    if S.shape[1] != y.size:
        raise ValueError("scores and labels differ in length")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(S).all():
        raise ValueError("scores must be finite")
    k = S.shape[0]
    pos = S[:, y == 1]
    neg = S[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    if m == 0 or n == 0:
        return np.full(k, np.nan), np.full((k, k), np.nan)
    tx = rankdata(pos, axis=1)                                   # midranks among positives
    ty = rankdata(neg, axis=1)                                   # midranks among negatives
    tz = rankdata(np.concatenate([pos, neg], axis=1), axis=1)    # midranks among all
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    v10 = (tz[:, :m] - tx) / n            # structural components of the positives
    v01 = 1.0 - (tz[:, m:] - ty) / m      # structural components of the negatives
    if m < 2 or n < 2:
        return aucs, np.full((k, k), np.nan)
    s10 = np.atleast_2d(np.cov(v10))
    s01 = np.atleast_2d(np.cov(v01))
    return aucs, s10 / m + s01 / n


def delong_variance(y_true: Sequence, scores: Sequence) -> tuple[float, float]:
    """(AUC, DeLong variance of the AUC) for one score vector."""
    aucs, cov = delong_auc_covariance(y_true, np.asarray(scores, dtype=float)[None, :])
    return float(aucs[0]), float(cov[0, 0])


def delong_test(y_true: Sequence, scores_a: Sequence, scores_b: Sequence) -> dict[str, Any]:
    """DeLong test of H0: AUC(a) == AUC(b) for two correlated ROC curves on the same samples.

    Returns auc_a, auc_b, auc_diff, var_a, var_b, cov_ab, var_diff, z, p_value (two-sided), ci95_diff
    (normal approximation), n, n_pos, n_neg, warnings. Identical rankings give z = 0, p = 1.
    """
    a = np.asarray(scores_a, dtype=float)
    b = np.asarray(scores_b, dtype=float)
    y = np.asarray(y_true)
    if a.shape != b.shape or a.shape != y.shape or a.ndim != 1:
        raise ValueError("labels, scores_a and scores_b must be 1-D of equal length")
    aucs, cov = delong_auc_covariance(y, np.vstack([a, b]))
    n_pos = int((y == 1).sum())
    n_neg = int((y == 0).sum())
    warnings: list[str] = []
    var_diff = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    diff = float(aucs[0] - aucs[1])
    if n_pos < 2 or n_neg < 2:
        warnings.append(f"DeLong needs >= 2 positives and >= 2 negatives (n_pos={n_pos}, n_neg={n_neg}): "
                        f"test undefined (NaN)")
        z = p_value = math.nan
    elif var_diff <= 1e-15 * max(1.0, float(cov[0, 0] + cov[1, 1])):
        if abs(diff) < 1e-12:
            z, p_value = 0.0, 1.0
            warnings.append("the two models rank the samples identically (variance of the difference is 0)")
        else:
            z = math.copysign(math.inf, diff)
            p_value = 0.0
            warnings.append("variance of the AUC difference is 0 but the AUCs differ")
    else:
        z = diff / math.sqrt(var_diff)
        p_value = float(2.0 * norm.sf(abs(z)))
    half = float(norm.ppf(0.5 + CONFIDENCE / 2.0)) * math.sqrt(var_diff) if var_diff >= 0 else math.nan
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "auc_diff": diff,
            "var_a": float(cov[0, 0]), "var_b": float(cov[1, 1]), "cov_ab": float(cov[0, 1]),
            "var_diff": var_diff, "z": float(z), "p_value": float(p_value),
            "ci95_diff": (diff - half, diff + half) if half == half else (math.nan, math.nan),
            "n": int(y.size), "n_pos": n_pos, "n_neg": n_neg, "warnings": warnings}
