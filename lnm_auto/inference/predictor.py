"""``lnm_predict``: every node of every input case scored by every fold of every member; probabilities averaged.

Prediction in three parts, the same for one model, the size rule and an ensemble of models:
  * finding the cases: ``inference/cases.py`` (the layouts of ``-i``, the optional node table of stations);
  * owning the output folder: ``inference/output_folder.py`` (kept apart from the inputs; resume, settings,
    ``predict_info.json``: a rerun with other settings is refused instead of mixed, and only files lnm_predict
    wrote are ever replaced or removed);
  * the loop: ``inference/case_loop.py`` (prepare, score by the members of ``inference/members.py``, write each
    case's probability map, then ``cases/<case>.csv``, so a rerun skips finished cases unless ``overwrite``).
This module ties them together and writes the tables (rolled up by the max rule) and the finished record.
Every case is checked against the model's training data (``inference/domain.py``: a warning line). With a node
detector, cases without a node mask are detected first (``inference/detection_step.py``).
"""
from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import lnm_auto
from lnm_auto.evaluation.rollup import rollup
from lnm_auto.inference.case_loop import PreprocessedCase, load_and_preprocess, predict_cases, write_probability_map
from lnm_auto.inference.cases import (UNKNOWN_STATION, discover_cases, input_locations, region_table_file,
                                      station_table, station_table_file)
from lnm_auto.detection.detector import DetectorModel
from lnm_auto.inference.detection_step import DETECTION_COLUMNS, detect_cases, detection_needed
from lnm_auto.inference.domain import training_reference
from lnm_auto.inference.members import (SIZE_RULE_COLUMN, UNCALIBRATED, Member, channel_count, load_member,
                                        run_settings, table_columns)
from lnm_auto.inference.model import model_origin
from lnm_auto.inference.output_folder import CASE_ROWS, OutputFolder
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import save_csv_atomic
from lnm_auto.utils.tables import read_csv_text

# the names callers of the single-module predictor imported from here, kept
__all__ = ["PreprocessedCase", "SIZE_RULE_COLUMN", "UNCALIBRATED", "UNKNOWN_STATION", "load_and_preprocess",
           "predict_folder", "predict_with_members", "read_case_rows", "station_table", "station_table_file",
           "write_probability_map"]


def predict_folder(input_dir: Path, output_dir: Path, model_folder: Path, folds: list[str] | None = None,
                   checkpoint: str = "checkpoint_final.pth", device: str = "cpu", num_processes: int = 0,
                   mirror: bool = True, save_probmaps: bool = True, progress: bool = True, overwrite: bool = False,
                   num_parts: int = 1, part_id: int = 0, calibration: dict | None = None,
                   size_rule: bool = False, detector: DetectorModel | None = None) -> dict:
    """Predict every case (of part ``part_id`` of ``num_parts``: cases sorted by id, every num_parts-th one)
    with one model; cases already in ``output_dir`` from the same settings are skipped unless ``overwrite``.
    ``num_processes``: background workers preparing the cases (0: this process does). ``calibration``: the
    Platt map applied to the fold ensemble's mean (``probability``; the mean itself in
    ``probability_uncalibrated``). ``size_rule``: score every node by its short axis instead of the model's folds
    (the model folder then only says how many channels a case has and what training intensities looked like).
    ``detector``: finds the nodes of cases without a node mask.
    Returns a summary; raises LNMError at the end if any case failed (``predict_info.json``: status ``failed``
    when no case could be predicted)."""
    out = OutputFolder(output_dir, num_parts, part_id)
    member = load_member(model_folder, folds, checkpoint, device, mirror, size_rule)
    return predict_with_members(input_dir, out, [member], device, num_processes, mirror, save_probmaps, progress,
                                overwrite, calibration, detector)


