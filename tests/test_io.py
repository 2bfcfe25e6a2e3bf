import gzip

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.data.phantom import make_phantom
from medseg.errors import InputError
from medseg.files import case_id
from medseg.io import image_from_ras, ras_affine, read_volume, to_array, write_vectors, write_volume


@pytest.fixture
def oblique_image():
    image, _ = make_phantom(1, shape=(20, 18, 6), spacing=(1.5, 1.7, 4.0), orientation="oblique")
    return image


@pytest.mark.parametrize("pixel", [sitk.sitkInt16, sitk.sitkFloat32])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_truncated_files_are_caught_in_every_format(tmp_path, oblique_image, suffix, pixel):
    whole = tmp_path / f"whole{suffix}"
    sitk.WriteImage(sitk.Cast(oblique_image, pixel), str(whole), useCompression=suffix != ".nii")
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    with pytest.raises(InputError, match="truncated"):
        read_volume(cut)


def test_whole_nifti_files_with_integer_voxels_are_read_once(tmp_path, oblique_image, monkeypatch):
    """Their header and length vouch for them; nibabel reads the data only to look for NaN."""
    import nibabel as nib

    reads = []
    get_unscaled = nib.arrayproxy.ArrayProxy.get_unscaled
    monkeypatch.setattr(
        nib.arrayproxy.ArrayProxy, "get_unscaled", lambda self: reads.append(1) or get_unscaled(self)
    )
    for pixel, suffix, second_reads in [
        (sitk.sitkInt16, ".nii.gz", 0),
        (sitk.sitkUInt8, ".nii", 0),
        (sitk.sitkFloat32, ".nii.gz", 1),  # nibabel's is the only read (next test)
    ]:
        path = tmp_path / f"image{suffix}"
        sitk.WriteImage(sitk.Cast(oblique_image, pixel), str(path))
        reads.clear()
        assert read_volume(path).GetSize() == oblique_image.GetSize()
        assert len(reads) == second_reads, (pixel, suffix)


@pytest.mark.parametrize("pixel", [sitk.sitkFloat32, sitk.sitkFloat64])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_float_nifti_files_are_decoded_once_with_itks_grid_and_their_nans(
    tmp_path, oblique_image, monkeypatch, suffix, pixel
):
    """nibabel alone decodes them (it keeps NaN, which ITK reads as 0); the image is what ITK
    reads, voxel for voxel and on the same grid, but for the NaN."""
    path = tmp_path / f"image{suffix}"
    sitk.WriteImage(sitk.Cast(oblique_image, pixel), str(path))
    by_itk = sitk.ReadImage(str(path))
    monkeypatch.setattr(sitk, "ReadImage", lambda *a, **k: pytest.fail("ITK decoded a float NIfTI"))
    image = read_volume(path)
    assert image.GetPixelID() == by_itk.GetPixelID()
    assert image.GetSize() == by_itk.GetSize() and image.GetSpacing() == by_itk.GetSpacing()
    np.testing.assert_allclose(image.GetOrigin(), by_itk.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(image.GetDirection(), by_itk.GetDirection(), atol=1e-9)
    np.testing.assert_array_equal(to_array(image), to_array(by_itk))
    monkeypatch.undo()

    array = to_array(by_itk).copy()
    array[3, 4, 2] = np.nan
    write_volume(array, tmp_path / f"nan{suffix}", by_itk)
    assert np.isnan(to_array(read_volume(tmp_path / f"nan{suffix}"))[3, 4, 2])


def test_a_nifti_gzipped_in_two_members_is_whole(tmp_path, oblique_image):
    """gzip's trailer then records only the last member's length; the full read settles it."""
    whole = tmp_path / "whole.nii"
    sitk.WriteImage(sitk.Cast(oblique_image, sitk.sitkInt16), str(whole))
    raw = whole.read_bytes()
    two = tmp_path / "two.nii.gz"
    two.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    np.testing.assert_array_equal(to_array(read_volume(two)), to_array(read_volume(whole)))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_write_keeps_the_reference_grid(tmp_path, oblique_image, suffix):
    mask = (to_array(oblique_image) > 500).astype(np.uint8)
    path = write_volume(mask, tmp_path / f"m{suffix}", oblique_image)
    back = read_volume(path)
    assert back.GetSize() == oblique_image.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), oblique_image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(back.GetOrigin(), oblique_image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), oblique_image.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(to_array(back), mask)
    assert [p.name for p in tmp_path.iterdir()] == [f"m{suffix}"]  # no temp file left behind


