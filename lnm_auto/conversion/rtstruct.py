"""RTSTRUCT contours -> voxel masks on the image grid (pydicom to read, scikit-image to fill polygons).

Every CLOSED_PLANAR contour is mapped from patient (LPS) coordinates to continuous voxel indices of the
image it was drawn on, must lie in one slice plane, and is filled on that slice. A voxel belongs to
the ROI when its centre lies inside the polygon (no boundary dilation, so volumes are not inflated).
Contours of one ROI on the same slice are combined with exclusive-or, which is how holes (a contour
inside another) are drawn in RTSTRUCTs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from skimage.draw import polygon

from lnm_auto.utils.errors import LNMError

SLICE_PLANE_TOLERANCE = 0.25   # voxels: how far a contour point may lie off its slice plane


def read_rtstruct(path: Path) -> pydicom.Dataset:
    """The RTSTRUCT dataset, with one clear line when it is not one."""
    try:
        ds = pydicom.dcmread(str(path))
    except (pydicom.errors.InvalidDicomError, OSError) as e:
        raise LNMError(f"{path}: cannot be read as DICOM ({e})") from None
    if getattr(ds, "Modality", "") != "RTSTRUCT" or "StructureSetROISequence" not in ds:
        raise LNMError(f"{path}: not an RTSTRUCT (Modality {getattr(ds, 'Modality', 'missing')})")
    return ds


def roi_names(ds: pydicom.Dataset) -> dict[int, str]:
    """ROI number -> ROI name."""
    return {int(roi.ROINumber): str(getattr(roi, "ROIName", f"ROI {roi.ROINumber}")) for roi in ds.StructureSetROISequence}


def referenced_series_uid(ds: pydicom.Dataset) -> str | None:
    """The image series the structure set was drawn on, where the RTSTRUCT says so."""
    try:
        return str(ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
                   .RTReferencedSeriesSequence[0].SeriesInstanceUID)
    except (AttributeError, IndexError):
        return None


def frame_of_reference_uid(ds: pydicom.Dataset) -> str | None:
    """Frame of reference of the contours."""
    if "FrameOfReferenceUID" in ds:
        return str(ds.FrameOfReferenceUID)
    try:
        return str(ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID)
    except (AttributeError, IndexError):
        return None


def _physical_to_index(reference: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(matrix, origin) with continuous index (x, y, z) = matrix @ (point - origin)."""
    direction = np.asarray(reference.GetDirection()).reshape(3, 3)
    return np.linalg.inv(direction @ np.diag(reference.GetSpacing())), np.asarray(reference.GetOrigin())


def rasterize_roi(ds: pydicom.Dataset, roi_number: int, reference: sitk.Image, path: Path) -> tuple[np.ndarray, int]:
    """(boolean (z, y, x) mask of ROI ``roi_number`` on ``reference``'s grid, contours outside the image)."""
    to_index, origin = _physical_to_index(reference)
    nx, ny, nz = reference.GetSize()
    mask = np.zeros((nz, ny, nx), dtype=bool)
    outside = 0
    for roi_contour in ds.ROIContourSequence:
        if int(roi_contour.ReferencedROINumber) != roi_number:
            continue
        for contour in getattr(roi_contour, "ContourSequence", []):
            if str(getattr(contour, "ContourGeometricType", "CLOSED_PLANAR")) != "CLOSED_PLANAR":
                continue   # POINT / OPEN_PLANAR contours enclose no volume
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
            if len(points) < 3:
                continue
            index = (points - origin) @ to_index.T          # continuous (x, y, z) per point
            k = float(np.mean(index[:, 2]))
            if np.abs(index[:, 2] - k).max() > SLICE_PLANE_TOLERANCE:
                raise LNMError(f"{path}: a contour of ROI {roi_number} does not lie in a slice plane of the image "
                               "(contours must be drawn on the image's slices)")
            slice_index = int(round(k))
            if not 0 <= slice_index < nz:
                outside += 1
                continue
            rows, cols = polygon(index[:, 1], index[:, 0], shape=(ny, nx))
            filled = np.zeros((ny, nx), dtype=bool)
            filled[rows, cols] = True
            mask[slice_index] ^= filled
    return mask, outside
