"""The ``lnm_plan_and_preprocess`` job: verify -> fingerprint -> plans -> splits -> npz caches."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from lnm_auto.conversion.split_dataset import split_dataset_components
from lnm_auto.datasets.raw_dataset import RawDataset, read_image
from lnm_auto.datasets.verify import safety_problems
from lnm_auto.planning.fingerprint import compute_fingerprint, verify_and_fingerprint
from lnm_auto.planning.planner import plan_experiment
from lnm_auto.planning.plans import Plans
from lnm_auto.planning.splits import load_splits, make_patient_splits
from lnm_auto.preprocessing.preprocessor import run_preprocessing
from lnm_auto.utils.errors import DatasetProblems, LNMError
from lnm_auto.utils.io import atomic_copy, save_json
from lnm_auto.utils.paths import resolve_dataset_name

FINGERPRINT_FILE = "dataset_fingerprint.json"
SPLITS_FILE = "splits_final.json"
NVIDIA_DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/nvidia0")


def default_planner() -> str:
    """GPU-sized plans when CUDA is available, CPU-sized ones otherwise."""
    if not any(Path(p).exists() for p in NVIDIA_DRIVER_FILES):
        return "LNMPlannerCPU"    # no NVIDIA driver: CUDA cannot be available, and importing torch costs seconds
    import torch
    return "LNMPlanner" if torch.cuda.is_available() else "LNMPlannerCPU"


@dataclass
class PlanAndPreprocessResult:
    preprocessed_dataset: Path
    plans_file: Path
    crops_dir: Path | None
    plans: Plans


def plan_and_preprocess(dataset: str | int, raw_root: Path, preprocessed_root: Path, planner: str | None = None,
                        plans_name: str = "LNMPlans", num_processes: int = 1, verify: bool = True,
                        clean: bool = False, preprocess: bool = True, progress: bool = True,
                        split_components_min_mm3: float | None = None,
                        log: Callable[[str], None] = print, shape_head: bool | None = None) -> PlanAndPreprocessResult:
    """Verify, fingerprint, plan, split into folds and cache crops. ``split_components_min_mm3``: first turn
    binary node masks into instance masks (components of at least that volume), reporting each case to ``log``.
    ``shape_head``: the plans' hybrid head on or off (None: the planner's default); the caches hold every
    node's shape features either way."""
    name = resolve_dataset_name(dataset, raw_root)
    ds = RawDataset.load(raw_root / name)
    out = Path(preprocessed_root) / name
    for folder in (Path(preprocessed_root), out):
        if folder.exists() and not folder.is_dir():
            raise LNMError(f"{folder}: is a file, not a folder; give a folder for the preprocessed data")
    if split_components_min_mm3 is not None:
        for line in split_dataset_components(ds, split_components_min_mm3):
            log(f"{name}: {line}")
    # verification and fingerprint share one read of every file; --no-verify skips the full voxel check, never
    # what would make the plans or crops wrong
    if verify:
        problems, fingerprint = verify_and_fingerprint(ds, num_processes=num_processes, progress=progress)
    else:
        problems = safety_problems(ds)
        fingerprint = None if problems else compute_fingerprint(ds, num_processes=num_processes, progress=progress)
    if problems:
        raise DatasetProblems(problems)
    refuse_non_finite_statistics(fingerprint, ds)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LNMError(f"{out}: cannot be created ({e.strerror or e})") from None
    save_json(fingerprint, out / FINGERPRINT_FILE)
    atomic_copy(ds.root / "dataset.json", out / "dataset.json")
    plans = plan_experiment(fingerprint, planner=planner or default_planner(), plans_name=plans_name,
                            shape_head=shape_head)
    plans_file = out / f"{plans_name}.json"
    plans.save(plans_file)
    splits_file = out / SPLITS_FILE
    if splits_file.is_file() and not clean and _same_cases(load_splits(splits_file), fingerprint):
        pass  # keep existing folds: trained models depend on them (nnU-Net does the same)
    else:
        save_json(make_patient_splits(fingerprint, plans.n_folds, plans.split_seed), splits_file)
    crops = run_preprocessing(ds, plans, out, num_processes, clean, progress) if preprocess else None
    return PlanAndPreprocessResult(out, plans_file, crops, plans)


def refuse_non_finite_statistics(fingerprint: dict, ds: RawDataset) -> None:
    """NaN/Inf voxels near the nodes make NaN intensity statistics and NaN normalization in the plans: refuse
    before any plans are written, naming the first such file (searched only on this failure path)."""
    bad = [int(c) for c, stats in fingerprint["intensity_statistics"].items()
           if not all(math.isfinite(v) for v in stats.values() if isinstance(v, float))]
    if not bad:
        return
    for case in ds.cases("Tr"):
        for c in bad:
            if not np.isfinite(sitk.GetArrayViewFromImage(read_image(case.image_files[c]))).all():
                raise LNMError(f"{case.image_files[c]}: NaN/Inf voxels; replace them with a finite value")
    raise LNMError(f"{ds.root}: the intensity statistics of channel(s) {bad} are not finite (no usable voxels "
                   "near the nodes); check the images and node masks")


def _same_cases(splits: list[dict], fingerprint: dict) -> bool:
    listed = {c for fold in splits for c in fold.get("val", [])}
    return listed == set(fingerprint["cases"])
