"""Trained models on disk: finding them, loading their folds, packing them into a zip.

A model folder is ``$LNM_results/DatasetXXX_Name/<Trainer>__<Plans>__<configuration>/`` holding
plans.json, dataset.json, dataset_fingerprint.json and fold_<k>/checkpoint_*.pth: enough on its own
for inference, on any machine.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from typing import Callable

import numpy as np
import torch

from lnm_auto.configurations import ConfigurationKind, kind_of
from lnm_auto.configurations.base import CLASSIFIER_MODEL_FILE
from lnm_auto.evaluation.calibration import CALIBRATION_FILE, checked_calibration
from lnm_auto.evaluation.crossval_inputs import changed_folds, read_json
from lnm_auto.inference.detector_zip import check_detector_weights, pack_detector
from lnm_auto.plans.plans import ConfigurationPlan, Plans
from lnm_auto.training.progress import training_logs
from lnm_auto.training.registry import exact_trainer_hint
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import atomic_path, load_json
from lnm_auto.utils.paths import nearest_hint, resolve_dataset_name
from lnm_auto.utils.stale_temps import remove_stale_temp_files

# the Platt map lnm_find_best_configuration fitted on the model's out-of-fold predictions travels with it
MODEL_FILES = ("plans.json", "dataset.json", "dataset_fingerprint.json", CALIBRATION_FILE)


@dataclass
class TrainedModel:
    folder: Path
    plans: Plans
    configuration: ConfigurationPlan
    dataset_json: dict
    trainer_name: str

    @classmethod
    def load(cls, folder: Path) -> "TrainedModel":
        """A model folder's plans, configuration and dataset.json."""
        folder = Path(folder)
        for f in MODEL_FILES[:2]:
            if not (folder / f).is_file():
                raise LNMError(f"{folder}: not a model folder ({f} is missing)")
        plans = Plans.load(folder / "plans.json")
        trainer, _, config = _split_name(folder.name)
        try:
            dataset_json = load_json(folder / "dataset.json")
        except ValueError as e:
            raise LNMError(f"{folder / 'dataset.json'}: not valid JSON ({e})") from None
        return cls(folder, plans, plans.configuration(config), dataset_json, trainer)

    def available_folds(self, checkpoint: str = "checkpoint_final.pth") -> list[str]:
        """Folds that have ``checkpoint``, numbered folds first."""
        return sorted((p.parent.name.removeprefix("fold_") for p in self.folder.glob(f"fold_*/{checkpoint}")),
                      key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))

    def default_folds(self, checkpoint: str) -> list[str]:
        """All cross-validation folds of the plans (fold 'all' only when asked for with -f all); a partial set is
        refused, so an ensemble is never silently made of fewer folds than were planned. A model from a zip: the
        folds the zip holds (lnm_export_model -f chose them)."""
        available = self.available_folds(checkpoint)
        planned = [str(k) for k in range(self.plans.n_folds)]
        if not available:
            raise self.missing_checkpoint(checkpoint)
        if Path(self.folder) in EXTRACTED_FROM:   # a zip holds the folds its exporter chose: those are the model
            return available
        missing = [f for f in planned if f not in available]
        if missing and available == ["all"]:
            return available
        if missing:
            raise LNMError(f"{self.folder}: fold(s) {', '.join(missing)} of {self.plans.n_folds} have no {checkpoint} "
                           f"(trained folds: {', '.join(available)}); train them, or ask for a partial ensemble with "
                           f"-f {' '.join(f for f in available if f != 'all')}")
        return planned

    def calibration(self, folds: list[str], checkpoint: str = "checkpoint_final.pth") -> tuple[dict | None, str]:
        """The Platt map ``lnm_find_best_configuration`` fitted on this model's out-of-fold predictions, checked, and
        "" -- or None and why not: never cross-validated, or a fold model (of ``folds``, with ``checkpoint``) is not
        the one the map was fitted for (retrained since, or another checkpoint)."""
        path = self.folder / CALIBRATION_FILE
        if not path.is_file():
            return None, ""
        data = checked_calibration(read_json(path), str(path))
        changed = changed_folds(data.get("model_files"), self.folder, folds, self.model_file(checkpoint))
        if changed:
            return None, (f"{path}: fitted for other fold models than fold(s) {', '.join(changed)} with {checkpoint} "
                          "(retrained since, or another -chk); probabilities left uncalibrated: re-run "
                          "lnm_find_best_configuration")
        return data, ""

    @property
    def kind(self) -> ConfigurationKind:
        """The configuration kind (lnm_auto.configurations): how its fold models are stored, loaded and scored."""
        return kind_of(self.configuration)

    def model_file(self, checkpoint: str) -> str:
        """The file a fold keeps its model in: the checkpoint, or radiomics_model.json for a classifier."""
        return self.kind.model_file(checkpoint)

    def load_scorers(self, folds: list[str] | None, checkpoint: str, device: torch.device,
                     mirror: bool = True) -> dict[str, Callable[[dict], np.ndarray]]:
        """Per fold (default: every planned fold), a function from one case's prepared inputs (crops, or radiomics
        features) to its nodes' probabilities: the one interface lnm_predict ensembles over. Each fold model is
        loaded by its kind, weights-only (networks) or as checked JSON (classifiers)."""
        model_file = self.model_file(checkpoint)
        available = self.available_folds(model_file)
        if not available and not self.kind.fitted_once:
            raise self.missing_checkpoint(checkpoint)
        folds = folds or self.default_folds(model_file)
        missing = [f for f in folds if f not in available]
        if missing:
            raise LNMError(f"{self.folder}: no {model_file} for fold(s) {', '.join(missing)}; trained folds: "
                           f"{', '.join(available) or 'none'}")
        kind, plans, config = self.kind, self.plans, self.configuration
        models = {f: kind.load_fold_model(self.folder / f"fold_{f}" / model_file, plans, config, device)
                  for f in folds}
        return {f: kind.scorer(m, plans, config, device, mirror) for f, m in models.items()}

    def missing_checkpoint(self, checkpoint: str) -> LNMError:
        """No fold has ``checkpoint``: a misspelt name gets the nearest checkpoint that exists, else the
        folds are untrained."""
        present = sorted({p.name for p in self.folder.glob("fold_*/*.pth")})
        if present:
            return LNMError(f"{self.folder}: no fold has a file {checkpoint}{nearest_hint(checkpoint, present, '-chk ')} "
                            f"(checkpoints there: {', '.join(present)})")
        return LNMError(f"{self.folder}: no fold has a {checkpoint} yet (trained folds: none); train them with "
                        f"lnm_train")


