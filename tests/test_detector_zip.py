"""The node detector travels in the model zip (issue 24 item 5): lnm_export_model packs the dataset's detector (or
--detector), checked weights-only first; lnm_predict -m THE_ZIP on images alone detects with it exactly as
lnm_predict -d does from the folders; --no_detector leaves it out; the zip's members are checked like the model's.
Slow tests reuse test_detect_predict's one-epoch lnm model and one-epoch 2d nnU-Net detector."""
from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import refused, run_cli
from test_detect_predict import (DS, _RunsCode, fake_model_folder, images_only, read_nodes, trained,  # noqa: F401
                                 tree_hashes)
from lnm_auto.detection.detector import DetectorModel
from lnm_auto.inference.detector_zip import check_detector_weights
from lnm_auto.utils.errors import LNMError

# one test process runs every test of the detector path (README: -n 2 --dist loadgroup), so the session
# fixture that trains the lnm model and the nnU-Net detector runs once, not once per process
pytestmark = pytest.mark.xdist_group("detector")

MODEL = "LNMTrainer_1epochs__LNMPlans__3d_resenc"
NO_DETECTOR_LINE = "no detector: the zip predicts cases with node masks only"


def fake_detector(root: Path, checkpoint_content=None) -> Path:
    """A detector folder DetectorModel accepts, its checkpoint a weights-only dict (or ``checkpoint_content``)."""
    folder = fake_model_folder(root)
    torch.save(checkpoint_content if checkpoint_content is not None else {"network_weights": {}},
               folder / "fold_0" / "checkpoint_final.pth")
    return folder


