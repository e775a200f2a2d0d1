"""A DICOM image series + an RTSTRUCT or DICOM-SEG holding node contours -> NIfTI image + instance mask.

``lnm_convert dicom -i FOLDER`` searches FOLDER (recursively) for structure sets (RTSTRUCT) and
segmentations (SEG). Each one is a case, paired with the image series it references (or the one
series of its frame of reference). The series is read with SimpleITK (rescaled to HU, slices sorted
by position); the selected segments/ROIs are put on its grid, every one split into 26-connected
components (``components.split_components``), so a single "lymph nodes" segment and one segment per
node both give one instance per node.

Segments are selected by name: ``--segment NAME`` (repeatable, case insensitive), or by default every
segment whose name mentions a lymph node (``lymph``, ``node``, ``LN``: "LN 4R", "Lymph nodes", "ln_3").
"""
from __future__ import annotations

import difflib
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from lnm_auto.conversion import dicom_seg, rtstruct
from lnm_auto.imaging.components import DEFAULT_MIN_VOLUME_MM3, InstanceSplit, nodes_skeleton, split_components
from lnm_auto.conversion.dicom_file import damage
from lnm_auto.conversion.nnunet import LN_NAME
from lnm_auto.conversion.split_dataset import write_mask
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import load_json, save_csv_atomic, save_json
from lnm_auto.utils.paths import dataset_folder_name

STRUCTURE_MODALITIES = ("RTSTRUCT", "SEG")
CHANNEL_NAME = {"CT": "CT", "MR": "MR", "PT": "PET"}
SLICE_SPACING_RTOL = 0.01


@dataclass
class DicomCase:
    case_id: str
    structure_file: Path
    modality: str                  # RTSTRUCT or SEG
    image_files: list[Path]        # sorted along the slice normal
    image_modality: str
    frame_of_reference: str | None = None     # the image series'


@dataclass
class ConvertedCase:
    case_id: str
    image: sitk.Image
    split: InstanceSplit
    segment_of_node: list[str]      # segment name of node k at [k - 1]
    note: str
    warnings: list[str] = field(default_factory=list)     # contours cut or outside the image, overlaps


def _headers(folder: Path) -> list[tuple[Path, pydicom.Dataset]]:
    """Every DICOM file below ``folder`` (headers only); other files are skipped."""
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            found.append((path, pydicom.dcmread(str(path), stop_before_pixels=True)))
        except (pydicom.errors.InvalidDicomError, OSError, ValueError):
            continue
    return found


def _case_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", text).strip("._-") or "case"


