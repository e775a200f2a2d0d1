"""One phantom case: its configuration, and the image and node mask painted from its random streams.

Every case is drawn from its own random streams ``(seed, case index, stream)``: geometry, anatomy,
intensities, nodes and noise each have one, so case ``phantom_007`` is the same whatever the number of
cases, and the same seed gives byte-identical files.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from lnm_auto.datasets.phantom.anatomy import AIR, MEDFAT, Z_NOMINAL, draw_anatomy_params, fit_scale, paint_anatomy
from lnm_auto.datasets.phantom.grid import Grid
from lnm_auto.datasets.phantom.intensity import (CT_CLIP, CT_LUT, MRI_LUT, PSF_SIGMA_MM, SLICE_PROFILE_SIGMA,
                                                 add_ct_noise, add_mri_noise, paint_intensities)
from lnm_auto.datasets.phantom.nodes import STATION_NAMES, PhantomNode, place_nodes
from lnm_auto.utils.errors import LNMError

BASE_ORIGIN = (-120.5, -98.3, -350.0)          # jittered per case (table position)


@dataclass
class PhantomConfig:
    """What a phantom dataset looks like: case counts, modality, label fraction, difficulty, seed and grid."""

    n_cases: int = 40                  # training cases (imagesTr)
    n_test_cases: int = 0              # test cases (imagesTs/nodesTs)
    modality: str = "CT"               # "CT" (HU) or "MRI" (T2, arbitrary units, bias field)
    labeled_fraction: float = 1.0      # fraction of TRAINING cases whose node labels are kept in nodes.csv
    difficulty: float = 0.5            # 0 easy .. 1 hard: overlap of benign/malignant features, noise
    seed: int = 0
    shape_xyz: tuple[int, int, int] = (288, 224, 32)
    spacing_xyz_mm: tuple[float, float, float] = (0.8, 0.8, 5.0)
    oblique_deg: float = 0.0           # rotation of the direction matrix about z
    # class separation of the nodes' image pattern (density, heterogeneity, necrosis, margin, fatty hilum),
    # 0 none .. 1 full; None = 1 - difficulty, like size and shape. Set apart from difficulty, it makes
    # datasets where the image carries more (or less) signal than size alone (the accuracy benchmark).
    texture_separation: float | None = None

    def validated(self) -> "PhantomConfig":
        """This configuration with normalised types; LNMError naming the field if a value is out of range."""
        modality = str(self.modality).strip().upper()
        if modality in ("MR", "T2"):
            modality = "MRI"
        if modality not in ("CT", "MRI"):
            raise LNMError(f"phantom modality must be 'CT' or 'MRI', got '{self.modality}'")
        if int(self.n_cases) < 1 or int(self.n_test_cases) < 0:
            raise LNMError(f"phantom needs n_cases >= 1 and n_test_cases >= 0, got {self.n_cases}, {self.n_test_cases}")
        if not 0.0 <= float(self.labeled_fraction) <= 1.0:
            raise LNMError(f"labeled_fraction must be within [0, 1], got {self.labeled_fraction}")
        if not 0.0 <= float(self.difficulty) <= 1.0:
            raise LNMError(f"difficulty must be within [0, 1], got {self.difficulty}")
        shape = tuple(int(s) for s in self.shape_xyz)
        spacing = tuple(float(s) for s in self.spacing_xyz_mm)
        if len(shape) != 3 or shape[0] < 32 or shape[1] < 32 or shape[2] < 4:
            raise LNMError(f"shape_xyz must be 3 sizes, at least (32, 32, 4), got {self.shape_xyz}")
        if len(spacing) != 3 or min(spacing) <= 0 or not all(math.isfinite(s) for s in spacing):
            raise LNMError(f"spacing_xyz_mm must be 3 positive numbers, got {self.spacing_xyz_mm}")
        if not math.isfinite(float(self.oblique_deg)):
            raise LNMError(f"oblique_deg must be a finite number, got {self.oblique_deg}")
        texture = None if self.texture_separation is None else float(self.texture_separation)
        if texture is not None and not 0.0 <= texture <= 1.0:
            raise LNMError(f"texture_separation must be within [0, 1], got {self.texture_separation}")
        return PhantomConfig(int(self.n_cases), int(self.n_test_cases), modality, float(self.labeled_fraction),
                             float(self.difficulty), int(self.seed), shape, spacing, float(self.oblique_deg), texture)

    def to_json(self) -> dict:
        """The configuration as a JSON-ready dict (as recorded in dataset.json)."""
        d = asdict(self)
        d["shape_xyz"] = list(self.shape_xyz)
        d["spacing_xyz_mm"] = list(self.spacing_xyz_mm)
        return d


@dataclass
class PhantomCase:
    """One generated case: image, node instance mask (node k has value k) and the node records."""

    case_id: str
    image: sitk.Image
    mask: sitk.Image
    nodes: list[PhantomNode] = field(default_factory=list)

    @property
    def patient_label(self) -> int:
        """1 if any node of the case is metastatic, else 0."""
        return int(any(n.label for n in self.nodes))

    def station_labels(self) -> dict[str, int]:
        """{station: 1 if any of its nodes is metastatic else 0} for the stations holding nodes, in station order."""
        out: dict[str, int] = {}
        for n in self.nodes:
            out[n.station] = max(out.get(n.station, 0), n.label)
        return dict(sorted(out.items(), key=lambda kv: STATION_NAMES.index(kv[0])))


def _case_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """Random stream ``stream`` of case ``index``: independent of every other case and stream."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), int(stream)])


