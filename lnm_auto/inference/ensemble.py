"""Prediction with the model (or ensemble of configurations) chosen by ``lnm_find_best_configuration``.

Each member predicts into ``<output>/members/<model folder name>/`` (its own fold ensemble, as ``lnm_predict``
does for one model); the ensemble's node probability is the mean over the members, rolled up to stations and
patients by the usual max rule; probability maps are written from the (instance) node masks.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from lnm_auto.evaluation.calibration import apply_calibration, checked_calibration, is_identity
from lnm_auto.evaluation.crossval_inputs import changed_folds
from lnm_auto.evaluation.crossval import INSTRUCTIONS_FILE, load_instructions, model_folders as trained_model_folders
from lnm_auto.evaluation.rollup import rollup
from lnm_auto.inference.cases import discover_cases, input_locations
from lnm_auto.inference.model import TrainedModel
from lnm_auto.inference.output_folder import prepare_output
from lnm_auto.inference.predictor import UNCALIBRATED, predict_folder, station_table_file, write_probability_map
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import save_csv_atomic, save_json

MEMBERS_DIR = "members"


def chosen_models(dataset_results: Path) -> list[Path] | None:
    """The model folders inference_instructions.json names, or None when there is no choice yet. A file that is
    not the JSON lnm_find_best_configuration writes, or that names a folder outside ``dataset_results``, is one
    line."""
    path = Path(dataset_results) / INSTRUCTIONS_FILE
    instructions = load_instructions(dataset_results)   # damaged JSON: one line naming the file
    if instructions is None:
        return None
    chosen = instructions.get("chosen") if isinstance(instructions, dict) else None
    names = [m.get("model_folder") if isinstance(m, dict) else None for m in chosen] if isinstance(chosen, list) else []
    if not isinstance(chosen, list) or not all(isinstance(n, str) and n for n in names):   # [] : the size rule won
        raise LNMError(f"{path}: no 'chosen' list of model folders; re-run lnm_find_best_configuration")
    root = Path(dataset_results).resolve()
    folders = []
    for name in names:
        folder = Path(dataset_results) / name
        if Path(name).is_absolute() or ".." in Path(name).parts or "\\" in name or folder.resolve().parent != root:
            raise LNMError(f"{path}: chosen model '{name}' is not a model folder inside {dataset_results}; refused "
                           "(re-run lnm_find_best_configuration)")
        folders.append(folder)
    missing = [f for f in folders if not f.is_dir()]
    if missing:
        raise LNMError(f"{path}: chosen model {missing[0]} is gone; re-run lnm_find_best_configuration")
    return folders


def predict_ensemble(input_dir: Path, output_dir: Path, model_folders: list[Path], device: str = "cpu",
                     num_processes: int = 0, mirror: bool = True, save_probmaps: bool = True, progress: bool = True,
                     overwrite: bool = False, folds: list[str] | None = None, calibration: dict | None = None) -> dict:
    """Predict with every member (``folds``, default all planned folds, each), then average them node by node and
    apply ``calibration`` (the ensemble's own Platt map) to the mean."""
    output_dir = Path(output_dir)
    if not model_folders:   # inference_instructions.json with "chosen": []
        raise LNMError("no model to predict with: lnm_find_best_configuration chose the size rule (short axis), no "
                       "model beat it; to predict with a model anyway, name it (lnm_predict -d DATASET -c CONFIGURATION)")
    if len(model_folders) == 1:
        return predict_folder(input_dir, output_dir, model_folders[0], folds, device=device,
                              num_processes=num_processes, mirror=mirror, save_probmaps=save_probmaps,
                              progress=progress, overwrite=overwrite, calibration=calibration)
    n_channels = len(TrainedModel.load(model_folders[0]).plans.normalization)
    cases = discover_cases(Path(input_dir), n_channels)[0]
    case_ids = [c.case_id for c in cases]
    table_file = station_table_file(Path(input_dir))
    inputs = input_locations(Path(input_dir), cases, [table_file] if table_file else [])
    settings = {"ensemble": [str(Path(f).absolute()) for f in model_folders], "folds": folds,
                "test_time_mirroring": mirror, "probability_maps": save_probmaps, "calibration": calibration}
    info_file = output_dir / "predict_info.json"
    tables = [output_dir / f"{t}.csv" for t in ("nodes", "stations", "patients")]
    _, _, files = prepare_output(output_dir, info_file, settings, case_ids, tables, overwrite, inputs)
    save_json({"status": "running", "settings": settings, "cases": case_ids, "files": files}, info_file)
    try:
        info = _predict_members(Path(input_dir), output_dir, model_folders, device, num_processes, mirror,
                                save_probmaps, progress, overwrite, folds, calibration)
    except LNMError as e:
        save_json({"status": "failed", "settings": settings, "cases": case_ids, "files": files, "failed": [str(e)]},
                  info_file)
        raise
    save_json({**info, "settings": settings, "cases": case_ids, "files": files}, info_file)
    return info


def _predict_members(input_dir: Path, output_dir: Path, model_folders: list[Path], device: str, num_processes: int,
                     mirror: bool, save_probmaps: bool, progress: bool, overwrite: bool,
                     folds: list[str] | None, calibration: dict | None) -> dict:
    """Every member's predictions (each in members/<model>/, uncalibrated), their mean node by node through the
    ensemble's calibration map, rolled up."""
    members = {}
    for folder in model_folders:
        out = output_dir / MEMBERS_DIR / folder.name
        if progress:
            print(f"ensemble member {folder.name}", flush=True)
        predict_folder(input_dir, out, folder, folds, device=device, num_processes=num_processes, mirror=mirror,
                       save_probmaps=False, progress=progress, overwrite=overwrite, calibration=None)
        members[folder.name] = pd.read_csv(out / "nodes.csv", dtype={"case": str, "station": str},
                                           keep_default_na=False)
    first = next(iter(members.values()))
    nodes = first[["case", "node", "station"]].copy()
    for name, table in members.items():
        nodes = nodes.merge(table[["case", "node", "probability"]].rename(columns={"probability": f"probability_{name}"}),
                            on=["case", "node"], how="inner")
    mean = nodes[[f"probability_{n}" for n in members]].mean(axis=1).to_numpy()
    nodes.insert(3, "probability", apply_calibration(calibration, mean))
    if not is_identity(calibration):
        nodes.insert(4, UNCALIBRATED, mean)
    save_csv_atomic(nodes, output_dir / "nodes.csv")
    if len(nodes):
        save_csv_atomic(rollup(nodes, "station"), output_dir / "stations.csv")
        save_csv_atomic(rollup(nodes, "patient"), output_dir / "patients.csv")
    if save_probmaps:
        masks = _mask_files(input_dir, output_dir / MEMBERS_DIR / model_folders[0].name, model_folders[0])
        for case, group in nodes.groupby("case"):
            write_probability_map(masks[case], dict(zip(group["node"], group["probability"])),
                                  output_dir / f"{case}_probmap.nii.gz")
    return {"status": "finished", "ensemble": [str(f) for f in model_folders], "members_dir": MEMBERS_DIR,
            "combination": "mean of the members' probabilities", "n_cases": int(nodes["case"].nunique()),
            "n_nodes": len(nodes), "folds": folds or ["all planned folds of each member"],
            "calibration": calibration or "none: the members' mean"}


def _mask_files(input_dir: Path, member_output: Path, model_folder: Path) -> dict[str, Path]:
    """Each case's node mask: the instance mask a member wrote for a split binary mask, else the input's."""
    n_channels = len(TrainedModel.load(model_folder).plans.normalization)
    out = {}
    for case in discover_cases(input_dir, n_channels)[0]:
        split = member_output / f"{case.case_id}_nodes.nii.gz"
        out[case.case_id] = split if split.is_file() else case.node_mask_file
    return out


def predict_chosen(input_dir: Path, output_dir: Path, dataset_results: Path, device: str = "cpu",
                   num_processes: int = 0, mirror: bool = True, save_probmaps: bool = True, progress: bool = True,
                   overwrite: bool = False, folds: list[str] | None = None) -> dict:
    """Predict with what ``lnm_find_best_configuration`` chose for a dataset: its model, its ensemble or the size
    rule, on the folds it was chosen on (``folds`` overrides), through the choice's calibration map."""
    dataset_results = Path(dataset_results)
    chosen = chosen_models(dataset_results)
    if chosen is None:
        raise LNMError(f"{dataset_results}: lnm_find_best_configuration has not run; run it, or name a model with -c")
    path = dataset_results / INSTRUCTIONS_FILE
    instructions = load_instructions(dataset_results)
    calibration = checked_calibration(instructions.get("calibration", {"method": "identity"}), str(path))
    recorded = instructions.get("folds")
    folds = folds or ([str(f) for f in recorded] if isinstance(recorded, list) and recorded else None)
    digests = instructions.get("model_files") if isinstance(instructions.get("model_files"), dict) else {}
    for member in chosen:   # the choice and its map were made with these fold models: retrained ones void the map
        model = TrainedModel.load(member)
        member_folds = folds or [str(k) for k in range(model.plans.n_folds)]
        changed = changed_folds(digests.get(member.name), member, member_folds, model.model_file("checkpoint_final.pth"))
        if changed and not is_identity(calibration):
            print(f"warning: {member.name}: fold(s) {', '.join(changed)} changed since lnm_find_best_configuration "
                  f"chose it; its calibration map is not applied (re-run lnm_find_best_configuration)",
                  file=sys.stderr, flush=True)
            calibration = None
    if chosen:
        return predict_ensemble(input_dir, output_dir, chosen, device, num_processes, mirror, save_probmaps, progress,
                                overwrite, folds, calibration)
    # the size rule: any trained model of the dataset says how many channels a case has and what its training
    # intensities looked like (the domain check); no network runs
    models = [m for m in trained_model_folders(dataset_results) if (m / "plans.json").is_file()]
    if not models:
        raise LNMError(f"{path}: the size rule was chosen but no model folder of {dataset_results} is left to read "
                       "the dataset's channels from; re-run lnm_find_best_configuration")
    return predict_folder(input_dir, output_dir, models[0], device=device, num_processes=num_processes,
                          mirror=mirror, save_probmaps=save_probmaps, progress=progress, overwrite=overwrite,
                          calibration=calibration, size_rule=True)
