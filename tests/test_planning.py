"""Planning rules on fingerprints built by hand: each decision is a pure function of the fingerprint."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lnm_auto.planning import planner, recipe
from lnm_auto.plans.plans import Plans
from lnm_auto.planning.splits import keep_or_write_splits, make_patient_splits
from lnm_auto.utils.errors import LNMError


def make_fingerprint(spacings_zyx, shapes_zyx, node_extents, channel_names=None, labels=None, patients=None):
    """A fingerprint with given case spacings/shapes and node extents (slice, row, col) in mm."""
    from lnm_auto.imaging.geometry import slice_axis
    cases = {}
    for i, (sp, sh) in enumerate(zip(spacings_zyx, shapes_zyx)):
        cases[f"c{i:03d}"] = {"spacing_zyx_mm": list(sp), "shape_zyx": list(sh), "slice_axis": slice_axis(sp),
                              "patient": (patients or {}).get(f"c{i:03d}", f"c{i:03d}"), "patient_label": -1}
    case_ids = sorted(cases)
    labels = labels if labels is not None else [i % 4 == 0 for i in range(len(node_extents))]
    nodes = [{"case": case_ids[i % len(case_ids)], "node": i + 1, "extent_mm": list(e), "label": int(l),
              "station_label": -1, "patient_label": -1} for i, (e, l) in enumerate(zip(node_extents, labels))]
    return {"dataset_name": "Dataset100_Hand", "channel_names": channel_names or {"0": "CT"}, "cases": cases,
            "nodes": nodes, "intensity_statistics": {"0": {"mean": 30.0, "std": 80.0, "percentile_00_5": -150.0,
                                                           "percentile_99_5": 250.0}}}


def test_anisotropic_spacing_keeps_inplane_and_does_not_oversample_z():
    spacings = [(5.0, 0.8, 0.8)] * 8 + [(2.5, 0.7, 0.7)] * 2
    shapes = [(91, 512, 512)] * 10
    target, aniso = planner.plan_target_spacing(planner.canonical_case_spacings(
        make_fingerprint(spacings, shapes, [(10, 10, 10)])), planner.canonical_case_shapes(
        make_fingerprint(spacings, shapes, [(10, 10, 10)])))
    assert aniso
    assert target[1] == pytest.approx(0.8) and target[2] == pytest.approx(0.8)   # in-plane median kept
    # nnU-Net's rule: 10th percentile of slice spacings, i.e. 2.5 here, never finer than in-plane
    assert target[0] == pytest.approx(np.percentile([5.0] * 8 + [2.5] * 2, 10))
    assert target[0] >= max(target[1], target[2])


def test_isotropic_spacing_is_median():
    spacings = [(1.0, 1.0, 1.0), (1.2, 1.2, 1.2), (0.9, 0.9, 0.9)]
    fp = make_fingerprint(spacings, [(200, 200, 200)] * 3, [(10, 10, 10)])
    target, aniso = planner.plan_target_spacing(planner.canonical_case_spacings(fp), planner.canonical_case_shapes(fp))
    assert not aniso
    assert target == pytest.approx((1.0, 1.0, 1.0))


def test_sagittal_acquisition_puts_coarse_axis_first():
    # numpy (z, y, x) spacing with x coarse: canonical slice axis is x
    fp = make_fingerprint([(0.9, 0.9, 4.0)] * 3, [(256, 256, 30)] * 3, [(12, 12, 12)])
    spacings = planner.canonical_case_spacings(fp)
    assert spacings[0] == pytest.approx((4.0, 0.9, 0.9))


def test_seed_like_ct_gives_64x64_inplane_roi():
    # esophageal CT like the paper: 0.8 x 0.8 x 5 mm, nodes up to ~25 mm in-plane
    rng = np.random.default_rng(0)
    ext = np.column_stack([rng.uniform(5, 20, 300), rng.uniform(5, 25, 300), rng.uniform(5, 25, 300)])
    fp = make_fingerprint([(5.0, 0.8, 0.8)] * 20, [(91, 512, 512)] * 20, ext)
    plans = planner.plan_experiment(fp)
    g = plans.scales["global"]
    assert g.roi_shape[1:] == (64, 64)
    assert g.spacing_mm == pytest.approx((5.0, 0.8, 0.8))
    p95_slice = np.percentile(ext[:, 0], 95)
    assert g.roi_shape[0] == int(np.ceil(2 * p95_slice / 5.0))
    # cache crops leave room for augmentation, through-plane unchanged
    assert g.cache_shape[0] == g.roi_shape[0] and g.cache_shape[1] >= 1.25 * g.roi_shape[1]


def test_roi_grows_with_node_size_and_is_capped():
    small = make_fingerprint([(1.0, 1.0, 1.0)] * 3, [(200, 200, 200)] * 3, [(8, 8, 8)] * 10)
    big = make_fingerprint([(1.0, 1.0, 1.0)] * 3, [(200, 200, 200)] * 3, [(40, 40, 40)] * 10)
    huge = make_fingerprint([(0.5, 0.5, 0.5)] * 3, [(400, 400, 400)] * 3, [(100, 100, 100)] * 10)
    gs, gb, gh = (planner.plan_experiment(f).scales["global"] for f in (small, big, huge))
    assert gs.roi_shape[1] == planner.MIN_INPLANE_VOXELS       # 24 mm minimum field -> 32 voxels
    assert gb.roi_shape[1] == 80 and gb.roi_size_mm[1] == pytest.approx(80.0)
    assert gh.roi_shape[1] == planner.MAX_INPLANE_VOXELS and gh.roi_shape[0] == planner.MAX_SLICES
    assert gh.roi_size_mm[1] == pytest.approx(200.0) and gh.spacing_mm[1] > 0.5   # field kept, sampled coarser
    for g in (gs, gb, gh):
        assert g.roi_shape[1] % planner.INPLANE_MULTIPLE == 0


def test_local_scale_zooms_between_1_and_2():
    fp = make_fingerprint([(5.0, 0.8, 0.8)] * 5, [(91, 512, 512)] * 5, [(10, 20, 20)] * 20)
    plans = planner.plan_experiment(fp)
    g, loc = plans.scales["global"], plans.scales["local"]
    zoom = g.roi_size_mm[1] / loc.roi_size_mm[1]
    assert 1.0 <= zoom <= 2.0
    assert loc.roi_shape == g.roi_shape and loc.spacing_mm[0] == g.spacing_mm[0]
    assert loc.roi_size_mm[1] >= 20.0   # the whole (95th percentile) node stays in view


def test_normalization_ct_vs_zscore():
    fp = make_fingerprint([(1, 1, 1)] * 2, [(50, 50, 50)] * 2, [(10, 10, 10)], channel_names={"0": "CT", "1": "T2"})
    norms = planner.plan_normalization(fp)
    assert norms[0].scheme == "CT" and (norms[0].clip_low, norms[0].clip_high) == (-150.0, 250.0)
    assert norms[0].mean == 30.0 and norms[0].std == 80.0
    assert norms[1].scheme == "zscore" and norms[1].mean is None


def test_batch_size_and_positive_fraction():
    assert recipe.plan_batch_size(1000, 5, 16) == 16
    assert recipe.plan_batch_size(40, 5, 16) == 8       # 32 training nodes per fold / 4 steps
    assert recipe.plan_batch_size(3, 5, 16) == 2
    assert recipe.plan_positive_fraction(188, 3447) == pytest.approx(0.33)
    assert recipe.plan_positive_fraction(60, 40) == pytest.approx(0.5)


def test_epochs_follow_a_planned_number_of_steps():
    """plan_num_epochs: ceil(steps / steps per epoch) within the range, an epoch being one pass over a fold's
    training nodes (4/5 of them with 5 folds)."""
    assert recipe.plan_num_epochs(100, 5, 16, 250, (10, 50)) == 50     # 80 per fold: 5 steps -> 50 epochs
    assert recipe.plan_num_epochs(100, 5, 16, 125, (10, 50)) == 25
    assert recipe.plan_num_epochs(1000, 5, 16, 250, (10, 50)) == 10    # 50 steps an epoch: 5, raised to 10
    assert recipe.plan_num_epochs(400, 5, 16, 250, (10, 50)) == 13     # 20 steps an epoch: ceil(12.5)
    assert recipe.plan_num_epochs(10, 5, 2, 250, (10, 50)) == 50       # 4 steps an epoch: 63, capped
    assert recipe.plan_num_epochs(5000, 5, 32, 3000, (300, 300)) == 300
    assert [recipe.plan_semi_supervised_epochs(n, 0.2) for n in (3, 10, 25, 26, 50)] == [3, 5, 5, 6, 10]
    assert recipe.plan_semi_supervised_epochs(300, 1.0) == 300


def test_the_recipe_gets_its_epochs_from_the_labelled_nodes_and_the_plans_say_how():
    """The same rule over a small and a large hand-made fingerprint: the small one trains more passes, a pretrained
    2d25 half the steps with its depthwise filters fixed on the CPU, and the plans' note gives the numbers."""
    def fingerprint(n_nodes: int) -> dict:
        return make_fingerprint([(5.0, 0.8, 0.8)] * 10, [(91, 512, 512)] * 10, [(15, 25, 25)] * n_nodes)

    small, large = planner.plan_experiment(fingerprint(100)), planner.plan_experiment(fingerprint(2000))
    assert small.configurations["3d_resenc"].recipe.num_epochs == 50        # 80 nodes per fold, 5 steps an epoch
    assert large.configurations["3d_resenc"].recipe.num_epochs == 10        # 100 steps an epoch
    two_d = small.configurations["2d25"].recipe
    assert two_d.num_epochs == 25 and two_d.freeze_depthwise and two_d.semi_supervised_epochs == 5
    assert small.configurations["3d_resenc"].recipe.semi_supervised_epochs == 10
    assert small.notes["epochs"].startswith("50 epochs: 250 optimizer steps over about 80 training nodes per fold")
    assert "2d25's pretrained backbone: 25 epochs" in small.notes["epochs"]
    scratch = planner.plan_experiment(fingerprint(100), pretrained_backbone=False).configurations["2d25"].recipe
    assert scratch.num_epochs == 50 and not scratch.freeze_depthwise
    gpu = planner.plan_experiment(fingerprint(100), "LNMPlanner").configurations["2d25"].recipe
    assert gpu.num_epochs == 300 and gpu.semi_supervised_epochs is None and not gpu.freeze_depthwise   # = num_epochs
    # only node-labelled nodes count; without any, every node (the weak trainers learn from all of them)
    labels = [1 if i < 20 else -1 for i in range(2000)]
    sparse = planner.plan_experiment(make_fingerprint([(5.0, 0.8, 0.8)] * 10, [(91, 512, 512)] * 10,
                                                      [(15, 25, 25)] * 2000, labels=labels))
    assert sparse.configurations["3d_resenc"].recipe.num_epochs == 50       # 16 labelled per fold
    weak = planner.plan_experiment(make_fingerprint([(5.0, 0.8, 0.8)] * 10, [(91, 512, 512)] * 10,
                                                    [(15, 25, 25)] * 2000, labels=[-1] * 2000))
    assert weak.configurations["3d_resenc"].recipe.num_epochs == 10


