"""IBSI-style radiomics features of every lymph node: shape, first-order and texture, in physical units.

Shape comes from the mask alone: volume, surface, sphericity, principal axes and Feret diameter from
SimpleITK's ``LabelShapeStatisticsImageFilter`` (physical units, honours spacing and direction), plus
the radiologist's in-plane long/short axis computed here. First-order and texture (GLCM, GLRLM,
GLSZM) come from MIRP, an IBSI-compliant library. Each node is cut out of the image with a small
margin first, so a 512x512 volume is never processed whole per node.

See documentation/radiomics.md for the definitions, the discretisation rule and the failure rule.
"""
from __future__ import annotations

import contextlib
import logging
import re
import warnings
from typing import Sequence

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage

from lnm_auto.imaging.surface import MARGIN_VOXELS, isotropic_surface_and_volume
from lnm_auto.plans.radiomics_topology import texture_mode_for_spacing
from lnm_auto.imaging.geometry import canonical_axes, inplane_axes_mm, sitk_spacing_zyx
from lnm_auto.utils.errors import LNMError

logger = logging.getLogger(__name__)

# Shape columns. The first four are the clinical size measures the size rule and the hybrid head use.
SHAPE_COLUMNS = (
    "volume_mm3",              # voxel count x voxel volume
    "short_axis_mm",           # smallest in-plane calliper width on the largest slice (see inplane_axes_mm)
    "long_axis_mm",            # largest in-plane calliper diameter on the same slice
    "sphericity",              # (36 pi V^2)^(1/3) / surface; 1 for a ball, < 1 otherwise
    "surface_area_mm2",        # ITK's surface estimate of the node resampled to isotropic voxels
    "max_3d_diameter_mm",      # Feret diameter: largest distance between two surface voxel centres
    "major_axis_mm",           # IBSI PCA axis lengths: 4 sqrt(eigenvalue) of the mm coordinate covariance
    "minor_axis_mm",
    "least_axis_mm",
    "elongation",              # IBSI: sqrt(lambda_minor / lambda_major), in (0, 1]
    "flatness",                # IBSI: sqrt(lambda_least / lambda_major), in [0, 1]
    "equivalent_diameter_mm",  # diameter of the ball of the same volume
)
_FIRST_ORDER = ("mean", "var", "skew", "kurt", "median", "min", "p10", "p90", "max", "iqr", "range", "mad",
                "rmad", "medad", "cov", "qcod", "energy", "rms")
_GLCM = ("joint_max", "joint_avg", "joint_var", "joint_entr", "diff_avg", "diff_var", "diff_entr", "sum_avg",
         "sum_var", "sum_entr", "energy", "contrast", "dissimilarity", "inv_diff", "inv_diff_norm", "inv_diff_mom",
         "inv_diff_mom_norm", "inv_var", "corr", "auto_corr", "clust_tend", "clust_shade", "clust_prom",
         "info_corr1", "info_corr2")
_GLRLM = ("sre", "lre", "lgre", "hgre", "srlge", "srhge", "lrlge", "lrhge", "glnu", "glnu_norm", "rlnu",
          "rlnu_norm", "r_perc", "gl_var", "rl_var", "rl_entr")
_GLSZM = ("sze", "lze", "lgze", "hgze", "szlge", "szhge", "lzlge", "lzhge", "glnu", "glnu_norm", "zsnu",
          "zsnu_norm", "z_perc", "gl_var", "zs_var", "zs_entr")
# MIRP's family prefix -> our column prefix (names after the prefix are MIRP's IBSI abbreviations)
_MIRP_FAMILIES = {"stat": ("firstorder", _FIRST_ORDER), "cm": ("glcm", _GLCM),
                  "rlm": ("glrlm", _GLRLM), "szm": ("glszm", _GLSZM)}
INTENSITY_COLUMNS = tuple(f"{ours}_{name}" for ours, names in _MIRP_FAMILIES.values() for name in names)
FEATURE_COLUMNS = SHAPE_COLUMNS + INTENSITY_COLUMNS

CT_BIN_WIDTH_HU = 25.0            # IBSI / pyradiomics default for CT: bins of 25 HU ...
CT_LOWER_BOUND_HU = -1000.0       # ... counted from air; voxels below (scanner padding) leave the ROI
MR_BIN_COUNT = 32                 # uncalibrated intensities (MR, PET...): 32 bins over each node's range
MIN_VOXELS_FOR_INTENSITY = 8      # fewer voxels: first-order and texture are noise, reported as NaN
_MIRP_SUFFIX = re.compile(r"(_d[\d.]+)?_(2d|2\.5d|3d)(_.*)?$")


