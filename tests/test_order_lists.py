"""Lists of orders without a status filter, on layout 5 (app/keys.py): no index of all
orders is kept, so a customer's list and the admin's are the merge of the status
indexes (app/orders/service.py: list_orders). They must be exactly the newest-first
union of the status lists, through every status change, and no all-orders key may
come back."""

from __future__ import annotations

from redis.asyncio import Redis

from app import keys
from app.partitions import partition_of
from app.vocabulary import CANCELLED, COMPLETED, OPEN, ORDER_STATUSES
from tests.helpers import ADMIN, ON_BOTH_STACKS, Shop, all_keys, every_status_chunk

pytestmark = ON_BOTH_STACKS


async def _pages(shop: Shop, path: str, headers: dict[str, str], per_page: int) -> dict:
    """Every page of a list, walked as a client would: the ids in order, their
    statuses, and the totals each page answered."""
    ids: list[str] = []
    statuses: dict[str, str] = {}
    totals = set()
    page = 1
    while True:
        separator = "&" if "?" in path else "?"
        response = await shop.client.get(
            f"{path}{separator}page={page}&per_page={per_page}", headers=headers
        )
        assert response.status == 200, await response.text()
        body = await response.json()
        totals.add((body["total"], body["pageCount"]))
        ids += [order["id"] for order in body["orders"]]
        statuses.update((order["id"], order["status"]) for order in body["orders"])
        if page >= body["pageCount"]:
            return {"ids": ids, "statuses": statuses, "totals": totals}
        page += 1


async def _union(redis: Redis, indexes: list[tuple[int, str]]) -> list[str]:
    """The members of (partition, status index) pairs newest first by score, a tie
    across partitions to the lower partition: what the merge promises."""
    rows = []
    for partition, index in indexes:
        for member, score in await redis.zrange(index, 0, -1, withscores=True):
            rows.append((-int(score), partition, member.decode()))
    return [member for _, _, member in sorted(rows)]


async def _check_lists(
    shop: Shop, redis: Redis, customers: list[tuple[dict, dict]], placed: list[str]
) -> None:
    for customer, auth in customers:
        cid = customer["id"]
        by_status = {}
        for status in ORDER_STATUSES:
            listed = await _pages(shop, f"/orders?status={status}", auth, per_page=100)
            by_status[status] = listed["ids"]
        whole = await _pages(shop, "/orders", auth, per_page=3)
        indexes = [
            (partition_of(cid), keys.customer_orders_by_status(cid, s)) for s in ORDER_STATUSES
        ]
        assert whole["ids"] == await _union(redis, indexes)
        # The same as the creation order (orders were placed one after another), and each
        # status list is exactly its part in that status.
        own = [order_id for order_id in reversed(placed) if order_id in set(whole["ids"])]
        assert whole["ids"] == own and len(own) == len(placed) // len(customers)
        for status, ids in by_status.items():
            assert ids == [o for o in own if whole["statuses"][o] == status], status
        assert whole["totals"] == {(len(own), -(-len(own) // 3))}
    admin = await _pages(shop, "/orders", ADMIN, per_page=4)
    every = [(p, chunk) for p, _, chunk in await every_status_chunk(redis)]
    assert admin["ids"] == await _union(redis, every)
    assert admin["ids"] == placed[::-1]
    assert admin["totals"] == {(len(placed), -(-len(placed) // 4))}


async def test_unfiltered_lists_are_the_union_of_the_status_lists(shop: Shop, redis: Redis) -> None:
    phones = [await shop.phone(price_cents=100, stock=1_000) for _ in range(4)]
    customers = [await shop.customer() for _ in range(3)]
    placed: list[str] = []
    for i in range(15):
        _, auth = customers[i % 3]
        phone = phones[i % len(phones)]
        response = await shop.order(auth, [(phone["id"], 1)], autocheck=i % 2 == 0)
        assert response.status == 201, await response.text()
        placed.append((await response.json())["order"]["id"])
    await _check_lists(shop, redis, customers, placed)

    # Status changes move orders between the indexes the lists merge.
    owner = {order_id: customers[i % 3][1] for i, order_id in enumerate(placed)}
    opened = [order_id for i, order_id in enumerate(placed) if i % 2 != 0]
    for order_id in opened[::3]:
        response = await shop.client.post(f"/orders/{order_id}/check", headers=owner[order_id])
        assert response.status == 200 and (await response.json())["order"]["status"] == COMPLETED
    for order_id in opened[1::3]:
        response = await shop.client.post(f"/orders/{order_id}/cancel", headers=owner[order_id])
        assert response.status == 200 and (await response.json())["order"]["status"] == CANCELLED
    await _check_lists(shop, redis, customers, placed)
    final = await (await shop.client.get("/orders?per_page=100", headers=ADMIN)).json()
    assert {o["status"] for o in final["orders"]} == {OPEN, COMPLETED, CANCELLED}


async def test_no_index_of_all_orders_is_written(shop: Shop, redis: Redis) -> None:
    """place_order, commit_order (a phone on another node of the cluster), check_order,
    cancel_order and refund_order write only the status indexes."""
    phones = [await shop.phone(price_cents=100, stock=100) for _ in range(6)]
    customer, auth = await shop.customer()
    placed = []
    for i, phone in enumerate(phones):
        response = await shop.order(auth, [(phone["id"], 1)], autocheck=i == 0)
        assert response.status == 201, await response.text()
        placed.append((await response.json())["order"]["id"])
    assert (await shop.client.post(f"/orders/{placed[1]}/check", headers=auth)).status == 200
    assert (await shop.client.post(f"/orders/{placed[2]}/cancel", headers=auth)).status == 200
    await shop.audit_at_rest()
    names = [key.decode() for key in await all_keys(redis)]
    status_indexes = {
        keys.orders_by_status(partition_of(customer["id"]), s, 0) for s in ORDER_STATUSES
    }
    customer_indexes = {keys.customer_orders_by_status(customer["id"], s) for s in ORDER_STATUSES}
    assert status_indexes <= set(names) and customer_indexes <= set(names)
    assert [name for name in names if name.startswith("oa{")] == []
    # A customer's indexes all end in ":<status>": no bare co{P}<customer id>.
    assert [n for n in names if n.startswith("co{") and ":" not in n] == []
