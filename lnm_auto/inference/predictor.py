"""``lnm_predict``: every node of every input case scored by every fold; probabilities averaged.

Input layouts (``-i FOLDER``):
  * ``<case>_0000<ending>`` (one per channel) with the node mask ``<case>_nodes<ending>`` beside them;
  * a raw dataset's ``imagesTs/`` (or ``imagesTr/``): masks are found in ``nodesTs/<case><ending>``;
  * one sub-folder per case holding a DICOM series and the node mask as NIfTI/NRRD/MHA.
An optional ``nodes.csv`` (case,node,station[,...]) in the input folder — or the raw dataset's
``nodesTs.csv`` next to ``imagesTs/`` — names each node's station (station ``unknown`` where none is given).

Outputs are resumable (documentation/robustness.md): each case's rows go to ``cases/<case>.csv`` once its
probability map is written, so a rerun skips finished cases (unless ``overwrite``); ``predict_info.json``
records the run's settings and cases, so a rerun with other settings is refused instead of mixed, and the
previous run's files of cases no longer in the input are removed instead of left beside the new tables.
"""
from __future__ import annotations

import datetime
import os
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch

import lnm_auto
from lnm_auto.conversion.components import as_instance_mask
from lnm_auto.datasets.raw_dataset import CHANNEL_SUFFIX, SAFE_CASE_ID, read_image, read_instance_mask
from lnm_auto.evaluation.rollup import rollup
from lnm_auto.inference.model import TrainedModel, model_origin
from lnm_auto.planning.learning_scheme import RadiomicsTopology
from lnm_auto.planning.plans import ConfigurationPlan, Plans
from lnm_auto.radiomics.dataset_features import case_inputs as radiomics_case_inputs
from lnm_auto.preprocessing.crops import preprocess_images
from lnm_auto.preprocessing.preprocessor import check_case_images
from lnm_auto.training.progress import progress_bar, show_progress
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import atomic_path, load_json, save_csv_atomic, save_json
from lnm_auto.utils.processes import worker_process_init
from lnm_auto.utils.tables import node_ids, read_csv_text

IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class InputCase:
    case_id: str
    image_files: list[Path] = field(default_factory=list)   # one per channel (empty for DICOM)
    dicom_dir: Path | None = None
    node_mask_file: Path | None = None


def _ending(name: str) -> str | None:
    return next((e for e in IMAGE_ENDINGS if name.endswith(e)), None)


