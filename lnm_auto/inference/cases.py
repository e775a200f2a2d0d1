"""lnm_predict's input cases: found in ``-i``, read (NIfTI/NRRD/MHA channels or one DICOM series per folder).

Input layouts (``-i FOLDER``):
  * ``<case>_0000<ending>`` (one per channel) with the node mask ``<case>_nodes<ending>`` beside them;
  * a raw dataset's ``imagesTs/`` (or ``imagesTr/``): masks are found in ``nodesTs/<case><ending>``;
  * one sub-folder per case holding a DICOM series and the node mask as NIfTI/NRRD/MHA.
With a node detector (``detection=True``) a case without a node mask is kept, marked ``needs_detection``, with
its region map if it has one (``<case>_regions<ending>`` beside the images, or ``regionsTs/<case><ending>``
beside ``imagesTs/``) and the stations' names from ``regions.csv`` in ``-i`` (``region_table_file``).
An optional ``nodes.csv`` (case,node,station[,...]) in ``-i`` -- or the raw dataset's ``nodesTs.csv`` beside
``imagesTs/`` -- names each node's station (``station_table``). Every file read here is an input:
``input_locations`` names them so the output folder can be kept apart.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import SimpleITK as sitk

from lnm_auto.datasets.raw_dataset import CHANNEL_SUFFIX, SAFE_CASE_ID, read_image
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.tables import node_ids, read_csv_text

IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
MAX_HINT_FOLDERS = 200   # folders searched for a misplaced node mask (beside -i and inside it)
UNKNOWN_STATION = "unknown"
NO_DETECTOR = "; or let a detector find the nodes: train one (lnm_train_detector) or pass --detector FOLDER"


@dataclass
class InputCase:
    case_id: str
    image_files: list[Path] = field(default_factory=list)   # one per channel (empty for DICOM)
    dicom_dir: Path | None = None
    node_mask_file: Path | None = None
    needs_detection: bool = False                          # no node mask: the detector finds the nodes
    regions_file: Path | None = None                       # its region map (stations of detected nodes)
    detection: dict[int, tuple[float, str]] | None = None  # detected node -> (confidence, station)


def _ending(name: str) -> str | None:
    return next((e for e in IMAGE_ENDINGS if name.endswith(e)), None)


def _input_folder(input_dir: Path) -> Path:
    """``-i`` as a folder, or one line saying what it is instead."""
    if input_dir.is_file():
        raise LNMError(f"-i {input_dir}: is a file, not a folder; give the folder holding <case>_0000.nii.gz and "
                       "<case>_nodes.nii.gz (or an imagesTs/ folder, or one DICOM folder per case)")
    if not input_dir.is_dir():
        raise LNMError(f"-i {input_dir}: no such folder")
    return input_dir


def discover_cases(input_dir: Path, num_channels: int, detection: bool = False) -> tuple[list[InputCase], list[str]]:
    """Cases in ``input_dir`` and one problem line per case that cannot be run. ``detection``: a detector can find
    the nodes of a case without a node mask (kept, ``needs_detection``), else such a case is a problem line."""
    input_dir = _input_folder(Path(input_dir))
    cases, problems = [], []
    entries = [f for f in sorted(input_dir.iterdir()) if _ending(f.name)]
    files = [f for f in entries if f.is_file()]
    for f in entries:   # named like an image but not one: said, never skipped silently
        if f.is_dir():
            problems.append(f"{f}: is a folder, not an image file; rename or move it")
        elif not f.is_file():
            problems.append(f"{f}: a symbolic link that points nowhere (or loops); replace it with the file")
    channel_files: dict[str, dict[int, Path]] = {}
    doubled: set[str] = set()
    for f in files:
        m = CHANNEL_SUFFIX.match(f.name[: -len(_ending(f.name))])
        if not m:
            continue
        case_id, channel = m.group("case"), int(m.group("channel"))
        given = channel_files.setdefault(case_id, {})
        if channel in given:   # case_000_0000.nii.gz and case_000_0000.nrrd: which one is meant?
            problems.append(f"{f}: channel {channel} of case '{case_id}' is also given as {given[channel]}; "
                            "keep one of the two files")
            doubled.add(case_id)
        given.setdefault(channel, f)
    sibling_masks = input_dir.parent / input_dir.name.replace("images", "nodes", 1) \
        if input_dir.name.startswith("images") else None
    hint_folders: list[Path] | None = None
    for case_id, chans in sorted(channel_files.items()):
        if case_id in doubled:
            continue
        ending = _ending(chans[min(chans)].name)
        missing = [c for c in range(num_channels) if c not in chans]
        if missing:
            problems.append(f"{input_dir / f'{case_id}_{missing[0]:04d}{ending}'}: missing channel {missing[0]} of "
                            f"case '{case_id}' (the model needs {num_channels} channel(s))")
            continue
        candidates = [input_dir / f"{case_id}_nodes{ending}"]
        if sibling_masks is not None:
            candidates.append(sibling_masks / f"{case_id}{ending}")
        others = [c.parent / c.name.replace(ending, e) for c in candidates for e in IMAGE_ENDINGS if e != ending]
        mask = next((c for c in candidates + others if c.is_file()), None)
        if mask is None and detection:
            cases.append(InputCase(case_id, [chans[c] for c in range(num_channels)], needs_detection=True,
                                   regions_file=_region_map(input_dir, case_id, ending)))
            continue
        if mask is None:
            hint_folders = _hint_folders(input_dir) if hint_folders is None else hint_folders
            problems.append(_missing_mask(case_id, candidates, hint_folders))
            continue
        cases.append(InputCase(case_id, [chans[c] for c in range(num_channels)], node_mask_file=mask))
    cases += _dicom_cases(input_dir, num_channels, problems, detection)
    problems += _unusable_case_ids(input_dir, cases)
    problems = list(dict.fromkeys(problems))
    cases.sort(key=lambda c: c.case_id)
    if not cases and not problems:
        if dicom_series_ids(input_dir):
            raise LNMError(f"-i {input_dir}: holds DICOM files itself; put each case's series and its node mask "
                           "into a sub-folder of its own (-i names the folder holding those sub-folders)")
        raise LNMError(f"-i {input_dir}: no cases found (expected <case>_0000.nii.gz + <case>_nodes.nii.gz, an "
                       "imagesTs/ folder beside nodesTs/, or one DICOM folder per case)")
    return cases, problems


def _dicom_cases(input_dir: Path, num_channels: int, problems: list[str], detection: bool = False
                 ) -> list[InputCase]:
    """One case per sub-folder holding a DICOM series (problems appended to ``problems``); ``detection``: a
    folder without a node mask is a case for the detector."""
    cases = []
    for sub in sorted(p for p in input_dir.iterdir() if p.is_dir()):
        series = dicom_series_ids(sub)
        if not series:
            continue
        masks = [f for f in sorted(sub.iterdir()) if f.is_file() and _ending(f.name)]
        if num_channels != 1:
            problems.append(f"{sub}: DICOM input holds one channel, the model needs {num_channels}")
        elif len(series) > 1:
            problems.append(f"{sub}: {len(series)} DICOM series in one folder; keep one series per case folder")
        elif not masks and detection:
            cases.append(InputCase(sub.name, dicom_dir=sub, needs_detection=True))
        elif len(masks) != 1:
            problems.append(f"{sub}: expected exactly one node mask (NIfTI/NRRD/MHA) beside the DICOM series, "
                            f"found {len(masks)}" + ("" if masks else NO_DETECTOR))
        else:
            cases.append(InputCase(sub.name, dicom_dir=sub, node_mask_file=masks[0]))
    return cases


def dicom_series_ids(folder: Path) -> tuple[str, ...]:
    """The DICOM series in ``folder`` (not below it), without ITK's warning for a folder holding none."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _unusable_case_ids(input_dir: Path, cases: list[InputCase]) -> list[str]:
    """Remove (from ``cases``) the cases whose id is given twice or is no safe file name; their problem lines."""
    problems = []
    seen: dict[str, int] = {}
    for c in cases:
        seen[c.case_id] = seen.get(c.case_id, 0) + 1
    for c in list(cases):
        if seen[c.case_id] > 1:
            problems.append(f"{input_dir}: case id '{c.case_id}' is given twice (files and a DICOM folder); rename one")
        elif not SAFE_CASE_ID.match(c.case_id):
            named = c.node_mask_file or c.dicom_dir or c.image_files[0]   # a case to detect has no mask yet
            problems.append(f"{named}: case id '{c.case_id}' is not a safe file name (use letters, digits, "
                            "'_', '-', '.'; no leading '.' or '-'); rename the files")
        else:
            continue
        cases.remove(c)
    return problems


