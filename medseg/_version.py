"""The version, in one place: the package, ``pyproject.toml`` (dynamic) and what medseg writes
into its outputs all read it from here."""

__version__ = "0.1.0"
