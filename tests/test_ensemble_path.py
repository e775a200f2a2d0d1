"""The chosen model as a first-class citizen: lnm_predict -d with a chosen ensemble (or the size rule) honours -f,
-chk, -num_parts/-part_id and resume through the same parts as one model, refuses what does not apply in one
line, never joins members' nodes silently; lnm_export_model -d (no -c) packs the choice into one zip that
lnm_predict -m reproduces exactly. Real models (one epoch of 3d_resenc, a radiomics fit), real files, real CLI."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from conftest import refused, run_cli, train_one_epoch_model
from lnm_auto.evaluation.calibration import apply_calibration

DS = "Dataset042_Tiny"
PLATT = {"method": "platt", "a": 0.8, "b": -0.3, "n": 20, "n_positive": 8}


@pytest.fixture(scope="module")
def planned(planned_tiny, tmp_path_factory) -> Path:
    """A private copy of the session's planned tiny dataset: the radiomics fit writes its feature cache into pre/."""
    root = tmp_path_factory.mktemp("planned")
    for part in ("raw", "pre"):
        shutil.copytree(planned_tiny(8) / part, root / part)
    return root


@pytest.fixture(scope="module")
def results(planned, tmp_path_factory) -> Path:
    """One results folder holding both members: 3d_resenc (fold 0, one epoch) and radiomics (fold 0)."""
    from lnm_auto.training.run import run_training, setup_trainer
    root = tmp_path_factory.mktemp("results")
    train_one_epoch_model(planned, root)
    trainer = setup_trainer(42, "radiomics", "0", planned / "pre", root, raw_root=planned / "raw", num_workers=0)
    run_training(trainer)
    return root


def members(results: Path) -> list[Path]:
    return [results / DS / "LNMTrainer_1epochs__LNMPlans__3d_resenc", results / DS / "RadiomicsTrainer__LNMPlans__radiomics"]


def choose(results: Path, chosen: list[Path], calibration: dict = PLATT, folds=("0",)) -> Path:
    """inference_instructions.json as lnm_find_best_configuration writes it (digests of the chosen fold models)."""
    from lnm_auto.evaluation.crossval_inputs import fold_model_digests
    path = results / DS / "inference_instructions.json"
    path.write_text(json.dumps({
        "chosen": [dict(zip(("trainer", "plans", "configuration"), m.name.split("__")), model_folder=m.name)
                   for m in chosen],
        "size_rule": not chosen, "folds": list(folds), "calibration": calibration,
        "model_files": {m.name: fold_model_digests(m, folds) for m in chosen}}))
    return path


@pytest.fixture
def cases_in(planned, tmp_path) -> Path:
    """Three cases as lnm_predict input (case_000's mask binary: split into an instance mask in -o)."""
    raw, inp = planned / "raw" / DS, tmp_path / "in"
    inp.mkdir()
    for case in ("case_000", "case_001", "case_002"):
        shutil.copy(raw / "imagesTr" / f"{case}_0000.nii.gz", inp / f"{case}_0000.nii.gz")
        mask = sitk.ReadImage(str(raw / "nodesTr" / f"{case}.nii.gz"))
        if case == "case_000":
            mask = sitk.Cast(mask > 0, sitk.sitkUInt8)
        sitk.WriteImage(mask, str(inp / f"{case}_nodes.nii.gz"))
    return inp


def predict(inp: Path, out: Path, results: Path, *extra) -> subprocess.CompletedProcess:
    return run_cli("predict", "-i", inp, "-o", out, "-d", "42", "-device", "cpu", "-npp", "0", "--quiet",
                   "--results", results, *extra)


def nodes(out: Path, name: str = "nodes.csv") -> pd.DataFrame:
    return pd.read_csv(out / name, dtype={"case": str, "station": str}, keep_default_na=False) \
        .sort_values(["case", "node"]).reset_index(drop=True)


def record(out: Path, name: str = "predict_info.json") -> dict:
    return json.loads((out / name).read_text())


