"""JSON-lines logging for the app (gunicorn master and workers) and the mail worker.

One JSON object per line on stdout::

    {"time": "2026-01-02T03:04:05.678Z", "level": "INFO", "logger": "phoneshop.access",
     "pid": 4242, "request_id": "5f0c...", "message": "POST /orders 201", "method": "POST",
     "route": "/orders", "status": 201, ...}

* ``request_id`` is the id of the request (or, in the mail worker, of the
  request whose event is being mailed) being handled when the line was
  written: :data:`request_id_var` holds it. nginx's access log carries the same
  id, so one grep follows a request through every process.
* Fields passed with ``extra=`` become top-level members.
* JSON escaping keeps a client-chosen path or name from forging a line, and a
  last scrub replaces anything shaped like ``Bearer <token>``: no line may
  carry a token (tests/test_operability.py greps every log of a stack run).

Stdlib only, and no prometheus_client: gunicorn's master imports this module
(through ``logconfig_dict`` in gunicorn.conf.py) before it forks the workers.
"""

from __future__ import annotations

import json
import logging
import logging.config
import re
import time
from contextvars import ContextVar
from typing import Any

# The request being handled in this task: set by the observe middleware
# (app/observe.py) and by the mail worker around each mail.
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

# One JSON line per HTTP request (app/observe.py); gunicorn's own access log is off.
ACCESS_LOGGER = "phoneshop.access"

_BEARER = re.compile(r"(?i)(bearer)(?:\s*,\s*|\s+|%20)[A-Za-z0-9._~+/=-]+")

# Attributes every LogRecord has: anything else on a record came from extra=.
_RECORD_FIELDS = frozenset(
    set(vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))) | {"message", "asctime"}
)


class JsonFormatter(logging.Formatter):
    """A LogRecord as one JSON line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        millis = int((record.created - seconds) * 1000)
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
        }
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id:
            line["request_id"] = request_id
        line["message"] = record.getMessage()
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and key not in line:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        text = json.dumps(line, ensure_ascii=False, default=str)
        return _BEARER.sub(r"\1 [redacted]", text)


def logging_config(level: str = "INFO", access_log: str = "-") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dict: every logger as JSON lines on stdout.

    ``access_log``: ``-`` writes the per-request access lines to stdout too, a
    path appends them to that file (reopened when rotated), ``""`` turns them off.
    gunicorn.conf.py passes this as ``logconfig_dict``; ``python -m mail`` uses
    :func:`configure`.
    """
    level = level.upper()
    handlers: dict[str, Any] = {
        "stdout": {
            "class": "logging.StreamHandler",
            "formatter": "json",
            "stream": "ext://sys.stdout",
        },
    }
    if access_log == "-":
        access_handlers, access_level = ["stdout"], "INFO"
    elif access_log:
        handlers["access_file"] = {
            "class": "logging.handlers.WatchedFileHandler",
            "formatter": "json",
            "filename": access_log,
        }
        access_handlers, access_level = ["access_file"], "INFO"
    else:
        access_handlers, access_level = [], "WARNING"  # off: the middleware skips the line
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": handlers,
        "root": {"level": level, "handlers": ["stdout"]},
        "loggers": {
            "gunicorn.error": {"level": level, "handlers": ["stdout"], "propagate": False},
            # Off: app/observe.py writes the access log, with the route and request id.
            "gunicorn.access": {"level": "WARNING", "handlers": [], "propagate": False},
            ACCESS_LOGGER: {
                "level": access_level,
                "handlers": access_handlers,
                "propagate": False,
            },
        },
    }


def configure(level: str = "INFO", access_log: str = "-") -> None:
    logging.config.dictConfig(logging_config(level, access_log))
