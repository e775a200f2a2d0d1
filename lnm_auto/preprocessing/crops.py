"""One case's node crops: what its node mask alone gives (every node's measurements and mask piece), then the
image crops cut around every node at each planned scale.

``lnm_plan_and_preprocess`` meets these in two passes: the node masks first (the crop scales are planned from
the nodes' extents and the images' headers), then every image once, where the crops are cut in the same pass
that checks the voxels and samples the intensity statistics. Crops are stored z-scored with the case's own
statistics (``intensity_mean`` / ``intensity_std``: float16 then keeps ~3 significant digits for any intensity
range); the plans' normalization is applied when they are read (``normalization.normalize_stored``), because
the CT scheme needs statistics of the whole dataset that only exist once every image has been read.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from lnm_auto.datasets.raw_dataset import Grid
from lnm_auto.plans.plans import CropScale, Plans
from lnm_auto.imaging.geometry import (NodeMeasurement, canonical_axes, crop_grid, measure_nodes, node_boxes,
                                       sample_linear, sitk_spacing_zyx)
from lnm_auto.preprocessing.normalization import normalize_node_crops
# the radiomics shape features' surface estimate: one sphericity for the caches and the radiomics configuration
from lnm_auto.imaging.surface import MARGIN_VOXELS, SURFACE_PAD_VOXELS, padded_surface_and_volume

INTENSITY_MARGIN_MM = 10.0           # tissue around the nodes that counts as "node surroundings"
INTENSITY_SAMPLES_PER_CASE = 10_000  # per channel; pooled over cases like nnU-Net's foreground samples
MASK_PIECE_MARGIN = 2                # voxels of zeros kept around each node's mask piece
SAMPLES_SEED = 0
# stored z-scores stay below this (float16 reaches 65504): the case's std is at least the image's value range over
# it, which only a neighbourhood of (almost) one value ever needs
MAX_STORED_Z = 30_000.0


@dataclass
class CaseNodes:
    """What one case's node mask gives before any image voxel is read."""
    measurements: list[NodeMeasurement]
    sphericity: np.ndarray                         # (N,) float32, NaN for a node too thin to have a surface
    slice_position: np.ndarray                     # (N,) float32, 0 = first slice .. 1 = last
    mask_pieces: list[np.ndarray]                  # node k's mask (uint8 0/1) in its bounding box + margin
    piece_offsets: list[tuple[int, int, int]]      # index of each piece's first voxel in the volume
    neighbourhood: tuple[slice, slice, slice] | None   # all nodes' box + INTENSITY_MARGIN_MM (None: no node)
    volume_shape: tuple[int, int, int]

    @property
    def node_ids(self) -> list[int]:
        return [m.node for m in self.measurements]


def case_nodes(mask: sitk.Image, boxes: list | None = None) -> CaseNodes:
    """Measurements, sphericity, slice position and mask piece of every node of an instance mask (``boxes``:
    its node_boxes, when the caller has them)."""
    mask_arr = np.asarray(sitk.GetArrayViewFromImage(mask))
    boxes = node_boxes(mask_arr) if boxes is None else boxes
    measurements = measure_nodes(mask, boxes)
    ids = [m.node for m in measurements]
    pieces, offsets = [], []
    for k in ids:
        lo, hi = _grown(boxes[k - 1], MASK_PIECE_MARGIN, mask_arr.shape)
        pieces.append((mask_arr[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] == k).astype(np.uint8))
        offsets.append(tuple(lo))
    spacing = sitk_spacing_zyx(mask)
    axis = canonical_axes(spacing)[0]
    n_slices = max(mask_arr.shape[axis] - 1, 1)
    return CaseNodes(measurements, node_sphericities(mask, ids, boxes),
                     np.asarray([m.centre_index_zyx[axis] / n_slices for m in measurements], dtype=np.float32),
                     pieces, offsets, neighbourhood_box(mask_arr.shape, spacing, boxes), tuple(mask_arr.shape))


def _grown(box: tuple[slice, ...], margin: int, shape) -> tuple[list[int], list[int]]:
    # acvl_utils' pad_bbox does this, but its module loads torch and blosc2 (seconds) into preprocessing
    return ([max(s.start - margin, 0) for s in box], [min(s.stop + margin, n) for s, n in zip(box, shape)])


def node_sphericities(mask: sitk.Image, node_ids: list[int], boxes: list[tuple[slice, ...]]) -> np.ndarray:
    """Sphericity (36 pi V^2)^(1/3) / surface of each node of an instance mask, (N,) float32, NaN for a node too
    thin to have a surface: the radiomics shape feature's surface estimate of the node cut out of its bounding
    box with a small margin (the same voxels, values and physical geometry as
    ``isotropic_surface_and_volume`` of that region, built here from the mask's array in one step)."""
    arr = sitk.GetArrayViewFromImage(mask)
    pad = SURFACE_PAD_VOXELS
    out = np.full(len(node_ids), np.nan, dtype=np.float32)
    for i, k in enumerate(node_ids):
        lo, hi = _grown(boxes[k - 1], MARGIN_VOXELS, arr.shape)
        region = np.pad((arr[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] == k).astype(np.float32), pad)
        image = sitk.GetImageFromArray(region)
        image.SetSpacing(mask.GetSpacing())
        image.SetDirection(mask.GetDirection())
        image.SetOrigin(mask.TransformContinuousIndexToPhysicalPoint([float(v - pad) for v in lo[::-1]]))
        surface, volume = padded_surface_and_volume(image)
        if surface > 0:
            out[i] = (36.0 * np.pi * volume ** 2) ** (1.0 / 3.0) / surface
    return out


