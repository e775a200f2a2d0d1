"""lnm_predict and lnm_export_model against hostile inputs, built for real: an output folder that is (or holds)
the input, runs where every case fails, incomplete DICOM series, images from another modality, damaged
models and instruction files, killed runs. Inputs are hashed before and after: no command writes into, renames
or deletes a file it did not write (documentation/robustness.md)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk

from lnm_auto.utils.stale_temps import stale_temp_files
from conftest import refused, run_cli, train_one_epoch_model
from dicom_builders import write_ct_series_sitk

DS = "Dataset042_Tiny"




def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` (by relative path): what 'byte-identical' is checked against."""
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def info(out: Path, name: str = "predict_info.json") -> dict:
    return json.loads((out / name).read_text())


@pytest.fixture(scope="module")
def planned(planned_tiny) -> Path:
    return planned_tiny(8)


@pytest.fixture(scope="module")
def model(planned, tmp_path_factory) -> Path:
    """A CT model (the tiny dataset's channel is 'CT'): one fold, one epoch."""
    return train_one_epoch_model(planned, tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def radiomics_model(planned, tmp_path_factory) -> Path:
    from lnm_auto.training.run import run_training, setup_trainer
    trainer = setup_trainer(42, "radiomics", "0", planned / "pre", tmp_path_factory.mktemp("radiomics"),
                            raw_root=planned / "raw", num_workers=0)
    run_training(trainer)
    return trainer.output_folder.parent


def copy_case(planned: Path, case: str, folder: Path, as_case: str | None = None, binary: bool = False) -> None:
    """A training case as lnm_predict input: <case>_0000.nii.gz + <case>_nodes.nii.gz (``binary``: the mask
    as one label, split into nodes at prediction, which writes an instance mask into -o)."""
    raw, name = planned / "raw" / DS, as_case or case
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(raw / "imagesTr" / f"{case}_0000.nii.gz", folder / f"{name}_0000.nii.gz")
    if binary:
        mask = sitk.ReadImage(str(raw / "nodesTr" / f"{case}.nii.gz"))
        sitk.WriteImage(sitk.Cast(mask > 0, sitk.sitkUInt8), str(folder / f"{name}_nodes.nii.gz"))
    else:
        shutil.copy(raw / "nodesTr" / f"{case}.nii.gz", folder / f"{name}_nodes.nii.gz")


@pytest.fixture
def cases_in(planned, tmp_path) -> Path:
    """Three cases (case_000's mask binary) and a nodes.csv of stations: every kind of input file."""
    inp = tmp_path / "in"
    for case in ("case_000", "case_001", "case_002"):
        copy_case(planned, case, inp, binary=case == "case_000")
    pd.DataFrame({"case": ["case_001", "case_002"], "node": [1, 1], "station": ["7", "7"]}).to_csv(
        inp / "nodes.csv", index=False)
    return inp


def predict(inp: Path, out: Path, model: Path, *extra) -> subprocess.CompletedProcess:
    return run_cli("predict", "-i", inp, "-o", out, "-m", model, "-f", "0", "-device", "cpu", "--quiet", *extra)


# ---- 1. the output folder never holds an input; --overwrite removes only what lnm_predict recorded ----------
@pytest.mark.slow
def test_output_folder_that_is_or_holds_the_input_is_refused(model, cases_in, tmp_path):
    before = hashes(cases_in)
    refused(predict(cases_in, cases_in, model), f"-o {cases_in}", "is the input folder")
    link = tmp_path / "link_to_input"
    link.symlink_to(cases_in, target_is_directory=True)
    refused(predict(cases_in, link, model), f"-o {link}", "is the input folder")
    refused(predict(cases_in, tmp_path, model), f"-o {tmp_path}", "holds the input folder", str(cases_in))
    # a raw dataset's imagesTs/: its nodesTs/ masks and nodesTs.csv are inputs too
    root = tmp_path / "ds"
    (root / "imagesTs").mkdir(parents=True)
    (root / "nodesTs").mkdir()
    for case in ("case_001", "case_002"):
        shutil.copy(cases_in / f"{case}_0000.nii.gz", root / "imagesTs" / f"{case}_0000.nii.gz")
        shutil.copy(cases_in / f"{case}_nodes.nii.gz", root / "nodesTs" / f"{case}.nii.gz")
    shutil.copy(cases_in / "nodes.csv", root / "nodesTs.csv")
    before_ds = hashes(root)
    refused(predict(root / "imagesTs", root / "nodesTs", model), "holds the input file",
            str(root / "nodesTs" / "case_001.nii.gz"))
    refused(predict(root / "imagesTs", root, model), f"-o {root}", "holds the input")
    assert hashes(root) == before_ds and hashes(cases_in) == before                   # nothing written at all
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "in", "link_to_input"]


