"""The configuration contract, checked over every registered kind (in the spirit of scikit-learn's
``parametrize_with_checks``): plan on a hand-made fingerprint, fit on a tiny dataset, save, reload, score
identically, refuse a crafted model file. A configuration added to the registry is checked here without a
new test."""
from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from lnm_auto.configurations import KINDS, REGISTRY, ClassifierKind, NetworkKind, kind_named, kind_of, simplicity
from lnm_auto.configurations.base import CLASSIFIER_MODEL_FILE
from lnm_auto.plans.plans import Plans
from lnm_auto.planning.planner import plan_experiment
from lnm_auto.radiomics.classifier import MODEL_FILE_NAME
from lnm_auto.training.run import classifier_trainer, run_training, setup_trainer
from lnm_auto.utils.errors import LNMError
from test_planning import make_fingerprint

KIND_NAMES = [k.name for k in KINDS]


def hand_fingerprint() -> dict:
    return make_fingerprint([(5.0, 0.8, 0.8)] * 6, [(60, 256, 256)] * 6,
                            [(10, 12, 12), (15, 20, 20), (8, 9, 9)] * 4)


def test_registry_is_one_place():
    assert list(REGISTRY) == KIND_NAMES and len(set(KIND_NAMES)) == len(KINDS)
    assert len({k.topology_type for k in KINDS}) == len(KINDS)        # one kind per topology type
    assert sorted(k.simplicity for k in KINDS) == list(range(len(KINDS)))   # a strict order for the one-SE rule
    assert simplicity("radiomics") == 0 and simplicity("not_registered") == len(KINDS)
    assert kind_named("2d25") is REGISTRY["2d25"] and kind_named("2d") is None
    assert CLASSIFIER_MODEL_FILE == MODEL_FILE_NAME


@pytest.mark.parametrize("name", KIND_NAMES)
def test_kind_plans_from_the_fingerprint_alone(name):
    """Every registered kind is in the plans, planned purely (same fingerprint -> same plan), and round-trips."""
    kind = REGISTRY[name]
    plans = plan_experiment(hand_fingerprint(), "LNMPlannerCPU")
    config = plans.configuration(name)
    assert config.name == name and isinstance(config.network, kind.topology_type) and kind_of(config) is kind
    assert plan_experiment(hand_fingerprint(), "LNMPlannerCPU").configuration(name) == config
    assert Plans.from_dict(json.loads(json.dumps(plans.to_dict()))).configuration(name) == config
    assert kind.cost_gflops(config) >= 0.0
    if isinstance(kind, NetworkKind):
        assert kind.cost_gflops(config) > 0 and kind.model_file("checkpoint_best.pth") == "checkpoint_best.pth"
        assert classifier_trainer(config) is None
    else:
        assert kind.fitted_once and kind.model_file("checkpoint_best.pth") == CLASSIFIER_MODEL_FILE
        assert classifier_trainer(config) == kind.default_trainer


def _first_case(planned):
    raw = next((planned / "raw").glob("Dataset042_*"))
    image_file = sorted((raw / "imagesTr").glob("*_0000.nii.gz"))[0]
    case = image_file.name[: -len("_0000.nii.gz")]
    return [sitk.ReadImage(str(image_file))], sitk.ReadImage(str(raw / "nodesTr" / f"{case}.nii.gz"))


@pytest.mark.slow
@pytest.mark.parametrize("name", KIND_NAMES)
def test_kind_fits_saves_reloads_scores_identically_and_refuses_a_crafted_file(name, planned_tiny, tmp_path):
    kind = REGISTRY[name]
    planned = tmp_path / "planned"   # a copy: fitting writes feature and embedding caches into pre/
    for part in ("raw", "pre"):
        shutil.copytree(planned_tiny(8) / part, planned / part)
    trainer_name = kind.default_trainer if kind.fitted_once else "LNMTrainer_1epochs"
    trainer = setup_trainer(42, name, "0", planned / "pre", tmp_path / "results", trainer_name, num_workers=0,
                            raw_root=planned / "raw")
    run_training(trainer)
    plans, config = trainer.plans, trainer.config
    model_path = trainer.output_folder / kind.model_file("checkpoint_final.pth")
    assert model_path.is_file()

    images, mask = _first_case(planned)
    inputs = kind.case_inputs(images, mask, plans, config)
    n_nodes = len(np.unique(sitk.GetArrayViewFromImage(mask))) - 1
    assert list(inputs["node_ids"]) == sorted(set(np.unique(sitk.GetArrayViewFromImage(mask))) - {0})
    device = torch.device("cpu")
    first = kind.scorer(kind.load_fold_model(model_path, plans, config, device), plans, config, device)(inputs)
    again = kind.scorer(kind.load_fold_model(model_path, plans, config, device), plans, config, device)(inputs)
    assert first.shape == (n_nodes,) and np.all((first >= 0) & (first <= 1))
    np.testing.assert_array_equal(first, again)   # the saved model is the whole model: reload scores identically

    crafted = tmp_path / model_path.name   # a file that is not this kind's model is refused, naming it
    if isinstance(kind, ClassifierKind):
        crafted.write_text(json.dumps({"model": "sklearn.pipeline", "pickle": "gASV..."}))
    else:   # a pickle that would run code if unpickled: the weights-only loader refuses it
        crafted.write_bytes(pickle.dumps({"network_weights": _Exploit()}))
    with pytest.raises(LNMError, match=str(crafted.name)):
        kind.load_fold_model(crafted, plans, config, device)


class _Exploit:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_trainers_override_only_the_named_hooks():
    """A network trainer variant changes the loop only through TRAINER_HOOKS; a classifier trainer is not a network
    trainer posing with half its methods refused: it implements FoldTrainer's two methods beside the shared fold
    logic. Every configuration kind's default trainer is registered."""
    import importlib

    from lnm_auto.training import registry
    from lnm_auto.training.fold_trainer import FoldTrainer
    from lnm_auto.training.pretraining import WSPPretrainer
    from lnm_auto.training.trainer import TRAINER_HOOKS, LNMTrainer
    for module in registry.TRAINER_MODULES:
        importlib.import_module(module)
    for name, cls in [*registry.TRAINERS.items(), ("WSPPretrainer", WSPPretrainer)]:
        if cls is LNMTrainer:
            continue
        base = LNMTrainer if issubclass(cls, LNMTrainer) else FoldTrainer
        overridden = {k for c in cls.__mro__[:cls.__mro__.index(base)] for k, v in vars(c).items()
                      if callable(v) or isinstance(v, (classmethod, property))}
        overridden = {k for k in overridden if hasattr(base, k) and not k.startswith("__")}
        allowed = set(TRAINER_HOOKS) if base is LNMTrainer else {"run_training", "predict_records",
                                                                "default_num_epochs", "training_records",
                                                                "initialize"}
        assert overridden <= allowed, f"{name} overrides {sorted(overridden - allowed)}"
        if base is FoldTrainer:
            assert not hasattr(cls, "build_network") and not hasattr(cls, "configure_optimizers")
    for kind in KINDS:
        assert registry.trainer_class(kind.default_trainer)[0] is not None
