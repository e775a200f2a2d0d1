"""The phantom's lymph nodes: where they sit, what they look like, and how they are painted in.

3-12 nodes per case in named IASLC stations, drawn as irregular ellipsoids with slice-thickness
partial volume. Metastatic nodes are on average larger, rounder, more heterogeneous, often necrotic
and slightly denser; benign ones may show a fatty hilum or calcification. ``difficulty`` sets how much
the two classes overlap. ``node_features`` reads simple radiomics back from a generated case.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from lnm_auto.datasets.phantom.anatomy import LUNG, MEDFAT
from lnm_auto.datasets.phantom.grid import Grid

NODE_ALLOWED = (MEDFAT, LUNG)                     # nodes may sit in mediastinal fat (and push into lung)

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


@dataclass
class PhantomNode:
    """The record of one painted node: its id in the mask, station, label and drawn appearance."""

    node: int
    station: str
    label: int
    kind: str                  # "normal", "reactive", "calcified" (benign); "micro", "macro" (metastatic)
    short_axis_mm: float       # drawn short-axis diameter (before voxelisation)
    long_axis_mm: float
    necrosis: bool
    fatty_hilum: bool
    n_voxels: int = 0


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


def _draw_node(rng: np.random.Generator, label: int, difficulty: float, node_scale: float,
               texture_separation: float | None = None) -> dict:
    """Latent appearance of one node. sep = 1 - difficulty sets how far apart the classes are in size and
    shape; tsep (default sep) how far apart in image pattern."""
    d = difficulty
    sep = 1.0 - d
    tsep = sep if texture_separation is None else float(texture_separation)
    td = d if texture_separation is None else 1.0 - tsep
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
    necrosis = kind == "macro" and short >= 6.0 and rng.random() < 0.2 + 0.6 * tsep
    pseudo_necrosis = kind == "reactive" and rng.random() < 0.12 * td      # hypodense benign (granulomatous)
    p_hilum = {"normal": 0.25 + 0.25 * tsep, "reactive": 0.15, "calcified": 0.1}.get(kind, 0.03)
    hilum = rng.random() < p_hilum
    calcified = kind == "calcified"
    if label:
        base_hu = rng.normal(40.0 + (24.0 if kind == "macro" else 10.0) * tsep, 8.0)
        het = rng.uniform(10.0, 14.0 + 16.0 * tsep) if kind == "macro" else rng.uniform(3.0, 8.0)
        irregular = rng.uniform(0.05, 0.08 + 0.10 * tsep) if kind == "macro" else rng.uniform(0.03, 0.09)
    else:
        base_hu = rng.normal(38.0, 7.0)
        het = rng.uniform(3.0, 7.0 + 3.0 * td)
        irregular = rng.uniform(0.03, 0.09 + 0.04 * td)
    nd = dict(kind=kind, short=short * node_scale, mid=mid * node_scale, long=long * node_scale,
              necrosis=bool(necrosis or pseudo_necrosis),
              nec_frac=float(rng.uniform(0.45, 0.7)), nec_drop=float(rng.uniform(40.0, 70.0) * (0.6 + 0.4 * tsep)
                                                                   if necrosis else rng.uniform(8.0, 15.0)),
              hilum=bool(hilum), calcified=bool(calcified), base_hu=float(base_hu), het=float(het),
              irregular=float(irregular), long_along_z=bool(rng.random() < 0.6),
              pert_dirs=rng.standard_normal((4, 3)), pert_m=rng.integers(2, 5, size=4),
              pert_sign=rng.choice([-1.0, 1.0], size=4), pert_w=rng.dirichlet(np.ones(4)),
              hilum_dir=rng.standard_normal(3), nec_offset=rng.normal(0.0, 0.12, size=3),
              calc_pos=rng.normal(0.0, 0.3, size=3))
    nd["pert_unit"] = [v / (np.linalg.norm(v) + 1e-12) for v in nd["pert_dirs"]]   # once, not per rendering
    return nd


_CHEBYSHEV = {2: lambda c: 2.0 * c * c - 1.0, 3: lambda c: (4.0 * c * c - 3.0) * c,
              4: lambda c: 8.0 * c * c * (c * c - 1.0) + 1.0}


def _radial(dirs: np.ndarray, nd: dict, amp: float) -> np.ndarray:
    """Smooth radial perturbation of the unit sphere: a sum of zonal harmonics cos(m * angle to v_k),
    evaluated as Chebyshev polynomials of cos(angle) (no trigonometry per voxel)."""
    out = np.zeros(dirs.shape[1:], np.float32)
    for v, m, sign, w in zip(nd["pert_unit"], nd["pert_m"], nd["pert_sign"], nd["pert_w"]):
        c = v[0] * dirs[0] + v[1] * dirs[1] + v[2] * dirs[2]
        out += (sign * w) * _CHEBYSHEV[int(m)](c)
    return amp * out


N_SUB_Z = 4           # sub-samples per slice: slice-thickness partial volume


def _render_node(grid: Grid, centre, R: np.ndarray, nd: dict, allowed: np.ndarray | None = None,
                 lung: np.ndarray | None = None):
    """Index box, sub-voxel occupancy and node-frame samples of one node at ``centre``; None if off the grid
    or if, given the ``allowed`` and ``lung`` masks, :func:`place_nodes` would surely reject the position.

    Most positions are rejected on the occupancy alone, so the inner parts are painted separately
    (:func:`_render_parts`) once a position is accepted."""
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
    # all N_SUB_Z sub-slices at once: leading axis = sub-slice (numpy work, not a Python loop per sub-slice)
    dz = (qz[None, :] + offs[:, None] * grid.spacing[2] - centre[2])[:, :, None, None]
    # node frame coordinates scaled by the semi-axes
    u = [(R[0, a] * dxy[0][None] + R[1, a] * dxy[1][None] + R[2, a] * dz) / semi[a] for a in range(3)]
    rho = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2) + 1e-6
    box = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    if allowed is not None and _surely_rejected(rho, nd["irregular"], allowed[box], lung[box]):
        return None
    dirs = np.stack([u[0] / rho, u[1] / rho, u[2] / rho])
    inside = rho <= 1.0 + _radial(dirs, nd, nd["irregular"])
    occ = inside.sum(axis=0, dtype=np.float32)
    return box, occ * (1.0 / N_SUB_Z), (u, rho, dirs, inside)


def _surely_rejected(rho: np.ndarray, irregular: float, allowed: np.ndarray, lung: np.ndarray) -> bool:
    """True if :func:`place_nodes` would surely reject the node (fewer than 3 voxels, more than 5 % of them
    outside ``allowed`` or more than half in ``lung``), known before its surface perturbation is computed
    (most positions fail so). The perturbation is at most ``irregular`` in size: a sub-sample with rho below
    1 - margin is inside whatever the surface, one above 1 + margin outside; so every real node voxel
    (occupancy >= 0.5) is among the ``n_maybe``, every ``sure`` one is real, and these bounds reject only
    what the exact test rejects."""
    margin = irregular * 1.001 + 1e-5                     # float32 rounding of the perturbation: far below 0.1 %
    n_maybe = int(((rho <= 1.0 + margin).sum(axis=0) * 2 >= N_SUB_Z).sum())
    if n_maybe < 3:
        return True
    sure = (rho <= 1.0 - margin).sum(axis=0) * 2 >= N_SUB_Z
    return bool((sure & ~allowed).sum() > 0.05 * n_maybe or (sure & lung).sum() > 0.5 * n_maybe)


def _render_parts(nd: dict, samples: tuple) -> tuple:
    """Sub-voxel occupancies (necrosis, hilum, calcification) of a node from :func:`_render_node`'s samples."""
    u, rho, dirs, inside = samples
    shape = inside.shape[1:]
    nec = np.zeros(shape, np.float32)
    hil = np.zeros(shape, np.float32)
    calc = np.zeros(shape, np.float32)
    if nd["necrosis"]:
        v = [u[a] - nd["nec_offset"][a] for a in range(3)]
        rn = np.sqrt(v[0] ** 2 + v[1] ** 2 + v[2] ** 2) / nd["nec_frac"]
        nec_sub = inside * np.clip((1.0 - rn) / 0.25, 0.0, 1.0)
        for part in nec_sub:                    # float32 accumulation in sub-slice order: same bytes per seed
            nec += part
    if nd["hilum"]:
        hdir = nd["hilum_dir"] / (np.linalg.norm(nd["hilum_dir"]) + 1e-12)
        cosang = dirs[0] * hdir[0] + dirs[1] * hdir[1] + dirs[2] * hdir[2]
        hil = (inside & (cosang > 0.8) & (rho > 0.3)).sum(axis=0, dtype=np.float32)
    if nd["calcified"]:
        v = [u[a] - nd["calc_pos"][a] for a in range(3)]
        calc = (inside & (np.sqrt(v[0] ** 2 + v[1] ** 2 + v[2] ** 2) < 0.35)).sum(axis=0, dtype=np.float32)
    k = 1.0 / N_SUB_Z
    return nec * k, hil * k, calc * k


