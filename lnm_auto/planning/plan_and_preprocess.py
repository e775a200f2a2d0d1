"""The ``lnm_plan_and_preprocess`` job: node masks -> crop scales -> images (verified, fingerprinted and cropped in
one read) -> plans -> splits.

Every file is read once. The crop scales need only the cases' geometry and the nodes' extents, so they are
planned after a first pass over the node masks (and image headers); the second pass reads each image once to
check its voxels, sample its intensities for the fingerprint and cut its nodes' crops. The plans' intensity
normalization, which needs every case's samples, is applied when the crops are read.
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from lnm_auto.datasets.raw_dataset import RawCase, RawDataset
from lnm_auto.datasets.verify import case_list_problems, check_tables, safety_problems
from lnm_auto.planning.fingerprint import MaskScan, assemble_fingerprint, node_entries, scan_node_mask
from lnm_auto.planning.planner import plan_crop_scales, plan_experiment
from lnm_auto.plans.plans import CropScale, Plans
from lnm_auto.planning.splits import check_users_splits, keep_or_write_splits
from lnm_auto.preprocessing.preprocessor import (ImageJob, NodeLabels, case_digest, case_labels,
                                                 crops_digest, crops_folder, scan_case_images, up_to_date_samples,
                                                 write_nodes_index)
from lnm_auto.utils.dataclass_json import to_dict
from lnm_auto.utils.errors import DatasetProblems, LNMError
from lnm_auto.utils.io import atomic_copy, save_json
from lnm_auto.utils.paths import resolve_dataset_name
from lnm_auto.utils.processes import map_in_workers

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
                        log: Callable[[str], None] = print, shape_head: bool | None = None,
                        pretrained_backbone: bool | None = None) -> PlanAndPreprocessResult:
    """Verify, fingerprint, plan, split into folds and cache crops. ``split_components_min_mm3``: first turn
    binary node masks into instance masks (components of at least that volume), reporting each case to ``log``.
    ``shape_head``: the plans' hybrid head on or off (None: the planner's default); the caches hold every
    node's shape features either way. ``pretrained_backbone``: 2d25 on the ImageNet backbone (None: the planner's
    default) or from scratch."""
    name = resolve_dataset_name(dataset, raw_root)
    ds = RawDataset.load(raw_root / name)
    out = Path(preprocessed_root) / name
    for folder in (Path(preprocessed_root), out):
        if folder.exists() and not folder.is_dir():
            raise LNMError(f"{folder}: is a file, not a folder; give a folder for the preprocessed data")
    refuse_overlap(out, raw_root / name)
    check_users_splits(out / SPLITS_FILE)      # a broken hand-written file is said before any work
    if split_components_min_mm3 is not None:
        from lnm_auto.conversion.split_dataset import split_dataset_components
        for line in split_dataset_components(ds, split_components_min_mm3):
            log(f"{name}: {line}")
    planner = planner or default_planner()
    crops_dir = crops_folder(out, plans_name) if preprocess else None
    scan = scan_dataset(ds, verify, planner, crops_dir, clean, num_processes, progress)
    if scan.problems:
        raise DatasetProblems(scan.problems)
    fingerprint = scan.fingerprint
    refuse_non_finite_statistics(fingerprint, ds)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LNMError(f"{out}: cannot be created ({e.strerror or e})") from None
    save_json(fingerprint, out / FINGERPRINT_FILE)
    atomic_copy(ds.root / "dataset.json", out / "dataset.json")
    plans = plan_experiment(fingerprint, planner=planner, plans_name=plans_name, shape_head=shape_head,
                            pretrained_backbone=pretrained_backbone)
    if to_dict(plans.scales) != to_dict(scan.scales):
        raise RuntimeError("the plans' crop scales differ from those the crops were cut with (a planner bug)")
    plans_file = out / f"{plans_name}.json"
    plans.save(plans_file)
    said = keep_or_write_splits(out / SPLITS_FILE, fingerprint, plans.n_folds, plans.split_seed, redo=clean)
    if said:
        log(said)
    if crops_dir is not None:
        write_nodes_index(crops_dir, ds.case_ids("Tr"))
    return PlanAndPreprocessResult(out, plans_file, crops_dir, plans)


@dataclass
class DatasetScan:
    problems: list[str]                          # every problem found (empty: the dataset can be planned)
    fingerprint: dict | None = None
    scales: dict[str, CropScale] | None = None   # the crop scales the crops were cut with


def scan_dataset(ds: RawDataset, verify: bool = True, planner: str = "LNMPlannerCPU", crops_dir: Path | None = None,
                 clean: bool = False, num_processes: int = 1, progress: bool = True) -> DatasetScan:
    """Read every file of the training cases once: the node masks (and image headers) first, from which the
    crop scales are planned, then the images, whose voxels are checked and sampled for the fingerprint while
    every node's crops are cut into ``crops_dir`` (None: no crops); the images of a case whose cache is up to
    date are not read again (its cache holds its samples). ``verify``: report every problem, each
    check in the order ``verify_dataset`` makes them; without it, only what would make the output wrong is
    checked, and the first pass's problems end the scan. ``clean``: redo every crop cache."""
    cases = ds.cases("Tr")
    # --no-verify skips the checks that only report, never what would make the plans or crops wrong
    problems = case_list_problems(ds) if verify else safety_problems(ds)
    if not cases or (problems and not verify):
        return DatasetScan(problems)
    masks = map_in_workers(partial(scan_node_mask, verify=verify), cases, num_processes, "node masks", progress)
    table_problems = _table_problems(ds, masks) if verify else []
    scales = None
    if not problems and not table_problems and not any(m.problems for m in masks):
        try:   # the crop scales need no intensity: planned now, so the one read of every image also cuts the crops
            geometry = assemble_fingerprint(ds, cases, [(m.entry, node_entries(m.case_id, m.nodes), []) for m in masks])
        except LNMError as e:    # (--no-verify) a mask node that nodes.csv does not list
            return DatasetScan([str(e)])
        scales = plan_crop_scales(geometry, planner).scales
    elif not verify:
        return DatasetScan([line for m in masks for line in m.problems])
    if scales is None:
        crops_dir = None
    if crops_dir is not None:
        _prepare(crops_dir, clean)
    images = map_in_workers(partial(scan_case_images, scales=scales), _image_jobs(ds, cases, masks, scales, crops_dir),
                            num_processes, "images + crops" if crops_dir else "images", progress)
    problems += [line for m, i in zip(masks, images) for line in m.problems + i.problems] + table_problems
    if problems:
        return DatasetScan(problems)
    return DatasetScan([], assemble_fingerprint(ds, cases, [(m.entry, node_entries(m.case_id, m.nodes), i.samples)
                                                            for m, i in zip(masks, images)]), scales)


