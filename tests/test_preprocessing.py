"""Resampling correctness, normalization, npz caches: real images through SimpleITK."""
from __future__ import annotations

import dataclasses
import math
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from lnm_auto.datasets.raw_dataset import Grid
from lnm_auto.plans.plans import ChannelNormalization, CropScale
from lnm_auto.imaging.geometry import canonical_axes, crop_grid, measure_nodes, sample_linear, sitk_spacing_zyx
from lnm_auto.preprocessing.normalization import normalize, normalize_stored
from lnm_auto.preprocessing.crops import preprocess_images
from lnm_auto.preprocessing.preprocessor import crops_digest, crops_folder, load_case_crops
from test_planning import make_fingerprint
from conftest import run_cli


def rotation_direction(deg_z: float, deg_x: float) -> tuple:
    a, b = math.radians(deg_z), math.radians(deg_x)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return tuple((rz @ rx @ np.diag([-1, -1, 1])).ravel())


def sphere_case(radius_mm=9.0, spacing_xyz=(0.7, 0.7, 3.0), size_xyz=(96, 96, 30), direction=None,
                origin=(-30.0, 12.5, -80.0)):
    """An image + node mask with one sphere whose physical centre is known."""
    img = sitk.Image(size_xyz, sitk.sitkFloat32)
    img.SetSpacing(spacing_xyz)
    img.SetOrigin(origin)
    img.SetDirection(direction or rotation_direction(20, 10))
    centre_idx = np.array(size_xyz) / 2.0 + np.array([3.3, -2.1, 0.4])
    centre_phys = np.array(img.TransformContinuousIndexToPhysicalPoint(tuple(centre_idx)))
    # physical coordinates of every voxel
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in size_xyz], indexing="ij"), -1).reshape(-1, 3).astype(float)
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    phys = np.asarray(origin) + (idx * spacing_xyz) @ d.T
    inside = (np.linalg.norm(phys - centre_phys, axis=1) <= radius_mm).reshape(size_xyz).transpose(2, 1, 0)
    arr = np.where(inside, 60.0, -100.0).astype(np.float32)
    image = sitk.GetImageFromArray(arr)
    image.CopyInformation(img)
    mask = sitk.GetImageFromArray(inside.astype(np.uint8) * 3)   # node id 3
    mask.CopyInformation(img)
    return image, mask, centre_phys


def tiny_plans(roi=(16, 48, 48), spacing=(1.5, 0.5, 0.5), scheme="CT"):
    from lnm_auto.planning.planner import plan_experiment
    fp = make_fingerprint([(3.0, 0.7, 0.7)] * 4, [(30, 96, 96)] * 4, [(18, 18, 18)] * 8)
    plans = plan_experiment(fp)
    scale = CropScale("global", spacing, roi, tuple(a * b for a, b in zip(roi, spacing)), roi)
    norm = ChannelNormalization(0, "CT", "CT", -100.0, 60.0, 0.0, 50.0) if scheme == "CT" else \
        ChannelNormalization(0, "T2", "zscore")
    return dataclasses.replace(plans, scales={"global": scale}, normalization=[norm])


def test_sphere_keeps_physical_volume_and_centre_after_resampling():
    image, mask, centre = sphere_case()
    source_volume = float(sitk.GetArrayFromImage(mask).astype(bool).sum() * np.prod(mask.GetSpacing()))
    assert source_volume == pytest.approx(4 / 3 * math.pi * 9.0 ** 3, rel=0.05)
    plans = tiny_plans()
    out = preprocess_images([image], mask, plans)
    crop = out["mask_global"][0]
    scale = plans.scales["global"]
    crop_volume = crop.sum() * np.prod(scale.spacing_mm)
    assert crop_volume == pytest.approx(source_volume, rel=0.04)
    # the node centre in world coordinates survives: centroid of the crop's mask mapped back to physical
    (node,) = measure_nodes(mask)
    assert node.node == 3
    np.testing.assert_allclose(out["centre_mm"][0], centre, atol=0.35)
    grid = crop_grid(mask, out["centre_mm"][0], scale.spacing_mm, scale.cache_shape)
    crop_centre = np.argwhere(crop).mean(axis=0)            # canonical (slice, row, col) crop index
    index_zyx = np.zeros(3)
    for k, a in enumerate(grid.axes):                         # -> the image's continuous (z, y, x) index
        index_zyx[a] = grid.start[k] + grid.step[k] * crop_centre[k]
    phys = mask.TransformContinuousIndexToPhysicalPoint(tuple(index_zyx[::-1]))
    np.testing.assert_allclose(phys, centre, atol=0.5)


