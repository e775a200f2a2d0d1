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
# The whole pipeline with the plans' own recipe (no --epochs) on a 40-case CT phantom with sparse node labels, two
# folds at a time on 2 CPU cores (benchmarks/results/pipeline_time_2_at_once_one_queue.md)
FULL_RECIPE_MINUTES_40_CASES = 10


def run_demo(workdir: Path, configurations: tuple[str, ...] = ("radiomics", "deep_radiomics", "2d25"),
             folds: tuple[int, ...] = (0, 1, 2, 3, 4), epochs: int | None = 2, n_cases: int = 40,
             n_test_cases: int = 20, seed: int = 0, labeled_fraction: float = 1.0, cores: int | None = None) -> dict:
    """Run the whole pipeline; returns the test metrics document (model vs size rule). ``cores`` (default: the
    cores this process may use): folds are trained that many at once, one thread each (training/parallel_folds)."""
    t0 = time.time()
    workdir = Path(workdir)
    raw, pre, res = workdir / "raw", workdir / "preprocessed", workdir / "results"
    print(f"[1/6] phantom: {n_cases} training + {n_test_cases} test cases -> {raw}", flush=True)
    dataset = make_phantom_dataset(raw, DEMO_DATASET_ID, "Phantom",
                                   PhantomConfig(n_cases=n_cases, n_test_cases=n_test_cases, seed=seed,
                                                 labeled_fraction=labeled_fraction), progress=True,
                                   num_processes=cores or available_cores())
    print("[2/6] verify, fingerprint, plan, preprocess", flush=True)
    planned = plan_and_preprocess(DEMO_DATASET_ID, raw, pre, num_processes=cores or available_cores())
    print(f"      learning scheme for this label mix: {' -> '.join(planned.plans.recommended_trainers)} "
          f"({planned.plans.notes['learning_scheme']})", flush=True)
    jobs = training_jobs(planned.plans, configurations, folds, epochs, pre, res, raw)
    at_once = folds_at_once(cores or available_cores(), len(jobs), "cpu")
    t_train = time.time()
    print(f"[3/6] train {', '.join(configurations)}: folds {', '.join(map(str, folds))} each"
          + (f", {at_once} at once with one thread each" if at_once > 1 else ""), flush=True)
    train_folds(jobs, at_once)   # a re-run of the demo picks up where it stopped (each stage continues its fold)
    print(f"      trained in {time.time() - t_train:.0f} s", flush=True)
    print("[4/6] choose the model by cross-validation (lnm_find_best_configuration)", flush=True)
    results = res / dataset.name
    find_best_configuration(results, list(folds), size_rule=size_rule_table(planned.crops_dir or
                                                                            pre / dataset.name / "LNMPlans_crops"),
                            show=lambda table: print(table, flush=True))   # shown before the choice is written
    chosen = chosen_models(results)
    what = " + ".join(c.name for c in chosen) if chosen else "size rule (no model beat it)"
    print(f"[5/6] predict the test cases with the chosen {what}", flush=True)
    preds = workdir / "predictions"
    # workers cut each case's crops (radiomics: its features), the main process only scores
    predict_chosen(dataset / "imagesTs", preds, results, overwrite=True, num_processes=cores or available_cores())
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
    if epochs is not None:
        print(f"(the demo's quick {epochs}-epoch recipe; with the plans' own epochs the whole pipeline on a 40-case CT "
              f"dataset takes about {FULL_RECIPE_MINUTES_40_CASES} minutes on 2 CPU cores)")
    return metrics


def training_jobs(plans, configurations, folds, epochs: int | None, pre: Path, res: Path, raw: Path) -> list[FoldJob]:
    """Every fold of every configuration with the scheme the plans recommend, in the order one pool of processes
    packs them best: the networks' folds first (the long jobs), then each classifier's fold 0 (the first of them
    fills the radiomics feature cache while the last network fold still trains), then the classifiers' other folds
    (which read that cache). Classifiers are fitted in one step: ``epochs`` is for networks."""
    networks, firsts, rest = [], [], []
    for configuration in configurations:
        fitted_once = kind_of(plans.configuration(configuration)).fitted_once
        stages = tuple(recommended_scheme(plans, configuration))
        for fold in folds:
            job = FoldJob(DEMO_DATASET_ID, configuration, fold, stages, pre, res, plans.plans_name,
                          None if fitted_once else epochs, raw)
            (networks if not fitted_once else firsts if fold == folds[0] else rest).append(job)
    return networks + firsts + rest


def _if_present(path: Path) -> Path | None:
    """A label file of the test set, or None when the dataset lacks that level (evaluate then says so)."""
    return path if path.is_file() else None