def _table_problems(ds: RawDataset, masks: list[MaskScan]) -> list[str]:
    """The label tables' problems, the node ids of each mask included."""
    try:
        return check_tables(ds, {m.case_id: m for m in masks})
    except LNMError as e:
        return [str(e)]


def refuse_overlap(preprocessed_dataset: Path, raw_dataset: Path) -> None:
    """The preprocessed dataset folder must be neither the raw dataset nor inside it, nor hold it: plans, caches and
    --clean's deletions stay out of what the user gave."""
    pre, raw = Path(preprocessed_dataset).resolve(), Path(raw_dataset).resolve()
    if pre == raw or raw in pre.parents or pre in raw.parents:
        raise LNMError(f"--preprocessed {preprocessed_dataset.parent}: its dataset folder {preprocessed_dataset} "
                       f"{'is' if pre == raw else 'overlaps'} the raw dataset {raw_dataset}; lnm_plan_and_preprocess "
                       "never writes into the raw data: give a preprocessed folder of its own")


def _prepare(crops_dir: Path, clean: bool) -> None:
    """The crops folder, emptied when ``clean``, without the temp files of a run that was killed."""
    if clean and crops_dir.exists():
        shutil.rmtree(crops_dir)
    try:
        crops_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LNMError(f"{crops_dir}: cannot be created ({e.strerror or e})") from None
    for leftover in crops_dir.glob(".*.tmp"):
        leftover.unlink(missing_ok=True)


def _image_jobs(ds: RawDataset, cases: list[RawCase], masks: list[MaskScan], scales: dict[str, CropScale] | None,
                crops_dir: Path | None) -> list[ImageJob]:
    """The second pass's work per case: check and sample its images and cut its crops; a case whose cache is up
    to date (same files, labels and scales) is not read: its cache holds its samples."""
    labels = case_labels(ds) if crops_dir is not None else {}
    key = crops_digest(scales) if crops_dir is not None else ""
    jobs = []
    for case, scan in zip(cases, masks):
        job = ImageJob(case, scan.readable_images, scan.nodes)
        if crops_dir is not None:
            job.labels = labels.get(case.case_id, NodeLabels({}, {}, {}))
            job.digest = case_digest(key, case, job.labels)
            target = crops_dir / f"{case.case_id}.npz"
            job.cached_samples = up_to_date_samples(target, job.digest)
            job.cache_file = None if job.cached_samples is not None else target
        jobs.append(job)
    return jobs


def refuse_non_finite_statistics(fingerprint: dict, ds: RawDataset) -> None:
    """Non-finite intensity statistics would make NaN normalization in the plans: refuse before any plans are
    written (NaN/Inf voxels are refused when the images are read; this is what remains: no usable voxel)."""
    bad = [int(c) for c, stats in fingerprint["intensity_statistics"].items()
           if not all(math.isfinite(v) for v in stats.values() if isinstance(v, float))]
    if bad:
        raise LNMError(f"{ds.root}: the intensity statistics of channel(s) {bad} are not finite (no usable voxels "
                       "near the nodes); check the images and node masks")