def neighbourhood_box(shape, spacing_zyx, boxes: list, margin_mm: float = INTENSITY_MARGIN_MM
                      ) -> tuple[slice, slice, slice] | None:
    """The bounding box of all nodes together, grown by ``margin_mm`` per axis (None when there is no node):
    where the intensity statistics are sampled (the classifier never looks much further)."""
    present = [b for b in boxes if b is not None]
    if not present:
        return None
    margin = np.ceil(margin_mm / np.asarray(spacing_zyx, dtype=float)).astype(int)
    return tuple(slice(max(min(b[d].start for b in present) - margin[d], 0),
                       min(max(b[d].stop for b in present) + margin[d], shape[d])) for d in range(3))


def intensity_samples(channels: list[np.ndarray], box: tuple[slice, ...] | None,
                      n: int = INTENSITY_SAMPLES_PER_CASE) -> list[np.ndarray]:
    """Up to ``n`` random voxel values (float64) of every channel inside ``box``, the same voxels for every
    channel; the positions depend on the box only, so an image gives the same samples (and crops) whatever
    its file is called."""
    if box is None:
        return [np.zeros(0) for _ in channels]
    box_shape = tuple(s.stop - s.start for s in box)
    size = int(np.prod(box_shape))
    rng = np.random.default_rng(SAMPLES_SEED)
    flat = rng.choice(size, n, replace=False) if size > n else np.arange(size)
    index = tuple(i + s.start for i, s in zip(np.unravel_index(flat, box_shape), box))
    return [np.asarray(c)[index].astype(np.float64) for c in channels]


def case_statistics(samples: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (> 0) of each channel's samples: the case's z-score (identity when there are none)."""
    mean = np.asarray([float(s.mean()) if s.size else 0.0 for s in samples])
    std = np.asarray([max(float(s.std()), 1e-8) if s.size else 1.0 for s in samples])
    return mean, std


def cut_node_crops(channels: list[np.ndarray], grid: Grid, nodes: CaseNodes, scales: dict[str, CropScale],
                   mean: np.ndarray, std: np.ndarray) -> dict[str, np.ndarray]:
    """Every node's crops at every scale: ``image_<scale>`` float16 (N, C, ...) z-scored with the case's
    ``mean`` / ``std`` (the std raised where needed to keep every value within float16's range),
    ``mask_<scale>`` uint8 (N, ...) (linear, threshold 0.5, as nnU-Net resamples labels); plus the node
    measurements and the statistics used. Outside the image: the image's darkest value (air)."""
    pads = [float(c.min()) for c in channels]
    std = np.maximum(std, [value_range(c, low) / MAX_STORED_Z for c, low in zip(channels, pads)])
    n = len(nodes.measurements)
    out: dict[str, np.ndarray] = {}
    for scale in scales.values():
        out[f"image_{scale.name}"] = np.zeros((n, len(channels), *scale.cache_shape), dtype=np.float16)
        out[f"mask_{scale.name}"] = np.zeros((n, *scale.cache_shape), dtype=np.uint8)
    for i, node in enumerate(nodes.measurements):
        for scale in scales.values():
            crop_at = crop_grid(grid, node.centre_mm, scale.spacing_mm, scale.cache_shape)
            for c, voxels in enumerate(channels):
                crop = sample_linear(voxels, crop_at, pads[c])
                crop -= mean[c]
                np.divide(crop, std[c], out=out[f"image_{scale.name}"][i, c], casting="unsafe")   # into float16
            piece = sample_linear(nodes.mask_pieces[i], crop_at, 0.0, nodes.volume_shape, nodes.piece_offsets[i])
            out[f"mask_{scale.name}"][i] = piece >= 0.5
    m = nodes.measurements
    out["node_ids"] = np.asarray([x.node for x in m], dtype=np.int32)
    out["centre_mm"] = np.asarray([x.centre_mm for x in m], dtype=np.float64).reshape(-1, 3)
    out["volume_mm3"] = np.asarray([x.volume_mm3 for x in m], dtype=np.float32)
    out["short_axis_mm"] = np.asarray([x.short_axis_mm for x in m], dtype=np.float32)
    out["long_axis_mm"] = np.asarray([x.long_axis_mm for x in m], dtype=np.float32)
    out["sphericity"] = nodes.sphericity
    out["slice_position"] = nodes.slice_position
    out["intensity_mean"] = np.asarray(mean, dtype=np.float64)
    out["intensity_std"] = np.asarray(std, dtype=np.float64)
    return out


def value_range(voxels: np.ndarray, low: float) -> float:
    """An upper bound of max - min of ``voxels`` (``low``: their minimum): the type's range for integers (no pass
    over the voxels), the values' own for floats."""
    if np.issubdtype(voxels.dtype, np.integer):
        info = np.iinfo(voxels.dtype)
        return float(info.max) - float(info.min)
    return float(voxels.max()) - low


def preprocess_images(images: list[sitk.Image], mask: sitk.Image, plans: Plans) -> dict[str, np.ndarray]:
    """Every node's crops of one case read into memory, normalized as the plans say (what inference feeds the
    networks): the same steps and values as a training case's cache read back."""
    nodes = case_nodes(mask)
    channels = [sitk.GetArrayViewFromImage(img) for img in images]
    mean, std = case_statistics(intensity_samples(channels, nodes.neighbourhood))
    # the grid as training reads it (not the image's own transform): the same crops to the last bit
    return normalize_node_crops(cut_node_crops(channels, Grid.of(images[0]), nodes, plans.scales, mean, std),
                                plans.normalization)
