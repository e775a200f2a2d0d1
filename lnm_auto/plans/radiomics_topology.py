"""The ``radiomics`` topology (also the radiomics part of ``deep_radiomics``) and its planning rule."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lnm_auto.imaging.axes import SLICE_AXIS_MIN_RATIO, slice_axis

CT_CHANNEL_NAMES = ("CT",)


def texture_mode_for_spacing(spacing_zyx) -> str:
    """'2.5d' when one axis is clearly coarser (thick slices: no 3D neighbours across 5 mm), else '3d'."""
    sp = np.asarray(spacing_zyx, dtype=float)
    coarse = slice_axis(sp)
    return "2.5d" if sp[coarse] >= SLICE_AXIS_MIN_RATIO * np.delete(sp, coarse).max() else "3d"


@dataclass(frozen=True)
class RadiomicsTopology:
    """Configuration ``radiomics``: IBSI node features (lnm_auto.radiomics) + a scikit-learn classifier chosen
    by inner cross-validation. ``texture_mode`` is fixed per dataset so every case's texture is comparable."""
    image_channel: int
    modality_hint: str              # "CT": fixed 25 HU bins; else a fixed bin count per node
    texture_mode: str               # "3d" or "2.5d" (thick slices: texture per slice, aggregated)

    config_name = "radiomics"


def plan_radiomics(fingerprint: dict, target_spacing_zyx) -> RadiomicsTopology:
    """Features of the first CT channel (else channel 0); 2.5D texture when the plan's slices are thick."""
    names = {int(k): v for k, v in fingerprint["channel_names"].items()}
    ct = [k for k, v in sorted(names.items()) if v.strip().upper() in CT_CHANNEL_NAMES]
    channel = ct[0] if ct else 0
    return RadiomicsTopology(channel, "CT" if ct else names[channel], texture_mode_for_spacing(target_spacing_zyx))
