"""Probabilities a clinician can read: Platt scaling fitted on out-of-fold predictions.

Training never sees the prevalence (positives are oversampled to a third of each batch; PGLS pseudo
labels are mostly positive), so a network's raw output says little about how often a node with that
output is metastatic. The fix is the classical one: a logistic map ``sigmoid(a * logit(p) + b)`` fitted
on the cross-validation predictions, where every node was predicted by a model that did not train on it.

* ``cross_fitted``: the calibrated out-of-fold probability of every unit, each fold's from a map fitted on
  the *other* folds only, so the ECE reported for a calibrated model is measured on nodes its calibration
  never saw.
* ``fit_platt`` on all out-of-fold units gives the map stored with the model (two plain numbers in JSON;
  nothing is pickled) and applied by ``lnm_predict``.

Platt (two parameters) rather than isotonic regression: with a few dozen labelled nodes an isotonic map
is a staircase fitted to noise. The logistic regression is scikit-learn's, lightly regularised (C = 10)
so a fold with separable scores gives a steep map instead of an infinite one. The slope is fitted within
folds (``fit_platt(..., folds)``) and kept above zero: the map is strictly increasing, so it never changes a
ranking or an AUROC.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from lnm_auto.evaluation.metric_engine import as_label_score_arrays

_EPS = 1e-6
CALIBRATION_FILE = "crossval_results/calibration.json"   # a model's map, in its folder: lnm_predict applies it
MIN_UNITS_PER_CLASS = 3        # fewer labelled nodes of a class: no map (identity), said in the output
REGULARISATION_C = 10.0
MIN_SLOPE = 0.01               # the map stays strictly increasing: a ranking (an AUROC) is never changed


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


def identity() -> dict:
    """The map that changes nothing (too few labelled units to fit one)."""
    return {"method": "identity", "a": 1.0, "b": 0.0, "n": 0, "n_positive": 0}


def fit_platt(y_true: Sequence, scores: Sequence, folds: Sequence | None = None) -> dict:
    """{"method": "platt", "a", "b", "n", "n_positive"} fitted on labelled units (0/1); the identity map
    when a class has fewer than MIN_UNITS_PER_CLASS units.

    ``folds`` (each unit's cross-validation fold): the slope ``a`` is fitted *within* folds (one intercept per
    fold, a common slope), so differently calibrated fold models cannot tilt it - pooled, five folds whose
    offsets differ can give a flat or negative slope although every fold ranks well. ``b`` is then fitted on all
    units with ``a`` fixed (the prevalence of the pooled predictions). ``a`` is at least MIN_SLOPE: the map is
    strictly increasing, so it never changes a ranking (scores without signal get probabilities near the
    prevalence, still in their order)."""
    from sklearn.linear_model import LogisticRegression
    y, p = as_label_score_arrays(y_true, scores)
    n_pos = int(y.sum())
    if min(n_pos, y.size - n_pos) < MIN_UNITS_PER_CLASS:
        return {**identity(), "n": int(y.size), "n_positive": n_pos}
    logits = _logit(p)
    if folds is None or len(np.unique(np.asarray(folds))) < 2:
        model = LogisticRegression(C=REGULARISATION_C).fit(logits[:, None], y.astype(int))
        a = float(model.coef_[0, 0])
    else:   # common slope, one intercept per fold (one-hot, no global intercept)
        fold_ids = np.unique(np.asarray(folds), return_inverse=True)[1]
        design = np.column_stack([logits, np.eye(fold_ids.max() + 1)[fold_ids]])
        model = LogisticRegression(C=REGULARISATION_C, fit_intercept=False).fit(design, y.astype(int))
        a = float(model.coef_[0, 0])
    a = max(a, MIN_SLOPE)
    return {"method": "platt", "a": a, "b": _intercept_for_slope(y, logits, a), "n": int(y.size), "n_positive": n_pos}


def _intercept_for_slope(y: np.ndarray, logits: np.ndarray, a: float) -> float:
    """The maximum-likelihood intercept of ``sigmoid(a * logit + b)`` for a fixed slope: the b at which the mean
    calibrated probability equals the prevalence (the score equation, increasing in b)."""
    from scipy.optimize import brentq

    def excess(b: float) -> float:
        return float(np.mean(1.0 / (1.0 + np.exp(-np.clip(a * logits + b, -60.0, 60.0)))) - y.mean())
    return float(brentq(excess, -60.0 - a * logits.max(), 60.0 - a * logits.min()))


def is_identity(calibration: dict | None) -> bool:
    """No map, or the map that changes nothing."""
    return not calibration or calibration.get("method", "identity") == "identity"


def apply_calibration(calibration: dict | None, scores: Sequence) -> np.ndarray:
    """Calibrated probabilities; ``None`` or the identity map returns the scores unchanged."""
    p = np.asarray(scores, dtype=float)
    if is_identity(calibration):
        return p
    a, b = float(calibration["a"]), float(calibration["b"])
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"calibration map has non-finite parameters a={a}, b={b}")
    z = a * _logit(p) + b
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))


def cross_fitted(y_true: Sequence, scores: Sequence, folds: Sequence) -> np.ndarray:
    """Each unit's probability calibrated by a map fitted (within folds) on the other folds' units."""
    y, p = as_label_score_arrays(y_true, scores)
    folds = np.asarray(folds)
    out = np.empty_like(p)
    for k in np.unique(folds):
        inside = folds == k
        out[inside] = apply_calibration(fit_platt(y[~inside], p[~inside], folds[~inside]), p[inside])
    return out


def checked_calibration(data, origin: str) -> dict:
    """A stored map (JSON from ``fit_platt`` / ``identity``) checked before use: one line naming ``origin`` when it
    is not one (a hand-edited or damaged file must never turn probabilities into NaN)."""
    from lnm_auto.utils.errors import LNMError
    if not isinstance(data, dict) or data.get("method") not in ("platt", "identity"):
        raise LNMError(f"{origin}: not a calibration map (method 'platt' or 'identity'); re-run "
                       "lnm_find_best_configuration")
    try:
        a, b = float(data.get("a", 1.0)), float(data.get("b", 0.0))
    except (TypeError, ValueError):
        raise LNMError(f"{origin}: calibration parameters a, b must be numbers; re-run lnm_find_best_configuration") \
            from None
    if not (math.isfinite(a) and math.isfinite(b) and a >= 0):
        raise LNMError(f"{origin}: calibration parameters a={a}, b={b} must be finite with a >= 0; re-run "
                       "lnm_find_best_configuration")
    return {**data, "a": a, "b": b}
