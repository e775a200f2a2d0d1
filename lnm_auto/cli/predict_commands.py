"""lnm_predict, lnm_export_model and lnm_evaluate."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lnm_auto.cli.common import _add_threads_flag, DEVICE_HELP, _add_location_flags, _add_progress_flag, _run, _say_device
from lnm_auto.utils.paths import base_folder


# ---- lnm_predict ----------------------------------------------------------------------------------
def predict_parser() -> argparse.ArgumentParser:
    """The lnm_predict argument parser."""
    p = argparse.ArgumentParser(prog="lnm_predict", description=(
        "Score every lymph node of new cases with the fold ensemble of a trained model. With -d and no -c (nor -m) "
        "it predicts with what lnm_find_best_configuration chose for the dataset: a model, an ensemble of models "
        "or the size rule."))
    p.add_argument("-i", "--input", required=True, help="folder of cases (see documentation/outputs.md)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("-d", "--dataset", default=None,
                   help="dataset of the model; without -c: the model, ensemble or size rule lnm_find_best_configuration "
                        "chose for it (inference_instructions.json), else its only trained model (default: the only "
                        "trained model's dataset)")
    p.add_argument("-c", "--configuration", default=None,
                   help="configuration of the model (default: with -d, what lnm_find_best_configuration chose - a model, "
                        "an ensemble or the size rule - on the folds it chose by, with its calibration; else the only "
                        "trained model's)")
    p.add_argument("-tr", "--trainer", default="LNMTrainer", help="trainer of the model (default: %(default)s)")
    p.add_argument("-p", "--plans_name", default="LNMPlans", help="plans of the model (default: %(default)s)")
    p.add_argument("-m", "--model", default=None,
                   help="a model folder or a zip from lnm_export_model (one model, or a dataset's choice from "
                        "lnm_export_model -d without -c) (default: found from -d/-c in $LNM_results)")
    p.add_argument("-f", "--folds", nargs="+", default=None,
                   help="folds to ensemble, for every member of a chosen ensemble (default: every planned fold; for "
                        "the choice, the folds it was chosen on)")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth",
                   help="checkpoint file of each fold, of every member of an ensemble (default: %(default)s)")
    p.add_argument("--detector", default=None, metavar="FOLDER",
                   help="a trained nnU-Net v2 model folder (<Trainer>__<Plans>__<configuration> with its fold_<k>) "
                        "finding the nodes of cases without a node mask (default: the detector packed in -m ZIP, else "
                        "with -d the dataset's own detector from lnm_train_detector, if trained; see "
                        "documentation/detection.md)")
    p.add_argument("--detector_label", default=None, metavar="LABEL",
                   help="the detector's lymph-node label, by value or by name in its dataset.json, e.g. lymph_node "
                        "(default: 1)")
    p.add_argument("-device", "--device", default="auto", help=DEVICE_HELP)
    p.add_argument("-npp", "--num_processes_preprocessing", type=int, default=None,
                   help="background processes preparing the next cases while the networks score one; 0: prepare "
                        "them in the main process (default: 1, 0 on a single core; on the CPU torch gets the cores "
                        "they leave: documentation/threads.md)")
    p.add_argument("--disable_tta", action="store_true", help="no test-time mirroring, 4x faster (default: mirror)")
    p.add_argument("--no_probmaps", action="store_true",
                   help="do not write <case>_probmap.nii.gz (default: write them)")
    p.add_argument("--save_probabilities", action="store_true",
                   help="nnU-Net's name: write <case>_probmap.nii.gz, the per-node probabilities in the image's "
                        "geometry (already the default; cannot go with --no_probmaps)")
    p.add_argument("--quiet", action="store_true", help="no progress output (default: progress shown)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo cases already predicted in -o and replace that folder's previous outputs (default: "
                        "skip finished cases, refuse outputs of other settings)")
    p.add_argument("--continue_prediction", action="store_true",
                   help="nnU-Net's name: skip the cases already predicted in -o (already the default; cannot go "
                        "with --overwrite)")
    p.add_argument("-num_parts", "--num_parts", type=int, default=1,
                   help="split the cases into this many parts, e.g. one per machine (default: %(default)s)")
    p.add_argument("-part_id", "--part_id", type=int, default=0,
                   help="which part this run predicts, 0..num_parts-1; each part writes nodes_part<K>.csv "
                        "(default: %(default)s)")
    _add_progress_flag(p)
    _add_location_flags(p, "results")
    _add_threads_flag(p)
    return p


def _refuse_contradicting_aliases(args: argparse.Namespace) -> None:
    """nnU-Net's flags ask for lnm_predict's defaults; with the flag that turns that default off they contradict."""
    from lnm_auto.utils.errors import LNMError
    if args.save_probabilities and args.no_probmaps:
        raise LNMError("--save_probabilities and --no_probmaps contradict each other; give one of them")
    if args.continue_prediction and args.overwrite:
        raise LNMError("--continue_prediction and --overwrite contradict each other; give one of them")


def _chosen_dataset(args: argparse.Namespace, results: Path | None) -> Path | None:
    """The folder of the choice to predict with: -m naming an exported choice, or -d without -c (when
    lnm_find_best_configuration ran); else None (one model)."""
    from lnm_auto.inference.ensemble import chosen_models
    from lnm_auto.inference.export_choice import exported_choice
    from lnm_auto.utils.paths import resolve_dataset_name
    if args.model is not None:
        return exported_choice(args.model)
    if args.configuration is None and args.dataset is not None and results is not None:
        dataset_results = results / resolve_dataset_name(args.dataset, results)
        if chosen_models(dataset_results) is not None:
            return dataset_results
    return None


def _detector(args: argparse.Namespace, results: Path | None, zip_first: bool = True):
    """The node detector for cases without a node mask: --detector, else the dataset's own (-d) when trained;
    None when there is none. With -m ZIP (``zip_first``) the zip's own comes before -d's: None here."""
    from lnm_auto.detection.detector import DetectorModel, find_dataset_detector
    from lnm_auto.utils.errors import LNMError
    from lnm_auto.utils.paths import resolve_dataset_name
    folder = Path(args.detector) if args.detector else None
    if folder is None and zip_first and _model_zip(args) is not None:
        return None               # the zip's own detector, if it packs one (_with_zip_detector), comes first
    if folder is None and args.dataset is not None and results is not None and results.is_dir():
        try:
            name = resolve_dataset_name(args.dataset, results)
        except LNMError:          # no such dataset: finding its model says so
            name = None
        folder = name and find_dataset_detector(results, name, say=print if not args.quiet else (lambda *a, **k: None))
    if folder is None:
        if args.detector_label is not None:
            raise LNMError("--detector_label needs a detector: --detector FOLDER, or -d of a dataset with a trained "
                           "detector (lnm_train_detector)")
        return None
    return DetectorModel.load(folder, args.detector_label)


def _model_zip(args: argparse.Namespace) -> Path | None:
    """-m when it names a zip (of one model or of a choice), else None."""
    import zipfile
    path = Path(args.model) if args.model is not None else None
    return path if path is not None and path.is_file() and zipfile.is_zipfile(path) else None


def _with_zip_detector(args: argparse.Namespace, detector, extracted_dataset: Path, results: Path | None):
    """The detector for a run with -m ZIP: --detector wins (said in a line when the zip packs one), else the zip's
    own, else (none packed) what -d finds as without a zip; any other run keeps ``detector``."""
    from lnm_auto.inference.detector_zip import DETECTOR_DIR, zip_detector
    model_zip = _model_zip(args)
    if model_zip is None:
        return detector
    if args.detector:
        if (extracted_dataset / DETECTOR_DIR).is_dir():
            print(f"--detector {args.detector} is used, not the detector packed in {model_zip}", flush=True)
        return detector
    packed = zip_detector(model_zip, extracted_dataset, args.detector_label)
    if packed is None:            # nothing packed: the dataset's own detector (-d), or none
        return _detector(args, results, zip_first=False)
    if not args.quiet:
        print(f"detector packed in {model_zip}: {packed.folder.name} (folds {', '.join(packed.folds)}, label "
              f"{packed.label} '{packed.label_name}') for cases without a node mask", flush=True)
    return packed


def _predict(args: argparse.Namespace) -> int:
    from lnm_auto.inference.ensemble import chosen_models, describe_choice, predict_chosen
    from lnm_auto.inference.model import TrainedModel, find_model
    from lnm_auto.inference.predictor import predict_folder
    from lnm_auto.utils.memory import reuse_freed_memory
    _refuse_contradicting_aliases(args)
    reuse_freed_memory()    # every case's image buffers reuse the last case's instead of fresh pages
    device = _say_device(args.device)
    workers = _preparation_workers(args, device)
    results = Path(args.results) if args.results else (Path(os.environ["LNM_results"]) if os.environ.get("LNM_results") else None)
    detector = _detector(args, results)
    dataset_results = _chosen_dataset(args, results)
    if dataset_results is not None:
        what = describe_choice(chosen_models(dataset_results))
        print(f"predicting with the choice of lnm_find_best_configuration: {what}", flush=True)
        detector = _with_zip_detector(args, detector, dataset_results, results)
        info = predict_chosen(Path(args.input), Path(args.output), dataset_results, device, workers,
                              not args.disable_tta, not args.no_probmaps, not args.quiet, args.overwrite, args.folds,
                              args.checkpoint, args.num_parts, args.part_id, detector)
        print(f"{info['n_nodes']} nodes of {info['n_cases']} case(s) scored; results in {args.output}")
        return 0
    folder = find_model(results, args.dataset, args.configuration, args.trainer, args.plans_name, args.model)
    detector = _with_zip_detector(args, detector, folder.parent, results)
    model = TrainedModel.load(folder)
    folds = args.folds or model.default_folds(model.model_file(args.checkpoint))
    calibration, why_not = model.calibration(folds, args.checkpoint)
    if why_not:
        print(f"warning: {why_not}", file=sys.stderr, flush=True)
    if calibration and not args.quiet:
        print(f"probabilities calibrated by the model's Platt map (a={calibration['a']:.3f}, b={calibration['b']:.3f}, "
              f"fitted on its out-of-fold predictions)", flush=True)
    info = predict_folder(Path(args.input), Path(args.output), folder, args.folds, args.checkpoint,
                          device, workers, not args.disable_tta,
                          not args.no_probmaps, not args.quiet, args.overwrite, args.num_parts,
                          args.part_id, calibration=calibration, detector=detector)
    print(f"{info['n_nodes']} nodes of {info['n_cases']} case(s) scored by folds {', '.join(info['folds'])} of "
          f"{folder}; results in {args.output}")
    return 0


def _preparation_workers(args: argparse.Namespace, device: str) -> int:
    """Background processes preparing cases (-npp, else the plan's); on the CPU torch threads follow (-nt wins)."""
    from lnm_auto.utils.errors import LNMError
    from lnm_auto.utils.threads import available_cores, plan_prediction, requested_threads
    if args.num_processes_preprocessing is not None and args.num_processes_preprocessing < 0:
        raise LNMError(f"-npp must be 0 (prepare cases in the main process) or more, got {args.num_processes_preprocessing}")
    workers, threads = plan_prediction(available_cores(), args.num_processes_preprocessing,
                                       requested_threads(args.num_threads))
    if device == "cpu":
        import torch
        torch.set_num_threads(threads)
    return workers


def predict_entry(argv: list[str] | None = None) -> int:
    """Run lnm_predict with ``argv``; returns the exit status."""
    return _run("lnm_predict", _predict, predict_parser(), argv)


def predict_cli() -> None:
    """Console entry point of lnm_predict."""
    sys.exit(predict_entry())


# ---- lnm_export_model -----------------------------------------------------------------------------
def export_parser() -> argparse.ArgumentParser:
    """The lnm_export_model argument parser."""
    p = argparse.ArgumentParser(prog="lnm_export_model", description=(
        "Pack a trained model into one zip; with -d and no -c, the model, ensemble or size rule "
        "lnm_find_best_configuration chose (lnm_predict -m THE_ZIP predicts with it as lnm_predict -d does)."))
    p.add_argument("-d", "--dataset", required=True, help="dataset id: 001, 1 or Dataset001_Name")
    p.add_argument("-c", "--configuration", default=None,
                   help="configuration of the model, e.g. 2d25 (default: the choice of lnm_find_best_configuration, "
                        "with its folds and calibration map)")
    p.add_argument("-o", "--output", required=True, help="the zip to write")
    p.add_argument("-tr", "--trainer", default="LNMTrainer", help="trainer of the model (default: %(default)s)")
    p.add_argument("-p", "--plans_name", default="LNMPlans", help="plans of the model (default: %(default)s)")
    p.add_argument("-f", "--folds", nargs="+", default=None,
                   help="folds to pack (default: every trained fold; for the choice, the folds it was chosen on)")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth",
                   help="checkpoint file of each fold (default: %(default)s)")
    p.add_argument("--detector", default=None, metavar="FOLDER",
                   help="a trained nnU-Net v2 model folder (<Trainer>__<Plans>__<configuration> with its fold_<k>) "
                        "to pack as the zip's node detector (default: the dataset's own detector from "
                        "lnm_train_detector, if trained; see documentation/detection.md)")
    p.add_argument("--detector_label", default=None, metavar="LABEL",
                   help="the detector's lymph-node label, by value or by name in its dataset.json (default: 1)")
    p.add_argument("--no_detector", action="store_true",
                   help="pack no detector: the zip then predicts cases with node masks only (default: pack one)")
    _add_location_flags(p, "results")
    return p


