"""Issue 21, "Data lost": no command ever writes into, renames or deletes a file it did not write. For every
command that writes files (lnm_predict has its own tests: test_robustness_predict.py), its inputs are hashed
(sha256 of every file's bytes, and the list of files and folders) before a run, after it, after a rerun with its
overwrite-like flag, and after a run SIGKILLed mid-write; they must stay byte-identical, and nothing may appear in
an input folder but the command's own outputs named below.

What counts as a command's inputs here:
- lnm_plan_and_preprocess: the raw folder (the dataset and anything beside it).
- lnm_train / lnm_pretrain: the raw folder (radiomics reads its images), the preprocessed dataset but the caches
  training itself writes there (<plans>_crops/unpacked/, <plans>_radiomics/), and a -pretrained_weights file.
- lnm_find_best_configuration: every model folder but its crossval_results/ (its output), and the preprocessed
  dataset (the size rule reads the crop caches).
- lnm_accumulate_crossval_results: the model folder but its crossval_results/.
- lnm_export_model: the whole results folder.
- lnm_evaluate: the reference and prediction CSVs (and the folder holding them, where -o is put).
- lnm_convert nnunet / dicom: the source folders (and --labels_csv); the raw dataset is their output.
lnm_make_phantom and lnm_demo read no input (they write a new dataset / a work folder), so they have no test here.

The kill is a real SIGKILL at a chosen moment: the process kills itself as its n-th file, written in full to its
temp file, is about to be renamed into place (every write goes through utils/io.atomic_path), so the moment is the
same on every machine and the run is surely mid-way.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from conftest import run_cli
from dicom_builders import write_dicom_case, write_nnunet_dataset

DS = "Dataset042_Tiny"
TRAINING_CACHES = (f"{DS}/LNMPlans_crops/unpacked", f"{DS}/LNMPlans_radiomics")
NETWORK = "LNMTrainer_1epochs__LNMPlans__3d_resenc"
RADIOMICS = "RadiomicsTrainer__LNMPlans__radiomics"

KILL_AT_WRITE = r"""
import os, signal, sys
from lnm_auto.cli import main
left = int(sys.argv[1])
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    global left
    left -= 1
    if left == 0:        # the file is complete in its temp file, not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