def find_dicom_cases(folder: Path, case_id: str | None = None) -> list[DicomCase]:
    """One case per RTSTRUCT/SEG below ``folder``, with its image series; case ids from PatientID (or ``case_id``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LNMError(f"-i {folder}: no such folder")
    headers = _headers(folder)
    series: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    structures = []
    for path, ds in headers:
        modality = str(getattr(ds, "Modality", ""))
        if modality in STRUCTURE_MODALITIES:
            structures.append((path, ds, modality))
        elif "ImagePositionPatient" in ds and "SeriesInstanceUID" in ds:
            series[str(ds.SeriesInstanceUID)].append((path, ds))
    if not structures:
        raise LNMError(f"-i {folder}: no RTSTRUCT or DICOM-SEG file found ({len(headers)} DICOM file(s) in all)")
    cases, used = [], defaultdict(list)
    for path, ds, modality in structures:
        ref = rtstruct.referenced_series_uid(ds) if modality == "RTSTRUCT" else dicom_seg.referenced_series_uid(ds)
        if ref not in series:
            frame = rtstruct.frame_of_reference_uid(ds)
            same_frame = [uid for uid, files in series.items() if str(getattr(files[0][1], "FrameOfReferenceUID", "")) == frame]
            if len(same_frame) != 1:
                raise LNMError(f"{path}: its image series ({ref or 'not named'}) is not in {folder}; put the series "
                               "it was drawn on beside it")
            ref = same_frame[0]
        used[ref].append(path)
        files = sorted_slices(series[ref])
        series_frame = str(getattr(files[0][1], "FrameOfReferenceUID", "")) or None
        _check_same_frame(path, ds, modality, ref, series_frame, files[0][0].parent)
        cases.append(DicomCase(_case_id(str(getattr(ds, "PatientID", "")) or path.parent.name), path, modality,
                               [f[0] for f in files], str(getattr(files[0][1], "Modality", "CT")), series_frame))
    for uid, paths in used.items():
        if len(paths) > 1:
            raise LNMError(f"{paths[1]}: {paths[0]} is drawn on the same image series; keep one per series "
                           "(or pass -i a folder holding only one)")
    if case_id is not None:
        if len(cases) != 1:
            raise LNMError(f"--case {case_id}: -i {folder} holds {len(cases)} cases; --case names a single one")
        cases[0].case_id = case_id
    _number_equal_ids(cases)
    return cases


def _number_equal_ids(cases: list[DicomCase]) -> None:
    """Equal case ids (several studies, anonymised PatientIDs, 'PT 001' and 'PT_001' alike once made safe) get
    _2, _3, ...: never a name another case has, ignoring case (file systems that ignore it would merge them)."""
    taken = {c.case_id.lower() for c in cases}
    given: set[str] = set()
    for case in cases:
        if case.case_id.lower() in given:
            k = 2
            while f"{case.case_id}_{k}".lower() in taken | given:
                k += 1
            case.case_id = f"{case.case_id}_{k}"
        given.add(case.case_id.lower())


def _check_same_frame(path: Path, ds: pydicom.Dataset, modality: str, series_uid: str, series_frame: str | None,
                      series_folder: Path) -> None:
    """Refuse a structure set or SEG whose frame of reference is not its image series': its coordinates would
    be read in the wrong space (the nodes would land elsewhere, or outside the image)."""
    if series_frame is None:
        return
    if modality == "RTSTRUCT":
        frames = rtstruct.frames_of_series(ds, series_uid) or {rtstruct.frame_of_reference_uid(ds)} - {None}
    else:
        frames = {str(ds.FrameOfReferenceUID)} if "FrameOfReferenceUID" in ds else set()
    if frames and series_frame not in frames:
        raise LNMError(f"{path}: drawn in frame of reference {', '.join(sorted(frames))}, but its image series "
                       f"({series_folder}) is in {series_frame}; export it with the series it was drawn on")


def sorted_slices(files: list[tuple[Path, pydicom.Dataset]]) -> list[tuple[Path, pydicom.Dataset]]:
    """One series' (file, header) pairs sorted along the slice normal; a series with missing or duplicate slices
    (uneven gaps) is refused (lnm_convert and lnm_predict alike). GDCM's GetGDCMSeriesFileNames gives the same
    order (tests/test_library_helpers.py) but reads every header of a folder again and lets missing slices pass."""
    normal = np.cross(*np.asarray(files[0][1].ImageOrientationPatient, dtype=float).reshape(2, 3))
    files = sorted(files, key=lambda f: float(np.dot(np.asarray(f[1].ImagePositionPatient, dtype=float), normal)))
    positions = np.array([np.dot(np.asarray(f[1].ImagePositionPatient, dtype=float), normal) for f in files])
    gaps = np.diff(positions)
    if len(gaps) and (gaps.min() <= 0 or np.ptp(gaps) > SLICE_SPACING_RTOL * gaps.mean()):
        raise LNMError(f"{files[0][0].parent}: slices are not evenly spaced (gaps {gaps.min():.3g} to "
                       f"{gaps.max():.3g} mm: missing or duplicate slices?); export the complete series")
    return files


def read_series(files: list[Path]) -> sitk.Image:
    """The image series as one volume in HU (SimpleITK/GDCM applies rescale slope and intercept)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    try:
        return reader.Execute()
    except RuntimeError as e:
        damaged = next(((f, why) for f in files if (why := damage(f))), None)
        if damaged:
            raise LNMError(f"{damaged[0]}: damaged or truncated DICOM file ({damaged[1]}); copy or export the series "
                           "again") from None
        raise LNMError(f"{files[0].parent}: the DICOM series cannot be read ({str(e).strip().splitlines()[-1][:150]})") from None


def select_segments(names: dict[int, str], wanted: list[str] | None, path: Path,
                    search_texts: dict[int, str] | None = None) -> list[int]:
    """Numbers of the segments named in ``wanted`` (case insensitive), or of those whose name (or
    ``search_texts``: name and coded meaning) looks like a lymph node."""
    if wanted:
        by_name = {n.lower(): k for k, n in names.items()}
        chosen = []
        for w in wanted:
            if w.lower() not in by_name:
                close = difflib.get_close_matches(w.lower(), list(by_name), n=1, cutoff=0.4)
                hint = f"; did you mean '{names[by_name[close[0]]]}'?" if close else ""
                raise LNMError(f"{path}: no segment named '{w}' (segments: {', '.join(names.values())}){hint}")
            chosen.append(by_name[w.lower()])
        return chosen
    chosen = [k for k, n in (search_texts or names).items() if LN_NAME.search(n)]
    if not chosen and len(names) == 1:
        chosen = list(names)
    if not chosen:
        raise LNMError(f"{path}: no segment looks like a lymph node ({', '.join(names.values())}); "
                       "pass --segment NAME")
    return chosen


