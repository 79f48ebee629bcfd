"""Nested dicts (configs, settings) flattened to dotted keys."""

from __future__ import annotations


def flatten(nested: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}, "c": 2}`` -> ``{"a.b": 1, "c": 2}``."""
    out = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(old: dict, new: dict, names: dict | None = None) -> list[str]:
    """How two nested dicts differ, one 'name old -> new' phrase per dotted key (sorted);
    `names` renames keys (e.g. to the option that sets them)."""
    old, new, names = flatten(old), flatten(new), names or {}
    return [f"{names.get(k, k)} {old.get(k)!r} -> {new.get(k)!r}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
