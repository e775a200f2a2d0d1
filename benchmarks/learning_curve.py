"""Learning curve: test AUROC against the number of node-labelled training nodes, per method.

    python benchmarks/learning_curve.py --quick      # sizes 30-120, 2 seeds, few steps (< 45 min on one core)
    python benchmarks/learning_curve.py              # sizes 30-500, 3 seeds (hours on 2 cores)

Per dataset (the phantom at two texture separations, the LIDC lesion shapes): one pool of node-labelled training
cases, a few cases with hidden node labels (station and patient labels kept) and a fixed held-out test set. For each
size n and seed a random subset of the pool whose labelled nodes total about n (nested: the seed's larger subsets
contain its smaller ones) is one fold of splits_final.json, so every method trains through the public
setup_trainer / run_training on exactly that subset and predicts the test cases with that fold alone. Every fold
also trains on the unlabelled cases (the supervised trainers ignore them, PGLS learns from them) and validates on
one of them (its own, station level; the final checkpoint is scored, so validation chooses nothing).

Methods: the short-axis size rule (needs no training), radiomics, deep_radiomics, 2d25 from scratch (plans
LNMPlans_scratch, --no_pretrained_backbone), 2d25 on its ImageNet backbone (LNMPlans), the same with the node mask
pooling the FPN levels instead of entering the stem (plans LNMPlans_maskpool: LNMPlans with the 2d25 network's
mask_use "pooling") and PGLS started from that fold's pretrained 2d25. --methods runs a subset (the size rule
always). Networks train a fixed number of optimizer steps (at least --min-epochs epochs), so a small
subset gets as many updates as a large one instead of a few steps; PGLS gets half as many more. Every method is
scored on the SAME test nodes: AUROC with a patient-bootstrap 95 % CI. Results: results/learning_curve[_quick]
.{json,md} (mean over seeds per size), learning_curve[_quick]_runs.{json,md} (every run) and a plot (.png).
A run resumes in --workdir: finished trainings and test predictions are reused.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, machine_header, markdown_table, write_results  # noqa: E402

SCRATCH_PLANS = "LNMPlans_scratch"
MASKPOOL_PLANS = "LNMPlans_maskpool"
SPLITS_FILE = "splits_final.json"
# row name -> (configuration, trainer, plans name, kind): kind "fit" (no epochs), "net" or "pgls" (epochs by size)
METHODS = {"radiomics": ("radiomics", "RadiomicsTrainer", "LNMPlans", "fit"),
           "deep_radiomics": ("deep_radiomics", "DeepRadiomicsTrainer", "LNMPlans", "fit"),
           "2d25 scratch": ("2d25", "LNMTrainer", SCRATCH_PLANS, "net"),
           "2d25 pretrained": ("2d25", "LNMTrainer", "LNMPlans", "net"),
           "2d25 pretrained, mask pooling": ("2d25", "LNMTrainer", MASKPOOL_PLANS, "net"),
           "PGLS (2d25 pretrained)": ("2d25", "LNMTrainerPGLS", "LNMPlans", "pgls")}
SIZE_RULE = "size rule (short axis)"


# ---- the pure part: which cases each fold trains on (tests/test_learning_curve_benchmark.py) -------------------
def labelled_node_counts(nodes: pd.DataFrame) -> pd.DataFrame:
    """Per case (index, sorted): ``n_labelled`` node-labelled nodes and ``n_positive`` of them (label -1: unknown)."""
    labels = pd.to_numeric(nodes["label"], errors="coerce").fillna(-1).astype(int)
    table = pd.DataFrame({"case": nodes["case"].astype(str), "labelled": labels >= 0, "positive": labels == 1})
    counts = table.groupby("case")[["labelled", "positive"]].sum().astype(int)
    return counts.rename(columns={"labelled": "n_labelled", "positive": "n_positive"}).sort_index()


def draw_subset(counts: pd.DataFrame, target: int, seed: int) -> list[str]:
    """Node-labelled cases in a seeded random order, taken while their labelled nodes stay closest to ``target``
    (and until both classes are in): a prefix of one permutation per seed, so a seed's subsets are nested."""
    pool = counts[counts["n_labelled"] > 0]
    order = pool.index[np.random.default_rng(seed).permutation(len(pool))].tolist()
    taken, n, n_pos = [], 0, 0
    for case in order:
        k, k_pos = int(pool.at[case, "n_labelled"]), int(pool.at[case, "n_positive"])
        both = 0 < n_pos < n
        if both and abs(n + k - target) >= abs(n - target):
            break
        taken.append(case)
        n, n_pos = n + k, n_pos + k_pos
    return sorted(taken)


