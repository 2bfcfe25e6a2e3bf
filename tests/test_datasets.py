import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.config import DataConfig, load_config
from medseg.data.datasets import check_cases, find_cases, fold_splits, label_names, split_cases, split_for_run
from medseg.errors import ConfigError, InputError
from medseg.training.trainer import Trainer


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
    assert info.value.where.endswith("gone.nii.gz")


def test_not_a_dataset(tmp_path):
    with pytest.raises(InputError, match="no dataset.json, imagesTr/ or images/ here"):
        find_cases(tmp_path)
    with pytest.raises(InputError, match="no such dataset folder"):
        find_cases(tmp_path / "nope")


def test_split_is_seeded_and_disjoint():
    cases = [{"id": f"c{i}"} for i in range(10)]
    train, val = split_cases(cases, 0.2, seed=3)
    assert len(val) == 2 and len(train) == 8
    assert not {c["id"] for c in train} & {c["id"] for c in val}
    assert split_cases(cases, 0.2, seed=3) == (train, val)


def test_plain_images_and_labels_folders(tiny_dataset, tmp_path):
    shutil.copytree(tiny_dataset / "imagesTr", tmp_path / "images")
    shutil.copytree(tiny_dataset / "labelsTr", tmp_path / "labels")
    dataset = find_cases(tmp_path)
    assert [c["id"] for c in dataset.training] == ["heart_000", "heart_001", "heart_002"]
    assert dataset.test == []


def test_nnunet_layout_with_channel_suffix_and_label_names(tiny_dataset, tmp_path):
    (tmp_path / "imagesTr").mkdir()
    shutil.copytree(tiny_dataset / "labelsTr", tmp_path / "labelsTr")
    for image in (tiny_dataset / "imagesTr").iterdir():
        shutil.copy(image, tmp_path / "imagesTr" / image.name.replace(".nii.gz", "_0000.nii.gz"))
    (tmp_path / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "LV": 1, "myo": 2, "RV": 3}})
    )
    dataset = find_cases(tmp_path)
    assert dataset.training[0]["id"] == "heart_000"
    assert dataset.labels == {0: "background", 1: "LV", 2: "myo", 3: "RV"}
    shutil.copy(
        tmp_path / "imagesTr" / "heart_000_0000.nii.gz", tmp_path / "imagesTr" / "heart_000_0001.nii.gz"
    )
    with pytest.raises(InputError, match=r"different numbers of channels: \[1, 2\]"):
        find_cases(tmp_path)


def test_csv_manifest(tiny_dataset, tmp_path):
    manifest = tmp_path / "cases.csv"
    rows = ["image,label,id"]
    rows += [
        f"{tiny_dataset}/imagesTr/heart_00{k}.nii.gz,{tiny_dataset}/labelsTr/heart_00{k}.nii.gz,p{k}"
        for k in range(3)
    ]
    rows += [f"{tiny_dataset}/imagesTs/heart_003.nii.gz,,"]
    manifest.write_text("\n".join(rows) + "\n")
    dataset = find_cases(manifest)
    assert [c["id"] for c in dataset.training] == ["p0", "p1", "p2"]
    assert [c["id"] for c in dataset.test] == ["heart_003"]
    (tmp_path / "bad.csv").write_text("file\nx.nii.gz\n")
    with pytest.raises(InputError, match="needs a header with an 'image' column"):
        find_cases(tmp_path / "bad.csv")


