"""Preprocessing: every node's crops at each planned scale, cut in the one pass over a case's images -> one npz.

Cache layout (``$LNM_preprocessed/DatasetXXX_Name/<plans_name>_crops/<case>.npz``), N = nodes of the case:
    image_<scale>   float16 (N, C, S, R, Cc)   image crop z-scored with the case's own statistics (below), in
                                               canonical (slice, row, col) axes; read it through
                                               ``normalization.normalize_node_crops`` for the plans' normalization
    intensity_mean, intensity_std  float64 (C,)  the case's statistics (node neighbourhood samples) of that z-score
    mask_<scale>    uint8   (N, S, R, Cc)      the node's own mask (1 inside), resampled like nnU-Net
                                               resamples labels (linear, threshold 0.5)
    node_ids        int32 (N,); stations <U (N,); node_labels / station_labels int8 (N,) (-1 = unknown)
    patient_label   int8 (); case_id <U (); centre_mm float64 (N, 3) physical (x, y, z) centre
    volume_mm3, short_axis_mm, long_axis_mm, slice_position (0..1 along the slice axis) float32 (N,)
    sphericity float32 (N,)   (36 pi V^2)^(1/3) / surface, the radiomics shape feature's definition
                              (the shape measurements are the hybrid head's features, stored for every node)
    intensity_samples float64 (C, n)   the case's fingerprint samples (a re-run takes them instead of reading)
    crops_digest <U (): which crop scales, labels and files made it (stale caches are redone)
    scales_digest <U (): which crop scales alone (training refuses caches cut for scales its plans do not have)
Crops are sampled straight from the original image on a grid aligned with the image's own axes, so
only the node neighbourhoods are ever resampled, and any direction/origin is honoured exactly.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from lnm_auto.datasets.raw_dataset import UNKNOWN, RawCase, RawDataset
from lnm_auto.datasets.verify import geometry_mismatches, read_checked_images
from lnm_auto.plans.plans import CropScale
from lnm_auto.preprocessing.crops import CaseNodes, case_statistics, cut_node_crops, intensity_samples
from lnm_auto.utils.dataclass_json import to_dict
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import save_csv_atomic, save_npz_atomic


@dataclass
class NodeLabels:
    """What the label tables say about one case."""
    stations: dict[int, str]          # node id -> station
    node_labels: dict[int, int]       # node id -> 1/0/UNKNOWN
    station_labels: dict[str, int]    # station -> 1/0/UNKNOWN
    patient_label: int = UNKNOWN


# bump when the npz layout or a cached value changes (3: radiological short axis, 4: sphericity, 5: crops z-scored
# per case, the plans' normalization applied when read)
CACHE_FORMAT_VERSION = 5


def crops_digest(scales: dict[str, CropScale]) -> str:
    """Identifies what the crops depend on (the crop scales, the cache format), so stale caches are redone; the
    normalization is not among them: it is applied when the crops are read."""
    key = json.dumps({"scales": to_dict(scales), "cache_format": CACHE_FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def crops_folder(preprocessed_dataset: Path, plans_name: str) -> Path:
    """Folder of the npz crop caches of plans ``plans_name``."""
    return Path(preprocessed_dataset) / f"{plans_name}_crops"


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


def case_digest(scales_key: str, case: RawCase, labels: NodeLabels) -> str:
    """What one case's cache depends on: the crop scales (``crops_digest``), its label rows and its files
    (size, mtime)."""
    files = [Path(f) for f in case.image_files] + [Path(case.node_mask_file)]
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) if f.is_file() else (f.name,) for f in files]
    key = json.dumps([scales_key, sorted(labels.stations.items()), sorted(labels.node_labels.items()),
                      sorted(labels.station_labels.items()), labels.patient_label, stats], default=str)
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def load_case_crops(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of one case's crop cache as stored (``image_<scale>`` z-scored per case: read them through
    ``normalization.normalize_node_crops`` for the plans' normalization); a missing or damaged cache is one
    clear error."""
    path = Path(path)
    if not path.is_file():
        raise LNMError(f"{path}: preprocessed case missing; run lnm_plan_and_preprocess")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        raise LNMError(f"{path}: damaged cache; re-run lnm_plan_and_preprocess (with --clean)") from None


def case_labels(ds: RawDataset) -> dict[str, NodeLabels]:
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


def up_to_date_samples(path: Path, digest: str) -> list[np.ndarray] | None:
    """The intensity samples (one array per channel) stored in the cache at ``path`` when it exists, reads,
    and was made for digest ``digest`` (``case_digest``); None otherwise (the case is read and cut again)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if "crops_digest" not in f.files or str(f["crops_digest"]) != digest or "intensity_samples" not in f.files:
                return None
            return list(f["intensity_samples"])
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None   # a damaged cache is simply redone


@dataclass
class ImageJob:
    """The second pass's work on one case."""
    case: RawCase
    image_files: list[Path]               # those whose headers passed the first pass
    nodes: CaseNodes | None               # None: a case with problems already, whose voxels are only checked
    labels: NodeLabels | None = None
    cache_file: Path | None = None        # where to write its crops (None: not wanted, or up to date)
    digest: str = ""
    # an up-to-date cache's intensity samples: its files have not changed since they were read, checked and
    # sampled, so nothing needs reading again
    cached_samples: list[np.ndarray] | None = None


