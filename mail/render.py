"""The order confirmation mail: an EmailMessage (default policy) with a text and
an HTML part rendered from ``mail/templates/``.

Nothing a customer typed can become a header or a recipient:

- the recipient is an ``email.headerregistry.Address`` built from the stored
  address, which must parse as exactly one addr-spec (CR, LF, NUL, commas and
  angle brackets are refused with :class:`InvalidRecipient`);
- the display name keeps only letters, marks, digits, spaces, apostrophes and
  hyphens (:func:`display_name`): no control or line-separator character, and
  no ``=?``, so an RFC 2047 encoded word typed by the customer, such as
  ``=?utf-8?q?=0D=0A?=``, cannot be decoded into a newline when the header is
  folded (Python before 3.11.10 writes that newline out raw), and no quote,
  comma, colon or ``@`` that the folder might leave unquoted;
- the finished message is parsed back, and it must hold exactly the headers we
  set and exactly one recipient, or :class:`UnsafeMessage` is raised.
"""

from __future__ import annotations

import email.errors
import email.utils
import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser
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
)
_WHITESPACE = re.compile(r"\s")


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
    kept = [
        c if unicodedata.category(c)[0] in "LMN" or c in " '-" else " "
        for c in clean_text(f"{name} {surname}")
    ]
    return " ".join("".join(kept).split())[:MAX_NAME]


def message_id(order_id: str, mail_domain: str) -> str:
    return f"<order-{order_id}@{mail_domain}>"


def recipient(mail: OrderMail) -> Address:
    addr = mail.email.strip()
    if (
        not addr
        or len(addr) > MAX_ADDRESS
        or _WHITESPACE.search(addr)
        or any(unicodedata.category(c)[0] == "C" for c in addr)
        or "=?" in addr
    ):
        raise InvalidRecipient(
            "the address is empty, too long, or holds spaces or control characters"
        )
    display = display_name(mail.customer_name, mail.customer_surname)
    try:
        address = Address(display_name=display, addr_spec=addr)
    except (ValueError, IndexError, email.errors.HeaderParseError) as error:
        raise InvalidRecipient(f"the address does not parse: {error}") from None
    if not address.username or not address.domain or address.addr_spec != addr:
        raise InvalidRecipient("the address is not a plain user@domain")
    return address


@dataclass(frozen=True, slots=True)
class RenderedMail:
    """The message, and its bytes as sent (CRLF line ends), flattened and checked once."""

    message: EmailMessage
    raw: bytes
    recipient: str
    message_id: str


def render_confirmation(
    mail: OrderMail, *, sender: Address, mail_domain: str, now: datetime | None = None
) -> RenderedMail:
    to = recipient(mail)
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
    msg = EmailMessage(policy=policy.default)
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = SUBJECT.format(order_id=mail.order_id)
    msg["Date"] = email.utils.format_datetime(now or datetime.now(UTC))
    msg["Message-ID"] = message_id(mail.order_id, mail_domain)
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies, please
    msg.set_content(_environment.get_template("confirmation.txt").render(context))
    msg.add_alternative(
        _environment.get_template("confirmation.html").render(context), subtype="html"
    )
    raw = msg.as_bytes(policy=policy.SMTP)
    check_headers(raw, to)
    return RenderedMail(msg, raw, to.addr_spec, str(msg["Message-ID"]))


def check_headers(raw: bytes, to: Address) -> None:
    """Parse the serialized message back: exactly HEADERS, and To is exactly ``to``."""
    parsed = BytesParser(policy=policy.default).parsebytes(raw, headersonly=True)
    names = tuple(parsed.keys())
    if names != HEADERS:
        raise UnsafeMessage(f"unexpected headers {names!r}")
    addresses = parsed["To"].addresses
    if len(addresses) != 1 or addresses[0].addr_spec != to.addr_spec:
        raise UnsafeMessage("the To header does not hold exactly the one recipient")