def test_check_cases_names_every_bad_case(tiny_dataset, tmp_path):
    root = tmp_path / "mixed"
    shutil.copytree(tiny_dataset, root)
    cases = find_cases(root).training
    labels = {0: "background", 1: "LV", 2: "myocardium", 3: "RV"}
    assert check_cases(cases, labels) == []
    # heart_000: the label sits on another grid; heart_001: the label holds an unnamed value;
    # heart_002: the image is truncated.
    shifted = sitk.ReadImage(cases[0]["label"])
    shifted.SetOrigin([v + 5.0 for v in shifted.GetOrigin()])
    sitk.WriteImage(shifted, cases[0]["label"])
    odd = sitk.ReadImage(cases[1]["label"])
    array = sitk.GetArrayFromImage(odd)
    array[0, 0, 0] = 7
    sitk.WriteImage(_with_array(odd, array), cases[1]["label"])
    image_bytes = open(cases[2]["image"], "rb").read()
    open(cases[2]["image"], "wb").write(image_bytes[: len(image_bytes) // 3])

    problems = dict(check_cases(cases, labels))
    assert problems[cases[0]["label"]].startswith("origin")
    assert "differs from the origin" in problems[cases[0]["label"]]
    assert (
        problems[cases[1]["label"]] == "holds label values [7] that the label map (0, 1, 2, 3) does not name"
    )
    assert "truncated" in problems[cases[2]["image"]]


def _with_array(reference, array):
    image = sitk.GetImageFromArray(np.asarray(array))
    image.CopyInformation(reference)
    return image


def _ids(*names):
    return [{"id": n, "image": f"{n}.nii.gz", "label": f"{n}_seg.nii.gz"} for n in names]


def test_saved_folds_keep_every_case_where_it_was_when_one_is_added():
    data = DataConfig(folds=3, fold=1, splits="splits.json")
    cases = _ids(*"abcdef")
    folds = fold_splits(cases, 3, seed=0)
    grown = _ids(*"abcdefg")
    # drawn afresh, one more case reshuffles the folds; taken from the saved file, it does not
    assert fold_splits(grown, 3, seed=0) != folds
    train, val, kept = split_for_run(grown, data, 0, saved={"folds": folds})
    for before, after in zip(folds, kept):
        assert set(before["val"]) <= set(after["val"])
    assert sorted(i for f in kept for i in f["val"]) == list("abcdefg")  # g joined one fold
    assert [c["id"] for c in val] == kept[1]["val"]
    assert {c["id"] for c in train} == set("abcdefg") - set(kept[1]["val"])
    with pytest.raises(ConfigError, match="is 4, but splits.json holds 3 folds"):
        split_for_run(grown, DataConfig(folds=4, splits="splits.json"), 0, saved={"folds": folds})


def test_a_runs_own_split_is_taken_as_it_is():
    data = DataConfig(splits="run/splits.json")
    saved = {"train": ["b", "c"], "val": ["a"]}
    train, val, folds = split_for_run(_ids(*"abcd"), data, 0, saved=saved)  # d is new: left out
    assert [c["id"] for c in train] == ["b", "c"] and [c["id"] for c in val] == ["a"] and folds is None
    with pytest.raises(
        InputError, match=r"run/splits.json: lists 1 case\(s\) the dataset no longer has \(c\)"
    ):
        split_for_run(_ids("a", "b"), data, 0, saved=saved)


def test_resume_and_every_fold_use_the_saved_split(tiny_dataset, tmp_path):
    ids = sorted(c["id"] for c in find_cases(tiny_dataset).training)
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": ids[2:], "val": ids[:2]}))  # a draw would hold out one
    config = load_config(None, [f"data.root={tiny_dataset}", f"train.output_dir={tmp_path / 'run'}"])
    config.data.splits = str(splits)
    assert [c["id"] for c in Trainer(config).val_cases] == ids[:2]
    # cross-validation: the first fold writes the shared folds file, the others take theirs from it
    shared = tmp_path / "cv" / "splits.json"

    def fold_run(fold):
        cv = load_config(
            None, [f"data.root={tiny_dataset}", f"train.output_dir={tmp_path / 'cv' / str(fold)}"]
        )
        cv.data.folds, cv.data.fold, cv.data.splits = 3, fold, str(shared)
        trainer = Trainer(cv)
        trainer._write_run_files()
        return trainer

    fold_run(0)
    drawn = json.loads(shared.read_text())["folds"]
    assert sorted(i for f in drawn for i in f["val"]) == ids
    reversed_folds = [{"train": [], "val": f["val"]} for f in reversed(drawn)]  # not what a draw gives
    shared.write_text(json.dumps({"folds": reversed_folds}))
    assert [c["id"] for c in fold_run(1).val_cases] == drawn[1]["val"]
    assert [c["id"] for c in fold_run(2).val_cases] == drawn[0]["val"]
    run = json.loads((tmp_path / "cv" / "2" / "splits.json").read_text())
    assert run["val"] == drawn[0]["val"] and run["fold"] == 2


def test_a_label_map_with_a_gap_is_refused_in_one_line(tiny_dataset, tmp_path, caplog):
    root = tmp_path / "gap"
    shutil.copytree(tiny_dataset, root)
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {"0": "background", "1": "LV", "2": "myocardium", "4": "RV"}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError) as error:
        label_names(find_cases(root), root)
    assert str(error.value) == (
        f"{root}: the label map numbers its classes 0, 1, 2, 4; training needs 0, 1, 2, ... without a gap: "
        "renumber the label files and the map"
    )
    # without a map, a value no label file holds is still a class, and the log says so
    del meta["labels"]
    (root / "dataset.json").write_text(json.dumps(meta))
    for case in find_cases(root).training:
        label = sitk.ReadImage(case["label"])
        array = sitk.GetArrayFromImage(label)
        array[array == 3] = 4
        sitk.WriteImage(_with_array(label, array), case["label"])
    assert label_names(find_cases(root)) == {
        0: "background",
        1: "class_1",
        2: "class_2",
        3: "class_3",
        4: "class_4",
    }
    assert "label value(s) [3] occur in no label file" in caplog.text