def generate_case(index: int, config: PhantomConfig = PhantomConfig(), case_id: str | None = None) -> PhantomCase:
    """One phantom case in memory (image and node mask as SimpleITK images, plus its node records).

    Case ``index`` depends only on (seed, index, config), not on how many cases are generated."""
    config = config.validated()
    case_id = case_id or f"phantom_{index:03d}"
    rng_geo, rng_anat, rng_int, rng_nodes, rng_noise = (_case_rng(config.seed, index, k) for k in range(5))
    origin = np.array(BASE_ORIGIN) + rng_geo.uniform(-10, 10, 3) * np.array([1.0, 1.0, 3.0])
    grid = Grid(config.shape_xyz, config.spacing_xyz_mm, config.oblique_deg, np.round(origin, 2))
    g = fit_scale(grid, config.oblique_deg)
    z_extent = config.shape_xyz[2] * config.spacing_xyz_mm[2]
    gz = min(1.0, z_extent / Z_NOMINAL)
    node_scale = float(np.clip(g / 0.7, 0.35, 1.0))
    ap = draw_anatomy_params(rng_anat, g, gz, grid.qz)
    cls = paint_anatomy(grid, ap)
    spacing_zyx = tuple(config.spacing_xyz_mm[::-1])
    img = paint_intensities(cls, rng_int, config.modality, spacing_zyx)
    img = ndi.gaussian_filter1d(img, SLICE_PROFILE_SIGMA, axis=0, mode="nearest", truncate=3.0)
    lut = CT_LUT if config.modality == "CT" else MRI_LUT
    fat_value = float(img[cls == MEDFAT].mean()) if (cls == MEDFAT).any() else lut[MEDFAT][0]
    mask, records = place_nodes(grid, cls, img, rng_nodes, ap, config.difficulty, config.modality, node_scale,
                                fat_value, config.texture_separation)
    # in-plane point spread function
    psf = (0.0, PSF_SIGMA_MM / config.spacing_xyz_mm[1], PSF_SIGMA_MM / config.spacing_xyz_mm[0])
    if max(psf) >= 0.25:
        img = ndi.gaussian_filter(img, psf, mode="nearest", truncate=3.0)
    body = cls != AIR
    if config.modality == "CT":
        img = add_ct_noise(img, body, grid, ap, rng_noise, config.difficulty, spacing_zyx)
        arr = np.clip(np.rint(img), *CT_CLIP).astype(np.int16)
    else:
        arr = add_mri_noise(img, grid, ap, rng_noise, config.difficulty).astype(np.float32)
    return PhantomCase(case_id, grid.to_sitk(arr), grid.to_sitk(mask), records)
