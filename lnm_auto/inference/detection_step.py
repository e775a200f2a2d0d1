"""lnm_predict on images alone: the node detector finds the nodes of every case without a node mask, once, before
the case loop (documentation/detection.md).

For each such case (of this run's part, not finished yet) the detector (``detection/detector.py``) predicts a label
map and probabilities in a hidden work folder inside ``-o`` (removed when done); its lymph-node label becomes node
instances by the component rule (``detection/detected_nodes.py``), written as ``<case>_nodes.nii.gz`` (a file
lnm_predict owns: ``output_folder.case_files``), which the loop then classifies as a given mask. Each detected
node keeps its detection confidence and its station (from the case's region map) for the case's rows. Cases with
node masks are never given to the detector.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import SimpleITK as sitk

from lnm_auto.detection.detected_nodes import read_detector_output, read_region_map, region_names, region_stations
from lnm_auto.detection.detector import DetectionJob, DetectorModel, nnunet_inputs, run_detector
from lnm_auto.imaging.components import DEFAULT_MIN_VOLUME_MM3
from lnm_auto.inference.cases import InputCase, read_case_images, region_table_file
from lnm_auto.preprocessing.preprocessor import check_case_images
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import atomic_path
from lnm_auto.utils.write_errors import write_errors

DETECTION_COLUMNS = ["detected", "detection_confidence"]   # nodes.csv columns of a run that detects
WORK_FOLDER = ".lnm_detector_work"


def instance_mask_file(output_dir: Path, case_id: str) -> Path:
    """Where lnm_predict writes a case's node instances (a split binary mask's, or the detector's)."""
    return Path(output_dir) / f"{case_id}_nodes.nii.gz"


def detection_needed(cases: list[InputCase], detector: DetectorModel | None) -> bool:
    """Whether this run detects: a detector is given (or the dataset has one) and some case lacks a node mask."""
    return detector is not None and any(c.needs_detection for c in cases)


def _case_job(case: InputCase, detector: DetectorModel, work: Path) -> DetectionJob:
    """The detector's job for one case, its images read and checked first (a bad image is this case's line)."""
    images, _ = read_case_images(case)
    sources = case.image_files or [case.dicom_dir]
    check_case_images(images, sources, images[0], sources[0])
    if len(images) < detector.num_channels:
        raise LNMError(f"{sources[0]}: the detector {detector.folder.name} reads {detector.num_channels} channel(s), "
                       f"case '{case.case_id}' has {len(images)}")
    files = nnunet_inputs(case.case_id, images[:detector.num_channels], case.image_files[:detector.num_channels],
                          detector.file_ending, work)
    return DetectionJob(case.case_id, files, work / f"{case.case_id}.npz")


def _channel0(case: InputCase) -> sitk.Image:
    return read_case_images(case)[0][0]


def detect_cases(cases: list[InputCase], detector: DetectorModel, output_dir: Path, input_dir: Path,
                 device: str = "cpu", threads: int = 1, mirror: bool = True, part_suffix: str = "",
                 failures: list[str] | None = None, say=print) -> list[InputCase]:
    """Run ``detector`` on ``cases`` (all lacking node masks) and write each one's instance mask into
    ``output_dir``; returns the cases ready for the loop (their ``node_mask_file`` and ``detection`` set). A case
    that cannot be detected (a bad image or region map) is one line in ``failures``."""
    failures = failures if failures is not None else []
    work = Path(output_dir) / f"{WORK_FOLDER}{part_suffix}"
    shutil.rmtree(work, ignore_errors=True)          # a killed run's
    with write_errors(work.parent):
        work.mkdir(parents=True)
    ready: list[InputCase] = []
    try:
        jobs = {}
        for case in cases:
            try:
                jobs[case.case_id] = _case_job(case, detector, work)
            except LNMError as e:
                failures.append(str(e))
        if jobs:
            say(f"detecting the nodes of {len(jobs)} case(s) without a node mask with {detector.origin or detector.folder} "
                f"(folds {', '.join(detector.folds)}, label {detector.label} '{detector.label_name}')", flush=True)
        run_detector(detector, list(jobs.values()), work, device, threads, mirror)
        names = region_names(region_table_file(Path(input_dir)))
        for case in cases:
            if case.case_id in jobs:
                try:
                    ready.append(_write_detected(case, jobs[case.case_id], detector, output_dir, names, say))
                except LNMError as e:
                    failures.append(str(e))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ready


def _write_detected(case: InputCase, job: DetectionJob, detector: DetectorModel, output_dir: Path,
                    names: dict[int, str], say) -> InputCase:
    """One case's detector output -> its instance mask file, confidences and stations."""
    image = _channel0(case)
    detected = read_detector_output(job.output, image, detector.label)
    regions = read_region_map(case.regions_file, image) if case.regions_file else None
    stations = region_stations(detected.mask, regions, names)
    out_file = instance_mask_file(output_dir, case.case_id)
    with atomic_path(out_file, suffix=".nii.gz") as tmp:
        sitk.WriteImage(detected.mask, str(tmp), useCompression=True)
    case.node_mask_file = out_file
    case.detection = {k: (detected.confidences[k - 1], stations[k]) for k in range(1, detected.n_nodes + 1)}
    removed = f"; {detected.n_removed} smaller than {DEFAULT_MIN_VOLUME_MM3:g} mm^3 removed" if detected.n_removed \
        else ""
    if detected.n_nodes:
        say(f"{case.case_id}: {detected.n_nodes} node(s) detected (26-connected components{removed}); instances "
            f"written to {out_file}", flush=True)
    else:
        say(f"{case.case_id}: the detector found no node{removed}; the case has no rows", flush=True)
    return case


def detection_values(case: InputCase, node_ids: list[int]) -> dict[str, list]:
    """A case's ``detected`` / ``detection_confidence`` / ``station`` columns (confidence and station empty for a
    given node mask: its stations come from the input's node table)."""
    if case.detection is None:
        return {"detected": ["false"] * len(node_ids), "detection_confidence": [float("nan")] * len(node_ids),
                "station": [""] * len(node_ids)}
    return {"detected": ["true"] * len(node_ids),
            "detection_confidence": [case.detection[k][0] for k in node_ids],
            "station": [case.detection[k][1] for k in node_ids]}
