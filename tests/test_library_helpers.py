"""Hand-written helpers replaced by the libraries the design already depends on, checked against the code they
replaced (copied here verbatim as ``_reference_*``): acvl-utils' connected components (cc3d) in
imaging/components.py, one AUROC (evaluation/metrics.py, midranks) behind training/validation.py, and the DICOM
slice order, which stays ours: these tests pin that GDCM's series order agrees with it on every valid geometry."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from lnm_auto.imaging import components as C
from lnm_auto.conversion.dicom import sorted_slices
from lnm_auto.evaluation import metrics as M
from lnm_auto.evaluation.metric_engine import SortedScores
from lnm_auto.training import validation as V
from lnm_auto.utils.errors import LNMError

sys.path.insert(0, str(Path(__file__).parent))
from dicom_builders import CTGeometry, _rotation, write_ct_series  # noqa: E402


# ------------------------------------------------------------------------------------------------
# connected components: acvl-utils (cc3d) against the ndimage code it replaced
# ------------------------------------------------------------------------------------------------
def _reference_components(mask: sitk.Image, min_volume_mm3: float, boxes: list | None = None):
    """components._components before acvl-utils (ndimage.label with a 3x3x3 structure), verbatim."""
    arr = sitk.GetArrayViewFromImage(mask)
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.rint(arr).astype(np.int32)
    if arr.size and np.issubdtype(arr.dtype, np.signedinteger) and arr.min() < 0:
        raise ValueError("the mask has negative values")
    voxel_mm3 = float(np.prod(mask.GetSpacing()))
    min_voxels = max(1, int(np.ceil(min_volume_mm3 / voxel_mm3 - 1e-9)))
    found, n_removed = [], 0
    if boxes is None:
        boxes = ndimage.find_objects(arr) if arr.size and arr.max() > 0 else []
    for value_minus_1, box in enumerate(boxes):
        if box is None:
            continue
        value = value_minus_1 + 1
        labelled, _ = ndimage.label(arr[box] == value, structure=np.ones((3, 3, 3), dtype=bool))
        for k, sub in enumerate(ndimage.find_objects(labelled), start=1):
            voxels = labelled[sub] == k
            if np.count_nonzero(voxels) < min_voxels:
                n_removed += 1
                continue
            region = tuple(slice(b.start + s.start, b.start + s.stop) for b, s in zip(box, sub))
            centre_zyx = np.argwhere(voxels).mean(axis=0) + [r.start for r in region]
            centre = mask.TransformContinuousIndexToPhysicalPoint([float(c) for c in centre_zyx[::-1]])
            found.append(C._Component(value, region, voxels, tuple(centre)))
    return found, n_removed, sum(b is not None for b in boxes)


def _as_image(arr: np.ndarray, spacing=(0.8, 0.8, 2.5), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1)) -> sitk.Image:
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(spacing)
    image.SetDirection([float(v) for v in direction])
    image.SetOrigin((12.5, -40.0, 103.0))
    return image


def _balls(shape, n, seed, instance: bool, specks: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    arr = np.zeros(shape, np.uint16)
    zz, yy, xx = np.ogrid[:shape[0], :shape[1], :shape[2]]
    for k in range(1, n + 1):
        c = rng.integers(0, shape)       # anywhere, the borders included: balls cut by the volume's edge
        r = rng.uniform(1.0, 4.0)
        arr[((zz - c[0]) * 2) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r ** 2] = k if instance else 1 + k % 2
    arr.flat[rng.integers(0, arr.size, specks)] = 1
    return arr


def _ring_and_dot() -> np.ndarray:
    """A ring and a dot at its centre (one value): two components with the same centre, so their numbering
    falls to the labelling order."""
    arr = np.zeros((5, 21, 21), np.uint8)
    yy, xx = np.ogrid[:21, :21]
    d = np.hypot(yy - 10, xx - 10)
    arr[2][(d >= 6) & (d <= 8)] = 1
    arr[1:4, 9:12, 9:12] = 1
    return arr


def _diagonal_chain() -> np.ndarray:
    """Voxels touching only by corners or edges: one 26-connected component (six with faces only)."""
    arr = np.zeros((8, 8, 8), np.uint8)
    for i in range(6):
        arr[i, i, i] = 1                 # corner to corner
    arr[0, 7, 6] = arr[1, 6, 6] = 2      # edge to edge
    return arr


MASKS = {
    "empty": np.zeros((6, 10, 10), np.uint8),
    "nothing_at_all": np.zeros((0, 4, 4), np.uint8),
    "one_voxel_at_the_corner": np.pad(np.ones((1, 1, 1), np.uint8), ((0, 5), (0, 9), (9, 0))),
    "whole_volume": np.ones((4, 6, 5), np.uint8),
    "ring_and_dot": _ring_and_dot(),
    "diagonal_chain": _diagonal_chain(),
    "binary_many_at_borders": _balls((12, 40, 36), 60, 1, instance=False, specks=40),
    "instance_many_at_borders": _balls((12, 40, 36), 60, 2, instance=True, specks=25),
    "float_labels": _balls((10, 30, 30), 12, 3, instance=True).astype(np.float32) + 0.2,
    "signed_labels": _balls((10, 30, 30), 12, 4, instance=False).astype(np.int16),
}


def _same(found_a, found_b) -> bool:
    (a, removed_a, labels_a), (b, removed_b, labels_b) = found_a, found_b
    return (removed_a, labels_a, len(a)) == (removed_b, labels_b, len(b)) and all(
        x.value == y.value and x.region == y.region and np.array_equal(x.voxels, y.voxels)
        and x.centre_lps == y.centre_lps for x, y in zip(a, b))


@pytest.mark.parametrize("name", sorted(MASKS))
@pytest.mark.parametrize("min_volume_mm3", [0.0, 10.0, 60.0])
@pytest.mark.parametrize("spacing", [(0.8, 0.8, 2.5), (1.0, 1.0, 1.0), (0.3, 5.0, 0.7)])
def test_components_equal_the_ndimage_code(name, min_volume_mm3, spacing):
    mask = _as_image(MASKS[name], spacing)
    assert _same(C._components(mask, min_volume_mm3), _reference_components(mask, min_volume_mm3))


def test_components_with_the_callers_boxes_equal_the_ndimage_code():
    arr = MASKS["instance_many_at_borders"]
    boxes = ndimage.find_objects(arr)
    mask = _as_image(arr)
    assert _same(C._components(mask, 10.0, boxes), _reference_components(mask, 10.0, boxes))


def test_component_numbering_edges_and_corners_connect():
    """26-connectivity, speck removal and the reading order, as the module's docstring promises."""
    split = C.split_components(_as_image(MASKS["diagonal_chain"], (1.0, 1.0, 1.0)), 0.0)
    assert split.n_nodes == 2 and sorted(split.source_values) == [1, 2] and split.n_removed == 0
    ring = C.split_components(_as_image(MASKS["ring_and_dot"], (1.0, 1.0, 1.0)), 0.0)
    out = sitk.GetArrayFromImage(ring.mask)
    assert ring.n_nodes == 2 and ring.volumes_mm3 == [float((out == 1).sum()), float((out == 2).sum())]
    assert out[2, 10, 10] == 1 and out[2, 10, 2] == 2    # equal centres: the dot, met first in the scan, is node 1
    specks = C.split_components(_as_image(MASKS["binary_many_at_borders"], (1.0, 1.0, 1.0)), 3.0)
    assert specks.n_removed > 0 and min(specks.volumes_mm3) >= 3.0