def convert_dicom_case(case: DicomCase, segments: list[str] | None = None,
                       min_volume_mm3: float = DEFAULT_MIN_VOLUME_MM3) -> ConvertedCase:
    """Read one case and build its instance mask from the selected segments."""
    image = read_series(case.image_files)
    values = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(values.dtype, np.integer) and values.min() >= -2 ** 15 and values.max() < 2 ** 15:
        image = sitk.Cast(image, sitk.sitkInt16)     # GDCM returns 32-bit HU; 16 bits hold them exactly
    if case.modality == "SEG":
        names, chosen, masks, warnings = _seg_masks(case, image, segments)
    else:
        names, chosen, masks, warnings = _rtstruct_masks(case, image, segments)
    labels = np.zeros(image.GetSize()[::-1], dtype=np.uint16)
    for value, mask in enumerate(masks, start=1):
        overlap = mask & (labels > 0)
        if overlap.any():       # the voxel stays with the first segment; say so, a node may vanish in another
            first = names[chosen[int(np.bincount(labels[overlap]).argmax()) - 1]]
            kept = "no voxel" if overlap.sum() == mask.sum() else f"{int(mask.sum() - overlap.sum())} voxel(s)"
            warnings.append(f"{case.case_id}: segment '{names[chosen[value - 1]]}' overlaps '{first}' in "
                            f"{int(overlap.sum())} voxel(s), which stay with '{first}'; it keeps {kept}")
        labels[mask & (labels == 0)] = value
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    split = split_components(label_image, min_volume_mm3)
    segment_of_node = [names[chosen[v - 1]] for v in split.source_values]
    note = (f"{case.case_id}: {case.modality} {case.structure_file.name}, segment(s) "
            f"{', '.join(repr(names[k]) for k in chosen)} -> {split.summary(min_volume_mm3)}")
    return ConvertedCase(case.case_id, image, split, segment_of_node, note, warnings)


def _seg_masks(case: DicomCase, image: sitk.Image, segments: list[str] | None):
    """(names, chosen numbers, masks on the image grid, warnings) of a DICOM-SEG; a segment wholly off the image
    is refused."""
    seg = dicom_seg.read_seg(case.structure_file)
    names = dicom_seg.segment_names(seg)
    chosen = select_segments(names, segments, case.structure_file, dicom_seg.segment_search_texts(seg))
    masks, warnings = [], []
    for k in chosen:
        mask, voxels, inside = dicom_seg.segment_on_grid(seg, k, image, case.structure_file)
        if voxels and not inside:
            raise LNMError(f"{case.structure_file}: segment '{names[k]}': all {voxels} voxel(s) lie outside the image "
                           f"series ({case.image_files[0].parent}); was it made on another series?")
        if inside < voxels:
            warnings.append(f"{case.case_id}: segment '{names[k]}': {voxels - inside} of {voxels} voxel(s) lie "
                            "outside the image and were ignored")
        masks.append(mask)
    return names, chosen, masks, warnings


def _rtstruct_masks(case: DicomCase, image: sitk.Image, segments: list[str] | None):
    """(names, chosen numbers, masks on the image grid, warnings) of an RTSTRUCT; an ROI wholly outside the image
    or in another frame of reference is refused."""
    path = case.structure_file
    ds = rtstruct.read_rtstruct(path)
    names = rtstruct.roi_names(ds)
    chosen = select_segments(names, segments, path)
    masks, warnings = [], []
    for k in chosen:
        frame = rtstruct.roi_frame_of_reference(ds, k)
        if frame and case.frame_of_reference and frame != case.frame_of_reference:
            raise LNMError(f"{path}: ROI '{names[k]}' is drawn in frame of reference {frame}, not in the image "
                           f"series' ({case.frame_of_reference}); export it with the series it was drawn on")
        mask, cover = rtstruct.rasterize_roi(ds, k, image, path, names[k])
        if cover.contours and cover.outside == cover.contours:
            raise LNMError(f"{path}: ROI '{names[k]}': all {cover.contours} contour(s) lie outside the image series "
                           f"({case.image_files[0].parent}); was it drawn on another series?")
        roi = f"{case.case_id}: ROI '{names[k]}'"
        if cover.outside:
            warnings.append(f"{roi}: {cover.outside} of {cover.contours} contour(s) lie outside the image and were ignored")
        if cover.cut:
            warnings.append(f"{roi}: {cover.cut} contour(s) cut at the edge of the image")
        if not cover.contours:
            warnings.append(f"{roi}: no closed contour, so no node from it")
        elif not mask.any():
            warnings.append(f"{roi}: its {cover.contours - cover.outside} contour(s) on the image enclose no voxel "
                            "centre, so no node from it")
        masks.append(mask)
    return names, chosen, masks, warnings