def _export_detector(args: argparse.Namespace, results: Path, dataset_name: str):
    """The detector lnm_export_model packs: --detector, else the dataset's own when trained; None with
    --no_detector or when there is none."""
    from lnm_auto.detection.detector import DetectorModel, find_dataset_detector
    from lnm_auto.utils.errors import LNMError
    if args.no_detector:
        if args.detector or args.detector_label is not None:
            raise LNMError("--no_detector leaves the detector out; it cannot go with --detector or --detector_label")
        return None
    folder = Path(args.detector) if args.detector else find_dataset_detector(results, dataset_name)
    if folder is None:
        if args.detector_label is not None:
            raise LNMError("--detector_label needs a detector: --detector FOLDER, or a dataset with a trained "
                           "detector (lnm_train_detector)")
        return None
    return DetectorModel.load(folder, args.detector_label)


def _export(args: argparse.Namespace) -> int:
    from lnm_auto.inference.detector_zip import packed_line
    from lnm_auto.inference.ensemble import describe_choice
    from lnm_auto.inference.export_choice import export_choice
    from lnm_auto.inference.model import export_model, find_model
    from lnm_auto.utils.errors import LNMError
    from lnm_auto.utils.paths import resolve_dataset_name
    results = base_folder("results", args.results)
    if args.configuration is None:
        if args.trainer != "LNMTrainer" or args.plans_name != "LNMPlans":
            raise LNMError("-tr and -p name one model: give its configuration with -c too (without -c, "
                           "lnm_export_model packs the choice of lnm_find_best_configuration)")
        name = resolve_dataset_name(args.dataset, results)
        detector = _export_detector(args, results, name)
        out, chosen = export_choice(results / name, Path(args.output), args.folds, args.checkpoint, detector)
        print(f"the choice of lnm_find_best_configuration ({describe_choice(chosen)}) written to {out}")
        print(packed_line(detector))
        return 0
    folder = find_model(results, args.dataset, args.configuration, args.trainer, args.plans_name)
    detector = _export_detector(args, results, folder.parent.name)
    out = export_model(folder, Path(args.output), args.folds, args.checkpoint, detector)
    print(f"model {folder.name} written to {out}")
    print(packed_line(detector))
    return 0


