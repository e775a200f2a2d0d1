"""The NIfTI check-and-read: one decompression, and exactly what SimpleITK itself reads."""
from __future__ import annotations

import gzip
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from lnm_auto.datasets.nifti import _checked_content, read_checked_nifti
from lnm_auto.datasets.raw_dataset import Grid, read_image, read_image_voxels, sitk_read
from lnm_auto.utils.errors import LNMError


def oblique_image(arr: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.9, 2.5))
    img.SetOrigin((-12.5, 30.0, 101.25))
    c, s = np.cos(0.3), np.sin(0.3)
    img.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    return img


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.float64, np.uint32, np.int8, np.uint16, np.int32, np.int64, np.uint64])
@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
def test_read_equals_simpleitk(tmp_path, dtype, ending):
    rng = np.random.default_rng(0)
    arr = (rng.random((7, 33, 29)) * 200).astype(dtype)
    path = tmp_path / f"a{ending}"
    sitk.WriteImage(oblique_image(arr), str(path))
    ours, theirs = read_image(path), sitk.ReadImage(str(path))
    assert ours.GetPixelID() == theirs.GetPixelID()
    assert ours.GetSize() == theirs.GetSize() == arr.shape[::-1]
    assert np.allclose(ours.GetSpacing(), theirs.GetSpacing()) and np.allclose(ours.GetOrigin(), theirs.GetOrigin())
    assert np.allclose(ours.GetDirection(), theirs.GetDirection())
    assert np.array_equal(sitk.GetArrayViewFromImage(ours), sitk.GetArrayViewFromImage(theirs))
    assert np.array_equal(sitk.GetArrayViewFromImage(ours), arr)


def written(tmp_path, img: sitk.Image, name: str, slope: float | None = None, inter: float = 0.0,
            vox_offset: float | None = None) -> Path:
    """``img`` as a NIfTI-1 file ``name``; ``slope``: patch the header's scl_slope / scl_inter (SimpleITK then
    reads scaled float voxels); ``vox_offset``: patch where the header says the voxels start."""
    plain = tmp_path / (name.removesuffix(".gz") + ".plain.nii")
    sitk.WriteImage(img, str(plain))
    data = bytearray(plain.read_bytes())
    plain.unlink()
    if slope is not None:
        struct.pack_into("<ff", data, 112, slope, inter)
    if vox_offset is not None:
        struct.pack_into("<f", data, 108, vox_offset)
    path = tmp_path / name
    path.write_bytes(gzip.compress(bytes(data)) if name.endswith(".gz") else bytes(data))
    return path


def assert_same_image(ours: sitk.Image, theirs: sitk.Image) -> None:
    assert ours.GetPixelID() == theirs.GetPixelID() and ours.GetSize() == theirs.GetSize()
    assert ours.GetNumberOfComponentsPerPixel() == theirs.GetNumberOfComponentsPerPixel()
    assert np.allclose(ours.GetSpacing(), theirs.GetSpacing()) and np.allclose(ours.GetOrigin(), theirs.GetOrigin())
    assert np.allclose(ours.GetDirection(), theirs.GetDirection())
    assert np.array_equal(sitk.GetArrayViewFromImage(ours), sitk.GetArrayViewFromImage(theirs))


def recording_read(calls: list):
    def read(f, shown_as=None):
        calls.append((Path(f), shown_as, Path(f).is_file()))
        return sitk_read(f, shown_as)
    return read


