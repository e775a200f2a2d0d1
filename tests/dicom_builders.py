"""Builders of real test data for the converters: a DICOM CT series (pydicom), a DICOM-SEG (highdicom),
an RTSTRUCT (pydicom) and an nnU-Net v2 raw dataset (SimpleITK), all with known nodes.

Reusable by any test: ``write_dicom_case(folder, kind="seg"|"rtstruct")`` and
``write_nnunet_dataset(root)`` return what was written and the ground truth to compare with.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid


def _rotation(z_deg: float, x_deg: float) -> np.ndarray:
    cz, sz = np.cos(np.radians(z_deg)), np.sin(np.radians(z_deg))
    cx, sx = np.cos(np.radians(x_deg)), np.sin(np.radians(x_deg))
    return np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])


@dataclass
class CTGeometry:
    """A deliberately awkward grid: non-square slices, unequal row/column spacing, oblique axes, odd origin."""
    n_slices: int = 12
    rows: int = 60
    columns: int = 64
    row_spacing: float = 0.9       # PixelSpacing[0]: between rows (along the column direction)
    column_spacing: float = 0.7    # PixelSpacing[1]: between columns (along the row direction)
    slice_spacing: float = 2.5
    origin: tuple[float, float, float] = (-31.7, 12.4, -104.3)
    rotation: np.ndarray = field(default_factory=lambda: _rotation(20.0, 8.0))

    @property
    def row_cosines(self) -> np.ndarray:     # direction of increasing column index
        return self.rotation[:, 0]

    @property
    def column_cosines(self) -> np.ndarray:  # direction of increasing row index
        return self.rotation[:, 1]

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cosines, self.column_cosines)

    def slice_position(self, k: int) -> np.ndarray:
        return np.asarray(self.origin) + k * self.slice_spacing * self.normal

    def voxel_centres(self) -> np.ndarray:
        """(slices, rows, columns, 3) LPS position of every voxel centre, from the DICOM definitions."""
        k, r, c = np.meshgrid(np.arange(self.n_slices), np.arange(self.rows), np.arange(self.columns), indexing="ij")
        return (np.asarray(self.origin) + k[..., None] * self.slice_spacing * self.normal
                + r[..., None] * self.row_spacing * self.column_cosines
                + c[..., None] * self.column_spacing * self.row_cosines)

    def sphere(self, centre_index: tuple[float, float, float], radius_mm: float) -> tuple[np.ndarray, np.ndarray]:
        """(LPS centre, boolean (slices, rows, columns) mask of voxel centres within ``radius_mm``)."""
        k, r, c = centre_index
        centre = (np.asarray(self.origin) + k * self.slice_spacing * self.normal + r * self.row_spacing
                  * self.column_cosines + c * self.column_spacing * self.row_cosines)
        return centre, np.linalg.norm(self.voxel_centres() - centre, axis=-1) <= radius_mm


# Nodes of the test case: (segment / ROI name, centre (slice, row, column), radius mm). "lymph nodes"
# holds two disjoint nodes (a binary segment); "LN 4R" one; "Aorta" is not a node and must be skipped.
NODES = [("lymph nodes", (3.0, 15.0, 16.0), 5.0), ("lymph nodes", (8.0, 42.0, 44.0), 6.0),
         ("LN 4R", (5.5, 40.0, 14.0), 4.5)]
OTHER = [("Aorta", (6.0, 20.0, 45.0), 5.0)]


def _patient_study(ds: Dataset, study_uid: str, for_uid: str, patient_id: str) -> None:
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Node", patient_id, "19600101", "O"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study_uid, "20240102", "101500", "1"
    ds.AccessionNumber, ds.ReferringPhysicianName = "A1", ""
    ds.FrameOfReferenceUID = for_uid


def write_ct_series(folder: Path, geometry: CTGeometry | None = None, seed: int = 0, patient_id: str = "PT 001",
                    bright: np.ndarray | None = None) -> list[Dataset]:
    """One CT slice file per slice (shuffled names: readers must sort by position), HU = stored - 1024:
    soft tissue 40 +- 10 HU, ``bright`` voxels (boolean (slices, rows, columns), e.g. nodes) 90 HU."""
    g = geometry or CTGeometry()
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid, series_uid, for_uid = generate_uid(), generate_uid(), generate_uid()
    datasets = []
    for k in rng.permutation(g.n_slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        _patient_study(ds, study_uid, for_uid, patient_id)
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = "CT", series_uid, 1, int(k) + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Manufacturer = "test"
        ds.ImagePositionPatient = [f"{v:.6f}" for v in g.slice_position(int(k))]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*g.row_cosines, *g.column_cosines)]
        ds.PixelSpacing = [g.row_spacing, g.column_spacing]
        ds.SliceThickness = g.slice_spacing
        ds.Rows, ds.Columns = g.rows, g.columns
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        pixels = (1024 + 40 + 10 * rng.standard_normal((g.rows, g.columns))).astype(np.uint16)
        if bright is not None:
            pixels[bright[k]] += 50
        pixels[:, :3] = 24 + int(k)   # -1000 HU + slice number: lets a test check the slice order
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / f"IM{rng.integers(1e6):06d}_{k}.dcm", enforce_file_format=True)
        datasets.append(ds)
    return sorted(datasets, key=lambda d: int(d.InstanceNumber))


def write_rtstruct(path: Path, ct: list[Dataset], geometry: CTGeometry, structures: list, n_points: int = 72) -> None:
    """An RTSTRUCT with one ROI per distinct name; each sphere drawn as circles on the slices it crosses."""
    first = ct[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = RTStructureSetStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    _patient_study(ds, first.StudyInstanceUID, first.FrameOfReferenceUID, str(first.PatientID))
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "RTSTRUCT", generate_uid(), 3
    ds.StructureSetLabel, ds.StructureSetDate, ds.StructureSetTime = "nodes", "20240102", "120000"
    contour_images = Sequence([Dataset() for _ in ct])
    for item, image in zip(contour_images, ct):
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = image.SOPClassUID, image.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID, series.ContourImageSequence = first.SeriesInstanceUID, contour_images
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID, frame.RTReferencedStudySequence = first.FrameOfReferenceUID, Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])
    names = list(dict.fromkeys(name for name, _, _ in structures))
    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = Sequence(), Sequence(), Sequence()
    t = np.linspace(0, 2 * np.pi, n_points, endpoint=False)
    for number, name in enumerate(names, start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = number, name, first.FrameOfReferenceUID
        roi.ROIGenerationAlgorithm = "MANUAL"
        ds.StructureSetROISequence.append(roi)
        contours = Sequence()
        for _, centre_index, radius in (s for s in structures if s[0] == name):
            centre, _ = geometry.sphere(centre_index, radius)
            for k, image in enumerate(ct):
                offset = float(np.dot(geometry.slice_position(k) - centre, geometry.normal))
                if abs(offset) >= radius:
                    continue
                r = np.sqrt(radius ** 2 - offset ** 2)
                c = centre + offset * geometry.normal
                points = (c + r * np.cos(t)[:, None] * geometry.row_cosines + r * np.sin(t)[:, None] * geometry.column_cosines)
                contour = Dataset()
                contour.ContourGeometricType, contour.NumberOfContourPoints = "CLOSED_PLANAR", n_points
                contour.ContourData = [f"{v:.4f}" for v in points.ravel()]
                ref = Dataset()
                ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = image.SOPClassUID, image.SOPInstanceUID
                contour.ContourImageSequence = Sequence([ref])
                contours.append(contour)
        roi_contour = Dataset()
        roi_contour.ReferencedROINumber, roi_contour.ROIDisplayColor = number, [255, 0, 0]
        roi_contour.ContourSequence = contours
        ds.ROIContourSequence.append(roi_contour)
        observation = Dataset()
        observation.ObservationNumber, observation.ReferencedROINumber = number, number
        observation.RTROIInterpretedType, observation.ROIInterpreter = "ORGAN", ""
        ds.RTROIObservationsSequence.append(observation)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_seg(path: Path, ct: list[Dataset], geometry: CTGeometry, structures: list) -> None:
    """A BINARY DICOM-SEG (highdicom) with one segment per distinct name, on the CT's own grid."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    names = list(dict.fromkeys(name for name, _, _ in structures))
    pixels = np.zeros((len(ct), geometry.rows, geometry.columns, len(names)), dtype=bool)
    for name, centre_index, radius in structures:
        pixels[..., names.index(name)] |= geometry.sphere(centre_index, radius)[1]
    descriptions = [hd.seg.SegmentDescription(
        segment_number=i + 1, segment_label=name, segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.LymphNode if name != "Aorta" else codes.SCT.Aorta,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL) for i, name in enumerate(names)]
    seg = hd.seg.Segmentation(
        source_images=ct, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=2,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="test", manufacturer_model_name="builder",
        software_versions="1", device_serial_number="1")
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)


