"""``lnm_train DATASET CONFIG FOLD``: resolve folders, set up the trainer, continue or start, train; or
re-run a finished fold's validation (``--val`` / ``--val_best``). Under torchrun, ``distributed_training``
joins the job's process group around the run (documentation/scaling.md)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from lnm_auto.configurations import KINDS, kind_of
from lnm_auto.networks import global_branch_for
from lnm_auto.planning.plan_and_preprocess import FINGERPRINT_FILE, SPLITS_FILE
from lnm_auto.planning.planner import switch_on_multitask
from lnm_auto.plans.plans import ConfigurationPlan, Plans
from lnm_auto.planning.splits import load_splits
from lnm_auto.training.distributed import DistributedRun, destroy_process_group, init_process_group, is_main_process
from lnm_auto.training.pretraining import WSPPretrainer
from lnm_auto.training.registry import split_trainer_name, trainer_class
from lnm_auto.training.trainer import LNMTrainer
from lnm_auto.utils.devices import DEVICE_CHOICES, default_device, resolve_device  # noqa: F401  (lnm_train)
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import atomic_copy, load_json
from lnm_auto.utils.paths import ENV_VARS, check_plain_name, nearest_hint, resolve_preprocessed_dataset
from lnm_auto.utils.stale_temps import remove_stale_temp_files



def model_folder(results_root: Path, dataset_name: str, trainer: str, plans_name: str, configuration: str) -> Path:
    """$LNM_results/<dataset>/<trainer>__<plans>__<configuration>; names that would lead out of it are refused."""
    parts = [check_plain_name(v, what) for v, what in ((dataset_name, "dataset"), (trainer, "trainer (-tr)"),
                                                      (plans_name, "plans (-p)"), (configuration, "configuration"))]
    return Path(results_root) / parts[0] / f"{parts[1]}__{parts[2]}__{parts[3]}"


def plans_file(preprocessed_dataset: Path, plans_name: str) -> Path:
    """<preprocessed dataset>/<plans_name>.json (a plans name that would lead out of the folder is refused)."""
    return Path(preprocessed_dataset) / f"{check_plain_name(plans_name, 'plans (-p)')}.json"


def parse_fold(fold: str) -> int | str:
    """'3' -> 3, 'all' -> 'all'."""
    if str(fold) == "all":
        return "all"
    try:
        return int(fold)
    except ValueError:
        raise LNMError(f"fold must be a number (0, 1, ...) or 'all', got '{fold}'") from None


def check_configuration(plans: Plans, configuration: str) -> None:
    """One line naming the plans' configurations and the nearest one, for a configuration not planned."""
    if configuration not in plans.configurations:
        raise LNMError(f"configuration '{configuration}' is not in the plans {plans.plans_name}"
                       f"{nearest_hint(configuration, plans.configurations)} (planned: "
                       f"{', '.join(plans.configurations)})")


