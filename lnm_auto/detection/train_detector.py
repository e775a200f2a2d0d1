"""``lnm_train_detector``: nnU-Net v2's own planning, preprocessing and training of a node segmenter on an lnm
dataset's node masks.

nnU-Net runs in its own processes (``python -c`` calling its entry point or its ``run_training`` function) with
nnUNet_raw / nnUNet_preprocessed / nnUNet_results set in their environment only: nnU-Net reads those variables
when its modules load, and this process's environment stays as it was. The roots lie below the lnm dataset's
preprocessed and results folders (``nnunet_dataset.detector_folders``).

On a GPU the defaults are nnU-Net's own (3d_fullres, nnUNetTrainer: 1000 epochs). On a CPU the default is the
``2d_cpu`` configuration (``cpu_variant``): planned from nnU-Net's 2d to learn nodes within minutes on a CPU, with
nnU-Net's shipped ``nnUNetTrainer_20epochs``; it is not a detector of nnU-Net's quality.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lnm_auto.detection import cpu_variant
from lnm_auto.detection.nnunet_dataset import (DetectorExport, DetectorFolders, detector_folders,
                                               export_detector_dataset, nnunet_dataset_id, nnunet_dataset_name)
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import load_json, save_json
from lnm_auto.utils.paths import resolve_dataset_name

NEEDS_NNUNET = 'lnm_train_detector needs nnU-Net v2: pip install -e ".[detect]"'
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", cpu_variant.CONFIGURATION)
GPU_DEFAULT = ("3d_fullres", "nnUNetTrainer")           # nnU-Net's own defaults
CPU_DEFAULT = (cpu_variant.CONFIGURATION, cpu_variant.TRAINER)   # learns in minutes on a CPU, not nnU-Net quality
NNUNET_CPU_TRAINER = "nnUNetTrainer_5epochs"   # nnU-Net's own configurations on a CPU: a smoke test of the chain
PLANS = "nnUNetPlans"
# nnU-Net plans its batch for 8 GB of GPU memory: 51 slices of 224 x 288 for the demo phantom's 2d, some 20 s per
# iteration on one CPU thread. A CPU run of nnU-Net's own configurations plans for 1 GB instead (nnU-Net's own
# -gpu_memory_target; its batch then about 6), under its own plans name so it never overwrites the GPU plans.
# 2d_cpu sets its own batch, so it is added to nnU-Net's default plans.
CPU_MEMORY_TARGET_GB = 1.0


def plans_name(memory_target_gb: float | None) -> str:
    """nnU-Net's plans name: its own for its default memory target, ``nnUNetPlans_<N>GB`` for another one."""
    return PLANS if memory_target_gb is None else f"{PLANS}_{memory_target_gb:g}GB"


def default_memory_target(device: str, configuration: str = "2d") -> float | None:
    """The memory nnU-Net plans batches for: its default (None) on a GPU or for 2d_cpu (its batch is its own),
    CPU_MEMORY_TARGET_GB for nnU-Net's configurations elsewhere."""
    return None if device == "cuda" or configuration == cpu_variant.CONFIGURATION else CPU_MEMORY_TARGET_GB
ALL_FOLDS = ["0", "1", "2", "3", "4"]

PLAN_CODE = ("import sys\n"
             "from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import plan_and_preprocess_entry\n"
             "sys.argv[0] = 'nnUNetv2_plan_and_preprocess'\n"
             "plan_and_preprocess_entry()\n")
PREPROCESS_CODE = ("import sys\n"
                   "from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import preprocess_entry\n"
                   "sys.argv[0] = 'nnUNetv2_preprocess'\n"
                   "preprocess_entry()\n")
