"""A realistic synthetic chest CT / T2 MRI phantom with mediastinal lymph nodes (the project's own
test, demo and benchmark data; documentation/phantom.md).

Every case is drawn from its own random stream ``(seed, case index)``, so case ``phantom_007`` is the
same whatever the number of cases, and the same seed gives byte-identical files.

The anatomy is defined in the patient's own frame (LPS millimetres, centred on the body): x to the
patient's left, y posterior, z superior. The image grid is placed in that frame through its direction
matrix (the usual LPS flip ``diag(-1, -1, 1)``, optionally rotated about z by ``oblique_deg``), its
spacing and a non-trivial origin, so node stations stay anatomically consistent for any geometry.

Per case:
  1. a tissue class map, painted slice by slice from analytic shapes (torso with skin, subcutaneous
     fat, muscle, ribs, spine, sternum; lungs; trachea/bronchi, oesophagus, aorta with its arch and
     branches, SVC, pulmonary arteries, heart);
  2. intensities from a per-case jittered lookup (CT in HU, or T2 in arbitrary units) plus smooth
     tissue texture, fat septa and lung vessels;
  3. 3-12 lymph nodes in named stations (irregular ellipsoids, slice-thickness partial volume);
     metastatic nodes are on average larger, rounder, more heterogeneous, often necrotic, slightly
     denser, benign ones may show a fatty hilum or calcification - with overlap set by ``difficulty``;
  4. an in-plane point spread function, then noise: correlated Gaussian CT noise (stronger in the body
     centre) or, for MRI, a smooth multiplicative bias field and Rician noise.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage as ndi

from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import atomic_path, load_json, save_csv_atomic, save_json

PHANTOM_VERSION = 1
FILE_ENDING = ".nii.gz"
BASE_ORIGIN = (-120.5, -98.3, -350.0)          # jittered per case (table position)
LPS_FLIP = np.diag([-1.0, -1.0, 1.0])

# ---- tissue classes --------------------------------------------------------------------------------
(AIR, SKIN, FAT, MUSCLE, LUNG, CORTEX, MARROW, DISC, CSF, AIRWAY_WALL, AIRWAY_LUMEN, ESOPHAGUS,
 ARTERY, VEIN, MYOCARDIUM, BLOOD_POOL, MEDFAT, PULM_ARTERY) = range(18)
N_CLASSES = 18
NODE_ALLOWED = (MEDFAT, LUNG)                     # nodes may sit in mediastinal fat (and push into lung)

# ---- nominal anatomy (mm, adult; scaled per case to the field of view) ------------------------------
CAVITY_A, CAVITY_B_ANT, CAVITY_B_POST = 105.0, 62.0, 70.0
RIB_BAND = 7.0
MUSCLE_LAT, MUSCLE_ANT, MUSCLE_POST = 10.0, 12.0, 16.0
FAT_MAX = 22.0
SKIN_MM = 1.8
Z_NOMINAL = 160.0                                 # craniocaudal extent the station layout is drawn for

# Lymph node stations (IASLC names): nominal centre (x, y, z above the carina) and jitter half-ranges,
# all in mm in the body frame; weight = how often a benign node lands there.
STATIONS: dict[str, dict] = {
    "1R": dict(c=(-28.0, 2.0, 70.0), ext=(7.0, 8.0, 10.0), w=0.045),
    "1L": dict(c=(30.0, 4.0, 70.0), ext=(7.0, 8.0, 10.0), w=0.045),
    "2R": dict(c=(-17.0, 6.0, 48.0), ext=(5.0, 7.0, 10.0), w=0.08),
    "2L": dict(c=(17.0, 10.0, 48.0), ext=(5.0, 7.0, 10.0), w=0.05),
    "4R": dict(c=(-18.0, 8.0, 12.0), ext=(5.0, 6.0, 9.0), w=0.16),
    "4L": dict(c=(15.0, 12.0, 8.0), ext=(4.0, 5.0, 6.0), w=0.10),
    "5": dict(c=(30.0, -10.0, 4.0), ext=(6.0, 6.0, 6.0), w=0.06),
    "7": dict(c=(0.0, 22.0, -20.0), ext=(5.0, 4.0, 8.0), w=0.16),
    "8": dict(c=(-14.0, 32.0, -45.0), ext=(5.0, 5.0, 10.0), w=0.06),
    "10R": dict(c=(-40.0, 12.0, -4.0), ext=(6.0, 6.0, 8.0), w=0.12),
    "10L": dict(c=(40.0, 14.0, -10.0), ext=(6.0, 6.0, 8.0), w=0.12),
}
STATION_NAMES = tuple(STATIONS)

# ---- intensity lookups: (mean, per-case jitter sd, texture amplitude) -------------------------------
CT_LUT = {
    AIR: (-1000.0, 0.0, 0.0), SKIN: (35.0, 5.0, 4.0), FAT: (-113.0, 6.0, 15.0), MEDFAT: (-101.0, 6.0, 15.0),
    MUSCLE: (47.0, 5.0, 18.0), LUNG: (-870.0, 15.0, 25.0), CORTEX: (750.0, 80.0, 40.0),
    MARROW: (230.0, 30.0, 35.0), DISC: (85.0, 8.0, 5.0), CSF: (12.0, 4.0, 2.0), AIRWAY_WALL: (40.0, 5.0, 3.0),
    AIRWAY_LUMEN: (-985.0, 5.0, 3.0), ESOPHAGUS: (42.0, 5.0, 4.0), ARTERY: (200.0, 0.0, 4.0),
    VEIN: (200.0, 0.0, 6.0), MYOCARDIUM: (95.0, 10.0, 5.0), BLOOD_POOL: (200.0, 0.0, 4.0),
    PULM_ARTERY: (200.0, 0.0, 4.0),
}
MRI_LUT = {  # T2-weighted, arbitrary units: fat bright, muscle dark, flowing blood dark, fluid very bright
    AIR: (0.0, 0.0, 0.0), SKIN: (180.0, 15.0, 8.0), FAT: (420.0, 25.0, 12.0), MEDFAT: (400.0, 25.0, 14.0),
    MUSCLE: (110.0, 10.0, 6.0), LUNG: (22.0, 4.0, 6.0), CORTEX: (15.0, 3.0, 2.0), MARROW: (330.0, 25.0, 20.0),
    DISC: (300.0, 30.0, 10.0), CSF: (700.0, 40.0, 10.0), AIRWAY_WALL: (150.0, 15.0, 6.0),
    AIRWAY_LUMEN: (4.0, 1.0, 1.0), ESOPHAGUS: (190.0, 15.0, 8.0), ARTERY: (40.0, 8.0, 8.0),
    VEIN: (70.0, 10.0, 10.0), MYOCARDIUM: (130.0, 10.0, 6.0), BLOOD_POOL: (60.0, 10.0, 12.0),
    PULM_ARTERY: (50.0, 8.0, 8.0),
}
CT_CLIP = (-1024, 3071)

# Calibrated against the pyradiomics sample chest CTs (benchmarks/phantom_calibration.py).
CT_NOISE_SD = 7.0          # HU, before the difficulty / per-case / position factors
CT_NOISE_CORR_MM = 0.55     # in-plane correlation (Gaussian sigma of the noise filter), mm
PSF_SIGMA_MM = 0.55         # in-plane point spread function, mm
SLICE_PROFILE_SIGMA = 0.42  # slice sensitivity profile (Gaussian sigma in slices: FWHM ~ one slice)
FAT_SEPTA_HU = 30.0         # strength of the fibrous septa / small vessels in fat (positive skew)
MUSCLE_FAT_HU = 40.0        # intramuscular fat streaks (negative skew)


@dataclass
class PhantomConfig:
    n_cases: int = 40                  # training cases (imagesTr)
    n_test_cases: int = 0              # test cases (imagesTs/nodesTs)
    modality: str = "CT"               # "CT" (HU) or "MRI" (T2, arbitrary units, bias field)
    labeled_fraction: float = 1.0      # fraction of TRAINING cases whose node labels are kept in nodes.csv
    difficulty: float = 0.5            # 0 easy .. 1 hard: overlap of benign/malignant features, noise
    seed: int = 0
    shape_xyz: tuple[int, int, int] = (288, 224, 32)
    spacing_xyz_mm: tuple[float, float, float] = (0.8, 0.8, 5.0)
    oblique_deg: float = 0.0           # rotation of the direction matrix about z

    def validated(self) -> "PhantomConfig":
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
        return PhantomConfig(int(self.n_cases), int(self.n_test_cases), modality, float(self.labeled_fraction),
                             float(self.difficulty), int(self.seed), shape, spacing, float(self.oblique_deg))

    def to_json(self) -> dict:
        d = asdict(self)
        d["shape_xyz"] = list(self.shape_xyz)
        d["spacing_xyz_mm"] = list(self.spacing_xyz_mm)
        return d


@dataclass
class PhantomNode:
    node: int
    station: str
    label: int
    kind: str                  # "normal", "reactive", "calcified" (benign); "micro", "macro" (metastatic)
    short_axis_mm: float       # drawn short-axis diameter (before voxelisation)
    long_axis_mm: float
    necrosis: bool
    fatty_hilum: bool
    n_voxels: int = 0


@dataclass
class PhantomCase:
    case_id: str
    image: sitk.Image
    mask: sitk.Image
    nodes: list[PhantomNode] = field(default_factory=list)

    @property
    def patient_label(self) -> int:
        return int(any(n.label for n in self.nodes))

    def station_labels(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.nodes:
            out[n.station] = max(out.get(n.station, 0), n.label)
        return dict(sorted(out.items(), key=lambda kv: STATION_NAMES.index(kv[0])))


# ==================================================================================================
# geometry
# ==================================================================================================
class _Grid:
    """Image grid <-> body frame (LPS mm, centred on the volume centre)."""

    def __init__(self, shape_xyz, spacing_xyz, oblique_deg: float, origin_xyz):
        self.shape_xyz = tuple(int(s) for s in shape_xyz)
        self.spacing = np.asarray(spacing_xyz, float)
        t = math.radians(oblique_deg)
        rot = np.array([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0], [0.0, 0.0, 1.0]])
        self.direction = rot @ LPS_FLIP
        self.origin = np.asarray(origin_xyz, float)
        self.centre_index = (np.asarray(self.shape_xyz, float) - 1.0) / 2.0
        self.m2 = self.direction[:2, :2]                                # in-plane part (z column is (0,0,1))
        nx, ny, nz = self.shape_xyz
        i = (np.arange(nx) - self.centre_index[0]) * self.spacing[0]
        j = (np.arange(ny) - self.centre_index[1]) * self.spacing[1]
        self.qx = (self.m2[0, 0] * i[None, :] + self.m2[0, 1] * j[:, None]).astype(np.float32)   # (ny, nx)
        self.qy = (self.m2[1, 0] * i[None, :] + self.m2[1, 1] * j[:, None]).astype(np.float32)
        self.qz = ((np.arange(nz) - self.centre_index[2]) * self.spacing[2]).astype(np.float32)
        self.fov_half = np.asarray(self.shape_xyz, float) * self.spacing / 2.0

    def body_to_index(self, q) -> np.ndarray:
        """Continuous (i, j, k) index of a body-frame point."""
        q = np.asarray(q, float)
        ij = self.m2.T @ q[:2] / self.spacing[:2] + self.centre_index[:2]
        k = q[2] / self.spacing[2] + self.centre_index[2]
        return np.array([ij[0], ij[1], k])

    def box_coords(self, i0, i1, j0, j1, k0, k1):
        """Body-frame coordinates of the voxels of an index box: qx, qy (nj, ni) and qz (nk,)."""
        i = (np.arange(i0, i1) - self.centre_index[0]) * self.spacing[0]
        j = (np.arange(j0, j1) - self.centre_index[1]) * self.spacing[1]
        qx = self.m2[0, 0] * i[None, :] + self.m2[0, 1] * j[:, None]
        qy = self.m2[1, 0] * i[None, :] + self.m2[1, 1] * j[:, None]
        qz = (np.arange(k0, k1) - self.centre_index[2]) * self.spacing[2]
        return qx, qy, qz

    def to_sitk(self, arr_zyx: np.ndarray) -> sitk.Image:
        img = sitk.GetImageFromArray(arr_zyx)
        img.SetSpacing(tuple(float(s) for s in self.spacing))
        img.SetOrigin(tuple(float(o) for o in self.origin))
        img.SetDirection(tuple(float(d) for d in self.direction.ravel()))
        return img


def _fit_scale(grid: _Grid, oblique_deg: float) -> float:
    """Largest anatomy scale (<= 1) for which the biggest torso fits the (rotated) field of view."""
    a = CAVITY_A + RIB_BAND + MUSCLE_LAT + 1.2 * FAT_MAX + SKIN_MM
    b = CAVITY_B_POST + RIB_BAND + MUSCLE_POST + 1.0 * FAT_MAX + SKIN_MM
    t = math.radians(oblique_deg)
    # extent of the ellipse along the grid's own axes
    ex = math.sqrt((a * math.cos(t)) ** 2 + (b * math.sin(t)) ** 2)
    ey = math.sqrt((a * math.sin(t)) ** 2 + (b * math.cos(t)) ** 2)
    return float(min(1.0, 0.95 * grid.fov_half[0] / ex, 0.95 * grid.fov_half[1] / ey))


# ==================================================================================================
# anatomy: a tissue class map painted slice by slice
# ==================================================================================================
class _Painter:
    def __init__(self, qx: np.ndarray, qy: np.ndarray):
        self.qx, self.qy = qx, qy

    def ellipse(self, cx, cy, a, b_ant, b_post=None, p: float = 2.0) -> np.ndarray:
        dx = np.abs(self.qx - cx) / max(a, 1e-3)
        dy = self.qy - cy
        if b_post is None:
            dy = np.abs(dy) / max(b_ant, 1e-3)
        else:
            dy = np.where(dy < 0, -dy / max(b_ant, 1e-3), dy / max(b_post, 1e-3))
        if p == 2.0:
            return dx * dx + dy * dy <= 1.0
        return dx ** p + dy ** p <= 1.0

    def radius(self, cx, cy, a, b_ant, b_post, p: float = 2.0) -> np.ndarray:
        """Normalised superellipse radius (1 on the boundary)."""
        dx = np.abs(self.qx - cx) / max(a, 1e-3)
        dy = self.qy - cy
        dy = np.where(dy < 0, -dy / max(b_ant, 1e-3), dy / max(b_post, 1e-3))
        return (dx ** p + dy ** p) ** (1.0 / p)

    def circle(self, cx, cy, r) -> np.ndarray:
        return (self.qx - cx) ** 2 + (self.qy - cy) ** 2 <= r * r

    def capsule(self, points, r) -> np.ndarray:
        """Points within r of a polyline (a tube cut along its length)."""
        out = np.zeros(self.qx.shape, bool)
        for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
            vx, vy = x1 - x0, y1 - y0
            ll = vx * vx + vy * vy + 1e-9
            t = np.clip(((self.qx - x0) * vx + (self.qy - y0) * vy) / ll, 0.0, 1.0)
            out |= (self.qx - x0 - t * vx) ** 2 + (self.qy - y0 - t * vy) ** 2 <= r * r
        return out

    def angle(self, cx=0.0, cy=0.0, a=1.0, b=1.0) -> np.ndarray:
        return np.arctan2((self.qy - cy) / b, (self.qx - cx) / a)


def _combine(weights: np.ndarray, fields: np.ndarray) -> np.ndarray:
    """sum_h weights[h] * fields[h] (plain multiply-adds: no BLAS threads to fight over)."""
    out = fields[0] * weights[0]
    for w, f in zip(weights[1:], fields[1:]):
        out += w * f
    return out


def _section_radius(r: float, dz: float) -> float:
    """Half-width at height dz of a tube of radius r lying in the axial plane (0 if missed)."""
    return math.sqrt(r * r - dz * dz) if abs(dz) < r else 0.0


def _draw_anatomy_params(rng: np.random.Generator, g: float, gz: float, z_mm: np.ndarray) -> dict:
    """Per-case anatomical variation (all lengths already in mm of the body frame)."""
    t = float(rng.uniform(0.9, 1.0))            # body size relative to the largest that fits
    s = g * t
    fat = float(rng.uniform(5.0, FAT_MAX)) * g
    p = dict(s=s, gz=gz,
             cav_a=CAVITY_A * s, cav_b_ant=CAVITY_B_ANT * s, cav_b_post=CAVITY_B_POST * s,
             rib=RIB_BAND * s, mus_lat=MUSCLE_LAT * s * rng.uniform(0.8, 1.2),
             mus_ant=MUSCLE_ANT * s * rng.uniform(0.8, 1.2), mus_post=MUSCLE_POST * s * rng.uniform(0.9, 1.1),
             fat_lat=1.2 * fat, fat_ant=fat, fat_post=0.8 * fat, skin=max(1.2, SKIN_MM * g),
             z_carina=(-15.0 + rng.uniform(-5.0, 5.0)) * gz,
             lung_apex=(62.0 + rng.uniform(-6.0, 6.0)) * gz,
             heart_dz=(-85.0 + rng.uniform(-8.0, 8.0)) * gz,
             rib_phase=float(rng.uniform(0, 2 * math.pi)), rib_count=int(rng.integers(9, 12)),
             disc_phase=float(rng.uniform(0, 28.0)),
             esophagus_air=bool(rng.random() < 0.4),
             shift=(float(rng.normal(0, 2.0)) * s, float(rng.normal(0, 2.0)) * s))
    # smooth craniocaudal wander of layer interfaces: coefficients of cos/sin(k theta), k = 1..4,
    # random every ~20 mm and linearly interpolated in between
    n_coarse = max(2, int(math.ceil((float(z_mm.max() - z_mm.min()) + 1.0) / 20.0)) + 1)
    falloff = np.tile(1.0 / np.sqrt(np.repeat(np.arange(1, 5), 2)), 2)          # weaker higher harmonics
    coarse = (rng.standard_normal((n_coarse, 16)) * falloff).astype(np.float32)
    w = _interp_matrix(len(z_mm), n_coarse)
    p["interfaces"] = (w @ coarse).reshape(len(z_mm), 2, 8)
    return p


def _paint_anatomy(grid: _Grid, ap: dict) -> np.ndarray:
    """Tissue class map (nz, ny, nx) uint8."""
    nx, ny, nz = grid.shape_xyz
    s, gz = ap["s"], ap["gz"]
    sx, sy = ap["shift"]
    P = _Painter(grid.qx - sx, grid.qy - sy)
    cls = np.zeros((nz, ny, nx), np.uint8)

    ca, cba, cbp = ap["cav_a"], ap["cav_b_ant"], ap["cav_b_post"]
    rib = ap["rib"]
    # layers (semi-axes), from the skin inwards
    mus_a, mus_ba, mus_bp = ca + rib + ap["mus_lat"], cba + rib + ap["mus_ant"], cbp + rib + ap["mus_post"]
    fat_a, fat_ba, fat_bp = mus_a + ap["fat_lat"], mus_ba + ap["fat_ant"], mus_bp + ap["fat_post"]
    sk = ap["skin"]
    body_a, body_ba, body_bp = fat_a + sk, fat_ba + sk, fat_bp + sk
    pw = 2.3                                            # superellipse: a slightly boxy torso
    # z-invariant layers once
    body = P.ellipse(0, 0, body_a, body_ba, body_bp, pw)
    fat_m = P.ellipse(0, 0, fat_a, fat_ba, fat_bp, pw)
    # the fat/muscle interface and a superficial fascia wander smoothly from slice to slice (oblique
    # interfaces: partial volume across the slice thickness once the slice profile is applied)
    r_mus = P.radius(0, 0, mus_a, mus_ba, mus_bp, pw)
    r_fascia = P.radius(0, 0, 0.5 * (mus_a + fat_a), 0.5 * (mus_ba + fat_ba), 0.5 * (mus_bp + fat_bp), pw)
    ribout = P.ellipse(0, 0, ca + rib, cba + rib, cbp + rib, pw)
    cav = P.ellipse(0, 0, ca, cba, cbp, pw)
    rib_inner = P.ellipse(0, 0, ca + 0.75 * rib, cba + 0.75 * rib, cbp + 0.75 * rib, pw) & ~P.ellipse(
        0, 0, ca + 0.25 * rib, cba + 0.25 * rib, cbp + 0.25 * rib, pw)
    theta = P.angle(0, 0, ca, cba)
    harmonics = np.stack([f(k * theta) for k in range(1, 5) for f in (np.cos, np.sin)])      # (8, ny, nx)
    base = np.zeros((ny, nx), np.uint8)
    base[body] = SKIN
    base[fat_m] = FAT
    iface = ap["interfaces"]                          # (nz, 2, 8): smooth in z
    amp_mus = 2.5 / max(mus_a, 1.0)                   # ~2.5 mm wander of the fat/muscle interface
    amp_fas = 4.0 / max(mus_a, 1.0)
    fascia_halfwidth = 0.35 * float(grid.spacing[0]) / max(fat_a, 1.0)

    # fixed structure positions (nominal mm * s)
    def S(v):
        return v * s

    vb_y = S(58.0)                       # vertebral body centre
    canal_y = vb_y + S(15.0) + S(8.0)
    tr_y, tr_r = S(18.0), S(9.0)
    eso = (S(4.0), S(34.0), S(9.0), S(6.0))
    desc = (S(22.0), S(40.0), S(11.0))
    asc = (S(-6.0), S(-18.0), S(14.0))
    svc = (S(-26.0), S(-14.0), S(9.0))
    pt = (S(14.0), S(-28.0), S(13.0))
    mediast = P.ellipse(S(2.0), S(5.0), S(36.0), S(70.0)) | P.ellipse(0, S(60.0), S(24.0), S(30.0))
    paraspinal = P.ellipse(S(-28.0), canal_y - S(2.0), S(20.0), S(16.0)) | P.ellipse(S(28.0), canal_y - S(2.0),
                                                                                       S(20.0), S(16.0))
    paraspinal &= r_mus <= 1.0
    vb_cortex, vb_marrow = P.ellipse(0, vb_y, S(16.0), S(14.0)), P.ellipse(0, vb_y, S(14.0), S(12.0))
    canal_bone, canal = P.circle(0, canal_y, S(10.5)), P.circle(0, canal_y, S(7.0))
    spinous = P.ellipse(0, canal_y + S(17.0), S(3.5), S(9.0))
    sternum_c, sternum_m = P.ellipse(0, -(cba + 0.5 * rib), S(15.0), S(5.5)), P.ellipse(0, -(cba + 0.5 * rib),
                                                                                        S(12.5), S(3.5))
    lung_r_ell = (S(-55.0), S(8.0), S(50.0), S(62.0), S(70.0))
    lung_l_ell = (S(55.0), S(8.0), S(50.0), S(62.0), S(70.0))
    neck_fat = P.ellipse(0, S(2.0), S(48.0), S(30.0)) & cav
    eso_m = P.ellipse(eso[0], eso[1], eso[2], eso[3])
    eso_air = P.ellipse(eso[0], eso[1], eso[2] * 0.25, eso[3] * 0.35)
    desc_m = P.circle(desc[0], desc[1], desc[2])
    asc_m = P.circle(asc[0], asc[1], asc[2])
    svc_m = P.circle(svc[0], svc[1], svc[2])
    pt_m = P.circle(pt[0], pt[1], pt[2])
    branches = [P.circle(S(-10.0), S(-10.0), S(6.5)), P.circle(S(6.0), S(-6.0), S(4.5)),
                P.circle(S(16.0), S(2.0), S(5.0))]
    jugular = [P.circle(S(-30.0), S(-10.0), S(6.0)), P.circle(S(30.0), S(-8.0), S(6.0))]
    trachea_o, trachea_l = P.circle(0, tr_y, tr_r), P.circle(0, tr_y, tr_r - S(1.8))

    zc = ap["z_carina"]
    z_arch = zc + 25.0 * gz
    r_arch = S(11.0)
    disc_period = 28.0 * gz if gz > 0 else 28.0
    for k in range(nz):
        z = float(grid.qz[k])
        dz = z - zc                                               # height above the carina
        sl = base.copy()
        wander_mus, wander_fas = (_combine(iface[k, i], harmonics) for i in (0, 1))
        sl[(np.abs(r_fascia - 1.0 - amp_fas * wander_fas) < fascia_halfwidth) & fat_m] = SKIN
        sl[r_mus <= 1.0 + amp_mus * wander_mus] = MUSCLE
        sl[cav] = MEDFAT
        # ribs: oblique bands, seen as segments that move around the chest wall from slice to slice
        ribs = (np.cos(ap["rib_count"] * theta + ap["rib_phase"] + 2 * math.pi * z / (40.0 * max(gz, 0.2))) > 0.45)
        ribs &= ribout & ~cav & (np.abs(np.sin(theta)) < 0.93)
        sl[ribs] = CORTEX
        sl[ribs & rib_inner] = MARROW
        sl[paraspinal] = MUSCLE
        # lungs with a rounded apex; above them the thoracic inlet: muscle around a fatty centre
        if z >= ap["lung_apex"]:
            sl[cav] = MUSCLE
            sl[neck_fat] = MEDFAT
        else:
            f = math.sqrt(min(1.0, (ap["lung_apex"] - z) / (40.0 * gz + 1e-6)))
            if f < 1.0:
                sl[cav & ~mediast] = MUSCLE
            for (lx, ly, la, lba, lbp) in (lung_r_ell, lung_l_ell):
                lung = P.ellipse(lx, ly, la * f, lba * f, lbp * f) & cav & ~mediast
                sl[lung] = LUNG
        # heart (an ellipsoid below the carina) with pericardial fat
        hz = ap["heart_dz"] + zc
        hc = 1.0 - ((z - hz) / (60.0 * gz + 1e-6)) ** 2
        if hc > 0:
            f = math.sqrt(hc)
            hx, hy = S(14.0), S(-18.0)
            sl[P.ellipse(hx, hy, S(64.0) * f, S(50.0) * f) & cav] = MEDFAT
            sl[P.ellipse(hx, hy, S(58.0) * f, S(45.0) * f) & cav] = MYOCARDIUM
            if f > 0.3:
                sl[P.ellipse(hx - S(4.0), hy, S(44.0) * f, S(32.0) * f)] = BLOOD_POOL
        # spine and sternum
        sl[vb_cortex] = CORTEX
        in_disc = ((z - ap["disc_phase"]) % disc_period) < 6.0 * gz
        sl[vb_marrow] = DISC if in_disc else MARROW
        sl[canal_bone | spinous] = CORTEX
        sl[canal] = CSF
        if -60.0 * gz < dz < 45.0 * gz:
            sl[sternum_c] = CORTEX
            sl[sternum_m] = MARROW
        # great vessels
        if z < z_arch:
            sl[desc_m] = ARTERY
            sl[asc_m] = ARTERY
            sl[svc_m] = VEIN
        r_sec = _section_radius(r_arch, z - z_arch)
        if r_sec > 0:
            sl[P.capsule([(asc[0], asc[1]), (S(20.0), S(-2.0)), (desc[0], desc[1])], r_sec)] = ARTERY
        if z >= z_arch:
            for b in branches:
                sl[b] = ARTERY
            if z < z_arch + 12.0 * gz:
                sl[svc_m] = VEIN
        r_sec = _section_radius(S(5.5), z - (z_arch + 15.0 * gz))
        if r_sec > 0:                                             # left brachiocephalic vein crossing
            sl[P.capsule([(svc[0], svc[1] - S(2.0)), (S(32.0), S(-20.0))], r_sec)] = VEIN
        if z > z_arch + 18.0 * gz:
            for jv in jugular:
                sl[jv] = VEIN
        if -45.0 * gz < dz < 2.0 * gz:
            sl[pt_m] = PULM_ARTERY
        r_sec = _section_radius(S(9.0), dz)
        if r_sec > 0:                                             # right pulmonary artery to the hilum
            rpa = [(pt[0] - S(4.0), pt[1] + S(8.0)), (S(-8.0), S(4.0)), (S(-46.0), S(6.0))]
            sl[P.capsule(rpa, r_sec)] = PULM_ARTERY
        r_sec = _section_radius(S(9.0), dz - 6.0 * gz)
        if r_sec > 0:                                             # left pulmonary artery
            sl[P.capsule([(pt[0], pt[1] + S(6.0)), (S(42.0), S(8.0))], r_sec)] = PULM_ARTERY
        # oesophagus
        sl[eso_m] = ESOPHAGUS
        if ap["esophagus_air"]:
            sl[eso_air] = AIRWAY_LUMEN
        # airways: trachea above the carina, main bronchi below
        if dz >= 0:
            sl[trachea_o] = AIRWAY_WALL
            sl[trachea_l] = AIRWAY_LUMEN
        else:
            d = -dz / max(gz, 1e-6)                                  # nominal mm below the carina
            for side, lateral, post, length in ((-1, 0.9, 0.15, 35.0), (1, 0.7, 0.25, 45.0)):
                if d < length:
                    bx, by = side * S(3.0 + lateral * d), tr_y + S(post * d)
                    sl[P.circle(bx, by, S(6.5))] = AIRWAY_WALL
                    sl[P.circle(bx, by, S(5.0))] = AIRWAY_LUMEN
        sl[~body] = AIR
        cls[k] = sl
    return cls


# ==================================================================================================
# intensities
# ==================================================================================================
def _interp_matrix(n: int, m: int) -> np.ndarray:
    """(n, m) linear interpolation weights from m coarse samples onto n fine ones (cell-centred)."""
    pos = np.clip((np.arange(n) + 0.5) * m / n - 0.5, 0.0, m - 1.0)
    i0 = np.minimum(np.floor(pos).astype(int), max(m - 2, 0))
    w = pos - i0
    out = np.zeros((n, m), np.float32)
    out[np.arange(n), i0] = 1.0 - w
    if m > 1:
        out[np.arange(n), np.minimum(i0 + 1, m - 1)] += w
    return out


def _smooth_field(rng: np.random.Generator, shape_zyx, coarse_mm: float, spacing_zyx) -> np.ndarray:
    """Unit-variance-ish smooth random field: noise on a coarse grid, separably linearly interpolated."""
    coarse = [max(2, int(math.ceil(n * sp / coarse_mm)) + 1) for n, sp in zip(shape_zyx, spacing_zyx)]
    c = rng.standard_normal(coarse).astype(np.float32)
    wz, wy, wx = (_interp_matrix(n, m) for n, m in zip(shape_zyx, coarse))
    c = np.tensordot(c, wx, axes=([2], [1]))                 # (cz, cy, nx)
    c = np.tensordot(wy, c, axes=([1], [1]))                 # (ny, cz, nx)
    c = np.tensordot(wz, c, axes=([1], [1]))                 # (nz, ny, nx)
    sd = float(c.std())
    return np.ascontiguousarray(c / sd if sd > 0 else c, dtype=np.float32)


def _fine_field(rng: np.random.Generator, shape_zyx, sigma_mm: float, spacing_zyx) -> np.ndarray:
    """Unit-variance field with in-plane correlation length ~sigma_mm (white along z beyond a slice)."""
    f = rng.standard_normal(shape_zyx, dtype=np.float32)
    sig = (0.0, sigma_mm / spacing_zyx[1], sigma_mm / spacing_zyx[2])
    if max(sig) >= 0.3:
        f = ndi.gaussian_filter(f, sig, mode="wrap", truncate=3.0)
    sd = float(f.std())
    return f / sd if sd > 0 else f


def _intensities(cls: np.ndarray, rng: np.random.Generator, modality: str, spacing_zyx) -> np.ndarray:
    lut = CT_LUT if modality == "CT" else MRI_LUT
    mean = np.zeros(N_CLASSES, np.float32)
    amp = np.zeros(N_CLASSES, np.float32)
    for c, (m, jit, a) in lut.items():
        mean[c] = m + (rng.normal(0.0, jit) if jit > 0 else 0.0)
        amp[c] = a
    if modality == "CT":
        contrast = rng.uniform(150.0, 250.0)              # arterial enhancement of this scan
        mean[ARTERY] = contrast
        mean[BLOOD_POOL] = contrast * rng.uniform(0.9, 1.0)
        mean[PULM_ARTERY] = contrast * rng.uniform(0.85, 1.05)
        mean[VEIN] = float(np.clip(contrast * rng.uniform(0.8, 1.25), 150.0, 300.0))
    img = mean[cls]
    smooth = _smooth_field(rng, cls.shape, 12.0, spacing_zyx)
    img += amp[cls] * smooth
    fine = _fine_field(rng, cls.shape, 1.6, spacing_zyx)
    # fibrous septa and small vessels: a positive skew in fat, vessels in lung
    fat = (cls == FAT) | (cls == MEDFAT)
    lung = cls == LUNG
    muscle = cls == MUSCLE
    if modality == "CT":
        img[fat] += FAT_SEPTA_HU * np.maximum(fine[fat] - 0.7, 0.0)
        img[muscle] -= MUSCLE_FAT_HU * np.maximum(fine[muscle] - 0.5, 0.0)
        img[lung] += 30.0 * fine[lung] + 500.0 * np.maximum(fine[lung] - 1.8, 0.0)
    else:
        img[fat] -= 60.0 * np.maximum(fine[fat] - 1.0, 0.0)
        img[muscle] += 15.0 * np.maximum(fine[muscle] - 0.5, 0.0)
        img[lung] += 30.0 * np.maximum(fine[lung] - 2.1, 0.0)
    return img


# ==================================================================================================
# lymph nodes
# ==================================================================================================
def _random_rotation(rng: np.random.Generator, long_along_z: bool) -> np.ndarray:
    """Columns = the node's principal directions (short, middle, long)."""
    if long_along_z:
        tilt = rng.normal(0.0, 0.35)
        az = rng.uniform(0, 2 * math.pi)
        long_dir = np.array([math.sin(tilt) * math.cos(az), math.sin(tilt) * math.sin(az), math.cos(tilt)])
    else:
        az = rng.uniform(0, 2 * math.pi)
        el = rng.normal(0.0, 0.3)
        long_dir = np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    a = rng.standard_normal(3)
    a -= a.dot(long_dir) * long_dir
    a /= np.linalg.norm(a) + 1e-12
    b = np.cross(long_dir, a)
    return np.stack([a, b, long_dir], axis=1)


