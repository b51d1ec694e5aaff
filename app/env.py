"""Reading one environment variable: the one parser of integers, numbers and booleans.

Every settings reader uses these (app/settings.py, mail/settings.py, mail/sink.py,
gunicorn.conf.py, nginx/render.py, app/ops/*), so "1e3", " 7 ", "-1" or "yes" mean
the same everywhere. Empty or unset gives the default; anything else out of type
or bounds raises ``error`` (SettingsError unless the caller is a CLI that exits
with the message, and passes SystemExit) naming the variable and the bounds.
"""

from __future__ import annotations

from collections.abc import Mapping

TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off"})
# Longer than any bound anyone sets; int() of a huge string is slow and limited.
MAX_DIGITS = 19


class SettingsError(ValueError):
    """The environment holds a value the service cannot run with."""


ErrorType = type[SettingsError] | type[SystemExit] | type[ValueError]


def env_int(
    env: Mapping[str, str],
    name: str,
    default: int,
    low: int,
    high: int,
    *,
    error: ErrorType = SettingsError,
) -> int:
    """``env[name]`` as an integer from ``low`` to ``high`` (decimal digits, optional minus)."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    digits = raw.removeprefix("-")
    if not (digits.isascii() and digits.isdigit() and len(digits) <= MAX_DIGITS):
        raise error(f"{name} must be an integer from {low} to {high}, got {raw!r}")
    value = int(raw)
    if not low <= value <= high:
        raise error(f"{name} must be an integer from {low} to {high}, got {raw!r}")
    return value


def env_float(
    env: Mapping[str, str],
    name: str,
    default: float,
    low: float,
    high: float,
    *,
    error: ErrorType = SettingsError,
) -> float:
    """``env[name]`` as a number from ``low`` to ``high`` (nan and inf are refused)."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise error(f"{name} must be a number from {low} to {high}, got {raw!r}") from None
    if not low <= value <= high:  # also refuses nan
        raise error(f"{name} must be a number from {low} to {high}, got {raw!r}")
    return value


def env_bool(
    env: Mapping[str, str], name: str, default: bool, *, error: ErrorType = SettingsError
) -> bool:
    """``env[name]`` as a boolean: 1/true/yes/on or 0/false/no/off, any case."""
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in TRUE:
        return True
    if raw in FALSE:
        return False
    raise error(f"{name} must be a boolean (1/0, true/false, yes/no, on/off), got {raw!r}")
