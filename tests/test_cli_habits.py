"""The command-line habits nnU-Net users expect: device default, --val/--val_best/--npz, progress output that
suits log files, per-run logs, checkpoint_latest removed at the end, help text with defaults, quiet third-party
warnings, one metrics.json layout, and errors that name the nearest valid choice."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from lnm_auto import cli
from lnm_auto.cli.convert_commands import convert_parser
from lnm_auto.evaluation.report import evaluate
from lnm_auto.training import run as training_run
from lnm_auto.training.progress import ItemProgress, TrainingLog, training_logs
from conftest import run_cli, run_train_cli, write_tiny_dataset

FOLD_MODEL = ("Dataset042_Tiny", "LNMTrainer_1epochs__LNMPlans__3d_resenc")


# ---- device ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cuda,mps,expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_device_prefers_cuda_then_mps(monkeypatch, cuda, mps, expected):
    # no GPU on the test machines: the availability answers are the only thing replaced
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert training_run.resolve_device("auto") == expected
    assert training_run.resolve_device(None) == expected


def test_device_defaults_to_auto_and_bad_names_are_one_line():
    for parser in (cli.train_parser(), cli.predict_parser(), cli.pretrain_parser()):
        assert parser.get_default("device") == "auto", parser.prog
        # -num_gpus belongs to training only (the scale-out of issue 10), as in nnU-Net
        assert any(a.dest == "num_gpus" for a in parser._actions) == (parser.prog == "lnm_train"), parser.prog
    with pytest.raises(cli.LNMError, match="did you mean cuda"):
        training_run.resolve_device("cdua")


# ---- help text ---------------------------------------------------------------------------------------
def all_parsers() -> list[argparse.ArgumentParser]:
    """Every parser of every command, subcommands included."""
    roots = [getattr(cli, name)() for name in dir(cli) if name.endswith("_parser") and callable(getattr(cli, name))]
    roots.append(convert_parser())
    parsers = []
    while roots:
        p = roots.pop()
        parsers.append(p)
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                roots.extend(action.choices.values())
    return parsers


def test_every_argument_has_help_stating_its_default():
    parsers = all_parsers()
    assert {p.prog for p in parsers} >= {"lnm_train", "lnm_predict", "lnm_pretrain", "lnm_plan_and_preprocess",
                                         "lnm_evaluate", "lnm_export_model", "lnm_demo", "lnm_make_phantom",
                                         "lnm_convert nnunet", "lnm_convert dicom"}
    missing = []
    for parser in parsers:
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
            text = formatter._expand_help(action) if action.help else ""
            if not text.strip():
                missing.append(f"{name}: no help")
            elif isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                if "default" not in text:
                    missing.append(f"{name}: flag without its default")
            elif action.default is not None and action.default is not argparse.SUPPRESS:
                shown = {str(action.default)} | ({f"{action.default:g}"} if isinstance(action.default, float) else set())
                if not any(s in text for s in shown):
                    missing.append(f"{name}: default {action.default!r} not in help '{text}'")
    assert not missing, "\n".join(missing)


# ---- progress output -----------------------------------------------------------------------------------
def test_disable_progress_bar_sets_the_switch_for_the_command_only(monkeypatch):
    monkeypatch.delenv("LNM_NO_PROGRESS", raising=False)
    seen = {}
    parsers = {"train": (cli.train_parser(), ["42", "2d25", "0"]), "predict": (cli.predict_parser(), ["-i", "a", "-o", "b"]),
               "plan": (cli.plan_and_preprocess_parser(), ["-d", "1"]), "pretrain": (cli.pretrain_parser(), ["1", "2d25"])}
    for name, (parser, argv) in parsers.items():
        code = cli._run(name, lambda args, n=name: seen.__setitem__(n, os.environ.get("LNM_NO_PROGRESS")), parser,
                        argv + ["--disable_progress_bar"])
        assert code == 0
    assert seen == {name: "1" for name in parsers}
    assert "LNM_NO_PROGRESS" not in os.environ          # restored after the command


def test_item_progress_prints_whole_lines_without_a_terminal(capsys):
    progress = ItemProgress(2, "predict", unit="case")   # pytest's stdout is not a terminal
    progress.step("case_a: 3 nodes")
    progress.step("case_b: 1 node")
    progress.close()
    out = capsys.readouterr()
    assert out.out.splitlines() == ["predict 1/2: case_a: 3 nodes", "predict 2/2: case_b: 1 node"]
    assert "\r" not in out.out + out.err
    quiet = ItemProgress(1, "predict", quiet=True)
    quiet.step("x")
    assert capsys.readouterr().out == ""


def test_progress_figure_has_one_quantity_per_axis_and_legends_outside(tmp_path):
    log = TrainingLog(tmp_path / "log.txt")
    log.append(train_loss=2.0, val_loss=0.7, val_auroc=0.6, ema_auroc=0.6, lr=1e-2, epoch_time_s=12.0,
               data_wait_fraction=0.25)
    fig = log.figure()
    fig.canvas.draw()
    axes = fig.axes
    assert [ax.get_ylabel() for ax in axes] == ["loss", "AUROC", "epoch time (s)", "waiting for data (%)",
                                               "learning rate"]
    renderer = fig.canvas.get_renderer()
    for ax in axes:
        assert ax.get_legend().get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1   # beside it
        assert all(line.get_marker() == "o" for line in ax.get_lines())                             # 1 epoch shows
    assert axes[3].get_lines()[0].get_ydata()[0] == pytest.approx(25.0)
    log.plot(tmp_path / "progress.png")
    assert (tmp_path / "progress.png").read_bytes()[:4] == b"\x89PNG"
    # during training it is redrawn at most every PLOT_INTERVAL_S; the last epoch forces it
    (tmp_path / "progress.png").unlink()
    log.plot(tmp_path / "progress.png", force=False)
    assert not (tmp_path / "progress.png").exists()
    log.plot(tmp_path / "progress.png", force=True)
    assert (tmp_path / "progress.png").is_file()


# ---- warnings and tracebacks ----------------------------------------------------------------------------
def test_third_party_warnings_hidden_our_own_shown():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.hide_third_party_warnings()
        for module in ("torch.jit._script", "pandas.core.frame", "sklearn.metrics", "batchgenerators.x"):
            warnings.warn_explicit("deprecated", FutureWarning, f"{module}.py", 1, module=module)
        warnings.warn_explicit("ours", UserWarning, "trainer.py", 1, module="lnm_auto.training.trainer")
    assert [str(w.message) for w in caught] == ["ours"]


def bad_dataset_command(argv):
    parser = cli.train_parser()
    return cli._run("lnm_train", lambda args: training_run.resolve_device("quantum"), parser, argv)


def test_input_errors_are_one_line_unless_debugging(monkeypatch, capsys):
    monkeypatch.delenv("LNM_DEBUG", raising=False)
    assert bad_dataset_command(["1", "2d25", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lnm_train: error: unknown device 'quantum'") and "Traceback" not in err
    monkeypatch.setenv("LNM_DEBUG", "1")
    assert bad_dataset_command(["1", "2d25", "0"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "unknown device 'quantum'" in err


def test_our_bugs_keep_their_traceback():
    def buggy(args):
        raise ZeroDivisionError("a bug, not bad input")
    with pytest.raises(ZeroDivisionError):
        cli._run("lnm_train", buggy, cli.train_parser(), ["1", "2d25", "0"])


# ---- a trained fold: per-run logs, checkpoints, --c, --val, --val_best, --npz, metrics.json ---------------
@pytest.fixture(scope="module")
def planned(planned_tiny, tmp_path_factory):
    """The session's planned 8-case tiny dataset, copied here (raw/, pre/) so that runs can add res/ beside it."""
    root = tmp_path_factory.mktemp("habits")
    for part in ("raw", "pre"):
        shutil.copytree(planned_tiny(8) / part, root / part)
    return root


