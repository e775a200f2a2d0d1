"""Hostile input, built for real: every broken dataset, table, image and checkpoint either works as
documented (documentation/robustness.md) or stops with one line naming the file and a non-zero exit,
never a traceback and never a half-written output. Checks that must hold with --no-verify too."""
from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from lnm_auto.datasets.raw_dataset import read_image
from lnm_auto.utils.checkpoints import save_checkpoint
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.processes import die_with_parent
from conftest import refused, run_cli, train_one_epoch_model, write_image, write_tiny_dataset

DS = "Dataset042_Tiny"




@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("base") / "raw", n_cases=4)


@pytest.fixture
def ds(base, tmp_path) -> Path:
    """A fresh copy of the 4-case tiny dataset to break."""
    return Path(shutil.copytree(base, tmp_path / "raw" / DS))


def plan(ds: Path, *extra) -> subprocess.CompletedProcess:
    return run_cli("plan_and_preprocess", "-d", "42", "-np", "1", "-pl", "LNMPlannerCPU", "--quiet",
                   "--raw", ds.parent, "--preprocessed", ds.parent.parent / "pre", *extra)


def nothing_planned(ds: Path) -> bool:
    pre = ds.parent.parent / "pre" / DS
    return not (pre / "LNMPlans.json").exists()


def image_path(ds: Path, case: str = "case_001") -> Path:
    return ds / "imagesTr" / f"{case}_0000.nii.gz"


def mask_path(ds: Path, case: str = "case_001") -> Path:
    return ds / "nodesTr" / f"{case}.nii.gz"


def array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def rewrite(path: Path, arr: np.ndarray, like: Path | None = None, **geometry) -> None:
    """Write ``arr`` to ``path`` with the geometry of ``like`` (default: the file itself), overridden by ``geometry``."""
    ref = sitk.ReadImage(str(like or path))
    g = {"spacing_xyz": ref.GetSpacing(), "origin": ref.GetOrigin(), "direction": ref.GetDirection(), **geometry}
    write_image(arr, path, **g)