@pytest.mark.slow
def test_output_inside_the_input_then_overwrite_keeps_every_input_byte_identical(model, cases_in):
    before = hashes(cases_in)
    out = cases_in / "predictions"
    assert predict(cases_in, out, model).returncode == 0
    assert (out / "case_000_nodes.nii.gz").is_file()          # the binary mask's instances, in -o only
    recorded = set(info(out)["files"])
    assert {"nodes.csv", "case_000_nodes.nii.gz", "case_001_probmap.nii.gz", "cases/case_002.csv"} <= recorded
    (out / "my_notes.txt").write_text("mine")
    (out / ".nodes.csv.backup").write_text("mine too")        # hidden, but not our temp-file pattern
    assert predict(cases_in, out, model, "--overwrite").returncode == 0
    assert predict(cases_in, out, model, "--overwrite", "--disable_tta").returncode == 0
    assert {k: v for k, v in hashes(cases_in).items() if not k.startswith("predictions/")} == before
    assert (out / "my_notes.txt").read_text() == "mine" and (out / ".nodes.csv.backup").read_text() == "mine too"
    assert info(out)["status"] == "finished"


@pytest.mark.slow
def test_ensemble_output_follows_the_same_rules(model, radiomics_model, cases_in, tmp_path):
    from lnm_auto.inference.ensemble import predict_ensemble
    from lnm_auto.utils.errors import LNMError
    members = [model, radiomics_model]
    before = hashes(cases_in)
    with pytest.raises(LNMError, match="is the input folder"):
        predict_ensemble(cases_in, cases_in, members, progress=False, folds=["0"])
    out = cases_in / "ensemble"
    for _ in range(2):                                     # a rerun with the same settings replaces its own files
        predict_ensemble(cases_in, out, members, progress=False, folds=["0"])
    record = info(out)
    assert record["status"] == "finished" and {"nodes.csv", "case_001_probmap.nii.gz"} <= set(record["files"])
    nodes = pd.read_csv(out / "nodes.csv")
    member_columns = [f"probability_{m.name}" for m in members]
    np.testing.assert_allclose(nodes.probability, nodes[member_columns].mean(axis=1))
    assert {k: v for k, v in hashes(cases_in).items() if not k.startswith("ensemble/")} == before
    with pytest.raises(LNMError, match="other settings"):     # another ensemble into the same folder
        predict_ensemble(cases_in, out, members[:1] + members, progress=False, folds=["0"])