@pytest.fixture(scope="module")
def trained(planned):
    root = planned
    proc = run_train_cli("42", "3d_resenc", "0", "-tr", "LNMTrainer_1epochs", preprocessed=root / "pre",
                         results=root / "res")
    assert proc.returncode == 0, proc.stderr
    return root, proc


def fold_folder(root):
    return root / "res" / FOLD_MODEL[0] / FOLD_MODEL[1] / "fold_0"


@pytest.mark.slow
def test_training_says_its_device_and_keeps_final_not_latest(trained):
    root, proc = trained
    expected = training_run.default_device()
    assert f"device: {expected} (picked automatically" in proc.stdout
    out = fold_folder(root)
    assert (out / "checkpoint_final.pth").is_file() and not (out / "checkpoint_latest.pth").exists()
    logs = training_logs(out)
    assert len(logs) == 1 and re.fullmatch(r"training_log_\d{4}-\d\d-\d\d_\d\d_\d\d_\d\d\.txt", logs[0].name)
    assert "\r" not in logs[0].read_text() and "epoch 1/1:" in logs[0].read_text()


@pytest.mark.slow   # needs the trained fold (a network trained for seconds)
def test_continue_on_a_finished_fold_uses_final_in_a_new_log(trained):
    root, _ = trained
    time.sleep(1.1)                           # log names have one-second resolution
    proc = run_train_cli("42", "3d_resenc", "0", "-tr", "LNMTrainer_1epochs", "--c", preprocessed=root / "pre",
                         results=root / "res")
    assert proc.returncode == 0, proc.stderr
    assert "continuing from checkpoint_final.pth at epoch 1" in proc.stdout and "already finished" in proc.stdout
    logs = training_logs(fold_folder(root))
    assert len(logs) >= 2 and "already finished" in logs[-1].read_text()
    assert "already finished" not in logs[0].read_text()


