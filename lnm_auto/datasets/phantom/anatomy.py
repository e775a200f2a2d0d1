"""The phantom's anatomy: a tissue class map of the chest painted slice by slice from analytic shapes.

Torso with skin, subcutaneous fat, muscle, ribs, spine and sternum; lungs; trachea and main bronchi,
oesophagus, aorta with its arch and branches, SVC, pulmonary arteries and the heart. The anatomy is
drawn in nominal adult millimetres and scaled per case to fit the field of view; its per-case
variation comes from ``draw_anatomy_params``.
"""
from __future__ import annotations

import math

import numpy as np

from lnm_auto.datasets.phantom.grid import Grid, interp_matrix

# ---- tissue classes --------------------------------------------------------------------------------
(AIR, SKIN, FAT, MUSCLE, LUNG, CORTEX, MARROW, DISC, CSF, AIRWAY_WALL, AIRWAY_LUMEN, ESOPHAGUS,
 ARTERY, VEIN, MYOCARDIUM, BLOOD_POOL, MEDFAT, PULM_ARTERY) = range(18)
N_CLASSES = 18

# ---- nominal anatomy (mm, adult; scaled per case to the field of view) ------------------------------
CAVITY_A, CAVITY_B_ANT, CAVITY_B_POST = 105.0, 62.0, 70.0
RIB_BAND = 7.0
MUSCLE_LAT, MUSCLE_ANT, MUSCLE_POST = 10.0, 12.0, 16.0
FAT_MAX = 22.0
SKIN_MM = 1.8
Z_NOMINAL = 160.0                                 # craniocaudal extent the station layout is drawn for


def fit_scale(grid: Grid, oblique_deg: float) -> float:
    """Largest anatomy scale (<= 1) for which the biggest torso fits the (rotated) field of view."""
    a = CAVITY_A + RIB_BAND + MUSCLE_LAT + 1.2 * FAT_MAX + SKIN_MM
    b = CAVITY_B_POST + RIB_BAND + MUSCLE_POST + 1.0 * FAT_MAX + SKIN_MM
    t = math.radians(oblique_deg)
    # extent of the ellipse along the grid's own axes
    ex = math.sqrt((a * math.cos(t)) ** 2 + (b * math.sin(t)) ** 2)
    ey = math.sqrt((a * math.sin(t)) ** 2 + (b * math.cos(t)) ** 2)
    return float(min(1.0, 0.95 * grid.fov_half[0] / ex, 0.95 * grid.fov_half[1] / ey))


class Painter:
    """Boolean masks of analytic shapes on one slice's body-frame coordinates (qx, qy)."""

    def __init__(self, qx: np.ndarray, qy: np.ndarray):
        self.qx, self.qy = qx, qy

    def ellipse(self, cx, cy, a, b_ant, b_post=None, p: float = 2.0) -> np.ndarray:
        """Inside a superellipse; ``b_post`` (if given) is the posterior semi-axis, ``b_ant`` the anterior."""
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
        """Inside a circle of radius r."""
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
        """Polar angle about (cx, cy) on axes scaled by (a, b)."""
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


def draw_anatomy_params(rng: np.random.Generator, g: float, gz: float, z_mm: np.ndarray) -> dict:
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
    w = interp_matrix(len(z_mm), n_coarse)
    p["interfaces"] = (w @ coarse).reshape(len(z_mm), 2, 8)
    return p


def paint_anatomy(grid: Grid, ap: dict) -> np.ndarray:
    """Tissue class map (nz, ny, nx) uint8."""
    nx, ny, nz = grid.shape_xyz
    s, gz = ap["s"], ap["gz"]
    sx, sy = ap["shift"]
    P = Painter(grid.qx - sx, grid.qy - sy)
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
        """Nominal mm -> mm of this case's body (scaled to its size)."""
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