def _draw_node(rng: np.random.Generator, label: int, difficulty: float, node_scale: float) -> dict:
    """Latent appearance of one node. sep = 1 - difficulty sets how far apart the classes are."""
    d = difficulty
    sep = 1.0 - d
    if label:
        kind = "micro" if rng.random() < 0.05 + 0.2 * d else "macro"
    else:
        u, p_reactive, p_calcified = rng.random(), 0.08 + 0.14 * d, 0.06 - 0.02 * d
        kind = "reactive" if u < p_reactive else ("calcified" if u < p_reactive + p_calcified else "normal")
    if kind in ("normal", "micro", "calcified"):
        median, sd = 6.0, 0.28
    elif kind == "reactive":
        median, sd = 10.0, 0.25
    else:                                             # macro-metastasis
        median, sd = 6.0 * math.exp(0.45 + 0.5 * sep), 0.30
    short = float(np.clip(median * math.exp(rng.normal(0.0, sd)), 3.5, 26.0))
    if kind == "macro":
        roundness = np.clip(rng.normal(0.62 + 0.22 * sep, 0.12), 0.35, 0.98)
    elif kind == "reactive":
        roundness = np.clip(rng.normal(0.66, 0.12), 0.35, 0.95)
    else:
        roundness = np.clip(rng.normal(0.57, 0.12), 0.33, 0.95)
    long = short / float(roundness)
    mid = float(np.clip(short * rng.uniform(1.0, 1.35), short, long))
    # intensity pattern
    necrosis = kind == "macro" and short >= 6.0 and rng.random() < 0.2 + 0.6 * sep
    pseudo_necrosis = kind == "reactive" and rng.random() < 0.12 * d      # hypodense benign (granulomatous)
    p_hilum = {"normal": 0.25 + 0.25 * sep, "reactive": 0.15, "calcified": 0.1}.get(kind, 0.03)
    hilum = rng.random() < p_hilum
    calcified = kind == "calcified"
    if label:
        base_hu = rng.normal(40.0 + (24.0 if kind == "macro" else 10.0) * sep, 8.0)
        het = rng.uniform(10.0, 14.0 + 16.0 * sep) if kind == "macro" else rng.uniform(3.0, 8.0)
        irregular = rng.uniform(0.05, 0.08 + 0.10 * sep) if kind == "macro" else rng.uniform(0.03, 0.09)
    else:
        base_hu = rng.normal(38.0, 7.0)
        het = rng.uniform(3.0, 7.0 + 3.0 * d)
        irregular = rng.uniform(0.03, 0.09 + 0.04 * d)
    return dict(kind=kind, short=short * node_scale, mid=mid * node_scale, long=long * node_scale,
                necrosis=bool(necrosis or pseudo_necrosis),
                nec_frac=float(rng.uniform(0.45, 0.7)), nec_drop=float(rng.uniform(40.0, 70.0) * (0.6 + 0.4 * sep)
                                                                     if necrosis else rng.uniform(8.0, 15.0)),
                hilum=bool(hilum), calcified=bool(calcified), base_hu=float(base_hu), het=float(het),
                irregular=float(irregular), long_along_z=bool(rng.random() < 0.6),
                pert_dirs=rng.standard_normal((4, 3)), pert_m=rng.integers(2, 5, size=4),
                pert_sign=rng.choice([-1.0, 1.0], size=4), pert_w=rng.dirichlet(np.ones(4)),
                hilum_dir=rng.standard_normal(3), nec_offset=rng.normal(0.0, 0.12, size=3),
                calc_pos=rng.normal(0.0, 0.3, size=3))


