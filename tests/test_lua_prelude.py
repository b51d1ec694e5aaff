"""The prelude the Lua scripts are sent with (app/lua_prelude.py): the helpers
are defined there once, every script compiles and runs with the part it
uses, a ``#!lua`` shebang line stays first, and Redis's error line numbers
stay the file's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from app import keys
from app.lua_prelude import (
    ACROSS_SLOTS_SHEBANG,
    DEFINITIONS,
    across_slots,
    prelude_for,
    with_prelude,
)
from app.phones.service import update_phone_keys
from app.redis_gateway import gateway_over
from app.scripts import ONE_NODE_SCRIPTS, Scripts, load_across_slots_source, load_source
from app.vocabulary import ORDER_FIELDS, order_fields
from mail import scripts as mail_scripts
from tests.helpers import Shop

ROOT = Path(__file__).resolve().parent.parent
LUA_FILES = sorted([*(ROOT / "app" / "lua").glob("*.lua"), *(ROOT / "mail" / "lua").glob("*.lua")])
FILE_TEXT = {path: path.read_text() for path in LUA_FILES}


def _as_sent(path: Path) -> str:
    if path.parent.parent.name == "mail":
        return mail_scripts.source(path.stem)
    return load_source(path.stem)


def test_the_helpers_are_defined_once_in_the_prelude() -> None:
    for statement in DEFINITIONS.values():
        assert "\n" not in statement and "--" not in statement
    copies = []
    for text in FILE_TEXT.values():
        # The flat-reply-to-table loop, or a helper of the prelude defined again.
        if re.search(r"\[\s*\w+\[i\]\s*\]\s*=\s*\w+\[i \+ 1\]", text) or re.search(
            r"function (pairs_to_map|hgetall_map|encode_items?|decode_items)\b", text
        ):
            copies.append(text.splitlines()[0])
    assert not copies


@pytest.mark.parametrize("path", LUA_FILES, ids=lambda path: path.name)
async def test_every_script_is_sent_with_the_prelude_and_keeps_its_line_numbers(
    redis: Redis, path: Path
) -> None:
    text, sent = FILE_TEXT[path], _as_sent(path)
    # A #!lua shebang stays the first line; the prelude joins the line after it, so
    # every other line keeps its number.
    shebang, body = text.split("\n", 1) if text.startswith("#!") else ("", text)
    head = f"{shebang}\n" if shebang else ""
    prelude = prelude_for(text)
    assert sent == (f"{head}{prelude} {body}" if prelude else text)
    kept_from = 2 if shebang else 1
    assert sent.splitlines()[kept_from:] == text.splitlines()[kept_from:]
    # It compiles: SCRIPT LOAD refuses a syntax error or an unknown global.
    await redis.script_load(sent)


async def test_the_scripts_that_use_hgetall_map_answer_the_whole_hash(
    shop: Shop, redis: Redis
) -> None:
    """create_phone, update_phone and restock answer the phone's hash; check_order
    and cancel_order the order's with its id, whether they changed it or not."""
    scripts = Scripts(gateway_over(redis))

    async def stored(key: str) -> dict[str, str]:
        return {f.decode(): v.decode() for f, v in (await redis.hgetall(key)).items()}

    phone = await shop.phone(price_cents=250, stock=4)
    phone_key = keys.phone(phone["id"])
    updated = await scripts.run(
        "update_phone",
        update_phone_keys(phone["id"]),
        [keys.reprice_entry(phone["id"]), 0, "name", "Fairphone"],
    )
    assert updated.payload == await stored(phone_key)
    assert updated.payload["name"] == "Fairphone"
    restocked = await scripts.run("restock", [phone_key, keys.ledger_of(phone["id"])], [3, 10**12])
    assert restocked.payload == await stored(phone_key)
    assert restocked.payload["stock"] == "7"

    _, auth = await shop.customer()
    for action in ("check", "cancel"):
        response = await shop.order(auth, [(phone["id"], 1)], autocheck=False)
        order = (await response.json())["order"]
        for _ in range(2):  # changed now, then answered as it is
            answer = await shop.client.post(f"/orders/{order['id']}/{action}", headers=auth)
            assert answer.status == 200
            body = (await answer.json())["order"]
            row = await stored(keys.order(order["id"]))
            # The hash does not store the id (its key holds it) and has the short field
            # names: order_map answers the long ones and adds the id back.
            # The chunk is stored only where the id does not say it (a split saga's commit
            # after a stale hint): never for an order placed in one script. The total and
            # the creation time are derived (the items' sum, the seq's millisecond). The
            # stripe only on an order sold from one (escrow): not these.
            derived = ("chunk", "total_cents", "created_at", "stripe")
            stored_names = set(ORDER_FIELDS.values()) - {ORDER_FIELDS[name] for name in derived}
            assert "id" not in row and set(row) == stored_names
            assert (body["id"], body["status"], body["total_cents"]) == (
                order["id"],
                order_fields(row)["status"],
                int(order_fields(row)["total_cents"]),
            )


