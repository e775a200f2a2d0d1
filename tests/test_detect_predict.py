"""lnm_predict on images alone (issue 24): the detector's label map + probabilities -> node instances with their
detection confidence and stations (pure, no nnU-Net); a bad --detector folder; and (slow) a tiny nnU-Net detector
trained here, finding the nodes a tiny lnm model then classifies, next to cases whose masks are kept."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from conftest import TINY_DIRECTION, TINY_ORIGIN, TINY_SPACING_XYZ, refused, run_cli, write_image
from lnm_auto.detection.detected_nodes import detect_instances, region_names, region_stations
from lnm_auto.detection.detector import DetectorModel, find_dataset_detector
from lnm_auto.inference.cases import NO_DETECTOR, discover_cases
from lnm_auto.utils.errors import LNMError

# one test process runs every test of the detector path (README: -n 2 --dist loadgroup), so the session
# fixture that trains the lnm model and the nnU-Net detector runs once, not once per process
pytestmark = pytest.mark.xdist_group("detector")

DS = "Dataset042_Tiny"


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def image_on_tiny_grid(arr: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(TINY_SPACING_XYZ)
    img.SetOrigin(TINY_ORIGIN)
    img.SetDirection(TINY_DIRECTION)
    return img


# ---- the pure part: label map + probabilities -> instances, confidences, stations ----------------------------
def test_detected_instances_follow_the_component_rule_with_mean_probability():
    labels = np.zeros((10, 30, 30), np.uint8)
    blob_a = np.zeros_like(labels, bool)
    blob_a[2:5, 3:8, 3:8] = True                   # 75 voxels of 2.56 mm^3
    blob_b = np.zeros_like(labels, bool)
    blob_b[5:7, 8:12, 8:12] = True                 # touches blob_a only by a corner: one 26-connected node
    blob_c = np.zeros_like(labels, bool)
    blob_c[6:9, 20:26, 20:26] = True
    speck = np.zeros_like(labels, bool)
    speck[1, 25, 2] = True                         # 2.56 mm^3 < 10 mm^3: not a node
    other = np.zeros_like(labels, bool)
    other[0:3, 20:28, 20:28] = True                # another label of the detector: not lymph node
    for mask, value in ((blob_a, 2), (blob_b, 2), (blob_c, 2), (speck, 2), (other, 1)):
        labels[mask] = value
    probability = np.random.default_rng(3).uniform(0, 1, labels.shape).astype(np.float32)
    segmentation = image_on_tiny_grid(labels)

    found = detect_instances(segmentation, probability, label=2)

    ids = sitk.GetArrayFromImage(found.mask)
    assert found.mask.GetPixelID() == sitk.sitkUInt16
    for getter in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(found.mask, getter)() == getattr(segmentation, getter)()
    assert found.n_nodes == 2 and found.n_removed == 1 and sorted(np.unique(ids)) == [0, 1, 2]
    node_ab, node_c = int(ids[blob_a][0]), int(ids[blob_c][0])
    assert np.array_equal(ids == node_ab, blob_a | blob_b) and np.array_equal(ids == node_c, blob_c)
    assert not ids[speck].any() and not ids[other].any()
    expected_ab = float(np.mean(probability[blob_a | blob_b], dtype=np.float64))
    expected_c = float(np.mean(probability[blob_c], dtype=np.float64))
    assert found.confidences[node_ab - 1] == pytest.approx(expected_ab, rel=1e-9)
    assert found.confidences[node_c - 1] == pytest.approx(expected_c, rel=1e-9)


def test_no_lymph_node_voxels_give_no_nodes():
    found = detect_instances(image_on_tiny_grid(np.zeros((4, 8, 8), np.uint8)), np.zeros((4, 8, 8), np.float32))
    assert found.n_nodes == 0 and found.confidences == [] and not sitk.GetArrayFromImage(found.mask).any()


def test_stations_are_the_majority_region(tmp_path):
    ids = np.zeros((4, 10, 10), np.uint16)
    ids[0:2, 0:3, 0:3] = 1            # 18 voxels: 10 in region 3, 8 in region 5 -> 3
    ids[2:4, 5:9, 5:9] = 2            # all in region 0 -> unknown
    ids[0, 7:9, 0:2] = 3              # region 5, not named in regions.csv -> '5'
    regions = np.zeros_like(ids, np.int64)
    regions[0:2, 0:3, 0:3] = 5
    regions[0, 0:3, 0:3] = 3
    regions[1, 0, 0] = 3              # 9 + 1 = 10 voxels of region 3
    regions[0, 7:9, 0:2] = 5
    (tmp_path / "regions.csv").write_text("region,station\n3,4R\n7,7\n")
    names = region_names(tmp_path / "regions.csv")
    assert names == {3: "4R", 7: "7"}
    assert region_stations(image_on_tiny_grid(ids), regions, names) == {1: "4R", 2: "unknown", 3: "5"}
    assert region_stations(image_on_tiny_grid(ids), None, names) == {1: "unknown", 2: "unknown", 3: "unknown"}
    (tmp_path / "regions.csv").write_text("region,station\n3,4R\n3,7\n")
    with pytest.raises(LNMError, match=rf"^{tmp_path / 'regions.csv'}: region 3 is listed more than once$"):
        region_names(tmp_path / "regions.csv")


def test_region_map_off_the_image_grid_or_fractional_is_one_line(tmp_path):
    from lnm_auto.detection.detected_nodes import read_region_map
    image = image_on_tiny_grid(np.zeros((4, 8, 8), np.float32))
    off_grid = tmp_path / "a_regions.nii.gz"
    write_image(np.ones((4, 8, 8), np.uint8), off_grid, spacing_xyz=(0.8, 0.8, 5.0))
    with pytest.raises(LNMError, match=rf"^{off_grid}: spacing .*; the region map must lie on the case's image grid$"):
        read_region_map(off_grid, image)
    fractional = tmp_path / "b_regions.nii.gz"
    write_image(np.full((4, 8, 8), 1.5, np.float32), fractional)
    with pytest.raises(LNMError, match=rf"^{fractional}: a region map holds non-negative integer regions"):
        read_region_map(fractional, image)
    good = tmp_path / "c_regions.nii.gz"
    write_image(np.full((4, 8, 8), 2, np.uint8), good)
    assert read_region_map(good, image).tolist() == np.full((4, 8, 8), 2).tolist()


# ---- finding cases without masks ------------------------------------------------------------------------------
def images_only(src_raw: Path, dest: Path, cases=("case_000", "case_001"), masks=()) -> Path:
    """An lnm_predict input folder with the cases' images (and the node masks of ``masks``)."""
    dest.mkdir(parents=True, exist_ok=True)
    for case in cases:
        shutil.copy(src_raw / "imagesTr" / f"{case}_0000.nii.gz", dest / f"{case}_0000.nii.gz")
        if case in masks:
            shutil.copy(src_raw / "nodesTr" / f"{case}.nii.gz", dest / f"{case}_nodes.nii.gz")
    return dest