@pytest.mark.slow
def test_val_reruns_validation_and_npz_holds_every_validation_node(trained):
    root, _ = trained
    out = fold_folder(root)
    shutil.rmtree(out / "validation")
    proc = run_train_cli("42", "3d_resenc", "0", "-tr", "LNMTrainer_1epochs", "--val", "--npz",
                         preprocessed=root / "pre", results=root / "res")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "validation" / "metrics.json").read_text())
    assert metrics["schema"] == 1 and metrics["kind"] == "validation"
    assert metrics["source"]["checkpoint"] == "checkpoint_final.pth" and metrics["source"]["fold"] == "0"
    nodes = pd.read_csv(out / "validation" / "nodes.csv", dtype={"case": str})
    node_level = metrics["levels"]["node"]
    assert node_level["n"] == len(nodes) and node_level["n_pos"] == int(nodes.label.sum())
    assert node_level["auroc"]["value"] == pytest.approx(roc_auc_score(nodes.label, nodes.probability))
    lo, hi = node_level["auroc"]["ci95"]
    assert lo <= node_level["auroc"]["value"] <= hi          # validation gets patient-bootstrap CIs too
    with np.load(out / "validation" / "probabilities.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["case", "node", "probability"]
        table = pd.DataFrame({"case": npz["case"], "node": npz["node"], "probability": npz["probability"]})
    index = pd.read_csv(root / "pre" / FOLD_MODEL[0] / "LNMPlans_crops" / "nodes_index.csv", dtype={"case": str})
    val_cases = set(nodes.case)
    assert len(table) == int(index.case.isin(val_cases).sum())      # every validation node, labelled or not
    joined = nodes.merge(table, on=["case", "node"], suffixes=("", "_npz"))
    assert len(joined) == len(nodes)
    np.testing.assert_allclose(joined.probability_npz, joined.probability, rtol=1e-6)


@pytest.mark.slow
def test_val_best_names_its_checkpoint(trained):
    root, _ = trained
    out = fold_folder(root)
    assert (out / "checkpoint_best.pth").is_file()        # fold 0's validation cases hold both classes
    proc = run_train_cli("42", "3d_resenc", "0", "-tr", "LNMTrainer_1epochs", "--val", "--val_best",
                         preprocessed=root / "pre", results=root / "res")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "validation" / "metrics.json").read_text())
    assert metrics["source"]["checkpoint"] == "checkpoint_best.pth"
    assert "with checkpoint_best.pth" in training_logs(out)[-1].read_text()


