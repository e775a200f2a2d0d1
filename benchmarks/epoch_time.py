"""Benchmark: wall time of one training epoch per configuration on the 40-case CT phantom (CPU planner),
and the share of it spent waiting for data. Target (issue #3): well under a minute on 2 cores.

    python benchmarks/epoch_time.py --workdir /tmp/lnm_epoch_time --epochs 2
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from lnm_auto.datasets.phantom import PhantomConfig, make_phantom_dataset
from lnm_auto.planning.plan_and_preprocess import plan_and_preprocess
from lnm_auto.training.run import run_training, setup_trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/lnm_epoch_time")
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--configurations", nargs="+", default=["2d25", "3d_resenc"])
    args = ap.parse_args()
    work = Path(args.workdir)
    t0 = time.time()
    make_phantom_dataset(work / "raw", 997, "Speed", PhantomConfig(n_cases=args.cases))
    t_phantom = time.time() - t0
    t0 = time.time()
    planned = plan_and_preprocess(997, work / "raw", work / "pre", num_processes=2, progress=False)
    t_plan = time.time() - t0
    print(f"phantom {args.cases} cases: {t_phantom:.1f} s; plan + preprocess: {t_plan:.1f} s "
          f"(planner {planned.plans.planner})")
    for c in args.configurations:
        tr = setup_trainer(997, c, "0", work / "pre", work / "results", "LNMTrainer", num_epochs=args.epochs)
        run_training(tr)
        times, waits = tr.log.values["epoch_time_s"], tr.log.values["data_wait_fraction"]
        print(f"{c}: {tr.network.__class__.__name__}, {sum(p.numel() for p in tr.network.parameters()) / 1e6:.1f} M "
              f"params, batch {tr.config.recipe.batch_size}; epoch times {', '.join(f'{t:.1f}' for t in times)} s; "
              f"waiting for data {', '.join(f'{100 * w:.0f}%' for w in waits)}")


if __name__ == "__main__":
    main()
