"""Find the cases of a dataset. Every layout reduces to a list of
``{"image": path, "label": path | None, "id": str}`` dicts, as MONAI's dict transforms expect.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm.auto import tqdm

from medseg.errors import ConfigError, InputError
from medseg.files import ChannelGroup, case_id, channel_groups, is_volume_file
from medseg.io import check_voxel_values, grid_mismatch, image_files, read_channels, read_volume

__all__ = [
    "Cases",
    "find_cases",
    "list_volumes",
    "split_cases",
    "fold_splits",
    "read_splits",
    "given_cases",
    "unlabeled_cases",
    "split_for_run",
    "refuse_bad_cases",
    "label_names",
    "parse_label_map",
    "read_label_map",
    "check_cases",
]

log = logging.getLogger(__name__)


@dataclass
class Cases:
    """The cases of one dataset.

    Args:
        training: labelled cases for training and validation.
        test: cases kept for testing (labels optional).
        labels: class index -> name, background included.
        modality: of the first channel, from dataset.json's ``modality`` or ``channel_names``;
            None when nothing says (``medseg.data.plan.resolve_modality`` then looks).
        unlabeled: cases with images only, for pretraining (``imagesUn/``, or dataset.json's
            ``unlabeled`` list).
    """

    training: list[dict]
    test: list[dict] = field(default_factory=list)
    labels: dict[int, str] = field(default_factory=dict)
    modality: str | None = None
    unlabeled: list[dict] = field(default_factory=list)

    @property
    def all_images(self) -> list[dict]:
        """Every case with an image: training, test and unlabelled (for pretraining)."""
        return [*self.training, *self.test, *self.unlabeled]


def list_volumes(folder: str | Path) -> list[Path]:
    """The volume files in a folder, sorted by name (hidden and temp files skipped)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if is_volume_file(p) and not p.name.startswith("."))


def find_cases(root: str | Path, need_labels: bool = True) -> Cases:
    """Read a dataset in any layout medseg knows.

    - an MSD folder: ``dataset.json`` listing ``training`` (and ``test``) cases;
    - an nnU-Net raw folder: ``imagesTr/CASE_0000.nii.gz`` + ``labelsTr/CASE.nii.gz`` (and
      ``imagesTs``/``labelsTs``), label names from its ``dataset.json`` if there is one;
    - plain ``images/`` + ``labels/`` folders matched by case name;

    In ``imagesTr/`` or ``images/``, a sub-folder holding a DICOM series is a case named after
    the folder (its label is ``labels/<folder>.nii.gz``). A 4D image file is a multi-channel case.
    - a CSV manifest with columns ``image,label[,id]`` (paths relative to the CSV; rows without a
      label are test cases).

    Unlabelled images, for pretraining, are ``imagesUn/`` or dataset.json's ``unlabeled`` list.

    Args:
        root: the dataset folder or CSV file.
        need_labels: False for pretraining: a dataset of unlabelled images only is fine.

    Raises:
        InputError: the folder is missing, has no known layout, or a listed file is missing.
    """
    root = Path(root)
    if root.is_file() and root.suffix.lower() == ".csv":
        return _from_csv(root, need_labels)
    if not root.is_dir():
        raise InputError(root, "no such dataset folder")
    meta_path = root / "dataset.json"
    meta = _read_json(meta_path) if meta_path.is_file() else {}
    unlabeled = _pair(root / "imagesUn", root / "labelsUn", need_labels=False)
    if meta.get("training") or meta.get("unlabeled"):
        dataset = _from_msd_json(meta_path, meta, need_labels)
        dataset.unlabeled += unlabeled
        return dataset
    labels = parse_label_map(meta["labels"], meta_path) if "labels" in meta else {}
    for images, label_dir, test_images, test_labels in (
        ("imagesTr", "labelsTr", "imagesTs", "labelsTs"),
        ("images", "labels", None, None),
    ):
        if (root / images).is_dir():
            training = _pair(root / images, root / label_dir, need_labels=True)
            if not training and need_labels:
                raise InputError(root / images, "holds no images")
            test = _pair(root / test_images, root / test_labels, need_labels=False) if test_images else []
            return Cases(training, test, labels, _modality(meta), unlabeled)
    if unlabeled and not need_labels:
        return Cases([], [], labels, _modality(meta), unlabeled)
    raise InputError(root, "no dataset.json, imagesTr/ or images/ here: not a dataset layout medseg knows")


