"""Benchmark: training speed per configuration and planner preset - nodes/s, the fraction of each epoch
spent waiting for data (target < 5 %), epoch time and peak memory - plus the thread and data-worker
levers reachable from the command line (the median over the epochs after the first).

    python benchmarks/training_speed.py --quick     # CPU preset, 1 epoch per run, 12 cases
    python benchmarks/training_speed.py             # both presets, 3 epochs, 40 cases, levers

Levers inside the training step (channels_last, torch.compile, bf16 autocast) have no command-line switch;
they are compared where they are implemented, and only what wins is kept (documentation/training.md).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (bench_env, lnm_command, machine_header, make_phantom, run_timed, thread_env, train,  # noqa: E402
                    write_results)

DATA_WAIT_TARGET = 0.05
DATASET_ID = 983
PRESETS = {"CPU": ("LNMPlannerCPU", "LNMPlansCPU"), "GPU": ("LNMPlanner", "LNMPlansGPU")}


def steady(values: list[float]) -> float:
    """Median over the epochs after the first (the first includes unpacking and warm-up) when there are more."""
    return statistics.median(values[1:] if len(values) > 1 else values)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cases", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--configurations", nargs="+", default=["2d25", "3d_resenc"])
    ap.add_argument("--presets", nargs="+", choices=list(PRESETS), default=None)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lnm_bench/training"))
    args = ap.parse_args(argv)
    cases, epochs = args.cases or (12 if args.quick else 40), args.epochs or (1 if args.quick else 3)
    presets = args.presets or (["CPU"] if args.quick else ["CPU", "GPU"])
    header, env = machine_header(), bench_env(args.workdir)
    make_phantom(args.workdir, DATASET_ID, cases, env=env)
    runs = [(preset, c, {}, ()) for preset in presets for c in args.configurations]
    if not args.quick:   # levers on the CPU preset's first configuration
        c = args.configurations[0]
        runs += [("CPU", c, thread_env(1), ()), ("CPU", c, {}, ("-num_workers", "0")),
                 ("CPU", c, {}, ("-num_workers", "2"))]
    planned = set()
    rows = []
    for preset, configuration, extra_env, extra_args in runs:
        planner, plans_name = PRESETS[preset]
        if preset not in planned:
            run_timed(lnm_command("plan_and_preprocess", "-d", DATASET_ID, "-pl", planner, "-p", plans_name, "--quiet"),
                      env=env)
            planned.add(preset)
        run_env = dict(env)
        for k, v in extra_env.items():
            run_env.pop(k, None) if v is None else run_env.__setitem__(k, v)
        r, folder, log = train(args.workdir, DATASET_ID, configuration, epochs, run_env,
                               extra_args=("-p", plans_name, *extra_args))
        lever = " ".join([*(f"{k}={v}" for k, v in extra_env.items() if k == "LNM_NUM_THREADS"), *extra_args]) or "defaults"
        wait = steady(log["data_wait"])
        rows.append({"configuration": configuration, "preset": preset, "lever": lever,
                     "nodes/s": steady(log["crops_per_s"]), "epoch s": steady(log["epoch_s"]),
                     "data wait": wait, "wait target": f"< {DATA_WAIT_TARGET:.0%}", "met": wait < DATA_WAIT_TARGET,
                     "peak RSS MB": r.peak_rss_mb, "all-process MB": r.peak_tree_rss_mb, "run s": r.wall_s})
        print(rows[-1], flush=True)
    notes = [f"{cases} phantom cases, fold 0, {epochs} epoch(s) per run; nodes/s from the training log "
             f"({log['crops_per_s_source']})",
             "data wait = share of the epoch spent waiting for the next batch (training log)",
             "peak RSS MB: largest process; all-process MB: sampled sum over the tree (shared pages counted per process)",
             "lever: LNM_NUM_THREADS = torch threads of the trainer; -num_workers = augmentation processes"]
    write_results("training_speed_quick" if args.quick else "training_speed", header, rows, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
