"""NIfTI files checked before SimpleITK's reading is trusted, and decompressed once.

SimpleITK zero-fills a truncated .nii/.nii.gz, reads NaN voxels as 0 and a zero spacing as 1 mm, all without an
error, so every NIfTI file is streamed once through a check. That stream is as expensive as the read itself
(decompression is the read's whole cost), so the checked, decompressed bytes are kept in memory and become the
voxel array: SimpleITK interprets the header (orientation, spacing, pixel type; a header-only read,
milliseconds) and the voxels are the file's own bytes (preprocessing uses the array as it is; ``read_image``
copies it into a SimpleITK image). Whatever SimpleITK would change on the way (scaled voxels, more than three
dimensions, vector pixels) is left to SimpleITK itself, reading the decompressed bytes from a temporary file.
"""
from __future__ import annotations

import math
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import SimpleITK as sitk
from isal import igzip, isal_zlib   # gzip with ISA-L's inflate: 2-3x zlib's speed, the same format and checks

from lnm_auto.utils.errors import LNMError

# NIfTI-1 / NIfTI-2 header fields: (dim, datatype, bitpix, pixdim, vox_offset, scl_slope, scl_inter) struct
# formats and offsets
_NIFTI_LAYOUT = {348: (("8h", 40), ("h", 70), ("h", 72), ("8f", 76), ("f", 108), ("f", 112), ("f", 116)),
                 540: (("8q", 16), ("h", 12), ("h", 14), ("8d", 104), ("q", 168), ("d", 176), ("d", 184))}
# NIfTI datatype code -> numpy type code and the SimpleITK pixel type its reader gives unscaled voxels
_NIFTI_PIXELS = {2: ("u1", sitk.sitkUInt8), 4: ("i2", sitk.sitkInt16), 8: ("i4", sitk.sitkInt32),
                 16: ("f4", sitk.sitkFloat32), 64: ("f8", sitk.sitkFloat64), 256: ("i1", sitk.sitkInt8),
                 512: ("u2", sitk.sitkUInt16), 768: ("u4", sitk.sitkUInt32), 1024: ("i8", sitk.sitkInt64),
                 1280: ("u8", sitk.sitkUInt64)}
_READ_CHUNK = 1 << 22
# sform_code and srow_x (srow_y, srow_z follow it): (struct format, offset) of NIfTI-1 and NIfTI-2
_SFORM_LAYOUT = {348: (("h", 254), ("4f", 280)), 540: (("i", 348), ("4d", 400))}
SHEAR_ATOL = 1e-3     # the sform's axes, normalised, must be orthonormal to this (float32 rounding passes)


@dataclass
class NiftiHeader:
    """The fields of a NIfTI-1/2 header that the check and the read need."""
    order: str                 # '<' or '>'
    dim: tuple
    datatype: int
    bitpix: int
    pixdim: tuple
    vox_offset: int            # where the voxels start: the header's vox_offset, at least the header's size
    scl_slope: float
    scl_inter: float
    single_file: bool          # .nii (magic n+1), not a .hdr/.img pair
    sform: tuple | None = None  # the 3 x 3 axes (rows x, y, z) of the sform when the header uses one

    @property
    def n_dims(self) -> int:
        return int(self.dim[0])

    @property
    def n_voxel_bytes(self) -> int:
        # the NIfTI library SimpleITK reads with sizes voxels by datatype, not by bitpix
        pixel = _NIFTI_PIXELS.get(self.datatype)
        voxel_bytes = np.dtype(pixel[0]).itemsize if pixel else self.bitpix // 8
        return math.prod(int(d) for d in self.dim[1:self.n_dims + 1]) * voxel_bytes   # Python ints: no overflow

    @property
    def float_code(self) -> str | None:
        """numpy's code of a float32/float64 voxel type (whose NaN/Inf the check counts), else None."""
        pixel = _NIFTI_PIXELS.get(self.datatype)
        return pixel[0] if pixel and pixel[0].startswith("f") else None