def setup_trainer(dataset: str | int, configuration: str, fold: str, preprocessed_root: Path, results_root: Path,
                  trainer_name: str = "LNMTrainer", plans_name: str = "LNMPlans", device: str | None = "cpu",
                  num_epochs: int | None = None, num_workers: int | None = None,
                  trainer_cls: type[LNMTrainer] | None = None, raw_root: Path | None = None,
                  before_writing: Callable[[str, int, Path], None] | None = None) -> LNMTrainer:
    """The trainer of one fold, its model folder prepared (plans, dataset.json and fingerprint copied).
    ``raw_root`` is where the radiomics configuration reads the raw images (default $LNM_raw). A trainer that
    trains with the multi-task head (``multitask = True``) gets these plans with the switch on. ``before_writing``
    (run name, epochs, fold folder) is called once those are known, before anything is loaded or written: a
    command's last chance to refuse."""
    name = resolve_preprocessed_dataset(dataset, preprocessed_root)
    pre = Path(preprocessed_root) / name
    plans = Plans.load(plans_file(pre, plans_name))
    check_configuration(plans, configuration)
    config = plans.configuration(configuration)
    check_fits_processes(config, DistributedRun.current().world_size)
    if trainer_cls is None:
        trainer_cls, epochs_in_name = trainer_class(trainer_name_for_configuration(config, trainer_name))
        if num_epochs is not None and epochs_in_name is not None and num_epochs != epochs_in_name:
            raise LNMError(f"-tr {trainer_name} names {epochs_in_name} epochs but --epochs says {num_epochs}; give one")
        num_epochs = num_epochs if num_epochs is not None else epochs_in_name
    if num_epochs is not None and num_epochs < 1:
        raise LNMError(f"--epochs must be at least 1, got {num_epochs}")
    fold_value = parse_fold(fold)
    splits_file = pre / SPLITS_FILE
    splits = load_splits(splits_file, *dataset_cases(pre)) if splits_file.is_file() else None
    if fold_value != "all" and splits is None:
        raise LNMError(f"{splits_file}: missing; re-run lnm_plan_and_preprocess -d {name}")
    epochs = num_epochs or trainer_cls.default_num_epochs(config)
    run_name = trainer_cls.run_name(config, num_epochs)
    out = model_folder(results_root, name, run_name, plans_name, configuration)
    if before_writing is not None:
        before_writing(run_name, epochs, out / f"fold_{fold_value}")
    # the model folder alone must be enough for inference (like nnU-Net's results folders)
    saved = out / "plans.json"
    if saved.is_file() and any(out.glob("fold_*/checkpoint_*.pth")) and Plans.load(saved) != plans:
        raise LNMError(f"{saved}: the plans changed since this model's folds were trained; train under another "
                       f"plans name (-p) or move {out} away")
    if getattr(trainer_cls, "multitask", False):   # decided here, on these plans (saved below), not by the trainer
        switch_on_multitask(plans, configuration)
    if raw_root is None:   # the factory reads the environment; trainers only get arguments
        raw_root = os.environ.get(ENV_VARS["raw"]) or None
    trainer = trainer_cls(plans, configuration, fold_value, pre, out / f"fold_{fold_value}", resolve_device(device),
                          epochs, num_workers=num_workers, splits=splits, raw_root=raw_root)
    trainer.initialize()   # the file work: the fold's nodes, its folder and log, the network
    if is_main_process():   # under torchrun rank 0 writes every file
        remove_killed_runs_temp_files(trainer.output_folder)
        plans.save(saved)
        for f in ("dataset.json", FINGERPRINT_FILE):
            atomic_copy(pre / f, out / f)
    return trainer


# what a run writes into its fold folder (and validation/): a rerun removes the temp files a killed run left of them
FOLD_FILES = ("checkpoint_latest.pth", "checkpoint_best.pth", "checkpoint_final.pth", "progress.png",
              "pretrained_weights.pth", "radiomics_model.json")
VALIDATION_FILES = ("metrics.json", "predictions.csv", "probabilities.npz", "nodes.csv", "stations.csv",
                    "patients.csv")


def remove_killed_runs_temp_files(fold_folder: Path) -> None:
    """The temp files of a killed run of this fold (``.progress.png.k3x_9a2b.png`` ...), by our exact naming
    pattern; nothing else is touched. The model folder's shared files are left alone: another fold may be writing."""
    for name in FOLD_FILES:
        remove_stale_temp_files(Path(fold_folder) / name)
    for name in VALIDATION_FILES:
        remove_stale_temp_files(Path(fold_folder) / "validation" / name)


