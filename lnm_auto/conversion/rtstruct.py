"""RTSTRUCT contours -> voxel masks on the image grid (pydicom to read, scikit-image to fill polygons).

Every CLOSED_PLANAR contour is mapped from patient (LPS) coordinates to continuous voxel indices of the
image it was drawn on, must lie in one slice plane, and is filled on that slice. A voxel belongs to
the ROI when its centre lies inside the polygon or on it (within ``ON_CONTOUR_TOLERANCE`` voxels; no
boundary dilation, so volumes are not inflated). Tools that trace a mask (rt-utils, OpenCV) put the
contour through the centres of the boundary voxels, and write a voxel alone or a row of voxels as a
contour of 1 or 2 points: "on it" keeps those voxels. Contours of one ROI on the same slice are
combined with exclusive-or, which is how holes (a contour inside another) are drawn; voxels on a contour
stay in the ROI either way.

A file pydicom cannot read whole (truncated), contour points that are not finite, and an ROI on another
frame of reference than the image are refused with one line naming the file; contours outside the
image are counted (``RoiCoverage``) so the caller can refuse an ROI that lies wholly outside.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from skimage.draw import polygon

from lnm_auto.conversion.dicom_file import check_whole
from lnm_auto.utils.errors import LNMError

SLICE_PLANE_TOLERANCE = 0.25   # voxels: how far a contour point may lie off its slice plane
ON_CONTOUR_TOLERANCE = 0.01    # voxels: a voxel centre this close to a contour lies on it
EDGE_TOLERANCE = 0.01          # voxels: contour points this far beyond the outermost voxel's edge count as outside


@dataclass
class RoiCoverage:
    """How the closed contours of one ROI fell on the image."""
    contours: int = 0          # closed planar contours
    outside: int = 0           # wholly outside the image: ignored
    cut: int = 0               # partly outside: cut at the image's edge


def read_rtstruct(path: Path) -> pydicom.Dataset:
    """The RTSTRUCT dataset, with one clear line when it is not one (or not whole)."""
    check_whole(path)
    try:
        ds = pydicom.dcmread(str(path))
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as e:
        raise LNMError(f"{path}: cannot be read as DICOM ({str(e).splitlines()[0][:160]})") from None
    if getattr(ds, "Modality", "") != "RTSTRUCT":
        raise LNMError(f"{path}: not an RTSTRUCT (Modality {getattr(ds, 'Modality', 'missing')})")
    for sequence in ("StructureSetROISequence", "ROIContourSequence"):
        if sequence not in ds:
            raise LNMError(f"{path}: RTSTRUCT without a {sequence} (damaged, or exported without contours)")
    _check_numbers(ds, path)
    return ds


def _check_numbers(ds: pydicom.Dataset, path: Path) -> None:
    """Every ROI and ROI contour item carries the number that links the two sequences."""
    for sequence, key in (("StructureSetROISequence", "ROINumber"), ("ROIContourSequence", "ReferencedROINumber")):
        for i, item in enumerate(ds[sequence].value, start=1):
            try:
                int(item[key].value)
            except (KeyError, TypeError, ValueError):
                raise LNMError(f"{path}: item {i} of the {sequence} has no {key} (damaged RTSTRUCT)") from None


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


def frames_of_series(ds: pydicom.Dataset, series_uid: str) -> set[str]:
    """The frame(s) of reference under which the RTSTRUCT lists the image series ``series_uid``."""
    frames = set()
    for frame in getattr(ds, "ReferencedFrameOfReferenceSequence", []):
        for study in getattr(frame, "RTReferencedStudySequence", []):
            for series in getattr(study, "RTReferencedSeriesSequence", []):
                if str(getattr(series, "SeriesInstanceUID", "")) == series_uid and "FrameOfReferenceUID" in frame:
                    frames.add(str(frame.FrameOfReferenceUID))
    return frames


def roi_frame_of_reference(ds: pydicom.Dataset, roi_number: int) -> str | None:
    """The frame of reference ROI ``roi_number`` was drawn in (StructureSetROISequence), where it says."""
    for roi in ds.StructureSetROISequence:
        if int(roi.ROINumber) == roi_number and "ReferencedFrameOfReferenceUID" in roi:
            return str(roi.ReferencedFrameOfReferenceUID)
    return None


def _physical_to_index(reference: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(matrix, origin) with continuous index (x, y, z) = matrix @ (point - origin)."""
    direction = np.asarray(reference.GetDirection()).reshape(3, 3)
    return np.linalg.inv(direction @ np.diag(reference.GetSpacing())), np.asarray(reference.GetOrigin())


