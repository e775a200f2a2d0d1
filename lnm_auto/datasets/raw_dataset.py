"""Reading the raw dataset convention (documentation/dataset_format.md).

    Dataset001_Name/
      dataset.json, imagesTr/<case>_0000<ending>, nodesTr/<case><ending>, nodes.csv,
      optional stations.csv, patients.csv, regionsTr/, imagesTs/, nodesTs/

The reader is lenient: it lists what is there and keeps the CSVs as text. ``verify`` reports every
problem; the typed tables (``node_table`` ...) are for data that passed verification.
"""
from __future__ import annotations

import contextlib
import re
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
        images = [self.root / f"images{split}" / f"{case_id}_{c:04d}{self.file_ending}" for c in range(self.num_channels)]
        region = self.root / f"regions{split}" / f"{case_id}{self.file_ending}"
        return RawCase(case_id, images, self.root / f"nodes{split}" / f"{case_id}{self.file_ending}",
                       region if region.is_file() else None)

    def cases(self, split: str = "Tr") -> list[RawCase]:
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
    """Read any SimpleITK-readable image, turning reader failures into one clear line."""
    path = Path(path)
    if not path.is_file():
        raise LNMError(f"{path}: file not found")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown reader error"
        raise LNMError(f"{path}: SimpleITK cannot read it ({first[:200]})") from None


def image_array(img: sitk.Image) -> np.ndarray:
    """Voxel array in numpy order (z, y, x) = SimpleITK index order reversed."""
    return sitk.GetArrayFromImage(img)
