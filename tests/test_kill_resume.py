"""SIGKILL at chosen moments, through the real command-line programs in their own processes: the worker
processes die with them, every file left behind is loadable, and a rerun finishes what was left to the
same result as an uninterrupted run (preprocessing resumes, training continues with --c to the same
weights, prediction skips the cases already written)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from lnm_auto.utils.checkpoints import load_checkpoint
from conftest import write_tiny_dataset

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")]
DS = "Dataset042_Tiny"
THREADS = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


def start(*args: str | Path, env: dict | None = None) -> subprocess.Popen:
    """``python -m lnm_auto ARGS`` in its own process (default worker processes unless ``env`` says otherwise)."""
    environment = {**os.environ, **THREADS, "LNM_NO_PROGRESS": "1", **(env or {})}
    environment.pop("LNM_n_proc_DA", None)
    return subprocess.Popen([sys.executable, "-m", "lnm_auto", *map(str, args)], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            pass
    return out


def alive(pids: list[int]) -> list[int]:
    """Which of ``pids`` still run (a zombie waiting to be reaped counts as gone)."""
    running = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                running.append(pid)
        except FileNotFoundError:
            pass
    return running


def kill_when(proc: subprocess.Popen, ready, n_workers: int, timeout: float = 300, settle: float = 0.0) -> list[int]:
    """SIGKILL ``proc`` as soon as ``ready()`` (and its ``n_workers`` worker processes run); assert the run was
    still going and that its workers end within 5 s. Returns the workers' pids."""
    deadline = time.time() + timeout
    while not (ready() and len(children(proc.pid)) >= n_workers):
        assert proc.poll() is None, f"finished before the kill point:\n{proc.stdout.read()}"
        assert time.time() < deadline, "kill point never reached"
        time.sleep(0.02)
    time.sleep(settle)
    workers = children(proc.pid)
    assert proc.poll() is None, "finished before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    end = time.time() + 5
    while alive(workers) and time.time() < end:
        time.sleep(0.05)
    assert alive(workers) == [], f"workers {alive(workers)} outlived their killed parent"
    return workers


def assert_all_loadable(folder: Path) -> None:
    """Every file under ``folder`` (temp files of the killed run aside) opens with the reader for its kind."""
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if f.suffix == ".npz":
            with np.load(f, allow_pickle=False) as z:
                [z[k] for k in z.files]
        elif f.suffix == ".npy":
            np.load(f, allow_pickle=False)
        elif f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".csv":
            pd.read_csv(f)
        elif f.name.endswith(".nii.gz"):
            sitk.ReadImage(str(f))
        elif f.suffix == ".pth":
            load_checkpoint(f)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kill")
    write_tiny_dataset(root / "raw", n_cases=10, shape_zyx=(16, 64, 64))
    return root


def plan_args(root: Path, pre: Path, processes: int = 2):
    return ("plan_and_preprocess", "-d", "42", "-np", processes, "-pl", "LNMPlannerCPU", "--raw", root / "raw",
            "--preprocessed", pre)


def test_preprocessing_killed_after_the_first_cache_file_resumes(dataset):
    pre = dataset / "pre_killed"
    crops = pre / DS / "LNMPlans_crops"
    proc = start(*plan_args(dataset, pre))
    kill_when(proc, lambda: len(list(crops.glob("*.npz"))) >= 1, n_workers=2)
    assert_all_loadable(pre)
    done_before = {f.name: f.stat().st_mtime_ns for f in crops.glob("*.npz")}
    assert 1 <= len(done_before) < 10
    finish(start(*plan_args(dataset, pre)))
    assert {f.name: f.stat().st_mtime_ns for f in crops.glob("*.npz") if f.name in done_before} == done_before
    assert not list(crops.glob(".*"))                                  # temp files of the killed run removed
    finish(start(*plan_args(dataset, dataset / "pre", processes=1)))  # the uninterrupted reference
    reference = dataset / "pre" / DS / "LNMPlans_crops"
    assert sorted(f.name for f in crops.glob("*.npz")) == sorted(f.name for f in reference.glob("*.npz"))
    for f in reference.glob("*.npz"):
        with np.load(f) as want, np.load(crops / f.name) as got:
            for k in want.files:
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"{f.name}:{k}")
    pd.testing.assert_frame_equal(pd.read_csv(crops / "nodes_index.csv"), pd.read_csv(reference / "nodes_index.csv"))


def train_args(dataset: Path, results: Path, *extra):
    return ("train", "42", "3d_resenc", "0", "-tr", "LNMTrainer_2epochs", "-device", "cpu", "--preprocessed",
            dataset / "pre", "--results", results, *extra)


@pytest.fixture(scope="module")
def trained(dataset) -> Path:
    """The uninterrupted training run (default worker processes): the reference for the killed one."""
    if not (dataset / "pre" / DS / "LNMPlans.json").is_file():
        finish(start(*plan_args(dataset, dataset / "pre", processes=1)))
    finish(start(*train_args(dataset, dataset / "results")))
    return dataset / "results" / DS / "LNMTrainer_2epochs__LNMPlans__3d_resenc"


def test_training_killed_mid_epoch_continues_to_the_same_weights(dataset, trained):
    results = dataset / "results_killed"
    fold = results / DS / "LNMTrainer_2epochs__LNMPlans__3d_resenc" / "fold_0"
    proc = start(*train_args(dataset, results))
    # after the first epoch's checkpoint, inside the second epoch (its augmenter worker running)
    kill_when(proc, lambda: (fold / "checkpoint_latest.pth").is_file(), n_workers=1, settle=0.5)
    assert not (fold / "checkpoint_final.pth").exists()
    assert_all_loadable(fold)
    assert load_checkpoint(fold / "checkpoint_latest.pth")["current_epoch"] == 1
    out = finish(start(*train_args(dataset, results, "--c")))
    assert "continuing from checkpoint_latest.pth at epoch 1" in out
    want = load_checkpoint(trained / "fold_0" / "checkpoint_final.pth")["network_weights"]
    got = load_checkpoint(fold / "checkpoint_final.pth")["network_weights"]
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)


def test_prediction_killed_after_the_first_case_skips_it(dataset, trained, tmp_path):
    inp = dataset / "raw" / DS / "imagesTr"
    out = tmp_path / "out"
    args = ("predict", "-i", inp, "-o", out, "-m", trained, "-f", "0", "-device", "cpu", "-npp", 2)
    proc = start(*args)
    kill_when(proc, lambda: len(list((out / "cases").glob("*.csv"))) >= 1, n_workers=2)
    assert_all_loadable(out)
    done = sorted(f.stem for f in (out / "cases").glob("*.csv"))
    assert not (out / "nodes.csv").exists() and json.loads((out / "predict_info.json").read_text())["status"] == "running"
    rerun = finish(start(*args))
    assert f"{len(done)} case(s) already predicted" in rerun
    assert json.loads((out / "predict_info.json").read_text())["skipped_already_done"] == done
    assert not [f for f in out.rglob(".*") if f.is_file()]
    finish(start("predict", "-i", inp, "-o", tmp_path / "ref", "-m", trained, "-f", "0", "-device", "cpu"))
    got = pd.read_csv(out / "nodes.csv", dtype={"station": str})
    want = pd.read_csv(tmp_path / "ref" / "nodes.csv", dtype={"station": str})
    pd.testing.assert_frame_equal(got, want)
