"""``evaluate``: node-, station- and patient-level metrics with patient-bootstrap CIs, plots, DeLong.

Writes out_dir/metrics.json, out_dir/roc.png and out_dir/calibration.png (each atomically; metrics.json
last, so its presence means the run finished). How to read them: documentation/evaluation.md.

metrics.json has one layout (``metrics_document``) for lnm_evaluate's report and for training's
``validation/metrics.json``: {"schema", "kind", "source", "settings", "levels": {level: ``level_metrics``},
["comparison",] "warnings"}; documented in documentation/outputs.md.

The parts live beside this module: inputs.py reads and checks the CSVs, levels.py builds the three levels (each
optional: a level the reference lacks is reported as "not in the data"), metrics.py / statistics.py
compute the numbers, rollup.py lifts nodes to stations and patients, plots.py draws the figures and
table.py renders the metrics as text (``format_table``, importable from here as well).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lnm_auto.evaluation import metrics as M
from lnm_auto.evaluation import statistics as S
from lnm_auto.evaluation.inputs import (extra_predictions_warning, join_predictions, read_predictions,
                                        read_reference_nodes)
from lnm_auto.evaluation.levels import ABSENT, build_units, label_sources, unlabelled_reason
from lnm_auto.evaluation.plots import COMPARED, plot_calibration, plot_roc
from lnm_auto.evaluation.rollup import DEFAULT_METHOD, METHODS
from lnm_auto.evaluation.table import LEVELS, TABLE_ROWS, format_table
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.labels import UNKNOWN
from lnm_auto.utils.io import json_safe, load_json, save_json

__all__ = ["LEVELS", "METRICS_SCHEMA", "TABLE_ROWS", "evaluate", "format_table", "level_metrics", "metric_settings",
           "metrics_document", "read_predictions", "read_reference_nodes", "validation_metrics"]

METRICS_SCHEMA = 1        # version of the metrics.json layout; raised when a key changes meaning


def level_metrics(y: np.ndarray, p: np.ndarray, groups: np.ndarray, n_unknown: int = 0,
                  n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """One level of metrics.json: counts, {"value", "ci95"} per metric (CI from a bootstrap over ``groups``
    = patients; [null, null] without one), thresholds, calibration, warnings; "skipped" with one class."""
    m = M.binary_metrics(y, p)
    res: dict[str, Any] = {"n": m["n"], "n_pos": m["n_pos"], "n_neg": m["n_neg"],
                           "n_unknown_excluded": int(n_unknown),
                           "n_patients": int(len(np.unique(groups.astype(str))))}
    if m["n_pos"] == 0 or m["n_neg"] == 0:
        res["skipped"] = (f"needs at least one positive and one negative reference label "
                          f"(n_pos={m['n_pos']}, n_neg={m['n_neg']})")
        res["warnings"] = m["warnings"]
        return res
    warnings = list(m["warnings"])
    if n_bootstrap > 0:
        ci = S.bootstrap_ci(y, p, groups, n_bootstrap=n_bootstrap, seed=seed)
        warnings += ci["warnings"]
        cis = ci["ci"]
        res["bootstrap"] = {"n_resamples": ci["n_bootstrap"], "n_valid": ci["n_valid"], "unit": "patient",
                            "n_patients": ci["n_groups"]}
    else:
        cis = {name: (math.nan, math.nan) for name in M.METRIC_NAMES}
    for name in M.METRIC_NAMES:
        res[name] = {"value": m[name], "ci95": list(cis[name])}
    res["threshold_at_r75"] = m["threshold_at_r75"]
    res["threshold_at_s75"] = m["threshold_at_s75"]
    res["calibration"] = M.calibration_bins(y, p)
    res["warnings"] = warnings
    return res


def metric_settings(n_bootstrap: int, seed: int, rollup_method: str = DEFAULT_METHOD) -> dict[str, Any]:
    """How the numbers were computed (the "settings" of metrics.json)."""
    return {"rollup": rollup_method, "n_bootstrap": int(n_bootstrap), "seed": int(seed),
            "confidence": M.CONFIDENCE, "ci_method": "percentile bootstrap resampling patients",
            "recall_target": M.RECALL_TARGET, "specificity_target": M.SPECIFICITY_TARGET,
            "fixed_threshold": M.FIXED_THRESHOLD, "calibration_bins": M.N_CALIBRATION_BINS}


def metrics_document(kind: str, source: dict[str, Any], settings: dict[str, Any], levels: dict[str, dict],
                     warnings: list[str], comparison: dict[str, Any] | None = None,
                     sections: dict[str, Any] | None = None) -> dict[str, Any]:
    """The one metrics.json layout of evaluation and validation (JSON-safe: NaN / inf become null);
    ``sections``: further top-level entries (e.g. "detection")."""
    document: dict[str, Any] = {"schema": METRICS_SCHEMA, "kind": kind, "source": source, "settings": settings,
                                "levels": levels}
    if comparison is not None:
        document["comparison"] = comparison
    document.update(sections or {})
    document["warnings"] = list(warnings)
    return json_safe(document)


def validation_metrics(units: pd.DataFrame, level: str, source: dict[str, Any], n_bootstrap: int = 1000,
                       seed: int = 0) -> dict[str, Any]:
    """metrics.json of a fold's validation: its one level (units with label, probability and case or
    patient), patient-bootstrap CIs like lnm_evaluate's."""
    groups = units["patient"] if "patient" in units.columns else units["case"]
    result = level_metrics(units["label"].to_numpy().astype(int), units["probability"].to_numpy(dtype=float),
                           groups.to_numpy(), 0, n_bootstrap, seed)
    result["labels"] = {"node": "nodes.csv", "station": "stations.csv", "patient": "patients.csv"}[level]
    return metrics_document("validation", source, metric_settings(n_bootstrap, seed), {level: result}, [])