def set_nifti_pixdim(path: Path, axis: int, value: float) -> None:
    """Edit pixdim[axis] in a .nii.gz header (what a broken converter writes)."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[76 + 4 * axis: 80 + 4 * axis] = struct.pack("<f", value)
    path.write_bytes(gzip.compress(bytes(raw)))


# ---- images ------------------------------------------------------------------------------------
@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("damage", ["truncated", "corrupt", "empty"])
def test_damaged_image_is_refused_verified_or_not(ds, damage, verify):
    path = image_path(ds)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                      "corrupt": data[:200] + bytes(50) + data[250:]}[damage])
    line = refused(plan(ds, *([] if verify else ["--no-verify"])), str(path))
    assert {"truncated": "truncated", "corrupt": "damaged", "empty": "0 bytes"}[damage] in line
    assert nothing_planned(ds)


def test_truncated_nifti_is_refused_by_the_reader_that_silently_zero_filled(tmp_path):
    """SimpleITK reads a half .nii.gz and fills the rest with zeros; read_image refuses it."""
    path, whole = tmp_path / "a.nii.gz", tmp_path / "b.nii"
    write_image(np.ones((10, 20, 20), np.float32), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    assert (sitk.GetArrayFromImage(sitk.ReadImage(str(path))) == 0).any()   # the silent zero fill
    with pytest.raises(LNMError, match="truncated"):
        read_image(path)
    write_image(np.ones((10, 20, 20), np.float32), whole)           # uncompressed: the file size tells
    whole.write_bytes(whole.read_bytes()[:-100])
    with pytest.raises(LNMError, match="truncated: 15900 of the 16000 bytes of voxel data"):
        read_image(whole)


@pytest.mark.parametrize("value", [0.0, -0.8])
def test_header_spacing_zero_or_negative_is_refused(ds, value):
    """A 0 spacing is read as 1 mm by SimpleITK (with only a warning): refused from the header."""
    path = image_path(ds)
    set_nifti_pixdim(path, 1, value)
    line = refused(plan(ds, "--no-verify"), str(path), "pixdim[1]")
    assert f"{value:g}" in line and nothing_planned(ds)


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("shape", [(48, 48), (2, 10, 48, 48)], ids=["2D", "4D"])
def test_2d_and_4d_images_are_refused(ds, shape, verify):
    path = image_path(ds)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros(shape, np.float32), isVector=False), str(path))
    refused(plan(ds, *([] if verify else ["--no-verify"])), str(path), "3D single-component")
    assert nothing_planned(ds)


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_voxels_are_refused_before_any_plans(ds, bad, verify):
    path = image_path(ds)
    arr = array(path)
    arr[4, 14, 14] = bad                      # inside node 1: would make NaN normalization in the plans
    rewrite(path, arr)
    refused(plan(ds, *([] if verify else ["--no-verify"])), str(path), "NaN/Inf")
    assert nothing_planned(ds)


def test_nan_far_from_the_nodes_is_refused_when_the_crops_are_cut(ds):
    path = image_path(ds)
    arr = array(path)
    arr[0, 47, 47] = np.nan                   # outside every node neighbourhood: fingerprint stays finite
    rewrite(path, arr)
    refused(plan(ds, "--no-verify"), str(path), "NaN/Inf")
    assert not (ds.parent.parent / "pre" / DS / "LNMPlans_crops" / "case_001.npz").exists()


def test_shifted_mask_is_refused_even_without_verification(ds):
    mask = mask_path(ds)
    ref = sitk.ReadImage(str(mask))
    rewrite(mask, array(mask), origin=tuple(np.add(ref.GetOrigin(), (0, 0, 2.0))))
    for extra in ([], ["--no-verify"]):
        refused(plan(ds, *extra), str(mask), "origin")
    assert nothing_planned(ds)


# ---- masks and tables ---------------------------------------------------------------------------
@pytest.mark.parametrize("verify", [True, False])
def test_mask_with_fractional_values_is_refused(ds, verify):
    mask = mask_path(ds)
    rewrite(mask, array(mask).astype(np.float32) * 0.5)
    refused(plan(ds, *([] if verify else ["--no-verify"])), str(mask), "non-integer")


@pytest.mark.parametrize("verify", [True, False])
def test_mask_node_missing_from_nodes_csv_and_the_reverse(ds, verify):
    flags = [] if verify else ["--no-verify"]
    nodes = pd.read_csv(ds / "nodes.csv", dtype=str)
    nodes[~((nodes.case == "case_001") & (nodes.node == "3"))].to_csv(ds / "nodes.csv", index=False)
    refused(plan(ds, *flags), str(mask_path(ds)), "3", "not listed")
    nodes.to_csv(ds / "nodes.csv", index=False)
    mask = mask_path(ds)
    arr = array(mask)
    arr[arr == 3] = 0                         # node 3 dropped from the mask, still in nodes.csv
    rewrite(mask, arr)
    line = refused(plan(ds, *flags), "case_001")
    assert "3" in line and ("does not occur" in line or "not in this mask" in line)


def test_node_ids_1_0_and_padded_are_accepted_letters_refused(ds):
    nodes = pd.read_csv(ds / "nodes.csv", dtype=str)
    nodes["node"] = [("1.0" if n == "1" else f" {n}") for n in nodes.node]
    nodes.to_csv(ds / "nodes.csv", index=False)
    assert plan(ds).returncode == 0
    index = pd.read_csv(ds.parent.parent / "pre" / DS / "LNMPlans_crops" / "nodes_index.csv")
    assert sorted(index[index.case == "case_001"].node) == [1, 2, 3]
    nodes.loc[0, "node"] = "A"
    nodes.to_csv(ds / "nodes.csv", index=False)
    for extra in ([], ["--no-verify"]):
        refused(plan(ds, *extra), str(ds / "nodes.csv"), "line 2", "'A'")


@pytest.mark.parametrize("verify", [True, False])
def test_duplicate_node_rows_are_refused(ds, verify):
    nodes = pd.read_csv(ds / "nodes.csv", dtype=str)
    pd.concat([nodes, nodes.iloc[[0]].assign(label="0")]).to_csv(ds / "nodes.csv", index=False)
    refused(plan(ds, *([] if verify else ["--no-verify"])), str(ds / "nodes.csv"), "more than once")
    assert nothing_planned(ds)


def test_csv_with_bom_crlf_and_extra_columns_is_read(ds):
    nodes = pd.read_csv(ds / "nodes.csv", dtype=str).assign(comment="from the PACS")
    (ds / "nodes.csv").write_bytes(b"\xef\xbb\xbf" + nodes.to_csv(index=False, lineterminator="\r\n").encode())
    assert plan(ds).returncode == 0
    index = pd.read_csv(ds.parent.parent / "pre" / DS / "LNMPlans_crops" / "nodes_index.csv", dtype={"station": str})
    assert len(index) == len(nodes) and set(index.station) == {"7", "4R"}


def test_csv_missing_a_column_is_one_line(ds):
    pd.read_csv(ds / "nodes.csv", dtype=str).drop(columns="label").to_csv(ds / "nodes.csv", index=False)
    for extra in ([], ["--no-verify"]):
        refused(plan(ds, *extra), str(ds / "nodes.csv"), "label")


def test_unsafe_colliding_and_escaping_case_ids_are_refused(ds):
    for f in (image_path(ds, "case_003"), mask_path(ds, "case_003")):
        f.rename(f.with_name(f.name.replace("case_003", "cäse_003")))
    nodes = pd.read_csv(ds / "nodes.csv", dtype=str)
    nodes["case"] = nodes.case.replace({"case_003": "cäse_003"})
    nodes.to_csv(ds / "nodes.csv", index=False)
    refused(plan(ds, "--no-verify"), "'cäse_003' is not a safe file name")
    shutil.copy(image_path(ds, "case_000"), image_path(ds, "CASE_000"))
    refused(plan(ds), "differ only in upper/lower case")
    pd.concat([nodes, nodes.iloc[[0]].assign(case="../evil")]).to_csv(ds / "nodes.csv", index=False)
    refused(plan(ds), str(ds / "nodes.csv"), "'../evil' has no image")
    assert not (ds.parent.parent / "evil.npz").exists() and nothing_planned(ds)


def test_dataset_json_broken_or_disagreeing_with_the_files(ds):
    (ds / "dataset.json").write_text("{'name': 'Tiny',")
    refused(plan(ds), str(ds / "dataset.json"), "not valid JSON")
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT", "1": "PET"}, "file_ending": ".nii.gz"}))
    refused(plan(ds, "--no-verify"), "case_000_0001.nii.gz", "not found")
    assert nothing_planned(ds)


def test_empty_dataset_is_one_line(ds):
    shutil.rmtree(ds / "imagesTr")
    shutil.rmtree(ds / "nodesTr")
    for extra in ([], ["--no-verify"]):
        refused(plan(ds, *extra), "no training cases found")


def test_preprocessed_path_that_is_a_file(ds, tmp_path):
    target = tmp_path / "a_file"
    target.write_text("x")
    proc = run_cli("plan_and_preprocess", "-d", "42", "-np", "1", "-pl", "LNMPlannerCPU", "--quiet", "--raw",
                   ds.parent, "--preprocessed", target)
    refused(proc, str(target))


# ---- inputs that are handled, not refused ---------------------------------------------------------
def test_odd_but_valid_geometry_and_nodes_are_handled(ds):
    """0.3 x 0.3 x 10 mm voxels, a one-slice node touching the volume border, a case without nodes and a
    dataset whose labels hold one class only: planned and cached, crops finite and every node kept."""
    for i in range(4):
        for path in (image_path(ds, f"case_{i:03d}"), mask_path(ds, f"case_{i:03d}")):
            rewrite(path, array(path), spacing_xyz=(0.3, 0.3, 10.0))
    mask = mask_path(ds, "case_000")
    arr = array(mask)
    arr[arr == 2] = 0
    arr[0, 0:3, 20:24] = 2                    # one slice thick, on the first slice and the volume's edge
    rewrite(mask, arr)
    empty = mask_path(ds, "case_002")
    rewrite(empty, np.zeros_like(array(empty)))
    nodes = pd.read_csv(ds / "nodes.csv", dtype=str)
    nodes = nodes[nodes.case != "case_002"].assign(label="0")
    nodes.to_csv(ds / "nodes.csv", index=False)
    pd.read_csv(ds / "patients.csv").assign(label=0).to_csv(ds / "patients.csv", index=False)
    pd.read_csv(ds / "stations.csv").assign(label=0).to_csv(ds / "stations.csv", index=False)
    proc = plan(ds)
    assert proc.returncode == 0, proc.stderr
    crops = ds.parent.parent / "pre" / DS / "LNMPlans_crops"
    index = pd.read_csv(crops / "nodes_index.csv")
    assert len(index) == len(nodes) and "case_002" not in set(index.case)
    with np.load(crops / "case_000.npz") as f:
        assert sorted(f["node_ids"]) == [1, 2]
        assert all(np.isfinite(f[k].astype(np.float32)).all() for k in f.files if k.startswith("image_"))
        assert f["mask_global"][list(f["node_ids"]).index(2)].any()   # the border node is in its crop
    with np.load(crops / "case_002.npz") as f:
        assert len(f["node_ids"]) == 0
    plans = json.loads((crops.parent / "LNMPlans.json").read_text())
    assert plans["target_spacing_mm"][0] == pytest.approx(10.0)


# ---- checkpoints: no code runs from a file someone hands over ------------------------------------
class _WritesMarker:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_malicious_checkpoint(path: Path, marker: Path) -> None:
    """A checkpoint that would create ``marker`` if it were unpickled with weights_only=False."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"network_weights": {}, "format_version": 2, "payload": _WritesMarker(str(marker))}, path,
               pickle_protocol=pickle.HIGHEST_PROTOCOL)


