"""The user's wait: the whole README pipeline on a 40-case CT phantom, timed per stage, beside the chosen model's
test AUROC and the arithmetic bound of its training.

    python benchmarks/pipeline_time.py                     # 40 + 16 cases, 30 % node-labelled; the plans' recipe
    python benchmarks/pipeline_time.py --folds-at-once 2   # the same, two lnm_train at once (-nt 1 -num_workers 0)
    python benchmarks/pipeline_time.py --folds-at-once 2 --one-queue   # ... every configuration's folds in one queue
    python benchmarks/pipeline_time.py --quick             # 12 + 6 cases, 1 epoch: a check of this script

Steps, each a public command as the README gives it (no -tr: the scheme the plans recommend for the label mix,
e.g. LNMTrainer then LNMTrainerPGLS; no --epochs unless --epochs is given):
  lnm_make_phantom (sparse node labels, stations and patients everywhere; not part of the wait)
  lnm_plan_and_preprocess -d ID
  lnm_train ID C k    for C in radiomics, deep_radiomics, 2d25 (+ 3d_resenc with --with-3d), k = 0..4
  lnm_find_best_configuration -d ID
  lnm_predict -i imagesTs -o preds -d ID
  lnm_evaluate -ref nodesTs.csv -pred preds/nodes.csv --compare <size rule on the same nodes>
With --folds-at-once 2 the folds of a configuration run two at a time (fold 0 of radiomics and deep_radiomics
alone first: it fills the feature cache the other folds read), each with -nt 1 -num_workers 0, as
documentation/threads.md recommends on 2 cores.

Training bound, per network configuration: the crops every fold trained on (each epoch's crops/s x its seconds,
from the training logs, every stage of the scheme) over the rate of the trainer's own train_step on real batches
already in memory (no data loading, no validation), measured here with the threads the folds had: the time the
training would take if it did nothing but the network's arithmetic at the rate this machine reaches for it. The
achieved fraction is that bound over the seconds the folds' epochs took, summed over folds (per process: with two
folds at once, both count; target >= 40 %, issue 25). The rate is LNMTrainer's step; a PGLS step's crops include
the teacher's views, which only go forward but are counted as trained, so the bound and the achieved fraction are
a little high where PGLS runs (about 8 % with the CPU plan's 5 PGLS epochs after 25 supervised ones). GFLOP/s uses
the configuration's planned forward GFLOPs per crop x 3 (forward + backward).
Results: results/pipeline_time[_2_at_once][_quick].{json,md} (or --name).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (bench_env, dataset_dir, lnm_command, machine_header, make_phantom, parse_training_log,  # noqa: E402
                    run_timed, write_results)

DATASET_ID = 986
CONFIGURATIONS = ("radiomics", "deep_radiomics", "2d25")
CLASSIFIERS = ("radiomics", "deep_radiomics")     # fold 0 fills the feature cache the other folds read
FOLDS = ("0", "1", "2", "3", "4")


def timed(cmd: list[str], env: dict) -> float:
    print("  " + "lnm_" + " ".join(map(str, cmd[3:])), flush=True)
    return run_timed(cmd, env=env).wall_s


def train_configuration(configuration: str, env: dict, folds_at_once: int, epochs: int | None) -> float:
    """All five folds of one configuration as a user runs them; returns the wall time."""
    side_by_side = ["-nt", "1", "-num_workers", "0"] if folds_at_once > 1 else []
    extra = [*(["--epochs", epochs] if epochs else []), *side_by_side]
    commands = [lnm_command("train", DATASET_ID, configuration, fold, *extra) for fold in FOLDS]
    t0 = time.perf_counter()
    if folds_at_once > 1 and configuration in CLASSIFIERS:
        timed(commands.pop(0), env)
    with ThreadPoolExecutor(folds_at_once) as pool:
        list(pool.map(lambda c: timed(c, env), commands))
    return time.perf_counter() - t0


def train_in_one_queue(configurations: list[str], env: dict, folds_at_once: int,
                       epochs: int | None) -> tuple[float, dict[str, float]]:
    """Every fold of every configuration through one queue of ``folds_at_once`` commands (-nt 1 -num_workers 0),
    as lnm_demo trains: fold 0 of each classifier first (it fills the feature cache its other folds read), then the
    network folds, longest first, then the rest, so no core waits for a configuration's last fold. Returns (the
    wall time, each configuration's summed command seconds)."""
    extra = [*(["--epochs", epochs] if epochs else []), "-nt", "1", "-num_workers", "0"]
    networks = [c for c in configurations if c not in CLASSIFIERS]
    classifiers = [c for c in configurations if c in CLASSIFIERS]
    first = [(c, "0") for c in classifiers]
    queue = [(c, f) for c in networks for f in FOLDS] + [(c, f) for c in classifiers for f in FOLDS[1:]]
    seconds, lock = {c: 0.0 for c in configurations}, threading.Lock()

    def run(job: tuple[str, str]) -> None:
        wall = timed(lnm_command("train", DATASET_ID, job[0], job[1], *extra), env)
        with lock:
            seconds[job[0]] += wall

    t0 = time.perf_counter()
    with ThreadPoolExecutor(folds_at_once) as pool:
        list(pool.map(run, first))
        list(pool.map(run, queue))
    return time.perf_counter() - t0, seconds


