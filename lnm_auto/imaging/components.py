"""Node instances from binary (or few-label) masks: 3D connected components.

A binary lymph-node mask (one value for every node: nnU-Net labels, LNQ-style labels, an RTSTRUCT or
DICOM-SEG with one "lymph nodes" segment) is turned into the instance mask lnm_auto needs:

* components are 26-connected (voxels touching by a face, an edge or a corner belong together), found
  separately for every label value, so two touching nodes of different values stay two nodes;
* components smaller than ``min_volume_mm3`` (default ``DEFAULT_MIN_VOLUME_MM3``) are removed:
  they are annotation specks, not nodes;
* the remaining components are numbered 1..n by their centre's physical (LPS) position: superior to
  inferior, then patient right to left, then anterior to posterior, so the numbering does not depend
  on how the image is stored (flipped axes, another direction matrix);
* the output has exactly the input's size, spacing, origin and direction.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import SimpleITK as sitk
from acvl_utils.morphology.morphology_helper import cc3d_label_with_component_sizes
from scipy import ndimage

from lnm_auto.utils.io import save_csv_atomic

# 10 mm^3 lies below any node an annotator outlines (a sphere of 2.7 mm diameter; nodes are reported
# from about 5 mm short axis = 65 mm^3) and above specks of a few voxels (one CT voxel is 0.3-5 mm^3).
DEFAULT_MIN_VOLUME_MM3 = 10.0
CONNECTIVITY = 26     # cc3d's name for face + edge + corner neighbours
NODES_CSV_COLUMNS = ["case", "node", "station", "label"]


@dataclass
class InstanceSplit:
    """The instance mask and where every instance came from."""
    mask: sitk.Image
    source_values: list[int] = field(default_factory=list)   # input label value of instance k at [k - 1]
    volumes_mm3: list[float] = field(default_factory=list)   # volume of instance k at [k - 1]
    n_removed: int = 0                                        # components below the minimum volume

    @property
    def n_nodes(self) -> int:
        """Number of instances (nodes) in the mask."""
        return len(self.source_values)

    def summary(self, min_volume_mm3: float = DEFAULT_MIN_VOLUME_MM3) -> str:
        """'5 nodes (26-connected components; 2 smaller than 10 mm^3 removed)'."""
        removed = f"; {self.n_removed} smaller than {min_volume_mm3:g} mm^3 removed" if self.n_removed else ""
        return f"{self.n_nodes} node(s) (26-connected components{removed})"


@dataclass
class _Component:
    value: int
    region: tuple[slice, ...]
    voxels: np.ndarray          # boolean mask inside ``region``
    centre_lps: tuple[float, float, float]


def _components(mask: sitk.Image, min_volume_mm3: float, boxes: list | None = None) -> tuple[list[_Component], int, int]:
    """Every 26-connected component of every label value, how many were too small, how many values occur
    (``boxes``: ``ndimage.find_objects`` of the mask, when the caller has it)."""
    arr = sitk.GetArrayViewFromImage(mask)
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.rint(arr).astype(np.int32)     # verification reports non-integer masks; round like the reader
    if arr.size and np.issubdtype(arr.dtype, np.signedinteger) and arr.min() < 0:
        raise ValueError("the mask has negative values")
    voxel_mm3 = float(np.prod(mask.GetSpacing()))
    min_voxels = max(1, int(np.ceil(min_volume_mm3 / voxel_mm3 - 1e-9)))
    found, n_removed = [], 0
    # find_objects gives each value's bounding box, so labelling only touches the voxels around nodes
    if boxes is None:
        boxes = ndimage.find_objects(arr) if arr.size and arr.max() > 0 else []
    for value_minus_1, box in enumerate(boxes):
        if box is None:
            continue
        value = value_minus_1 + 1
        # acvl-utils' cc3d labelling numbers components in scan order as ndimage.label did (same output, 2x faster)
        labelled, sizes = cc3d_label_with_component_sizes(arr[box] == value, connectivity=CONNECTIVITY)
        for k, sub in enumerate(ndimage.find_objects(labelled), start=1):
            if sizes[k] < min_voxels:
                n_removed += 1
                continue
            voxels = labelled[sub] == k
            region = tuple(slice(b.start + s.start, b.start + s.stop) for b, s in zip(box, sub))
            centre_zyx = np.argwhere(voxels).mean(axis=0) + [r.start for r in region]
            centre = mask.TransformContinuousIndexToPhysicalPoint([float(c) for c in centre_zyx[::-1]])
            found.append(_Component(value, region, voxels, tuple(centre)))
    return found, n_removed, sum(b is not None for b in boxes)


def _reading_order(c: _Component) -> tuple:
    x, y, z = (round(v, 2) for v in c.centre_lps)
    return (-z, x, y, c.value)   # superior first, then patient right (small LPS x), then anterior


def split_components(mask: sitk.Image, min_volume_mm3: float = DEFAULT_MIN_VOLUME_MM3) -> InstanceSplit:
    """Instance mask of the 26-connected components (per label value) at least ``min_volume_mm3`` large."""
    components, n_removed, _ = _components(mask, min_volume_mm3)
    return _instance_split(mask, components, n_removed)


def _instance_split(mask: sitk.Image, components: list[_Component], n_removed: int) -> InstanceSplit:
    components = sorted(components, key=_reading_order)
    out = np.zeros(mask.GetSize()[::-1], dtype=np.uint16 if len(components) < 2 ** 16 else np.uint32)
    voxel_mm3 = float(np.prod(mask.GetSpacing()))
    for k, c in enumerate(components, start=1):
        out[c.region][c.voxels] = k
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(mask)
    return InstanceSplit(image, [c.value for c in components],
                         [float(c.voxels.sum()) * voxel_mm3 for c in components], n_removed)


def split_binary_mask(mask: sitk.Image, min_volume_mm3: float = DEFAULT_MIN_VOLUME_MM3) -> tuple[sitk.Image, int]:
    """(instance mask numbered 1..n, n): the binary/few-label ``mask`` split into connected components."""
    split = split_components(mask, min_volume_mm3)
    return split.mask, split.n_nodes


def _looks_binary(components: list[_Component], n_labels: int) -> bool:
    """Components outnumber labels and at least half of the labels hold several components."""
    per_value = np.bincount([c.value for c in components]) if components else np.zeros(1, int)
    return len(components) > n_labels and 2 * int((per_value > 1).sum()) >= n_labels


def needs_splitting(mask: sitk.Image, min_volume_mm3: float = DEFAULT_MIN_VOLUME_MM3,
                    boxes: list | None = None) -> tuple[int, int] | None:
    """(labels present, components) when ``mask`` looks binary/few-label rather than an instance mask, else None.

    Components are counted at least ``min_volume_mm3`` large. A mask looks binary when its components
    outnumber its labels and at least half of its labels have several components: an instance mask in
    which one node of many has a detached piece is left alone. ``boxes``: ``ndimage.find_objects`` of the mask.
    """
    components, _, n_labels = _components(mask, min_volume_mm3, boxes)
    return (n_labels, len(components)) if _looks_binary(components, n_labels) else None


def split_if_binary(mask: sitk.Image, min_volume_mm3: float = DEFAULT_MIN_VOLUME_MM3) -> InstanceSplit | None:
    """``split_components(mask)`` when ``needs_splitting(mask)``, else None (an instance mask: keep it)."""
    components, n_removed, n_labels = _components(mask, min_volume_mm3)
    if not _looks_binary(components, n_labels):
        return None
    return _instance_split(mask, components, n_removed)


def as_instance_mask(mask: sitk.Image, source: str,
                     min_volume_mm3: float = DEFAULT_MIN_VOLUME_MM3) -> tuple[sitk.Image, str | None]:
    """(instance mask, None) for an instance mask; (its components, one line saying so) for a binary one."""
    split = split_if_binary(mask, min_volume_mm3)
    if split is None:
        return mask, None
    values = sorted(set(split.source_values))
    return split.mask, (f"{source}: binary node mask (label value(s) {values}) split into "
                        f"{split.summary(min_volume_mm3)}")


def nodes_skeleton(node_counts: dict[str, int], source: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """nodes.csv rows case,node,station,label (station and label empty) for nodes 1..n of every case.

    ``source`` (optional) adds a ``source`` column naming where each node came from (a segment name).
    """
    rows = []
    for case, n in node_counts.items():
        for k in range(1, n + 1):
            row = {"case": case, "node": k, "station": "", "label": ""}
            if source is not None:
                row["source"] = source.get(case, [""] * n)[k - 1]
            rows.append(row)
    columns = NODES_CSV_COLUMNS + (["source"] if source is not None else [])
    return pd.DataFrame(rows, columns=columns)


def write_nodes_skeleton(path, node_counts: dict[str, int], source: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """Write ``nodes_skeleton`` atomically to ``path`` (a new nodes.csv) and return it."""
    table = nodes_skeleton(node_counts, source)
    save_csv_atomic(table, path)
    return table
