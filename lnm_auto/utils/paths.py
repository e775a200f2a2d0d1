"""Where data lives: $LNM_raw, $LNM_preprocessed, $LNM_results (like nnU-Net's nnUNet_* variables),
and resolving ``-d 001`` / ``-d 1`` / ``-d Dataset001_Name`` to a dataset folder name."""
from __future__ import annotations

import os
import re
from pathlib import Path

from lnm_auto.utils.errors import LNMError

ENV_VARS = {"raw": "LNM_raw", "preprocessed": "LNM_preprocessed", "results": "LNM_results"}
DATASET_DIR_PATTERN = re.compile(r"^Dataset(\d{3})_([A-Za-z0-9_\-]+)$")


def base_folder(kind: str, override: str | os.PathLike | None = None) -> Path:
    """The raw/preprocessed/results root: the CLI flag if given, else the environment variable."""
    if override:
        return Path(override)
    var = ENV_VARS[kind]
    value = os.environ.get(var)
    if not value:
        raise LNMError(f"${var} is not set: export {var}=/path/to/folder or pass --{kind} FOLDER")
    return Path(value)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    return f"Dataset{int(dataset_id):03d}_{name}"


def resolve_dataset_name(dataset: str | int, *roots: Path) -> str:
    """Map "001", "1", 1 or "Dataset001_Name" to the dataset folder name found in any of ``roots``."""
    text = str(dataset).strip()
    match = DATASET_DIR_PATTERN.match(text)
    if match:
        wanted_id = int(match.group(1))
    elif text.isdigit():
        wanted_id = int(text)
    else:
        raise LNMError(f"dataset '{text}' is neither a number (001, 1) nor a folder name like Dataset001_Name")
    found: set[str] = set()
    for root in roots:
        if root is None or not Path(root).is_dir():
            continue
        for entry in Path(root).iterdir():
            m = DATASET_DIR_PATTERN.match(entry.name)
            if entry.is_dir() and m and int(m.group(1)) == wanted_id:
                if match and entry.name != text:
                    continue
                found.add(entry.name)
    if not found:
        where = ", ".join(str(r) for r in roots if r is not None)
        raise LNMError(f"no dataset with id {wanted_id:03d} in {where}: expected a folder Dataset{wanted_id:03d}_<Name>")
    if len(found) > 1:
        raise LNMError(f"dataset id {wanted_id:03d} is ambiguous: {sorted(found)}; pass the full folder name")
    return found.pop()