# nnU-Net's run_training steps (not its entry point, which gives a CPU run every core of the machine): the threads
# are ours; a configuration's 'lnm_training' (2d_cpu) sets foreground oversampling and iterations per epoch, and
# -iterations_per_epoch may shorten nnU-Net's 250 training / 50 validation iterations per epoch
TRAIN_CODE = ("import sys, torch\n"
              "from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint\n"
              "dataset, configuration, fold, trainer, plans, device, threads, resume, iterations = sys.argv[1:10]\n"
              "torch.set_num_threads(int(threads))\n"
              "fold = fold if fold == 'all' else int(fold)\n"
              "t = get_trainer_from_args(dataset, configuration, fold, trainer, plans, resume == '1',\n"
              "                          device=torch.device(device))\n"
              "own = t.configuration_manager.configuration.get('lnm_training') or {}\n"
              "if 'foreground_oversampling' in own:\n"
              "    t.oversample_foreground_percent = float(own['foreground_oversampling'])\n"
              "if int(iterations) == 0 and 'iterations_per_epoch' in own:\n"
              "    iterations = own['iterations_per_epoch']\n"
              "if int(iterations) > 0:\n"
              "    t.num_iterations_per_epoch, t.num_val_iterations_per_epoch = int(iterations), max(1, int(iterations) // 5)\n"
              "maybe_load_checkpoint(t, resume == '1', False, None)\n"
              "t.run_training()\n"
              "t.perform_actual_validation(False)\n")


def nnunet_installed() -> bool:
    """Whether the optional nnunetv2 package can be imported (without importing it here)."""
    try:
        return importlib.util.find_spec("nnunetv2") is not None
    except (ImportError, ValueError):      # a broken install, or one removed from sys.modules
        return False


def default_setup(device: str) -> tuple[str, str]:
    """(configuration, trainer) when -c / -tr are not given: nnU-Net's defaults on a GPU, 2d_cpu elsewhere."""
    return GPU_DEFAULT if device == "cuda" else CPU_DEFAULT


def default_trainer(configuration: str, device: str) -> str:
    """The trainer when -tr is not given: 2d_cpu's own on any device; for nnU-Net's configurations its default
    on a GPU and a 5-epoch smoke run elsewhere (their networks need a GPU to learn)."""
    if configuration == cpu_variant.CONFIGURATION:
        return cpu_variant.TRAINER
    return GPU_DEFAULT[1] if device == "cuda" else NNUNET_CPU_TRAINER


def check_folds(folds: list[str] | None) -> list[str]:
    """nnU-Net's folds: 0..4 (its 5-fold split) or 'all'; none given means all five."""
    folds = list(folds) if folds else list(ALL_FOLDS)
    for fold in folds:
        if fold != "all" and fold not in ALL_FOLDS:
            raise LNMError(f"fold '{fold}': nnU-Net's folds are 0, 1, 2, 3, 4 or 'all'")
    return folds


@dataclass
class DetectorRun:
    dataset_name: str                  # the lnm dataset, DatasetXXX_Name
    folders: DetectorFolders
    configuration: str
    trainer: str
    plans: str = PLANS
    export: DetectorExport | None = None
    fold_folders: list[Path] = field(default_factory=list)

    @property
    def model_folder(self) -> Path:
        """nnU-Net's model folder: nnUNet_results/DatasetXXX_NameLN/<trainer>__<plans>__<configuration>."""
        return (self.folders.results / nnunet_dataset_name(self.dataset_name)
                / f"{self.trainer}__{self.plans}__{self.configuration}")


def nnunet_environment(folders: DetectorFolders, threads: int) -> dict[str, str]:
    """This process's environment with nnU-Net's roots (and, unless set by the user, its augmentation workers:
    threads - 1, at least 1: nnU-Net's planner also sets torch's threads to it, and refuses 0)."""
    env = {**os.environ, **folders.environment()}
    env.setdefault("nnUNet_n_proc_DA", str(max(threads - 1, 1)))
    return env


def _run_nnunet(code: str, args: list[str], env: dict[str, str], what: str) -> None:
    """One nnU-Net step in its own process; its output goes to ours. A failure is one line after nnU-Net's own."""
    sys.stdout.flush()
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env)
    if proc.returncode != 0:
        raise LNMError(f"{what} failed (exit status {proc.returncode}); nnU-Net's own messages are above")


def _plans_file(folders: DetectorFolders, dataset_name: str, plans: str) -> Path:
    return folders.preprocessed / nnunet_dataset_name(dataset_name) / f"{plans}.json"


