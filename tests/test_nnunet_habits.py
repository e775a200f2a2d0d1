"""nnU-Net habits where lnm_auto had no reason to differ (issue 23, item 5): nnU-Net's flag names accepted as
aliases, one spelling style (underscores; the old hyphenated names still parse), -c for the configurations to
preprocess, the dataset positional in find_best, -tr NAME_1epoch mapped with a word and never retraining a
finished fold, the exact -tr named when a model exists only as NAME_Nepochs; and the two figures people look at:
crossval_table.png without cut labels or folder names, the ROC legend naming the size rule."""
from __future__ import annotations

import argparse
import json
import shutil

import matplotlib
import numpy as np
import pandas as pd
import pytest

from lnm_auto import cli
from lnm_auto.cli.data_commands import PLANNED_CONFIGURATIONS
from lnm_auto.evaluation.crossval import select_configuration
from lnm_auto.evaluation.crossval_table import table_figure
from lnm_auto.evaluation.plots import roc_figure
from lnm_auto.evaluation.report import evaluate, level_metrics
from lnm_auto.plans.plans import Plans
from lnm_auto.training.registry import exact_trainer_hint, run_name_note
from conftest import refused, run_cli, run_train_cli
from test_crossval import sigmoid, truth, write_model

matplotlib.use("Agg")
SIZE_RULE = "size rule (short axis)"


def every_parser() -> list[argparse.ArgumentParser]:
    parsers = [getattr(cli, name)() for name in dir(cli) if name.endswith("_parser")]
    for p in list(parsers):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    return parsers


# ---- one spelling style, nnU-Net's names as aliases -------------------------------------------------------------
def test_every_hyphenated_flag_has_its_underscore_spelling_first():
    """Underscores are the style; a hyphenated long flag is only ever an old alias listed after its main name."""
    offenders = []
    for parser in every_parser():
        for action in parser._actions:
            longs = [o for o in action.option_strings if o.startswith("--")]
            for o in longs:
                if "-" in o[2:] and (o[2:].replace("-", "_") not in [x[2:] for x in longs] or longs[0] == o):
                    offenders.append(f"{parser.prog} {o}")
    assert not offenders, offenders


@pytest.mark.parametrize("prog,argv,dest,value", [
    ("plan_and_preprocess", ["-d", "1", "--no-verify"], "verify", False),
    ("plan_and_preprocess", ["-d", "1", "--no_verify"], "verify", False),
    ("plan_and_preprocess", ["-d", "1", "--verify_dataset_integrity"], "verify", True),
    ("plan_and_preprocess", ["-d", "1"], "verify", True),
    ("plan_and_preprocess", ["-d", "1", "-c", "2d25", "radiomics"], "configurations", ["2d25", "radiomics"]),
    ("make_phantom", ["--test-cases", "3"], "test_cases", 3),
    ("make_phantom", ["--test_cases", "3"], "test_cases", 3),
    ("make_phantom", ["--labeled-fraction", "0.5"], "labeled_fraction", 0.5),
    ("make_phantom", ["--labeled_fraction", "0.5"], "labeled_fraction", 0.5),
    ("make_phantom", ["--oblique_deg", "7"], "oblique_deg", 7.0),
    ("demo", ["--test-cases", "4", "--labeled_fraction", "0.3"], "test_cases", 4),
    ("find_best", ["7", "-f", "0", "1", "2", "3", "4"], "folds", [0, 1, 2, 3, 4]),
    ("find_best", ["7"], "dataset_id", "7"),
    ("accumulate", ["-d", "7", "-c", "2d25", "-f", "0", "1", "2", "3", "4"], "folds", [0, 1, 2, 3, 4]),
])
def test_old_and_nnunet_spellings_parse_to_the_same_setting(prog, argv, dest, value):
    parser = getattr(cli, f"{prog}_parser")()
    assert getattr(parser.parse_args(argv), dest) == value


def test_help_lists_both_spellings():
    text = cli.plan_and_preprocess_parser().format_help()
    for flag in ("--no_verify", "--no-verify", "--verify_dataset_integrity", "-c CONFIGURATION"):
        assert flag in text, flag
    assert "--test_cases" in cli.make_phantom_parser().format_help()
    assert "--test-cases" in cli.make_phantom_parser().format_help()


# ---- -c: the configurations to preprocess ---------------------------------------------------------------------
def test_planned_configurations_are_what_the_planner_plans(planned_tiny):
    """The names -c is checked against before any image is read are exactly the plans' configurations."""
    plans = Plans.load(planned_tiny(8) / "pre" / "Dataset042_Tiny" / "LNMPlans.json")
    assert set(PLANNED_CONFIGURATIONS) == set(plans.configurations)


