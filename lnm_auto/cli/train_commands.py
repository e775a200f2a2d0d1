"""lnm_train and lnm_pretrain."""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from lnm_auto.cli.common import DEVICE_HELP, _add_location_flags, _add_progress_flag, _add_threads_flag, _run, _say_device
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.paths import base_folder


# ---- lnm_train ------------------------------------------------------------------------------------
def train_parser() -> argparse.ArgumentParser:
    """The lnm_train argument parser."""
    p = argparse.ArgumentParser(prog="lnm_train", description="Train one fold of one configuration, or re-run the "
                                                              "validation of a trained fold (--val).")
    p.add_argument("dataset", help="dataset id: 001, 1 or Dataset001_Name")
    p.add_argument("configuration", help="a configuration of the plans, e.g. 2d25 or 3d_resenc")
    p.add_argument("fold", help="fold number (0..4) or 'all'")
    p.add_argument("-tr", "--trainer", default=None,
                   help="trainer class, optionally NAME_<N>epochs (nnU-Net's NAME_1epoch is read as NAME_1epochs, "
                        "said in one line; a finished fold is retrained only under its folder's own name) "
                        "(default: the scheme the plans recommend for the "
                        "dataset's label mix, e.g. LNMTrainer then LNMTrainerPGLS, each stage in its own model folder; "
                        "radiomics: RadiomicsTrainer; deep_radiomics: DeepRadiomicsTrainer)")
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
                   help="background augmentation processes per training process (default: $LNM_n_proc_DA, else "
                        "its share of the cores - 1)")
    p.add_argument("-num_gpus", "--num_gpus", type=int, default=1,
                   help="train on N processes of this machine with DistributedDataParallel, as torchrun "
                        "--standalone --nproc_per_node N would: one per GPU with -device cuda, N gloo processes with "
                        "-device cpu; the plan's batch is split over them (documentation/scaling.md) (default: 1)")
    _add_progress_flag(p)
    _add_threads_flag(p)
    _add_location_flags(p, "raw", "preprocessed", "results")
    return p


def _train(args: argparse.Namespace, argv: list[str]) -> int:
    from lnm_auto.training.distributed import is_main_process, launch_local_processes
    from lnm_auto.training.run import check_processes_fit_batch, distributed_training
    from lnm_auto.utils.devices import resolve_device
    if args.val and (args.continue_training or args.pretrained_weights):
        raise LNMError("--val only validates a trained fold; leave out --c and -pretrained_weights")
    if args.num_gpus != 1:   # each of the N processes parses the same arguments, told to be one of them
        if args.num_gpus > 1:
            check_processes_fit_batch(args.dataset, args.configuration, base_folder("preprocessed", args.preprocessed),
                                      args.plans_name, args.num_gpus)
        return launch_local_processes(args.num_gpus, resolve_device(args.device), train_entry,
                                      [*argv, "-num_gpus", "1"])
    main = is_main_process()   # under torchrun only rank 0 talks
    device = _say_device(args.device) if main else resolve_device(args.device)
    with distributed_training(device):
        return _train_stages(args, device, print if main else (lambda *a: None))


def _train_stages(args: argparse.Namespace, device: str, say) -> int:
    from lnm_auto.training.registry import run_name_note
    from lnm_auto.training.run import run_training, run_validation, setup_trainer, training_scheme
    preprocessed, results = base_folder("preprocessed", args.preprocessed), base_folder("results", args.results)
    raw = args.raw or None   # radiomics reads the raw images ($LNM_raw when not given)
    stages = training_scheme(args.dataset, args.configuration, preprocessed, args.plans_name, args.trainer)
    if len(stages) > 1:
        say(f"training scheme (the plans' recommendation for this label mix): {' -> '.join(stages)}")
    checkpoint = "checkpoint_best.pth" if args.val_best else "checkpoint_final.pth"
    for i, stage in enumerate(stages):
        def before_writing(run_name: str, epochs: int, fold_folder: Path, stage: str = stage) -> None:
            """Before setup loads or writes anything: refuse retraining a finished fold under another spelling,
            and say how -tr was read when the model folder's name differs."""
            note = run_name_note(stage, run_name, epochs) if args.trainer else None
            if note and not (args.val or args.continue_training):
                refuse_retraining_under_another_name(stage, run_name, fold_folder)
            if note:   # the model folder differs from what -tr said: one line, before any training
                say(note)
        trainer = setup_trainer(args.dataset, args.configuration, args.fold, preprocessed, results, stage,
                                args.plans_name, device, args.epochs, args.num_workers, raw_root=raw,
                                before_writing=before_writing)
        if not args.val:
            run_training(trainer, args.continue_training, args.pretrained_weights if i == 0 else None,
                         save_probabilities=args.npz and not args.val_best)
            if not args.val_best:
                say(f"results in {trainer.output_folder}")
                continue
        run_validation(trainer, checkpoint, args.npz)
        say(f"validation with {checkpoint} in {trainer.output_folder / 'validation'}")
    return 0


# what a finished fold holds: a network's final checkpoint, or the fitted radiomics model
FINISHED_FOLD_FILES = ("checkpoint_final.pth", "radiomics_model.json")


def refuse_retraining_under_another_name(typed: str, run_name: str, folder: Path) -> None:
    """``-tr LNMTrainer_1epoch`` trains into LNMTrainer_1epochs: a finished fold there is retrained only when the
    folder's own name is given, never through another spelling (checked before anything is loaded or written)."""
    from lnm_auto.training.registry import split_trainer_name
    if split_trainer_name(typed)[1] is None:   # a plain class name (with --epochs): no other spelling involved
        return
    if any((folder / f).is_file() for f in FINISHED_FOLD_FILES):
        raise LNMError(f"-tr {typed} is read as {run_name}, whose {folder.name} is already trained "
                       f"({folder}); to retrain it pass -tr {run_name}, to continue it add --c")


def train_entry(argv: list[str] | None = None) -> int:
    """Run lnm_train with ``argv``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return _run("lnm_train", functools.partial(_train, argv=argv), train_parser(), argv)


def train_cli() -> None:
    """Console entry point of lnm_train."""
    sys.exit(train_entry())


# ---- lnm_pretrain ---------------------------------------------------------------------------------
def pretrain_parser() -> argparse.ArgumentParser:
    """The lnm_pretrain argument parser."""
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
    _add_threads_flag(p)
    _add_location_flags(p, "preprocessed", "results")
    return p


def _pretrain(args: argparse.Namespace) -> int:
    from lnm_auto.training.distributed import is_main_process
    from lnm_auto.training.run import distributed_training, resolve_device, setup_pretrainer
    device = _say_device(args.device) if is_main_process() else resolve_device(args.device)
    with distributed_training(device):   # under torchrun as lnm_train
        trainer = setup_pretrainer(args.dataset, args.configuration, args.fold,
                                   base_folder("preprocessed", args.preprocessed), base_folder("results", args.results),
                                   args.plans_name, device, args.epochs, args.num_workers)
        weights = trainer.run_pretraining()
        if is_main_process():
            print(f"pretrained weights: {weights}")
    return 0


def pretrain_entry(argv: list[str] | None = None) -> int:
    """Run lnm_pretrain with ``argv``; returns the exit status."""
    return _run("lnm_pretrain", _pretrain, pretrain_parser(), argv)


def pretrain_cli() -> None:
    """Console entry point of lnm_pretrain."""
    sys.exit(pretrain_entry())