def _split_name(name: str) -> tuple[str, str, str]:
    parts = name.split("__")
    if len(parts) != 3:
        raise LNMError(f"'{name}' is not a model folder name (<Trainer>__<Plans>__<configuration>)")
    return parts[0], parts[1], parts[2]


def list_models(results_root: Path) -> list[Path]:
    """Model folders under ``results_root`` with at least one trained fold."""
    if not Path(results_root).is_dir():
        return []
    return sorted(p for p in Path(results_root).glob("Dataset*/*__*__*")
                  if p.is_dir() and (any(p.glob("fold_*/checkpoint_*.pth")) or any(p.glob(f"fold_*/{CLASSIFIER_MODEL_FILE}"))))


def find_model(results_root: Path | None, dataset=None, configuration: str | None = None,
               trainer: str = "LNMTrainer", plans_name: str = "LNMPlans", model: str | Path | None = None) -> Path:
    """The model folder to use: ``-m`` (folder or zip), else ``-d/-c``, else the only trained model."""
    if model:
        path = Path(model)
        if path.is_file() and zipfile.is_zipfile(path):
            return unpack_model_zip(path)
        if path.is_dir():
            return path
        raise LNMError(f"-m {model}: neither a model folder nor a model zip")
    if results_root is None:
        raise LNMError("$LNM_results is not set: export LNM_results=/path/to/folder, pass --results, or give -m MODEL")
    if dataset is not None and configuration:
        name = resolve_dataset_name(dataset, results_root)
        folder = Path(results_root) / name / f"{trainer}__{plans_name}__{configuration}"
        if not folder.is_dir():
            raise _missing_model(folder, configuration, trainer)
        return folder
    models = list_models(results_root)
    if dataset is not None:
        name = resolve_dataset_name(dataset, results_root)
        models = [m for m in models if m.parent.name == name]
    if configuration:
        models = [m for m in models if m.name.endswith(f"__{configuration}")]
    if len(models) == 1:
        return models[0]
    if not models:
        raise LNMError(f"no trained model in {results_root}; train one with lnm_train, or give -m MODEL_DIR_OR_ZIP")
    names = "; ".join(f"{m.parent.name}/{m.name}" for m in models)
    raise LNMError(f"several trained models ({names}): choose with -d DATASET -c CONFIG [-tr TRAINER], or -m MODEL")


