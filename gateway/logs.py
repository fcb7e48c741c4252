"""Logging that cannot leak secrets.

Libraries we use log URLs at DEBUG (trio-websocket: "Connecting to ws://…?token=…"; httpx:
request lines). `RedactSecrets` rewrites any record whose text holds a `token=` / `key=` /
`secret=` / `ref=` (VideoSDK's single-use ingest claim) query value, a JWT, or an `Authorization` header value, whatever logger or level it
comes from. It is installed on import of the adapters, so it holds in tests and embedders too.
"""

from __future__ import annotations

import logging
import re

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
