"""Numeric settings read from environment variables, with errors that name the variable."""

from __future__ import annotations

import os
from typing import Callable, Mapping


def env_number(name: str, parse: Callable[[str], float], minimum: float, unit: str,
               environ: Mapping[str, str] | None = None):
    """``parse($name)``, or None when unset/empty; a malformed or too small value is a ConfigError.

    Args:
        parse: ``int`` or ``float``.
        minimum: smallest accepted value.
        unit: what the number counts, for the message (e.g. "seconds", "ranks per node").
    """
    from hpcsgd.errors import ConfigError

    raw = (os.environ if environ is None else environ).get(name, "").strip()
    if not raw:
        return None
    try:
        value = parse(raw)
    except ValueError as e:
        raise ConfigError(f"{name}={raw!r} is not a valid number of {unit}") from e
    if value < minimum:
        raise ConfigError(f"{name}={raw!r} must be >= {minimum} ({unit})")
    return value
