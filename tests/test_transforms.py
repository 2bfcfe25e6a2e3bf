import numpy as np
import SimpleITK as sitk
import torch

import medseg.data.cache as cache_module
from medseg.config import load_config
from medseg.data.cache import cached_dataset
from medseg.data.datasets import find_cases
from medseg.data.plan import Plan, fingerprint, make_plan
from medseg.data.transforms import INDICES, eval_transforms, train_transforms
from medseg.training.sampling import SeededSamples


def _plan(dataset) -> Plan:
    return make_plan(fingerprint(find_cases(dataset)), levels=2, patch_size=[24, 24, 8])


def test_random_steps_share_the_cached_volume_and_never_change_it(tiny_dataset, monkeypatch):
    copies = []
    monkeypatch.setattr("monai.data.dataset.deepcopy", lambda item: copies.append(item) or item)
    plan = _plan(tiny_dataset)
    plan.samples_per_volume = 1  # the plan owns it (plan_for_config folds data.samples_per_volume in)
    config = load_config(None, [])
    cases = find_cases(tiny_dataset).training[:1]
    data = cached_dataset(cases, train_transforms(config, plan, num_classes=4), plan)
    cached = data._cache[0]
    before = cached["image"].clone()
    assert all(cached[INDICES][c].numel() > 0 for c in range(4))  # indices made once, cached

    centres = []
    samples = SeededSamples(data, seed=0)
    for index in range(40):
        (sample,) = samples[index]
        assert INDICES not in sample  # the indices stay in the cache, out of the batch
        assert tuple(sample["image"].shape[1:]) == (24, 24, 8)
        centres.append(int(sample["label"][0, 12, 12, 4]))
    assert copies == []  # no deep copy of the volume per sample
    assert data._cache[0] is cached and torch.equal(cached["image"], before)
    # Patches are class-balanced: every class is at the centre of some of them.
    assert set(centres) == {0, 1, 2, 3}


def test_the_body_crop_crops_and_never_pads(tmp_path):
    # A body that fills the whole field of view: the crop's margin must not pad beyond it.
    rng = np.random.default_rng(0)
    array = rng.uniform(100, 200, size=(20, 16, 6)).astype(np.float32)
    image = sitk.GetImageFromArray(array.transpose())
    label = sitk.GetImageFromArray(np.zeros((20, 16, 6), np.uint8).transpose())
    plan = Plan(spacing=[1.0, 1.0, 1.0], patch_size=[8, 8, 4], strides=[[2, 2, 2]])
    out = eval_transforms(plan)({"image": image, "label": label})
    assert tuple(out["image"].shape[1:]) == (20, 16, 6)

    # A small body is cropped to it, with its margin of 4 voxels.
    array[:] = rng.uniform(1, 5, size=array.shape)  # air: dim noise
    array[8:12, 6:10, 2:4] = rng.uniform(100, 200, size=(4, 4, 2))
    out = eval_transforms(plan)({"image": sitk.GetImageFromArray(array.transpose()), "label": label})
    assert tuple(out["image"].shape[1:]) == (12, 12, 6)


def test_disk_cache_hashes_each_file_once_and_keeps_volumes_in_memory(tiny_dataset, tmp_path, monkeypatch):
    hashed = []
    original = cache_module.hashlib.file_digest
    monkeypatch.setattr(
        cache_module.hashlib,
        "file_digest",
        lambda handle, digest: hashed.append(handle.name) or original(handle, digest),
    )
    plan = _plan(tiny_dataset)
    cases = find_cases(tiny_dataset).training[:2]
    data = cached_dataset(cases, eval_transforms(plan), plan, "disk", tmp_path / "cache")
    for _ in range(3):
        shapes = [tuple(data[i]["image"].shape) for i in range(len(cases))]
    assert len(hashed) == 4  # two cases, an image and a label each, hashed once
    assert len(shapes) == 2 and all(len(s) == 4 for s in shapes)
