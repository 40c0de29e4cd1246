"""Small helpers shared across the package."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def merge_nested(base: dict, overrides: dict) -> dict:
    """A deep copy of ``base`` with ``overrides`` merged in; nested dicts merge key by key."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_nested(merged[key], value)
        else:
            merged[key] = value
    return merged


def write_atomic(path: str | Path, write: Callable[[str], None]) -> None:
    """``write(temporary_path)`` beside ``path``, then rename over it: an interrupted or failed write never
    leaves a partial file at ``path`` (nor replaces what was there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_json_atomic(path: str | Path, payload: object, indent: int | None = None,
                      default: Callable[[object], object] | None = None) -> None:
    """``payload`` as JSON (UTF-8) at ``path``, written through ``write_atomic``; ``default`` as ``json.dump``'s."""

    def dump(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as stream:
            json.dump(payload, stream, indent=indent, default=default)

    write_atomic(path, dump)
