"""The temporary files a killed writer leaves, found by our own naming pattern and nothing else.

``utils.io.atomic_path(PATH, suffix)`` writes through ``tempfile.mkstemp(prefix=".NAME.", suffix=SUFFIX)`` in
PATH's folder: ``.NAME.`` + 8 random characters (``a-z``, ``0-9``, ``_``) + ``SUFFIX`` (``.tmp`` when none is
given; writers give an ending of NAME, e.g. ``.nii.gz`` or ``.zip``). A SIGKILL between the first write and the
rename leaves that file behind. A rerun writing PATH again may remove exactly these, never another file:
tests/test_robustness_predict.py kills a real ``atomic_path`` write and checks that this finds what it left.
"""
from __future__ import annotations

import glob
import re
from pathlib import Path

MKSTEMP_RANDOM = r"[a-z0-9_]{8}"   # tempfile's _RandomNameSequence: 8 of these characters


def stale_temp_files(path: str | Path) -> list[Path]:
    """Temporary files that an interrupted atomic write of ``path`` left in its folder."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(re.escape(f".{path.name}.") + MKSTEMP_RANDOM + r"(?P<ending>\..+)$")
    found = []
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.*"):
        match = pattern.fullmatch(candidate.name)
        if match and (match["ending"] == ".tmp" or path.name.endswith(match["ending"])) and candidate.is_file() \
                and not candidate.is_symlink():
            found.append(candidate)
    return sorted(found)


def remove_stale_temp_files(path: str | Path) -> list[Path]:
    """Remove what :func:`stale_temp_files` finds for ``path``; returns the removed files."""
    removed = stale_temp_files(path)
    for f in removed:
        f.unlink(missing_ok=True)
    return removed