def test_case_without_mask_needs_a_detector(pristine_tiny_dataset, tmp_path):
    inp = images_only(pristine_tiny_dataset, tmp_path / "in", masks=("case_000",))
    regions = inp / "case_001_regions.nii.gz"
    shutil.copy(pristine_tiny_dataset / "nodesTr" / "case_001.nii.gz", regions)
    cases, problems = discover_cases(inp, 1)
    assert [c.case_id for c in cases] == ["case_000"]
    assert len(problems) == 1 and problems[0].startswith(f"{inp / 'case_001_nodes.nii.gz'}: node mask of case "
                                                         "'case_001' not found") and problems[0].endswith(NO_DETECTOR)
    cases, problems = discover_cases(inp, 1, detection=True)
    assert problems == [] and [(c.case_id, c.needs_detection) for c in cases] == [("case_000", False),
                                                                                 ("case_001", True)]
    assert cases[1].regions_file == regions and cases[1].node_mask_file is None


# ---- a bad --detector folder: one line, nothing written ------------------------------------------------------
def fake_model_folder(root: Path, name="nnUNetTrainer__nnUNetPlans__2d", labels=None, fold=True) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                     "labels": labels or {"background": 0, "lymph_node": 1}}))
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"conv_op": "torch.nn.modules.conv.Conv2d"}, "_kw_requires_import": ["conv_op"]}
    (folder / "plans.json").write_text(json.dumps({"configurations": {"2d": {"architecture": arch}}}))
    if fold:
        (folder / "fold_0").mkdir()
        (folder / "fold_0" / "checkpoint_final.pth").write_bytes(b"not read by the check")
    return folder