def crops_trained(results: Path, configuration: str) -> tuple[float, float, list[str]]:
    """(crops trained on, seconds of the epochs that trained them, the model folders) over every fold and stage of
    ``configuration``: from each fold's newest training log (epoch seconds include validation)."""
    crops = seconds = 0.0
    folders = sorted(p for p in results.glob(f"Dataset*/*__*__{configuration}") if p.is_dir())
    for folder in folders:
        for fold in sorted(folder.glob("fold_*")):
            logs = sorted(fold.glob("training_log*.txt"), key=lambda p: p.stat().st_mtime)
            if not logs:
                continue
            log = parse_training_log(logs[-1].read_text())
            crops += sum(r * s for r, s in zip(log["crops_per_s"], log["epoch_s"]))
            seconds += sum(log["epoch_s"])
    return crops, seconds, [f.name for f in folders]


def step_rate(configuration: str, pre: Path, results: Path, threads: int, n_steps: int) -> tuple[float, float]:
    """(nodes/s of the trainer's own train_step on real batches in memory, planned forward GFLOPs per node)."""
    import torch

    from lnm_auto.training.data import batch_to_device, training_batches
    from lnm_auto.training.run import setup_trainer
    torch.set_num_threads(threads)
    scratch = results.parent / "step_rate_results"     # the measuring trainer's folder, not the pipeline's
    shutil.rmtree(scratch, ignore_errors=True)
    trainer = setup_trainer(DATASET_ID, configuration, "0", pre, scratch, "LNMTrainer", device="cpu", num_workers=0)
    trainer.store.unpack(sorted(trainer.train_cases))
    trainer.on_train_start()
    source = training_batches(trainer.plans, trainer.config, trainer.make_loader(trainer.training_records(), 0), 0, 0)
    batches = [batch_to_device(next(source), trainer.device) for _ in range(n_steps + 1)]
    trainer.train_step(batches[0])              # warm-up
    t0 = time.perf_counter()
    for b in batches[1:]:
        trainer.train_step(b)
    seconds = time.perf_counter() - t0
    nodes = sum(int(b["label"].shape[0]) for b in batches[1:])
    from lnm_auto.configurations import kind_of
    gflops = kind_of(trainer.config).cost_gflops(trainer.config)
    shutil.rmtree(scratch, ignore_errors=True)
    return nodes / seconds, gflops