# ---- the ensemble: one loop, every flag -----------------------------------------------------------------------
@pytest.mark.slow
def test_chosen_ensemble_is_the_calibrated_mean_of_its_members_with_maps_of_it(results, cases_in, tmp_path):
    resenc, radiomics = members(results)
    choose(results, [resenc, radiomics])
    proc = predict(cases_in, tmp_path / "ens", results)
    assert proc.returncode == 0, proc.stderr
    assert f"{resenc.name} + {radiomics.name}" in proc.stdout
    ens = nodes(tmp_path / "ens")
    for member in (resenc, radiomics):     # each member's column is that model predicted alone (uncalibrated)
        alone = run_cli("predict", "-i", cases_in, "-o", tmp_path / member.name, "-m", member, "-f", "0",
                        "-device", "cpu", "-npp", "0", "--quiet")
        assert alone.returncode == 0, alone.stderr
        single = nodes(tmp_path / member.name)
        assert single[["case", "node"]].equals(ens[["case", "node"]])
        np.testing.assert_allclose(ens[f"probability_{member.name}"], single["probability"], atol=1e-6)
        np.testing.assert_allclose(ens[f"probability_{member.name}_fold0"], single["probability_fold0"], atol=1e-6)
    mean = ens[[f"probability_{m.name}" for m in (resenc, radiomics)]].mean(axis=1)
    np.testing.assert_allclose(ens["probability_uncalibrated"], mean, atol=1e-9)
    np.testing.assert_allclose(ens["probability"], apply_calibration(PLATT, mean), atol=1e-9)
    # the probability map shows the ensemble's calibrated probability, on the split instance mask of case_000
    out = tmp_path / "ens"
    for case in ("case_000", "case_001"):
        mask_file = out / "case_000_nodes.nii.gz" if case == "case_000" else cases_in / f"{case}_nodes.nii.gz"
        ids = sitk.GetArrayFromImage(sitk.ReadImage(str(mask_file)))
        probmap = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}_probmap.nii.gz")))
        for row in ens[ens.case == case].itertuples():
            np.testing.assert_allclose(probmap[ids == row.node], np.float32(row.probability), rtol=1e-6)
    info = record(out)
    assert info["status"] == "finished" and info["size_rule"] is False and len(info["members"]) == 2
    assert info["settings"]["folds"] == {resenc.name: ["0"], radiomics.name: ["0"]}


@pytest.mark.slow
def test_chosen_ensemble_honours_parts_folds_and_checkpoint(results, cases_in, tmp_path):
    resenc, radiomics = members(results)
    choose(results, [resenc, radiomics])
    assert predict(cases_in, tmp_path / "whole", results).returncode == 0
    for k in (0, 1):
        proc = predict(cases_in, tmp_path / "parts", results, "-num_parts", "2", "-part_id", k)
        assert proc.returncode == 0, proc.stderr
        assert record(tmp_path / "parts", f"predict_info_part{k}.json")["part"] == f"{k} of 2"
    parts = pd.concat([nodes(tmp_path / "parts", f"nodes_part{k}.csv") for k in (0, 1)])
    pd.testing.assert_frame_equal(parts.sort_values(["case", "node"]).reset_index(drop=True), nodes(tmp_path / "whole"))
    assert set(record(tmp_path / "parts", "predict_info_part1.json")["cases"]) == {"case_001"}
    # -f reaches every member: fold 1 was never trained
    refused(predict(cases_in, tmp_path / "f1", results, "-f", "1"), str(resenc), "fold(s) 1")
    assert not (tmp_path / "f1").exists()
    # -chk reaches every member: a misspelt one names the network member; another file is used (radiomics members
    # keep their radiomics_model.json), and the choice's map is left out: it was fitted for checkpoint_final.pth
    refused(predict(cases_in, tmp_path / "bad", results, "-chk", "checkpoint_fnial.pth"), str(resenc),
            "checkpoint_fnial.pth")
    copy = resenc / "fold_0" / "checkpoint_copy.pth"
    shutil.copy(resenc / "fold_0" / "checkpoint_final.pth", copy)
    try:
        proc = predict(cases_in, tmp_path / "chk", results, "-chk", "checkpoint_copy.pth")
    finally:
        copy.unlink()
    assert proc.returncode == 0, proc.stderr
    assert f"warning: {resenc.name}: fold(s) 0 are not the fold models" in proc.stderr
    chk, whole = nodes(tmp_path / "chk"), nodes(tmp_path / "whole")
    np.testing.assert_allclose(chk["probability"], whole["probability_uncalibrated"], atol=1e-6)
    assert record(tmp_path / "chk")["settings"]["checkpoint"] == "checkpoint_copy.pth"


@pytest.mark.slow
def test_chosen_ensemble_resumes_and_refuses_other_settings(results, cases_in, tmp_path):
    resenc, radiomics = members(results)
    choose(results, [resenc, radiomics])
    out = tmp_path / "out"
    assert predict(cases_in, out, results).returncode == 0
    first = nodes(out)
    # as after a kill between cases: case_002 not done, the tables not yet written
    (out / "cases" / "case_002.csv").unlink()
    (out / "nodes.csv").unlink()
    kept = (out / "case_000_probmap.nii.gz").stat().st_mtime_ns
    proc = predict(cases_in, out, results, "--continue_prediction")
    assert proc.returncode == 0, proc.stderr
    assert record(out)["skipped_already_done"] == ["case_000", "case_001"]
    assert (out / "case_000_probmap.nii.gz").stat().st_mtime_ns == kept
    pd.testing.assert_frame_equal(nodes(out), first)
    # another choice into the same folder: refused, the outputs kept
    choose(results, [resenc])
    refused(predict(cases_in, out, results), str(out), "other settings")
    pd.testing.assert_frame_equal(nodes(out), first)
    refused(predict(cases_in, out, results, "--continue_prediction", "--overwrite"), "--continue_prediction",
            "--overwrite")
    refused(predict(cases_in, out, results, "--save_probabilities", "--no_probmaps"), "--save_probabilities",
            "--no_probmaps")