@pytest.mark.slow
def test_output_file_lnm_predict_did_not_write_is_never_replaced(model, cases_in, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "nodes.csv").write_text("case,node,label\nx,1,1\n")       # e.g. a reference table kept there
    refused(predict(cases_in, out, model), "holds nodes.csv", "did not write")
    refused(predict(cases_in, out, model, "--overwrite"), "holds nodes.csv", "did not write")
    assert (out / "nodes.csv").read_text() == "case,node,label\nx,1,1\n" and not (out / "cases").exists()
    (out / "predict_info.json").write_text('{"mine": 1}')              # JSON, but no record of lnm_predict
    refused(predict(cases_in, out, model, "--overwrite"), str(out / "predict_info.json"), "not written by lnm_predict")
    assert (out / "predict_info.json").read_text() == '{"mine": 1}' and (out / "nodes.csv").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_killed_run_and_its_rerun_leave_the_inputs_byte_identical(model, planned, tmp_path):
    inp = tmp_path / "in"
    for i in range(8):
        copy_case(planned, f"case_{i:03d}", inp, binary=i % 2 == 0)
    pd.DataFrame({"case": ["case_001"], "node": [1], "station": ["7"]}).to_csv(inp / "nodes.csv", index=False)
    before = hashes(inp)
    out = inp / "predictions"
    args = [sys.executable, "-m", "lnm_auto", "predict", "-i", inp, "-o", out, "-m", model, "-f", "0", "-device",
            "cpu", "-npp", "1"]
    env = {**os.environ, "LNM_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(a) for a in args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 300
    while not list((out / "cases").glob("*.csv")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert info(out)["status"] == "running" and not (out / "nodes.csv").exists()   # it was killed mid-run
    assert {k: v for k, v in hashes(inp).items() if not k.startswith("predictions/")} == before
    rerun = subprocess.run([str(a) for a in args + ["--overwrite"]], env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert {k: v for k, v in hashes(inp).items() if not k.startswith("predictions/")} == before
    assert info(out)["status"] == "finished" and len(pd.read_csv(out / "nodes.csv").case.unique()) == 8
    assert not [f for f in out.rglob(".*") if f.is_file()]      # the killed run's temp files removed


# ---- 2. every case failing: each reason, exit 1, status failed ----------------------------------------------
@pytest.mark.slow
def test_every_case_failing_names_each_reason_and_marks_the_run_failed(model, cases_in, tmp_path):
    nnunet = tmp_path / "Dataset500_X"                      # an nnU-Net test set: labelsTs/, no nodesTs/
    (nnunet / "imagesTs").mkdir(parents=True)
    (nnunet / "labelsTs").mkdir()
    for case in ("case_001", "case_002"):
        shutil.copy(cases_in / f"{case}_0000.nii.gz", nnunet / "imagesTs" / f"{case}_0000.nii.gz")
        shutil.copy(cases_in / f"{case}_nodes.nii.gz", nnunet / "labelsTs" / f"{case}.nii.gz")
    out = tmp_path / "out"
    proc = predict(nnunet / "imagesTs", out, model)
    assert proc.returncode == 1 and "KeyError" not in proc.stderr
    refused(proc, "2 case(s) failed and none could be predicted", "status failed")
    for case in ("case_001", "case_002"):
        line = refused(proc, f"node mask of case '{case}' not found")
        assert str(nnunet / "nodesTs" / f"{case}.nii.gz") in line
        assert str(nnunet / "labelsTs" / f"{case}.nii.gz") in line
    assert info(out)["status"] == "failed" and len(info(out)["failed"]) == 2 and not (out / "nodes.csv").exists()
    # images without masks, plain folder
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(cases_in / "case_001_0000.nii.gz", bare / "case_001_0000.nii.gz")
    proc = predict(bare, tmp_path / "out2", model)
    refused(proc, str(bare / "case_001_nodes.nii.gz"), "not found")
    assert info(tmp_path / "out2")["status"] == "failed"


def write_series(folder: Path, image: sitk.Image, modality: str = "CT", prefix: str = "") -> list[Path]:
    """``image`` as a DICOM series (int16) in ``folder`` (``prefix``: file names, to put two series in one
    folder); ``modality`` written into every slice's Modality tag."""
    staging = folder.parent / f".staging_{folder.name}{prefix}"
    files = write_ct_series_sitk(staging, sitk.GetArrayFromImage(image), image.GetSpacing(), image.GetOrigin(),
                                 image.GetDirection())
    folder.mkdir(parents=True, exist_ok=True)
    moved = []
    for f in files:
        ds = pydicom.dcmread(f)
        ds.Modality = modality
        ds.save_as(folder / f"{prefix}{f.name}")
        moved.append(folder / f"{prefix}{f.name}")
    shutil.rmtree(staging)
    return moved


@pytest.mark.slow
def test_dicom_folders_two_series_no_mask_and_a_missing_slice(model, cases_in, tmp_path):
    image = sitk.ReadImage(str(cases_in / "case_001_0000.nii.gz"))
    dicom = tmp_path / "dicom"
    write_series(dicom / "two", image)
    write_series(dicom / "two", image, prefix="b_")
    shutil.copy(cases_in / "case_001_nodes.nii.gz", dicom / "two" / "nodes.nii.gz")
    write_series(dicom / "nomask", image)
    proc = predict(dicom, tmp_path / "out", model)
    refused(proc, str(dicom / "two"), "2 DICOM series in one folder")
    refused(proc, str(dicom / "nomask"), "exactly one node mask", "found 0")
    assert info(tmp_path / "out")["status"] == "failed"
    # 3. a slice missing from the middle: refused as lnm_convert refuses it; the complete series is predicted
    gaps = tmp_path / "gaps"
    for case in ("whole", "holed"):
        files = write_series(gaps / case, image)
        shutil.copy(cases_in / "case_001_nodes.nii.gz", gaps / case / "nodes.nii.gz")
    files[len(files) // 2].unlink()
    proc = predict(gaps, tmp_path / "out2", model)
    refused(proc, str(gaps / "holed"), "slices are not evenly spaced", "missing or duplicate slices")
    assert set(pd.read_csv(tmp_path / "out2" / "nodes.csv").case) == {"whole"}
    # -o inside a DICOM case folder's place: the folder holding an input
    refused(predict(gaps, gaps / "whole", model), "holds the input")
    # -i naming the series folder itself
    refused(predict(gaps / "whole", tmp_path / "out3", model), f"-i {gaps / 'whole'}", "holds DICOM files itself")


# ---- 4. a case unlike the training data: a warning line, recorded ---------------------------------------------
@pytest.mark.slow
def test_images_unlike_the_training_data_are_warned_about(model, cases_in, tmp_path):
    inp = tmp_path / "domain"
    inp.mkdir()
    for case in ("case_001", "case_002"):
        shutil.copy(cases_in / f"{case}_nodes.nii.gz", inp / f"{case}_nodes.nii.gz")
    ct = sitk.ReadImage(str(cases_in / "case_001_0000.nii.gz"), sitk.sitkFloat32)
    sitk.WriteImage((ct + 1000.0) * 0.4, str(inp / "case_001_0000.nii.gz"))          # MRI-like: 0 .. ~500, no HU
    shutil.copy(cases_in / "case_002_0000.nii.gz", inp / "case_002_0000.nii.gz")      # in range: CT as trained
    rescaled = sitk.RescaleIntensity(sitk.ReadImage(str(cases_in / "case_002_0000.nii.gz"), sitk.sitkFloat32), 0.0, 1.0)
    sitk.WriteImage(rescaled, str(inp / "case_003_0000.nii.gz"))                      # rescaled to 0..1
    shutil.copy(cases_in / "case_002_nodes.nii.gz", inp / "case_003_nodes.nii.gz")
    proc = predict(inp, tmp_path / "out", model)
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if line.startswith("warning: case ")]
    assert len(warned) == 2, proc.stderr
    assert "case 'case_001'" in warned[0] and "outside [" in warned[0] and "channel 0 (CT)" in warned[0]
    assert "case 'case_003'" in warned[1] and "spread over" in warned[1]
    recorded = info(tmp_path / "out")["domain_warnings"]
    assert set(recorded) == {"case_001", "case_003"}
    # a DICOM series tagged MR for this CT model: warned from the tag, its voxels being CT's
    dicom = tmp_path / "dicom"
    write_series(dicom / "mr", sitk.ReadImage(str(cases_in / "case_002_0000.nii.gz")), modality="MR")
    shutil.copy(cases_in / "case_002_nodes.nii.gz", dicom / "mr" / "nodes.nii.gz")
    write_series(dicom / "ct", sitk.ReadImage(str(cases_in / "case_002_0000.nii.gz")), modality="CT")
    shutil.copy(cases_in / "case_002_nodes.nii.gz", dicom / "ct" / "nodes.nii.gz")
    proc = predict(dicom, tmp_path / "out2", model)
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if line.startswith("warning: case ")]
    assert len(warned) == 1 and "case 'mr'" in warned[0] and "Modality MR" in warned[0]


def test_domain_rule_flags_either_direction_and_passes_own_data():
    from lnm_auto.inference.domain import domain_warning
    rng = np.random.default_rng(0)
    ct = np.concatenate([rng.normal(-900, 50, 1000), rng.normal(-100, 30, 4000), rng.normal(40, 20, 5000)])
    mri = rng.gamma(2.0, 80.0, 10000) + 4
    reference = {"ct": {"0": {"name": "CT", "low": float(np.percentile(ct, 0.5)), "median": float(np.median(ct)),
                              "high": float(np.percentile(ct, 99.5))}},
                 "mri": {"0": {"name": "T2", "low": float(np.percentile(mri, 0.5)), "median": float(np.median(mri)),
                               "high": float(np.percentile(mri, 99.5))}}}
    own_ct, own_mri = ct[rng.permutation(ct.size)[:5000]], mri[:5000] * 1.3       # same kind, another scanner
    assert domain_warning("a", [own_ct], reference["ct"]) == ""
    assert domain_warning("a", [own_mri], reference["mri"]) == ""
    assert "outside [" in domain_warning("a", [ct], reference["mri"])
    assert "at or above the training data's median" in domain_warning("a", [mri], reference["ct"])
    assert "spread over" in domain_warning("a", [mri / 1000.0], reference["mri"])
    assert "Modality CT" in domain_warning("a", [own_mri], reference["mri"], dicom_modality="CT")
    assert domain_warning("a", [ct], None) == ""                               # no fingerprint: no check


# ---- 5. a radiomics model file that gives NaN; duplicate feature names -------------------------------------
@pytest.mark.slow
def test_radiomics_model_with_huge_coefficients_writes_nothing(radiomics_model, cases_in, tmp_path):
    broken = tmp_path / "results" / DS / radiomics_model.name
    shutil.copytree(radiomics_model, broken)
    model_file = broken / "fold_0" / "radiomics_model.json"
    params = json.loads(model_file.read_text())
    assert params["chosen_model"] == "logistic_regression"
    coef = params["logistic_regression"]["coef"]
    params["logistic_regression"]["coef"] = [1e308 if i % 2 else -1e308 for i in range(len(coef))]   # finite
    model_file.write_text(json.dumps(params))
    out = tmp_path / "out"
    proc = predict(cases_in, out, broken)
    refused(proc, str(model_file), "non-finite probability")
    assert not (out / "nodes.csv").exists() and not list(out.glob("*_probmap.nii.gz"))
    assert not list((out / "cases").glob("*.csv")) and info(out)["status"] == "failed"
    params = json.loads((radiomics_model / "fold_0" / "radiomics_model.json").read_text())
    params["feature_columns"][1] = params["feature_columns"][0]
    model_file.write_text(json.dumps(params))
    refused(predict(cases_in, tmp_path / "out2", broken), str(model_file), f"'{params['feature_columns'][0]}' twice")


def test_radiomics_model_with_a_doubled_feature_name_is_refused_at_load(tmp_path):
    from lnm_auto.radiomics.classifier import FORMAT_NAME, FORMAT_VERSION, RadiomicsClassifier
    from lnm_auto.utils.errors import LNMError
    params = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "chosen_model": "logistic_regression",
              "inner_cv": {"seed": 1, "auroc": {}}, "feature_columns": ["volume_mm3", "volume_mm3"],
              "impute_medians": [0.0, 0.0], "kept_columns": [True, True], "scaler_mean": [0.0, 0.0],
              "scaler_scale": [1.0, 1.0], "logistic_regression": {"coef": [1.0, 1.0], "intercept": 0.0},
              "gradient_boosting": None}
    path = tmp_path / "radiomics_model.json"
    path.write_text(json.dumps(params))
    with pytest.raises(LNMError, match="names 'volume_mm3' twice"):
        RadiomicsClassifier.load(path)
    params["feature_columns"][1] = "short_axis_mm"
    path.write_text(json.dumps(params))
    RadiomicsClassifier.load(path)


# ---- 6. inference_instructions.json: not JSON, or naming a folder elsewhere -----------------------------------
@pytest.mark.parametrize("content, fragment", [
    ("{not json", "not valid JSON"),
    (json.dumps({"chosen": "LNMTrainer__LNMPlans__2d25"}), "no 'chosen' list"),
    (json.dumps({"chosen": [{"model_folder": "../../elsewhere"}]}), "'../../elsewhere' is not a model folder inside"),
    (json.dumps({"chosen": [{"model_folder": "/abs/LNMTrainer__LNMPlans__2d25"}]}), "is not a model folder inside"),
    (json.dumps({"chosen": [{"model_folder": "inner/../../elsewhere"}]}), "is not a model folder inside"),
])
def test_damaged_or_escaping_inference_instructions_are_one_line(tmp_path, content, fragment):
    results = tmp_path / "results"
    (results / DS).mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()                     # exists: a folder outside is refused, not just missing
    instructions = results / DS / "inference_instructions.json"
    instructions.write_text(content)
    proc = run_cli("predict", "-i", tmp_path, "-o", tmp_path / "out", "-d", "42", "--results", results)
    refused(proc, str(instructions), fragment)
    assert not (tmp_path / "out").exists()


def test_size_rule_chosen_leaves_no_model_to_predict_with(tmp_path):
    from lnm_auto.inference.ensemble import chosen_models, predict_ensemble
    from lnm_auto.utils.errors import LNMError
    (tmp_path / "inference_instructions.json").write_text(json.dumps({"chosen": [], "size_rule": True}))
    assert chosen_models(tmp_path) == []
    with pytest.raises(LNMError, match="chose the size rule"):
        predict_ensemble(tmp_path, tmp_path / "out", [])
    assert not (tmp_path / "out").exists()


# ---- 7. a killed export leaves a temp file: the rerun removes it (and only it) -----------------------------
KILLED_WRITER = """
import sys, time
from lnm_auto.utils.io import atomic_path
with atomic_path(sys.argv[1], suffix=".zip") as tmp:
    tmp.write_bytes(b"PK partial zip")
    print(tmp, flush=True)
    time.sleep(60)
"""


def killed_write(target: Path) -> Path:
    """The temp file a SIGKILLed atomic write of ``target`` (as lnm_export_model writes its zip) leaves."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    left = Path(proc.stdout.readline().strip())
    proc.kill()
    proc.wait()
    assert left.is_file()
    return left


def test_stale_temp_files_match_exactly_what_a_killed_atomic_write_leaves(tmp_path):
    target = tmp_path / "model.zip"
    left = killed_write(target)
    assert left.name.startswith(".model.zip.") and left.name.endswith(".zip")
    others = [tmp_path / n for n in (".model.zip.notes", ".model.zip.12345678.txt", ".other.zip.abcdefgh.zip",
                                     "model.zip.abcdefgh.zip", ".model.zip.abcdefghi.zip")]
    for f in others:
        f.write_text("not ours")
    assert stale_temp_files(target) == [left]
    assert stale_temp_files(tmp_path / "nodes.csv") == []


@pytest.mark.slow
def test_export_rerun_after_a_kill_removes_only_its_temp_file(model, tmp_path):
    results = model.parent.parent
    target = tmp_path / "exports" / "model.zip"
    target.parent.mkdir()
    left = killed_write(target)
    (target.parent / ".model.zip.keep").write_text("mine")
    args = ("export_model", "-d", "42", "-c", "3d_resenc", "-tr", "LNMTrainer_1epochs", "-f", "0", "--results",
            results, "-o")
    proc = run_cli(*args, target)
    assert proc.returncode == 0, proc.stderr
    assert not left.exists() and (target.parent / ".model.zip.keep").read_text() == "mine"
    assert zipfile.is_zipfile(target)
    assert run_cli(*args, target).returncode == 0                # its own zip: replaced
    # 8. a file that is not a model zip, or a folder, is never replaced
    document = tmp_path / "report.docx"
    document.write_bytes(b"my report")
    refused(run_cli(*args, document), f"-o {document}", "not a model zip")
    assert document.read_bytes() == b"my report"
    refused(run_cli(*args, tmp_path / "exports"), "is a folder")


# ---- 8. more hostile inputs --------------------------------------------------------------------------------
@pytest.mark.slow
def test_input_that_is_a_file_and_a_channel_given_in_two_formats(model, cases_in, tmp_path):
    refused(predict(cases_in / "case_001_0000.nii.gz", tmp_path / "o", model), "is a file, not a folder")
    sitk.WriteImage(sitk.ReadImage(str(cases_in / "case_001_0000.nii.gz")), str(cases_in / "case_001_0000.nrrd"))
    proc = predict(cases_in, tmp_path / "out", model)
    refused(proc, "case_001_0000", "channel 0 of case 'case_001' is also given as", "keep one")
    assert set(pd.read_csv(tmp_path / "out" / "nodes.csv").case) == {"case_000", "case_002"}


@pytest.mark.slow
def test_hand_edited_record_never_removes_what_lnm_predict_did_not_write(model, cases_in, tmp_path):
    out = tmp_path / "out"
    assert predict(cases_in, out, model).returncode == 0
    victim, mine = tmp_path / "victim.txt", out / "notes_probmap.txt"
    victim.write_text("keep")
    mine.write_text("keep")
    record = info(out)
    record["files"] += ["../victim.txt", str(victim), "notes_probmap.txt", "../in/case_001_0000.nii.gz", "cases/../x"]
    record["cases"] += ["../in/case_001"]
    (out / "predict_info.json").write_text(json.dumps(record))
    before = hashes(cases_in)
    assert predict(cases_in, out, model, "--overwrite").returncode == 0
    assert victim.read_text() == "keep" and mine.read_text() == "keep" and hashes(cases_in) == before
    (out / "predict_info.json").write_text("{damaged")
    refused(predict(cases_in, out, model, "--overwrite"), str(out / "predict_info.json"), "damaged")
    assert (out / "nodes.csv").is_file()        # nothing removed without a record


@pytest.mark.slow
def test_cases_folder_linked_to_the_input_is_refused(model, cases_in, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "cases").symlink_to(cases_in, target_is_directory=True)
    before = hashes(cases_in)
    refused(predict(cases_in, out, model), str(out / "cases"), "symbolic link")
    assert hashes(cases_in) == before


def test_model_zip_with_a_huge_member_is_refused_before_unpacking(tmp_path):
    bomb = tmp_path / "model.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{DS}/LNMTrainer__LNMPlans__3d_resenc/plans.json", "{}")
        with z.open(f"{DS}/LNMTrainer__LNMPlans__3d_resenc/fold_0/checkpoint_final.pth", "w") as member:
            for _ in range(64):
                member.write(bytes(1 << 20))             # 64 MB of zeros: a few hundred kB packed
    assert bomb.stat().st_size < 1 << 20
    proc = run_cli("predict", "-i", tmp_path, "-o", tmp_path / "out", "-m", bomb)
    refused(proc, str(bomb), "checkpoint_final.pth", "zip bomb")


@pytest.mark.parametrize("kind", ["folder", "dead link"])
def test_an_entry_named_like_an_image_but_not_one_is_said(tmp_path, kind):
    """A folder or a dead link called <case>_0000.nii.gz in -i used to be skipped without a word."""
    from lnm_auto.inference.cases import discover_cases
    entry = tmp_path / "case_009_0000.nii.gz"
    if kind == "folder":
        entry.mkdir()
    else:
        entry.symlink_to(tmp_path / "gone.nii.gz")
    cases, problems = discover_cases(tmp_path, 1)
    assert cases == [] and len(problems) == 1 and problems[0].startswith(str(entry))
    assert ("is a folder" if kind == "folder" else "points nowhere") in problems[0]
