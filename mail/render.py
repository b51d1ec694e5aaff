"""The order confirmation mail: a multipart/alternative message with a text and
an HTML part rendered from ``mail/templates/``.

The MIME structure is fixed, so it is written directly (about 0.06 ms a mail,
from templates compiled once) rather than through ``email.message.EmailMessage``
(about 4.7 ms a mail, which capped one worker near 200 mails/s); the one
customer-derived header, To, is written directly for a plain address and an
ASCII name, else built by ``email`` (RFC 2047 for a non-ASCII display name).

Nothing a customer typed can become a header or a recipient:

- the recipient is an ``email.headerregistry.Address`` built from the stored
  address, which must parse as exactly one ASCII addr-spec (CR, LF, NUL, commas
  and angle brackets are refused with :class:`InvalidRecipient`);
- the display name keeps only letters, marks, digits, spaces, apostrophes and
  hyphens (:func:`display_name`): no control or line-separator character, and
  no ``=?``, so an RFC 2047 encoded word typed by the customer, such as
  ``=?utf-8?q?=0D=0A?=``, cannot be decoded into a newline when the header is
  folded (Python before 3.11.10 writes that newline out raw), and no quote,
  comma, colon or ``@`` that the folder might leave unquoted;
- the finished header block must hold exactly the headers we set, one line
  each (:func:`check_header_lines`); when ``email`` wrote the To line (a
  non-ASCII display name, an address that is not a plain dot-atom), the
  message is parsed back too and must hold exactly one recipient, or
  :class:`UnsafeMessage` is raised.
"""

from __future__ import annotations

import email.errors
import email.utils
import functools
import quopri
import re
import secrets
import time
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from pathlib import Path

import jinja2

TEMPLATES = Path(__file__).parent / "templates"
SUBJECT = "Your PhoneShop order {order_id} is confirmed"
# The headers a confirmation carries, in order; the self-check compares against it.
HEADERS = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "Auto-Submitted",
    "MIME-Version",
    "Content-Type",
)
MAX_NAME = 200
MAX_ADDRESS = 254

_environment = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    # HTML is escaped; the text part is plain text, where escaping would show "&amp;".
    autoescape=jinja2.select_autoescape(
        enabled_extensions=("html", "htm", "xml"), disabled_extensions=("txt",), default=True
    ),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    # Templates are compiled once: no stat() of the file per mail.
    auto_reload=False,
)
_WHITESPACE = re.compile(r"\s")
# An ASCII dot-atom addr-spec (RFC 5322 3.4.1) with a host-name domain: what the
# API stores. It is taken as is; anything else goes through email's parser.
_PLAIN_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
# Everything display_name() would replace, for an ASCII name.
_NOT_NAME_ASCII = re.compile(r"[^A-Za-z0-9 '-]")


class InvalidRecipient(ValueError):
    """The customer's stored email address is not one plain address: never sent."""


class UnsafeMessage(ValueError):
    """The rendered message does not have exactly the expected headers and recipient."""


@dataclass(frozen=True, slots=True)
class MailLine:
    phone_id: str
    name: str
    quantity: int
    unit_price_cents: int

    @property
    def total_cents(self) -> int:
        return self.quantity * self.unit_price_cents


@dataclass(frozen=True, slots=True)
class OrderMail:
    """Everything the confirmation shows, read from Redis by the worker."""

    order_id: str
    customer_name: str
    customer_surname: str
    email: str
    lines: tuple[MailLine, ...]
    total_cents: int
    balance_cents: int


def money(cents: int) -> str:
    sign = "-" if cents < 0 else ""
    cents = abs(cents)
    return f"{sign}{cents // 100:,}.{cents % 100:02d}"


def clean_text(value: str, limit: int = MAX_NAME) -> str:
    """One line of printable text: controls, format characters and line or
    paragraph separators become spaces, encoded-word openers are broken, runs of
    whitespace collapse."""
    if value.isascii() and value.isprintable():  # the common case: no per-character look-up
        return " ".join(value.replace("=?", "= ?").split())[:limit].strip()
    chars = [
        " " if unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp") else c
        for c in value
    ]
    text = " ".join("".join(chars).replace("=?", "= ?").split())
    return text[:limit].strip()