sys.exit(main(sys.argv[2:]))
"""


def killed_at_write(n: int, *args) -> None:
    """``python -m lnm_auto ARGS`` in its own process, SIGKILLed as its n-th file is about to be put in place."""
    env = {**os.environ, "LNM_NO_PROGRESS": "1", "LNM_n_proc_DA": "0", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-c", KILL_AT_WRITE, str(n), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"not killed at write {n} (exit {proc.returncode}):\n{proc.stderr}"


def snapshot(folder: Path, leave_out: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file and 'folder' for every folder below ``folder``, by relative path; paths under
    ``leave_out`` (the command's own outputs there) are not inputs."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if any(rel == x or rel.startswith(x + "/") for x in leave_out):
            continue
        out[rel] = "folder" if p.is_dir() and not p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_untouched(folder: Path, before: dict[str, str], when: str, leave_out: tuple[str, ...] = ()) -> None:
    now = snapshot(folder, leave_out)
    changed = sorted(k for k in before.keys() & now.keys() if before[k] != now[k])
    gone, added = sorted(before.keys() - now.keys()), sorted(now.keys() - before.keys())
    assert (changed, gone, added) == ([], [], []), f"{when}: in {folder}: changed {changed}, gone {gone}, added {added}"


def ok(proc) -> str:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


# ---- lnm_plan_and_preprocess ------------------------------------------------------------------------------
@pytest.mark.slow
def test_plan_and_preprocess_leaves_the_raw_folder_byte_identical(tiny_dataset, tmp_path):
    raw = tiny_dataset.parent
    (raw / "notes.txt").write_text("beside the dataset")
    before = snapshot(raw)
    args = ("plan_and_preprocess", "-d", "42", "-pl", "LNMPlannerCPU", "-np", "1", "--raw", raw,
            "--preprocessed", tmp_path / "pre")
    ok(run_cli(*args))
    assert_untouched(raw, before, "after a run")
    ok(run_cli(*args, "--clean"))
    assert_untouched(raw, before, "after --clean")
    assert "instance mask(s) left unchanged" in ok(run_cli(*args, "--split_components"))   # nothing to split
    assert_untouched(raw, before, "after --split_components on instance masks")
    killed_at_write(3, *args, "--clean")                                # mid-way through the crop caches
    assert_untouched(raw, before, "after a SIGKILL")
    ok(run_cli(*args))
    assert_untouched(raw, before, "after the rerun of the killed run")


@pytest.mark.slow
def test_split_components_never_replaces_a_mask_it_keeps_no_copy_of(tiny_dataset, tmp_path):
    """--split_components changes the dataset in place, keeping every original byte for byte in nodesTr_binary/.
    A binary mask drawn again after an earlier split (the copy there is of the old one) is refused, not split."""
    mask = tiny_dataset / "nodesTr" / "case_000.nii.gz"
    labels = sitk.ReadImage(str(mask))
    sitk.WriteImage(sitk.Cast(labels > 0, sitk.sitkUInt8), str(mask))
    first = mask.read_bytes()
    args = ("plan_and_preprocess", "-d", "42", "-pl", "LNMPlannerCPU", "-np", "1", "--no_pp", "--split_components",
            "--raw", tiny_dataset.parent, "--preprocessed", tmp_path / "pre")
    ok(run_cli(*args))
    kept = tiny_dataset / "nodesTr_binary" / "case_000.nii.gz"
    assert kept.read_bytes() == first
    redrawn = (sitk.GetArrayFromImage(labels) > 0).astype(np.uint8)
    redrawn[6:9, 36:42, 8:14] = 1                                      # the user adds a node, as a binary mask again
    image = sitk.GetImageFromArray(redrawn)
    image.CopyInformation(labels)
    sitk.WriteImage(image, str(mask))
    second = mask.read_bytes()
    before = snapshot(tiny_dataset.parent)
    proc = run_cli(*args)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{mask}: a binary mask to split again" in proc.stderr and str(kept) in proc.stderr
    assert_untouched(tiny_dataset.parent, before, "after the refused split")
    assert mask.read_bytes() == second and kept.read_bytes() == first


# ---- lnm_train, lnm_pretrain ------------------------------------------------------------------------------
def train_args(root: Path, configuration: str, *extra):
    trainer = ("-tr", "LNMTrainer_1epochs") if configuration == "3d_resenc" else ()
    return ("train", "42", configuration, "0", *trainer, "-device", "cpu", "-num_workers", "0", "--raw", root / "raw",
            "--preprocessed", root / "pre", "--results", root / "res", *extra)


def train_inputs(root: Path) -> dict[str, dict[str, str]]:
    return {"raw": snapshot(root / "raw"), "pre": snapshot(root / "pre", TRAINING_CACHES)}


def assert_train_inputs_untouched(root: Path, before: dict, when: str) -> None:
    assert_untouched(root / "raw", before["raw"], when)
    assert_untouched(root / "pre", before["pre"], when, TRAINING_CACHES)


@pytest.fixture(scope="module")
def trained(planned_tiny, tmp_path_factory):
    """planned_tiny(8) copied, then fold 0 of 3d_resenc (1 epoch) and of radiomics trained through lnm_train:
    (the folder with raw/ pre/ res/, the hashes of the training inputs taken before)."""
    root = tmp_path_factory.mktemp("trained")
    for sub in ("raw", "pre"):
        shutil.copytree(planned_tiny(8) / sub, root / sub)
    before = train_inputs(root)
    for configuration in ("3d_resenc", "radiomics"):
        ok(run_cli(*train_args(root, configuration)))
    return root, before


@pytest.mark.slow
def test_train_and_pretrain_leave_their_inputs_byte_identical(trained):
    root, before = trained
    assert_train_inputs_untouched(root, before, "after the first runs (3d_resenc, radiomics)")
    ok(run_cli("pretrain", "42", "3d_resenc", "0", "--epochs", "1", "-device", "cpu", "-num_workers", "0",
               "--preprocessed", root / "pre", "--results", root / "res"))
    assert_train_inputs_untouched(root, before, "after lnm_pretrain")
    weights = root / "res" / DS / "WSPPretrainer_1epochs__LNMPlans__3d_resenc" / "fold_0"
    before_weights = snapshot(weights)
    assert "training already finished" in ok(run_cli(*train_args(root, "3d_resenc", "--c")))
    assert_train_inputs_untouched(root, before, "after --c")
    ok(run_cli(*train_args(root, "3d_resenc", "-pretrained_weights", weights / "pretrained_weights.pth")))
    assert_train_inputs_untouched(root, before, "after a plain rerun")
    assert_untouched(weights, before_weights, "after training from -pretrained_weights")
    shutil.rmtree(root / "pre" / TRAINING_CACHES[0])                    # so the kill lands in the unpacking
    killed_at_write(10, *train_args(root, "3d_resenc"))                # plans, dataset.json, fingerprint, 6 .npy
    assert_train_inputs_untouched(root, before, "after a SIGKILL while unpacking")
    ok(run_cli(*train_args(root, "3d_resenc", "--c")))
    assert_train_inputs_untouched(root, before, "after --c of the killed run")
    ok(run_cli(*train_args(root, "radiomics")))
    assert_train_inputs_untouched(root, before, "after a plain rerun of radiomics")
    assert (root / "res" / DS / NETWORK / "fold_0" / "checkpoint_final.pth").is_file()


# ---- lnm_find_best_configuration, lnm_accumulate_crossval_results ----------------------------------------
def model_outputs(results: Path) -> tuple[str, ...]:
    """What model selection writes in a dataset's results folder: its table and choice, each model's pooled
    predictions and calibration (crossval_results/)."""
    models = sorted(p.name for p in results.iterdir() if p.is_dir())
    return ("crossval_table.md", "crossval_table.png", "crossval_reliability.png", "inference_instructions.json",
            *(f"{m}/crossval_results" for m in models))


@pytest.mark.slow
def test_find_best_configuration_leaves_the_models_and_caches_byte_identical(trained):
    root = trained[0]
    results, outputs = root / "res" / DS, model_outputs(root / "res" / DS)
    before, before_pre = snapshot(results, outputs), snapshot(root / "pre")
    args = ("find_best_configuration", "-d", "42", "-f", "0", "--n_bootstrap", "20", "--results", root / "res",
            "--preprocessed", root / "pre")

    def check(when):
        assert_untouched(results, before, when, outputs)
        assert_untouched(root / "pre", before_pre, when)
    ok(run_cli(*args))
    assert (results / "inference_instructions.json").is_file()
    check("after a run")
    ok(run_cli(*args))
    check("after a rerun")
    killed_at_write(2, *args)                       # after the first model's pooled predictions
    check("after a SIGKILL")
    ok(run_cli(*args))
    check("after the rerun of the killed run")


@pytest.mark.slow
def test_accumulate_crossval_results_leaves_the_model_folder_byte_identical(trained):
    model = trained[0] / "res" / DS / RADIOMICS
    before = snapshot(model, ("crossval_results",))
    args = ("accumulate_crossval_results", "-d", "42", "-c", "radiomics", "-tr", "RadiomicsTrainer", "-f", "0",
            "--results", trained[0] / "res")
    for when in ("after a run", "after a rerun"):
        ok(run_cli(*args))
        assert_untouched(model, before, when, ("crossval_results",))
    killed_at_write(1, *args)
    assert_untouched(model, before, "after a SIGKILL", ("crossval_results",))
    ok(run_cli(*args))
    assert_untouched(model, before, "after the rerun of the killed run", ("crossval_results",))
    assert (model / "crossval_results" / "nodes.csv").is_file()


# ---- lnm_export_model -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_export_model_leaves_the_results_folder_byte_identical(trained, tmp_path):
    results = trained[0] / "res"
    before = snapshot(results)
    target = tmp_path / "exports" / "model.zip"
    args = ("export_model", "-d", "42", "-c", "radiomics", "-tr", "RadiomicsTrainer", "-f", "0", "--results", results,
            "-o", target)
    ok(run_cli(*args))
    assert_untouched(results, before, "after a run")
    ok(run_cli(*args))                                                 # its own zip: replaced
    assert_untouched(results, before, "after a rerun onto its zip")
    killed_at_write(1, *args)
    assert_untouched(results, before, "after a SIGKILL")
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".model.zip.")]   # the killed run's temp
    ok(run_cli(*args))
    assert_untouched(results, before, "after the rerun of the killed run")
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.zip"] and zipfile.is_zipfile(target)


# ---- lnm_evaluate -----------------------------------------------------------------------------------------
@pytest.fixture
def eval_inputs(pristine_tiny_dataset, tmp_path) -> Path:
    """The tiny dataset's label tables as references, two prediction tables: all in one folder."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name in ("nodes.csv", "stations.csv", "patients.csv"):
        shutil.copy(pristine_tiny_dataset / name, folder / name)
    nodes = pd.read_csv(folder / "nodes.csv", dtype={"station": str})
    rng = np.random.default_rng(0)
    for name, noise in (("pred.csv", 0.2), ("compare.csv", 0.4)):
        p = np.clip(0.3 + 0.4 * nodes["label"] + rng.normal(0, noise, len(nodes)), 0.01, 0.99)
        nodes[["case", "node", "station"]].assign(probability=p).to_csv(folder / name, index=False)
    return folder


