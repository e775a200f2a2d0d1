"""``lnm_predict``: every node of every input case scored by every fold; probabilities averaged.

Inputs: ``inference/cases.py`` (the layouts of ``-i``). An optional ``nodes.csv`` (case,node,station[,...]) in the
input folder — or the raw dataset's ``nodesTs.csv`` next to ``imagesTs/`` — names each node's station (station
``unknown`` where none is given).

Outputs are resumable and kept apart from the inputs (``inference/output_folder.py``, documentation/
robustness.md): each case's rows go to ``cases/<case>.csv`` once its probability map is written, so a rerun skips
finished cases (unless ``overwrite``); ``predict_info.json`` records the run's settings, cases and files, so a
rerun with other settings is refused instead of mixed, and only files lnm_predict wrote are ever replaced or
removed. Every case is checked against the model's training data (``inference/domain.py``: a warning line).
"""
from __future__ import annotations

import datetime
import os
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch

import lnm_auto
from lnm_auto.conversion.components import as_instance_mask
from lnm_auto.datasets.raw_dataset import read_instance_mask
from lnm_auto.evaluation.calibration import apply_calibration, is_identity
from lnm_auto.evaluation.rollup import rollup
from lnm_auto.evaluation.size_rule import size_rule_score
from lnm_auto.inference.cases import InputCase, discover_cases, input_locations, read_case_images
from lnm_auto.inference.domain import case_samples, domain_warning, training_reference
from lnm_auto.inference.model import TrainedModel, model_origin
from lnm_auto.inference.output_folder import CASE_ROWS, prepare_output
from lnm_auto.planning.deep_radiomics_topology import DeepRadiomicsTopology
from lnm_auto.planning.learning_scheme import RadiomicsTopology
from lnm_auto.planning.plans import ConfigurationPlan, Plans
from lnm_auto.radiomics.dataset_features import case_inputs as radiomics_case_inputs
from lnm_auto.radiomics.deep_features import case_inputs as deep_radiomics_case_inputs
from lnm_auto.preprocessing.crops import preprocess_images
from lnm_auto.preprocessing.geometry import measure_nodes
from lnm_auto.preprocessing.preprocessor import check_case_images
from lnm_auto.training.progress import progress_bar, show_progress
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import atomic_path, save_csv_atomic, save_json
from lnm_auto.utils.processes import worker_process_init
from lnm_auto.utils.tables import node_ids, read_csv_text

UNKNOWN_STATION = "unknown"
SIZE_RULE_COLUMN = "short_axis_mm"     # the size rule's one "fold": the node's short axis, mapped by size_rule_score
UNCALIBRATED = "probability_uncalibrated"


