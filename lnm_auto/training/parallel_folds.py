"""Several folds trained side by side on a CPU, each in its own process with one torch thread.

Why: a fold's batches are small (a few dozen 2.5D node crops), so torch's OpenMP team spends much of each
operation waking up; one thread per fold and one fold per core keeps both cores busy with real work. Measured on
2 cores (the demo phantom, 2d25, 3 epochs): one fold with two threads and a data worker 60 s, two folds at once
with one thread and no data worker each 73-78 s for both, 1.5x the throughput; with a data worker each, 102-107 s.
A fold's stages (supervised, then PGLS) stay in order inside its process.

``train_folds`` is what the demo (and a benchmark of the whole pipeline) calls; ``lnm_train`` keeps one fold per
command, as nnU-Net's: run two commands with ``-nt 1 -num_workers 0`` side by side for the same effect.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lnm_auto.utils.errors import LNMError


@dataclass(frozen=True)
class FoldJob:
    """One fold of one configuration, its stages trained in order (each stage continues a killed run)."""
    dataset: str | int
    configuration: str
    fold: int | str
    stages: tuple[str, ...]                 # trainer names, e.g. ("LNMTrainer", "LNMTrainerPGLS")
    preprocessed_root: Path
    results_root: Path
    plans_name: str = "LNMPlans"
    num_epochs: int | None = None           # None: each trainer's own (classifiers ignore it)
    raw_root: Path | None = None


def folds_at_once(n_cores: int, n_jobs: int, device: str) -> int:
    """How many folds to train side by side: one per core on a CPU (at most the number of folds), one on a GPU
    (a GPU is not shared by two trainings here)."""
    if device != "cpu":
        return 1
    return max(1, min(n_cores, n_jobs))


def train_fold(job: FoldJob, device: str = "cpu", num_workers: int | None = None) -> str:
    """Train every stage of ``job`` (continuing a killed run); returns its last model folder."""
    from lnm_auto.training.run import run_training, setup_trainer
    out = ""
    for stage in job.stages:
        trainer = setup_trainer(job.dataset, job.configuration, str(job.fold), job.preprocessed_root,
                                job.results_root, stage, job.plans_name, device, job.num_epochs, num_workers,
                                raw_root=job.raw_root)
        run_training(trainer, continue_training=True)
        out = str(trainer.output_folder)
    return out


class _FoldLines:
    """stdout of a fold's process: every line starts with ``[fold k]`` so two folds' lines read apart."""

    def __init__(self, stream, prefix: str):
        self.stream, self.prefix, self.at_line_start = stream, prefix, True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            out.append((self.prefix if self.at_line_start else "") + piece)
            self.at_line_start = piece.endswith("\n")
        self.stream.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:   # progress bars stay off: two bars on one terminal would overwrite each other
        return False


def _one_thread_process(parent_pid: int) -> None:
    """Initializer of a fold process (spawned: nothing of the parent's torch or OpenMP state comes along); it
    ends with the parent."""
    from lnm_auto.utils.processes import worker_process_init
    from lnm_auto.utils.threads import configure_threads
    configure_threads(1, uses_torch=True)
    worker_process_init(parent_pid)


def _train_in_process(job: FoldJob) -> str:
    sys.stdout = _FoldLines(sys.__stdout__, f"[{job.configuration} fold {job.fold}] ")
    try:
        return train_fold(job, "cpu", num_workers=0)
    except LNMError as e:   # bad input: one line, said by the parent
        raise LNMError(f"{job.configuration} fold {job.fold}: {e}") from None


def train_folds(jobs: list[FoldJob], at_once: int = 1, device: str = "cpu", first_alone: bool = False) -> list[str]:
    """Train ``jobs``: in this process one after the other (``at_once`` 1, or a GPU), else ``at_once`` CPU
    processes with one torch thread and no data worker each. ``first_alone``: the first job runs in this process
    first, with ``at_once`` worker processes, filling a dataset-wide cache the others then read (radiomics
    features, frozen embeddings: two folds at once would both compute every case). Returns the model folders in
    job order. The first failure stops the run (LNMError for bad input; our own bugs keep their traceback)."""
    if at_once <= 1 or device != "cpu" or len(jobs) <= 1:
        return [train_fold(job, device) for job in jobs]
    done = [train_fold(jobs[0], device, num_workers=at_once)] if first_alone else []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(at_once, mp_context=context, initializer=_one_thread_process,
                             initargs=(os.getpid(),)) as pool:
        futures = [pool.submit(_train_in_process, job) for job in jobs[len(done):]]
        try:
            return done + [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise
