"""Benchmark: speed alone vs beside one competing CPU-bound process (a single-threaded numpy matmul loop in
another process, started and stopped by this script). Target (issue 13): beside one competitor, >= 0.4x
of the alone speed (two CPU-bound processes on two cores: the fair share is 0.5x).

Two parts:
  threads   a small conv net's training step (forward, backward, SGD) in a fresh process per thread
            setting: 2 threads, 2 threads with OMP_WAIT_POLICY=PASSIVE, 1 thread, ... - shows which
            OpenMP setting avoids the collapse (the environment variables act only when set before torch loads)
  cli       lnm_train (nodes/s on a small phantom) and lnm_predict (s/case), alone and beside the competitor,
            with the package's default threads (or --cli-threads N)

    python benchmarks/contention.py --quick            # minutes
    python benchmarks/contention.py --workdir /tmp/lnm_bench
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (bench_env, competing_process, lnm_command, machine_header, make_phantom, predict,  # noqa: E402
                    run_timed, thread_env, train, write_results)

TARGET_RATIO = 0.4
DATASET_ID = 981

# A training step of a small 2D conv net on 48 x 48 node crops (like the 2d25 configuration's stream):
# many small parallel regions per step, which is what makes lock-step OpenMP teams stall. Alone and beside
# windows alternate inside one process (the competitor is paused with SIGSTOP / resumed with SIGCONT), so
# load from anything else on the machine hits both sides alike.
_CONV_STEP = r"""
import os, resource, signal, statistics, sys, time, torch
threads, pairs, window, competitor = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
torch.manual_seed(0)
def block(i, o): return [torch.nn.Conv2d(i, o, 3, 2, 1, bias=False), torch.nn.BatchNorm2d(o), torch.nn.ReLU()]
net = torch.nn.Sequential(*block(8, 16), *block(16, 32), *block(32, 64), *block(64, 128),
                          torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, 1))
opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
x, y = torch.randn(16, 8, 48, 48), torch.rand(16, 1)
def step():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.binary_cross_entropy_with_logits(net(x), y).backward()
    opt.step()
def measure():
    ru0, n, t0 = resource.getrusage(resource.RUSAGE_SELF), 0, time.perf_counter()
    while time.perf_counter() - t0 < window:
        step(); n += 1
    ru1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    cpu = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
    return 16 * n / wall, 1000 * cpu / (16 * n)
for _ in range(3):
    step()
alone, beside = [], []
try:
    for _ in range(pairs):
        os.kill(competitor, signal.SIGSTOP); time.sleep(0.05)
        alone.append(measure())
        os.kill(competitor, signal.SIGCONT); time.sleep(0.05)
        beside.append(measure())
finally:
    os.kill(competitor, signal.SIGCONT)
ratios = [b[0] / a[0] for a, b in zip(alone, beside)]
med = lambda v: statistics.median(v)
print(med([a[0] for a in alone]), med([b[0] for b in beside]), med(ratios),
      med([a[1] for a in alone]), med([b[1] for b in beside]))
