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
so a fold with separable scores gives a steep map instead of an infinite one. Platt is monotone
increasing (``a`` is kept >= 0), so it never changes a ranking or an AUROC.
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


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


def identity() -> dict:
    """The map that changes nothing (too few labelled units to fit one)."""
    return {"method": "identity", "a": 1.0, "b": 0.0, "n": 0, "n_positive": 0}


def fit_platt(y_true: Sequence, scores: Sequence) -> dict:
    """{"method": "platt", "a", "b", "n", "n_positive"} fitted on labelled units (0/1); the identity map
    when a class has fewer than MIN_UNITS_PER_CLASS units."""
    from sklearn.linear_model import LogisticRegression
    y, p = as_label_score_arrays(y_true, scores)
    n_pos = int(y.sum())
    if min(n_pos, y.size - n_pos) < MIN_UNITS_PER_CLASS:
        return {**identity(), "n": int(y.size), "n_positive": n_pos}
    model = LogisticRegression(C=REGULARISATION_C).fit(_logit(p)[:, None], y.astype(int))
    a, b = float(model.coef_[0, 0]), float(model.intercept_[0])
    if a < 0:      # scores that rank backwards: keep the ranking, fit the prevalence only
        a, b = 0.0, float(_logit(np.array([y.mean()]))[0])
    return {"method": "platt", "a": a, "b": b, "n": int(y.size), "n_positive": n_pos}


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
    """Each unit's probability calibrated by a map fitted on the other folds' units."""
    y, p = as_label_score_arrays(y_true, scores)
    folds = np.asarray(folds)
    out = np.empty_like(p)
    for k in np.unique(folds):
        inside = folds == k
        out[inside] = apply_calibration(fit_platt(y[~inside], p[~inside]), p[inside])
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
