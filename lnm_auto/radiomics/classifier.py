"""Radiomics classifier: logistic regression or gradient boosting, chosen by patient-grouped inner CV.

The fitted model is stored as plain JSON (imputation medians, kept columns, scaler statistics, and
either logistic coefficients or the boosted trees' node arrays) and evaluated from those numbers by
the small forward pass below, before and after saving alike. Loading therefore never executes code
from the file, and a model written with one scikit-learn version predicts identically under another.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.feature_selection import VarianceThreshold
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_sample_weight

from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import save_json

FORMAT_NAME = "lnm_auto.radiomics_classifier"
MODEL_FILE_NAME = "radiomics_model.json"   # a radiomics fold's model, where network folds keep checkpoints
FORMAT_VERSION = 1
SIZE_RULE_COLUMN = "short_axis_mm"
MAX_INNER_FOLDS = 5
# Listed simplest first: GridSearchCV keeps the first of tied candidates, so a tie goes to the logistic model.
CANDIDATES = ("logistic_regression", "gradient_boosting")
# The logistic model's L2 strengths tried by the inner CV, strongest penalty (simplest) first, so it wins ties.
# Models saved before the grid existed hold no C: they were fitted with LEGACY_C.
LOGISTIC_C_GRID = (0.01, 0.1, 1.0)
LEGACY_C = 0.1


def size_rule_scores(features: pd.DataFrame) -> np.ndarray:
    """The clinician's size rule as a score: each node's in-plane short axis in mm."""
    if SIZE_RULE_COLUMN not in features.columns:
        raise LNMError(f"the feature table has no '{SIZE_RULE_COLUMN}' column; compute it with node_features")
    return features[SIZE_RULE_COLUMN].to_numpy(dtype=float)


def _candidate_models(seed: int) -> dict:
    """The two model families; imbalance is handled by balanced sample weights passed to fit."""
    return {
        # strong L2 penalty: radiomics features are many and correlated, labelled nodes few
        "logistic_regression": LogisticRegression(C=LEGACY_C, l1_ratio=0.0, solver="lbfgs", max_iter=5000),
        # init='zero' keeps the model fully described by its trees; with balanced weights the prior is 0.5 anyway
        "gradient_boosting": GradientBoostingClassifier(n_estimators=150, learning_rate=0.05, max_depth=2,
                                                        subsample=0.8, min_samples_leaf=5, init="zero",
                                                        random_state=seed),
    }


class RadiomicsClassifier:
    """Node-level metastasis classifier on radiomics features (see documentation/radiomics.md)."""

    def __init__(self, seed: int = 12345):
        self.seed = int(seed)
        self.params: dict | None = None   # everything predict_proba needs, exactly what save() writes

    def fit(self, features: pd.DataFrame, labels: np.ndarray, groups: np.ndarray) -> "RadiomicsClassifier":
        """Pick the model family by inner CV grouped by patient (``groups``), refit it on all rows."""
        labels = np.asarray(labels).astype(int)
        groups = np.asarray(groups)
        if len(labels) != len(features) or len(groups) != len(features):
            raise LNMError(f"radiomics fit: {len(features)} feature rows, {len(labels)} labels, {len(groups)} groups")
        if not set(np.unique(labels)) <= {0, 1}:
            raise LNMError(f"radiomics fit: labels must be 0/1, found {sorted(set(np.unique(labels)))}")
        groups_per_class = [len(np.unique(groups[labels == c])) for c in (0, 1)]
        if min(groups_per_class) < 1:
            raise LNMError("radiomics fit needs labelled nodes of both classes "
                           f"(benign from {groups_per_class[0]} patients, metastatic from {groups_per_class[1]})")
        # a class seen in one patient only leaves nothing to cross-validate a choice on: the simplest model
        n_splits = max(2, min(MAX_INNER_FOLDS, *groups_per_class))
        columns = [str(c) for c in features.columns]
        x = _as_matrix(features, columns)
        pipeline = Pipeline([
            ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
            ("drop_constant", VarianceThreshold(0.0)),
            ("scale", StandardScaler()),
            ("model", _candidate_models(self.seed)["logistic_regression"]),
        ])
        candidates = _candidate_models(self.seed)
        weights = compute_sample_weight("balanced", labels)
        if min(groups_per_class) < 2:
            pipeline.fit(x, labels, model__sample_weight=weights)
            self.params = _export(pipeline, columns, CANDIDATES[0],
                                  {"auroc": {CANDIDATES[0]: float("nan")}, "n_splits": 0, "seed": self.seed,
                                   "n_nodes": int(len(labels)), "n_groups": int(len(np.unique(groups))),
                                   "note": "a class from one patient only: no inner CV, the simplest model"})
            self._sklearn_pipeline = pipeline
            return self
        grid = [{"model": [candidates["logistic_regression"]], "model__C": list(LOGISTIC_C_GRID)},
                {"model": [candidates["gradient_boosting"]]}]
        search = GridSearchCV(pipeline, grid, scoring="roc_auc",
                              cv=StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=self.seed),
                              refit=True, error_score=np.nan, n_jobs=None)
        search.fit(x, labels, groups=groups, model__sample_weight=weights)
        scores = np.asarray(search.cv_results_["mean_test_score"], dtype=float)
        tried = [(_candidate_name(p["model"]), p.get("model__C")) for p in search.cv_results_["params"]]
        # a NaN score (a fold without both classes) never wins; all NaN -> the simplest model
        best = int(np.nanargmax(scores)) if np.isfinite(scores).any() else 0
        if best != search.best_index_:
            search.best_estimator_.set_params(**search.cv_results_["params"][best])
            search.best_estimator_.fit(x, labels, model__sample_weight=weights)
        per_candidate = {name: _best_score([s for (n, _), s in zip(tried, scores) if n == name]) for name in CANDIDATES}
        self.params = _export(search.best_estimator_, columns, tried[best][0],
                              {"auroc": per_candidate, "n_splits": n_splits, "seed": self.seed,
                               "n_nodes": int(len(labels)), "n_groups": int(len(np.unique(groups))),
                               "grid": [{"model": n, "C": c, "auroc": float(v)} for (n, c), v in zip(tried, scores)]})
        self._sklearn_pipeline = search.best_estimator_   # kept in memory only, for checking the export
        return self

    @property
    def chosen_model(self) -> str:
        """'logistic_regression' or 'gradient_boosting'."""
        return self._fitted()["chosen_model"]

    @property
    def logistic_c(self) -> float | None:
        """The chosen logistic model's C (None for boosting)."""
        p = self._fitted()
        if p["chosen_model"] != "logistic_regression":
            return None
        return float(p["logistic_regression"].get("C", LEGACY_C))

    @property
    def chosen(self) -> str:
        """The chosen model in words, e.g. 'logistic_regression (C=0.1)'."""
        c = self.logistic_c
        return self.chosen_model + ("" if c is None else f" (C={c:g})")

    @property
    def inner_cv_auroc(self) -> dict[str, float]:
        """Mean inner-CV AUROC of every candidate (NaN where a fold lacked a class)."""
        return {k: (np.nan if v is None else float(v)) for k, v in self._fitted()["inner_cv"]["auroc"].items()}

    def predict_proba(self, features: pd.DataFrame) -> np.ndarray:
        """Probability of metastasis per row, shape (n,)."""
        p = self._fitted()
        x = _as_matrix(features, p["feature_columns"])
        x = np.where(np.isnan(x), np.asarray(p["impute_medians"]), x)
        x = x[:, np.asarray(p["kept_columns"], dtype=bool)]
        x = (x - np.asarray(p["scaler_mean"])) / np.asarray(p["scaler_scale"])
        if p["chosen_model"] == "logistic_regression":
            logit = x @ np.asarray(p["logistic_regression"]["coef"]) + p["logistic_regression"]["intercept"]
        else:
            logit = _boosted_trees_logit(x, p["gradient_boosting"])
        return 1.0 / (1.0 + np.exp(-logit))

    def save(self, path: str | Path) -> None:
        """Write the model as JSON (atomic)."""
        save_json(self._fitted(), path)

    @classmethod
    def load(cls, path: str | Path) -> "RadiomicsClassifier":
        """Read a model written by save(); anything not matching the schema is refused with LNMError."""
        try:
            params = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise LNMError(f"{path}: not a readable radiomics model JSON ({error}); re-export the model") from None
        problem = _schema_problem(params)
        if problem:
            raise LNMError(f"{path}: not a valid radiomics model: {problem}; re-export the model")
        model = cls(seed=params["inner_cv"]["seed"])
        model.params = params
        return model

    def _fitted(self) -> dict:
        if self.params is None:
            raise RuntimeError("RadiomicsClassifier used before fit() or load()")
        return self.params


