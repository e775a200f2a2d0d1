"""Checkpoint files: written atomically, read with ``torch.load(weights_only=True)`` only.

A checkpoint holds tensors, numbers, strings and containers of them (no pickled objects), its format
version and the identifier of the plans it was trained under; loading one of another format or other
plans is refused with one line, never silently used. A crafted file that would run code when unpickled
is refused by torch's restricted unpickler before anything in it executes.
"""
from __future__ import annotations

import contextlib
import pickle
import zipfile
from pathlib import Path

import torch

from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import atomic_path

CHECKPOINT_FORMAT_VERSION = 2


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` (plus the format version) atomically."""
    with atomic_path(path, suffix=".pth") as tmp:
        torch.save({**state, "format_version": CHECKPOINT_FORMAT_VERSION}, tmp)


def load_weights_only(path: str | Path, map_location: str | torch.device = "cpu",
                      source: str = "checkpoints written by lnm_auto", allowed_globals: tuple | list = ()):
    """``torch.load(path, weights_only=True)`` (``allowed_globals``: the plain types torch's restricted unpickler
    may also rebuild); a file that would run code, or a damaged one, is one LNMError line naming it (``source``:
    what the user should only load from a trusted source)."""
    allowing = torch.serialization.safe_globals(list(allowed_globals)) if allowed_globals else contextlib.nullcontext()
    try:
        with allowing:
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else "not a weights-only file"
        raise LNMError(f"{path}: refused: it holds more than tensors, numbers and strings, so loading it could run "
                       f"code ({first}); only use {source} from a source you trust") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise LNMError(f"{path}: cannot be loaded as a checkpoint, the file is damaged or not a checkpoint "
                       f"({first})") from None


def load_checkpoint(path: str | Path, plans_identifier: str | None = None,
                    map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint written by :func:`save_checkpoint`, checked for format and (if given) plans identifier."""
    path = Path(path)
    if not path.is_file():
        raise LNMError(f"{path}: checkpoint not found")
    if not zipfile.is_zipfile(path):   # torch.save writes a zip archive; anything else is not a checkpoint
        raise LNMError(f"{path}: not a checkpoint (not a torch zip archive): damaged, truncated or another kind of file")
    ckpt = load_weights_only(path, map_location)
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise LNMError(f"{path}: not an lnm_auto checkpoint (no network_weights)")
    version = ckpt.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise LNMError(f"{path}: checkpoint format {version} is not the format {CHECKPOINT_FORMAT_VERSION} of this "
                       "lnm_auto; retrain, or use the lnm_auto version that wrote it")
    if plans_identifier is not None and ckpt.get("plans_identifier") != plans_identifier:
        raise LNMError(f"{path}: trained under other plans (identifier {ckpt.get('plans_identifier')}, the plans "
                       f"here are {plans_identifier}); retrain with these plans or restore the plans it was trained with")
    return ckpt
