"""Every validation error, each provoked with a real broken file."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from lnm_auto.datasets.raw_dataset import RawDataset
from lnm_auto.datasets.verify import verify_dataset
from lnm_auto.planning.fingerprint import compute_fingerprint
from lnm_auto.planning.plan_and_preprocess import scan_dataset
from conftest import write_image, run_cli


def problems_of(root):
    """The problems verify_dataset reports, checked to be exactly those of the scan lnm_plan_and_preprocess runs
    (node masks, then images: each file read once), which then also returns the fingerprint that
    compute_fingerprint makes reading each case at once."""
    ds = RawDataset.load(root)
    problems = verify_dataset(ds, progress=False)
    scan = scan_dataset(ds, progress=False)
    one_pass, fingerprint = scan.problems, scan.fingerprint
    assert one_pass == problems
    assert (fingerprint is None) == bool(problems)
    if fingerprint is not None:
        assert json.dumps(fingerprint, sort_keys=True) == json.dumps(compute_fingerprint(ds, progress=False),
                                                                     sort_keys=True)
    return problems


def edit_csv(path, fn):
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    fn(df).to_csv(path, index=False)


def test_clean_dataset_has_no_problems(tiny_dataset):
    assert problems_of(tiny_dataset) == []


def test_missing_channel_file(tiny_dataset):
    (tiny_dataset / "imagesTr" / "case_002_0000.nii.gz").unlink()
    probs = problems_of(tiny_dataset)
    assert any("case_002_0000.nii.gz: file missing" in p for p in probs)


@pytest.mark.slow   # starts worker processes
def test_worker_processes_report_and_fingerprint_the_same(tiny_dataset):
    """Everything a worker hands back crosses the process boundary (no SimpleITK object in it): two processes
    give the single process's problems, and on a clean dataset its fingerprint."""
    ds = RawDataset.load(tiny_dataset)
    one, two = scan_dataset(ds, progress=False), scan_dataset(ds, num_processes=2, progress=False)
    assert two.problems == [] and json.dumps(two.fingerprint, sort_keys=True) == json.dumps(one.fingerprint,
                                                                                             sort_keys=True)
    (tiny_dataset / "imagesTr" / "case_002_0000.nii.gz").write_bytes(b"")
    problems = verify_dataset(ds, progress=False)
    assert problems and verify_dataset(ds, num_processes=2, progress=False) == problems
    assert scan_dataset(ds, num_processes=2, progress=False).problems == problems


def test_missing_second_channel(tmp_path):
    from conftest import write_tiny_dataset
    root = write_tiny_dataset(tmp_path / "raw", channel_names={"0": "T2", "1": "ADC"})
    (root / "imagesTr" / "case_001_0001.nii.gz").unlink()
    probs = problems_of(root)
    assert len(probs) == 1 and "case_001_0001.nii.gz: file missing" in probs[0]


def _rewrite_mask(root, case, **geometry):
    path = root / "nodesTr" / f"{case}.nii.gz"
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    if "shape" in geometry:
        arr = arr[: geometry.pop("shape")]
    write_image(arr, path, **geometry)
    return path


@pytest.mark.parametrize("geometry,word", [
    ({"shape": 8}, "size"),
    ({"spacing_xyz": (0.8, 0.8, 5.0)}, "spacing"),
    ({"origin": (40.5, 30.25, -110.0)}, "origin"),
    ({"direction": (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)}, "direction"),
])
def test_mask_geometry_mismatch(tiny_dataset, geometry, word):
    path = _rewrite_mask(tiny_dataset, "case_003", **geometry)
    probs = problems_of(tiny_dataset)
    assert any(str(path) in p and word in p for p in probs), probs


def test_tiny_origin_difference_is_tolerated(tiny_dataset):
    _rewrite_mask(tiny_dataset, "case_003", origin=(40.5 + 1e-5, 30.25, -120.0))
    assert problems_of(tiny_dataset) == []


def test_node_in_csv_absent_from_mask_and_vice_versa(tiny_dataset):
    edit_csv(tiny_dataset / "nodes.csv",
             lambda df: pd.concat([df, pd.DataFrame([{"case": "case_000", "node": "9", "station": "7", "label": "0"}])]))
    edit_csv(tiny_dataset / "nodes.csv", lambda df: df[~((df.case == "case_001") & (df.node == "2"))])
    probs = problems_of(tiny_dataset)
    assert any("node 9 of case 'case_000' does not occur in" in p for p in probs)
    assert any("case_001.nii.gz: node id 2 is not listed in" in p for p in probs)


def test_invalid_labels(tiny_dataset):
    edit_csv(tiny_dataset / "nodes.csv", lambda df: df.assign(label=df.label.where(df.index != 0, "2")))
    edit_csv(tiny_dataset / "patients.csv", lambda df: df.assign(label=df.label.where(df.index != 1, "yes")))
    probs = problems_of(tiny_dataset)
    assert any("nodes.csv: line 2: label '2' is not 1, 0 or empty" in p for p in probs)
    assert any("patients.csv: line 3: label 'yes'" in p for p in probs)


