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

from lnm_auto.utils.write_errors import write_errors, write_failure


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success rename it onto ``path``, else delete it.

    ``suffix`` keeps the temp file's ending right for writers that look at it (SimpleITK). A full disk or a
    read-only folder is one line (utils/write_errors.py; ``needed_bytes``: the file's size, when known).
    """
    path = Path(path)
    with write_errors(path.parent, needed_bytes):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp" if not suffix else suffix,
                                   dir=path.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
        except (OSError, RuntimeError) as e:   # judged before the partial temp file goes (it fills the disk)
            problem = write_failure(e, path.parent, needed_bytes or _size(tmp_path), at_least=not needed_bytes)
            if problem is None:
                raise
            raise problem from None
        with write_errors(path.parent, needed_bytes):
            os.chmod(tmp_path, 0o666 & ~_UMASK)   # mkstemp makes 0600; give the file the usual permissions
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _size(path: Path) -> int | None:
    """A file's size so far (what a failed write had managed to write: a lower bound of what it needed)."""
    try:
        return path.stat().st_size
    except OSError:
        return None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one."""
    with atomic_path(path, needed_bytes=len(data)) as tmp:
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
    """Parse a JSON file (ValueError when it is not JSON, or an object names a key twice: JSON readers would
    keep only the last of them, silently)."""
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f, object_pairs_hook=_unique_keys)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key '{twice}' given twice in one object")
    return out


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` (UTF-8) to a log file; a full disk or a read-only folder is one line."""
    path = Path(path)
    with write_errors(path.parent, len(text.encode("utf-8"))):
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)


def save_npz_atomic(path: str | os.PathLike, compress: bool = True, **arrays: np.ndarray) -> None:
    """An npz written atomically (into memory, then one rename); ``compress``: np.savez_compressed, else np.savez."""
    buf = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def save_csv_atomic(df, path: str | os.PathLike) -> None:
    """Write a pandas DataFrame as CSV atomically."""
    atomic_write_text(path, df.to_csv(index=False))
