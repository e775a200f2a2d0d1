"""lnm_predict / lnm_export_model: real models trained on the tiny dataset, real files, real CLI calls."""
from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from lnm_auto.inference.model import export_model
from lnm_auto.inference.predictor import predict_folder
from lnm_auto.planning.plan_and_preprocess import plan_and_preprocess
from lnm_auto.training.run import run_training, setup_trainer
from conftest import run_cli, write_image, write_tiny_dataset

pytestmark = pytest.mark.slow   # trains models or runs the pipeline: deselect with -m "not slow"

OBLIQUE = tuple(np.array([[0.9848, -0.1736, 0.0], [0.1736, 0.9848, 0.0], [0.0, 0.0, 1.0]]).ravel())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    raw = write_tiny_dataset(root / "raw", n_cases=8)
    plan_and_preprocess(42, root / "raw", root / "pre", planner="LNMPlannerCPU", progress=False)
    for fold in ("0", "1"):
        run_training(setup_trainer(42, "3d_resenc", fold, root / "pre", root / "results", "LNMTrainer_2epochs",
                                   num_workers=0))
    model = root / "results" / "Dataset042_Tiny" / "LNMTrainer_2epochs__LNMPlans__3d_resenc"
    # input folder: two cases with an oblique direction and an unusual origin
    inp = root / "input"
    for i, case in enumerate(("case_000", "case_001")):
        img = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "imagesTr" / f"{case}_0000.nii.gz")))
        msk = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "nodesTr" / f"{case}.nii.gz")))
        geometry = dict(origin=(-55.5 + i, 101.25, 333.0), direction=OBLIQUE)
        write_image(img, inp / f"pt{i}_0000.nii.gz", **geometry)
        write_image(msk, inp / f"pt{i}_nodes.nii.gz", **geometry)
    pd.DataFrame({"case": ["pt0", "pt0", "pt1"], "node": [1, 2, 1], "station": ["7", "4R", "7"]}).to_csv(
        inp / "nodes.csv", index=False)
    return root, model, inp


