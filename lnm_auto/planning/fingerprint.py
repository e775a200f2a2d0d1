"""Dataset fingerprint: what planning needs to know about a dataset, and nothing it has to re-read.

Per case: spacing, shape, direction, slice axis, node count. Per node: physical extent, voxel count,
short/long axis, station and labels. Per channel: intensity statistics sampled from the nodes and a
margin of surrounding tissue (the classifier never looks further than that). Label counts per level.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk

from lnm_auto.datasets.raw_dataset import (UNKNOWN, RawCase, RawDataset, as_integer_mask, read_image,
                                           read_image_header, read_instance_mask)
from lnm_auto.datasets.verify import CaseCheck, check_headers_and_mask
from lnm_auto.preprocessing.crops import CaseNodes, case_nodes, intensity_samples
from lnm_auto.imaging.geometry import sitk_spacing_zyx, slice_axis
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.processes import map_in_workers

FINGERPRINT_VERSION = 1


def case_entry(geometry, nodes: CaseNodes) -> dict:
    """The fingerprint's entry of one case: its grid (from an image or its header: ``GetSpacing`` ...) and its
    node count."""
    spacing = sitk_spacing_zyx(geometry)
    return {
        "spacing_zyx_mm": list(spacing),
        "shape_zyx": list(geometry.GetSize()[::-1]),
        "direction": [v + 0.0 for v in geometry.GetDirection()],   # + 0.0: a header's -0.0 reads as 0.0 elsewhere
        "origin": [v + 0.0 for v in geometry.GetOrigin()],
        "slice_axis": slice_axis(spacing),
        "n_nodes": len(nodes.measurements),
    }


def node_entries(case_id: str, nodes: CaseNodes) -> list[dict]:
    """The fingerprint's entries of one case's nodes (measurements; labels are added from the tables)."""
    return [{"case": case_id, **asdict(m)} for m in nodes.measurements]


def case_fingerprint(case: RawCase) -> tuple[dict, list[dict], list[np.ndarray]]:
    """(case entry, node entries, intensity samples per channel) of one case, everything read at once: the
    reference the two-pass scan of lnm_plan_and_preprocess (masks, then images) must agree with."""
    images = [read_image(f) for f in case.image_files]
    nodes = case_nodes(read_instance_mask(case.node_mask_file))   # integer node ids or one line naming the file
    samples = intensity_samples([sitk.GetArrayViewFromImage(i) for i in images], nodes.neighbourhood)
    return case_entry(images[0], nodes), node_entries(case.case_id, nodes), samples


@dataclass
class MaskScan(CaseCheck):
    """What the first pass learns of one case from its node mask and image headers: its checks (without the
    mask and header read, which stay in the worker) and its nodes."""
    nodes: CaseNodes | None = None           # None when the case has a problem
    entry: dict | None = None                # the fingerprint's case entry


def scan_node_mask(case: RawCase, verify: bool = True) -> MaskScan:
    """First pass over a case: its node mask read whole (checked, measured, every node's mask piece kept) and
    its images' headers. ``verify``: every check of the mask and headers (else only what the crops need; the
    headers were checked beforehand by ``safety_problems``). Problems are returned, never raised."""
    if verify:
        check = check_headers_and_mask(case, keep_mask=True)
        scan = MaskScan(case.case_id, check.problems, check.mask_node_ids, check.readable_images)
        if check.problems:
            return scan
        mask, boxes, geometry = as_integer_mask(check.mask), check.boxes, check.reference
    else:
        scan = MaskScan(case.case_id, readable_images=list(case.image_files))
        try:
            mask, boxes, geometry = read_instance_mask(case.node_mask_file), None, read_image_header(case.image_files[0])
        except LNMError as e:
            scan.problems.append(str(e))
            return scan
    scan.nodes = case_nodes(mask, boxes)
    scan.mask_node_ids = set(scan.nodes.node_ids)
    scan.entry = case_entry(geometry, scan.nodes)
    return scan


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
    return assemble_fingerprint(ds, cases, map_in_workers(case_fingerprint, cases, num_processes, "fingerprint",
                                                          progress))


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