_CHEBYSHEV = {2: lambda c: 2.0 * c * c - 1.0, 3: lambda c: (4.0 * c * c - 3.0) * c,
              4: lambda c: 8.0 * c * c * (c * c - 1.0) + 1.0}


def _radial(dirs: np.ndarray, nd: dict, amp: float) -> np.ndarray:
    """Smooth radial perturbation of the unit sphere: a sum of zonal harmonics cos(m * angle to v_k),
    evaluated as Chebyshev polynomials of cos(angle) (no trigonometry per voxel)."""
    out = np.zeros(dirs.shape[1:], np.float32)
    for v, m, sign, w in zip(nd["pert_dirs"], nd["pert_m"], nd["pert_sign"], nd["pert_w"]):
        v = v / (np.linalg.norm(v) + 1e-12)
        c = v[0] * dirs[0] + v[1] * dirs[1] + v[2] * dirs[2]
        out += (sign * w) * _CHEBYSHEV[int(m)](c)
    return amp * out


N_SUB_Z = 4           # sub-samples per slice: slice-thickness partial volume


def _render_node(grid: _Grid, centre, R: np.ndarray, nd: dict):
    """Index box and sub-voxel occupancies (total, necrosis, hilum, calcification) of one node."""
    semi = np.array([nd["short"], nd["mid"], nd["long"]]) / 2.0
    reach = semi.max() * (1.0 + nd["irregular"] * 1.2) + 1.0
    ci = grid.body_to_index(centre)
    nx, ny, nz = grid.shape_xyz
    half = np.ceil(reach / grid.spacing).astype(int) + 1
    lo = np.maximum(np.floor(ci).astype(int) - half, 0)
    hi = np.minimum(np.floor(ci).astype(int) + half + 2, [nx, ny, nz])
    if np.any(hi <= lo):
        return None
    qx, qy, qz = grid.box_coords(lo[0], hi[0], lo[1], hi[1], lo[2], hi[2])
    dxy = (qx - centre[0], qy - centre[1])
    offs = (np.arange(N_SUB_Z) + 0.5) / N_SUB_Z - 0.5
    shape = (hi[2] - lo[2], hi[1] - lo[1], hi[0] - lo[0])
    occ = np.zeros(shape, np.float32)
    nec = np.zeros(shape, np.float32)
    hil = np.zeros(shape, np.float32)
    calc = np.zeros(shape, np.float32)
    hdir = nd["hilum_dir"] / (np.linalg.norm(nd["hilum_dir"]) + 1e-12)
    for o in offs:
        dz = (qz + o * grid.spacing[2] - centre[2])[:, None, None]
        # node frame coordinates scaled by the semi-axes
        u = [(R[0, a] * dxy[0][None] + R[1, a] * dxy[1][None] + R[2, a] * dz) / semi[a] for a in range(3)]
        rho = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2) + 1e-6
        dirs = np.stack([u[0] / rho, u[1] / rho, u[2] / rho])
        inside = rho <= 1.0 + _radial(dirs, nd, nd["irregular"])
        occ += inside
        if nd["necrosis"]:
            v = [u[a] - nd["nec_offset"][a] for a in range(3)]
            rn = np.sqrt(v[0] ** 2 + v[1] ** 2 + v[2] ** 2) / nd["nec_frac"]
            nec += inside * np.clip((1.0 - rn) / 0.25, 0.0, 1.0)
        if nd["hilum"]:
            cosang = dirs[0] * hdir[0] + dirs[1] * hdir[1] + dirs[2] * hdir[2]
            hil += inside & (cosang > 0.8) & (rho > 0.3)
        if nd["calcified"]:
            v = [u[a] - nd["calc_pos"][a] for a in range(3)]
            calc += inside & (np.sqrt(v[0] ** 2 + v[1] ** 2 + v[2] ** 2) < 0.35)
    k = 1.0 / N_SUB_Z
    box = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    return box, occ * k, nec * k, hil * k, calc * k