@pytest.fixture(scope="module")
def planned(planned_tiny) -> Path:
    """The tiny dataset planned and cached once (shared, read-only), for the checkpoint and prediction tests."""
    return planned_tiny(8)


def model_with_checkpoint(planned: Path, tmp_path: Path, checkpoint: bytes | None, marker: Path) -> Path:
    folder = tmp_path / "results" / DS / "LNMTrainer__LNMPlans__3d_resenc"
    folder.mkdir(parents=True)
    shutil.copy(planned / "pre" / DS / "LNMPlans.json", folder / "plans.json")
    shutil.copy(planned / "pre" / DS / "dataset.json", folder / "dataset.json")
    if checkpoint is None:
        write_malicious_checkpoint(folder / "fold_0" / "checkpoint_final.pth", marker)
    else:
        (folder / "fold_0").mkdir()
        (folder / "fold_0" / "checkpoint_final.pth").write_bytes(checkpoint)
    return folder


def test_malicious_checkpoint_in_a_model_folder_or_zip_never_runs(planned, tmp_path):
    marker = tmp_path / "pwned"
    folder = model_with_checkpoint(planned, tmp_path, None, marker)
    proc = run_cli("predict", "-i", tmp_path, "-o", tmp_path / "out", "-m", folder, "-f", "0", "--quiet")
    assert "refused" in refused(proc, str(folder / "fold_0" / "checkpoint_final.pth"))
    model_zip = tmp_path / "model.zip"
    with zipfile.ZipFile(model_zip, "w") as z:
        for f in folder.rglob("*"):
            z.write(f, f"{DS}/{folder.name}/{f.relative_to(folder)}")
    proc = run_cli("predict", "-i", tmp_path, "-o", tmp_path / "out2", "-m", model_zip, "-f", "0", "--quiet")
    assert "refused" in refused(proc, "checkpoint_final.pth")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_malicious_checkpoint_to_continue_or_initialise_training_never_runs(planned, tmp_path):
    marker = tmp_path / "pwned"
    results = tmp_path / "results"
    fold = results / DS / "LNMTrainer_1epochs__LNMPlans__3d_resenc" / "fold_0"
    write_malicious_checkpoint(fold / "checkpoint_latest.pth", marker)
    common = ("--preprocessed", planned / "pre", "--results", results, "-device", "cpu")
    proc = run_cli("train", "42", "3d_resenc", "0", "-tr", "LNMTrainer_1epochs", "--c", *common)
    assert "refused" in refused(proc, str(fold / "checkpoint_latest.pth"))
    weights = tmp_path / "pretrained.pth"
    write_malicious_checkpoint(weights, marker)
    proc = run_cli("train", "42", "3d_resenc", "1", "-tr", "LNMTrainer_1epochs", "-pretrained_weights", weights,
                   *common)
    refused(proc, str(weights))
    assert not marker.exists()
    assert not list(results.rglob("checkpoint_final.pth"))


