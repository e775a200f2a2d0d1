"""Prediction with the model (or ensemble of configurations) chosen by ``lnm_find_best_configuration``.

Each member predicts into ``<output>/members/<model folder name>/`` (its own fold ensemble, as ``lnm_predict``
does for one model); the ensemble's node probability is the mean over the members, rolled up to stations and
patients by the usual max rule; probability maps are written from the (instance) node masks.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from lnm_auto.evaluation.crossval import load_instructions
from lnm_auto.evaluation.rollup import rollup
from lnm_auto.inference.model import TrainedModel
from lnm_auto.inference.predictor import discover_cases, predict_folder, write_probability_map
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import save_csv_atomic, save_json

MEMBERS_DIR = "members"


def chosen_models(dataset_results: Path) -> list[Path] | None:
    """The model folders inference_instructions.json names, or None when there is no choice yet."""
    instructions = load_instructions(dataset_results)
    if instructions is None:
        return None
    folders = [Path(dataset_results) / m["model_folder"] for m in instructions["chosen"]]
    missing = [f for f in folders if not f.is_dir()]
    if missing:
        raise LNMError(f"{Path(dataset_results) / 'inference_instructions.json'}: chosen model {missing[0]} is gone; "
                       "re-run lnm_find_best_configuration")
    return folders


def predict_ensemble(input_dir: Path, output_dir: Path, model_folders: list[Path], device: str = "cpu",
                     num_processes: int = 0, mirror: bool = True, save_probmaps: bool = True, progress: bool = True,
                     overwrite: bool = False, folds: list[str] | None = None) -> dict:
    """Predict with every member (``folds``, default all planned folds, each), then average them node by node."""
    output_dir = Path(output_dir)
    if len(model_folders) == 1:
        return predict_folder(input_dir, output_dir, model_folders[0], folds, device=device,
                              num_processes=num_processes, mirror=mirror, save_probmaps=save_probmaps,
                              progress=progress, overwrite=overwrite)
    members = {}
    for folder in model_folders:
        out = output_dir / MEMBERS_DIR / folder.name
        if progress:
            print(f"ensemble member {folder.name}", flush=True)
        predict_folder(input_dir, out, folder, folds, device=device, num_processes=num_processes, mirror=mirror,
                       save_probmaps=False, progress=progress, overwrite=overwrite)
        members[folder.name] = pd.read_csv(out / "nodes.csv", dtype={"case": str, "station": str},
                                           keep_default_na=False)
    first = next(iter(members.values()))
    nodes = first[["case", "node", "station"]].copy()
    for name, table in members.items():
        nodes = nodes.merge(table[["case", "node", "probability"]].rename(columns={"probability": f"probability_{name}"}),
                            on=["case", "node"], how="inner")
    nodes.insert(3, "probability", nodes[[f"probability_{n}" for n in members]].mean(axis=1))
    save_csv_atomic(nodes, output_dir / "nodes.csv")
    if len(nodes):
        save_csv_atomic(rollup(nodes, "station"), output_dir / "stations.csv")
        save_csv_atomic(rollup(nodes, "patient"), output_dir / "patients.csv")
    if save_probmaps:
        masks = _mask_files(Path(input_dir), output_dir / MEMBERS_DIR / model_folders[0].name, model_folders[0])
        for case, group in nodes.groupby("case"):
            write_probability_map(masks[case], dict(zip(group["node"], group["probability"])),
                                  output_dir / f"{case}_probmap.nii.gz")
    info = {"status": "finished", "ensemble": [str(f) for f in model_folders], "members_dir": MEMBERS_DIR,
            "combination": "mean of the members' probabilities", "n_cases": int(nodes["case"].nunique()),
            "n_nodes": len(nodes), "folds": folds or ["all planned folds of each member"]}
    save_json(info, output_dir / "predict_info.json")
    return info


def _mask_files(input_dir: Path, member_output: Path, model_folder: Path) -> dict[str, Path]:
    """Each case's node mask: the instance mask a member wrote for a split binary mask, else the input's."""
    n_channels = len(TrainedModel.load(model_folder).plans.normalization)
    out = {}
    for case in discover_cases(input_dir, n_channels)[0]:
        split = member_output / f"{case.case_id}_nodes.nii.gz"
        out[case.case_id] = split if split.is_file() else case.node_mask_file
    return out
