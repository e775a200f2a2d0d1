"""Background CTs for the LIDC real-shape dataset (benchmarks/lidc_dataset.py): where a nodule may sit, under
which station name, and how it is painted in.

- ``PhantomBackground``: one lnm_auto phantom case without its own nodes (the phantom's anatomy, intensity
  and noise modules, called in the order ``generate_case`` calls them); nodules sit in mediastinal fat at the
  phantom's station positions and are painted before the point spread function and the noise.
- ``RealCtBackground``: one of pyradiomics' two real chest CTs, cropped around the mediastinum (a per-case
  shift of up to +-10 mm); nodules sit in mediastinal fat found by thresholds (body, lungs, the lungs'
  per-slice convex hull) and mostly cover fat (at most 30 % soft tissue/vessels, 40 % lung), station names
  come from the position: upper / middle / lower third of the
  mediastinum's craniocaudal extent and the side of the midline (2R/2L, 4R/4L, 7 within 12 mm of the
  midline in the lower third, else 10R/10L). Painting replaces only the low-pass part of the image, so the
  nodule keeps the scanner's real noise.

In both, the nodule's tissue follows one intensity model whatever its label (base HU ~ N(38, 7), texture
SD U(3, 10) HU with a 1.8 mm in-plane correlation: the phantom's benign-node model).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi
from skimage.morphology import convex_hull_image

from lnm_auto.datasets.phantom import CT_CLIP, STATION_NAMES, STATIONS, PhantomConfig
from lnm_auto.datasets.phantom.anatomy import (AIR, LUNG, MEDFAT, Z_NOMINAL, draw_anatomy_params, fit_scale,
                                               paint_anatomy)
from lnm_auto.datasets.phantom.case import BASE_ORIGIN
from lnm_auto.datasets.phantom.grid import Grid
from lnm_auto.datasets.phantom.intensity import PSF_SIGMA_MM, SLICE_PROFILE_SIGMA, add_ct_noise, paint_intensities
from lnm_auto.utils.errors import LNMError

BACKGROUNDS = ("phantom", "pyradiomics")
REAL_CTS = ("lung1", "lung2")
REAL_CROP_XY = (288, 256)            # voxels kept around the mediastinum (about 165 x 150 mm)


def _stream(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), int(stream)])


def nodule_tissue(occ_shape, spacing_xyz, rng: np.random.Generator) -> np.ndarray:
    """HU of a nodule's solid tissue on its box: the same model for benign and malignant nodules."""
    base, het = rng.normal(38.0, 7.0), rng.uniform(3.0, 10.0)
    tex = rng.standard_normal(occ_shape).astype(np.float32)
    tex = ndi.gaussian_filter(tex, (0.3, 1.8 / spacing_xyz[1], 1.8 / spacing_xyz[0]), mode="nearest")
    tex /= float(tex.std()) + 1e-6
    return (base + het * tex).astype(np.float32)


class Background:
    """A background CT being painted: geometry, station sampling, placement rules, painting, final image."""

    shape_xyz: tuple[int, int, int]
    spacing_xyz: tuple[float, float, float]
    direction: tuple[float, ...]
    stations: tuple[str, ...]

    def random_station(self, rng: np.random.Generator) -> str:
        """A station drawn with the phantom's benign-node frequencies (among this background's stations)."""
        w = np.array([STATIONS[s]["w"] for s in self.stations])
        return self.stations[int(rng.choice(len(self.stations), p=w / w.sum()))]

    def empty_mask(self) -> np.ndarray:
        """An all-zero (z, y, x) node instance mask for this grid."""
        return np.zeros(self.shape_xyz[::-1], np.uint8)