@pytest.mark.parametrize("case", ["missing", "no_fold", "bad_name", "no_plans", "foreign_network", "bad_label"])
def test_bad_detector_folder_is_one_line(pristine_tiny_dataset, tmp_path, case):
    inp = images_only(pristine_tiny_dataset, tmp_path / "in")
    folder, label = tmp_path / "models" / "nnUNetTrainer__nnUNetPlans__2d", []
    if case == "missing":
        expected = f"--detector {folder}: no such folder; give nnU-Net's model folder"
    elif case == "no_fold":
        fake_model_folder(tmp_path / "models", fold=False)
        expected = (f"--detector {folder}: no fold_<k>/checkpoint_final.pth; train the detector (lnm_train_detector) "
                    "or give the model folder of a trained one")
    elif case == "bad_name":
        folder = fake_model_folder(tmp_path / "models", name="my_detector")
        expected = f"--detector {folder}: not named <Trainer>__<Plans>__<configuration>"
    elif case == "no_plans":
        fake_model_folder(tmp_path / "models")
        (folder / "plans.json").unlink()
        expected = f"--detector {folder}: no plans.json; give nnU-Net's model folder"
    elif case == "foreign_network":
        fake_model_folder(tmp_path / "models")
        plans = json.loads((folder / "plans.json").read_text())
        plans["configurations"]["2d"]["architecture"]["network_class_name"] = "subprocess.Popen"
        (folder / "plans.json").write_text(json.dumps(plans))
        expected = f"{folder / 'plans.json'}: network 'subprocess.Popen' of '2d' is not one of nnU-Net's architectures"
    else:
        fake_model_folder(tmp_path / "models")
        label = ["--detector_label", "tumour"]
        expected = (f"--detector_label tumour: not a foreground label of {folder / 'dataset.json'} (labels: "
                    "background=0, lymph_node=1)")
    before = tree_hashes(tmp_path / "in")
    proc = run_cli("predict", "-i", inp, "-o", tmp_path / "out", "-m", tmp_path / "no_model", "--detector", folder,
                   *label, "-device", "cpu")
    line = refused(proc, expected)
    assert proc.returncode == 1 and proc.stderr.strip() == line
    assert not (tmp_path / "out").exists() and tree_hashes(tmp_path / "in") == before


def test_detector_label_by_name_and_value(tmp_path):
    folder = fake_model_folder(tmp_path, labels={"background": 0, "vessel": 1, "lymph_node": 2})
    assert (DetectorModel.load(folder, "lymph_node").label, DetectorModel.load(folder, "2").label_name) == \
        (2, "lymph_node")
    assert DetectorModel.load(folder).label == 1 and DetectorModel.load(folder).folds == ("0",)


def test_detector_label_without_a_detector_is_refused(pristine_tiny_dataset, tmp_path):
    inp = images_only(pristine_tiny_dataset, tmp_path / "in")
    proc = run_cli("predict", "-i", inp, "-o", tmp_path / "out", "-m", tmp_path / "no_model", "--detector_label", "1")
    refused(proc, "--detector_label needs a detector: --detector FOLDER, or -d of a dataset with a trained detector")


def test_dataset_detector_is_found_most_recent_first(tmp_path):
    root = tmp_path / "res" / DS / "detector" / "nnUNet_results" / "Dataset042_TinyLN"
    assert find_dataset_detector(tmp_path / "res", DS) is None
    old = fake_model_folder(root, name="nnUNetTrainer__nnUNetPlans__2d")
    fake_model_folder(root, name="nnUNetTrainer__nnUNetPlans__3d_fullres", fold=False)   # not trained: ignored
    assert find_dataset_detector(tmp_path / "res", DS, say=pytest.fail) == old
    new = fake_model_folder(root, name="nnUNetTrainer_5epochs__nnUNetPlans__2d")
    os.utime(old / "fold_0" / "checkpoint_final.pth", (1, 1))
    said = []
    assert find_dataset_detector(tmp_path / "res", DS, say=lambda *a, **k: said.append(a[0])) == new
    assert said == [f"note: 2 trained detectors in {root}; using the most recent, {new.name} (--detector FOLDER "
                    "chooses another)"]


def test_the_dataset_detector_is_found_under_a_plans_name_with_a_dot(tmp_path):
    """lnm_train_detector -gpu_memory_target 0.5 trains into <trainer>__nnUNetPlans_0.5GB__2d."""
    root = tmp_path / "res" / DS / "detector" / "nnUNet_results" / "Dataset042_TinyLN"
    root.mkdir(parents=True)
    made = fake_model_folder(root, name="nnUNetTrainer_5epochs__nnUNetPlans_0.5GB__2d")
    assert find_dataset_detector(tmp_path / "res", DS, say=pytest.fail) == made
    assert DetectorModel.load(made).configuration == "2d"


