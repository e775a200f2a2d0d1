"""Network topologies and the compute-budget rule that sizes them.

Everything here is pure arithmetic on shapes: no torch import, deterministic, cheap. The networks
(``lnm_auto.networks``) are built from these dataclasses; the FLOP estimates are validated against
``torch.utils.flop_counter.FlopCounterMode`` in ``tests/test_networks.py``.

nnU-Net sizes its networks to GPU memory. lnm_auto also sizes to *compute*, because its users
often train on CPUs: a :class:`ComputeBudget` caps the estimated forward cost per sample, and the
planners pick the largest network from a discrete ladder that fits. A bigger budget never gives a
smaller network (the choice is the largest fitting ladder rung, and rungs grow monotonically).

Cost unit: "dense-equivalent GFLOPs". A 3D ResEnc's cost is its forward FLOPs (convolutions and
the linear head, counted like FlopCounterMode: 2 per multiply-add, no bias, no norms). A
MobileNetV3's FLOPs are multiplied by :data:`MOBILENET_COST_FACTOR`, because depthwise
convolutions, squeeze-excitation and hard-swish run at a fraction of the FLOP rate of dense
convolutions (measured on 2 CPU cores, see the constant). With one unit, one budget sizes both
configurations to about the same step time.

Where things live: the budgets in ``compute_budget``, configuration ``2d25`` in
``two_stream_topology``, ``3d_resenc`` in ``resenc_topology`` and ``wega`` in
``global_local_topology``. This module re-exports the first three and rebuilds any topology from
its plans.json form.
"""
from __future__ import annotations

from typing import Any

# The budgets and each configuration's topology live in their own modules; every name stays importable
# from here, where the plans and the networks have always found them.
from lnm_auto.plans.global_local_topology import WegaTopology
from lnm_auto.plans.compute_budget import BUDGETS, CPU_BUDGET, GPU_BUDGET, ComputeBudget, get_budget
from lnm_auto.plans.resenc_topology import (MAX_RESENC_STAGES, MIN_FEATURE_MAP_SIZE, RESENC_LADDER,
                                            ResEncTopology, estimate_resenc_gflops, plan_resenc_axes,
                                            plan_resenc_topology, resenc_topology_from_rung)
from lnm_auto.plans.two_stream_topology import (BACKBONE_SPECS, BACKBONES, MOBILENET_COST_FACTOR,
                                                TWO_STREAM_LADDER, BackboneSpec, TwoStreamTopology,
                                                estimate_two_stream_gflops, plan_two_stream_topology,
                                                slice_group_starts, two_stream_cost)

__all__ = [
    "BUDGETS", "CPU_BUDGET", "GPU_BUDGET", "ComputeBudget", "get_budget",
    "MAX_RESENC_STAGES", "MIN_FEATURE_MAP_SIZE", "RESENC_LADDER", "ResEncTopology", "estimate_resenc_gflops",
    "plan_resenc_axes", "plan_resenc_topology", "resenc_topology_from_rung",
    "BACKBONE_SPECS", "BACKBONES", "MOBILENET_COST_FACTOR", "TWO_STREAM_LADDER", "BackboneSpec",
    "TwoStreamTopology", "estimate_two_stream_gflops", "plan_two_stream_topology", "slice_group_starts",
    "two_stream_cost",
    "TOPOLOGY_TYPES", "topology_from_dict", "WegaTopology",
]

TOPOLOGY_TYPES = {TwoStreamTopology.config_name: TwoStreamTopology, ResEncTopology.config_name: ResEncTopology,
                  WegaTopology.config_name: WegaTopology}


def topology_from_dict(config_name: str, d: dict[str, Any]):
    """Rebuild a topology from its ``asdict`` form (plans.json) given the configuration name."""
    try:
        return TOPOLOGY_TYPES[config_name].from_dict(d)
    except KeyError:
        raise ValueError(f"unknown configuration {config_name!r}; known: {sorted(TOPOLOGY_TYPES)}") from None