"""

THREAD_SETTINGS = {   # name -> (torch threads, environment set before torch loads)
    "2 threads (default wait policy)": (2, {}),
    "2 threads, OMP_WAIT_POLICY=PASSIVE": (2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "2 threads, GOMP_SPINCOUNT=10000": (2, {"GOMP_SPINCOUNT": "10000"}),
    "2 threads, KMP_BLOCKTIME=0 (Intel OpenMP only)": (2, {"KMP_BLOCKTIME": "0"}),
    "1 thread": (1, {}),
}
QUICK_SETTINGS = ("2 threads (default wait policy)", "2 threads, OMP_WAIT_POLICY=PASSIVE", "1 thread")


def conv_step_row(name: str, pairs: int, window_s: float) -> dict:
    """Alone vs beside-competitor samples/s (and CPU ms per sample) of the conv net step for one setting."""
    threads, env_extra = THREAD_SETTINGS[name]
    env = dict(bench_env(Path(".")), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **env_extra)
    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"):
        if var not in env_extra:
            env.pop(var, None)
    with competing_process() as competitor:
        r = run_timed([sys.executable, "-c", _CONV_STEP, str(threads), str(pairs), str(window_s), str(competitor.pid)],
                      env=env)
    alone, beside, ratio, cpu_alone, cpu_beside = map(float, r.stdout.split()[-5:])
    return {"part": "conv step", "setting": name, "alone samples/s": alone, "beside samples/s": beside,
            "ratio": ratio, "target": f">= {TARGET_RATIO}", "met": ratio >= TARGET_RATIO,
            "CPU ms/sample alone": cpu_alone, "CPU ms/sample beside": cpu_beside}


def cli_rows(workdir: Path, cases: int, epochs: int, threads: int | None, repeats: int, configuration: str) -> list[dict]:
    """lnm_train nodes/s and lnm_predict s/case, alone and beside the competitor."""
    env = bench_env(workdir, **thread_env(threads))
    make_phantom(workdir, DATASET_ID, cases, test_cases=max(2, cases // 4), env=env)
    run_timed(lnm_command("plan_and_preprocess", "-d", DATASET_ID, "--quiet"), env=env)
    label = "default threads" if threads is None else f"{threads} thread(s)"
    rows, speeds, predict_times = [], {False: [], True: []}, {False: [], True: []}
    test_dir = next((workdir / "raw").glob(f"Dataset{DATASET_ID:03d}_*")) / "imagesTs"
    n_test = len({p.name.rsplit("_", 1)[0] for p in test_dir.glob("*.nii.gz")})
    for _ in range(repeats):
        for busy in (False, True):
            with competing_process(busy):
                _, fold_dir, log = train(workdir, DATASET_ID, configuration, epochs, env)
                speeds[busy].append(statistics.median(log["crops_per_s"]))
                out = workdir / f"pred_{'busy' if busy else 'alone'}"
                _, predict_s = predict(test_dir, out, fold_dir.parent, env, ("-f", "0"))
                predict_times[busy].append(predict_s / n_test)
    a, b = statistics.median(speeds[False]), statistics.median(speeds[True])
    rows.append({"part": f"lnm_train {configuration}", "setting": label, "alone nodes/s": a, "beside nodes/s": b,
                 "ratio": b / a, "target": f">= {TARGET_RATIO}", "met": b / a >= TARGET_RATIO,
                 "nodes/s source": log["crops_per_s_source"]})
    a, b = statistics.median(predict_times[False]), statistics.median(predict_times[True])
    rows.append({"part": f"lnm_predict {configuration} (1 fold, TTA)", "setting": label, "alone s/case": a,
                 "beside s/case": b, "ratio": a / b, "target": f">= {TARGET_RATIO}", "met": a / b >= TARGET_RATIO})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer settings, shorter runs")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lnm_bench/contention"))
    ap.add_argument("--parts", nargs="+", choices=["threads", "cli"], default=["threads", "cli"])
    ap.add_argument("--cli-threads", type=int, default=None, help="torch threads for the CLI runs (default: theirs)")
    ap.add_argument("--configuration", default="2d25")
    ap.add_argument("--results-name", default=None, help="file name of the results (default contention[_quick])")
    args = ap.parse_args(argv)
    header = machine_header()
    t0 = time.time()
    rows = []
    if "threads" in args.parts:
        settings = list(QUICK_SETTINGS if args.quick else THREAD_SETTINGS)
        for name in settings:
            rows.append(conv_step_row(name, pairs=8 if args.quick else 20, window_s=1.0))
            print(rows[-1], flush=True)
    if "cli" in args.parts:
        rows += cli_rows(args.workdir, cases=12 if args.quick else 40, epochs=1 if args.quick else 3,
                         threads=args.cli_threads, repeats=1 if args.quick else 2, configuration=args.configuration)
    notes = ["ratio = speed beside one single-threaded numpy matmul process / speed alone; fair share on 2 cores 0.5",
             "conv step: alone/beside windows of 1 s alternate in one process (competitor paused by SIGSTOP); ratio = median of the paired ratios", "cli: alone/beside runs alternate; medians over the repeats",
             f"wall time {time.time() - t0:.0f} s"]
    write_results(args.results_name or ("contention_quick" if args.quick else "contention"), header, rows, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