def _contour_points(contour: pydicom.Dataset, name: str, path: Path) -> np.ndarray:
    """(n, 3) LPS points of a contour; not-a-number or malformed ContourData is refused."""
    try:
        points = np.asarray(contour.ContourData, dtype=float)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise LNMError(f"{path}: a contour of ROI '{name}' has unreadable ContourData ({str(e)[:80]})") from None
    if points.size % 3:
        raise LNMError(f"{path}: a contour of ROI '{name}' holds {points.size} numbers, not x,y,z triples")
    if not np.isfinite(points).all():
        raise LNMError(f"{path}: a contour of ROI '{name}' has {int((~np.isfinite(points)).sum())} NaN/Inf "
                       "coordinate(s); export the structure set again")
    return points.reshape(-1, 3)


def _centres_on_contour(xy: np.ndarray, nx: int, ny: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the voxel centres of a slice that lie on the closed polygon ``xy`` (continuous x, y)."""
    a, b = xy, np.roll(xy, -1, axis=0)
    flat = np.abs(b[:, 0] - a[:, 0]) >= np.abs(b[:, 1] - a[:, 1])     # step along x, else along y
    u0, u1 = np.where(flat, a[:, 0], a[:, 1]), np.where(flat, b[:, 0], b[:, 1])
    v0, v1 = np.where(flat, a[:, 1], a[:, 0]), np.where(flat, b[:, 1], b[:, 0])
    size = np.where(flat, nx, ny)
    lo = np.maximum(np.ceil(np.minimum(u0, u1) - ON_CONTOUR_TOLERANCE), 0).astype(np.int64)
    hi = np.minimum(np.floor(np.maximum(u0, u1) + ON_CONTOUR_TOLERANCE), size - 1).astype(np.int64)
    count = np.clip(hi - lo + 1, 0, None)
    edge = np.repeat(np.arange(len(a)), count)
    u = lo[edge] + np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    du = (u1 - u0)[edge]
    t = np.divide(u - u0[edge], du, out=np.zeros(len(u)), where=du != 0)
    v = v0[edge] + t * (v1 - v0)[edge]
    on = (np.abs(v - np.rint(v)) <= ON_CONTOUR_TOLERANCE) & (np.rint(v) >= 0) & (np.rint(v) < np.where(flat, ny, nx)[edge])
    u, v, flat_on = u[on], np.rint(v[on]).astype(np.int64), flat[edge][on]
    return np.where(flat_on, v, u), np.where(flat_on, u, v)


def _where_it_falls(index: np.ndarray, nx: int, ny: int, nz: int) -> tuple[str, int]:
    """('inside' | 'cut' | 'outside', slice) for a contour at continuous indices ``index`` (x, y, z)."""
    slice_index = int(round(float(np.mean(index[:, 2]))))
    low, high = -0.5 - EDGE_TOLERANCE, np.array([nx, ny]) - 0.5 + EDGE_TOLERANCE
    xy = index[:, :2]
    if not 0 <= slice_index < nz or (xy.max(axis=0) < low).any() or (xy.min(axis=0) > high).any():
        return "outside", slice_index
    return ("cut" if (xy < low).any() or (xy > high).any() else "inside"), slice_index


def rasterize_roi(ds: pydicom.Dataset, roi_number: int, reference: sitk.Image, path: Path,
                  name: str | None = None) -> tuple[np.ndarray, RoiCoverage]:
    """(boolean (z, y, x) mask of ROI ``roi_number`` on ``reference``'s grid, how its contours fell on it)."""
    name = name or f"ROI {roi_number}"
    to_index, origin = _physical_to_index(reference)
    nx, ny, nz = reference.GetSize()
    mask = np.zeros((nz, ny, nx), dtype=bool)
    on_contour = np.zeros_like(mask)
    coverage = RoiCoverage()
    for roi_contour in ds.ROIContourSequence:
        if int(roi_contour.ReferencedROINumber) != roi_number:
            continue
        for contour in getattr(roi_contour, "ContourSequence", []):
            if str(getattr(contour, "ContourGeometricType", "CLOSED_PLANAR")) != "CLOSED_PLANAR":
                continue   # POINT / OPEN_PLANAR contours enclose no volume
            points = _contour_points(contour, name, path)
            if not len(points):
                continue
            coverage.contours += 1
            index = (points - origin) @ to_index.T          # continuous (x, y, z) per point
            if np.abs(index[:, 2] - np.mean(index[:, 2])).max() > SLICE_PLANE_TOLERANCE:
                raise LNMError(f"{path}: a contour of ROI '{name}' does not lie in a slice plane of the image "
                               "(contours must be drawn on the image's slices)")
            where, slice_index = _where_it_falls(index, nx, ny, nz)
            if where == "outside":
                coverage.outside += 1
                continue
            coverage.cut += where == "cut"
            if len(points) >= 3:      # 1 or 2 points (a voxel, a row of voxels) enclose nothing: on-contour only
                rows, cols = polygon(index[:, 1], index[:, 0], shape=(ny, nx))
                filled = np.zeros((ny, nx), dtype=bool)
                filled[rows, cols] = True
                mask[slice_index] ^= filled
            rows, cols = _centres_on_contour(index[:, :2], nx, ny)
            on_contour[slice_index, rows, cols] = True
    return mask | on_contour, coverage
