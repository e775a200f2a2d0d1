"""The NIfTI check-and-read: one decompression, and exactly what SimpleITK itself reads."""
from __future__ import annotations

import io
import tempfile

import numpy as np
import pytest
import SimpleITK as sitk

from lnm_auto.datasets.nifti import check_nifti_file, read_checked_nifti
from lnm_auto.datasets.raw_dataset import read_image, sitk_read
from lnm_auto.utils.errors import LNMError


def oblique_image(arr: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.9, 2.5))
    img.SetOrigin((-12.5, 30.0, 101.25))
    c, s = np.cos(0.3), np.sin(0.3)
    img.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    return img


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.float64, np.uint32])
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


def test_gzipped_copy_is_complete_and_removed(tmp_path, monkeypatch):
    """The check writes the decompressed file for SimpleITK to read, and nothing is left behind."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    path = tmp_path / "a.nii.gz"
    sitk.WriteImage(oblique_image(np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)), str(path))
    copy = io.BytesIO()
    assert check_nifti_file(path, copy_to=copy) is True
    import gzip
    assert copy.getvalue() == gzip.decompress(path.read_bytes())
    seen = []
    read_checked_nifti(path, lambda f, shown_as=None: seen.append((f, shown_as, f.is_file())))
    assert seen[0][0].parent == tmp_path / "tmp" and seen[0][1] == path and seen[0][2]
    assert list((tmp_path / "tmp").iterdir()) == []


class FullDisk(io.RawIOBase):
    def write(self, b):
        raise OSError(28, "No space left on device")


def test_a_failing_copy_is_not_blamed_on_the_file(tmp_path, monkeypatch):
    """Disk full while copying, or no temporary folder at all: the file is still checked and read from itself."""
    path = tmp_path / "a.nii.gz"
    arr = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    sitk.WriteImage(oblique_image(arr), str(path))
    assert check_nifti_file(path, copy_to=FullDisk()) is False
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    read = []
    img = read_checked_nifti(path, lambda f, shown_as=None: read.append(f) or sitk_read(f, shown_as))
    assert read == [path] and np.array_equal(sitk.GetArrayViewFromImage(img), arr)
    path.write_bytes(path.read_bytes()[:-40])       # the check still runs on the fallback path
    with pytest.raises(LNMError, match="damaged or truncated"):
        read_image(path)
