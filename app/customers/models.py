"""Request and response shapes of customers."""

from __future__ import annotations

import msgspec

from app.fields import AmountCents, BalanceCents, Email, Name


class CustomerCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Name
    surname: Name
    email: Email
    balance_cents: BalanceCents = 0


class Deposit(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    amount_cents: AmountCents


class Customer(msgspec.Struct, kw_only=True):
    id: str
    name: str
    surname: str
    email: str
    balance_cents: int
    created_at: str


class CustomerEnvelope(msgspec.Struct, kw_only=True):
    customer: Customer


class CustomerCreated(msgspec.Struct, kw_only=True):
    customer: Customer
    token: str