@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
def test_plain_files_are_read_from_the_checked_bytes(tmp_path, monkeypatch, ending):
    """An unscaled 3D file becomes an image straight from the bytes the check read: SimpleITK's full read is not
    called, and no temporary file is written."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    path = written(tmp_path, oblique_image(np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)), f"a{ending}")
    calls = []
    img = read_checked_nifti(path, recording_read(calls))
    assert calls == [] and list((tmp_path / "tmp").iterdir()) == []
    assert_same_image(img, sitk.ReadImage(str(path)))


@pytest.mark.parametrize("slope, inter", [(2.0, -5.0), (1.0, 3.0), (0.5, 0.0)])
@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
def test_scaled_voxels_are_left_to_simpleitk(tmp_path, monkeypatch, slope, inter, ending):
    """scl_slope / scl_inter: SimpleITK scales the voxels (and changes the pixel type): its own read does it, a
    gzipped file from a temporary uncompressed copy of the checked bytes that is removed afterwards."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    arr = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    path = written(tmp_path, oblique_image(arr), f"a{ending}", slope=slope, inter=inter)
    calls = []
    ours = read_checked_nifti(path, recording_read(calls))
    assert_same_image(ours, sitk.ReadImage(str(path)))
    assert np.allclose(sitk.GetArrayViewFromImage(ours), arr * slope + inter)
    if ending == ".nii.gz":
        assert calls[0][0].parent == tmp_path / "tmp" and calls[0][1] == path and calls[0][2]
    else:
        assert calls == [(path, None, True)]
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize("name, slope", [("a.nii.gz", None), ("a.nii", None), ("a.nii.gz", 2.0), ("a.mha", None)])
def test_voxels_and_grid_equal_simpleitk(tmp_path, monkeypatch, name, slope):
    """``read_image_voxels`` (preprocessing's read, no SimpleITK image built): the voxels and grid SimpleITK
    reads, for plain NIfTI (the file's own bytes), scaled NIfTI (SimpleITK's read) and other formats; the grid
    maps physical points to indices as SimpleITK does."""
    arr = (np.random.default_rng(1).random((6, 11, 9)) * 300).astype(np.int16)
    img = oblique_image(arr)
    if name.endswith(".mha"):
        path = tmp_path / name
        sitk.WriteImage(img, str(path))
    else:
        path = written(tmp_path, img, name, slope=slope)
    calls = []
    import lnm_auto.datasets.raw_dataset as raw_dataset
    monkeypatch.setattr(raw_dataset, "sitk_read", recording_read(calls))
    voxels, grid = read_image_voxels(path)
    assert (calls == []) == (name.startswith("a.nii") and slope is None)    # plain NIfTI: no SimpleITK read
    assert not voxels.flags.writeable
    theirs = sitk.ReadImage(str(path))
    assert voxels.dtype == sitk.GetArrayViewFromImage(theirs).dtype
    assert np.array_equal(voxels, sitk.GetArrayViewFromImage(theirs))
    assert grid == Grid.of(theirs)
    for point in [(0.0, 0.0, 0.0), (-40.5, 77.25, 120.0), (3.0, 31.0, 99.0)]:
        np.testing.assert_allclose(grid.TransformPhysicalPointToContinuousIndex(point),
                                   theirs.TransformPhysicalPointToContinuousIndex(point), rtol=0, atol=1e-9)


def test_big_endian_voxels_come_back_in_native_order(tmp_path):
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 50
    plain = tmp_path / "b.nii"
    sitk.WriteImage(oblique_image(arr), str(plain))
    data = bytearray(plain.read_bytes())
    header = _nifti_header_big_endian(bytes(data[:348]))
    body = np.frombuffer(bytes(data[352:]), dtype="<i2").astype(">i2").tobytes()
    big = tmp_path / "big.nii.gz"
    big.write_bytes(gzip.compress(header + bytes(data[348:352]) + body))
    voxels, _ = read_image_voxels(big)
    assert voxels.dtype.byteorder in ("=", "<", "|") and np.array_equal(voxels, arr)
    assert np.array_equal(voxels, sitk.GetArrayViewFromImage(sitk.ReadImage(str(big))))


def _nifti_header_big_endian(header: bytes) -> bytes:
    """A little-endian NIfTI-1 header rewritten field by field in big-endian order."""
    fields = [("i", 0), ("10s", 4), ("18s", 14), ("i", 32), ("h", 36), ("c", 38), ("c", 39), ("8h", 40),
              ("3f", 56), ("h", 68), ("h", 70), ("h", 72), ("h", 74), ("8f", 76), ("f", 108), ("f", 112),
              ("f", 116), ("h", 120), ("c", 122), ("c", 123), ("f", 124), ("f", 128), ("f", 132), ("f", 136),
              ("i", 140), ("i", 144), ("80s", 148), ("24s", 228), ("h", 252), ("h", 254), ("3f", 256),
              ("3f", 268), ("4f", 280), ("4f", 296), ("4f", 312), ("16s", 328), ("4s", 344)]
    out = bytearray(348)
    for fmt, at in fields:
        struct.pack_into(">" + fmt, out, at, *struct.unpack_from("<" + fmt, header, at))
    return bytes(out)