def refuse_foreign_metrics(out_dir: Path) -> None:
    """A metrics.json in -o that is not an lnm_evaluate report (a fold's validation/metrics.json, a file of the
    user's) is not replaced: one line, before anything is written."""
    path = out_dir / "metrics.json"
    if not (path.exists() or path.is_symlink()):
        return
    try:
        document = load_json(path) if path.is_file() and not path.is_symlink() else None
    except (ValueError, UnicodeDecodeError, OSError):
        document = None
    if not (isinstance(document, dict) and document.get("kind") == "evaluation"):
        raise LNMError(f"-o {out_dir}: holds metrics.json, which lnm_evaluate did not write; refusing to replace "
                       "it: choose another -o")


# ------------------------------------------------------------------------------------------------
# public entry point
# ------------------------------------------------------------------------------------------------
def evaluate(ref_nodes_csv, pred_nodes_csv, out_dir, ref_stations_csv=None, ref_patients_csv=None,
             compare_pred_csv=None, n_bootstrap: int = 1000, seed: int = 0,
             rollup_method: str = DEFAULT_METHOD, compare_name: str = COMPARED,
             sections: dict[str, Any] | None = None) -> dict:
    """Evaluate node predictions against reference labels at node, station and patient level; ``compare_name``
    is what roc.png's legend calls the ``compare_pred_csv`` predictions (e.g. "size rule (short axis)");
    ``sections``: further top-level entries of metrics.json (lnm_evaluate's "detection").

    Writes out_dir/roc.png, out_dir/calibration.png and out_dir/metrics.json (in that order, each
    atomically) and returns the metrics dict (as written: NaN / inf appear as None).
    """
    if rollup_method not in METHODS:
        raise LNMError(f"unknown roll-up method '{rollup_method}'; choose one of {', '.join(METHODS)}")
    if int(n_bootstrap) < 0:
        raise LNMError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LNMError(f"-o {out_dir}: is a file, not a folder")
    refuse_foreign_metrics(out_dir)
    ref_path, pred_path = Path(ref_nodes_csv), Path(pred_nodes_csv)
    ref = read_reference_nodes(ref_path)
    warnings: list[str] = []
    comp_path = Path(compare_pred_csv) if compare_pred_csv is not None else None
    for column, path in (("probability", pred_path), ("probability_b", comp_path)):
        if path is not None:
            pred = read_predictions(path)
            if pred.empty:
                raise LNMError(f"{path}: the predictions file has no rows; predict the cases of {ref_path.name} "
                               "first (lnm_predict)")
            ref[column] = join_predictions(ref, pred, path, ref_path)
            extra = extra_predictions_warning(ref, pred, path, ref_path)
            warnings += [extra] if extra else []
    units = build_units(ref, ref_path, ref_stations_csv, ref_patients_csv, rollup_method, warnings)
    sources = label_sources(ref_path, ref_stations_csv, ref_patients_csv)

    source = {"reference_nodes": str(ref_path), "predictions": str(pred_path),
              "reference_stations": str(ref_stations_csv) if ref_stations_csv is not None else None,
              "reference_patients": str(ref_patients_csv) if ref_patients_csv is not None else None,
              "compare_predictions": str(comp_path) if comp_path is not None else None}
    levels: dict[str, Any] = {}
    plot_data: dict[str, dict] = {}
    comparison: dict[str, Any] = {}
    for level in LEVELS:
        u = units[level]
        known = None if isinstance(u, str) else u["label"].to_numpy() != UNKNOWN
        if known is None or not known.any():
            reason = u if known is None else unlabelled_reason(level, ref_path, ref_stations_csv, ref_patients_csv)
            levels[level] = {"n": 0, "n_pos": 0, "n_neg": 0, "skipped": reason, "absent": True, "warnings": []}
            continue
        y = u["label"].to_numpy()[known].astype(int)
        p = u["probability"].to_numpy(dtype=float)[known]
        g = u["group"].to_numpy()[known]
        res = level_metrics(y, p, g, int((~known).sum()), int(n_bootstrap), int(seed))
        res["labels"] = sources[level]
        levels[level] = res
        if "skipped" in res:
            continue
        plot_data[level] = {"y": y, "p": p, "res": res}
        if comp_path is not None:
            pb = u["probability_b"].to_numpy(dtype=float)[known]
            dl = S.delong_test(y, p, pb)
            boot = S.paired_bootstrap_auroc_difference(y, p, pb, g, int(n_bootstrap), int(seed)) \
                if n_bootstrap > 0 else {"ci95": (math.nan, math.nan)}
            res_b = level_metrics(y, pb, g, int((~known).sum()), int(n_bootstrap), int(seed))
            res_b.pop("calibration", None)
            comparison[level] = {
                "auroc_a": dl["auc_a"], "auroc_b": dl["auc_b"], "auroc_diff": dl["auc_diff"],
                "delong": {k: dl[k] for k in ("z", "p_value", "var_a", "var_b", "cov_ab", "var_diff",
                                              "ci95_diff")},
                "bootstrap_diff_ci95": list(boot["ci95"]),
                "n": dl["n"], "n_pos": dl["n_pos"], "n_neg": dl["n_neg"],
                "metrics_b": res_b, "warnings": dl["warnings"],
            }
            plot_data[level]["pb"] = pb
    if all(lv.get("absent") for lv in levels.values()):
        raise LNMError(f"{ref_path}: nothing to evaluate: " + "; ".join(
            f"{name}: {lv['skipped'].removeprefix(ABSENT)}" for name, lv in levels.items()))
    result = metrics_document("evaluation", source, metric_settings(n_bootstrap, seed, rollup_method), levels,
                              warnings, comparison if comp_path is not None else None, sections)
    plot_roc(plot_data, out_dir / "roc.png", comp_path is not None, compare_name)
    plot_calibration(plot_data, out_dir / "calibration.png")
    save_json(result, out_dir / "metrics.json")
    return result