def _node_values(nd: dict, modality: str, tex: np.ndarray, bg_fat: float) -> tuple:
    """(solid tissue values, necrosis value, hilum value, calcification value) for one node."""
    if modality == "CT":
        solid = nd["base_hu"] + nd["het"] * tex
        return solid, nd["base_hu"] - nd["nec_drop"] - 5.0 * abs(tex).mean(), bg_fat, 450.0
    # T2: nodes intermediate-high, necrosis fluid-bright, fatty hilum bright, calcification dark
    base = 200.0 + 2.2 * (nd["base_hu"] - 40.0)
    solid = base + 2.5 * nd["het"] * tex
    return solid, base + 8.0 * nd["nec_drop"], bg_fat, 30.0


def _place_nodes(grid: _Grid, cls: np.ndarray, img: np.ndarray, rng: np.random.Generator, ap: dict,
                 difficulty: float, modality: str, node_scale: float, fat_value: float):
    """Draw, place and paint the nodes; returns the instance mask and the node records."""
    nz, ny, nx = cls.shape
    mask = np.zeros(cls.shape, np.uint8)
    n_nodes = int(rng.integers(3, 13))
    n_plus = rng.random() < 0.55
    labels = np.zeros(n_nodes, int)
    if n_plus:
        n_met = 1 + rng.binomial(n_nodes - 1, 0.35)
        labels[rng.choice(n_nodes, n_met, replace=False)] = 1
    names = list(STATION_NAMES)
    weights = np.array([STATIONS[n]["w"] for n in names])
    weights /= weights.sum()
    primary = names[int(rng.choice(len(names), p=weights))]
    allowed = np.isin(cls, NODE_ALLOWED)
    lung = cls == LUNG
    s, gz, zc = ap["s"], ap["gz"], ap["z_carina"]
    sx, sy = ap["shift"]
    records: list[PhantomNode] = []
    for label in labels:
        nd = _draw_node(rng, int(label), difficulty, node_scale)
        R = _random_rotation(rng, nd["long_along_z"])
        if label and rng.random() < 0.5:
            station = primary
        else:
            station = names[int(rng.choice(len(names), p=weights))]
        placed = None
        for attempt in range(120):
            if attempt and attempt % 15 == 0:           # crowded: another station, then a smaller node
                station = names[int(rng.choice(len(names), p=weights))]
                if attempt >= 60:
                    for key in ("short", "mid", "long"):
                        nd[key] *= 0.85
            st = STATIONS[station]
            grow = 1.0 + attempt % 15 / 10.0
            c = np.array(st["c"], float) * np.array([s, s, gz]) + np.array([sx, sy, zc])
            c += rng.uniform(-1.0, 1.0, 3) * np.array(st["ext"]) * np.array([s, s, gz]) * grow
            ci = np.round(grid.body_to_index(c)).astype(int)
            if np.any(ci < 0) or np.any(ci >= [nx, ny, nz]) or not allowed[ci[2], ci[1], ci[0]] \
                    or mask[ci[2], ci[1], ci[0]]:
                continue                                   # cheap rejection before rendering
            out = _render_node(grid, c, R, nd)
            if out is None:
                continue
            box, occ, nec, hil, calc = out
            node = occ >= 0.5
            n = int(node.sum())
            if n < 3:
                continue
            bad = node & ~allowed[box]
            if bad.sum() > 0.05 * n or (node & lung[box]).sum() > 0.5 * n:
                continue
            near = ndi.binary_dilation(mask[box] > 0, iterations=1) if mask[box].any() else None
            if near is not None and (near & (occ > 0.05)).any():
                continue
            placed = (box, occ, nec, hil, calc, station)
            break
        if placed is None:
            continue
        box, occ, nec, hil, calc, station = placed
        keep = allowed[box]
        occ, nec, hil, calc = occ * keep, nec * keep, hil * keep, calc * keep
        node = occ >= 0.5
        tex = rng.standard_normal(occ.shape).astype(np.float32)
        tex = ndi.gaussian_filter(tex, (0.3, 1.8 / grid.spacing[1], 1.8 / grid.spacing[0]), mode="nearest")
        tex /= float(tex.std()) + 1e-6
        solid, nec_v, hil_v, calc_v = _node_values(nd, modality, tex, fat_value)
        hil = np.minimum(hil, occ - nec)
        calc = np.minimum(calc, occ - nec - hil)
        solid_occ = np.clip(occ - nec - hil - calc, 0.0, 1.0)
        region = img[box]
        img[box] = region * (1.0 - occ) + solid * solid_occ + nec_v * nec + hil_v * hil + calc_v * calc
        node_id = len(records) + 1
        mask[box][node] = node_id
        records.append(PhantomNode(node=node_id, station=station, label=int(label), kind=nd["kind"],
                                   short_axis_mm=round(float(nd["short"]), 2), long_axis_mm=round(float(nd["long"]), 2),
                                   necrosis=nd["necrosis"], fatty_hilum=nd["hilum"], n_voxels=int(node.sum())))
    return mask, records