def _missing_model(folder: Path, configuration: str, trainer: str) -> LNMError:
    """Why ``folder`` is not there: a configuration the plans do not have (with the nearest one), a misspelt
    trainer or plans name (nearest model folder), or a model not trained yet."""
    models = sorted(p for p in folder.parent.glob("*__*__*") if p.is_dir())
    planned: set[str] = set()
    for m in models:
        try:
            planned.update(Plans.load(m / "plans.json").configurations)
        except (LNMError, OSError, ValueError, KeyError, TypeError):
            continue   # a damaged model folder does not hide the other suggestions
    if planned and configuration not in planned:
        return LNMError(f"configuration '{configuration}' is not in the plans of {folder.parent.name}"
                        f"{nearest_hint(configuration, planned, '-c ')} (planned: {', '.join(sorted(planned))})")
    names = [m.name for m in models]
    plans_name = folder.name.split("__")[1]
    exact = exact_trainer_hint(trainer, names, plans_name, configuration)
    if exact:   # the trainer's class was trained under another -tr name (LNMTrainer_1epochs): say which to pass
        return LNMError(f"{folder}: no such model{exact}")
    trained = f" (models there: {', '.join(names)})" if names else ""
    return LNMError(f"{folder}: no such model{nearest_hint(folder.name, names)}{trained}; to train it: lnm_train "
                    f"{folder.parent.name} {configuration} FOLD -tr {trainer}")


def export_model(model_folder: Path, output_zip: Path, folds: list[str] | None = None,
                 checkpoint: str = "checkpoint_final.pth", detector=None) -> Path:
    """Pack what inference needs (plans, dataset.json, fingerprint, the folds' checkpoints - or radiomics models -,
    validation metrics and training logs) into one zip, written atomically; with ``detector``
    (``detection.detector.DetectorModel``) its model folder too (``inference/detector_zip.py``)."""
    model = TrainedModel.load(model_folder)
    folds = folds or model.available_folds(model.model_file(checkpoint))
    model.load_scorers(folds, checkpoint, torch.device("cpu"))   # fail early on missing/damaged folds
    if detector is not None:
        check_detector_weights(detector)      # a damaged or crafted detector fails here, before the zip is written
    refuse_foreign_target(Path(output_zip))
    remove_stale_temp_files(output_zip)   # what a killed export of this zip left (our temp names only)
    with atomic_path(output_zip, suffix=".zip") as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            pack_model(z, model, folds, checkpoint)
            if detector is not None:
                pack_detector(z, Path(model_folder).parent.name, detector)
    return output_zip


def pack_model(z: zipfile.ZipFile, model: TrainedModel, folds: list[str], checkpoint: str) -> None:
    """Write one model's files into ``z`` under ``DatasetXXX/<model folder>/``: plans, dataset.json, fingerprint,
    calibration map, and per fold of ``folds`` its model file, validation metrics and training logs."""
    model_folder = model.folder
    base = f"{model_folder.parent.name}/{model_folder.name}"
    for f in MODEL_FILES:
        if (model_folder / f).is_file():
            z.write(model_folder / f, f"{base}/{f}")
    for fold in folds:
        fd = model_folder / f"fold_{fold}"
        logs = [p.relative_to(fd).as_posix() for p in training_logs(fd)]
        for f in [model.model_file(checkpoint), "validation/metrics.json", *logs]:
            if (fd / f).is_file():
                z.write(fd / f, f"{base}/fold_{fold}/{f}")


