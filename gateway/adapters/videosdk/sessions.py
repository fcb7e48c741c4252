"""VideoSDK ingest sessions REST, sans-IO: ``POST /v2/ingest/sessions`` bodies for both sides.

Source: /work/shared/protocols/004_c69f0f37162481c1.txt ("Custom WebSocket": How It Works,
Step 1 "Create an Ingest Session", Troubleshooting, API Reference); "the example" is the
spec's linked videosdk-live/videosdk-socket-ingest-example (app.js).

The backend calls ``POST https://api.videosdk.live/v2/ingest/sessions`` (`SESSIONS_PATH`,
`session_request`, `authorization_header`) → ``{"message": "Ingest session created",
"data": {"wsUrl", "callId", "expiresIn": 90}}`` (`parse_session_response`; the listen side
reads the request with `parse_session_request` and answers with `session_response` or
`error_body`, and builds the wsUrl with `ingest_url` / reads its ref with
`parse_ingest_ref`). The wsUrl's ``ref`` query parameter is a single-use claim, valid 90 s
(`SESSION_EXPIRES_S`); the WebSocket it opens speaks `gateway.adapters.videosdk.frames`.

Spec ambiguities and the choices made
-------------------------------------
- **Session authorization**: the spec's curl sends ``Authorization: Bearer <token>``; the
  example and VideoSDK's other REST APIs send the bare token. We send ``Bearer``
  (`authorization_header`); the listen side accepts both (`parse_authorization`).

Secrets: the REST token is never stored or put in a message here; `IngestSession` keeps its
wsUrl (which holds the single-use ref) out of `repr`, and no error message contains a wsUrl,
a ref or a response body.
"""

from __future__ import annotations

import math
import urllib.parse
from typing import Any

import attrs

from gateway.adapters.rest import body_retry_after, loads_strict, status_cause
from gateway.adapters.videosdk.frames import _dumps
from gateway.errors import GatewayError, LocalProtocolError, ServiceError

__all__ = [
    "API_BASE_URL",
    "INGEST_PATH",
    "IngestSession",
    "SESSIONS_PATH",
    "SESSION_CREATED_MESSAGE",
    "SESSION_EXPIRES_S",
    "SessionError",
    "SessionRequest",
    "SessionRequestError",
    "authorization_header",
    "error_body",
    "ingest_url",
    "parse_authorization",
    "parse_ingest_ref",
    "parse_session_request",
    "parse_session_response",
    "session_request",
    "session_response",
]

# --- constants -----------------------------------------------------------------------------

API_BASE_URL = "https://api.videosdk.live"  # REST base (spec: Step 1)
SESSIONS_PATH = "/v2/ingest/sessions"  # POST: create an ingest session
SESSION_CREATED_MESSAGE = "Ingest session created"  # "message" of a successful response
INGEST_PATH = "/videosdk"  # WebSocket path of the spec's wsUrl example
SESSION_EXPIRES_S = 90  # seconds an unclaimed session stays valid ("expiresIn": 90)

# --- REST: ingest sessions ------------------------------------------------------------------


@attrs.frozen
class IngestSession:
    """A created ingest session (``POST /v2/ingest/sessions`` → ``data``)."""

    ws_url: str = attrs.field(repr=False)
    """``wsUrl``: the WebSocket to open, unmodified; its ``ref`` query parameter is a
    single-use claim, so it is kept out of `repr` (do not log it)."""
    call_id: str
    """``callId``: the backend handle of the session; lifecycle webhooks carry it."""
    expires_in: float
    """``expiresIn``: seconds before the unclaimed session expires (90; the default when
    absent). Connect and send the start frame before then."""


@attrs.frozen
class SessionRequest:
    """A session-creation request body (listen side), validated."""

    room_id: str
    """``roomId``: the room the stream joins."""
    participant: dict[str, Any] | None
    """``participant``: ``id``, ``name`` (strings), ``metadata`` (object), all optional."""
    agent: dict[str, Any] | None
    """``agent``: ``id`` (string, required when agent is given), ``metadata`` (object)."""
    region: str | None
    """``region``: pins the ingest region, e.g. "us002" or "in002"."""


class SessionError(ServiceError):
    """Creating an ingest session failed. `status` and `permanent` as in `ServiceError`;
    `retry_after` is the seconds the service asked us to wait (429), else None. The message
    names the cause and the room, never the token, the wsUrl or the response body."""


class SessionRequestError(GatewayError):
    """A session-creation request body is invalid (listen side): answer `status` (400) with
    `error_body(str(err))`. The message names the field."""

    status = 400


