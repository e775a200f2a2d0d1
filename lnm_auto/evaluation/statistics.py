"""Uncertainty and comparison: patient-bootstrap confidence intervals and the DeLong test.

The bootstrap resamples *groups* (patients) with replacement and evaluates each resample as node
weights through the same engine as the point metrics (metric_engine.py); DeLong uses the fast midrank
algorithm (Sun & Xu 2014). Resamples with one class only are skipped, never retried.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy.stats import norm, rankdata

from lnm_auto.evaluation.metric_engine import CONFIDENCE, METRIC_NAMES, SortedScores, as_label_score_arrays

# bootstrap: at most this many (resample x node) float64 cells per chunk (~32 MB each array)
_CHUNK_CELLS = 4_000_000


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
    y, p = as_label_score_arrays(y_true, scores)
    codes, draws = resample_groups(groups, y.size, n_bootstrap, seed)
    out = {name: np.full(n_bootstrap, np.nan) for name in METRIC_NAMES}
    valid = np.zeros(n_bootstrap, dtype=bool)
    if y.size == 0 or n_bootstrap == 0:
        out["valid"] = valid
        return out
    eng = SortedScores(y, p)
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
    """Central percentile interval of the finite values ((NaN, NaN) with fewer than two)."""
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
    y, p = as_label_score_arrays(y_true, scores)
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
    y, pa = as_label_score_arrays(y_true, scores_a)
    _, pb = as_label_score_arrays(y_true, scores_b)
    if pb.shape != pa.shape:
        raise ValueError("scores_a and scores_b must have the same length")
    codes, draws = resample_groups(groups, y.size, n_bootstrap, seed)
    diff = np.full(n_bootstrap, np.nan)
    point = math.nan
    if y.size:
        ea, eb = SortedScores(y, pa), SortedScores(y, pb)
        ones = np.ones((1, y.size))                  # the point estimate: every node once
        point = float(ea.metrics(ones)["auroc"][0]) - float(eb.metrics(ones)["auroc"][0])
        ga, gb = codes[ea.order], codes[eb.order]
        for s, counts in _count_chunks(draws, y.size):         # no chunk when n_bootstrap == 0
            d = ea.metrics(counts[:, ga])["auroc"] - eb.metrics(counts[:, gb])["auroc"]
            diff[s:s + d.size] = d
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
