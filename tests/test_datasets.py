import json
import shutil

import pytest

from medseg.data.datasets import find_cases, label_names, median_spacing, split_cases
from medseg.errors import InputError


def test_msd_dataset_json(tiny_dataset):
    dataset = find_cases(tiny_dataset)
    assert [c["id"] for c in dataset.training] == ["heart_000", "heart_001", "heart_002"]
    assert all(c["label"].endswith(".nii.gz") for c in dataset.training)
    assert dataset.labels == {0: "background", 1: "LV", 2: "myocardium", 3: "RV"}
    assert len(dataset.test) == 2


def test_folder_layout_without_json(tiny_dataset, tmp_path):
    root = tmp_path / "plain"
    shutil.copytree(tiny_dataset / "imagesTr", root / "imagesTr")
    shutil.copytree(tiny_dataset / "labelsTr", root / "labelsTr")
    dataset = find_cases(root)
    assert len(dataset.training) == 3
    assert label_names(dataset) == {0: "background", 1: "class_1", 2: "class_2", 3: "class_3"}
    (root / "labelsTr" / "heart_001.nii.gz").unlink()
    with pytest.raises(InputError, match="no label named heart_001"):
        find_cases(root)


def test_missing_listed_file_is_named(tiny_dataset, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_dataset, root)
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][0]["label"] = "./labelsTr/gone.nii.gz"
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError) as info:
        find_cases(root)
    assert info.value.path.endswith("gone.nii.gz")


def test_not_a_dataset(tmp_path):
    with pytest.raises(InputError, match="no dataset.json and no imagesTr"):
        find_cases(tmp_path)
    with pytest.raises(InputError, match="no such dataset folder"):
        find_cases(tmp_path / "nope")


def test_split_is_seeded_and_disjoint():
    cases = [{"id": f"c{i}"} for i in range(10)]
    train, val = split_cases(cases, 0.2, seed=3)
    assert len(val) == 2 and len(train) == 8
    assert not {c["id"] for c in train} & {c["id"] for c in val}
    assert split_cases(cases, 0.2, seed=3) == (train, val)


def test_median_spacing_is_in_ras_axis_order(tiny_dataset):
    # Every tiny case has 4.4 x 4.4 x 10 mm voxels, whatever its orientation.
    assert median_spacing(find_cases(tiny_dataset).training) == pytest.approx([4.4, 4.4, 10.0], abs=1e-3)