def discover_cases(input_dir: Path, num_channels: int) -> tuple[list[InputCase], list[str]]:
    """Cases in ``input_dir`` and one problem line per case that cannot be run."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise LNMError(f"-i {input_dir}: no such folder")
    cases, problems = [], []
    files = [f for f in sorted(input_dir.iterdir()) if f.is_file() and _ending(f.name)]
    channel_files: dict[str, dict[int, Path]] = {}
    for f in files:
        m = CHANNEL_SUFFIX.match(f.name[: -len(_ending(f.name))])
        if m:
            channel_files.setdefault(m.group("case"), {})[int(m.group("channel"))] = f
    sibling_masks = input_dir.parent / input_dir.name.replace("images", "nodes", 1) \
        if input_dir.name.startswith("images") else None
    for case_id, chans in sorted(channel_files.items()):
        ending = _ending(chans[min(chans)].name)
        missing = [c for c in range(num_channels) if c not in chans]
        if missing:
            problems.append(f"{input_dir / f'{case_id}_{missing[0]:04d}{ending}'}: missing channel {missing[0]} of "
                            f"case '{case_id}' (the model needs {num_channels} channel(s))")
            continue
        candidates = [input_dir / f"{case_id}_nodes{ending}"]
        if sibling_masks is not None:
            candidates.append(sibling_masks / f"{case_id}{ending}")
        others = [c.parent / c.name.replace(ending, e) for c in candidates for e in IMAGE_ENDINGS if e != ending]
        mask = next((c for c in candidates + others if c.is_file()), None)
        if mask is None:
            problems.append(f"{candidates[-1]}: node mask of case '{case_id}' not found (expected "
                            f"{' or '.join(str(c) for c in candidates)})")
            continue
        cases.append(InputCase(case_id, [chans[c] for c in range(num_channels)], node_mask_file=mask))
    for sub in sorted(p for p in input_dir.iterdir() if p.is_dir()):
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(sub))
        if not series:
            continue
        masks = [f for f in sorted(sub.iterdir()) if f.is_file() and _ending(f.name)]
        if num_channels != 1:
            problems.append(f"{sub}: DICOM input holds one channel, the model needs {num_channels}")
        elif len(series) > 1:
            problems.append(f"{sub}: {len(series)} DICOM series in one folder; keep one series per case folder")
        elif len(masks) != 1:
            problems.append(f"{sub}: expected exactly one node mask (NIfTI/NRRD/MHA) beside the DICOM series, "
                            f"found {len(masks)}")
        else:
            cases.append(InputCase(sub.name, dicom_dir=sub, node_mask_file=masks[0]))
    seen: dict[str, int] = {}
    for c in cases:
        seen[c.case_id] = seen.get(c.case_id, 0) + 1
    for c in list(cases):
        if seen[c.case_id] > 1:
            problems.append(f"{input_dir}: case id '{c.case_id}' is given twice (files and a DICOM folder); rename one")
        elif not SAFE_CASE_ID.match(c.case_id):
            problems.append(f"{c.node_mask_file}: case id '{c.case_id}' is not a safe file name (use letters, digits, "
                            "'_', '-', '.'; no leading '.' or '-'); rename the files")
        else:
            continue
        cases.remove(c)
    problems = list(dict.fromkeys(problems))
    cases.sort(key=lambda c: c.case_id)
    if not cases and not problems:
        raise LNMError(f"-i {input_dir}: no cases found (expected <case>_0000.nii.gz + <case>_nodes.nii.gz, an "
                       "imagesTs/ folder beside nodesTs/, or one DICOM folder per case)")
    return cases, problems


def read_case_images(case: InputCase) -> list[sitk.Image]:
    """The image channels of one input case (NIfTI files or its DICOM series)."""
    if case.dicom_dir is not None:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(case.dicom_dir)))
        try:
            return [reader.Execute()]
        except RuntimeError as e:
            raise LNMError(f"{case.dicom_dir}: DICOM series cannot be read ({str(e).strip().splitlines()[-1][:150]})") from None
    return [read_image(f) for f in case.image_files]


@dataclass
class PreprocessedCase:
    """What a worker hands back: the crops, or the one-line reason the case failed; for a binary node mask,
    the line saying it was split into components and where the instance mask was written."""
    case_id: str
    crops: dict | None = None
    error: str = ""
    split_note: str | None = None
    instance_mask_file: Path | None = None


def load_and_preprocess(case: InputCase, plans: Plans, output_dir: Path,
                        configuration: ConfigurationPlan | None = None) -> PreprocessedCase:
    """Read, check and crop one case (runs in a worker process). A binary node mask is split into its
    26-connected components, written as ``<case>_nodes.nii.gz`` into ``output_dir`` so the node ids of the
    outputs point to voxels. Bad input (LNMError, SimpleITK read errors) is handed back as the case's one-line
    error; anything else is a bug of ours and surfaces with its traceback."""
    try:
        images = read_case_images(case)
        mask, split_note = as_instance_mask(read_instance_mask(case.node_mask_file), str(case.node_mask_file))
        check_case_images(images, case.image_files or [case.dicom_dir], mask, case.node_mask_file)
    except LNMError as e:
        return PreprocessedCase(case.case_id, error=str(e))
    instance_file = None
    if split_note:
        instance_file = Path(output_dir) / f"{case.case_id}_nodes.nii.gz"
        with atomic_path(instance_file, suffix=".nii.gz") as tmp:
            sitk.WriteImage(mask, str(tmp), useCompression=True)
        split_note += f"; instances written to {instance_file}"
    if configuration is not None and isinstance(configuration.network, RadiomicsTopology):
        inputs = radiomics_case_inputs(images, mask, configuration.network)
    else:
        inputs = preprocess_images(images, mask, plans)
    return PreprocessedCase(case.case_id, inputs, "", split_note, instance_file)


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
    """Stations from ``nodes.csv`` in the input folder, or ``nodesTs.csv`` beside ``imagesTs/``; else None and
    the warning line saying why every node's station will be ``unknown``."""
    candidates = [input_dir / "nodes.csv"]
    if input_dir.name.startswith("images"):
        candidates.append(input_dir.parent / (input_dir.name.replace("images", "nodes", 1) + ".csv"))
    for p in candidates:
        if p.is_file():
            df = read_csv_text(p, "node table", required=("case", "node"))
            if "station" not in df.columns:
                return None, f"{p}: no 'station' column; stations.csv lists every node under station '{UNKNOWN_STATION}'"
            table = pd.DataFrame({"case": df["case"], "node": node_ids(df["node"], p), "station": df["station"]})
            dup = table[table.duplicated(["case", "node"])]
            if len(dup):
                raise LNMError(f"{p}: node {dup.node.iloc[0]} of case '{dup.case.iloc[0]}' is listed more than once")
            return table, ""
    return None, (f"{input_dir}: no nodes.csv with a station column; stations.csv lists every node under station "
                  f"'{UNKNOWN_STATION}'")


