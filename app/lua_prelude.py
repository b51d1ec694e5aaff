"""The prelude every Lua script is sent with (app/scripts.py and mail/scripts.py
put it before each), so no script copies a helper or spells a shared word:

- STATUS.<name>, ORDER_EVENT.<status>, encode_item, encode_items and
  decode_items: app/vocabulary.py in Lua;
- pairs_to_map(flat): a flat field, value, ... reply (HGETALL, a stream
  entry's fields, XINFO) as a table of field -> value;
- hgetall_map(key): the hash at key as such a table ({} when it is missing).

It is one line, put on the script's first line (after a ``#!lua`` shebang
line, which Redis wants first), so the line numbers in Redis's errors are the
file's. Defining its locals costs each run a few table and closure allocations.
"""

from __future__ import annotations

from app.vocabulary import lua_definitions

_HELPERS = [
    "local function pairs_to_map(flat) local map = {}"
    " for i = 1, #flat, 2 do map[flat[i]] = flat[i + 1] end return map end",
    "local function hgetall_map(key) return pairs_to_map(redis.call('HGETALL', key)) end",
]
# No statement may hold a comment or a newline: the prelude stays one line.
PRELUDE = "; ".join([*lua_definitions(), *_HELPERS]) + ";"


def with_prelude(source: str) -> str:
    shebang = ""
    if source.startswith("#!"):
        first_line, _, source = source.partition("\n")
        shebang = first_line + "\n"
    return f"{shebang}{PRELUDE} {source}"
