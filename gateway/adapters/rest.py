"""What the services' REST and JSON wire layers share: status → cause mapping for refused
calls, and strict JSON parsing with readable type names for error messages."""

from __future__ import annotations

import json
from typing import Any, Mapping


def status_cause(status: int, causes: Mapping[int, tuple[str, bool]]) -> tuple[str, bool]:
    """(cause, permanent) for a refused REST call: the service's own table first, then 5xx
    (not permanent), other 4xx (permanent), anything else (not permanent)."""
    if status in causes:
        return causes[status]
    if 500 <= status < 600:
        return "service error", False
    if 400 <= status < 500:
        return "request refused", True
    return "unexpected response", False


def json_type(value: Any) -> str:
    """'null', 'a boolean', 'a number', 'a string', 'an array' or 'an object' (RFC 8259 terms)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # RFC 8259 has no NaN or Infinity


def loads_strict(text: str | bytes) -> Any:
    """json.loads that refuses NaN / Infinity; raises ValueError (or RecursionError) like it."""
    return json.loads(text, parse_constant=_refuse_constant)