UNKNOWN_STATION = "unknown"
CASE_ROWS = "cases"   # cases/<case>.csv: one case's node rows, written last: the case is done


def case_files(output_dir: Path, case_id: str) -> list[Path]:
    """Every file lnm_predict writes for one case, the one marking it done last."""
    return [output_dir / f"{case_id}_nodes.nii.gz", output_dir / f"{case_id}_probmap.nii.gz",
            output_dir / CASE_ROWS / f"{case_id}.csv"]


def prepare_output(output_dir: Path, info_file: Path, settings: dict, case_ids: list[str], tables: list[Path],
                   overwrite: bool) -> set[str]:
    """Check ``-o``, remove what the previous run there left that this run will not rewrite (its tables, the
    files of cases no longer in the input; with ``overwrite`` everything of it) and return the cases it
    finished with the same settings (skipped). Refuses a folder holding another model's or setting's outputs."""
    if output_dir.exists() and not output_dir.is_dir():
        raise LNMError(f"-o {output_dir}: is a file, not a folder; give a folder for the outputs")
    try:
        (output_dir / CASE_ROWS).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LNMError(f"-o {output_dir}: cannot be created ({e.strerror or e})") from None
    previous: dict = {}
    if info_file.is_file():
        try:
            previous = load_json(info_file)
            assert isinstance(previous, dict) and isinstance(previous.get("cases", []), list)
        except (ValueError, AssertionError):
            if not overwrite:
                raise LNMError(f"{info_file}: damaged; rerun with --overwrite to replace the outputs in {output_dir}") \
                    from None
            previous = {}
    before = previous.get("settings")
    if previous and before != settings and not overwrite:
        changed = [f"{k}: {(before or {}).get(k)} -> {v}" for k, v in settings.items() if (before or {}).get(k) != v]
        raise LNMError(f"{output_dir}: holds predictions made with other settings ({'; '.join(changed)[:300]}); rerun "
                       "with --overwrite to replace them, or choose another -o")
    previous_cases = {str(c) for c in previous.get("cases", [])}
    remove = previous_cases | set(case_ids) if overwrite else previous_cases - set(case_ids)
    for f in tables + [f for c in sorted(remove) for f in case_files(output_dir, c)]:
        f.unlink(missing_ok=True)
    ours = {f.name for c in previous_cases | set(case_ids) for f in case_files(output_dir, c)}
    ours |= {f.name for f in tables} | {info_file.name}
    for leftover in [*output_dir.glob(".*"), *(output_dir / CASE_ROWS).glob(".*")]:   # temp files of a killed run
        if leftover.is_file() and leftover.name[1:].split(".")[0] in {n.split(".")[0] for n in ours}:
            leftover.unlink(missing_ok=True)
    if overwrite:
        return set()
    return {c for c in case_ids if c in previous_cases and (output_dir / CASE_ROWS / f"{c}.csv").is_file()
            and (not settings["probability_maps"] or (output_dir / f"{c}_probmap.nii.gz").is_file())}


