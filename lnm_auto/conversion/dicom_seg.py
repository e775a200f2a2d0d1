"""DICOM-SEG segments -> voxel masks on the image grid (highdicom reads every SEG flavour).

Each segment is read as a volume in patient (LPS) space (``Segmentation.get_volume``: BINARY,
FRACTIONAL, LABELMAP, frames in any order, empty frames omitted) and resampled with nearest neighbour
onto the image grid, so a SEG on the image's own grid is copied voxel for voxel and one on another
grid of the same frame of reference still lands in the right place.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lnm_auto.conversion.dicom_file import check_whole
from lnm_auto.utils.errors import LNMError

FRACTIONAL_THRESHOLD = 0.5


def read_seg(path: Path):
    """The highdicom Segmentation, with one clear line when the file is not a readable SEG."""
    import highdicom as hd
    import pydicom
    check_whole(path)       # highdicom, like pydicom, reads a truncated file without a word
    try:
        return hd.seg.segread(str(path))
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, AttributeError, KeyError) as e:
        raise LNMError(f"{path}: cannot be read as a DICOM-SEG ({str(e).splitlines()[0][:160]})") from None


def segment_names(seg) -> dict[int, str]:
    """Segment number -> segment label (the property type's meaning where the label is empty)."""
    return {k: label or meaning for k, (label, meaning) in _labels_and_meanings(seg).items()}


def segment_search_texts(seg) -> dict[int, str]:
    """Segment number -> label and property type meaning, for recognising lymph-node segments by name."""
    return {k: f"{label} {meaning}" for k, (label, meaning) in _labels_and_meanings(seg).items()}


def _labels_and_meanings(seg) -> dict[int, tuple[str, str]]:
    out = {}
    for item in seg.SegmentSequence:
        try:
            meaning = str(item.SegmentedPropertyTypeCodeSequence[0].CodeMeaning).strip()
        except (AttributeError, IndexError):
            meaning = ""
        out[int(item.SegmentNumber)] = (str(getattr(item, "SegmentLabel", "")).strip(), meaning)
    return out


def referenced_series_uid(seg) -> str | None:
    """The image series the SEG was made on, where the SEG says so."""
    try:
        return str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    except (AttributeError, IndexError):
        return None


def _volume_to_sitk(array_ijk: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A highdicom volume (array axes i, j, k; affine index -> LPS) as a SimpleITK image."""
    image = sitk.GetImageFromArray(array_ijk)          # SimpleITK index (x, y, z) = array axes (k, j, i)
    columns = affine[:3, :3][:, ::-1]
    spacing = np.linalg.norm(columns, axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((columns / spacing).ravel().tolist())
    image.SetOrigin(affine[:3, 3].tolist())
    return image


def _voxels_inside(binary: np.ndarray, affine: np.ndarray, reference: sitk.Image) -> int:
    """How many of the set voxels of a highdicom volume have their centre inside ``reference``'s grid."""
    physical = np.argwhere(binary) @ affine[:3, :3].T + affine[:3, 3]
    direction = np.asarray(reference.GetDirection()).reshape(3, 3)
    index = (physical - reference.GetOrigin()) @ np.linalg.inv(direction @ np.diag(reference.GetSpacing())).T
    return int(np.all((index > -0.5) & (index < np.asarray(reference.GetSize()) - 0.5), axis=1).sum())


def segment_on_grid(seg, number: int, reference: sitk.Image, path: Path) -> tuple[np.ndarray, int, int]:
    """(boolean (z, y, x) mask of segment ``number`` on ``reference``'s grid, the segment's voxels, how many of
    them lie inside that grid)."""
    try:
        volume = seg.get_volume(segment_numbers=[number], combine_segments=False)
    except (ValueError, RuntimeError) as e:
        raise LNMError(f"{path}: segment {number} is not a regular 3D volume ({str(e).splitlines()[0][:160]})") from None
    array = np.asarray(volume.array)[..., 0]
    binary = (array >= FRACTIONAL_THRESHOLD) if np.issubdtype(array.dtype, np.floating) else array > 0
    moving = _volume_to_sitk(binary.astype(np.uint8), np.asarray(volume.affine))
    on_grid = sitk.Resample(moving, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    inside = _voxels_inside(binary, np.asarray(volume.affine), reference)
    return sitk.GetArrayFromImage(on_grid).astype(bool), int(binary.sum()), inside