def test_negative_mask_values_still_refused():
    with pytest.raises(ValueError, match="the mask has negative values"):
        C._components(_as_image(-MASKS["signed_labels"]), 10.0)


# ------------------------------------------------------------------------------------------------
# one AUROC: metrics.auroc (midranks), which validation.py now calls, against scikit-learn
# ------------------------------------------------------------------------------------------------
def _reference_auroc_or_nan(labels, probabilities) -> float:
    """validation.auroc_or_nan before it called metrics.auroc (scikit-learn), verbatim."""
    y = np.asarray(labels, dtype=float)
    return float(roc_auc_score(y, probabilities)) if 0 < y.sum() < len(y) else float("nan")


def _label_score_sets():
    rng = np.random.default_rng(7)
    yield [0, 1], [0.3, 0.3]                                          # one tie across the classes
    yield [1, 0, 1, 0, 0], [0.9, 0.2, 0.4, 0.7, 0.0]
    yield [0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]                          # perfect
    yield [1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]                          # perfectly wrong
    for n in (3, 10, 57, 400):
        y = (rng.random(n) < 0.35).astype(int)
        y[:2] = [0, 1]
        yield y, rng.random(n)                                        # no ties
        yield y, np.round(rng.random(n), 1)                           # many ties
        yield y.astype(float), rng.integers(0, 3, n).astype(float)    # three distinct scores only
        yield y, np.full(n, 0.5)                                      # every score tied