def read_case_rows(output_dir: Path, case_id: str) -> pd.DataFrame:
    """The node rows a previous run wrote for one case."""
    df = read_csv_text(output_dir / CASE_ROWS / f"{case_id}.csv", "case rows", required=("case", "node", "probability"))
    probability_columns = [c for c in df.columns if c.startswith("probability")]
    return df.astype({"node": np.int64, **{c: float for c in probability_columns}})


def predict_folder(input_dir: Path, output_dir: Path, model_folder: Path, folds: list[str] | None = None,
                   checkpoint: str = "checkpoint_final.pth", device: str = "cpu", num_processes: int = 0,
                   mirror: bool = True, save_probmaps: bool = True, progress: bool = True, overwrite: bool = False,
                   num_parts: int = 1, part_id: int = 0) -> dict:
    """Predict every case (of part ``part_id`` of ``num_parts``: cases sorted by id, every num_parts-th one);
    cases already in ``output_dir`` from the same settings are skipped unless ``overwrite``. ``num_processes``:
    background workers preparing the cases (0: this process does). Returns a summary; raises LNMError at the
    end if any case failed."""
    t0 = time.time()
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise LNMError(f"-part_id must lie in 0..num_parts-1 and -num_parts be at least 1 (got -num_parts {num_parts} "
                       f"-part_id {part_id})")
    output_dir, suffix = Path(output_dir), f"_part{part_id}" if num_parts > 1 else ""
    if output_dir.exists() and not output_dir.is_dir():
        raise LNMError(f"-o {output_dir}: is a file, not a folder; give a folder for the outputs")
    model = TrainedModel.load(model_folder)
    dev = torch.device(device)
    networks = model.load_scorers(folds, checkpoint, dev, mirror)
    cases, failures = discover_cases(Path(input_dir), len(model.plans.normalization))
    cases = cases[part_id::num_parts]
    failures = failures if part_id == 0 else []   # input problems are reported once, by part 0
    stations, station_warning = station_table(Path(input_dir))
    origin = model_origin(model.folder)
    settings = {"model": str(origin), "plans_identifier": model.plans.identifier(), "folds": list(networks),
                "checkpoint": checkpoint, "test_time_mirroring": mirror, "probability_maps": save_probmaps}
    info_file = output_dir / f"predict_info{suffix}.json"
    tables = [output_dir / f"{name}{suffix}.csv" for name in ("nodes", "stations", "patients")]
    case_ids = [c.case_id for c in cases]
    done = prepare_output(output_dir, info_file, settings, case_ids, tables, overwrite)
    save_json({"status": "running", "settings": settings, "cases": case_ids,
               "started": datetime.datetime.now().isoformat(timespec="seconds")}, info_file)
    if done and progress:
        print(f"{len(done)} case(s) already predicted in {output_dir}: skipped (--overwrite redoes them)", flush=True)
    todo = [c for c in cases if c.case_id not in done]
    one_line_per_case = progress and not show_progress()
    bar = progress_bar(len(todo), "predict", unit="case") if progress else None
    fold_columns = [f"probability_fold{f}" for f in networks]
    by_id, t_case = {c.case_id: c for c in cases}, time.time()
    for i, prepared in enumerate(_preprocessed(todo, model.plans, num_processes, output_dir, model.configuration), 1):
        case_id, crops = prepared.case_id, prepared.crops
        if prepared.error:
            failures.append(prepared.error)
        else:
            if prepared.split_note:
                print(prepared.split_note, flush=True)
                by_id[case_id].node_mask_file = prepared.instance_mask_file
            per_fold = {f: score(crops) for f, score in networks.items()}
            mean = np.mean(list(per_fold.values()), axis=0)
            ids = crops["node_ids"].tolist()
            rows = pd.DataFrame({"case": case_id, "node": np.asarray(ids, dtype=np.int64), "probability": mean,
                                 **{col: per_fold[f] for col, f in zip(fold_columns, networks)}},
                                columns=["case", "node", "probability"] + fold_columns)
            if save_probmaps:
                write_probability_map(by_id[case_id].node_mask_file, dict(zip(ids, mean.tolist())),
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
    written = [c for c in case_ids if (output_dir / CASE_ROWS / f"{c}.csv").is_file()]
    split_cases = {c for c in written if (output_dir / f"{c}_nodes.nii.gz").is_file()}
    parts = [read_case_rows(output_dir, c) for c in written]
    nodes = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["case", "node", "probability"])
    nodes = nodes[["case", "node", "probability"] + fold_columns]
    nodes.insert(2, "station", UNKNOWN_STATION)
    if stations is not None and split_cases:   # split masks have new node ids: their station rows do not apply
        stations = stations[~stations["case"].isin(split_cases)]
    if stations is not None and len(nodes):
        merged = nodes.drop(columns="station").merge(stations, on=["case", "node"], how="left")
        nodes = merged[nodes.columns].fillna({"station": UNKNOWN_STATION}).replace({"station": {"": UNKNOWN_STATION}})
        n_unknown = int((nodes["station"] == UNKNOWN_STATION).sum())
        station_warning = f"{n_unknown} node(s) have no station in the input's node table: station " \
                          f"'{UNKNOWN_STATION}' in stations.csv" if n_unknown else ""
    if station_warning and len(nodes):
        print(f"warning: {station_warning}", file=sys.stderr, flush=True)
    save_csv_atomic(nodes, tables[0])
    if len(nodes):
        save_csv_atomic(rollup(nodes, "station"), tables[1])
        save_csv_atomic(rollup(nodes, "patient"), tables[2])
    info = {"status": "finished", "settings": settings, "cases": case_ids,
            ("model_zip" if origin != model.folder.absolute() else "model_folder"): str(origin),
            "trainer": model.trainer_name, "configuration": model.configuration.name,
            "plans_name": model.plans.plans_name, "plans_version": model.plans.plans_version,
            "folds": list(networks), "checkpoint": checkpoint, "test_time_mirroring": mirror,
            "lnm_auto_version": lnm_auto.__version__, "device": device, "part": f"{part_id} of {num_parts}",
            "n_cases": len(nodes["case"].unique()), "n_nodes": len(nodes), "skipped_already_done": sorted(done),
            "cases_without_nodes": sorted(set(written) - set(nodes["case"])), "failed": failures,
            "outputs": [str(t.name) for t in tables if t.is_file()], "rollup": "max over nodes (documentation/evaluation.md)",
            "finished": datetime.datetime.now().isoformat(timespec="seconds"), "wall_time_s": round(time.time() - t0, 1)}
    save_json(info, info_file)
    if failures:
        raise LNMError(f"{len(failures)} case(s) failed (the others are in {output_dir}):\n" + "\n".join(failures))
    return info


def _preprocessed(cases: list[InputCase], plans: Plans, num_processes: int, output_dir: Path,
                  configuration: ConfigurationPlan | None = None):
    """Yield each case's PreprocessedCase in order: cut in this process (``num_processes`` 0), or by that many
    background workers (which end with this process) while the caller scores the previous case, at most
    2 x workers cases in flight."""
    if num_processes <= 0:
        for c in cases:
            yield load_and_preprocess(c, plans, output_dir, configuration)
        return
    with ProcessPoolExecutor(num_processes, initializer=worker_process_init, initargs=(os.getpid(),)) as pool:
        pending: deque = deque()
        it = iter(cases)
        for c in it:
            pending.append(pool.submit(load_and_preprocess, c, plans, output_dir, configuration))
            if len(pending) >= 2 * num_processes:
                break
        while pending:
            yield pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(load_and_preprocess, nxt, plans, output_dir, configuration))