def display_name(name: str, surname: str) -> str:
    """The To display name: letters, marks, digits, spaces, apostrophes and hyphens
    only. Everything else (quotes, commas, colons, ``@``, ``<>``, ``=?``/``?=``)
    becomes a space, so no header parser can read an address, a group or an
    encoded word into it: Python's own folder leaves some of those unquoted."""
    name = clean_text(f"{name} {surname}")
    if name.isascii():
        return " ".join(_NOT_NAME_ASCII.sub(" ", name).split())[:MAX_NAME]
    kept = [c if unicodedata.category(c)[0] in "LMN" or c in " '-" else " " for c in name]
    return " ".join("".join(kept).split())[:MAX_NAME]


def message_id(order_id: str, mail_domain: str) -> str:
    return f"<order-{order_id}@{mail_domain}>"


def _checked_address(mail: OrderMail) -> str:
    addr = mail.email.strip()
    if (
        not addr
        or len(addr) > MAX_ADDRESS
        or _WHITESPACE.search(addr)
        or any(unicodedata.category(c)[0] == "C" for c in addr)
        or "=?" in addr
        or not addr.isascii()
    ):
        raise InvalidRecipient(
            "the address is empty, too long, not ASCII, or holds spaces or control characters"
        )
    return addr


def recipient(mail: OrderMail) -> Address:
    addr = _checked_address(mail)
    display = display_name(mail.customer_name, mail.customer_surname)
    try:
        address = Address(display_name=display, addr_spec=addr)
    except (ValueError, IndexError, email.errors.HeaderParseError) as error:
        raise InvalidRecipient(f"the address does not parse: {error}") from None
    if not address.username or not address.domain or address.addr_spec != addr:
        raise InvalidRecipient("the address is not a plain user@domain")
    return address


def _recipient_line(mail: OrderMail) -> tuple[str, bytes, Address | None]:
    """(addr-spec, the To header line, the Address when ``email`` built the line).

    The common case, a dot-atom address and an ASCII display name (letters,
    digits, spaces, ' and - only: atoms, see display_name), is written directly;
    anything else goes through ``email`` (RFC 2047, quoting) and is parsed back."""
    addr = _checked_address(mail)
    display = display_name(mail.customer_name, mail.customer_surname)
    if len(addr) <= MAX_ADDRESS and _PLAIN_ADDRESS.fullmatch(addr) and display.isascii():
        line = f"To: {display} <{addr}>\r\n" if display else f"To: {addr}\r\n"
        return addr, line.encode(), None
    to = recipient(mail)
    return to.addr_spec, _to_line(to), to


@dataclass(frozen=True, slots=True)
class RenderedMail:
    """The message as sent (CRLF line ends), checked once, and its envelope."""

    raw: bytes
    recipient: str
    message_id: str


@functools.lru_cache(maxsize=8)
def _header_line(name: str, value: str) -> bytes:
    """One header as ``email`` folds and encodes it (RFC 2047 where needed), CRLF-ended."""
    msg = EmailMessage(policy=policy.SMTP)
    msg[name] = value
    return msg.as_bytes().split(b"\r\n\r\n", 1)[0] + b"\r\n"


def _to_line(to: Address) -> bytes:
    name = to.display_name
    if not name:
        return f"To: {to.addr_spec}\r\n".encode()
    if name.isascii():  # letters, digits, spaces, ' and - only (display_name): atoms
        return f"To: {name} <{to.addr_spec}>\r\n".encode()
    return _header_line("To", str(to))


def _part(subtype: str, text: str) -> bytes:
    """A text part: 7bit when it is ASCII with short lines, else quoted-printable."""
    body = text.replace("\r\n", "\n").encode()
    if body.isascii() and max(map(len, body.split(b"\n"))) <= 900:
        encoding, payload = b"7bit", body
    else:
        encoding, payload = b"quoted-printable", quopri.encodestring(body)
    if not payload.endswith(b"\n"):
        payload += b"\n"
    return (
        b"Content-Type: text/" + subtype.encode() + b'; charset="utf-8"\r\n'
        b"Content-Transfer-Encoding: " + encoding + b"\r\n\r\n" + payload.replace(b"\n", b"\r\n")
    )


