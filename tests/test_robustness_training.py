"""Hostile input around plans, splits, training writes and the raw dataset's reading, built for real: hand-edited
plans and splits, a full or read-only results folder (real tmpfs mounts), float node masks with huge ids, labels
written as NaN, sheared image axes, folders and symbolic-link loops named like images, names that would lead out
of lnm_auto's folders, a killed run's temp files, pickle-bearing caches, checkpoints of another fold."""
from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from lnm_auto.datasets.raw_dataset import read_image, read_instance_mask
from lnm_auto.plans.plans import Plans
from lnm_auto.plans.validation import (CHOICES, RANGES, SHAPE_FEATURE_NAMES, SOFT_MASK_KINDS,
                                       numeric_fields, plans_problems)
from lnm_auto.planning.splits import split_file_problems
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import atomic_path, atomic_write_bytes, load_json, save_npz_atomic
from lnm_auto.utils.labels import UNKNOWN, parse_label
from lnm_auto.utils.paths import check_plain_name
from conftest import run_cli, run_train_cli, train_one_epoch_model, write_image, write_tiny_dataset

DS = "Dataset042_Tiny"


def refused(proc, *fragments) -> list[str]:
    """The run failed with one-line reasons (no traceback); returns the lines holding every fragment."""
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    assert "Traceback" not in text, text
    lines = [line for line in proc.stderr.splitlines() if all(f in line for f in fragments)]
    assert lines, f"no line with {fragments} in:\n{proc.stderr}"
    return lines


@pytest.fixture(scope="module")
def planned(planned_tiny) -> Path:
    return planned_tiny(8)     # shared and read-only: tests that change it work on a copy (``pre_copy``)


@pytest.fixture
def pre_copy(planned, tmp_path) -> Path:
    """A copy of the planned dataset's preprocessed folder, free to edit."""
    return Path(shutil.copytree(planned / "pre", tmp_path / "pre"))


def train(pre: Path, results: Path, *args) -> subprocess.CompletedProcess:
    return run_train_cli("42", *(args or ("3d_resenc", "0")), "-tr", "LNMTrainer_1epochs", "-device", "cpu",
                         preprocessed=pre, results=results)


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def nothing_trained(results: Path) -> bool:
    return not list(results.rglob("checkpoint_*.pth")) and not list(results.rglob("fold_*"))


# ---- 1. hand-edited plans ------------------------------------------------------------------------------------
def test_hand_edited_plans_report_every_bad_field_at_once(pre_copy, tmp_path):
    plans_file = pre_copy / DS / "LNMPlans.json"

    def break_fields(d):
        d["configurations"]["3d_resenc"]["recipe"].update(batch_size=0, initial_lr=float("nan"), num_epochs=-1)
        d["configurations"]["2d25"]["recipe"]["batch_size"] = -4
        d["configurations"]["wega"]["recipe"]["batch_size"] = 1e9
        d["configurations"]["2d25"]["network"]["backbone"] = "resnet_9000"
        d["configurations"]["2d25"]["network"]["dropout"] = 1.5
        d["configurations"]["wega"]["network"]["local"]["strides"][1] = [1, 0, 2]
        d["scales"]["global"]["spacing_mm"][0] = 0.0
    edit_json(plans_file, break_fields)
    before = plans_file.read_bytes()
    proc = train(pre_copy, tmp_path / "res")
    for where, why in [("configurations.3d_resenc.recipe.batch_size = 0", "must be in [1, 65536]"),
                       ("configurations.3d_resenc.recipe.initial_lr = NaN", "finite"),
                       ("configurations.3d_resenc.recipe.num_epochs = -1", "must be in [1, 1000000]"),
                       ("configurations.2d25.recipe.batch_size = -4", "must be in"),
                       ("configurations.wega.recipe.batch_size = 1000000000.0", "whole number"),
                       ("configurations.2d25.network.backbone = 'resnet_9000'", "mobilenetv3_small_050"),
                       ("configurations.2d25.network.dropout = 1.5", "[0, 1)"),
                       ("configurations.wega.network.local.strides[1][1] = 0", "[1, 16]"),
                       ("scales.global.spacing_mm[0] = 0.0", "(0, 100]")]:
        (line,) = refused(proc, str(plans_file), where)
        assert why in line, line
    refused(proc, str(plans_file), "9 invalid field(s)")
    assert nothing_trained(tmp_path / "res") and plans_file.read_bytes() == before