def test_empty_label_is_fine(tiny_dataset):
    edit_csv(tiny_dataset / "nodes.csv", lambda df: df.assign(label=""))
    assert problems_of(tiny_dataset) == []


def test_station_label_inconsistent_with_nodes(tiny_dataset):
    edit_csv(tiny_dataset / "stations.csv",
             lambda df: df.assign(label=df.label.where(~((df.case == "case_001") & (df.station == "7")), "0")))
    probs = problems_of(tiny_dataset)
    assert any("station '7' of case 'case_001' is labelled 0 but holds a node labelled 1" in p for p in probs)


def test_nan_voxels(tmp_path):
    # NRRD keeps NaN (SimpleITK's NIfTI reader does not), and shows any SimpleITK ending works
    from conftest import write_tiny_dataset
    tiny_dataset = write_tiny_dataset(tmp_path / "raw", file_ending=".nrrd")
    assert problems_of(tiny_dataset) == []
    path = tiny_dataset / "imagesTr" / "case_004_0000.nrrd"
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    arr[0, 0, :3] = np.nan
    arr[1, 1, 1] = np.inf
    write_image(arr, path)
    probs = problems_of(tiny_dataset)
    assert any(str(path) in p and "4 NaN/Inf voxel(s)" in p for p in probs)


def test_empty_dataset(tmp_path):
    root = tmp_path / "Dataset005_Empty"
    (root / "imagesTr").mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}))
    probs = problems_of(root)
    assert len(probs) == 1 and "no training cases found" in probs[0]


def test_duplicate_and_unsafe_case_ids(tiny_dataset):
    for src, dst in [("case_000", "CASE_000"), ("case_001", "bad case")]:
        for folder, suffix in (("imagesTr", "_0000.nii.gz"), ("nodesTr", ".nii.gz")):
            (tiny_dataset / folder / f"{src}{suffix}").rename(tiny_dataset / folder / f"{dst}{suffix}")
    edit_csv(tiny_dataset / "nodes.csv", lambda df: df.assign(case=df.case.replace({"case_000": "CASE_000", "case_001": "bad case"})))
    edit_csv(tiny_dataset / "patients.csv", lambda df: pd.concat([df, df.iloc[[2]]]))
    probs = problems_of(tiny_dataset)
    assert any("case id 'bad case' is not a safe file name" in p for p in probs)
    assert any("case 'case_002' is listed more than once" in p for p in probs)


def test_case_ids_differing_in_case_only(tiny_dataset):
    for folder, suffix in (("imagesTr", "_0000.nii.gz"), ("nodesTr", ".nii.gz")):
        src = tiny_dataset / folder / f"case_000{suffix}"
        (tiny_dataset / folder / f"Case_000{suffix}").write_bytes(src.read_bytes())
    probs = problems_of(tiny_dataset)
    assert any("'Case_000' and 'case_000' differ only in upper/lower case" in p for p in probs), probs


def test_every_problem_reported_and_cli_exits_nonzero_without_traceback(tiny_dataset, tmp_path):
    (tiny_dataset / "imagesTr" / "case_002_0000.nii.gz").unlink()
    _rewrite_mask(tiny_dataset, "case_003", spacing_xyz=(0.8, 0.8, 5.0))
    edit_csv(tiny_dataset / "nodes.csv", lambda df: df.assign(label=df.label.where(df.index != 0, "x")))
    proc = run_cli("plan_and_preprocess", "-d", "42",
                           "--raw", tiny_dataset.parent, "--preprocessed", tmp_path / "pre", "--quiet")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("lnm_plan_and_preprocess: error:")]
    assert any("case_002_0000.nii.gz: file missing" in l for l in lines)
    assert any("case_003.nii.gz" in l and "spacing" in l for l in lines)
    assert any("label 'x'" in l for l in lines)
    assert not (tmp_path / "pre").exists() or not any((tmp_path / "pre").rglob("*.npz"))


def test_missing_dataset_json_and_bad_json(tmp_path):
    from lnm_auto.utils.errors import LNMError
    root = tmp_path / "Dataset006_X"
    root.mkdir()
    with pytest.raises(LNMError, match="dataset.json: missing"):
        RawDataset.load(root)
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(LNMError, match="not valid JSON"):
        RawDataset.load(root)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}}))
    with pytest.raises(LNMError, match="'file_ending' is missing"):
        RawDataset.load(root)


def test_mask_that_is_not_3d_is_reported(tiny_dataset):
    path = tiny_dataset / "nodesTr" / "case_001.nii.gz"
    img = sitk.GetImageFromArray(np.zeros((48, 48), np.uint8))
    sitk.WriteImage(img, str(path))
    probs = problems_of(tiny_dataset)
    assert any(str(path) in p and "must be a 3D single-component image" in p for p in probs)