def test_probmap_has_input_geometry_and_node_probabilities(trained, tmp_path):
    root, model, inp = trained
    info = predict_folder(inp, tmp_path, model, ["0", "1"], progress=False)
    nodes = pd.read_csv(tmp_path / "nodes.csv", dtype={"case": str, "station": str}, keep_default_na=False)
    assert len(nodes) == 5 and info["folds"] == ["0", "1"]
    assert nodes.set_index(["case", "node"]).loc[("pt0", 2), "station"] == "4R"
    for case in ("pt0", "pt1"):
        src = sitk.ReadImage(str(inp / f"{case}_0000.nii.gz"))
        pm = sitk.ReadImage(str(tmp_path / f"{case}_probmap.nii.gz"))
        assert pm.GetSize() == src.GetSize()
        np.testing.assert_allclose(pm.GetSpacing(), src.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(pm.GetOrigin(), src.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(pm.GetDirection(), src.GetDirection(), atol=1e-6)
        ids = sitk.GetArrayFromImage(sitk.ReadImage(str(inp / f"{case}_nodes.nii.gz")))
        arr = sitk.GetArrayFromImage(pm)
        assert (arr[ids == 0] == 0).all()
        for r in nodes[nodes.case == case].itertuples():
            np.testing.assert_allclose(arr[ids == r.node], r.probability, rtol=1e-6)
    stations = pd.read_csv(tmp_path / "stations.csv", dtype={"station": str})
    assert stations.set_index(["case", "station"]).loc[("pt0", "7"), "probability"] == pytest.approx(
        nodes.set_index(["case", "node"]).loc[("pt0", 1), "probability"])
    patients = pd.read_csv(tmp_path / "patients.csv")
    assert patients.set_index("case").loc["pt1", "probability"] == pytest.approx(
        nodes[nodes.case == "pt1"].probability.max())
    import json
    meta = json.loads((tmp_path / "predict_info.json").read_text())
    assert meta["plans_version"] == 2 and meta["lnm_auto_version"] and meta["n_nodes"] == 5


def test_fold_ensemble_is_mean_of_single_folds(trained, tmp_path):
    root, model, inp = trained
    predict_folder(inp, tmp_path / "both", model, ["0", "1"], progress=False, save_probmaps=False)
    predict_folder(inp, tmp_path / "f0", model, ["0"], progress=False, save_probmaps=False)
    predict_folder(inp, tmp_path / "f1", model, ["1"], progress=False, save_probmaps=False)
    both, f0, f1 = (pd.read_csv(tmp_path / d / "nodes.csv") for d in ("both", "f0", "f1"))
    np.testing.assert_allclose(both.probability, (f0.probability + f1.probability) / 2, rtol=1e-6)
    np.testing.assert_allclose(both.probability_fold0, f0.probability, rtol=1e-6)
    assert not np.allclose(f0.probability, f1.probability)   # the folds really differ


def test_raw_imagesTs_layout_and_mirroring_changes_little(trained, tmp_path):
    root, model, inp = trained
    ts = tmp_path / "Dataset042_Tiny"
    (ts / "imagesTs").mkdir(parents=True)
    (ts / "nodesTs").mkdir()
    shutil.copy(inp / "pt0_0000.nii.gz", ts / "imagesTs" / "pt0_0000.nii.gz")
    shutil.copy(inp / "pt0_nodes.nii.gz", ts / "nodesTs" / "pt0.nii.gz")
    pd.DataFrame({"case": ["pt0", "pt0"], "node": [1, 2], "station": ["7", "4R"], "label": [0, 1]}).to_csv(
        ts / "nodesTs.csv", index=False)
    predict_folder(ts / "imagesTs", tmp_path / "out", model, ["0", "1"], progress=False)
    out = pd.read_csv(tmp_path / "out" / "nodes.csv", dtype={"station": str})
    assert out.station.tolist() == ["7", "4R"]
    predict_folder(ts / "imagesTs", tmp_path / "nomirror", model, ["0", "1"], progress=False, mirror=False)
    ref = pd.read_csv(tmp_path / "nomirror" / "nodes.csv")
    assert np.abs(out.probability - ref.probability).max() < 0.5


def test_export_zip_predicts_the_same(trained, tmp_path):
    root, model, inp = trained
    zip_file = export_model(model, tmp_path / "model.zip")
    proc = run_cli("predict", "-i", inp, "-o", tmp_path / "z", "-m", zip_file, "-f", "0", "1", "--quiet",
                   env={"LNM_results": None})
    assert proc.returncode == 0, proc.stderr
    predict_folder(inp, tmp_path / "d", model, ["0", "1"], progress=False)
    a, b = pd.read_csv(tmp_path / "z" / "nodes.csv"), pd.read_csv(tmp_path / "d" / "nodes.csv")
    pd.testing.assert_frame_equal(a, b)


def test_zip_of_some_folds_predicts_with_the_folds_it_holds(trained, tmp_path):
    """A zip exported with -f 0 is that model: -m without -f predicts with fold 0, as the folder does with -f 0
    (before, it asked a zip user to "train" the missing folds, naming a temporary extraction path)."""
    root, model, inp = trained
    zip_file = export_model(model, tmp_path / "fold0.zip", folds=["0"])
    proc = run_cli("predict", "-i", inp, "-o", tmp_path / "z", "-m", zip_file, "--quiet", env={"LNM_results": None})
    assert proc.returncode == 0, proc.stderr
    predict_folder(inp, tmp_path / "d", model, ["0"], progress=False)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "z" / "nodes.csv"), pd.read_csv(tmp_path / "d" / "nodes.csv"))


def test_dicom_series_input(trained, tmp_path):
    """A DICOM series predicts what the same int16 voxels predict from NIfTI. (It flaked at a tolerance of 0.02
    against the float original: crops were cut one sample different at the volume's edge, see sample_linear.)"""
    root, model, inp = trained
    img = sitk.Cast(sitk.ReadImage(str(inp / "pt0_0000.nii.gz")), sitk.sitkInt16)
    case_dir = tmp_path / "dicom" / "pt0"
    write_dicom_series(img, case_dir)
    shutil.copy(inp / "pt0_nodes.nii.gz", case_dir / "nodes.nii.gz")
    (tmp_path / "nifti").mkdir()
    sitk.WriteImage(img, str(tmp_path / "nifti" / "pt0_0000.nii.gz"))
    shutil.copy(inp / "pt0_nodes.nii.gz", tmp_path / "nifti" / "pt0_nodes.nii.gz")
    predict_folder(tmp_path / "dicom", tmp_path / "out", model, ["0", "1"], progress=False)
    predict_folder(tmp_path / "nifti", tmp_path / "ref", model, ["0", "1"], progress=False, save_probmaps=False)
    got = pd.read_csv(tmp_path / "out" / "nodes.csv")
    ref = pd.read_csv(tmp_path / "ref" / "nodes.csv")
    assert got.case.tolist() == ref.case.tolist() == ["pt0", "pt0"]
    # the geometries differ by ~1e-14 (direction from decimal text): the crops, and so the scores, must not
    np.testing.assert_allclose(got.probability, ref.probability, rtol=0, atol=1e-6)


