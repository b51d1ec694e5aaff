"""Opaque random ids and the strict pattern every id must match before it
reaches a Redis key name."""

from __future__ import annotations

import re
import secrets

# 16 random bytes, URL-safe base64 without padding: 22 characters, 128 bits.
ID_PATTERN = r"^[A-Za-z0-9_-]{22}$"
_ID = re.compile(ID_PATTERN)


def new_id() -> str:
    return secrets.token_urlsafe(16)


def is_valid_id(value: str) -> bool:
    return _ID.fullmatch(value) is not None
