"""Bearer tokens: hashing, the two roles, and the owner-or-admin check.

Customer tokens are random and shown once; Redis keeps only their SHA-256.
A token never changes owner, so each worker caches hash -> customer id.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
import secrets
from collections import OrderedDict

import msgspec
from aiohttp import hdrs, web

from app import appkeys, keys
from app.partitions import PARTITIONS
from app.problems import ProblemError
from app.seed import seed_service
from app.settings import BEARER_TOKEN

_BEARER = re.compile(rf"Bearer ({BEARER_TOKEN.pattern})", re.IGNORECASE)
_BEARER_SCHEME = re.compile(r"\s*Bearer(\s|$)", re.IGNORECASE)

# RFC 9110 section 11.6.1: every 401 names the scheme and realm to use
# (RFC 6750 section 3 for Bearer).
REALM = "phoneshop"
WHAT_TO_SEND = (
    "Send the header Authorization: Bearer <token>, with the admin token or the "
    "customer token that POST /customers returned"
)


def new_token(partition: int) -> str:
    """32 bytes, the first its customer's partition (as in an id, app/partitions.py),
    so the token's key (keys.customer_token) is found from the token alone."""
    if not 0 <= partition < PARTITIONS:
        raise ValueError(f"no partition {partition}")
    raw = bytes([partition]) + secrets.token_bytes(31)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


# Every customer token is new_token()'s: 43 URL-safe characters. Anything else
# is refused without asking Redis, so a made-up token costs no Redis call.
_CUSTOMER_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@functools.lru_cache(maxsize=4)
def _admin_digest(admin_token: str) -> str:
    return token_sha256(admin_token)


class Principal(msgspec.Struct, frozen=True):
    """Who is asking: the admin, or one customer. A Struct: one per request (Call)."""

    customer_id: str | None

    @property
    def is_admin(self) -> bool:
        return self.customer_id is None


ADMIN = Principal(customer_id=None)


class TokenCache:
    """A bounded LRU of token hash -> customer id, one per worker."""

    def __init__(self, size: int = 100_000) -> None:
        self._size = size
        self._entries: OrderedDict[str, str] = OrderedDict()

    def get(self, digest: str) -> str | None:
        customer_id = self._entries.get(digest)
        if customer_id is not None:
            self._entries.move_to_end(digest)
        return customer_id

    def put(self, digest: str, customer_id: str) -> None:
        self._entries[digest] = customer_id
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    match = _BEARER.fullmatch(header.strip())
    return match.group(1) if match else None


def challenge(token_sent: bool) -> str:
    """The WWW-Authenticate value of a 401: ``invalid_token`` once a bearer
    token was offered and refused; without one, only the scheme and realm
    (RFC 6750 section 3.1: no error code when no credentials were sent)."""
    value = f'Bearer realm="{REALM}"'
    return f'{value}, error="invalid_token"' if token_sent else value


def unauthorized(request: web.Request, token_sent: bool) -> ProblemError:
    problem = "The bearer token is not valid." if token_sent else "No bearer token was sent."
    detail = f"{problem} {WHAT_TO_SEND}."
    if seed_service(request) is not None:
        # A client written for the seed, which had no authentication at all.
        detail += " The seed's API took no token; this shop's takes this one header."
    error = ProblemError("unauthorized", detail)
    error.headers["WWW-Authenticate"] = challenge(token_sent)
    return error


def bearer_sent(request: web.Request) -> bool:
    """Whether the request offered a bearer token at all, well-formed or not."""
    return _BEARER_SCHEME.match(request.headers.get("Authorization", "")) is not None


async def authenticate(request: web.Request) -> Principal:
    """The principal behind the request's bearer token, or 401."""
    token = bearer_token(request)
    if token is None:
        raise unauthorized(request, token_sent=bearer_sent(request))
    digest = token_sha256(token)
    admin_digest = _admin_digest(request.app[appkeys.SETTINGS].admin_token)
    if hmac.compare_digest(digest, admin_digest):
        return ADMIN
    if _CUSTOMER_TOKEN.fullmatch(token) is None:
        raise unauthorized(request, token_sent=True)
    cache = request.app[appkeys.TOKEN_CACHE]
    customer_id = cache.get(digest)
    if customer_id is None:
        found = await request.app[appkeys.REDIS_GATEWAY].get(keys.customer_token(token, digest))
        if found is None:
            raise unauthorized(request, token_sent=True)
        customer_id = found.decode()
        cache.put(digest, customer_id)
    return Principal(customer_id=customer_id)


def check_admin(principal: Principal) -> Principal:
    if not principal.is_admin:
        raise ProblemError("forbidden", "Only the admin token may do that")
    return principal


async def require_admin(request: web.Request) -> Principal:
    """For what is not in the route table (GET /metrics from elsewhere); routes
    declare ``auth="admin"`` instead (app/routing.py)."""
    return check_admin(await authenticate(request))


# Browsers cannot set Authorization on a WebSocket: they offer the subprotocols
# ["bearer", "<token>"] instead and the server answers with "bearer".
BEARER_PROTOCOL = "bearer"


async def authenticate_websocket(request: web.Request) -> Principal:
    """The Authorization header when present, else a token offered as the
    subprotocol after "bearer"; 401 before any upgrade otherwise."""
    if hdrs.AUTHORIZATION not in request.headers:
        token = _protocol_token(request.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL, ""))
        if token is None:
            raise unauthorized(request, token_sent=False)
        # The very same check as every other route: it reads the header.
        request = request.clone(headers={**request.headers, "Authorization": f"Bearer {token}"})
    return await authenticate(request)


def _protocol_token(header: str) -> str | None:
    offered = [value.strip() for value in header.split(",") if value.strip()]
    if BEARER_PROTOCOL not in offered:
        return None
    position = offered.index(BEARER_PROTOCOL)
    return offered[position + 1] if position + 1 < len(offered) else None


def check_owner_or_admin(principal: Principal, customer_id: str, not_found_code: str) -> None:
    """Another customer's resource is reported missing, never forbidden (no BOLA oracle)."""
    if not principal.is_admin and principal.customer_id != customer_id:
        raise ProblemError(not_found_code)
