"""Reading and checking evaluate's input CSVs: reference nodes / stations / patients and predictions.

Every problem is one LNMError line naming the file (and the line, where one is at fault) and what to
fix. Node ids are compared as canonical integers ('3', '3.0' and ' 03' are the same node).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lnm_auto.datasets.verify import negative_bag_with_positive_node
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.labels import UNKNOWN, parse_label
from lnm_auto.utils.tables import node_ids, read_csv_text

_SHOW_MISSING = 5


def read_checked_csv(path: str | Path, what: str, required: tuple[str, ...]) -> pd.DataFrame:
    """A CSV as stripped text columns with canonical node ids ('3', '3.0', ' 03' -> '3'); LNMError if unreadable,
    a column is missing or a node id is not a positive integer."""
    df = read_csv_text(path, what, required)
    if "node" in df.columns:
        df["node"] = node_ids(df["node"], path).astype(str)
    return df


def parse_labels(df: pd.DataFrame, path: Path, column: str = "label",
                 allowed: str = "1, 0 or empty (unknown)") -> np.ndarray:
    """A label column as 1 / 0 / -1 (unknown); LNMError naming the line of a bad label (``allowed`` says what a
    cell may hold, for the message)."""
    what = "label" if column == "label" else f"column '{column}'"
    out = np.empty(len(df), dtype=int)
    for i, raw in enumerate(df[column].to_list()):
        try:
            out[i] = parse_label(raw)
        except ValueError:
            raise LNMError(f"{path}: line {i + 2}: {what} must be {allowed}, got '{str(raw).strip()}'") from None
    return out


def check_unique(df: pd.DataFrame, keys: list[str], path: Path) -> None:
    """LNMError naming the first duplicate if two rows share the same keys."""
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
    df = read_checked_csv(path, "reference nodes", ("case", "node", "label"))
    _require_rows(df, path, "reference nodes")
    check_unique(df, ["case", "node"], path)
    out = pd.DataFrame({"case": df["case"], "node": df["node"],
                        "station": df["station"] if "station" in df.columns else "",
                        "label": parse_labels(df, path)})
    out.attrs["has_station"] = "station" in df.columns
    return out


def read_predictions(path: str | Path) -> pd.DataFrame:
    """case, node, probability (float in [0, 1]) plus whatever else the file has."""
    path = Path(path)
    df = read_checked_csv(path, "predictions", ("case", "node", "probability"))
    check_unique(df, ["case", "node"], path)
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


def _renumbered_hint(ref: pd.DataFrame, pred: pd.DataFrame, missing_cases: pd.Series) -> str:
    """When a case with missing nodes is predicted under other node ids: say so (other masks, renumbered nodes)."""
    for case in dict.fromkeys(missing_cases):
        predicted = sorted(pred.loc[pred["case"] == case, "node"].astype(int))
        if predicted:
            listed = sorted(ref.loc[ref["case"] == case, "node"].astype(int))
            return (f"; case {case} is predicted with node ids {predicted[:6]} but the reference lists {listed[:6]}: "
                    "were the predictions made on other node masks?")
    return ""


def join_predictions(ref: pd.DataFrame, pred: pd.DataFrame, pred_path: Path, ref_path: Path) -> np.ndarray:
    """Probability for every reference node, in reference order; missing node -> LNMError."""
    merged = ref[["case", "node"]].merge(pred[["case", "node", "probability"]], on=["case", "node"],
                                         how="left", validate="one_to_one")
    missing = merged["probability"].isna().to_numpy()
    if missing.any():
        pairs = merged.loc[missing, ["case", "node"]].head(_SHOW_MISSING).itertuples(index=False)
        shown = ", ".join(f"({c}, {n})" for c, n in pairs)
        more = " ..." if missing.sum() > _SHOW_MISSING else ""
        raise LNMError(f"{pred_path}: {int(missing.sum())} node(s) of the reference {ref_path.name} have no "
                       f"prediction; missing (case, node): {shown}{more}"
                       + _renumbered_hint(ref, pred, merged.loc[missing, "case"]))
    return merged["probability"].to_numpy(dtype=float)


def check_bag_labels(bags: pd.DataFrame, nodes: pd.DataFrame, keys: list[str], path: Path, ref_path: Path) -> None:
    """A station (keys case, station) or patient (keys case) labelled 0 must not hold a node labelled 1 in the
    reference nodes: the contradiction dataset verification refuses as well."""
    node_max = nodes.groupby(keys)["label"].max()
    for row in bags.itertuples(index=False):
        key = tuple(getattr(row, k) for k in keys)
        if negative_bag_with_positive_node(row.label, node_max.get(key if len(keys) > 1 else key[0], UNKNOWN)):
            what = (f"station '{row.station}' of case '{row.case}' is labelled 0" if "station" in keys
                    else f"case '{row.case}' is labelled N0 (0)")
            raise LNMError(f"{path}: {what} but has a node labelled 1 in {ref_path.name}; fix one of them")


def extra_predictions_warning(ref: pd.DataFrame, pred: pd.DataFrame, pred_path: Path, ref_path: Path) -> str | None:
    """Predicted nodes of evaluated cases that the reference does not list: they take no part in any level (the
    roll-ups included), which a user must know; None when there are none."""
    of_cases = pred[pred["case"].isin(set(ref["case"]))]
    extra = of_cases.merge(ref[["case", "node"]], on=["case", "node"], how="left", indicator=True)
    extra = extra[extra["_merge"] == "left_only"]
    if extra.empty:
        return None
    first = extra.iloc[0]
    return (f"{pred_path.name}: {len(extra)} predicted node(s) of the evaluated cases are not listed in "
            f"{ref_path.name} (first: case {first['case']} node {first['node']}); they are left out of every level, "
            "the station and patient roll-ups included")
