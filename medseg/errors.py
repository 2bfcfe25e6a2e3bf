"""Errors a user can act on. The CLI prints them as one line, with no traceback."""

from __future__ import annotations

from pathlib import Path

__all__ = ["MedsegError", "InputError", "ConfigError", "CheckpointError", "find_medseg_error", "first_line"]


class MedsegError(Exception):
    """Base class for expected failures: bad input, bad config, bad checkpoint.

    Args:
        where: what the problem is about: a file, or a setting such as ``model.name`` or
            ``--tolerance`` (may be None).
        message: what is wrong, in one line.
    """

    def __init__(self, where: str | Path | None, message: str):
        self.where = None if where is None else str(where)
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class InputError(MedsegError):
    """An image, label or dataset that cannot be read or does not fit the task."""


class ConfigError(MedsegError):
    """An unknown or invalid configuration key or value."""


class CheckpointError(MedsegError):
    """A checkpoint that is missing, unreadable or incompatible."""


def find_medseg_error(exc: BaseException) -> MedsegError | None:
    """The MedsegError behind ``exc``, if any.

    MONAI re-raises errors from inside a transform as ``RuntimeError("applying transform ...")``;
    the one-line error the user should see is further down the chain.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MedsegError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def first_line(exc: BaseException) -> str:
    """The first line of a library's error message, or its type's name if it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
