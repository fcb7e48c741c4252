"""Errors, named for who is at fault (the trio / h11 convention).

- `RemoteProtocolError`: the peer sent something the protocol does not allow. Carries the
  WebSocket close code to send back (RFC 6455 §7.4.1): 1002 protocol error, 1003 unsupported
  data, 1007 invalid payload, 1008 policy violation, 1009 message too big.
- `LocalProtocolError`: we misused a protocol object (a bug on our side).
- `ConfigError`: the YAML does not fit the schema; names the file, line and key.
- `ServiceError`: a service refused us (REST status or rejected upgrade); `permanent` tells the
  route supervisor whether retrying can help. Messages never contain secrets.
- `CallEnded`: the peer ended the session normally (hangup, close without a close frame on
  VoIPBIN); the endpoint ends cleanly, nothing to retry.
"""

from __future__ import annotations

import enum


class CloseCode(enum.IntEnum):
    """WebSocket close codes we send or read (RFC 6455 §7.4.1; 1013 from the IANA registry).
    An IntEnum: it is the number on the wire and compares equal to it."""

    NORMAL = 1000
    """The session is over (a goodbye)."""
    GOING_AWAY = 1001
    """We are stopping (graceful stop, reload) or the route ended."""
    PROTOCOL_ERROR = 1002
    """The peer broke the protocol (framing, a message out of order)."""
    UNSUPPORTED_DATA = 1003
    """A message type the protocol does not carry (text where binary is expected, or back)."""
    ABNORMAL = 1006
    """Never sent: the connection dropped without a close frame."""
    INVALID_PAYLOAD = 1007
    """A message whose content is invalid (not UTF-8, bad JSON, a field of the wrong type)."""
    POLICY_VIOLATION = 1008
    """The peer is not allowed to (a bad or expired token, a second session)."""
    MESSAGE_TOO_BIG = 1009
    """A message over the limit."""
    INTERNAL_ERROR = 1011
    """We failed (a bug, or the route could not be served)."""
    TRY_AGAIN_LATER = 1013
    """At capacity: come back later."""


class GatewayError(Exception):
    """Base class of every error the gateway raises on purpose."""


class RemoteProtocolError(GatewayError):
    """The peer broke the wire protocol.

    `close_code` is the WebSocket close code to send back (RFC 6455 §7.4.1), 1002 unless the
    protocol says otherwise; `str(err)` is the close reason (kept under 123 bytes on the wire).
    """

    def __init__(self, message: str, *, close_code: int = CloseCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.close_code = close_code


class LocalProtocolError(GatewayError):
    """We used a protocol object wrongly (e.g. sent audio of the wrong size). A bug if seen."""


class ConfigError(GatewayError):
    """The configuration is invalid. The message names the file, line and key."""


class ServiceError(GatewayError):
    """A remote service refused a request.

    `status` is the HTTP status (None for a network failure); `permanent` is True when retrying
    with the same configuration cannot succeed (bad token, unknown channel, ...); `retry_after`
    is the seconds a 429 asked us to wait, else None.
    """

    def __init__(
        self, message: str, *, status: int | None = None, permanent: bool = False, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.permanent = permanent
        self.retry_after = retry_after


class CallEnded(GatewayError):
    """The peer ended the session normally; `reason` says how (hangup, closed, ...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