def candidate_test_aurocs(work: Path, raw: Path, env: dict) -> list[dict]:
    """Every trained model's node and patient test AUROC beside the choice (not part of the wait): each model folder
    (trainer, configuration) predicts the test cases as ``lnm_predict -c C -tr T`` and is scored as the choice is."""
    rows = []
    patients = [*(["--ref_patients", raw / "patientsTs.csv"] if (raw / "patientsTs.csv").is_file() else [])]
    for folder in sorted(p for p in (work / "results").glob("Dataset*/*__*__*") if p.is_dir()):
        trainer, plans, configuration = folder.name.split("__")
        preds, report = work / "candidates" / folder.name, work / "candidates" / f"{folder.name}_report"
        run_timed(lnm_command("predict", "-i", raw / "imagesTs", "-o", preds, "-d", DATASET_ID, "-c", configuration,
                              "-tr", trainer, "-p", plans), env=env)
        run_timed(lnm_command("evaluate", "-ref", raw / "nodesTs.csv", "-pred", preds / "nodes.csv", "-o", report,
                              *patients), env=env)
        levels = json.loads((report / "metrics.json").read_text())["levels"]
        rows.append({"model": folder.name, **{f"test {level} AUROC": levels[level].get("auroc")
                                              for level in ("node", "patient") if level in levels}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lnm_bench/pipeline_time"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--test-cases", type=int, default=16)
    ap.add_argument("--labeled-fraction", type=float, default=0.3)
    ap.add_argument("--folds-at-once", type=int, default=1, choices=(1, 2))
    ap.add_argument("--epochs", type=int, default=None, help="lnm_train --epochs (default: the plans' recipe)")
    ap.add_argument("--one-queue", action="store_true",
                    help="with --folds-at-once 2: every configuration's folds through one queue (as lnm_demo trains)")
    ap.add_argument("--with-3d", action="store_true", help="also 3d_resenc")
    ap.add_argument("--bound-steps", type=int, default=12, help="train_step calls timed for the bound")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    if args.one_queue and args.folds_at_once < 2:
        ap.error("--one-queue needs --folds-at-once 2")
    if args.quick:
        args.cases, args.test_cases, args.epochs, args.bound_steps = 12, 6, args.epochs or 1, 3
    work = args.workdir
    for sub in ("preprocessed", "results", "preds", "report", "candidates"):    # every run measures the whole wait afresh
        shutil.rmtree(work / sub, ignore_errors=True)
    env = bench_env(work)
    header = machine_header()
    make_phantom(work, DATASET_ID, args.cases, args.test_cases, ("--labeled_fraction", args.labeled_fraction),
                 env=env)
    raw = dataset_dir(work / "raw", DATASET_ID)
    configurations = [*CONFIGURATIONS, *(["3d_resenc"] if args.with_3d else [])]
    stages, t_all = [], time.perf_counter()
    print("plan", flush=True)
    stages.append({"stage": "plan and preprocess", "wall_s": timed(lnm_command("plan_and_preprocess", "-d", DATASET_ID),
                                                                   env)})
    if args.one_queue:
        print(f"train {', '.join(configurations)}: one queue, {args.folds_at_once} at once", flush=True)
        wall, seconds = train_in_one_queue(configurations, env, args.folds_at_once, args.epochs)
        stages.append({"stage": f"train {', '.join(configurations)} (5 folds each, one queue of "
                                f"{args.folds_at_once})", "wall_s": wall,
                       "command seconds": ", ".join(f"{c} {v:.0f}" for c, v in seconds.items())})
    for configuration in ([] if args.one_queue else configurations):
        print(f"train {configuration}", flush=True)
        stages.append({"stage": f"train {configuration} (5 folds)",
                       "wall_s": train_configuration(configuration, env, args.folds_at_once, args.epochs)})
    print("choose, predict, evaluate", flush=True)
    stages.append({"stage": "find_best_configuration",
                   "wall_s": timed(lnm_command("find_best_configuration", "-d", DATASET_ID), env)})
    preds, report = work / "preds", work / "report"
    stages.append({"stage": f"predict {args.test_cases} test cases",
                   "wall_s": timed(lnm_command("predict", "-i", raw / "imagesTs", "-o", preds, "-d", DATASET_ID), env)})
    from lnm_auto.evaluation.crossval import SIZE_RULE
    from lnm_auto.evaluation.size_rule import write_size_rule_predictions
    size_rule = work / "size_rule_nodes.csv"
    write_size_rule_predictions(raw / "nodesTs", size_rule)
    patients = [*(["--ref_patients", raw / "patientsTs.csv"] if (raw / "patientsTs.csv").is_file() else [])]
    stages.append({"stage": "evaluate", "wall_s": timed(lnm_command(
        "evaluate", "-ref", raw / "nodesTs.csv", "-pred", preds / "nodes.csv", "-o", report, *patients,
        "--compare", size_rule, "--compare_name", SIZE_RULE), env)})
    total = time.perf_counter() - t_all
    for s in stages:
        s["share"] = f"{100 * s['wall_s'] / total:.0f} %"
    stages.append({"stage": "whole pipeline", "wall_s": total, "share": "100 %"})

    results, pre = work / "results", work / "preprocessed"
    instructions = json.loads(next(results.glob("Dataset*/inference_instructions.json")).read_text())
    chosen = "the size rule (short axis)" if instructions.get("size_rule") else instructions.get("chosen")
    metrics = json.loads((report / "metrics.json").read_text())
    test_auroc = {level: {"chosen": metrics["levels"][level].get("auroc"),
                          "size rule": ((metrics.get("comparison") or {}).get(level) or {}).get("metrics_b", {})
                          .get("auroc")}
                  for level in ("node", "patient") if "auroc" in metrics["levels"].get(level, {})}
    import torch        # its threads: the caller's setting (common.py configures them as lnm_train does)
    threads = 1 if args.folds_at_once > 1 else torch.get_num_threads()
    bound_rows = []
    for configuration in configurations:
        if configuration in CLASSIFIERS:
            continue
        nodes, seconds, folders = crops_trained(results, configuration)
        rate, gflops = step_rate(configuration, pre, results, threads, args.bound_steps)
        bound = nodes / rate
        bound_rows.append({"configuration": configuration, "model folders": ", ".join(folders),
                           "crops trained": round(nodes), "epoch seconds (all folds)": round(seconds, 1),
                           "train_step nodes/s": round(rate, 1), "bound_s": round(bound, 1),
                           "achieved fraction (bound / epoch seconds)": round(bound / seconds, 2) if seconds else None,
                           "achieved GFLOP/s": round(3 * gflops * nodes / seconds, 2) if seconds else None,
                           "train_step GFLOP/s": round(3 * gflops * rate, 2)})
    shutil.rmtree(work / "candidates", ignore_errors=True)
    candidates = candidate_test_aurocs(work, raw, env)
    name = args.name or ("pipeline_time" + ("_2_at_once" if args.folds_at_once > 1 else "")
                         + ("_one_queue" if args.one_queue else "")
                         + ("_quick" if args.quick else ""))
    notes = [f"chosen: {json.dumps(chosen)}",
             f"test AUROC [patient-bootstrap 95 % CI] of the choice beside the size rule on the same units: "
             f"{json.dumps(test_auroc)}",
             f"arguments: {json.dumps({k: str(v) for k, v in vars(args).items()})}",
             "training bound: " + json.dumps(bound_rows),
             "every trained model on the test cases (not part of the wait): " + json.dumps(candidates),
             "wall_s: the command's wall time, interpreter start included; the folds of a configuration together"]
    write_results(name, header, stages, notes)
    print(f"whole pipeline {total:.0f} s; chosen {chosen}")


if __name__ == "__main__":
    main()