# ---- slow: a tiny nnU-Net detector trained here, a tiny lnm model, lnm_predict on images alone ----------------
@pytest.fixture
def trained(trained_model_and_detector):
    """conftest's session-wide one-epoch lnm model and nnU-Net detector (trained once per test process)."""
    return trained_model_and_detector


def read_nodes(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"case": str, "station": str}, keep_default_na=False,
                       na_values={"detection_confidence": [""]})


def own_detector_probability(detector: Path, image_file: Path, work: Path) -> np.ndarray:
    """The detector's lymph-node probability of one case, run again here (nnU-Net on the CPU is deterministic)."""
    from lnm_auto.detection.detector import DetectionJob, run_detector
    work.mkdir()
    job = DetectionJob("again", [image_file], work / "again.npz")
    run_detector(DetectorModel.load(detector), [job], work)
    with np.load(job.output, allow_pickle=False) as data:
        return data["probability"]


@pytest.mark.slow
def test_images_alone_are_detected_then_classified(trained, tmp_path):
    root, model, detector = trained
    raw = root / "raw" / DS
    inp = images_only(raw, tmp_path / "in", cases=("case_000", "case_001", "case_002"))
    image = sitk.ReadImage(str(inp / "case_001_0000.nii.gz"))
    regions = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    regions[:, :, :24] = 3                          # one half of the image is region 3 = station 4R
    region_map = sitk.GetImageFromArray(regions)
    region_map.CopyInformation(image)
    sitk.WriteImage(region_map, str(inp / "case_001_regions.nii.gz"))
    (inp / "regions.csv").write_text("region,station\n3,4R\n")
    before = tree_hashes(inp)
    out = tmp_path / "out"
    args = ("predict", "-i", inp, "-o", out, "-m", model, "--detector", detector, "-f", "0", "-device", "cpu",
            "-npp", "0")

    proc = run_cli(*args)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"detecting the nodes of 3 case(s) without a node mask with {detector} (folds 0, label 1 'lymph_node')" \
        in proc.stdout
    nodes = read_nodes(out / "nodes.csv")
    assert list(nodes.columns[:3]) == ["case", "node", "station"]
    assert list(nodes.columns[-2:]) == ["detected", "detection_confidence"]
    assert sorted(set(nodes["case"])) == ["case_000", "case_001", "case_002"], "the tiny detector missed a case"
    assert nodes["detected"].tolist() == [True] * len(nodes)
    assert ((nodes["detection_confidence"] > 0) & (nodes["detection_confidence"] <= 1)).all()
    info = json.loads((out / "predict_info.json").read_text())
    assert info["settings"]["detector"] == {"folder": str(detector.absolute()), "folds": ["0"],
                                            "checkpoint": "checkpoint_final.pth", "label": 1,
                                            "label_name": "lymph_node"}
    assert info["detected_cases"] == ["case_000", "case_001", "case_002"]
    for case in ("case_000", "case_001", "case_002"):
        mask = sitk.ReadImage(str(out / f"{case}_nodes.nii.gz"))
        source = sitk.ReadImage(str(inp / f"{case}_0000.nii.gz"))
        for getter in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
            assert getattr(mask, getter)() == getattr(source, getter)()
        ids = sitk.GetArrayFromImage(mask)
        rows = nodes[nodes["case"] == case]
        assert sorted(rows["node"]) == [int(k) for k in np.unique(ids) if k]
        if not len(rows):
            assert f"{case}: the detector found no node; the case has no rows" in proc.stdout
            assert case in info["cases_without_nodes"]
    # confidence: the mean lymph-node probability over each node, from the detector run again here
    ids = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case_001_nodes.nii.gz")))
    rows = nodes[nodes["case"] == "case_001"].set_index("node")
    if len(rows):
        probability = own_detector_probability(detector, inp / "case_001_0000.nii.gz", tmp_path / "again")
        for k in rows.index:
            assert rows.loc[k, "detection_confidence"] == pytest.approx(float(probability[ids == k].mean()), rel=1e-4)
            in_region = int(((ids == k) & (regions == 3)).sum())
            expected = "4R" if in_region > int((ids == k).sum()) - in_region else "unknown"
            assert rows.loc[k, "station"] == expected
    assert set(nodes[nodes["case"] != "case_001"]["station"]) <= {"unknown"}
    patients = pd.read_csv(out / "patients.csv", dtype={"case": str})
    assert sorted(patients["case"]) == sorted(nodes["case"].unique())
    for case, row in patients.set_index("case").iterrows():
        assert row["probability"] == pytest.approx(nodes[nodes["case"] == case]["probability"].max())
    assert tree_hashes(inp) == before
    assert not any(p.name.startswith(".lnm_detector_work") for p in out.iterdir())

    # a rerun resumes: nothing is detected again, nothing rewritten
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("*_nodes.nii.gz")}
    again = run_cli(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "3 case(s) already predicted" in again.stdout and "detecting the nodes" not in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*_nodes.nii.gz")} == written
    assert read_nodes(out / "nodes.csv").equals(nodes)


@pytest.mark.slow
def test_a_case_with_a_mask_is_never_detected(trained, tmp_path):
    """-d finds the dataset's own detector; only the case without a mask goes to it, the other keeps its mask."""
    root, model, detector = trained
    raw = root / "raw" / DS
    inp = images_only(raw, tmp_path / "in", cases=("case_003", "case_004"), masks=("case_003",))
    pd.DataFrame({"case": ["case_003"] * 3, "node": [1, 2, 3], "station": ["7", "4R", "2L"]}).to_csv(
        inp / "nodes.csv", index=False)                               # case_003 has three nodes
    before = tree_hashes(inp)
    out = tmp_path / "out"
    proc = run_cli("predict", "-i", inp, "-o", out, "-d", "42", "-c", "3d_resenc", "-tr", "LNMTrainer_1epochs",
                   "-f", "0", "--results", root / "results", "-device", "cpu", "-npp", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"detecting the nodes of 1 case(s) without a node mask with {detector}" in proc.stdout
    info = json.loads((out / "predict_info.json").read_text())
    assert info["detected_cases"] == ["case_004"] and info["detector"]["folder"] == str(detector.absolute())
    assert not (out / "case_003_nodes.nii.gz").exists() and (out / "case_004_nodes.nii.gz").is_file()
    nodes = read_nodes(out / "nodes.csv")
    given = nodes[nodes["case"] == "case_003"]
    assert given[["node", "station"]].values.tolist() == [[1, "7"], [2, "4R"], [3, "2L"]]
    assert given["detected"].tolist() == [False] * 3 and given["detection_confidence"].isna().all()
    found = nodes[nodes["case"] == "case_004"]
    assert found["detected"].tolist() == [True] * len(found) and found["detection_confidence"].notna().all()
    ids = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case_004_nodes.nii.gz")))
    assert sorted(found["node"]) == [int(k) for k in np.unique(ids) if k]
    assert tree_hashes(inp) == before


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.slow
def test_a_crafted_detector_checkpoint_is_refused_unrun(trained, tmp_path):
    import torch
    root, model, detector = trained
    crafted = tmp_path / detector.name
    shutil.copytree(detector, crafted)
    marker = tmp_path / "code_ran"
    checkpoint = crafted / "fold_0" / "checkpoint_final.pth"
    torch.save({"network_weights": {}, "payload": _RunsCode(marker)}, checkpoint)
    inp = images_only(root / "raw" / DS, tmp_path / "in", cases=("case_000",))
    proc = run_cli("predict", "-i", inp, "-o", tmp_path / "out", "-m", model, "--detector", crafted, "-f", "0",
                   "-device", "cpu", "-npp", "0")
    refused(proc, f"{checkpoint}: refused: it holds more than tensors, numbers and strings, so loading it could run "
                  "code")
    assert not marker.exists()
    assert not (tmp_path / "out" / "case_000_nodes.nii.gz").exists()
    assert json.loads((tmp_path / "out" / "predict_info.json").read_text())["status"] == "failed"


def blind_detector(detector: Path, dest: Path) -> Path:
    """A copy of the trained detector whose output layers always say background (a real nnU-Net run finding
    nothing)."""
    import torch
    from lnm_auto.detection.nnunet_predict import safe_numpy_globals
    blind = dest / detector.name
    shutil.copytree(detector, blind)
    checkpoint = blind / "fold_0" / "checkpoint_final.pth"
    with torch.serialization.safe_globals(safe_numpy_globals()):
        state = torch.load(checkpoint, weights_only=True)
    for key, value in state["network_weights"].items():
        if key.startswith("decoder.seg_layers.") and key.endswith(".bias"):
            value[0], value[1:] = 30.0, -30.0
    torch.save(state, checkpoint)
    return blind


@pytest.mark.slow
def test_no_node_detected_gives_a_case_without_rows(trained, tmp_path):
    root, model, detector = trained
    inp = images_only(root / "raw" / DS, tmp_path / "in", cases=("case_000", "case_003"), masks=("case_003",))
    out = tmp_path / "out"
    proc = run_cli("predict", "-i", inp, "-o", out, "-m", model, "--detector", blind_detector(detector, tmp_path),
                   "-f", "0", "-device", "cpu", "-npp", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "case_000: the detector found no node; the case has no rows" in proc.stdout.splitlines()
    assert not sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case_000_nodes.nii.gz"))).any()
    info = json.loads((out / "predict_info.json").read_text())
    assert info["cases_without_nodes"] == ["case_000"] and info["detected_cases"] == ["case_000"]
    nodes = read_nodes(out / "nodes.csv")
    assert set(nodes["case"]) == {"case_003"} and nodes["detected"].tolist() == [False] * 3
    assert pd.read_csv(out / "patients.csv", dtype={"case": str})["case"].tolist() == ["case_003"]
    # another detector into the same -o: refused like any other setting
    proc = run_cli("predict", "-i", inp, "-o", out, "-m", model, "--detector", detector, "-f", "0", "-device", "cpu",
                   "-npp", "0")
    refused(proc, f"{out}: holds predictions made with other settings (detector: ")


@pytest.mark.slow
def test_parts_detect_their_own_cases(trained, tmp_path):
    root, model, detector = trained
    inp = images_only(root / "raw" / DS, tmp_path / "in", cases=("case_000", "case_001", "case_002"),
                      masks=("case_001",))
    out = tmp_path / "out"
    for part in ("0", "1"):
        proc = run_cli("predict", "-i", inp, "-o", out, "-m", model, "--detector", detector, "-f", "0", "-device",
                       "cpu", "-npp", "0", "-num_parts", "2", "-part_id", part)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    first, second = (json.loads((out / f"predict_info_part{k}.json").read_text()) for k in (0, 1))
    assert first["detected_cases"] == ["case_000", "case_002"] and second["detected_cases"] == []
    assert first["settings"]["detector"] == second["settings"]["detector"]   # the run detects: both parts say so
    for k in (0, 1):
        assert list(read_nodes(out / f"nodes_part{k}.csv").columns[-2:]) == ["detected", "detection_confidence"]
    assert read_nodes(out / "nodes_part1.csv")["detected"].tolist() == [False] * 3
    # --overwrite detects again, into the same files
    proc = run_cli("predict", "-i", inp, "-o", out, "-m", model, "--detector", detector, "-f", "0", "-device", "cpu",
                   "-npp", "0", "-num_parts", "2", "-part_id", "0", "--overwrite")
    assert proc.returncode == 0 and "detecting the nodes of 2 case(s)" in proc.stdout
    assert sorted(p.name for p in out.glob("*_nodes.nii.gz")) == ["case_000_nodes.nii.gz", "case_002_nodes.nii.gz"]


@pytest.mark.slow
def test_a_dicom_case_without_mask_is_detected(trained, tmp_path):
    """nnU-Net reads files of the detector's ending: a DICOM series goes to it as a NIfTI copy in the work folder."""
    from test_inference import write_dicom_series
    root, model, detector = trained
    image = sitk.Cast(sitk.ReadImage(str(root / "raw" / DS / "imagesTr" / "case_001_0000.nii.gz")), sitk.sitkInt16)
    write_dicom_series(image, tmp_path / "in" / "pt1")
    before = tree_hashes(tmp_path / "in")
    out = tmp_path / "out"
    proc = run_cli("predict", "-i", tmp_path / "in", "-o", out, "-m", model, "--detector", detector, "-f", "0",
                   "-device", "cpu", "-npp", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    mask = sitk.ReadImage(str(out / "pt1_nodes.nii.gz"))
    assert mask.GetSize() == image.GetSize()
    np.testing.assert_allclose(mask.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(mask.GetDirection(), image.GetDirection(), atol=1e-6)
    nodes = read_nodes(out / "nodes.csv")
    ids = sitk.GetArrayFromImage(mask)
    assert sorted(nodes["node"]) == [int(k) for k in np.unique(ids) if k]
    assert nodes["detected"].tolist() == [True] * len(nodes)
    assert json.loads((out / "predict_info.json").read_text())["detected_cases"] == ["pt1"]
    assert tree_hashes(tmp_path / "in") == before
    assert not any(p.name.startswith(".lnm_detector_work") for p in out.iterdir())