def test_unplanned_configuration_is_refused_before_any_work(tiny_dataset, tmp_path):
    pre = tmp_path / "pre"
    proc = run_cli("plan_and_preprocess", "-d", "42", "-c", "2d25", "2d", "--raw", tiny_dataset.parent,
                   "--preprocessed", pre)
    line = refused(proc, "-c 2d:", "did you mean 2d25?", "planned: 2d25, 3d_resenc, radiomics")
    assert line == ("lnm_plan_and_preprocess: error: -c 2d: not a configuration the planner plans; did you mean "
                    "2d25? (planned: 2d25, 3d_resenc, radiomics, deep_radiomics, wega)")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not pre.exists()


@pytest.mark.slow   # plans and preprocesses the tiny dataset
def test_planned_configurations_with_c_write_the_shared_caches(tiny_dataset, tmp_path):
    pre = tmp_path / "pre"
    proc = run_cli("plan_and_preprocess", "-d", "42", "-c", "2d25", "radiomics", "--verify_dataset_integrity",
                   "-np", "1", "--raw", tiny_dataset.parent, "--preprocessed", pre)
    assert proc.returncode == 0, proc.stderr
    crops = pre / "Dataset042_Tiny" / "LNMPlans_crops"
    assert sorted(p.name for p in crops.glob("case_*.npz")) == [f"case_{i:03d}.npz" for i in range(6)]


# ---- lnm_find_best_configuration DATASET ------------------------------------------------------------------------
@pytest.fixture
def hand_made_results(tmp_path):
    """Two complete models' hand-made out-of-fold predictions under results/Dataset042_Tiny."""
    results = tmp_path / "res"
    t = truth()
    write_model(results / "Dataset042_Tiny", "LNMTrainer_1epochs__LNMPlans__2d25",
                sigmoid(2.5 * t["label"] + 0.8 * t["noise"]).to_numpy())
    write_model(results / "Dataset042_Tiny", "RadiomicsTrainer__LNMPlans__radiomics",
                sigmoid(0.8 * t["label"] + np.random.default_rng(1).normal(size=len(t))).to_numpy())
    return results


@pytest.mark.parametrize("dataset_args", [["42"], ["-d", "42"], ["Dataset042_Tiny", "-d", "Dataset042_Tiny"]])
def test_find_best_takes_the_dataset_positionally_or_with_d(hand_made_results, dataset_args):
    proc = run_cli("find_best_configuration", *dataset_args, "-f", "0", "1", "2", "3", "4", "--n_bootstrap", "0",
                   "--results", hand_made_results, env={"LNM_preprocessed": None})
    assert proc.returncode == 0, proc.stderr
    instructions = json.loads((hand_made_results / "Dataset042_Tiny" / "inference_instructions.json").read_text())
    assert instructions["folds"] == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize("dataset_args,message", [
    ([], "no dataset given: lnm_find_best_configuration DATASET (or -d DATASET)"),
    (["42", "-d", "43"], "two datasets given: 42 (positional) and -d 43; give one"),
])
def test_find_best_without_one_dataset_is_one_line(hand_made_results, dataset_args, message):
    proc = run_cli("find_best_configuration", *dataset_args, "--results", hand_made_results,
                   env={"LNM_preprocessed": None})
    refused(proc, message)
    assert not (hand_made_results / "Dataset042_Tiny" / "inference_instructions.json").exists()


def test_find_best_positional_path_is_refused(hand_made_results):
    proc = run_cli("find_best_configuration", "../Dataset042_Tiny", "--results", hand_made_results)
    refused(proc, "DATASET '../Dataset042_Tiny': must be a plain name")


# ---- -tr NAME_Nepochs: the exact name is said ---------------------------------------------------------------------
@pytest.mark.parametrize("trainer", ["LNMTrainer", "LNMTrainer_1epoch", "LNMTrainer_5epochs"])
def test_accumulate_names_the_exact_trainer_to_pass(hand_made_results, trainer):
    proc = run_cli("accumulate_crossval_results", "-d", "42", "-c", "2d25", "-tr", trainer, "-f", "0", "1", "2",
                   "3", "4", "--results", hand_made_results)
    refused(proc, f"{trainer}__LNMPlans__2d25: no such model folder",
            "LNMTrainer was trained for LNMPlans 2d25 only as LNMTrainer_1epochs: pass -tr LNMTrainer_1epochs")
    proc = run_cli("accumulate_crossval_results", "-d", "42", "-c", "2d25", "-tr", "LNMTrainer_1epochs", "-f", "0",
                   "1", "2", "3", "4", "--results", hand_made_results)
    assert proc.returncode == 0, proc.stderr


