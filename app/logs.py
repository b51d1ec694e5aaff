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

import asyncio
import json
import logging
import logging.config
import os
import re
import sys
import time
from contextvars import ContextVar
from typing import Any, TextIO

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


# One encoder for every line: json.dumps with arguments builds a new one per call.
_encode = json.JSONEncoder(ensure_ascii=False, default=str).encode


class JsonFormatter(logging.Formatter):
    """A LogRecord as one JSON line (see the module docstring)."""

    # The formatted whole seconds of the last line: most lines share them.
    _second = -1
    _second_text = ""

    def _timestamp(self, created: float) -> str:
        seconds = int(created)
        if seconds != self._second:
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
            self._second = seconds
        return f"{self._second_text}.{int((created - seconds) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self._timestamp(record.created),
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
        return encode_line(line)


def encode_line(line: dict[str, Any]) -> str:
    """One log line's members as its JSON text, any bearer token scrubbed."""
    text = _encode(line)
    # The regex only where the word is: a plain search is ten times cheaper.
    if "bearer" in text.lower():
        text = _BEARER.sub(r"\1 [redacted]", text)
    return text


class AccessLogHandler(logging.Handler):
    """The access log's handler: each line formatted when it is logged, and all the
    lines of one event-loop turn written together at its end, in one write, instead
    of a write and a flush each (and, for a file, a stat each to notice rotation,
    as WatchedFileHandler does: here at most once a second). Outside a running
    loop each line is written at once; with batching off (OBSERVE_BATCHING=0,
    for A/B runs) each line is written at once after a rotation check, which is
    what this handler replaced.

    ``filename`` None writes to stdout; a path is appended to, and reopened when
    it was rotated (moved or removed) since.
    """

    batching = True
    # How often, at most, a file's identity is checked for rotation.
    rotation_check_s = 1.0

    def __init__(self, filename: str | None = None) -> None:
        super().__init__()
        self.filename = filename
        self.lines: list[str] = []
        self.scheduled = False
        self.checked_at = 0.0
        self.identity: tuple[int, int] | None = None
        self.stream: TextIO = sys.stdout if filename is None else self._open()

    def _open(self) -> TextIO:
        assert self.filename is not None
        stream = open(self.filename, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        stat = os.fstat(stream.fileno())
        self.identity = (stat.st_dev, stat.st_ino)
        self.checked_at = time.monotonic()
        return stream

    def _reopen_if_rotated(self) -> None:
        now = time.monotonic()
        if self.filename is None or now - self.checked_at < self.rotation_check_s:
            return
        self.checked_at = now
        try:
            stat = os.stat(self.filename)
            current: tuple[int, int] | None = (stat.st_dev, stat.st_ino)
        except FileNotFoundError:
            current = None
        if current != self.identity:
            self.stream.close()
            self.stream = self._open()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.add(text)

    def add(self, text: str) -> None:
        """Write one formatted line (with the turn's others, when batching)."""
        self.lines.append(text)
        if not self.batching:
            self.flush()
            return
        if self.scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self.scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self.acquire()
        try:
            self.scheduled = False
            if not self.lines:
                return
            text = "\n".join(self.lines) + "\n"
            self.lines.clear()
            self._reopen_if_rotated()
            self.stream.write(text)
            self.stream.flush()
        finally:
            self.release()

    def close(self) -> None:
        self.flush()
        if self.filename is not None:
            self.stream.close()
        super().close()


# The pid on every line: getpid is a syscall, and the access log writes a line per
# request. Refreshed in a forked child (gunicorn's workers).
_pid = os.getpid()


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)


class DirectAccessLog:
    """The access lines written straight to the access logger's handler: the line
    logging would write, without the LogRecord, the caller lookup, the filters and
    the handler lookup in between (a line per request: 13-21 us direct against
    23-53 us through logging, timed on this loaded 2-core box).

    Only for the setup :func:`logging_config` makes: the logger's one handler an
    :class:`AccessLogHandler` with the :class:`JsonFormatter`, no filters, no
    propagation. :meth:`write` says False for anything else (a test's handler,
    a filter added later), and the caller logs through logging instead.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def _handler(self) -> AccessLogHandler | None:
        logger = self.logger
        handlers = logger.handlers
        if len(handlers) != 1 or logger.filters or logger.propagate:
            return None
        handler = handlers[0]
        if (
            type(handler) is not AccessLogHandler
            or type(handler.formatter) is not JsonFormatter
            or handler.filters
            or handler.level > logging.INFO
        ):
            return None
        return handler

    def write(self, message: str, fields: dict[str, Any]) -> bool:
        """Write an INFO line of ``message`` and ``fields`` (as ``extra=``) if the
        setup allows; False when the caller must log it through logging."""
        handler = self._handler()
        if handler is None:
            return False
        formatter = handler.formatter
        assert isinstance(formatter, JsonFormatter)
        # The members and their order of JsonFormatter.format's line.
        line: dict[str, Any] = {
            "time": formatter._timestamp(time.time()),
            "level": "INFO",
            "logger": self.logger.name,
            "pid": _pid,
        }
        request_id = request_id_var.get()
        if request_id:
            line["request_id"] = request_id
        line["message"] = message
        for key, value in fields.items():
            if key not in line:
                line[key] = value
        handler.acquire()
        try:
            handler.add(encode_line(line))
        finally:
            handler.release()
        return True


def set_batching(enabled: bool) -> None:
    """Write the access lines of a loop turn together and check a file for rotation
    at most once a second (default); or, off, write each line at once and check the
    file before each, as the stdlib's WatchedFileHandler does (the A side of the
    bench's A/B)."""
    for handler in logging.getLogger(ACCESS_LOGGER).handlers:
        if isinstance(handler, AccessLogHandler):
            handler.flush()
    AccessLogHandler.batching = enabled
    AccessLogHandler.rotation_check_s = 1.0 if enabled else 0.0


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
    if access_log:
        handlers["access"] = {
            "()": f"{__name__}.AccessLogHandler",
            "formatter": "json",
            "filename": None if access_log == "-" else access_log,
        }
        access_handlers, access_level = ["access"], "INFO"
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
