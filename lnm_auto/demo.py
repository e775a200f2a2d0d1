"""The end-to-end demo on the embedded phantom: make data -> plan -> train folds -> predict -> evaluate."""
from __future__ import annotations

import time
from pathlib import Path

from lnm_auto.datasets.phantom import PhantomConfig, make_phantom_dataset
from lnm_auto.evaluation.report import evaluate, format_table
from lnm_auto.inference.predictor import predict_folder
from lnm_auto.planning.plan_and_preprocess import plan_and_preprocess
from lnm_auto.training.run import run_training, setup_trainer

DEMO_DATASET_ID = 999


def run_demo(workdir: Path, configuration: str = "2d25", folds: tuple[int, ...] = (0, 1, 2, 3, 4),
             trainer: str = "LNMTrainer_5epochs", epochs: int | None = None, n_cases: int = 40, n_test_cases: int = 20,
             seed: int = 0) -> dict:
    t0 = time.time()
    workdir = Path(workdir)
    raw, pre, res = workdir / "raw", workdir / "preprocessed", workdir / "results"
    print(f"[1/5] phantom: {n_cases} training + {n_test_cases} test cases -> {raw}", flush=True)
    dataset = make_phantom_dataset(raw, DEMO_DATASET_ID, "Phantom",
                                   PhantomConfig(n_cases=n_cases, n_test_cases=n_test_cases, seed=seed), progress=True)
    print("[2/5] verify, fingerprint, plan, preprocess", flush=True)
    planned = plan_and_preprocess(DEMO_DATASET_ID, raw, pre, num_processes=2)
    trained = None
    for fold in folds:
        print(f"[3/5] train {configuration} fold {fold} ({trainer})", flush=True)
        trained = setup_trainer(DEMO_DATASET_ID, configuration, str(fold), pre, res, trainer, planned.plans.plans_name,
                                num_epochs=epochs)
        run_training(trained, continue_training=True)   # a re-run of the demo picks up where it stopped
    print(f"[4/5] predict the test cases with the {len(folds)}-fold ensemble", flush=True)
    preds = workdir / "predictions"
    predict_folder(dataset / "imagesTs", preds, trained.output_folder.parent, [str(f) for f in folds],
                   num_processes=1)
    print("[5/5] evaluate", flush=True)
    report = workdir / "report"
    metrics = evaluate(dataset / "nodesTs.csv", preds / "nodes.csv", report, dataset / "stationsTs.csv",
                       dataset / "patientsTs.csv")
    print(format_table(metrics))
    print(f"plots: {report / 'roc.png'}, {report / 'calibration.png'}; training curves: "
          f"{trained.output_folder.parent}/fold_*/progress.png")
    print(f"demo finished in {time.time() - t0:.0f} s")
    return metrics
