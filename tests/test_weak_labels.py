"""Mean teacher, PGLS, MIL and WSP: the arithmetic against direct computations, and each trainer end to end."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from lnm_auto.planning.plan_and_preprocess import plan_and_preprocess
from lnm_auto.training.pretraining import wsp_loss
from lnm_auto.training.progress import training_logs
from lnm_auto.training.run import run_training, setup_pretrainer, setup_trainer
from lnm_auto.training.semi_supervised import (binary_kl, ema_alpha, ema_update, pathology_guided_pseudo_labels,
                                               sigmoid_rampup)
from lnm_auto.training.weak import make_bags, mil_loss
from conftest import run_train_cli, write_tiny_dataset


def test_ema_update_arithmetic():
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    t0 = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t, t_before, s in zip(teacher.parameters(), t0, student.parameters()):
        torch.testing.assert_close(t, 0.9 * t_before + 0.1 * s)
    assert ema_alpha(0, 0.999) == 0.0            # first step: teacher = student
    assert ema_alpha(9, 0.999) == pytest.approx(0.9)
    assert ema_alpha(100_000, 0.999) == 0.999


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(10, 10) == 1.0 and sigmoid_rampup(50, 10) == 1.0
    assert sigmoid_rampup(3, 0) == 1.0


def test_binary_kl_matches_direct_formula_and_is_zero_at_agreement():
    t = torch.tensor([0.2, 0.9, 0.5])
    z = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    s = torch.sigmoid(z)
    direct = (t * torch.log(t / s) + (1 - t) * torch.log((1 - t) / (1 - s))).mean()
    torch.testing.assert_close(binary_kl(t, z), direct)
    assert binary_kl(torch.sigmoid(z).detach(), z).item() == pytest.approx(0.0, abs=1e-6)


def test_pseudo_label_assignment_with_threshold_edges():
    scores = np.array([0.71, 0.70, 0.95, 0.29, 0.30, 0.05, 0.9, 0.1, 0.5])
    stations = np.array([1, 1, 0, 0, 0, 1, -1, -1, 1])
    got = pathology_guided_pseudo_labels(scores, stations, beta=0.7, gamma=0.3)
    # > beta in a positive station -> 1 (0.70 is not > 0.70); < gamma in a negative station -> 0 (0.30 is not)
    # confident but contradicting the pathology -> none; unknown station -> none
    assert got.tolist() == [1, -1, -1, 0, -1, -1, -1, -1, -1]


def test_mil_noisy_or_loss_and_gradients():
    z = torch.tensor([0.5, -1.0, 2.0, -3.0, 0.0], requires_grad=True)
    bag = torch.tensor([0, 0, 1, 1, 2])
    y = torch.tensor([1.0, 0.0, 0.0])
    loss = mil_loss(z, bag, y)
    p = torch.sigmoid(z)
    p0 = 1 - (1 - p[0]) * (1 - p[1])
    p1 = 1 - (1 - p[2]) * (1 - p[3])
    p2 = p[4]
    direct = -(torch.log(p0) + torch.log(1 - p1) + torch.log(1 - p2)) / 3
    torch.testing.assert_close(loss, direct)
    loss.backward()
    # negative bag: exactly the nodes' BCE against 0 -> gradient p_i / 3 for each of its nodes
    torch.testing.assert_close(z.grad[2:4], p[2:4].detach() / 3)
    # positive bag: gradient pushes its nodes up, the more confident node gets the smaller push
    assert (z.grad[:2] < 0).all()


def test_make_bags_uses_every_level():
    nodes = pd.DataFrame({"case": ["a", "a", "b", "b", "c"], "node": [1, 2, 1, 2, 1], "station": ["7", "7", "4R", "7", "7"],
                          "label": [1, -1, -1, -1, -1], "station_label": [1, 1, 0, -1, -1],
                          "patient_label": [1, 1, 1, 1, 0]})
    bags = make_bags(nodes)
    kinds = bags.groupby("kind").size().to_dict()
    assert kinds == {"node": 1, "station": 2, "patient": 1}
    assert bags[bags.kind == "patient"].iloc[0]["members"] == [4] and bags[bags.kind == "patient"].iloc[0]["label"] == 0
    station_bags = bags[bags.kind == "station"].set_index("label")["members"].to_dict()
    assert station_bags == {1: [0, 1], 0: [2]}


def test_wsp_loss_equals_direct_computation():
    torch.manual_seed(0)
    z = torch.randn(5, 4)
    d = torch.tensor([0.1, 0.15, 0.8, 0.5, 0.12])
    y = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0])
    sigma, tau = 0.2, 0.5
    zn = z / z.norm(dim=1, keepdim=True)
    total = 0.0
    for a in range(5):
        w = [math.exp(-(d[a] - d[b]) ** 2 / (2 * sigma ** 2)) * float(y[a] == y[b]) if b != a else 0.0 for b in range(5)]
        w_sum = sum(w)
        denom = sum(math.exp(float(zn[a] @ zn[b]) / tau) for b in range(5) if b != a)
        for b in range(5):
            if b != a and w[b] > 0:
                total += -(w[b] / w_sum) * math.log(math.exp(float(zn[a] @ zn[b]) / tau) / denom)
    assert wsp_loss(z, d, y, sigma=sigma, tau=tau).item() == pytest.approx(total / 5, rel=1e-5)


@pytest.fixture(scope="module")
def partly_labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("weak")
    write_tiny_dataset(root / "raw", n_cases=8, hide_node_labels=4)
    plan_and_preprocess(42, root / "raw", root / "pre", planner="LNMPlannerCPU", progress=False)
    run_training(setup_trainer(42, "3d_resenc", "0", root / "pre", root / "results", "LNMTrainer_2epochs",
                               num_workers=0))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["LNMTrainerMeanTeacher", "LNMTrainerPGLS", "LNMTrainerWeak"])
def test_trainers_run_one_epoch(partly_labelled, trainer):
    root = partly_labelled
    tr = setup_trainer(42, "3d_resenc", "0", root / "pre", root / "results", trainer, num_epochs=1, num_workers=0)
    run_training(tr)
    assert (tr.output_folder / "checkpoint_final.pth").is_file()
    log = training_logs(tr.output_folder)[-1].read_text()
    if trainer != "LNMTrainerWeak":
        assert "pretrained weights" in log and "LNMTrainer_2epochs" in log   # started from the supervised fold
        assert tr.teacher is not None and tr.global_step >= 1
    if trainer == "LNMTrainerPGLS":
        assert "pseudo labels:" in log


def test_pgls_without_station_labels_is_one_line(tmp_path):
    write_tiny_dataset(tmp_path / "raw", n_cases=6, hide_node_labels=3)
    (tmp_path / "raw" / "Dataset042_Tiny" / "stations.csv").unlink()
    plan_and_preprocess(42, tmp_path / "raw", tmp_path / "pre", planner="LNMPlannerCPU", progress=False)
    proc = run_train_cli("42", "3d_resenc", "0", "-tr", "LNMTrainerPGLS", preprocessed=tmp_path / "pre",
                         results=tmp_path / "res")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "needs pathology labels of LN stations" in proc.stderr and "stations.csv" in proc.stderr


@pytest.mark.slow
def test_semi_supervised_without_supervised_model_is_one_line(partly_labelled, tmp_path):
    proc = run_train_cli("42", "2d25", "0", "-tr", "LNMTrainerPGLS", preprocessed=partly_labelled / "pre",
                         results=tmp_path / "res")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "starts from a supervised model" in proc.stderr and "-pretrained_weights" in proc.stderr


@pytest.mark.slow
def test_wsp_pretraining_produces_loadable_weights(partly_labelled, tmp_path):
    root = partly_labelled
    pre = setup_pretrainer(42, "3d_resenc", "0", root / "pre", tmp_path, num_epochs=1, num_workers=0)
    before = {k: v.clone() for k, v in pre.network.state_dict().items()}
    weights = pre.run_pretraining()
    after = torch.load(weights, weights_only=True)
    assert any(not torch.equal(before[k], after[k]) for k in before)     # the encoder learnt something
    tr = setup_trainer(42, "3d_resenc", "0", root / "pre", tmp_path / "ft", "LNMTrainer_2epochs", num_workers=0)
    report = tr.load_pretrained(weights)
    assert len(report["matched"]) == len(after) and not report["shape_mismatch"]


@pytest.mark.slow
def test_weak_trainer_without_any_node_label_validates_per_patient(tmp_path):
    import json
    write_tiny_dataset(tmp_path / "raw", n_cases=8, hide_node_labels=8)
    plan_and_preprocess(42, tmp_path / "raw", tmp_path / "pre", planner="LNMPlannerCPU", progress=False)
    tr = setup_trainer(42, "3d_resenc", "0", tmp_path / "pre", tmp_path / "res", "LNMTrainerWeak", num_epochs=1,
                       num_workers=0)
    assert tr.config.recipe.batch_size >= 4          # sized on all nodes when there are no node labels
    run_training(tr)
    metrics = json.loads((tr.output_folder / "validation" / "metrics.json").read_text())
    # no node label: patients when their labels hold both classes here, else stations (training/validation.py)
    patient_labels = tr.validation_records().groupby("case")["patient_label"].first()
    level = "patient" if patient_labels.nunique() == 2 else "station"
    units = pd.read_csv(tr.output_folder / "validation" / f"{level}s.csv", dtype={"case": str})
    assert metrics["source"]["validation_level"].startswith(level)
    if level == "patient":
        assert metrics["levels"]["patient"]["n_patients"] == len(units)
    assert set(units.case) == set(tr.val_cases) and units.probability.between(0, 1).all()


@pytest.mark.slow
def test_mean_teacher_resumes_with_its_teacher(partly_labelled, tmp_path):
    root = partly_labelled
    first = setup_trainer(42, "3d_resenc", "0", root / "pre", tmp_path, "LNMTrainerMeanTeacher", num_epochs=2,
                          num_workers=0)
    supervised = root / "results" / "Dataset042_Tiny" / "LNMTrainer_2epochs__LNMPlans__3d_resenc" / "fold_0"
    run_training(first, pretrained_weights=supervised / "checkpoint_final.pth", stop_after_epoch=1)
    resumed = setup_trainer(42, "3d_resenc", "0", root / "pre", tmp_path, "LNMTrainerMeanTeacher", num_epochs=2,
                            num_workers=0)
    resumed.load_checkpoint(first.output_folder / "checkpoint_latest.pth")
    assert resumed.global_step == first.global_step > 0 and resumed.current_epoch == 1
    for a, b in zip(first.teacher.state_dict().values(), resumed.teacher.state_dict().values()):
        torch.testing.assert_close(a, b)
