"""Dataset verification: report *every* problem, one line each, naming the file and what to fix.

``lnm_plan_and_preprocess`` (``--verify``, on by default) runs these checks in its two passes over the files
(``check_headers_and_mask`` with the node masks, ``read_checked_images`` with the images) and turns the problems
into one non-zero exit; ``verify_dataset`` runs the same checks alone. Nothing here raises on bad data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from lnm_auto.imaging.components import DEFAULT_MIN_VOLUME_MM3, needs_splitting
from lnm_auto.datasets.raw_dataset import (SAFE_CASE_ID, Grid, RawCase, RawDataset, node_id_range_problem, parse_label,
                                           read_image, read_image_header, read_image_voxels)
from lnm_auto.imaging.geometry import node_boxes
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.labels import unknown_hint
from lnm_auto.utils.processes import map_in_workers

# Geometry tolerances: scanners and converters round differently; these catch real mismatches only.
SPACING_RTOL = 1e-4
ORIGIN_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-4

REQUIRED_COLUMNS = {
    "nodes.csv": ("case", "node", "station", "label"),
    "stations.csv": ("case", "station", "label"),
    "patients.csv": ("case", "label"),
}


@dataclass
class CaseCheck:
    case_id: str
    problems: list[str] = field(default_factory=list)
    mask_node_ids: set[int] = field(default_factory=set)
    # image files whose headers passed: their voxels are what ``read_checked_images`` checks
    readable_images: list[Path] = field(default_factory=list)
    reference: Grid | None = None      # channel 0's grid (from its header): the case's geometry
    # what was read, kept when asked (``keep_mask=True``) so the node measurements need no second read
    mask: sitk.Image | None = None
    boxes: list | None = None          # the mask's node_boxes


def geometry_mismatches(reference: sitk.Image, other: sitk.Image) -> list[str]:
    """Human-readable differences in size/spacing/origin/direction (empty if the grids agree)."""
    out = []
    if reference.GetSize() != other.GetSize():
        out.append(f"size {other.GetSize()} != image size {reference.GetSize()}")
    if not np.allclose(reference.GetSpacing(), other.GetSpacing(), rtol=SPACING_RTOL, atol=0):
        out.append(f"spacing {_fmt(other.GetSpacing())} != image spacing {_fmt(reference.GetSpacing())}")
    if not np.allclose(reference.GetOrigin(), other.GetOrigin(), rtol=0, atol=ORIGIN_ATOL_MM):
        out.append(f"origin {_fmt(other.GetOrigin())} != image origin {_fmt(reference.GetOrigin())}")
    if not np.allclose(reference.GetDirection(), other.GetDirection(), rtol=0, atol=DIRECTION_ATOL):
        out.append("direction differs from the image's direction")
    return out


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _read(path: Path, problems: list[str], reader=read_image):
    """``reader(path)`` (the image; or its header: ``read_image_header``), or None and one more problem line.
    Both refuse NIfTI headers with non-positive spacings; reading the image also refuses truncated files."""
    if not path.is_file():
        problems.append(f"{path}: file missing")
        return None
    try:
        return reader(path)
    except LNMError as e:
        problems.append(str(e))
        return None


def binary_mask_problems(mask: sitk.Image, path: Path, boxes: list | None = None) -> list[str]:
    """One line when the node mask looks binary (more separate nodes than ids), else nothing (``boxes``: the
    mask's node_boxes, when known)."""
    counts = needs_splitting(mask, boxes=boxes)
    if counts is None:
        return []
    n_labels, n_components = counts
    return [f"{path}: looks like a binary node mask ({n_labels} label value(s) but {n_components} separate "
            f"26-connected components of at least {DEFAULT_MIN_VOLUME_MM3:g} mm^3); lnm_auto needs one id per node: "
            "re-run with lnm_plan_and_preprocess --split_components (or convert the dataset with lnm_convert)"]


def extra_channel_problems(case: RawCase) -> list[str]:
    """One line when the images folder holds more channel files of the case (<case>_0001 ...) than
    dataset.json's channel_names list: otherwise they would be ignored silently."""
    if not case.image_files:
        return []
    first, n_channels = case.image_files[0], len(case.image_files)
    start = len(case.case_id) + 1                  # <case>_NNNN<ending>: the channel number's position
    ending = first.name[start + 4:]
    extra = sorted(f.name for f in first.parent.glob(f"{case.case_id}_[0-9][0-9][0-9][0-9]{ending}")
                   if int(f.name[start:start + 4]) >= n_channels)
    if not extra:
        return []
    return [f"{first.parent / extra[0]}: channel file(s) {', '.join(extra)} beyond the {n_channels} "
            f"channel(s) of dataset.json's channel_names; add the channel there or remove the file(s)"]


def check_case(case: RawCase) -> CaseCheck:
    """Every per-file check of one case: files present, readable, finite, same geometry, integer mask. The
    headers and the node mask are checked first, then the images' voxels: lnm_plan_and_preprocess does the two
    halves in its two passes over a dataset (the node masks, then the images), in the same order."""
    result = check_headers_and_mask(case)
    result.problems += read_checked_images(result.readable_images)[2]
    return result


def read_checked_images(image_files: list[Path]) -> tuple[list[np.ndarray], Grid | None, list[str]]:
    """The images' voxels (numpy z, y, x) read whole, the first one's grid, and the problems of the files: a
    truncated or damaged file (refused here, not from its header), NaN/Inf voxels."""
    channels, grid, problems = [], None, []
    for image_file in image_files:
        found = _read(image_file, problems, read_image_voxels)
        if found is not None:
            channels.append(found[0])
            grid = grid or found[1]
    return channels, grid, problems


def check_headers_and_mask(case: RawCase, keep_mask: bool = False) -> CaseCheck:
    """The checks of one case that need no image voxel: images present with a readable 3D single-component
    header on one grid, and the whole node mask (integer ids, not binary-looking, the image's geometry).
    ``keep_mask``: keep the mask and its node boxes (when the case has no problem)."""
    result = CaseCheck(case.case_id)
    p = result.problems
    p.extend(extra_channel_problems(case))
    if not SAFE_CASE_ID.match(case.case_id):
        p.append(f"{case.node_mask_file.parent}: case id '{case.case_id}' is not a safe file name "
                 "(use letters, digits, '_', '-', '.'; no spaces, no leading '.' or '-')")
    reference = None
    for image_file in case.image_files:
        header = _read(image_file, p, read_image_header)
        if header is None:
            continue
        if header.GetDimension() != 3 or header.GetNumberOfComponents() != 1:
            p.append(f"{image_file}: must be a 3D single-component image, got {header.GetDimension()}D with "
                     f"{header.GetNumberOfComponents()} component(s)")
            continue
        result.readable_images.append(image_file)
        if reference is None:
            reference = header
        else:
            for m in geometry_mismatches(reference, header):
                p.append(f"{image_file}: {m} of channel 0; all channels must share one grid")
    result.reference = None if reference is None else Grid.of(reference)
    mask = _read(case.node_mask_file, p)
    if mask is not None and (mask.GetDimension() != 3 or mask.GetNumberOfComponentsPerPixel() != 1):
        p.append(f"{case.node_mask_file}: the node mask must be a 3D single-component image, got "
                 f"{mask.GetDimension()}D with {mask.GetNumberOfComponentsPerPixel()} component(s)")
        mask = None
    if mask is not None:
        arr = sitk.GetArrayViewFromImage(mask)
        if np.issubdtype(arr.dtype, np.floating):
            if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
                p.append(f"{case.node_mask_file}: node mask must hold integer node ids, found non-integer values")
        if arr.size and arr.min() < 0:
            p.append(f"{case.node_mask_file}: node mask has negative values; use 0 for background and k > 0 for node k")
        too_large = node_id_range_problem(arr, case.node_mask_file)
        if too_large:
            p.append(too_large)
        boxes = None
        if np.issubdtype(arr.dtype, np.integer) and not too_large:   # (per-id boxes of ids that large: no memory)
            boxes = node_boxes(arr)      # one pass: the ids present and every later per-node step's box
            result.mask_node_ids = {k + 1 for k, box in enumerate(boxes) if box is not None}
        else:
            result.mask_node_ids = {int(i) for i in np.unique(arr) if i > 0 and float(i).is_integer()}
        if not any(str(case.node_mask_file) in line for line in p):   # a broken mask has nothing to split
            p.extend(binary_mask_problems(mask, case.node_mask_file, boxes))
        if reference is not None:
            for m in geometry_mismatches(reference, mask):
                p.append(f"{case.node_mask_file}: {m}; the node mask must have the image's geometry")
    if case.region_file is not None:
        region = _read(case.region_file, p)
        if region is not None and region.GetDimension() != 3:
            p.append(f"{case.region_file}: the region map must be a 3D image")
        elif region is not None and reference is not None:
            for m in geometry_mismatches(reference, region):
                p.append(f"{case.region_file}: {m}; the region map must have the image's geometry")
    if keep_mask and not p:
        result.mask, result.boxes = mask, boxes
    return result


def _check_columns(df: pd.DataFrame, path: Path, problems: list[str]) -> bool:
    missing = [c for c in REQUIRED_COLUMNS[path.name] if c not in df.columns]
    if missing:
        problems.append(f"{path}: missing column(s) {missing}; expected header {','.join(REQUIRED_COLUMNS[path.name])}")
        return False
    return True


def _check_labels(df: pd.DataFrame, path: Path, problems: list[str]) -> pd.Series:
    """Parsed labels (NaN where invalid), reporting each invalid one."""
    parsed = []
    for i, text in enumerate(df["label"]):
        try:
            parsed.append(parse_label(text))
        except ValueError:
            problems.append(f"{path}: line {i + 2}: label '{text}' is not 1, 0 or empty{unknown_hint(text)}")
            parsed.append(np.nan)
    return pd.Series(parsed, index=df.index, dtype=float)


def negative_bag_with_positive_node(bag_label, max_node_label) -> bool:
    """The label contradiction refused here and by lnm_evaluate: a station or patient labelled 0 (negative, N0)
    holding a node labelled 1."""
    return bag_label == 0 and max_node_label == 1


def check_tables(ds: RawDataset, case_checks: dict[str, CaseCheck], compare_masks: bool = True) -> list[str]:
    """nodes.csv / stations.csv / patients.csv: columns, labels, ids against the masks (unless not
    ``compare_masks``: the masks were not read), consistency."""
    problems: list[str] = []
    nodes_path = ds.root / "nodes.csv"
    nodes = ds.read_csv_text("nodes.csv")
    if nodes is None:
        return [f"{nodes_path}: missing; list every node as case,node,station,label"]
    if not _check_columns(nodes, nodes_path, problems):
        return problems
    nodes = nodes.assign(case=nodes["case"].str.strip(), station=nodes["station"].str.strip())
    nodes["label_value"] = _check_labels(nodes, nodes_path, problems)
    node_ids = pd.to_numeric(nodes["node"], errors="coerce")
    for i in np.flatnonzero(node_ids.isna() | (node_ids <= 0) | (node_ids % 1 != 0)):
        problems.append(f"{nodes_path}: line {i + 2}: node id '{nodes['node'].iloc[i]}' must be a positive integer")
    nodes["node_id"] = node_ids
    dup = nodes[nodes.duplicated(["case", "node_id"], keep="first") & node_ids.notna()]
    for _, row in dup.iterrows():
        problems.append(f"{nodes_path}: node {int(row.node_id)} of case '{row.case}' is listed more than once")

    for case_id, group in nodes.groupby("case"):
        if case_id not in case_checks:
            problems.append(f"{nodes_path}: case '{case_id}' has no image in imagesTr/ and no mask in nodesTr/")
            continue
        if not compare_masks:
            continue
        listed = {int(v) for v in group["node_id"].dropna() if float(v).is_integer()}
        in_mask = case_checks[case_id].mask_node_ids
        mask_file = ds.case(case_id).node_mask_file
        for k in sorted(listed - in_mask):
            if mask_file.is_file():
                problems.append(f"{nodes_path}: node {k} of case '{case_id}' does not occur in {mask_file}")
        for k in sorted(in_mask - listed):
            problems.append(f"{mask_file}: node id {k} is not listed in {nodes_path}")
    for case_id in sorted(set(case_checks) - set(nodes["case"])):
        if compare_masks and case_checks[case_id].mask_node_ids:
            problems.append(f"{nodes_path}: case '{case_id}' has nodes in its mask but no rows")

    stations_path = ds.root / "stations.csv"
    stations = ds.read_csv_text("stations.csv")
    if stations is not None and _check_columns(stations, stations_path, problems):
        stations = stations.assign(case=stations["case"].str.strip(), station=stations["station"].str.strip())
        stations["label_value"] = _check_labels(stations, stations_path, problems)
        for _, row in stations[stations.duplicated(["case", "station"])].iterrows():
            problems.append(f"{stations_path}: station '{row.station}' of case '{row.case}' is listed more than once")
        node_max = nodes.groupby(["case", "station"])["label_value"].max()
        for _, row in stations.iterrows():
            if row.case not in case_checks:
                problems.append(f"{stations_path}: case '{row.case}' has no image in imagesTr/")
                continue
            if negative_bag_with_positive_node(row.label_value, node_max.get((row.case, row.station), 0)):
                problems.append(f"{stations_path}: station '{row.station}' of case '{row.case}' is labelled 0 "
                                f"but holds a node labelled 1 in nodes.csv; fix one of them")

    patients_path = ds.root / "patients.csv"
    patients = ds.read_csv_text("patients.csv")
    if patients is not None and _check_columns(patients, patients_path, problems):
        patients = patients.assign(case=patients["case"].str.strip())
        patients["label_value"] = _check_labels(patients, patients_path, problems)
        for case_id in patients.loc[patients.duplicated("case"), "case"]:
            problems.append(f"{patients_path}: case '{case_id}' is listed more than once")
        node_case_max = nodes.groupby("case")["label_value"].max()
        for _, row in patients.iterrows():
            if row.case not in case_checks:
                problems.append(f"{patients_path}: case '{row.case}' has no image in imagesTr/")
            elif negative_bag_with_positive_node(row.label_value, node_case_max.get(row.case, 0)):
                problems.append(f"{patients_path}: case '{row.case}' is labelled N0 (0) but has a node labelled 1")
    return problems


def verify_dataset(ds: RawDataset, num_processes: int = 1, progress: bool = True) -> list[str]:
    """All problems of the training part of a dataset (empty list = fine)."""
    problems = case_list_problems(ds)
    if not ds.case_ids("Tr"):
        return problems
    checks = map_in_workers(check_case, [ds.case(c) for c in ds.case_ids("Tr")], num_processes, "verify", progress)
    return problems + case_and_table_problems(ds, checks)


def case_list_problems(ds: RawDataset) -> list[str]:
    """No training case at all, or case ids that collide on case-insensitive file systems."""
    case_ids = ds.case_ids("Tr")
    if not case_ids:
        return [f"{ds.root / 'imagesTr'}: no training cases found (expected <case>_0000{ds.file_ending} files)"]
    problems: list[str] = []
    lower: dict[str, str] = {}
    for c in case_ids:
        if c.lower() in lower:
            problems.append(f"{ds.root / 'imagesTr'}: case ids '{lower[c.lower()]}' and '{c}' differ only in "
                            "upper/lower case; they collide on many file systems")
        lower[c.lower()] = c
    return problems


def case_and_table_problems(ds: RawDataset, checks: list[CaseCheck]) -> list[str]:
    """The problems ``check_case`` found in each case, then those of the label tables against the masks."""
    problems = [line for c in checks for line in c.problems]
    try:
        problems.extend(check_tables(ds, {c.case_id: c for c in checks}))
    except LNMError as e:
        problems.append(str(e))
    return problems


def header_problems(case: RawCase) -> list[str]:
    """The checks of one case that need headers only: files readable, 3D single-component, one grid."""
    problems: list[str] = []
    if not SAFE_CASE_ID.match(case.case_id):
        problems.append(f"{case.node_mask_file.parent}: case id '{case.case_id}' is not a safe file name "
                        "(use letters, digits, '_', '-', '.'; no spaces, no leading '.' or '-')")
        return problems
    headers = []
    for path, what in [(f, "image") for f in case.image_files] + [(case.node_mask_file, "node mask")]:
        try:
            header = read_image_header(path)
        except LNMError as e:
            problems.append(str(e))
            continue
        if header.GetDimension() != 3 or header.GetNumberOfComponents() != 1:
            problems.append(f"{path}: the {what} must be a 3D single-component image, got {header.GetDimension()}D "
                            f"with {header.GetNumberOfComponents()} component(s)")
            continue
        headers.append((path, header))
        if what == "node mask" and header.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
            problems += _float_mask_problems(path)   # fractions would become wrong node ids
    for path, header in headers[1:]:
        for m in geometry_mismatches(headers[0][1], header):
            problems.append(f"{path}: {m} of channel 0; the node mask and all channels must share one grid")
    return problems


def _float_mask_problems(path: Path) -> list[str]:
    """A float node mask must hold whole, finite, non-negative numbers (its voxels are read to check)."""
    try:
        mask = read_image(path)     # held while its voxels are viewed: a view of a freed image reads garbage
    except LNMError as e:
        return [str(e)]
    arr = sitk.GetArrayViewFromImage(mask)
    if not (np.isfinite(arr).all() and np.array_equal(arr, np.round(arr)) and (arr.size == 0 or arr.min() >= 0)):
        return [f"{path}: node mask must hold integer node ids (0 background, k for node k), found non-integer or "
                "negative values"]
    too_large = node_id_range_problem(arr, path)
    return [too_large] if too_large else []


def safety_problems(ds: RawDataset) -> list[str]:
    """What ``--no-verify`` still checks, because skipping it would make the output wrong, not just
    unchecked: case ids, every file's header (3D, one component, image and mask on one grid) and the
    tables (columns, node ids, labels, duplicate rows). Voxel checks (NaN/Inf, truncation, mask ids
    against nodes.csv) run where the voxels are read anyway: fingerprint and preprocessing."""
    case_ids = ds.case_ids("Tr")
    if not case_ids:
        return [f"{ds.root / 'imagesTr'}: no training cases found (expected <case>_0000{ds.file_ending} files)"]
    problems = [line for c in case_ids for line in header_problems(ds.case(c))]
    try:
        problems.extend(check_tables(ds, {c: CaseCheck(c) for c in case_ids}, compare_masks=False))
    except LNMError as e:
        problems.append(str(e))
    return problems