@pytest.mark.slow
def test_ensemble_naming_a_member_twice_is_one_line(results, cases_in, tmp_path):
    from lnm_auto.inference.ensemble import predict_ensemble
    from lnm_auto.utils.errors import LNMError
    resenc, radiomics = members(results)
    with pytest.raises(LNMError, match=f"names model {resenc.name} twice"):
        predict_ensemble(cases_in, tmp_path / "out", [resenc, resenc, radiomics], progress=False, folds=["0"])
    assert not (tmp_path / "out").exists()


# ---- no silent join ----------------------------------------------------------------------------------------------
def test_members_scoring_different_nodes_fail_the_case_naming_it(planned, tmp_path):
    """Two real members (size rule scorers of two model folders) given inputs with other node ids: one line naming
    the case and both members; the same nodes in another order are aligned, not mixed up."""
    from lnm_auto.inference.members import NodeMismatch, combine, load_member
    pre = planned / "pre" / DS
    folders = []
    for name in ("A__LNMPlans__3d_resenc", "B__LNMPlans__3d_resenc"):
        folder = tmp_path / DS / name
        folder.mkdir(parents=True)
        shutil.copy(pre / "LNMPlans.json", folder / "plans.json")
        shutil.copy(pre / "dataset.json", folder / "dataset.json")
        folders.append(folder)
    pair = [load_member(f, None, size_rule=True) for f in folders]
    a = {"node_ids": np.array([1, 2, 3]), "short_axis_mm": np.array([5.0, 10.0, 20.0])}
    b = {"node_ids": np.array([1, 3]), "short_axis_mm": np.array([5.0, 20.0])}
    with pytest.raises(NodeMismatch, match=r"case 'case_007': ensemble member size_rule scores node\(s\) \[1, 3\]"):
        combine(pair, [a, b], "case_007", tmp_path / "case_007_nodes.nii.gz")
    shuffled = {"node_ids": np.array([3, 1, 2]), "short_axis_mm": np.array([20.0, 5.0, 10.0])}
    ids, mean, _ = combine(pair, [a, shuffled], "case_007", None)
    np.testing.assert_allclose(mean, [5 / 15, 10 / 20, 20 / 30])
    assert ids.tolist() == [1, 2, 3]


# ---- the choice as one zip ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_exported_ensemble_predicts_exactly_as_the_choice(results, cases_in, tmp_path):
    resenc, radiomics = members(results)
    choose(results, [resenc, radiomics])
    target = tmp_path / "exports" / "chosen.zip"
    target.parent.mkdir()
    exported = run_cli("export_model", "-d", "42", "-o", target, "--results", results)
    assert exported.returncode == 0, exported.stderr
    assert f"({resenc.name} + {radiomics.name}) written to {target}" in exported.stdout
    names = zipfile.ZipFile(target).namelist()
    assert f"{DS}/inference_instructions.json" in names
    assert f"{DS}/{resenc.name}/fold_0/checkpoint_final.pth" in names
    assert f"{DS}/{radiomics.name}/fold_0/radiomics_model.json" in names
    assert predict(cases_in, tmp_path / "by_d", results).returncode == 0
    by_zip = run_cli("predict", "-i", cases_in, "-o", tmp_path / "by_zip", "-m", target, "-device", "cpu", "-npp", "0",
                     "--quiet")
    assert by_zip.returncode == 0, by_zip.stderr
    assert "predicting with the choice of lnm_find_best_configuration" in by_zip.stdout
    a, b = nodes(tmp_path / "by_d"), nodes(tmp_path / "by_zip")
    assert list(a.columns) == list(b.columns) and a[["case", "node", "station"]].equals(b[["case", "node", "station"]])
    numeric = [c for c in a.columns if c.startswith("probability")]
    np.testing.assert_allclose(b[numeric].to_numpy(float), a[numeric].to_numpy(float), atol=1e-6)
    assert record(tmp_path / "by_zip")["calibration"]["a"] == PLATT["a"]
    # exported again over its own zip: replaced; -chk is refused for a choice (made with checkpoint_final.pth)
    assert run_cli("export_model", "-d", "42", "-o", target, "--results", results).returncode == 0
    refused(run_cli("export_model", "-d", "42", "-o", tmp_path / "x.zip", "-chk", "checkpoint_best.pth",
                    "--results", results), "-chk checkpoint_best.pth", "-c CONFIGURATION")
    assert not (tmp_path / "x.zip").exists()