def node_features(image: sitk.Image, instance_mask: sitk.Image, node_ids: Sequence[int] | None = None, *,
                  modality_hint: str = "CT", fixed_bin_width: float | None = None,
                  texture_mode: str | None = None) -> pd.DataFrame:
    """One row of FEATURE_COLUMNS per node (index ``node``: the mask's integer id), in physical units.

    ``modality_hint`` 'CT' (case-insensitive): fixed bin width ``fixed_bin_width`` or 25 HU from -1000
    HU. Any other modality: fixed bin width from 0 when ``fixed_bin_width`` is given, else 32 bins per
    node. ``texture_mode`` '3d' or '2.5d' (per-slice matrices merged over the node); None decides from
    this image's spacing, but a dataset should pass one value for all its cases (see the docs).
    """
    _check_same_grid(image, instance_mask)
    spacing_zyx = np.asarray(sitk_spacing_zyx(image))
    axes = list(canonical_axes(spacing_zyx))
    mode = texture_mode if texture_mode is not None else texture_mode_for_spacing(spacing_zyx)
    if mode not in ("3d", "2.5d"):
        raise LNMError(f"texture_mode must be '3d' or '2.5d', not {texture_mode!r}")
    discretisation = discretisation_settings(modality_hint, fixed_bin_width)

    labels = sitk.GetArrayViewFromImage(instance_mask)
    if not np.issubdtype(labels.dtype, np.integer):
        raise LNMError(f"the node instance mask has pixel type {labels.dtype}; it must hold integer node ids")
    intensities = sitk.GetArrayViewFromImage(image)
    present = [int(k) for k in np.unique(labels) if k > 0]
    wanted = present if node_ids is None else [int(k) for k in node_ids]
    missing = sorted(set(wanted) - set(present))
    if missing:
        raise LNMError(f"node id(s) {missing} requested but absent from the instance mask (ids present: {present})")

    boxes = _bounding_boxes(labels, present)
    rows = {}
    for node in wanted:
        box = _with_margin(boxes[node], labels.shape)
        node_mask = np.asarray(labels[box]) == node
        origin = image.TransformIndexToPhysicalPoint(tuple(int(s.start) for s in box[::-1]))
        row = _shape_features(node_mask, spacing_zyx, origin, image.GetDirection(), axes)
        crop = np.asarray(intensities[box], dtype=np.float64)
        row.update(_intensity_features(node, crop, node_mask, axes, mode, discretisation))
        rows[node] = row
    table = pd.DataFrame.from_dict(rows, orient="index", columns=list(FEATURE_COLUMNS), dtype=float)
    table.index = pd.Index([int(k) for k in rows], name="node", dtype=int)
    return table


def discretisation_settings(modality_hint: str, fixed_bin_width: float | None = None) -> dict:
    """MIRP discretisation arguments for a modality (the rule is documented in documentation/radiomics.md)."""
    if fixed_bin_width is not None and not fixed_bin_width > 0:
        raise LNMError(f"fixed_bin_width must be positive, not {fixed_bin_width}")
    if str(modality_hint).strip().upper() == "CT":
        return dict(image_modality="ct", base_discretisation_method="fixed_bin_size",
                    base_discretisation_bin_width=float(fixed_bin_width or CT_BIN_WIDTH_HU),
                    resegmentation_method="range", resegmentation_intensity_range=[CT_LOWER_BOUND_HU, np.inf])
    if fixed_bin_width is not None:
        return dict(base_discretisation_method="fixed_bin_size",
                    base_discretisation_bin_width=float(fixed_bin_width),
                    resegmentation_method="range", resegmentation_intensity_range=[0.0, np.inf])
    return dict(base_discretisation_method="fixed_bin_number",
                base_discretisation_n_bins=MR_BIN_COUNT)


def _shape_features(node_mask: np.ndarray, spacing_zyx: np.ndarray, origin, direction, axes) -> dict:
    binary = sitk.GetImageFromArray(node_mask.astype(np.uint8))
    binary.SetSpacing(tuple(float(v) for v in spacing_zyx[::-1]))
    binary.SetOrigin(origin)
    binary.SetDirection(direction)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.ComputeFeretDiameterOn()
    stats.Execute(binary)
    volume = float(node_mask.sum()) * float(np.prod(spacing_zyx))
    surface, smooth_volume = isotropic_surface_and_volume(binary)
    moments = np.sort(np.clip(np.asarray(stats.GetPrincipalMoments(1), dtype=float), 0.0, None))[::-1]
    long_axis, short_axis = inplane_axes_mm(np.transpose(node_mask, axes), spacing_zyx[axes[1:]])
    return {
        "volume_mm3": volume,
        "short_axis_mm": short_axis,
        "long_axis_mm": long_axis,
        "sphericity": (36.0 * np.pi * smooth_volume ** 2) ** (1.0 / 3.0) / surface if surface > 0 else np.nan,
        "surface_area_mm2": surface,
        "max_3d_diameter_mm": stats.GetFeretDiameter(1),
        "major_axis_mm": 4.0 * np.sqrt(moments[0]),
        "minor_axis_mm": 4.0 * np.sqrt(moments[1]),
        "least_axis_mm": 4.0 * np.sqrt(moments[2]),
        "elongation": np.sqrt(moments[1] / moments[0]) if moments[0] > 0 else np.nan,
        "flatness": np.sqrt(moments[2] / moments[0]) if moments[0] > 0 else np.nan,
        "equivalent_diameter_mm": 2.0 * stats.GetEquivalentSphericalRadius(1),
    }