def simpleitk_crop(img: sitk.Image, centre, spacing_srs, shape_srs, default: float) -> np.ndarray:
    """The reference: SimpleITK's ResampleImageFilter (linear) on the grid of crop_grid, in physical terms."""
    axes = canonical_axes(sitk_spacing_zyx(img))
    sitk_axes = [2 - axes[2], 2 - axes[1], 2 - axes[0]]     # (col, row, slice) as SimpleITK axis numbers
    direction = np.asarray(img.GetDirection()).reshape(3, 3)[:, sitk_axes]
    spacing, size = np.asarray(spacing_srs, float)[::-1], np.asarray(shape_srs)[::-1]
    origin = np.asarray(centre) - direction @ (spacing * (size - 1) / 2)
    out = sitk.Resample(img, [int(v) for v in size], sitk.Transform(), sitk.sitkLinear, tuple(origin), tuple(spacing),
                        tuple(direction.ravel()), float(default), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


@pytest.mark.parametrize("spacing_xyz, size_xyz", [((0.7, 0.9, 3.0), (40, 36, 14)), ((3.0, 0.7, 0.8), (14, 40, 36))],
                         ids=["axial", "sagittal"])
def test_crops_are_simpleitks_linear_resampling(spacing_xyz, size_xyz):
    """sample_linear gives SimpleITK's values on an oblique grid: inside, at the edges (clamped within half a
    voxel) and outside the image (the default), coarser and finer than the image, along a permuted slice axis."""
    rng = np.random.default_rng(0)
    img = sitk.GetImageFromArray(rng.normal(100, 40, size_xyz[::-1]).astype(np.int16))
    img.SetSpacing(spacing_xyz)
    img.SetOrigin((-12.0, 30.5, 7.25))
    img.SetDirection(rotation_direction(25, -15))
    voxels = sitk.GetArrayViewFromImage(img)
    for index_xyz in [(20.3, 17.6, 7.2), (1.1, 34.7, 0.4), (-3.0, 2.0, 13.9)]:     # centre, near and past the edges
        centre = img.TransformContinuousIndexToPhysicalPoint(index_xyz)
        for spacing_srs, shape_srs in [((3.0, 0.8, 0.8), (5, 24, 24)), ((6.1, 0.35, 1.3), (3, 31, 17))]:
            want = simpleitk_crop(img, centre, spacing_srs, shape_srs, -1024.0)
            got = sample_linear(voxels, crop_grid(img, centre, spacing_srs, shape_srs), -1024.0)
            assert got.shape == tuple(shape_srs) and got.dtype == np.float32
            np.testing.assert_allclose(got, want, atol=1e-3)
            assert (got == -1024).any() == (want == -1024).any()


def test_a_node_mask_piece_samples_like_the_whole_mask():
    """Sampling node k's small mask piece (with its offset in the volume) equals sampling (mask == k) whole."""
    image, mask, centre = sphere_case()
    arr = sitk.GetArrayViewFromImage(mask)
    box = tuple(slice(int(i.min()) - 2, int(i.max()) + 3) for i in np.nonzero(arr))
    piece = (arr[box] == 3).astype(np.uint8)
    for spacing_srs, shape_srs in [((3.0, 0.7, 0.7), (9, 40, 40)), ((6.0, 1.4, 1.4), (3, 30, 30))]:
        grid = crop_grid(mask, centre, spacing_srs, shape_srs)
        whole = sample_linear((arr == 3).astype(np.float32), grid)
        part = sample_linear(piece, grid, 0.0, arr.shape, tuple(s.start for s in box))
        np.testing.assert_allclose(part, whole, atol=1e-6)
        assert (whole >= 0.5).sum() > 100


def test_stored_crops_read_back_as_the_plans_normalization():
    """Crops are cached z-scored with the case's statistics; read back they are the plans' normalization: CT
    clipped and z-scored with the dataset's statistics (to float16 precision), z-score unchanged."""
    x = np.linspace(-1100.0, 2500.0, 101)
    mean, std = 40.0, 350.0
    stored = ((x - mean) / std).astype(np.float16)
    ct = ChannelNormalization(0, "CT", "CT", clip_low=-200.0, clip_high=300.0, mean=50.0, std=80.0)
    np.testing.assert_allclose(normalize_stored(stored, ct, mean, std), normalize(x, ct), atol=2e-2)
    mr = ChannelNormalization(0, "T2", "zscore")
    np.testing.assert_array_equal(normalize_stored(stored, mr, mean, std), stored.astype(np.float32))
    np.testing.assert_allclose(normalize_stored(stored, mr, mean, std), normalize(x, mr, mean, std), atol=1e-2)


def test_a_neighbourhood_of_one_value_still_stores_finite_crops():
    """A node neighbourhood of one value (std 0) would z-score every other voxel to +-inf in float16: the
    stored std is raised to the image's value range / 30000, and the crops read back right."""
    from lnm_auto.preprocessing.crops import case_nodes, case_statistics, cut_node_crops, intensity_samples
    from lnm_auto.preprocessing.normalization import normalize_node_crops
    image, mask, _ = sphere_case()
    arr = sitk.GetArrayFromImage(image)
    arr[:] = 40.0
    arr[:, :, :5] = -1000.0                   # air, outside the node neighbourhood but inside the crop
    plans = tiny_plans(roi=(16, 48, 48), spacing=(3.0, 1.4, 1.4))
    nodes = case_nodes(mask)
    mean, std = case_statistics(intensity_samples([arr], nodes.neighbourhood))
    assert std[0] <= 1e-8                     # the neighbourhood holds one value
    stored = cut_node_crops([arr], Grid.of(image), nodes, plans.scales, mean, std)
    assert np.isfinite(stored["image_global"]).all() and stored["intensity_std"][0] >= 1040.0 / 30000
    values = normalize_node_crops(stored, plans.normalization)["image_global"]
    want = normalize(np.clip(np.asarray(stored["image_global"], np.float32) * stored["intensity_std"][0] + 40.0,
                             -1000.0, 40.0), plans.normalization[0])
    np.testing.assert_allclose(values, want, atol=1e-2)
    assert (values == -2.0).any() and np.isclose(values, 0.8, atol=1e-2).any()   # air clipped, tissue kept


def test_crop_axes_are_canonical_for_sagittal_acquisition():
    # coarse axis along SimpleITK x: it must become the crop's first (slice) axis
    image, mask, _ = sphere_case(spacing_xyz=(3.0, 0.7, 0.7), size_xyz=(30, 96, 96),
                                 direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    plans = tiny_plans(roi=(10, 48, 48), spacing=(3.0, 0.7, 0.7))
    crop = preprocess_images([image], mask, plans)["mask_global"][0]
    # the sphere spans ~18 mm: ~6 slices at 3 mm, ~26 voxels at 0.7 mm
    extent = [np.ptp(np.nonzero(crop)[a]) + 1 for a in range(3)]
    assert 5 <= extent[0] <= 8 and 24 <= extent[1] <= 28 and 24 <= extent[2] <= 28


def test_ct_normalization_clips_and_uses_dataset_statistics():
    norm = ChannelNormalization(0, "CT", "CT", clip_low=-100.0, clip_high=200.0, mean=50.0, std=25.0)
    x = np.array([-1000.0, -100.0, 50.0, 200.0, 3000.0])
    np.testing.assert_allclose(normalize(x, norm), [-6.0, -6.0, 0.0, 6.0, 6.0])


def test_zscore_normalization_is_per_case():
    norm = ChannelNormalization(0, "T2", "zscore")
    x = np.array([10.0, 20.0, 30.0])
    np.testing.assert_allclose(normalize(x, norm, 20.0, 10.0), [-1.0, 0.0, 1.0])


def test_mri_crops_do_not_depend_on_intensity_scale():
    image, mask, _ = sphere_case()
    plans = tiny_plans(scheme="zscore")
    a = preprocess_images([image], mask, plans)["image_global"].astype(np.float32)
    b = preprocess_images([image * 3.0 + 500.0], mask, plans)["image_global"].astype(np.float32)
    np.testing.assert_allclose(a, b, atol=2e-2)


def planned_copy(planned_tiny, tmp_path):
    """A copy of the session's planned 8-case tiny dataset (raw/, pre/; file times kept) and its crops folder."""
    for part in ("raw", "pre"):
        shutil.copytree(planned_tiny(8) / part, tmp_path / part)
    return tmp_path / "raw" / "Dataset042_Tiny", crops_folder(tmp_path / "pre" / "Dataset042_Tiny", "LNMPlans")


def test_plan_and_preprocess_writes_everything_and_npz_round_trips(planned_tiny, tmp_path):
    from lnm_auto.planning.plan_and_preprocess import plan_and_preprocess
    from lnm_auto.plans.plans import Plans
    from lnm_auto.utils.io import load_json
    tiny_dataset, crops_dir = planned_copy(planned_tiny, tmp_path)     # what a first run wrote
    # re-running skips finished cases (files untouched) unless clean
    mtime = (crops_dir / "case_001.npz").stat().st_mtime_ns
    r = plan_and_preprocess("42", tiny_dataset.parent, tmp_path / "pre", planner="LNMPlannerCPU", progress=False)
    assert r.crops_dir == crops_dir and (r.crops_dir / "case_001.npz").stat().st_mtime_ns == mtime
    out = tmp_path / "pre" / "Dataset042_Tiny"
    for f in ("dataset.json", "dataset_fingerprint.json", "LNMPlans.json", "splits_final.json"):
        assert (out / f).is_file()
    plans = Plans.load(out / "LNMPlans.json")
    assert plans == r.plans
    fp = load_json(out / "dataset_fingerprint.json")
    assert len(fp["cases"]) == 8 and len(fp["nodes"]) == 20                 # 2 nodes in even cases, 3 in odd
    assert fp["label_counts"]["node"] == {"positive": 4, "negative": 16, "unknown": 0}   # node 1 of odd cases
    crops = load_case_crops(r.crops_dir / "case_001.npz")
    g = plans.scales["global"]
    assert crops["image_global"].shape == (3, 1, *g.cache_shape)
    assert crops["mask_local"].shape == (3, *plans.scales["local"].cache_shape)
    assert crops["node_ids"].tolist() == [1, 2, 3]
    assert crops["node_labels"].tolist() == [1, 0, 0]
    assert crops["stations"].tolist() == ["7", "4R", "4R"]
    assert crops["station_labels"].tolist() == [1, 0, 0]
    assert int(crops["patient_label"]) == 1 and str(crops["case_id"]) == "case_001"
    # the crop's centre voxel lies inside the node it is centred on
    s, r_, c = (np.array(g.cache_shape) - 1) // 2
    assert crops["mask_global"][:, s, r_, c].all()
    plan_and_preprocess("42", tiny_dataset.parent, tmp_path / "pre", planner="LNMPlannerCPU", progress=False, clean=True)
    assert (r.crops_dir / "case_001.npz").stat().st_mtime_ns != mtime


@pytest.mark.slow   # starts worker processes
def test_multiprocess_preprocessing_equals_single_process(planned_tiny, tmp_path):
    from lnm_auto.planning.plan_and_preprocess import plan_and_preprocess
    single = crops_folder(planned_tiny(8) / "pre" / "Dataset042_Tiny", "LNMPlans")     # planned in one process
    b = plan_and_preprocess(42, planned_tiny(8) / "raw", tmp_path / "b", planner="LNMPlannerCPU", progress=False,
                            num_processes=2)
    for case in ("case_000", "case_005"):
        x, y = load_case_crops(single / f"{case}.npz"), load_case_crops(b.crops_dir / f"{case}.npz")
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_changed_labels_redo_the_cache_without_clean(planned_tiny, tmp_path):
    import pandas as pd
    from lnm_auto.planning.plan_and_preprocess import plan_and_preprocess
    tiny_dataset, crops = planned_copy(planned_tiny, tmp_path)
    assert load_case_crops(crops / "case_000.npz")["node_labels"].tolist() == [0, 0]
    untouched = (crops / "case_002.npz").stat().st_mtime_ns
    df = pd.read_csv(tiny_dataset / "nodes.csv", dtype=str, keep_default_na=False)
    df.loc[(df.case == "case_000") & (df.node == "2"), "label"] = ""
    df.loc[(df.case == "case_000") & (df.node == "1"), "node"] = "1.0"     # same id, written as a float
    df.to_csv(tiny_dataset / "nodes.csv", index=False)
    r = plan_and_preprocess(42, tiny_dataset.parent, tmp_path / "pre", planner="LNMPlannerCPU", progress=False)
    assert load_case_crops(r.crops_dir / "case_000.npz")["node_labels"].tolist() == [0, -1]
    assert (r.crops_dir / "case_002.npz").stat().st_mtime_ns == untouched   # other cases are not redone


def test_a_rerun_reads_the_images_of_changed_cases_only(planned_tiny, tmp_path, monkeypatch):
    """Unchanged cases give the fingerprint their cached samples (the same numbers a read gives); a case whose
    image file changed is read, checked and cut again."""
    import os
    import lnm_auto.datasets.verify as verify
    from lnm_auto.planning.plan_and_preprocess import plan_and_preprocess
    from lnm_auto.utils.io import load_json
    tiny_dataset, crops = planned_copy(planned_tiny, tmp_path)
    fingerprint_file = tmp_path / "pre" / "Dataset042_Tiny" / "dataset_fingerprint.json"
    first = load_json(fingerprint_file)
    assert load_case_crops(crops / "case_003.npz")["intensity_samples"].shape[0] == 1    # (channels, samples)
    read = []
    original = verify.read_image_voxels
    monkeypatch.setattr(verify, "read_image_voxels", lambda path: read.append(path.name) or original(path))
    image = tiny_dataset / "imagesTr" / "case_003_0000.nii.gz"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10 ** 9))     # "changed"
    plan_and_preprocess(42, tiny_dataset.parent, tmp_path / "pre", planner="LNMPlannerCPU", progress=False)
    assert read == ["case_003_0000.nii.gz"]
    assert load_json(fingerprint_file) == first
    read.clear()
    plan_and_preprocess(42, tiny_dataset.parent, tmp_path / "pre", planner="LNMPlannerCPU", progress=False)
    assert read == []
    plan_and_preprocess(42, tiny_dataset.parent, tmp_path / "pre", planner="LNMPlannerCPU", progress=False, clean=True)
    assert len(read) == 8 and load_json(fingerprint_file) == first


