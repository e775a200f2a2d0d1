"""Training: real torch steps on the tiny dataset's real caches."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest
import torch

from lnm_auto.training.progress import training_logs
from lnm_auto.training.run import run_training, setup_trainer
from conftest import run_train_cli


@pytest.fixture(scope="module")
def prepared(planned_tiny):
    return planned_tiny(8)        # shared, read-only: runs write their results under tmp_path


def make_trainer(prepared, results, config="3d_resenc", fold="0", trainer="LNMTrainer_2epochs", epochs=None,
                 num_workers=0):
    return setup_trainer(42, config, fold, prepared / "pre", results, trainer, num_epochs=epochs,
                         num_workers=num_workers)


def test_loss_is_sum_of_three_bce_terms(prepared, tmp_path):
    tr = make_trainer(prepared, tmp_path, config="2d25")
    records = tr.training_records().iloc[:3]
    from lnm_auto.networks.node_predictor import roi_batch
    from lnm_auto.training.data import batch_to_device, load_batch
    tr.store.unpack(records.case.unique())
    raw = load_batch(tr.store, records, tr.config.scales)
    batch = {**batch_to_device(raw, tr.device), **roi_batch(raw, tr.plans, tr.config, slice(None), tr.device)}
    outputs = tr.network(batch)
    assert set(outputs) == {"fused", "global", "local"}
    for v in outputs.values():
        assert v.shape == (3,)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = sum(bce(outputs[k], batch["label"]) for k in ("fused", "global", "local"))
    assert torch.allclose(tr.compute_loss(outputs, batch), expected)
    # each term matters: dropping one head changes the loss
    assert not torch.allclose(tr.compute_loss({"fused": outputs["fused"]}, batch), expected)


@pytest.mark.slow
def test_training_writes_every_output(prepared, tmp_path):
    tr = run_training(make_trainer(prepared, tmp_path))
    out = tr.output_folder
    assert out == tmp_path / "Dataset042_Tiny" / "LNMTrainer_2epochs__LNMPlans__3d_resenc" / "fold_0"
    for f in ("checkpoint_final.pth", "checkpoint_best.pth", "progress.png", "validation/nodes.csv",
              "validation/metrics.json"):
        assert (out / f).is_file(), f
    assert not (out / "checkpoint_latest.pth").exists()    # removed once final exists, as nnU-Net does
    assert len(training_logs(out)) == 1                     # training_log_<date>.txt, one per run
    for f in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        assert (out.parent / f).is_file()
    val = pd.read_csv(out / "validation" / "nodes.csv", dtype={"case": str})
    assert set(val.case) == set(tr.val_cases) and not set(val.case) & set(tr.train_cases)
    assert val.probability.between(0, 1).all()
    from sklearn.metrics import roc_auc_score
    import json
    metrics = json.loads((out / "validation" / "metrics.json").read_text())
    if 0 < val.label.sum() < len(val):
        assert metrics["levels"]["node"]["auroc"]["value"] == pytest.approx(roc_auc_score(val.label, val.probability))
    log = training_logs(out)[-1].read_text()
    assert "epoch 2/2" in log and "waiting for data" in log
    ckpt = torch.load(out / "checkpoint_final.pth", weights_only=False)
    assert ckpt["current_epoch"] == 2 and ckpt["trainer_name"] == "LNMTrainer_2epochs"
    assert len(ckpt["logging"]["val_auroc"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, None])   # in-process loading, and the default worker processes
def test_kill_and_continue_equals_uninterrupted(prepared, tmp_path, num_workers):
    full = run_training(make_trainer(prepared, tmp_path / "a", trainer="LNMTrainer", epochs=3, num_workers=num_workers))
    part = run_training(make_trainer(prepared, tmp_path / "b", trainer="LNMTrainer", epochs=3, num_workers=num_workers),
                        stop_after_epoch=2)
    assert part.current_epoch == 2 and not (part.output_folder / "checkpoint_final.pth").exists()
    resumed = run_training(make_trainer(prepared, tmp_path / "b", trainer="LNMTrainer", epochs=3,
                                        num_workers=num_workers), continue_training=True)
    assert resumed.current_epoch == 3
    for (k, a), b in zip(full.network.state_dict().items(), resumed.network.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
    assert resumed.log.values["train_loss"] == pytest.approx(full.log.values["train_loss"], rel=1e-4)
    assert resumed.lr_scheduler.last_epoch == full.lr_scheduler.last_epoch == 3


@pytest.mark.slow
def test_checkpoint_killed_while_writing_is_never_half(tmp_path):
    script = textwrap.dedent(f"""
        import torch, itertools
        from lnm_auto.utils.io import atomic_path
        big = torch.randn(4_000_000)
        for i in itertools.count():
            with atomic_path(r"{tmp_path / 'ckpt.pth'}", suffix=".pth") as tmp:
                torch.save({{"i": i, "w": big}}, tmp)
            print(i, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "0"     # one complete checkpoint exists
    time.sleep(0.3)                                   # now kill it, most likely mid-write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    assert ckpt["w"].shape == (4_000_000,)


@pytest.mark.slow
def test_pretrained_weights_round_trip(prepared, tmp_path):
    tr = run_training(make_trainer(prepared, tmp_path / "src"))
    weights = tmp_path / "encoder.pth"
    torch.save(tr.network.encoder.state_dict(), weights)
    fresh = make_trainer(prepared, tmp_path / "dst")
    report = fresh.load_pretrained(weights)
    assert len(report["matched"]) == len(tr.network.encoder.state_dict())
    for k, v in tr.network.encoder.state_dict().items():
        torch.testing.assert_close(fresh.network.encoder.state_dict()[k], v)
    assert "tensors loaded" in training_logs(fresh.output_folder)[-1].read_text()


@pytest.mark.parametrize("args,message", [
    (["7", "3d_resenc", "0"], "no dataset with id 007"),
    (["42", "4d_magic", "0"], "configuration '4d_magic' is not in the plans"),
    (["42", "3d_resenc", "9"], "fold 9 is out of range"),
    (["42", "3d_resenc", "x"], "fold must be a number"),
    (["42", "3d_resenc", "0", "-tr", "NoSuchTrainer"], "unknown trainer 'NoSuchTrainer'"),
    (["42", "3d_resenc", "0", "-p", "OtherPlans"], "OtherPlans.json: plans not found"),
    (["42", "3d_resenc", "0", "-pretrained_weights", "/nonexistent/w.pth"], "does not exist"),
])
def test_bad_input_is_one_line(prepared, tmp_path, args, message):
    proc = run_train_cli(*args, preprocessed=prepared / "pre", results=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr


def test_missing_preprocessed_data_is_one_line(prepared, tmp_path):
    import shutil
    copy = tmp_path / "pre"
    shutil.copytree(prepared / "pre", copy)
    shutil.rmtree(copy / "Dataset042_Tiny" / "LNMPlans_crops")
    proc = run_train_cli("42", "3d_resenc", "0", preprocessed=copy, results=tmp_path / "res")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "nodes_index.csv: missing; run lnm_plan_and_preprocess" in proc.stderr


def test_the_semi_supervised_stage_runs_the_recipes_own_epochs():
    """PGLS and mean teacher default to the recipe's semi_supervised_epochs (their run keeps the plain name), and
    to num_epochs in plans written before the field existed."""
    import dataclasses

    from test_contract import hand_plans
    from lnm_auto.training.semi_supervised import LNMTrainerMeanTeacher, LNMTrainerPGLS
    from lnm_auto.training.trainer import LNMTrainer
    config = hand_plans().configuration("2d25")
    planned = dataclasses.replace(config, recipe=dataclasses.replace(config.recipe, num_epochs=25,
                                                                     semi_supervised_epochs=5))
    assert LNMTrainer.default_num_epochs(planned) == 25
    assert LNMTrainerPGLS.default_num_epochs(planned) == LNMTrainerMeanTeacher.default_num_epochs(planned) == 5
    old = dataclasses.replace(config, recipe=dataclasses.replace(config.recipe, num_epochs=25,
                                                                 semi_supervised_epochs=None))
    assert LNMTrainerPGLS.default_num_epochs(old) == 25


def test_given_epochs_name_both_stages_of_a_scheme_alike():
    """--epochs N trains LNMTrainer_<N>epochs then LNMTrainerPGLS_<N>epochs from it, also where N is PGLS's own
    default (which would otherwise store a PGLS started from another model under the default run's name); without
    --epochs both keep their plain names."""
    import dataclasses

    from test_contract import hand_plans
    from lnm_auto.training.semi_supervised import LNMTrainerPGLS
    from lnm_auto.training.trainer import LNMTrainer
    config = hand_plans().configuration("2d25")
    config = dataclasses.replace(config, recipe=dataclasses.replace(config.recipe, num_epochs=25,
                                                                    semi_supervised_epochs=5))

    def name(cls, given):   # the model folder's name, as lnm_train's setup_trainer and the run's checkpoints use it
        return cls.run_name(config, given)

    assert (name(LNMTrainer, None), name(LNMTrainerPGLS, None)) == ("LNMTrainer", "LNMTrainerPGLS")
    assert (name(LNMTrainer, 5), name(LNMTrainerPGLS, 5)) == ("LNMTrainer_5epochs", "LNMTrainerPGLS_5epochs")
    assert (name(LNMTrainer, 25), name(LNMTrainerPGLS, 25)) == ("LNMTrainer", "LNMTrainerPGLS_25epochs")
    assert (name(LNMTrainer, 3), name(LNMTrainerPGLS, 3)) == ("LNMTrainer_3epochs", "LNMTrainerPGLS_3epochs")
