"""Benchmark: supervised vs mean teacher vs PGLS vs WSP-pretrained + supervised, on the same folds and
epochs, on a phantom with node labels for a fraction of the training cases (the paper's Table 2 setting).

    python benchmarks/weak_labels.py --workdir /tmp/lnm_weak --labeled-fraction 0.25 --folds 0 1 \
        --epochs 20 --ssl-epochs 20

Mean teacher and PGLS start from the supervised model and train --ssl-epochs more; the row "supervised +
same extra epochs" continues the supervised model for as many epochs, so extra training alone is controlled.
Every method is scored on the phantom's held-out test cases (fully labelled) with the fold ensemble;
prints and writes a markdown table (AUROC, S@R75, R@S75, A@R75, A@S75) to WORKDIR/weak_labels.md.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pandas as pd

from lnm_auto.datasets.phantom import PhantomConfig, make_phantom_dataset
from lnm_auto.evaluation.metrics import binary_metrics
from lnm_auto.inference.predictor import predict_folder
from lnm_auto.planning.plan_and_preprocess import plan_and_preprocess
from lnm_auto.training.run import run_training, setup_pretrainer, setup_trainer

METRICS = ("auroc", "s_at_r75", "r_at_s75", "a_at_r75", "a_at_s75")


def markdown_table(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns) + "\n"
    return head + "\n".join("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in r) + " |"
                             for r in df.itertuples(index=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/lnm_weak_labels")
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--test-cases", type=int, default=30)
    ap.add_argument("--labeled-fraction", type=float, default=0.25)
    ap.add_argument("--difficulty", type=float, default=0.5)
    ap.add_argument("-c", "--configuration", default="2d25")
    ap.add_argument("--folds", nargs="+", default=["0"])
    ap.add_argument("--epochs", type=int, default=20, help="supervised epochs")
    ap.add_argument("--ssl-epochs", type=int, default=20, help="mean teacher / PGLS epochs after the supervised start")
    ap.add_argument("--pretrain-epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    work = Path(args.workdir)
    raw, pre, res = work / "raw", work / "preprocessed", work / "results"
    os.environ["LNM_raw"] = str(raw)   # lets PGLS log how many pseudo labels are right (phantom truth)
    t0 = time.time()
    dataset = make_phantom_dataset(raw, 998, "WeakPhantom", PhantomConfig(
        n_cases=args.cases, n_test_cases=args.test_cases, labeled_fraction=args.labeled_fraction,
        difficulty=args.difficulty, seed=args.seed))
    planned = plan_and_preprocess(998, raw, pre, num_processes=2, progress=False)
    c = args.configuration
    methods: dict[str, Path] = {}

    def train(trainer: str, fold: str, epochs: int, weights: Path | None = None) -> Path:
        tr = setup_trainer(998, c, fold, pre, res, trainer, num_epochs=epochs)
        run_training(tr, pretrained_weights=weights)
        return tr.output_folder.parent

    for fold in args.folds:
        methods["supervised"] = train("LNMTrainer", fold, args.epochs)
        # control for the extra epochs the semi-supervised runs get on top of their supervised start
        start = res / "Dataset998_WeakPhantom" / f"LNMTrainer__{planned.plans.plans_name}__{c}" / f"fold_{fold}" / \
            "checkpoint_final.pth"
        tr = setup_trainer(998, c, fold, pre, res / "longer", "LNMTrainer", num_epochs=args.ssl_epochs)
        run_training(tr, pretrained_weights=start)
        methods["supervised + same extra epochs"] = tr.output_folder.parent
        methods["mean teacher"] = train("LNMTrainerMeanTeacher", fold, args.ssl_epochs)
        methods["PGLS"] = train("LNMTrainerPGLS", fold, args.ssl_epochs)
        pretrainer = setup_pretrainer(998, c, fold, pre, res / "wsp", num_epochs=args.pretrain_epochs)
        weights = pretrainer.run_pretraining()
        tr = setup_trainer(998, c, fold, pre, res / "wsp", "LNMTrainer", num_epochs=args.epochs)
        run_training(tr, pretrained_weights=weights)
        methods["WSP + supervised"] = tr.output_folder.parent

    reference = pd.read_csv(dataset / "nodesTs.csv", dtype={"case": str, "station": str}, keep_default_na=False)
    rows = []
    for name, model in methods.items():
        out = work / "predictions" / name.replace(" ", "_").replace("+", "plus")
        predict_folder(dataset / "imagesTs", out, model, list(args.folds), progress=False, save_probmaps=False)
        pred = pd.read_csv(out / "nodes.csv", dtype={"case": str})
        joined = reference.merge(pred[["case", "node", "probability"]], on=["case", "node"])
        m = binary_metrics(joined["label"].astype(int), joined["probability"])
        rows.append({"method": name, **{k: 100 * m[k] for k in METRICS}})
    table = pd.DataFrame(rows)
    text = (f"phantom: {args.cases} training cases (node labels for {args.labeled_fraction:.0%}), "
            f"{args.test_cases} test cases, difficulty {args.difficulty}; configuration {c}, folds "
            f"{' '.join(args.folds)}, {args.epochs} supervised / {args.ssl_epochs} SSL / {args.pretrain_epochs} "
            f"WSP epochs; planner {planned.plans.planner}; {time.time() - t0:.0f} s\n\n"
            + markdown_table(table))
    print(text)
    (work / "weak_labels.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