@dataclass(frozen=True)
class Scoring:
    """How a case's per-fold outputs become the probability written: the per-fold columns, the map from their mean
    to a score in [0, 1] (the size rule's short axis -> s / (s + 10 mm); else none), then the calibration map."""
    fold_columns: list[str]
    size_rule: bool = False
    calibration: dict | None = None

    @property
    def calibrated(self) -> bool:
        return not is_identity(self.calibration)

    def columns(self) -> list[str]:
        """The node table's columns after case and node (station goes in between)."""
        return ["probability"] + ([UNCALIBRATED] if self.calibrated else []) + self.fold_columns

    def probabilities(self, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probability written, probability before calibration)."""
        raw = np.asarray([size_rule_score(v) for v in mean], dtype=float) if self.size_rule else mean
        return apply_calibration(self.calibration, raw), raw


@dataclass
class PreprocessedCase:
    """What a worker hands back: the crops, or the one-line reason the case failed; for a binary node mask,
    the line saying it was split into components and where the instance mask was written; the line saying the
    case does not look like the training data, if it does not."""
    case_id: str
    crops: dict | None = None
    error: str = ""
    split_note: str | None = None
    instance_mask_file: Path | None = None
    domain_warning: str = ""


def load_and_preprocess(case: InputCase, plans: Plans, output_dir: Path,
                        configuration: ConfigurationPlan | None = None,
                        reference: dict | None = None, size_rule: bool = False) -> PreprocessedCase:
    """Read, check and crop one case (runs in a worker process). A binary node mask is split into its
    26-connected components, written as ``<case>_nodes.nii.gz`` into ``output_dir`` so the node ids of the
    outputs point to voxels. ``reference``: the training intensities (``domain.training_reference``) the case is
    compared with. ``size_rule``: only each node's short axis is needed (measured as the crops measure it; no crop
    is cut). Bad input (LNMError, SimpleITK read errors) is handed back as the case's one-line error; anything else
    is a bug of ours and surfaces with its traceback."""
    try:
        images, modality = read_case_images(case)
        mask, split_note = as_instance_mask(read_instance_mask(case.node_mask_file), str(case.node_mask_file))
        check_case_images(images, case.image_files or [case.dicom_dir], mask, case.node_mask_file)
    except LNMError as e:
        return PreprocessedCase(case.case_id, error=str(e))
    warning = domain_warning(case.case_id, case_samples(images, mask), reference, modality)
    instance_file = None
    if split_note:
        instance_file = Path(output_dir) / f"{case.case_id}_nodes.nii.gz"
        with atomic_path(instance_file, suffix=".nii.gz") as tmp:
            sitk.WriteImage(mask, str(tmp), useCompression=True)
        split_note += f"; instances written to {instance_file}"
    network = configuration.network if configuration is not None else None
    if size_rule:
        nodes = measure_nodes(mask)
        inputs = {"node_ids": np.asarray([n.node for n in nodes], dtype=np.int32),
                  "short_axis_mm": np.asarray([n.short_axis_mm for n in nodes], dtype=np.float32)}
    elif isinstance(network, RadiomicsTopology):
        inputs = radiomics_case_inputs(images, mask, network)
    elif isinstance(network, DeepRadiomicsTopology):   # radiomics + the frozen backbone's embedding of the crops
        inputs = deep_radiomics_case_inputs(images, mask, plans, network)
    else:
        inputs = preprocess_images(images, mask, plans)
    return PreprocessedCase(case.case_id, inputs, "", split_note, instance_file, warning)


def write_probability_map(mask_file: Path, probabilities: dict[int, float], out_file: Path) -> None:
    """The node mask with every node's voxels set to its probability, in the input's exact geometry."""
    mask = read_instance_mask(mask_file)
    ids = sitk.GetArrayViewFromImage(mask).astype(np.int64)
    lut = np.zeros(int(ids.max()) + 1, dtype=np.float32)
    for k, p in probabilities.items():
        lut[k] = p
    out = sitk.GetImageFromArray(lut[ids])
    out.CopyInformation(mask)
    with atomic_path(out_file, suffix=".nii.gz") as tmp:
        sitk.WriteImage(out, str(tmp), useCompression=True)


def station_table(input_dir: Path) -> tuple[pd.DataFrame | None, str]:
    """Stations from the input's node table (``station_table_file``); else None and the warning line saying why
    every node's station will be ``unknown``."""
    p = station_table_file(input_dir)
    if p is None:
        return None, (f"{input_dir}: no nodes.csv with a station column; stations.csv lists every node under station "
                      f"'{UNKNOWN_STATION}'")
    df = read_csv_text(p, "node table", required=("case", "node"))
    if "station" not in df.columns:
        return None, f"{p}: no 'station' column; stations.csv lists every node under station '{UNKNOWN_STATION}'"
    table = pd.DataFrame({"case": df["case"], "node": node_ids(df["node"], p), "station": df["station"]})
    dup = table[table.duplicated(["case", "node"])]
    if len(dup):
        raise LNMError(f"{p}: node {dup.node.iloc[0]} of case '{dup.case.iloc[0]}' is listed more than once")
    return table, ""


