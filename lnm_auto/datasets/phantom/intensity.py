"""The phantom's intensities: per-tissue values, texture, fat septa and lung vessels, then scanner noise.

CT values are in HU, MRI (T2-weighted) values in arbitrary units; each case jitters the lookup tables.
Noise comes last: correlated Gaussian CT noise, stronger in the body centre, or for MRI a smooth
multiplicative bias field and Rician magnitude noise.
"""
from __future__ import annotations

import numpy as np

from lnm_auto.datasets.phantom.anatomy import (AIR, AIRWAY_LUMEN, AIRWAY_WALL, ARTERY, BLOOD_POOL, CORTEX, CSF,
                                               DISC, ESOPHAGUS, FAT, LUNG, MARROW, MEDFAT, MUSCLE, MYOCARDIUM,
                                               N_CLASSES, PULM_ARTERY, SKIN, VEIN)
from lnm_auto.datasets.phantom.grid import fine_field, smooth_field

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


def paint_intensities(cls: np.ndarray, rng: np.random.Generator, modality: str, spacing_zyx) -> np.ndarray:
    """Noise-free image (float32, nz ny nx) of a tissue class map: jittered tissue values plus texture."""
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
    smooth = smooth_field(rng, cls.shape, 12.0, spacing_zyx)
    img += amp[cls] * smooth
    fine = fine_field(rng, cls.shape, 1.6, spacing_zyx)
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


def add_ct_noise(img, body, grid, ap, rng, difficulty, spacing_zyx):
    """Correlated Gaussian noise, strongest in the centre of the body (longest ray paths)."""
    sd = CT_NOISE_SD * (0.85 + 0.3 * difficulty) * rng.uniform(0.85, 1.15)
    noise = fine_field(rng, img.shape, CT_NOISE_CORR_MM, spacing_zyx)
    a = ap["cav_a"] + ap["rib"] + ap["mus_lat"] + ap["fat_lat"]
    b = ap["cav_b_ant"] + ap["rib"] + ap["mus_ant"] + ap["fat_ant"]
    r2 = np.clip((grid.qx / a) ** 2 + (grid.qy / b) ** 2, 0.0, 1.0)
    position = np.where(body, 1.15 - 0.3 * r2[None], 0.6).astype(np.float32)
    return img + sd * position * noise


def add_mri_noise(img, grid, ap, rng, difficulty):
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