def hand_made_zip(path: Path, members: dict[str, bytes]) -> Path:
    """A zip holding a stand-in model folder (plans.json only: the detector is read before the model) and
    ``members``."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{DS}/{MODEL}/plans.json", "{}")
        for name, data in members.items():
            z.writestr(name, data)
    return path


def detector_members_of(folder: Path, record: dict | str | None) -> dict[str, bytes]:
    base = f"{DS}/detector/{folder.name}"
    members = {f"{base}/{f}": (folder / f).read_bytes()
               for f in ("dataset.json", "plans.json", "fold_0/checkpoint_final.pth")}
    if record is not None:
        members[f"{DS}/detector/detector.json"] = record if isinstance(record, str) else json.dumps(record)
    return members


GOOD_RECORD = {"model_folder": "nnUNetTrainer__nnUNetPlans__2d", "folds": ["0"], "checkpoint": "checkpoint_final.pth",
               "label": 1, "label_name": "lymph_node"}


# ---- fast: the zip's members and record checked, one line each -------------------------------------------------
def test_a_detector_member_escaping_the_folder_is_refused(pristine_tiny_dataset, tmp_path):
    inp = images_only(pristine_tiny_dataset, tmp_path / "in")
    escaped = f"lnm_escaped_{tmp_path.name}.txt"
    model_zip = hand_made_zip(tmp_path / "model.zip", {f"{DS}/detector/../../{escaped}": b"x"})
    before = tree_hashes(inp)
    proc = run_cli("predict", "-i", inp, "-o", tmp_path / "out", "-m", model_zip, "-device", "cpu")
    line = refused(proc, f"{model_zip}: unsafe path '{DS}/detector/../../{escaped}' in the zip; refused")
    assert proc.stderr.strip() == line
    assert not (Path(tempfile.gettempdir()) / escaped).exists() and not (tmp_path / escaped).exists()
    assert not (tmp_path / "out").exists() and tree_hashes(inp) == before


@pytest.mark.parametrize("case", ["no_record", "not_json", "path_in_record", "record_names_other_folder", "no_fold"])
def test_a_damaged_detector_in_the_zip_is_one_line(pristine_tiny_dataset, tmp_path, case):
    inp = images_only(pristine_tiny_dataset, tmp_path / "in")
    folder = fake_detector(tmp_path / "models")
    model_zip = tmp_path / "model.zip"
    where = f"{model_zip}: {DS}/detector/detector.json"
    record = dict(GOOD_RECORD)
    if case == "no_record":
        record, expected = None, f"{model_zip}: {DS}/detector/ holds no detector.json; not a zip of lnm_export_model"
    elif case == "not_json":
        record, expected = "{not json", f"{where}: damaged (needs model_folder, folds, checkpoint and label)"
    elif case == "path_in_record":
        record["model_folder"] = "../nnUNetTrainer__nnUNetPlans__2d"
        expected = f"{where}: damaged (needs model_folder, folds, checkpoint and label)"
    elif case == "record_names_other_folder":
        record["model_folder"] = "nnUNetTrainer__nnUNetPlans__3d_fullres"
        expected = f"{where}: names nnUNetTrainer__nnUNetPlans__3d_fullres, which the zip does not hold"
    else:
        record["checkpoint"] = "checkpoint_best.pth"
        expected = (f"--detector {model_zip.absolute()}/{DS}/detector/{folder.name}: no fold_<k>/checkpoint_best.pth")
    hand_made_zip(model_zip, detector_members_of(folder, record))
    proc = run_cli("predict", "-i", inp, "-o", tmp_path / "out", "-m", model_zip, "-device", "cpu")
    line = refused(proc, expected)
    assert proc.stderr.strip() == line and "lnm_model_" not in line      # never the temporary folder
    assert not (tmp_path / "out").exists()


def test_a_crafted_detector_checkpoint_fails_the_check_unrun(tmp_path):
    marker = tmp_path / "code_ran"
    folder = fake_detector(tmp_path / "models", {"network_weights": {}, "payload": _RunsCode(marker)})
    with pytest.raises(LNMError, match=r"checkpoint_final.pth: refused: it holds more than tensors, numbers and "
                                       r"strings, so loading it could run code"):
        check_detector_weights(DetectorModel.load(folder))
    assert not marker.exists()
    check_detector_weights(DetectorModel.load(fake_detector(tmp_path / "good")))      # weights only: accepted


def test_export_detector_flags_that_contradict_are_one_line(tmp_path):
    (tmp_path / "results" / DS).mkdir(parents=True)
    for extra in (["--detector", tmp_path / "d"], ["--detector_label", "1"]):
        proc = run_cli("export_model", "-d", "42", "-o", tmp_path / "m.zip", "--no_detector", *extra,
                       "--results", tmp_path / "results")
        refused(proc, "--no_detector leaves the detector out; it cannot go with --detector or --detector_label")
    assert not (tmp_path / "m.zip").exists()


# ---- slow: the round trip with a trained detector --------------------------------------------------------------
def mixed_input(raw: Path, dest: Path) -> Path:
    """Two cases of images alone and one with its node mask (and node table)."""
    inp = images_only(raw, dest, cases=("case_000", "case_001", "case_003"), masks=("case_003",))
    (inp / "nodes.csv").write_text("case,node,station\ncase_003,1,7\ncase_003,2,4R\ncase_003,3,2L\n")
    return inp


def predict(inp: Path, out: Path, *how) -> dict:
    proc = run_cli("predict", "-i", inp, "-o", out, *how, "-f", "0", "-device", "cpu", "-npp", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"stdout": proc.stdout, "info": json.loads((out / "predict_info.json").read_text())}


@pytest.mark.slow
def test_the_zip_detects_as_the_folders_do(trained, tmp_path):
    root, model, detector = trained
    results = root / "results"
    model_zip = tmp_path / "model.zip"
    proc = run_cli("export_model", "-d", "42", "-c", "3d_resenc", "-tr", "LNMTrainer_1epochs", "-f", "0",
                   "-o", model_zip, "--results", results)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"detector packed: {detector.name} (folds 0, label 1 'lymph_node') from {detector}" in proc.stdout
    with zipfile.ZipFile(model_zip) as z:
        names = z.namelist()
        record = json.loads(z.read(f"{DS}/detector/detector.json"))
    assert sorted(n for n in names if n.startswith(f"{DS}/detector/")) == sorted(
        [f"{DS}/detector/detector.json"] + [f"{DS}/detector/{detector.name}/{f}" for f in
                                            ("dataset.json", "plans.json", "fold_0/checkpoint_final.pth")])
    assert all(n.startswith((f"{DS}/{MODEL}/", f"{DS}/detector/")) for n in names)
    assert (record["model_folder"], record["folds"], record["label"]) == (detector.name, ["0"], 1)

    inp = mixed_input(root / "raw" / DS, tmp_path / "in")
    before = tree_hashes(inp)
    from_zip = predict(inp, tmp_path / "zip_out", "-m", model_zip)
    from_folders = predict(inp, tmp_path / "folder_out", "-d", "42", "-c", "3d_resenc", "-tr", "LNMTrainer_1epochs",
                           "--results", results)
    assert f"detector packed in {model_zip}: {detector.name} (folds 0, label 1 'lymph_node')" in from_zip["stdout"]
    assert "detecting the nodes of 2 case(s) without a node mask" in from_zip["stdout"]
    zip_nodes, folder_nodes = read_nodes(tmp_path / "zip_out" / "nodes.csv"), \
        read_nodes(tmp_path / "folder_out" / "nodes.csv")
    assert len(zip_nodes) > 3, "the tiny detector found no node"
    assert zip_nodes[["case", "node", "station", "detected"]].equals(folder_nodes[["case", "node", "station",
                                                                                   "detected"]])
    for column in ("probability", "detection_confidence"):
        np.testing.assert_allclose(zip_nodes[column], folder_nodes[column], atol=1e-6, equal_nan=True)
    # the case with a mask is never detected, from the zip either
    assert from_zip["info"]["detected_cases"] == from_folders["info"]["detected_cases"] == ["case_000", "case_001"]
    assert not (tmp_path / "zip_out" / "case_003_nodes.nii.gz").exists()
    given = zip_nodes[zip_nodes["case"] == "case_003"]
    assert given["detected"].tolist() == [False] * 3 and given["detection_confidence"].isna().all()
    # the record names the zip's member, not the temporary folder it was unpacked to
    expected = {"folder": f"{model_zip.absolute()}/{DS}/detector/{detector.name}", "folds": ["0"],
                "checkpoint": "checkpoint_final.pth", "label": 1, "label_name": "lymph_node"}
    assert from_zip["info"]["settings"]["detector"] == expected
    assert from_zip["info"]["detector"]["folder"] == expected["folder"]
    assert tree_hashes(inp) == before
    # a rerun into the same -o resumes (its settings, the zip's detector included, are the same)
    again = run_cli("predict", "-i", inp, "-o", tmp_path / "zip_out", "-m", model_zip, "-f", "0", "-device", "cpu",
                    "-npp", "0")
    assert again.returncode == 0 and "3 case(s) already predicted" in again.stdout, again.stdout + again.stderr
    # an explicit --detector wins over the packed one, said in one line
    other = run_cli("predict", "-i", images_only(root / "raw" / DS, tmp_path / "in2", cases=("case_002",)), "-o",
                    tmp_path / "other_out", "-m", model_zip, "--detector", detector, "-f", "0", "-device", "cpu",
                    "-npp", "0")
    assert other.returncode == 0, other.stdout + other.stderr
    assert f"--detector {detector} is used, not the detector packed in {model_zip}" in other.stdout
    assert json.loads((tmp_path / "other_out" / "predict_info.json").read_text())["detector"]["folder"] == \
        str(detector.absolute())


@pytest.mark.slow
def test_no_detector_and_the_choice(trained, tmp_path):
    from test_ensemble_path import choose
    root, model, detector = trained
    results = root / "results"
    inp = images_only(root / "raw" / DS, tmp_path / "in", cases=("case_002",))
    instructions = choose(results, [model])
    try:
        # --no_detector: the zip holds no detector, and images alone are refused with the usual line
        bare = tmp_path / "bare.zip"
        proc = run_cli("export_model", "-d", "42", "-o", bare, "--no_detector", "--results", results)
        assert proc.returncode == 0 and NO_DETECTOR_LINE in proc.stdout, proc.stdout + proc.stderr
        with zipfile.ZipFile(bare) as z:
            assert not [n for n in z.namelist() if "/detector/" in n]
        proc = run_cli("predict", "-i", inp, "-o", tmp_path / "bare_out", "-m", bare, "-device", "cpu", "-npp", "0")
        refused(proc, f"{inp / 'case_002_nodes.nii.gz'}: node mask of case 'case_002' not found",
                "or let a detector find the nodes")
        # the choice packs the dataset's detector by default and predicts images alone from the zip
        chosen = tmp_path / "chosen.zip"
        proc = run_cli("export_model", "-d", "42", "-o", chosen, "--results", results)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"detector packed: {detector.name} (folds 0, label 1 'lymph_node')" in proc.stdout
        with zipfile.ZipFile(chosen) as z:
            assert f"{DS}/detector/{detector.name}/fold_0/checkpoint_final.pth" in z.namelist()
        out = tmp_path / "chosen_out"
        proc = run_cli("predict", "-i", inp, "-o", out, "-m", chosen, "-device", "cpu", "-npp", "0")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        info = json.loads((out / "predict_info.json").read_text())
        assert info["detected_cases"] == ["case_002"]
        assert info["detector"]["folder"] == f"{chosen.absolute()}/{DS}/detector/{detector.name}"
    finally:
        instructions.unlink()
    # a crafted detector fails the export in one line before the zip is written, and nothing in it runs
    crafted = tmp_path / "crafted" / detector.name
    shutil.copytree(detector, crafted)
    marker = tmp_path / "code_ran"
    torch.save({"network_weights": {}, "payload": _RunsCode(marker)}, crafted / "fold_0" / "checkpoint_final.pth")
    proc = run_cli("export_model", "-d", "42", "-c", "3d_resenc", "-tr", "LNMTrainer_1epochs", "-o",
                   tmp_path / "crafted.zip", "--detector", crafted, "--results", results)
    refused(proc, f"{crafted / 'fold_0' / 'checkpoint_final.pth'}: refused: it holds more than tensors")
    assert not marker.exists() and not (tmp_path / "crafted.zip").exists()