def render_confirmation(
    mail: OrderMail, *, sender: Address, mail_domain: str, now: datetime | None = None
) -> RenderedMail:
    addr, to_line, to = _recipient_line(mail)
    context = {
        "order_id": mail.order_id,
        "customer_name": clean_text(mail.customer_name) or "customer",
        "lines": [
            {
                "name": clean_text(line.name) or line.phone_id,
                "quantity": line.quantity,
                "unit_price": money(line.unit_price_cents),
                "line_total": money(line.total_cents),
            }
            for line in mail.lines
        ],
        "total": money(mail.total_cents),
        "balance": money(mail.balance_cents),
    }
    parts = [
        _part("plain", _templates()[0].render(context)),
        _part("html", _templates()[1].render(context)),
    ]
    boundary = f"==============={secrets.token_hex(12)}==".encode()
    while any(boundary in part for part in parts):  # never inside a body
        boundary = f"==============={secrets.token_hex(12)}==".encode()
    mid = message_id(mail.order_id, mail_domain)
    date = email.utils.format_datetime(now) if now else _date_now(int(time.time()))
    head = (
        _header_line("From", str(sender))
        + to_line
        + (
            f"Subject: {SUBJECT.format(order_id=mail.order_id)}\r\n"
            f"Date: {date}\r\n"
            f"Message-ID: {mid}\r\n"
            # RFC 3834: no auto-replies, please.
            "Auto-Submitted: auto-generated\r\n"
            "MIME-Version: 1.0\r\n"
        ).encode()
        + b'Content-Type: multipart/alternative; boundary="'
        + boundary
        + b'"\r\n'
    )
    body = b"".join(b"\r\n--" + boundary + b"\r\n" + part for part in parts)
    raw = head + body + b"\r\n--" + boundary + b"--\r\n"
    check_header_lines(head)
    if to is not None:  # email folded or encoded the To line: parse it all back
        check_headers(raw, to)
    return RenderedMail(raw, addr, mid)


@functools.lru_cache(maxsize=2)
def _date_now(second: int) -> str:
    """The Date header of this second, formatted once a second rather than per mail."""
    return email.utils.format_datetime(datetime.fromtimestamp(second, UTC))


@functools.cache
def _templates() -> tuple[jinja2.Template, jinja2.Template]:
    return (
        _environment.get_template("confirmation.txt"),
        _environment.get_template("confirmation.html"),
    )


def check_header_lines(head: bytes) -> None:
    """The header block holds exactly HEADERS, in order, one each (a line that
    starts with a space or tab continues the one before): no CR or LF from a
    value made a header of its own."""
    names = []
    for line in head.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t"):
            continue
        name, colon, _ = line.partition(b":")
        if not colon or b"\r" in line or b"\n" in line:
            raise UnsafeMessage(f"not a header line: {line[:40]!r}")
        names.append(name.decode("ascii", "replace"))
    if tuple(names) != HEADERS:
        raise UnsafeMessage(f"unexpected headers {tuple(names)!r}")


def check_headers(raw: bytes, to: Address) -> None:
    """Parse the serialized message back: exactly HEADERS, and To is exactly ``to``.
    (compat32's parser: a tenth of the default policy's cost, and the same header
    boundaries; the To value is read with ``email.utils.getaddresses``.)"""
    parsed = BytesHeaderParser(policy=policy.compat32).parsebytes(raw)
    names = tuple(parsed.keys())
    if names != HEADERS:
        raise UnsafeMessage(f"unexpected headers {names!r}")
    addresses = email.utils.getaddresses(parsed.get_all("To", []))
    if len(addresses) != 1 or addresses[0][1] != to.addr_spec:
        raise UnsafeMessage("the To header does not hold exactly the one recipient")
