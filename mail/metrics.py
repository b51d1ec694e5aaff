"""The mail worker's Prometheus metrics, served on MAIL_METRICS_PORT (0 = off),
or the first free port above it.

``python -m mail`` starts prometheus_client's small HTTP server (a thread) on
MAIL_METRICS_ADDRESS:MAIL_METRICS_PORT: ``GET /metrics`` there answers these
and the process's own (CPU, memory, open files). The worker is one process, so
its values live in its memory: never in a gunicorn instance's multiprocess
folder, even when PROMETHEUS_MULTIPROC_DIR leaked into its environment.
"""

from __future__ import annotations

import errno
import os

# prometheus_client picks its value store when first imported: drop the variable first.
os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)

from prometheus_client import Counter, Gauge, Histogram, start_http_server

SENT = Counter("phoneshop_mail_sent_total", "Confirmation mails the SMTP server accepted")
RETRIED = Counter(
    "phoneshop_mail_retried_total",
    "Temporary failures (4xx, connection errors, timeouts) scheduled for another attempt",
)
DEAD_LETTERED = Counter(
    "phoneshop_mail_dead_lettered_total",
    "Mails dead-lettered (a 5xx, MAIL_MAX_ATTEMPTS failures, or an unusable order)",
)
DUPLICATES = Counter(
    "phoneshop_mail_duplicates_total",
    "Redelivered events whose mail was already sent: acknowledged, nothing sent",
)
THROTTLED = Counter(
    "phoneshop_mail_throttled_total",
    "Of the retried: relay throttles (421, 451, 452, refused connection), not counted as attempts",
)
RECORD_RETRIES = Counter(
    "phoneshop_mail_record_retries_total",
    "Accepted mails whose record (sent marker, XACK) Redis refused and was tried again"
    " (a failover), instead of leaving the mail to be sent again",
)
IGNORED = Counter("phoneshop_mail_ignored_events_total", "Events that need no mail")
TRIMMED = Counter("phoneshop_mail_trimmed_events_total", "events entries trimmed (XTRIM MINID)")
SEND_DURATION = Histogram(
    "phoneshop_mail_send_duration_seconds",
    "One SMTP send (connect when needed, MAIL, RCPT, DATA), by outcome",
    ["outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
# The labelled children, looked up once rather than per mail.
SEND_ACCEPTED = SEND_DURATION.labels("accepted")
SEND_FAILED = SEND_DURATION.labels("failed")
PENDING = Gauge(
    "phoneshop_mail_pending_entries",
    "events entries delivered to the mailer group and not acknowledged yet (XPENDING)",
)
LAG = Gauge(
    "phoneshop_mail_lag_entries",
    "events entries not yet delivered to the mailer group (XINFO GROUPS lag; counted when"
    " Redis cannot say, up to 10000: see phoneshop_mail_lag_exact)",
)
LAG_EXACT = Gauge(
    "phoneshop_mail_lag_exact",
    "1 when phoneshop_mail_lag_entries is exact, 0 when it is a lower bound",
)
OLDEST_WAITING = Gauge(
    "phoneshop_mail_oldest_waiting_seconds",
    "Age of the oldest completed order whose mail the SMTP server has not accepted yet"
    " (0: none waiting)",
)
DELIVERY_LAG = Histogram(
    "phoneshop_mail_delivery_lag_seconds",
    "From the event (order completed) until the SMTP server accepted its mail",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0),
)
CONNECTIONS_LIMIT = Gauge(
    "phoneshop_mail_smtp_sessions_limit",
    "SMTP sessions this worker may use now (MAIL_CONCURRENCY, less while the relay refuses)",
)
RETRY_QUEUE = Gauge("phoneshop_mail_retry_queue", "Mails waiting for their next attempt")
DEAD_LETTERS = Gauge(
    "phoneshop_mail_dead_letters", "Entries in the partitions' dead-letter streams md{P}"
)

# MailWorker.stats names -> their counters.
COUNTERS = {
    "sent": SENT,
    "retries": RETRIED,
    "throttled": THROTTLED,
    "dead": DEAD_LETTERED,
    "duplicates": DUPLICATES,
    "record_retries": RECORD_RETRIES,
    "ignored": IGNORED,
    "trimmed": TRIMMED,
}


# Ports tried from MAIL_METRICS_PORT up: several workers of one host (make run's
# MAIL_WORKERS) each take the next free one.
PORTS_TRIED = 64


def serve(address: str, port: int) -> int:
    """Start the metrics endpoint in a daemon thread on the first free port from
    ``port`` up; returns that port."""
    for candidate in range(port, min(port + PORTS_TRIED, 65536)):
        try:
            start_http_server(candidate, addr=address)
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
            continue
        return candidate
    raise OSError(errno.EADDRINUSE, f"no free metrics port in {port}..{port + PORTS_TRIED - 1}")
