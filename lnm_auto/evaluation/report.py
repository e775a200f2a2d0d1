"""``evaluate``: node-, station- and patient-level metrics with patient-bootstrap CIs, plots, DeLong.

Writes out_dir/metrics.json, out_dir/roc.png and out_dir/calibration.png (each atomically; metrics.json
last, so its presence means the run finished). How to read them: documentation/evaluation.md.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lnm_auto.evaluation import metrics as M
from lnm_auto.evaluation.rollup import DEFAULT_METHOD, METHODS, derive_label, rollup
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.labels import UNKNOWN, parse_label
from lnm_auto.utils.io import atomic_path, save_json

LEVELS = ("node", "station", "patient")
_INT_RE = re.compile(r"^[+-]?\d+(\.0*)?$")
_SHOW_MISSING = 5

# display names for format_table, in order
TABLE_ROWS = (
    ("auroc", "AUROC"), ("s_at_r75", "S@R75"), ("a_at_r75", "A@R75"), ("r_at_s75", "R@S75"),
    ("a_at_s75", "A@S75"), ("sensitivity_at_0.5", "Sens@0.5"), ("specificity_at_0.5", "Spec@0.5"),
    ("accuracy_at_0.5", "Acc@0.5"), ("brier", "Brier"), ("ece", "ECE"),
)


# ------------------------------------------------------------------------------------------------
# reading and checking the CSVs
# ------------------------------------------------------------------------------------------------
def _read_csv(path: str | Path, what: str, required: tuple[str, ...]) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise LNMError(f"{path}: {what} file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise LNMError(f"{path}: cannot be read as CSV ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise LNMError(f"{path}: column(s) {', '.join(missing)} missing; the {what} file needs columns "
                       f"{','.join(required)} (found: {','.join(df.columns) or 'none'})")
    for c in ("case", "node", "station", "patient"):
        if c in df.columns:
            df[c] = df[c].astype(str).str.strip()
    if "node" in df.columns:
        df["node"] = df["node"].map(_canonical_node)
    return df


def _canonical_node(text: str) -> str:
    """'3', '3.0', ' 03' -> '3' so integer node ids join whatever way they were written."""
    t = str(text).strip()
    if _INT_RE.match(t):
        return str(int(t.split(".")[0]))
    return t


def _parse_labels(df: pd.DataFrame, path: Path) -> np.ndarray:
    out = np.empty(len(df), dtype=int)
    for i, raw in enumerate(df["label"].to_list()):
        try:
            out[i] = parse_label(raw)
        except ValueError:
            raise LNMError(f"{path}: line {i + 2}: label must be 1, 0 or empty (unknown), "
                           f"got '{str(raw).strip()}'") from None
    return out


def _check_unique(df: pd.DataFrame, keys: list[str], path: Path) -> None:
    dup = df.duplicated(keys, keep="first")
    if dup.any():
        first = df.loc[dup, keys].iloc[0].tolist()
        raise LNMError(f"{path}: {int(dup.sum())} duplicate ({', '.join(keys)}) row(s), first: "
                       f"({', '.join(map(str, first))})")


def _require_rows(df: pd.DataFrame, path: Path, what: str) -> None:
    if len(df) == 0:
        raise LNMError(f"{path}: the {what} file has no rows")


def read_reference_nodes(path: str | Path) -> pd.DataFrame:
    """case, node, station ('' when the file has no station column), label (1 / 0 / -1 unknown)."""
    path = Path(path)
    df = _read_csv(path, "reference nodes", ("case", "node", "label"))
    _require_rows(df, path, "reference nodes")
    _check_unique(df, ["case", "node"], path)
    out = pd.DataFrame({"case": df["case"], "node": df["node"],
                        "station": df["station"] if "station" in df.columns else "",
                        "label": _parse_labels(df, path)})
    out.attrs["has_station"] = "station" in df.columns
    return out


def read_predictions(path: str | Path) -> pd.DataFrame:
    """case, node, probability (float in [0, 1]) plus whatever else the file has."""
    path = Path(path)
    df = _read_csv(path, "predictions", ("case", "node", "probability"))
    _check_unique(df, ["case", "node"], path)
    prob = pd.to_numeric(df["probability"].str.strip(), errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(prob)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise LNMError(f"{path}: column 'probability' is empty, NaN or not a number in {int(bad.sum())} row(s), "
                       f"first at line {i + 2} (case {df['case'].iat[i]}, node {df['node'].iat[i]})")
    out_of_range = (prob < 0) | (prob > 1)
    if out_of_range.any():
        i = int(np.flatnonzero(out_of_range)[0])
        raise LNMError(f"{path}: probabilities must lie in [0, 1]; {int(out_of_range.sum())} row(s) do not, "
                       f"first at line {i + 2} (case {df['case'].iat[i]}, node {df['node'].iat[i]}: {prob[i]})")
    df = df.copy()
    df["probability"] = prob
    return df


def _join_predictions(ref: pd.DataFrame, pred: pd.DataFrame, pred_path: Path, ref_path: Path) -> np.ndarray:
    """Probability for every reference node, in reference order; missing node -> LNMError."""
    merged = ref[["case", "node"]].merge(pred[["case", "node", "probability"]], on=["case", "node"],
                                         how="left", validate="one_to_one")
    missing = merged["probability"].isna().to_numpy()
    if missing.any():
        pairs = merged.loc[missing, ["case", "node"]].head(_SHOW_MISSING).itertuples(index=False)
        shown = ", ".join(f"({c}, {n})" for c, n in pairs)
        more = " ..." if missing.sum() > _SHOW_MISSING else ""
        raise LNMError(f"{pred_path}: {int(missing.sum())} node(s) of the reference {ref_path.name} have no "
                       f"prediction; missing (case, node): {shown}{more}")
    return merged["probability"].to_numpy(dtype=float)


# ------------------------------------------------------------------------------------------------
# building the three levels
# ------------------------------------------------------------------------------------------------
def _build_units(ref: pd.DataFrame, ref_path: Path, stations_csv, patients_csv, method: str,
                 warnings: list[str]) -> dict[str, Any]:
    """{level: DataFrame with label, probability[, probability_b], group} or a str (why skipped)."""
    cases = set(ref["case"])
    nodes = ref.copy()
    patient_of = {c: c for c in cases}
    case_labels = None
    if patients_csv is not None:
        ppath = Path(patients_csv)
        pdf = _read_csv(ppath, "reference patients", ("case", "label"))
        _check_unique(pdf, ["case"], ppath)
        pdf["label"] = _parse_labels(pdf, ppath)
        if "patient" not in pdf.columns:
            pdf["patient"] = pdf["case"]
        pdf.loc[pdf["patient"] == "", "patient"] = pdf["case"]
        outside = ~pdf["case"].isin(cases)
        if outside.any():
            warnings.append(f"{ppath.name}: {int(outside.sum())} case(s) without nodes in {ref_path.name} were "
                            f"ignored (the reference nodes file defines the evaluated cases)")
        pdf = pdf[~outside]
        patient_of.update(dict(zip(pdf["case"], pdf["patient"])))
        case_labels = dict(zip(pdf["case"], pdf["label"]))
    nodes["patient"] = nodes["case"].map(patient_of)
    units: dict[str, Any] = {}

    # node level
    units["node"] = nodes.rename(columns={"patient": "group"})[
        ["case", "node", "label", "probability"] + (["probability_b"] if "probability_b" in nodes else []) + ["group"]]

    # station level
    pcols = ["probability"] + (["probability_b"] if "probability_b" in nodes else [])
    if not ref.attrs.get("has_station", True):
        if stations_csv is not None:
            raise LNMError(f"{ref_path}: has no 'station' column, so nodes cannot be matched to the "
                           f"reference stations in {Path(stations_csv).name}")
        units["station"] = f"{ref_path.name} has no station column"
    else:
        blank = nodes["station"] == ""
        if blank.any():
            warnings.append(f"{ref_path.name}: {int(blank.sum())} node(s) without a station were left out of "
                            f"the station level")
        st = rollup(nodes.loc[~blank, ["case", "station", "label"] + pcols], "station", method)
        if stations_csv is not None:
            spath = Path(stations_csv)
            sdf = _read_csv(spath, "reference stations", ("case", "station", "label"))
            _check_unique(sdf, ["case", "station"], spath)
            sdf["label"] = _parse_labels(sdf, spath)
            outside = ~sdf["case"].isin(cases)
            if outside.any():
                warnings.append(f"{spath.name}: {int(outside.sum())} station row(s) of cases without nodes in "
                                f"{ref_path.name} were ignored")
            sdf = sdf.loc[~outside, ["case", "station", "label"]]
            st = st.drop(columns="label").merge(sdf, on=["case", "station"], how="outer")
            empty = st["n_nodes"].isna()
            if empty.any():
                warnings.append(f"{spath.name}: {int(empty.sum())} labelled station(s) contain no node; "
                                f"their probability is 0 (empty bag)")
            st[pcols] = st[pcols].fillna(0.0)
            st["n_nodes"] = st["n_nodes"].fillna(0).astype(int)
            st["label"] = st["label"].fillna(UNKNOWN).astype(int)
        st["group"] = st["case"].map(patient_of)
        units["station"] = st

    # patient level (grouped by patient id; = case unless the patients file says otherwise)
    pt = rollup(nodes[["case", "patient", "label"] + pcols], "patient", method)
    if case_labels is not None:
        by_patient = nodes.drop_duplicates("case").groupby("patient")["case"].apply(list)
        pt["label"] = [derive_label([case_labels.get(c, UNKNOWN) for c in by_patient[p]]) for p in pt["patient"]]
    pt["group"] = pt["patient"]
    units["patient"] = pt
    return units


def _level_result(y: np.ndarray, p: np.ndarray, groups: np.ndarray, n_unknown: int,
                  n_bootstrap: int, seed: int) -> dict[str, Any]:
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
        ci = M.bootstrap_ci(y, p, groups, n_bootstrap=n_bootstrap, seed=seed)
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


def _clean(obj: Any) -> Any:
    """JSON-safe: numpy -> python, NaN / inf -> None, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_clean(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


# ------------------------------------------------------------------------------------------------
# public entry point
# ------------------------------------------------------------------------------------------------
def evaluate(ref_nodes_csv, pred_nodes_csv, out_dir, ref_stations_csv=None, ref_patients_csv=None,
             compare_pred_csv=None, n_bootstrap: int = 1000, seed: int = 0,
             rollup_method: str = DEFAULT_METHOD) -> dict:
    """Evaluate node predictions against reference labels at node, station and patient level.

    Writes out_dir/roc.png, out_dir/calibration.png and out_dir/metrics.json (in that order, each
    atomically) and returns the metrics dict (as written: NaN / inf appear as None).
    """
    if rollup_method not in METHODS:
        raise LNMError(f"unknown roll-up method '{rollup_method}'; choose one of {', '.join(METHODS)}")
    if int(n_bootstrap) < 0:
        raise LNMError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    ref_path, pred_path = Path(ref_nodes_csv), Path(pred_nodes_csv)
    ref = read_reference_nodes(ref_path)
    ref["probability"] = _join_predictions(ref, read_predictions(pred_path), pred_path, ref_path)
    comp_path = Path(compare_pred_csv) if compare_pred_csv is not None else None
    if comp_path is not None:
        ref["probability_b"] = _join_predictions(ref, read_predictions(comp_path), comp_path, ref_path)

    warnings: list[str] = []
    units = _build_units(ref, ref_path, ref_stations_csv, ref_patients_csv, rollup_method, warnings)

    result: dict[str, Any] = {
        "inputs": {"reference_nodes": str(ref_path), "predictions": str(pred_path),
                   "reference_stations": str(ref_stations_csv) if ref_stations_csv is not None else None,
                   "reference_patients": str(ref_patients_csv) if ref_patients_csv is not None else None,
                   "compare_predictions": str(comp_path) if comp_path is not None else None},
        "settings": {"rollup": rollup_method, "n_bootstrap": int(n_bootstrap), "seed": int(seed),
                     "confidence": M.CONFIDENCE, "ci_method": "percentile bootstrap resampling patients",
                     "recall_target": M.RECALL_TARGET, "specificity_target": M.SPECIFICITY_TARGET,
                     "fixed_threshold": M.FIXED_THRESHOLD, "calibration_bins": M.N_CALIBRATION_BINS},
    }
    plot_data: dict[str, dict] = {}
    comparison: dict[str, Any] = {}
    for level in LEVELS:
        u = units[level]
        if isinstance(u, str):
            result[level] = {"n": 0, "n_pos": 0, "n_neg": 0, "skipped": u, "warnings": []}
            continue
        known = u["label"].to_numpy() != UNKNOWN
        y = u["label"].to_numpy()[known].astype(int)
        p = u["probability"].to_numpy(dtype=float)[known]
        g = u["group"].to_numpy()[known]
        res = _level_result(y, p, g, int((~known).sum()), int(n_bootstrap), int(seed))
        result[level] = res
        if "skipped" in res:
            continue
        plot_data[level] = {"y": y, "p": p, "res": res}
        if comp_path is not None:
            pb = u["probability_b"].to_numpy(dtype=float)[known]
            dl = M.delong_test(y, p, pb)
            boot = M.paired_bootstrap_auroc_difference(y, p, pb, g, int(n_bootstrap), int(seed)) \
                if n_bootstrap > 0 else {"ci95": (math.nan, math.nan)}
            res_b = _level_result(y, pb, g, int((~known).sum()), int(n_bootstrap), int(seed))
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
    if comp_path is not None:
        result["comparison"] = comparison
    result["warnings"] = warnings

    result = _clean(result)
    out_dir = Path(out_dir)
    _plot_roc(plot_data, out_dir / "roc.png", comp_path is not None)
    _plot_calibration(plot_data, out_dir / "calibration.png")
    save_json(result, out_dir / "metrics.json")
    return result


# ------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------
def _new_figure(n_panels: int):
    """One panel per level; with no level to show, a single panel saying why."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * max(n_panels, 1), 4.4), dpi=110)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, max(n_panels, 1), i + 1) for i in range(max(n_panels, 1))]
    if not n_panels:
        axes[0].text(0.5, 0.5, "no level has both\npositive and negative labels", ha="center", va="center")
        axes[0].set_axis_off()
    return fig, axes


def _save_figure(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def _plot_roc(plot_data: dict, path: Path, has_b: bool) -> None:
    from sklearn.metrics import roc_curve

    fig, axes = _new_figure(len(plot_data))
    for ax, (level, d) in zip(axes, plot_data.items()):
        res = d["res"]
        fpr, tpr, _ = roc_curve(d["y"], d["p"], drop_intermediate=False)
        auc = res["auroc"]
        ax.plot(fpr, tpr, color="C0", lw=1.6,
                label=f"AUROC {_fmt(auc['value'])} [{_fmt(auc['ci95'][0])}, {_fmt(auc['ci95'][1])}]")
        if has_b and "pb" in d:
            fb, tb, _ = roc_curve(d["y"], d["pb"], drop_intermediate=False)
            ax.plot(fb, tb, color="C2", lw=1.2, ls="--", label=f"compared: AUROC {M.auroc(d['y'], d['pb']):.3f}")
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls=":")
        # the operating points, located by the same rule as metrics.py (no interpolation)
        ir = int(np.argmax(tpr >= M.RECALL_TARGET))
        isp = int(np.sum(fpr <= 1.0 - M.SPECIFICITY_TARGET)) - 1
        ax.plot([fpr[ir]], [tpr[ir]], "o", color="C3",
                label=f"S@R75 {_fmt(res['s_at_r75']['value'])} (t={_fmt(res['threshold_at_r75'])})")
        ax.plot([fpr[isp]], [tpr[isp]], "s", color="C1",
                label=f"R@S75 {_fmt(res['r_at_s75']['value'])} (t={_fmt(res['threshold_at_s75'])})")
        ax.axhline(M.RECALL_TARGET, color="C3", lw=0.6, ls="--", alpha=0.5)
        ax.axvline(1 - M.SPECIFICITY_TARGET, color="C1", lw=0.6, ls="--", alpha=0.5)
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_xlabel("1 - specificity (FPR)")
        ax.set_ylabel("recall (TPR)")
        ax.set_title(f"{level} (n={res['n']}, pos={res['n_pos']})")
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path)


def _plot_calibration(plot_data: dict, path: Path) -> None:
    fig, axes = _new_figure(len(plot_data))
    for ax, (level, d) in zip(axes, plot_data.items()):
        res = d["res"]
        cal = res["calibration"]
        edges = np.asarray(cal["edges"])
        centers = (edges[:-1] + edges[1:]) / 2
        count = np.asarray(cal["count"], dtype=float)
        frac = np.array([np.nan if v is None else v for v in cal["fraction_positive"]], dtype=float)
        meanp = np.array([np.nan if v is None else v for v in cal["mean_probability"]], dtype=float)
        ax.bar(centers, np.nan_to_num(frac), width=edges[1] - edges[0], color="C0", alpha=0.25,
               edgecolor="C0", label="fraction positive per bin")
        ok = np.isfinite(frac)
        ax.plot(meanp[ok], frac[ok], "o-", color="C0", label="observed vs mean predicted")
        ax.plot([0, 1], [0, 1], color="0.5", lw=0.8, ls=":", label="perfect calibration")
        for c, x, n in zip(centers, frac, count):
            if n > 0:
                ax.text(c, np.nan_to_num(x) + 0.015, f"{int(n)}", ha="center", fontsize=6, color="0.3")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.08)
        ax.set_xlabel("predicted probability")
        ax.set_ylabel("observed fraction positive")
        ax.set_title(f"{level}: Brier {_fmt(res['brier']['value'])}, ECE {_fmt(res['ece']['value'])}", fontsize=9)
        ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path)


# ------------------------------------------------------------------------------------------------
# text table
# ------------------------------------------------------------------------------------------------
def _cell(entry) -> str:
    if not isinstance(entry, dict):
        return "n/a"
    v, ci = entry.get("value"), entry.get("ci95") or [None, None]
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if ci[0] is None or ci[1] is None or any(isinstance(c, float) and not math.isfinite(c) for c in ci):
        return f"{v:.3f}"
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def format_table(metrics: dict) -> str:
    """Readable aligned table: one row per metric, one column per level (value [95% CI])."""
    levels = [lv for lv in LEVELS if isinstance(metrics.get(lv), dict)]
    header = ["metric"] + levels
    rows: list[list[str]] = []
    rows.append(["n (pos/neg)"] + [f"{metrics[lv].get('n', 0)} ({metrics[lv].get('n_pos', 0)}/"
                                   f"{metrics[lv].get('n_neg', 0)})" for lv in levels])
    rows.append(["patients"] + [str(metrics[lv].get("n_patients", "")) for lv in levels])
    for key, name in TABLE_ROWS:
        rows.append([name] + ["skipped" if "skipped" in metrics[lv] else _cell(metrics[lv].get(key))
                              for lv in levels])
    rows.append(["thr@R75"] + [_fmt(metrics[lv].get("threshold_at_r75")) if "skipped" not in metrics[lv] else ""
                               for lv in levels])
    rows.append(["thr@S75"] + [_fmt(metrics[lv].get("threshold_at_s75")) if "skipped" not in metrics[lv] else ""
                               for lv in levels])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    out = [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    settings = metrics.get("settings", {})
    if settings:
        out.append(f"95% CI: percentile bootstrap over patients ({settings.get('n_bootstrap')} resamples, "
                   f"seed {settings.get('seed')}); roll-up: {settings.get('rollup')}")
    for lv in levels:
        if "skipped" in metrics[lv]:
            out.append(f"{lv}: skipped ({metrics[lv]['skipped']})")

    comp = metrics.get("comparison")
    if comp:
        out.append("")
        ch = ["comparison", "AUROC A", "AUROC B", "A - B", "boot 95% CI", "DeLong z", "p"]
        crows = []
        for lv in LEVELS:
            c = comp.get(lv)
            if not c:
                continue
            ci = c.get("bootstrap_diff_ci95") or [None, None]
            ci_s = "n/a" if None in ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]"
            dl = c.get("delong", {})
            p = dl.get("p_value")
            crows.append([lv, _fmt(c.get("auroc_a")), _fmt(c.get("auroc_b")), _fmt(c.get("auroc_diff")), ci_s,
                          "n/a" if dl.get("z") is None else f"{dl['z']:.2f}",
                          "n/a" if p is None else (f"{p:.2g}" if p < 0.001 else f"{p:.3f}")])
        cw = [max(len(r[i]) for r in [ch] + crows) for i in range(len(ch))]
        cl = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, cw)).rstrip()  # noqa: E731
        out += [cl(ch), "  ".join("-" * w for w in cw)] + [cl(r) for r in crows]
    warns = list(metrics.get("warnings", []))
    for lv in levels:
        warns += [f"{lv}: {w}" for w in metrics[lv].get("warnings", [])]
    if warns:
        out.append("")
        out += [f"warning: {w}" for w in warns]
    return "\n".join(out)