def test_damaged_cache_is_redone(planned_tiny, tmp_path):
    from lnm_auto.planning.plan_and_preprocess import plan_and_preprocess
    tiny_dataset, crops = planned_copy(planned_tiny, tmp_path)
    (crops / "case_001.npz").write_bytes(b"PK\x03\x04 truncated")
    r = plan_and_preprocess(42, tiny_dataset.parent, tmp_path / "pre", planner="LNMPlannerCPU", progress=False)
    assert load_case_crops(r.crops_dir / "case_001.npz")["node_ids"].tolist() == [1, 2, 3]


def test_no_verify_with_malformed_table_is_one_line(tiny_dataset, tmp_path):
    text = (tiny_dataset / "nodes.csv").read_text().replace("case_000,1,", "case_000,one,", 1)
    (tiny_dataset / "nodes.csv").write_text(text)
    proc = run_cli("plan_and_preprocess", "-d", "42", "--no-verify",
                           "--raw", tiny_dataset.parent, "--preprocessed", tmp_path / "pre", "--quiet")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "nodes.csv: line 2: node id 'one' must be a positive integer" in proc.stderr   # checked even unverified


@pytest.mark.parametrize("spacing_xyz", [(1.0, 1.0, 1.0), (0.8, 0.8, 5.0)])
def test_short_axis_is_the_radiologists_on_the_largest_slice(spacing_xyz):
    """A 20 mm ball and a 24 x 12 x 18 mm ellipsoid (x, y, z semi-axes 12, 6, 9): short axis 20 / 12 mm within
    an in-plane voxel (second moments of all slices read about 10 % short), long axis from the 3D extent."""
    size = [int(60 / s) for s in spacing_xyz]
    zz, yy, xx = np.meshgrid(*[(np.arange(n) - n / 2 + 0.5) * s for n, s in zip(size[::-1], spacing_xyz[::-1])],
                             indexing="ij")
    ellipsoid = (((xx / 12) ** 2 + (yy / 6) ** 2 + (zz / 9) ** 2) <= 1).astype(np.uint8)
    for mask_arr, short, long in ((np.where((xx / 10) ** 2 + (yy / 10) ** 2 + (zz / 10) ** 2 <= 1, 1, 0), 20, 20),
                                  (ellipsoid, 12, 24)):
        img = sitk.GetImageFromArray(mask_arr.astype(np.uint8))
        img.SetSpacing(spacing_xyz)
        (node,) = measure_nodes(img)
        assert node.short_axis_mm == pytest.approx(short, abs=spacing_xyz[0] + 0.05)
        assert node.long_axis_mm == pytest.approx(long, rel=0.12)