def learning_folds(counts: pd.DataFrame, sizes: list[int], seeds: list[int]) -> list[dict]:
    """One fold per (size, seed): its subset plus every unlabelled case but one, which it validates on (each
    unlabelled case validates at most one fold, as splits_final.json requires)."""
    unlabelled = counts.index[counts["n_labelled"] == 0].tolist()
    if len(unlabelled) < len(sizes) * len(seeds) + 1:
        raise ValueError(f"{len(sizes) * len(seeds)} folds need more than as many cases without node labels, "
                         f"the dataset has {len(unlabelled)}")
    folds = []
    for size in sizes:
        for seed in seeds:
            subset = draw_subset(counts, size, seed)
            val = unlabelled[len(folds)]
            folds.append({"size": size, "seed": seed, "fold": len(folds), "val": [val],
                          "train": sorted(subset + [c for c in unlabelled if c != val]),
                          "labelled_cases": subset, "n_nodes": int(counts.loc[subset, "n_labelled"].sum()),
                          "n_positive": int(counts.loc[subset, "n_positive"].sum())})
    return folds


def training_epochs(n_nodes: int, batch_size: int, steps: int, min_epochs: int) -> int:
    """Epochs giving at least ``steps`` optimizer steps (an epoch is one pass: ceil(n / batch) steps)."""
    return max(min_epochs, math.ceil(steps / max(1, math.ceil(n_nodes / batch_size))))


def crossings(curves: dict[str, dict[int, float]]) -> list[str]:
    """Where two methods' mean curves change order between consecutive sizes: 'A overtakes B between n=x and y'."""
    lines, names = [], sorted(curves)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            sizes = sorted(set(curves[a]) & set(curves[b]))
            diffs = [curves[a][s] - curves[b][s] for s in sizes]
            for k in range(1, len(sizes)):
                if diffs[k - 1] * diffs[k] < 0:
                    lead, trail = (a, b) if diffs[k] > 0 else (b, a)
                    lines.append(f"{lead} overtakes {trail} between n={sizes[k - 1]} and {sizes[k]}")
    return lines


# ---- running: datasets, folds, trainings, predictions ---------------------------------------------------------
def selected_methods(args) -> list[str]:
    """The METHODS rows to run, in METHODS order (all without --methods)."""
    return [m for m in METHODS if not args.methods or m in args.methods]


def switch_to_mask_pooling(plans_file: Path) -> None:
    """Rewrite a plans file (planned as LNMPlans, pretrained) with its 2d25 network pooling by the node mask."""
    from lnm_auto.plans.plans import Plans
    from lnm_auto.utils.io import load_json, save_json
    plans = load_json(plans_file)
    plans["configurations"]["2d25"]["network"]["mask_use"] = "pooling"
    save_json(plans, plans_file)
    Plans.load(plans_file)   # still valid plans


