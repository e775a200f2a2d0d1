"""Benchmark: the CPU levers inside the training step - channels_last memory format, torch.compile, bf16
autocast and the torch thread count - on the real trainer's own ``train_step`` with real augmented batches.

    python benchmarks/cpu_levers.py --quick     # 2d25 and 3d_resenc, 6 timed steps per lever and round
    python benchmarks/cpu_levers.py             # 20 timed steps, 3 rounds, and torch.compile
    python benchmarks/cpu_levers.py --quick --compile   # the quick run with torch.compile too

Every lever is timed in alternating rounds within one process (same batches, same weights at the start of
each window), so the ratios to the default compare like with like even on a machine whose load drifts.
The levers are not command-line switches: what wins here is what the trainer should do by default
(documentation/training.md). torch.compile's one-off compile time is reported separately (minutes per network on 2 cores, so the quick run
leaves it out unless --compile).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_env, lnm_command, machine_header, make_phantom, run_timed, write_results  # noqa: E402

import torch  # noqa: E402

from lnm_auto.training.data import batch_to_device, training_batches  # noqa: E402
from lnm_auto.training.run import setup_trainer  # noqa: E402
from lnm_auto.utils.threads import available_cores  # noqa: E402

DATASET_ID = 984


def convolutions_to(network: torch.nn.Module, channels_last: bool) -> None:
    """Conv2d weights in channels_last, Conv3d weights in channels_last_3d (or both back to contiguous)."""
    for m in network.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
            fmt = (torch.channels_last if isinstance(m, torch.nn.Conv2d) else torch.channels_last_3d) \
                if channels_last else torch.contiguous_format
            m.weight.data = m.weight.data.contiguous(memory_format=fmt)


def to_memory_format(batch: dict, fmt) -> dict:
    """5D image/mask tensors in ``fmt`` (channels_last_3d); everything else as is."""
    return {k: v.contiguous(memory_format=fmt) if torch.is_tensor(v) and v.ndim == 5 else v
            for k, v in batch.items()}


class Lever:
    """One setting of the step: how to prepare the network and batch, and the context the step runs in."""

    def __init__(self, name: str, threads: int, channels_last: bool = False, compile: bool = False,
                 bf16: bool = False):
        self.name, self.threads, self.channels_last, self.compile, self.bf16 = name, threads, channels_last, compile, bf16
        self.compile_s: float | None = None

    def prepare(self, trainer, state: dict, batches: list[dict]) -> list[dict]:
        """Fresh weights and optimizer from ``state``; the network wrapped as the lever asks."""
        trainer.network.load_state_dict(state["network"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        # every lever starts from contiguous weights (the networks put 2D convolutions in channels_last since
        # this benchmark found it faster), so each row compares with the same reference
        convolutions_to(trainer.network, self.channels_last)
        if self.channels_last:
            batches = [to_memory_format(b, torch.channels_last_3d) for b in batches]
        return batches

    def context(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()


def time_steps(trainer, lever: Lever, batches: list[dict]) -> float:
    """Seconds per step over ``batches`` (the first step of a compiled network is its compile: excluded)."""
    torch.set_num_threads(lever.threads)
    with lever.context():
        t0 = time.perf_counter()
        for b in batches:
            trainer.train_step(b)
    return (time.perf_counter() - t0) / len(batches)


def measure(configuration: str, pre: Path, results: Path, n_steps: int, rounds: int, compile: bool) -> list[dict]:
    trainer = setup_trainer(DATASET_ID, configuration, "0", pre, results, "LNMTrainer", device="cpu", num_workers=0)
    trainer.store.unpack(sorted(trainer.train_cases))
    trainer.on_train_start()
    records = trainer.training_records()
    source = training_batches(trainer.plans, trainer.config, trainer.make_loader(records, 0), 0, 0)
    batches = [batch_to_device(next(source), trainer.device) for _ in range(n_steps)]
    batch_size = batches[0]["label"].shape[0]
    state = {"network": copy.deepcopy(trainer.network.state_dict()),
             "optimizer": copy.deepcopy(trainer.optimizer.state_dict())}
    cores = available_cores()
    levers = [Lever(f"default ({cores} threads, contiguous)", cores), Lever("1 thread", 1),
              Lever("channels_last", cores, channels_last=True), Lever("bf16 autocast", cores, bf16=True),
              *([Lever("torch.compile", cores, compile=True)] if compile else [])]
    plain, compiled = trainer.network, None
    times: dict[str, list[float]] = {lv.name: [] for lv in levers}
    for _ in range(rounds):
        for lever in levers:
            trainer.network = plain
            use = lever.prepare(trainer, state, batches)
            if lever.compile:
                if compiled is None:
                    try:
                        compiled = torch.compile(plain)
                        trainer.network = compiled
                        t0 = time.perf_counter()
                        trainer.train_step(use[0])
                        lever.compile_s = time.perf_counter() - t0
                    except Exception as e:  # noqa: BLE001 - a failing compiler is a result, not a crash
                        lever.compile_s = float("nan")
                        print(f"torch.compile failed on {configuration}: {type(e).__name__}: {str(e)[:200]}")
                        compiled = False
                if compiled is False:
                    continue
                trainer.network = compiled      # shares its parameters with the plain network just reset
            times[lever.name].append(time_steps(trainer, lever, use))
            if lever.channels_last:
                convolutions_to(plain, False)
    trainer.network = plain
    base = statistics.median(times[levers[0].name])
    rows = []
    for lever in levers:
        if not times[lever.name]:
            rows.append({"configuration": configuration, "lever": lever.name, "status": "failed"})
            continue
        s = statistics.median(times[lever.name])
        rows.append({"configuration": configuration, "lever": lever.name, "batch": batch_size,
                     "s/step": round(s, 4), "nodes/s": round(batch_size / s, 1), "speed vs default": round(base / s, 3),
                     "compile s": None if lever.compile_s is None else round(lever.compile_s, 1)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--configurations", nargs="+", default=["2d25", "3d_resenc"])
    ap.add_argument("--compile", action="store_true", help="also torch.compile in the quick run (the full run has it)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lnm_bench/cpu_levers"))
    args = ap.parse_args(argv)
    n_steps, rounds = (6, 2) if args.quick else (20, 3)
    header, env = machine_header(), bench_env(args.workdir)
    make_phantom(args.workdir, DATASET_ID, 8, env=env)
    run_timed(lnm_command("plan_and_preprocess", "-d", DATASET_ID, "-pl", "LNMPlannerCPU", "-np", "1"), env=env)
    rows = []
    for configuration in args.configurations:
        rows += measure(configuration, Path(env["LNM_preprocessed"]), Path(env["LNM_results"]), n_steps, rounds,
                        args.compile or not args.quick)
    notes = [f"{n_steps} timed steps per lever and round, {rounds} rounds alternating the levers; median s/step",
             "speed vs default: default s/step / lever s/step (> 1: the lever is faster)",
             "the trainer's own train_step (forward, loss, backward, clip, optimizer) on real augmented batches"]
    write_results("cpu_levers" + ("_quick" if args.quick else ""), header, rows, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