def _merge_node_rows(table_path: Path, converted: list[ConvertedCase]) -> None:
    """nodes.csv rows of the converted cases (empty station and label) replace any earlier rows of those cases."""
    import pandas as pd
    new = nodes_skeleton({c.case_id: c.split.n_nodes for c in converted},
                         {c.case_id: c.segment_of_node for c in converted})
    if table_path.is_file():
        old = pd.read_csv(table_path, dtype=str, keep_default_na=False)
        new = pd.concat([old[~old["case"].str.strip().isin(new["case"])], new.astype(str)], ignore_index=True).fillna("")
    save_csv_atomic(new, table_path)


def convert_dicom_folder(folder: Path, output: Path | None = None, raw_root: Path | None = None,
                         dataset_id: int | None = None, name: str = "DICOM", test: bool = False,
                         case_id: str | None = None, segments: list[str] | None = None,
                         min_volume_mm3: float = DEFAULT_MIN_VOLUME_MM3) -> tuple[Path, list[ConvertedCase]]:
    """Convert every case below ``folder`` into ``output`` (lnm_predict layout: <case>_0000.nii.gz,
    <case>_nodes.nii.gz, nodes.csv) or into raw dataset ``dataset_id`` (created if new; cases added)."""
    cases = find_dicom_cases(folder, case_id)
    converted = [convert_dicom_case(c, segments, min_volume_mm3) for c in cases]
    channel = CHANNEL_NAME.get(cases[0].image_modality, cases[0].image_modality)
    if output is not None:
        root, table = Path(output), Path(output) / "nodes.csv"
        targets = {c.case_id: (root / f"{c.case_id}_0000.nii.gz", root / f"{c.case_id}_nodes.nii.gz") for c in converted}
    else:
        root = _dataset_root(Path(raw_root), dataset_id, name, channel)
        split = "Ts" if test else "Tr"
        table = root / ("nodesTs.csv" if test else "nodes.csv")
        targets = {c.case_id: (root / f"images{split}" / f"{c.case_id}_0000.nii.gz",
                               root / f"nodes{split}" / f"{c.case_id}.nii.gz") for c in converted}
    for c in converted:
        if targets[c.case_id][0].is_file() and not _same_image(targets[c.case_id][0], c.image):
            raise LNMError(f"{targets[c.case_id][0]}: case '{c.case_id}' is already there with another image, or one "
                           "that cannot be read (another patient whose id came out the same?); remove it first, or "
                           "convert this one with --case NAME")
    for c in converted:
        image_file, mask_file = targets[c.case_id]
        write_mask(c.image, image_file)
        write_mask(c.split.mask, mask_file)
    _merge_node_rows(table, converted)
    if output is None:
        meta = load_json(root / "dataset.json")
        meta["numTraining"] = len(list((root / "nodesTr").glob("*.nii.gz"))) if (root / "nodesTr").is_dir() else 0
        save_json(meta, root / "dataset.json")
    return root, converted


def _same_image(path: Path, image: sitk.Image) -> bool:
    """Whether ``path`` holds ``image`` (grid and voxels): converting the same series again may replace it."""
    try:
        old = sitk.ReadImage(str(path))
    except RuntimeError:
        return False        # unreadable: not ours to judge, so never overwritten
    same_grid = old.GetSize() == image.GetSize() and all(
        np.allclose(a, b, atol=1e-4) for a, b in ((old.GetSpacing(), image.GetSpacing()),
                                                   (old.GetOrigin(), image.GetOrigin()),
                                                   (old.GetDirection(), image.GetDirection())))
    return same_grid and np.array_equal(sitk.GetArrayViewFromImage(old), sitk.GetArrayViewFromImage(image))


def _dataset_root(raw_root: Path, dataset_id: int, name: str, channel: str) -> Path:
    """The raw dataset with ``dataset_id`` (created with a dataset.json if there is none)."""
    existing = sorted(raw_root.glob(f"Dataset{int(dataset_id):03d}_*")) if raw_root.is_dir() else []
    if existing:
        meta_file = existing[0] / "dataset.json"
        meta = load_json(meta_file) if meta_file.is_file() else {}
        if meta.get("channel_names", {"0": channel}) != {"0": channel} or meta.get("file_ending", ".nii.gz") != ".nii.gz":
            raise LNMError(f"{meta_file}: channels {meta.get('channel_names')} / ending {meta.get('file_ending')} do "
                           f"not fit a single {channel} channel in .nii.gz; choose another -d")
        return existing[0]
    root = raw_root / dataset_folder_name(dataset_id, name)
    save_json({"name": name, "channel_names": {"0": channel}, "file_ending": ".nii.gz", "numTraining": 0,
               "description": "converted from DICOM (series + RTSTRUCT/SEG) by lnm_convert dicom"}, root / "dataset.json")
    return root
