"""Small helpers shared across the package."""

from __future__ import annotations

import copy


def merge_nested(base: dict, overrides: dict) -> dict:
    """A deep copy of ``base`` with ``overrides`` merged in; nested dicts merge key by key."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_nested(merged[key], value)
        else:
            merged[key] = value
    return merged