# ==================================================================================================
# one case
# ==================================================================================================
def _case_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), int(stream)])


def generate_case(index: int, config: PhantomConfig = PhantomConfig(), case_id: str | None = None) -> PhantomCase:
    """One phantom case in memory (image and node mask as SimpleITK images, plus its node records).

    Case ``index`` depends only on (seed, index, config), not on how many cases are generated."""
    config = config.validated()
    case_id = case_id or f"phantom_{index:03d}"
    rng_geo, rng_anat, rng_int, rng_nodes, rng_noise = (_case_rng(config.seed, index, k) for k in range(5))
    origin = np.array(BASE_ORIGIN) + rng_geo.uniform(-10, 10, 3) * np.array([1.0, 1.0, 3.0])
    grid = _Grid(config.shape_xyz, config.spacing_xyz_mm, config.oblique_deg, np.round(origin, 2))
    g = _fit_scale(grid, config.oblique_deg)
    z_extent = config.shape_xyz[2] * config.spacing_xyz_mm[2]
    gz = min(1.0, z_extent / Z_NOMINAL)
    node_scale = float(np.clip(g / 0.7, 0.35, 1.0))
    ap = _draw_anatomy_params(rng_anat, g, gz, grid.qz)
    cls = _paint_anatomy(grid, ap)
    spacing_zyx = tuple(config.spacing_xyz_mm[::-1])
    img = _intensities(cls, rng_int, config.modality, spacing_zyx)
    img = ndi.gaussian_filter1d(img, SLICE_PROFILE_SIGMA, axis=0, mode="nearest", truncate=3.0)
    lut = CT_LUT if config.modality == "CT" else MRI_LUT
    fat_value = float(img[cls == MEDFAT].mean()) if (cls == MEDFAT).any() else lut[MEDFAT][0]
    mask, records = _place_nodes(grid, cls, img, rng_nodes, ap, config.difficulty, config.modality, node_scale,
                                 fat_value)
    # in-plane point spread function
    psf = (0.0, PSF_SIGMA_MM / config.spacing_xyz_mm[1], PSF_SIGMA_MM / config.spacing_xyz_mm[0])
    if max(psf) >= 0.25:
        img = ndi.gaussian_filter(img, psf, mode="nearest", truncate=3.0)
    body = cls != AIR
    if config.modality == "CT":
        img = _ct_noise(img, body, grid, ap, rng_noise, config.difficulty, spacing_zyx)
        arr = np.clip(np.rint(img), *CT_CLIP).astype(np.int16)
    else:
        arr = _mri_noise(img, grid, ap, rng_noise, config.difficulty).astype(np.float32)
    return PhantomCase(case_id, grid.to_sitk(arr), grid.to_sitk(mask), records)