@pytest.mark.slow
def test_size_rule_choice_exports_and_predicts_the_same_and_refuses_folds(results, cases_in, tmp_path):
    choose(results, [])
    target = tmp_path / "size_rule.zip"
    exported = run_cli("export_model", "-d", "42", "-o", target, "--results", results)
    assert exported.returncode == 0, exported.stderr
    assert "the size rule (short axis)" in exported.stdout
    names = zipfile.ZipFile(target).namelist()
    assert not [n for n in names if "/fold_" in n]                   # no network travels
    assert predict(cases_in, tmp_path / "by_d", results).returncode == 0
    assert run_cli("predict", "-i", cases_in, "-o", tmp_path / "by_zip", "-m", target, "-device", "cpu",
                   "--quiet").returncode == 0
    a, b = nodes(tmp_path / "by_d"), nodes(tmp_path / "by_zip")
    assert list(a.columns) == ["case", "node", "station", "probability", "probability_uncalibrated", "short_axis_mm"]
    np.testing.assert_allclose(b[a.columns[3:]].to_numpy(float), a[a.columns[3:]].to_numpy(float), atol=1e-6)
    refused(predict(cases_in, tmp_path / "f", results, "-f", "0"), "-f and -chk do not apply", "size rule")
    refused(run_cli("export_model", "-d", "42", "-o", tmp_path / "f.zip", "-f", "0", "--results", results),
            "-f does not apply", "size rule")
    assert not (tmp_path / "f").exists() and not (tmp_path / "f.zip").exists()


def test_export_without_a_choice_and_help_of_d_are_one_line(tmp_path):
    from lnm_auto.cli.predict_commands import predict_parser
    (tmp_path / DS).mkdir()
    refused(run_cli("export_model", "-d", "42", "-o", tmp_path / "m.zip", "--results", tmp_path),
            "lnm_find_best_configuration has not run", "-c CONFIGURATION")
    refused(run_cli("export_model", "-d", "42", "-tr", "LNMTrainerWeak", "-o", tmp_path / "m.zip", "--results",
                    tmp_path), "-tr and -p name one model")
    assert not (tmp_path / "m.zip").exists()
    d_help = next(a.help for a in predict_parser()._actions if "-d" in a.option_strings)
    assert "without -c" in d_help and "lnm_find_best_configuration" in d_help


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_chosen_ensemble_killed_after_a_case_resumes_to_the_same_tables(results, planned, tmp_path):
    """SIGKILL of a real lnm_predict -d process (two workers) once a case is written: the rerun skips the written
    cases and ends with the tables of an uninterrupted run."""
    from test_kill_resume import finish, kill_when, start
    resenc, radiomics = members(results)
    choose(results, [resenc, radiomics])
    inp, out = planned / "raw" / DS / "imagesTr", tmp_path / "out"
    args = ("predict", "-i", inp, "-o", out, "-d", "42", "--results", results, "-device", "cpu", "-npp", 2)
    kill_when(start(*args), lambda: len(list((out / "cases").glob("*.csv"))) >= 1, n_workers=2)
    done = sorted(f.stem for f in (out / "cases").glob("*.csv"))
    assert record(out)["status"] == "running" and not (out / "nodes.csv").exists() and len(done) < 8
    assert f"{len(done)} case(s) already predicted" in finish(start(*args))
    assert record(out)["skipped_already_done"] == done and record(out)["status"] == "finished"
    assert not [f for f in out.rglob(".*") if f.is_file()]             # no temp file of the killed run is left
    assert predict(inp, tmp_path / "ref", results).returncode == 0
    pd.testing.assert_frame_equal(nodes(out), nodes(tmp_path / "ref"))


@pytest.mark.parametrize("member, fragment", [("../evil.txt", "unsafe path '../evil.txt'"),
                                              (f"Other/{'inference_instructions.json'}", "expected exactly one")])
def test_hostile_choice_zip_is_one_line(tmp_path, member, fragment):
    """A zip with the choice's file passes the model zip's checks (no path out of the extraction folder) and holds
    one choice."""
    target = tmp_path / "chosen.zip"
    with zipfile.ZipFile(target, "w") as z:
        z.writestr(f"{DS}/inference_instructions.json", json.dumps({"chosen": [], "size_rule": True}))
        z.writestr(member, "x")
    proc = run_cli("predict", "-i", tmp_path, "-o", tmp_path / "out", "-m", target, "-device", "cpu")
    refused(proc, str(target), fragment)
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.txt").exists()
