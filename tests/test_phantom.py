import numpy as np
import SimpleITK as sitk

from medseg.data.phantom import LABELS, make_dataset, make_phantom
from medseg.io import to_array


def _volumes_ml(label):
    voxel_ml = np.prod(label.GetSpacing()) / 1000
    counts = np.bincount(to_array(label).ravel(), minlength=4)
    return counts[1:] * voxel_ml


def test_phantom_is_deterministic_and_has_every_class():
    image_a, label_a = make_phantom(5)
    image_b, label_b = make_phantom(5)
    np.testing.assert_array_equal(to_array(image_a), to_array(image_b))
    assert set(np.unique(to_array(label_a))) == set(LABELS)
    assert image_a.GetPixelID() == sitk.sitkInt16
    spacing = image_a.GetSpacing()
    assert spacing[2] > 2 * spacing[0]  # anisotropic, like a cardiac stack


def test_anatomy_does_not_depend_on_grid_orientation():
    # Same seed, same anatomy: structure volumes agree whatever the grid's orientation.
    ras = _volumes_ml(make_phantom(2, orientation="ras")[1])
    lps = _volumes_ml(make_phantom(2, orientation="lps")[1])
    np.testing.assert_allclose(ras, lps, rtol=0.02)
    assert 40 < ras[0] < 200  # LV blood pool in mL, a plausible adult size


def test_orientations_have_the_expected_directions():
    assert make_phantom(0, orientation="lps")[0].GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    assert make_phantom(0, orientation="ras")[0].GetDirection() == (-1, 0, 0, 0, -1, 0, 0, 0, 1)
    oblique = np.array(make_phantom(0, orientation="oblique")[0].GetDirection()).reshape(3, 3)
    assert np.abs(oblique).max() < 0.999
    np.testing.assert_allclose(oblique @ oblique.T, np.eye(3), atol=1e-9)


def test_make_dataset_writes_msd_layout(tmp_path):
    folder = make_dataset(tmp_path / "d", n_train=2, n_test=1, shape=(16, 16, 6), spacing=(8.0, 8.0, 16.0))
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == ["heart_000.nii.gz", "heart_001.nii.gz"]
    assert (folder / "labelsTs" / "heart_002.nii.gz").is_file()
    assert '"LV"' in (folder / "dataset.json").read_text()


def test_variety_widens_how_cases_differ():
    """variety=3 (the pretraining study's hard set): noisier cases, contrasts and hearts that
    differ more from case to case; variety=1 is the default phantom, draw for draw."""
    np.testing.assert_array_equal(to_array(make_phantom(3, variety=1.0)[0]), to_array(make_phantom(3)[0]))

    def stats(variety):
        noise, contrast, lv_ml = [], [], []
        for seed in range(6):
            image, label = make_phantom(seed, shape=(64, 64, 20), spacing=(2.7, 2.7, 6.5), variety=variety)
            pixels, labels = to_array(image).astype(float), to_array(label)
            lv = pixels[labels == 1]
            noise.append(lv.std() / lv.mean())
            contrast.append(pixels[labels == 2].mean() / lv.mean())
            lv_ml.append(_volumes_ml(label)[0])
        return np.median(noise), np.std(contrast), np.std(lv_ml) / np.mean(lv_ml)

    plain, hard = stats(1.0), stats(3.0)
    assert hard[0] > 1.6 * plain[0]  # noise within the blood pool (2.1x)
    assert hard[1] > 2 * plain[1]  # myocardium-to-blood contrast, across cases (3.2x)
    assert hard[2] > 2 * plain[2]  # LV volume, across cases (2.9x)