class PhantomBackground(Background):
    """Phantom case ``index`` of ``seed`` without its nodes."""

    def __init__(self, seed: int, index: int):
        cfg = PhantomConfig(seed=seed).validated()
        rng_geo, rng_anat, rng_int, _, self._rng_noise = (_stream(seed, index, k) for k in range(5))
        origin = np.array(BASE_ORIGIN) + rng_geo.uniform(-10, 10, 3) * np.array([1.0, 1.0, 3.0])
        self.grid = Grid(cfg.shape_xyz, cfg.spacing_xyz_mm, 0.0, np.round(origin, 2))
        g = fit_scale(self.grid, 0.0)
        gz = min(1.0, cfg.shape_xyz[2] * cfg.spacing_xyz_mm[2] / Z_NOMINAL)
        self.ap = draw_anatomy_params(rng_anat, g, gz, self.grid.qz)
        self.cls = paint_anatomy(self.grid, self.ap)
        self._spacing_zyx = tuple(cfg.spacing_xyz_mm[::-1])
        img = paint_intensities(self.cls, rng_int, "CT", self._spacing_zyx)
        self.image = ndi.gaussian_filter1d(img, SLICE_PROFILE_SIGMA, axis=0, mode="nearest", truncate=3.0)
        self.shape_xyz, self.spacing_xyz = cfg.shape_xyz, cfg.spacing_xyz_mm
        self.direction = tuple(self.grid.direction.ravel())
        self.stations = STATION_NAMES
        self._allowed = np.isin(self.cls, (MEDFAT, LUNG))

    def candidate_centre(self, station: str, rng: np.random.Generator, grow: float = 1.0):
        """A continuous (x, y, z) index near the station's centre, in mediastinal fat, or None."""
        st, ap = STATIONS[station], self.ap
        scale = np.array([ap["s"], ap["s"], ap["gz"]])
        c = np.array(st["c"]) * scale + np.array([*ap["shift"], ap["z_carina"]])
        c = c + rng.uniform(-1.0, 1.0, 3) * np.array(st["ext"]) * scale * grow
        ci = self.grid.body_to_index(c)
        i = np.round(ci).astype(int)
        if np.any(i < 0) or np.any(i >= self.shape_xyz) or self.cls[i[2], i[1], i[0]] != MEDFAT:
            return None
        return ci

    def accepts(self, box, node: np.ndarray) -> bool:
        """At most 20 % of the nodule over vessels/airways/bone/muscle (painted over), 60 % in lung, none outside."""
        n = int(node.sum())
        cls = self.cls[box][node]
        return (int((~self._allowed[box][node]).sum()) <= 0.2 * n and int((cls == LUNG).sum()) <= 0.6 * n
                and not (cls == AIR).any())

    def paint(self, box, occ: np.ndarray, rng: np.random.Generator) -> None:
        """Replace the tissue under the nodule by nodule tissue, weighted by the voxel coverage."""
        solid = nodule_tissue(occ.shape, self.spacing_xyz, rng)
        self.image[box] = self.image[box] * (1.0 - occ) + solid * occ

    def finish(self, mask: np.ndarray) -> tuple[sitk.Image, sitk.Image]:
        """The phantom's point spread function and CT noise, then int16 HU; (image, node mask)."""
        psf = (0.0, PSF_SIGMA_MM / self.spacing_xyz[1], PSF_SIGMA_MM / self.spacing_xyz[0])
        img = ndi.gaussian_filter(self.image, psf, mode="nearest", truncate=3.0)
        img = add_ct_noise(img, self.cls != AIR, self.grid, self.ap, self._rng_noise, 0.5, self._spacing_zyx)
        arr = np.clip(np.rint(img), *CT_CLIP).astype(np.int16)
        return self.grid.to_sitk(arr), self.grid.to_sitk(mask)


def pyradiomics_data_dir() -> Path:
    """Where benchmarks/get_pyradiomics_data.sh put the sample CTs ($LNM_PYRADIOMICS_DATA or /tmp/...)."""
    return Path(os.environ.get("LNM_PYRADIOMICS_DATA", "/tmp/pyradiomics_data"))


@functools.lru_cache(maxsize=2)
def _real_ct(path: str):
    """(HU array zyx float32, low-pass array, station map of the mediastinal fat, geometry) of one real CT."""
    img = sitk.ReadImage(path)
    a = sitk.GetArrayFromImage(img).astype(np.float32)
    spacing = np.array(img.GetSpacing(), float)
    body = np.stack([ndi.binary_fill_holes(s) for s in ndi.binary_opening(a > -500, iterations=2)])
    lung = ndi.binary_opening((a < -400) & body, iterations=2)
    low = ndi.gaussian_filter(a, (0.0, 1.5 / spacing[1], 1.5 / spacing[0]))
    fat = (low > -150) & (low < -40) & body & ~lung
    medi = np.zeros(a.shape, bool)
    for k in range(a.shape[0]):
        lab, n = ndi.label(lung[k])
        sizes = np.bincount(lab.ravel())[1:]
        if n < 2 or np.sort(sizes)[-2] * spacing[0] * spacing[1] < 1500.0:    # both lungs in the slice
            continue
        two = np.isin(lab, 1 + np.argsort(sizes)[-2:])
        medi[k] = convex_hull_image(two) & ~two
    fat = ndi.binary_erosion(fat & medi, iterations=2)
    ks = np.flatnonzero(fat.any(axis=(1, 2)))
    if len(ks) < 3:
        raise LNMError(f"{path}: no mediastinal fat found; is this a chest CT?")
    stations = np.zeros(a.shape, np.int8)                 # 0 = not a candidate, else index + 1 in STATION_NAMES
    zz, yy, xx = np.nonzero(fat)
    phys = np.array(img.GetDirection()).reshape(3, 3) @ (np.stack([xx, yy, zz]) * spacing[:, None])
    mid_x = float(np.median(phys[0]))
    zf = (phys[2] - phys[2].min()) / max(float(np.ptp(phys[2])), 1e-6)           # 0 inferior .. 1 superior
    right = phys[0] < mid_x                                # LPS: patient right is -x
    names = np.where(zf > 2 / 3, np.where(right, "2R", "2L"),
                     np.where(zf > 1 / 3, np.where(right, "4R", "4L"),
                              np.where(np.abs(phys[0] - mid_x) < 12.0, "7", np.where(right, "10R", "10L"))))
    stations[zz, yy, xx] = [STATION_NAMES.index(s) + 1 for s in names]
    return a, low, stations, img


