"""Radiomics configuration: node features against hand-computed geometry, classifier learning and storage."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from sklearn.metrics import roc_auc_score

from lnm_auto.radiomics.classifier import RadiomicsClassifier, size_rule_scores
from lnm_auto.radiomics.features import FEATURE_COLUMNS, node_features
from lnm_auto.plans.radiomics_topology import texture_mode_for_spacing
from lnm_auto.radiomics.features import discretisation_settings
from lnm_auto.utils.errors import LNMError

SPACING_XYZ = (0.7, 0.9, 2.5)


def _rotation_direction(deg_z: float = 30.0, deg_x: float = 20.0) -> tuple[float, ...]:
    """An oblique orthonormal direction matrix (rotation about z, then x)."""
    a, b = np.radians(deg_z), np.radians(deg_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return tuple((rx @ rz).ravel())


def _ellipsoid_case(semi_axes_xyz, spacing_xyz=SPACING_XYZ, direction=None, node_id=1, hu=40.0, seed=0):
    """CT-like image and instance mask holding one ellipsoid whose axes follow the image's axes.

    A slice centre passes through the ellipsoid's centre, so its largest in-plane section is the
    full ellipse of semi-axes (x, y).
    """
    sp = np.asarray(spacing_xyz, dtype=float)
    size = [int(np.ceil(2 * a / s)) + 8 for a, s in zip(semi_axes_xyz, sp)]
    size[2] += (size[2] + 1) % 2                                 # odd slice count: centre slice exists
    z, y, x = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(size[::-1], sp[::-1])], indexing="ij")
    x = x + 0.21                                                 # off the voxel grid in-plane
    inside = (x / semi_axes_xyz[0]) ** 2 + (y / semi_axes_xyz[1]) ** 2 + (z / semi_axes_xyz[2]) ** 2 <= 1.0
    rng = np.random.default_rng(seed)
    arr = np.where(inside, rng.normal(hu, 20.0, inside.shape), rng.normal(-90.0, 10.0, inside.shape))
    image = sitk.GetImageFromArray(arr.astype(np.float32))
    mask = sitk.GetImageFromArray((inside * node_id).astype(np.uint16))
    for im in (image, mask):
        im.SetSpacing(tuple(float(v) for v in sp))
        im.SetOrigin((12.5, -30.0, 101.0))
        if direction is not None:
            im.SetDirection(direction)
    return image, mask


def _ellipsoid_sphericity(a, b, c):
    """Sphericity of an ellipsoid from Thomsen's surface formula (relative error < 1.1 %)."""
    p = 1.6075
    surface = 4 * np.pi * (((a * b) ** p + (a * c) ** p + (b * c) ** p) / 3) ** (1 / p)
    volume = 4 / 3 * np.pi * a * b * c
    return (36 * np.pi * volume ** 2) ** (1 / 3) / surface


