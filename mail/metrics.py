"""The mail worker's Prometheus metrics, served on MAIL_METRICS_PORT (0 = off).

``python -m mail`` starts prometheus_client's small HTTP server (a thread) on
MAIL_METRICS_ADDRESS:MAIL_METRICS_PORT: ``GET /metrics`` there answers these
and the process's own (CPU, memory, open files). The worker is one process, so
its values live in its memory: never in a gunicorn instance's multiprocess
folder, even when PROMETHEUS_MULTIPROC_DIR leaked into its environment.
"""

from __future__ import annotations

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
    "Mails moved to mail:dead (a 5xx, MAIL_MAX_ATTEMPTS failures, or an unusable order)",
)
DUPLICATES = Counter(
    "phoneshop_mail_duplicates_total",
    "Redelivered events whose mail was already sent: acknowledged, nothing sent",
)
IGNORED = Counter("phoneshop_mail_ignored_events_total", "Events that need no mail")
TRIMMED = Counter("phoneshop_mail_trimmed_events_total", "events entries trimmed (XTRIM MINID)")
SEND_DURATION = Histogram(
    "phoneshop_mail_send_duration_seconds",
    "One SMTP send (connect when needed, MAIL, RCPT, DATA), by outcome",
    ["outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
PENDING = Gauge(
    "phoneshop_mail_pending_entries",
    "events entries delivered to the mailer group and not acknowledged yet (XPENDING)",
)
LAG = Gauge(
    "phoneshop_mail_lag_entries",
    "events entries not yet delivered to the mailer group (XINFO GROUPS lag)",
)
RETRY_QUEUE = Gauge("phoneshop_mail_retry_queue", "Mails waiting for their next attempt")
DEAD_LETTERS = Gauge("phoneshop_mail_dead_letters", "Entries in the mail:dead stream")

# MailWorker.stats names -> their counters.
COUNTERS = {
    "sent": SENT,
    "retries": RETRIED,
    "dead": DEAD_LETTERED,
    "duplicates": DUPLICATES,
    "ignored": IGNORED,
    "trimmed": TRIMMED,
}


def serve(address: str, port: int) -> None:
    """Start the metrics endpoint in a daemon thread."""
    start_http_server(port, addr=address)