@pytest.mark.parametrize("vox_offset", [0.0, -8.0, 348.0])
def test_a_vox_offset_inside_the_header_is_read_like_simpleitk(tmp_path, vox_offset):
    """The NIfTI library starts the voxels no earlier than the header's end whatever vox_offset says: the same
    voxels here (shifted ones, silently, if the offset were taken as given)."""
    arr = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    path = written(tmp_path, oblique_image(arr), "a.nii.gz", vox_offset=vox_offset)
    assert_same_image(read_image(path), sitk.ReadImage(str(path)))


def test_bitpix_smaller_than_the_datatype_is_one_line(tmp_path):
    """bitpix says 8 bits, datatype int16: the library reads by datatype, so the file is short; one line."""
    data = bytearray(written(tmp_path, oblique_image(np.ones((3, 4, 5), np.int16)), "a.nii").read_bytes())
    struct.pack_into("<h", data, 72, 8)
    path = tmp_path / "b.nii"
    path.write_bytes(bytes(data[:-20]))
    with pytest.raises(LNMError, match="truncated"):
        read_image(path)


@pytest.mark.parametrize("make", ["2d", "4d", "vector"])
def test_other_layouts_are_left_to_simpleitk(tmp_path, make):
    base = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    img = {"2d": lambda: sitk.GetImageFromArray(base[0]),
           "4d": lambda: sitk.JoinSeries([sitk.GetImageFromArray(base), sitk.GetImageFromArray(base + 1)]),
           "vector": lambda: sitk.GetImageFromArray(np.stack([base, -base], axis=-1), isVector=True)}[make]()
    path = tmp_path / "a.nii.gz"
    sitk.WriteImage(img, str(path))
    assert_same_image(read_image(path), sitk.ReadImage(str(path)))


@pytest.mark.parametrize("version, order", [(1, ">"), (1, "<"), (2, "<")])
def test_big_endian_and_nifti2_files(tmp_path, version, order):
    """Big-endian voxels are read like SimpleITK reads them; NIfTI-2, which SimpleITK cannot read, stays one
    clear line naming the user's file (not the temporary copy the fallback read)."""
    nib = pytest.importorskip("nibabel")
    arr = np.random.default_rng(1).normal(size=(6, 7, 5)).astype(order + "f4")
    c, s = np.cos(0.4), np.sin(0.4)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0.0], [0.0, 0.0, -1.0], [s, c, 0.0]]) @ np.diag([0.8, 0.9, 2.5])
    affine[:3, 3] = (10.0, -20.0, 30.0)
    image_class = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    nii = image_class(arr, affine)
    nii.header.set_data_dtype(np.dtype(order + "f4"))
    nii.header.set_slope_inter(1.0, 0.0)
    path = tmp_path / "a.nii.gz"
    nib.save(nii, str(path))
    if version == 2:
        with pytest.raises(LNMError, match=f"^{path}: SimpleITK cannot read it") as error:
            read_image(path)
        assert ".lnm_read_" not in str(error.value)
        return
    ours = read_image(path)
    assert_same_image(ours, sitk.ReadImage(str(path)))
    assert np.array_equal(sitk.GetArrayViewFromImage(ours), arr.astype("=f4").transpose(2, 1, 0))


@pytest.mark.parametrize("shape", [(2, 3, 4), (40, 50, 60)])
def test_the_checked_content_is_the_decompressed_file(tmp_path, shape):
    """Up to the voxels' end, whether the voxels fit in the first bytes read or come in several chunks."""
    path = tmp_path / "a.nii.gz"
    sitk.WriteImage(oblique_image(np.arange(np.prod(shape), dtype=np.int16).reshape(shape)), str(path))
    whole = gzip.decompress(path.read_bytes())
    assert len(whole) == 352 + 2 * np.prod(shape)
    assert _checked_content(path, gzipped=True)[1].tobytes() == whole


# 80 x 120 x 120 float32: 4.6 MB, two chunks of reading; voxel 1048623 is the second chunk's first
@pytest.mark.parametrize("shape, at", [((2, 3, 4), 0), ((2, 3, 4), 23), ((80, 120, 120), 0), ((80, 120, 120), 46),
                                       ((80, 120, 120), 1048622), ((80, 120, 120), 1048623),
                                       ((80, 120, 120), 80 * 120 * 120 - 1)])