def _object_problem(value: Any, path: str, *, required_id: bool) -> str | None:
    if not isinstance(value, dict):
        return f"{path} must be an object"
    if required_id and "id" not in value:
        return f"{path}.id is required"
    for key in ("id", "name"):
        if key in value and (not isinstance(value[key], str) or not value[key]):
            return f"{path}.{key} must be a non-empty string"
    if "metadata" in value and not isinstance(value["metadata"], dict):
        return f"{path}.metadata must be an object"
    return None


def _session_problem(room_id: Any, participant: Any, agent: Any, region: Any) -> str | None:
    """The first field of a session request that breaks the spec's table, by its JSON name."""
    if not isinstance(room_id, str) or not room_id:
        return "roomId is required (a non-empty string)"
    if participant is not None:
        problem = _object_problem(participant, "participant", required_id=False)
        if problem:
            return problem
    if agent is not None:
        problem = _object_problem(agent, "agent", required_id=True)
        if problem:
            return problem
    if region is not None and (not isinstance(region, str) or not region):
        return "region must be a non-empty string"
    return None


def session_request(
    room_id: str,
    participant: dict[str, Any] | None = None,
    agent: dict[str, Any] | None = None,
    region: str | None = None,
) -> dict[str, Any]:
    """JSON body of ``POST {API_BASE_URL}/v2/ingest/sessions`` (spec: Step 1's table).

    ``{"roomId": room_id}`` plus ``participant`` (``id``, ``name``, ``metadata``), ``agent``
    (``id`` required, ``metadata``) and ``region`` when given; None fields are omitted, other
    keys pass through. Send it with ``Authorization: <authorization_header(token)>`` and
    ``Content-Type: application/json``. Raises `LocalProtocolError` naming the bad field."""
    problem = _session_problem(room_id, participant, agent, region)
    if problem:
        raise LocalProtocolError(f"session request: {problem}")
    body: dict[str, Any] = {"roomId": room_id}
    if participant is not None:
        body["participant"] = dict(participant)
    if agent is not None:
        body["agent"] = dict(agent)
    if region is not None:
        body["region"] = region
    return body


