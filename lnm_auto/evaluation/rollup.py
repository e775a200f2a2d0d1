"""Node -> station -> patient roll-up: the one rule shared by evaluation and inference.

Rule (documentation/evaluation.md, "Roll-up"):

* probability of a station / patient = the **maximum** of its nodes' probabilities (``method="max"``,
  the default: the standard multiple-instance assumption "a bag is positive iff any instance is");
  ``method="noisy_or"`` gives 1 - prod(1 - p_i) instead (it assumes independent node errors and
  over-calls bags with many nodes; kept for comparison only).
* every column named ``probability`` or ``probability_<anything>`` (e.g. per-fold probabilities) is
  rolled up with the same rule.
* reference label of a bag, when derived from node labels: 1 if any node is 1; 0 if all nodes are
  known 0; unknown (-1) otherwise.
* levels: "station" groups by (case, station); "patient" groups by ``patient`` when that column is
  present, else by ``case``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.labels import UNKNOWN

METHODS = ("max", "noisy_or")
DEFAULT_METHOD = "max"
LEVELS = ("station", "patient")


def probability_columns(df: pd.DataFrame) -> list[str]:
    """The columns rolled up: ``probability`` and every ``probability_<anything>``."""
    return [c for c in df.columns if c == "probability" or str(c).startswith("probability_")]


def group_keys(df: pd.DataFrame, level: str) -> list[str]:
    """The columns that identify one bag at ``level``."""
    if level == "station":
        return ["case", "station"]
    if level == "patient":
        return ["patient"] if "patient" in df.columns else ["case"]
    raise ValueError(f"level must be one of {LEVELS}, got {level!r}")


def combine(probabilities, method: str = DEFAULT_METHOD) -> float:
    """Roll up the probabilities of one bag; an empty bag gives 0 (no node, no evidence)."""
    p = np.asarray(probabilities, dtype=float)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if p.size == 0:
        return 0.0
    if method == "max":
        return float(p.max())
    with np.errstate(divide="ignore"):
        return float(-np.expm1(np.log1p(-p).sum()))


def derive_label(labels) -> int:
    """1 if any label is 1; 0 if all are 0 (and there is at least one); UNKNOWN otherwise."""
    lab = _label_array(pd.Series(labels))
    if (lab == 1).any():
        return 1
    if lab.size and (lab == 0).all():
        return 0
    return UNKNOWN


def _label_array(s: pd.Series) -> np.ndarray:
    v = pd.to_numeric(s, errors="coerce").to_numpy(dtype=float)
    return np.where(np.isnan(v), UNKNOWN, v).astype(int)


def rollup(node_df: pd.DataFrame, level: str, method: str = DEFAULT_METHOD) -> pd.DataFrame:
    """Roll node probabilities (and labels, if a ``label`` column is present) up to ``level``.

    node_df: one row per node with ``case``, ``probability`` (in [0, 1]), ``station`` for the station
    level, optional ``patient``, optional ``label`` (1 / 0 / -1 or NaN = unknown) and optional
    ``probability_*`` columns. Returns one row per bag, sorted by the group keys, with the key
    columns, every probability column, ``n_nodes`` and (if labels were given) ``label``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    keys = group_keys(node_df, level)
    missing = [c for c in keys + ["probability"] if c not in node_df.columns]
    if missing:
        raise LNMError(f"roll-up to {level} level needs column(s) {', '.join(missing)} in the node table")
    pcols = probability_columns(node_df)
    probs = node_df[pcols].apply(pd.to_numeric, errors="coerce").astype(float)
    arr = probs.to_numpy()
    if not np.isfinite(arr).all():
        raise LNMError(f"roll-up to {level} level: a probability is missing or not a number")
    if ((arr < 0) | (arr > 1)).any():
        raise LNMError(f"roll-up to {level} level: probabilities must lie in [0, 1]")
    key_series = [node_df[k] for k in keys]
    if method == "max":
        agg = probs.groupby(key_series, sort=True, dropna=False).max()
    else:
        with np.errstate(divide="ignore"):
            logs = np.log1p(-probs)
        agg = -np.expm1(logs.groupby(key_series, sort=True, dropna=False).sum())
    out = agg.copy()
    out["n_nodes"] = probs.groupby(key_series, sort=True, dropna=False).size()
    if "label" in node_df.columns:
        lab = pd.Series(_label_array(node_df["label"]), index=node_df.index)
        any_pos = (lab == 1).groupby(key_series, sort=True, dropna=False).any()
        all_neg = (lab == 0).groupby(key_series, sort=True, dropna=False).all()
        out["label"] = np.where(any_pos, 1, np.where(all_neg, 0, UNKNOWN)).astype(int)
    out = out.reset_index()
    out.columns = keys + list(out.columns[len(keys):])
    cols = keys + pcols + ["n_nodes"] + (["label"] if "label" in node_df.columns else [])
    return out[cols].reset_index(drop=True)