def _ct_noise(img, body, grid, ap, rng, difficulty, spacing_zyx):
    """Correlated Gaussian noise, strongest in the centre of the body (longest ray paths)."""
    sd = CT_NOISE_SD * (0.85 + 0.3 * difficulty) * rng.uniform(0.85, 1.15)
    noise = _fine_field(rng, img.shape, CT_NOISE_CORR_MM, spacing_zyx)
    a = ap["cav_a"] + ap["rib"] + ap["mus_lat"] + ap["fat_lat"]
    b = ap["cav_b_ant"] + ap["rib"] + ap["mus_ant"] + ap["fat_ant"]
    r2 = np.clip((grid.qx / a) ** 2 + (grid.qy / b) ** 2, 0.0, 1.0)
    position = np.where(body, 1.15 - 0.3 * r2[None], 0.6).astype(np.float32)
    return img + sd * position * noise


def _mri_noise(img, grid, ap, rng, difficulty):
    """Smooth multiplicative bias field (receive-coil shading), then Rician magnitude noise."""
    L = max(ap["cav_a"], 1.0) * 1.5
    x, y = grid.qx / L, grid.qy / L
    z = (grid.qz / max(float(np.abs(grid.qz).max()), 1.0))[:, None, None]
    c = rng.normal(0.0, 0.18, 7)
    log_b = (c[0] * x + c[1] * y + c[2] * x * x + c[3] * y * y + c[4] * x * y)[None] + c[5] * z + c[6] * z * z
    bias = np.exp(log_b).astype(np.float32)
    sigma = rng.uniform(6.0, 12.0) * (0.8 + 0.5 * difficulty)
    sig = np.maximum(img, 0.0) * bias
    n1 = rng.standard_normal(img.shape, dtype=np.float32)
    n2 = rng.standard_normal(img.shape, dtype=np.float32)
    out = np.sqrt((sig + sigma * n1) ** 2 + (sigma * n2) ** 2)
    return np.maximum(out, 1e-3)


