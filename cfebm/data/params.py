"""Building the data configs from a params.yaml section (one source of defaults: the dataclass)."""

from __future__ import annotations

from typing import TypeVar

from cfebm.data.errors import DataError

T = TypeVar("T")


def from_section(cls: type[T], values: dict | None, section: str) -> T:
    """Config dataclass ``cls`` from params section ``section``; unknown keys are an error."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        kind = type(values).__name__
        raise DataError(f"params section {section!r} must be a mapping, got {kind}")
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise DataError(f"unknown {section} parameter(s) {unknown}; known: {sorted(known)}")
    return cls(**values)