def _hint_folders(input_dir: Path) -> list[Path]:
    """Folders where a misplaced node mask may sit: beside ``-i`` (labelsTs/, masks/ ...) and inside it."""
    found = []
    for parent in (input_dir.parent, input_dir):
        try:
            found += sorted(p for p in parent.iterdir() if p.is_dir() and p != input_dir)[:MAX_HINT_FOLDERS]
        except OSError:
            continue
    return found


def _missing_mask(case_id: str, candidates: list[Path], hint_folders: list[Path]) -> str:
    """The problem line of a case without a node mask: where it was expected, and where a file with the case's
    name was found instead (nnU-Net's labelsTs/, a masks/ folder ...)."""
    line = (f"{candidates[-1]}: node mask of case '{case_id}' not found (expected "
            f"{' or '.join(str(c) for c in candidates)})")
    names = [f"{case_id}{e}" for e in IMAGE_ENDINGS] + [f"{case_id}_nodes{e}" for e in IMAGE_ENDINGS]
    found = next((folder / n for folder in hint_folders for n in names if (folder / n).is_file()), None)
    if found is not None:
        labels = found.parent.name.startswith("labels")
        nnunet = " (nnU-Net labels: lnm_convert nnunet converts the dataset)" if labels else ""
        line += f"; {found} has the case's name: if it is the node mask, put it at {candidates[-1]}{nnunet}"
    return line + NO_DETECTOR