def test_node_boxes_are_find_objects_of_the_whole_mask():
    """node_boxes searches only the box around all nodes: the same boxes as find_objects over every voxel."""
    from scipy import ndimage
    from lnm_auto.imaging.geometry import node_boxes
    rng = np.random.default_rng(1)
    for _ in range(300):
        shape = tuple(int(s) for s in rng.integers(1, 12, 3))
        mask = np.zeros(shape, rng.choice([np.uint8, np.uint16, np.uint32, np.int32]))
        for _ in range(rng.integers(0, 5)):
            mask[tuple(rng.integers(0, s) for s in shape)] = rng.integers(1, 7)
        assert node_boxes(mask) == ndimage.find_objects(mask)
    assert node_boxes(np.zeros((0, 3, 3), np.uint8)) == [] and node_boxes(np.zeros((3, 3, 3), np.uint8)) == []


def test_a_training_cache_reads_back_as_the_crops_inference_cuts(planned_tiny, tmp_path):
    """What training reads of a case (its cache through CropStore: the plans' normalization applied to the stored
    z-scores) is exactly what lnm_predict cuts of the same files."""
    from lnm_auto.datasets.raw_dataset import RawDataset, read_image, read_instance_mask
    from lnm_auto.plans.plans import Plans
    from lnm_auto.training.data import CropStore
    tiny_dataset, crops = planned_copy(planned_tiny, tmp_path)
    plans = Plans.load(crops.parent / "LNMPlans.json")
    assert plans.normalization[0].scheme == "CT"
    store = CropStore(crops, tuple(plans.scales), plans.normalization, crops_digest(plans.scales))
    store.unpack(["case_001"])
    case = RawDataset.load(tiny_dataset).case("case_001")
    cut = preprocess_images([read_image(f) for f in case.image_files], read_instance_mask(case.node_mask_file), plans)
    assert cut["node_ids"].tolist() == [1, 2, 3]
    for i in range(3):
        for scale in plans.scales:
            image, mask = store.node("case_001", i, scale)
            np.testing.assert_array_equal(image, cut[f"image_{scale}"][i])
            np.testing.assert_array_equal(mask, cut[f"mask_{scale}"][i])
            assert image.dtype == np.float32 and -10 < image.min() < image.max() < 10