def test_bigger_budget_planner_never_gives_smaller_network():
    fp = make_fingerprint([(5.0, 0.8, 0.8)] * 5, [(91, 512, 512)] * 5, [(15, 25, 25)] * 20)
    cpu, gpu = planner.plan_experiment(fp, "LNMPlannerCPU"), planner.plan_experiment(fp, "LNMPlanner")
    rc, rg = cpu.configurations["3d_resenc"].network, gpu.configurations["3d_resenc"].network
    assert all(a <= b for a, b in zip(rc.features_per_stage, rg.features_per_stage))
    assert gpu.configurations["2d25"].recipe.batch_size >= cpu.configurations["2d25"].recipe.batch_size


def test_plans_json_round_trip(tmp_path):
    fp = make_fingerprint([(5.0, 0.8, 0.8)] * 5, [(91, 512, 512)] * 5, [(15, 25, 25)] * 20)
    plans = planner.plan_experiment(fp)
    plans.save(tmp_path / "LNMPlans.json")
    again = Plans.load(tmp_path / "LNMPlans.json")
    assert again == plans
    assert isinstance(again.scales["global"].roi_shape, tuple)
    assert type(again.configurations["2d25"].network) is type(plans.configurations["2d25"].network)


def test_plans_version_and_unknown_configuration(tmp_path):
    fp = make_fingerprint([(1, 1, 1)] * 2, [(50, 50, 50)] * 2, [(10, 10, 10)])
    d = planner.plan_experiment(fp).to_dict()
    d["plans_version"] = 99
    with pytest.raises(LNMError, match="plans version 99"):
        Plans.from_dict(d)
    with pytest.raises(LNMError, match="configuration 'nope' is not in the plans"):
        planner.plan_experiment(fp).configuration("nope")


