"""Writing files so that a crash leaves the old file or none, never half a file: write into a
private temp folder beside the target, flush, then rename. Temp folders name their host and
process, so a later run can clear those a killed process left behind."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medseg.errors import InputError

__all__ = ["atomic_path", "write_text_atomic", "remove_stale_temp", "refuse_existing"]


_TEMP_PREFIX = ".medseg-tmp-"


def _temp_prefix() -> str:
    # Host and process in the name: a later run can tell its own crashed temp folders from
    # those of a live process (another shard may be writing into the same output folder).
    return f"{_TEMP_PREFIX}{socket.gethostname()}-{os.getpid()}-"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a path with ``path``'s own name inside a private temp folder beside it; once the
    writer is done, move what it wrote onto ``path``.

    A crash mid-write leaves the old file (or none) in place, never a half-written one. The
    writer sees the final file name, so a format that writes a header plus a data file
    (``.mhd`` + ``.zraw``, ``.nhdr`` + ``.raw.gz``) names its data file after the final name; the
    data files move first and the header last. Files are flushed to disk (fsync) before the
    move, and are created by the writer itself, so they get the umask's permissions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=_temp_prefix(), dir=path.parent))
    try:
        yield folder / path.name
        written = sorted(folder.iterdir(), key=lambda p: p.name == path.name)  # the main file last
        if path.name not in {p.name for p in written}:
            raise OSError(f"{path}: the writer created no file")
        for item in written:
            _fsync(item)
        for item in written:
            os.replace(item, path.parent / item.name)
        _fsync(path.parent)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temp(folder: str | Path) -> int:
    """Delete temp folders that crashed (killed) medseg processes of this host left under
    ``folder``; returns how many. Those of live processes and other hosts are left alone."""
    removed = 0
    host = f"{_TEMP_PREFIX}{socket.gethostname()}-"
    for temp in Path(folder).rglob(f"{_TEMP_PREFIX}*"):
        pid = temp.name[len(host) :].split("-")[0] if temp.name.startswith(host) else ""
        if temp.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(temp, ignore_errors=True)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return pid != 0


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def refuse_existing(*paths: str | Path, overwrite: bool = False) -> None:
    """Nothing is replaced unless asked: the first of ``paths`` that exists is an error, unless
    ``overwrite``.

    Raises:
        InputError: naming that file.
    """
    for path in [] if overwrite else paths:
        if Path(path).exists():
            raise InputError(
                path, "already exists; pass --overwrite (overwrite=True in Python) to replace it"
            )
