"""Validation of the step pieces' options: each error names the piece, the option and its value."""

from __future__ import annotations

__all__ = ["require_counts", "require_numbers"]


def require_numbers(owner: object, names: tuple[str, ...], prefix: str = "") -> None:
    """Each named attribute of ``owner`` is a real number ≥ 0 (NaN is not)."""
    for name in names:
        value = getattr(owner, name)
        if not (isinstance(value, int | float) and not isinstance(value, bool) and value >= 0):
            raise ValueError(f"{prefix}{name} must be a number >= 0, got {value!r}")


def require_counts(owner: object, names: tuple[str, ...], low: int = 1, prefix: str = "") -> None:
    """Each named attribute of ``owner`` is an integer (not a bool) ≥ ``low``."""
    for name in names:
        value = getattr(owner, name)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
            raise ValueError(f"{prefix}{name} must be an integer >= {low}, got {value!r}")