def evaluate_args(folder: Path, out: Path):
    return ("evaluate", "-ref", folder / "nodes.csv", "-pred", folder / "pred.csv", "--compare", folder / "compare.csv",
            "--ref_stations", folder / "stations.csv", "--ref_patients", folder / "patients.csv", "-o", out,
            "--n_bootstrap", "20")


REPORT = ("metrics.json", "roc.png", "calibration.png")


@pytest.mark.slow
def test_evaluate_leaves_its_reference_and_prediction_tables_byte_identical(eval_inputs):
    before = snapshot(eval_inputs)
    args = evaluate_args(eval_inputs, eval_inputs / "report")          # -o inside the folder of the inputs
    for when in ("after a run", "after a rerun"):
        ok(run_cli(*args))
        assert_untouched(eval_inputs, before, when, ("report",))
    killed_at_write(2, *args)                                          # roc.png written, calibration.png not yet
    assert_untouched(eval_inputs, before, "after a SIGKILL", ("report",))
    ok(run_cli(*args))
    assert_untouched(eval_inputs, before, "after the rerun of the killed run", ("report",))
    # (the killed run's temp file of calibration.png may stay: lnm_evaluate removes no temp files)
    assert sorted(p.name for p in (eval_inputs / "report").iterdir() if not p.name.startswith(".")) == sorted(REPORT)
    for when in ("-o the folder of the inputs", "its rerun"):          # the report beside the inputs
        ok(run_cli(*evaluate_args(eval_inputs, eval_inputs)))
        assert_untouched(eval_inputs, before, when, ("report", *REPORT))