def _intensity_features(node: int, crop: np.ndarray, node_mask: np.ndarray, axes, mode: str,
                        discretisation: dict) -> dict:
    """First-order and texture features from MIRP; NaN for tiny nodes or when MIRP fails on this node."""
    if node_mask.sum() < MIN_VOXELS_FOR_INTENSITY:
        return {}
    import mirp  # imported here: only feature extraction needs it

    # MIRP reads numpy arrays as (slice, row, col) with unit spacing: texture and first-order features
    # depend only on voxel adjacency, and 2.5D mode needs the acquisition's slice axis first.
    image_srs = np.ascontiguousarray(np.transpose(crop, axes))
    mask_srs = np.ascontiguousarray(np.transpose(node_mask, axes))
    matrix_method = "3d_volume_merge" if mode == "3d" else "2.5d_volume_merge"
    try:
        with _quiet_mirp():
            table = mirp.extract_features(
                image=image_srs, mask=mask_srs, base_feature_families=["statistics", "glcm", "glrlm", "glszm"],
                glcm_spatial_method=matrix_method, glrlm_spatial_method=matrix_method, glszm_spatial_method=mode,
                **discretisation)[0]
    except Exception as error:  # a library failure on one node must not lose the case's other nodes
        logger.warning("radiomics: node %d: MIRP failed (%s: %s); its intensity features are NaN",
                       node, type(error).__name__, error)
        return {}
    return _rename_mirp_columns(table.iloc[0])


def _rename_mirp_columns(row: pd.Series) -> dict:
    out = {}
    for column, value in row.items():
        family, _, rest = str(column).partition("_")
        if family in _MIRP_FAMILIES:
            out[f"{_MIRP_FAMILIES[family][0]}_{_MIRP_SUFFIX.sub('', rest)}"] = float(value)
    unexpected = set(out) - set(INTENSITY_COLUMNS)
    if unexpected or len(out) != len(INTENSITY_COLUMNS):
        raise RuntimeError(f"MIRP returned features other than the documented set: {sorted(unexpected)[:5]}, "
                           f"{len(out)} of {len(INTENSITY_COLUMNS)}; check the installed MIRP version")
    return out


@contextlib.contextmanager
def _quiet_mirp():
    """MIRP logs every image at INFO through the root logger (calling basicConfig) and warns per node."""
    root = logging.getLogger()
    placeholder = None
    if not root.handlers:   # keep MIRP's basicConfig from installing a stdout handler for the whole app
        placeholder = logging.NullHandler()
        root.addHandler(placeholder)
    previous_disable = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous_disable)
        if placeholder is not None:
            root.removeHandler(placeholder)


def _check_same_grid(image: sitk.Image, mask: sitk.Image) -> None:
    if image.GetDimension() != 3 or mask.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise LNMError("radiomics needs a 3D single-channel image and a 3D instance mask")
    same = (image.GetSize() == mask.GetSize()
            and np.allclose(image.GetSpacing(), mask.GetSpacing(), rtol=1e-4)
            and np.allclose(image.GetOrigin(), mask.GetOrigin(), atol=1e-3 * min(image.GetSpacing()))
            and np.allclose(image.GetDirection(), mask.GetDirection(), atol=1e-4))
    if not same:
        raise LNMError(f"image (size {image.GetSize()}, spacing {image.GetSpacing()}) and instance mask "
                       f"(size {mask.GetSize()}, spacing {mask.GetSpacing()}) are not on one grid: "
                       "the mask must have the image's size, spacing, origin and direction")


def _bounding_boxes(labels: np.ndarray, node_ids: list[int]) -> dict[int, tuple[slice, ...]]:
    """Bounding box of every node in one pass over the volume."""
    if not node_ids:
        return {}
    lookup = np.zeros(max(node_ids) + 1, dtype=np.int32)
    lookup[node_ids] = np.arange(1, len(node_ids) + 1)
    compact = lookup[np.asarray(labels).clip(0, max(node_ids))]   # ids renumbered 1..n for find_objects
    return dict(zip(node_ids, ndimage.find_objects(compact)))


def _with_margin(box: tuple[slice, ...], shape) -> tuple[slice, ...]:
    return tuple(slice(max(0, s.start - MARGIN_VOXELS), min(n, s.stop + MARGIN_VOXELS)) for s, n in zip(box, shape))
