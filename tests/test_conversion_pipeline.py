"""Bring your own data, end to end: a hand-built nnU-Net raw dataset (binary LN labels, several components per
case) and hand-built DICOM CT + SEG / RTSTRUCT cases are converted, planned, trained for an epoch and predicted;
every component is one node all the way through."""
from __future__ import annotations

import pandas as pd
import pytest

from conftest import run_cli
from dicom_builders import NODES, write_dicom_case, write_nnunet_dataset

pytestmark = pytest.mark.slow   # plans, trains and predicts


def locations(tmp_path):
    return ["--raw", tmp_path / "raw"], ["--preprocessed", tmp_path / "pre", "--results", tmp_path / "res"]


def plan_train_predict(tmp_path, dataset_id: int, inputs, expected: dict[str, int]) -> pd.DataFrame:
    raw, train_locations = locations(tmp_path)
    ok = run_cli("plan_and_preprocess", "-d", dataset_id, *raw, "--preprocessed", tmp_path / "pre", "-np", "1",
                 "--quiet")
    assert ok.returncode == 0, ok.stderr
    trained = run_cli("train", dataset_id, "3d_resenc", "0", "-tr", "LNMTrainer_1epochs", *train_locations)
    assert trained.returncode == 0, trained.stderr
    predicted = run_cli("predict", "-i", inputs, "-o", tmp_path / "pred", "-d", dataset_id, "-c", "3d_resenc",
                        "-tr", "LNMTrainer_1epochs", "-f", "0", "--results", tmp_path / "res", "--quiet")
    assert predicted.returncode == 0, predicted.stderr
    nodes = pd.read_csv(tmp_path / "pred" / "nodes.csv", dtype={"case": str})
    assert nodes.groupby("case").size().to_dict() == expected          # one row per component
    assert nodes["probability"].between(0, 1).all()
    return nodes


def test_nnunet_dataset_converted_planned_trained_and_predicted(tmp_path):
    source = tmp_path / "nnUNet_raw" / "Dataset017_LNQ"
    counts = write_nnunet_dataset(source, n_cases=8, n_test=2)
    train = {c: n for c, n in counts.items() if c not in ("LNQ_008", "LNQ_009")}
    pd.DataFrame([{"case": c, "node": k, "label": int(k == 1 and i % 2)} for i, (c, n) in enumerate(train.items())
                  for k in range(1, n + 1)]).to_csv(tmp_path / "labels.csv", index=False)
    raw, _ = locations(tmp_path)
    done = run_cli("convert", "nnunet", "-i", source, "-d", "21", *raw, "--labels_csv", tmp_path / "labels.csv")
    assert done.returncode == 0, done.stderr
    dataset = tmp_path / "raw" / "Dataset021_LNQ"
    plan_train_predict(tmp_path, 21, dataset / "imagesTs", {c: counts[c] for c in ("LNQ_008", "LNQ_009")})


@pytest.mark.parametrize("kind", ["seg", "rtstruct"])
def test_dicom_cases_converted_planned_trained_and_predicted(tmp_path, kind):
    folder = tmp_path / "dicom"
    for i in range(6):
        write_dicom_case(folder / f"p{i}", kind, seed=i, patient_id=f"P{i}")
    raw, _ = locations(tmp_path)
    done = run_cli("convert", "dicom", "-i", folder, "-d", "31", *raw)
    assert done.returncode == 0, done.stderr
    dataset = next((tmp_path / "raw").glob("Dataset031_*"))
    nodes_csv = dataset / "nodes.csv"
    table = pd.read_csv(nodes_csv, dtype={"case": str}, keep_default_na=False)
    assert table.groupby("case").size().to_dict() == {f"P{i}": len(NODES) for i in range(6)}
    # the converter leaves labels empty (it cannot know them): a user fills them in
    table["label"] = [int(r.node == 1 and int(r.case[1:]) % 2) for r in table.itertuples()]
    table.to_csv(nodes_csv, index=False)
    plan_train_predict(tmp_path, 31, dataset / "imagesTr", {f"P{i}": len(NODES) for i in range(6)})