def _node_values(nd: dict, modality: str, tex: np.ndarray, bg_fat: float) -> tuple:
    """(solid tissue values, necrosis value, hilum value, calcification value) for one node."""
    if modality == "CT":
        solid = nd["base_hu"] + nd["het"] * tex
        return solid, nd["base_hu"] - nd["nec_drop"] - 5.0 * abs(tex).mean(), bg_fat, 450.0
    # T2: nodes intermediate-high, necrosis fluid-bright, fatty hilum bright, calcification dark
    base = 200.0 + 2.2 * (nd["base_hu"] - 40.0)
    solid = base + 2.5 * nd["het"] * tex
    return solid, base + 8.0 * nd["nec_drop"], bg_fat, 30.0


def place_nodes(grid: Grid, cls: np.ndarray, img: np.ndarray, rng: np.random.Generator, ap: dict,
                difficulty: float, modality: str, node_scale: float, fat_value: float,
                texture_separation: float | None = None):
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
    scale = np.array([s, s, gz])
    centres = {name: np.array(st["c"], float) * scale + np.array([sx, sy, zc]) for name, st in STATIONS.items()}
    extents = {name: np.array(st["ext"]) for name, st in STATIONS.items()}
    records: list[PhantomNode] = []
    for label in labels:
        nd = _draw_node(rng, int(label), difficulty, node_scale, texture_separation)
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
            grow = 1.0 + attempt % 15 / 10.0
            c = centres[station].copy()
            c += rng.uniform(-1.0, 1.0, 3) * extents[station] * scale * grow
            i, j, k = np.round(grid.body_to_index(c)).astype(int).tolist()
            if not (0 <= i < nx and 0 <= j < ny and 0 <= k < nz) or not allowed[k, j, i] or mask[k, j, i]:
                continue                                   # cheap rejection before rendering
            out = _render_node(grid, c, R, nd, allowed, lung)
            if out is None:
                continue
            box, occ, samples = out
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
            placed = (box, occ, *_render_parts(nd, samples), station)
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