def test_planning_is_deterministic():
    fp = make_fingerprint([(5.0, 0.8, 0.8)] * 5, [(91, 512, 512)] * 5, [(15, 25, 25)] * 20)
    assert planner.plan_experiment(fp).to_dict() == planner.plan_experiment(fp).to_dict()


def test_patient_level_splits_keep_patients_together_and_stratify():
    n = 30
    patients = {f"c{i:03d}": f"p{i // 2}" for i in range(n)}     # two cases (scans) per patient
    fp = make_fingerprint([(5, 0.8, 0.8)] * n, [(91, 512, 512)] * n, [(10, 10, 10)] * n,
                          labels=[i % 6 < 2 for i in range(n)], patients=patients)
    folds = make_patient_splits(fp, 5, seed=1)
    assert len(folds) == 5
    seen = [c for f in folds for c in f["val"]]
    assert sorted(seen) == sorted(fp["cases"])                    # every case validated exactly once
    for f in folds:
        val_patients = {patients[c] for c in f["val"]}
        train_patients = {patients[c] for c in f["train"]}
        assert not val_patients & train_patients                   # no patient on both sides
        assert set(f["train"]) | set(f["val"]) == set(fp["cases"])
        pos = sum(1 for n_ in fp["nodes"] if n_["case"] in f["val"] and n_["label"] == 1)
        assert pos >= 1                                            # positives spread over all folds
    assert make_patient_splits(fp, 5, seed=1) == folds              # stable for a seed
    assert make_patient_splits(fp, 5, seed=2) != folds


