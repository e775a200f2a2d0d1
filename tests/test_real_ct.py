"""Real-geometry smoke test: the chest CTs with lesion masks shipped in pyradiomics 3.0.1's source archive
(get them with benchmarks/get_pyradiomics_data.sh). Skips cleanly when the data is not present."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

DATA = Path(os.environ.get("LNM_PYRADIOMICS_DATA", "/tmp/pyradiomics_data"))
CASES = ("lung1", "lung2")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not all((DATA / f"{c}_image.nrrd").is_file() for c in CASES),
                                reason=f"pyradiomics sample CTs not found in {DATA} (set LNM_PYRADIOMICS_DATA)")]


@pytest.fixture(scope="module")
def real_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("real") / "raw" / "Dataset100_RealCT"
    (root / "imagesTr").mkdir(parents=True)
    (root / "nodesTr").mkdir()
    for c in CASES:
        shutil.copy(DATA / f"{c}_image.nrrd", root / "imagesTr" / f"{c}_0000.nrrd")
        shutil.copy(DATA / f"{c}_label.nrrd", root / "nodesTr" / f"{c}.nrrd")
    pd.DataFrame({"case": list(CASES), "node": [1, 1], "station": ["R", "L"], "label": [1, 0]}).to_csv(
        root / "nodes.csv", index=False)
    (root / "dataset.json").write_text(json.dumps({"name": "RealCT", "channel_names": {"0": "CT"},
                                                   "file_ending": ".nrrd", "numTraining": 2}))
    return root


def test_fingerprint_and_preprocessing_on_real_ct(real_dataset, tmp_path):
    from lnm_auto.planning.plan_and_preprocess import plan_and_preprocess
    from lnm_auto.preprocessing.normalization import normalize_node_crops
    from lnm_auto.preprocessing.preprocessor import load_case_crops
    r = plan_and_preprocess(100, real_dataset.parent, tmp_path / "pre", planner="LNMPlannerCPU", progress=False)
    plans = r.plans
    spacings = [sitk.ReadImage(str(DATA / f"{c}_image.nrrd")).GetSpacing() for c in CASES]
    assert plans.anisotropic
    assert plans.target_spacing_mm[0] == pytest.approx(5.0)
    assert plans.target_spacing_mm[1] == pytest.approx(np.median([s[0] for s in spacings]), rel=1e-6)
    norm = plans.normalization[0]
    assert norm.scheme == "CT" and -1100 <= norm.clip_low < -200 and 0 < norm.clip_high < 1500   # HU around lesions
    g = plans.scales["global"]
    for c in CASES:
        crops = load_case_crops(r.crops_dir / f"{c}.npz")
        label = sitk.ReadImage(str(DATA / f"{c}_label.nrrd"))
        lesion_mm3 = float(sitk.GetArrayViewFromImage(label).sum() * np.prod(label.GetSpacing()))
        centre = (np.array(g.cache_shape) - 1) // 2
        assert crops["mask_global"][0][tuple(centre)] == 1                    # the crop is centred on the lesion
        crop_mm3 = crops["mask_global"][0].sum() * np.prod(g.spacing_mm)
        if g.roi_size_mm[1] >= 2 * crops["long_axis_mm"][0]:
            assert crop_mm3 == pytest.approx(lesion_mm3, rel=0.05)            # volume kept through resampling
        img = normalize_node_crops(crops, plans.normalization)["image_global"][0, 0]   # as training reads it
        assert img.dtype == np.float32 and np.isfinite(img).all() and -10 < img.min() and img.max() < 10