class RealCtBackground(Background):
    """pyradiomics' real chest CT ``lung1`` or ``lung2`` (alternating by case), cropped around the mediastinum."""

    def __init__(self, seed: int, index: int, data_dir: Path | None = None):
        data_dir = Path(data_dir) if data_dir else pyradiomics_data_dir()
        name = REAL_CTS[index % 2]
        path = data_dir / f"{name}_image.nrrd"
        if not path.is_file():
            raise LNMError(f"{path}: missing; fetch the sample CTs with 'bash benchmarks/get_pyradiomics_data.sh'")
        a, low, stations, img = _real_ct(str(path))
        rng = _stream(seed, index, 30)
        spacing = np.array(img.GetSpacing(), float)
        zz, yy, xx = np.nonzero(stations)
        centre = np.array([xx.mean(), yy.mean()]) + rng.uniform(-10.0, 10.0, 2) / spacing[:2]
        size = np.minimum(REAL_CROP_XY, a.shape[:0:-1])
        lo = np.clip(np.round(centre - size / 2).astype(int), 0, np.array(a.shape[:0:-1]) - size)
        sl = (slice(None), slice(lo[1], lo[1] + size[1]), slice(lo[0], lo[0] + size[0]))
        self.source = name
        self.image, self._low, self._stations = a[sl].copy(), low[sl], stations[sl]
        self.shape_xyz = tuple(int(v) for v in self.image.shape[::-1])
        self.spacing_xyz = tuple(float(v) for v in spacing)
        self.direction = tuple(img.GetDirection())
        self.origin = img.TransformIndexToPhysicalPoint((int(lo[0]), int(lo[1]), 0))
        present = {STATION_NAMES[int(v) - 1] for v in np.unique(self._stations) if v}
        self.stations = tuple(s for s in STATION_NAMES if s in present)
        self._candidates = {s: np.argwhere(self._stations == STATION_NAMES.index(s) + 1) for s in self.stations}

    def candidate_centre(self, station: str, rng: np.random.Generator, grow: float = 1.0):
        """A continuous (x, y, z) index of a mediastinal fat voxel of that station, or None."""
        cands = self._candidates.get(station)
        if cands is None or not len(cands):
            return None
        z, y, x = cands[int(rng.integers(len(cands)))]
        return np.array([x, y, z], float) + rng.uniform(-0.5, 0.5, 3) * np.array([1.0, 1.0, 0.0])

    def accepts(self, box, node: np.ndarray) -> bool:
        """Mostly in fat: at most 30 % over soft tissue, heart or vessels, 40 % over lung, no bone or airway."""
        hu = self._low[box][node]
        n = len(hu)
        return (int((hu > 300).sum()) <= 0.02 * n and int((hu < -900).sum()) <= 0.02 * n
                and int((hu > -30).sum()) <= 0.3 * n and int((hu < -300).sum()) <= 0.4 * n)

    def paint(self, box, occ: np.ndarray, rng: np.random.Generator) -> None:
        """Replace the low-pass image under the nodule by nodule tissue; the real noise stays."""
        solid = nodule_tissue(occ.shape, self.spacing_xyz, rng)
        self.image[box] = self.image[box] + occ * (solid - self._low[box])

    def finish(self, mask: np.ndarray) -> tuple[sitk.Image, sitk.Image]:
        """int16 HU image and node mask on the cropped grid."""
        out = []
        for arr in (np.clip(np.rint(self.image), *CT_CLIP).astype(np.int16), mask):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing(self.spacing_xyz)
            im.SetOrigin(tuple(float(v) for v in self.origin))
            im.SetDirection(self.direction)
            out.append(im)
        return out[0], out[1]


def make_background(kind: str, seed: int, index: int, data_dir: Path | None = None) -> Background:
    """A fresh background for case ``index``: 'phantom' or 'pyradiomics'."""
    if kind == "phantom":
        return PhantomBackground(seed, index)
    if kind == "pyradiomics":
        return RealCtBackground(seed, index, data_dir)
    raise LNMError(f"background must be one of {', '.join(BACKGROUNDS)}, got '{kind}'")
