"""The chosen model as one zip: ``lnm_export_model -d DATASET`` (no ``-c``) packs what
``lnm_find_best_configuration`` chose, and ``lnm_predict -m THE_ZIP`` predicts with it exactly as
``lnm_predict -d DATASET`` does on the machine that made it (same members, folds, calibration map).

The zip holds ``DatasetXXX/inference_instructions.json`` (the choice, its folds and calibration map) and each
chosen model as ``lnm_export_model -c`` packs it (``DatasetXXX/<model folder>/...``). For the size rule (no model
was chosen) it holds one model folder's plans, dataset.json and fingerprint without any fold: what the size rule
reads a case's channels and the training intensities (the domain check) from; no network travels.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch

from lnm_auto.evaluation.crossval import INSTRUCTIONS_FILE, load_instructions
from lnm_auto.inference.detector_zip import check_detector_weights, pack_detector
from lnm_auto.inference.ensemble import chosen_models, size_rule_source
from lnm_auto.inference.model import (EXTRACTED_FROM, TrainedModel, extract_zip, pack_model,
                                      refuse_foreign_target)
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import atomic_path, json_safe
from lnm_auto.utils.stale_temps import remove_stale_temp_files

CHOSEN_CHECKPOINT = "checkpoint_final.pth"   # what lnm_find_best_configuration chose with


def export_choice(dataset_results: Path, output_zip: Path, folds: list[str] | None = None,
                  checkpoint: str = CHOSEN_CHECKPOINT, detector=None) -> tuple[Path, list[Path]]:
    """Pack the dataset's choice (``folds``: default the folds it was chosen on) into ``output_zip``, written
    atomically; with ``detector`` (``detection.detector.DetectorModel``) its model folder too
    (``inference/detector_zip.py``). Returns (the zip, the chosen model folders; [] for the size rule)."""
    dataset_results = Path(dataset_results)
    chosen = chosen_models(dataset_results)
    if chosen is None:
        raise LNMError(f"{dataset_results}: lnm_find_best_configuration has not run, so there is no choice to export; "
                       "run it, or export one model with -c CONFIGURATION")
    if checkpoint != CHOSEN_CHECKPOINT:
        raise LNMError(f"-chk {checkpoint}: the choice was made with {CHOSEN_CHECKPOINT} of its folds; to pack "
                       "another checkpoint, export one model with -c CONFIGURATION")
    instructions = dict(load_instructions(dataset_results))
    recorded = [str(f) for f in instructions.get("folds") or []] if isinstance(instructions.get("folds"), list) else []
    if not chosen and folds:
        raise LNMError("-f does not apply: lnm_find_best_configuration chose the size rule (short axis), which has "
                       "no folds; leave it out, or export one model with -c CONFIGURATION")
    folds = [str(f) for f in folds] if folds else recorded or None
    models = [TrainedModel.load(f) for f in chosen] or [TrainedModel.load(size_rule_source(dataset_results))]
    packed = {}
    for model in models if chosen else []:   # fail early on missing or damaged folds
        packed[model.folder.name] = folds or model.default_folds(model.model_file(checkpoint))
        model.load_scorers(packed[model.folder.name], checkpoint, torch.device("cpu"))
    if detector is not None:
        check_detector_weights(detector)      # a damaged or crafted detector fails here, before the zip is written
    output_zip = Path(output_zip)
    refuse_foreign_target(output_zip)
    remove_stale_temp_files(output_zip)   # what a killed export of this zip left (our temp names only)
    if chosen:
        instructions["folds"] = folds or next(iter(packed.values()))
    with atomic_path(output_zip, suffix=".zip") as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for model in models:
                pack_model(z, model, packed.get(model.folder.name, []), checkpoint)
            z.writestr(f"{dataset_results.name}/{INSTRUCTIONS_FILE}",
                       json.dumps(json_safe(instructions), indent=2, allow_nan=False) + "\n")
            if detector is not None:
                pack_detector(z, dataset_results.name, detector)
    return output_zip, chosen


def exported_choice(model: str | Path) -> Path | None:
    """``-m``'s dataset folder when it is a choice (a zip of ``export_choice`` or a folder holding
    inference_instructions.json), else None (one model: ``model.find_model``)."""
    path = Path(model)
    if path.is_dir():
        return path if (path / INSTRUCTIONS_FILE).is_file() else None
    if not (path.is_file() and zipfile.is_zipfile(path)):
        return None
    with zipfile.ZipFile(path) as z:
        if not any(n.count("/") == 1 and n.endswith(f"/{INSTRUCTIONS_FILE}") for n in z.namelist()):
            return None
    target = extract_zip(path)
    found = list(target.glob(f"*/{INSTRUCTIONS_FILE}"))
    if len(found) != 1:
        raise LNMError(f"{path}: expected exactly one DatasetXXX/{INSTRUCTIONS_FILE} in the zip")
    dataset = found[0].parent
    for folder in dataset.glob("*__*__*"):   # the outputs name the zip, not the temporary folder
        EXTRACTED_FROM[folder] = Path(path).absolute() / folder.name
    return dataset
