"""Command-line entry points. Argument parsing only: the work is done by library functions."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.paths import base_folder


def _run(prog: str, fn: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser,
         argv: list[str] | None) -> int:
    args = parser.parse_args(argv)
    try:
        return int(fn(args) or 0)
    except LNMError as e:
        for line in str(e).splitlines():
            print(f"{prog}: error: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _add_location_flags(p: argparse.ArgumentParser, *kinds: str) -> None:
    for kind in kinds:
        p.add_argument(f"--{kind}", default=None, metavar="DIR",
                       help=f"{kind} data folder (default: $LNM_{kind})")


# ---- lnm_make_phantom -----------------------------------------------------------------------------
def make_phantom_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lnm_make_phantom",
                                description="Write a synthetic CT/MRI lymph node dataset in the raw dataset convention.")
    p.add_argument("-d", "--dataset_id", type=int, default=999)
    p.add_argument("--name", default="Phantom")
    p.add_argument("--cases", type=int, default=40, help="training cases")
    p.add_argument("--test-cases", type=int, default=10, help="test cases (imagesTs/nodesTs)")
    p.add_argument("--modality", choices=["CT", "MRI"], default="CT")
    p.add_argument("--labeled-fraction", type=float, default=1.0,
                   help="fraction of training cases that keep their node labels (the rest: station/patient only)")
    p.add_argument("--difficulty", type=float, default=0.5, help="0 easy .. 1 hard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--oblique-deg", type=float, default=0.0, help="rotate the image axes by this angle")
    _add_location_flags(p, "raw")
    return p


def _make_phantom(args: argparse.Namespace) -> int:
    from lnm_auto.datasets.phantom import PhantomConfig, make_phantom_dataset
    if not 0.0 <= args.labeled_fraction <= 1.0:
        raise LNMError(f"--labeled-fraction must be within [0, 1], got {args.labeled_fraction}")
    if args.cases < 2:
        raise LNMError(f"--cases must be at least 2, got {args.cases}")
    config = PhantomConfig(n_cases=args.cases, n_test_cases=args.test_cases, modality=args.modality,
                           labeled_fraction=args.labeled_fraction, difficulty=args.difficulty, seed=args.seed,
                           oblique_deg=args.oblique_deg)
    out = make_phantom_dataset(base_folder("raw", args.raw), args.dataset_id, args.name, config, progress=True)
    print(f"phantom dataset written to {out}")
    return 0


def make_phantom_entry(argv: list[str] | None = None) -> int:
    return _run("lnm_make_phantom", _make_phantom, make_phantom_parser(), argv)


# ---- lnm_plan_and_preprocess ----------------------------------------------------------------------
def plan_and_preprocess_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lnm_plan_and_preprocess",
                                description="Verify a raw dataset, fingerprint it, plan every configuration and "
                                            "write the npz crop caches.")
    p.add_argument("-d", "--dataset", nargs="+", required=True, help="dataset id(s): 001, 1 or Dataset001_Name")
    p.add_argument("-pl", "--planner", default=None, choices=["LNMPlanner", "LNMPlannerCPU"],
                   help="LNMPlanner: GPU-sized networks; LNMPlannerCPU: CPU-sized (default: CPU unless CUDA is present)")
    p.add_argument("-p", "--plans_name", default="LNMPlans", help="name of the plans file (default LNMPlans)")
    p.add_argument("-np", "--num_processes", type=int, default=2, help="worker processes (default 2)")
    verify = p.add_mutually_exclusive_group()
    verify.add_argument("--verify", dest="verify", action="store_true", default=True,
                        help="check the whole dataset first (default)")
    verify.add_argument("--no-verify", dest="verify", action="store_false", help="skip the dataset check")
    p.add_argument("--clean", action="store_true", help="redo every case and the folds, even if up to date")
    p.add_argument("--no_pp", action="store_true", help="plan only, do not write the crop caches")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--split_components", nargs="?", type=float, const=10.0, default=None, metavar="MIN_MM3",
                   help="first turn binary node masks (nodesTr/, nodesTs/) into instance masks in place: one node per "
                        "26-connected component of at least MIN_MM3 (default 10) mm^3; originals kept in "
                        "nodesTr_binary/, new nodes added to nodes.csv with empty labels")
    _add_location_flags(p, "raw", "preprocessed")
    return p


def _plan_and_preprocess(args: argparse.Namespace) -> int:
    from lnm_auto.planning.plan_and_preprocess import plan_and_preprocess
    raw, pre = base_folder("raw", args.raw), base_folder("preprocessed", args.preprocessed)
    for d in args.dataset:
        r = plan_and_preprocess(d, raw, pre, args.planner, args.plans_name, max(1, args.num_processes),
                                args.verify, args.clean, not args.no_pp, not args.quiet, args.split_components)
        g = r.plans.scales["global"]
        print(f"{r.preprocessed_dataset.name}: plans {r.plans_file} ({r.plans.planner}); target spacing "
              f"{_mm(r.plans.target_spacing_mm)} mm; ROI {'x'.join(map(str, g.roi_shape))} voxels = "
              f"{_mm(g.roi_size_mm)} mm; configurations {', '.join(r.plans.configurations)}"
              + (f"; crops in {r.crops_dir}" if r.crops_dir else ""))
    return 0


def _mm(values) -> str:
    return " x ".join(f"{v:.3g}" for v in values)


def plan_and_preprocess_entry(argv: list[str] | None = None) -> int:
    return _run("lnm_plan_and_preprocess", _plan_and_preprocess, plan_and_preprocess_parser(), argv)


# ---- lnm_train ------------------------------------------------------------------------------------
def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lnm_train", description="Train one fold of one configuration.")
    p.add_argument("dataset", help="dataset id: 001, 1 or Dataset001_Name")
    p.add_argument("configuration", help="a configuration of the plans, e.g. 2d25 or 3d_resenc")
    p.add_argument("fold", help="fold number (0..4) or 'all'")
    p.add_argument("-tr", "--trainer", default="LNMTrainer", help="trainer class (default LNMTrainer)")
    p.add_argument("-p", "--plans_name", default="LNMPlans")
    p.add_argument("--epochs", type=int, default=None, help="override the number of epochs (quick experiments)")
    p.add_argument("-pretrained_weights", "--pretrained_weights", default=None, metavar="FILE",
                   help="state dict (or checkpoint) whose matching tensors initialise the network")
    p.add_argument("--c", "--continue", dest="continue_training", action="store_true",
                   help="continue from checkpoint_latest.pth")
    p.add_argument("-device", "--device", default="cpu", help="cpu (default), cuda or mps")
    p.add_argument("-num_workers", "--num_workers", type=int, default=None,
                   help="background augmentation processes (default: $LNM_n_proc_DA or cores - 1)")
    _add_location_flags(p, "preprocessed", "results")
    return p


def _train(args: argparse.Namespace) -> int:
    from lnm_auto.training.run import run_training, setup_trainer
    trainer = setup_trainer(args.dataset, args.configuration, args.fold, base_folder("preprocessed", args.preprocessed),
                            base_folder("results", args.results), args.trainer, args.plans_name, args.device,
                            args.epochs, args.num_workers)
    run_training(trainer, args.continue_training, args.pretrained_weights)
    print(f"results in {trainer.output_folder}")
    return 0


def train_entry(argv: list[str] | None = None) -> int:
    return _run("lnm_train", _train, train_parser(), argv)


def train_cli() -> None:
    sys.exit(train_entry())


# ---- lnm_pretrain ---------------------------------------------------------------------------------
def pretrain_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lnm_pretrain", description="WSP positional contrastive pre-training on all "
                                                                 "nodes; writes weights for lnm_train -pretrained_weights.")
    p.add_argument("dataset")
    p.add_argument("configuration")
    p.add_argument("fold", nargs="?", default="all",
                   help="pre-train on this fold's training cases (default: all cases; use the fold you will train "
                        "so its validation patients' weak labels stay unseen)")
    p.add_argument("-p", "--plans_name", default="LNMPlans")
    p.add_argument("--epochs", type=int, default=None, help="default 20")
    p.add_argument("-device", "--device", default="cpu")
    p.add_argument("-num_workers", "--num_workers", type=int, default=None)
    _add_location_flags(p, "preprocessed", "results")
    return p


def _pretrain(args: argparse.Namespace) -> int:
    from lnm_auto.training.run import setup_pretrainer
    trainer = setup_pretrainer(args.dataset, args.configuration, args.fold, base_folder("preprocessed", args.preprocessed),
                               base_folder("results", args.results), args.plans_name, args.device, args.epochs,
                               args.num_workers)
    print(f"pretrained weights: {trainer.run_pretraining()}")
    return 0


def pretrain_entry(argv: list[str] | None = None) -> int:
    return _run("lnm_pretrain", _pretrain, pretrain_parser(), argv)


def pretrain_cli() -> None:
    sys.exit(pretrain_entry())


# ---- lnm_predict ----------------------------------------------------------------------------------
def predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lnm_predict", description="Score every lymph node of new cases with the fold "
                                                                "ensemble of a trained model.")
    p.add_argument("-i", "--input", required=True, help="folder of cases (see documentation/outputs.md)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("-d", "--dataset", default=None, help="dataset of the model (optional if only one model is trained)")
    p.add_argument("-c", "--configuration", default=None)
    p.add_argument("-tr", "--trainer", default="LNMTrainer")
    p.add_argument("-p", "--plans_name", default="LNMPlans")
    p.add_argument("-m", "--model", default=None, help="a model folder or a zip from lnm_export_model")
    p.add_argument("-f", "--folds", nargs="+", default=None, help="folds to ensemble (default: every trained fold)")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
    p.add_argument("-device", "--device", default="cpu", help="cpu (default), cuda or mps")
    p.add_argument("-npp", "--num_processes_preprocessing", type=int, default=1)
    p.add_argument("--disable_tta", action="store_true", help="no test-time mirroring")
    p.add_argument("--no_probmaps", action="store_true", help="do not write <case>_probmap.nii.gz")
    p.add_argument("--quiet", action="store_true")
    _add_location_flags(p, "results")
    return p


def _predict(args: argparse.Namespace) -> int:
    import os
    from lnm_auto.inference.model import find_model
    from lnm_auto.inference.predictor import predict_folder
    from lnm_auto.training.run import resolve_device
    results = Path(args.results) if args.results else (Path(os.environ["LNM_results"]) if os.environ.get("LNM_results") else None)
    folder = find_model(results, args.dataset, args.configuration, args.trainer, args.plans_name, args.model)
    info = predict_folder(Path(args.input), Path(args.output), folder, args.folds, args.checkpoint,
                          resolve_device(args.device), args.num_processes_preprocessing, not args.disable_tta,
                          not args.no_probmaps, not args.quiet)
    print(f"{info['n_nodes']} nodes of {info['n_cases']} case(s) scored by folds {', '.join(info['folds'])} of "
          f"{folder}; results in {args.output}")
    return 0


def predict_entry(argv: list[str] | None = None) -> int:
    return _run("lnm_predict", _predict, predict_parser(), argv)


def predict_cli() -> None:
    sys.exit(predict_entry())


# ---- lnm_export_model -----------------------------------------------------------------------------
def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lnm_export_model", description="Pack a trained model into one zip.")
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("-c", "--configuration", required=True)
    p.add_argument("-o", "--output", required=True, help="the zip to write")
    p.add_argument("-tr", "--trainer", default="LNMTrainer")
    p.add_argument("-p", "--plans_name", default="LNMPlans")
    p.add_argument("-f", "--folds", nargs="+", default=None)
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
    _add_location_flags(p, "results")
    return p


def _export(args: argparse.Namespace) -> int:
    from lnm_auto.inference.model import export_model, find_model
    folder = find_model(base_folder("results", args.results), args.dataset, args.configuration, args.trainer,
                        args.plans_name)
    out = export_model(folder, Path(args.output), args.folds, args.checkpoint)
    print(f"model {folder.name} written to {out}")
    return 0


def export_entry(argv: list[str] | None = None) -> int:
    return _run("lnm_export_model", _export, export_parser(), argv)


def export_cli() -> None:
    sys.exit(export_entry())


# ---- lnm_evaluate ---------------------------------------------------------------------------------
def evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lnm_evaluate", description="AUROC, operating points, bootstrap CIs, DeLong; "
                                                                 "node, station and patient level.")
    p.add_argument("-ref", "--reference", required=True, help="reference nodes CSV: case,node,station,label")
    p.add_argument("-pred", "--prediction", required=True, help="predicted nodes.csv from lnm_predict")
    p.add_argument("-o", "--output", required=True, help="report folder")
    p.add_argument("--ref_stations", default=None, help="reference stations CSV (else derived from node labels)")
    p.add_argument("--ref_patients", default=None, help="reference patients CSV (else derived from node labels)")
    p.add_argument("--compare", default=None, help="a second nodes.csv: DeLong test of the AUROC difference")
    p.add_argument("--n_bootstrap", type=int, default=1000)
    return p


def _evaluate(args: argparse.Namespace) -> int:
    from lnm_auto.evaluation.report import evaluate, format_table
    metrics = evaluate(args.reference, args.prediction, args.output, args.ref_stations, args.ref_patients,
                       args.compare, n_bootstrap=args.n_bootstrap)
    print(format_table(metrics))
    print(f"report: {Path(args.output) / 'metrics.json'}, {Path(args.output) / 'roc.png'}, "
          f"{Path(args.output) / 'calibration.png'}")
    return 0


def evaluate_entry(argv: list[str] | None = None) -> int:
    return _run("lnm_evaluate", _evaluate, evaluate_parser(), argv)


def evaluate_cli() -> None:
    sys.exit(evaluate_entry())


# ---- lnm_demo -------------------------------------------------------------------------------------
def demo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lnm_demo", description="End to end on the embedded phantom: make data, plan, "
                                                             "train the folds, predict the test cases, evaluate.")
    p.add_argument("--workdir", default="lnm_demo_data", help="where everything is written (default ./lnm_demo_data)")
    p.add_argument("-c", "--configuration", default="2d25")
    p.add_argument("-f", "--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("-tr", "--trainer", default="LNMTrainer_5epochs")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--cases", type=int, default=40)
    p.add_argument("--test-cases", type=int, default=20)
    return p


def _demo(args: argparse.Namespace) -> int:
    from lnm_auto.demo import run_demo
    run_demo(Path(args.workdir), args.configuration, tuple(args.folds), args.trainer, args.epochs, args.cases,
             args.test_cases)
    return 0


def demo_entry(argv: list[str] | None = None) -> int:
    return _run("lnm_demo", _demo, demo_parser(), argv)


def demo_cli() -> None:
    sys.exit(demo_entry())


# ---- lnm_convert (parser and work in lnm_auto.conversion) ----------------------------------------
def convert_entry(argv: list[str] | None = None) -> int:
    from lnm_auto.conversion.cli import convert_entry as run_convert
    return run_convert(argv)


def convert_cli() -> None:
    sys.exit(convert_entry())


COMMANDS: dict[str, Callable[[list[str] | None], int]] = {
    "pretrain": pretrain_entry,
    "demo": demo_entry,
    "predict": predict_entry,
    "export_model": export_entry,
    "evaluate": evaluate_entry,
    "make_phantom": make_phantom_entry,
    "plan_and_preprocess": plan_and_preprocess_entry,
    "train": train_entry,
    "convert": convert_entry,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0].removeprefix("lnm_") not in COMMANDS:
        names = ", ".join(COMMANDS)
        print(f"usage: python -m lnm_auto COMMAND [args]\ncommands: {names}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0].removeprefix("lnm_")](argv[1:])


def make_phantom_cli() -> None:
    sys.exit(make_phantom_entry())


def plan_and_preprocess_cli() -> None:
    sys.exit(plan_and_preprocess_entry())
