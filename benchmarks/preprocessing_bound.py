"""Benchmark: lnm_plan_and_preprocess against its physical floor, the time to merely read every image and
node mask with SimpleITK (decompression is the floor). Target (issue 13): <= 1.5x with one process;
the same with -np 2 against a two-process read. Also reported: the share spent verifying the dataset
(a run with --no-verify) and peak memory.

    python benchmarks/preprocessing_bound.py --quick
    python benchmarks/preprocessing_bound.py --cases 40
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (bench_env, dataset_dir, lnm_command, machine_header, make_phantom, run_timed,  # noqa: E402
                    write_results)

TARGET = 1.5
DATASET_ID = 982


def _read(path: str) -> int:
    import SimpleITK as sitk
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)   # as one preprocessing worker would
    return sitk.GetArrayViewFromImage(sitk.ReadImage(path)).size


def raw_files(raw_dataset: Path) -> list[Path]:
    """Every training image and node mask: what preprocessing has to read at least once."""
    return sorted((raw_dataset / "imagesTr").glob("*.nii.gz")) + sorted((raw_dataset / "nodesTr").glob("*.nii.gz"))


def read_floor_s(files: list[Path], processes: int, repeats: int = 2) -> float:
    """Best-of-``repeats`` seconds to read ``files`` with ``processes`` processes (pool start included)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        if processes == 1:
            for f in files:
                _read(str(f))
        else:
            with ProcessPoolExecutor(processes) as pool:
                list(pool.map(_read, map(str, files)))
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10 cases instead of 40")
    ap.add_argument("--cases", type=int, default=None)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lnm_bench/preprocessing"))
    args = ap.parse_args(argv)
    cases = args.cases or (10 if args.quick else 40)
    header, env = machine_header(), bench_env(args.workdir)
    make_phantom(args.workdir, DATASET_ID, cases, env=env)
    files = raw_files(dataset_dir(args.workdir / "raw", DATASET_ID))
    # the command's fixed cost: interpreter start and the imports of the preprocessing stage
    startup = run_timed([sys.executable, "-c", "import lnm_auto.cli.data_commands, lnm_auto.planning.plan_and_preprocess"],
                        env=env).wall_s
    rows = []
    for np_ in args.processes:
        floor = read_floor_s(files, np_)
        full = run_timed(lnm_command("plan_and_preprocess", "-d", DATASET_ID, "-np", np_, "--clean", "--quiet"), env=env)
        no_verify = run_timed(lnm_command("plan_and_preprocess", "-d", DATASET_ID, "-np", np_, "--clean", "--quiet",
                                          "--no-verify"), env=env)
        plan_only = run_timed(lnm_command("plan_and_preprocess", "-d", DATASET_ID, "-np", np_, "--clean", "--quiet",
                                          "--no_pp"), env=env)
        rows.append({"-np": np_, "cases": cases, "read floor s": floor, "lnm_plan_and_preprocess s": full.wall_s,
                     "ratio": full.wall_s / floor, "target": f"<= {TARGET}", "met": full.wall_s / floor <= TARGET,
                     "--no-verify s": no_verify.wall_s, "ratio --no-verify": no_verify.wall_s / floor,
                     "start-up s": startup, "verify + fingerprint + plan s (--no_pp)": plan_only.wall_s,
                     "crop caches s": full.wall_s - plan_only.wall_s,
                     "peak RSS MB (largest process)": full.peak_rss_mb,
                     "peak RSS MB (all processes)": full.peak_tree_rss_mb})
        print(rows[-1], flush=True)
    if len(rows) > 1:
        rows.append({"-np": f"{rows[0]['-np']} -> {rows[-1]['-np']}", "read floor s": rows[0]["read floor s"] / rows[-1]["read floor s"],
                     "lnm_plan_and_preprocess s": rows[0]["lnm_plan_and_preprocess s"] / rows[-1]["lnm_plan_and_preprocess s"],
                     "ratio": None, "target": "speed-up", "met": None})
    notes = [f"read floor: SimpleITK ReadImage of {len(files)} files (every imagesTr image and nodesTr mask), "
             "one ITK thread per process, best of 2",
             "lnm_plan_and_preprocess --clean: verify + fingerprint + plan + crop caches, process start included; "
             "each stage reads every file (three reads against the floor's one), as nnU-Net's verify / fingerprint / "
             "preprocess do",
             "start-up s: a fresh interpreter importing the command's modules; crop caches s: the full run minus the "
             "--no_pp run (verify + fingerprint + plan only)",
             "last row: speed-up from the first to the last process count"]
    write_results("preprocessing_bound_quick" if args.quick else "preprocessing_bound", header, rows, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
