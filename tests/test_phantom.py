"""The synthetic phantom (lnm_auto/datasets/phantom/): layout, geometry, labels, determinism, realism.

Small grids keep these fast; only the separability check runs the default 40-case dataset (~15 s)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from lnm_auto.datasets.phantom import (STATION_NAMES, PhantomConfig, generate_case, make_phantom_dataset,
                                       node_features)
from lnm_auto.datasets.phantom.labels import labeled_cases
from lnm_auto.datasets.raw_dataset import RawDataset
from lnm_auto.datasets.verify import verify_dataset
from lnm_auto.utils.errors import LNMError

SMALL = dict(shape_xyz=(80, 64, 12), spacing_xyz_mm=(2.8, 2.8, 5.0))       # whole torso, 61k voxels
N_TR, N_TS = 6, 2


def _arr(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"case": str, "station": str, "label": str}, keep_default_na=False)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("phantom") / "raw"
    cfg = PhantomConfig(n_cases=N_TR, n_test_cases=N_TS, labeled_fraction=0.5, seed=3, oblique_deg=0.0, **SMALL)
    return make_phantom_dataset(raw, 998, "TestPhantom", cfg)


# ---- layout -----------------------------------------------------------------------------------------
def test_layout_and_dataset_json(small):
    assert small.name == "Dataset998_TestPhantom"
    meta = json.loads((small / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["file_ending"] == ".nii.gz"
    assert meta["numTraining"] == N_TR
    assert meta["phantom_config"]["shape_xyz"] == list(SMALL["shape_xyz"])
    assert meta["name"] and meta["description"] and meta["reference"]
    tr = sorted(p.name for p in (small / "imagesTr").iterdir())
    assert tr == [f"phantom_{i:03d}_0000.nii.gz" for i in range(N_TR)]
    assert sorted(p.name for p in (small / "nodesTr").iterdir()) == [f"phantom_{i:03d}.nii.gz" for i in range(N_TR)]
    ts = sorted(p.name for p in (small / "imagesTs").iterdir())
    assert ts == [f"phantom_{i:03d}_0000.nii.gz" for i in range(N_TR, N_TR + N_TS)]
    for f in ("nodes.csv", "stations.csv", "patients.csv", "truth_nodes.csv", "nodesTs.csv", "stationsTs.csv",
              "patientsTs.csv"):
        assert (small / f).is_file(), f
    assert not [p for p in small.parent.iterdir() if p.name.startswith(".")]      # no temp folders left
    assert verify_dataset(RawDataset.load(small), progress=False) == []


def test_geometry_identical_and_non_trivial(small):
    for split, n0, n in (("Tr", 0, N_TR), ("Ts", N_TR, N_TS)):
        for i in range(n0, n0 + n):
            img = sitk.ReadImage(str(small / f"images{split}" / f"phantom_{i:03d}_0000.nii.gz"))
            msk = sitk.ReadImage(str(small / f"nodes{split}" / f"phantom_{i:03d}.nii.gz"))
            assert img.GetSize() == msk.GetSize() == SMALL["shape_xyz"]
            assert np.allclose(img.GetSpacing(), SMALL["spacing_xyz_mm"]) and img.GetSpacing() == msk.GetSpacing()
            assert img.GetOrigin() == msk.GetOrigin() and np.abs(img.GetOrigin()).min() > 1.0
            assert img.GetDirection() == msk.GetDirection()
            assert np.allclose(img.GetDirection(), (-1, 0, 0, 0, -1, 0, 0, 0, 1))           # LPS flip, not identity
            assert img.GetPixelID() == sitk.sitkInt16
            assert msk.GetPixelID() in (sitk.sitkUInt8, sitk.sitkUInt16)


def test_oblique_direction_and_anatomy_in_body_frame():
    """Stations are placed in the patient frame: right-sided stations at negative LPS x, upper stations
    above the subcarinal ones, for an axis-aligned and a rotated grid alike."""
    for deg in (0.0, 30.0):
        cfg = PhantomConfig(oblique_deg=deg, seed=1, **SMALL)
        t = np.deg2rad(deg)
        rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
        for i in range(4):
            case = generate_case(i, cfg)
            img, msk = case.image, case.mask
            assert np.allclose(np.reshape(img.GetDirection(), (3, 3)), rot @ np.diag([-1.0, -1.0, 1.0]))
            assert msk.GetDirection() == img.GetDirection() and msk.GetOrigin() == img.GetOrigin()
            centre = np.array(img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()]))
            m = sitk.GetArrayFromImage(msk)
            hu = sitk.GetArrayFromImage(img)
            pos = {}
            for n in case.nodes:
                zyx = np.array(ndi.center_of_mass(m == n.node))
                pos[n.node] = np.array(img.TransformContinuousIndexToPhysicalPoint(zyx[::-1].tolist())) - centre
                assert hu[m == n.node].mean() > -400                   # a node is soft tissue, not air or lung
            for n in case.nodes:
                if n.station in ("1R", "10R"):
                    assert pos[n.node][0] < 0, (deg, i, n)
                if n.station in ("1L", "10L"):
                    assert pos[n.node][0] > 0, (deg, i, n)
            upper = [pos[n.node][2] for n in case.nodes if n.station in ("1R", "1L", "2R", "2L")]
            lower = [pos[n.node][2] for n in case.nodes if n.station in ("7", "8")]
            if upper and lower:
                assert min(upper) > max(lower)


# ---- labels -----------------------------------------------------------------------------------------
def test_node_ids_match_masks(small):
    for table, split, cases in (("truth_nodes.csv", "Tr", range(N_TR)), ("nodes.csv", "Tr", range(N_TR)),
                                ("nodesTs.csv", "Ts", range(N_TR, N_TR + N_TS))):
        df = _csv(small / table)
        for i in cases:
            case = f"phantom_{i:03d}"
            ids = set(np.unique(_arr(small / f"nodes{split}" / f"{case}.nii.gz")).tolist()) - {0}
            listed = df.loc[df.case == case, "node"].astype(int).tolist()
            assert sorted(listed) == sorted(ids) and len(listed) == len(set(listed))
            assert 3 <= len(ids) <= 12
            assert set(df.loc[df.case == case, "station"]) <= set(STATION_NAMES)


def test_station_and_patient_labels_are_max_of_node_truth(small):
    for nodes_f, st_f, pat_f in (("truth_nodes.csv", "stations.csv", "patients.csv"),
                                 ("nodesTs.csv", "stationsTs.csv", "patientsTs.csv")):
        nodes, st, pat = _csv(small / nodes_f), _csv(small / st_f), _csv(small / pat_f)
        assert set(nodes.label) <= {"0", "1"} and set(st.label) <= {"0", "1"} and set(pat.label) <= {"0", "1"}
        nodes["y"] = nodes.label.astype(int)
        expect_st = nodes.groupby(["case", "station"]).y.max()
        got_st = st.assign(y=st.label.astype(int)).set_index(["case", "station"]).y
        assert got_st.sort_index().equals(expect_st.sort_index())
        expect_pat = nodes.groupby("case").y.max()
        got_pat = pat.assign(y=pat.label.astype(int)).set_index("case").y
        assert got_pat.sort_index().equals(expect_pat.sort_index())


def test_labeled_fraction_hides_whole_cases(small):
    nodes, truth = _csv(small / "nodes.csv"), _csv(small / "truth_nodes.csv")
    assert nodes[["case", "node", "station"]].equals(truth[["case", "node", "station"]])
    shown = nodes.groupby("case").label.apply(lambda s: set(s))
    hidden = [c for c, labels in shown.items() if labels == {""}]
    kept = [c for c, labels in shown.items() if "" not in labels]
    assert len(hidden) == N_TR - 3 and len(kept) == 3                   # 0.5 of 6 cases keep node labels
    kept_rows = nodes.case.isin(kept)
    assert nodes.loc[kept_rows, "label"].equals(truth.loc[kept_rows, "label"])
    assert set(_csv(small / "stations.csv").case) == set(nodes.case)    # station labels for every case
    assert "" not in set(_csv(small / "nodesTs.csv").label)             # test references fully labelled


@pytest.mark.parametrize("fraction,expected", [(0.0, 0), (0.25, 2), (1.0, 7), (0.01, 1)])
def test_labeled_fraction_counts(tmp_path, fraction, expected):
    cfg = PhantomConfig(n_cases=7, labeled_fraction=fraction, shape_xyz=(40, 32, 4), spacing_xyz_mm=(5.6, 5.6, 10.0))
    assert len(labeled_cases(cfg)) == expected
    if fraction == 0.25:   # one written dataset shows nodes.csv follows the rule (writing one costs seconds)
        root = make_phantom_dataset(tmp_path, 1, "F", cfg)
        nodes = _csv(root / "nodes.csv")
        assert nodes.groupby("case").label.apply(lambda s: "" not in set(s)).sum() == expected
        assert {int(c.split("_")[-1]) for c, s in nodes.groupby("case").label if "" not in set(s)} == labeled_cases(cfg)


# ---- determinism, overwrite, errors -------------------------------------------------------------------
def test_deterministic_per_seed_and_case():
    cfg = PhantomConfig(seed=5, **SMALL)
    a, b = generate_case(2, cfg), generate_case(2, cfg)
    assert np.array_equal(sitk.GetArrayFromImage(a.image), sitk.GetArrayFromImage(b.image))
    assert np.array_equal(sitk.GetArrayFromImage(a.mask), sitk.GetArrayFromImage(b.mask))
    assert a.image.GetOrigin() == b.image.GetOrigin()
    c = generate_case(2, PhantomConfig(seed=6, **SMALL))
    assert not np.array_equal(sitk.GetArrayFromImage(a.image), sitk.GetArrayFromImage(c.image))
    d = generate_case(3, cfg)
    assert not np.array_equal(sitk.GetArrayFromImage(a.image), sitk.GetArrayFromImage(d.image))


def test_rewrite_is_byte_identical_and_replaces_cleanly(small, tmp_path):
    cfg = PhantomConfig(n_cases=N_TR, n_test_cases=N_TS, labeled_fraction=0.5, seed=3, **SMALL)
    again = make_phantom_dataset(tmp_path, 998, "TestPhantom", cfg)
    for f in ("imagesTr/phantom_001_0000.nii.gz", "nodesTr/phantom_001.nii.gz", "imagesTs/phantom_007_0000.nii.gz"):
        assert np.array_equal(_arr(small / f), _arr(again / f))
    for f in ("nodes.csv", "truth_nodes.csv", "stations.csv", "patients.csv", "nodesTs.csv"):
        assert (small / f).read_bytes() == (again / f).read_bytes()
    (again / "imagesTr" / "stale_0000.nii.gz").write_bytes(b"x")
    smaller = make_phantom_dataset(tmp_path, 998, "TestPhantom",
                                   PhantomConfig(n_cases=2, shape_xyz=(40, 32, 4), spacing_xyz_mm=(5.6, 5.6, 10.0)))
    assert sorted(p.name for p in (smaller / "imagesTr").iterdir()) == ["phantom_000_0000.nii.gz",
                                                                        "phantom_001_0000.nii.gz"]
    assert not (smaller / "imagesTs").exists() and not (smaller / "nodesTs.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset998_TestPhantom"]


def test_refuses_to_overwrite_real_data_and_bad_config(tmp_path):
    real = tmp_path / "Dataset010_Real"
    real.mkdir()
    (real / "dataset.json").write_text(json.dumps({"name": "Real", "channel_names": {"0": "CT"}}))
    tiny = dict(shape_xyz=(40, 32, 4), spacing_xyz_mm=(5.6, 5.6, 10.0))
    with pytest.raises(LNMError, match="not a phantom"):
        make_phantom_dataset(tmp_path, 10, "Real", PhantomConfig(n_cases=1, **tiny))
    with pytest.raises(LNMError, match="id 010"):
        make_phantom_dataset(tmp_path, 10, "Other", PhantomConfig(n_cases=1, **tiny))
    assert (real / "dataset.json").is_file()
    for bad in (dict(modality="PET"), dict(labeled_fraction=1.5), dict(difficulty=-0.1), dict(n_cases=0),
                dict(shape_xyz=(8, 8, 2)), dict(spacing_xyz_mm=(0.0, 1.0, 1.0))):
        with pytest.raises(LNMError):
            make_phantom_dataset(tmp_path, 11, "Bad", PhantomConfig(**{**tiny, **bad}))


# ---- realism --------------------------------------------------------------------------------------------
def test_ct_hu_ranges_and_noise():
    """Fat, muscle, air, contrast vessels and noise in the ranges of real chest CT (documentation/phantom.md)."""
    cfg = PhantomConfig(shape_xyz=(112, 88, 10), spacing_xyz_mm=(2.0, 2.0, 5.0), seed=2)
    for i in range(2):
        hu = sitk.GetArrayFromImage(generate_case(i, cfg).image).astype(np.float32)
        assert hu.min() >= -1024 and hu.max() <= 3071
        body = np.stack([ndi.binary_fill_holes(s) for s in hu > -500])     # per slice: keeps the lungs
        assert 0.2 < body.mean() < 0.9
        outside = hu[~ndi.binary_dilation(body, iterations=2)]
        assert -1010 < outside.mean() < -970
        fat = ndi.binary_erosion(body & (hu >= -190) & (hu <= -30))
        muscle = ndi.binary_erosion(body & (hu >= -29) & (hu <= 150))
        assert -120 < hu[fat].mean() < -80 and 8 < hu[fat].std() < 30
        assert 30 < hu[muscle].mean() < 65 and 8 < hu[muscle].std() < 35
        assert np.percentile(hu[body], 99.5) > 150                      # contrast vessels / bone
        assert (hu[body] < -700).mean() > 0.05                           # aerated lung
        resid = hu - ndi.uniform_filter(hu, (1, 3, 3))
        interior = ndi.binary_erosion(fat, iterations=2)
        assert 4 < resid[interior].std() < 25                            # image noise


def test_node_sizes_and_prevalence():
    cfg = PhantomConfig(**SMALL)
    nodes = [n for i in range(12) for n in generate_case(i, cfg).nodes]
    short = np.array([n.short_axis_mm for n in nodes])
    labels = np.array([n.label for n in nodes])
    assert np.mean((short >= 3.5) & (short <= 20)) > 0.9 and np.median(short) > 4.5
    assert 0.1 < labels.mean() < 0.45
    assert short[labels == 1].mean() > short[labels == 0].mean()
    assert all(n.n_voxels > 0 for n in nodes)


def test_mri_mode():
    cfg = PhantomConfig(modality="MRI", n_cases=2, **SMALL)
    case = generate_case(0, cfg)
    arr = sitk.GetArrayFromImage(case.image)
    assert arr.dtype == np.float32 and np.isfinite(arr).all() and arr.min() > 0
    ct = sitk.GetArrayFromImage(generate_case(0, PhantomConfig(**SMALL)).image)
    assert np.array_equal(sitk.GetArrayFromImage(case.mask),
                          sitk.GetArrayFromImage(generate_case(0, PhantomConfig(**SMALL)).mask))   # same anatomy
    assert not np.array_equal(arr, ct)


def test_mri_dataset_channel_name(tmp_path):
    root = make_phantom_dataset(tmp_path, 3, "MR", PhantomConfig(modality="MRI", n_cases=2, **SMALL))
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T2"}
    img = sitk.ReadImage(str(root / "imagesTr" / "phantom_000_0000.nii.gz"))
    assert img.GetPixelID() == sitk.sitkFloat32 and sitk.GetArrayViewFromImage(img).min() > 0
    assert verify_dataset(RawDataset.load(root), progress=False) == []


def test_default_spacing_small_grid_does_not_break(tmp_path):
    cfg = PhantomConfig(n_cases=2, shape_xyz=(64, 64, 12))             # the body is scaled to a tiny field of view
    root = make_phantom_dataset(tmp_path, 4, "Tiny", cfg)
    assert verify_dataset(RawDataset.load(root), progress=False) == []
    assert len(_csv(root / "nodes.csv")) >= 2 * 3


def test_shape_flag_of_the_command(tmp_path):
    from conftest import run_cli
    out = run_cli("make_phantom", "-d", "5", "--cases", "2", "--test-cases", "0", "--shape", "64", "48", "10",
                  "--raw", tmp_path)
    assert out.returncode == 0, out.stderr
    assert sitk.ReadImage(str(next((tmp_path / "Dataset005_Phantom" / "imagesTr").iterdir()))).GetSize() == (64, 48, 10)
    bad = run_cli("make_phantom", "-d", "6", "--cases", "2", "--shape", "64", "48", "2", "--raw", tmp_path)
    assert bad.returncode != 0 and "at least (32, 32, 4)" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_default_dataset_separability():
    """Default 40 cases at difficulty 0.5: size alone must not solve it (AUROC < 0.9), a simple combination of
    size and intensity features must be clearly informative (> 0.7). Measured: 0.80 and 0.82-0.84."""
    from sklearn.metrics import roc_auc_score

    t0 = time.time()
    rows = np.array([r[1:] for i in range(40) for r in node_features(generate_case(i, PhantomConfig()))], float)
    y, vol, p90, sd = rows.T
    z = lambda x: (x - x.mean()) / x.std()                               # noqa: E731
    auc_size = roc_auc_score(y, vol)
    auc_combo = roc_auc_score(y, z(np.log(vol)) + z(p90) + z(sd))
    print(f"size-only AUROC {auc_size:.3f}, combination AUROC {auc_combo:.3f}, {time.time() - t0:.1f} s")
    assert 0.15 < y.mean() < 0.35
    assert 0.6 < auc_size < 0.9
    assert auc_combo > 0.75 and auc_combo > auc_size


def test_texture_separation_sets_the_image_signal_and_leaves_size_alone():
    """Same seed and difficulty: the image pattern separates the classes far more at texture_separation 0.9
    than at 0.1, while size separates them as much; None keeps the default phantom bit for bit."""
    from sklearn.metrics import roc_auc_score

    def features(texture):
        cfg = PhantomConfig(difficulty=0.6, texture_separation=texture, **SMALL)
        return np.array([r[1:] for i in range(10) for r in node_features(generate_case(i, cfg))], float)

    low, high = features(0.1), features(0.9)
    size = {name: roc_auc_score(f[:, 0], f[:, 1]) for name, f in (("low", low), ("high", high))}
    image = {name: roc_auc_score(f[:, 0], f[:, 2]) for name, f in (("low", low), ("high", high))}
    assert abs(size["high"] - size["low"]) < 0.1, size                 # voxel count: the size signal
    assert image["high"] > image["low"] + 0.1, image                   # 90th-percentile HU: the image signal
    default = sitk.GetArrayFromImage(generate_case(0, PhantomConfig(difficulty=0.6, **SMALL)).image)
    explicit = sitk.GetArrayFromImage(generate_case(0, PhantomConfig(difficulty=0.6, texture_separation=None,
                                                                     **SMALL)).image)
    assert np.array_equal(default, explicit)


# ---- real geometry --------------------------------------------------------------------------------------
REAL = Path(os.environ.get("LNM_PYRADIOMICS_DATA", "/tmp/pyradiomics_data"))


def test_real_ct_geometry_smoke():
    """The pyradiomics sample chest CT (benchmarks/get_pyradiomics_data.sh) reads as HU with a lesion mask on
    the image grid - the real data the phantom is calibrated against."""
    image_f, label_f = REAL / "lung1_image.nrrd", REAL / "lung1_label.nrrd"
    if not (image_f.is_file() and label_f.is_file()):
        pytest.skip(f"pyradiomics sample CT not found in {REAL} (set LNM_PYRADIOMICS_DATA)")
    img, lab = sitk.ReadImage(str(image_f)), sitk.ReadImage(str(label_f))
    hu = sitk.GetArrayViewFromImage(img)
    assert -1100 <= hu.min() < -900 and 200 < hu.max() <= 4000
    assert -1024 <= float(np.median(hu)) < 100                           # air, lung and body, in HU
    assert img.GetSize() == lab.GetSize()
    assert np.allclose(img.GetSpacing(), lab.GetSpacing()) and np.allclose(img.GetOrigin(), lab.GetOrigin())
    assert np.allclose(img.GetDirection(), lab.GetDirection())
    assert img.GetSpacing()[2] > 2 * img.GetSpacing()[0]                  # anisotropic like the phantom
    lesion = sitk.GetArrayViewFromImage(lab) > 0
    assert lesion.sum() > 100 and -200 < float(hu[lesion].mean()) < 200


def test_phantom_written_by_two_processes_is_byte_identical(tmp_path):
    """A case depends only on its index: two worker processes write exactly the files one process writes."""
    import hashlib

    from lnm_auto.datasets.phantom import PhantomConfig, make_phantom_dataset

    def tree(root):
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    config = PhantomConfig(n_cases=5, n_test_cases=2, labeled_fraction=0.6, shape_xyz=(64, 64, 12))
    one = tree(make_phantom_dataset(tmp_path / "one", 5, "P", config))
    two = tree(make_phantom_dataset(tmp_path / "two", 5, "P", config, num_processes=2))
    assert sum(k.endswith(".nii.gz") for k in one) == 14      # 7 images + 7 node masks
    assert one == two