def export_entry(argv: list[str] | None = None) -> int:
    """Run lnm_export_model with ``argv``; returns the exit status."""
    return _run("lnm_export_model", _export, export_parser(), argv)


def export_cli() -> None:
    """Console entry point of lnm_export_model."""
    sys.exit(export_entry())


# ---- lnm_evaluate ---------------------------------------------------------------------------------
def evaluate_parser() -> argparse.ArgumentParser:
    """The lnm_evaluate argument parser."""
    p = argparse.ArgumentParser(prog="lnm_evaluate", description="AUROC, operating points, bootstrap CIs, DeLong; "
                                                                 "node, station and patient level.")
    p.add_argument("-ref", "--reference", required=True, help="reference nodes CSV: case,node,station,label")
    p.add_argument("-pred", "--prediction", required=True, help="predicted nodes.csv from lnm_predict")
    p.add_argument("-o", "--output", required=True, help="report folder")
    p.add_argument("--ref_stations", default=None,
                   help="reference stations CSV (default: station labels derived from node labels)")
    p.add_argument("--ref_patients", default=None,
                   help="reference patients CSV (default: patient labels derived from node labels)")
    p.add_argument("--compare", default=None,
                   help="a second nodes.csv: DeLong test of the AUROC difference (default: no comparison)")
    p.add_argument("--compare_name", default="compared", metavar="NAME",
                   help='what roc.png\'s legend calls the --compare predictions, e.g. "size rule (short axis)" '
                        "(default: %(default)s)")
    p.add_argument("--n_bootstrap", type=int, default=1000,
                   help="patient-bootstrap resamples for the 95%% CIs, 0 for none (default: %(default)s)")
    p.add_argument("--ref_masks", default=None, metavar="FOLDER",
                   help="reference node instance masks (<case>.nii.gz or <case>_nodes.nii.gz, e.g. a raw dataset's "
                        "nodesTs/): evaluate the detection of the cases lnm_predict detected - sensitivity, false "
                        "positives per case, classification on found nodes; with --compare (the predictions made "
                        "with the given masks), the patient AUROC of both (default: no detection evaluation)")
    p.add_argument("--pred_masks", default=None, metavar="FOLDER",
                   help="the detected instance masks <case>_nodes.nii.gz (default: the folder of -pred)")
    return p


