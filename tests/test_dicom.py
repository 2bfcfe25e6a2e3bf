import numpy as np
import pytest

from medseg.data.phantom import make_phantom
from medseg.dicom import find_series, write_dicom_seg
from medseg.errors import InputError
from medseg.io import read_volume, to_array
from tests.conftest import write_dicom_series


@pytest.mark.parametrize("orientation", ["ras", "lps", "oblique"])
def test_series_reads_back_with_its_geometry(tmp_path, orientation):
    image, _ = make_phantom(1, shape=(30, 28, 8), spacing=(3.1, 3.3, 9.0), orientation=orientation)
    back = read_volume(write_dicom_series(image, tmp_path / "series"), spatial_dims=3)
    assert back.GetSize() == image.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(to_array(back), to_array(image))


def test_missing_slice_is_reported(tmp_path):
    image, _ = make_phantom(2, shape=(20, 20, 8), spacing=(4.0, 4.0, 8.0))
    folder = write_dicom_series(image, tmp_path / "gap", skip=(4,))
    with pytest.raises(InputError) as info:
        read_volume(folder)
    assert info.value.where == str(folder)
    assert (
        "misses 1 slice(s): a 16.00 mm gap after slice 4 of 7 where the spacing is 8.00 mm"
        in info.value.message
    )


def test_uneven_spacing_is_reported(tmp_path):
    image, _ = make_phantom(2, shape=(20, 20, 8), spacing=(4.0, 4.0, 8.0))
    folder = write_dicom_series(image, tmp_path / "uneven", nudge={5: 2.5})
    with pytest.raises(InputError, match=r"uneven slice spacing \(5.50 to 10.50 mm\)"):
        read_volume(folder)


def test_several_series_in_one_folder(tmp_path):
    image, _ = make_phantom(3, shape=(16, 16, 6), spacing=(5.0, 5.0, 10.0))
    write_dicom_series(image, tmp_path / "study", uid="1.2.3.4.5", description="T1 cine")
    write_dicom_series(image, tmp_path / "study", uid="1.2.3.4.6", description="LGE/../../x")
    series = find_series(tmp_path)
    assert sorted(s.uid for s in series) == ["1.2.3.4.5", "1.2.3.4.6"]
    assert sorted(s.name for s in series) == ["LGE_.._.._x_1.2.3.4.6", "T1_cine_1.2.3.4.5"]
    assert all("/" not in s.name for s in series)
    with pytest.raises(InputError, match="holds 2 DICOM series"):
        read_volume(tmp_path / "study")
    assert read_volume(tmp_path / "study", series_uid="1.2.3.4.6").GetSize() == (16, 16, 6)


def test_folder_without_dicom(tmp_path):
    with pytest.raises(InputError, match="holds no DICOM series"):
        read_volume(tmp_path)


@pytest.mark.parametrize("orientation", ["lps", "oblique"])
def test_dicom_seg_round_trip_lines_up_with_source_slices(tmp_path, orientation):
    hd = pytest.importorskip("highdicom")
    import pydicom

    image, label = make_phantom(6, shape=(30, 28, 8), spacing=(3.1, 3.3, 9.0), orientation=orientation)
    series = find_series(write_dicom_series(image, tmp_path / "series"))[0]
    mask = to_array(label)
    out = write_dicom_seg(
        mask, series, {0: "background", 1: "LV", 2: "myocardium", 3: "RV"}, tmp_path / "seg.dcm"
    )

    seg = hd.seg.segread(out)
    assert [seg.get_segment_description(i).segment_label for i in (1, 2, 3)] == ["LV", "myocardium", "RV"]
    sources = [pydicom.dcmread(f) for f in series.files]
    frames = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[s.SOPInstanceUID for s in sources], combine_segments=True, relabel=False
    )
    for k, source in enumerate(sources):
        # slice k of the volume is source file k; its frame must hold exactly that slice's labels
        np.testing.assert_array_equal(frames[k], mask[:, :, k].T)
        position = [float(v) for v in source.ImagePositionPatient]
        assert position == pytest.approx(image.TransformIndexToPhysicalPoint((0, 0, k)), abs=1e-3)
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    with pytest.raises(InputError, match="already exists"):
        write_dicom_seg(mask, series, {1: "LV"}, out)