def predict_with_members(input_dir: Path, out: OutputFolder, members: list[Member], device: str = "cpu",
                         num_processes: int = 0, mirror: bool = True, save_probmaps: bool = True,
                         progress: bool = True, overwrite: bool = False, calibration: dict | None = None,
                         detector: DetectorModel | None = None) -> dict:
    """The run behind every lnm_predict: find this part's cases, claim the output folder, detect the nodes of
    cases without a node mask (``detector``), loop over the cases not done yet, write the tables and the record.
    ``members``: one model, the size rule, or an ensemble."""
    t0, input_dir = time.time(), Path(input_dir)
    cases, failures = discover_cases(input_dir, channel_count(members), detection=detector is not None)
    detecting = detection_needed(cases, detector)   # of all parts: every part has the same columns and settings
    cases = cases[out.part_id::out.num_parts]
    failures = failures if out.part_id == 0 else []   # input problems are reported once, by part 0
    stations, station_warning = station_table(input_dir)
    reference, reference_note = training_reference(members[0].model.folder)
    settings = run_settings(members, mirror, save_probmaps, calibration)
    if detecting:
        settings["detector"] = detector.record()
    case_ids = [c.case_id for c in cases]
    tables_read = [f for f in (station_table_file(input_dir), region_table_file(input_dir)) if f]
    done, previous = out.claim(settings, case_ids, overwrite, input_locations(input_dir, cases, tables_read))
    if done and progress:
        print(f"{len(done)} case(s) already predicted in {out.output_dir}: skipped (--overwrite redoes them)",
              flush=True)
    if reference_note and progress:
        print(f"note: {reference_note}", flush=True)
    earlier = previous.get("domain_warnings") if isinstance(previous.get("domain_warnings"), dict) else {}
    warnings = {c: str(w) for c, w in earlier.items() if c in done}
    columns = table_columns(members, calibration) + (DETECTION_COLUMNS if detecting else [])
    todo = [c for c in cases if c.case_id not in done]
    detected_ids: set[str] = set()
    try:
        if detecting:
            to_detect = [c for c in todo if c.needs_detection]
            detected = detect_cases(to_detect, detector, out.output_dir, input_dir, device, _torch_threads(),
                                    mirror, out.suffix, failures, say=print if progress else _quiet)
            detected_ids = {c.case_id for c in detected}
            todo = [c for c in todo if not c.needs_detection or c.case_id in detected_ids]
        predict_cases(todo, members, columns, calibration, out.output_dir,
                      reference, num_processes, save_probmaps, progress, failures, warnings)
    except LNMError as e:   # a damaged model file, a full disk: the record says so
        out.failed(failures + [str(e)], warnings)
        raise
    written = [c for c in case_ids if (out.output_dir / CASE_ROWS / f"{c}.csv").is_file()]
    if failures and not written:
        out.failed(failures, warnings)
        raise LNMError(f"{len(failures)} case(s) failed and none could be predicted ({out.info_file}: status "
                       "failed):\n" + "\n".join(failures))
    nodes = _node_table(out.output_dir, written, columns, stations)
    if detecting:
        station_warning = _detection_station_warning(nodes)
    _write_tables(nodes, out.tables, stations if not detecting else None, station_warning)
    detection = {"detector": {**detector.record(), "configuration": detector.configuration,
                              "trainer": detector.trainer},
                 "detected_cases": sorted(detected_ids)} if detecting else {}
    info = out.finished({**_model_record(members, calibration), **detection, "test_time_mirroring": mirror,
                  "lnm_auto_version": lnm_auto.__version__, "device": device,
                  "part": f"{out.part_id} of {out.num_parts}", "n_cases": len(nodes["case"].unique()),
                  "n_nodes": len(nodes), "skipped_already_done": sorted(done),
                  "cases_without_nodes": sorted(set(written) - set(nodes["case"])), "failed": failures,
                  "domain_warnings": warnings,
                  "domain_check": reference_note or "training intensities of the fingerprint",
                  "outputs": [str(t.name) for t in out.tables if t.is_file()],
                  "rollup": "max over nodes (documentation/evaluation.md)",
                  "finished": datetime.datetime.now().isoformat(timespec="seconds"),
                  "wall_time_s": round(time.time() - t0, 1)})
    if failures:
        raise LNMError(f"{len(failures)} case(s) failed (the others are in {out.output_dir}):\n" + "\n".join(failures))
    return info


def _quiet(*args, **kwargs) -> None:
    """``print``'s stand-in for a --quiet run."""


def _torch_threads() -> int:
    """The threads this process gives torch (lnm_predict set them): the detector's process gets as many."""
    import torch
    return torch.get_num_threads()