@pytest.mark.parametrize("field,value,message", [
    (("recipe", "batch_size"), 0, "batch_size = 0: must be in [1, 65536]"),
    (("recipe", "num_epochs"), -1, "num_epochs = -1: must be in [1, 1000000]"),     # trained nothing, exit 0
    (("recipe", "initial_lr"), float("nan"), "initial_lr = NaN: must be a finite number"),
    (("recipe", "optimizer"), "Adam", "optimizer = 'Adam': must be one of SGD, AdamW"),
    (("network", "n_blocks_per_stage"), [1, 3, 4], "n_blocks_per_stage: 3 entries, n_stages says 4"),
    (("scales",), ["global", "zoomed"], "scale 'zoomed' is not among the plans' scales"),
])
def test_one_bad_plans_field_is_one_line_naming_it(pre_copy, tmp_path, field, value, message):
    plans_file = pre_copy / DS / "LNMPlans.json"

    def change(d):
        target = d["configurations"]["3d_resenc"]
        for key in field[:-1]:
            target = target[key]
        target[field[-1]] = value
    edit_json(plans_file, change)
    proc = train(pre_copy, tmp_path / "res")
    refused(proc, str(plans_file), message)
    assert nothing_trained(tmp_path / "res")


def test_every_numeric_plans_field_has_a_range_and_planned_plans_pass(planned, tmp_path):
    assert set(numeric_fields(Plans)) == set(RANGES), "declare the range of every numeric plans field in RANGES"
    from lnm_auto.networks.shape_head import SHAPE_MEASUREMENTS
    from lnm_auto.networks.soft_mask import KINDS
    assert SHAPE_FEATURE_NAMES == SHAPE_MEASUREMENTS and SOFT_MASK_KINDS == KINDS
    assert all(choices() for choices in CHOICES.values())
    from lnm_auto.plans.multitask_topology import plan_multitask_topology
    from lnm_auto.planning.plan_and_preprocess import plan_and_preprocess
    plans = Plans.load(planned / "pre" / DS / "LNMPlans.json")
    head = plan_multitask_topology("global", plans.scales["global"].spacing_mm, "cpu")
    multitask = dataclasses.replace(plans, configurations={k: c.with_multitask(head)
                                                           for k, c in plans.configurations.items()})
    gpu = plan_and_preprocess(42, planned / "raw", tmp_path / "pre", "LNMPlanner", "GPUPlans", preprocess=False,
                              progress=False, shape_head=False).plans
    for p in (plans, multitask, gpu):
        assert plans_problems(Plans, json.loads(json.dumps(p.to_dict()))) == []
        p.save(tmp_path / "p.json")
        assert Plans.load(tmp_path / "p.json") == p


def test_model_folder_plans_are_checked_when_predicting(planned, tmp_path):
    """lnm_predict reads a model folder's own plans.json: the same field check (a model zip from elsewhere)."""
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(planned / "pre" / DS / "LNMPlans.json", model / "plans.json")
    shutil.copy(planned / "pre" / DS / "dataset.json", model / "dataset.json")
    edit_json(model / "plans.json", lambda d: d["configurations"]["3d_resenc"]["augmentation"].update(p_noise=2))
    inp = tmp_path / "in"
    inp.mkdir()
    proc = run_cli("predict", "-i", inp, "-o", tmp_path / "out", "-m", model, "-device", "cpu", "--quiet")
    refused(proc, str(model / "plans.json"), "augmentation.p_noise = 2: must be in [0, 1]")


def test_plans_of_another_version_or_not_an_object_is_one_line(pre_copy, tmp_path):
    plans_file = pre_copy / DS / "LNMPlans.json"
    edit_json(plans_file, lambda d: d.update(plans_version=99))
    refused(train(pre_copy, tmp_path / "res"), "plans version 99 is not supported")
    plans_file.write_text("[1, 2]")
    refused(train(pre_copy, tmp_path / "res"), str(plans_file), "not a plans file")
    plans_file.write_text('{"plans_version": 2, "plans_version": 1}')       # the last key would win, silently
    refused(train(pre_copy, tmp_path / "res"), str(plans_file), "key 'plans_version' given twice")