def station_table_file(input_dir: Path) -> Path | None:
    """The input's node table: ``nodes.csv`` in the input folder, or ``nodesTs.csv`` beside ``imagesTs/``."""
    candidates = [input_dir / "nodes.csv"]
    if input_dir.name.startswith("images"):
        candidates.append(input_dir.parent / (input_dir.name.replace("images", "nodes", 1) + ".csv"))
    return next((p for p in candidates if p.is_file()), None)


def read_case_rows(output_dir: Path, case_id: str) -> pd.DataFrame:
    """The node rows a previous run wrote for one case."""
    df = read_csv_text(output_dir / CASE_ROWS / f"{case_id}.csv", "case rows", required=("case", "node", "probability"))
    probability_columns = [c for c in df.columns if c.startswith("probability") or c == SIZE_RULE_COLUMN]
    return df.astype({"node": np.int64, **{c: float for c in probability_columns}})


def score_case(scorers: dict, crops: dict, case_id: str, model: TrainedModel, checkpoint: str) -> dict[str, np.ndarray]:
    """Every fold's probabilities of one case's nodes, refused before anything is written when a fold's model
    gives a non-finite one (a damaged model file: e.g. radiomics coefficients of 1e308)."""
    per_fold = {}
    for fold, score in scorers.items():
        with np.errstate(over="ignore", invalid="ignore"):   # checked just below
            p = np.asarray(score(crops), dtype=np.float64)
        bad = int(np.count_nonzero(~np.isfinite(p)))
        if bad:
            raise LNMError(f"{model.folder / f'fold_{fold}' / model.model_file(checkpoint)}: gives {bad} non-finite "
                           f"probability(ies) (NaN/Inf) for the {p.size} node(s) of case '{case_id}': the model file "
                           "is damaged; retrain that fold or export the model again")
        per_fold[fold] = p
    return per_fold


