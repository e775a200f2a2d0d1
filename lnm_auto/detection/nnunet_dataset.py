"""An lnm_auto raw dataset -> an nnU-Net v2 raw dataset for the node detector (the other way round from
``conversion/nnunet.py``).

    <LNM_preprocessed>/DatasetXXX_Name/detector/nnUNet_raw/DatasetXXX_NameLN/
      imagesTr/<case>_0000<ending>   copies of the lnm images, byte for byte (never links: nothing may write
                                     through them into the inputs)
      labelsTr/<case><ending>        node instance mask > 0 as label 1 (uint8), on the image's own grid
      dataset.json                   channel_names, labels {background: 0, lymph_node: 1}, numTraining, file_ending

The folders nnU-Net reads and writes (nnUNet_raw, nnUNet_preprocessed, nnUNet_results) all live below the lnm
dataset's own preprocessed and results folders (``detector_folders``), so the detector leaks nowhere else. The
export is written to a hidden folder beside its final name and renamed at the end: a kill never leaves half of it.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lnm_auto.conversion.split_dataset import write_mask
from lnm_auto.datasets.raw_dataset import RawDataset, read_image_header, read_instance_mask
from lnm_auto.datasets.verify import geometry_mismatches
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import load_json, save_json
from lnm_auto.utils.paths import DATASET_DIR_PATTERN, dataset_folder_name
from lnm_auto.utils.write_errors import write_errors

DETECTOR_DIR = "detector"
NODE_LABEL = "lymph_node"
EXPORT_MARK = "lnm_auto_export"      # dataset.json key: this folder is ours, a rerun may replace it


@dataclass(frozen=True)
class DetectorFolders:
    """nnU-Net's three roots for one lnm dataset."""
    raw: Path
    preprocessed: Path
    results: Path

    def environment(self) -> dict[str, str]:
        """The nnUNet_* variables pointing nnU-Net at these roots (and nowhere else)."""
        return {"nnUNet_raw": str(self.raw), "nnUNet_preprocessed": str(self.preprocessed),
                "nnUNet_results": str(self.results)}


def detector_folders(dataset_name: str, preprocessed_root: Path, results_root: Path) -> DetectorFolders:
    """nnU-Net's roots for the lnm dataset ``dataset_name`` (DatasetXXX_Name): below its preprocessed and
    results folders."""
    base = Path(preprocessed_root) / dataset_name / DETECTOR_DIR
    return DetectorFolders(base / "nnUNet_raw", base / "nnUNet_preprocessed",
                           Path(results_root) / dataset_name / DETECTOR_DIR / "nnUNet_results")


def nnunet_dataset_id(dataset_name: str) -> int:
    """The nnU-Net dataset id: the lnm dataset's own (nnU-Net's roots hold only this one dataset)."""
    return int(_name_parts(dataset_name)[0])


def nnunet_dataset_name(dataset_name: str) -> str:
    """DatasetXXX_Name -> DatasetXXX_NameLN, the nnU-Net dataset of its node masks."""
    number, name = _name_parts(dataset_name)
    return dataset_folder_name(int(number), f"{name}LN")


def _name_parts(dataset_name: str) -> tuple[str, str]:
    m = DATASET_DIR_PATTERN.match(dataset_name)
    if m is None:
        raise LNMError(f"{dataset_name}: not a dataset folder name like Dataset001_Name")
    return m.group(1), m.group(2)


@dataclass
class DetectorExport:
    folder: Path                 # nnUNet_raw/DatasetXXX_NameLN
    cases: list[str]
    node_voxels: dict[str, int]  # case -> voxels labelled lymph_node


def _case_problems(ds: RawDataset, case_id: str) -> list[str]:
    """Missing channels or node mask, or a node mask off channel 0's grid: each one line naming the file."""
    case = ds.case(case_id)
    missing = [f for f in case.image_files + [case.node_mask_file] if not f.is_file()]
    if missing:
        return [f"{f}: missing (case '{case_id}'); every training case needs its images and node mask" for f in missing]
    reference = read_image_header(case.image_files[0])
    problems = []
    for f in case.image_files[1:] + [case.node_mask_file]:
        mismatch = geometry_mismatches(reference, read_image_header(f))
        if mismatch:
            problems.append(f"{f}: {'; '.join(mismatch)} (of {case.image_files[0].name}); resample it onto the image")
    return problems


def _binary_label(mask_file: Path) -> tuple[sitk.Image, int]:
    """Node instance mask -> uint8 label map (every node 1), on the mask's own grid; and its foreground voxels."""
    mask = read_instance_mask(mask_file)
    label = (sitk.GetArrayViewFromImage(mask) > 0).astype(np.uint8)
    image = sitk.GetImageFromArray(label)
    image.CopyInformation(mask)
    return image, int(label.sum())


def _refuse_foreign_folder(out: Path) -> None:
    """Only an earlier export of ours may be replaced."""
    if not out.exists():
        return
    meta_file = out / "dataset.json"
    try:
        ours = meta_file.is_file() and EXPORT_MARK in load_json(meta_file)
    except ValueError:
        ours = False
    if not ours:
        raise LNMError(f"{out}: exists and was not exported by lnm_auto; move it away (lnm_train_detector writes "
                       "this folder)")


def export_detector_dataset(raw_dataset_folder: Path, nnunet_raw_root: Path) -> DetectorExport:
    """Write ``nnunet_raw_root/DatasetXXX_NameLN`` from the lnm raw dataset at ``raw_dataset_folder``; an earlier
    export there is replaced whole (atomically). Inputs are only read."""
    ds = RawDataset.load(raw_dataset_folder)
    cases = ds.case_ids("Tr")
    if not cases:
        raise LNMError(f"{ds.root / 'imagesTr'}: no training cases (expected <case>_0000{ds.file_ending})")
    problems = [p for c in cases for p in _case_problems(ds, c)]
    if problems:
        raise LNMError("\n".join(problems))
    out = Path(nnunet_raw_root) / nnunet_dataset_name(Path(raw_dataset_folder).name)
    _refuse_foreign_folder(out)
    staging, old = out.parent / f".{out.name}.partial", out.parent / f".{out.name}.old"
    with write_errors(out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    node_voxels: dict[str, int] = {}
    try:
        with write_errors(staging):
            (staging / "imagesTr").mkdir(parents=True)
            for case_id in cases:
                case = ds.case(case_id)
                for f in case.image_files:
                    shutil.copyfile(f, staging / "imagesTr" / f.name)    # a copy: inputs are never written through
                label, node_voxels[case_id] = _binary_label(case.node_mask_file)
                write_mask(label, staging / "labelsTr" / f"{case_id}{ds.file_ending}")
        save_json({"name": f"{ds.name}LN", "channel_names": {str(k): v for k, v in ds.channel_names.items()},
                   "labels": {"background": 0, NODE_LABEL: 1}, "numTraining": len(cases),
                   "file_ending": ds.file_ending,
                   "description": f"node masks of the lnm_auto dataset {Path(raw_dataset_folder).name}, every node "
                                  "label 1 (lnm_train_detector)",
                   EXPORT_MARK: {"source": str(Path(raw_dataset_folder).resolve())}}, staging / "dataset.json")
        with write_errors(out.parent):
            if out.exists():
                out.rename(old)
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return DetectorExport(out, cases, node_voxels)
