"""The node detector in a model zip: ``lnm_export_model`` packs the dataset's detector (or ``--detector FOLDER``)
beside the model, and ``lnm_predict -m THE_ZIP`` finds the nodes of cases without a node mask with it.

In the zip the detector is nnU-Net's model folder, reduced to what prediction reads:
``DatasetXXX/detector/<Trainer>__<Plans>__<configuration>/{dataset.json, plans.json, fold_<k>/<checkpoint>}``,
and ``DatasetXXX/detector/detector.json`` records which folder, folds, checkpoint and lymph-node label. Before
the zip is written every checkpoint is read the way prediction reads it (``torch.load(weights_only=True)``,
``detection/nnunet_predict.load_weights``), so a damaged or crafted detector fails the export, not a later
prediction. The zip's members pass ``model.extract_zip``'s checks like the model's.
"""
from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

from lnm_auto.detection.detector import MODEL_FOLDER_NAME, DetectorModel
from lnm_auto.detection.nnunet_predict import Refused, load_weights
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import load_json

DETECTOR_DIR = "detector"            # DatasetXXX/detector/ in the zip
DETECTOR_RECORD = "detector.json"    # DatasetXXX/detector/detector.json: which folder and label
NO_DETECTOR_LINE = "no detector: the zip predicts cases with node masks only"


def check_detector_weights(detector: DetectorModel) -> None:
    """Every fold's checkpoint loads weights-only, as lnm_predict's detector process loads it; else one line."""
    for fold in detector.folds:
        try:
            load_weights(detector.folder / f"fold_{fold}" / detector.checkpoint)
        except Refused as e:
            raise LNMError(str(e)) from None


def detector_members(dataset_name: str, detector: DetectorModel) -> dict[str, Path]:
    """Zip member name -> file, of the detector's model folder (only what prediction reads)."""
    base = f"{dataset_name}/{DETECTOR_DIR}/{detector.folder.name}"
    members = {f"{base}/{f}": detector.folder / f for f in ("dataset.json", "plans.json")}
    for fold in detector.folds:
        members[f"{base}/fold_{fold}/{detector.checkpoint}"] = detector.folder / f"fold_{fold}" / detector.checkpoint
    return members


def pack_detector(z: zipfile.ZipFile, dataset_name: str, detector: DetectorModel) -> None:
    """Write the detector's model folder and its record (folder, folds, checkpoint, label) into ``z``."""
    for name, path in detector_members(dataset_name, detector).items():
        z.write(path, name)
    record = {"model_folder": detector.folder.name, "folds": list(detector.folds), "checkpoint": detector.checkpoint,
              "label": detector.label, "label_name": detector.label_name,
              "packed_from": str(detector.folder.absolute())}
    z.writestr(f"{dataset_name}/{DETECTOR_DIR}/{DETECTOR_RECORD}", json.dumps(record, indent=2) + "\n")


def packed_line(detector: DetectorModel | None) -> str:
    """What lnm_export_model says of the detector it packed (or that there is none)."""
    if detector is None:
        return NO_DETECTOR_LINE
    return (f"detector packed: {detector.folder.name} (folds {', '.join(detector.folds)}, label {detector.label} "
            f"'{detector.label_name}') from {detector.folder}")


def zip_detector(zip_path: Path, extracted_dataset: Path, label: str | int | None = None) -> DetectorModel | None:
    """The detector packed in a model zip, from the folder it was extracted to (``extracted_dataset``: its
    ``DatasetXXX``); None when the zip has none. ``label`` overrides the recorded lymph-node label. Its record
    (predict_info.json) names the zip and the member folder, not the temporary folder."""
    detector_dir = Path(extracted_dataset) / DETECTOR_DIR
    if not detector_dir.is_dir():
        return None
    member_dir = f"{extracted_dataset.name}/{DETECTOR_DIR}"
    record = _read_record(zip_path, detector_dir, member_dir)
    folder = detector_dir / record["model_folder"]
    origin = f"{Path(zip_path).absolute()}/{member_dir}/{folder.name}"
    try:
        detector = DetectorModel.load(folder, record["label"] if label is None else label, record["checkpoint"])
    except LNMError as e:   # the temporary folder means nothing to the user: name the zip's member instead
        raise LNMError(str(e).replace(str(folder), origin)) from None
    missing = [f for f in record["folds"] if f not in detector.folds]
    if missing:
        raise LNMError(f"{zip_path}: {member_dir}/{DETECTOR_RECORD} lists fold(s) {', '.join(missing)} the zip does "
                       f"not hold; re-export the model with lnm_export_model")
    return dataclasses.replace(detector, folds=tuple(record["folds"]), origin=origin)


def _read_record(zip_path: Path, detector_dir: Path, member_dir: str) -> dict:
    """The zip's detector.json, checked: a model folder name (no path) that the zip holds, folds, checkpoint and
    an integer label."""
    where = f"{zip_path}: {member_dir}/{DETECTOR_RECORD}"
    path = detector_dir / DETECTOR_RECORD
    if not path.is_file():
        raise LNMError(f"{zip_path}: {member_dir}/ holds no {DETECTOR_RECORD}; not a zip of lnm_export_model: "
                       "re-export the model")
    try:
        record = load_json(path)
    except (ValueError, UnicodeDecodeError):
        record = None
    ok = (isinstance(record, dict) and isinstance(record.get("model_folder"), str)
          and MODEL_FOLDER_NAME.match(record["model_folder"]) is not None
          and isinstance(record.get("folds"), list) and record["folds"]
          and all(isinstance(f, str) for f in record["folds"])
          and isinstance(record.get("checkpoint"), str) and "/" not in record["checkpoint"]
          and "\\" not in record["checkpoint"] and isinstance(record.get("label"), int))
    if not ok:
        raise LNMError(f"{where}: damaged (needs model_folder, folds, checkpoint and label); re-export the model "
                       "with lnm_export_model")
    if not (detector_dir / record["model_folder"]).is_dir():
        raise LNMError(f"{where}: names {record['model_folder']}, which the zip does not hold; re-export the model")
    return record