def prepare_dataset(name: str, make, dataset_id: int, args, root: Path) -> tuple[Path, Path]:
    """The raw dataset and its preprocessed folder under LNMPlans and the plans of the selected methods (made once,
    reused by a resumed run)."""
    from lnm_auto.planning.plan_and_preprocess import plan_and_preprocess
    raw, pre = root / "raw", root / "pre"
    dataset = next(raw.glob(f"Dataset{dataset_id:03d}_*"), None) if raw.is_dir() else None
    if dataset is None:
        dataset = make(raw, dataset_id, args.cases, args.test_cases, args.labeled_fraction, args.seed)
    needed = {"LNMPlans"} | {METHODS[m][2] for m in selected_methods(args)}
    for plans_name, pretrained in (("LNMPlans", True), (SCRATCH_PLANS, False), (MASKPOOL_PLANS, True)):
        plans_file = pre / dataset.name / f"{plans_name}.json"
        if plans_name in needed and not plans_file.is_file():
            # the mask-pooling plans cut their own crop cache (the same crops: same planner, same data)
            plan_and_preprocess(dataset_id, raw, pre, planner="LNMPlannerCPU", plans_name=plans_name,
                                num_processes=1, progress=False, pretrained_backbone=pretrained)
            if plans_name == MASKPOOL_PLANS:
                switch_to_mask_pooling(plans_file)
    return dataset, pre / dataset.name


def write_splits(pre_dataset: Path, folds: list[dict]) -> None:
    """Our folds as splits_final.json (rewritten only when they differ; a re-plan keeps them, as a user's file)."""
    from lnm_auto.planning.splits import split_file_problems
    from lnm_auto.training.run import dataset_cases
    from lnm_auto.utils.io import load_json, save_json
    splits = [{"train": f["train"], "val": f["val"]} for f in folds]
    problems = split_file_problems(splits, *dataset_cases(pre_dataset))
    if problems:
        raise RuntimeError(f"learning-curve folds are invalid: {problems[0]}")
    path = pre_dataset / SPLITS_FILE
    if not path.is_file() or load_json(path) != splits:
        save_json(splits, path)


def check_same_folds(path: Path, folds: list[dict]) -> None:
    """Trained folds are found by number: a resumed run with other sizes or seeds would reuse the wrong subsets."""
    from lnm_auto.utils.io import atomic_write_text
    text = json.dumps([{k: f[k] for k in ("size", "seed", "train", "val")} for f in folds], indent=1)
    if path.is_file() and path.read_text() != text:
        raise SystemExit(f"{path}: this --workdir was trained with other sizes, seeds or cases; use another --workdir")
    atomic_write_text(path, text)


