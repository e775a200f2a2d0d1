"""Does a new case look like the data the model was trained on? A warning per case when clearly not.

A model trained on CT scores an MRI (or a rescaled image) without complaint: the per-case z-score hides the
units, and the probabilities mean nothing. The check compares what the fingerprint stored of the training
data (``dataset_fingerprint.json`` of the model folder: per channel, the 0.5 / 50 / 99.5 percentiles of the
intensities in the node neighbourhoods, the nodes' box grown by 10 mm) with the same samples of the new case
(``preprocessing.crops.intensity_samples``, the voxels the crops are cut from). The rule holds for any
modality and any unit, as it only compares a case with its own training data. A case is flagged when

* range: more than ``OUTSIDE_FRACTION`` (half) of its samples lie outside the training range [p0.5, p99.5],
  which holds 99% of the training samples (a CT, -1000..400 HU, against an MRI model trained on 4..550);
* level: fewer than ``MEDIAN_SIDE_FRACTION`` (2%) of its samples lie on one side of the training median (an MRI,
  4..550 and all of it above the CT median of -115 HU, inside the CT range though: the range rule misses it);
* scale: its own p0.5..p99.5 spread is more than ``SPREAD_FACTOR`` (10x) wider or narrower than the training
  data's (an image rescaled to 0..1 against a -1000..90 training set: inside the range, but flat);
* modality: its DICOM series is tagged Modality CT and the model's channel 0 is not CT, or the reverse.

Measured on lnm_make_phantom data (20 training cases, 8 test cases each, CT and MRI): test cases against their
own training data lie 0-5% outside the range, 39-54% below the median, spread 0.8-1.2x (no warning); MRI cases
against the CT model 0% below its median, CT cases against the MRI model 68-80% outside its range (warned).
A warning never stops the prediction; it is printed and recorded in ``predict_info.json`` (``domain_warnings``).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lnm_auto.preprocessing.crops import intensity_samples, neighbourhood_box
from lnm_auto.imaging.geometry import node_boxes, sitk_spacing_zyx
from lnm_auto.utils.io import load_json

FINGERPRINT_FILE = "dataset_fingerprint.json"
OUTSIDE_FRACTION = 0.5
MEDIAN_SIDE_FRACTION = 0.02
SPREAD_FACTOR = 10.0


def training_reference(model_folder: Path) -> tuple[dict | None, str]:
    """Per channel, the name and the training intensity range (``{"0": {"name", "low", "high"}}``) from the model's
    fingerprint; None and the reason when the model folder has no usable fingerprint (the check is skipped)."""
    path = Path(model_folder) / FINGERPRINT_FILE
    if not path.is_file():
        return None, f"{path} missing: no intensity check of the inputs"
    try:
        fingerprint = load_json(path)
        stats, names = fingerprint["intensity_statistics"], fingerprint.get("channel_names", {})
        reference = {str(c): {"name": str(names.get(str(c), "")), "low": float(s["percentile_00_5"]),
                              "median": float(s["median"]), "high": float(s["percentile_99_5"])}
                     for c, s in stats.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, f"{path} damaged: no intensity check of the inputs"
    return {c: r for c, r in reference.items() if all(math.isfinite(r[k]) for k in ("low", "median", "high"))}, ""


def case_samples(images: list[sitk.Image], mask: sitk.Image) -> list[np.ndarray]:
    """The case's intensity samples in its node neighbourhood: what the fingerprint sampled of training cases."""
    ids = sitk.GetArrayViewFromImage(mask)
    box = neighbourhood_box(ids.shape, sitk_spacing_zyx(mask), node_boxes(ids))
    return intensity_samples([sitk.GetArrayViewFromImage(i) for i in images], box)


def domain_warning(case_id: str, samples: list[np.ndarray], reference: dict | None,
                   dicom_modality: str | None = None) -> str:
    """One line saying how the case differs from the training data, or "" when it does not clearly differ."""
    if not reference:
        return ""
    reasons = []
    for c, x in enumerate(samples):
        ref = reference.get(str(c))
        if ref is None or x.size == 0:
            continue
        low, high = ref["low"], ref["high"]
        label = f"channel {c}" + (f" ({ref['name']})" if ref["name"] else "")
        outside = float(np.mean((x < low) | (x > high)))
        if outside > OUTSIDE_FRACTION:
            reasons.append(f"{label}: {outside:.0%} of the intensities around its nodes (median {np.median(x):.4g}) "
                           f"lie outside [{low:.4g}, {high:.4g}], where 99% of the training data's lie")
        below, above = float(np.mean(x < ref["median"])), float(np.mean(x > ref["median"]))
        if min(below, above) < MEDIAN_SIDE_FRACTION:
            side, share = ("above", 1 - below) if below <= above else ("below", 1 - above)
            reasons.append(f"{label}: {share:.0%} of the intensities around its nodes (median {np.median(x):.4g}) "
                           f"lie at or {side} the training data's median {ref['median']:.4g}")
        spread, training_spread = float(np.ptp(np.percentile(x, [0.5, 99.5]))), high - low
        if training_spread > 0 and not 1 / SPREAD_FACTOR <= spread / training_spread <= SPREAD_FACTOR:
            reasons.append(f"{label}: its intensities spread over {spread:.4g}, the training data's over "
                           f"{training_spread:.4g} (rescaled?)")
    name = reference.get("0", {}).get("name", "")
    if dicom_modality and name and (dicom_modality.upper() == "CT") != (name.strip().upper() == "CT"):
        reasons.append(f"its DICOM series is Modality {dicom_modality}, the model's channel 0 is '{name}'")
    if not reasons:
        return ""
    return (f"case '{case_id}' does not look like the training data: {'; '.join(reasons)}; its probabilities may "
            "be meaningless (a model trained on another modality or unit?)")
