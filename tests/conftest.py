"""Shared fixtures: a tiny but real raw dataset written with SimpleITK (no mocks)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from lnm_auto.utils.threads import configure_threads

configure_threads()   # before torch loads: passive OpenMP waiting, threads = the cores this run may use

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import SimpleITK as sitk  # noqa: E402

TINY_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)   # LPS flip: non-identity on purpose
TINY_ORIGIN = (40.5, 30.25, -120.0)
TINY_SPACING_XYZ = (0.8, 0.8, 4.0)


def run_cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m lnm_auto ARGS`` through its entry function, in this process (quiet, augmentation
    in-process, ``env`` applied for the call): the exit code and what it printed, as a subprocess would
    report them. Real subprocesses are kept for the end-to-end and console-script tests."""
    from lnm_auto.cli import main
    env = {"LNM_NO_PROGRESS": "1", "LNM_n_proc_DA": "0", **(env or {})}
    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: str(v) for k, v in env.items() if v is not None})
    for k in [k for k, v in env.items() if v is None]:
        os.environ.pop(k, None)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return subprocess.CompletedProcess(["lnm_auto", *args], code, out.getvalue(), err.getvalue())


def run_train_cli(*args, preprocessed: Path, results: Path) -> subprocess.CompletedProcess:
    """``lnm_train ARGS`` in this process (see :func:`run_cli`)."""
    return run_cli("train", *args, "--preprocessed", preprocessed, "--results", results)


def write_image(arr_zyx: np.ndarray, path: Path, spacing_xyz=TINY_SPACING_XYZ, origin=TINY_ORIGIN,
                direction=TINY_DIRECTION) -> None:
    img = sitk.GetImageFromArray(arr_zyx)
    img.SetSpacing(spacing_xyz)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def write_tiny_dataset(raw_root: Path, dataset_id: int = 42, name: str = "Tiny", n_cases: int = 6,
                       shape_zyx=(10, 48, 48), seed: int = 0, channel_names=None,
                       file_ending: str = ".nii.gz", hide_node_labels: int = 0) -> Path:
    """n_cases cases with 2-3 spherical nodes each; node 1 positive in odd cases. The last
    ``hide_node_labels`` cases keep only station and patient labels."""
    channel_names = channel_names or {"0": "CT"}
    rng = np.random.default_rng(seed)
    root = raw_root / f"Dataset{dataset_id:03d}_{name}"
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape_zyx], indexing="ij")
    node_rows, station_rows, patient_rows = [], [], []
    centres = [(4, 14, 14), (5, 32, 30), (6, 20, 36)]
    for i in range(n_cases):
        case = f"case_{i:03d}"
        image = rng.normal(40, 15, shape_zyx).astype(np.float32)
        image[:, :, :4] = -1000
        mask = np.zeros(shape_zyx, np.uint8)
        n_nodes = 2 + (i % 2)
        for k in range(1, n_nodes + 1):
            cz, cy, cx = centres[k - 1]
            r_mm = 3.0 + k + (2.0 if (k == 1 and i % 2) else 0.0)
            d2 = ((zz - cz) * TINY_SPACING_XYZ[2]) ** 2 + ((yy - cy) * 0.8) ** 2 + ((xx - cx) * 0.8) ** 2
            mask[d2 <= r_mm ** 2] = k
            image[d2 <= r_mm ** 2] = 30 + 20 * k
            label = int(k == 1 and i % 2 == 1)
            shown = "" if i >= n_cases - hide_node_labels else label
            node_rows.append({"case": case, "node": k, "station": "7" if k == 1 else "4R", "label": shown})
        for ch in range(len(channel_names)):
            write_image(image + 100 * ch, root / "imagesTr" / f"{case}_{ch:04d}{file_ending}")
        write_image(mask, root / "nodesTr" / f"{case}{file_ending}")
        station_rows += [{"case": case, "station": "7", "label": int(i % 2 == 1)},
                         {"case": case, "station": "4R", "label": 0}]
        patient_rows.append({"case": case, "label": int(i % 2 == 1)})
    pd.DataFrame(node_rows).to_csv(root / "nodes.csv", index=False)
    pd.DataFrame(station_rows).to_csv(root / "stations.csv", index=False)
    pd.DataFrame(patient_rows).to_csv(root / "patients.csv", index=False)
    (root / "dataset.json").write_text(json.dumps({"name": name, "channel_names": channel_names,
                                                   "file_ending": file_ending, "numTraining": n_cases}))
    return root


