"""Benchmark: preprocessing and inference time as the number of cases grows (10, 40, 160); both should be
linear, i.e. seconds per case flat. Also the realistic size: --realistic adds a 40-case phantom at
512 x 512 x 80 voxels (preprocessing time and memory).

    python benchmarks/scaling.py --quick        # 5, 10, 20 cases
    python benchmarks/scaling.py                # 10, 40, 160 cases
    python benchmarks/scaling.py --realistic    # plus the 512 x 512 x 80 phantom
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (bench_env, dataset_dir, lnm_command, machine_header, make_phantom, predict,  # noqa: E402
                    prediction_input, run_timed, train, write_results)

LINEAR_TARGET = 1.2   # seconds per case at the largest size / at the smallest
FIRST_ID = 985
REALISTIC_ID = 989
REALISTIC_SHAPE = (512, 512, 80)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--realistic", action="store_true", help="also the 40-case 512 x 512 x 80 phantom")
    ap.add_argument("--configuration", default="2d25")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lnm_bench/scaling"))
    args = ap.parse_args(argv)
    sizes = sorted(args.sizes or ([5, 10, 20] if args.quick else [10, 40, 160]))
    header, env = machine_header(), bench_env(args.workdir)
    rows = []
    for i, n in enumerate(sizes):   # the first dataset also holds the test cases for every size
        make_phantom(args.workdir, FIRST_ID + i, n, test_cases=max(sizes) if i == 0 else 0, env=env)
        r = run_timed(lnm_command("plan_and_preprocess", "-d", FIRST_ID + i, "--clean", "--quiet"), env=env)
        rows.append({"stage": "lnm_plan_and_preprocess", "cases": n, "s": r.wall_s, "s/case": r.wall_s / n,
                     "peak RSS MB": r.peak_rss_mb, "all-process MB": r.peak_tree_rss_mb})
        print(rows[-1], flush=True)
    _, fold_dir, _ = train(args.workdir, FIRST_ID, args.configuration, 1, env)
    raw = dataset_dir(args.workdir / "raw", FIRST_ID)
    for n in sizes:
        input_dir = args.workdir / f"input_{n}"
        prediction_input(raw, n, input_dir)
        r, predict_s = predict(input_dir, args.workdir / f"pred_{n}", fold_dir.parent, env, ("-f", "0"))
        nodes = len(pd.read_csv(args.workdir / f"pred_{n}" / "nodes.csv"))
        rows.append({"stage": "lnm_predict (1 fold, TTA)", "cases": n, "nodes": nodes, "s": predict_s,
                     "s/case": predict_s / n, "s/node": predict_s / nodes,
                     "peak RSS MB": r.peak_rss_mb, "all-process MB": r.peak_tree_rss_mb})
        print(rows[-1], flush=True)
    # prediction's work is per node (each node's crops through the network): cases of the test set differ in
    # node count, so seconds per node is the measure of linearity there, seconds per case beside it
    for stage, unit in (("lnm_plan_and_preprocess", "s/case"), ("lnm_predict (1 fold, TTA)", "s/node"),
                        ("lnm_predict (1 fold, TTA)", "s/case")):
        per_unit = [r[unit] for r in rows if r["stage"] == stage]
        ratio = per_unit[-1] / per_unit[0]
        decides = unit == "s/node" or stage == "lnm_plan_and_preprocess"
        rows.append({"stage": f"{stage}: {unit} {sizes[-1]} / {sizes[0]} cases", unit: ratio,
                     "target": f"<= {LINEAR_TARGET} (linear)" if decides else "context",
                     "met": ratio <= LINEAR_TARGET if decides else None})
    if args.realistic:
        make_phantom(args.workdir, REALISTIC_ID, 40, extra_args=("--shape", *REALISTIC_SHAPE), env=env)
        r = run_timed(lnm_command("plan_and_preprocess", "-d", REALISTIC_ID, "--clean", "--quiet"), env=env)
        rows.append({"stage": "lnm_plan_and_preprocess 512x512x80", "cases": 40, "s": r.wall_s, "s/case": r.wall_s / 40,
                     "peak RSS MB": r.peak_rss_mb, "all-process MB": r.peak_tree_rss_mb})
    notes = ["preprocessing: --clean, default process count, interpreter start included",
             "prediction: predict_info.json wall time, one fold trained 1 epoch on the smallest dataset, "
             "no probability maps",
             "linear: seconds per case (preprocessing) or per node (prediction, whose work is per node; the test "
             "cases differ in node count) at the largest size over the smallest (fixed start-up costs make small "
             "sizes look slower)"]
    write_results("scaling_quick" if args.quick else "scaling", header, rows, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
