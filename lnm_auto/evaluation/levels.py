"""The three evaluated levels built from the reference files: node, station and patient units, each with its label,
probability (``probability_b`` for a compared model) and patient (the bootstrap group).

Every level is optional: a dataset may have node labels only (a converted nnU-Net or DICOM dataset: no stations),
station pathology only, or patient N stage only. A level the reference cannot give is not an error and never a
row of NaNs: it is reported as "not in the data" with the reason. Station and patient labels come from
``--ref_stations`` / ``--ref_patients`` when given, else they are derived from the node labels (1 if a node is 1,
0 if all its nodes are 0, unknown otherwise: rollup.py). A negative station or patient holding a positive node is
refused, as dataset verification refuses it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from lnm_auto.evaluation.inputs import check_bag_labels, check_unique, parse_labels, read_checked_csv
from lnm_auto.evaluation.rollup import derive_label, rollup
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.labels import UNKNOWN

ABSENT = "not in the data: "


def _read_patients(patients_csv, nodes: pd.DataFrame, ref_path: Path, warnings: list[str]) -> pd.DataFrame:
    """case, patient, label of the reference patients file, restricted to the evaluated cases; checked."""
    ppath = Path(patients_csv)
    pdf = read_checked_csv(ppath, "reference patients", ("case", "label"))
    check_unique(pdf, ["case"], ppath)
    pdf["label"] = parse_labels(pdf, ppath)
    if "patient" not in pdf.columns:
        pdf["patient"] = pdf["case"]
    pdf.loc[pdf["patient"] == "", "patient"] = pdf["case"]
    outside = ~pdf["case"].isin(set(nodes["case"]))
    if outside.any():
        warnings.append(f"{ppath.name}: {int(outside.sum())} case(s) without nodes in {ref_path.name} were "
                        f"ignored (the reference nodes file defines the evaluated cases)")
    pdf = pdf[~outside]
    check_bag_labels(pdf, nodes, ["case"], ppath, ref_path)
    return pdf


def _station_units(nodes: pd.DataFrame, ref_path: Path, has_station: bool, stations_csv, pcols: list[str],
                   method: str, warnings: list[str]) -> pd.DataFrame | str:
    """Station units (max roll-up of their nodes; labels from the stations file or derived), or why there are none."""
    if not has_station or (nodes["station"] == "").all():
        if stations_csv is not None:
            raise LNMError(f"{ref_path}: " + ("has no 'station' column" if not has_station else "no node has a station")
                           + f", so nodes cannot be matched to the reference stations in {Path(stations_csv).name}; "
                             "fill in each node's station")
        return ABSENT + (f"{ref_path.name} has no station column" if not has_station
                         else f"no node of {ref_path.name} has a station")
    blank = nodes["station"] == ""
    if blank.any():
        warnings.append(f"{ref_path.name}: {int(blank.sum())} node(s) without a station were left out of "
                        f"the station level")
    st = rollup(nodes.loc[~blank, ["case", "station", "label"] + pcols], "station", method)
    if stations_csv is None:
        return st
    spath = Path(stations_csv)
    sdf = read_checked_csv(spath, "reference stations", ("case", "station", "label"))
    check_unique(sdf, ["case", "station"], spath)
    sdf["label"] = parse_labels(sdf, spath)
    outside = ~sdf["case"].isin(set(nodes["case"]))
    if outside.any():
        warnings.append(f"{spath.name}: {int(outside.sum())} station row(s) of cases without nodes in "
                        f"{ref_path.name} were ignored")
    sdf = sdf.loc[~outside, ["case", "station", "label"]]
    check_bag_labels(sdf, nodes, ["case", "station"], spath, ref_path)
    st = st.drop(columns="label").merge(sdf, on=["case", "station"], how="outer")
    empty = st["n_nodes"].isna()
    if empty.any():
        warnings.append(f"{spath.name}: {int(empty.sum())} labelled station(s) contain no node; "
                        f"their probability is 0 (empty bag)")
    st[pcols] = st[pcols].fillna(0.0)
    st["n_nodes"] = st["n_nodes"].fillna(0).astype(int)
    st["label"] = st["label"].fillna(UNKNOWN).astype(int)
    return st


def build_units(ref: pd.DataFrame, ref_path: Path, stations_csv, patients_csv, method: str,
                warnings: list[str]) -> dict[str, Any]:
    """{level: DataFrame with label, probability[, probability_b], group} or a str (why the level is not there)."""
    nodes = ref.copy()
    patient_of = {c: c for c in set(ref["case"])}
    case_labels = None
    if patients_csv is not None:
        pdf = _read_patients(patients_csv, nodes, ref_path, warnings)
        patient_of.update(dict(zip(pdf["case"], pdf["patient"])))
        case_labels = dict(zip(pdf["case"], pdf["label"]))
    nodes["patient"] = nodes["case"].map(patient_of)
    pcols = ["probability"] + (["probability_b"] if "probability_b" in nodes else [])
    units: dict[str, Any] = {"node": nodes.rename(columns={"patient": "group"})[["case", "node", "label"] + pcols
                                                                                + ["group"]]}
    st = _station_units(nodes, ref_path, ref.attrs.get("has_station", True), stations_csv, pcols, method, warnings)
    if not isinstance(st, str):
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


def label_sources(ref_path: Path, stations_csv, patients_csv) -> dict[str, str]:
    """Where each level's reference labels come from, as metrics.json and the console say."""
    derived = "derived from the node labels of {} (1 if a node is 1, 0 if all of its nodes are 0)"
    return {"node": Path(ref_path).name,
            "station": Path(stations_csv).name if stations_csv is not None else derived.format(Path(ref_path).name),
            "patient": Path(patients_csv).name if patients_csv is not None else derived.format(Path(ref_path).name)}


def unlabelled_reason(level: str, ref_path: Path, stations_csv, patients_csv) -> str:
    """Why a level whose units all have unknown labels is not evaluated."""
    if level == "node":
        return ABSENT + f"no node of {Path(ref_path).name} is labelled 0 or 1"
    given, flag = (stations_csv, "--ref_stations") if level == "station" else (patients_csv, "--ref_patients")
    if given is not None:
        return ABSENT + f"no evaluated {level} is labelled 0 or 1 in {Path(given).name}"
    return (ABSENT + f"no {level} labels: none given ({flag}) and none can be derived from the node labels of "
            f"{Path(ref_path).name}")