def fold_epochs(method: str, fold: dict, batch_size: int, args) -> int | None:
    kind = METHODS[method][3]
    if kind == "fit":
        return None
    epochs = training_epochs(fold["n_nodes"], batch_size, args.steps, args.min_epochs)
    return epochs if kind == "net" else max(1, epochs // 2)


def train_fold(method: str, fold: dict, epochs: int | None, dataset_id: int, root: Path, raw_dataset: Path) -> Path:
    """Train (or find finished) one method on one fold; returns its fold folder."""
    from lnm_auto.training.run import run_training, setup_trainer
    configuration, trainer_name, plans_name, kind = METHODS[method]
    tr = setup_trainer(dataset_id, configuration, str(fold["fold"]), root / "pre", root / "res", trainer_name,
                       plans_name=plans_name, num_epochs=epochs, device="cpu")
    if kind == "fit":
        tr.raw_root = raw_dataset.parent
    model_file = "radiomics_model.json" if kind == "fit" else "checkpoint_final.pth"
    if not (tr.output_folder / model_file).is_file():
        run_training(tr, continue_training=kind != "fit")
    return tr.output_folder


def predict_folds(raw_dataset: Path, model_folder: Path, folds: list[str], out: Path, no_tta: bool) -> pd.DataFrame:
    """The test cases by each of ``folds`` of one model folder, in one run (nodes.csv has a probability column per
    fold: radiomics features of the test cases are computed once, not once per fold); kept for a resumed run."""
    from lnm_auto.inference.predictor import predict_folder
    nodes = out / "nodes.csv"
    columns = [f"probability_fold{f}" for f in folds]
    if not nodes.is_file() or not set(columns) <= set(pd.read_csv(nodes, nrows=0).columns):
        predict_folder(raw_dataset / "imagesTs", out, model_folder, folds, device="cpu", save_probmaps=False,
                       progress=False, mirror=not no_tta, overwrite=True)
    return pd.read_csv(nodes, dtype={"case": str})


def run_dataset(name: str, make, dataset_id: int, args) -> list[dict]:
    """Every method on every (size, seed) fold of one dataset, scored on its test nodes; one row per run."""
    from accuracy import test_metrics
    from lnm_auto.evaluation.size_rule import write_size_rule_predictions
    from lnm_auto.utils.io import atomic_write_text, load_json
    root = Path(args.workdir) / name
    raw_dataset, pre_dataset = prepare_dataset(name, make, dataset_id, args, root)
    nodes = pd.read_csv(pre_dataset / "LNMPlans_crops" / "nodes_index.csv", dtype={"case": str}, keep_default_na=False)
    counts = labelled_node_counts(nodes)
    folds = learning_folds(counts, args.sizes, args.seeds)
    check_same_folds(root / "folds.json", folds)
    write_splits(pre_dataset, folds)
    batch_size = int(load_json(pre_dataset / "LNMPlans.json")["configurations"]["2d25"]["recipe"]["batch_size"])
    reference = pd.read_csv(raw_dataset / "nodesTs.csv", dtype={"case": str}, keep_default_na=False)
    reference["label"] = pd.to_numeric(reference["label"].replace("", -1))
    size_rule = test_metrics(reference, write_size_rule_predictions(raw_dataset / "nodesTs", root / "test" /
                                                                    "size_rule.csv"), args.n_bootstrap)
    print(f"{name}: pool {int((counts.n_labelled > 0).sum())} labelled cases ({int(counts.n_labelled.sum())} nodes), "
          f"{int((counts.n_labelled == 0).sum())} unlabelled; batch {batch_size}; size rule AUROC "
          f"{size_rule['auroc']:.3f}", flush=True)
    times_file = root / "train_times.json"
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}
    trained = {}   # (method, fold) -> (model folder, epochs)
    methods = selected_methods(args)
    for fold in folds:
        for method in methods:
            epochs = fold_epochs(method, fold, batch_size, args)
            key = f"{method}|fold {fold['fold']}"
            t0 = time.time()
            fold_folder = train_fold(method, fold, epochs, dataset_id, root, raw_dataset)
            if key not in times:   # PGLS's own time (its supervised start is the 2d25 pretrained row's)
                times[key] = round(time.time() - t0, 1)
                atomic_write_text(times_file, json.dumps(times, indent=1))
            trained[method, fold["fold"]] = (fold_folder.parent, epochs)
            print(f"  trained n={fold['n_nodes']} seed {fold['seed']} {method}: {times[key]:.0f} s", flush=True)
    by_folder: dict[Path, list[str]] = {}
    for (method, k), (folder, _) in trained.items():
        by_folder.setdefault(folder, []).append(str(k))
    predictions = {folder: predict_folds(raw_dataset, folder, ks, root / "test" / folder.name, args.no_tta)
                   for folder, ks in by_folder.items()}
    rows = [{"dataset": name, "method": SIZE_RULE, "size": 0, "seed": -1, "n_train_nodes": 0, "n_train_positive": 0,
             "epochs": None, "train_s": 0.0, **size_rule}]
    for fold in folds:
        for method in methods:
            folder, epochs = trained[method, fold["fold"]]
            p = predictions[folder][["case", "node", f"probability_fold{fold['fold']}"]]
            rows.append({"dataset": name, "method": method, "size": fold["size"], "seed": fold["seed"],
                         "n_train_nodes": fold["n_nodes"], "n_train_positive": fold["n_positive"], "epochs": epochs,
                         "train_s": times[f"{method}|fold {fold['fold']}"],
                         **test_metrics(reference, p.rename(columns={p.columns[-1]: "probability"}),
                                        args.n_bootstrap)})
    print(markdown_table([run_row(r) for r in rows]), flush=True)
    return rows


