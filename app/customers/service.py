"""Customer operations: creation and deposits are one Lua script each."""

from __future__ import annotations

import time

from app import keys
from app.auth import new_token, token_sha256
from app.customers.models import Customer, CustomerCreate
from app.fields import BALANCE_LIMIT
from app.partitions import partition_of
from app.problems import ProblemError
from app.redis_gateway import RedisGateway
from app.scripts import Scripts
from app.timestamps import iso_time
from app.vocabulary import new_customer_id

# What a customer's answer shows (never token_sha256 or added_cents).
_PUBLIC_FIELDS = ("id", "name", "surname", "email", "balance_cents", "created_at")


def customer_from_fields(fields: dict[str, str]) -> Customer:
    return Customer(
        id=fields["id"],
        name=fields["name"],
        surname=fields["surname"],
        email=fields["email"],
        balance_cents=int(fields["balance_cents"]),
        created_at=iso_time(fields["created_at"]),
    )


def create_customer_keys(customer_id: str, token: str, digest: str) -> list[str]:
    """create_customer.lua's KEYS, in the order its header lists them."""
    partition = partition_of(customer_id)
    return [
        keys.customer(customer_id),
        keys.customers(partition),
        keys.customers_seq(partition),
        keys.customer_emails(partition),
        keys.customer_token(token, digest),
        keys.ledger(partition),
    ]


async def create_customer(scripts: Scripts, data: CustomerCreate) -> tuple[Customer, str]:
    """The new customer and their bearer token, which is never stored in clear."""
    customer_id = new_customer_id(data.email)
    token = new_token(partition_of(customer_id))
    digest = token_sha256(token)
    result = await scripts.run(
        "create_customer",
        create_customer_keys(customer_id, token, digest),
        [
            customer_id,
            data.name,
            data.surname,
            data.email,
            data.email.lower(),
            data.balance_cents,
            digest,
            int(time.time() * 1000),
        ],
    )
    return customer_from_fields(result.payload), token


async def get_customer(gateway: RedisGateway, customer_id: str) -> Customer:
    fields = await gateway.hmget(keys.customer(customer_id), list(_PUBLIC_FIELDS))
    if fields[0] is None:
        raise ProblemError("customer_not_found")
    return customer_from_fields(
        {name: value.decode() for name, value in zip(_PUBLIC_FIELDS, fields, strict=True)}
    )


async def deposit(scripts: Scripts, customer_id: str, amount_cents: int) -> Customer:
    result = await scripts.run(
        "deposit",
        [keys.customer(customer_id), keys.ledger_of(customer_id)],
        [amount_cents, BALANCE_LIMIT],
    )
    return customer_from_fields(result.payload)