def test_corrupt_checkpoint_and_unsafe_zip_are_one_line(planned, tmp_path):
    whole = tmp_path / "whole.pth"
    save_checkpoint({"network_weights": {"w": torch.zeros(1000)}}, whole)
    folder = model_with_checkpoint(planned, tmp_path, whole.read_bytes()[:-600], tmp_path / "unused")   # truncated copy
    proc = run_cli("predict", "-i", tmp_path, "-o", tmp_path / "out", "-m", folder, "-f", "0", "--quiet")
    refused(proc, str(folder / "fold_0" / "checkpoint_final.pth"), "damaged")
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../../escaped.txt", "x")
    refused(run_cli("predict", "-i", tmp_path, "-o", tmp_path / "o2", "-m", evil), str(evil), "unsafe path")
    assert not (tmp_path.parent / "escaped.txt").exists()


# ---- worker processes end with their parent ------------------------------------------------------
def children(pid: int) -> list[int]:
    """Child process ids of ``pid`` (Linux /proc)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return sorted(out)


ORPHAN_SCRIPT = """
import os, sys, time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from lnm_auto.utils.processes import die_with_parent
def children(pid):
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
if __name__ == "__main__":
    with ProcessPoolExecutor(2, initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
        list(pool.map(abs, [0, 1]))
        print(" ".join(str(p) for p in children(os.getpid())), flush=True)
        time.sleep(60)
"""


def children_alive(pids: list[int]) -> list[int]:
    """Which of ``pids`` still run (zombies count as gone)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state != "Z":
            alive.append(pid)
    return alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl are Linux's")
def test_pool_workers_die_with_a_killed_parent(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(ORPHAN_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in parent.stdout.readline().split()]
    assert len(workers) == 2 and children_alive(workers) == workers
    parent.kill()
    parent.wait()
    deadline = time.time() + 5
    while children_alive(workers) and time.time() < deadline:
        time.sleep(0.05)
    assert children_alive(workers) == []


def test_die_with_parent_uses_prctl_on_linux():
    if sys.platform.startswith("linux"):
        import multiprocessing
        with multiprocessing.get_context("fork").Pool(1) as pool:
            assert pool.apply(die_with_parent, (os.getpid(),)) == "prctl"


# ---- lnm_predict: input tables, output folder, resume, parts --------------------------------------
@pytest.fixture(scope="module")
def model(planned, tmp_path_factory) -> Path:
    """One fold trained for one epoch on the planned tiny dataset (enough to predict with)."""
    return train_one_epoch_model(planned, tmp_path_factory.mktemp("results"))


@pytest.fixture
def cases_in(planned, tmp_path) -> Path:
    """An lnm_predict input folder: three cases as <case>_0000 + <case>_nodes, with a nodes.csv of stations."""
    raw, inp = planned / "raw" / DS, tmp_path / "in"
    inp.mkdir()
    for case in ("case_000", "case_001", "case_002"):
        shutil.copy(raw / "imagesTr" / f"{case}_0000.nii.gz", inp / f"{case}_0000.nii.gz")
        shutil.copy(raw / "nodesTr" / f"{case}.nii.gz", inp / f"{case}_nodes.nii.gz")
    nodes = pd.read_csv(raw / "nodes.csv", dtype=str)
    nodes[nodes.case.isin(["case_000", "case_001", "case_002"])][["case", "node", "station"]].to_csv(
        inp / "nodes.csv", index=False)
    return inp


def predict(inp: Path, out: Path, model: Path, *extra) -> subprocess.CompletedProcess:
    return run_cli("predict", "-i", inp, "-o", out, "-m", model, "-f", "0", "-device", "cpu", "--quiet", *extra)


def read_nodes(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"case": str, "station": str}, keep_default_na=False)


@pytest.mark.slow
def test_predict_node_table_variants(model, cases_in, tmp_path):
    table = cases_in / "nodes.csv"
    rows = pd.read_csv(table, dtype=str)
    rows.assign(node=rows.node + ".0").to_csv(table, index=False)          # what training accepts: 1.0
    assert predict(cases_in, tmp_path / "a", model).returncode == 0
    got = read_nodes(tmp_path / "a" / "nodes.csv").set_index(["case", "node"])
    assert got.loc[("case_001", 1), "station"] == "7" and got.loc[("case_001", 2), "station"] == "4R"
    table.write_text("case,node,station\ncase_000,,7\n")
    refused(predict(cases_in, tmp_path / "b", model), str(table), "line 2")
    table.write_text('case,node,station\ncase_000,1,"7\ncase_000,2,4R\n')
    refused(predict(cases_in, tmp_path / "c", model), str(table), "cannot be read as CSV")
    rows[["case", "node"]].to_csv(table, index=False)                     # no station column
    proc = predict(cases_in, tmp_path / "d", model)
    assert proc.returncode == 0 and "warning:" in proc.stderr and "no 'station' column" in proc.stderr
    stations = read_nodes(tmp_path / "d" / "stations.csv")
    assert set(stations.station) == {"unknown"} and len(stations) == 3
    assert not (tmp_path / "b").exists() or not (tmp_path / "b" / "nodes.csv").exists()


@pytest.mark.slow
def test_predict_output_folder_rules(model, cases_in, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me")
    refused(predict(cases_in, a_file, model), str(a_file), "is a file")
    assert a_file.read_text() == "keep me"
    out = tmp_path / "out"
    assert predict(cases_in, out, model).returncode == 0
    first = read_nodes(out / "nodes.csv")
    # the same input again: every case skipped, same tables
    again = run_cli("predict", "-i", cases_in, "-o", out, "-m", model, "-f", "0", "-device", "cpu")
    assert again.returncode == 0 and "3 case(s) already predicted" in again.stdout
    pd.testing.assert_frame_equal(read_nodes(out / "nodes.csv"), first)
    # fewer cases: the dropped case's files go, the tables list only what is there
    for f in cases_in.glob("case_002*"):
        f.unlink()
    assert predict(cases_in, out, model).returncode == 0
    assert not (out / "case_002_probmap.nii.gz").exists() and not (out / "cases" / "case_002.csv").exists()
    assert set(read_nodes(out / "nodes.csv").case) == set(read_nodes(out / "stations.csv").case) == {"case_000",
                                                                                                     "case_001"}
    # other settings: refused unless --overwrite; a foreign file in the folder is never touched
    (out / "notes.txt").write_text("mine")
    refused(predict(cases_in, out, model, "--disable_tta"), str(out), "other settings", "test_time_mirroring")
    assert predict(cases_in, out, model, "--disable_tta", "--overwrite").returncode == 0
    info = json.loads((out / "predict_info.json").read_text())
    assert info["settings"]["test_time_mirroring"] is False and info["status"] == "finished"
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_predict_resumes_skips_and_overwrites(model, cases_in, tmp_path, capsys):
    from lnm_auto.inference.predictor import predict_folder
    ref = tmp_path / "ref"
    predict_folder(cases_in, ref, model, ["0"], progress=False)
    out = tmp_path / "out"
    predict_folder(cases_in, out, model, ["0"], progress=True)            # stdout is no terminal: whole lines
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("predict ")]
    assert [line.split(":")[0] for line in lines] == ["predict 1/3", "predict 2/3", "predict 3/3"]
    assert "case_001 3 node(s)" in lines[1] and "\r" not in "".join(lines)
    # as after a kill between cases: case_002 not done, the tables not yet written
    (out / "cases" / "case_002.csv").unlink()
    (out / "nodes.csv").unlink()
    before = (out / "case_000_probmap.nii.gz").stat().st_mtime_ns
    info = predict_folder(cases_in, out, model, ["0"], progress=True)
    assert info["skipped_already_done"] == ["case_000", "case_001"]
    assert "predict 1/1: case_002" in capsys.readouterr().out
    assert (out / "case_000_probmap.nii.gz").stat().st_mtime_ns == before
    pd.testing.assert_frame_equal(read_nodes(out / "nodes.csv"), read_nodes(ref / "nodes.csv"))
    predict_folder(cases_in, out, model, ["0"], progress=False, overwrite=True)
    assert (out / "case_000_probmap.nii.gz").stat().st_mtime_ns != before


@pytest.mark.slow
def test_predict_parts_and_zip_origin(model, cases_in, tmp_path):
    from lnm_auto.inference.model import export_model
    model_zip = export_model(model, tmp_path / "model.zip", ["0"])
    whole = tmp_path / "whole"
    assert predict(cases_in, whole, model_zip).returncode == 0
    info = json.loads((whole / "predict_info.json").read_text())
    assert info["model_zip"] == str(model_zip.absolute()) and "model_folder" not in info
    parts = tmp_path / "parts"
    for k in (0, 1):
        assert predict(cases_in, parts, model_zip, "-num_parts", 2, "-part_id", k).returncode == 0
    p0, p1 = read_nodes(parts / "nodes_part0.csv"), read_nodes(parts / "nodes_part1.csv")
    assert set(p0.case) == {"case_000", "case_002"} and set(p1.case) == {"case_001"}   # sorted ids, every 2nd
    merged = pd.concat([p0, p1]).sort_values(["case", "node"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(merged, read_nodes(whole / "nodes.csv"))
    assert (parts / "predict_info_part1.json").is_file() and not (parts / "nodes.csv").exists()
    refused(predict(cases_in, parts, model_zip, "-num_parts", 2, "-part_id", 2), "-part_id")


@pytest.mark.slow
def test_predict_refuses_bad_cases_with_one_line_each_and_runs_the_others(model, cases_in, tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((48, 48), np.float32)), str(cases_in / "case_000_0000.nii.gz"))
    shifted = cases_in / "case_001_nodes.nii.gz"
    ref = sitk.ReadImage(str(shifted))
    rewrite(shifted, array(shifted), origin=tuple(np.add(ref.GetOrigin(), (3.0, 0, 0))))
    for case in ("case_003", "case_004"):
        shutil.copy(cases_in / "case_002_0000.nii.gz", cases_in / f"{case}_0000.nii.gz")
        shutil.copy(cases_in / "case_002_nodes.nii.gz", cases_in / f"{case}_nodes.nii.gz")
    data = (cases_in / "case_003_0000.nii.gz").read_bytes()
    (cases_in / "case_003_0000.nii.gz").write_bytes(data[: len(data) // 2])
    nan_image = array(cases_in / "case_004_0000.nii.gz")
    nan_image[5, 20, 20] = np.nan
    rewrite(cases_in / "case_004_0000.nii.gz", nan_image)
    proc = predict(cases_in, tmp_path / "out", model)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "4 case(s) failed" in proc.stderr
    refused(proc, "case_000_0000.nii.gz", "3D single-component")
    refused(proc, "case_001_nodes.nii.gz", "origin")
    refused(proc, "case_003_0000.nii.gz", "truncated")
    refused(proc, "case_004_0000.nii.gz", "NaN/Inf")
    assert set(read_nodes(tmp_path / "out" / "nodes.csv").case) == {"case_002"}