def _best_score(scores: list[float]) -> float:
    """The best finite inner-CV AUROC of a candidate's grid entries (NaN when none is finite)."""
    finite = [float(v) for v in scores if np.isfinite(v)]
    return max(finite) if finite else float("nan")


def _candidate_name(model) -> str:
    """The CANDIDATES name of a model object of the grid."""
    return "logistic_regression" if isinstance(model, LogisticRegression) else "gradient_boosting"


def _as_matrix(features: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Feature columns in the model's order as float64; +-inf counts as missing."""
    missing = [c for c in columns if c not in features.columns]
    if missing:
        raise LNMError(f"the feature table lacks {len(missing)} column(s) the model was trained on, e.g. "
                       f"{missing[:3]}: compute features with the same lnm_auto version and settings")
    x = features[columns].to_numpy(dtype=np.float64, copy=True)
    x[~np.isfinite(x)] = np.nan
    return x


def _export(pipeline: Pipeline, columns: list[str], chosen: str, inner_cv: dict) -> dict:
    """The fitted pipeline as plain numbers (the stored format)."""
    model = pipeline.named_steps["model"]
    params = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "chosen_model": chosen, "inner_cv": inner_cv,
        "feature_columns": columns,
        # an all-missing training column is imputed with 0 by scikit-learn (keep_empty_features)
        "impute_medians": np.nan_to_num(pipeline.named_steps["impute"].statistics_, nan=0.0).tolist(),
        "kept_columns": pipeline.named_steps["drop_constant"].get_support().tolist(),
        "scaler_mean": pipeline.named_steps["scale"].mean_.tolist(),
        "scaler_scale": pipeline.named_steps["scale"].scale_.tolist(),
        "logistic_regression": None, "gradient_boosting": None,
    }
    if chosen == "logistic_regression":
        params[chosen] = {"coef": model.coef_[0].tolist(), "intercept": float(model.intercept_[0]), "C": float(model.C)}
    else:
        trees = []
        for (tree,) in model.estimators_:
            t = tree.tree_
            trees.append({"left": t.children_left.tolist(), "right": t.children_right.tolist(),
                          "feature": t.feature.tolist(), "threshold": t.threshold.tolist(),
                          "value": t.value[:, 0, 0].tolist()})
        params[chosen] = {"learning_rate": float(model.learning_rate), "trees": trees}
    return params


