"""lnm_convert on hostile input, built for real: nnU-Net raw datasets that nnU-Net's own integrity check judges
too, and DICOM written by pydicom, highdicom, SimpleITK (GDCM) and rt-utils, then broken the way files break
(truncated, NaN poked in, another frame of reference, contours a metre off the image). Every refusal is one
line naming the file and a non-zero exit; the inputs are never written to and nothing half-written is left."""
from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from conftest import run_cli
from dicom_builders import (NNUNET_VARIANTS, NODES, _rotation, edit_nnunet_json, write_ct_series_sitk,
                            write_dicom_case, write_nnunet_dataset, write_rtstruct_rt_utils)
from lnm_auto.datasets.raw_dataset import RawDataset
from lnm_auto.datasets.verify import verify_dataset


def convert(*args):
    return run_cli("convert", *args)


def refused(proc, *fragments) -> str:
    """Exit 1 with exactly one error line, holding every fragment, and no traceback; returns the line."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    assert all(f in errors[0] for f in fragments), (fragments, errors[0])
    return errors[0]


def warnings_of(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "warning:" in line]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- nnU-Net v2 raw datasets -------------------------------------------------------------------------------
def nnunet_source(tmp_path: Path, variant: str = "valid") -> Path:
    """A 3-case nnU-Net v2 raw dataset (2, 3 and 4 nodes, a vessel label, specks) broken as ``variant`` says."""
    src = tmp_path / "nnUNet_raw" / "Dataset010_LNQ"
    write_nnunet_dataset(src, n_cases=3, n_test=0)
    NNUNET_VARIANTS[variant](src)
    return src


def convert_nnunet(src: Path, tmp_path: Path, *extra):
    return convert("nnunet", "-i", src, "-d", "11", "--raw", tmp_path / "raw", *extra)


def nothing_converted(tmp_path: Path) -> bool:
    """No dataset and no hidden staging folder left in the raw folder."""
    raw = tmp_path / "raw"
    return not raw.is_dir() or not any(raw.iterdir())


@pytest.mark.slow   # nnU-Net's check starts a process that imports torch (about 10 s each)
@pytest.mark.parametrize("variant, nnunet_accepts", [("valid", True), ("unlisted_value", False),
                                                     ("fractional_value", False), ("ln_label_absent", True),
                                                     ("mha", True)])
def test_nnunet_own_integrity_check_on_the_same_datasets(tmp_path, variant, nnunet_accepts):
    """What nnU-Net v2 itself says of the datasets the tests below convert: the ones it refuses are broken for
    nnU-Net too; 'ln_label_absent' is a valid nnU-Net dataset that lnm_convert still refuses (no node)."""
    check = pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity")
    src = nnunet_source(tmp_path, variant)
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            check.verify_dataset_integrity(str(src), num_processes=1)
            accepted = True
        except RuntimeError:
            accepted = False
    assert accepted == nnunet_accepts


def test_valid_nnunet_dataset_converts(tmp_path):
    src = nnunet_source(tmp_path)
    done = convert_nnunet(src, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "9 node(s) from label value(s) [1]" in done.stdout


def test_mask_value_not_in_labels_is_refused(tmp_path):
    """Was: value 3 silently became background (5 nodes instead of 9)."""
    src = nnunet_source(tmp_path, "unlisted_value")
    before = snapshot(src)
    line = refused(convert_nnunet(src, tmp_path), str(src / "labelsTr" / "LNQ_001.nii.gz"), "label value(s) [3]",
                   "not listed in dataset.json", "Lymph node=1")
    assert "add the label" in line
    assert nothing_converted(tmp_path) and snapshot(src) == before


def test_fractional_mask_value_is_refused(tmp_path):
    """Was: 1.5 rounded to... 1 (nodes kept by accident; 2.5 would have become another label)."""
    src = nnunet_source(tmp_path, "fractional_value")
    refused(convert_nnunet(src, tmp_path), str(src / "labelsTr" / "LNQ_001.nii.gz"), "label value 1.5 is not an integer")
    assert nothing_converted(tmp_path)


@pytest.mark.parametrize("value", [1.5, "1", True, -1, [1, 2.5]])
def test_non_integer_value_in_dataset_json_labels_is_refused(tmp_path, value):
    """Was: {"Lymph node": 1.5} was used as label 1 (int(1.5)); "1" and true likewise."""
    src = nnunet_source(tmp_path)
    edit_nnunet_json(src, labels={"background": 0, "Lymph node": value, "vessel": 2})
    refused(convert_nnunet(src, tmp_path), str(src / "dataset.json"), "label 'Lymph node' has value",
            "integers 0, 1, 2")
    assert nothing_converted(tmp_path)


def test_lymph_node_label_in_no_case_is_refused(tmp_path):
    """Was: a dataset with 0 nodes and exit 0. nnU-Net accepts this dataset (the label is just unused)."""
    src = nnunet_source(tmp_path, "ln_label_absent")
    refused(convert_nnunet(src, tmp_path), str(src / "labelsTr"), "no training case holds the lymph-node label "
            "'Lymph node' (value 3)", "value(s) [0, 1, 2]", "pass --label")
    assert nothing_converted(tmp_path)
    # the same data with the right label converts
    assert convert_nnunet(src, tmp_path, "--label", "1").returncode == 0


def test_every_node_below_the_minimum_volume_is_refused(tmp_path):
    src = nnunet_source(tmp_path)
    refused(convert_nnunet(src, tmp_path, "--min_volume", "100000"), "all 12 component(s) of the lymph-node label",
            "smaller than --min_volume 100000 mm^3")
    assert nothing_converted(tmp_path)


def test_mha_dataset_converts_and_verifies(tmp_path):
    src = nnunet_source(tmp_path, "mha")
    done = convert_nnunet(src, tmp_path)
    assert done.returncode == 0, done.stderr
    root = tmp_path / "raw" / "Dataset011_LNQ"
    assert sorted(p.name for p in (root / "nodesTr").iterdir()) == [f"LNQ_00{i}.mha" for i in range(3)]
    ds = RawDataset.load(root)
    assert ds.file_ending == ".mha" and verify_dataset(ds, progress=False) == []


@pytest.mark.parametrize("ending, fragment", [(None, 'names no "file_ending", so .nii.gz was assumed'),
                                              ("mha", "\"file_ending\" 'mha' must start with a dot")])
def test_file_ending_missing_or_without_dot(tmp_path, ending, fragment):
    src = nnunet_source(tmp_path, "mha")
    edit_nnunet_json(src, file_ending=ending)
    refused(convert_nnunet(src, tmp_path), fragment)
    assert nothing_converted(tmp_path)


# ---- DICOM: real files from pydicom (builders), highdicom (SEG), SimpleITK/GDCM (series) and rt-utils ----------
RT_SHAPE_ZYX, RT_SPACING_XYZ = (10, 40, 48), (0.8, 0.8, 2.5)
RT_ORIGIN, RT_DIRECTION = (-12.5, 30.0, -80.0), tuple(_rotation(20.0, 8.0).ravel())
RT_NODES = {"lymph nodes": [((3.0, 12.0, 12.0), 4.0), ((7.0, 28.0, 34.0), 5.0)], "LN 4R": [((5.0, 28.0, 10.0), 3.5)]}


def _ball(centre_zyx, radius_mm) -> np.ndarray:
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in RT_SHAPE_ZYX], indexing="ij")
    sz, sy, sx = RT_SPACING_XYZ[::-1]
    return ((zz - centre_zyx[0]) * sz) ** 2 + ((yy - centre_zyx[1]) * sy) ** 2 + ((xx - centre_zyx[2]) * sx) ** 2 \
        <= radius_mm ** 2


def write_rt_utils_case(folder: Path, patient_id: str = "RTU 1") -> dict[str, np.ndarray]:
    """A SimpleITK-written CT series (oblique, square pixels) + an rt-utils RTSTRUCT; returns ROI name -> mask."""
    pytest.importorskip("rt_utils")
    masks = {name: np.any([_ball(c, r) for c, r in balls], axis=0) for name, balls in RT_NODES.items()}
    hu = np.where(np.any(list(masks.values()), axis=0), 90, 40) + np.arange(RT_SHAPE_ZYX[0])[:, None, None]
    write_ct_series_sitk(folder / "CT", hu, RT_SPACING_XYZ, RT_ORIGIN, RT_DIRECTION, patient_id)
    write_rtstruct_rt_utils(folder / "CT", folder / "RTSTRUCT" / "rt.dcm", masks)
    return masks


@pytest.fixture(scope="module")
def rt_utils_case(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp_path_factory.mktemp("rtu") / "patient"
    return folder, write_rt_utils_case(folder)


@pytest.fixture(scope="module")
def builder_cases(tmp_path_factory) -> dict[str, Path]:
    """Builder cases (pydicom CT; pydicom RTSTRUCT or highdicom SEG), written once; tests copy them."""
    root = tmp_path_factory.mktemp("built")
    return {kind: write_dicom_case(root / kind, kind).folder for kind in ("rtstruct", "seg")}


def case_copy(source: str, tmp_path, builder_cases, request) -> tuple[Path, Path]:
    """(case folder, its structure file) of a fresh copy of a 'rtstruct' / 'seg' builder case or the 'rt-utils' case
    (asked for only then: without rt-utils installed, only the rt-utils cases skip)."""
    folder = request.getfixturevalue("rt_utils_case")[0] if source == "rt-utils" else builder_cases[source]
    copy = Path(shutil.copytree(folder, tmp_path / "case"))
    return copy, next(p for p in copy.rglob("*.dcm") if p.parent.name in ("RTSTRUCT", "SEG"))


def convert_dicom(folder: Path, tmp_path: Path, *extra):
    return convert("dicom", "-i", folder, "-o", tmp_path / "out", *extra)


def roi_contours(ds: pydicom.Dataset, name: str) -> pydicom.Sequence:
    """The ContourSequence of the ROI named ``name``."""
    number = next(int(r.ROINumber) for r in ds.StructureSetROISequence if r.ROIName == name)
    return next(c.ContourSequence for c in ds.ROIContourSequence if int(c.ReferencedROINumber) == number)


def edit_dicom(path: Path, fn) -> None:
    ds = pydicom.dcmread(str(path))
    fn(ds)
    ds.save_as(str(path))


def test_rt_utils_rtstruct_on_a_simpleitk_series_converts_voxel_for_voxel(rt_utils_case, tmp_path):
    """rt-utils traces every mask with OpenCV through the centres of its boundary voxels; those voxels lie on the
    contour and belong to the ROI (was: dropped as 'not inside', 15-20 % of every node)."""
    folder, masks = rt_utils_case
    done = convert_dicom(folder, tmp_path)
    assert done.returncode == 0 and not warnings_of(done), done.stderr
    assert "-> 3 node(s)" in done.stdout
    inst = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "RTU_1_nodes.nii.gz")))
    image = sitk.ReadImage(str(tmp_path / "out" / "RTU_1_0000.nii.gz"))
    assert np.allclose(image.GetDirection(), RT_DIRECTION, atol=1e-6) and np.allclose(image.GetOrigin(), RT_ORIGIN)
    assert np.array_equal(inst > 0, masks["lymph nodes"] | masks["LN 4R"])
    for name, balls in RT_NODES.items():
        for centre, radius in balls:
            ball = _ball(centre, radius)
            assert len(np.unique(inst[ball])) == 1 and np.array_equal(inst == inst[ball][0], ball)
    hu = sitk.GetArrayFromImage(image)
    assert hu[:, 0, 0].tolist() == [40 + k for k in range(RT_SHAPE_ZYX[0])]     # slices in order, HU as written


@pytest.mark.parametrize("source", ["rtstruct", "rt-utils", "seg"])
@pytest.mark.parametrize("keep", [0.3, 0.7, 0.97])
def test_truncated_structure_file_is_refused(source, keep, tmp_path, builder_cases, request):
    """Was: AttributeError (pydicom reads a cut file without a word and drops what is missing)."""
    folder, path = case_copy(source, tmp_path, builder_cases, request)
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    before = snapshot(folder)
    refused(convert_dicom(folder, tmp_path), str(path), "damaged or truncated DICOM file")
    assert snapshot(folder) == before and not (tmp_path / "out").exists()


def test_truncated_ct_slice_is_named(tmp_path, builder_cases, request):
    folder, _ = case_copy("rtstruct", tmp_path, builder_cases, request)
    cut = sorted((folder / "CT").iterdir())[5]
    cut.write_bytes(cut.read_bytes()[:-500])
    refused(convert_dicom(folder, tmp_path), str(cut), "damaged or truncated DICOM file")


@pytest.mark.parametrize("source", ["rtstruct", "rt-utils"])
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nan_contour_point_is_refused(source, bad, tmp_path, builder_cases, request):
    """Was: ValueError from the polygon filler."""
    folder, path = case_copy(source, tmp_path, builder_cases, request)

    def poke(ds):
        contour = roi_contours(ds, "LN 4R")[0]
        contour.ContourData = [bad] + list(contour.ContourData)[1:]
    edit_dicom(path, poke)
    refused(convert_dicom(folder, tmp_path), str(path), "a contour of ROI 'LN 4R' has 1 NaN/Inf coordinate(s)")


def _other_frame_everywhere(ds):
    uid = generate_uid()
    for item in list(ds.ReferencedFrameOfReferenceSequence) + list(ds.StructureSetROISequence):
        item[("FrameOfReferenceUID" if "FrameOfReferenceUID" in item else "ReferencedFrameOfReferenceUID")].value = uid
    if "FrameOfReferenceUID" in ds:
        ds.FrameOfReferenceUID = uid


def _other_frame_one_roi(ds):
    ds.StructureSetROISequence[-1].ReferencedFrameOfReferenceUID = generate_uid()


def _other_frame_seg(ds):
    ds.FrameOfReferenceUID = generate_uid()


@pytest.mark.parametrize("source, edit, fragment", [
    ("rtstruct", _other_frame_everywhere, "drawn in frame of reference"),
    ("rt-utils", _other_frame_everywhere, "drawn in frame of reference"),
    ("rt-utils", _other_frame_one_roi, "ROI 'LN 4R' is drawn in frame of reference"),
    ("seg", _other_frame_seg, "drawn in frame of reference")])
def test_other_frame_of_reference_than_the_series_is_refused(source, edit, fragment, tmp_path, builder_cases,
                                                            request):
    """Was: converted as if the frames were one (the nodes land wherever the numbers say)."""
    folder, path = case_copy(source, tmp_path, builder_cases, request)
    edit_dicom(path, edit)
    refused(convert_dicom(folder, tmp_path), str(path), fragment, "export it with the series it was drawn on")


FAR = ("LN far", (5.0, 30.0, 1400.0), 5.0)       # column 1400 x 0.7 mm: a metre off the image
EDGE = ("LN edge", (6.0, 30.0, 62.0), 4.5)       # crosses the last column


def test_roi_a_metre_outside_the_image_is_refused_naming_it(tmp_path):
    """Was: 0 voxels from it, exit 0, and it was not even counted as outside (only whole slices were)."""
    write_dicom_case(tmp_path / "p", "rtstruct", nodes=NODES + [FAR])
    refused(convert_dicom(tmp_path / "p", tmp_path), "rtstruct.dcm", "ROI 'LN far': all 4 contour(s) lie outside "
            "the image series", "drawn on another series?")
    # the other ROIs are fine: picking them converts
    done = convert_dicom(tmp_path / "p", tmp_path, "--segment", "lymph nodes", "--segment", "LN 4R")
    assert done.returncode == 0 and "-> 3 node(s)" in done.stdout


def test_roi_partly_outside_converts_with_warnings(tmp_path):
    write_dicom_case(tmp_path / "p", "rtstruct", nodes=NODES + [EDGE])
    path = tmp_path / "p" / "RTSTRUCT" / "rtstruct.dcm"

    def add_a_far_contour(ds):       # a copy of a contour of 'LN 4R' 200 mm above the series
        contours = roi_contours(ds, "LN 4R")
        far = pydicom.Dataset()
        far.ContourGeometricType, far.NumberOfContourPoints = "CLOSED_PLANAR", contours[0].NumberOfContourPoints
        far.ContourData = [v + (200.0 if i % 3 == 2 else 0.0) for i, v in enumerate(contours[0].ContourData)]
        contours.append(far)
    edit_dicom(path, add_a_far_contour)
    done = convert_dicom(tmp_path / "p", tmp_path)
    assert done.returncode == 0, done.stderr
    warned = warnings_of(done)
    assert any("ROI 'LN 4R': 1 of 5 contour(s) lie outside the image and were ignored" in w for w in warned), warned
    assert any("ROI 'LN edge':" in w and "contour(s) cut at the edge of the image" in w for w in warned), warned
    assert "-> 4 node(s)" in done.stdout


def _shift_seg_frames(mm: float):
    def shift(ds):
        for frame in ds.PerFrameFunctionalGroupsSequence:
            position = frame.PlanePositionSequence[0]
            position.ImagePositionPatient = [float(position.ImagePositionPatient[0]) + mm,
                                             *position.ImagePositionPatient[1:]]
    return shift


def test_seg_a_metre_outside_is_refused_and_partly_outside_warns(tmp_path, builder_cases, request):
    """A SEG whose frames lie elsewhere in the same frame of reference (made on another series): was 0 nodes."""
    folder, path = case_copy("seg", tmp_path, builder_cases, request)
    original = path.read_bytes()
    edit_dicom(path, _shift_seg_frames(1000.0))
    refused(convert_dicom(folder, tmp_path), str(path), "segment 'lymph nodes': all", "voxel(s) lie outside the image")
    path.write_bytes(original)
    edit_dicom(path, _shift_seg_frames(12.0))
    done = convert_dicom(folder, tmp_path)
    assert done.returncode == 0, done.stderr
    assert any("segment 'lymph nodes':" in w and "voxel(s) lie outside the image and were ignored" in w
               for w in warnings_of(done)), done.stderr


def test_two_point_contours_are_counted_not_silently_dropped(tmp_path, builder_cases, request):
    """An ROI whose closed contours have 2 points off the voxel centres (a line that passes no centre; rt-utils'
    1- and 2-point contours through voxel centres do give voxels, see above): no node, and a warning saying why."""
    folder, path = case_copy("rtstruct", tmp_path, builder_cases, request)

    def two_points(ds):
        for contour in roi_contours(ds, "LN 4R"):
            contour.ContourData, contour.NumberOfContourPoints = list(contour.ContourData)[:6], 2
    edit_dicom(path, two_points)
    done = convert_dicom(folder, tmp_path)
    assert done.returncode == 0 and "-> 2 node(s)" in done.stdout
    warned = warnings_of(done)
    assert warned == ["lnm_convert: warning: PT_001: ROI 'LN 4R': its 4 contour(s) on the image enclose no voxel "
                      "centre, so no node from it"]


def test_two_series_and_a_structure_set_referencing_neither_is_refused(tmp_path):
    write_dicom_case(tmp_path / "drawn_on", "rtstruct")
    write_dicom_case(tmp_path / "p" / "a", "seg", seed=1)          # two other series, each with its own frame
    write_dicom_case(tmp_path / "p" / "b", "seg", seed=2)
    shutil.rmtree(tmp_path / "p" / "a" / "SEG")
    shutil.rmtree(tmp_path / "p" / "b" / "SEG")
    shutil.copytree(tmp_path / "drawn_on" / "RTSTRUCT", tmp_path / "p" / "RTSTRUCT")
    refused(convert_dicom(tmp_path / "p", tmp_path), "rtstruct.dcm", "its image series", "is not in",
            "put the series it was drawn on beside it")


def test_case_ids_equal_after_making_them_safe_stay_apart(tmp_path):
    """'PT 001', 'PT_001' and 'PT_001_2' (was: the second was numbered PT_001_2 and overwrote the third)."""
    for i, patient in enumerate(["PT 001", "PT_001", "PT_001_2"]):
        write_dicom_case(tmp_path / "p" / f"{i}", "seg", seed=i, patient_id=patient)
    done = convert_dicom(tmp_path / "p", tmp_path)
    assert done.returncode == 0, done.stderr
    nodes = pd.read_csv(tmp_path / "out" / "nodes.csv", dtype=str)
    assert nodes.groupby("case").size().to_dict() == {"PT_001": 3, "PT_001_2": 3, "PT_001_3": 3}
    assert len(list((tmp_path / "out").glob("*_nodes.nii.gz"))) == 3


def test_overlapping_seg_segments_warn(tmp_path):
    """A segment drawn inside another: its voxels stay with the first one, and the user is told."""
    nested = [("LN a", (6.0, 30.0, 32.0), 7.0), ("LN b", (6.0, 30.0, 32.0), 3.0), ("LN c", (3.0, 12.0, 12.0), 4.0)]
    write_dicom_case(tmp_path / "p", "seg", nodes=nested, other=[])
    done = convert_dicom(tmp_path / "p", tmp_path)
    assert done.returncode == 0 and "-> 2 node(s)" in done.stdout
    warned = warnings_of(done)
    assert len(warned) == 1 and "segment 'LN b' overlaps 'LN a' in" in warned[0] and "it keeps no voxel" in warned[0]


def test_a_later_patient_with_the_same_case_id_does_not_overwrite_an_earlier_one(tmp_path):
    """Anonymised exports: every PatientID 'ANON'. Was: the second batch silently replaced the first's case."""
    write_dicom_case(tmp_path / "batch1", "seg", seed=1, patient_id="ANON")
    write_dicom_case(tmp_path / "batch2", "seg", seed=2, patient_id="ANON")
    raw = ["-d", "12", "--raw", tmp_path / "raw"]
    assert convert("dicom", "-i", tmp_path / "batch1", *raw).returncode == 0
    root = tmp_path / "raw" / "Dataset012_DICOM"
    before = snapshot(root)
    assert convert("dicom", "-i", tmp_path / "batch1", *raw).returncode == 0        # the same series again: fine
    assert snapshot(root) == before
    refused(convert("dicom", "-i", tmp_path / "batch2", *raw), str(root / "imagesTr" / "ANON_0000.nii.gz"),
            "case 'ANON' is already there with another image", "--case NAME")
    assert snapshot(root) == before
    assert convert("dicom", "-i", tmp_path / "batch2", *raw, "--case", "ANON_b").returncode == 0
    assert pd.read_csv(root / "nodes.csv", dtype=str).groupby("case").size().to_dict() == {"ANON": 3, "ANON_b": 3}


def test_an_unreadable_image_already_in_the_dataset_is_never_overwritten(tmp_path):
    """A damaged file where the converted image would go is not ours to judge: refused, left as it is."""
    write_dicom_case(tmp_path / "batch1", "seg", seed=1, patient_id="ANON")
    raw = ["-d", "12", "--raw", tmp_path / "raw"]
    assert convert("dicom", "-i", tmp_path / "batch1", *raw).returncode == 0
    image = tmp_path / "raw" / "Dataset012_DICOM" / "imagesTr" / "ANON_0000.nii.gz"
    image.write_bytes(image.read_bytes()[:200])
    damaged = image.read_bytes()
    refused(convert("dicom", "-i", tmp_path / "batch1", *raw), str(image), "cannot be read", "--case NAME")
    assert image.read_bytes() == damaged
