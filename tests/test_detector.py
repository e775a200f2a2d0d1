"""lnm_train_detector: the nnU-Net v2 export of a dataset's node masks (checked by nnU-Net's own integrity check) and
a tiny CPU detector trained end to end by nnU-Net itself (slow)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import refused, run_cli, write_image
from lnm_auto.detection.nnunet_dataset import detector_folders, export_detector_dataset, nnunet_dataset_name
from lnm_auto.detection import cpu_variant
from lnm_auto.detection.train_detector import NEEDS_NNUNET
from lnm_auto.utils.errors import LNMError

REPO = Path(__file__).resolve().parents[1]


def tree_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (relative path -> digest)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def export(dataset: Path, tmp_path: Path) -> Path:
    return export_detector_dataset(dataset, tmp_path / "nnUNet_raw").folder


def test_export_passes_nnunet_integrity_check(tiny_dataset, tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    before = tree_hashes(tiny_dataset)
    out = export(tiny_dataset, tmp_path)
    assert out == tmp_path / "nnUNet_raw" / "Dataset042_TinyLN"
    verify_dataset_integrity(str(out), num_processes=1)       # nnU-Net's own check raises on any problem
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "lymph_node": 1}
    assert meta["channel_names"] == {"0": "CT"} and meta["file_ending"] == ".nii.gz" and meta["numTraining"] == 6
    for image in sorted((tiny_dataset / "imagesTr").iterdir()):
        copied = out / "imagesTr" / image.name
        assert copied.read_bytes() == image.read_bytes()                  # byte-identical
        assert os.stat(copied).st_ino != os.stat(image).st_ino            # a copy, not a link into the inputs
    for mask_file in sorted((tiny_dataset / "nodesTr").iterdir()):
        mask, label = sitk.ReadImage(str(mask_file)), sitk.ReadImage(str(out / "labelsTr" / mask_file.name))
        assert label.GetPixelID() == sitk.sitkUInt8
        assert np.array_equal(sitk.GetArrayFromImage(label), (sitk.GetArrayFromImage(mask) > 0).astype(np.uint8))
        assert set(np.unique(sitk.GetArrayFromImage(label))) == {0, 1}
        for getter in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
            assert getattr(label, getter)() == getattr(mask, getter)()
    assert tree_hashes(tiny_dataset) == before                            # inputs untouched
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]     # no staging folder left


def test_rerun_replaces_own_export_and_refuses_a_foreign_folder(tiny_dataset, tmp_path):
    out = export(tiny_dataset, tmp_path)
    (out / "labelsTr" / "case_000.nii.gz").unlink()        # an earlier export of ours, damaged: replaced whole
    assert export(tiny_dataset, tmp_path) == out and (out / "labelsTr" / "case_000.nii.gz").is_file()
    (out / "dataset.json").write_text(json.dumps({"name": "someone else's"}))
    foreign = tree_hashes(out)
    with pytest.raises(LNMError, match=rf"^{out}: exists and was not exported by lnm_auto; move it away"):
        export(tiny_dataset, tmp_path)
    assert tree_hashes(out) == foreign


def test_missing_node_mask_is_one_line_and_nothing_is_written(tiny_dataset, tmp_path):
    missing = tiny_dataset / "nodesTr" / "case_002.nii.gz"
    missing.unlink()
    with pytest.raises(LNMError, match=rf"^{missing}: missing \(case 'case_002'\); every training case needs"):
        export(tiny_dataset, tmp_path)
    assert not (tmp_path / "nnUNet_raw").exists()


def test_node_mask_off_the_image_grid_is_refused(tiny_dataset, tmp_path):
    mask_file = tiny_dataset / "nodesTr" / "case_001.nii.gz"
    write_image(sitk.GetArrayFromImage(sitk.ReadImage(str(mask_file))), mask_file, spacing_xyz=(0.8, 0.8, 5.0))
    with pytest.raises(LNMError, match=rf"^{mask_file}: spacing .* != image spacing .*; resample it onto the image"):
        export(tiny_dataset, tmp_path)
    assert not (tmp_path / "nnUNet_raw" / "Dataset042_TinyLN").exists()


def test_nnunet_folders_stay_below_the_dataset_folders(tmp_path):
    folders = detector_folders("Dataset042_Tiny", tmp_path / "pre", tmp_path / "res")
    assert folders.environment() == {
        "nnUNet_raw": str(tmp_path / "pre" / "Dataset042_Tiny" / "detector" / "nnUNet_raw"),
        "nnUNet_preprocessed": str(tmp_path / "pre" / "Dataset042_Tiny" / "detector" / "nnUNet_preprocessed"),
        "nnUNet_results": str(tmp_path / "res" / "Dataset042_Tiny" / "detector" / "nnUNet_results")}
    assert nnunet_dataset_name("Dataset042_Tiny") == "Dataset042_TinyLN"


def test_without_nnunet_the_command_says_how_to_install(tiny_dataset, tmp_path):
    code = ("import sys; sys.modules['nnunetv2'] = None; from lnm_auto.cli import main; "
            f"sys.exit(main(['train_detector', '42', '0', '--raw', {str(tiny_dataset.parent)!r}, "
            f"'--preprocessed', {str(tmp_path / 'pre')!r}, '--results', {str(tmp_path / 'res')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8",
                          errors="replace", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"lnm_train_detector: error: {NEEDS_NNUNET}"
    assert not (tmp_path / "pre").exists() and not (tmp_path / "res").exists()


def test_bad_fold_is_refused_before_any_work(tiny_dataset, tmp_path):
    proc = run_cli("train_detector", "42", "0", "7", "--raw", tiny_dataset.parent, "--preprocessed", tmp_path / "pre",
                   "--results", tmp_path / "res", "-device", "cpu")
    assert refused(proc, "fold '7': nnU-Net's folds are 0, 1, 2, 3, 4 or 'all'")
    assert not (tmp_path / "pre").exists()


def test_skip_preprocessing_without_an_earlier_run_names_the_plans_file(tiny_dataset, tmp_path):
    proc = run_cli("train_detector", "42", "0", "--skip_preprocessing", "--raw", tiny_dataset.parent,
                   "--preprocessed", tmp_path / "pre", "--results", tmp_path / "res", "-device", "cpu")
    plans = tmp_path / "pre" / "Dataset042_Tiny" / "detector" / "nnUNet_preprocessed" / "Dataset042_TinyLN"
    # the CPU default, 2d_cpu, lives in nnU-Net's default plans
    refused(proc, f"{plans / 'nnUNetPlans.json'}: missing; run lnm_train_detector without --skip_preprocessing "
                  "first")


def test_gpu_memory_target_names_the_plans_and_is_checked(tiny_dataset, tmp_path):
    from lnm_auto.detection.train_detector import default_memory_target, plans_name
    assert plans_name(None) == "nnUNetPlans" and plans_name(1.0) == "nnUNetPlans_1GB"
    assert plans_name(2.5) == "nnUNetPlans_2.5GB"
    assert default_memory_target("cuda") is None and default_memory_target("cpu") == 1.0
    assert default_memory_target("cpu", "2d_cpu") is None       # 2d_cpu plans its own batch

    proc = run_cli("train_detector", "42", "0", "-gpu_memory_target", "0", "--raw", tiny_dataset.parent,
                   "--preprocessed", tmp_path / "pre", "--results", tmp_path / "res", "-device", "cpu")
    refused(proc, "-gpu_memory_target must be a positive number of GB, got 0")
    assert not (tmp_path / "pre").exists()

def test_default_trainer_follows_the_configuration():
    from lnm_auto.detection.train_detector import default_setup, default_trainer
    assert default_setup("cuda") == ("3d_fullres", "nnUNetTrainer") and default_setup("cpu")[0] == "2d_cpu"
    assert default_trainer("2d_cpu", "cpu") == default_trainer("2d_cpu", "cuda") == "nnUNetTrainer_20epochs"
    assert default_trainer("3d_fullres", "cuda") == "nnUNetTrainer"
    assert default_trainer("2d", "cpu") == "nnUNetTrainer_5epochs"     # nnU-Net's own networks: a smoke run


@pytest.mark.slow
def test_tiny_cpu_detector_trains_end_to_end(tiny_dataset, tmp_path):
    """nnU-Net's own planning, preprocessing and a one-epoch training of the CPU default (2d_cpu, added to
    nnU-Net's plans, its foreground oversampling applied); every file inside the given roots."""
    raw_before = tree_hashes(tiny_dataset.parent)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    env = {**os.environ, "LNM_NUM_THREADS": "1", "LNM_NO_PROGRESS": "1", "MPLBACKEND": "Agg"}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "lnm_auto", "train_detector", "42", "0",
                           "-tr", "nnUNetTrainer_1epoch", "--iterations_per_epoch", "5", "-device", "cpu",
                           "--raw", str(tiny_dataset.parent),
                           "--preprocessed", str(tmp_path / "pre"), "--results", str(tmp_path / "res")],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=workdir,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fold = (tmp_path / "res" / "Dataset042_Tiny" / "detector" / "nnUNet_results" / "Dataset042_TinyLN"
            / "nnUNetTrainer_1epoch__nnUNetPlans__2d_cpu" / "fold_0")
    assert (fold / "checkpoint_final.pth").is_file()
    assert f"detector fold_0: {fold}" in proc.stdout
    assert "a CPU detector, not nnU-Net's quality" in proc.stdout
    planned = json.loads((fold.parent / "plans.json").read_text())["configurations"]["2d_cpu"]
    assert planned["batch_size"] == cpu_variant.BATCH and planned["lnm_training"]["iterations_per_epoch"] == 40
    debug = json.loads((fold / "debug.json").read_text())      # nnU-Net's record of its trainer's attributes
    assert float(debug["oversample_foreground_percent"]) == cpu_variant.FOREGROUND_OVERSAMPLING
    assert int(debug["num_iterations_per_epoch"]) == 5          # the flag wins over the plan's 40
    assert tree_hashes(tiny_dataset.parent) == raw_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "pre", "raw", "res"]
    assert list(workdir.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "pre" / "Dataset042_Tiny").iterdir()) == ["detector"]
    assert sorted(p.name for p in (tmp_path / "res" / "Dataset042_Tiny").iterdir()) == ["detector"]