def write_dicom_series(img: sitk.Image, folder) -> None:
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125." + str(int(time.time()))
    d = img.GetDirection()
    tags = [("0008|0060", "CT"), ("0020|000d", uid + ".1"), ("0020|000e", uid + ".2"),
            ("0020|0037", "\\".join(map(str, (d[0], d[3], d[6], d[1], d[4], d[7])))),
            ("0028|0030", f"{img.GetSpacing()[1]}\\{img.GetSpacing()[0]}"), ("0018|0050", str(img.GetSpacing()[2]))]
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        for tag, value in tags:
            sl.SetMetaData(tag, value)
        sl.SetMetaData("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, k)))))
        sl.SetMetaData("0020|0013", str(k + 1))
        sl.SetMetaData("0008|0018", f"{uid}.3.{k + 1}")
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)


def test_bad_inputs_are_reported_and_others_still_processed(trained, tmp_path):
    root, model, inp = trained
    bad = tmp_path / "in"
    shutil.copytree(inp, bad)
    shutil.copy(inp / "pt0_0000.nii.gz", bad / "pt2_0000.nii.gz")                # no node mask
    write_image(np.zeros((10, 48, 40), np.uint8), bad / "pt3_nodes.nii.gz")       # mask geometry differs
    shutil.copy(inp / "pt0_0000.nii.gz", bad / "pt3_0000.nii.gz")
    proc = run_cli("predict", "-i", bad, "-o", tmp_path / "o", "-m", model, "-f", "0", "1", "--quiet")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "2 case(s) failed" in proc.stderr
    assert "pt2_nodes.nii.gz: node mask of case 'pt2' not found" in proc.stderr
    assert "pt3_nodes.nii.gz: size" in proc.stderr
    done = pd.read_csv(tmp_path / "o" / "nodes.csv")
    assert set(done.case) == {"pt0", "pt1"}


def test_missing_folds_and_model_choice(trained, tmp_path):
    root, model, inp = trained
    env = {**os.environ, "LNM_results": str(root / "results")}
    p = run_cli("predict", "-i", inp, "-o", tmp_path / "a",
                        "-f", "0", "3", "-d", "42", "-c", "3d_resenc", "-tr", "LNMTrainer_2epochs", env=env)
    assert p.returncode == 1 and "no checkpoint_final.pth for fold(s) 3; trained folds: 0, 1" in p.stderr
    # only one trained model: -d/-c may be left out, as the design card writes the command
    p = run_cli("predict", "-i", inp, "-o", tmp_path / "b",
                        "-f", "0", "1", "--quiet", env=env)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "b" / "nodes.csv").is_file()
    p = run_cli("predict", "-i", tmp_path / "nope", "-o", tmp_path / "c", "-f", "0", "1", env=env)
    assert p.returncode == 1 and "no such folder" in p.stderr


def test_binary_mask_is_split_into_its_nodes_at_prediction(trained, tmp_path, capsys):
    root, model, inp = trained
    binary = tmp_path / "bin"
    shutil.copytree(inp, binary)
    (binary / "nodes.csv").unlink()
    mask = sitk.ReadImage(str(inp / "pt0_nodes.nii.gz"))
    n_nodes = len(np.unique(sitk.GetArrayViewFromImage(mask))) - 1
    sitk.WriteImage(sitk.Cast(mask > 0, sitk.sitkUInt8), str(binary / "pt0_nodes.nii.gz"))
    predict_folder(binary, tmp_path / "out", model, ["0", "1"], progress=False)
    assert f"split into {n_nodes} node(s)" in capsys.readouterr().out
    got = pd.read_csv(tmp_path / "out" / "nodes.csv")
    predict_folder(inp, tmp_path / "ref", model, ["0", "1"], progress=False, save_probmaps=False)
    ref = pd.read_csv(tmp_path / "ref" / "nodes.csv")
    # the same nodes (maybe numbered differently): the same probabilities
    assert sorted(got[got.case == "pt0"].probability.round(6)) == sorted(ref[ref.case == "pt0"].probability.round(6))
    instances = sitk.ReadImage(str(tmp_path / "out" / "pt0_nodes.nii.gz"))
    probmap = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "pt0_probmap.nii.gz")))
    ids = sitk.GetArrayFromImage(instances)
    for row in got[got.case == "pt0"].itertuples():
        assert np.allclose(probmap[ids == row.node], row.probability)