def test_folds_we_wrote_follow_the_cases_and_a_users_file_is_never_overwritten(tmp_path):
    def fingerprint(n, relabel=False):
        return make_fingerprint([(5, 0.8, 0.8)] * n, [(91, 512, 512)] * n, [(10, 10, 10)] * n,
                                labels=[(i % 3 == 0) != (relabel and i < 6) for i in range(n)])
    small, grown = fingerprint(12), fingerprint(15)
    path = tmp_path / "splits_final.json"
    assert keep_or_write_splits(path, small, 5, 7) is None                        # first run: written
    assert json.loads(path.read_text()) == make_patient_splits(small, 5, 7)
    first = path.read_bytes()
    assert keep_or_write_splits(path, fingerprint(12, relabel=True), 5, 7) is None   # same cases: kept ...
    assert path.read_bytes() == first                                              # ... though labels changed
    said = keep_or_write_splits(path, grown, 5, 7)                                # ours, cases changed: replaced
    assert "cases changed, so new folds were written" in said
    assert json.loads(path.read_text()) == make_patient_splits(grown, 5, 7)
    assert keep_or_write_splits(path, small, 5, 8, redo=True) is None             # --clean redoes our own folds
    assert json.loads(path.read_text()) == make_patient_splits(small, 5, 8)
    # a hand-written file (two folds over a subset) is kept byte for byte, and said so; so is an edited one of ours
    users = [{"train": ["c000", "c001"], "val": ["c002"]}, {"train": ["c002"], "val": ["c000", "c001"]}]
    path.write_text(json.dumps(users))
    before = path.read_bytes()
    for redo in (False, True):
        said = keep_or_write_splits(path, grown, 5, 7, redo=redo)
        assert path.read_bytes() == before
        assert said.startswith(f"WARNING: {path} is not folds lnm_plan_and_preprocess wrote (or was edited since) "
                               "and is kept as it is: 12 case(s) in no validation fold, e.g. 'c003'")
    path.write_text(json.dumps(make_patient_splits(small, 5, 7), indent=3))      # our folds, re-indented by hand
    assert "kept as it is" in keep_or_write_splits(path, grown, 5, 7)
    path.write_text(json.dumps(make_patient_splits(grown, 5, 9), indent=3))      # a user's over the same cases
    assert keep_or_write_splits(path, grown, 5, 7, redo=True) is None
    assert json.loads(path.read_text()) == make_patient_splits(grown, 5, 9)


def test_splits_need_two_patients():
    fp = make_fingerprint([(1, 1, 1)], [(50, 50, 50)], [(10, 10, 10)])
    with pytest.raises(LNMError, match="at least 2 patients"):
        make_patient_splits(fp)