@dataclass
class ImageScan:
    case_id: str
    problems: list[str] = field(default_factory=list)
    samples: list[np.ndarray] | None = None     # the fingerprint's intensity samples, per channel


def scan_case_images(job: ImageJob, scales: dict[str, CropScale] | None) -> ImageScan:
    """Second pass over a case: its images read whole, once: the voxels checked, the fingerprint's intensity
    samples drawn and, when ``job.cache_file`` is set, every node's crops cut and written. Problems of the
    input come back as lines, never raised; anything else is a bug of ours and surfaces with its traceback.
    A case whose cache is up to date (``job.cached_samples``) is not read at all."""
    if job.cached_samples is not None:
        return ImageScan(job.case.case_id, samples=job.cached_samples)
    channels, grid, problems = read_checked_images(job.image_files)
    scan = ImageScan(job.case.case_id, problems)
    if problems or job.nodes is None:
        return scan
    scan.samples = intensity_samples(channels, job.nodes.neighbourhood)
    if job.cache_file is None:
        return scan
    try:
        arrays = with_labels(cut_node_crops(channels, grid, job.nodes, scales, *case_statistics(scan.samples)),
                             job.case, job.labels)
    except LNMError as e:
        scan.problems.append(str(e))
        return scan
    arrays["intensity_samples"] = np.stack(scan.samples)   # (C, n): what a re-run takes instead of reading
    arrays["crops_digest"] = np.asarray(job.digest)
    arrays["scales_digest"] = np.asarray(crops_digest(scales))   # training refuses caches of other scales
    # uncompressed: zlib halves float16 crops (2.1 instead of 4.3 MB for a 512 x 512 x 80 CT case) for 0.18 s of
    # CPU per write and 0.05 s per read (training's unpacking, radiomics, evaluation); disk is the cheaper one
    save_npz_atomic(job.cache_file, compress=False, **arrays)
    return scan


def with_labels(arrays: dict[str, np.ndarray], case: RawCase, labels: NodeLabels) -> dict[str, np.ndarray]:
    """One case's crops with its labels from the tables; refuses a mask and a nodes.csv that list different
    nodes (checked here too, so ``--no-verify`` skips checks, never safety)."""
    ids = arrays["node_ids"].tolist()
    listed = set(labels.node_labels)
    if set(ids) != listed:
        missing, unlisted = sorted(listed - set(ids)), sorted(set(ids) - listed)
        raise LNMError(f"{case.node_mask_file}: " + (f"node(s) {missing} of case '{case.case_id}' are listed in "
                       "nodes.csv but not in this mask" if missing else f"node id(s) {unlisted} are not listed in "
                       "nodes.csv") + "; the mask and nodes.csv must list the same nodes")
    stations = [labels.stations.get(k, "") for k in ids]
    arrays["stations"] = np.asarray(stations, dtype=str)
    arrays["node_labels"] = np.asarray([labels.node_labels.get(k, UNKNOWN) for k in ids], dtype=np.int8)
    arrays["station_labels"] = np.asarray([labels.station_labels.get(s, UNKNOWN) for s in stations], dtype=np.int8)
    arrays["patient_label"] = np.asarray(labels.patient_label, dtype=np.int8)
    arrays["case_id"] = np.asarray(case.case_id)
    return arrays


# per-node shape measurements copied into nodes_index.csv too, so batches carry them without opening the npz
NODE_SHAPE_COLUMNS = ("short_axis_mm", "long_axis_mm", "sphericity")


def write_nodes_index(crops_dir: Path, case_ids: list[str]) -> pd.DataFrame:
    """One row per cached node (case, node, station, labels, row in the npz) so trainers can sample
    nodes without opening every npz."""
    rows = []
    per_node = ("node_ids", "stations", "node_labels", "station_labels", "volume_mm3", "slice_position",
                *NODE_SHAPE_COLUMNS)
    for case_id in case_ids:
        with np.load(crops_dir / f"{case_id}.npz", allow_pickle=False) as f:
            a = {k: f[k] for k in (*per_node, "patient_label")}   # each f[k] reads the array from the file again
        for i, k in enumerate(a["node_ids"]):
            rows.append({"case": case_id, "node": int(k), "index": i, "station": str(a["stations"][i]),
                         "label": int(a["node_labels"][i]), "station_label": int(a["station_labels"][i]),
                         "patient_label": int(a["patient_label"]), "volume_mm3": float(a["volume_mm3"][i]),
                         "slice_position": float(a["slice_position"][i]),
                         **{c: float(a[c][i]) for c in NODE_SHAPE_COLUMNS}})
    df = pd.DataFrame(rows, columns=["case", "node", "index", "station", "label", "station_label",
                                     "patient_label", "volume_mm3", "slice_position", *NODE_SHAPE_COLUMNS])
    save_csv_atomic(df, crops_dir / "nodes_index.csv")
    return df
