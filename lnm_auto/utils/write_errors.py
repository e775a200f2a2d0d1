"""The one rule for a write that fails for want of room or permission, whatever wrote it (JSON, CSV, npz, npy,
a torch checkpoint, a PNG): one line naming the folder — "no space left on <folder>: N MB needed" or
"<folder> is read-only" — instead of each writer's own words.

Writers fail in their own words on a full disk: ``OSError [Errno 28]`` from Python, "N requested and M written"
(no errno) from numpy, "unexpected pos" (a RuntimeError) from torch.save. So a write that failed while its
folder's file system has almost nothing left (:data:`FULL_BELOW_BYTES`) is reported as a full disk, whatever
the writer said; any other failure keeps its own error (our bugs are not disguised as a full disk).
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator

from lnm_auto.utils.errors import LNMError

FULL_BELOW_BYTES = 1 << 20       # a failed write with less free than this on its file system: the disk is full
FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM}
MB = 1e6


def nearest_existing(folder: str | os.PathLike) -> Path:
    """``folder`` if it exists, else its nearest existing parent."""
    here = Path(folder)
    while not here.exists() and here != here.parent:
        here = here.parent
    return here


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Bytes this process may still write on the file system of ``folder`` (or of its nearest existing parent)."""
    try:
        stats = os.statvfs(nearest_existing(folder))
    except (OSError, AttributeError):       # AttributeError: no statvfs (Windows)
        return None
    return stats.f_bavail * stats.f_frsize


def no_space(folder: str | os.PathLike, needed_bytes: int | None = None, at_least: bool = False) -> LNMError:
    """The full-disk line: what the write needed (``at_least``: what it had written when it failed) and what is
    free."""
    free = free_bytes(folder)
    needed = f": {'at least ' if at_least else ''}{needed_bytes / MB:.1f} MB needed" if needed_bytes else ""
    left = f", {free / MB:.1f} MB free" if free is not None else ""
    return LNMError(f"no space left on {folder}{needed}{left}; free some space or write to another folder")


def write_failure(error: BaseException, folder: str | os.PathLike, needed_bytes: int | None = None,
                  creating: bool = False, at_least: bool = False) -> LNMError | None:
    """The one line for ``error``, raised by a write into ``folder``, when it is a full disk, a read-only file system
    or (``creating``: while making the folder or a file in it) a missing permission or a file in a folder's
    place; None for any other error (the caller re-raises it). ``at_least``: ``needed_bytes`` is only what the
    write had written when it failed."""
    folder = nearest_existing(folder)     # the folder to blame: the one that is there (the others were to be made)
    code = getattr(error, "errno", None) if isinstance(error, OSError) else None
    if code in FULL_ERRNOS:
        return no_space(folder, needed_bytes, at_least)
    if code == errno.EROFS:
        return LNMError(f"{folder} is read-only; make it writable or write to another folder")
    if creating and code in PERMISSION_ERRNOS:
        return LNMError(f"{folder} is not writable (permission denied); make it writable or write to another folder")
    if creating and code in (errno.ENOTDIR, errno.EEXIST):
        blocking = _file_in_the_way(folder)
        if blocking is not None:
            return LNMError(f"{blocking}: is a file, not a folder; move it away or write to another folder")
    if isinstance(error, (OSError, RuntimeError)):
        free = free_bytes(folder)
        if free is not None and free < FULL_BELOW_BYTES:
            return no_space(folder, needed_bytes, at_least)
    return None


@contextlib.contextmanager
def write_errors(folder: str | os.PathLike, needed_bytes: int | None = None, creating: bool = True) -> Iterator[None]:
    """Turn the failures of the writes in the block into :func:`write_failure`'s one line (others pass through)."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        problem = write_failure(e, folder, needed_bytes, creating)
        if problem is None:
            raise
        raise problem from None


def make_folder(folder: str | os.PathLike) -> Path:
    """``folder`` and its parents, created if missing; a read-only, full or blocked place is one line."""
    folder = Path(folder)
    with write_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def _file_in_the_way(folder: Path) -> Path | None:
    """The nearest of ``folder`` and its parents that exists as something other than a folder."""
    for here in (folder, *folder.parents):
        if here.exists() or here.is_symlink():
            return None if here.is_dir() else here
    return None
