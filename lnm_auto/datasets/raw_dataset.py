"""Reading the raw dataset convention (documentation/dataset_format.md).

    Dataset001_Name/
      dataset.json, imagesTr/<case>_0000<ending>, nodesTr/<case><ending>, nodes.csv,
      optional stations.csv, patients.csv, regionsTr/, imagesTs/, nodesTs/

The reader is lenient: it lists what is there and keeps the CSVs as text. ``verify`` reports every
problem; the typed tables (``node_table`` ...) are for data that passed verification.
"""
from __future__ import annotations

import contextlib
import errno
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from lnm_auto.datasets.nifti import check_nifti_file, read_checked_nifti, read_checked_nifti_voxels
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import load_json
from lnm_auto.utils.labels import UNKNOWN, parse_label  # noqa: F401  (re-exported)
from lnm_auto.utils.tables import parse_node_id, read_csv_text

SAFE_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
# Image grids lnm_auto reads (anything else is a header in another unit, or a damaged one)
MIN_SPACING_MM, MAX_SPACING_MM = 0.01, 50.0
DIRECTION_ORTHONORMAL_ATOL = 1e-3
MAX_NODE_ID = 2 ** 24 - 1      # float32 node masks hold every whole number up to 2^24 exactly
CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class RawCase:
    case_id: str
    image_files: list[Path]          # one per channel, in channel order (may name missing files)
    node_mask_file: Path             # may not exist; verify reports it
    region_file: Path | None = None  # optional anatomical region map


@dataclass
class RawDataset:
    root: Path
    name: str
    channel_names: dict[int, str]
    file_ending: str
    dataset_json: dict = field(default_factory=dict)

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, root: str | Path) -> "RawDataset":
        """The dataset at ``root`` as described by its dataset.json."""
        root = Path(root)
        json_file = root / "dataset.json"
        if not json_file.is_file():
            raise LNMError(f"{json_file}: missing; every dataset needs a dataset.json (see documentation/dataset_format.md)")
        try:
            meta = load_json(json_file)
        except ValueError as e:
            raise LNMError(f"{json_file}: not valid JSON ({e})") from None
        for key in ("channel_names", "file_ending"):
            if key not in meta:
                raise LNMError(f"{json_file}: key '{key}' is missing")
        try:
            channels = {int(k): str(v) for k, v in meta["channel_names"].items()}
        except (ValueError, AttributeError):
            raise LNMError(f"{json_file}: channel_names must map channel numbers to names, e.g. {{\"0\": \"CT\"}}") from None
        if sorted(channels) != list(range(len(channels))) or not channels:
            raise LNMError(f"{json_file}: channel_names must be numbered 0..n-1, got {sorted(channels)}")
        return cls(root=root, name=str(meta.get("name", root.name)), channel_names=channels,
                   file_ending=str(meta["file_ending"]), dataset_json=meta)

    @property
    def num_channels(self) -> int:
        """Number of image channels per case."""
        return len(self.channel_names)

    # ---- cases ---------------------------------------------------------------------------------
    def case_ids(self, split: str = "Tr") -> list[str]:
        """Case ids found in images<split>/ (by their _0000 ... files) and nodes<split>/."""
        ids: set[str] = set()
        for f in _files_with_ending(self.root / f"images{split}", self.file_ending):
            m = CHANNEL_SUFFIX.match(f.name[: -len(self.file_ending)])
            if m:
                ids.add(m.group("case"))
        for f in _files_with_ending(self.root / f"nodes{split}", self.file_ending):
            ids.add(f.name[: -len(self.file_ending)])
        return sorted(ids)

    def case(self, case_id: str, split: str = "Tr") -> RawCase:
        """The files of case ``case_id`` in split ``Tr`` or ``Ts``."""
        images = [self.root / f"images{split}" / f"{case_id}_{c:04d}{self.file_ending}" for c in range(self.num_channels)]
        region = self.root / f"regions{split}" / f"{case_id}{self.file_ending}"
        return RawCase(case_id, images, self.root / f"nodes{split}" / f"{case_id}{self.file_ending}",
                       region if region.is_file() else None)

    def cases(self, split: str = "Tr") -> list[RawCase]:
        """Every case of split ``Tr`` or ``Ts``."""
        return [self.case(c, split) for c in self.case_ids(split)]

    # ---- label tables (as text: verify checks them) ---------------------------------------------
    def read_csv_text(self, name: str) -> pd.DataFrame | None:
        """The table ``name`` as stripped text cells, or None when the dataset has none."""
        path = self.root / name
        return read_csv_text(path, name) if path.is_file() else None

    # ---- typed tables (after verification) ------------------------------------------------------
    def node_table(self) -> pd.DataFrame:
        """case (str), node (int), station (str), label (int: 1, 0 or UNKNOWN)."""
        df = self.read_csv_text("nodes.csv")
        if df is None:
            raise LNMError(f"{self.root / 'nodes.csv'}: missing; it lists every node: case,node,station,label")
        with _table_errors(self.root / "nodes.csv"):
            return pd.DataFrame({"case": df["case"].str.strip(), "node": df["node"].map(parse_node_id).astype(int),
                                 "station": df["station"].str.strip() if "station" in df else "",
                                 "label": df["label"].map(parse_label)})

    def station_table(self) -> pd.DataFrame | None:
        """case (str), station (str), label (int: 1, 0 or UNKNOWN); None when the dataset has no stations.csv."""
        df = self.read_csv_text("stations.csv")
        if df is None:
            return None
        with _table_errors(self.root / "stations.csv"):
            return pd.DataFrame({"case": df["case"].str.strip(), "station": df["station"].str.strip(),
                                 "label": df["label"].map(parse_label)})

    def patient_table(self) -> pd.DataFrame | None:
        """case, label and patient (the grouping id for splits; the case id where not given)."""
        df = self.read_csv_text("patients.csv")
        if df is None:
            return None
        with _table_errors(self.root / "patients.csv"):
            case = df["case"].str.strip()
            patient = df["patient"].str.strip() if "patient" in df else case
            return pd.DataFrame({"case": case, "label": df["label"].map(parse_label),
                                 "patient": patient.where(patient != "", case)})