def parse_session_request(body: bytes | str) -> SessionRequest:
    """The validated body of a session-creation request (listen side), or
    `SessionRequestError` naming the field ("roomId is required (a non-empty string)",
    "agent.id is required", "participant.metadata must be an object", ...)."""
    try:
        parsed = loads_strict(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise SessionRequestError("request body is not JSON") from None
    if not isinstance(parsed, dict):
        raise SessionRequestError("request body must be a JSON object")
    fields: list[Any] = [parsed.get(key) for key in ("roomId", "participant", "agent", "region")]  # checked next
    problem = _session_problem(*fields)
    if problem:
        raise SessionRequestError(problem)
    return SessionRequest(*fields)


def authorization_header(token: str) -> str:
    """``Authorization`` value for the session call: ``Bearer <token>`` (the spec's curl).
    Raises `LocalProtocolError` (without the token) for an empty token or one containing
    whitespace or control characters (which would break the header)."""
    if not isinstance(token, str) or not token or not token.isprintable() or any(c.isspace() for c in token):
        raise LocalProtocolError("VideoSDK token must be a non-empty string without spaces or control characters")
    return f"Bearer {token}"


def parse_authorization(value: str | None, scheme: str = "Bearer") -> str | None:
    """The token of an ``Authorization`` header (listen side): ``<scheme> <token>`` (scheme
    matched case-insensitively) or a bare token, as VideoSDK clients send either. None when
    the header is absent, empty, uses another scheme, or has no or several tokens."""
    if value is None:
        return None
    parts = value.split()
    if len(parts) == 1:
        return None if parts[0].lower() == scheme.lower() else parts[0]
    if len(parts) == 2 and parts[0].lower() == scheme.lower():
        return parts[1]
    return None


def session_response(ws_url: str, call_id: str, expires_in: float = SESSION_EXPIRES_S) -> bytes:
    """JSON body of a successful session creation (listen side), in the spec's shape:
    ``{"message":"Ingest session created","data":{"wsUrl":…,"callId":…,"expiresIn":90}}``."""
    if not ws_url or not call_id:
        raise LocalProtocolError("session_response needs a wsUrl and a callId")
    data = {"wsUrl": ws_url, "callId": call_id, "expiresIn": expires_in}
    return _dumps({"message": SESSION_CREATED_MESSAGE, "data": data}).encode("utf-8")


def error_body(message: str) -> bytes:
    """JSON error body (listen side): ``{"message": …}``, which VideoSDK clients show
    (the example: ``data.message || `HTTP ${status}```). Never put a token in `message`."""
    return _dumps({"message": message}).encode("utf-8")


# status -> (cause, permanent); spec "Troubleshooting": 401/403 token missing or expired.
_STATUS_CAUSES = {
    400: ("bad request", True),
    401: ("token rejected (missing or expired)", True),
    403: ("token rejected (missing or expired)", True),
    404: ("room not found (or wrong API URL)", True),
    408: ("request timed out", False),
    429: ("rate limited", False),
}


def _body_retry_after(body: Any) -> float | None:
    return body_retry_after(body, ("retryAfter", "retry_after"))


def _is_ws_url(url: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return False
    return parts.scheme.lower() in ("ws", "wss") and bool(parts.netloc)


def parse_session_response(
    status: int,
    body: bytes | str,
    *,
    room_id: str | None = None,
    retry_after_s: float | None = None,
) -> IngestSession:
    """The session from a ``POST /v2/ingest/sessions`` response, or `SessionError` (a
    `ServiceError`).

    2xx with ``{"data": {"wsUrl", "callId"[, "expiresIn"]}}`` → `IngestSession`. Errors by
    status: 400 "bad request", 401 and 403 "token rejected (missing or expired)", 404 "room
    not found (or wrong API URL)" (all permanent); 429 "rate limited" (not permanent;
    `retry_after` from `retry_after_s`, e.g. the ``Retry-After`` header in seconds, else from
    a ``retryAfter`` number in the body); 408 and 5xx not permanent; other 4xx permanent. A 2xx
    body that is not a JSON object, has no ``data`` object, no ``data.wsUrl`` (a ws:// or
    wss:// URL), no ``data.callId``, or a ``data.expiresIn`` that is not a number of seconds
    is an error naming that field, not permanent. Messages name the room when given, never
    the token, the wsUrl or the body.
    """
    where = "VideoSDK ingest session" + (f" (room {room_id})" if room_id else "")
    try:
        parsed: Any = loads_strict(body) if body else None
    except (ValueError, RecursionError):
        parsed = None
    if 200 <= status < 300:

        def bad(what: str) -> SessionError:
            return SessionError(f"{where}: {what} (HTTP {status})", status=status, permanent=False)

        if not isinstance(parsed, dict):
            raise bad("response is not a JSON object")
        data = parsed.get("data")
        if not isinstance(data, dict):
            raise bad("response has no data object")
        ws_url = data.get("wsUrl")
        if not isinstance(ws_url, str) or not ws_url:
            raise bad("response has no data.wsUrl")
        if not _is_ws_url(ws_url):
            raise bad("response data.wsUrl is not a ws:// or wss:// URL")
        call_id = data.get("callId")
        if not isinstance(call_id, str) or not call_id:
            raise bad("response has no data.callId")
        expires_in = data.get("expiresIn", SESSION_EXPIRES_S)
        if (
            isinstance(expires_in, bool)
            or not isinstance(expires_in, (int, float))
            or not math.isfinite(expires_in)
            or expires_in < 0
        ):
            raise bad("response data.expiresIn is not a number of seconds")
        return IngestSession(ws_url=ws_url, call_id=call_id, expires_in=expires_in)
    cause, permanent = status_cause(status, _STATUS_CAUSES)
    retry_after = None
    if status == 429:
        retry_after = retry_after_s if retry_after_s is not None else _body_retry_after(parsed)
    suffix = f", retry after {retry_after:g} s" if retry_after is not None else ""
    raise SessionError(
        f"{where}: {cause} (HTTP {status}{suffix})", status=status, permanent=permanent, retry_after=retry_after
    )


def ingest_url(base_url: str, ref: str) -> str:
    """A wsUrl (listen side): `base_url` (a ws:// or wss:// URL, e.g.
    ``wss://gateway.example/videosdk``, `INGEST_PATH` being the spec's path) with
    ``ref=<ref>`` added to its query. Raises `LocalProtocolError` (without the ref) for
    another scheme or an empty ref."""
    if not isinstance(ref, str) or not ref:
        raise LocalProtocolError("ingest ref must be a non-empty string")
    if not _is_ws_url(base_url):
        raise LocalProtocolError("ingest base URL must be a ws:// or wss:// URL with a host")
    parts = urllib.parse.urlsplit(base_url)
    query = urllib.parse.urlencode([("ref", ref)], quote_via=urllib.parse.quote, safe="")
    if parts.query:
        query = f"{parts.query}&{query}"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path or "/", query, ""))


def parse_ingest_ref(target: str) -> str | None:
    """The ``ref`` of an ingest WebSocket request target (``/videosdk?ref=…``) or URL (listen
    side); None when absent, empty, or given more than once."""
    try:
        query = urllib.parse.urlsplit(target).query
        values = urllib.parse.parse_qs(query, keep_blank_values=True, max_num_fields=64).get("ref", [])
    except ValueError:
        return None
    return values[0] if len(values) == 1 and values[0] else None