def test_trainer_hints_only_for_the_same_class_plans_and_configuration():
    names = ["LNMTrainer_1epochs__LNMPlans__2d25", "LNMTrainer_5epochs__Other__2d25",
             "LNMTrainerPGLS_1epochs__LNMPlans__2d25", "LNMTrainer_3epochs__LNMPlans__radiomics"]
    assert exact_trainer_hint("LNMTrainer", names, "LNMPlans", "2d25") == (
        "; LNMTrainer was trained for LNMPlans 2d25 only as LNMTrainer_1epochs: pass -tr LNMTrainer_1epochs")
    assert exact_trainer_hint("LNMTrainerWeak", names, "LNMPlans", "2d25") == ""
    assert exact_trainer_hint("LNMTrainer_1epochs", names, "LNMPlans", "2d25") == ""
    assert run_name_note("LNMTrainer_1epochs", "LNMTrainer_1epochs", 1) is None
    assert run_name_note("LNMTrainer_1epoch", "LNMTrainer_1epochs", 1) == (
        "-tr LNMTrainer_1epoch is read as LNMTrainer_1epochs (LNMTrainer for 1 epoch; model folders always spell "
        "NAME_<N>epochs)")
    assert run_name_note("LNMTrainer", "RadiomicsTrainer", 1) == (
        "-tr LNMTrainer is read as RadiomicsTrainer: this configuration is fitted by RadiomicsTrainer")


@pytest.mark.slow   # trains one fold of 3d_resenc for one epoch
def test_nnunet_1epoch_spelling_is_said_and_never_retrains_a_finished_fold(planned_tiny, tmp_path):
    for part in ("raw", "pre"):
        shutil.copytree(planned_tiny(8) / part, tmp_path / part)
    pre, res = tmp_path / "pre", tmp_path / "res"
    proc = run_train_cli("42", "3d_resenc", "0", "-tr", "LNMTrainer_1epoch", "-device", "cpu",
                         preprocessed=pre, results=res)
    assert proc.returncode == 0, proc.stderr
    assert ("-tr LNMTrainer_1epoch is read as LNMTrainer_1epochs (LNMTrainer for 1 epoch; model folders always "
            "spell NAME_<N>epochs)") in proc.stdout
    model = res / "Dataset042_Tiny" / "LNMTrainer_1epochs__LNMPlans__3d_resenc"
    final = model / "fold_0" / "checkpoint_final.pth"
    before = final.read_bytes()
    assert not (res / "Dataset042_Tiny" / "LNMTrainer_1epoch__LNMPlans__3d_resenc").exists()
    model_files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in model.rglob("*") if p.is_file()}

    again = run_train_cli("42", "3d_resenc", "0", "-tr", "LNMTrainer_1epoch", "-device", "cpu",
                          preprocessed=pre, results=res)
    line = refused(again, "-tr LNMTrainer_1epoch is read as LNMTrainer_1epochs", "already trained",
                   "to retrain it pass -tr LNMTrainer_1epochs, to continue it add --c")
    assert str(model / "fold_0") in line
    assert final.read_bytes() == before
    # refused before anything was loaded or written: no plans.json rewritten, no stray training log
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in model.rglob("*") if p.is_file()} == model_files

    for trainer in ("LNMTrainer", "LNMTrainer_1epoch"):   # lnm_predict: the exact -tr, not a wrong "to train it"
        proc = run_cli("predict", "-i", tmp_path / "raw" / "Dataset042_Tiny" / "imagesTr", "-o", tmp_path / "out",
                       "-d", "42", "-c", "3d_resenc", "-tr", trainer, "-f", "0", "--results", res)
        line = refused(proc, "no such model", "pass -tr LNMTrainer_1epochs")
        assert "to train it" not in line
    assert not (tmp_path / "out").exists()


# ---- crossval_table.png ------------------------------------------------------------------------------------------
def text_outside_canvas(fig) -> list[str]:
    """Every visible, non-empty text of ``fig`` whose drawn box leaves the canvas."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width, height = fig.canvas.get_width_height()
    cut, undrawn = [], {id(label) for label in undrawn_tick_labels(fig)}
    for text in fig.findobj(matplotlib.text.Text):
        if not text.get_visible() or not text.get_text().strip() or id(text) in undrawn:
            continue
        box = text.get_window_extent(renderer)
        if box.x0 < 0 or box.y0 < 0 or box.x1 > width or box.y1 > height:
            cut.append(f"{text.get_text()!r} at {box.bounds}")
    return cut


def undrawn_tick_labels(fig) -> list:
    """The labels of ticks outside their axis' view limits: matplotlib keeps them (placed beyond the axes) but
    never draws them."""
    labels = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not lo - 1e-9 <= tick.get_loc() <= hi + 1e-9:
                    labels += [tick.label1, tick.label2]
    return labels


def test_the_canvas_check_catches_a_cut_label():
    """The check below can fail: a label pushed past the right edge is reported."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(3, 2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xlabel("a label much too long for a figure only three inches wide, so it is cut")
    assert text_outside_canvas(fig)