def test_sphere_and_ellipsoid_features_match_hand_computed_values_on_an_oblique_anisotropic_grid():
    in_plane_voxel = float(np.hypot(*SPACING_XYZ[:2]))
    direction = _rotation_direction()
    sphere = node_features(*_ellipsoid_case((9.0, 9.0, 9.0), direction=direction)).loc[1]
    assert sphere["volume_mm3"] == pytest.approx(4 / 3 * np.pi * 9.0 ** 3, rel=0.03)
    assert sphere["short_axis_mm"] == pytest.approx(18.0, abs=in_plane_voxel)
    assert sphere["long_axis_mm"] == pytest.approx(18.0, abs=in_plane_voxel)
    assert 0.9 <= sphere["sphericity"] <= 1.02
    assert sphere["elongation"] == pytest.approx(1.0, abs=0.05)

    semi = (12.0, 6.0, 8.0)
    ellipsoid = node_features(*_ellipsoid_case(semi, direction=direction)).loc[1]
    assert ellipsoid["volume_mm3"] == pytest.approx(4 / 3 * np.pi * np.prod(semi), rel=0.03)
    assert ellipsoid["long_axis_mm"] == pytest.approx(24.0, abs=in_plane_voxel)
    assert ellipsoid["short_axis_mm"] == pytest.approx(12.0, abs=in_plane_voxel)
    assert ellipsoid["sphericity"] < sphere["sphericity"] - 0.05
    assert ellipsoid["sphericity"] == pytest.approx(_ellipsoid_sphericity(*semi), abs=0.08)
    # IBSI PCA axes of a solid ellipsoid: 4 sqrt(a^2 / 5); elongation and flatness are semi-axis ratios
    assert ellipsoid["major_axis_mm"] == pytest.approx(4 * 12.0 / np.sqrt(5), rel=0.03)
    assert ellipsoid["elongation"] == pytest.approx(8.0 / 12.0, abs=0.03)
    assert ellipsoid["flatness"] == pytest.approx(6.0 / 12.0, abs=0.03)
    assert ellipsoid["max_3d_diameter_mm"] == pytest.approx(24.0, abs=2 * in_plane_voxel)

    # the direction matrix changes where the node is, not what it is
    straight = node_features(*_ellipsoid_case(semi)).loc[1]
    pd.testing.assert_series_equal(straight, ellipsoid, rtol=1e-6)


def test_node_ids_map_to_their_rows_and_first_order_matches_numpy():
    rng = np.random.default_rng(1)
    arr = rng.normal(-80.0, 10.0, (14, 60, 60)).astype(np.float32)
    labels = np.zeros(arr.shape, np.uint16)
    nodes = {12: ((3, 10), (5, 15), (5, 13), 120.0), 3: ((4, 7), (30, 34), (30, 33), 10.0),
             7: ((8, 12), (40, 55), (10, 22), 60.0)}
    for node, ((z0, z1), (y0, y1), (x0, x1), hu) in nodes.items():
        labels[z0:z1, y0:y1, x0:x1] = node
        arr[z0:z1, y0:y1, x0:x1] = rng.normal(hu, 15.0, (z1 - z0, y1 - y0, x1 - x0))
    labels[1, 50, 50] = 9                                        # a one-voxel node
    image, mask = sitk.GetImageFromArray(arr), sitk.GetImageFromArray(labels)
    for im in (image, mask):
        im.SetSpacing((0.8, 0.8, 3.0))

    table = node_features(image, mask)
    assert list(table.index) == [3, 7, 9, 12] and table.index.name == "node"
    assert list(table.columns) == list(FEATURE_COLUMNS)
    for node in nodes:
        voxels = np.round(arr[labels == node].astype(np.float64))   # CT: IBSI rounds to whole HU
        assert table.loc[node, "volume_mm3"] == pytest.approx(voxels.size * 0.8 * 0.8 * 3.0)
        assert table.loc[node, "firstorder_mean"] == pytest.approx(voxels.mean(), rel=1e-6)
        assert table.loc[node, "firstorder_max"] == pytest.approx(voxels.max(), rel=1e-6)
        assert table.loc[node, "firstorder_var"] == pytest.approx(voxels.var(), rel=1e-6)
    # the one-voxel node keeps its shape row; its intensity features are NaN instead of failing the case
    assert table.loc[9, "volume_mm3"] == pytest.approx(0.8 * 0.8 * 3.0)
    assert table.loc[9, "short_axis_mm"] == pytest.approx(0.8)
    assert table.loc[9, ["firstorder_mean", "glcm_contrast", "glszm_sze"]].isna().all()
    assert table.drop(index=9).notna().all().all()

    subset = node_features(image, mask, node_ids=[12, 3])
    assert list(subset.index) == [12, 3]
    pd.testing.assert_frame_equal(subset.loc[[12, 3]], table.loc[[12, 3]])
    with pytest.raises(LNMError, match=r"\[5\]"):
        node_features(image, mask, node_ids=[5])
    shifted = sitk.Image(mask)
    shifted.SetOrigin((1.0, 0.0, 0.0))
    with pytest.raises(LNMError, match="one grid"):
        node_features(image, shifted)


