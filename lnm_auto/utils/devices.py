"""The -device flag: what this machine has, checked once (torch only, so a command's start-up stays light)."""
from __future__ import annotations

import torch

from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.paths import nearest_hint

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


def default_device() -> str:
    """The fastest device here: cuda when available, then mps, then cpu (nnU-Net defaults to cuda too)."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_device(name: str | None = "auto") -> str:
    """Check a -device value against what this machine has; "auto" (or None) picks ``default_device()``."""
    name = "auto" if name is None else name.lower()
    if name == "auto":
        return default_device()
    if name == "cuda" and not torch.cuda.is_available():
        raise LNMError("-device cuda requested but no CUDA GPU is available; use -device cpu (or auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise LNMError("-device mps requested but MPS is not available; use -device cpu (or auto)")
    if name not in DEVICE_CHOICES:
        raise LNMError(f"unknown device '{name}': use {', '.join(DEVICE_CHOICES)}{nearest_hint(name, DEVICE_CHOICES)}")
    return name
