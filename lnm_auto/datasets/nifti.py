"""NIfTI files checked before SimpleITK's reading is trusted, and decompressed once.

SimpleITK zero-fills a truncated .nii/.nii.gz, reads NaN voxels as 0 and a zero spacing as 1 mm, all without an
error, so every NIfTI file is streamed once through a check. For a gzipped file that stream is as expensive as
the read itself (decompression is the read's whole cost), so the checked, decompressed bytes go to a temporary
uncompressed .nii that SimpleITK then reads: one decompression per read instead of two. SimpleITK still
interprets the header (orientation, scaling, pixel type); nothing of its reader is re-implemented.
"""
from __future__ import annotations

import math
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
from isal import igzip, isal_zlib   # gzip with ISA-L's inflate: 2-3x zlib's speed, the same format and checks

from lnm_auto.utils.errors import LNMError

# NIfTI-1 / NIfTI-2 header fields: (dim, datatype, bitpix, pixdim, vox_offset) struct formats and offsets
_NIFTI_LAYOUT = {348: (("8h", 40), ("h", 70), ("h", 72), ("8f", 76), ("f", 108)),
                 540: (("8q", 16), ("h", 12), ("h", 14), ("8d", 104), ("q", 168))}
_NIFTI_FLOATS = {16: "f4", 64: "f8"}   # NIfTI datatype codes of float32 / float64
_READ_CHUNK = 1 << 22


class _CopyingReader:
    """A read-only stream that also writes what it reads to ``out``; a failing write (disk full) stops the
    copy and is remembered, never reported as a problem of the file being read."""

    def __init__(self, stream: BinaryIO, out: BinaryIO | None):
        self.stream, self.out, self.copy_failed = stream, out, out is None

    def read(self, n: int) -> bytes:
        data = self.stream.read(n)
        if data and not self.copy_failed:
            try:
                self.out.write(data)
            except OSError:
                self.copy_failed = True
        return data


def check_nifti_file(path: Path, header_only: bool = False, copy_to: BinaryIO | None = None) -> bool:
    """Refuse a NIfTI file that SimpleITK would read wrongly without an error: header spacing (pixdim[1..3])
    not positive (read as 1 mm), voxel data shorter than the header says (truncated copy, damaged gzip
    stream: zero-filled), NaN/Inf voxels (read as 0). Streams the voxels once unless ``header_only``.
    ``copy_to``: an open file that receives the decompressed bytes; returns whether it now holds the whole
    file (False when only the header was needed, the file is a .hdr/.img pair, or the copy failed)."""
    opener = igzip.open if is_gzipped(path) else open
    try:
        with opener(path, "rb") as raw:
            f = _CopyingReader(raw, copy_to)
            header = f.read(540)
            fields = _nifti_header_fields(header)
            if fields is None:
                raise LNMError(f"{path}: not a NIfTI file (no valid NIfTI-1/NIfTI-2 header)")
            order, dim, datatype, bitpix, pixdim, vox_offset, single_file = fields
            n_dims = int(dim[0])
            if not 1 <= n_dims <= 7 or bitpix <= 0 or any(d < 1 for d in dim[1:n_dims + 1]):
                raise LNMError(f"{path}: invalid NIfTI header (dim {list(dim[:n_dims + 1])}, bitpix {bitpix})")
            bad = [i for i in range(1, min(n_dims, 3) + 1) if not (math.isfinite(pixdim[i]) and pixdim[i] > 0)]
            if bad:
                raise LNMError(f"{path}: header spacing pixdim[{bad[0]}] = {pixdim[bad[0]]:g} mm; every voxel spacing "
                               "must be positive (fix the header: the spacing the scanner used)")
            if header_only or not single_file:
                return False
            n_voxel_bytes = int(np.prod([int(d) for d in dim[1:n_dims + 1]], dtype=np.int64)) * bitpix // 8
            n_data, n_bad = _scan_voxels(f, header, int(vox_offset), n_voxel_bytes, _NIFTI_FLOATS.get(datatype), order)
    except (OSError, EOFError, zlib.error, isal_zlib.error) as e:   # BadGzipFile is an OSError
        raise LNMError(f"{path}: damaged or truncated file ({str(e).strip()[:120] or type(e).__name__}); copy or "
                       "convert it again") from None
    if n_data < n_voxel_bytes:
        raise LNMError(f"{path}: truncated: {n_data} of the {n_voxel_bytes} bytes of voxel data its header "
                       "announces; copy or convert it again")
    if n_bad:
        raise LNMError(f"{path}: {n_bad} NaN/Inf voxel(s); replace them with a finite value (SimpleITK "
                       "would silently read NaN as 0)")
    return not f.copy_failed


def read_checked_nifti(path: Path, read: Callable[..., object]):
    """Check ``path`` (:func:`check_nifti_file`) and read it with ``read(file, shown_as=path)``: a gzipped file
    from the temporary uncompressed copy the check wrote (one decompression), else from ``path`` itself."""
    try:
        fd, copy = tempfile.mkstemp(suffix=".nii", prefix=".lnm_read_") if is_gzipped(path) else (None, None)
    except OSError:   # no writable temporary folder: check, then let SimpleITK decompress again
        fd, copy = None, None
    if copy is None:
        check_nifti_file(path)
        return read(path)
    try:
        with os.fdopen(fd, "wb") as out:
            complete = check_nifti_file(path, copy_to=out)
        return read(Path(copy), shown_as=path) if complete else read(path)
    finally:
        Path(copy).unlink(missing_ok=True)


def is_gzipped(path: Path) -> bool:
    """Whether the file starts with gzip's magic bytes (SimpleITK also reads an uncompressed file named .nii.gz)."""
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _scan_voxels(f, header: bytes, vox_offset: int, n_voxel_bytes: int, float_code: str | None,
                 order: str) -> tuple[int, int]:
    """Read the rest of an open NIfTI stream: (voxel bytes present, NaN/Inf voxels among them)."""
    dtype = np.dtype(order + float_code) if float_code else None
    pending, to_skip = header[vox_offset:], max(0, vox_offset - len(header))
    n_present, n_scanned, n_bad = len(pending), 0, 0
    while chunk := f.read(_READ_CHUNK):
        skipped = min(to_skip, len(chunk))
        chunk, to_skip = chunk[skipped:], to_skip - skipped
        n_present += len(chunk)
        if dtype is None:
            continue
        buf = pending + chunk
        usable = min(len(buf) - len(buf) % dtype.itemsize, max(0, n_voxel_bytes - n_scanned))
        n_bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(buf[:usable], dtype))))
        n_scanned, pending = n_scanned + usable, buf[usable:]
    if dtype is not None and pending and n_scanned < n_voxel_bytes:
        usable = min(len(pending) - len(pending) % dtype.itemsize, n_voxel_bytes - n_scanned)
        n_bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(pending[:usable], dtype))))
    return n_present, n_bad


def _nifti_header_fields(header: bytes):
    """(byte order, dim, datatype, bitpix, pixdim, vox_offset, single_file) of a NIfTI-1/2 header, or None."""
    if len(header) < 348:
        return None
    for order in "<>":
        size = struct.unpack(order + "i", header[:4])[0]
        if size in _NIFTI_LAYOUT and len(header) >= size:
            dim, datatype, bitpix, pixdim, offset = [struct.unpack_from(order + fmt, header, at)
                                                     for fmt, at in _NIFTI_LAYOUT[size]]
            magic = header[344:348] if size == 348 else header[4:8]
            return order, dim, datatype[0], bitpix[0], pixdim, offset[0], magic.startswith(b"n+")
    return None
