"""The end-to-end demo on the embedded phantom: make data -> plan -> cross-validate every configuration with the
scheme the plans recommend -> choose the model by cross-validation -> predict the held-out test cases ->
evaluate beside the size rule."""
from __future__ import annotations

import time
from pathlib import Path

from lnm_auto.configurations import kind_of
from lnm_auto.datasets.phantom import PhantomConfig, make_phantom_dataset
from lnm_auto.evaluation.crossval import SIZE_RULE, find_best_configuration, size_rule_table
from lnm_auto.evaluation.report import evaluate, format_table
from lnm_auto.evaluation.size_rule import write_size_rule_predictions
from lnm_auto.inference.ensemble import chosen_models, predict_chosen
from lnm_auto.planning.plan_and_preprocess import plan_and_preprocess
from lnm_auto.training.parallel_folds import FoldJob, folds_at_once, train_folds
from lnm_auto.training.run import recommended_scheme
from lnm_auto.utils.threads import available_cores

DEMO_DATASET_ID = 999


def run_demo(workdir: Path, configurations: tuple[str, ...] = ("radiomics", "deep_radiomics", "2d25"),
             folds: tuple[int, ...] = (0, 1, 2, 3, 4), epochs: int | None = 3, n_cases: int = 40,
             n_test_cases: int = 20, seed: int = 0, labeled_fraction: float = 1.0, cores: int | None = None) -> dict:
    """Run the whole pipeline; returns the test metrics document (model vs size rule). ``cores`` (default: the
    cores this process may use): folds are trained that many at once, one thread each (training/parallel_folds)."""
    t0 = time.time()
    workdir = Path(workdir)
    raw, pre, res = workdir / "raw", workdir / "preprocessed", workdir / "results"
    print(f"[1/6] phantom: {n_cases} training + {n_test_cases} test cases -> {raw}", flush=True)
    dataset = make_phantom_dataset(raw, DEMO_DATASET_ID, "Phantom",
                                   PhantomConfig(n_cases=n_cases, n_test_cases=n_test_cases, seed=seed,
                                                 labeled_fraction=labeled_fraction), progress=True)
    print("[2/6] verify, fingerprint, plan, preprocess", flush=True)
    planned = plan_and_preprocess(DEMO_DATASET_ID, raw, pre, num_processes=2)
    print(f"      learning scheme for this label mix: {' -> '.join(planned.plans.recommended_trainers)} "
          f"({planned.plans.notes['learning_scheme']})", flush=True)
    at_once = folds_at_once(cores or available_cores(), len(folds), "cpu")
    for configuration in configurations:
        # radiomics and deep_radiomics are fitted in one step: the demo's epoch count is for networks
        fitted_once = kind_of(planned.plans.configuration(configuration)).fitted_once
        stages = tuple(recommended_scheme(planned.plans, configuration))
        t_config = time.time()
        print(f"[3/6] train {configuration} ({' -> '.join(stages)}), folds {', '.join(map(str, folds))}"
              + (f", {at_once} at once with one thread each" if at_once > 1 else ""), flush=True)
        # a re-run of the demo picks up where it stopped: every stage continues its fold's latest checkpoint
        train_folds([FoldJob(DEMO_DATASET_ID, configuration, fold, stages, pre, res, planned.plans.plans_name,
                             None if fitted_once else epochs, raw) for fold in folds], at_once,
                    first_alone=fitted_once)   # a classifier's first fold fills the feature cache
        print(f"      {configuration}: {time.time() - t_config:.0f} s", flush=True)
    print("[4/6] choose the model by cross-validation (lnm_find_best_configuration)", flush=True)
    results = res / dataset.name
    find_best_configuration(results, list(folds), size_rule=size_rule_table(planned.crops_dir or
                                                                            pre / dataset.name / "LNMPlans_crops"),
                            show=lambda table: print(table, flush=True))   # shown before the choice is written
    chosen = chosen_models(results)
    what = " + ".join(c.name for c in chosen) if chosen else "size rule (no model beat it)"
    print(f"[5/6] predict the test cases with the chosen {what}", flush=True)
    preds = workdir / "predictions"
    predict_chosen(dataset / "imagesTs", preds, results, overwrite=True)
    print("[6/6] evaluate on the test cases; A = the chosen model, B = the size rule (short axis)", flush=True)
    size_rule = workdir / "size_rule" / "nodes.csv"
    write_size_rule_predictions(dataset / "nodesTs", size_rule)
    report = workdir / "report"
    metrics = evaluate(dataset / "nodesTs.csv", preds / "nodes.csv", report, _if_present(dataset / "stationsTs.csv"),
                       _if_present(dataset / "patientsTs.csv"), compare_pred_csv=size_rule, compare_name=SIZE_RULE)
    print(format_table(metrics))
    print(f"plots: {report / 'roc.png'}, {report / 'calibration.png'}, {results / 'crossval_table.png'}; "
          f"training curves: {results}/*/fold_*/progress.png")
    print(f"demo finished in {time.time() - t0:.0f} s")
    return metrics


def _if_present(path: Path) -> Path | None:
    """A label file of the test set, or None when the dataset lacks that level (evaluate then says so)."""
    return path if path.is_file() else None