@pytest.mark.parametrize("case", list(range(20)))
def test_the_one_auroc_equals_scikit_learn_and_the_old_validation_auroc(case):
    y, p = list(_label_score_sets())[case]
    expected = roc_auc_score(y, p)
    assert M.auroc(y, p) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert V.auroc_or_nan(np.asarray(y), np.asarray(p)) == pytest.approx(_reference_auroc_or_nan(y, p), rel=1e-12)
    # the weighted engine behind the point metrics and the bootstrap gives the same number
    engine = SortedScores(np.asarray(y, dtype=float), np.asarray(p, dtype=float))
    assert engine.metrics(np.ones((1, len(y))))["auroc"][0] == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1], []])
def test_one_class_or_none_gives_nan_in_validation_as_before(labels):
    p = np.linspace(0.1, 0.9, len(labels))
    assert math.isnan(V.auroc_or_nan(np.asarray(labels), p)) and math.isnan(_reference_auroc_or_nan(labels, p))


def test_validation_auroc_accepts_what_the_trainer_passes():
    """The trainer hands over unit labels as int64 or float and probabilities as float32."""
    y = np.array([1, 0, 0, 1, 1, 0], dtype=np.int64)
    p = np.array([0.8, 0.1, 0.6, 0.6, 0.9, 0.3], dtype=np.float32)
    assert V.auroc_or_nan(y, p) == _reference_auroc_or_nan(y, p) == V.auroc_or_nan(y.astype(float), p)


def test_no_other_auroc_implementation_in_the_package():
    """roc_auc_score is called nowhere in lnm_auto: every unweighted AUROC is metrics.auroc."""
    package = Path(M.__file__).parents[1]
    users = [p for p in package.rglob("*.py") if "roc_auc_score(" in p.read_text(encoding="utf-8") or "import roc_auc_score"
             in p.read_text(encoding="utf-8")]
    assert users == []


# ------------------------------------------------------------------------------------------------
# DICOM slice order: ours (headers already read) agrees with GDCM's series order on every valid geometry
# ------------------------------------------------------------------------------------------------
GEOMETRIES = {
    "oblique": CTGeometry(),
    "axial": CTGeometry(rotation=np.eye(3)),
    "feet_first": CTGeometry(rotation=np.diag([1.0, -1.0, -1.0])),
    "sagittal": CTGeometry(rotation=_rotation(0.0, 90.0)),
    "coronal_tilted": CTGeometry(rotation=_rotation(35.0, 90.0)),
    "decreasing_positions": CTGeometry(slice_spacing=-2.5),
    "two_slices": CTGeometry(n_slices=2),
}


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_slice_order_equals_gdcms(name, tmp_path):
    write_ct_series(tmp_path / name, GEOMETRIES[name], seed=3)
    headers = [(p, pydicom.dcmread(str(p), stop_before_pixels=True)) for p in sorted((tmp_path / name).iterdir())]
    ours = [str(p) for p, _ in sorted_slices(headers)]
    assert ours == list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / name)))


def test_gdcm_orders_a_holed_series_that_ours_refuses(tmp_path):
    """Why the check stays ours: GDCM orders a series with a slice missing without a word."""
    write_ct_series(tmp_path / "holed", CTGeometry(), seed=3)
    sorted((tmp_path / "holed").iterdir())[5].unlink()
    assert len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "holed"))) == 11
    headers = [(p, pydicom.dcmread(str(p), stop_before_pixels=True)) for p in (tmp_path / "holed").iterdir()]
    with pytest.raises(LNMError, match=r"holed: slices are not evenly spaced \(gaps 2.5 to 5 mm: missing or "
                                       r"duplicate slices\?\); export the complete series"):
        sorted_slices(headers)
