"""Training on 2 CPU processes with gloo (DistributedDataParallel), as torchrun / -num_gpus run it: the ranks
hold the same weights after every step while drawing different batches, the checkpoint is the single-process
format, validation predictions are gathered in node order, only rank 0 writes files, --c resumes exactly,
and the mean teacher's EMA teachers stay equal across ranks."""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lnm_auto.planning.plan_and_preprocess import plan_and_preprocess
from lnm_auto.training.distributed import free_port
from lnm_auto.training.run import run_training, setup_trainer
from lnm_auto.training.trainer import LNMTrainer
from lnm_auto.utils.checkpoints import load_checkpoint
from conftest import run_cli, write_tiny_dataset

# each test starts 2 processes that import torch and train: 30-110 s on a busy 2-core machine
pytestmark = pytest.mark.slow
WORLD = 2
CONFIG = "2d25"     # has BatchNorm: its running statistics must agree across ranks too
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "LNM_NUM_THREADS": "1",
           "LNM_NO_PROGRESS": "1", "LNM_n_proc_DA": "0"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def state_hash(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class RecordingTrainer(LNMTrainer, register=False):
    """LNMTrainer that notes what each rank saw and held after its first step (hooks only)."""

    def network_outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        self.__dict__.setdefault("seen", []).append([list(map(str, k)) for k in batch["keys"]])
        return super().network_outputs(batch)

    def after_optimizer_step(self) -> None:
        self.__dict__.setdefault("hash_after_first_step", state_hash(self.network))


def record_writes(root: Path, events: list) -> None:
    """Note every file-system write this process makes under ``root`` (Python's audit events: opening for
    writing, replacing, removing, creating folders)."""
    root = str(root)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writes = (mode is not None and any(c in str(mode) for c in "wax+")) or \
                     (mode is None and isinstance(flags, int) and flags & WRITE_FLAGS)
        elif event == "os.rename":   # os.replace too
            path, writes = f"{args[0]} -> {args[1]}", True
        elif event in ("os.remove", "os.mkdir", "os.rmdir"):
            path, writes = args[0], True
        else:
            return
        if writes and str(path).startswith(root):
            events.append(f"{event} {path}")
    sys.addaudithook(hook)


def rank_main(rank: int, port: int, root: Path, scenario: str) -> None:
    """One of the WORLD processes: what torchrun would start, running ``scenario``; writes what it saw to
    root/probe/rank<r>.json (outside the folders whose writes are recorded)."""
    os.environ.update({**THREADS, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from lnm_auto.training.run import distributed_training
    writes: list[str] = []
    record_writes(root / "results", writes)
    record_writes(root / "pre", writes)
    report: dict = {}
    with distributed_training("cpu"):
        if scenario == "one_epoch":
            trainer = setup_trainer(42, CONFIG, "0", root / "pre", root / "results", num_epochs=1, num_workers=0,
                                    trainer_cls=RecordingTrainer)
            report["hash_initial"] = state_hash(trainer.network)
            run_training(trainer)
            report.update(seen=trainer.seen, hash_after_first_step=trainer.hash_after_first_step,
                          hash_final=state_hash(trainer.network), writes=writes)
        else:   # resume: 1 epoch, --c to 2; 2 epochs straight; then a mean-teacher epoch from that model
            results = {name: root / "results" / name for name in ("resumed", "straight")}
            run_training(setup_trainer(42, CONFIG, "0", root / "pre", results["resumed"], "LNMTrainer_2epochs",
                                       num_workers=0), stop_after_epoch=1)
            resumed = run_training(setup_trainer(42, CONFIG, "0", root / "pre", results["resumed"],
                                                 "LNMTrainer_2epochs", num_workers=0), continue_training=True)
            straight = run_training(setup_trainer(42, CONFIG, "0", root / "pre", results["straight"],
                                                  "LNMTrainer_2epochs", num_workers=0))
            # the mean teacher learns from unlabelled nodes (dataset 43), starting from its supervised model
            run_training(setup_trainer(43, CONFIG, "0", root / "pre", results["straight"], "LNMTrainer_1epochs",
                                       num_workers=0))
            teacher = run_training(setup_trainer(43, CONFIG, "0", root / "pre", results["straight"],
                                                 "LNMTrainerMeanTeacher_1epochs", num_workers=0))
            report.update(hash_resumed=state_hash(resumed.network), hash_straight=state_hash(straight.network),
                          hash_student=state_hash(teacher.network), hash_teacher=state_hash(teacher.teacher),
                          teacher_steps=int(teacher.global_step))
    (root / "probe").mkdir(exist_ok=True)
    (root / "probe" / f"rank{rank}.json").write_text(json.dumps(report))


def spawn_ranks(root: Path, scenario: str) -> list[dict]:
    """Run ``scenario`` on WORLD processes; each rank's report."""
    import torch.multiprocessing as mp
    mp.start_processes(rank_main, args=(free_port(), root, scenario), nprocs=WORLD, join=True, start_method="spawn")
    return [json.loads((root / "probe" / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    write_tiny_dataset(root / "raw", n_cases=8)   # plans a batch of 4 with 2 oversampled positives
    write_tiny_dataset(root / "raw", 43, "TinyHidden", n_cases=8, hide_node_labels=3)   # for the mean teacher
    for dataset in (42, 43):
        plan_and_preprocess(dataset, root / "raw", root / "pre", planner="LNMPlannerCPU", progress=False)
    return root


def single_process_trainer(root: Path, results: Path, trainer: str = "LNMTrainer_1epochs") -> LNMTrainer:
    return setup_trainer(42, CONFIG, "0", root / "pre", results, trainer, num_workers=0)


def test_two_gloo_processes_step_together_and_rank0_writes_the_single_process_checkpoint(prepared):
    reports = spawn_ranks(prepared, "one_epoch")
    r0, r1 = reports
    # same weights (and BatchNorm statistics) on both ranks after the first step and at the end; they learned
    assert r0["hash_after_first_step"] == r1["hash_after_first_step"]
    assert r0["hash_final"] == r1["hash_final"] != r0["hash_initial"] == r1["hash_initial"]
    # each rank drew its own half of the plan's batch of 4 (one oversampled positive each: the plan's 2 in all)
    assert len(r0["seen"]) == len(r1["seen"]) == 4 and all(len(b) == 2 for b in r0["seen"] + r1["seen"])
    assert r0["seen"] != r1["seen"]
    labels = pd.read_csv(prepared / "pre" / "Dataset042_Tiny" / "LNMPlans_crops" / "nodes_index.csv",
                         dtype={"case": str}).set_index(["case", "node"])["label"]
    for rank_batches in (r0["seen"], r1["seen"]):
        assert all(sum(labels[(case, int(node))] for case, node in b) >= 1 for b in rank_batches)
    # only rank 0 wrote: rank 1 did not even create a temp file or folder
    assert r1["writes"] == []
    fold = prepared / "results" / "Dataset042_Tiny" / f"RecordingTrainer_1epochs__LNMPlans__{CONFIG}" / "fold_0"
    assert any(w.endswith(str(fold / "checkpoint_final.pth")) for w in r0["writes"])
    assert len(list(fold.glob("training_log_*.txt"))) == 1

    # the checkpoint loads as any single-process one and has its keys and shapes (no 'module.' prefixes)
    single = single_process_trainer(prepared, prepared / "single")
    ddp_ckpt = load_checkpoint(fold / "checkpoint_final.pth", single.plans.identifier())
    single.save_checkpoint("checkpoint_single.pth")
    single_ckpt = load_checkpoint(single.output_folder / "checkpoint_single.pth", single.plans.identifier())
    assert set(ddp_ckpt) == set(single_ckpt)
    assert {k: tuple(v.shape) for k, v in ddp_ckpt["network_weights"].items()} == \
           {k: tuple(v.shape) for k, v in single_ckpt["network_weights"].items()}
    assert ddp_ckpt["current_epoch"] == 1

    # validation: every validation node, gathered from both ranks in node order, equals what one process
    # predicts with the final weights
    single.network.load_state_dict(ddp_ckpt["network_weights"])
    assert state_hash(single.network) == r0["hash_final"]
    records = single.validation_records()
    single.store.unpack(sorted(single.val_cases))
    expected = single.predict_records(records)
    written = pd.read_csv(fold / "validation" / "predictions.csv", dtype={"case": str})
    assert len(records) >= 2 * WORLD
    assert list(zip(written["case"], written["node"])) == list(zip(records["case"], records["node"]))
    np.testing.assert_allclose(written["probability"].to_numpy(), expected, rtol=1e-6, atol=1e-7)


def test_continue_under_ddp_equals_uninterrupted_and_mean_teacher_agrees_across_ranks(prepared):
    r0, r1 = spawn_ranks(prepared, "resume")
    assert r0["hash_resumed"] == r0["hash_straight"] == r1["hash_resumed"] == r1["hash_straight"]
    assert r0["hash_student"] == r1["hash_student"] and r0["hash_teacher"] == r1["hash_teacher"]
    assert r0["hash_teacher"] != r0["hash_student"] and r0["teacher_steps"] > 0


def test_num_gpus_on_cpu_runs_gloo_processes_and_refuses_more_processes_than_the_batch(prepared, tmp_path):
    results = tmp_path / "results"
    args = ("train", "42", CONFIG, "0", "-tr", "LNMTrainer_1epochs", "-device", "cpu", "--preprocessed",
            prepared / "pre", "--results", results)
    proc = run_cli(*args, "-num_gpus", str(WORLD), env=THREADS)
    assert proc.returncode == 0, proc.stderr
    fold = results / "Dataset042_Tiny" / f"LNMTrainer_1epochs__LNMPlans__{CONFIG}" / "fold_0"
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert f"{WORLD} processes (global batch 4 = 2+2 per rank)" in log
    assert load_checkpoint(fold / "checkpoint_final.pth")["current_epoch"] == 1
    proc = run_cli(*args, "-num_gpus", "5", env=THREADS)   # refused before any process starts
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("lnm_train: error: 5 processes cannot share the plan's batch of 4 nodes "
                                   f"(configuration {CONFIG}): use at most 4 processes, or plan a larger batch")
