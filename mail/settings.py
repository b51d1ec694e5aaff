"""The mail worker's settings, read once from the environment into one frozen,
validated object. Defaults are mirrored in ``.env.example``.

The worker is its own process (``python -m mail``) and does not need the API's
settings (ADMIN_TOKEN and friends), so it has its own object; the parsing rules
are the API's (:mod:`app.env`, :func:`app.settings.redis_url_from_env`).
"""

from __future__ import annotations

import functools
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.headerregistry import Address

from app.env import SettingsError, env_float, env_int
from app.settings import cluster_nodes_from_env, redis_url_from_env

SMTP_TLS_MODES = ("none", "starttls", "tls")

_HOSTNAME = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_WORKER_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# EHLO argument: a domain, or an address literal such as [192.0.2.1] (RFC 5321 4.1.3).
_ADDRESS_LITERAL = re.compile(r"\[(?:IPv6:[0-9A-Fa-f:.]+|[0-9.]+)\]")


def host_label() -> str:
    """This host's name as a worker-name prefix (a container's hostname is its id)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:40] or "host"


def default_worker_name() -> str:
    return f"{host_label()}-{os.getpid()}"


@functools.lru_cache(maxsize=8)  # a DNS look-up: once, not at every new SMTP session
def default_helo_name(mail_domain: str) -> str:
    """This host's fully qualified name when it has one, else MAIL_DOMAIN: relays
    judge the EHLO name, and ``localhost`` (what getfqdn often says) reads as spam."""
    fqdn = socket.getfqdn()
    if "." in fqdn and _HOSTNAME.fullmatch(fqdn) and not fqdn.startswith("localhost"):
        return fqdn
    return mail_domain


def parse_mail_from(value: str) -> Address:
    """``Name <addr@host>`` or ``addr@host`` -> one Address, or SettingsError."""
    if _CONTROL.search(value) or "=?" in value:
        raise SettingsError("MAIL_FROM must not contain control characters or encoded words")
    from email.headerregistry import HeaderRegistry

    try:
        header = HeaderRegistry()("From", value)
        addresses = header.addresses
    except (ValueError, IndexError) as error:
        raise SettingsError(f"MAIL_FROM is not an address: {error}") from None
    if len(addresses) != 1 or header.defects or not addresses[0].domain:
        raise SettingsError(f"MAIL_FROM must be exactly one address, got {value!r}")
    return addresses[0]


# No slots=True: with slots, cls.<field> is a member descriptor, not the default.
@dataclass(frozen=True)
class MailSettings:
    redis_url: str = field(default="redis://127.0.0.1:6390/0", repr=False)
    # REDIS_CLUSTER_NODES, as the app reads it (app/settings.py): empty for one redis-server.
    redis_cluster_nodes: tuple[tuple[str, int], ...] = ()
    # Defaults point at the dev sink, `python -m mail.sink`.
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 1025
    smtp_username: str = ""
    smtp_password: str = field(default="", repr=False)
    smtp_tls: str = "none"  # none | starttls | tls
    # PEM file of the CA (or self-signed certificate) to trust for TLS, instead of
    # the system's: a private relay, or the dev sink started with a certificate.
    smtp_ca_file: str = ""
    # Per SMTP command (connect, MAIL, RCPT, DATA...), seconds.
    smtp_timeout: float = 10.0
    mail_from: str = "PhoneShop <orders@phoneshop.localhost>"
    # Right-hand side of the stable Message-ID <order-{id}@{mail_domain}>.
    mail_domain: str = "phoneshop.localhost"
    # Attempts per mail (4xx other than a throttle, timeouts, dropped connections)
    # before it is dead-lettered. Throttles (421, 451, 452, a refused connection)
    # are retried without counting: they say nothing about the mail.
    max_attempts: int = 12
    # Retry n waits about backoff_base * 2**(n-1) seconds (with jitter), at most backoff_max.
    backoff_base: float = 2.0
    backoff_max: float = 600.0
    # A pending entry idle this long belongs to a crashed worker and is taken over.
    # The claim is renewed right before each send, and a whole send (connect to
    # the server's answer to the data) is cut off at half of it (send_deadline),
    # so no live worker's mail is ever taken over mid-send.
    claim_idle: float = 60.0
    # SMTP sessions a worker keeps open at once, each sending one mail at a time.
    # Fewer are used while the relay refuses connections (421 at connect, refused):
    # a stock exim4 takes 20 at once (smtp_accept_max), and the worker comes down
    # to what it holds. 32 because a lane waits for a round trip per mail: with 8
    # a worker sharing the stack's CPU sent too few mails at the stack's capacity
    # (loadtests/bench_mail_lag.py: 732 against 1,007 orders/s with 2 workers).
    concurrency: int = 32
    # Mails per SMTP session before it is closed and a new one opened: Debian's
    # exim4 delivers only the first 10 of a session at once and queues the rest
    # for its next queue run (smtp_accept_queue_per_connection).
    max_per_connection: int = 10
    # An SMTP session unused this long is closed (QUIT): relays drop idle
    # sessions themselves, and a held session takes one of their slots.
    idle_timeout: float = 5.0
    # EHLO name; empty: this host's FQDN when it has one, else mail_domain.
    helo_name: str = ""
    # Most entries read per XREADGROUP / XAUTOCLAIM call (a worker reads about
    # 16 per free session, mail/worker.py's CHUNK).
    batch_size: int = 128
    # Acknowledged `events` entries are kept at least this long, then trimmed.
    # Entries the `mailer` group has not acknowledged are never trimmed.
    events_retention: float = 3600.0
    trim_interval: float = 10.0
    # The health key mail:worker:{name}:alive is refreshed every loop and expires
    # after 3 heartbeats; a log line is written every `heartbeat_log` seconds.
    heartbeat: float = 5.0
    heartbeat_log: float = 60.0
    worker_name: str = field(default_factory=default_worker_name)
    # GET /metrics of this worker (mail/metrics.py) on this address and port; 0 = off.
    metrics_port: int = 0
    metrics_address: str = "127.0.0.1"

    @property
    def from_address(self) -> Address:
        return parse_mail_from(self.mail_from)

    @property
    def ehlo_name(self) -> str:
        return self.helo_name or default_helo_name(self.mail_domain)

    @property
    def send_deadline(self) -> float:
        """Seconds one whole send may take: below claim_idle with room to spare."""
        return self.claim_idle / 2

    @property
    def alive_ttl(self) -> int:
        return max(1, round(self.heartbeat * 3))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MailSettings:
        env = os.environ if env is None else env

        def text(name: str, default: str) -> str:
            return env.get(name, "").strip() or default

        redis_url = redis_url_from_env(env, cls.redis_url)
        smtp_tls = text("SMTP_TLS", cls.smtp_tls).lower()
        if smtp_tls not in SMTP_TLS_MODES:
            raise SettingsError(
                f"SMTP_TLS must be one of {', '.join(SMTP_TLS_MODES)}, got {smtp_tls!r}"
            )
        settings = cls(
            redis_url=redis_url,
            redis_cluster_nodes=cluster_nodes_from_env(env),
            smtp_host=text("SMTP_HOST", cls.smtp_host),
            smtp_port=env_int(env, "SMTP_PORT", cls.smtp_port, 1, 65535),
            smtp_username=env.get("SMTP_USERNAME", ""),
            smtp_password=env.get("SMTP_PASSWORD", ""),
            smtp_tls=smtp_tls,
            smtp_ca_file=env.get("SMTP_CA_FILE", "").strip(),
            smtp_timeout=env_float(env, "SMTP_TIMEOUT_SECONDS", cls.smtp_timeout, 0.1, 600.0),
            mail_from=text("MAIL_FROM", cls.mail_from),
            mail_domain=text("MAIL_DOMAIN", cls.mail_domain),
            max_attempts=env_int(env, "MAIL_MAX_ATTEMPTS", cls.max_attempts, 1, 1000),
            backoff_base=env_float(
                env, "MAIL_BACKOFF_BASE_SECONDS", cls.backoff_base, 0.001, 3600.0
            ),
            backoff_max=env_float(
                env, "MAIL_BACKOFF_MAX_SECONDS", cls.backoff_max, 0.001, 7 * 86400.0
            ),
            claim_idle=env_float(env, "MAIL_CLAIM_IDLE_SECONDS", cls.claim_idle, 0.1, 86400.0),
            concurrency=env_int(env, "MAIL_CONCURRENCY", cls.concurrency, 1, 256),
            max_per_connection=env_int(
                env, "MAIL_MAX_PER_CONNECTION", cls.max_per_connection, 1, 1_000_000
            ),
            idle_timeout=env_float(env, "MAIL_IDLE_TIMEOUT_SECONDS", cls.idle_timeout, 0.1, 3600.0),
            helo_name=text("MAIL_HELO_NAME", cls.helo_name),
            batch_size=env_int(env, "MAIL_BATCH_SIZE", cls.batch_size, 1, 1000),
            events_retention=env_float(
                env, "EVENTS_RETENTION_SECONDS", cls.events_retention, 0.0, 365 * 86400.0
            ),
            trim_interval=env_float(
                env, "EVENTS_TRIM_INTERVAL_SECONDS", cls.trim_interval, 0.01, 86400.0
            ),
            heartbeat=env_float(env, "MAIL_HEARTBEAT_SECONDS", cls.heartbeat, 0.1, 3600.0),
            heartbeat_log=env_float(
                env, "MAIL_HEARTBEAT_LOG_SECONDS", cls.heartbeat_log, 0.1, 86400.0
            ),
            worker_name=text("MAIL_WORKER_NAME", "") or default_worker_name(),
            metrics_port=env_int(env, "MAIL_METRICS_PORT", cls.metrics_port, 0, 65535),
            metrics_address=text("MAIL_METRICS_ADDRESS", cls.metrics_address),
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        """Cross-field checks; from_env calls it, tests building the object may too."""
        if not self.smtp_host or _CONTROL.search(self.smtp_host):
            raise SettingsError("SMTP_HOST must be a host name or address")
        if bool(self.smtp_username) != bool(self.smtp_password):
            raise SettingsError("SMTP_USERNAME and SMTP_PASSWORD go together: set both or neither")
        if self.smtp_tls not in SMTP_TLS_MODES:
            raise SettingsError(f"SMTP_TLS must be one of {', '.join(SMTP_TLS_MODES)}")
        if self.smtp_ca_file and not os.path.isfile(self.smtp_ca_file):
            raise SettingsError(f"SMTP_CA_FILE {self.smtp_ca_file!r} is not a readable file")
        if not _HOSTNAME.fullmatch(self.mail_domain):
            raise SettingsError(f"MAIL_DOMAIN must be a host name, got {self.mail_domain!r}")
        parse_mail_from(self.mail_from)
        if self.helo_name and not (
            _HOSTNAME.fullmatch(self.helo_name) or _ADDRESS_LITERAL.fullmatch(self.helo_name)
        ):
            raise SettingsError(
                f"MAIL_HELO_NAME must be a host name or an address literal, got {self.helo_name!r}"
            )
        if not _WORKER_NAME.fullmatch(self.worker_name):
            raise SettingsError(
                "MAIL_WORKER_NAME must be 1 to 64 characters of A-Z a-z 0-9 _ . : -"
            )
        if not self.metrics_address or _CONTROL.search(self.metrics_address):
            raise SettingsError("MAIL_METRICS_ADDRESS must be an address to listen on")
        if self.backoff_base > self.backoff_max:
            raise SettingsError(
                "MAIL_BACKOFF_BASE_SECONDS must not exceed MAIL_BACKOFF_MAX_SECONDS"
            )
        if self.send_deadline <= self.smtp_timeout:
            raise SettingsError(
                "MAIL_CLAIM_IDLE_SECONDS must exceed twice SMTP_TIMEOUT_SECONDS: a send may"
                " take half of it, and one SMTP command may take SMTP_TIMEOUT_SECONDS"
            )
