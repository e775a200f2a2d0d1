"""lnm_train_detector: nnU-Net v2 trained on a dataset's node masks (documentation/detection.md)."""
from __future__ import annotations

import argparse
import sys

from lnm_auto.cli.common import DEVICE_HELP, _add_location_flags, _add_threads_flag, _run, _say_device
from lnm_auto.detection.train_detector import (CONFIGURATIONS, CPU_DEFAULT, CPU_MEMORY_TARGET_GB, GPU_DEFAULT,
                                               NEEDS_NNUNET, NNUNET_CPU_TRAINER, check_folds, default_memory_target,
                                               default_setup, default_trainer, nnunet_installed, prepare_detector,
                                               train_detector_folds)
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.paths import base_folder
from lnm_auto.utils.threads import configure_threads


def train_detector_parser() -> argparse.ArgumentParser:
    """The lnm_train_detector argument parser."""
    p = argparse.ArgumentParser(
        prog="lnm_train_detector",
        description="Train nnU-Net v2 to segment the lymph nodes of a dataset (its node masks, every node one label): "
                    "exports the images and masks as an nnU-Net raw dataset, then runs nnU-Net's own planning, "
                    "preprocessing (with its integrity check) and training. nnU-Net's folders live below the "
                    "dataset's preprocessed and results folders (<results>/DatasetXXX_Name/detector/nnUNet_results). "
                    f"On a GPU: nnU-Net's defaults ({' + '.join(GPU_DEFAULT)}). On a CPU: {CPU_DEFAULT[0]}, a small "
                    f"configuration planned from nnU-Net's 2d so a CPU learns nodes within minutes ({CPU_DEFAULT[1]}, "
                    "documentation/detection.md); it is NOT a detector of nnU-Net's quality. Needs the optional nnunetv2 package: pip install -e \".[detect]\".")
    p.add_argument("dataset", help="dataset id: 001, 1 or Dataset001_Name (in $LNM_raw)")
    p.add_argument("folds", nargs="*", default=None,
                   help="nnU-Net folds 0..4 or 'all' (default: 0 1 2 3 4)")
    p.add_argument("-c", "--configuration", default=None, choices=CONFIGURATIONS,
                   help=f"nnU-Net configuration (default: {GPU_DEFAULT[0]} on cuda, {CPU_DEFAULT[0]} otherwise: lnm_auto's "
                        "CPU configuration, added to nnU-Net's plans)")
    p.add_argument("-tr", "--trainer", default=None,
                   help=f"nnU-Net trainer class, e.g. nnUNetTrainer_1epoch (default: {CPU_DEFAULT[1]} for "
                        f"{CPU_DEFAULT[0]}; for nnU-Net's configurations {GPU_DEFAULT[1]} on cuda, "
                        f"{NNUNET_CPU_TRAINER} otherwise)")
    p.add_argument("-device", "--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--iterations_per_epoch", type=int, default=0, metavar="N",
                   help="shorten nnU-Net's epochs to N training iterations (N // 5 validation): a CPU smoke run only "
                        f"(default: nnU-Net's 250; {CPU_DEFAULT[0]}: its planned number)")
    p.add_argument("-gpu_memory_target", "--gpu_memory_target", type=float, default=None, metavar="GB",
                   help="nnU-Net's -gpu_memory_target: the memory its batch is planned for, in plans "
                        "nnUNetPlans_<GB>GB (default: nnU-Net's own, 8, on cuda; "
                        f"{CPU_MEMORY_TARGET_GB:g} otherwise, so a CPU iteration takes seconds, not half a minute; "
                        f"{CPU_DEFAULT[0]} plans its own batch)")
    p.add_argument("--skip_preprocessing", action="store_true",
                   help="use the export and nnU-Net preprocessing of an earlier run (default: export and preprocess "
                        "again, so a changed dataset is never trained on stale data)")
    p.add_argument("--c", "--continue", dest="continue_training", action="store_true",
                   help="continue each fold from nnU-Net's latest checkpoint (default: start afresh)")
    _add_threads_flag(p)
    _add_location_flags(p, "raw", "preprocessed", "results")
    return p


def _train_detector(args: argparse.Namespace) -> int:
    if not nnunet_installed():
        raise LNMError(NEEDS_NNUNET)
    folds = check_folds(args.folds)     # before the export and nnU-Net's preprocessing, which take minutes
    threads = configure_threads(args.num_threads, uses_torch=False)
    device = _say_device(args.device)
    configuration = args.configuration or default_setup(device)[0]
    trainer = args.trainer or default_trainer(configuration, device)
    memory_target = (args.gpu_memory_target if args.gpu_memory_target is not None
                     else default_memory_target(device, configuration))
    if memory_target is not None and memory_target <= 0:
        raise LNMError(f"-gpu_memory_target must be a positive number of GB, got {memory_target:g}")
    if args.iterations_per_epoch < 0:
        raise LNMError(f"--iterations_per_epoch must be 0 (nnU-Net's) or more, got {args.iterations_per_epoch}")
    if device != "cuda":
        print(f"{configuration} + {trainer} on {device}: a CPU detector, not nnU-Net's quality "
              "(train on a GPU for that)", flush=True)
    run = prepare_detector(args.dataset, base_folder("raw", args.raw), base_folder("preprocessed", args.preprocessed),
                           base_folder("results", args.results), configuration, trainer, threads,
                           args.skip_preprocessing, memory_target_gb=memory_target)
    train_detector_folds(run, folds, device, threads, args.continue_training, args.iterations_per_epoch)
    for folder in run.fold_folders:
        print(f"detector {folder.name}: {folder}")
    return 0


def train_detector_entry(argv: list[str] | None = None) -> int:
    """``lnm_train_detector`` with ``argv``; returns the exit status."""
    return _run("lnm_train_detector", _train_detector, train_detector_parser(), argv)


def train_detector_cli() -> None:
    """Console entry point of lnm_train_detector."""
    sys.exit(train_detector_entry())