def refuse_foreign_target(output_zip: Path) -> None:
    """lnm_export_model replaces only a model zip (one it may have written before: one model or a choice of
    several), never another file."""
    if output_zip.is_dir():
        raise LNMError(f"-o {output_zip}: is a folder; give the path of the zip to write, e.g. "
                       f"{output_zip / 'model.zip'}")
    if output_zip.exists() or output_zip.is_symlink():
        try:
            with zipfile.ZipFile(output_zip) as z:
                is_model = len([n for n in z.namelist() if n.count("/") == 2 and n.endswith("/plans.json")]) >= 1
        except (zipfile.BadZipFile, OSError, EOFError):
            is_model = False
        if not is_model or output_zip.is_symlink():
            raise LNMError(f"-o {output_zip}: exists and is not a model zip of lnm_export_model; refusing to replace "
                           "it: choose another -o")


# model folders extracted from zips -> the zip they came from (outputs name the zip, not the temp folder)
EXTRACTED_FROM: dict[Path, Path] = {}


def model_origin(folder: Path) -> Path:
    """The zip a model folder was extracted from, else the folder itself (absolute)."""
    return EXTRACTED_FROM.get(Path(folder), Path(folder)).absolute()


def unsafe_member(name: str) -> bool:
    """A zip member that would land outside the extraction folder: absolute, drive-letter, backslash or
    '..' paths (zipfile would sanitise some of them silently; a model zip never holds any)."""
    return (name.startswith(("/", "\\")) or "\\" in name or ".." in Path(name).parts
            or (len(name) > 1 and name[1] == ":"))


# float weights barely compress, text (JSON models, logs) some 10x; a member packed 200x tighter is a zip bomb
MAX_COMPRESSION_RATIO = 200
RATIO_CHECKED_ABOVE_BYTES = 16 << 20


def _refuse_oversized(path: Path, members: list[zipfile.ZipInfo], target: Path) -> None:
    """Refuse a zip whose members would fill the disk when extracted: one member compressed more than
    MAX_COMPRESSION_RATIO times (a zip bomb), or more bytes in all than the extraction folder has free. The
    declared sizes bind: zipfile stops reading a member at its declared size (and the CRC check fails)."""
    for info in members:
        packed = max(info.compress_size, 1)
        if info.file_size > RATIO_CHECKED_ABOVE_BYTES and info.file_size > MAX_COMPRESSION_RATIO * packed:
            raise LNMError(f"{path}: member '{info.filename}' would unpack to {info.file_size / 1e6:.0f} MB from "
                           f"{info.compress_size / 1e6:.2f} MB (a zip bomb?); refused")
    total, free = sum(i.file_size for i in members), shutil.disk_usage(target).free
    if total > free:
        raise LNMError(f"{path}: unpacks to {total / 1e9:.1f} GB, {target.parent} has {free / 1e9:.1f} GB free; "
                       "refused (set TMPDIR to a folder with room)")


def unpack_model_zip(path: Path) -> Path:
    """Extract a model zip into a temporary folder (kept for the process' lifetime) -> the model folder."""
    target = extract_zip(path)
    plans = list(target.glob("*/*/plans.json"))
    if len(plans) != 1:
        raise LNMError(f"{path}: expected exactly one model (DatasetXXX/<Trainer>__<Plans>__<config>/plans.json) in the zip")
    EXTRACTED_FROM[plans[0].parent] = Path(path)
    return plans[0].parent


def extract_zip(path: Path) -> Path:
    """Extract a zip of lnm_export_model into a temporary folder (kept for the process' lifetime), refusing unsafe
    paths, links and zip bombs -> the folder."""
    target = Path(tempfile.mkdtemp(prefix="lnm_model_"))
    atexit.register(shutil.rmtree, target, ignore_errors=True)   # removed when the process ends
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if unsafe_member(info.filename):
                    raise LNMError(f"{path}: unsafe path '{info.filename}' in the zip; refused (a model zip from "
                                   "lnm_export_model holds only DatasetXXX/<model>/... paths)")
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise LNMError(f"{path}: symbolic link '{info.filename}' in the zip; refused")
            _refuse_oversized(path, z.infolist(), target)
            z.extractall(target)
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise LNMError(f"{path}: not a valid zip file ({str(e)[:120] or type(e).__name__})") from None
    return target