@contextlib.contextmanager
def _table_errors(path: Path):
    """Malformed tables that skipped verification (--no-verify) become one clear line."""
    try:
        yield
    except (KeyError, ValueError, TypeError) as e:
        raise LNMError(f"{path}: cannot be used ({e}); run lnm_plan_and_preprocess with --verify to list every "
                       "problem") from None


def _files_with_ending(folder: Path, ending: str) -> list[Path]:
    """The files named ``*<ending>`` in ``folder``; an entry so named that is no readable file (a folder, a
    symbolic link that loops or points nowhere) is one line: skipping it would drop a case silently."""
    if not folder.is_dir():
        return []
    named = sorted(f for f in folder.iterdir() if f.name.endswith(ending) and not f.name.startswith("."))
    for f in named:
        if f.is_dir():
            raise LNMError(f"{f}: is a folder, not an image file; move it out of {folder.name}/ (or put the image "
                           "file in its place)")
        if not f.is_file():
            why = "loops" if f.is_symlink() and _loops(f) else "points nowhere" if f.is_symlink() else "is no file"
            raise LNMError(f"{f}: a symbolic link that {why}" if f.is_symlink() else f"{f}: {why}")
    return named


def _loops(link: Path) -> bool:
    try:
        link.resolve(strict=True)
    except RuntimeError:       # "Symlink loop" (Python < 3.13)
        return True
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


@dataclass(frozen=True)
class Grid:
    """An image's grid, read from the image or its header; unlike SimpleITK's objects it crosses processes.
    Its getters are SimpleITK's, so images, headers and grids compare alike (``geometry_mismatches``)."""
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image) -> "Grid":
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    def GetSize(self):   # noqa: N802  (SimpleITK's names)
        return self.size

    def GetSpacing(self):   # noqa: N802
        return self.spacing

    def GetOrigin(self):   # noqa: N802
        return self.origin

    def GetDirection(self):   # noqa: N802
        return self.direction

    def TransformPhysicalPointToContinuousIndex(self, point) -> tuple[float, ...]:   # noqa: N802
        """SimpleITK's mapping of a physical point to a continuous (x, y, z) index: (D diag(spacing))^-1 (p - o)."""
        to_physical = np.asarray(self.direction, dtype=float).reshape(3, 3) * np.asarray(self.spacing, dtype=float)
        return tuple(float(v) for v in np.linalg.solve(to_physical, np.asarray(point, dtype=float) - self.origin))


def read_image(path: str | Path) -> sitk.Image:
    """Read any SimpleITK-readable image, turning reader failures into one clear line. NIfTI files are
    checked on the way (SimpleITK zero-fills a truncated .nii/.nii.gz and reads a 0 spacing as 1 mm, silently)
    and decompressed once (``nifti.read_checked_nifti``)."""
    path = _existing_file(path)
    img = read_checked_nifti(path, sitk_read) if is_nifti(path) else sitk_read(path)
    _check_grid(path, img)
    return img


def read_image_voxels(path: str | Path) -> tuple[np.ndarray, Grid]:
    """:func:`read_image` as its voxels (numpy z, y, x; read-only, like a view of a SimpleITK image) and grid, for
    code that needs no SimpleITK image: a NIfTI file's voxels are its decompressed bytes, never copied. NaN/Inf
    voxels are refused (SimpleITK's own readers, used for other formats and scaled NIfTI, would pass them on)."""
    path = _existing_file(path)
    if is_nifti(path):
        voxels, geometry = read_checked_nifti_voxels(path, sitk_read)
    else:
        geometry = sitk_read(path)
        voxels = sitk.GetArrayFromImage(geometry)
    _check_grid(path, geometry)
    if isinstance(geometry, sitk.Image) and np.issubdtype(voxels.dtype, np.floating):   # not scanned on the way
        n_bad = int(np.count_nonzero(~np.isfinite(voxels)))
        if n_bad:
            raise LNMError(f"{path}: {n_bad} NaN/Inf voxel(s); replace them with a finite value")
    voxels.flags.writeable = False      # training and inference read the same voxels the same way
    return voxels, Grid.of(geometry)


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise LNMError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise LNMError(f"{path}: empty file (0 bytes); copy or convert it again")
    return path