def test_discretisation_and_texture_mode_rules():
    ct = discretisation_settings("ct")
    assert ct["base_discretisation_method"] == "fixed_bin_size" and ct["base_discretisation_bin_width"] == 25.0
    assert ct["resegmentation_intensity_range"][0] == -1000.0
    assert discretisation_settings("CT", 10.0)["base_discretisation_bin_width"] == 10.0
    mr = discretisation_settings("T2")
    assert mr["base_discretisation_method"] == "fixed_bin_number" and mr["base_discretisation_n_bins"] == 32
    assert discretisation_settings("T2", 50.0)["base_discretisation_method"] == "fixed_bin_size"
    assert texture_mode_for_spacing((5.0, 0.8, 0.8)) == "2.5d"
    assert texture_mode_for_spacing((1.0, 0.9, 0.9)) == "3d"
    # CT: grey level = floor((HU + 1000) / 25) + 1, so a ~40 HU node sits near level 42 with a handful of
    # levels; MR: 32 levels spread over the node's own range, so its co-occurrences are far more varied
    image, mask = _ellipsoid_case((6.0, 6.0, 6.0), spacing_xyz=(0.8, 0.8, 0.8))
    as_ct = node_features(image, mask, modality_hint="CT").loc[1]
    as_mr = node_features(image, mask, modality_hint="T2").loc[1]
    assert as_ct["firstorder_mean"] == pytest.approx(as_mr["firstorder_mean"], abs=0.05)   # CT: rounded HU
    assert as_ct["glcm_joint_avg"] == pytest.approx((as_ct["firstorder_mean"] + 1000) / 25 + 0.5, abs=0.5)
    assert as_mr["glcm_joint_entr"] > as_ct["glcm_joint_entr"] + 1.0