# ---- 2. hand-edited splits_final.json ---------------------------------------------------------------------------
@pytest.mark.parametrize("edit,message", [
    (lambda s: s[0]["val"].append(s[0]["train"][0]), "is in both 'train' and 'val'"),
    (lambda s: (s[1]["val"].append(s[0]["val"][0]), s[1]["train"].remove(s[0]["val"][0])),
     "is validated in folds 0 and 1"),
    (lambda s: s[0]["train"].append("case_999"), "case 'case_999' is not a case of the dataset"),
    (lambda s: s[0].update(val=[]), "fold 0 has no validation cases"),
    (lambda s: s.clear(), "not valid folds"),
    (lambda s: s[0].update(val="case_001"), "not valid folds"),
])
def test_hand_edited_splits_are_one_line_naming_the_file(pre_copy, tmp_path, edit, message):
    splits_file = pre_copy / DS / "splits_final.json"
    splits = json.loads(splits_file.read_text())
    edit(splits)
    splits_file.write_text(json.dumps(splits))
    (line,) = refused(train(pre_copy, tmp_path / "res"), str(splits_file), message)
    assert "re-run lnm_plan_and_preprocess" in line
    assert nothing_trained(tmp_path / "res")


def test_splits_not_json_and_patients_straddling_folds(pre_copy, tmp_path):
    splits_file = pre_copy / DS / "splits_final.json"
    splits_file.write_text('[{"train": ["case_000"], "val": ')
    refused(train(pre_copy, tmp_path / "res"), str(splits_file), "not valid JSON")
    folds = [{"train": ["a1", "b"], "val": ["a2"]}]
    assert split_file_problems(folds, ["a1", "a2", "b"], {"a1": "A", "a2": "A", "b": "B"}) == [
        "fold 0: patient 'A' has cases in both 'train' and 'val'"]
    assert split_file_problems(folds, ["a1", "a2", "b"]) == []


# ---- 3. full disk, read-only results folder (real file systems) -------------------------------------------------
@contextlib.contextmanager
def tmpfs(where: Path, size: str, read_only: bool = False):
    """A tmpfs of ``size`` mounted on ``where`` (skips the test where mounting is not allowed)."""
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_every_writer_on_a_full_disk_is_one_line(tmp_path):
    with tmpfs(tmp_path / "full", "64k") as full:
        with pytest.raises(LNMError, match=r"^no space left on .*full: 0\.2 MB needed, 0\.\d MB free"):
            atomic_write_bytes(full / "a.bin", bytes(200_000))
        with pytest.raises(LNMError, match=r"^no space left on .*full: at least 0\.\d MB needed"):   # numpy: no errno
            with atomic_path(full / "b.npy", suffix=".npy") as tmp:
                np.save(tmp, np.zeros(100_000))
        with pytest.raises(LNMError, match=r"^no space left on .*full: 0\.8 MB needed"):
            save_npz_atomic(full / "b.npz", compress=False, x=np.zeros(100_000))
        with pytest.raises(LNMError, match="^no space left on .*full"):                  # torch: "unexpected pos"
            with atomic_path(full / "c.pth", suffix=".pth") as tmp:
                torch.save({"w": torch.zeros(100_000)}, tmp)
        assert list(full.iterdir()) == []            # no temp file stays


def test_writes_into_a_read_only_folder_are_one_line(tmp_path):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        with pytest.raises(LNMError, match=f"^{ro} is read-only"):
            atomic_write_bytes(ro / "sub" / "a.json", b"{}")


def test_lnm_train_into_a_read_only_results_folder(planned, tmp_path):
    with tmpfs(tmp_path / "results", "1m", read_only=True) as results:
        (line,) = refused(train(planned / "pre", results), "is read-only")
        assert line.endswith(f"error: {results} is read-only; make it writable or write to another folder")


@pytest.mark.slow
def test_lnm_train_onto_a_full_disk(planned, tmp_path):
    with tmpfs(tmp_path / "results", "256k") as results:
        proc = train(planned / "pre", results)
        (line,) = refused(proc, "no space left on", "at least", "MB needed")
        assert f"{results}/{DS}/LNMTrainer_1epochs__LNMPlans__3d_resenc/fold_0" in line
        assert not [p for p in results.rglob(".*") if p.is_file()]     # the partial checkpoint went


def test_results_folder_that_is_a_file_is_one_line(planned, tmp_path):
    results = tmp_path / "results"
    results.write_text("not a folder")
    refused(train(planned / "pre", results), f"{results}: is a file, not a folder")