@pytest.mark.slow
def test_evaluate_never_replaces_a_metrics_json_it_did_not_write(eval_inputs, trained):
    """-o a fold's validation folder: lnm_train's metrics.json there is not lnm_evaluate's to replace."""
    validation = eval_inputs / "validation"
    shutil.copytree(trained[0] / "res" / DS / RADIOMICS / "fold_0" / "validation", validation)
    (eval_inputs / "mine").mkdir()
    (eval_inputs / "mine" / "metrics.json").write_text('{"my": "numbers"}')
    before = snapshot(eval_inputs)
    for out in (validation, eval_inputs / "mine"):
        proc = run_cli(*evaluate_args(eval_inputs, out))
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert f"-o {out}: holds metrics.json, which lnm_evaluate did not write" in proc.stderr
    assert_untouched(eval_inputs, before, "after the refusals")


# ---- lnm_convert ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_convert_nnunet_leaves_the_source_dataset_byte_identical(tmp_path):
    sources = tmp_path / "sources"
    write_nnunet_dataset(sources / "Dataset010_LNQ", n_cases=3, n_test=1)
    pd.DataFrame({"case": ["LNQ_000", "LNQ_001", "LNQ_002"], "label": [0, 1, 0]}).to_csv(sources / "labels.csv",
                                                                                         index=False)
    before = snapshot(sources)
    raw = tmp_path / "raw"

    def convert(dataset_id: int, *extra):
        return ("convert", "nnunet", "-i", sources / "Dataset010_LNQ", "-d", dataset_id, "--raw", raw,
                "--labels_csv", sources / "labels.csv", *extra)
    ok(run_cli(*convert(11)))
    assert_untouched(sources, before, "after a run")
    assert run_cli(*convert(11)).returncode == 1                       # no overwrite: the id is taken
    assert_untouched(sources, before, "after a refused rerun")
    ok(run_cli(*convert(12, "--link")))                                # the images hard-linked into the dataset
    ok(run_cli("plan_and_preprocess", "-d", "12", "-pl", "LNMPlannerCPU", "-np", "1", "--clean", "--split_components",
               "--raw", raw, "--preprocessed", tmp_path / "pre"))
    assert_untouched(sources, before, "after --link and preprocessing the linked dataset")
    killed_at_write(2, *convert(13))                                   # in the hidden staging folder
    assert_untouched(sources, before, "after a SIGKILL")
    ok(run_cli(*convert(13)))
    assert_untouched(sources, before, "after the rerun of the killed run")


