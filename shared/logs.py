"""Log setup of the services: plain text or one JSON object per line, each line with its request id.

:class:`shared.http.RequestGuardMiddleware` stores the id of the request being served in
:data:`request_id_var`, and :class:`RequestIdFilter` copies it onto every log record as ``request_id``
("-" outside a request). Work that a request hands to a thread pool keeps the id, because
``run_in_threadpool`` copies the context, but a batch computed by a shared worker thread has none.

A JSON line has the keys ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``, ``request_id``,
and ``exception`` when the record carries a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import TextIO

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)


class RequestIdFilter(logging.Filter):
    """Set ``record.request_id`` to the id of the request being served, or "-" outside a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object on one line, for log collectors that parse fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id_var.get() or "-",
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def build_log_handler(log_format: str, *, stream: TextIO | None = None) -> logging.Handler:
    """Return a stream handler (stderr by default) that writes ``log_format`` lines with request ids.

    Raises ValueError for a format other than "text" or "json".
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format is {log_format!r}, expected one of {LOG_FORMATS}.")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(RequestIdFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT, datefmt="%H:%M:%S"))
    return handler


def configure_logging(log_format: str, *, level: int = logging.INFO, stream: TextIO | None = None) -> logging.Handler:
    """Replace the root logger's handlers with one :func:`build_log_handler` handler and return it."""
    handler = build_log_handler(log_format, stream=stream)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