def test_training_refuses_caches_cut_for_other_crop_scales(planned_tiny, tmp_path):
    """Caches re-cut for new scales next to an older plans file (a re-run that failed later) are refused, not
    trained on at the wrong spacing."""
    from lnm_auto.plans.plans import Plans
    from lnm_auto.training.data import CropStore
    from lnm_auto.utils.errors import LNMError
    _, crops = planned_copy(planned_tiny, tmp_path)
    plans = Plans.load(crops.parent / "LNMPlans.json")
    g = plans.scales["global"]
    other = {**plans.scales, "global": dataclasses.replace(g, spacing_mm=tuple(s * 1.1 for s in g.spacing_mm))}
    with pytest.raises(LNMError, match="other crop scales"):
        CropStore(crops, tuple(plans.scales), plans.normalization, crops_digest(other)).unpack(["case_000"])
    CropStore(crops, tuple(plans.scales), plans.normalization, crops_digest(plans.scales)).unpack(["case_000"])


@pytest.mark.parametrize("nudge", [-1e-12, 0.0, 1e-12])
def test_samples_on_the_volume_edge_or_a_mask_tie_do_not_flip_with_rounding_noise(nudge):
    """Geometry noise far below a voxel (the same scan read from DICOM and from NIfTI) leaves every sample as it
    is, even exactly on the volume's edge (inside: the edge voxel; past it: the default) or halfway between a
    mask voxel and background (the mask threshold's tie)."""
    from lnm_auto.imaging.geometry import CropGrid
    voxels = np.zeros((3, 4, 4), dtype=np.float32)
    voxels[:, :, 0] = 7.0
    voxels[1, 1, 2] = 1.0
    # column samples at -0.5 (the edge), 1.5 (a tie between columns 1 and 2) and -1.5 (outside)
    grid = CropGrid((0, 1, 2), (1.0, 1.0, -0.5 + nudge), (1.0, 1.0, 2.0), (1, 1, 2))
    np.testing.assert_array_equal(sample_linear(voxels, grid, -100.0), [[[7.0, 0.5]]])
    outside = CropGrid((0, 1, 2), (1.0, 1.0, -1.5 + nudge), (1.0, 1.0, 1.0), (1, 1, 1))
    np.testing.assert_array_equal(sample_linear(voxels, outside, -100.0), [[[-100.0]]])