def _evaluate(args: argparse.Namespace) -> int:
    from lnm_auto.evaluation.detection import format_detection
    from lnm_auto.evaluation.detection_report import MATCHES_FILE, evaluate_detection
    from lnm_auto.evaluation.report import evaluate, format_table
    from lnm_auto.utils.errors import LNMError
    if args.pred_masks is not None and args.ref_masks is None:
        raise LNMError("--pred_masks needs --ref_masks: the reference masks the detected ones are compared with")
    if args.ref_masks is not None:
        metrics = evaluate_detection(args.reference, args.prediction, args.output, args.ref_masks, args.pred_masks,
                                     args.ref_stations, args.ref_patients, args.compare,
                                     n_bootstrap=args.n_bootstrap, compare_name=args.compare_name)
    else:
        metrics = evaluate(args.reference, args.prediction, args.output, args.ref_stations, args.ref_patients,
                           args.compare, n_bootstrap=args.n_bootstrap, compare_name=args.compare_name)
    print(format_table(metrics))
    if "detection" in metrics:
        print("\n" + format_detection(metrics["detection"]))
    print(f"report: {Path(args.output) / 'metrics.json'}, {Path(args.output) / 'roc.png'}, "
          f"{Path(args.output) / 'calibration.png'}"
          + (f", {Path(args.output) / MATCHES_FILE}" if "detection" in metrics else ""))
    return 0


def evaluate_entry(argv: list[str] | None = None) -> int:
    """Run lnm_evaluate with ``argv``; returns the exit status."""
    return _run("lnm_evaluate", _evaluate, evaluate_parser(), argv, uses_torch=False)


def evaluate_cli() -> None:
    """Console entry point of lnm_evaluate."""
    sys.exit(evaluate_entry())
