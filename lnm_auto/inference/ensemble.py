"""Prediction with an ensemble of models, and with what ``lnm_find_best_configuration`` chose for a dataset.

An ensemble goes through the same three parts as one model (``predictor.predict_with_members``): each case is
read once, prepared for every member, scored by every member's folds (``-f``, ``-chk``), the node probability is
the mean over the members through the ensemble's calibration map; the parts (``-num_parts/-part_id``), resume
and the output rules are one model's. ``nodes.csv`` keeps each member's mean (``probability_<member>``) and
folds; ``<case>_probmap.nii.gz`` shows the ensemble's (calibrated) probability.

The choice (``inference_instructions.json``) is a model, an ensemble, or the size rule (``"chosen": []``: every
node scored by its short axis, no network). ``export_choice.py`` packs it into one zip that ``lnm_predict -m``
predicts with exactly the same way.
"""
from __future__ import annotations

import sys
from pathlib import Path

from lnm_auto.evaluation.calibration import checked_calibration, is_identity
from lnm_auto.evaluation.crossval import INSTRUCTIONS_FILE, load_instructions, model_folders as trained_model_folders
from lnm_auto.evaluation.crossval_inputs import changed_folds
from lnm_auto.inference.members import Member, load_member
from lnm_auto.inference.model import TrainedModel
from lnm_auto.inference.output_folder import OutputFolder
from lnm_auto.inference.predictor import predict_with_members
from lnm_auto.utils.errors import LNMError


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
                     overwrite: bool = False, folds: list[str] | None = None, calibration: dict | None = None,
                     checkpoint: str = "checkpoint_final.pth", num_parts: int = 1, part_id: int = 0) -> dict:
    """Predict with every member (``folds``, default all planned folds, each with ``checkpoint``), average them node
    by node and apply ``calibration`` (the ensemble's own Platt map) to the mean; one member is one model."""
    if not model_folders:   # inference_instructions.json with "chosen": []
        raise LNMError("no model to predict with: lnm_find_best_configuration chose the size rule (short axis), no "
                       "model beat it; to predict with a model anyway, name it (lnm_predict -d DATASET -c CONFIGURATION)")
    out = OutputFolder(output_dir, num_parts, part_id)
    names = [Path(f).name for f in model_folders]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice and (overwrite or not out.info_file.is_file()):   # else -o's record of other settings says so first
        raise LNMError(f"the ensemble names model {twice} twice; give each member once")
    members = [load_member(f, folds, checkpoint, device, mirror) for f in model_folders]
    return predict_with_members(input_dir, out, members, device, num_processes, mirror, save_probmaps, progress,
                                overwrite, calibration)


def chosen_calibration(dataset_results: Path, chosen: list[Path], folds: list[str] | None,
                       checkpoint: str) -> tuple[dict | None, list[str] | None]:
    """The choice's calibration map and folds (``folds`` overrides the recorded ones). The map is left out, with a
    warning line, when a member's fold models are not those it was chosen with (retrained since, or another -chk)."""
    path = Path(dataset_results) / INSTRUCTIONS_FILE
    instructions = load_instructions(dataset_results)
    calibration = checked_calibration(instructions.get("calibration", {"method": "identity"}), str(path))
    recorded = instructions.get("folds")
    folds = folds or ([str(f) for f in recorded] if isinstance(recorded, list) and recorded else None)
    digests = instructions.get("model_files") if isinstance(instructions.get("model_files"), dict) else {}
    for member in chosen:   # the choice and its map were made with these fold models: other ones void the map
        model = TrainedModel.load(member)
        member_folds = folds or [str(k) for k in range(model.plans.n_folds)]
        changed = changed_folds(digests.get(member.name), member, member_folds, model.model_file(checkpoint))
        if changed and not is_identity(calibration):
            print(f"warning: {member.name}: fold(s) {', '.join(changed)} are not the fold models "
                  f"lnm_find_best_configuration chose it with (retrained since, or another -chk); its calibration "
                  f"map is not applied (re-run lnm_find_best_configuration)", file=sys.stderr, flush=True)
            calibration = None
    return calibration, folds


def size_rule_source(dataset_results: Path) -> Path:
    """The model folder the size rule reads the dataset's channels and training intensities from (no network runs)."""
    models = [m for m in trained_model_folders(dataset_results) if (m / "plans.json").is_file()]
    if not models:
        raise LNMError(f"{Path(dataset_results) / INSTRUCTIONS_FILE}: the size rule was chosen but no model folder of "
                       f"{dataset_results} is left to read the dataset's channels from; re-run "
                       "lnm_find_best_configuration")
    return models[0]


def predict_chosen(input_dir: Path, output_dir: Path, dataset_results: Path, device: str = "cpu",
                   num_processes: int = 0, mirror: bool = True, save_probmaps: bool = True, progress: bool = True,
                   overwrite: bool = False, folds: list[str] | None = None, checkpoint: str = "checkpoint_final.pth",
                   num_parts: int = 1, part_id: int = 0, detector=None) -> dict:
    """Predict with what ``lnm_find_best_configuration`` chose for a dataset: its model, its ensemble or the size
    rule, on the folds it was chosen on (``folds`` overrides), through the choice's calibration map. The size rule
    has no folds nor checkpoints: ``folds`` or another ``checkpoint`` with it is one line. ``detector``
    (``detection.detector.DetectorModel``): finds the nodes of cases without a node mask."""
    dataset_results = Path(dataset_results)
    chosen = chosen_models(dataset_results)
    if chosen is None:
        raise LNMError(f"{dataset_results}: lnm_find_best_configuration has not run; run it, or name a model with -c")
    if not chosen and (folds or checkpoint != "checkpoint_final.pth"):
        raise LNMError("-f and -chk do not apply: lnm_find_best_configuration chose the size rule (short axis), "
                       "which has no folds or checkpoints; leave them out, or name a model with -c CONFIGURATION")
    calibration, folds = chosen_calibration(dataset_results, chosen, folds, checkpoint)
    out = OutputFolder(output_dir, num_parts, part_id)
    if chosen:
        members = [load_member(f, folds, checkpoint, device, mirror) for f in chosen]
    else:
        members = [load_member(size_rule_source(dataset_results), None, size_rule=True)]
    return predict_with_members(input_dir, out, members, device, num_processes, mirror, save_probmaps, progress,
                                overwrite, calibration, detector)


def describe_choice(chosen: list[Path]) -> str:
    """The choice in words, as lnm_predict announces it."""
    return " + ".join(c.name for c in chosen) if chosen else "the size rule (short axis): no model beat it"


__all__ = ["Member", "chosen_models", "predict_chosen", "predict_ensemble", "describe_choice"]
