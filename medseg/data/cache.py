"""Datasets that keep preprocessed volumes: in memory for one run, or on disk across runs.

On disk, an entry is keyed by the bytes of the case's files and by the plan (and medseg's
version), so a changed file or plan is preprocessed again and nothing stale is served. Either
way a volume is prepared (or read from the disk cache) once, kept in memory, and shared with
the random steps, which never change it in place.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from monai.data import CacheDataset, PersistentDataset
from monai.data import Dataset as PlainDataset
from monai.transforms import Compose, Randomizable

from medseg.data.plan import Plan
from medseg.errors import ConfigError
from medseg.io import image_files

__all__ = ["CACHE_KINDS", "default_cache_dir", "content_hash", "plan_key", "cached_dataset"]

CACHE_KINDS = ("memory", "disk", "none")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/medseg`` (``~/.cache/medseg`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medseg"


def content_hash(case: dict) -> bytes:
    """A key for one case from the bytes of its image and label files (every file of a DICOM folder)."""
    digest = hashlib.sha256()
    for key in ("image", "label"):
        for source in image_files(case[key]) if case.get(key) else []:
            digest.update(key.encode())
            source = Path(source)
            files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
            for path in files:
                with open(path, "rb") as handle:
                    # Feeds the running digest (the callable hands it over), so keys stay those
                    # that earlier versions wrote.
                    hashlib.file_digest(handle, lambda: digest)
    return digest.hexdigest().encode()


def plan_key(plan: Plan) -> str:
    """A short key for everything that shapes the preprocessed volumes."""
    from medseg._version import __version__

    text = json.dumps({"plan": plan.to_dict(), "version": __version__}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_dataset(cases: list[dict], transform, plan: Plan, kind: str = "memory", cache_dir=None):
    """A MONAI dataset that runs the deterministic head of ``transform`` once per case.

    Args:
        cases: case dicts.
        transform: the pipeline (deterministic steps first, as medseg builds them).
        plan: the plan the pipeline follows (part of the disk key).
        kind: ``memory`` (this run only), ``disk`` (kept across runs) or ``none``.
        cache_dir: where ``disk`` keeps its files; default ``default_cache_dir()``.
    """
    if kind == "memory":
        return CacheDataset(cases, transform, progress=False, copy_cache=False)
    if kind == "disk":
        folder = Path(cache_dir or default_cache_dir()) / plan_key(plan)
        folder.mkdir(parents=True, exist_ok=True)
        head, tail = _split_at_first_random(transform)
        # Hash each case's files once, not on every access as PersistentDataset would.
        keys = {id(case): content_hash(case) for case in cases}
        on_disk = PersistentDataset(cases, head, cache_dir=folder, hash_func=lambda case: keys[id(case)])
        return PlainDataset([on_disk[i] for i in range(len(cases))], tail)
    if kind == "none":
        return PlainDataset(cases, transform)
    raise ConfigError("data.cache", f"must be one of {', '.join(CACHE_KINDS)}, not {kind!r}")


def _split_at_first_random(transform: Compose) -> tuple[Compose, Compose]:
    """The deterministic head of a pipeline (what is cached) and the rest."""
    steps = list(transform.transforms)
    first = next((i for i, step in enumerate(steps) if isinstance(step, Randomizable)), len(steps))
    return Compose(steps[:first]), Compose(steps[first:])