def _modality(meta: dict) -> str | None:
    channels = meta.get("modality") or meta.get("channel_names") or {}
    first = next(iter(channels.values()), None) if isinstance(channels, dict) else None
    return str(first).upper() if first else None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not valid JSON ({exc})") from None


def _from_msd_json(path: Path, meta: dict, need_labels: bool = True) -> Cases:
    labels = parse_label_map(meta.get("labels", {}), path)

    absent: list[str] = []  # every listed file that is missing, named together at the end

    def case(entry) -> dict:
        entry = {"image": entry} if isinstance(entry, str) else dict(entry)
        if "image" not in entry:
            raise InputError(path, f"entry without 'image': {entry}")
        image = _resolve(path.parent, entry["image"], absent)
        label = _resolve(path.parent, entry["label"], absent) if entry.get("label") else None
        return {"image": image, "label": label, "id": case_id(image)}

    training = [case(e) for e in meta.get("training", [])]
    test = [case(e) for e in meta.get("test", [])]
    unlabeled = [dict(case(e), label=None) for e in meta.get("unlabeled", [])]
    if absent:
        for missing_file in absent:
            log.error("%s: listed in %s but missing", missing_file, path.name)
        if len(absent) == 1:
            raise InputError(absent[0], f"listed in {path.name} but missing")
        raise InputError(path, f"lists {len(absent)} files that are missing (named above)")
    if not training and need_labels:
        raise InputError(path, "lists no training cases")
    missing = [c["image"] for c in training if c["label"] is None]
    if missing:
        raise InputError(missing[0], "training case has no label")
    return Cases(training, test, labels, _modality(meta), unlabeled)


def parse_label_map(raw: dict, source: str | Path) -> dict[int, str]:
    """Class index -> name from a JSON label map.

    MSD writes ``{"0": "background"}`` and nnU-Net v2 ``{"background": 0}``; both are accepted.
    """
    if not isinstance(raw, dict):
        raise InputError(source, f"the label map must be a JSON object, not {type(raw).__name__}")
    try:
        if all(str(k).isdigit() for k in raw):
            return {int(k): str(v) for k, v in raw.items()}
        return {int(v): str(k) for k, v in raw.items()}
    except (TypeError, ValueError):
        raise InputError(source, f"cannot read the label map {raw}") from None


def _resolve(base: Path, name: str, absent: list[str]) -> str:
    """The absolute path of a listed file; a missing one is added to ``absent``."""
    path = (base / name).resolve()
    if not path.exists():
        absent.append(str(path))
    return str(path)


def _pair(images: Path, labels: Path | None, need_labels: bool) -> list[dict]:
    """Match images to labels by case name. nnU-Net's channel files ``CASE_0000``, ``CASE_0001``,
    ... form one case whose ``image`` is the list of them, in channel order, by the rule
    prediction uses too (``medseg.files.channel_groups``)."""
    if not images.is_dir():
        return []
    label_files = {case_id(p): p for p in list_volumes(labels)} if labels and labels.is_dir() else {}
    groups = {}
    for group in channel_groups(list_volumes(images), labelled=set(label_files) or None):
        if group.id in groups:
            raise InputError(group.files[0], f"case {group.id} is also {groups[group.id].files[0].name}")
        groups[group.id] = group
    for folder in _series_folders(images):
        if folder.name in groups:
            raise InputError(folder, f"case {folder.name} is both a file and a DICOM folder")
        groups[folder.name] = ChannelGroup(folder.name, (folder,))
    cases = []
    for cid, group in groups.items():
        if group.problem:
            raise InputError(group.files[0], f"case {cid}: {group.problem}")
        label = label_files.pop(cid, None)
        if label is None and need_labels:
            raise InputError(group.files[0], f"no label named {cid}.* in {labels}")
        files = group.files
        image = [str(f) for f in files] if len(files) > 1 else str(files[0])
        cases.append({"image": image, "label": str(label) if label else None, "id": cid})
    if label_files:
        raise InputError(next(iter(label_files.values())), "label has no matching image")
    counts = {len(image_files(c["image"])) for c in cases}
    if len(counts) > 1:
        raise InputError(images, f"cases have different numbers of channels: {sorted(counts)}")
    return cases