def check_nifti_file(path: Path, header_only: bool = False) -> None:
    """Refuse a NIfTI file that SimpleITK would read wrongly without an error: header spacing (pixdim[1..3])
    not positive (read as 1 mm), voxel data shorter than the header says (truncated copy, damaged gzip
    stream: zero-filled), NaN/Inf voxels (read as 0). Streams the voxels once unless ``header_only``."""
    _checked_content(path, is_gzipped(path), header_only)


def _checked_content(path: Path, gzipped: bool, header_only: bool = False) -> tuple[NiftiHeader, np.ndarray | None]:
    """:func:`check_nifti_file`, returning the header it parsed and the decompressed file up to the voxels' end
    (uint8; None when only the header was read: ``header_only``, or a .hdr/.img pair)."""
    opener = igzip.open if gzipped else open
    try:
        with opener(path, "rb") as f:
            header_bytes = f.read(540)
            header = _nifti_header(header_bytes)
            if header is None:
                raise LNMError(f"{path}: not a NIfTI file (no valid NIfTI-1/NIfTI-2 header)")
            dim, pixdim, n_dims = header.dim, header.pixdim, header.n_dims
            if not 1 <= n_dims <= 7 or header.bitpix <= 0 or any(d < 1 for d in dim[1:n_dims + 1]):
                raise LNMError(f"{path}: invalid NIfTI header (dim {list(dim[:n_dims + 1])}, bitpix {header.bitpix})")
            bad = [i for i in range(1, min(n_dims, 3) + 1) if not (math.isfinite(pixdim[i]) and pixdim[i] > 0)]
            if bad:
                raise LNMError(f"{path}: header spacing pixdim[{bad[0]}] = {pixdim[bad[0]]:g} mm; every voxel spacing "
                               "must be positive (fix the header: the spacing the scanner used)")
            if _sheared(header.sform):
                raise LNMError(f"{path}: the header's sform is sheared (its axes are not orthogonal), which SimpleITK "
                               "replaces by another grid silently; resample the image onto an orthogonal grid")
            if header_only or not header.single_file:
                return header, None
            if not gzipped and path.stat().st_size < header.vox_offset + header.n_voxel_bytes:
                n_data = max(0, path.stat().st_size - header.vox_offset)   # known without reading (or allocating)
                raise LNMError(f"{path}: truncated: {n_data} of the {header.n_voxel_bytes} bytes of voxel data its "
                               "header announces; copy or convert it again")
            content, n_data, n_bad = _read_voxels(f, header_bytes, header, path)
    except (OSError, EOFError, zlib.error, isal_zlib.error) as e:   # BadGzipFile is an OSError
        raise LNMError(f"{path}: damaged or truncated file ({str(e).strip()[:120] or type(e).__name__}); copy or "
                       "convert it again") from None
    if n_data < header.n_voxel_bytes:
        raise LNMError(f"{path}: truncated: {n_data} of the {header.n_voxel_bytes} bytes of voxel data its header "
                       "announces; copy or convert it again")
    if n_bad:
        raise LNMError(f"{path}: {n_bad} NaN/Inf voxel(s); replace them with a finite value (SimpleITK "
                       "would silently read NaN as 0)")
    return header, content


def read_checked_nifti(path: Path, read: Callable[..., sitk.Image]) -> sitk.Image:
    """Check ``path`` (:func:`check_nifti_file`) and read it, decompressing it once: from the checked bytes in
    memory (header interpreted by SimpleITK), else with ``read(file, shown_as=path)`` from an uncompressed
    temporary copy of them (or ``path`` itself)."""
    found = _read_checked(path, read)
    if isinstance(found, sitk.Image):
        return found
    voxels, header = found
    img = sitk.GetImageFromArray(voxels)
    img.SetOrigin(header.GetOrigin())
    img.SetSpacing(header.GetSpacing())
    img.SetDirection(header.GetDirection())
    return img