def _check_grid(path: Path, image) -> None:
    """Refuse a grid lnm_auto would misread: spacings not positive, or (3D images) outside
    [MIN_SPACING_MM, MAX_SPACING_MM] (a header in metres or micrometres), or axes that are not orthonormal
    (a sheared direction: readers fold the shear into the spacing, silently)."""
    spacing = image.GetSpacing()
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise LNMError(f"{path}: voxel spacing {tuple(round(s, 4) for s in spacing)} mm must be positive; fix the "
                       "header (the spacing the scanner used)")
    if len(spacing) != 3:
        return      # 2D and 4D images are refused by their callers, with that reason
    if not all(MIN_SPACING_MM <= s <= MAX_SPACING_MM for s in spacing):
        raise LNMError(f"{path}: voxel spacing ({', '.join(f'{s:.4g}' for s in spacing)}) mm is outside "
                       f"{MIN_SPACING_MM:g}-{MAX_SPACING_MM:g} mm; the header's unit is probably not mm: fix the "
                       "header")
    axes = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    if not np.allclose(axes.T @ axes, np.eye(3), rtol=0, atol=DIRECTION_ORTHONORMAL_ATOL):
        raise LNMError(f"{path}: the image axes (direction {tuple(round(v, 4) for v in axes.ravel())}) are not "
                       "orthonormal (a sheared or scaled direction); resample the image onto an orthogonal grid")


def sitk_read(path: Path, shown_as: Path | None = None) -> sitk.Image:
    """``sitk.ReadImage`` with its failure as one line naming ``shown_as`` (the user's file) or ``path``."""
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown reader error"
        if shown_as is not None:
            first = first.replace(str(path), str(shown_as))   # a temporary copy's name would only confuse
        raise LNMError(f"{shown_as or path}: SimpleITK cannot read it ({first[:200]})") from None


def read_image_header(path: str | Path) -> sitk.ImageFileReader:
    """The header of an image (size, spacing, origin, direction, dimension) without reading its voxels."""
    path = _existing_file(path)
    if is_nifti(path):
        check_nifti_file(path, header_only=True)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown reader error"
        raise LNMError(f"{path}: SimpleITK cannot read it ({first[:200]})") from None
    _check_grid(path, reader)
    return reader


def image_array(img: sitk.Image) -> np.ndarray:
    """Voxel array in numpy order (z, y, x) = SimpleITK index order reversed."""
    return sitk.GetArrayFromImage(img)


INTEGER_PIXELS = (sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkUInt32, sitk.sitkUInt64, sitk.sitkInt8, sitk.sitkInt16,
                  sitk.sitkInt32, sitk.sitkInt64)


def read_instance_mask(path: Path) -> sitk.Image:
    """A node instance mask as an unsigned integer image (integer-valued float masks accepted; fractions,
    NaN and negative ids refused: rounding them would invent or merge nodes)."""
    mask = read_image(path)
    if mask.GetNumberOfComponentsPerPixel() != 1 or mask.GetDimension() != 3:
        raise LNMError(f"{path}: the node mask must be a 3D single-component image, got {mask.GetDimension()}D with "
                       f"{mask.GetNumberOfComponentsPerPixel()} component(s)")
    arr = sitk.GetArrayViewFromImage(mask)
    if arr.size and float(arr.min()) < 0:
        raise LNMError(f"{path}: negative node ids; use 0 for background and k > 0 for node k")
    problem = node_id_range_problem(arr, path)
    if problem:
        raise LNMError(problem)
    if mask.GetPixelID() not in INTEGER_PIXELS and not (np.isfinite(arr).all() and np.array_equal(arr, np.round(arr))):
        raise LNMError(f"{path}: the node mask holds non-integer values; it must hold integer node ids "
                       "(0 background, k for node k), not probabilities or resampled labels")
    return as_integer_mask(mask)


def node_id_range_problem(arr: np.ndarray, path: Path) -> str | None:
    """The line for a node mask holding an id above MAX_NODE_ID (e.g. 1e12 in a float mask), else None."""
    if not arr.size or not np.isfinite(arr).all():
        return None    # (NaN is refused as a non-integer value)
    top = float(arr.max())
    if top <= MAX_NODE_ID:
        return None
    return (f"{path}: node id {top:.15g} is above {MAX_NODE_ID}, the largest node id lnm_auto accepts (a float mask "
            "holds whole numbers exactly only up to 2^24, and node ids index per-node tables); renumber the nodes "
            "1, 2, 3 ... and nodes.csv with them")


def as_integer_mask(mask: sitk.Image) -> sitk.Image:
    """A node mask already checked to hold whole, non-negative ids, with an unsigned integer pixel type."""
    return mask if mask.GetPixelID() in INTEGER_PIXELS else sitk.Cast(mask, sitk.sitkUInt32)
