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


class GatewayError(Exception):
    """Base class of every error the gateway raises on purpose."""


class RemoteProtocolError(GatewayError):
    """The peer broke the wire protocol.

    `close_code` is the WebSocket close code to send back (RFC 6455 §7.4.1), 1002 unless the
    protocol says otherwise; `str(err)` is the close reason (kept under 123 bytes on the wire).
    """

    def __init__(self, message: str, *, close_code: int = 1002) -> None:
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
