"""Atomic file writes and small I/O helpers.

Every file lnm_auto writes goes through a temp file in the same folder followed by ``os.replace``,
so a kill at any moment leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success rename it onto ``path``, else delete it.

    ``suffix`` keeps the temp file's ending right for writers that look at it (SimpleITK).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp" if not suffix else suffix,
                               dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)   # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy ``src`` to ``dst`` so readers see the old file or the whole new one."""
    with atomic_path(dst, suffix=Path(dst).suffix) as tmp:
        shutil.copyfile(src, tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` so readers see the old file or the whole new one."""
    atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """JSON-ready copy: NaN/inf -> None (JSON has no NaN), numpy scalars/arrays and paths -> Python."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [json_safe(v) for v in obj.tolist()]
    if isinstance(obj, (np.generic,)):
        obj = obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def save_json(obj: Any, path: str | os.PathLike) -> None:
    """The one JSON writer: atomic, indented, NaN written as null."""
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def load_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file (ValueError when it is not JSON)."""
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def save_npz_atomic(path: str | os.PathLike, compress: bool = True, **arrays: np.ndarray) -> None:
    """An npz written atomically (into memory, then one rename); ``compress``: np.savez_compressed, else np.savez."""
    buf = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def save_csv_atomic(df, path: str | os.PathLike) -> None:
    """Write a pandas DataFrame as CSV atomically."""
    atomic_write_text(path, df.to_csv(index=False))
