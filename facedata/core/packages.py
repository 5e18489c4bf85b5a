"""Files that installed registry packages ship (model weights, sample photos), found without
importing the package: some build sessions or load data at import time."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from facedata.core.errors import UserError


def package_dir(name: str) -> Path:
    """The folder of an installed package; a one-line UserError when it is not installed."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {name!r} is not installed; run `make setup`")
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    """Where facedata keeps what it builds once per machine (e.g. the int8 face parser):
    FACEDATA_CACHE, else ~/.cache/facedata."""
    return Path(os.environ.get("FACEDATA_CACHE") or Path.home() / ".cache" / "facedata").expanduser()
