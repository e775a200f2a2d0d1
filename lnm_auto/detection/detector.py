"""A trained nnU-Net v2 node detector: its model folder checked (``DetectorModel``), found among a dataset's
``lnm_train_detector`` results (``find_dataset_detector``) and run on cases (``run_detector``).

The model folder is nnU-Net's own, ``<Trainer>__<Plans>__<configuration>/`` with dataset.json, plans.json and
``fold_<k>/checkpoint_final.pth``. nnU-Net runs in a process of its own (``nnunet_predict.py``): it builds the
network from the plans itself and reads the checkpoints weights-only (nnU-Net's own loader unpickles them
whole). nnU-Net's folder variables are set only in that process's environment, to the work folder.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from lnm_auto.detection.nnunet_dataset import DETECTOR_DIR, nnunet_dataset_name
from lnm_auto.detection.nnunet_predict import REFUSED
from lnm_auto.detection.train_detector import nnunet_installed
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import load_json, save_json

# plans names may hold '.' and '-' (lnm_train_detector's CPU plans nnUNetPlans_0.5GB, nnU-Net's -overwrite_plans_name)
MODEL_FOLDER_NAME = re.compile(r"^(?P<trainer>[A-Za-z0-9_]+)__(?P<plans>[A-Za-z0-9_][A-Za-z0-9_.-]*)"
                               r"__(?P<configuration>[A-Za-z0-9_]+)$")
FOLD_FOLDER = re.compile(r"^fold_(?P<fold>\d+|all)$")
CHECKPOINT = "checkpoint_final.pth"
NEEDS_NNUNET = 'prediction on images alone runs an nnU-Net v2 detector: pip install -e ".[detect]"'
EXPECTED = ("nnU-Net's model folder <Trainer>__<Plans>__<configuration> holding dataset.json, plans.json and "
            "fold_<k>/checkpoint_final.pth")
# the only network classes and layer types a detector's plans may name (nnU-Net imports them by these names)
NETWORK_PREFIX = "dynamic_network_architectures.architectures."
LAYER_PREFIX = "torch.nn."


@dataclass(frozen=True)
class DetectorModel:
    """A checked nnU-Net v2 model folder and which of its labels is lymph node."""
    folder: Path
    trainer: str
    configuration: str
    folds: tuple[str, ...]
    label: int
    label_name: str
    num_channels: int
    file_ending: str
    checkpoint: str = CHECKPOINT
    origin: str = ""     # where the folder came from when it is a temporary extraction (a model zip's member)

    @classmethod
    def load(cls, folder: Path, label: str | int | None = None, checkpoint: str = CHECKPOINT) -> "DetectorModel":
        """The model folder ``folder`` checked; ``label``: the lymph-node label's value or name (default 1). A
        folder that is not a usable nnU-Net model folder is one line naming it and what is missing."""
        folder = Path(folder)
        if not folder.is_dir():
            raise LNMError(f"--detector {folder}: no such folder; give {EXPECTED}")
        m = MODEL_FOLDER_NAME.match(folder.name)
        if m is None:
            raise LNMError(f"--detector {folder}: not named <Trainer>__<Plans>__<configuration>; give {EXPECTED}")
        dataset_json, plans = _model_json(folder, "dataset.json"), _model_json(folder, "plans.json")
        folds = trained_folds(folder, checkpoint)
        if not folds:
            raise LNMError(f"--detector {folder}: no fold_<k>/{checkpoint}; train the detector (lnm_train_detector) "
                           f"or give the model folder of a trained one")
        configuration = m.group("configuration")
        _check_plans(folder, plans, configuration)
        value, name = _lymph_node_label(folder, dataset_json, label)
        channels = dataset_json.get("channel_names") or dataset_json.get("modality")
        ending = dataset_json.get("file_ending")
        if not isinstance(channels, dict) or not channels or not isinstance(ending, str):
            raise LNMError(f"{folder / 'dataset.json'}: no channel_names or file_ending; not an nnU-Net v2 "
                           "dataset.json")
        return cls(folder, m.group("trainer"), configuration, tuple(folds), value, name, len(channels), ending,
                   checkpoint)

    def record(self) -> dict:
        """What predict_info.json records of the detector (and what a rerun into the same -o must share)."""
        return {"folder": self.origin or str(self.folder.absolute()), "folds": list(self.folds),
                "checkpoint": self.checkpoint, "label": self.label, "label_name": self.label_name}


def _model_json(folder: Path, name: str) -> dict:
    path = folder / name
    if not path.is_file():
        raise LNMError(f"--detector {folder}: no {name}; give {EXPECTED}")
    try:
        data = load_json(path)
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise LNMError(f"{path}: damaged or not nnU-Net's {name}; give {EXPECTED}")
    return data


def trained_folds(folder: Path, checkpoint: str = CHECKPOINT) -> list[str]:
    """The folds of a model folder that hold ``checkpoint`` (numbers in order, then 'all')."""
    found = [FOLD_FOLDER.match(p.name).group("fold") for p in folder.iterdir()
             if p.is_dir() and FOLD_FOLDER.match(p.name) and (p / checkpoint).is_file()]
    return sorted(found, key=lambda f: (f == "all", int(f) if f.isdigit() else 0))


def _check_plans(folder: Path, plans: dict, configuration: str) -> None:
    """The configuration is planned, not a cascade stage, and its network is one of nnU-Net's own architectures
    built from torch.nn layers (nnU-Net imports the classes the plans name: no other name may be imported)."""
    plans_file = folder / "plans.json"
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or configuration not in configurations:
        raise LNMError(f"{plans_file}: no configuration '{configuration}' (the folder name's); not this model's plans")
    merged, seen = {}, set()
    name = configuration
    while isinstance(configurations.get(name), dict) and name not in seen:   # nnU-Net's 'inherits_from'
        seen.add(name)
        merged = {**configurations[name], **merged}
        name = configurations[name].get("inherits_from")
    if merged.get("previous_stage"):
        raise LNMError(f"{plans_file}: '{configuration}' is a cascade stage; give the model folder of a "
                       "configuration that needs no previous stage (3d_fullres, 2d)")
    arch = merged.get("architecture") if isinstance(merged.get("architecture"), dict) else {}
    network = str(arch.get("network_class_name", ""))
    kwargs = arch.get("arch_kwargs") if isinstance(arch.get("arch_kwargs"), dict) else {}
    imported = [kwargs.get(k) for k in arch.get("_kw_requires_import", []) or []]
    if not network.startswith(NETWORK_PREFIX) or not all(v is None or str(v).startswith(LAYER_PREFIX)
                                                         for v in imported):
        raise LNMError(f"{plans_file}: network '{network}' of '{configuration}' is not one of nnU-Net's "
                       f"architectures ({NETWORK_PREFIX}*, with torch.nn layers); refused")


def _lymph_node_label(folder: Path, dataset_json: dict, label: str | int | None) -> tuple[int, str]:
    """(value, name) of the label that is lymph node: ``label`` as a value or a name, default 1."""
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict) or not all(isinstance(v, int) for v in labels.values()):
        raise LNMError(f"{folder / 'dataset.json'}: labels are not name: integer value (region-based nnU-Net models "
                       "are not supported as detectors)")
    by_value = {v: k for k, v in labels.items()}
    wanted = "1" if label is None else str(label).strip()
    value = int(wanted) if wanted.isdigit() else labels.get(wanted)
    if value is None or value == 0 or value not in by_value:
        listed = ", ".join(f"{k}={v}" for k, v in labels.items())
        raise LNMError(f"--detector_label {wanted}: not a foreground label of {folder / 'dataset.json'} (labels: "
                       f"{listed}); name the lymph-node label by its value or name")
    return value, by_value[value]


def find_dataset_detector(results_root: Path, dataset_name: str, say=print) -> Path | None:
    """The dataset's own detector (lnm_train_detector's model folder under ``results_root``) with a finished fold;
    None when there is none. Of several, the most recently finished, said in a note."""
    root = Path(results_root) / dataset_name / DETECTOR_DIR / "nnUNet_results" / nnunet_dataset_name(dataset_name)
    if not root.is_dir():
        return None
    finished = {}
    for folder in root.iterdir():
        if folder.is_dir() and MODEL_FOLDER_NAME.match(folder.name) and trained_folds(folder):
            finished[folder] = max((folder / f"fold_{f}" / CHECKPOINT).stat().st_mtime for f in trained_folds(folder))
    if not finished:
        return None
    newest = max(finished, key=finished.get)
    if len(finished) > 1:
        say(f"note: {len(finished)} trained detectors in {root}; using the most recent, {newest.name} "
            "(--detector FOLDER chooses another)", flush=True)
    return newest


@dataclass
class DetectionJob:
    """One case for the detector: its image channels (files) and where its label map and probabilities go."""
    case_id: str
    images: list[Path]
    output: Path


def nnunet_inputs(case_id: str, images: list[sitk.Image], files: list[Path], ending: str, work: Path) -> list[Path]:
    """The files nnU-Net reads for a case: the input files when they have the detector's file ending, else (another
    format, DICOM) the images written into the work folder in it."""
    if files and all(str(f).endswith(ending) for f in files):
        return list(files)
    written = []
    for channel, image in enumerate(images):
        path = work / "images" / f"{case_id}_{channel:04d}{ending}"
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(path), useCompression=True)
        written.append(path)
    return written


def run_detector(model: DetectorModel, jobs: list[DetectionJob], work: Path, device: str = "cpu", threads: int = 1,
                 mirror: bool = True) -> None:
    """nnU-Net's prediction of every job, in its own process (each job's ``output``: an npz with the label map and
    the lymph-node probability). A failure is one line after nnU-Net's own messages."""
    if not jobs:
        return
    if not nnunet_installed():
        raise LNMError(NEEDS_NNUNET)
    job_file = work / "job.json"
    save_json({"model_folder": str(model.folder.absolute()), "configuration": model.configuration,
               "folds": list(model.folds), "checkpoint": model.checkpoint, "trainer": model.trainer,
               "label": model.label, "device": device, "threads": max(1, int(threads)), "mirror": bool(mirror),
               "cases": [{"case_id": j.case_id, "files": [str(f.absolute()) for f in j.images],
                          "output": str(j.output.absolute())} for j in jobs]}, job_file)
    env = {**_environment_without_nnunet(), "nnUNet_raw": str(work), "nnUNet_preprocessed": str(work),
           "nnUNet_results": str(work), "nnUNet_n_proc_DA": "1", "OMP_NUM_THREADS": str(max(1, int(threads))),
           "PYTHONIOENCODING": "utf-8"}       # nnU-Net's progress bars are not ASCII; a C locale must not break us
    sys.stdout.flush()
    proc = subprocess.run([sys.executable, "-m", "lnm_auto.detection.nnunet_predict", str(job_file)], env=env,
                          capture_output=True, encoding="utf-8", errors="replace")
    if proc.returncode == REFUSED and proc.stderr.strip():     # a checkpoint refused: the worker's one line
        raise LNMError(proc.stderr.strip().splitlines()[-1])
    if proc.returncode != 0:
        print((proc.stdout + proc.stderr)[-4000:], file=sys.stderr, flush=True)
        raise LNMError(f"--detector {model.folder}: nnU-Net's prediction failed (exit status {proc.returncode}); "
                       "nnU-Net's own messages are above")
    missing = next((j for j in jobs if not j.output.is_file()), None)
    if missing is not None:
        raise LNMError(f"--detector {model.folder}: nnU-Net wrote no prediction of case '{missing.case_id}'")


def _environment_without_nnunet() -> dict[str, str]:
    """This process's environment less any nnUNet_* variable of the user's (the detector's folder is given)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
