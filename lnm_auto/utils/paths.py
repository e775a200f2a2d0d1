"""Where data lives: $LNM_raw, $LNM_preprocessed, $LNM_results (like nnU-Net's nnUNet_* variables),
and resolving ``-d 001`` / ``-d 1`` / ``-d Dataset001_Name`` to a dataset folder name."""
from __future__ import annotations

import difflib
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
    """``Dataset<id:03d>_<name>``, the folder name of a dataset."""
    return f"Dataset{int(dataset_id):03d}_{name}"


def dataset_names(*roots: Path | None) -> list[str]:
    """Every DatasetXXX_Name folder in ``roots`` (sorted, each once)."""
    names: set[str] = set()
    for root in roots:
        if root is not None and Path(root).is_dir():
            names.update(e.name for e in Path(root).iterdir() if e.is_dir() and DATASET_DIR_PATTERN.match(e.name))
    return sorted(names)


def nearest_hint(wanted: str, candidates, what: str = "") -> str:
    """"; did you mean X?" for the closest of ``candidates`` (difflib), or "" when none is close."""
    close = difflib.get_close_matches(str(wanted), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f"; did you mean {what}{close[0]}?" if close else ""


def resolve_dataset_name(dataset: str | int, *roots: Path) -> str:
    """Map "001", "1", 1 or "Dataset001_Name" to the dataset folder name found in any of ``roots``;
    an unknown name is one LNMError line suggesting the nearest existing dataset."""
    text = str(dataset).strip()
    match = DATASET_DIR_PATTERN.match(text)
    existing = dataset_names(*roots)
    if match:
        wanted_id = int(match.group(1))
    elif text.isdigit():
        wanted_id = int(text)
    else:
        by_name = {n.split("_", 1)[1]: n for n in existing}   # "Tiny" -> Dataset007_Tiny
        close = difflib.get_close_matches(text, list(by_name), n=1) or difflib.get_close_matches(text, existing, n=1)
        hint = f"; did you mean {by_name.get(close[0], close[0])}?" if close else ""
        raise LNMError(f"dataset '{text}' is neither a number (001, 1) nor a folder name like Dataset001_Name{hint}")
    same_id = [n for n in existing if int(DATASET_DIR_PATTERN.match(n).group(1)) == wanted_id]
    found = [n for n in same_id if n == text] if match else same_id
    where = ", ".join(str(r) for r in roots if r is not None)
    if not found and match and same_id:   # right id, misspelt name: Dataset007_Tny for Dataset007_Tiny
        hint = nearest_hint(text, same_id) or f"; id {wanted_id:03d} is {', '.join(same_id)}"
        raise LNMError(f"no dataset {text} in {where}{hint} (or pass just the id, {wanted_id:03d})")
    if not found:
        available = f" (available: {', '.join(existing)})" if existing else ""
        raise LNMError(f"no dataset with id {wanted_id:03d} in {where}: expected a folder "
                       f"Dataset{wanted_id:03d}_<Name>{nearest_hint(text, existing) if match else ''}{available}")
    if len(found) > 1:
        raise LNMError(f"dataset id {wanted_id:03d} is ambiguous: {sorted(found)}; pass the full folder name")
    return found[0]


def resolve_preprocessed_dataset(dataset: str | int, preprocessed_root: Path, raw_root: Path | None = None) -> str:
    """The dataset's folder name in ``preprocessed_root``; a dataset that is only raw (``raw_root``, else
    $LNM_raw) is told to run lnm_plan_and_preprocess first."""
    try:
        return resolve_dataset_name(dataset, preprocessed_root)
    except LNMError:
        raw = raw_root if raw_root is not None else (Path(os.environ["LNM_raw"]) if os.environ.get("LNM_raw") else None)
        try:
            raw_name = resolve_dataset_name(dataset, raw) if raw is not None else None
        except LNMError:
            raw_name = None
        if raw_name is None:
            raise
        number = DATASET_DIR_PATTERN.match(raw_name).group(1)
        raise LNMError(f"{raw_name} is in {raw} but not preprocessed in {preprocessed_root}: run "
                       f"lnm_plan_and_preprocess -d {number} first") from None


UNSAFE_NAMES = ("", ".", "..")
PATH_SEPARATORS = ("/", "\\", "\0")


def check_plain_name(value, what: str) -> str:
    """``value`` as text when it can be one part of a path that stays inside its folder (a dataset, configuration,
    trainer, plans or checkpoint name, a fold); a path separator or ``..`` is one LNMError line naming ``what``."""
    text = str(value)
    if text.strip() in UNSAFE_NAMES or any(sep in text for sep in PATH_SEPARATORS):
        raise LNMError(f"{what} '{text}': must be a plain name, without '/', '\\' or '..': it becomes part of a "
                       "path inside lnm_auto's folders and must not lead out of them")
    return text