@pytest.fixture(scope="session")
def pristine_tiny_dataset(tmp_path_factory) -> Path:
    """The default tiny dataset, written once per session; never changed (tests get copies: ``tiny_dataset``)."""
    return write_tiny_dataset(tmp_path_factory.mktemp("pristine") / "raw")


@pytest.fixture
def tiny_dataset(pristine_tiny_dataset, tmp_path) -> Path:
    """A fresh copy of the default tiny dataset under tmp_path/raw, free to change (copying costs a few
    milliseconds, writing it a tenth of a second)."""
    return Path(shutil.copytree(pristine_tiny_dataset, tmp_path / "raw" / pristine_tiny_dataset.name,
                                copy_function=shutil.copy))


@pytest.fixture(scope="session")
def planned_tiny(tmp_path_factory):
    """``planned_tiny(n_cases, hide_node_labels)``: a folder with ``raw/`` (:func:`write_tiny_dataset`, id 42) and
    ``pre/`` (planned and preprocessed with LNMPlannerCPU), made once per session for each setting. Shared:
    tests only read it (training's crop unpacking aside); to change anything, ``shutil.copytree`` it first."""
    from lnm_auto.planning.plan_and_preprocess import plan_and_preprocess
    made: dict[tuple[int, int], Path] = {}

    def planned(n_cases: int = 8, hide_node_labels: int = 0) -> Path:
        key = (int(n_cases), int(hide_node_labels))
        if key not in made:
            root = tmp_path_factory.mktemp(f"planned_tiny_{key[0]}_{key[1]}")
            write_tiny_dataset(root / "raw", n_cases=key[0], hide_node_labels=key[1])
            plan_and_preprocess(42, root / "raw", root / "pre", planner="LNMPlannerCPU", progress=False)
            made[key] = root
        return made[key]
    return planned


def refused(proc, *fragments) -> str:
    """The run failed with a one-line reason holding every fragment (no traceback); returns that line."""
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text
    assert "Traceback" not in text, text
    lines = [line for line in proc.stderr.splitlines() if all(f in line for f in fragments)]
    assert lines, f"no line with {fragments} in:\n{proc.stderr}"
    return lines[0]


def train_one_epoch_model(planned: Path, results: Path) -> Path:
    """The model folder of fold 0 of 3d_resenc trained for one epoch on a planned tiny dataset (enough to predict
    with and to continue from)."""
    from lnm_auto.training.run import run_training, setup_trainer
    trainer = setup_trainer(42, "3d_resenc", "0", planned / "pre", results, "LNMTrainer_1epochs", num_workers=0)
    run_training(trainer)
    return trainer.output_folder.parent


def old_plans_identifier(data: dict) -> str:
    """Plans.identifier() as lnm_auto computed it before fields were added to the plans (what the checkpoints of
    older model folders recorded): the JSON of the plans, without an empty head_shape_features."""
    import hashlib
    data = json.loads(json.dumps(data))
    for config in data["configurations"].values():
        if not config.get("head_shape_features"):
            config.pop("head_shape_features", None)
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@pytest.fixture(scope="session")
def trained_model_and_detector(planned_tiny, tmp_path_factory):
    """(root, the lnm model folder, the detector's model folder): a one-epoch 3d_resenc model and a one-epoch
    2d_cpu nnU-Net detector (5 iterations, CPU) of the planned tiny dataset, both in root/results (the detector where
    lnm_train_detector puts it, so -d finds it)."""
    root = tmp_path_factory.mktemp("detect_predict")
    for part in ("raw", "pre"):     # a private copy: the detector's export writes below pre/
        shutil.copytree(planned_tiny(8) / part, root / part)
    model = train_one_epoch_model(root, root / "results")
    env = {**os.environ, "LNM_NUM_THREADS": "1", "LNM_NO_PROGRESS": "1", "MPLBACKEND": "Agg"}
    # 500 iterations (about 100 s): measured on this dataset, 5-60 iterations mark everything or nothing by chance,
    # 100-150 mark most node voxels in 6 of 7 runs (one CI run found nothing); 500 converged in 4 of 4 runs (marked
    # voxels within 35 % of the true count in every case)
    proc = subprocess.run([sys.executable, "-m", "lnm_auto", "train_detector", "42", "0",
                           "-tr", "nnUNetTrainer_1epoch", "--iterations_per_epoch", "500", "-device", "cpu",
                           "--raw", str(root / "raw"), "--preprocessed", str(root / "pre"),
                           "--results", str(root / "results")],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    detector = (root / "results" / "Dataset042_Tiny" / "detector" / "nnUNet_results" / "Dataset042_TinyLN"
                / "nnUNetTrainer_1epoch__nnUNetPlans__2d_cpu")
    return root, model, detector
