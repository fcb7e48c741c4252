"""Logging that cannot leak secrets.

Libraries we use log URLs at DEBUG (trio-websocket: "Connecting to ws://…?token=…"; httpx:
request lines). `RedactSecrets` rewrites any record whose text holds a `token=` / `key=` /
`secret=` / `ref=` (VideoSDK's single-use ingest claim) query value, a JWT, or an `Authorization` header value, whatever logger or level it
comes from. It is installed on import of the adapters, so it holds in tests and embedders too.
A logger's filter only sees the records logged at that very logger, not its children's
(`gateway.endpoint.voipbin`, `httpcore.http11`), so the formatters of the daemon's handler
redact every line again, traceback included.

Two formats (`gateway --log-format`), both with the route and endpoint that `Tagged`
(gateway/endpoint.py) attaches to a record as the attributes `route` and `endpoint`:

    plain  2024-05-01 12:00:00,123 INFO    gateway.endpoint.voipbin: [support-line/call] connected
    json   {"ts": "2024-05-01T12:00:00.123Z", "level": "info", "logger": "gateway.endpoint.voipbin",
            "route": "support-line", "endpoint": "call", "msg": "connected"}

JSON is one object per line (journald, log shippers); `exc` holds a traceback when there is one.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import TextIO

_QUERY_SECRET = re.compile(r"(?i)\b((?:access_)?token|api_key|apikey|key|secret|password|ref)=([^&\s'\"<>]+)")
_JWT = re.compile(r"\beyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]{4,}")
_AUTH = re.compile(r"(?i)\b(authorization['\"]?\s*[:=,]\s*['\"]?(?:bot|bearer|basic)?\s*)([^\s'\",)]+)")

LIBRARY_LOGGERS = ("trio-websocket", "httpx", "httpcore", "hypercorn", "hypercorn.error", "hypercorn.access", "gateway")


def redact(text: str) -> str:
    """`text` with secret values replaced by ***."""
    text = _QUERY_SECRET.sub(r"\1=***", text)
    text = _JWT.sub("***", text)
    return _AUTH.sub(r"\1***", text)


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: let logging report it as usual
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True


_FILTER = RedactSecrets()


def install_redaction() -> None:
    """Attach the filter to the loggers that may see URLs or headers (idempotent)."""
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


LOG_FORMATS = ("plain", "json")
PLAIN_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(where)s%(message)s"


def where(record: logging.LogRecord) -> str:
    """`route/endpoint`, `route` or `endpoint`: what `Tagged` attached ("" when nothing)."""
    return "/".join(str(part) for part in (getattr(record, "route", None), getattr(record, "endpoint", None)) if part)


class _Redacting(logging.Formatter):
    """Redacts the traceback and stack text it makes. Logging caches a traceback on the record
    (`exc_text`) for every handler, and another handler may have made it: the formatters below
    redact what they write out as well."""

    def formatException(self, ei) -> str:
        return redact(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return redact(super().formatStack(stack_info))


class PlainFormatter(_Redacting):
    """For a terminal: `asctime level logger: [route/endpoint] message`."""

    def __init__(self) -> None:
        super().__init__(PLAIN_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        tag = where(record)
        return PLAIN_FORMAT % {**record.__dict__, "where": f"[{tag}] " if tag else ""}

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(_Redacting):
    """One JSON object per line: ts (ISO-8601 UTC, ms), level, logger, route and endpoint when
    known, msg, exc (traceback) and stack when there are any."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": _utc(record), "level": record.levelname.lower(), "logger": record.name}
        for key in ("route", "endpoint"):
            value = getattr(record, key, None)
            if value:
                entry[key] = str(value)
        entry["msg"] = redact(record.getMessage())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = redact(record.exc_text)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def _utc(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def log_handler(log_format: str, stream: TextIO) -> logging.Handler:
    """A handler writing `log_format` ("plain" or "json") lines to `stream`."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: expected one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else PlainFormatter())
    return handler
