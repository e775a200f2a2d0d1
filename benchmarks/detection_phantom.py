"""CT in, nodes found: the whole detection path on the phantom, run through the public commands as a new user.

    python benchmarks/detection_phantom.py            # 40 + 10 cases, CPU detector (2d, 5 epochs x 50 iterations)
    python benchmarks/detection_phantom.py --quick    # 16 + 6 cases, 2 epochs x 20 iterations (a smoke run)

Steps (every one a CLI; the exact commands are written into the results):
  lnm_make_phantom -> lnm_plan_and_preprocess -> lnm_train radiomics (5 folds) -> lnm_find_best_configuration
  -> lnm_train_detector (nnU-Net v2, its small CPU variant) -> copy imagesTs/ alone (no masks) ->
  lnm_predict -i imagesTs_only/ -d (nodes found by the dataset's own detector) and lnm_predict -i imagesTs/ -d (the
  given masks) -> lnm_evaluate --ref_masks nodesTs/ --compare (given masks) -> detection sensitivity, false
  positives per case, classification on found nodes and the patient AUROC with detected beside given masks.

The CPU detector is a smoke-level nnU-Net (documentation/detection.md), far from nnU-Net's quality: its numbers
show that the chain works and what detection errors do downstream, not what a GPU-trained detector achieves.
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
        log.append({"step": what, "command": line, "wall_s": json.loads(done.read_text())["wall_s"]})
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
    ap.add_argument("--detector-epochs", type=int, default=5, help="nnU-Net epochs of the CPU detector")
    ap.add_argument("--iterations", type=int, default=30, help="nnU-Net training iterations per epoch")
    ap.add_argument("--gpu-memory-target", type=float, default=0.5,
                    help="GB nnU-Net plans its batch for (lnm_train_detector's CPU default 1 GB gives the 224 x 288 "
                         "slices a batch of 6, 10-14 s per iteration on this machine; 0.5: a batch of about 3)")
    ap.add_argument("--train-only", action="store_true", help="stop after training (a later run predicts)")
    ap.add_argument("--detector-folds", nargs="+", default=["0"], help="nnU-Net folds to train (default: 0)")
    args = ap.parse_args()
    if args.quick:
        args.cases, args.test_cases, args.detector_epochs, args.iterations = 16, 6, 1, 20
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
    # nnU-Net ships nnUNetTrainer_1epoch, _5epochs, _10epochs ... (nnunetv2/training/nnUNetTrainer/variants)
    trainer = "nnUNetTrainer_1epoch" if args.detector_epochs == 1 else f"nnUNetTrainer_{args.detector_epochs}epochs"
    run(lnm_command("train_detector", DATASET_ID, *args.detector_folds, "-c", "2d", "-tr", trainer, "-device", "cpu",
                    "--iterations_per_epoch", args.iterations, "-gpu_memory_target", args.gpu_memory_target), env, log,
        "train the detector (nnU-Net v2, CPU)", work / f".done_detector_{trainer}_{args.iterations}_{args.gpu_memory_target:g}")
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
    notes += [f"arguments: {vars(args)}", f"wall time {time.time() - t0:.0f} s",
              "the CPU detector is nnU-Net's 2d configuration trained for a few short epochs: a smoke-level "
              "detector (documentation/detection.md), not nnU-Net's quality"]
    name = "detection_phantom" + ("_quick" if args.quick else "")
    write_results(name, header, rows, notes)
    (RESULTS_DIR / f"{name}_detection.json").write_text(json.dumps(det, indent=2, default=str) + "\n")
    print(f"dataset {ds}: done")


if __name__ == "__main__":
    main()
