"""Checks of payload keys that several parts of the format share."""

from __future__ import annotations

import numpy as np

from ..errors import FormatError
from .gguf_stream import GGUFStream


def per_layer(payload: GGUFStream, key: str, what: str, n_layer: int, kind: str,
              required: bool = True, count: str = "one per layer") -> np.ndarray | None:
    """Key as a 1-D array of n_layer values of kind "f" (finite floats) or "u"."""
    value = payload.get(key)
    if value is None:
        if required:
            raise FormatError(f"{what}: required key {key!r} is missing")
        return None
    if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind != kind:
        want = "integers" if kind == "u" else "floats"
        raise FormatError(f"{what}: key {key!r} must be an array of {want}")
    if value.size != n_layer:
        raise FormatError(f"{what}: key {key!r} has {value.size} values, expected {count} "
                          f"({n_layer})")
    if kind == "f" and not np.all(np.isfinite(value)):
        raise FormatError(f"{what}: key {key!r} has a non-finite value at layer "
                          f"{int(np.flatnonzero(~np.isfinite(value))[0])}")
    return value


def all_or_none(payload: GGUFStream, keys: tuple[str, ...], what: str) -> bool:
    """Whether a group of optional keys is present: all of them, or none (else FormatError)."""
    present = [k for k in keys if payload.get(k) is not None]
    if present and len(present) != len(keys):
        missing = next(k for k in keys if k not in present)
        raise FormatError(f"{what}: key {present[0]!r} without {missing!r}")
    return bool(present)
