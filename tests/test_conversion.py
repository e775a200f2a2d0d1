"""Binary masks -> node instances, --split_components, and the lnm_convert converters, on real files:
NIfTI written with SimpleITK, DICOM CT / SEG / RTSTRUCT written with pydicom and highdicom."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from conftest import write_image
from dicom_builders import NODES, write_dicom_case, write_nnunet_dataset
from lnm_auto.cli import plan_and_preprocess_entry, plan_and_preprocess_parser
from lnm_auto.cli.convert_commands import convert_entry
from lnm_auto.imaging.components import (DEFAULT_MIN_VOLUME_MM3, as_instance_mask, needs_splitting, nodes_skeleton,
                                         split_binary_mask, split_components)
from lnm_auto.datasets.raw_dataset import RawDataset
from lnm_auto.datasets.verify import verify_dataset


def _image(arr, spacing=(0.8, 0.8, 2.0), origin=(10.0, -5.0, 30.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def _three_nodes_and_a_speck():
    arr = np.zeros((12, 30, 30), np.uint8)
    arr[1:4, 2:8, 2:8] = 1            # 108 voxels, inferior
    arr[4, 8, 8] = 1                  # touches the first node only by a corner: 26-connected, same node
    arr[8:11, 20:26, 3:7] = 1         # 72 voxels, superior, patient right (small x)
    arr[8:11, 20:25, 20:25] = 1       # 75 voxels, superior, patient left
    arr[6, 15, 15] = 1                # 1 voxel = 1.28 mm^3: a speck below the minimum volume
    return arr


def test_split_binary_mask_components_volumes_order_and_geometry():
    mask = _image(_three_nodes_and_a_speck())
    instances, n = split_binary_mask(mask)
    assert n == 3
    out = sitk.GetArrayFromImage(instances)
    assert (instances.GetSize(), instances.GetSpacing(), instances.GetOrigin(), instances.GetDirection()) == \
           (mask.GetSize(), mask.GetSpacing(), mask.GetOrigin(), mask.GetDirection())
    # superior first (largest z), then patient right (smallest LPS x); the corner voxel joins node 3
    assert [int((out == k).sum()) for k in (1, 2, 3)] == [72, 75, 109]
    assert out[9, 22, 4] == 1 and out[9, 22, 22] == 2 and out[4, 8, 8] == 3 and out[6, 15, 15] == 0
    split = split_components(mask)
    assert split.n_removed == 1 and split.source_values == [1, 1, 1]
    assert split.volumes_mm3 == pytest.approx([72 * 1.28, 75 * 1.28, 109 * 1.28])
    # the speck is kept when the minimum volume is below one voxel
    assert split_binary_mask(mask, min_volume_mm3=1.0)[1] == 4


def test_numbering_follows_physical_position_not_storage_order():
    arr = _three_nodes_and_a_speck()
    mask = _image(arr)
    flipped = _image(arr[::-1, :, ::-1].copy(), origin=mask.TransformIndexToPhysicalPoint((29, 0, 11)),
                     direction=(-1, 0, 0, 0, 1, 0, 0, 0, -1))   # same voxels in space, stored mirrored
    a, b = split_binary_mask(mask)[0], split_binary_mask(flipped)[0]
    resampled = sitk.Resample(b, a, sitk.Transform(), sitk.sitkNearestNeighbor)
    assert np.array_equal(sitk.GetArrayFromImage(resampled), sitk.GetArrayFromImage(a))


def test_needs_splitting_binary_semantic_and_instance_masks():
    binary = _three_nodes_and_a_speck()
    assert needs_splitting(_image(binary)) == (1, 3)
    instances = sitk.GetArrayFromImage(split_binary_mask(_image(binary))[0])
    assert needs_splitting(_image(instances)) is None
    semantic = binary.copy()
    semantic[8:11, 20:26, 3:7] = 2                       # label 1 = two nodes, label 2 = one node
    assert needs_splitting(_image(semantic)) == (2, 3)
    split = split_components(_image(semantic))
    assert sorted(split.source_values) == [1, 1, 2]
    fragment = instances.copy()
    fragment[0, 28, 20:28] = 2                           # node 2 of 3 has a detached 10 mm^3 piece: still instances
    assert needs_splitting(_image(fragment)) is None
    assert needs_splitting(_image(np.zeros((4, 5, 6), np.uint8))) is None


def test_as_instance_mask_for_prediction():
    binary = _image(_three_nodes_and_a_speck())
    instances, line = as_instance_mask(binary, "in/pt0_nodes.nii.gz")
    assert line == ("in/pt0_nodes.nii.gz: binary node mask (label value(s) [1]) split into 3 node(s) "
                    "(26-connected components; 1 smaller than 10 mm^3 removed)")
    assert np.array_equal(sitk.GetArrayFromImage(instances), sitk.GetArrayFromImage(split_binary_mask(binary)[0]))
    same, none = as_instance_mask(instances, "x")
    assert same is instances and none is None


def test_nodes_skeleton_rows():
    table = nodes_skeleton({"a": 2, "b": 0, "c": 1})
    assert list(table.columns) == ["case", "node", "station", "label"]
    assert table[["case", "node"]].values.tolist() == [["a", 1], ["a", 2], ["c", 1]]
    assert (table["label"] == "").all() and (table["station"] == "").all()


def test_split_components_flag_default_matches_the_documented_minimum():
    args = plan_and_preprocess_parser().parse_args(["-d", "1", "--split_components"])
    assert args.split_components == DEFAULT_MIN_VOLUME_MM3
    assert plan_and_preprocess_parser().parse_args(["-d", "1"]).split_components is None


def _binarise(root):
    """Turn the tiny dataset's instance masks into binary masks with one nodes.csv row per case; returns the
    components per case as SimpleITK counts them (its nodes 2 and 3 touch, so a binary mask has 2 nodes)."""
    counts = {}
    for f in sorted((root / "nodesTr").glob("*.nii.gz")):
        binary = sitk.ReadImage(str(f)) > 0
        counts[f.name[:-7]] = int(sitk.GetArrayFromImage(sitk.ConnectedComponent(binary, True)).max())
        write_image(sitk.GetArrayFromImage(binary).astype(np.uint8), f)
    assert set(counts.values()) == {2}
    rows = [{"case": c, "node": 1, "station": "", "label": ""} for c in counts]
    pd.DataFrame(rows).to_csv(root / "nodes.csv", index=False)
    return counts


def test_verification_names_binary_masks(tiny_dataset):
    _binarise(tiny_dataset)
    problems = verify_dataset(RawDataset.load(tiny_dataset), progress=False)
    binary = [p for p in problems if "binary node mask" in p]
    assert len(binary) == 6, problems                # all 6 masks: 1 label, 2 components
    assert str(tiny_dataset / "nodesTr" / "case_001.nii.gz") in binary[1]
    assert "1 label value(s) but 2 separate" in binary[1] and "--split_components" in binary[1]


def test_plan_and_preprocess_split_components_in_place(tiny_dataset, tmp_path, capsys):
    counts = _binarise(tiny_dataset)
    originals = {f.name: f.read_bytes() for f in (tiny_dataset / "nodesTr").iterdir()}
    pre = tmp_path / "pre"
    argv = ["-d", "42", "--raw", str(tiny_dataset.parent), "--preprocessed", str(pre), "-np", "1", "--quiet"]
    assert plan_and_preprocess_entry(argv + ["--split_components", "--no_pp"]) == 0    # verification passed
    out = capsys.readouterr().out
    assert "case_001: nodesTr/case_001.nii.gz had label value(s) [1] -> 2 node(s)" in out
    assert "nodes.csv: 6 case(s) now list nodes 1..n" in out
    for name, data in originals.items():          # originals kept byte for byte
        assert (tiny_dataset / "nodesTr_binary" / name).read_bytes() == data
    nodes = pd.read_csv(tiny_dataset / "nodes.csv", dtype=str, keep_default_na=False)
    assert nodes.groupby("case").size().to_dict() == counts and (nodes["label"] == "").all()
    # the masks are instance masks now: a second run changes nothing
    mtimes = {f.name: f.stat().st_mtime_ns for f in (tiny_dataset / "nodesTr").iterdir()}
    assert plan_and_preprocess_entry(argv + ["--split_components", "--no_pp"]) == 0
    out = capsys.readouterr().out
    assert "nodes.csv: already lists the nodes" in out and "26-connected" not in out
    assert {f.name: f.stat().st_mtime_ns for f in (tiny_dataset / "nodesTr").iterdir()} == mtimes


# ---- nnU-Net -------------------------------------------------------------------------------------
def test_convert_nnunet_dataset_then_plan(tmp_path, capsys):
    source = tmp_path / "nnUNet_raw" / "Dataset017_LNQ"
    counts = write_nnunet_dataset(source, n_cases=6, n_test=1)
    train_counts = {c: n for c, n in counts.items() if c != "LNQ_006"}
    raw, pre = tmp_path / "lnm_raw", tmp_path / "pre"
    labels = pd.DataFrame([{"case": c, "node": k, "label": int(k == 1 and i % 2)}
                           for i, (c, n) in enumerate(train_counts.items()) for k in range(1, n + 1)])
    labels.to_csv(tmp_path / "labels.csv", index=False)
    assert convert_entry(["nnunet", "-i", str(source), "-d", "21", "--raw", str(raw),
                          "--labels_csv", str(tmp_path / "labels.csv")]) == 0
    assert "lnm_plan_and_preprocess -d 21" in capsys.readouterr().out
    ds_root = raw / "Dataset021_LNQ"
    nodes = pd.read_csv(ds_root / "nodes.csv", dtype={"case": str, "label": str}, keep_default_na=False)
    assert nodes.groupby("case").size().to_dict() == train_counts
    assert nodes["label"].tolist() == labels["label"].astype(str).tolist()
    assert set(nodes["source"]) == {"Lymph node"}                         # found by name, not by value
    for case in train_counts:
        label = sitk.ReadImage(str(source / "labelsTr" / f"{case}.nii.gz"))
        mask = sitk.ReadImage(str(ds_root / "nodesTr" / f"{case}.nii.gz"))
        assert (mask.GetSpacing(), mask.GetOrigin(), mask.GetDirection()) == \
               (label.GetSpacing(), label.GetOrigin(), label.GetDirection())
        lab, inst = sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(mask)
        assert int(inst.max()) == train_counts[case]
        assert np.array_equal(inst > 0, (lab == 1) & ~_speck(lab.shape))      # LN voxels only, speck dropped
        assert (ds_root / "imagesTr" / f"{case}_0000.nii.gz").read_bytes() == \
               (source / "imagesTr" / f"{case}_0000.nii.gz").read_bytes()
    assert pd.read_csv(ds_root / "nodesTs.csv").groupby("case").size().to_dict() == {"LNQ_006": counts["LNQ_006"]}
    assert plan_and_preprocess_entry(["-d", "21", "--raw", str(raw), "--preprocessed", str(pre), "-np", "1",
                                      "--quiet"]) == 0
    index = pd.read_csv(pre / "Dataset021_LNQ" / "LNMPlans_crops" / "nodes_index.csv", dtype={"case": str})
    assert index.groupby("case").size().to_dict() == train_counts       # one row per component


def _speck(shape):
    speck = np.zeros(shape, bool)
    speck[1, 45, 45:47] = True
    return speck


def test_convert_nnunet_label_by_value_patient_labels_and_errors(tmp_path, capsys):
    source = tmp_path / "Dataset003_Neck"
    write_nnunet_dataset(source, n_cases=2, n_test=0)
    raw = tmp_path / "raw"
    pd.DataFrame({"case": ["LNQ_000", "LNQ_001"], "label": [0, 1]}).to_csv(tmp_path / "patients.csv", index=False)
    assert convert_entry(["nnunet", "-i", str(source), "-d", "3", "--raw", str(raw), "--label", "2",
                          "--labels_csv", str(tmp_path / "patients.csv")]) == 0
    ds_root = raw / "Dataset003_Neck"
    assert pd.read_csv(ds_root / "patients.csv")["label"].tolist() == [0, 1]
    assert pd.read_csv(ds_root / "nodes.csv").groupby("case").size().to_dict() == {"LNQ_000": 1, "LNQ_001": 1}
    capsys.readouterr()
    assert convert_entry(["nnunet", "-i", str(source), "-d", "4", "--raw", str(raw), "--label", "lymph nod"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'Lymph node'?" in err[0] and "dataset.json" in err[0]
    assert convert_entry(["nnunet", "-i", str(source), "-d", "3", "--raw", str(raw)]) == 1
    assert "dataset id 003 is taken" in capsys.readouterr().err
    assert not any(p.name.startswith(".") for p in raw.iterdir())       # no half-written dataset left behind


# ---- DICOM ---------------------------------------------------------------------------------------
def _check_dicom_conversion(case, out, exact: bool):
    image = sitk.ReadImage(str(out / "PT_001_0000.nii.gz"))
    mask = sitk.ReadImage(str(out / "PT_001_nodes.nii.gz"))
    g = case.geometry
    assert image.GetSize() == (g.columns, g.rows, g.n_slices)
    assert np.allclose(image.GetSpacing(), (g.column_spacing, g.row_spacing, g.slice_spacing), atol=1e-5)
    assert np.allclose(image.GetOrigin(), g.origin, atol=1e-4)
    assert np.allclose(np.reshape(image.GetDirection(), (3, 3)), g.rotation, atol=1e-6)
    assert (mask.GetSize(), mask.GetOrigin(), mask.GetDirection()) == \
           (image.GetSize(), image.GetOrigin(), image.GetDirection())
    hu = sitk.GetArrayFromImage(image)
    assert hu[:, 0, 0].tolist() == [-1000 + k for k in range(g.n_slices)]    # slices in position order, HU
    inst = sitk.GetArrayFromImage(mask)
    assert int(inst.max()) == len(NODES) == 3                             # the "Aorta" segment is not a node
    for truth, centre in zip(case.node_voxels, case.node_centres):
        ids, overlap = np.unique(inst[truth], return_counts=True)
        k = int(ids[np.argmax(overlap)])
        got = inst == k
        if exact:
            assert np.array_equal(got, truth)
        else:   # polygon filling of 72-point circles: voxel centres on the contour may fall either way
            assert abs(int(got.sum()) - int(truth.sum())) <= 0.03 * truth.sum()
            assert (got & truth).sum() >= 0.97 * truth.sum()
        assert 85 < hu[got].mean() < 95 and 35 < np.median(hu[inst == 0]) < 45     # image and mask line up
        zyx = np.argwhere(got).mean(axis=0)
        assert np.allclose(mask.TransformContinuousIndexToPhysicalPoint(zyx[::-1].tolist()), centre, atol=0.3)
    nodes = pd.read_csv(out / "nodes.csv", dtype=str, keep_default_na=False)
    assert nodes["node"].tolist() == ["1", "2", "3"] and (nodes["label"] == "").all()
    assert sorted(nodes["source"]) == ["LN 4R", "lymph nodes", "lymph nodes"]


@pytest.mark.parametrize("kind", ["seg", "rtstruct"])
def test_convert_dicom_case(tmp_path, capsys, kind):
    case = write_dicom_case(tmp_path / "patient", kind)
    (tmp_path / "patient" / "README.txt").write_text("not DICOM")
    assert convert_entry(["dicom", "-i", str(tmp_path / "patient"), "-o", str(tmp_path / "out")]) == 0
    assert "-> 3 node(s)" in capsys.readouterr().out
    _check_dicom_conversion(case, tmp_path / "out", exact=(kind == "seg"))


def test_convert_dicom_segment_choice_dataset_output_and_errors(tmp_path, capsys):
    write_dicom_case(tmp_path / "p1", "seg")
    raw = tmp_path / "raw"
    assert convert_entry(["dicom", "-i", str(tmp_path / "p1"), "-d", "8", "--name", "Seg", "--raw", str(raw),
                          "--case", "p1", "--segment", "ln 4r"]) == 0
    root = raw / "Dataset008_Seg"
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(root / "nodesTr" / "p1.nii.gz"))).max() == 1
    assert RawDataset.load(root).channel_names == {0: "CT"}
    assert verify_dataset(RawDataset.load(root), progress=False) == []
    capsys.readouterr()
    assert convert_entry(["dicom", "-i", str(tmp_path / "p1"), "-o", str(tmp_path / "o"), "--segment", "LN4R"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no segment named 'LN4R'" in err[0] and "did you mean 'LN 4R'?" in err[0]
    shutil.rmtree(tmp_path / "p1" / "SEG")
    assert convert_entry(["dicom", "-i", str(tmp_path / "p1"), "-o", str(tmp_path / "o")]) == 1
    assert "no RTSTRUCT or DICOM-SEG file found (12 DICOM file(s) in all)" in capsys.readouterr().err


def test_rtstruct_holes_and_several_cases_in_one_folder(tmp_path, capsys):
    ring = [("LN ring", (6.0, 30.0, 32.0), 7.0), ("LN ring", (6.0, 30.0, 32.0), 3.0)]   # a contour inside a contour
    ring_case = write_dicom_case(tmp_path / "all" / "a", "rtstruct", nodes=ring, other=[])
    write_dicom_case(tmp_path / "all" / "b", "seg", seed=1)
    raw = tmp_path / "raw"
    assert convert_entry(["dicom", "-i", str(tmp_path / "all"), "-d", "9", "--raw", str(raw)]) == 0
    root = raw / "Dataset009_DICOM"
    nodes = pd.read_csv(root / "nodes.csv", dtype={"case": str})
    assert nodes.groupby("case").size().to_dict() == {"PT_001": 1, "PT_001_2": 3}   # equal PatientIDs numbered
    shell = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "nodesTr" / "PT_001.nii.gz"))) == 1
    truth = ring_case.node_voxels[0] & ~ring_case.node_voxels[1]                    # holes are left out
    assert (shell & truth).sum() >= 0.97 * truth.sum() and (shell & ring_case.node_voxels[1]).sum() <= 0.03 * truth.sum()
    assert RawDataset.load(root).dataset_json["numTraining"] == 2
    assert verify_dataset(RawDataset.load(root), progress=False) == []