@pytest.mark.slow
def test_convert_dicom_leaves_the_dicom_folders_byte_identical(tmp_path):
    dicom = tmp_path / "dicom"
    write_dicom_case(dicom / "p0", "seg", seed=0, patient_id="P0")
    write_dicom_case(dicom / "p1", "rtstruct", seed=1, patient_id="P1")
    before = snapshot(dicom)
    converted = ("converted",)
    into = ("convert", "dicom", "-i", dicom, "-o", dicom / "converted")   # -o inside the DICOM folder
    for when in ("after a run", "after a rerun"):                     # the same series again: its files replaced
        ok(run_cli(*into))
        assert_untouched(dicom, before, when, converted)
    beside = ("P0_0000.nii.gz", "P0_nodes.nii.gz", "P1_0000.nii.gz", "P1_nodes.nii.gz", "nodes.csv")
    for when in ("-o the DICOM folder itself", "its rerun, which finds NIfTI files below -i"):
        ok(run_cli("convert", "dicom", "-i", dicom, "-o", dicom))
        assert_untouched(dicom, before, when, converted + beside)
    to_dataset = ("convert", "dicom", "-i", dicom, "-d", "31", "--raw", tmp_path / "raw")
    for when in ("after -d", "after -d again"):
        ok(run_cli(*to_dataset))
        assert_untouched(dicom, before, when, converted + beside)
    killed_at_write(2, "convert", "dicom", "-i", dicom, "-o", tmp_path / "out")
    assert_untouched(dicom, before, "after a SIGKILL", converted + beside)
    ok(run_cli("convert", "dicom", "-i", dicom, "-o", tmp_path / "out"))
    assert_untouched(dicom, before, "after the rerun of the killed run", converted + beside)


@pytest.mark.parametrize("where", ["same", "inside"])
def test_plan_and_preprocess_refuses_a_preprocessed_folder_in_the_raw_data(tmp_path, tiny_dataset, where):
    """--preprocessed equal to --raw used to write plans, splits and caches into the raw dataset folder (and
    --clean would empty them there)."""
    from conftest import run_cli
    raw = tiny_dataset.parent
    pre = raw if where == "same" else tiny_dataset / "pre"
    before = {p: p.read_bytes() for p in tiny_dataset.rglob("*") if p.is_file()}
    proc = run_cli("plan_and_preprocess", "-d", "42", "--raw", raw, "--preprocessed", pre, "-np", "1", "--clean")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "never writes into the raw data" in proc.stderr and str(tiny_dataset) in proc.stderr
    assert {p: p.read_bytes() for p in tiny_dataset.rglob("*") if p.is_file()} == before
