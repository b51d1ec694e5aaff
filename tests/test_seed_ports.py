"""Issue 18 item 3: on the seed's ports a client written for the seed finds the
seed's field names (``imageurl``, ``price`` as a decimal amount) next to ours,
the OpenAPI document says so on exactly the paths those ports serve, and a 401
there tells the client the one header to add.

Through the real stack (nginx with its seed ports, 2 instances, redis): only
nginx knows which port a request came in on.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from app.ids import ID_PATTERN, new_id
from app.openapi import seed_services
from app.routes import route_table
from app.seed import SEED_HEADER
from loadtests.support.stack import FullStack
from tests.helpers import ADMIN

TIMEOUT = aiohttp.ClientTimeout(total=60)
PROBLEM = "application/problem+json"


async def body_of(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The JSON body with every number read exactly, as a seed client's
    decimal library would."""
    return json.loads(await response.text(), parse_float=Decimal)


class SeedClient:
    """What a client written for the seed's README does: its paths, its field
    names, and the one header PhoneShop adds."""

    def __init__(self, http: aiohttp.ClientSession, stack: FullStack, token: str) -> None:
        self.http = http
        self.phones = stack.seed_phones_url
        self.orders = stack.seed_orders_url
        self.headers = {"Authorization": f"Bearer {token}"}

    async def create_phone(self, name: str, imageurl: str, price: str) -> dict[str, Any]:
        response = await self.http.post(
            f"{self.phones}/phones/create",
            data=json.dumps(
                {"name": name, "imageurl": imageurl, "price": Decimal(price), "stock": 10},
                default=str,
            ),
            headers={**self.headers, "Content-Type": "application/json"},
        )
        assert response.status == 201, await response.text()
        return (await body_of(response))["phone"]

    async def list_phones(self, page: int) -> dict[str, Any]:
        response = await self.http.get(f"{self.phones}/phones", params={"page": str(page)})
        assert response.status == 200
        return await body_of(response)

    async def place_order(self, phone_ids: list[str], autocheck: bool = True) -> dict[str, Any]:
        response = await self.http.post(
            f"{self.orders}/orders/create",
            json={"phones": phone_ids, "autocheck": autocheck},
            headers=self.headers,
        )
        assert response.status == 201, await response.text()
        return (await body_of(response))["order"]

    async def check(self, order_id: str) -> dict[str, Any]:
        response = await self.http.post(
            f"{self.orders}/phones/check/{order_id}", headers=self.headers
        )
        assert response.status == 200, await response.text()
        return (await body_of(response))["order"]

    async def list_orders(self) -> dict[str, Any]:
        response = await self.http.get(f"{self.orders}/orders", headers=self.headers)
        assert response.status == 200
        return await body_of(response)


async def new_customer(http: aiohttp.ClientSession, stack: FullStack) -> str:
    response = await http.post(
        f"{stack.direct_url}/customers",
        json={
            "name": "Seed",
            "surname": "Client",
            "email": f"seed-{new_id()}@example.com",
            "balance_cents": 1_000_000,
        },
        headers=stack.admin_headers,
    )
    assert response.status == 201, await response.text()
    return (await response.json())["token"]


