"""Every label level is optional: a dataset with node labels only (what lnm_convert makes: no stations), patient
labels only, or station labels only goes the whole way - plan, train radiomics and 2d25 on five folds with the
scheme the plans recommend, choose by cross-validation, predict the test cases with the choice, evaluate - and
every output holds the levels the data has, says plainly which it lacks, and never shows a NaN row."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_cli, write_tiny_dataset

pytestmark = pytest.mark.slow   # trains ten folds and runs every command

N_TRAIN, N_TEST = 6, 2
LEVELS = ("node", "station", "patient")
CANDIDATES = 3          # radiomics, 2d25 and their ensemble; the size rule is a fourth row


def move_to_test_split(root: Path, cases: list[str]) -> None:
    """imagesTr/nodesTr -> imagesTs/nodesTs and the three label files -> *Ts.csv for ``cases``."""
    for sub_tr, sub_ts in (("imagesTr", "imagesTs"), ("nodesTr", "nodesTs")):
        (root / sub_ts).mkdir()
        for case in cases:
            for f in (root / sub_tr).glob(f"{case}*"):
                shutil.move(f, root / sub_ts / f.name)
    for name in ("nodes", "stations", "patients"):
        table = pd.read_csv(root / f"{name}.csv", dtype=str, keep_default_na=False)
        table[table["case"].isin(cases)].to_csv(root / f"{name}Ts.csv", index=False)
        table[~table["case"].isin(cases)].to_csv(root / f"{name}.csv", index=False)
    info = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**info, "numTraining": N_TRAIN}))


def keep_only(root: Path, level: str) -> None:
    """Strip every label level but ``level``, training and test alike. Node labels only is what lnm_convert
    nnunet/dicom writes: no stations at all (the station column left empty)."""
    for split in ("", "Ts"):
        nodes = pd.read_csv(root / f"nodes{split}.csv", dtype=str, keep_default_na=False)
        if level == "node":
            nodes["station"] = ""
        else:
            nodes["label"] = ""
        nodes.to_csv(root / f"nodes{split}.csv", index=False)
        for other in ("station", "patient"):
            if other != level:
                (root / f"{other}s{split}.csv").unlink()


def dataset_with_only(raw: Path, level: str) -> Path:
    root = write_tiny_dataset(raw, n_cases=N_TRAIN + N_TEST)
    move_to_test_split(root, [f"case_{i:03d}" for i in range(N_TRAIN, N_TRAIN + N_TEST)])
    keep_only(root, level)
    return root


def ok(*args) -> str:
    proc = run_cli(*args)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    return proc.stdout + proc.stderr


def table_columns(table_md: str) -> list[str]:
    header = table_md.splitlines()[0]
    return [c.strip().removesuffix(" AUROC") for c in header.strip("|").split("|") if "ECE" not in c][1:]


@pytest.mark.parametrize("level", ["node", "patient", "station"])
def test_whole_path_with_one_label_level(tmp_path, level):
    ds = dataset_with_only(tmp_path / "raw", level)
    locations = ["--raw", tmp_path / "raw", "--preprocessed", tmp_path / "pre", "--results", tmp_path / "res"]
    ok("plan_and_preprocess", "-d", "42", *locations[:4], "-np", "1", "--quiet")
    plans = json.loads((tmp_path / "pre" / "Dataset042_Tiny" / "LNMPlans.json").read_text())
    expected_scheme = ["LNMTrainer"] if level == "node" else ["LNMTrainerWeak"]
    assert plans["recommended_trainers"] == expected_scheme
    for fold in range(5):     # the scheme the plans recommend, as a user runs it: no -tr
        ok("train", "42", "radiomics", fold, *locations)
        ok("train", "42", "2d25", fold, "--epochs", "1", *locations)

    out = ok("find_best_configuration", "-d", "42", "--n_bootstrap", "20", *locations[2:])
    results = tmp_path / "res" / "Dataset042_Tiny"
    table = (results / "crossval_table.md").read_text()
    assert table in out                                           # shown, then the choice written
    assert table_columns(table) == [level]                        # the one level the data has
    rows = [line for line in table.splitlines() if line.startswith("| ") and "candidate" not in line]
    assert len(rows) == CANDIDATES + 1 and sum("size rule (short axis)" in r for r in rows) == 1
    assert all("nan" not in r.lower() and " - " not in r for r in rows)   # every row scored on that level
    for other in set(LEVELS) - {level}:
        assert f"- {other} level: not in the data" in table       # said plainly, not a NaN column
    instructions = json.loads((results / "inference_instructions.json").read_text())
    assert instructions["selected_by"].startswith(f"{level}-level")
    assert set(instructions["cv"]) == {level} and set(instructions["levels_not_scored"]) == set(LEVELS) - {level}
    assert instructions["incomplete_models"] == [] and instructions["folds"] == ["0", "1", "2", "3", "4"]

    preds = tmp_path / "preds"
    out = ok("predict", "-i", ds / "imagesTs", "-o", preds, "-d", "42", "--quiet", "-npp", "0", "--results",
             tmp_path / "res")
    assert "predicting with the choice of lnm_find_best_configuration" in out
    predicted = pd.read_csv(preds / "nodes.csv", dtype={"case": str})
    reference = pd.read_csv(ds / "nodesTs.csv", dtype={"case": str}, keep_default_na=False)
    assert sorted(zip(predicted.case, predicted.node)) == sorted(zip(reference.case, reference.node))
    assert predicted.probability.between(0, 1).all()

    report = tmp_path / "report"
    labels = {"node": [], "patient": ["--ref_patients", ds / "patientsTs.csv"],
              "station": ["--ref_stations", ds / "stationsTs.csv"]}[level]
    out = ok("evaluate", "-ref", ds / "nodesTs.csv", "-pred", preds / "nodes.csv", "-o", report, *labels,
             "--n_bootstrap", "20")
    metrics = json.loads((report / "metrics.json").read_text())["levels"]
    # node labels give the patients' labels too (any node positive); station or patient labels give only their own
    has = {"node": {"node", "patient"}, "patient": {"patient"}, "station": {"station"}}[level]
    assert {lv for lv, m in metrics.items() if "auroc" in m} == has
    for lv in has:
        assert metrics[lv]["auroc"]["value"] is not None and metrics[lv]["n_pos"] > 0 and metrics[lv]["n_neg"] > 0
    for lv in set(LEVELS) - has:
        assert metrics[lv]["absent"] is True and metrics[lv]["skipped"].startswith("not in the data")
        assert f"{lv}: skipped (not in the data" in out
    assert table_columns_of_console(out) == [lv for lv in LEVELS if lv in has]
    assert metrics["patient"].get("n", 0) in (0, N_TEST)
    assert (report / "roc.png").stat().st_size > 1000


def table_columns_of_console(out: str) -> list[str]:
    header = next(line for line in out.splitlines() if line.startswith("metric "))
    return header.split()[1:]