# ---- reporting ----------------------------------------------------------------------------------------------
def mean_curves(rows: list[dict], dataset: str) -> dict[str, dict[int, float]]:
    """method -> size -> mean test AUROC over seeds (the size rule is flat: it learns nothing)."""
    frame = pd.DataFrame([r for r in rows if r["dataset"] == dataset and r["method"] != SIZE_RULE])
    return {m: g.groupby("size")["auroc"].mean().to_dict() for m, g in frame.groupby("method")}


def summary_rows(rows: list[dict], sizes: list[int]) -> list[dict]:
    """Per dataset and method: mean AUROC (%) over seeds [min, max] per size, with the mean exact n (positives)."""
    frame = pd.DataFrame(rows)
    out = []
    for (dataset, method), g in frame.groupby(["dataset", "method"], sort=False):
        row = {"dataset": dataset, "method": method}
        for size in sizes:
            at = g if method == SIZE_RULE else g[g["size"] == size]
            if at.empty:
                continue
            a = 100 * at["auroc"]
            row[f"n~{size}"] = f"{a.mean():.1f} [{a.min():.1f}, {a.max():.1f}]"
        out.append(row)
    for dataset, g in frame[frame["method"] != SIZE_RULE].groupby("dataset", sort=False):
        per_size = g.drop_duplicates(["size", "seed"]).groupby("size")
        out.append({"dataset": dataset, "method": "(training nodes, positives: mean over seeds)",
                    **{f"n~{int(s)}": f"{h['n_train_nodes'].mean():.0f} ({h['n_train_positive'].mean():.0f})"
                       for s, h in per_size}})
    return out


def run_row(r: dict) -> dict:
    lo, hi = r["auroc_ci95"]
    return {"dataset": r["dataset"], "method": r["method"], "size": r["size"] or "", "seed": r["seed"],
            "train nodes": r["n_train_nodes"], "train pos": r["n_train_positive"], "epochs": r["epochs"] or "",
            "AUROC %": round(100 * r["auroc"], 1), "CI low": round(100 * lo, 1), "CI high": round(100 * hi, 1),
            "test nodes": r["n_nodes"], "test pos": r["n_positive"], "train s": r["train_s"]}


def findings(rows: list[dict]) -> list[str]:
    """Per dataset: from which size each method beats the size rule (mean over seeds), and where curves cross."""
    notes = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        rule = next(r["auroc"] for r in rows if r["dataset"] == dataset and r["method"] == SIZE_RULE)
        curves = mean_curves(rows, dataset)
        pays = []
        for method, curve in curves.items():
            above = [s for s in sorted(curve) if curve[s] > rule]
            pays.append(f"{method} from n~{above[0]}" if above else f"{method} never")
        best = {s: max(curves, key=lambda m: curves[m].get(s, -1)) for s in sorted(next(iter(curves.values())))}
        notes.append(f"{dataset}: above the size rule ({100 * rule:.1f}) on the mean over seeds: {'; '.join(pays)}. "
                     f"Best mean per size: {', '.join(f'n~{s} {m}' for s, m in best.items())}. Crossings: "
                     f"{'; '.join(crossings(curves)) or 'none'}")
    return notes