def read_checked_nifti_voxels(path: Path, read: Callable[..., sitk.Image]
                              ) -> tuple[np.ndarray, sitk.ImageFileReader | sitk.Image]:
    """:func:`read_checked_nifti` as (voxels in numpy order, read-only; what holds the grid: SimpleITK's header
    reader or the image), without building a SimpleITK image: the voxels are the decompressed file's own bytes
    (copying 40 MB into an image costs a fifth of the read)."""
    found = _read_checked(path, read)
    if isinstance(found, sitk.Image):
        return sitk.GetArrayFromImage(found), found   # a copy: a view would die with the image
    return found


def _read_checked(path: Path, read: Callable[..., sitk.Image]
                  ) -> sitk.Image | tuple[np.ndarray, sitk.ImageFileReader]:
    gzipped = is_gzipped(path)
    header, data = _checked_content(path, gzipped)
    if data is None:                                  # a .hdr/.img pair
        return read(path)
    found = nifti_voxels(data, header, path)
    if found is not None:
        return found
    if not gzipped:
        return read(path)
    return _read_from_temporary_copy(data, path, read)


def nifti_voxels(data: np.ndarray, header: NiftiHeader, header_file: Path
                 ) -> tuple[np.ndarray, sitk.ImageFileReader] | None:
    """The voxels (numpy z, y, x, native byte order, a view of ``data`` where the file's order is native) that
    SimpleITK reads from a NIfTI file whose decompressed content (up to the voxels' end) is ``data``, with
    SimpleITK's own header-only read of ``header_file`` (the same file) for the grid; None where SimpleITK's
    reader changes the voxels on the way (scaled values, not 3D, vector pixels, another pixel type)."""
    pixel = _NIFTI_PIXELS.get(header.datatype)
    unscaled = header.scl_slope in (0.0, 1.0) and header.scl_inter == 0.0
    if pixel is None or not unscaled or header.n_dims != 3 or not header.single_file:
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(header_file))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None                                   # the full read names the problem
    shape_zyx = tuple(int(d) for d in header.dim[3:0:-1])
    if (reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1 or reader.GetPixelID() != pixel[1]
            or reader.GetSize() != shape_zyx[::-1]):
        return None
    if len(data) < header.vox_offset + header.n_voxel_bytes:
        return None
    voxels = np.frombuffer(data, dtype=np.dtype(header.order + pixel[0]), count=int(np.prod(shape_zyx)),
                           offset=header.vox_offset).reshape(shape_zyx)
    return voxels.astype(voxels.dtype.newbyteorder("="), copy=False), reader


def _read_from_temporary_copy(data: np.ndarray, path: Path, read: Callable[..., sitk.Image]) -> sitk.Image:
    """``read`` of the decompressed bytes of gzipped ``path`` from a temporary .nii (SimpleITK reads files only);
    ``read(path)`` when no temporary file can be written."""
    try:
        fd, copy = tempfile.mkstemp(suffix=".nii", prefix=".lnm_read_")
    except OSError:          # no writable temporary folder: let SimpleITK decompress again
        return read(path)
    try:
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
        except OSError:      # disk full
            return read(path)
        return read(Path(copy), shown_as=path)
    finally:
        Path(copy).unlink(missing_ok=True)


