"""Dataset resolution, location variables and the CLI's one-line errors (entry functions in-process; the
console script itself as a real subprocess)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.paths import base_folder, resolve_dataset_name
from conftest import run_cli


@pytest.mark.parametrize("spec", ["042", "42", 42, "Dataset042_Tiny"])
def test_dataset_resolution(tiny_dataset, spec):
    assert resolve_dataset_name(spec, tiny_dataset.parent) == "Dataset042_Tiny"


def test_dataset_resolution_errors(tiny_dataset):
    with pytest.raises(LNMError, match="no dataset with id 007"):
        resolve_dataset_name("7", tiny_dataset.parent)
    with pytest.raises(LNMError, match="neither a number"):
        resolve_dataset_name("Tiny", tiny_dataset.parent)
    shutil.copytree(tiny_dataset / "nodesTr", tiny_dataset.parent / "Dataset042_Other" / "nodesTr")
    with pytest.raises(LNMError, match="ambiguous"):
        resolve_dataset_name("42", tiny_dataset.parent)
    assert resolve_dataset_name("Dataset042_Tiny", tiny_dataset.parent) == "Dataset042_Tiny"


def test_base_folder_env_and_flag(monkeypatch, tmp_path):
    monkeypatch.delenv("LNM_raw", raising=False)
    with pytest.raises(LNMError, match=r"\$LNM_raw is not set"):
        base_folder("raw")
    assert base_folder("raw", tmp_path) == tmp_path
    monkeypatch.setenv("LNM_raw", str(tmp_path / "x"))
    assert base_folder("raw") == tmp_path / "x"


def test_cli_unset_location_is_one_line():
    env = {k: None for k in os.environ if k.startswith("LNM_")}
    proc = run_cli("plan_and_preprocess", "-d", "1", env={**env, "LNM_NO_PROGRESS": None, "LNM_n_proc_DA": None})
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("lnm_plan_and_preprocess: error: $LNM_raw is not set: "
                                   "export LNM_raw=/path/to/folder or pass --raw FOLDER")


def test_cli_unknown_dataset(tiny_dataset, tmp_path):
    proc = run_cli("plan_and_preprocess", "-d", "5", "--raw", str(tiny_dataset.parent),
                   "--preprocessed", str(tmp_path / "pre"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "no dataset with id 005" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_console_script_plans_and_preprocesses_via_env(tiny_dataset, tmp_path):
    exe = shutil.which("lnm_plan_and_preprocess")
    cmd = [exe] if exe else [sys.executable, "-m", "lnm_auto", "plan_and_preprocess"]
    proc = subprocess.run(cmd + ["-d", "Dataset042_Tiny", "-np", "1", "--quiet"], capture_output=True, text=True,
                          env={**os.environ, "LNM_raw": str(tiny_dataset.parent), "LNM_preprocessed": str(tmp_path / "pre")})
    assert proc.returncode == 0, proc.stderr
    assert "target spacing 4 x 0.8 x 0.8 mm" in proc.stdout
    assert len(list((tmp_path / "pre" / "Dataset042_Tiny" / "LNMPlans_crops").glob("*.npz"))) == 6


def test_python_m_lists_commands():
    proc = run_cli()
    assert proc.returncode == 2 and "plan_and_preprocess" in proc.stderr