def _synthetic_nodes(n_patients: int, seed: int, nonlinear: bool = False, n_noise: int = 20):
    """A radiomics-like table: size and intensity carry the signal, plus noise columns and gaps."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_patients), rng.integers(2, 6, n_patients))
    n = len(groups)
    patient_effect = rng.normal(0, 0.3, n_patients)[groups]
    short_axis = rng.gamma(4.0, 2.5, n)
    mean_hu = rng.normal(50, 15, n)
    if nonlinear:   # metastatic when exactly one of two features is high: no linear model can see it
        a, b = rng.normal(size=n), rng.normal(size=n)
        labels = ((a > 0) ^ (b > 0)).astype(int)
        extra = {"texture_a": a, "texture_b": b}
    else:
        logit = 0.45 * (short_axis - 10) + 0.08 * (mean_hu - 50) + patient_effect
        labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
        extra = {}
    table = pd.DataFrame({"short_axis_mm": short_axis, "volume_mm3": np.pi / 6 * short_axis ** 3 * rng.uniform(1, 2, n),
                          "firstorder_mean": mean_hu, **extra,
                          **{f"noise_{i}": rng.normal(size=n) for i in range(n_noise)}})
    table.loc[rng.random(n) < 0.05, "firstorder_mean"] = np.nan      # failed nodes: NaN, imputed
    return table, labels, groups


@pytest.fixture(scope="module")
def fitted():
    """``fitted(nonlinear)``: (table, model) of a classifier fitted once on synthetic nodes: a linear signal in 20
    patients, or an interaction in 120 (no linear model can see it). The tests only read them."""
    made = {}

    def fit(nonlinear: bool):
        if nonlinear not in made:
            if nonlinear:
                table, labels, groups = _synthetic_nodes(120, seed=6, nonlinear=True, n_noise=3)
                made[nonlinear] = table, RadiomicsClassifier(seed=0).fit(table, labels, groups)
            else:
                table, labels, groups = _synthetic_nodes(20, seed=7, n_noise=4)
                made[nonlinear] = table, RadiomicsClassifier(seed=1).fit(table, labels, groups)
        return made[nonlinear]
    return fit


def test_classifier_learns_and_beats_chance_on_held_out_patients():
    table, labels, groups = _synthetic_nodes(90, seed=3)
    train = groups < 60
    model = RadiomicsClassifier(seed=0).fit(table[train], labels[train], groups[train])
    proba = model.predict_proba(table[~train])
    assert proba.shape == ((~train).sum(),) and np.all((proba >= 0) & (proba <= 1))
    assert roc_auc_score(labels[~train], proba) > 0.85
    assert set(model.inner_cv_auroc) == {"logistic_regression", "gradient_boosting"}
    assert np.array_equal(size_rule_scores(table), table["short_axis_mm"].to_numpy())


def test_model_selection_picks_logistic_for_linear_signal_and_boosting_for_an_interaction(fitted):
    # ~60 nodes of 20 patients; the log-odds are a sum of six features: easy for a line, hard for shallow trees
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(20), rng.integers(2, 6, 20))
    x = rng.normal(size=(len(groups), 16))
    labels = (rng.random(len(groups)) < 1 / (1 + np.exp(-0.8 * x[:, :6].sum(axis=1)))).astype(int)
    linear = RadiomicsClassifier(seed=0).fit(pd.DataFrame(x, columns=[f"f{i}" for i in range(16)]), labels, groups)
    assert linear.chosen_model == "logistic_regression"
    auroc = linear.inner_cv_auroc
    assert auroc["logistic_regression"] > auroc["gradient_boosting"] + 0.05 and auroc["logistic_regression"] > 0.8

    _, interaction = fitted(nonlinear=True)
    assert interaction.chosen_model == "gradient_boosting"
    assert interaction.inner_cv_auroc["gradient_boosting"] > interaction.inner_cv_auroc["logistic_regression"] + 0.2


@pytest.mark.parametrize("nonlinear", [False, True], ids=["logistic", "boosting"])
def test_save_load_round_trip_is_identical_and_never_unpickles(tmp_path, monkeypatch, fitted, nonlinear):
    table, model = fitted(nonlinear)
    assert model.chosen_model == ("gradient_boosting" if nonlinear else "logistic_regression")
    # the stored numbers reproduce scikit-learn's own pipeline
    x = table[model.params["feature_columns"]].to_numpy(dtype=float)
    np.testing.assert_allclose(model.predict_proba(table), model._sklearn_pipeline.predict_proba(x)[:, 1],
                               rtol=1e-10, atol=1e-12)

    path = tmp_path / "radiomics_model.json"
    model.save(path)
    stored = json.loads(path.read_text())
    assert stored["chosen_model"] == model.chosen_model
    assert set(stored["inner_cv"]["auroc"]) == {"logistic_regression", "gradient_boosting"}

    def refuse(*args, **kwargs):
        raise AssertionError("model loading must not unpickle")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    loaded = RadiomicsClassifier.load(path)
    assert np.array_equal(loaded.predict_proba(table), model.predict_proba(table))
    assert loaded.chosen_model == model.chosen_model and loaded.inner_cv_auroc == pytest.approx(model.inner_cv_auroc)
    with pytest.raises(LNMError, match="lacks 1 column"):
        loaded.predict_proba(table.drop(columns=["short_axis_mm"]))


def test_crafted_or_corrupt_model_files_are_refused(tmp_path, fitted):
    _, good = fitted(nonlinear=True)
    assert good.chosen_model == "gradient_boosting"
    params = json.loads(json.dumps(good.params))

    def crafted(name, mutate):
        p = json.loads(json.dumps(params))
        mutate(p)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(p))
        return path

    class Payload:  # what a malicious pickle would carry
        def __reduce__(self):
            return (print, ("executed",))

    pickled = tmp_path / "pickled.json"
    pickled.write_bytes(pickle.dumps(Payload()))
    bad_files = [
        pickled,
        crafted("python_object", lambda p: p.update({"py/object": "os.system"})),
        crafted("other_format", lambda p: p.update({"format": "sklearn.pipeline.Pipeline"})),
        crafted("loop", lambda p: p["gradient_boosting"]["trees"][0]["left"].__setitem__(0, 0)),
        crafted("feature_out_of_range",
                lambda p: p["gradient_boosting"]["trees"][0]["feature"].__setitem__(0, 10 ** 6)),
        crafted("short_scaler", lambda p: p["scaler_mean"].pop()),
        crafted("string_number", lambda p: p["impute_medians"].__setitem__(0, "1.0")),
    ]
    for path in bad_files:
        with pytest.raises(LNMError, match=path.name):
            RadiomicsClassifier.load(path)


def test_fit_refuses_one_class_and_falls_back_to_logistic_without_inner_cv_for_one_patient(tmp_path):
    table, labels, groups = _synthetic_nodes(10, seed=9)
    with pytest.raises(LNMError, match="both classes"):
        RadiomicsClassifier().fit(table, np.zeros_like(labels), groups)
    # every node from one patient: nothing to cross-validate a choice on, so the simplest model, still usable
    model = RadiomicsClassifier().fit(table, labels, np.zeros_like(groups))
    assert model.chosen_model == "logistic_regression" and np.isnan(model.inner_cv_auroc["logistic_regression"])
    model.save(tmp_path / "m.json")
    again = RadiomicsClassifier.load(tmp_path / "m.json")
    assert np.array_equal(again.predict_proba(table), model.predict_proba(table))
    assert roc_auc_score(labels, model.predict_proba(table)) > 0.7     # it learnt from what it saw


def _surface_on_the_whole_padded_region(binary: sitk.Image) -> tuple[float, float]:
    """The surface estimate resampling every isotropic voxel of the padded region (what
    ``padded_surface_and_volume`` computed before it kept only the voxels near the node)."""
    spacing = np.asarray(binary.GetSpacing(), dtype=float)
    iso = max(float(spacing.min()), 0.5)
    size = [max(1, int(round(n * s / iso))) for n, s in zip(binary.GetSize(), spacing)]
    shift = np.asarray(binary.GetDirection(), dtype=float).reshape(3, 3) @ ((iso - spacing) / 2.0)
    blurred = sitk.SmoothingRecursiveGaussian(binary, [0.5 * s for s in spacing])
    fine = sitk.Resample(blurred, size, sitk.Transform(), sitk.sitkLinear,
                         tuple(float(v) for v in np.asarray(binary.GetOrigin()) + shift), (iso, iso, iso),
                         binary.GetDirection(), 0.0, sitk.sitkFloat32) >= 0.5
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.ComputePerimeterOn()
    stats.Execute(fine)
    return float(stats.GetPerimeter(1)), float(stats.GetPhysicalSize(1))


@pytest.mark.parametrize("semi_axes, spacing", [((6.0, 4.0, 9.0), (0.8, 0.8, 5.0)), ((3.0, 3.0, 3.0), (0.7, 0.9, 2.5)),
                                                ((1.0, 0.6, 1.5), (0.8, 0.8, 5.0)), ((10.0, 7.0, 4.0), (1.0, 1.0, 1.0)),
                                                ((5.0, 5.0, 2.0), (0.4, 0.4, 3.0))])
def test_the_surface_estimate_needs_only_the_voxels_near_the_node(semi_axes, spacing):
    """Leaving out the isotropic voxels the blur cannot lift to 0.5 changes neither surface nor volume."""
    from lnm_auto.imaging.surface import SURFACE_PAD_VOXELS, padded_surface_and_volume
    _, mask = _ellipsoid_case(semi_axes, spacing_xyz=spacing, direction=_rotation_direction())
    pad = [SURFACE_PAD_VOXELS] * 3
    binary = sitk.Cast(sitk.ConstantPad(mask, pad, pad, 0), sitk.sitkFloat32)
    assert padded_surface_and_volume(binary) == pytest.approx(_surface_on_the_whole_padded_region(binary), rel=1e-9)