# ---- 4. float node masks with ids above what lnm_auto accepts ---------------------------------------------------
@pytest.fixture
def raw_ds(tmp_path) -> Path:
    return write_tiny_dataset(tmp_path / "raw", n_cases=4)


def plan(ds: Path, *extra) -> subprocess.CompletedProcess:
    return run_cli("plan_and_preprocess", "-d", "42", "-np", "1", "-pl", "LNMPlannerCPU", "--quiet",
                   "--raw", ds.parent, "--preprocessed", ds.parent.parent / "pre", *extra)


def nothing_planned(ds: Path) -> bool:
    return not (ds.parent.parent / "pre" / DS / "LNMPlans.json").exists()


def test_a_hand_written_splits_file_survives_a_re_plan_with_clean(raw_ds):
    """Folds over a subset of the cases (the user holds some out): a re-plan, even --clean, keeps them byte for
    byte and says so; the folds a plan wrote itself follow the cases when a case is added."""
    assert plan(raw_ds).returncode == 0
    splits_file = raw_ds.parent.parent / "pre" / DS / "splits_final.json"
    hand_written = json.dumps([{"train": ["case_000"], "val": ["case_001"]},
                               {"train": ["case_001"], "val": ["case_000"]}], indent=2).encode()
    splits_file.write_bytes(hand_written)
    proc = plan(raw_ds, "--clean")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert splits_file.read_bytes() == hand_written
    assert (f"WARNING: {splits_file} is not folds lnm_plan_and_preprocess wrote (or was edited since) and is kept "
            "as it is: 2 case(s) in no validation fold, e.g. 'case_002'") in proc.stdout
    splits_file.write_text("[{")                          # broken: said in one line before any work
    crops_before = sorted((splits_file.parent / "LNMPlans_crops").rglob("*"))
    assert crops_before
    (line,) = refused(plan(raw_ds, "--clean"), str(splits_file), "not valid JSON")
    assert sorted((splits_file.parent / "LNMPlans_crops").rglob("*")) == crops_before
    splits_file.unlink()
    assert plan(raw_ds).returncode == 0
    written = json.loads(splits_file.read_text())
    write_tiny_dataset(raw_ds.parent, n_cases=5)          # one more case: the folds a plan wrote follow it
    proc = plan(raw_ds)
    assert "the dataset's cases changed, so new folds were written" in proc.stdout, proc.stdout + proc.stderr
    assert sorted(c for f in json.loads(splits_file.read_text()) for c in f["val"]) == [f"case_{i:03d}"
                                                                                        for i in range(5)]
    assert json.loads(splits_file.read_text()) != written


def huge_id_mask(ds: Path) -> Path:
    """case_001's node 2 renumbered 1e12 in a float64 mask, and in nodes.csv."""
    path = ds / "nodesTr" / "case_001.nii.gz"
    ref = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(ref).astype(np.float64)
    arr[arr == 2] = 1e12
    write_image(arr, path, ref.GetSpacing(), ref.GetOrigin(), ref.GetDirection())
    nodes = pd.read_csv(ds / "nodes.csv", dtype=str, keep_default_na=False)
    nodes.loc[(nodes.case == "case_001") & (nodes.node == "2"), "node"] = "1000000000000"
    nodes.to_csv(ds / "nodes.csv", index=False)
    return path


@pytest.mark.parametrize("verify", [True, False])
def test_float_mask_with_ids_above_the_limit_is_refused_with_the_true_reason(raw_ds, verify):
    path = huge_id_mask(raw_ds)
    (line,) = refused(plan(raw_ds, *([] if verify else ["--no-verify"])), str(path), "node id 1000000000000 is above")
    assert "16777215" in line and "negative" not in line
    assert nothing_planned(raw_ds)
    with pytest.raises(LNMError, match="node id 1000000000000 is above 16777215"):   # prediction's reader
        read_instance_mask(path)


# ---- 5. labels: one rule ----------------------------------------------------------------------------------------
def test_label_rule():
    assert [parse_label(t) for t in ("1", "0", "1.0", "0.0", "", "  ")] == [1, 0, 1, 0, UNKNOWN, UNKNOWN]
    for text in ("NaN", "nan", "NA", "yes", "true", "2", "-1"):
        with pytest.raises(ValueError, match="label must be 1, 0 or empty"):
            parse_label(text)


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("table", ["nodes.csv", "stations.csv", "patients.csv"])
def test_nan_label_text_is_refused_in_every_table(raw_ds, table, verify):
    rows = pd.read_csv(raw_ds / table, dtype=str, keep_default_na=False)
    rows.loc[1, "label"] = "NaN"
    rows.to_csv(raw_ds / table, index=False)
    (line,) = refused(plan(raw_ds, *([] if verify else ["--no-verify"])), str(raw_ds / table), "line 3", "'NaN'")
    assert "leave the cell empty for an unknown label" in line
    assert nothing_planned(raw_ds)