@pytest.mark.slow   # needs the trained fold (a network trained for seconds)
def test_prediction_to_a_log_prints_one_line_per_case(trained, tmp_path):
    root, _ = trained
    raw = root / "raw" / "Dataset042_Tiny"
    for case in ("case_000", "case_001"):
        (tmp_path / "in").mkdir(exist_ok=True)
        shutil.copy(raw / "imagesTr" / f"{case}_0000.nii.gz", tmp_path / "in" / f"{case}_0000.nii.gz")
        shutil.copy(raw / "nodesTr" / f"{case}.nii.gz", tmp_path / "in" / f"{case}_nodes.nii.gz")
    proc = run_cli("predict", "-i", tmp_path / "in", "-o", tmp_path / "out", "-d", "42", "-c", "3d_resenc", "-tr",
                   "LNMTrainer_1epochs", "-f", "0", "--disable_tta", "--no_probmaps", "--results", root / "res")
    assert proc.returncode == 0, proc.stderr
    case_lines = [line for line in proc.stdout.splitlines() if line.startswith("predict ")]
    assert [line.split(":")[0] for line in case_lines] == ["predict 1/2", "predict 2/2"]
    assert "case_000" in case_lines[0] + case_lines[1] and "case_001" in case_lines[0] + case_lines[1]
    assert "\r" not in proc.stdout + proc.stderr