# ==================================================================================================
# the dataset
# ==================================================================================================
def _write_image(img: sitk.Image, path: Path) -> None:
    with atomic_path(path, suffix=FILE_ENDING) as tmp:
        sitk.WriteImage(img, str(tmp), True)


def _labeled_cases(config: PhantomConfig) -> set[int]:
    n = config.n_cases
    k = int(math.floor(config.labeled_fraction * n + 0.5))
    if config.labeled_fraction > 0 and k == 0:
        k = 1
    k = min(k, n)
    rng = np.random.default_rng([int(config.seed) & 0xFFFFFFFF, 2 ** 20, 7])
    return set(int(i) for i in rng.choice(n, k, replace=False)) if k else set()


def _check_target(out: Path) -> None:
    """Refuse to replace something that is not a phantom dataset, or to add a second dataset id."""
    if out.exists():
        meta = out / "dataset.json"
        is_phantom = False
        if meta.is_file():
            try:
                is_phantom = "phantom_config" in load_json(meta)
            except (ValueError, OSError):
                is_phantom = False
        if not is_phantom:
            raise LNMError(f"{out}: exists and is not a phantom dataset; refusing to overwrite it "
                           "(remove it or choose another dataset id / name)")
    prefix = out.name.split("_", 1)[0] + "_"
    for other in sorted(out.parent.glob(prefix + "*")) if out.parent.is_dir() else []:
        if other.is_dir() and other.name != out.name:
            raise LNMError(f"{other}: another dataset already uses id {prefix[7:-1]}; dataset ids must be unique "
                           "(remove it or choose another id)")


