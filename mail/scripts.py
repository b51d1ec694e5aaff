"""The mail side's Lua scripts (``mail/lua/*.lua``), read once.

Each file starts with its KEYS / ARGV / return contract, and is sent with the
app's prelude (app/lua_prelude.py) before it. Callers register them on their
own client with ``redis.register_script(source(name))``, which runs EVALSHA and
loads the script on a NOSCRIPT reply.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from app.lua_prelude import with_prelude

LUA = Path(__file__).parent / "lua"


@cache
def source(name: str) -> str:
    return with_prelude((LUA / f"{name}.lua").read_text(encoding="utf-8"))
