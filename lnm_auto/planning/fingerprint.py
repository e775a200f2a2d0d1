"""Dataset fingerprint: what planning needs to know about a dataset, and nothing it has to re-read.

Per case: spacing, shape, direction, slice axis, node count. Per node: physical extent, voxel count,
short/long axis, station and labels. Per channel: intensity statistics sampled from the nodes and a
margin of surrounding tissue (the classifier never looks further than that). Label counts per level.
"""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
import SimpleITK as sitk

from lnm_auto.datasets.raw_dataset import (UNKNOWN, RawCase, RawDataset, as_integer_mask, read_image,
                                           read_instance_mask)
from lnm_auto.datasets.verify import CaseCheck, case_and_table_problems, case_list_problems, check_case
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.processes import map_in_workers
from lnm_auto.preprocessing.geometry import measure_nodes, node_boxes, sitk_spacing_zyx, slice_axis

FINGERPRINT_VERSION = 1
INTENSITY_MARGIN_MM = 10.0          # tissue around each node that counts as "node surroundings"
INTENSITY_SAMPLES_PER_CASE = 10_000  # per channel; pooled over cases like nnU-Net's foreground samples


def node_neighbourhood(mask_arr: np.ndarray, spacing_zyx, margin_mm: float = INTENSITY_MARGIN_MM,
                       boxes: list[tuple[slice, ...] | None] | None = None) -> np.ndarray:
    """Boolean array: the bounding box of all nodes together, grown by ``margin_mm`` per axis (``boxes``: the
    mask's ``node_boxes``, when the caller has them)."""
    region = np.zeros(mask_arr.shape, dtype=bool)
    present = [b for b in (node_boxes(mask_arr) if boxes is None else boxes) if b is not None]
    if not present:
        return region
    margin = np.ceil(margin_mm / np.asarray(spacing_zyx)).astype(int)
    lo = [max(min(b[d].start for b in present) - margin[d], 0) for d in range(3)]
    hi = [min(max(b[d].stop for b in present) + margin[d], mask_arr.shape[d]) for d in range(3)]
    region[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return region


def intensity_samples(channels: list[np.ndarray], region: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Up to ``n`` random voxel values of every channel inside ``region``."""
    idx = np.flatnonzero(region)
    if len(idx) > n:
        idx = rng.choice(idx, n, replace=False)
    return [c.ravel()[idx].astype(np.float64) for c in channels]


def case_fingerprint(case: RawCase, seed: int = 0) -> tuple[dict, list[dict], list[np.ndarray]]:
    """(case entry, node entries, intensity samples per channel) of one case."""
    images = [read_image(f) for f in case.image_files]
    mask = read_instance_mask(case.node_mask_file)   # integer node ids or one line naming the file
    return fingerprint_of(case.case_id, images, mask, seed=seed)


def fingerprint_of(case_id: str, images: list[sitk.Image], mask: sitk.Image, boxes: list | None = None,
                   seed: int = 0) -> tuple[dict, list[dict], list[np.ndarray]]:
    """:func:`case_fingerprint` of images and a node mask already read (``boxes``: the mask's node_boxes)."""
    spacing = sitk_spacing_zyx(images[0])
    mask_arr = np.asarray(sitk.GetArrayViewFromImage(mask))
    boxes = node_boxes(mask_arr) if boxes is None else boxes
    nodes = measure_nodes(mask, boxes)
    region = node_neighbourhood(mask_arr, spacing, boxes=boxes)
    rng = np.random.default_rng(_stable_seed(case_id, seed))  # hash() is salted per process
    samples = intensity_samples([sitk.GetArrayViewFromImage(i) for i in images], region,
                                INTENSITY_SAMPLES_PER_CASE, rng)
    entry = {
        "spacing_zyx_mm": list(spacing),
        "shape_zyx": list(images[0].GetSize()[::-1]),
        "direction": list(images[0].GetDirection()),
        "origin": list(images[0].GetOrigin()),
        "slice_axis": slice_axis(spacing),
        "n_nodes": len(nodes),
    }
    node_entries = [{"case": case_id, **asdict(m)} for m in nodes]
    return entry, node_entries, samples


def _stable_seed(case_id: str, seed: int) -> int:
    import zlib
    return (zlib.crc32(case_id.encode()) + seed) % (2**32)


def channel_statistics(samples: np.ndarray) -> dict:
    """Mean, median, std, min, max and 0.5/99.5 percentiles of a channel's samples (NaN when none)."""
    if samples.size == 0:
        return {k: float("nan") for k in ("mean", "median", "std", "min", "max", "percentile_00_5", "percentile_99_5")}
    return {
        "mean": float(np.mean(samples)), "median": float(np.median(samples)), "std": float(np.std(samples)),
        "min": float(np.min(samples)), "max": float(np.max(samples)),
        "percentile_00_5": float(np.percentile(samples, 0.5)),
        "percentile_99_5": float(np.percentile(samples, 99.5)),
        "n_samples": int(samples.size),
    }


def label_counts(labels) -> dict:
    """Number of positive, negative and unknown labels."""
    labels = list(labels)
    return {"positive": sum(1 for v in labels if v == 1), "negative": sum(1 for v in labels if v == 0),
            "unknown": sum(1 for v in labels if v == UNKNOWN)}


def compute_fingerprint(ds: RawDataset, num_processes: int = 1, progress: bool = True) -> dict:
    """Fingerprint of the training cases of a verified dataset (a JSON-able dict)."""
    cases = ds.cases("Tr")
    return assemble_fingerprint(ds, cases, map_in_workers(_case_fingerprint_seeded, cases, num_processes,
                                                          "fingerprint", progress))


def verify_and_fingerprint(ds: RawDataset, num_processes: int = 1, progress: bool = True) -> tuple[list[str], dict | None]:
    """``verify_dataset`` and ``compute_fingerprint`` in one pass over the files (each is read, and decompressed,
    once): (every problem, None) or ([], the fingerprint)."""
    problems = case_list_problems(ds)
    if not ds.case_ids("Tr"):
        return problems, None
    cases = ds.cases("Tr")
    done = map_in_workers(_verified_case_fingerprint, cases, num_processes, "verify + fingerprint", progress)
    problems += case_and_table_problems(ds, [check for check, _ in done])
    if problems:
        return problems, None
    return [], assemble_fingerprint(ds, cases, [result for _, result in done])


def _verified_case_fingerprint(case: RawCase) -> tuple[CaseCheck, tuple | None]:
    check = check_case(case, keep_voxels=True)
    if check.problems:
        return check, None
    result = fingerprint_of(case.case_id, check.images, as_integer_mask(check.mask), check.boxes)
    check.images = check.mask = check.boxes = None    # not sent back to the parent process
    return check, result


def assemble_fingerprint(ds: RawDataset, cases: list[RawCase], results: list[tuple]) -> dict:
    """The dataset fingerprint from every case's (entry, nodes, intensity samples) and the label tables."""
    node_table = ds.node_table().set_index(["case", "node"])
    station_table = ds.station_table()
    patient_table = ds.patient_table()
    station_labels = ({(r.case, r.station): r.label for r in station_table.itertuples()} if station_table is not None else {})
    patient_labels = ({r.case: r.label for r in patient_table.itertuples()} if patient_table is not None else {})

    cases_out, nodes_out = {}, []
    pooled: list[list[np.ndarray]] = [[] for _ in range(ds.num_channels)]
    patient_ids = ({r.case: r.patient for r in patient_table.itertuples()} if patient_table is not None else {})
    for case, (entry, nodes, samples) in zip(cases, results):
        entry["patient"] = str(patient_ids.get(case.case_id, case.case_id))
        entry["patient_label"] = int(patient_labels.get(case.case_id, UNKNOWN))
        cases_out[case.case_id] = entry
        for n in nodes:
            try:
                row = node_table.loc[(case.case_id, n["node"])]
            except KeyError:
                raise LNMError(f"{case.node_mask_file}: node id {n['node']} is not listed in nodes.csv") from None
            n["station"] = str(row["station"])
            n["label"] = int(row["label"])
            n["station_label"] = int(station_labels.get((case.case_id, n["station"]), UNKNOWN))
            n["patient_label"] = int(patient_labels.get(case.case_id, UNKNOWN))
            nodes_out.append(n)
        for c, s in enumerate(samples):
            pooled[c].append(s)
    intensity = {str(c): channel_statistics(np.concatenate(p) if p else np.zeros(0)) for c, p in enumerate(pooled)}
    return {
        "fingerprint_version": FINGERPRINT_VERSION,
        "dataset_name": ds.root.name,
        "channel_names": {str(k): v for k, v in ds.channel_names.items()},
        "file_ending": ds.file_ending,
        "cases": cases_out,
        "nodes": nodes_out,
        "intensity_statistics": intensity,
        "label_counts": {
            "node": label_counts(n["label"] for n in nodes_out),
            "station": label_counts(station_labels.values()),
            "patient": label_counts(patient_labels.values()),
        },
    }


def _case_fingerprint_seeded(case: RawCase) -> tuple[dict, list[dict], list[np.ndarray]]:
    return case_fingerprint(case, seed=0)
