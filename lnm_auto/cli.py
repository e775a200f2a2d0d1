"""Command-line entry points. Argument parsing only: the work is done by library functions.

At this boundary: bad input (LNMError) is one line per problem and exit status 1, our own bugs keep their
traceback, and warnings raised inside third-party packages (torch, pandas, scikit-learn, batchgenerators)
are hidden; lnm_auto's own warnings always show. ``LNM_DEBUG=1`` shows every warning and the traceback of
input errors too.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Callable

from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.paths import base_folder
from lnm_auto.utils.threads import configure_threads


DEBUG_ENV = "LNM_DEBUG"
NO_PROGRESS_ENV = "LNM_NO_PROGRESS"            # read by lnm_auto.training.progress.show_progress
OWN_PACKAGE = r"lnm_auto(\.|$)"
DEVICE_HELP = ("auto (cuda when available, then mps, then cpu; the command prints which), cuda, mps or cpu "
               "(default: %(default)s)")


def debug_mode() -> bool:
    """$LNM_DEBUG=1: every warning, and tracebacks for input errors too."""
    return os.environ.get(DEBUG_ENV, "0") == "1"


def hide_third_party_warnings() -> None:
    """Ignore warnings raised from modules outside lnm_auto (a torch FutureWarning at import, pandas and
    scikit-learn deprecations): users cannot act on them. Warnings attributed to lnm_auto code still show."""
    warnings.filterwarnings("ignore", module=f"(?!{OWN_PACKAGE})")


def _run(prog: str, fn: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser,
         argv: list[str] | None) -> int:
    args = parser.parse_args(argv)
    debug = debug_mode()
    saved_no_progress = os.environ.get(NO_PROGRESS_ENV)
    if getattr(args, "disable_progress_bar", False):
        os.environ[NO_PROGRESS_ENV] = "1"    # the switch every progress bar reads, worker processes included
    try:
        with warnings.catch_warnings():      # filters restored afterwards (commands also run in-process)
            if debug:
                warnings.simplefilter("default")
            else:
                hide_third_party_warnings()
            configure_threads(getattr(args, "num_threads", None))   # before torch loads: documentation/threads.md
            return int(fn(args) or 0)
    except LNMError as e:
        if debug:
            traceback.print_exc()
        for line in str(e).splitlines():
            print(f"{prog}: error: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        if saved_no_progress is None:
            os.environ.pop(NO_PROGRESS_ENV, None)
        else:
            os.environ[NO_PROGRESS_ENV] = saved_no_progress


def _add_location_flags(p: argparse.ArgumentParser, *kinds: str) -> None:
    for kind in kinds:
        p.add_argument(f"--{kind}", default=None, metavar="DIR",
                       help=f"{kind} data folder (default: $LNM_{kind})")


def _add_progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--disable_progress_bar", action="store_true",
                   help="no progress bars, whole lines only (same as $LNM_NO_PROGRESS=1; bars are off anyway when "
                        "stdout is not a terminal) (default: bars on a terminal)")


def _say_device(requested: str) -> str:
    """Resolve -device and print the choice (auto picks cuda, then mps, then cpu)."""
    from lnm_auto.training.run import resolve_device
    device = resolve_device(requested)
    how = "picked automatically: cuda > mps > cpu; choose with -device" if requested.lower() == "auto" else "-device"
    print(f"device: {device} ({how})", flush=True)
    return device


# ---- lnm_make_phantom -----------------------------------------------------------------------------
def make_phantom_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lnm_make_phantom",
                                description="Write a synthetic CT/MRI lymph node dataset in the raw dataset convention.")
    p.add_argument("-d", "--dataset_id", type=int, default=999, help="id of the new dataset (default: %(default)s)")
    p.add_argument("--name", default="Phantom", help="name of the new dataset (default: %(default)s)")
    p.add_argument("--cases", type=int, default=40, help="training cases (default: %(default)s)")
    p.add_argument("--test-cases", type=int, default=10, help="test cases, imagesTs/nodesTs (default: %(default)s)")
    p.add_argument("--modality", choices=["CT", "MRI"], default="CT", help="image modality (default: %(default)s)")
    p.add_argument("--labeled-fraction", type=float, default=1.0,
                   help="fraction of training cases that keep their node labels, the rest station/patient labels "
                        "only (default: %(default)s)")
    p.add_argument("--difficulty", type=float, default=0.5, help="0 easy .. 1 hard (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--oblique-deg", type=float, default=0.0,
                   help="rotate the image axes by this angle in degrees (default: %(default)s)")
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
    p.add_argument("-p", "--plans_name", default="LNMPlans", help="name of the plans file (default: %(default)s)")
    p.add_argument("-np", "--num_processes", type=int, default=2, help="worker processes (default: %(default)s)")
    verify = p.add_mutually_exclusive_group()
    verify.add_argument("--verify", dest="verify", action="store_true", default=True,
                        help="check the whole dataset first (default)")
    verify.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the dataset check (default: check)")
    p.add_argument("--clean", action="store_true",
                   help="redo every case and the folds, even if up to date (default: only what changed)")
    p.add_argument("--no_pp", action="store_true", help="plan only, do not write the crop caches (default: write them)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (default: bars on a terminal)")
    _add_progress_flag(p)
    p.add_argument("--split_components", nargs="?", type=float, const=10.0, default=None, metavar="MIN_MM3",
                   help="first turn binary node masks (nodesTr/, nodesTs/) into instance masks in place: one node per "
                        "26-connected component of at least MIN_MM3 (default 10) mm^3; originals kept in "
                        "nodesTr_binary/, new nodes added to nodes.csv with empty labels")
    _add_location_flags(p, "raw", "preprocessed")
    return p


def _plan_and_preprocess(args: argparse.Namespace) -> int:
    from lnm_auto.planning.plan_and_preprocess import plan_and_preprocess
    from lnm_auto.training.progress import show_progress
    raw, pre = base_folder("raw", args.raw), base_folder("preprocessed", args.preprocessed)
    progress = not args.quiet and show_progress()   # no bars where they would write \r into a log
    for d in args.dataset:
        r = plan_and_preprocess(d, raw, pre, args.planner, args.plans_name, max(1, args.num_processes),
                                args.verify, args.clean, not args.no_pp, progress, args.split_components)
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
    p = argparse.ArgumentParser(prog="lnm_train", description="Train one fold of one configuration, or re-run the "
                                                              "validation of a trained fold (--val).")
    p.add_argument("dataset", help="dataset id: 001, 1 or Dataset001_Name")
    p.add_argument("configuration", help="a configuration of the plans, e.g. 2d25 or 3d_resenc")
    p.add_argument("fold", help="fold number (0..4) or 'all'")
    p.add_argument("-tr", "--trainer", default="LNMTrainer",
                   help="trainer class, optionally NAME_<N>epochs (default: %(default)s)")
    p.add_argument("-p", "--plans_name", default="LNMPlans", help="plans to train with (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None,
                   help="override the number of epochs (default: the trainer's, from the plans)")
    p.add_argument("-pretrained_weights", "--pretrained_weights", default=None, metavar="FILE",
                   help="state dict (or checkpoint) whose matching tensors initialise the network (default: none)")
    p.add_argument("--c", "--continue", dest="continue_training", action="store_true",
                   help="continue from checkpoint_latest.pth (checkpoint_final.pth for a finished fold) "
                        "(default: start afresh)")
    p.add_argument("--val", action="store_true",
                   help="only re-run the validation of a trained fold with checkpoint_final.pth, no training "
                        "(default: train)")
    p.add_argument("--val_best", action="store_true",
                   help="validate with checkpoint_best.pth instead of checkpoint_final.pth: after training, or alone "
                        "with --val (default: final)")
    p.add_argument("--npz", action="store_true",
                   help="also save every validation node's probability as validation/probabilities.npz "
                        "(default: not saved)")
    p.add_argument("-device", "--device", default="auto", help=DEVICE_HELP)
    p.add_argument("-num_workers", "--num_workers", type=int, default=None,
                   help="background augmentation processes (default: $LNM_n_proc_DA or cores - 1)")
    _add_progress_flag(p)
    _add_location_flags(p, "preprocessed", "results")
    return p


def _train(args: argparse.Namespace) -> int:
    from lnm_auto.training.run import run_training, run_validation, setup_trainer
    if args.val and (args.continue_training or args.pretrained_weights):
        raise LNMError("--val only validates a trained fold; leave out --c and -pretrained_weights")
    device = _say_device(args.device)
    trainer = setup_trainer(args.dataset, args.configuration, args.fold, base_folder("preprocessed", args.preprocessed),
                            base_folder("results", args.results), args.trainer, args.plans_name, device,
                            args.epochs, args.num_workers)
    checkpoint = "checkpoint_best.pth" if args.val_best else "checkpoint_final.pth"
    if not args.val:
        run_training(trainer, args.continue_training, args.pretrained_weights,
                     save_probabilities=args.npz and not args.val_best)
        if not args.val_best:
            print(f"results in {trainer.output_folder}")
            return 0
    run_validation(trainer, checkpoint, args.npz)
    print(f"validation with {checkpoint} in {trainer.output_folder / 'validation'}")
    return 0


def train_entry(argv: list[str] | None = None) -> int:
    return _run("lnm_train", _train, train_parser(), argv)


def train_cli() -> None:
    sys.exit(train_entry())


# ---- lnm_pretrain ---------------------------------------------------------------------------------
def pretrain_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lnm_pretrain", description="WSP positional contrastive pre-training on all "
                                                                 "nodes; writes weights for lnm_train -pretrained_weights.")
    p.add_argument("dataset", help="dataset id: 001, 1 or Dataset001_Name")
    p.add_argument("configuration", help="a configuration of the plans, e.g. 2d25 or 3d_resenc")
    p.add_argument("fold", nargs="?", default="all",
                   help="pre-train on this fold's training cases; use the fold you will train so its validation "
                        "patients' weak labels stay unseen (default: %(default)s, every case)")
    p.add_argument("-p", "--plans_name", default="LNMPlans", help="plans to use (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="number of epochs (default: 20)")
    p.add_argument("-device", "--device", default="auto", help=DEVICE_HELP)
    p.add_argument("-num_workers", "--num_workers", type=int, default=None,
                   help="background augmentation processes (default: $LNM_n_proc_DA or cores - 1)")
    _add_progress_flag(p)
    _add_location_flags(p, "preprocessed", "results")
    return p


def _pretrain(args: argparse.Namespace) -> int:
    from lnm_auto.training.run import setup_pretrainer
    device = _say_device(args.device)
    trainer = setup_pretrainer(args.dataset, args.configuration, args.fold, base_folder("preprocessed", args.preprocessed),
                               base_folder("results", args.results), args.plans_name, device, args.epochs,
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
    p.add_argument("-d", "--dataset", default=None,
                   help="dataset of the model (default: the only trained model's)")
    p.add_argument("-c", "--configuration", default=None,
                   help="configuration of the model (default: the only trained model's)")
    p.add_argument("-tr", "--trainer", default="LNMTrainer", help="trainer of the model (default: %(default)s)")
    p.add_argument("-p", "--plans_name", default="LNMPlans", help="plans of the model (default: %(default)s)")
    p.add_argument("-m", "--model", default=None,
                   help="a model folder or a zip from lnm_export_model (default: found from -d/-c in $LNM_results)")
    p.add_argument("-f", "--folds", nargs="+", default=None, help="folds to ensemble (default: every planned fold)")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth",
                   help="checkpoint file of each fold (default: %(default)s)")
    p.add_argument("-device", "--device", default="auto", help=DEVICE_HELP)
    p.add_argument("-npp", "--num_processes_preprocessing", type=int, default=1,
                   help="processes preprocessing cases (default: %(default)s)")
    p.add_argument("--disable_tta", action="store_true", help="no test-time mirroring, 4x faster (default: mirror)")
    p.add_argument("--no_probmaps", action="store_true",
                   help="do not write <case>_probmap.nii.gz (default: write them)")
    p.add_argument("--quiet", action="store_true", help="no progress output (default: progress shown)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo cases already predicted in -o and replace that folder's previous outputs (default: "
                        "skip finished cases, refuse outputs of other settings)")
    p.add_argument("-num_parts", "--num_parts", type=int, default=1,
                   help="split the cases into this many parts, e.g. one per machine (default: %(default)s)")
    p.add_argument("-part_id", "--part_id", type=int, default=0,
                   help="which part this run predicts, 0..num_parts-1; each part writes nodes_part<K>.csv "
                        "(default: %(default)s)")
    _add_progress_flag(p)
    _add_location_flags(p, "results")
    return p


def _predict(args: argparse.Namespace) -> int:
    from lnm_auto.inference.model import find_model
    from lnm_auto.inference.predictor import predict_folder
    results = Path(args.results) if args.results else (Path(os.environ["LNM_results"]) if os.environ.get("LNM_results") else None)
    folder = find_model(results, args.dataset, args.configuration, args.trainer, args.plans_name, args.model)
    device = _say_device(args.device)
    info = predict_folder(Path(args.input), Path(args.output), folder, args.folds, args.checkpoint,
                          device, args.num_processes_preprocessing, not args.disable_tta,
                          not args.no_probmaps, not args.quiet, args.overwrite, args.num_parts,
                          args.part_id)
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
    p.add_argument("-d", "--dataset", required=True, help="dataset id: 001, 1 or Dataset001_Name")
    p.add_argument("-c", "--configuration", required=True, help="configuration of the model, e.g. 2d25")
    p.add_argument("-o", "--output", required=True, help="the zip to write")
    p.add_argument("-tr", "--trainer", default="LNMTrainer", help="trainer of the model (default: %(default)s)")
    p.add_argument("-p", "--plans_name", default="LNMPlans", help="plans of the model (default: %(default)s)")
    p.add_argument("-f", "--folds", nargs="+", default=None, help="folds to pack (default: every trained fold)")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth",
                   help="checkpoint file of each fold (default: %(default)s)")
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
    p.add_argument("--ref_stations", default=None,
                   help="reference stations CSV (default: station labels derived from node labels)")
    p.add_argument("--ref_patients", default=None,
                   help="reference patients CSV (default: patient labels derived from node labels)")
    p.add_argument("--compare", default=None,
                   help="a second nodes.csv: DeLong test of the AUROC difference (default: no comparison)")
    p.add_argument("--n_bootstrap", type=int, default=1000,
                   help="patient-bootstrap resamples for the 95%% CIs, 0 for none (default: %(default)s)")
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
    p.add_argument("--workdir", default="lnm_demo_data", help="where everything is written (default: %(default)s)")
    p.add_argument("-c", "--configuration", default="2d25", help="configuration to train (default: %(default)s)")
    p.add_argument("-f", "--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                   help="folds to train and ensemble (default: %(default)s)")
    p.add_argument("-tr", "--trainer", default="LNMTrainer_5epochs", help="trainer (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="override the number of epochs (default: the trainer's)")
    p.add_argument("--cases", type=int, default=40, help="phantom training cases (default: %(default)s)")
    p.add_argument("--test-cases", type=int, default=20, help="phantom test cases (default: %(default)s)")
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
