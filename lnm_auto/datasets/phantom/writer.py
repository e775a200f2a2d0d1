"""Writing a phantom dataset: images, node masks, label tables and dataset.json in the raw dataset convention.

The dataset is built in a hidden folder next to its destination and swapped in when complete, so a
crash never leaves half a dataset under the real name; only an earlier phantom dataset is replaced.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import SimpleITK as sitk
from tqdm import tqdm

from lnm_auto.datasets.phantom.case import PhantomConfig, generate_case
from lnm_auto.datasets.phantom.labels import LabelTables, labeled_cases
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import atomic_path, load_json, save_json
from lnm_auto.utils.terminal import show_progress

PHANTOM_VERSION = 1
FILE_ENDING = ".nii.gz"


def _write_image(img: sitk.Image, path: Path) -> None:
    with atomic_path(path, suffix=FILE_ENDING) as tmp:
        sitk.WriteImage(img, str(tmp), True)


def _check_target(out: Path) -> None:
    """Refuse to replace something that is not a phantom dataset, or to add a second dataset id."""
    if out.exists():
        meta = out / "dataset.json"
        is_phantom = False
        if meta.is_file():
            try:
                is_phantom = "phantom_config" in load_json(meta)
            except (ValueError, OSError):
                is_phantom = False
        if not is_phantom:
            raise LNMError(f"{out}: exists and is not a phantom dataset; refusing to overwrite it "
                           "(remove it or choose another dataset id / name)")
    prefix = out.name.split("_", 1)[0] + "_"
    for other in sorted(out.parent.glob(prefix + "*")) if out.parent.is_dir() else []:
        if other.is_dir() and other.name != out.name:
            raise LNMError(f"{other}: another dataset already uses id {prefix[7:-1]}; dataset ids must be unique "
                           "(remove it or choose another id)")


def make_phantom_dataset(raw_root: Path, dataset_id: int = 999, name: str = "Phantom",
                         config: PhantomConfig = PhantomConfig(), progress: bool = False) -> Path:
    """Write raw_root/Dataset{id:03d}_{name}/ in the raw dataset convention and return that path.

    An existing phantom dataset of that name is replaced (the new one is built next to it and swapped
    in); anything else in the way raises LNMError."""
    config = config.validated()
    if not 0 <= int(dataset_id) <= 999:
        raise LNMError(f"dataset id must be within 0..999, got {dataset_id}")
    if not name or not all(ch.isalnum() or ch in "_-" for ch in name):
        raise LNMError(f"dataset name must use letters, digits, '_' or '-', got '{name}'")
    raw_root = Path(raw_root)
    out = raw_root / f"Dataset{int(dataset_id):03d}_{name}"
    _check_target(out)
    raw_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=raw_root))
    try:
        _write_dataset(work, name, config, progress)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=raw_root))
            os.replace(out, old / out.name)
            os.replace(work, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return out


def _write_dataset(root: Path, name: str, config: PhantomConfig, progress: bool) -> None:
    labeled = labeled_cases(config)
    n_total = config.n_cases + config.n_test_cases
    tables = LabelTables()
    show = progress and show_progress()
    bar = tqdm(range(n_total), desc="phantom", unit="case", disable=not show)
    for index in bar:
        test = index >= config.n_cases
        case = generate_case(index, config)
        split = "Ts" if test else "Tr"
        _write_image(case.image, root / f"images{split}" / f"{case.case_id}_0000{FILE_ENDING}")
        _write_image(case.mask, root / f"nodes{split}" / f"{case.case_id}{FILE_ENDING}")
        tables.add(case, test, node_labels_shown=test or index in labeled)
    bar.close()
    tables.save(root, with_test=bool(config.n_test_cases))
    channel = "CT" if config.modality == "CT" else "T2"
    n_nodes, n_pos = tables.n_training_nodes()
    save_json({
        "name": name,
        "channel_names": {"0": channel},
        "file_ending": FILE_ENDING,
        "numTraining": config.n_cases,
        "numTest": config.n_test_cases,
        "description": (f"Synthetic {'chest CT (HU)' if channel == 'CT' else 'chest T2 MRI (arbitrary units)'} "
                        f"phantom with mediastinal lymph nodes: {config.n_cases} training cases "
                        f"({len(labeled)} with node labels; station and patient labels for all), "
                        f"{config.n_test_cases} test cases; {n_nodes} training nodes, {n_pos} metastatic."),
        "reference": "lnm_auto.datasets.phantom (synthetic, no patient data); see documentation/phantom.md",
        "phantom_config": config.to_json(),
        "phantom_version": PHANTOM_VERSION,
    }, root / "dataset.json")