def read_case_images(case: InputCase) -> tuple[list[sitk.Image], str | None]:
    """The image channels of one input case (NIfTI files or its DICOM series) and, for DICOM, the series'
    Modality tag (None for other files)."""
    if case.dicom_dir is not None:
        return read_dicom_case(case.dicom_dir)
    return [read_image(f) for f in case.image_files], None


def read_dicom_case(folder: Path) -> tuple[list[sitk.Image], str | None]:
    """A case folder's DICOM series, refused like lnm_convert refuses it when slices are missing or doubled."""
    import pydicom   # only DICOM cases pay for pydicom and the converters
    from lnm_auto.conversion.dicom import sorted_slices
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    try:
        headers = [(Path(n), pydicom.dcmread(n, stop_before_pixels=True)) for n in names]
    except (pydicom.errors.InvalidDicomError, OSError, ValueError) as e:
        raise LNMError(f"{folder}: DICOM series cannot be read ({str(e)[:150]})") from None
    lacking = next((p for p, ds in headers if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds),
                   None)
    if lacking is not None:
        raise LNMError(f"{lacking}: no ImagePositionPatient/ImageOrientationPatient, so the series cannot be checked "
                       "for missing slices; export the series with its position tags")
    headers = sorted_slices(headers)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p, _ in headers])
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise LNMError(f"{folder}: DICOM series cannot be read ({str(e).strip().splitlines()[-1][:150]})") from None
    modality = str(getattr(headers[0][1], "Modality", "") or "") or None
    return [image], modality


def input_locations(input_dir: Path, cases: list[InputCase], extra_files: list[Path]) -> list[Path]:
    """Every folder and file a run reads: ``-i``, each case's files (images, DICOM folder, node mask) and
    ``extra_files`` (the node table)."""
    found = [Path(input_dir)]
    for c in cases:
        given = [f for f in (c.dicom_dir, c.regions_file, None if c.needs_detection else c.node_mask_file) if f]
        found += [*c.image_files, *given]
    return found + [Path(f) for f in extra_files]


def _region_map(input_dir: Path, case_id: str, ending: str) -> Path | None:
    """A case's region map: ``<case>_regions<ending>`` beside its images, or ``regionsTs/<case><ending>`` beside
    ``imagesTs/`` (any image ending)."""
    candidates = [input_dir / f"{case_id}_regions{e}" for e in (ending, *IMAGE_ENDINGS)]
    if input_dir.name.startswith("images"):
        regions = input_dir.parent / input_dir.name.replace("images", "regions", 1)
        candidates += [regions / f"{case_id}{e}" for e in (ending, *IMAGE_ENDINGS)]
    return next((c for c in candidates if c.is_file()), None)


def region_table_file(input_dir: Path) -> Path | None:
    """``regions.csv`` (region,station) in the input folder: the station names of the region maps' values."""
    path = Path(input_dir) / "regions.csv"
    return path if path.is_file() else None


def station_table(input_dir: Path) -> tuple[pd.DataFrame | None, str]:
    """Stations from the input's node table (``station_table_file``); else None and the warning line saying why
    every node's station will be ``unknown``."""
    p = station_table_file(input_dir)
    if p is None:
        return None, (f"{input_dir}: no nodes.csv with a station column; stations.csv lists every node under station "
                      f"'{UNKNOWN_STATION}'")
    df = read_csv_text(p, "node table", required=("case", "node"))
    if "station" not in df.columns:
        return None, f"{p}: no 'station' column; stations.csv lists every node under station '{UNKNOWN_STATION}'"
    table = pd.DataFrame({"case": df["case"], "node": node_ids(df["node"], p), "station": df["station"]})
    dup = table[table.duplicated(["case", "node"])]
    if len(dup):
        raise LNMError(f"{p}: node {dup.node.iloc[0]} of case '{dup.case.iloc[0]}' is listed more than once")
    return table, ""


def station_table_file(input_dir: Path) -> Path | None:
    """The input's node table: ``nodes.csv`` in the input folder, or ``nodesTs.csv`` beside ``imagesTs/``."""
    candidates = [input_dir / "nodes.csv"]
    if input_dir.name.startswith("images"):
        candidates.append(input_dir.parent / (input_dir.name.replace("images", "nodes", 1) + ".csv"))
    return next((p for p in candidates if p.is_file()), None)
