"""The registry of configuration kinds (the contract: ``base.ConfigurationKind``).

Adding a configuration is one module beside these (a ``ConfigurationKind`` subclass: its planning rule, model,
trainer, model file, scorer, simplicity) and one line in ``KINDS``. The planner plans every registered kind;
training, prediction and model selection ask ``kind_of(config)`` instead of testing topology types.
"""
from __future__ import annotations

from lnm_auto.configurations.base import (ClassifierKind, ConfigurationKind, NetworkKind,  # noqa: F401
                                          PlanningContext)
from lnm_auto.configurations.classical_radiomics import Radiomics
from lnm_auto.configurations.deep_radiomics import DeepRadiomics
from lnm_auto.configurations.resenc_3d import ResEnc3D
from lnm_auto.configurations.two_stream_2d25 import TwoStream25D
from lnm_auto.configurations.wega import Wega
from lnm_auto.plans.plans import ConfigurationPlan

# in plans order
KINDS: tuple[ConfigurationKind, ...] = (TwoStream25D(), ResEnc3D(), Radiomics(), DeepRadiomics(), Wega())
REGISTRY: dict[str, ConfigurationKind] = {k.name: k for k in KINDS}
_BY_TOPOLOGY = {k.topology_type: k for k in KINDS}


def kind_for_topology(topology) -> ConfigurationKind:
    """The kind that plans this topology type (plans only ever hold registered ones: anything else is our bug)."""
    kind = _BY_TOPOLOGY.get(type(topology))
    if kind is None:
        raise TypeError(f"no registered configuration kind plans a {type(topology).__name__}")
    return kind


def kind_of(config: ConfigurationPlan) -> ConfigurationKind:
    """The kind of a planned configuration (by its topology: a plan renamed by hand is still what it holds)."""
    return kind_for_topology(config.network)


def kind_named(name: str) -> ConfigurationKind | None:
    """The registered kind called ``name`` (None: not a registered configuration name)."""
    return REGISTRY.get(name)


def simplicity(configuration_name: str) -> int:
    """The one-SE rule's rank of a configuration name (unknown names rank after every registered kind)."""
    kind = REGISTRY.get(configuration_name)
    return kind.simplicity if kind is not None else len(KINDS)