def dataset_cases(preprocessed_dataset: Path) -> tuple[list[str] | None, dict[str, str] | None]:
    """(case ids, case -> patient) of a preprocessed dataset, from its fingerprint (None, None without one):
    what the folds of splits_final.json are checked against."""
    fingerprint_file = Path(preprocessed_dataset) / FINGERPRINT_FILE
    try:
        cases = load_json(fingerprint_file)["cases"]
        return sorted(cases), {c: str(entry.get("patient", c)) for c, entry in cases.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, None   # no usable fingerprint: the folds are still checked against each other


@contextmanager
def distributed_training(device: str) -> Iterator[None]:
    """Under torchrun (or -num_gpus): this process joins the job's process group (NCCL on cuda, gloo on cpu)
    for the run and leaves it afterwards. Outside such a job: nothing."""
    joined = init_process_group(device)
    try:
        yield
    finally:
        if joined:
            destroy_process_group()


def classifier_trainer(config: ConfigurationPlan) -> str | None:
    """The trainer that fits a configuration fitted in one step (its kind's; radiomics, deep_radiomics); None for
    a network."""
    kind = kind_of(config)
    return kind.default_trainer if kind.fitted_once else None


def trainer_name_for_configuration(config: ConfigurationPlan, trainer_name: str) -> str:
    """radiomics is fitted by RadiomicsTrainer, deep_radiomics by DeepRadiomicsTrainer (the default trainer name
    maps to them); the network trainers cannot fit them, nor they a network."""
    fitter = classifier_trainer(config)
    cls_name = split_trainer_name(trainer_name)[0]
    if fitter and cls_name == LNMTrainer.__name__:
        return fitter
    fits = {k.default_trainer: k.name for k in KINDS if k.fitted_once}
    if fitter and cls_name != fitter:
        raise LNMError(f"-tr {trainer_name} cannot train the configuration '{config.name}': {config.name} is fitted "
                       f"by {fitter}")
    if not fitter and cls_name in fits:
        raise LNMError(f"-tr {trainer_name} cannot train the configuration '{config.name}': {cls_name} only fits "
                       f"the {fits[cls_name]} configuration")
    return trainer_name


def training_scheme(dataset: str | int, configuration: str, preprocessed_root: Path, plans_name: str,
                    trainer_name: str | None) -> list[str]:
    """The trainers ``lnm_train`` runs in order: ``-tr`` alone when given, else the plans' recommendation."""
    if trainer_name:
        return [trainer_name]
    pre = Path(preprocessed_root) / resolve_preprocessed_dataset(dataset, preprocessed_root)
    plans = Plans.load(plans_file(pre, plans_name))
    check_configuration(plans, configuration)
    return recommended_scheme(plans, configuration)


def check_processes_fit_batch(dataset: str | int, configuration: str, preprocessed_root: Path, plans_name: str,
                              n_processes: int) -> None:
    """One line before any process starts when ``n_processes`` cannot share the plan's batch (-num_gpus)."""
    pre = Path(preprocessed_root) / resolve_preprocessed_dataset(dataset, preprocessed_root)
    plans = Plans.load(plans_file(pre, plans_name))
    check_configuration(plans, configuration)
    check_fits_processes(plans.configuration(configuration), n_processes)


def check_fits_processes(config: ConfigurationPlan, n_processes: int) -> None:
    """Refuse a configuration that cannot train on ``n_processes``: radiomics (one fit, seconds), or a plan's
    batch with fewer nodes than processes."""
    if n_processes > 1 and classifier_trainer(config):
        raise LNMError(f"the {config.name} configuration is fitted in one step by one process: train it without "
                       "torchrun or -num_gpus")
    DistributedRun(0, n_processes).batch_share(config)


def recommended_scheme(plans: Plans, configuration: str) -> list[str]:
    """The trainers the plans recommend for the dataset's label mix (radiomics, deep_radiomics: their own)."""
    fitter = classifier_trainer(plans.configuration(configuration))
    if fitter:
        return [fitter]
    return list(plans.recommended_trainers)


def setup_pretrainer(dataset, configuration: str, fold: str, preprocessed_root: Path, results_root: Path,
                     plans_name: str = "LNMPlans", device: str | None = "cpu", num_epochs: int | None = None,
                     num_workers: int | None = None) -> WSPPretrainer:
    """The WSP pre-training run of one fold (or 'all')."""
    return setup_trainer(dataset, configuration, fold, preprocessed_root, results_root, "WSPPretrainer", plans_name,
                         device, num_epochs, num_workers, trainer_cls=WSPPretrainer)


def run_training(trainer: LNMTrainer, continue_training: bool = False, pretrained_weights: Path | None = None,
                 stop_after_epoch: int | None = None, save_probabilities: bool = False) -> LNMTrainer:
    """Continue (--c) or initialise (-pretrained_weights) the trainer, then train; ``save_probabilities``
    (--npz) adds validation/probabilities.npz once the fold is finished."""
    if continue_training and pretrained_weights:
        raise LNMError("--c and -pretrained_weights exclude each other: continuing restores the run's own weights")
    if continue_training:
        latest = trainer.output_folder / "checkpoint_latest.pth"
        final = trainer.output_folder / "checkpoint_final.pth"
        if final.is_file() and not latest.is_file():
            latest = final
        if not latest.is_file():
            trainer.log.print("--c: no checkpoint to continue from; starting from scratch")
        else:
            trainer.load_checkpoint(latest)
            trainer.log.print(f"continuing from {latest.name} at epoch {trainer.current_epoch}")
            if trainer.current_epoch >= trainer.num_epochs and (trainer.output_folder / "checkpoint_final.pth").is_file():
                trainer.log.print("training already finished; nothing to do")
                if save_probabilities:
                    run_validation(trainer, "checkpoint_final.pth", save_probabilities=True)
                return trainer
    elif pretrained_weights:
        # a classifier trainer has no network: its load_pretrained refuses the file in one line
        wega = global_branch_for(trainer.network, Path(pretrained_weights)) if isinstance(trainer, LNMTrainer) else None
        if wega is not None:   # a DINOv2 (bare ViT) file: into wega's global branch, position embedding resampled
            report = wega.load_global_weights(Path(pretrained_weights))
            trainer.initial_weights = str(pretrained_weights)
            trainer.log.print(f"DINOv2 weights {pretrained_weights} -> wega global branch: {len(report['matched'])} "
                              f"tensors loaded, {len(report['missing'])} ViT tensors not in the file, "
                              f"{len(report['unexpected'])} file tensors unused ({', '.join(report['unexpected'][:3])})"
                              + (f", resampled {'; '.join(report['resampled'])}" if report["resampled"] else ""))
        else:
            trainer.load_pretrained(Path(pretrained_weights))
    trainer.run_training(stop_after_epoch=stop_after_epoch)
    if save_probabilities and trainer.current_epoch >= trainer.num_epochs:
        # the trainer's on_train_end exported validation without probabilities; one more pass adds them
        trainer.export_validation("checkpoint_final.pth", save_probabilities=True)
        trainer.distributed.barrier()
    return trainer


def run_validation(trainer: LNMTrainer, checkpoint: str = "checkpoint_final.pth",
                   save_probabilities: bool = False) -> dict:
    """``lnm_train --val`` / ``--val_best``: load a fold's checkpoint and write its validation outputs again
    (no training); returns the new validation/metrics.json."""
    path = trainer.output_folder / checkpoint
    if not path.is_file():
        why = ("this fold has not finished training; train it (or continue with --c) first"
               if checkpoint == "checkpoint_final.pth" else
               "it is written when the validation AUROC improves, which needs both classes among the fold's "
               "labelled validation units; use --val for checkpoint_final.pth")
        raise LNMError(f"{path}: missing; {why}")
    trainer.load_checkpoint(path)
    trainer.log.print(f"validation only, with {checkpoint} (after epoch {trainer.current_epoch})")
    trainer.distributed.node_leader_first(trainer.store.unpack, sorted(trainer.val_cases))
    trainer.export_validation(checkpoint, save_probabilities)
    trainer.distributed.barrier()   # rank 0 has written metrics.json
    return load_json(trainer.output_folder / "validation" / "metrics.json")