@pytest.fixture
def long_named_results(tmp_path):
    """Four complete models whose folder names are long and partly alike: two trainers of 2d25, two plans."""
    results = tmp_path / "Dataset042_Tiny"
    t = truth()
    rng = np.random.default_rng(3)
    for name, strength in (("LNMTrainer__LNMPlans__2d25", 2.5), ("LNMTrainerPGLS_20epochs__LNMPlans__2d25", 2.0),
                           ("LNMTrainer__LNMPlans_with_a_long_name__3d_resenc", 1.5),
                           ("LNMTrainer__LNMPlans__3d_resenc", 1.2),
                           ("RadiomicsTrainer__LNMPlans__radiomics", 1.0)):
        write_model(results, name, sigmoid(strength * t["label"] + rng.normal(size=len(t))).to_numpy())
    return results


def test_crossval_table_figure_has_no_cut_label_and_short_unique_names(long_named_results, tmp_path):
    selection = select_configuration(long_named_results, n_bootstrap=50, max_members=3)
    rows, level = selection["rows"], selection["level"]
    fig = table_figure(rows, selection["chosen"], level)
    png = tmp_path / "table.png"
    fig.savefig(png, dpi=fig.dpi)
    assert matplotlib.image.imread(png).shape[:2] == fig.canvas.get_width_height()[::-1]
    assert text_outside_canvas(fig) == []
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(labels) == len(rows) == len(set(labels))
    assert not any("__" in label for label in labels)
    assert "2d25 (LNMTrainer)" in labels and "radiomics (RadiomicsTrainer)" in labels
    assert "3d_resenc (LNMTrainer) [LNMPlans_with_a_long_name]" in labels   # plans only where they tell two apart
    assert "2d25 (LNMTrainer) + radiomics" in labels and "2d25 (LNMTrainer) + 3d_resenc [LNMPlans]" in labels
    table = selection["table"]
    for folder in ("LNMTrainerPGLS_20epochs__LNMPlans__2d25", "LNMTrainer__LNMPlans_with_a_long_name__3d_resenc"):
        assert f"| {folder} |" in table   # the Markdown table keeps the full folder names
    import matplotlib.pyplot as plt
    plt.close(fig)


@pytest.mark.parametrize("n_models", [1, 2])
def test_crossval_table_figure_fits_with_few_rows(tmp_path, n_models):
    results = tmp_path / "Dataset042_Tiny"
    t = truth()
    for i in range(n_models):
        write_model(results, f"LNMTrainer__LNMPlans__cfg{i}", sigmoid((2 - i) * t["label"] + t["noise"]).to_numpy())
    selection = select_configuration(results, n_bootstrap=0)
    fig = table_figure(selection["rows"], selection["chosen"], selection["level"])
    assert text_outside_canvas(fig) == []
    import matplotlib.pyplot as plt
    plt.close(fig)


# ---- the ROC legend names the size rule -------------------------------------------------------------------------
def roc_plot_data(seed=0):
    rng = np.random.default_rng(seed)
    y = np.tile([0, 1], 20)
    p, pb = sigmoid(2 * y + rng.normal(size=y.size)), sigmoid(y + rng.normal(size=y.size))
    return {"node": {"y": y, "p": p, "pb": pb, "res": level_metrics(y, p, np.arange(y.size), n_bootstrap=0)}}


@pytest.mark.parametrize("name", [None, SIZE_RULE])
def test_roc_legend_names_the_compared_predictions(name):
    fig = roc_figure(roc_plot_data(), True, **({"compare_name": name} if name else {}))
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    expected = f"{name or 'compared'}: AUROC "
    assert sum(text.startswith(expected) for text in legend) == 1, legend
    assert text_outside_canvas(fig) == []


def test_evaluate_passes_the_compare_name_to_the_roc_plot(tmp_path):
    """The name reaches roc.png: the same inputs drawn with the size rule's name give another picture."""
    data = roc_plot_data()["node"]
    ref = pd.DataFrame({"case": [f"c{i:02d}" for i in range(data["y"].size)], "node": 1, "station": "7",
                        "label": data["y"]})
    ref.to_csv(tmp_path / "ref.csv", index=False)
    ref[["case", "node"]].assign(probability=data["p"]).to_csv(tmp_path / "pred.csv", index=False)
    ref[["case", "node"]].assign(probability=data["pb"]).to_csv(tmp_path / "size_rule.csv", index=False)
    for folder, extra in (("plain", {}), ("named", {"compare_name": SIZE_RULE})):
        evaluate(tmp_path / "ref.csv", tmp_path / "pred.csv", tmp_path / folder, compare_pred_csv=tmp_path /
                 "size_rule.csv", n_bootstrap=0, **extra)
    plain, named = (matplotlib.image.imread(tmp_path / f / "roc.png") for f in ("plain", "named"))
    assert plain.shape == named.shape and not np.array_equal(plain, named)
