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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (bench_env, dataset_dir, lnm_command, machine_header, make_phantom, predict,  # noqa: E402
                    prediction_input, run_timed, train, write_results)

LINEAR_TARGET = 1.2   # seconds per case at the largest size / at the smallest
FIRST_ID = 985
REALISTIC_ID = 989
REALISTIC_SHAPE = (512, 512, 80)


def make_realistic_phantom(workdir: Path, cases: int) -> None:
    """A CT phantom at 512 x 512 x 80 voxels. lnm_make_phantom has no shape option, so this goes through the
    library's phantom writer (the one place this benchmark uses it)."""
    stamp = workdir / "raw" / f".phantom_{REALISTIC_ID}.json"
    if stamp.is_file():
        return
    from lnm_auto.datasets.phantom import PhantomConfig, make_phantom_dataset
    make_phantom_dataset(workdir / "raw", REALISTIC_ID, "Realistic",
                         PhantomConfig(n_cases=cases, n_test_cases=0, shape_xyz=REALISTIC_SHAPE), progress=False)
    stamp.write_text("{}")


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
        rows.append({"stage": "lnm_predict (1 fold, TTA)", "cases": n, "s": predict_s, "s/case": predict_s / n,
                     "peak RSS MB": r.peak_rss_mb, "all-process MB": r.peak_tree_rss_mb})
        print(rows[-1], flush=True)
    for stage in ("lnm_plan_and_preprocess", "lnm_predict (1 fold, TTA)"):
        per_case = [r["s/case"] for r in rows if r["stage"] == stage]
        ratio = per_case[-1] / per_case[0]
        rows.append({"stage": f"{stage}: s/case {sizes[-1]} / {sizes[0]} cases", "s/case": ratio,
                     "target": f"<= {LINEAR_TARGET} (linear)", "met": ratio <= LINEAR_TARGET})
    if args.realistic:
        make_realistic_phantom(args.workdir, 40)
        r = run_timed(lnm_command("plan_and_preprocess", "-d", REALISTIC_ID, "--clean", "--quiet"), env=env)
        rows.append({"stage": "lnm_plan_and_preprocess 512x512x80", "cases": 40, "s": r.wall_s, "s/case": r.wall_s / 40,
                     "peak RSS MB": r.peak_rss_mb, "all-process MB": r.peak_tree_rss_mb})
    notes = ["preprocessing: --clean, default process count, interpreter start included",
             "prediction: predict_info.json wall time, one fold trained 1 epoch on the smallest dataset, "
             "no probability maps",
             "linear: seconds per case at the largest size over the smallest (fixed start-up costs make small sizes "
             "look slower per case)"]
    write_results("scaling_quick" if args.quick else "scaling", header, rows, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