def _series_folders(images: Path) -> list[Path]:
    """Sub-folders of an images folder: each holds one case as a DICOM series."""
    return sorted(p for p in images.iterdir() if p.is_dir() and not p.name.startswith("."))


def _from_csv(path: Path, need_labels: bool = True) -> Cases:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "image" not in rows[0]:
        raise InputError(path, "needs a header with an 'image' column (and 'label', optionally 'id')")
    training, test = [], []
    for row in rows:
        image = _resolve(path.parent, row["image"], path)
        label = _resolve(path.parent, row["label"], path) if row.get("label") else None
        case = {"image": image, "label": label, "id": row.get("id") or case_id(image)}
        (training if label else test).append(case)
    if not training and need_labels:
        raise InputError(path, "lists no case with a label")
    return Cases(training, test, {})


def unlabeled_cases(source: str | Path, dataset: Cases) -> list[dict]:
    """The images of ``train.unlabeled``: ``dataset`` (the dataset's own ``imagesUn/`` or
    dataset.json's ``unlabeled`` list), a folder of image files and DICOM series (channel files
    grouped as for training), or a CSV with an ``image`` column.

    Raises:
        InputError: nothing there to train on, or a file that cannot be a case.
    """
    if str(source) == "dataset":
        if not dataset.unlabeled:
            raise InputError(
                "train.unlabeled", "the dataset has no imagesUn/ nor a dataset.json 'unlabeled' list"
            )
        return [{"image": c["image"], "id": c["id"]} for c in dataset.unlabeled]
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        found = _from_csv(source, need_labels=False).all_images
    elif source.is_dir():
        found = _pair(source, None, need_labels=False)
    else:
        raise InputError(source, "no such folder or CSV of unlabelled images")
    if not found:
        raise InputError(source, "holds no images")
    return [{"image": c["image"], "id": c["id"]} for c in found]


def given_cases(cases, need_labels: bool = True) -> list[dict]:
    """Cases handed in from Python, checked: each needs an ``image`` and (unless not
    ``need_labels``) a ``label``; a missing ``id`` is taken from the image's file name, and ids
    must be unique."""
    out = []
    for case in cases:
        if not isinstance(case, dict) or not case.get("image") or (need_labels and not case.get("label")):
            raise InputError(str(case)[:120], "a training case needs an 'image' and a 'label'")
        out.append({"id": case_id(image_files(case["image"])[0]), **case})
    ids = [c["id"] for c in out]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise InputError(twice[0], f"case id given {ids.count(twice[0])} times; ids must be unique")
    return out