def _check_planned(folders: DetectorFolders, dataset_name: str, configuration: str, plans: str = PLANS) -> None:
    """The configuration must be in nnU-Net's plans and preprocessed (3d_lowres is planned only for large images)."""
    plans_file = _plans_file(folders, dataset_name, plans)
    if not plans_file.is_file():
        raise LNMError(f"{plans_file}: missing; run lnm_train_detector without --skip_preprocessing first")
    planned = sorted(load_json(plans_file).get("configurations", {}))
    if configuration not in planned:
        raise LNMError(f"{plans_file}: nnU-Net planned no '{configuration}' for this dataset (planned: "
                       f"{', '.join(planned)}); choose one of those with -c")


def prepare_detector(dataset: str, raw_root: Path, preprocessed_root: Path, results_root: Path, configuration: str,
                     trainer: str, threads: int = 1, skip_preprocessing: bool = False, say=print,
                     memory_target_gb: float | None = None) -> DetectorRun:
    """Export the node masks as an nnU-Net dataset and run nnU-Net's planning and preprocessing of
    ``configuration`` (with its dataset integrity check); ``skip_preprocessing``: use an earlier run's.
    ``memory_target_gb``: nnU-Net's -gpu_memory_target (None: its default, plans ``nnUNetPlans``)."""
    if not nnunet_installed():
        raise LNMError(NEEDS_NNUNET)
    if configuration not in CONFIGURATIONS:
        raise LNMError(f"-c '{configuration}': lnm_train_detector trains {', '.join(CONFIGURATIONS)}")
    name = resolve_dataset_name(dataset, Path(raw_root))
    run = DetectorRun(name, detector_folders(name, preprocessed_root, results_root), configuration, trainer,
                      plans_name(memory_target_gb))
    target = [] if memory_target_gb is None else ["-gpu_memory_target", f"{memory_target_gb:g}",
                                                  "-overwrite_plans_name", run.plans]
    if not skip_preprocessing:
        run.export = export_detector_dataset(Path(raw_root) / name, run.folders.raw)
        say(f"nnU-Net dataset: {run.export.folder} ({len(run.export.cases)} cases)", flush=True)
        env, dataset_id = nnunet_environment(run.folders, threads), str(nnunet_dataset_id(name))
        own = configuration == cpu_variant.CONFIGURATION     # planned by us from nnU-Net's 2d, then preprocessed
        _run_nnunet(PLAN_CODE, ["-d", dataset_id, "-c", cpu_variant.SOURCE_CONFIGURATION if own else configuration,
                                "-np", str(threads), "-npfp", str(threads),
                                "--verify_dataset_integrity", "--clean", *target, *(["--no_pp"] if own else [])],
                    env, "nnUNetv2_plan_and_preprocess")
        if own:
            plans_file = _plans_file(run.folders, name, run.plans)
            save_json(cpu_variant.add_cpu_configuration(load_json(plans_file)), plans_file)
            _run_nnunet(PREPROCESS_CODE, ["-d", dataset_id, "-plans_name", run.plans, "-c", configuration,
                                          "-np", str(threads)], env, "nnUNetv2_preprocess")
    _check_planned(run.folders, name, configuration, run.plans)
    return run


def train_detector_folds(run: DetectorRun, folds: list[str], device: str, threads: int = 1,
                         continue_training: bool = False, iterations_per_epoch: int = 0) -> DetectorRun:
    """nnU-Net's training of each fold (then its own validation); the fold folders go to ``run.fold_folders``.
    ``iterations_per_epoch`` > 0 sets the iterations per epoch (a CPU smoke run); 0: the configuration's
    planned number (2d_cpu), else nnU-Net's 250."""
    env = nnunet_environment(run.folders, threads)
    torch_threads = 1 if device == "cuda" else threads      # as nnU-Net does on a GPU
    for fold in check_folds(folds):
        _run_nnunet(TRAIN_CODE, [str(nnunet_dataset_id(run.dataset_name)), run.configuration, fold, run.trainer, run.plans,
                                 device, str(torch_threads), "1" if continue_training else "0",
                                 str(int(iterations_per_epoch))], env,
                    f"nnU-Net's training of fold {fold}")
        run.fold_folders.append(run.model_folder / f"fold_{fold}")
    return run
