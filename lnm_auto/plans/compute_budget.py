"""The compute budget that sizes the networks, and the shape arithmetic the topology planners share.

Pure arithmetic: no torch import. :mod:`lnm_auto.plans.network_topology` explains the budget rule
and its cost unit (dense-equivalent GFLOPs).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

# --------------------------------------------------------------------------------------------------
# Budgets
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComputeBudget:
    """Upper bound on the estimated forward cost of one sample, in dense-equivalent GFLOPs."""

    name: str
    max_gflops_per_sample: float

    def to_dict(self) -> dict[str, Any]:
        """The budget as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ComputeBudget":
        """The budget from its ``to_dict`` form."""
        return cls(name=str(d["name"]), max_gflops_per_sample=float(d["max_gflops_per_sample"]))


# GPU: large enough that the top rung of each ladder (nnU-Net's ResEnc: features min(32 * 2^i, 320),
# blocks (1, 3, 4, 6, 6, 6); two streams of mobilenetv3_large_100) fits the usual LN ROIs: the ResEnc
# top rung costs ~62 GFLOPs at 16 x 64 x 64 (5 x 0.8 x 0.8 mm), ~122 at 64^3 isotropic. Bigger ROIs
# get a narrower network, as nnU-Net would shrink the patch.
GPU_BUDGET = ComputeBudget(name="gpu", max_gflops_per_sample=400.0)

# CPU: one forward + backward of a batch of 16 nodes at ROI 16 x 64 x 64 in about 1 s on 2 cores
# (measured, see documentation/networks.md): the budget admits ResEnc rung 2 (8..128 features,
# blocks (1, 2, 2, 2, 2), 1.8 GFLOPs, ~0.9-1.1 s) but not rung 3 (7.3 GFLOPs, ~3-4 s), and the
# paper's two streams of mobilenetv3_large_100 (0.78 GFLOPs x 2 = 1.56, ~0.6-0.8 s). Larger ROIs
# get smaller networks (2d25 at 16 x 96 x 96: small_100; ResEnc at 16 x 128 x 128: 4..64 features).
CPU_BUDGET = ComputeBudget(name="cpu", max_gflops_per_sample=2.0)

BUDGETS = {b.name: b for b in (GPU_BUDGET, CPU_BUDGET)}


def get_budget(name_or_budget: "str | ComputeBudget") -> ComputeBudget:
    """The budget named ``name_or_budget`` (``gpu``, ``cpu``), or the budget itself."""
    if isinstance(name_or_budget, ComputeBudget):
        return name_or_budget
    try:
        return BUDGETS[str(name_or_budget).lower()]
    except KeyError:
        raise ValueError(f"unknown compute budget {name_or_budget!r}; known: {sorted(BUDGETS)}") from None


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _tuple(x) -> tuple:
    """Lists (from JSON) -> tuples, recursively."""
    if isinstance(x, (list, tuple)):
        return tuple(_tuple(i) for i in x)
    return x


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _conv_out(n: int, k: int, s: int) -> int:
    """Output length of a conv with padding k // 2 (the convention of timm and DNA)."""
    return (n + 2 * (k // 2) - k) // s + 1


def _check_shape(name: str, shape: Sequence[int], ndim: int = 3) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != ndim or any(s < 1 for s in shape):
        raise ValueError(f"{name} must be {ndim} positive ints (z, y, x), got {shape}")
    return shape