async def test_a_shebang_line_stays_first_and_error_lines_are_the_files(redis: Redis) -> None:
    read_only = with_prelude("#!lua flags=no-writes\nlocal n = 1\nreturn STATUS.open")
    assert read_only.startswith("#!lua flags=no-writes\nlocal strict_names = ")
    assert await redis.eval(read_only, 0) == b"open"
    # Redis read the flags: the script may not write.
    writes = with_prelude("#!lua flags=no-writes\nreturn redis.call('SET', KEYS[1], 'x')")
    with pytest.raises(ResponseError, match="Write commands are not allowed"):
        await redis.eval(writes, 1, "prelude:test")
    for source in (
        "-- a comment\nlocal map = pairs_to_map({})\nerror('boom')",
        "#!lua\nlocal map = hgetall_map('prelude:none')\nerror('boom')",
    ):
        assert with_prelude(source) != source
        with pytest.raises(ResponseError, match=r"user_script:3: boom"):
            await redis.eval(with_prelude(source), 0)


def test_a_script_gets_the_definitions_it_names_and_what_they_use() -> None:
    assert prelude_for("return 1") == ""
    assert with_prelude("return 1") == "return 1"
    hashes = prelude_for("return hgetall_map(KEYS[1])")
    assert hashes.startswith("local function pairs_to_map(") and "hgetall_map" in hashes
    assert "STATUS" not in hashes
    statuses = prelude_for("return ORDER_EVENT.open")
    assert statuses.startswith("local strict_names = ") and "local STATUS" not in statuses
    # Named as a whole word only: a longer name that contains one is not it.
    assert prelude_for("return hgetall_map_x(KEYS[1])") == ""
    assert "hgetall_map" in prelude_for("return {hgetall_map(KEYS[1])}")
    # prelude_for finds the names among the words of a text (app/lua_prelude.py: _names_in).
    assert all(re.fullmatch(r"\w+", name) for name in DEFINITIONS)


@pytest.mark.parametrize("name", ONE_NODE_SCRIPTS)
async def test_the_across_slots_form_keeps_the_body_and_compiles(redis: Redis, name: str) -> None:
    """What a cluster node runs over several of its slots: the shebang with the flag, then
    the body unchanged, each line at its number, with KEYS and ARGV rebuilt before it."""
    text, sent = (ROOT / "app" / "lua" / f"{name}.lua").read_text(), load_across_slots_source(name)
    first, rest = sent.split("\n", 1)
    assert first == ACROSS_SLOTS_SHEBANG
    assert rest.splitlines()[1:] == text.splitlines()[1:]
    assert "local KEYS, ARGV = keys_past_the_declared(KEYS, ARGV) " + text.splitlines()[0] in rest
    await redis.script_load(sent)


async def test_the_across_slots_form_rebuilds_keys_and_args_in_order(redis: Redis) -> None:
    """The declared keys, then the undeclared ones from the head of ARGV, as the script's
    KEYS; the rest of ARGV as its ARGV; every undeclared key touched (it runs here on one
    redis-server, where any key is served)."""
    echo = "return {KEYS, ARGV, redis.call('EXISTS', KEYS[#KEYS])}"
    await redis.set("k3", "there")
    reply = await redis.eval(across_slots(echo), 2, "k1", "k2", 2, "k3", "k4", "a1", "a2", "a3")
    assert reply == [[b"k1", b"k2", b"k3", b"k4"], [b"a1", b"a2", b"a3"], 0]
    assert await redis.eval(across_slots(echo), 1, "k1", 0) == [[b"k1"], [], 0]
