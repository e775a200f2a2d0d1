"""The README's main job, shrunk: phantom -> plan -> train -> predict -> evaluate, through real CLI calls."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import SimpleITK as sitk

pytestmark = pytest.mark.slow   # trains models or runs the pipeline: deselect with -m "not slow"


def run(*args, env):
    proc = subprocess.run([sys.executable, "-m", "lnm_auto", *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_cli_pipeline_on_phantom(tmp_path):
    env = {**os.environ, "LNM_raw": str(tmp_path / "raw"), "LNM_preprocessed": str(tmp_path / "pre"),
           "LNM_results": str(tmp_path / "res"), "LNM_NO_PROGRESS": "1", "LNM_n_proc_DA": "0"}
    run("make_phantom", "-d", "7", "--cases", "8", "--test-cases", "4", "--labeled-fraction", "0.5", "--seed", "3",
        env=env)
    ds = tmp_path / "raw" / "Dataset007_Phantom"
    nodes = pd.read_csv(ds / "nodes.csv", dtype={"case": str}, keep_default_na=False)
    assert nodes.case.nunique() == 8 and (nodes.label == "").any() and (nodes.label != "").any()
    out = run("plan_and_preprocess", "-d", "7", "-np", "1", "--quiet", env=env)
    assert "Dataset007_Phantom" in out.stdout
    run("train", "7", "3d_resenc", "0", "--epochs", "1", env=env)
    preds = tmp_path / "preds"
    run("predict", "-i", str(ds / "imagesTs"), "-o", str(preds), "-f", "0", "--quiet", env=env)   # the only model
    pred = pd.read_csv(preds / "nodes.csv", dtype={"case": str})
    ref = pd.read_csv(ds / "nodesTs.csv", dtype={"case": str})
    assert set(zip(pred.case, pred.node)) == set(zip(ref.case, ref.node))
    assert pred.probability.between(0, 1).all() and (pred.station != "").all()
    img = sitk.ReadImage(str(next((ds / "imagesTs").glob("*_0000.nii.gz"))))
    case = next((ds / "imagesTs").glob("*_0000.nii.gz")).name.removesuffix("_0000.nii.gz")
    pm = sitk.ReadImage(str(preds / f"{case}_probmap.nii.gz"))
    assert pm.GetSize() == img.GetSize() and pm.GetDirection() == img.GetDirection()
    report = tmp_path / "report"
    out = run("evaluate", "-ref", str(ds / "nodesTs.csv"), "-pred", str(preds / "nodes.csv"), "-o", str(report),
              "--ref_patients", str(ds / "patientsTs.csv"), "--n_bootstrap", "50", env=env)
    assert "AUROC" in out.stdout
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["levels"]["node"]["n"] == len(ref[ref.label.notna()])
    for f in ("roc.png", "calibration.png"):
        assert (report / f).stat().st_size > 1000
