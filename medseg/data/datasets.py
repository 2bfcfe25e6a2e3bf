"""Find the cases of a dataset. Every layout reduces to a list of
``{"image": path, "label": path | None, "id": str}`` dicts, as MONAI's dict transforms expect.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medseg.errors import InputError
from medseg.io import case_id, is_volume_file, read_volume

__all__ = [
    "Dataset",
    "find_cases",
    "list_volumes",
    "split_cases",
    "median_spacing",
    "label_names",
    "parse_label_map",
    "read_label_map",
]


@dataclass
class Dataset:
    """The cases of one dataset.

    Args:
        training: labelled cases for training and validation.
        test: cases kept for testing (labels optional).
        labels: class index -> name, background included.
    """

    training: list[dict]
    test: list[dict] = field(default_factory=list)
    labels: dict[int, str] = field(default_factory=dict)


def list_volumes(folder: str | Path) -> list[Path]:
    """The volume files in a folder, sorted by name (hidden and temp files skipped)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if is_volume_file(p) and not p.name.startswith("."))


def find_cases(root: str | Path) -> Dataset:
    """Read a dataset folder: an MSD ``dataset.json``, or ``imagesTr``/``labelsTr`` folders.

    Args:
        root: the dataset folder.

    Raises:
        InputError: the folder is missing, has no known layout, or a listed file is missing.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "no such dataset folder")
    if (root / "dataset.json").is_file():
        return _from_msd_json(root / "dataset.json")
    if (root / "imagesTr").is_dir():
        return _from_folders(root)
    raise InputError(root, "no dataset.json and no imagesTr/ folder: not a dataset medseg knows")


def _from_msd_json(path: Path) -> Dataset:
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not valid JSON ({exc})") from None
    labels = parse_label_map(meta.get("labels", {}), path)

    def case(entry) -> dict:
        entry = {"image": entry} if isinstance(entry, str) else dict(entry)
        if "image" not in entry:
            raise InputError(path, f"entry without 'image': {entry}")
        image = _resolve(path.parent, entry["image"], path)
        label = _resolve(path.parent, entry["label"], path) if entry.get("label") else None
        return {"image": image, "label": label, "id": case_id(image)}

    training = [case(e) for e in meta.get("training", [])]
    if not training:
        raise InputError(path, "lists no training cases")
    missing = [c["image"] for c in training if c["label"] is None]
    if missing:
        raise InputError(missing[0], "training case has no label")
    return Dataset(training, [case(e) for e in meta.get("test", [])], labels)


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


def _resolve(base: Path, name: str, source: Path) -> str:
    path = (base / name).resolve()
    if not path.exists():
        raise InputError(path, f"listed in {source.name} but missing")
    return str(path)


def _from_folders(root: Path) -> Dataset:
    def pair(images: Path, labels: Path, need_labels: bool) -> list[dict]:
        if not images.is_dir():
            return []
        label_files = {case_id(p): p for p in list_volumes(labels)} if labels.is_dir() else {}
        cases = []
        for image in list_volumes(images):
            cid = case_id(image).removesuffix("_0000")
            label = label_files.pop(cid, None)
            if label is None and need_labels:
                raise InputError(image, f"no label named {cid}.* in {labels}")
            cases.append({"image": str(image), "label": str(label) if label else None, "id": cid})
        if label_files:
            orphan = next(iter(label_files.values()))
            raise InputError(orphan, "label has no matching image")
        return cases

    training = pair(root / "imagesTr", root / "labelsTr", need_labels=True)
    if not training:
        raise InputError(root / "imagesTr", "holds no images")
    test = pair(root / "imagesTs", root / "labelsTs", need_labels=False)
    return Dataset(training, test, {})


def split_cases(cases: list[dict], val_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded split into (train, validation); at least one of each when there are two cases."""
    if len(cases) < 2 or val_fraction <= 0:
        return list(cases), []
    shuffled = sorted(cases, key=lambda c: c["id"])
    random.Random(seed).shuffle(shuffled)
    n_val = min(len(cases) - 1, max(1, round(val_fraction * len(cases))))
    return shuffled[n_val:], shuffled[:n_val]


def median_spacing(cases: list[dict]) -> list[float]:
    """Median voxel spacing along the R, A, S axes (after reorientation), from headers only."""
    spacings = []
    for case in cases:
        reader = sitk.ImageFileReader()
        reader.SetFileName(case["image"])
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise InputError(case["image"], "cannot read the image header") from None
        affine = np.eye(4)
        affine[:3, :3] = np.asarray(reader.GetDirection()).reshape(3, 3)
        ras_axis = nib.orientations.io_orientation(affine)[:, 0].astype(int)
        spacing = np.empty(3)
        spacing[ras_axis] = reader.GetSpacing()
        spacings.append(spacing)
    return [round(float(s), 4) for s in np.median(np.asarray(spacings), axis=0)]


def label_names(dataset: Dataset) -> dict[int, str]:
    """Class index -> name: the dataset's own map, or ``class_N`` up to the largest label found."""
    if dataset.labels:
        return dict(sorted(dataset.labels.items()))
    largest = 0
    for case in dataset.training:
        largest = max(largest, int(sitk.GetArrayFromImage(read_volume(case["label"])).max()))
    return {0: "background", **{c: f"class_{c}" for c in range(1, largest + 1)}}


def read_label_map(path: str | Path) -> dict[int, str]:
    """The label map in a JSON file: a dataset.json (its ``labels``) or a bare map."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not valid JSON ({exc})") from None
    return parse_label_map(meta.get("labels", meta) if isinstance(meta, dict) else meta, path)