def make_phantom_dataset(raw_root: Path, dataset_id: int = 999, name: str = "Phantom",
                         config: PhantomConfig = PhantomConfig(), progress: bool = False) -> Path:
    """Write raw_root/Dataset{id:03d}_{name}/ in the raw dataset convention and return that path.

    An existing phantom dataset of that name is replaced (the new one is built next to it and swapped
    in); anything else in the way raises LNMError."""
    config = config.validated()
    if not 0 <= int(dataset_id) <= 999:
        raise LNMError(f"dataset id must be within 0..999, got {dataset_id}")
    if not name or not all(ch.isalnum() or ch in "_-" for ch in name):
        raise LNMError(f"dataset name must use letters, digits, '_' or '-', got '{name}'")
    raw_root = Path(raw_root)
    out = raw_root / f"Dataset{int(dataset_id):03d}_{name}"
    _check_target(out)
    raw_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=raw_root))
    try:
        _write_dataset(work, name, config, progress)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=raw_root))
            os.replace(out, old / out.name)
            os.replace(work, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return out


def _write_dataset(root: Path, name: str, config: PhantomConfig, progress: bool) -> None:
    from tqdm import tqdm

    labeled = _labeled_cases(config)
    n_total = config.n_cases + config.n_test_cases
    node_rows, truth_rows, station_rows, patient_rows = [], [], [], []
    ts_nodes, ts_stations, ts_patients = [], [], []
    show = progress and os.environ.get("LNM_NO_PROGRESS", "0") != "1"
    bar = tqdm(range(n_total), desc="phantom", unit="case", disable=not show)
    for index in bar:
        test = index >= config.n_cases
        case = generate_case(index, config)
        split = "Ts" if test else "Tr"
        _write_image(case.image, root / f"images{split}" / f"{case.case_id}_0000{FILE_ENDING}")
        _write_image(case.mask, root / f"nodes{split}" / f"{case.case_id}{FILE_ENDING}")
        shown = test or index in labeled
        for n in case.nodes:
            row = {"case": case.case_id, "node": n.node, "station": n.station, "label": str(n.label)}
            if test:
                ts_nodes.append(row)
            else:
                truth_rows.append(row)
                node_rows.append({**row, "label": row["label"] if shown else ""})
        stations = [{"case": case.case_id, "station": st, "label": str(lab)}
                    for st, lab in case.station_labels().items()]
        patient = {"case": case.case_id, "label": str(case.patient_label)}
        (ts_stations if test else station_rows).extend(stations)
        (ts_patients if test else patient_rows).append(patient)
    bar.close()
    cols = {"nodes": ["case", "node", "station", "label"], "stations": ["case", "station", "label"],
            "patients": ["case", "label"]}
    save_csv_atomic(pd.DataFrame(node_rows, columns=cols["nodes"]), root / "nodes.csv")
    save_csv_atomic(pd.DataFrame(truth_rows, columns=cols["nodes"]), root / "truth_nodes.csv")
    save_csv_atomic(pd.DataFrame(station_rows, columns=cols["stations"]), root / "stations.csv")
    save_csv_atomic(pd.DataFrame(patient_rows, columns=cols["patients"]), root / "patients.csv")
    if config.n_test_cases:
        save_csv_atomic(pd.DataFrame(ts_nodes, columns=cols["nodes"]), root / "nodesTs.csv")
        save_csv_atomic(pd.DataFrame(ts_stations, columns=cols["stations"]), root / "stationsTs.csv")
        save_csv_atomic(pd.DataFrame(ts_patients, columns=cols["patients"]), root / "patientsTs.csv")
    channel = "CT" if config.modality == "CT" else "T2"
    n_pos = sum(int(r["label"]) for r in truth_rows)
    save_json({
        "name": name,
        "channel_names": {"0": channel},
        "file_ending": FILE_ENDING,
        "numTraining": config.n_cases,
        "numTest": config.n_test_cases,
        "description": (f"Synthetic {'chest CT (HU)' if channel == 'CT' else 'chest T2 MRI (arbitrary units)'} "
                        f"phantom with mediastinal lymph nodes: {config.n_cases} training cases "
                        f"({len(labeled)} with node labels; station and patient labels for all), "
                        f"{config.n_test_cases} test cases; {len(truth_rows)} training nodes, {n_pos} metastatic."),
        "reference": "lnm_auto.datasets.phantom (synthetic, no patient data); see documentation/phantom.md",
        "phantom_config": config.to_json(),
        "phantom_version": PHANTOM_VERSION,
    }, root / "dataset.json")


def node_features(case) -> list[tuple]:
    """(case, label, voxel volume, 90th percentile HU, SD of the solid part > -20 HU) per node: simple
    radiomics a radiologist would read (size, enhancement, heterogeneity/necrosis)."""
    hu = np.clip(sitk.GetArrayFromImage(case.image).astype(np.float32), -150, 250)
    m = sitk.GetArrayFromImage(case.mask)
    boxes = ndi.find_objects(m)
    out = []
    for n in case.nodes:
        v = hu[boxes[n.node - 1]][m[boxes[n.node - 1]] == n.node]
        solid = v[v > -20] if (v > -20).sum() >= 3 else v
        out.append((case.case_id, n.label, v.size, float(np.percentile(v, 90)), float(solid.std())))
    return out