def is_gzipped(path: Path) -> bool:
    """Whether the file starts with gzip's magic bytes (SimpleITK also reads an uncompressed file named .nii.gz)."""
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _read_voxels(f: BinaryIO, header_bytes: bytes, header: NiftiHeader, header_path: Path
                 ) -> tuple[np.ndarray, int, int]:
    """Read the rest of an open NIfTI stream whose first bytes were ``header_bytes`` into one buffer, scanning
    the float voxels for NaN/Inf chunk by chunk while they are in cache: (the file up to the voxels' end,
    voxel bytes present, NaN/Inf voxels among them). Each 4 MiB chunk goes into place while it is in cache;
    the whole file is never copied again."""
    start, end = header.vox_offset, header.vox_offset + header.n_voxel_bytes
    try:
        content = np.empty(max(end, len(header_bytes)), dtype=np.uint8)
    except (MemoryError, ValueError):   # ValueError: numpy's limit on an array's size (2^63 bytes)
        raise LNMError(f"{header_path}: its header announces {end / 2 ** 30:.1f} GiB of file up to the voxels' end "
                       f"(dim {list(header.dim[1:header.n_dims + 1])}, vox_offset {header.vox_offset}), more than "
                       "this machine can hold; if the image is not that large, its header is damaged: convert it "
                       "again") from None
    content[:len(header_bytes)] = np.frombuffer(header_bytes, dtype=np.uint8)
    dtype = np.dtype(header.order + header.float_code) if header.float_code else None
    filled, scanned, n_bad = len(header_bytes), start, 0
    with memoryview(content) as view:
        while True:
            if dtype is not None and min(filled, end) > scanned:     # the whole voxels read so far
                whole = scanned + (min(filled, end) - scanned) // dtype.itemsize * dtype.itemsize
                n_bad += int(np.count_nonzero(~np.isfinite(content[scanned:whole].view(dtype))))
                scanned = whole
            n = f.readinto(view[filled:min(end, filled + _READ_CHUNK)]) if filled < end else 0
            if not n:
                break
            filled += n
    while f.read(_READ_CHUNK):   # the rest of the stream, checked like the voxels (a damaged later gzip member)
        pass
    return content[:filled], max(0, filled - start), n_bad


def _sform(header: bytes, order: str, size: int) -> tuple | None:
    """The 3 x 3 axes of the header's sform (rows x, y, z), or None when sform_code says it has none."""
    (code_format, code_at), (row_format, row_at) = _SFORM_LAYOUT[size]
    if struct.unpack_from(order + code_format, header, code_at)[0] <= 0:
        return None
    step = struct.calcsize(row_format)
    return tuple(struct.unpack_from(order + row_format, header, row_at + i * step)[:3] for i in range(3))


def _sheared(sform: tuple | None) -> bool:
    """Whether an sform's axes (its columns), each scaled to length 1, are not orthonormal."""
    if sform is None:
        return False
    axes = np.asarray(sform, dtype=float)
    lengths = np.linalg.norm(axes, axis=0)
    if not np.all(np.isfinite(axes)) or np.any(lengths == 0):
        return False        # no usable sform: SimpleITK takes the qform (an orthonormal rotation by construction)
    unit = axes / lengths
    return not np.allclose(unit.T @ unit, np.eye(3), rtol=0, atol=SHEAR_ATOL)


def _nifti_header(header: bytes) -> NiftiHeader | None:
    """The fields of a NIfTI-1/2 header, or None when ``header`` is not one."""
    if len(header) < 348:
        return None
    for order in "<>":
        size = struct.unpack(order + "i", header[:4])[0]
        if size in _NIFTI_LAYOUT and len(header) >= size:
            dim, datatype, bitpix, pixdim, offset, slope, inter = [struct.unpack_from(order + fmt, header, at)
                                                                   for fmt, at in _NIFTI_LAYOUT[size]]
            magic = header[344:348] if size == 348 else header[4:8]
            if not math.isfinite(offset[0]) or offset[0] > 2 ** 62:
                return None    # a damaged vox_offset: not a header to trust
            # the NIfTI library starts a .nii file's voxels no earlier than the header's end, whatever vox_offset says
            return NiftiHeader(order, dim, datatype[0], bitpix[0], pixdim, max(int(offset[0]), size), float(slope[0]),
                               float(inter[0]), magic.startswith(b"n+"), _sform(header, order, size))
    return None
