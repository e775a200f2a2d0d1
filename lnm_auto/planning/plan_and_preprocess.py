"""The ``lnm_plan_and_preprocess`` job: verify -> fingerprint -> plans -> splits -> npz caches."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lnm_auto.datasets.raw_dataset import RawDataset
from lnm_auto.datasets.verify import verify_dataset
from lnm_auto.planning.fingerprint import compute_fingerprint
from lnm_auto.planning.planner import plan_experiment
from lnm_auto.planning.plans import Plans
from lnm_auto.planning.splits import load_splits, make_patient_splits
from lnm_auto.preprocessing.preprocessor import run_preprocessing
from lnm_auto.utils.errors import DatasetProblems
from lnm_auto.utils.io import atomic_copy, save_json
from lnm_auto.utils.paths import resolve_dataset_name

FINGERPRINT_FILE = "dataset_fingerprint.json"
SPLITS_FILE = "splits_final.json"


def default_planner() -> str:
    """GPU-sized plans when CUDA is available, CPU-sized ones otherwise."""
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
                        log: Callable[[str], None] = print) -> PlanAndPreprocessResult:
    """Verify, fingerprint, plan, split into folds and cache crops. ``split_components_min_mm3``: first turn
    binary node masks into instance masks (components of at least that volume), reporting each case to ``log``."""
    name = resolve_dataset_name(dataset, raw_root)
    ds = RawDataset.load(raw_root / name)
    if split_components_min_mm3 is not None:
        from lnm_auto.conversion.split_dataset import split_dataset_components
        for line in split_dataset_components(ds, split_components_min_mm3):
            log(f"{name}: {line}")
    if verify:
        problems = verify_dataset(ds, num_processes=num_processes, progress=progress)
        if problems:
            raise DatasetProblems(problems)
    out = preprocessed_root / name
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = compute_fingerprint(ds, num_processes=num_processes, progress=progress)
    save_json(fingerprint, out / FINGERPRINT_FILE)
    atomic_copy(ds.root / "dataset.json", out / "dataset.json")
    plans = plan_experiment(fingerprint, planner=planner or default_planner(), plans_name=plans_name)
    plans_file = out / f"{plans_name}.json"
    plans.save(plans_file)
    splits_file = out / SPLITS_FILE
    if splits_file.is_file() and not clean and _same_cases(load_splits(splits_file), fingerprint):
        pass  # keep existing folds: trained models depend on them (nnU-Net does the same)
    else:
        save_json(make_patient_splits(fingerprint, plans.n_folds, plans.split_seed), splits_file)
    crops = run_preprocessing(ds, plans, out, num_processes, clean, progress) if preprocess else None
    return PlanAndPreprocessResult(out, plans_file, crops, plans)


def _same_cases(splits: list[dict], fingerprint: dict) -> bool:
    listed = {c for fold in splits for c in fold.get("val", [])}
    return listed == set(fingerprint["cases"])