@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
def test_every_nan_is_counted_wherever_it_lies(tmp_path, shape, at, ending):
    """In the header's first read, across chunk boundaries, in the last voxel."""
    arr = np.zeros(shape, dtype=np.float32)
    arr.flat[at] = np.nan
    arr.flat[(at + 7) % arr.size] = np.inf
    path = tmp_path / f"a{ending}"
    sitk.WriteImage(oblique_image(arr), str(path))
    with pytest.raises(LNMError, match=r": 2 NaN/Inf voxel\(s\)"):
        read_image(path)


def test_no_temporary_folder_is_not_blamed_on_the_file(tmp_path, monkeypatch):
    """No temporary folder for SimpleITK's own read of a scaled file: it is still checked and read from itself."""
    arr = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    path = written(tmp_path, oblique_image(arr), "a.nii.gz", slope=2.0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    calls = []
    img = read_checked_nifti(path, recording_read(calls))
    assert [c[0] for c in calls] == [path] and np.array_equal(sitk.GetArrayViewFromImage(img), arr * 2.0)
    path.write_bytes(path.read_bytes()[:-40])       # the check still runs on the fallback path
    with pytest.raises(LNMError, match="damaged or truncated"):
        read_image(path)


def test_a_header_announcing_more_voxels_than_memory_is_one_line(tmp_path):
    """A damaged header's dims (here 2^15 x 2^15 x 2^15 int64: 256 TiB) cannot be allocated: one line naming the
    file, never a MemoryError; dims that fit in memory but not in the file: truncated."""
    img = oblique_image(np.zeros((4, 5, 6), dtype=np.int64))
    for dims, message in [((32767, 32767, 32767), "more than this machine can hold"), ((6, 5, 40), "truncated")]:
        plain = tmp_path / "p.nii"
        sitk.WriteImage(img, str(plain))
        data = bytearray(plain.read_bytes())
        struct.pack_into("<4h", data, 40, 3, *dims)
        path = tmp_path / "a.nii.gz"
        path.write_bytes(gzip.compress(bytes(data)))
        with pytest.raises(LNMError, match=message) as e:
            read_image(path)
        assert str(path) in str(e.value)


def _with_bytes_changed(tmp_path, change) -> Path:
    plain = tmp_path / "p.nii"
    sitk.WriteImage(oblique_image(np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)), str(plain))
    data = change(bytearray(plain.read_bytes()))
    path = tmp_path / "a.nii.gz"
    path.write_bytes(data if data[:2] == b"\x1f\x8b" else gzip.compress(bytes(data)))
    return path


def test_a_gzip_stream_whose_checksum_fails_is_refused(tmp_path):
    """gzip checks its CRC when the stream ends, in the read that returns the last voxels."""
    def flip_crc(data):
        packed = bytearray(gzip.compress(bytes(data)))
        packed[-8] ^= 0xFF           # the trailer's CRC-32; every voxel byte is intact
        return packed
    with pytest.raises(LNMError, match="damaged or truncated"):
        read_image_voxels(_with_bytes_changed(tmp_path, flip_crc))


def test_voxels_after_header_extensions_and_before_trailing_bytes(tmp_path):
    """vox_offset past the first 540 bytes read (an extension block) and bytes after the voxels: SimpleITK's
    voxels, untouched by either."""
    def extend(data):
        struct.pack_into("<f", data, 108, 1024.0)
        return data[:348] + b"\0" * (1024 - 348) + data[352:] + b"trailing bytes"
    path = _with_bytes_changed(tmp_path, extend)
    voxels, _ = read_image_voxels(path)
    assert np.array_equal(voxels, sitk.GetArrayViewFromImage(sitk.ReadImage(str(path))))
    assert np.array_equal(voxels, np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6))


@pytest.mark.parametrize("vox_offset", [float("nan"), float("inf"), 1e20])
def test_a_damaged_vox_offset_is_one_line(tmp_path, vox_offset):
    def damage(data):
        struct.pack_into("<f", data, 108, vox_offset)
        return data
    path = _with_bytes_changed(tmp_path, damage)
    with pytest.raises(LNMError, match="not a NIfTI file") as e:
        read_image_voxels(path)
    assert str(path) in str(e.value)