@dataclass
class DicomCase:
    folder: Path
    geometry: CTGeometry
    node_voxels: list[np.ndarray]          # per node (in NODES order): boolean (slices, rows, columns)
    node_centres: list[np.ndarray]         # per node: LPS centre


def write_dicom_case(folder: Path, kind: str = "seg", seed: int = 0, nodes=NODES, other=OTHER,
                     patient_id: str = "PT 001") -> DicomCase:
    """A CT series (nodes 50 HU brighter than tissue) + a DICOM-SEG (``kind="seg"``) or RTSTRUCT
    (``kind="rtstruct"``) holding ``nodes`` and ``other``. For several patients in one folder, give
    each its own ``patient_id`` (it becomes the case id) and ``seed``."""
    geometry = CTGeometry()
    bright = np.zeros((geometry.n_slices, geometry.rows, geometry.columns), dtype=bool)
    for _, centre_index, radius in nodes:
        bright |= geometry.sphere(centre_index, radius)[1]
    ct = write_ct_series(folder / "CT", geometry, seed, patient_id, bright)
    if kind == "seg":
        write_seg(folder / "SEG" / "seg.dcm", ct, geometry, list(nodes) + list(other))
    else:
        write_rtstruct(folder / "RTSTRUCT" / "rtstruct.dcm", ct, geometry, list(nodes) + list(other))
    spheres = [geometry.sphere(c, r) for _, c, r in nodes]
    return DicomCase(folder, geometry, [s[1] for s in spheres], [s[0] for s in spheres])