def _detection_station_warning(nodes: pd.DataFrame) -> str:
    """The line for nodes without a station in a run that detects ('' when every node has one)."""
    n_unknown = int((nodes["station"] == UNKNOWN_STATION).sum()) if len(nodes) else 0
    return (f"{n_unknown} node(s) have no station (given masks: none in the input's nodes.csv; detected nodes: no "
            f"<case>_regions.nii.gz region map, or region 0): station '{UNKNOWN_STATION}' in stations.csv"
            if n_unknown else "")


def _model_record(members: list[Member], calibration: dict | None) -> dict:
    """The finished record's description of what scored: the one model's fields, or the ensemble's."""
    if len(members) == 1:
        m = members[0]
        origin = model_origin(m.model.folder)
        return {("model_zip" if origin != m.model.folder.absolute() else "model_folder"): str(origin),
                "trainer": m.model.trainer_name, "configuration": m.model.configuration.name,
                "plans_name": m.model.plans.plans_name, "plans_version": m.model.plans.plans_version,
                "folds": m.folds, "checkpoint": m.checkpoint, "size_rule": m.size_rule,
                "calibration": calibration or "none: the model's own probabilities"}
    return {"ensemble": [str(model_origin(m.model.folder)) for m in members],
            "members": [{"model_folder": str(model_origin(m.model.folder)), "trainer": m.model.trainer_name,
                         "configuration": m.model.configuration.name, "folds": m.folds, "checkpoint": m.checkpoint}
                        for m in members],
            "folds": {m.name: m.folds for m in members}, "size_rule": False,
            "combination": "mean of the members' fold-ensemble probabilities (probability_<member>), then the "
                           "calibration map; probability maps show the calibrated mean",
            "calibration": calibration or "none: the members' mean"}


def _write_tables(nodes: pd.DataFrame, tables: list[Path], stations: pd.DataFrame | None, station_warning: str) -> None:
    """nodes, stations and patients tables (the roll-ups only when there is a node)."""
    if stations is not None and len(nodes):
        n_unknown = int((nodes["station"] == UNKNOWN_STATION).sum())
        station_warning = f"{n_unknown} node(s) have no station in the input's node table: station " \
                          f"'{UNKNOWN_STATION}' in stations.csv" if n_unknown else ""
    if station_warning and len(nodes):
        print(f"warning: {station_warning}", file=sys.stderr, flush=True)
    save_csv_atomic(nodes, tables[0])
    if len(nodes):
        save_csv_atomic(rollup(nodes, "station"), tables[1])
        save_csv_atomic(rollup(nodes, "patient"), tables[2])


def read_case_rows(output_dir: Path, case_id: str) -> pd.DataFrame:
    """The node rows a previous run wrote for one case."""
    df = read_csv_text(output_dir / CASE_ROWS / f"{case_id}.csv", "case rows", required=("case", "node", "probability"))
    probability_columns = [c for c in df.columns if c.startswith("probability") or c == SIZE_RULE_COLUMN]
    if "detection_confidence" in df.columns:    # empty for a given node mask
        df["detection_confidence"] = df["detection_confidence"].replace("", "nan")
        probability_columns.append("detection_confidence")
    return df.astype({"node": np.int64, **{c: float for c in probability_columns}})


def _node_table(output_dir: Path, written: list[str], value_columns: list[str],
                stations: pd.DataFrame | None) -> pd.DataFrame:
    """The finished cases' rows with their stations (``unknown`` where the input's node table names none)."""
    columns = ["case", "node"] + value_columns
    parts = [read_case_rows(output_dir, c) for c in written]
    rows = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    # a run that detects wrote each detected node's station (from its region map) into the case rows
    detected_stations = rows["station"].fillna("").to_numpy() if "station" in rows.columns else None
    nodes = rows[columns].copy()
    nodes.insert(2, "station", UNKNOWN_STATION)
    split_cases = {c for c in written if (output_dir / f"{c}_nodes.nii.gz").is_file()}
    if stations is not None and split_cases:   # split masks have new node ids: their station rows do not apply
        stations = stations[~stations["case"].isin(split_cases)]
    if stations is not None and len(nodes):
        merged = nodes.drop(columns="station").merge(stations, on=["case", "node"], how="left")
        nodes = merged[nodes.columns].fillna({"station": UNKNOWN_STATION}).replace({"station": {"": UNKNOWN_STATION}})
    if detected_stations is not None and len(nodes):
        given = detected_stations != ""
        nodes.loc[given, "station"] = detected_stations[given]
    return nodes
