"""Reading the raw dataset convention (documentation/dataset_format.md).

    Dataset001_Name/
      dataset.json, imagesTr/<case>_0000<ending>, nodesTr/<case><ending>, nodes.csv,
      optional stations.csv, patients.csv, regionsTr/, imagesTs/, nodesTs/

The reader is lenient: it lists what is there and keeps the CSVs as text. ``verify`` reports every
problem; the typed tables (``node_table`` ...) are for data that passed verification.
"""
from __future__ import annotations

import contextlib
import gzip
import math
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import load_json
from lnm_auto.utils.labels import UNKNOWN, parse_label  # noqa: F401  (re-exported)
from lnm_auto.utils.tables import parse_node_id, read_csv_text

SAFE_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
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
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir() if f.is_file() and f.name.endswith(ending) and not f.name.startswith("."))


def read_image(path: str | Path) -> sitk.Image:
    """Read any SimpleITK-readable image, turning reader failures into one clear line. NIfTI files are
    checked first (SimpleITK zero-fills a truncated .nii/.nii.gz and reads a 0 spacing as 1 mm, silently)."""
    path = Path(path)
    if not path.is_file():
        raise LNMError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise LNMError(f"{path}: empty file (0 bytes); copy or convert it again")
    if path.name.lower().endswith((".nii", ".nii.gz")):
        check_nifti_file(path)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown reader error"
        raise LNMError(f"{path}: SimpleITK cannot read it ({first[:200]})") from None
    spacing = img.GetSpacing()
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise LNMError(f"{path}: voxel spacing {tuple(round(s, 4) for s in spacing)} mm must be positive; fix the "
                       "header (the spacing the scanner used)")
    return img


# NIfTI-1 / NIfTI-2 header fields: (dim, datatype, bitpix, pixdim, vox_offset) struct formats and offsets
_NIFTI_LAYOUT = {348: (("8h", 40), ("h", 70), ("h", 72), ("8f", 76), ("f", 108)),
                 540: (("8q", 16), ("h", 12), ("h", 14), ("8d", 104), ("q", 168))}
_NIFTI_FLOATS = {16: "f4", 64: "f8"}   # NIfTI datatype codes of float32 / float64
_READ_CHUNK = 1 << 22


def check_nifti_file(path: Path, header_only: bool = False) -> None:
    """Refuse a NIfTI file that SimpleITK would read wrongly without an error: header spacing (pixdim[1..3])
    not positive (read as 1 mm), voxel data shorter than the header says (truncated copy, damaged gzip
    stream: zero-filled), NaN/Inf voxels (read as 0). Streams the voxels once unless ``header_only``."""
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"   # SimpleITK also reads an uncompressed file named .nii.gz
    try:
        with (gzip.open if gzipped else open)(path, "rb") as f:
            header = f.read(540)
            fields = _nifti_header_fields(header)
            if fields is None:
                raise LNMError(f"{path}: not a NIfTI file (no valid NIfTI-1/NIfTI-2 header)")
            order, dim, datatype, bitpix, pixdim, vox_offset, single_file = fields
            n_dims = int(dim[0])
            if not 1 <= n_dims <= 7 or bitpix <= 0 or any(d < 1 for d in dim[1:n_dims + 1]):
                raise LNMError(f"{path}: invalid NIfTI header (dim {list(dim[:n_dims + 1])}, bitpix {bitpix})")
            bad = [i for i in range(1, min(n_dims, 3) + 1) if not (math.isfinite(pixdim[i]) and pixdim[i] > 0)]
            if bad:
                raise LNMError(f"{path}: header spacing pixdim[{bad[0]}] = {pixdim[bad[0]]:g} mm; every voxel spacing "
                               "must be positive (fix the header: the spacing the scanner used)")
            if header_only or not single_file:
                return
            n_voxel_bytes = int(np.prod([int(d) for d in dim[1:n_dims + 1]], dtype=np.int64)) * bitpix // 8
            n_data, n_bad = _scan_voxels(f, header, int(vox_offset), n_voxel_bytes, _NIFTI_FLOATS.get(datatype), order)
    except (OSError, EOFError, zlib.error) as e:   # gzip.BadGzipFile is an OSError
        raise LNMError(f"{path}: damaged or truncated file ({str(e).strip()[:120] or type(e).__name__}); copy or "
                       "convert it again") from None
    if n_data < n_voxel_bytes:
        raise LNMError(f"{path}: truncated: {n_data} of the {n_voxel_bytes} bytes of voxel data its header "
                       "announces; copy or convert it again")
    if n_bad:
        raise LNMError(f"{path}: {n_bad} NaN/Inf voxel(s); replace them with a finite value (SimpleITK "
                       "would silently read NaN as 0)")


def _scan_voxels(f, header: bytes, vox_offset: int, n_voxel_bytes: int, float_code: str | None,
                 order: str) -> tuple[int, int]:
    """Read the rest of an open NIfTI stream: (voxel bytes present, NaN/Inf voxels among them)."""
    dtype = np.dtype(order + float_code) if float_code else None
    pending, to_skip = header[vox_offset:], max(0, vox_offset - len(header))
    n_present, n_scanned, n_bad = len(pending), 0, 0
    while chunk := f.read(_READ_CHUNK):
        skipped = min(to_skip, len(chunk))
        chunk, to_skip = chunk[skipped:], to_skip - skipped
        n_present += len(chunk)
        if dtype is None:
            continue
        buf = pending + chunk
        usable = min(len(buf) - len(buf) % dtype.itemsize, max(0, n_voxel_bytes - n_scanned))
        n_bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(buf[:usable], dtype))))
        n_scanned, pending = n_scanned + usable, buf[usable:]
    if dtype is not None and pending and n_scanned < n_voxel_bytes:
        usable = min(len(pending) - len(pending) % dtype.itemsize, n_voxel_bytes - n_scanned)
        n_bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(pending[:usable], dtype))))
    return n_present, n_bad


def _nifti_header_fields(header: bytes):
    """(byte order, dim, datatype, bitpix, pixdim, vox_offset, single_file) of a NIfTI-1/2 header, or None."""
    if len(header) < 348:
        return None
    for order in "<>":
        size = struct.unpack(order + "i", header[:4])[0]
        if size in _NIFTI_LAYOUT and len(header) >= size:
            dim, datatype, bitpix, pixdim, offset = [struct.unpack_from(order + fmt, header, at)
                                                     for fmt, at in _NIFTI_LAYOUT[size]]
            magic = header[344:348] if size == 348 else header[4:8]
            return order, dim, datatype[0], bitpix[0], pixdim, offset[0], magic.startswith(b"n+")
    return None


def read_image_header(path: str | Path) -> sitk.ImageFileReader:
    """The header of an image (size, spacing, origin, direction, dimension) without reading its voxels."""
    path = Path(path)
    if not path.is_file():
        raise LNMError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise LNMError(f"{path}: empty file (0 bytes); copy or convert it again")
    if path.name.lower().endswith((".nii", ".nii.gz")):
        check_nifti_file(path, header_only=True)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown reader error"
        raise LNMError(f"{path}: SimpleITK cannot read it ({first[:200]})") from None
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
    if mask.GetPixelID() not in INTEGER_PIXELS:
        if not (np.isfinite(arr).all() and np.array_equal(arr, np.round(arr))):
            raise LNMError(f"{path}: the node mask holds non-integer values; it must hold integer node ids "
                           "(0 background, k for node k), not probabilities or resampled labels")
        mask = sitk.Cast(mask, sitk.sitkUInt32)
    return mask