# ---- nnU-Net v2 raw dataset -----------------------------------------------------------------------
NNUNET_LABELS = {"background": 0, "Lymph node": 1, "vessel": 2}


def write_nnunet_dataset(root: Path, n_cases: int = 6, n_test: int = 1, shape_zyx=(14, 48, 48), seed: int = 0,
                         spacing_xyz=(0.8, 0.8, 3.0)) -> dict[str, int]:
    """An nnU-Net v2 raw dataset ``root`` (Dataset0XX_Name): binary LN label 1 with 2-4 disjoint nodes per case,
    a 'vessel' label 2 beside them, a 2-voxel LN speck below the minimum volume. Returns case -> nodes."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape_zyx], indexing="ij")
    counts = {}
    for i in range(n_cases + n_test):
        split = "Tr" if i < n_cases else "Ts"
        case = f"LNQ_{i:03d}"
        image = rng.normal(40, 15, shape_zyx).astype(np.float32)
        label = np.zeros(shape_zyx, np.uint8)
        n_nodes = 2 + i % 3
        for k in range(n_nodes):
            cz, cy, cx = 3 + 3 * (k % 3), 8 + 11 * k, 10 + 9 * ((i + k) % 3)
            ball = ((zz - cz) * spacing_xyz[2]) ** 2 + ((yy - cy) * 0.8) ** 2 + ((xx - cx) * 0.8) ** 2 <= 3.5 ** 2
            label[ball] = 1
            image[ball] = 60 + 20 * k
        label[1, 45, 45:47] = 1                                       # a speck: 2 voxels = 3.8 mm^3
        label[2:12, 2:5, 40:44] = np.where(label[2:12, 2:5, 40:44] == 0, 2, label[2:12, 2:5, 40:44])
        for arr, sub in ((image, f"images{split}/{case}_0000.nii.gz"), (label, f"labels{split}/{case}.nii.gz")):
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing(spacing_xyz)
            img.SetOrigin((-20.0, 35.5, 110.0))
            img.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
            (root / sub).parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(img, str(root / sub))
        counts[case] = n_nodes
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": NNUNET_LABELS, "numTraining": n_cases, "file_ending": ".nii.gz"}))
    return counts


# ---- files written by other tools: a CT series by SimpleITK (GDCM), an RTSTRUCT by rt-utils (OpenCV contours) ----
def write_ct_series_sitk(folder: Path, hu_zyx: np.ndarray, spacing_xyz, origin, direction, patient_id: str = "SITK 1",
                         frame_of_reference_uid: str | None = None) -> list[Path]:
    """A CT series written slice by slice by SimpleITK's GDCM writer (as scripts that export NIfTI to DICOM do),
    int16 HU; returns the files in slice order."""
    volume = sitk.GetImageFromArray(hu_zyx.astype(np.int16))
    volume.SetSpacing(spacing_xyz)
    volume.SetOrigin(origin)
    volume.SetDirection(direction)
    series = [("0020|000d", generate_uid()), ("0020|000e", generate_uid()),
              ("0020|0052", frame_of_reference_uid or generate_uid()), ("0010|0020", patient_id),
              ("0010|0010", "Sitk^Writer"), ("0008|0060", "CT"), ("0008|0020", "20240102"), ("0008|0030", "101500"),
              ("0020|0037", "\\".join(f"{v:.8f}" for v in (*direction[0::3], *direction[1::3]))),
              ("0008|103e", "written by SimpleITK"), ("0020|0011", "4")]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(volume.GetDepth()):
        image_slice = volume[:, :, k]
        for tag, value in series:
            image_slice.SetMetaData(tag, value)
        image_slice.SetMetaData("0008|0018", generate_uid())
        image_slice.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in volume.TransformIndexToPhysicalPoint((0, 0, k))))
        image_slice.SetMetaData("0020|0013", str(k + 1))
        files.append(folder / f"slice_{k:03d}.dcm")
        writer.SetFileName(str(files[-1]))
        writer.Execute(image_slice)
    return files


def write_rtstruct_rt_utils(series_folder: Path, path: Path, masks_zyx: dict[str, np.ndarray]) -> None:
    """An RTSTRUCT written by rt-utils (pip install rt-utils) for the series in ``series_folder``: one ROI per
    boolean (slices, rows, columns) mask, contours traced by OpenCV through the boundary voxels' centres.
    rt-utils takes PixelSpacing[0] for the column step, so use square pixels."""
    import contextlib
    import io
    from rt_utils import RTStructBuilder
    with contextlib.redirect_stdout(io.StringIO()):          # rt-utils prints while it works
        rt = RTStructBuilder.create_new(dicom_series_path=str(series_folder))
        for name, mask in masks_zyx.items():
            rt.add_roi(mask=np.moveaxis(mask, 0, -1), name=name)     # rt-utils: (rows, columns, slices)
        path.parent.mkdir(parents=True, exist_ok=True)
        rt.save(str(path))


# ---- broken nnU-Net v2 raw datasets (``write_nnunet_dataset`` first, then one of NNUNET_VARIANTS) ----------
def _relabel(path: Path, fn) -> None:
    """Rewrite a label file with ``fn(array)`` (its dtype may change), keeping the geometry."""
    old = sitk.ReadImage(str(path))
    new = sitk.GetImageFromArray(fn(sitk.GetArrayFromImage(old)))
    new.CopyInformation(old)
    sitk.WriteImage(new, str(path))


def edit_nnunet_json(src: Path, **changes) -> None:
    meta = json.loads((src / "dataset.json").read_text())
    meta.update(changes)
    (src / "dataset.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))


def _unlisted_value(src):       # the nodes of one case carry value 3, which "labels" does not list
    _relabel(src / "labelsTr" / "LNQ_001.nii.gz", lambda a: np.where(a == 1, 3, a).astype(np.uint8))


def _fractional_value(src):     # a float label map whose nodes are 1.5 (resampled with linear interpolation)
    _relabel(src / "labelsTr" / "LNQ_001.nii.gz", lambda a: np.where(a == 1, 1.5, a).astype(np.float32))


def _ln_label_absent(src):      # "Lymph node" is listed as 3, which no mask holds (the nodes were drawn as 1)
    edit_nnunet_json(src, labels={"background": 0, "tumour": 1, "vessel": 2, "Lymph node": 3})


def _as_mha(src):               # every file as .mha, dataset.json "file_ending": ".mha"
    for f in sorted(src.rglob("*.nii.gz")):
        sitk.WriteImage(sitk.ReadImage(str(f)), str(f.with_name(f.name[:-7] + ".mha")))
        f.unlink()
    edit_nnunet_json(src, file_ending=".mha")


NNUNET_VARIANTS = {"valid": lambda src: None, "unlisted_value": _unlisted_value, "fractional_value": _fractional_value,
                   "ln_label_absent": _ln_label_absent, "mha": _as_mha}
