import hashlib
import shutil
from pathlib import Path

import pytest

import medseg.data.transforms as transforms_module
from medseg.data.cache import cached_dataset, content_hash, plan_key
from medseg.data.datasets import find_cases
from medseg.data.plan import fingerprint, make_plan
from medseg.data.transforms import eval_transforms
from medseg.errors import ConfigError


def test_a_case_key_is_the_sha256_of_its_files_bytes_so_caches_outlive_versions(tiny_dataset):
    case = find_cases(tiny_dataset).training[0]
    by_hand = hashlib.sha256()
    for key in ("image", "label"):
        by_hand.update(key.encode() + Path(case[key]).read_bytes())
    assert content_hash(case) == by_hand.hexdigest().encode()
    assert content_hash({"image": case["image"]}) != content_hash(case)


def test_disk_cache_survives_runs_and_notices_changes(tiny_dataset, tmp_path, monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    cases = find_cases(root).training[:2]
    plan = make_plan(fingerprint(find_cases(root)))
    first = [
        item["image"].shape
        for item in cached_dataset(cases, eval_transforms(plan), plan, "disk", tmp_path / "c")
    ]
    assert len(list((tmp_path / "c" / plan_key(plan)).glob("*.pt"))) == 2

    # A second run reads nothing from the source files: reading them now would fail.
    def no_reading(*args, **kwargs):
        raise AssertionError("read a source file although it was cached")

    monkeypatch.setattr(transforms_module, "read_volume", no_reading)
    again = [
        item["image"].shape
        for item in cached_dataset(cases, eval_transforms(plan), plan, "disk", tmp_path / "c")
    ]
    assert again == first

    # A changed file has another key, so it is preprocessed afresh.
    before = content_hash(cases[0])
    shutil.copy(root / "labelsTr" / "heart_002.nii.gz", cases[0]["label"])
    assert content_hash(cases[0]) != before
    with pytest.raises(RuntimeError) as info:  # MONAI wraps what the transform raised
        cached_dataset(cases, eval_transforms(plan), plan, "disk", tmp_path / "c")[0]
    chain, error = [], info.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any("read a source file although it was cached" in str(e) for e in chain)  # it re-read


def test_plan_changes_the_key(tiny_dataset):
    plan = make_plan(fingerprint(find_cases(tiny_dataset)))
    other = make_plan(fingerprint(find_cases(tiny_dataset)), spacing=[5.0, 5.0, 10.0])
    assert plan_key(plan) != plan_key(other)


def test_unknown_cache_kind(tiny_dataset):
    plan = make_plan(fingerprint(find_cases(tiny_dataset)))
    with pytest.raises(ConfigError, match="must be one of memory, disk, none"):
        cached_dataset([], eval_transforms(plan), plan, "ssd")