def predict_folder(input_dir: Path, output_dir: Path, model_folder: Path, folds: list[str] | None = None,
                   checkpoint: str = "checkpoint_final.pth", device: str = "cpu", num_processes: int = 0,
                   mirror: bool = True, save_probmaps: bool = True, progress: bool = True, overwrite: bool = False,
                   num_parts: int = 1, part_id: int = 0, calibration: dict | None = None,
                   size_rule: bool = False) -> dict:
    """Predict every case (of part ``part_id`` of ``num_parts``: cases sorted by id, every num_parts-th one);
    cases already in ``output_dir`` from the same settings are skipped unless ``overwrite``. ``num_processes``:
    background workers preparing the cases (0: this process does). ``calibration``: the Platt map applied to the
    fold ensemble's mean (``probability``; the mean itself in ``probability_uncalibrated``). ``size_rule``: score
    every node by its short axis instead of the model's folds (the model folder then only says how many channels
    a case has and what training intensities looked like). Returns a summary; raises LNMError at the end if any
    case failed (``predict_info.json``: status ``failed`` when no case could be predicted)."""
    t0 = time.time()
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise LNMError(f"-part_id must lie in 0..num_parts-1 and -num_parts be at least 1 (got -num_parts {num_parts} "
                       f"-part_id {part_id})")
    output_dir, suffix = Path(output_dir), f"_part{part_id}" if num_parts > 1 else ""
    if output_dir.exists() and not output_dir.is_dir():
        raise LNMError(f"-o {output_dir}: is a file, not a folder; give a folder for the outputs")
    model = TrainedModel.load(model_folder)
    if size_rule:
        scorers = {SIZE_RULE_COLUMN: lambda crops: np.asarray(crops["short_axis_mm"], dtype=np.float64)}
    else:
        scorers = model.load_scorers(folds, checkpoint, torch.device(device), mirror)
    scoring = Scoring([SIZE_RULE_COLUMN] if size_rule else [f"probability_fold{f}" for f in scorers], size_rule,
                      calibration)
    cases, failures = discover_cases(Path(input_dir), len(model.plans.normalization))
    cases = cases[part_id::num_parts]
    failures = failures if part_id == 0 else []   # input problems are reported once, by part 0
    stations, station_warning = station_table(Path(input_dir))
    reference, reference_note = training_reference(model.folder)
    origin = model_origin(model.folder)
    settings = {"model": "size rule (short axis)" if size_rule else str(origin),
                "plans_identifier": model.plans.identifier(), "folds": list(scorers), "checkpoint": checkpoint,
                "test_time_mirroring": mirror, "probability_maps": save_probmaps, "calibration": calibration}
    info_file = output_dir / f"predict_info{suffix}.json"
    tables = [output_dir / f"{name}{suffix}.csv" for name in ("nodes", "stations", "patients")]
    case_ids = [c.case_id for c in cases]
    table_file = station_table_file(Path(input_dir))
    inputs = input_locations(Path(input_dir), cases, [table_file] if table_file else [])
    done, previous, files = prepare_output(output_dir, info_file, settings, case_ids, tables, overwrite, inputs)
    record = {"settings": settings, "cases": case_ids, "files": files}
    save_json({"status": "running", **record, "started": datetime.datetime.now().isoformat(timespec="seconds")},
              info_file)
    if done and progress:
        print(f"{len(done)} case(s) already predicted in {output_dir}: skipped (--overwrite redoes them)", flush=True)
    if reference_note and progress:
        print(f"note: {reference_note}", flush=True)
    earlier = previous.get("domain_warnings") if isinstance(previous.get("domain_warnings"), dict) else {}
    warnings = {c: str(w) for c, w in earlier.items() if c in done}
    todo = [c for c in cases if c.case_id not in done]
    prepare = partial(load_and_preprocess, plans=model.plans, output_dir=output_dir,
                      configuration=None if size_rule else model.configuration, reference=reference,
                      size_rule=size_rule)
    try:
        _predict_cases(todo, prepare, num_processes, scorers, scoring, model, checkpoint, output_dir, save_probmaps,
                       progress, failures, warnings)
    except LNMError as e:   # a damaged model file, a full disk: the record says so
        save_json({"status": "failed", **record, "failed": failures + [str(e)], "domain_warnings": warnings},
                  info_file)
        raise
    written = [c for c in case_ids if (output_dir / CASE_ROWS / f"{c}.csv").is_file()]
    if failures and not written:
        save_json({"status": "failed", **record, "failed": failures, "domain_warnings": warnings}, info_file)
        raise LNMError(f"{len(failures)} case(s) failed and none could be predicted ({info_file}: status failed):\n"
                       + "\n".join(failures))
    nodes = _node_table(output_dir, written, scoring.columns(), stations)
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
    info = {"status": "finished", **record,
            ("model_zip" if origin != model.folder.absolute() else "model_folder"): str(origin),
            "trainer": model.trainer_name, "configuration": model.configuration.name,
            "plans_name": model.plans.plans_name, "plans_version": model.plans.plans_version,
            "folds": list(scorers), "checkpoint": checkpoint, "test_time_mirroring": mirror,
            "size_rule": size_rule, "calibration": calibration or "none: the model's own probabilities",
            "lnm_auto_version": lnm_auto.__version__, "device": device, "part": f"{part_id} of {num_parts}",
            "n_cases": len(nodes["case"].unique()), "n_nodes": len(nodes), "skipped_already_done": sorted(done),
            "cases_without_nodes": sorted(set(written) - set(nodes["case"])), "failed": failures,
            "domain_warnings": warnings, "domain_check": reference_note or "training intensities of the fingerprint",
            "outputs": [str(t.name) for t in tables if t.is_file()], "rollup": "max over nodes (documentation/evaluation.md)",
            "finished": datetime.datetime.now().isoformat(timespec="seconds"), "wall_time_s": round(time.time() - t0, 1)}
    save_json(info, info_file)
    if failures:
        raise LNMError(f"{len(failures)} case(s) failed (the others are in {output_dir}):\n" + "\n".join(failures))
    return info