def test_nan_label_in_an_evaluation_reference_is_refused(tmp_path):
    pd.DataFrame({"case": ["a", "a"], "node": [1, 2], "label": ["1", "NaN"]}).to_csv(tmp_path / "ref.csv", index=False)
    pd.DataFrame({"case": ["a", "a"], "node": [1, 2], "probability": [0.9, 0.1]}).to_csv(tmp_path / "p.csv",
                                                                                          index=False)
    proc = run_cli("evaluate", "-ref", tmp_path / "ref.csv", "-pred", tmp_path / "p.csv", "-o", tmp_path / "rep")
    refused(proc, "ref.csv: line 3", "'NaN'")


# ---- 6. sheared axes and spacings in another unit -----------------------------------------------------------------
def shear_nifti_sform(path: Path) -> None:
    """Lean the x axis of a .nii.gz's sform onto j (what an affine with shear writes); SimpleITK then reads the
    qform's grid instead, with only a warning."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    struct.pack_into("<h", raw, 254, 1)                              # sform_code: scanner
    srow_x = list(struct.unpack_from("<4f", raw, 280))
    srow_x[1] = 0.3
    struct.pack_into("<4f", raw, 280, *srow_x)
    path.write_bytes(gzip.compress(bytes(raw)))


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("which", ["image", "mask"])
def test_sheared_nifti_is_refused(raw_ds, verify, which):
    path = raw_ds / ("imagesTr/case_002_0000.nii.gz" if which == "image" else "nodesTr/case_002.nii.gz")
    shear_nifti_sform(path)
    refused(plan(raw_ds, *([] if verify else ["--no-verify"])), str(path), "sform is sheared")
    assert nothing_planned(raw_ds)


@pytest.mark.parametrize("verify", [True, False])
def test_non_orthonormal_direction_of_another_format_is_refused(tmp_path, verify):
    ds = write_tiny_dataset(tmp_path / "raw", n_cases=4, file_ending=".mha")
    for path in (ds / "imagesTr" / "case_002_0000.mha", ds / "nodesTr" / "case_002.mha"):   # one grid: only the shear
        img = sitk.ReadImage(str(path))
        img.SetDirection((-1.0, 0.3, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
        sitk.WriteImage(img, str(path))
    proc = plan(ds, *([] if verify else ["--no-verify"]))
    refused(proc, "case_002_0000.mha", "not orthonormal")
    assert nothing_planned(ds)
    with pytest.raises(LNMError, match="not orthonormal"):              # prediction's reader
        read_image(ds / "imagesTr" / "case_002_0000.mha")


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("spacing", [(1e-6, 1e-6, 4e-6), (800.0, 800.0, 4000.0)])
def test_spacing_in_another_unit_is_refused(raw_ds, spacing, verify):
    for path in (raw_ds / "imagesTr" / "case_002_0000.nii.gz", raw_ds / "nodesTr" / "case_002.nii.gz"):
        img = sitk.ReadImage(str(path))
        img.SetSpacing(spacing)
        sitk.WriteImage(img, str(path))
    (line,) = refused(plan(raw_ds, *([] if verify else ["--no-verify"])), "case_002_0000.nii.gz", "outside 0.01-50 mm")
    assert "not mm" in line and nothing_planned(raw_ds)


# ---- 7. folders and broken links named like images -------------------------------------------------------------
@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("kind", ["folder", "loop", "dangling"])
def test_non_file_named_like_an_image_is_refused(raw_ds, kind, verify):
    entry = raw_ds / "imagesTr" / "case_009_0000.nii.gz"
    if kind == "folder":
        entry.mkdir()
    elif kind == "loop":
        os.symlink(entry.name, entry)                     # a link to itself
    else:
        os.symlink("nowhere.nii.gz", entry)
    why = {"folder": "is a folder, not an image file", "loop": "a symbolic link that loops",
           "dangling": "a symbolic link that points nowhere"}[kind]
    refused(plan(raw_ds, *([] if verify else ["--no-verify"])), str(entry), why)
    assert nothing_planned(raw_ds)


# ---- 8. a killed run's temp files -------------------------------------------------------------------------------
def test_rerun_removes_its_own_stale_temp_files_and_nothing_else(planned, tmp_path):
    from lnm_auto.training.run import setup_trainer
    fold = tmp_path / "res" / DS / "LNMTrainer_1epochs__LNMPlans__3d_resenc" / "fold_0"
    (fold / "validation").mkdir(parents=True)
    ours = [fold / ".progress.png.k3x_9a2b.png", fold / ".checkpoint_latest.pth.abcdefgh.pth",
            fold / "validation" / ".metrics.json.q1w2e3r4.tmp"]
    others = [fold / ".progress.png.ABCDEFGH.png", fold / ".progress.png.notes", fold / "progress.png",
              fold / ".my_notes.txt.abcdefgh.tmp", fold / "validation" / ".metrics.json.short.tmp"]
    for f in ours + others:
        f.write_bytes(b"x")
    setup_trainer(42, "3d_resenc", "0", planned / "pre", tmp_path / "res", "LNMTrainer_1epochs", num_workers=0)
    assert not any(f.exists() for f in ours)
    assert all(f.exists() for f in others)


# ---- 9. names that become paths -------------------------------------------------------------------------------
@pytest.mark.parametrize("args,flag", [
    (["42", "3d_resenc", "0", "-p", "../../escaped"], "-p"),
    (["42", "3d_resenc", "0", "-tr", "../escaped"], "-tr"),
    (["42", "../3d_resenc", "0"], "configuration"),
    (["42", "3d_resenc", ".."], "fold"),
    (["../Dataset042_Tiny", "3d_resenc", "0"], "dataset"),
])
def test_train_names_that_would_leave_their_folder_are_refused(planned, tmp_path, args, flag):
    proc = run_train_cli(*args, preprocessed=planned / "pre", results=tmp_path / "res")
    refused(proc, f"{flag} '", "must be a plain name")
    assert not (tmp_path / "res").exists() and not (tmp_path / "escaped").exists()


@pytest.mark.parametrize("command,args,flag", [
    ("predict", ["-i", "IN", "-o", "OUT", "-d", "42", "-c", "3d_resenc", "-chk", "../../x.pth"], "-chk"),
    ("predict", ["-i", "IN", "-o", "OUT", "-d", "42", "-c", "3d_resenc", "-f", "0", "../1"], "-f"),
    ("predict", ["-i", "IN", "-o", "OUT", "-d", "42", "-c", "/etc"], "-c"),
    ("plan_and_preprocess", ["-d", "42", "-p", "../escaped", "--raw", "RAW", "--preprocessed", "OUT"], "-p"),
    ("export_model", ["-d", "42", "-c", "3d_resenc", "-tr", "..\\x", "-o", "OUT/m.zip"], "-tr"),
    ("make_phantom", ["--name", "../../x", "--raw", "RAW"], "--name"),
])
def test_other_commands_refuse_path_names_too(tmp_path, command, args, flag):
    where = {"IN": tmp_path / "in", "OUT": tmp_path / "out", "RAW": tmp_path / "raw"}
    args = [str(where[a]) if a in where else a.replace("OUT/", f"{tmp_path}/out/") for a in args]
    refused(run_cli(command, *args), f"{flag} '", "must be a plain name")
    assert not (tmp_path / "out").exists() and not (tmp_path / "escaped").exists()


def test_plain_name_rule():
    for ok in ("LNMPlans", "3d_resenc", "checkpoint_final.pth", "a..b", "Dataset042_Tiny", 0):
        assert check_plain_name(ok, "x") == str(ok)
    for bad in ("", ".", "..", "a/b", "a\\b", "/abs", "x\0y"):
        with pytest.raises(LNMError, match="must be a plain name"):
            check_plain_name(bad, "x")


# ---- 10. more hostile input ------------------------------------------------------------------------------------
class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/lnm_pickle_ran",))


def test_cache_npz_with_pickled_objects_is_refused_and_never_unpickled(pre_copy, tmp_path):
    Path("/tmp/lnm_pickle_ran").unlink(missing_ok=True)
    cache = pre_copy / DS / "LNMPlans_crops" / "case_000.npz"
    shutil.rmtree(pre_copy / DS / "LNMPlans_crops" / "unpacked", ignore_errors=True)
    with np.load(cache) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["image_global"] = np.array([_RunsCode()], dtype=object)
    np.savez(cache, **arrays)
    proc = train(pre_copy, tmp_path / "res")
    refused(proc, str(cache), "holds pickled Python objects")
    assert not Path("/tmp/lnm_pickle_ran").exists()


def test_dataset_json_naming_a_channel_twice_is_one_line(raw_ds):
    text = (raw_ds / "dataset.json").read_text().replace('"channel_names": {"0": "CT"}',
                                                          '"channel_names": {"0": "CT", "0": "T2"}')
    (raw_ds / "dataset.json").write_text(text)
    refused(plan(raw_ds), str(raw_ds / "dataset.json"), "key '0' given twice")
    with pytest.raises(ValueError, match="key '0' given twice"):
        load_json(raw_ds / "dataset.json")


def test_train_on_a_dataset_never_preprocessed(raw_ds, tmp_path):
    proc = run_cli("train", "42", "3d_resenc", "0", "--raw", raw_ds.parent, "--preprocessed", tmp_path / "pre",
                   "--results", tmp_path / "res", env={"LNM_raw": str(raw_ds.parent)})
    refused(proc, "is in", "but not preprocessed", "run lnm_plan_and_preprocess -d 042 first")


@pytest.fixture(scope="module")
def model(planned, tmp_path_factory) -> Path:
    """One fold trained for one epoch on the planned tiny dataset (enough to predict and continue from)."""
    return train_one_epoch_model(planned, tmp_path_factory.mktemp("results"))


@pytest.mark.slow
def test_continuing_a_fold_from_another_folds_checkpoint_is_refused(planned, model, tmp_path):
    results = tmp_path / "res" / DS
    copy = Path(shutil.copytree(model, results / model.name))
    (copy / "fold_1").mkdir()
    shutil.copy(copy / "fold_0" / "checkpoint_final.pth", copy / "fold_1" / "checkpoint_latest.pth")
    proc = run_train_cli("42", "3d_resenc", "1", "-tr", "LNMTrainer_1epochs", "--c", "-device", "cpu",
                         preprocessed=planned / "pre", results=tmp_path / "res")
    refused(proc, str(copy / "fold_1" / "checkpoint_latest.pth"), "a run of fold 0, not fold 1")
    assert not (copy / "fold_1" / "checkpoint_final.pth").exists()


@pytest.mark.slow
def test_prediction_reads_images_with_the_same_checks(planned, model, tmp_path):
    """lnm_predict reads with the dataset's readers: a sheared sform, a spacing in metres and a float mask with id
    1e12 are one line each, the other case is predicted."""
    raw, inp = planned / "raw" / DS, tmp_path / "in"
    inp.mkdir()
    for case in ("case_000", "case_001", "case_002", "case_003"):
        shutil.copy(raw / "imagesTr" / f"{case}_0000.nii.gz", inp / f"{case}_0000.nii.gz")
        shutil.copy(raw / "nodesTr" / f"{case}.nii.gz", inp / f"{case}_nodes.nii.gz")
    shear_nifti_sform(inp / "case_001_0000.nii.gz")
    for path in (inp / "case_002_0000.nii.gz", inp / "case_002_nodes.nii.gz"):
        img = sitk.ReadImage(str(path))
        img.SetSpacing((0.0008, 0.0008, 0.004))
        sitk.WriteImage(img, str(path))
    mask = inp / "case_003_nodes.nii.gz"
    ref = sitk.ReadImage(str(mask))
    ids = sitk.GetArrayFromImage(ref).astype(np.float64)
    ids[ids == 1] = 1e12
    write_image(ids, mask, ref.GetSpacing(), ref.GetOrigin(), ref.GetDirection())
    proc = run_cli("predict", "-i", inp, "-o", tmp_path / "out", "-m", model, "-f", "0", "-device", "cpu", "--quiet")
    refused(proc, "case_001_0000.nii.gz", "sform is sheared")
    refused(proc, "case_002_0000.nii.gz", "outside 0.01-50 mm")
    refused(proc, "case_003_nodes.nii.gz", "node id 1000000000000 is above")
    nodes = pd.read_csv(tmp_path / "out" / "nodes.csv", dtype={"case": str})
    assert set(nodes.case) == {"case_000"}
