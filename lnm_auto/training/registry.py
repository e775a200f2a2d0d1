"""Trainer registry: every trainer class registers itself here when its module is imported (through
``LNMTrainer.__init_subclass__``), so no trainer imports another to be found.

Names: ``-tr CLASS`` or ``-tr CLASS_<N>epochs`` (the class with N epochs, as nnU-Net's ``_Xepochs``
trainers; nnU-Net's singular ``_1epoch`` is read as ``_1epochs``, and lnm_train says so); a run with
non-default epochs always gets the ``_<N>epochs`` name, so its model folder can never be mixed with a
default-length run of the same class.
"""
from __future__ import annotations

import difflib
import importlib
import re

from lnm_auto.utils.errors import LNMError

TRAINERS: dict[str, type] = {}
# the modules that define trainers: imported on the first lookup (plugins add theirs here)
TRAINER_MODULES = ["lnm_auto.training.trainer", "lnm_auto.training.semi_supervised", "lnm_auto.training.weak",
                   "lnm_auto.training.radiomics_trainer", "lnm_auto.training.deep_radiomics_trainer",
                   "lnm_auto.training.multitask"]
_EPOCHS_SUFFIX = re.compile(r"^(?P<cls>.+?)_(?P<epochs>\d+)epochs?$")


def register(cls: type) -> None:
    """Make ``cls`` selectable with ``lnm_train -tr NAME``."""
    TRAINERS[cls.__name__] = cls


def split_trainer_name(name: str) -> tuple[str, int | None]:
    """'LNMTrainerPGLS_5epochs' -> ('LNMTrainerPGLS', 5); 'LNMTrainer' -> ('LNMTrainer', None)."""
    m = _EPOCHS_SUFFIX.match(name)
    return (m.group("cls"), int(m.group("epochs"))) if m else (name, None)


def run_name_note(typed: str, run_name: str, epochs: int) -> str | None:
    """One line saying how ``-tr typed`` was read when its model folder's trainer name differs from what was
    typed (nnU-Net's ``_1epoch`` spelling, ``--epochs``, the default length, radiomics' own trainer); None when
    they agree."""
    if typed == run_name:
        return None
    cls_name = split_trainer_name(run_name)[0]
    if split_trainer_name(typed)[0] != cls_name:
        return f"-tr {typed} is read as {run_name}: this configuration is fitted by {cls_name}"
    return (f"-tr {typed} is read as {run_name} ({cls_name} for {epochs} epoch{'s' if epochs != 1 else ''}; "
            "model folders always spell NAME_<N>epochs)")


def trained_run_names(trainer: str, model_folder_names, plans_name: str, configuration: str) -> list[str]:
    """The trainer names under which ``trainer``'s class was trained for this plans and configuration, other
    than ``trainer`` itself (another epoch count, or the same one spelt ``_1epoch``): what to pass as -tr when
    ``trainer`` has no model folder."""
    cls_name = split_trainer_name(trainer)[0]
    runs = []
    for name in model_folder_names:
        parts = str(name).split("__")
        if (len(parts) == 3 and parts[1:] == [plans_name, configuration] and parts[0] != trainer
                and split_trainer_name(parts[0])[0] == cls_name):
            runs.append(parts[0])
    return sorted(runs)


def exact_trainer_hint(trainer: str, model_folder_names, plans_name: str, configuration: str) -> str:
    """"; LNMTrainer was trained here only as LNMTrainer_1epochs: pass -tr LNMTrainer_1epochs" (or "" when
    ``trainer``'s class has no other model folder for this plans and configuration)."""
    runs = trained_run_names(trainer, model_folder_names, plans_name, configuration)
    if not runs:
        return ""
    return (f"; {split_trainer_name(trainer)[0]} was trained for {plans_name} {configuration} only as "
            f"{', '.join(runs)}: pass {' or '.join(f'-tr {r}' for r in runs)}")


def trainer_name(cls_name: str, num_epochs: int, default_epochs: int, paired_default: int | None = None) -> str:
    """The name a run is stored under: the class, plus ``_<N>epochs`` when N is not the default, or (epochs given
    to a stage that continues another, ``paired_default`` = the other stage's default) when N is not that one's:
    ``--epochs 5`` trains LNMTrainer_5epochs, then LNMTrainerPGLS_5epochs from it, even where 5 is PGLS's default."""
    plain = num_epochs == default_epochs and (paired_default is None or num_epochs == paired_default)
    return cls_name if plain else f"{cls_name}_{num_epochs}epochs"


def trainer_class(name: str) -> tuple[type, int | None]:
    """(trainer class, epochs given in the name or None) for ``-tr NAME``; unknown names are one LNMError
    line suggesting the nearest registered name."""
    for module in TRAINER_MODULES:
        importlib.import_module(module)
    cls_name, epochs = split_trainer_name(name)
    if cls_name not in TRAINERS:
        close = difflib.get_close_matches(cls_name, TRAINERS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise LNMError(f"unknown trainer '{name}'{hint} (available: {', '.join(sorted(TRAINERS))}; any of them "
                       f"also as NAME_<N>epochs)")
    if epochs is not None and epochs < 1:
        raise LNMError(f"trainer '{name}': the number of epochs must be at least 1")
    return TRAINERS[cls_name], epochs
