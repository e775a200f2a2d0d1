"""The detector's output -> node instances, their detection confidence and their stations (pure functions, no
nnU-Net: testable on hand-made arrays).

* the label map's lymph-node label is the binary node mask; it becomes instances by the rule every binary mask
  follows (``imaging.components.split_components``: 26-connected components, at least
  ``DEFAULT_MIN_VOLUME_MM3``, numbered by their centre's position);
* a node's ``detection_confidence`` is the detector's mean lymph-node probability over the node's voxels;
* a node's station is the region of a region map (``<case>_regions.nii.gz``, as ``regionsTr/`` in the raw format)
  holding most of its voxels; region 0 (or no region map) gives ``unknown``; the station's name is the region value
  as text unless a ``regions.csv`` (region,station) names it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from lnm_auto.datasets.raw_dataset import read_image
from lnm_auto.datasets.verify import geometry_mismatches
from lnm_auto.imaging.components import DEFAULT_MIN_VOLUME_MM3, split_components
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.tables import read_csv_text

UNKNOWN_STATION = "unknown"


@dataclass
class DetectedNodes:
    """A case's detected nodes: the instance mask (uint16, the image's grid), node k's confidence at [k - 1]."""
    mask: sitk.Image
    confidences: list[float] = field(default_factory=list)
    n_removed: int = 0              # components below the minimum volume

    @property
    def n_nodes(self) -> int:
        return len(self.confidences)


def detect_instances(segmentation: sitk.Image, probability: np.ndarray, label: int = 1,
                     min_volume_mm3: float = DEFAULT_MIN_VOLUME_MM3) -> DetectedNodes:
    """The voxels of ``label`` in the detector's label map as node instances (the component rule), each with its
    mean ``probability`` (an array of the label map's voxel shape: the lymph-node label's probability)."""
    labels = sitk.GetArrayViewFromImage(segmentation)
    if probability.shape != labels.shape:
        raise ValueError(f"probabilities of shape {probability.shape} for a label map of shape {labels.shape}")
    binary = sitk.GetImageFromArray((labels == label).astype(np.uint8))
    binary.CopyInformation(segmentation)
    split = split_components(binary, min_volume_mm3)
    instances = sitk.GetArrayViewFromImage(split.mask)
    means = ndimage.mean(probability.astype(np.float64), labels=instances, index=np.arange(1, split.n_nodes + 1))
    return DetectedNodes(split.mask, [float(m) for m in np.atleast_1d(means)] if split.n_nodes else [],
                         split.n_removed)


def read_detector_output(npz_file: Path, image: sitk.Image, label: int = 1,
                         min_volume_mm3: float = DEFAULT_MIN_VOLUME_MM3) -> DetectedNodes:
    """``detect_instances`` of the arrays the detector process saved for one case (plain arrays: read without
    unpickling), on ``image``'s grid (channel 0 of the case: the grid nnU-Net predicted on)."""
    with np.load(npz_file, allow_pickle=False) as data:
        segmentation, probability = data["segmentation"], data["probability"]
    shape = sitk.GetArrayViewFromImage(image).shape
    if segmentation.shape != shape or probability.shape != shape:
        raise LNMError(f"{npz_file}: the detector's output has shape {segmentation.shape}, the image {shape}; "
                       "nnU-Net did not predict on the image's grid")
    label_map = sitk.GetImageFromArray(segmentation)
    label_map.CopyInformation(image)
    return detect_instances(label_map, probability, label, min_volume_mm3)


def region_names(path: Path | None) -> dict[int, str]:
    """A ``regions.csv`` (region,station): region value -> station name ({} without one)."""
    if path is None:
        return {}
    table = read_csv_text(path, "region table", required=("region", "station"))
    names: dict[int, str] = {}
    for region, station in zip(table["region"], table["station"]):
        if not region.isdigit() or int(region) == 0:
            raise LNMError(f"{path}: region '{region}' is not a positive integer (the region map's values)")
        if int(region) in names:
            raise LNMError(f"{path}: region {int(region)} is listed more than once")
        names[int(region)] = station or UNKNOWN_STATION
    return names


def read_region_map(path: Path, image: sitk.Image) -> np.ndarray:
    """A case's region map as integer regions (z, y, x), on ``image``'s grid (else one line naming the file)."""
    regions = read_image(path)
    mismatch = geometry_mismatches(image, regions)
    if mismatch:
        raise LNMError(f"{path}: {'; '.join(mismatch)}; the region map must lie on the case's image grid")
    arr = sitk.GetArrayFromImage(regions)
    if regions.GetNumberOfComponentsPerPixel() != 1 or not np.isfinite(arr).all() or arr.min() < 0 \
            or not np.array_equal(arr, np.round(arr)):
        raise LNMError(f"{path}: a region map holds non-negative integer regions (0: none)")
    return arr.astype(np.int64)


def region_stations(instances: sitk.Image, regions: np.ndarray | None, names: dict[int, str]) -> dict[int, str]:
    """Node -> station: the region holding most of the node's voxels (ties: the lower region), named by ``names``
    or as its value; region 0 and no region map give ``unknown``."""
    ids = sitk.GetArrayViewFromImage(instances)
    n_nodes = int(ids.max()) if ids.size else 0
    stations = {k: UNKNOWN_STATION for k in range(1, n_nodes + 1)}
    if regions is None:
        return stations
    for k, box in enumerate(ndimage.find_objects(ids), start=1):
        if box is None:
            continue
        votes = np.bincount(regions[box][ids[box] == k])
        region = int(np.argmax(votes))
        stations[k] = UNKNOWN_STATION if region == 0 else names.get(region, str(region))
    return stations