def _predict_cases(todo: list[InputCase], prepare, num_processes: int, scorers: dict, scoring: Scoring,
                   model: TrainedModel, checkpoint: str, output_dir: Path, save_probmaps: bool, progress: bool,
                   failures: list[str], warnings: dict[str, str]) -> None:
    """Prepare, score and write every case of ``todo``; failed cases' reasons go to ``failures``, domain warnings
    (also printed) to ``warnings``."""
    one_line_per_case = progress and not show_progress()
    bar = progress_bar(len(todo), "predict", unit="case") if progress else None
    by_id, t_case = {c.case_id: c for c in todo}, time.time()
    for i, prepared in enumerate(_preprocessed(todo, prepare, num_processes), 1):
        case_id, crops = prepared.case_id, prepared.crops
        if prepared.error:
            failures.append(prepared.error)
        else:
            if prepared.split_note:
                print(prepared.split_note, flush=True)
                by_id[case_id].node_mask_file = prepared.instance_mask_file
            if prepared.domain_warning:
                print(f"warning: {prepared.domain_warning}", file=sys.stderr, flush=True)
                warnings[case_id] = prepared.domain_warning
            per_fold = score_case(scorers, crops, case_id, model, checkpoint)
            probability, raw = scoring.probabilities(np.mean(list(per_fold.values()), axis=0))
            ids = crops["node_ids"].tolist()
            folds = {col: per_fold[f] for col, f in zip(scoring.fold_columns, scorers)}
            rows = pd.DataFrame({"case": case_id, "node": np.asarray(ids, dtype=np.int64), "probability": probability,
                                 UNCALIBRATED: raw, **folds}, columns=["case", "node"] + scoring.columns())
            if save_probmaps:
                write_probability_map(by_id[case_id].node_mask_file, dict(zip(ids, probability.tolist())),
                                      output_dir / f"{case_id}_probmap.nii.gz")
            save_csv_atomic(rows, output_dir / CASE_ROWS / f"{case_id}.csv")   # last: marks the case done
        if bar is not None:
            bar.update()
        if one_line_per_case:
            state = "failed" if prepared.error else f"{len(crops['node_ids'])} node(s)"
            print(f"predict {i}/{len(todo)}: {case_id} {state} ({time.time() - t_case:.1f} s)", flush=True)
            t_case = time.time()
    if bar is not None:
        bar.close()


def _node_table(output_dir: Path, written: list[str], value_columns: list[str],
                stations: pd.DataFrame | None) -> pd.DataFrame:
    """The finished cases' rows with their stations (``unknown`` where the input's node table names none)."""
    columns = ["case", "node"] + value_columns
    parts = [read_case_rows(output_dir, c) for c in written]
    nodes = pd.concat(parts, ignore_index=True)[columns] if parts else pd.DataFrame(columns=columns)
    nodes.insert(2, "station", UNKNOWN_STATION)
    split_cases = {c for c in written if (output_dir / f"{c}_nodes.nii.gz").is_file()}
    if stations is not None and split_cases:   # split masks have new node ids: their station rows do not apply
        stations = stations[~stations["case"].isin(split_cases)]
    if stations is not None and len(nodes):
        merged = nodes.drop(columns="station").merge(stations, on=["case", "node"], how="left")
        nodes = merged[nodes.columns].fillna({"station": UNKNOWN_STATION}).replace({"station": {"": UNKNOWN_STATION}})
    return nodes


def _preprocessed(cases: list[InputCase], prepare, num_processes: int):
    """Yield each case's PreprocessedCase (``prepare(case)``) in order: in this process (``num_processes`` 0), or
    by that many background workers (which end with this process) while the caller scores the previous case, at
    most 2 x workers cases in flight."""
    if num_processes <= 0:
        for c in cases:
            yield prepare(c)
        return
    with ProcessPoolExecutor(num_processes, initializer=worker_process_init, initargs=(os.getpid(),)) as pool:
        pending: deque = deque()
        it = iter(cases)
        for c in it:
            pending.append(pool.submit(prepare, c))
            if len(pending) >= 2 * num_processes:
                break
        while pending:
            yield pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(prepare, nxt))
