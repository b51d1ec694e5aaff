"""The phone catalogue: creation (ours and the seed's), pages, updates, restock."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from app import appkeys, keys
from app.main import create_app
from app.partitions import PARTITIONS, new_id
from app.phones.service import create_phone_keys
from tests.helpers import ADMIN, CLUSTER, ON_BOTH_STACKS, Shop

# On one redis-server and on the 3+3 Redis Cluster (`-m cluster`: the cluster runs).
pytestmark = ON_BOTH_STACKS


async def test_create_phone_returns_it_wrapped(shop: Shop) -> None:
    response = await shop.client.post(
        "/phones",
        json={
            "name": "Pixel 9",
            "description": "A phone",
            "image_url": "img/pixel.png",
            "price_cents": 79_900,
            "stock": 3,
        },
        headers=ADMIN,
    )
    assert response.status == 201
    phone = (await response.json())["phone"]
    assert {k: phone[k] for k in ("name", "description", "image_url", "price_cents", "stock")} == {
        "name": "Pixel 9",
        "description": "A phone",
        "image_url": "img/pixel.png",
        "price_cents": 79_900,
        "stock": 3,
    }
    assert len(phone["id"]) == 22
    fetched = await shop.client.get(f"/phones/{phone['id']}")
    assert (await fetched.json())["phone"] == phone


async def test_seed_alias_converts_price_exactly(shop: Shop) -> None:
    response = await shop.client.post(
        "/phones/create",
        json={"name": "Nokia", "description": "", "imageurl": "nokia.jpg", "price": 19.99},
        headers=ADMIN,
    )
    assert response.status == 201, await response.text()
    phone = (await response.json())["phone"]
    assert phone["price_cents"] == 1999
    assert phone["image_url"] == "nokia.jpg"
    assert phone["stock"] == 0


async def test_seed_alias_accepts_our_shape_and_string_price(shop: Shop) -> None:
    ours = await shop.client.post(
        "/phones/create", json={"name": "A", "price_cents": 5, "stock": 2}, headers=ADMIN
    )
    assert (await ours.json())["phone"]["price_cents"] == 5
    text = await shop.client.post(
        "/phones/create", json={"name": "B", "price": "0.10"}, headers=ADMIN
    )
    assert (await text.json())["phone"]["price_cents"] == 10


async def test_seed_alias_rejects_sub_cent_and_double_prices(shop: Shop) -> None:
    for body in (
        {"name": "A", "price": 1.999},
        {"name": "A", "price": 0},
        {"name": "A", "price": "NaN"},
        {"name": "A", "price": "1e3"},
        {"name": "A", "price": " 5"},
        {"name": "A", "price": "0.00"},
        {"name": "A", "price": "1_000"},
        {"name": "A", "price": True},
        {"name": "A", "price": 10_000_000.01},
        {"name": "A", "price": 1, "price_cents": 100},
        {"name": "A"},
    ):
        response = await shop.client.post("/phones/create", json=body, headers=ADMIN)
        assert response.status == 422, body
    assert (await shop.client.get("/phones")).status == 200
    assert (await (await shop.client.get("/phones")).json())["total"] == 0


async def test_list_has_seed_shape_and_stable_pages(shop: Shop) -> None:
    created = [await shop.phone(name=f"phone {i}") for i in range(23)]
    response = await shop.client.get("/phones?page=1")
    body = await response.json()
    assert set(body) == {"phones", "page", "per_page", "total", "pageCount"}
    assert (body["page"], body["per_page"], body["total"], body["pageCount"]) == (1, 10, 23, 3)
    seen = []
    for page in (1, 2, 3):
        listing = await (await shop.client.get(f"/phones?page={page}")).json()
        seen += [phone["id"] for phone in listing["phones"]]
    assert seen == [phone["id"] for phone in created]
    past_end = await (await shop.client.get("/phones?page=9")).json()
    assert past_end["phones"] == [] and past_end["total"] == 23
    sized = await (await shop.client.get("/phones?page=2&per_page=20")).json()
    assert [p["id"] for p in sized["phones"]] == [p["id"] for p in created[20:]]


async def test_list_rejects_bad_paging(shop: Shop) -> None:
    for query in ("page=0", "page=-1", "page=abc", "per_page=0", "per_page=101", "page=1.5"):
        response = await shop.client.get(f"/phones?{query}")
        assert response.status == 422, query
        assert response.content_type == "application/problem+json"


async def test_patch_changes_fields_but_not_stock(shop: Shop) -> None:
    phone = await shop.phone(price_cents=100, stock=4)
    response = await shop.client.patch(
        f"/phones/{phone['id']}", json={"name": "Renamed", "price_cents": 150}, headers=ADMIN
    )
    assert response.status == 200
    updated = (await response.json())["phone"]
    assert (updated["name"], updated["price_cents"], updated["stock"]) == ("Renamed", 150, 4)
    for body in ({"stock": 100}, {}, {"price_cents": 0}):
        refused = await shop.client.patch(f"/phones/{phone['id']}", json=body, headers=ADMIN)
        assert refused.status == 422, body
    missing = await shop.client.patch(
        "/phones/AAAAAAAAAAAAAAAAAAAAAA", json={"name": "x"}, headers=ADMIN
    )
    assert missing.status == 404


async def test_restock_adds_units_atomically(shop: Shop, redis: Redis) -> None:
    phone = await shop.phone(stock=1)
    response = await shop.client.post(
        f"/phones/{phone['id']}/restock", json={"quantity": 9}, headers=ADMIN
    )
    assert response.status == 200
    assert (await response.json())["phone"]["stock"] == 10
    assert await redis.hget(keys.phone(phone["id"]), "added_units") == b"10"
    for quantity in (0, -1, 10**9 + 1, 1.5, "3", True):
        refused = await shop.client.post(
            f"/phones/{phone['id']}/restock", json={"quantity": quantity}, headers=ADMIN
        )
        assert refused.status == 422, quantity
    missing = await shop.client.post(
        "/phones/AAAAAAAAAAAAAAAAAAAAAA/restock", json={"quantity": 1}, headers=ADMIN
    )
    assert missing.status == 404
    assert (await shop.audit())["ok"]


async def test_phone_writes_need_the_admin(shop: Shop) -> None:
    phone = await shop.phone()
    _, customer_auth = await shop.customer()
    body = {"name": "x", "price_cents": 1}
    assert (await shop.client.post("/phones", json=body)).status == 401
    bad = {"Authorization": "Bearer nope"}
    assert (await shop.client.post("/phones", json=body, headers=bad)).status == 401
    assert (await shop.client.post("/phones", json=body, headers=customer_auth)).status == 403
    restock = await shop.client.post(
        f"/phones/{phone['id']}/restock", json={"quantity": 1}, headers=customer_auth
    )
    assert restock.status == 403
    assert (await (await shop.client.get("/phones")).json())["total"] == 1


async def test_unknown_phone_is_404_problem(shop: Shop) -> None:
    missing = await shop.client.get("/phones/AAAAAAAAAAAAAAAAAAAAAA")
    assert missing.status == 404
    problem = await missing.json(content_type="application/problem+json")
    assert problem["code"] == "phone_not_found"
    # A path whose id cannot be an id matches no route at all.
    for path in ("/phones/not-an-id", "/phones/..%2Fetc", "/phones/AAAAAAAAAAAAAAAAAAAAAAA"):
        response = await shop.client.get(path)
        assert response.status == 404, path
        problem = await response.json(content_type="application/problem+json")
        assert problem["code"] == "not_found"


async def test_seed_create_path_is_not_a_phone_id(shop: Shop) -> None:
    response = await shop.client.get("/phones/create")
    assert response.status == 405
    assert response.headers["Allow"] == "POST"


async def test_integral_json_numbers_count_as_integers(shop: Shop) -> None:
    """JSON Schema's integer (what /openapi.json publishes) includes 2.0 and 1e1."""
    phone = await shop.phone(stock=0)
    for raw, stock in ((b'{"quantity": 2.0}', 2), (b'{"quantity": 1e1}', 12)):
        response = await shop.client.post(
            f"/phones/{phone['id']}/restock",
            data=raw,
            headers={**ADMIN, "Content-Type": "application/json"},
        )
        assert response.status == 200, raw
        assert (await response.json())["phone"]["stock"] == stock