def test_write_refuses_to_overwrite(tmp_path, oblique_image):
    mask = np.zeros(oblique_image.GetSize(), np.uint8)
    write_volume(mask, tmp_path / "m.nii.gz", oblique_image)
    with pytest.raises(InputError, match="already exists"):
        write_volume(mask, tmp_path / "m.nii.gz", oblique_image)
    write_volume(mask + 1, tmp_path / "m.nii.gz", oblique_image, overwrite=True)
    assert to_array(read_volume(tmp_path / "m.nii.gz")).min() == 1


def test_write_rejects_a_shape_off_the_grid(tmp_path, oblique_image):
    with pytest.raises(InputError, match="does not match the grid"):
        write_volume(np.zeros((3, 3, 3), np.uint8), tmp_path / "m.nii.gz", oblique_image)


def test_ras_affine_round_trip(oblique_image):
    affine = ras_affine(oblique_image)
    # RAS = LPS with x and y negated: voxel (0,0,0) sits at the origin with those signs flipped.
    np.testing.assert_allclose(affine[:3, 3], np.array(oblique_image.GetOrigin()) * [-1, -1, 1])
    back = image_from_ras(to_array(oblique_image), affine)
    np.testing.assert_allclose(back.GetDirection(), oblique_image.GetDirection(), atol=1e-9)
    np.testing.assert_allclose(back.GetSpacing(), oblique_image.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(back.GetOrigin(), oblique_image.GetOrigin(), atol=1e-9)
    np.testing.assert_array_equal(to_array(back), to_array(oblique_image))


def test_case_id():
    assert case_id("/a/b/heart_001.nii.gz") == "heart_001"
    assert case_id("x.mha") == "x"


def test_bad_files_give_one_line_errors(tmp_path, oblique_image):
    good = tmp_path / "good.nii.gz"
    sitk.WriteImage(oblique_image, str(good))
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    text = tmp_path / "notes.nii"
    text.write_text("this is not an image\n" * 50)
    cases = {
        tmp_path / "missing.nii.gz": "no such file",
        truncated: "file is truncated",
        empty: "file is empty",
        text: "not an image",
    }
    for path, reason in cases.items():
        with pytest.raises(InputError) as info:
            read_volume(path)
        assert info.value.where == str(path)
        assert reason in info.value.message
        assert "\n" not in str(info.value)
    (tmp_path / "scan.txt").write_text("x")
    with pytest.raises(InputError, match="unknown format"):
        read_volume(tmp_path / "scan.txt")
    assert read_volume(good).GetSize() == oblique_image.GetSize()
    assert gzip.open(good).read(4)  # the good file stays readable


@pytest.mark.parametrize("suffix,data", [(".mhd", ".zraw"), (".nhdr", ".raw.gz")])
def test_header_and_data_formats_leave_no_temp_named_files(tmp_path, oblique_image, suffix, data):
    mask = (to_array(oblique_image) > 500).astype(np.uint8)
    for overwrite in (False, True):
        write_volume(mask, tmp_path / f"m{suffix}", oblique_image, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"m{suffix}", f"m{data}"])
    header = (tmp_path / f"m{suffix}").read_text(errors="replace")
    assert f"m{data}" in header and ".medseg-tmp" not in header  # it names its data file's final name
    np.testing.assert_array_equal(to_array(read_volume(tmp_path / f"m{suffix}")), mask)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_vectors_are_written_on_the_reference_grid(tmp_path, oblique_image, suffix):
    """Class probabilities (i, j, k, classes): NIfTI goes through nibabel, the rest through
    SimpleITK; both must read back as the same values on the same oblique grid."""
    values = np.random.default_rng(0).random((*oblique_image.GetSize(), 3)).astype(np.float32)
    path = write_vectors(values, tmp_path / f"p{suffix}", oblique_image)
    back = sitk.ReadImage(str(path))
    assert back.GetNumberOfComponentsPerPixel() == 3
    assert back.GetSize() == oblique_image.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), oblique_image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(back.GetOrigin(), oblique_image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), oblique_image.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(to_array(back), values)
    with pytest.raises(InputError, match="already exists"):
        write_vectors(values, path, oblique_image)
