"""Preprocessing: per case, every node's resampled + normalized crops at each planned scale -> one npz.

Cache layout (``$LNM_preprocessed/DatasetXXX_Name/<plans_name>_crops/<case>.npz``), N = nodes of the case:
    image_<scale>   float16 (N, C, S, R, Cc)   normalized image crop, canonical (slice, row, col) axes
    mask_<scale>    uint8   (N, S, R, Cc)      the node's own mask (1 inside), resampled like nnU-Net
                                               resamples labels (linear, threshold 0.5)
    node_ids        int32 (N,); stations <U (N,); node_labels / station_labels int8 (N,) (-1 = unknown)
    patient_label   int8 (); case_id <U (); centre_mm float64 (N, 3) physical (x, y, z) centre
    volume_mm3, short_axis_mm, long_axis_mm, slice_position (0..1 along the slice axis) float32 (N,)
    sphericity float32 (N,)   (36 pi V^2)^(1/3) / surface, the radiomics shape feature's definition
                              (the shape measurements are the hybrid head's features, stored for every node)
    plans_digest <U (): which plans, labels and files made it (stale caches are redone)
Crops are sampled straight from the original image on a grid aligned with the image's own axes, so
only the node neighbourhoods are ever resampled, and any direction/origin is honoured exactly.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from lnm_auto.datasets.raw_dataset import UNKNOWN, RawCase, RawDataset, read_image, read_instance_mask  # noqa: F401  (re-exported)
from lnm_auto.datasets.verify import geometry_mismatches
from lnm_auto.planning.fingerprint import node_neighbourhood
from lnm_auto.planning.plans import Plans
from lnm_auto.preprocessing.geometry import (canonical_axes, measure_nodes, node_boxes, resample_mask_to_grid,
                                             resample_to_grid, roi_grid, sitk_spacing_zyx)
from lnm_auto.preprocessing.normalization import case_zscore_statistics, normalize
# the radiomics shape features' surface estimate: one sphericity for the caches and the radiomics configuration
from lnm_auto.radiomics.features import MARGIN_VOXELS, isotropic_surface_and_volume
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import save_csv_atomic, save_npz_atomic
from lnm_auto.utils.processes import map_in_workers


@dataclass
class NodeLabels:
    """What the label tables say about one case."""
    stations: dict[int, str]          # node id -> station
    node_labels: dict[int, int]       # node id -> 1/0/UNKNOWN
    station_labels: dict[str, int]    # station -> 1/0/UNKNOWN
    patient_label: int = UNKNOWN


CACHE_FORMAT_VERSION = 4   # bump when the npz layout or a cached value changes (3: radiological short axis, 4: sphericity)


def plans_digest(plans: Plans) -> str:
    """Identifies what the crops depend on (scales, normalization, cache format), so stale caches are redone."""
    key = json.dumps({"scales": plans.to_dict()["scales"], "normalization": plans.to_dict()["normalization"],
                      "cache_format": CACHE_FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def crops_folder(preprocessed_dataset: Path, plans_name: str) -> Path:
    """Folder of the npz crop caches of plans ``plans_name``."""
    return Path(preprocessed_dataset) / f"{plans_name}_crops"


def preprocess_images(images: list[sitk.Image], mask: sitk.Image, plans: Plans) -> dict[str, np.ndarray]:
    """Crops of every node in one case (the part shared by training preprocessing and inference)."""
    mask_arr = np.asarray(sitk.GetArrayViewFromImage(mask))
    boxes = node_boxes(mask_arr)     # one pass over the volume; every per-node step below works in these boxes
    nodes = measure_nodes(mask, boxes)
    region = node_neighbourhood(mask_arr, sitk_spacing_zyx(mask), boxes=boxes)
    stats, pads = [], []
    for img, norm in zip(images, plans.normalization):
        arr = sitk.GetArrayViewFromImage(img)
        stats.append(case_zscore_statistics(np.asarray(arr)[region].astype(np.float64)))
        pads.append(float(arr.min()))   # outside the image: the darkest value (air), then normalized
    out: dict[str, np.ndarray] = {}
    for scale in plans.scales.values():
        out[f"image_{scale.name}"] = np.zeros((len(nodes), len(images), *scale.cache_shape), dtype=np.float16)
        out[f"mask_{scale.name}"] = np.zeros((len(nodes), *scale.cache_shape), dtype=np.uint8)
    for i, node in enumerate(nodes):
        node_mask = sitk.Cast(node_box(mask, boxes[node.node - 1]) == node.node, sitk.sitkFloat32)
        for scale in plans.scales.values():
            grid = roi_grid(mask, node.centre_mm, scale.spacing_mm, scale.cache_shape)
            for c, (img, norm) in enumerate(zip(images, plans.normalization)):
                crop = resample_to_grid(img, grid, sitk.sitkLinear, default_value=pads[c])
                out[f"image_{scale.name}"][i, c] = normalize(crop, norm, stats[c])
            out[f"mask_{scale.name}"][i] = resample_mask_to_grid(node_mask, grid)
    out["node_ids"] = np.asarray([n.node for n in nodes], dtype=np.int32)
    out["centre_mm"] = np.asarray([n.centre_mm for n in nodes], dtype=np.float64).reshape(-1, 3)
    out["volume_mm3"] = np.asarray([n.volume_mm3 for n in nodes], dtype=np.float32)
    out["short_axis_mm"] = np.asarray([n.short_axis_mm for n in nodes], dtype=np.float32)
    out["long_axis_mm"] = np.asarray([n.long_axis_mm for n in nodes], dtype=np.float32)
    out["sphericity"] = node_sphericities(mask, [n.node for n in nodes], boxes)
    # where along the slice axis the node sits, 0 = first slice .. 1 = last (WSP's positional kernel)
    axis = canonical_axes(sitk_spacing_zyx(mask))[0]
    n_slices = max(mask_arr.shape[axis] - 1, 1)
    out["slice_position"] = np.asarray([n.centre_index_zyx[axis] / n_slices for n in nodes], dtype=np.float32)
    return out


def node_box(mask: sitk.Image, box: tuple[slice, ...], margin: int = 2) -> sitk.Image:
    """The part of ``mask`` around one node's bounding box (numpy z, y, x slices) plus ``margin`` voxels, with
    its physical geometry: outside it the node's own mask is 0, so sampling the node there gives the same crops
    as sampling the whole volume, without comparing and casting every voxel of a large image per node."""
    lo = [max(s.start - margin, 0) for s in box]
    hi = [min(s.stop + margin, n) for s, n in zip(box, mask.GetSize()[::-1])]
    return mask[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]


def node_sphericities(mask: sitk.Image, node_ids: list[int], boxes: list[tuple[slice, ...]]) -> np.ndarray:
    """Sphericity of each node of an instance mask, (N,) float32 (NaN for a node too thin to have a surface):
    each node is cut out of its bounding box (``boxes``: the mask's ``node_boxes``, which the caller
    has already computed) with a small margin, physical geometry kept, for the radiomics surface estimate."""
    out = np.full(len(node_ids), np.nan, dtype=np.float32)
    for i, k in enumerate(node_ids):
        region = node_box(mask, boxes[k - 1], MARGIN_VOXELS)
        surface, volume = isotropic_surface_and_volume(sitk.Cast(region == k, sitk.sitkUInt8))
        if surface > 0:
            out[i] = (36.0 * np.pi * volume ** 2) ** (1.0 / 3.0) / surface
    return out


def check_case_images(images: list[sitk.Image], sources: list, mask: sitk.Image, mask_file) -> None:
    """What must hold before any crop is cut, verified or not: 3D single-component finite images on one
    grid, and the node mask on that grid (else the crops would be of the wrong place or NaN)."""
    for img, source in zip(images, sources):
        if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
            raise LNMError(f"{source}: must be a 3D single-component image, got {img.GetDimension()}D with "
                           f"{img.GetNumberOfComponentsPerPixel()} component(s)")
        arr = sitk.GetArrayViewFromImage(img)
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise LNMError(f"{source}: {int(np.count_nonzero(~np.isfinite(arr)))} NaN/Inf voxel(s); replace them "
                           "with a finite value")
    for img, source in zip(images[1:], sources[1:]):
        bad = geometry_mismatches(images[0], img)
        if bad:
            raise LNMError(f"{source}: {bad[0]} of channel 0; all channels must share one grid")
    bad = geometry_mismatches(images[0], mask)
    if bad:
        raise LNMError(f"{mask_file}: {bad[0]}; the node mask must have the image's geometry")


def case_digest(plans_key: str, case: RawCase, labels: NodeLabels) -> str:
    """What one case's cache depends on: the plans, its label rows and its files (size, mtime)."""
    files = [Path(f) for f in case.image_files] + [Path(case.node_mask_file)]
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) if f.is_file() else (f.name,) for f in files]
    key = json.dumps([plans_key, sorted(labels.stations.items()), sorted(labels.node_labels.items()),
                      sorted(labels.station_labels.items()), labels.patient_label, stats], default=str)
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def preprocess_case(case: RawCase, labels: NodeLabels, plans: Plans) -> dict[str, np.ndarray]:
    """The crops and labels of one training case; refuses what would make them wrong (checked here too,
    so ``--no-verify`` skips checks, never safety)."""
    images = [read_image(f) for f in case.image_files]
    mask = read_instance_mask(case.node_mask_file)
    check_case_images(images, case.image_files, mask, case.node_mask_file)
    out = preprocess_images(images, mask, plans)
    ids = out["node_ids"].tolist()
    listed = set(labels.node_labels)
    if set(ids) != listed:
        missing, unlisted = sorted(listed - set(ids)), sorted(set(ids) - listed)
        raise LNMError(f"{case.node_mask_file}: " + (f"node(s) {missing} of case '{case.case_id}' are listed in "
                       "nodes.csv but not in this mask" if missing else f"node id(s) {unlisted} are not listed in "
                       "nodes.csv") + "; the mask and nodes.csv must list the same nodes")
    stations = [labels.stations.get(k, "") for k in ids]
    out["stations"] = np.asarray(stations, dtype=str)
    out["node_labels"] = np.asarray([labels.node_labels.get(k, UNKNOWN) for k in ids], dtype=np.int8)
    out["station_labels"] = np.asarray([labels.station_labels.get(s, UNKNOWN) for s in stations], dtype=np.int8)
    out["patient_label"] = np.asarray(labels.patient_label, dtype=np.int8)
    out["case_id"] = np.asarray(case.case_id)
    return out