def test_val_without_a_finished_fold_is_one_line(planned, tmp_path):
    root = planned
    proc = run_train_cli("42", "3d_resenc", "1", "-tr", "LNMTrainer_1epochs", "--val", preprocessed=root / "pre",
                         results=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "checkpoint_final.pth: missing; this fold has not finished training" in proc.stderr


@pytest.mark.slow   # needs the trained fold (a network trained for seconds)
def test_validation_and_evaluation_share_one_metrics_layout(trained, tmp_path):
    root, _ = trained
    validation = json.loads((fold_folder(root) / "validation" / "metrics.json").read_text())
    nodes = pd.read_csv(fold_folder(root) / "validation" / "nodes.csv", dtype={"case": str})
    nodes[["case", "node", "station", "label"]].to_csv(tmp_path / "ref.csv", index=False)
    nodes[["case", "node", "probability"]].to_csv(tmp_path / "pred.csv", index=False)
    report = evaluate(tmp_path / "ref.csv", tmp_path / "pred.csv", tmp_path / "report", n_bootstrap=100)
    assert set(report) == set(validation) and report["schema"] == validation["schema"]
    assert set(report["levels"]["node"]) == set(validation["levels"]["node"])
    assert set(report["settings"]) == set(validation["settings"])
    assert report["levels"]["node"]["auroc"]["value"] == pytest.approx(validation["levels"]["node"]["auroc"]["value"])


# ---- errors name the nearest valid choice ----------------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["Dataset042_Tny", "3d_resenc", "0"], "no dataset Dataset042_Tny in"),
    (["Dataset042_Tny", "3d_resenc", "0"], "did you mean Dataset042_Tiny?"),
    (["Tiny", "3d_resenc", "0"], "did you mean Dataset042_Tiny?"),
    (["42", "3d_resnc", "0"], "configuration '3d_resnc' is not in the plans LNMPlans; did you mean 3d_resenc?"),
])
def test_training_errors_suggest_the_nearest_name(planned, tmp_path, args, message):
    root = planned
    proc = run_train_cli(*args, preprocessed=root / "pre", results=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_raw_but_not_preprocessed_dataset_says_what_to_run(planned, tmp_path):
    root = planned
    write_tiny_dataset(tmp_path / "raw", dataset_id=43, name="Fresh", n_cases=2)
    proc = run_cli("train", "43", "3d_resenc", "0", "--preprocessed", root / "pre", "--results", tmp_path / "res",
                   env={"LNM_raw": str(tmp_path / "raw")})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "Dataset043_Fresh is in" in proc.stderr and "run lnm_plan_and_preprocess -d 043 first" in proc.stderr


@pytest.mark.slow   # needs the trained fold (a network trained for seconds)
@pytest.mark.parametrize("configuration,checkpoint,message", [
    ("3d_resenc", "checkpoint_bset.pth", "did you mean -chk checkpoint_best.pth?"),
    ("3d_resnc", "checkpoint_final.pth", "did you mean -c 3d_resenc?"),
])
def test_prediction_errors_suggest_the_nearest_name(trained, tmp_path, configuration, checkpoint, message):
    root, _ = trained
    proc = run_cli("predict", "-i", root / "raw" / "Dataset042_Tiny" / "imagesTr", "-o", tmp_path / "out", "-d", "42",
                   "-c", configuration, "-tr", "LNMTrainer_1epochs", "-f", "0", "-chk", checkpoint,
                   "--results", root / "res")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "trained folds: none" not in proc.stderr


def test_commands_import_matplotlib_only_to_plot():
    """Half a second of every start: the data and prediction commands import matplotlib only when they draw."""
    modules = ("lnm_auto.cli.data_commands", "lnm_auto.cli.predict_commands", "lnm_auto.planning.plan_and_preprocess",
               "lnm_auto.inference.predictor", "lnm_auto.inference.ensemble", "lnm_auto.training.progress")
    code = f"import sys, {', '.join(modules)}; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_negative_preparation_workers_is_one_line(tmp_path):
    proc = run_cli("predict", "-i", tmp_path, "-o", tmp_path / "out", "-m", tmp_path, "-npp", "-1", "-device", "cpu")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "-npp must be 0" in proc.stderr and "got -1" in proc.stderr


def test_extra_channel_file_is_one_line(tmp_path):
    root = write_tiny_dataset(tmp_path / "raw", n_cases=3)
    extra = root / "imagesTr" / "case_001_0001.nii.gz"
    shutil.copy(root / "imagesTr" / "case_001_0000.nii.gz", extra)
    proc = run_cli("plan_and_preprocess", "-d", "42", "--raw", tmp_path / "raw", "--preprocessed", tmp_path / "pre")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "case_001_0001" in line]
    assert len(lines) == 1 and str(extra) in lines[0] and "channel_names" in lines[0]


# ---- done when: a log file written through a redirected stdout has whole lines ---------------------------
@pytest.mark.slow
def test_train_with_stdout_to_a_file_writes_one_line_per_epoch_and_no_carriage_return(trained, tmp_path):
    root, _ = trained
    env = {k: v for k, v in os.environ.items() if k not in ("LNM_NO_PROGRESS", "LNM_DEBUG")}  # bars would be allowed
    env.update({"LNM_n_proc_DA": "0", "OMP_NUM_THREADS": "1"})
    with open(tmp_path / "stdout.txt", "w") as stdout, open(tmp_path / "stderr.txt", "w") as stderr:
        code = subprocess.run([sys.executable, "-m", "lnm_auto", "train", "42", "3d_resenc", "0", "-tr",
                               "LNMTrainer_2epochs", "--preprocessed", str(root / "pre"), "--results",
                               str(tmp_path / "res")], stdout=stdout, stderr=stderr, env=env, timeout=600).returncode
    text, err = (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()
    assert code == 0, err
    assert "\r" not in text and "\r" not in err
    epoch_lines = [line for line in text.splitlines() if re.search(r": epoch \d+/2: train loss", line)]
    assert [re.search(r"epoch (\d+)/2", line).group(1) for line in epoch_lines] == ["1", "2"]
    assert "Warning" not in err           # third-party warnings (torch's FutureWarning at import) filtered
