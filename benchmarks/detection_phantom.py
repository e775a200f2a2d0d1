"""CT in, nodes found: the whole detection path on the phantom, run through the public commands as a new user.

    python benchmarks/detection_phantom.py            # 40 + 10 cases, the CPU detector (2d_cpu, 20 x 40 iterations)
    python benchmarks/detection_phantom.py --quick    # 16 + 6 cases, 1 epoch x 20 iterations (a smoke run)

Steps (every one a CLI; the exact commands are written into the results):
  lnm_make_phantom -> lnm_plan_and_preprocess -> lnm_train radiomics (5 folds) -> lnm_find_best_configuration
  -> lnm_train_detector (nnU-Net v2; on a CPU its default, the 2d_cpu configuration) -> copy imagesTs/ alone (no masks) ->
  lnm_predict -i imagesTs_only/ -d (nodes found by the dataset's own detector) and lnm_predict -i imagesTs/ -d (the
  given masks) -> lnm_evaluate --ref_masks nodesTs/ --compare (given masks) -> detection sensitivity, false
  positives per case, classification on found nodes and the patient AUROC with detected beside given masks.

The CPU detector (documentation/detection.md) is small and trained for minutes, far from nnU-Net's quality: its
numbers show that the chain works and what detection errors do downstream, not what a GPU-trained detector achieves.
Results: results/detection_phantom[_quick].{json,md}.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (RESULTS_DIR, bench_env, dataset_dir, lnm_command, machine_header, make_phantom,  # noqa: E402
                    run_timed, write_results)

DATASET_ID = 981


def run(cmd: list[str], env: dict, log: list[dict], what: str, done: Path | None = None) -> None:
    """Run one public command, time it, keep its command line for the results. ``done``: a stamp file; a step
    whose stamp exists was finished by an earlier run of this script and is not repeated (training steps)."""
    line = "lnm_" + " ".join(map(str, cmd[3:]))
    if done is not None and done.is_file():
        log.append({"step": what, "command": line, "wall_s": json.loads(done.read_text())["wall_s"],
                    "ran": "in an earlier run of this script"})
        print(f"-- {what}: done by an earlier run", flush=True)
        return
    print(f"-- {what}: {line}", flush=True)
    result = run_timed(cmd, env=env)
    log.append({"step": what, "command": line, "wall_s": round(result.wall_s, 1)})
    if done is not None:
        done.write_text(json.dumps({"wall_s": round(result.wall_s, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/lnm_bench/detection_phantom")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--test-cases", type=int, default=10)
    ap.add_argument("--trainer", default=None,
                    help="nnU-Net trainer of the detector (default: lnm_train_detector's CPU default)")
    ap.add_argument("--iterations", type=int, default=0,
                    help="training iterations per epoch (default 0: the 2d_cpu plan's)")
    ap.add_argument("--train-only", action="store_true", help="stop after training (a later run predicts)")
    ap.add_argument("--detector-folds", nargs="+", default=["0"], help="nnU-Net folds to train (default: 0)")
    args = ap.parse_args()
    if args.quick:
        args.cases, args.test_cases, args.trainer, args.iterations = 16, 6, "nnUNetTrainer_1epoch", 20
    work = Path(args.workdir)
    env = bench_env(work)
    t0, log = time.time(), []
    header = machine_header()
    make_phantom(work, DATASET_ID, args.cases, args.test_cases, env=env)
    raw = dataset_dir(work / "raw", DATASET_ID)
    ds = raw.name
    run(lnm_command("plan_and_preprocess", "-d", DATASET_ID, "-c", "radiomics"), env, log, "plan", work / ".done_plan")
    for fold in range(5):
        run(lnm_command("train", DATASET_ID, "radiomics", fold), env, log, f"train radiomics fold {fold}",
            work / f".done_radiomics_{fold}")
    run(lnm_command("find_best_configuration", DATASET_ID), env, log, "choose", work / ".done_choose")
    # the CPU default as a user gets it; nnU-Net ships nnUNetTrainer_1epoch, _5epochs ... for shorter runs
    trainer = ["-tr", args.trainer] if args.trainer else []
    iterations = ["--iterations_per_epoch", args.iterations] if args.iterations else []
    run(lnm_command("train_detector", DATASET_ID, *args.detector_folds, *trainer, *iterations, "-device", "cpu"),
        env, log, "train the detector (nnU-Net v2, CPU)",
        work / f".done_detector_2d_cpu_{args.trainer or 'default'}_{args.iterations}")
    if args.train_only:
        return
    images_only = work / "imagesTs_only"
    shutil.rmtree(images_only, ignore_errors=True)
    shutil.copytree(raw / "imagesTs", images_only)
    detected, given, report = work / "preds_detected", work / "preds_given", work / "report"
    for folder in (detected, given, report):
        shutil.rmtree(folder, ignore_errors=True)
    run(lnm_command("predict", "-i", images_only, "-o", detected, "-d", DATASET_ID, "--disable_tta"), env, log,
        "predict on images alone (the dataset's detector finds the nodes)")
    run(lnm_command("predict", "-i", raw / "imagesTs", "-o", given, "-d", DATASET_ID, "--disable_tta"), env, log,
        "predict with the given node masks")
    run(lnm_command("evaluate", "-ref", raw / "nodesTsLabels.csv" if (raw / "nodesTsLabels.csv").is_file()
                    else raw / "nodesTs.csv", "-pred", detected / "nodes.csv", "-o", report,
                    "--ref_masks", raw / "nodesTs", "--ref_patients", raw / "patientsTs.csv",
                    "--compare", given / "nodes.csv", "--compare_name", "given masks"), env, log,
        "evaluate detection and classification")
    metrics = json.loads((report / "metrics.json").read_text())
    det = metrics["detection"]
    rows = [dict(r) for r in log]
    summary = {"reference nodes": det.get("n_reference_nodes"), "detected components": det.get("n_detected"),
               "sensitivity": det.get("sensitivity"), "false positives per case": det.get("false_positives_per_case"),
               "sensitivity by label": det.get("sensitivity_by_label"),
               "classification on found nodes (AUROC)": (det.get("classification_on_found_nodes") or {}).get("auroc"),
               "patient AUROC, detected vs given masks": det.get("patient_auroc")}
    notes = [f"{k}: {json.dumps(v, default=str)}" for k, v in summary.items()]
    # nnU-Net's own validation of each detector fold (its summary.json: Dice of the fold's validation cases)
    detector_root = work / "results" / ds / "detector" / "nnUNet_results"
    for summary_file in sorted(detector_root.glob("*/*__2d_cpu/fold_*/validation/summary.json")):
        if f"{args.trainer or 'nnUNetTrainer_20epochs'}__" in str(summary_file):
            dice = json.loads(summary_file.read_text())["foreground_mean"]["Dice"]
            notes.append(f"nnU-Net's own validation of {summary_file.parents[2].name}/{summary_file.parents[1].name}"
                         f": Dice {dice:.3f} on its validation cases")
    notes += [f"arguments: {vars(args)}", f"wall time {time.time() - t0:.0f} s",
              "the CPU detector is lnm_train_detector's CPU default: the 2d_cpu configuration added to nnU-Net's "
              "plans (documentation/detection.md), trained for minutes: not nnU-Net's quality"]
    name = "detection_phantom" + ("_quick" if args.quick else "")
    write_results(name, header, rows, notes)
    (RESULTS_DIR / f"{name}_detection.json").write_text(json.dumps(det, indent=2, default=str) + "\n")
    print(f"dataset {ds}: done")


if __name__ == "__main__":
    main()
