"""The phantom's image grid and the random fields sampled on it.

``Grid`` places the voxel lattice in the patient's own frame (LPS millimetres, centred on the body:
x to the patient's left, y posterior, z superior) through the image's direction matrix, spacing and
origin, so that anatomy drawn in body millimetres lands in the right voxels for any geometry.
The fields are the unit-variance random textures the painters add on top of the tissue classes.
"""
from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

LPS_FLIP = np.diag([-1.0, -1.0, 1.0])


class Grid:
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
        """A (z, y, x) array as a SimpleITK image on this grid."""
        img = sitk.GetImageFromArray(arr_zyx)
        img.SetSpacing(tuple(float(s) for s in self.spacing))
        img.SetOrigin(tuple(float(o) for o in self.origin))
        img.SetDirection(tuple(float(d) for d in self.direction.ravel()))
        return img


def interp_matrix(n: int, m: int) -> np.ndarray:
    """(n, m) linear interpolation weights from m coarse samples onto n fine ones (cell-centred)."""
    pos = np.clip((np.arange(n) + 0.5) * m / n - 0.5, 0.0, m - 1.0)
    i0 = np.minimum(np.floor(pos).astype(int), max(m - 2, 0))
    w = pos - i0
    out = np.zeros((n, m), np.float32)
    out[np.arange(n), i0] = 1.0 - w
    if m > 1:
        out[np.arange(n), np.minimum(i0 + 1, m - 1)] += w
    return out


def smooth_field(rng: np.random.Generator, shape_zyx, coarse_mm: float, spacing_zyx) -> np.ndarray:
    """Unit-variance-ish smooth random field: noise on a coarse grid, separably linearly interpolated."""
    coarse = [max(2, int(math.ceil(n * sp / coarse_mm)) + 1) for n, sp in zip(shape_zyx, spacing_zyx)]
    c = rng.standard_normal(coarse).astype(np.float32)
    wz, wy, wx = (interp_matrix(n, m) for n, m in zip(shape_zyx, coarse))
    c = np.tensordot(c, wx, axes=([2], [1]))                 # (cz, cy, nx)
    c = np.tensordot(wy, c, axes=([1], [1]))                 # (ny, cz, nx)
    c = np.tensordot(wz, c, axes=([1], [1]))                 # (nz, ny, nx)
    sd = float(c.std())
    return np.ascontiguousarray(c / sd if sd > 0 else c, dtype=np.float32)


def fine_field(rng: np.random.Generator, shape_zyx, sigma_mm: float, spacing_zyx) -> np.ndarray:
    """Unit-variance field with in-plane correlation length ~sigma_mm (white along z beyond a slice)."""
    f = rng.standard_normal(shape_zyx, dtype=np.float32)
    sig = (0.0, sigma_mm / spacing_zyx[1], sigma_mm / spacing_zyx[2])
    if max(sig) >= 0.3:
        f = ndi.gaussian_filter(f, sig, mode="wrap", truncate=3.0)
    sd = float(f.std())
    return f / sd if sd > 0 else f