def split_cases(cases: list[dict], val_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded split into (train, validation); at least one of each when there are two cases."""
    if len(cases) < 2 or val_fraction <= 0:
        return list(cases), []
    shuffled = sorted(cases, key=lambda c: c["id"])
    random.Random(seed).shuffle(shuffled)
    n_val = min(len(cases) - 1, max(1, round(val_fraction * len(cases))))
    return shuffled[n_val:], shuffled[:n_val]


def fold_splits(cases: list[dict], folds: int, seed: int) -> list[dict[str, list[str]]]:
    """Seeded k-fold cross-validation: ``[{"train": [ids], "val": [ids]}, ...]``, one per fold.

    Every case validates in exactly one fold; fold sizes differ by at most one.
    """
    if not 2 <= folds <= len(cases):
        raise ConfigError("data.folds", f"needs 2 to {len(cases)} folds for {len(cases)} cases, not {folds}")
    ids = sorted(c["id"] for c in cases)
    random.Random(seed).shuffle(ids)
    held_out = [sorted(ids[k::folds]) for k in range(folds)]
    return [{"train": sorted(set(ids) - set(val)), "val": val} for val in held_out]


def split_for_run(
    cases: list[dict], data, seed: int, saved: dict | None = None
) -> tuple[list, list, list | None]:
    """(train, validation, folds) as ``data`` (a ``DataConfig``) asks: fold ``data.fold`` of
    ``data.folds`` folds (all of them returned, to be saved), else a ``data.val_fraction``
    hold-out (folds None).

    ``saved`` is the content of ``data.splits``: a run's own split (``train``, ``val``, and
    ``folds`` and ``fold`` if it was a fold) is taken as it is, cases it lacks left out; a
    folds file's folds (or another fold's) are kept, and cases they lack join the smallest
    folds. Without it the split is drawn, seeded by ``seed``.
    """
    if data.folds and not 0 <= data.fold < data.folds:
        raise ConfigError("data.fold", f"must be 0 to {data.folds - 1}, not {data.fold}")
    if saved is not None:
        return _saved_split(cases, data, saved)
    if not data.folds:
        return *split_cases(cases, data.val_fraction, seed), None
    folds = fold_splits(cases, data.folds, seed)
    return _fold(cases, folds, data.fold)


def _fold(cases: list[dict], folds: list[dict], fold: int) -> tuple[list, list, list]:
    val_ids = set(folds[fold]["val"])
    train = [c for c in cases if c["id"] not in val_ids]
    return train, [c for c in cases if c["id"] in val_ids], folds


def read_splits(path: str | Path) -> dict:
    """A ``splits.json``, checked to hold ``train`` and ``val`` lists of case ids or ``folds``."""
    saved = _read_json(Path(path))
    own = isinstance(saved, dict) and all(isinstance(saved.get(k), list) for k in ("train", "val"))
    folds = isinstance(saved, dict) and isinstance(saved.get("folds"), list)
    if not (own or folds) or (folds and not all(isinstance(f, dict) and "val" in f for f in saved["folds"])):
        raise InputError(path, "is not a splits.json: it needs 'train' and 'val' lists, or 'folds'")
    return saved


def _saved_split(cases: list[dict], data, saved: dict) -> tuple[list, list, list | None]:
    source = data.splits
    by_id = {c["id"]: c for c in cases}
    this_fold = not data.folds or saved.get("fold", data.fold) == data.fold
    if "train" in saved and this_fold:
        listed = [*saved["train"], *saved["val"]]
        _refuse_gone(listed, by_id, source)
        left_out = sorted(set(by_id) - set(listed))
        if left_out:
            log.warning(
                "%d case(s) not in %s are left out (%s); start a new run to train on them",
                len(left_out),
                source,
                ", ".join(left_out[:5]) + (", ..." if len(left_out) > 5 else ""),
            )
        folds = saved.get("folds")
        return [by_id[i] for i in saved["train"]], [by_id[i] for i in saved["val"]], folds
    if not data.folds or "folds" not in saved:
        raise ConfigError(
            "data.splits", f"{source} holds another fold's split and no 'folds' to take fold {data.fold} from"
        )
    if len(saved["folds"]) != data.folds:
        raise ConfigError("data.folds", f"is {data.folds}, but {source} holds {len(saved['folds'])} folds")
    held_out = [list(f["val"]) for f in saved["folds"]]
    _refuse_gone([i for val in held_out for i in val], by_id, source)
    known = {i for val in held_out for i in val}
    for new in sorted(set(by_id) - known):  # a new case joins the smallest fold; no other moves
        min(held_out, key=len).append(new)
    folds = [{"train": sorted(set(by_id) - set(val)), "val": sorted(val)} for val in held_out]
    return _fold(cases, folds, data.fold)


def _refuse_gone(listed: list[str], by_id: dict, source) -> None:
    gone = [i for i in listed if i not in by_id]
    if gone:
        raise InputError(
            source,
            f"lists {len(gone)} case(s) the dataset no longer has ({', '.join(gone[:3])}); "
            "restore them, or start a new split without data.splits",
        )


def label_names(dataset: Cases, source: str | Path = "the dataset") -> dict[int, str]:
    """Class index -> name: the dataset's own map, or ``class_N`` up to the largest label found.

    Raises:
        InputError: the map's classes are not 0, 1, 2, ... without a gap (the network's outputs
            are the classes in order, so a map {0, 1, 2, 4} has no output for 4).
    """
    if dataset.labels:
        classes = sorted(dataset.labels)
        if classes != list(range(len(classes))):
            raise InputError(
                source,
                f"the label map numbers its classes {', '.join(map(str, classes))}; training needs "
                "0, 1, 2, ... without a gap: renumber the label files and the map",
            )
        return dict(sorted(dataset.labels.items()))
    found: set[int] = set()
    for case in dataset.training:
        found |= set(np.unique(sitk.GetArrayFromImage(read_volume(case["label"]))).tolist())
    largest = int(max(found, default=0))
    absent = sorted(set(range(1, largest + 1)) - found)
    if absent:
        log.warning("label value(s) %s occur in no label file; trained as empty classes", absent)
    return {0: "background", **{c: f"class_{c}" for c in range(1, largest + 1)}}


def read_label_map(path: str | Path) -> dict[int, str]:
    """The label map in a JSON file: a dataset.json (its ``labels``) or a bare map."""
    meta = _read_json(Path(path))
    return parse_label_map(meta.get("labels", meta) if isinstance(meta, dict) else meta, path)


def check_cases(cases: list[dict], labels: dict[int, str]) -> list[tuple[str, str]]:
    """Find the cases that would spoil training, before it starts.

    Checks that every image and label reads in full and that no image is wholly NaN (caught
    here, not in the loader's threads or an hour into training), that each label lies on its
    image's grid (size, spacing, origin, direction) and that it holds only values the label
    map names.

    Returns:
        ``(file, problem)`` for every problem found (empty when all is well).
    """
    problems = []
    for case in tqdm(cases, desc="checking cases", unit="case", disable=None, leave=False):
        files = image_files(case["image"])
        try:
            channels = [read_channels(f)[0] for f in files]
            for f, channel in zip(files, channels):
                check_voxel_values(channel, f)  # an all-NaN scan, named here with the rest
            label = read_volume(case["label"]) if case.get("label") else None
        except InputError as exc:
            problems.append((exc.where, exc.message))
            continue
        image = channels[0]
        off_grid = [(f, grid_mismatch(c, image)) for f, c in zip(files[1:], channels[1:])]
        if label is not None:
            off_grid.append((case["label"], grid_mismatch(label, image)))
        off_grid = [(f, why) for f, why in off_grid if why]
        if off_grid:
            problems += [(f, f"{why} of its image {files[0]}") for f, why in off_grid]
            continue
        if label is None:
            continue
        extra = sorted(set(np.unique(sitk.GetArrayFromImage(label)).tolist()) - set(labels))
        if extra:
            known = ", ".join(str(k) for k in sorted(labels))
            problems.append(
                (case["label"], f"holds label values {extra} that the label map ({known}) does not name")
            )
    return problems


def refuse_bad_cases(cases: list[dict], labels: dict[int, str], source) -> None:
    """Log every unusable case as its own error, then raise if there were any, so all problems
    are named at once, before any time goes into training."""
    problems = check_cases(cases, labels)
    for path, problem in problems:
        log.error("%s: %s", path, problem)
    if problems:
        raise InputError(source, f"{len(problems)} training case(s) cannot be used (listed above)")