async def test_a_seed_client_reads_imageurl_and_price_on_the_seed_ports(
    full_stack: FullStack,
) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        admin = SeedClient(http, full_stack, full_stack.admin_token)
        created = await admin.create_phone("Nokia 3310", "img/3310.png", "49.99")
        assert created["imageurl"] == created["image_url"] == "img/3310.png"
        assert created["price"] == Decimal("49.99")
        assert created["price_cents"] == 4999
        cheap = await admin.create_phone("Cheap", "img/c.png", "0.01")
        assert cheap["price"] == Decimal("0.01")

        # The session's stack holds other tests' phones too: walk every page the seed shape
        # reports, as a seed client would, instead of hoping ours are on page 1.
        first = await admin.list_phones(page=1)
        listed = list(first["phones"])
        for page in range(2, first["pageCount"] + 1):
            listed += (await admin.list_phones(page=page))["phones"]
        assert len(listed) == first["total"]
        by_id = {phone["id"]: phone for phone in listed}
        assert by_id[created["id"]]["price"] == Decimal("49.99")
        assert by_id[cheap["id"]]["imageurl"] == "img/c.png"
        for phone in listed:
            assert phone["price"] == Decimal(phone["price_cents"]) / 100
            assert phone["imageurl"] == phone["image_url"]
        one = await http.get(f"{full_stack.seed_phones_url}/phones/{created['id']}")
        assert (await body_of(one))["phone"]["price"] == Decimal("49.99")

        customer = SeedClient(http, full_stack, await new_customer(http, full_stack))
        order = await customer.place_order([created["id"], created["id"]], autocheck=False)
        (line,) = order["items"]
        assert (line["quantity"], line["price"], line["unit_price_cents"]) == (
            2,
            Decimal("49.99"),
            4999,
        )
        assert (await customer.check(order["id"]))["items"][0]["price"] == Decimal("49.99")
        (listed_order,) = (await customer.list_orders())["orders"]
        assert listed_order["items"][0]["price"] == Decimal("49.99")

        # Our own port answers in our names only, whatever header the client
        # sends: nginx replaces it.
        for headers in ({}, {SEED_HEADER: "phones"}):
            ours = await http.get(f"{full_stack.http_url}/phones/{created['id']}", headers=headers)
            phone = (await ours.json())["phone"]
            assert "imageurl" not in phone and "price" not in phone
            assert phone["price_cents"] == 4999
        mine = await http.get(
            f"{full_stack.http_url}/orders/{order['id']}",
            headers={**customer.headers, SEED_HEADER: "orders"},
        )
        assert "price" not in (await mine.json())["order"]["items"][0]


async def test_a_seed_client_without_a_token_is_told_the_one_header(
    full_stack: FullStack,
) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        for url, body in (
            (f"{full_stack.seed_orders_url}/orders/create", {"phones": [new_id()]}),
            (f"{full_stack.seed_phones_url}/phones/create", {"name": "x", "price": 1}),
        ):
            response = await http.post(url, json=body)
            assert response.status == 401
            assert response.headers["WWW-Authenticate"] == 'Bearer realm="phoneshop"'
            detail = (await response.json(content_type=PROBLEM))["detail"]
            assert "Authorization: Bearer <token>" in detail
            assert "seed" in detail
        ours = await http.post(f"{full_stack.http_url}/orders", json={"phones": [new_id()]})
        assert ours.status == 401
        assert "seed" not in (await ours.json(content_type=PROBLEM))["detail"]


def example_path(path: str, id_pattern: str) -> str:
    return path.replace("{id}", new_id() if id_pattern == ID_PATTERN else "1-0")


async def test_the_spec_names_the_seed_ports_exactly_where_nginx_serves_the_path(
    full_stack: FullStack,
) -> None:
    """Each operation's description names a seed port if and only if nginx
    proxies that path there (a port that does not serve it answers nginx's own
    404 ``not_found``, which says so)."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        spec = await (await http.get(f"{full_stack.http_url}/openapi.json")).json()
        for route in route_table(bench=False):  # aliases included
            description = spec["paths"][route.path][route.method.lower()].get("description", "")
            path = example_path(route.path, route.id_pattern)
            for name, base in (
                ("SEED_PHONES_PORT", full_stack.seed_phones_url),
                ("SEED_ORDERS_PORT", full_stack.seed_orders_url),
            ):
                response = await http.request(route.method, base + path)
                text = await response.text()
                served = not (
                    response.status == 404 and "This port does not serve that path" in text
                )
                assert served == (name in description), (route.method, route.path, name)
                assert served == any(name in s for s in seed_services(route.path))


@pytest.mark.parametrize(
    ("cents", "amount"),
    [(1, "0.01"), (10, "0.10"), (4999, "49.99"), (100, "1.00"), (10**9, "10000000.00")],
)
async def test_amounts_are_exact_json_numbers(client: TestClient, cents: int, amount: str) -> None:
    """In-process, as nginx would send it: the seed header on a trusted proxy."""
    response = await client.post(
        "/phones",
        json={"name": "Exact", "price_cents": cents, "image_url": "i.png"},
        headers={**ADMIN, SEED_HEADER: "phones"},
    )
    assert response.status == 201
    text = await response.text()
    assert f'"price":{amount}' in text  # a number, not a string
    assert json.loads(text, parse_float=Decimal)["phone"]["price"] == Decimal(amount)
