"""app/vocabulary.py is the one place of the words the parts share: the Lua
scripts get the same statuses, events and items codec as Python, no module
spells a status or the items layout again, and a status the check and cancel
scripts do not know is refused by its name (not taken for another one)."""

from __future__ import annotations

import io
import json
import re
import tokenize
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from app import keys
from app.ids import new_id
from app.lua_prelude import with_prelude
from app.orders.service import cancel_order_keys, check_order_keys
from app.partitions import chunk_of
from app.problems import PROBLEMS
from app.scripts import load_source, problem_from_script
from app.vocabulary import (
    OPEN,
    ORDER_EVENT_TYPES,
    ORDER_FIELDS,
    ORDER_STATUSES,
    REQUEST_ID_PATTERN,
    STATUSES,
    ItemLine,
    decode_items,
    encode_items,
    is_request_id,
)
from tests.helpers import Shop

ROOT = Path(__file__).resolve().parent.parent


async def test_the_lua_scripts_get_the_statuses_and_events_of_the_vocabulary(
    redis: Redis,
) -> None:
    names = await redis.eval(
        with_prelude(
            "local out = {} for _, name in ipairs(ARGV) do"
            " out[#out + 1] = STATUS[name] out[#out + 1] = ORDER_EVENT[name] end return out"
        ),
        0,
        *ORDER_STATUSES,
    )
    expected = [word for s in STATUSES.values() for word in (s.name, s.event)]
    assert [name.decode() for name in names] == expected
    assert {s.event for s in STATUSES.values()} == ORDER_EVENT_TYPES
    # A misspelt status is an error, not a nil that compares unequal to everything.
    with pytest.raises(ResponseError, match="unknown name opne"):
        await redis.eval(with_prelude("return STATUS.opne"), 0)


async def test_the_items_codec_is_the_same_in_python_and_in_lua(redis: Redis) -> None:
    lines = [ItemLine(new_id(), 3, 19_900), ItemLine(new_id(), 1, 1), ItemLine(new_id(), 100, 0)]
    text = encode_items(lines)
    assert decode_items(text) == lines
    encoded_by_lua = await redis.eval(
        with_prelude(
            "local lines = {} for i = 1, #ARGV, 3 do"
            " lines[#lines + 1] = encode_item(ARGV[i], ARGV[i + 1], ARGV[i + 2]) end"
            " return encode_items(lines)"
        ),
        0,
        *[str(field) for line in lines for field in line],
    )
    assert encoded_by_lua.decode() == text
    decoded_by_lua = await redis.eval(
        with_prelude(
            "local out = {} for phone_id, quantity, unit_price in decode_items(ARGV[1]) do"
            " out[#out + 1] = {phone_id, quantity, unit_price} end return out"
        ),
        0,
        text,
    )
    assert [ItemLine(p.decode(), int(q), int(c)) for p, q, c in decoded_by_lua] == lines
    assert decode_items("") == []


@pytest.mark.parametrize(
    "text",
    [
        "tooShort:1:100",  # not an id: it would name a Redis key
        f"{'A' * 22}:1",
        f"{'A' * 22}:1:100:7",
        f"{'A' * 22}:-1:100",
        f"{'A' * 22}:1:1e3",
        f"{'A' * 22}:1:100;",
    ],
)
def test_a_malformed_items_field_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        decode_items(text)


@pytest.mark.parametrize("script", ["check_order", "cancel_order"])
async def test_an_order_in_a_status_the_script_does_not_handle_is_refused_by_that_status(
    shop: Shop, redis: Redis, script: str
) -> None:
    """check_order used to answer order_cancelled for every status but open
    and completed, and cancel_order order_completed for every status but open
    and cancelled: a new status got another's 409. Now it is refused by its
    own name, and nothing is written."""
    phone = await shop.phone(price_cents=10, stock=5)
    customer, auth = await shop.customer()
    order = (await (await shop.order(auth, [(phone["id"], 2)], autocheck=False)).json())["order"]
    owner = customer["id"]
    await redis.hset(keys.order(order["id"]), ORDER_FIELDS["status"], "refunded")
    before = {key: await redis.dump(key) for key in await redis.keys("*")}
    if script == "check_order":
        script_keys = check_order_keys(order["id"], owner, chunk_of(order["id"]))
        args = [owner, "", 0, "req", chunk_of(order["id"])]
    else:
        items = (await redis.hget(keys.order(order["id"]), ORDER_FIELDS["items"])).decode()
        script_keys = cancel_order_keys(order["id"], owner, items, chunk_of(order["id"]))
        args = [owner, "", 0, "req", items, 10**15, 10**12, chunk_of(order["id"])]
    status, payload, changed = await redis.eval(
        load_source(script), len(script_keys), *script_keys, *args
    )
    assert (status, json.loads(payload), changed) == (409, {"code": "order_refunded"}, 0)
    assert {key: await redis.dump(key) for key in await redis.keys("*")} == before


def test_every_status_an_order_can_be_refused_for_has_its_problem() -> None:
    for status in ORDER_STATUSES:
        if status == OPEN:
            continue
        error = problem_from_script(409, {"code": f"order_{status}"})
        assert (error.code, error.status) == (f"order_{status}", 409)
        assert PROBLEMS[error.code] == (409, f"The order is {status}")


# Where a status or the items layout would be spelled again. Tests may spell
# them: they assert behaviour.
_STATUS_WORDS = set(ORDER_STATUSES) | set(ORDER_EVENT_TYPES)
_ITEMS_BY_HAND = re.compile(
    r"""item.*(\.split\(\s*["'][;:]["']|["'][;:]["']\.join\()"""  # split or joined by hand
    r"|\{[^}]*\}:(\{[^}]*\}|\d+):(\{[^}]*\}|\d+)",  # an f-string "{id}:{qty}:{price}"
    re.IGNORECASE,
)
_LUA_SPELLED = re.compile(r"'(open|completed|cancelled|order\.\w+)'|'[:;]'")


def _python_strings(path: Path) -> list[tuple[int, str]]:
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return [(t.start[0], t.string) for t in tokens if t.type == tokenize.STRING]


def test_no_module_but_the_vocabulary_spells_a_status_or_the_items_layout() -> None:
    spelled = []
    for folder in ("app", "mail", "loadtests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "vocabulary.py":
                continue
            where = path.relative_to(ROOT)
            for line, literal in _python_strings(path):
                if literal.strip("'\"") in _STATUS_WORDS:
                    spelled.append(f"{where}:{line}: {literal}")
            for line, text in enumerate(path.read_text().splitlines(), 1):
                if _ITEMS_BY_HAND.search(text):
                    spelled.append(f"{where}:{line}: {text.strip()}")
        for path in sorted((ROOT / folder).rglob("*.lua")):
            for line, text in enumerate(path.read_text().splitlines(), 1):
                if _LUA_SPELLED.search(text.split("--", 1)[0]):
                    spelled.append(f"{path.relative_to(ROOT)}:{line}: {text.strip()}")
    assert not spelled, "\n".join(spelled)


def test_nginx_keeps_the_request_ids_the_app_keeps() -> None:
    """nginx passes a client's X-Request-ID on when it matches, and the app
    trusts it from nginx when it matches: the same pattern, or one side logs
    an id the other replaced."""
    template = (ROOT / "nginx" / "nginx.conf.template").read_text()
    assert f'"~^{REQUEST_ID_PATTERN}$"    $http_x_request_id;' in template
    assert is_request_id("a" * 128) and not is_request_id("a" * 129)
    assert not is_request_id("two words") and not is_request_id("")
