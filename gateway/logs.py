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

No value from a peer can start a line: a record starts with its timestamp, and nothing else
does. Plain lines escape every control character of the message and the fields (C0, DEL, C1
including U+0085, and U+2028 / U+2029) as `\\n`, `\\r`, `\\t`, `\\xNN` or `\\uNNNN`; a
traceback stays multi-line, each of its lines indented as `  | …`, and the exception's own
message (which may quote a peer) is escaped to one line. JSON escapes C0 itself; U+007F-U+009F,
U+2028 and U+2029, which `json.dumps(ensure_ascii=False)` leaves raw, are written `\\uNNNN` too.
"""

from __future__ import annotations

import json
import logging
import re
import time
import traceback
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
CONTINUATION = "  | "
"""Starts every line of a traceback or stack in plain format (a record starts with a timestamp)."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""Characters that end a line for some reader (str.splitlines: \\n \\r \\v \\f \\x1c-\\x1e \\x85
\\u2028 \\u2029) or move a terminal's cursor (ESC): every C0 and C1 control, DEL, and the two
Unicode separators."""
_JSON_RAW = re.compile(r"[\x7f-\x9f\u2028\u2029]")
"""What json.dumps(ensure_ascii=False) leaves raw of `_CONTROL` (it escapes C0 itself)."""


def _escape_char(match: re.Match[str]) -> str:
    return repr(match.group())[1:-1]  # \n \r \t \x1b \x85 \u2028


def escape_controls(text: str) -> str:
    """`text` on one line: every control character written as repr() writes it (`\\n`, `\\x85`, `\\u2028`)."""
    return _CONTROL.sub(_escape_char, text)


def indented(block: str) -> str:
    """A multi-line text of ours (traceback, stack) for a plain log: every line escaped and
    prefixed with `CONTINUATION`, so none can pass for the start of a record."""
    return "\n".join(CONTINUATION + escape_controls(line) for line in block.rstrip("\n").split("\n"))


def where(record: logging.LogRecord) -> str:
    """`route/endpoint`, `route` or `endpoint`: what `Tagged` attached ("" when nothing)."""
    return "/".join(str(part) for part in (getattr(record, "route", None), getattr(record, "endpoint", None)) if part)


def format_exception(ei) -> str:
    """The traceback as `traceback.print_exception` writes it, except that each exception's own
    line (`ValueError: <message>`, notes, chained causes too) is escaped to one line: a message
    may quote a peer, and must not start a line of the log."""
    te = traceback.TracebackException(ei[0], ei[1], ei[2], compact=True)
    seen: set[int] = set()
    todo: list[traceback.TracebackException | None] = [te]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        original = current.format_exception_only

        def one_line(original=original):
            for chunk in original():
                yield escape_controls(chunk[:-1]) + "\n" if chunk.endswith("\n") else escape_controls(chunk)

        current.format_exception_only = one_line  # type: ignore[method-assign]  # this instance only
        todo += [current.__cause__, current.__context__, *(getattr(current, "exceptions", None) or ())]
    return "".join(te.format()).rstrip("\n")


class _Redacting(logging.Formatter):
    """Redacts the traceback and stack text it makes. Logging caches a traceback on the record
    (`exc_text`) for every handler, and another handler may have made it: the formatters below
    redact (and escape) what they write out as well."""

    def formatException(self, ei) -> str:
        return redact(format_exception(ei))

    def formatStack(self, stack_info: str) -> str:
        return redact(super().formatStack(stack_info))

    def _exc_text(self, record: logging.LogRecord) -> str:
        """The record's traceback, made here from `exc_info` (the `exc_text` another handler's
        formatter cached has the exception's message as it was), redacted."""
        if record.exc_info:
            return self.formatException(record.exc_info)
        return redact(record.exc_text) if record.exc_text else ""


class PlainFormatter(_Redacting):
    """For a terminal: `asctime level logger: [route/endpoint] message` (`logger[w1]` in a
    worker process of `gateway run --workers N`), then the traceback
    indented (`  | `). Every field is redacted, then escaped to one line."""

    def __init__(self) -> None:
        super().__init__(PLAIN_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        tag = escape_controls(redact(where(record)))
        return PLAIN_FORMAT % {
            **record.__dict__,
            "name": escape_controls(str(record.name)) + (f"[w{worker}]" if (worker := getattr(record, "worker", None)) is not None else ""),
            "levelname": escape_controls(str(record.levelname)),
            "where": f"[{tag}] " if tag else "",
            "message": escape_controls(redact(record.message)),
        }

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        exc_text = self._exc_text(record)
        if exc_text:
            text += "\n" + indented(exc_text)
        if record.stack_info:
            text += "\n" + indented(self.formatStack(record.stack_info))
        return text


class JsonFormatter(_Redacting):
    """One JSON object per line: ts (ISO-8601 UTC, ms), level, logger, worker (the index of a
    worker process of `gateway run --workers N`), route and endpoint when
    known, msg, exc (traceback) and stack when there are any. Values are kept as they were
    (JSON escapes them), redacted."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": _utc(record), "level": str(record.levelname).lower(), "logger": str(record.name)}
        worker = getattr(record, "worker", None)
        if worker is not None:  # a worker process of `gateway run --workers N` (gateway.workers)
            entry["worker"] = worker
        for key in ("route", "endpoint"):
            value = getattr(record, key, None)
            if value:
                entry[key] = redact(str(value))
        entry["msg"] = redact(record.getMessage())
        exc_text = self._exc_text(record)
        if exc_text:
            entry["exc"] = exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return _JSON_RAW.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(entry, ensure_ascii=False, default=str))


def _utc(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def log_handler(log_format: str, stream: TextIO) -> logging.Handler:
    """A handler writing `log_format` ("plain" or "json") lines to `stream`."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: expected one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else PlainFormatter())
    return handler
