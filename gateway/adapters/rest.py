"""What the services' REST and JSON wire layers share (pure: no I/O, no clock reads): status →
cause mapping for refused calls, `Retry-After` and a body's retry hint, and strict JSON
parsing with readable type names for error messages. The I/O half (`post_with_retry`) is in
gateway/adapters/kit.py."""

from __future__ import annotations

import calendar
import json
import math
import re
import time
from typing import Any, Iterable, Mapping


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


_DAY = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_DAY_LONG = r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH = "(" + "|".join(_MONTHS) + ")"
_TIME = r"(\d\d):(\d\d):(\d\d)"
# RFC 9110 §5.6.7: IMF-fixdate, and the two obsolete forms a recipient must accept
_IMF_FIXDATE = re.compile(rf"{_DAY}, (\d\d) {_MONTH} (\d{{4}}) {_TIME} GMT")
_RFC850_DATE = re.compile(rf"{_DAY_LONG}, (\d\d)-{_MONTH}-(\d\d) {_TIME} GMT")
_ASCTIME_DATE = re.compile(rf"{_DAY} {_MONTH} ([ \d]\d) {_TIME} (\d{{4}})")


def parse_http_date(text: str, now: float) -> float | None:
    """Unix time of an HTTP-date (RFC 9110 §5.6.7): IMF-fixdate (``Sun, 06 Nov 1994 08:49:37
    GMT``), or the obsolete RFC 850 (``Sunday, 06-Nov-94 08:49:37 GMT``; its two-digit year is
    the latest one not more than 50 years after `now`) and asctime (``Sun Nov  6 08:49:37
    1994``) forms; case-sensitive, as the grammar is. None when it is none of them or names no
    real time (31 Feb)."""
    if m := _IMF_FIXDATE.fullmatch(text):
        day, month, year, hh, mm, ss = m.groups()
    elif m := _RFC850_DATE.fullmatch(text):
        day, month, yy, hh, mm, ss = m.groups()
        this_year = time.gmtime(now).tm_year
        year = str(this_year - this_year % 100 + int(yy))
        if int(year) > this_year + 50:  # "more than 50 years in the future": the century before
            year = str(int(year) - 100)
    elif m := _ASCTIME_DATE.fullmatch(text):
        month, day, hh, mm, ss, year = m.groups()
    else:
        return None
    fields = (int(year), _MONTHS.index(month) + 1, int(day), int(hh), int(mm), int(ss))
    if not (1 <= fields[2] <= _days_in(fields[0], fields[1]) and fields[3] < 24 and fields[4] < 60 and fields[5] < 61):
        return None
    return float(calendar.timegm((*fields, 0, 0, 0)))


def _days_in(year: int, month: int) -> int:
    return calendar.monthrange(year, month)[1]


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header value (RFC 9110 §10.2.3): the
    delay-seconds form (``120``: one or more digits) or an HTTP-date (`parse_http_date`),
    converted against `now` (Unix time, seconds; a date already past gives 0). None when the
    value is absent or malformed, or is a date and `now` is None (a sans-IO caller that has
    no clock: the I/O layer passes `time.time()`)."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    if now is None:
        return None
    when = parse_http_date(value, now)
    return None if when is None else max(0.0, when - now)


def body_retry_after(body: Any, keys: Iterable[str] = ("retryAfter", "retry_after")) -> float | None:
    """A retry hint in a JSON error body: the first of `keys` whose value is a finite
    non-negative number (seconds), else None. Services that put one there (the header still wins) name
    their keys."""
    if isinstance(body, dict):
        for key in keys:
            value = body.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf:
                return float(value)  # (1e400 parses as inf: not a wait)
    return None


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
