"""The one weighted engine behind every metric, and the checks its inputs pass first.

``SortedScores`` sorts the scores once; ``metrics(W)`` then evaluates every metric in METRIC_NAMES for
any number of node-weight vectors at once. A resample that draws patient g ``c_g`` times is the
original data with node weights ``c_g``, so the point estimate (all weights 1, metrics.py) and 1000
bootstrap resamples (statistics.py) run through the same vectorised code.
"""
from __future__ import annotations

import numpy as np

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


def as_label_score_arrays(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    """Labels (0/1, as float64) and finite scores as equal-length 1-D arrays; ValueError otherwise."""
    y = np.asarray(y_true)
    p = np.asarray(scores, dtype=float)
    if y.ndim != 1 or p.shape != y.shape:
        raise ValueError(f"labels and scores must be 1-D of equal length, got {y.shape} and {p.shape}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1 (drop unknown labels first)")
    if not np.isfinite(p).all():
        raise ValueError("scores must be finite (no NaN / inf)")
    return y.astype(np.float64), p


def class_warning(n_pos: int, n_neg: int) -> str | None:
    """The warning for a sample with one class only, or None."""
    if n_pos == 0 or n_neg == 0:
        return (f"only one class present (n_pos={n_pos}, n_neg={n_neg}): AUROC and the operating "
                f"points are undefined (NaN)")
    return None


def calibration_bin_index(scores: np.ndarray, n_bins: int = N_CALIBRATION_BINS) -> np.ndarray:
    """Equal-width bins on [0, 1]: bin k holds k/n_bins <= p < (k+1)/n_bins; p = 1 is in the last."""
    return np.clip(np.floor(np.asarray(scores, dtype=float) * n_bins).astype(int), 0, n_bins - 1)


class SortedScores:
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
        """Every metric for each row of node weights W (B, n), in sorted order: {name: (B,) array}."""
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