async def test_a_change_shows_on_the_next_page_read_of_every_worker(
    aiohttp_client: Any, client: TestClient
) -> None:
    """Each worker remembers the pages it merged (app/phones/page_cache.py); a create in
    any partition, an update or a restock through one worker is on the very next page
    read of every other, which had the page in memory."""
    workers = [client, *[await aiohttp_client(await create_app()) for _ in range(2)]]
    shops = [Shop(worker) for worker in workers]

    async def listing(worker: TestClient) -> dict[str, Any]:
        response = await worker.get("/phones?page=1&per_page=5")
        assert response.status == 200
        return await response.json()

    created = [await shops[0].phone(name=f"phone {i}", stock=1) for i in range(3)]
    for worker in workers:  # every worker merges the page once, then answers it from memory
        await listing(worker)
    hits = [worker.app[appkeys.CATALOGUE_PAGES].hits for worker in workers]
    for worker in workers:
        assert [p["id"] for p in (await listing(worker))["phones"]] == [p["id"] for p in created]
    assert [w.app[appkeys.CATALOGUE_PAGES].hits for w in workers] == [n + 1 for n in hits]

    # New phones land in random partitions: a few creates, each through another worker ...
    for i in range(3, 5):
        created.append(await shops[i % 3].phone(name=f"phone {i}", stock=1))
        for worker in workers:
            body = await listing(worker)
            assert body["total"] == len(created)
            assert [p["id"] for p in body["phones"]] == [p["id"] for p in created]
    # ... and, by the same script with the id chosen, in the first, a middle and the last
    # partition (on the cluster, on each primary): past page 1, the total shows each.
    scripts = workers[0].app[appkeys.SCRIPTS]
    for partition in (0, PARTITIONS // 2, PARTITIONS - 1):
        phone_id = new_id(partition)
        phone_keys = create_phone_keys(phone_id)
        await scripts.run("create_phone", phone_keys, [phone_id, "p", "", "", 1, 1, 0])
        created.append({"id": phone_id})
        for worker in workers:
            assert (await listing(worker))["total"] == len(created)

    first = created[0]["id"]
    renamed = await workers[1].patch(f"/phones/{first}", json={"name": "renamed"}, headers=ADMIN)
    assert renamed.status == 200
    restocked = await workers[2].post(
        f"/phones/{first}/restock", json={"quantity": 6}, headers=ADMIN
    )
    assert restocked.status == 200
    for worker in workers:
        phone = (await listing(worker))["phones"][0]
        assert (phone["id"], phone["name"], phone["stock"]) == (first, "renamed", 7)


async def test_a_page_check_survives_a_flushed_script_cache(
    shop: Shop, redis: Redis, stack_kind: str
) -> None:
    """On the cluster a page's clocks are read by one read_strings.lua call per primary
    (the gateway's read_strings_with, app/cluster_gateway.py); a node that lost the
    script (a failover, SCRIPT FLUSH) makes that read fall back to a GET per clock, then
    load the script again."""
    if stack_kind != CLUSTER:
        pytest.skip("one redis-server reads the clocks with one MGET, no script")
    pages = shop.client.app[appkeys.CATALOGUE_PAGES]
    created = [await shop.phone(name=f"phone {i}") for i in range(3)]

    async def ids() -> list[str]:
        response = await shop.client.get("/phones?page=1")
        assert response.status == 200
        return [phone["id"] for phone in (await response.json())["phones"]]

    for _ in range(3):  # merged, then remembered: by GETs, then by the script
        assert await ids() == [phone["id"] for phone in created]
    assert pages.hits == 2
    await redis.execute_command("SCRIPT FLUSH", target_nodes=RedisCluster.PRIMARIES)
    created.append(await shop.phone(name="after the flush"))
    assert await ids() == [phone["id"] for phone in created]
    assert await ids() == [phone["id"] for phone in created]
    assert await ids() == [phone["id"] for phone in created]
    assert pages.hits == 4