def _boosted_trees_logit(x: np.ndarray, boosted: dict) -> np.ndarray:
    """Sum of learning_rate x leaf value over the trees, as scikit-learn evaluates them (float32 inputs)."""
    x32 = x.astype(np.float32).astype(np.float64)   # sklearn trees compare float32 features to float64 thresholds
    logit = np.zeros(len(x))
    rows = np.arange(len(x))
    for tree in boosted["trees"]:
        left, right = np.asarray(tree["left"]), np.asarray(tree["right"])
        feature, threshold = np.asarray(tree["feature"]), np.asarray(tree["threshold"])
        node = np.zeros(len(x), dtype=np.int64)
        while True:
            inner = left[node] != -1
            if not inner.any():
                break
            go_left = x32[rows, np.maximum(feature[node], 0)] <= threshold[node]
            node = np.where(inner, np.where(go_left, left[node], right[node]), node)
        logit += boosted["learning_rate"] * np.asarray(tree["value"])[node]
    return logit


def _schema_problem(p) -> str | None:
    """First reason the parsed JSON is not a model this version can evaluate, or None."""
    if not isinstance(p, dict) or p.get("format") != FORMAT_NAME:
        return f"'format' is not '{FORMAT_NAME}'"
    if p.get("version") != FORMAT_VERSION:
        return f"format version {p.get('version')!r}, this lnm_auto reads {FORMAT_VERSION}"
    expected = {"format", "version", "chosen_model", "inner_cv", "feature_columns", "impute_medians", "kept_columns",
                "scaler_mean", "scaler_scale", "logistic_regression", "gradient_boosting"}
    if set(p) != expected:
        return f"unexpected or missing keys {sorted(set(p) ^ expected)}"
    if p["chosen_model"] not in CANDIDATES or not isinstance(p.get(p["chosen_model"]), dict):
        return f"chosen_model {p['chosen_model']!r} has no parameters"
    inner = p["inner_cv"]
    if not isinstance(inner, dict) or not isinstance(inner.get("seed"), int) or not isinstance(inner.get("auroc"), dict):
        return "inner_cv must hold 'seed' (int) and 'auroc' (per candidate)"
    columns = p["feature_columns"]
    if not (isinstance(columns, list) and columns and all(isinstance(c, str) for c in columns)):
        return "feature_columns must be a non-empty list of names"
    doubled = next((c for i, c in enumerate(columns) if c in columns[:i]), None)
    if doubled is not None:   # pandas would hand back two columns for the one name: a silently wrong matrix
        return f"feature_columns names '{doubled}' twice"
    n = len(columns)
    kept = p["kept_columns"]
    if not (isinstance(kept, list) and len(kept) == n and all(isinstance(k, bool) for k in kept)):
        return f"kept_columns must be {n} booleans"
    n_kept = sum(kept)
    for key, length in (("impute_medians", n), ("scaler_mean", n_kept), ("scaler_scale", n_kept)):
        if not _numbers(p[key], length):
            return f"{key} must be {length} finite numbers"
    if not all(s > 0 for s in p["scaler_scale"]):
        return "scaler_scale must be positive"
    model = p[p["chosen_model"]]
    if p["chosen_model"] == "logistic_regression":
        if not (_numbers(model.get("coef"), n_kept) and _numbers([model.get("intercept")], 1)):
            return f"logistic_regression needs {n_kept} coefficients and an intercept"
        if "C" in model and not (_numbers([model["C"]], 1) and model["C"] > 0):   # absent: saved before the grid
            return "logistic_regression's C must be a positive number"
        return None
    if not (_numbers([model.get("learning_rate")], 1) and isinstance(model.get("trees"), list) and model["trees"]):
        return "gradient_boosting needs a learning_rate and a non-empty list of trees"
    for i, tree in enumerate(model["trees"]):
        problem = _tree_problem(tree, n_kept)
        if problem:
            return f"tree {i}: {problem}"
    return None


def _tree_problem(tree, n_features: int) -> str | None:
    if not isinstance(tree, dict) or set(tree) != {"left", "right", "feature", "threshold", "value"}:
        return "needs exactly left, right, feature, threshold, value"
    size = len(tree["left"]) if isinstance(tree["left"], list) else 0
    if size == 0 or not all(_numbers(tree[k], size) for k in tree):
        return "arrays must be equally long lists of finite numbers"
    left, right, feature = (np.asarray(tree[k]) for k in ("left", "right", "feature"))
    if not all(float(v).is_integer() for v in np.concatenate([left, right, feature])):
        return "child and feature indices must be integers"
    inner = left != -1
    # children point strictly forward (scikit-learn's depth-first order), so traversal always ends at a leaf
    if not (np.all((right != -1) == inner) and np.all(left[inner] > np.flatnonzero(inner))
            and np.all(right[inner] > np.flatnonzero(inner)) and np.all(left[inner] < size)
            and np.all(right[inner] < size) and np.all((feature[inner] >= 0) & (feature[inner] < n_features))):
        return "child or feature index out of range"
    return None


def _numbers(values, length: int) -> bool:
    return (isinstance(values, list) and len(values) == length
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values))