def plot(rows: list[dict], path: Path) -> None:
    """One panel per dataset: mean test AUROC over seeds against n (log axis), min/max band, size rule dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4.2), squeeze=False, sharey=True)
    frame = pd.DataFrame(rows)
    for ax, dataset in zip(axes[0], datasets):
        d = frame[frame["dataset"] == dataset]
        for method, g in d[d["method"] != SIZE_RULE].groupby("method", sort=False):
            per_size = g.groupby("size")
            n = per_size["n_train_nodes"].mean()
            ax.plot(n, per_size["auroc"].mean(), marker="o", label=method)
            ax.fill_between(n, per_size["auroc"].min(), per_size["auroc"].max(), alpha=0.15)
        ax.axhline(d[d["method"] == SIZE_RULE]["auroc"].iloc[0], color="k", ls="--", label=SIZE_RULE)
        ax.set(xscale="log", title=dataset, xlabel="node-labelled training nodes (mean over seeds)")
        sizes = sorted(int(s) for s in d["size"].dropna().unique())
        ax.set_xticks(sizes, [str(s) for s in sizes])          # the requested sizes, not 3x10^1 4x10^1 ...
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test AUROC (mean over seeds, min-max band)")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    from accuracy import dataset_makers
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/lnm_bench/learning_curve")
    ap.add_argument("--quick", action="store_true",
                    help="sizes 30 60 120, 2 seeds (unless given), 16 steps, 40 + 16 cases, no TTA, 200 bootstrap "
                         "resamples")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="default 30 60 120 250 500 (--quick: 30 60 120)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0 1)")
    ap.add_argument("--cases", type=int, default=130, help="training cases (labelled pool + unlabelled)")
    ap.add_argument("--test-cases", type=int, default=40)
    ap.add_argument("--labeled-fraction", type=float, default=0.78, help="share of training cases node-labelled")
    ap.add_argument("--steps", type=int, default=120, help="optimizer steps per network training (at least)")
    ap.add_argument("--min-epochs", type=int, default=3)
    ap.add_argument("--difficulty", type=float, default=0.6)
    ap.add_argument("--textures", type=float, nargs="+", default=[0.2, 0.8])
    ap.add_argument("--n-bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0, help="dataset seed")
    ap.add_argument("--datasets", nargs="+", default=None, help="subset of dataset names to run")
    ap.add_argument("--no-tta", action="store_true", help="no test-time mirroring")
    ap.add_argument("--name", default=None, help="results name (default learning_curve[_quick])")
    ap.add_argument("--methods", nargs="+", default=None, choices=list(METHODS), metavar="METHOD",
                    help=f"run only these rows (quoted), of: {'; '.join(METHODS)}")
    args = ap.parse_args()
    if args.methods and "PGLS (2d25 pretrained)" in args.methods and "2d25 pretrained" not in args.methods:
        ap.error("--methods: PGLS starts from the fold's '2d25 pretrained'; select that too")
    args.sizes = args.sizes or ([30, 60, 120] if args.quick else [30, 60, 120, 250, 500])
    args.seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    if args.quick:
        args.steps, args.min_epochs = 16, 2
        args.cases, args.test_cases, args.labeled_fraction, args.n_bootstrap = 40, 16, 0.7, 200
        args.no_tta = True
    header = machine_header()
    makers = dataset_makers(args.textures, args.difficulty)
    rows, t_start = [], time.time()
    for i, (name, make) in enumerate(makers.items()):
        if args.datasets and name not in args.datasets:
            continue
        t0 = time.time()
        rows += run_dataset(name, make, 940 + i, args)
        print(f"({name}: {time.time() - t0:.0f} s)", flush=True)
    name = args.name or "learning_curve" + ("_quick" if args.quick else "")
    notes = [f"arguments: {vars(args)}", f"wall time {time.time() - t_start:.0f} s",
             "cells: test AUROC (%), mean over seeds [min, max]; the size rule learns nothing (one value); last row: "
             "the subsets' exact node-labelled training nodes (positives), the same subsets for every method",
             "networks: at least --steps optimizer steps (epochs = max(--min-epochs, ceil(steps / steps per epoch)), "
             "so n~30 is not starved); PGLS half as many epochs more, from the fold's pretrained 2d25, learning from "
             "the nodes of the training cases without node labels (station and patient labels kept)",
             *findings(rows)]
    write_results(name, header, summary_rows(rows, args.sizes), notes)
    write_results(name + "_runs", header, [run_row(r) for r in rows],
                  ["AUROC CI: patient-bootstrap (percentile, 95 %) on the held-out test cases"])
    plot(rows, RESULTS_DIR / f"{name}.png")
    print(f"written: {RESULTS_DIR / f'{name}.png'}")


if __name__ == "__main__":
    main()