def test_folds_spread_node_labelled_patients_of_both_classes():
    """Sparse node labels: 10 of 40 patients node-labelled (5 with a positive node). Stratifying on the patient
    label alone can leave a fold without any labelled positive node; stratifying on availability too cannot."""
    from lnm_auto.planning.splits import split_problems
    n = 40
    extents = [(10, 10, 10)] * n
    labels = []
    fp = make_fingerprint([(5.0, 0.8, 0.8)] * n, [(60, 256, 256)] * n, extents, labels=[0] * n)
    for i, node in enumerate(fp["nodes"]):
        node["case"] = f"c{i:03d}"
        node["label"] = (1 if i < 5 else 0) if i < 10 else -1         # 5 labelled positive, 5 labelled negative
        fp["cases"][node["case"]]["patient_label"] = 1 if (i < 5 or i % 3 == 0) else 0
        labels.append(node["label"])
    for seed in range(5):
        folds = make_patient_splits(fp, 5, seed=seed)
        assert split_problems(fp, folds) == []
        for fold in folds:
            val = [nd["label"] for nd in fp["nodes"] if nd["case"] in fold["val"]]
            assert 1 in val and 0 in val


def test_too_few_labelled_patients_is_said_per_fold():
    from lnm_auto.planning.splits import split_problems
    n = 20
    fp = make_fingerprint([(5.0, 0.8, 0.8)] * n, [(60, 256, 256)] * n, [(10, 10, 10)] * n, labels=[0] * n)
    for i, node in enumerate(fp["nodes"]):
        node["case"] = f"c{i:03d}"
        node["label"] = 1 if i == 0 else (0 if i == 1 else -1)        # one labelled patient per class
    problems = split_problems(fp, make_patient_splits(fp, 5, seed=0))
    assert len(problems) >= 3 and all("validates on patient or station labels" in p for p in problems)


def _label_mix_fingerprint(n_nodes, labelled, positive, station_for_unlabelled=0, weak=True):
    fp = make_fingerprint([(5.0, 0.8, 0.8)] * 4, [(60, 256, 256)] * 4, [(10, 10, 10)] * n_nodes, labels=[0] * n_nodes)
    for i, node in enumerate(fp["nodes"]):
        node["label"] = (1 if i < positive else 0) if i < labelled else -1
        node["station_label"] = 1 if labelled <= i < labelled + station_for_unlabelled else -1
        node["patient_label"] = 1 if weak else -1
    return fp


@pytest.mark.parametrize("n,labelled,positive,stations,weak,expected", [
    (100, 80, 20, 0, True, ["LNMTrainer"]),                               # plenty of node labels
    (40, 40, 4, 0, True, ["LNMTrainer"]),                                 # every node labelled, few positives
    (100, 30, 8, 50, True, ["LNMTrainer", "LNMTrainerPGLS"]),             # scarce node labels + pathology
    (100, 30, 8, 0, True, ["LNMTrainer", "LNMTrainerMeanTeacher"]),       # scarce, no station labels
    (100, 0, 0, 0, True, ["LNMTrainerWeak"]),                             # patient / station labels only
    (100, 5, 1, 60, True, ["LNMTrainerWeak"]),                            # too few node labels to start from
])
def test_learning_scheme_follows_the_label_mix(n, labelled, positive, stations, weak, expected):
    from lnm_auto.planning.learning_scheme import plan_learning_scheme
    trainers, why = plan_learning_scheme(_label_mix_fingerprint(n, labelled, positive, stations, weak))
    assert trainers == expected and f"{labelled} of {n} nodes" in why
    plans = planner.plan_experiment(_label_mix_fingerprint(n, labelled, positive, stations, weak))
    assert plans.recommended_trainers == expected and plans.notes["learning_scheme"] == why


def test_radiomics_configuration_is_planned_from_channels_and_spacing():
    fp = make_fingerprint([(5.0, 0.8, 0.8)] * 4, [(60, 256, 256)] * 4, [(10, 10, 10)] * 8,
                          channel_names={"0": "T2", "1": "CT"})
    fp["intensity_statistics"]["1"] = fp["intensity_statistics"]["0"]
    topo = planner.plan_experiment(fp).configuration("radiomics").network
    assert (topo.image_channel, topo.modality_hint, topo.texture_mode) == (1, "CT", "2.5d")
    iso = make_fingerprint([(1.0, 1.0, 1.0)] * 4, [(200, 256, 256)] * 4, [(10, 10, 10)] * 8, channel_names={"0": "T2"})
    topo = planner.plan_experiment(iso).configuration("radiomics").network
    assert (topo.image_channel, topo.modality_hint, topo.texture_mode) == (0, "T2", "3d")