def load_case_crops(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of one case's crop cache; a missing or damaged cache is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise LNMError(f"{path}: preprocessed case missing; run lnm_plan_and_preprocess")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        raise LNMError(f"{path}: damaged cache; re-run lnm_plan_and_preprocess (with --clean)") from None


def _case_labels(ds: RawDataset) -> dict[str, NodeLabels]:
    nodes = ds.node_table()
    stations = ds.station_table()
    patients = ds.patient_table()
    out: dict[str, NodeLabels] = {}
    for case_id, g in nodes.groupby("case"):
        out[case_id] = NodeLabels(dict(zip(g["node"].astype(int), g["station"])),
                                  dict(zip(g["node"].astype(int), g["label"].astype(int))), {})
    if stations is not None:
        for r in stations.itertuples():
            out.setdefault(r.case, NodeLabels({}, {}, {})).station_labels[r.station] = int(r.label)
    if patients is not None:
        for r in patients.itertuples():
            out.setdefault(r.case, NodeLabels({}, {}, {})).patient_label = int(r.label)
    return out


def _work(job: tuple[RawCase, NodeLabels, str], plans: Plans, out_dir: Path) -> tuple[str, int, str]:
    """Process one case (case, its labels, its digest) in a worker; returns (case id, node count, '' or the
    input error's line). Only bad input (LNMError, including SimpleITK read errors) is reported this way:
    anything else is a bug of ours and surfaces with its traceback."""
    case, labels, digest = job
    target = out_dir / f"{case.case_id}.npz"
    try:
        arrays = preprocess_case(case, labels, plans)
    except LNMError as e:
        return case.case_id, 0, str(e)
    arrays["plans_digest"] = np.asarray(digest)
    # uncompressed: zlib halves float16 crops (2.1 instead of 4.3 MB for a 512 x 512 x 80 CT case) for 0.18 s of
    # CPU per write and 0.05 s per read (training's unpacking, radiomics, evaluation); disk is the cheaper one
    save_npz_atomic(target, compress=False, **arrays)
    return case.case_id, len(arrays["node_ids"]), ""


def is_up_to_date(path: Path, digest: str) -> bool:
    """Whether the cache at ``path`` exists, reads, and was made for plans digest ``digest``."""
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as f:
            return "plans_digest" in f.files and str(f["plans_digest"]) == digest
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return False   # a damaged cache is simply redone


def run_preprocessing(ds: RawDataset, plans: Plans, preprocessed_dataset: Path, num_processes: int = 1,
                      clean: bool = False, progress: bool = True) -> Path:
    """Write every training case's crops plus ``nodes_index.csv``; skip finished cases unless ``clean``."""
    out_dir = crops_folder(preprocessed_dataset, plans.plans_name)
    if clean and out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.glob(".*.tmp"):   # half-written temp files of a run that was killed
        leftover.unlink(missing_ok=True)
    plans_key = plans_digest(plans)
    labels = _case_labels(ds)
    args = []
    for c in ds.cases("Tr"):
        lab = labels.get(c.case_id, NodeLabels({}, {}, {}))
        digest = case_digest(plans_key, c, lab)
        if not is_up_to_date(out_dir / f"{c.case_id}.npz", digest):
            args.append((c, lab, digest))
    work = partial(_work, plans=plans, out_dir=out_dir)
    done = map_in_workers(work, args, num_processes, "preprocess", progress)
    errors = [err for _, _, err in done if err]
    if errors:
        raise LNMError("\n".join(errors))
    write_nodes_index(out_dir, [c.case_id for c in ds.cases("Tr")])
    return out_dir


# per-node shape measurements copied into nodes_index.csv too, so batches carry them without opening the npz
NODE_SHAPE_COLUMNS = ("short_axis_mm", "long_axis_mm", "sphericity")


def write_nodes_index(crops_dir: Path, case_ids: list[str]) -> pd.DataFrame:
    """One row per cached node (case, node, station, labels, row in the npz) so trainers can sample
    nodes without opening every npz."""
    rows = []
    for case_id in case_ids:
        with np.load(crops_dir / f"{case_id}.npz", allow_pickle=False) as f:
            for i, k in enumerate(f["node_ids"]):
                rows.append({"case": case_id, "node": int(k), "index": i, "station": str(f["stations"][i]),
                             "label": int(f["node_labels"][i]), "station_label": int(f["station_labels"][i]),
                             "patient_label": int(f["patient_label"]), "volume_mm3": float(f["volume_mm3"][i]),
                             "slice_position": float(f["slice_position"][i]),
                             **{k: float(f[k][i]) for k in NODE_SHAPE_COLUMNS}})
    df = pd.DataFrame(rows, columns=["case", "node", "index", "station", "label", "station_label",
                                     "patient_label", "volume_mm3", "slice_position", *NODE_SHAPE_COLUMNS])
    save_csv_atomic(df, crops_dir / "nodes_index.csv")
    return df
