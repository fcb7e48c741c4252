"""Voice-agent SDK WebSocket, sans-IO: token REST shapes, handshake, control messages, PCM audio.

Source: /work/shared/protocols/003_300445899f8ad283.txt ("1. Fetch Session Token", "2. Connect
WebSocket", "3. Microphone Capture", "4. Audio Playback", "5. Complete Example").

The flow (the spec's page is the client; the gateway plays either role):

1. ``POST {api_url}/api/v1/sdk/token`` with ``Authorization: Bearer <api_key>`` (`token_url`,
   `token_request_headers`) → ``{"token", "ws_url"}`` (`parse_token_response`; the listen side
   checks the key with `parse_bearer` and answers with `token_response`).
2. Open a WebSocket to ``ws_url``; the client's first message is the text ``{"token":"…"}``
   (`AgentClient.start`; the listen side gets `TokenPresented` from `AgentServer.receive`).
3. The server answers with JSON text control messages: ``{"type":"connected"}`` (the client
   may start sending audio), ``{"type":"agent_ready"}``, ``{"type":"session_ended","reason":…}``
   (one of `SESSION_END_REASONS`) and ``{"type":"error","code":…,"message":…}``.
4. Audio both ways is binary PCM16 (signed 16-bit little-endian), 16 kHz, mono; the spec's page
   sends 640-byte (20 ms, 320-sample) frames and plays whatever whole samples arrive.

State machines (literal tables below, h11 style)
------------------------------------------------
`AgentClient` (the gateway dials an agent service)::

    AWAITING_CONNECTED --connected--> CONNECTED --session_ended--> ENDED
    AWAITING_CONNECTED --session_ended--> ENDED
    error and unknown types: no change; agent_ready and audio: CONNECTED only

`AgentServer` (the gateway serves browsers / SDK clients)::

    AWAITING_TOKEN --receive {"token"}--> TOKEN_PRESENTED --accept()--> CONNECTED
    any state but ENDED --session_ended()--> ENDED

A call that raises changes no state (the audio carry byte included), so the adapter can still
send its goodbye (`error_message`, close frame) from a consistent object.

Audio alignment
---------------
A binary message need not be 640 bytes, nor even an even number of bytes. `Audio.pcm` always
holds whole samples: an odd trailing byte is kept and put in front of the next binary message
(text messages in between do not disturb it). So 641 bytes then 639 bytes give two `Audio`
events of 640 bytes each, and the samples are exactly those the peer meant; a 1-byte message
gives no event until its partner arrives. A byte still held when the session ends is dropped
(`pending_audio_bytes` says whether one is held). `send_audio` takes whole samples only: the
spec's page decodes with ``new Int16Array(buf)``, which throws on an odd byte count.

Close codes (`RemoteProtocolError.close_code`, RFC 6455 §7.4.1)
--------------------------------------------------------------
- 1002 protocol error: a message the state does not allow (audio or ``agent_ready`` before
  ``connected``, a second ``connected``, anything after ``session_ended`` on the client; any
  message between `TokenPresented` and `accept`, a second token message on the server).
- 1007 invalid payload: text that is not JSON (RFC 8259; NaN/Infinity refused), JSON that is not
  an object, ``type`` missing or not a string, a known message whose field has the wrong type
  (``reason``, ``code``, ``message``).
- 1008 policy violation (server): the first message is not ``{"token": <non-empty string>}``
  (binary, not JSON, not an object, no token, token not a string or empty). The 5 s deadline
  for the token (`TOKEN_TIMEOUT_S`) is the adapter's timer; on expiry it closes with 1008 too.
- 1009 message too big: any single message over `MAX_MESSAGE_BYTES` (64 KiB), text or binary.

Unknown control message types are not errors (forward compatibility): they come out as
`Unknown(type)` for the adapter to log and ignore. One client message is a gateway extension
(the spec defines no client control messages): ``{"type":"dtmf","digit":"5"}`` gives
`ClientDtmf` on the server side (a key pressed on the page, for the route's phone call).
"If this raises anything but RemoteProtocolError, that's a bug" (h11); misuse raises
`LocalProtocolError`.

Secrets: no `repr`, `str` or error message produced here contains the session token or the API
key. `TokenPresented` and `TokenGrant` carry the token but keep it out of `repr`; strings the
peer sends (error text, reasons, unknown types) are returned with the session token, if it
appears in them, replaced by ``[token]``.
"""

from __future__ import annotations

import enum
import json
import urllib.parse
from typing import Any

import attrs

from gateway.adapters.rest import (
    body_retry_after,
    json_type as _json_type,
    loads_strict,
    parse_retry_after,
    status_cause,
)
from gateway.errors import CloseCode, LocalProtocolError, RemoteProtocolError, ServiceError

__all__ = [
    "CHANNELS",
    "FRAME_BYTES",
    "MAX_MESSAGE_BYTES",
    "PTIME_MS",
    "SAMPLE_BYTES",
    "SAMPLE_RATE",
    "SAMPLES_PER_FRAME",
    "SESSION_END_REASONS",
    "TOKEN_PATH",
    "TOKEN_TIMEOUT_S",
    "AgentClient",
    "AgentError",
    "AgentReady",
    "AgentServer",
    "Audio",
    "ClientDtmf",
    "ClientEvent",
    "ClientState",
    "Connected",
    "ServerEvent",
    "ServerState",
    "SessionEnded",
    "TokenGrant",
    "TokenPresented",
    "TokenRequestError",
    "Unknown",
    "error_message",
    "parse_bearer",
    "parse_token_response",
    "token_request_headers",
    "token_response",
    "token_url",
]

SAMPLE_RATE = 16000  # Hz, both directions (spec: "downsample to 16kHz", "sampleRate: 16000")
CHANNELS = 1  # mono (spec: "channelCount: 1")
SAMPLE_BYTES = 2  # bytes per sample: signed 16-bit little-endian (spec: "convert to Int16")
PTIME_MS = 20  # milliseconds of audio per frame the spec's page sends
SAMPLES_PER_FRAME = SAMPLE_RATE * PTIME_MS // 1000  # 320 samples per 20 ms ("FRAME_SAMPLES = 320")
FRAME_BYTES = SAMPLES_PER_FRAME * SAMPLE_BYTES  # 640 bytes per 20 ms ("send 640-byte frames")
MAX_MESSAGE_BYTES = 64 * 1024  # bytes (64 KiB, ~2 s of audio); a larger message is refused, 1009
TOKEN_TIMEOUT_S = 5.0  # seconds the listen adapter waits for the token message (gateway policy)
#: ``session_ended`` reasons the spec lists ("msg.reason: ...").
SESSION_END_REASONS = ("agent_disconnected", "session_closed", "server_shutdown")

_REDACTED = "[token]"
_JSON_SEPARATORS = (",", ":")  # compact, as JSON.stringify writes it


# --- events ------------------------------------------------------------------------------


@attrs.frozen
class Connected:
    """``{"type":"connected"}``: the session is ready; the client may send audio now."""


@attrs.frozen
class AgentReady:
    """``{"type":"agent_ready"}``: the AI agent is listening and responding."""


@attrs.frozen
class SessionEnded:
    """``{"type":"session_ended"}``: the server ended the session; close the WebSocket (1000)."""

    reason: str | None
    """``reason`` as sent: "agent_disconnected", "session_closed", "server_shutdown" (the spec's
    values) or a newer one, passed through; None when the message has no reason."""


@attrs.frozen
class AgentError:
    """``{"type":"error"}``: the server reports an error (a bad token, for one). The server
    usually closes after it; the state does not change."""

    code: str | int | None
    """``code`` as sent (a string or an integer); None when absent."""
    message: str | None
    """``message``, human-readable text; None when absent."""


@attrs.frozen
class Unknown:
    """A JSON control message of a type this module does not know; ignore it (the spec's page
    does). Reported so the adapter can log it."""

    type: str
    """The message's ``type``."""


@attrs.frozen
class Audio:
    """PCM audio from the peer: whole samples, in the order sent."""

    pcm: bytes = attrs.field(repr=lambda pcm: f"<{len(pcm)} bytes>")
    """Signed 16-bit little-endian mono samples at 16 kHz; an even, non-zero number of bytes,
    not necessarily 640 (see "Audio alignment" in the module docstring). `repr` shows the
    length only."""


@attrs.frozen
class TokenPresented:
    """The client's first message, ``{"token":"…"}`` (server side). Check the token, then call
    `AgentServer.accept` (or send `error_message` and close with 1008)."""

    token: str = attrs.field(repr=False)
    """The session token the client presented. Kept out of `repr`; never log it."""


_CONNECTED = Connected()
_AGENT_READY = AgentReady()

ClientEvent = Connected | AgentReady | SessionEnded | AgentError | Unknown | Audio
@attrs.frozen
class ClientDtmf:
    """``{"type":"dtmf","digit":"5"}`` from the client (server side): a gateway extension, not
    in the spec. The adapter checks the digit (one DTMF key, else it logs and ignores it)."""

    digit: str | None
    """``digit`` as sent (the session token, if in it, replaced); None when absent or not a
    string."""


ServerEvent = TokenPresented | Unknown | Audio | ClientDtmf


# --- shared parsing ------------------------------------------------------------------------


def _loads(text: str | bytes) -> Any:
    """JSON value of `text`; ValueError (or RecursionError) when it is not JSON."""
    return loads_strict(text)


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=_JSON_SEPARATORS)


def _classify(message: Any) -> tuple[str | None, bytes | None]:
    """(text, None) or (None, data) for one WebSocket message; refuses anything larger than
    `MAX_MESSAGE_BYTES` (1009) and anything that is not str or bytes-like (our misuse)."""
    if isinstance(message, str):
        size = len(message)
        if size * 4 > MAX_MESSAGE_BYTES and size <= MAX_MESSAGE_BYTES:
            size = len(message.encode("utf-8", "surrogatepass"))  # UTF-8 size, only when it matters
        if size > MAX_MESSAGE_BYTES:
            raise RemoteProtocolError(
                f"text message over {MAX_MESSAGE_BYTES} bytes (64 KiB limit)", close_code=CloseCode.MESSAGE_TOO_BIG
            )
        return message, None
    if isinstance(message, (bytes, bytearray, memoryview)):
        data = message if isinstance(message, bytes) else bytes(message)
        if len(data) > MAX_MESSAGE_BYTES:
            raise RemoteProtocolError(
                f"binary message {len(data)} bytes, limit {MAX_MESSAGE_BYTES} (64 KiB)", close_code=CloseCode.MESSAGE_TOO_BIG
            )
        return None, data
    raise LocalProtocolError(f"a WebSocket message is str or bytes, got {type(message).__name__}")


def _control(text: str) -> dict[str, Any]:
    """The JSON object of one control message with a string ``type``, else 1007."""
    try:
        value = _loads(text)
    except (ValueError, RecursionError):
        raise RemoteProtocolError("control message is not valid JSON", close_code=CloseCode.INVALID_PAYLOAD) from None
    if not isinstance(value, dict):
        raise RemoteProtocolError(
            f"control message is {_json_type(value)}, expected a JSON object", close_code=CloseCode.INVALID_PAYLOAD
        )
    kind = value.get("type")
    if not isinstance(kind, str):
        what = "has no type" if "type" not in value else f"type is {_json_type(kind)}, expected a string"
        raise RemoteProtocolError(f"control message {what}", close_code=CloseCode.INVALID_PAYLOAD)
    return value


def _align(carry: bytes, data: bytes) -> tuple[bytes, bytes]:
    """(whole samples, byte left over) from the carried byte followed by `data`."""
    if carry:
        data = carry + data
    if len(data) & 1:
        return data[:-1], data[-1:]
    return data, b""


def _check_pcm(pcm: Any) -> bytes:
    """`pcm` as bytes if it is whole samples and fits one message, else LocalProtocolError."""
    if not isinstance(pcm, (bytes, bytearray, memoryview)):
        raise LocalProtocolError(f"send_audio takes bytes, got {type(pcm).__name__}")
    data = pcm if isinstance(pcm, bytes) else bytes(pcm)
    size = len(data)
    if size == 0 or size % SAMPLE_BYTES:
        raise LocalProtocolError(
            f"send_audio takes whole 16-bit samples (an even, non-zero byte count), got {size} bytes"
        )
    if size > MAX_MESSAGE_BYTES:
        raise LocalProtocolError(f"send_audio got {size} bytes, more than one message may hold ({MAX_MESSAGE_BYTES})")
    return data


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, _REDACTED) if token and token in text else text


def error_message(code: str, message: str) -> str:
    """``{"type":"error","code":…,"message":…}``, the text an agent server sends to report an
    error (the spec's page logs ``msg.code, msg.message``), e.g. before closing with 1008.

    Suggested codes: "invalid_token" for a token refused, "protocol_error" with `str(err)` of a
    `RemoteProtocolError`. Never put a token or key in `message`. `LocalProtocolError` when
    `code` is not a non-empty string or `message` is not a string.
    """
    if not isinstance(code, str) or not code:
        raise LocalProtocolError("error code must be a non-empty string")
    if not isinstance(message, str):
        raise LocalProtocolError("error message must be a string")
    return _dumps({"type": "error", "code": code, "message": message})


# --- client: the gateway dials an agent service --------------------------------------------


class ClientState(enum.Enum):
    """Where an `AgentClient` is in the session."""

    AWAITING_CONNECTED = "awaiting_connected"  #: token sent (or about to be), no ``connected`` yet
    CONNECTED = "connected"  #: ``connected`` received; audio flows both ways
    ENDED = "ended"  #: ``session_ended`` received; close the WebSocket


_AUDIO = "audio"  # table key of a binary message
_UNKNOWN = "unknown"  # table key of a control message of an unknown type
_SERVER_TYPES = frozenset({"connected", "agent_ready", "session_ended", "error"})

#: state -> {what arrived -> next state}; anything missing is a protocol error (1002).
_CLIENT_TABLE: dict[ClientState, dict[str, ClientState]] = {
    ClientState.AWAITING_CONNECTED: {
        "connected": ClientState.CONNECTED,
        "session_ended": ClientState.ENDED,
        "error": ClientState.AWAITING_CONNECTED,
        _UNKNOWN: ClientState.AWAITING_CONNECTED,
    },
    ClientState.CONNECTED: {
        "agent_ready": ClientState.CONNECTED,
        "session_ended": ClientState.ENDED,
        "error": ClientState.CONNECTED,
        _UNKNOWN: ClientState.CONNECTED,
        _AUDIO: ClientState.CONNECTED,
    },
    ClientState.ENDED: {},
}
_CLIENT_WHERE = {
    ClientState.AWAITING_CONNECTED: "before connected",
    ClientState.CONNECTED: "after connected",
    ClientState.ENDED: "after session_ended",
}


@attrs.define(init=False)
class AgentClient:
    """The client side of one agent session (the gateway dialing an agent service), sans-IO.

    ``AgentClient(token)``: `token` is the session token from `parse_token_response`; it is sent
    by `start` and kept out of `repr` and every error. Once the WebSocket is open, send
    `start()` as a text message, then feed every message received to `receive`; send
    `send_audio(pcm)` as binary messages once `Connected` has arrived. There is no message to
    end the session from the client side: close the WebSocket (1000).
    """

    state: ClientState
    """AWAITING_CONNECTED, then CONNECTED after ``connected``, ENDED after ``session_ended``."""
    agent_ready: bool
    """True once ``agent_ready`` has arrived (the agent is listening)."""
    _token: str = attrs.field(repr=False)
    _token_sent: bool
    _carry: bytes

    def __init__(self, token: str) -> None:
        if not isinstance(token, str) or not token:
            raise LocalProtocolError("session token must be a non-empty string")
        self.state = ClientState.AWAITING_CONNECTED
        self.agent_ready = False
        self._token = token
        self._token_sent = False
        self._carry = b""

    @property
    def pending_audio_bytes(self) -> int:
        """Bytes of an incomplete sample held for the next binary message (0 or 1)."""
        return len(self._carry)

    def start(self) -> str:
        """The first message, text ``{"token":"…"}`` (spec: ``JSON.stringify({ token })``).
        Once only, before ``connected``; `LocalProtocolError` otherwise."""
        if self._token_sent or self.state is not ClientState.AWAITING_CONNECTED:
            raise LocalProtocolError("start() is the session's first message and is sent once")
        self._token_sent = True
        return _dumps({"token": self._token})

    def receive(self, message: str | bytes | bytearray | memoryview) -> list[ClientEvent]:
        """Events from one WebSocket message: text (str) is a control message, binary is audio.

        One event per text message (`Connected`, `AgentReady`, `SessionEnded`, `AgentError` or
        `Unknown`); `[Audio]` or ``[]`` (a lone byte held for alignment) per binary message.
        Raises `RemoteProtocolError` with the close code to send (module docstring).
        """
        text, data = _classify(message)
        if text is None:
            self._advance(_AUDIO)
            pcm, self._carry = _align(self._carry, data or b"")
            return [Audio(pcm)] if pcm else []
        if self.state is ClientState.ENDED:
            raise RemoteProtocolError("text message after session_ended", close_code=CloseCode.PROTOCOL_ERROR)
        fields = _control(text)
        kind = fields["type"]
        event = self._event(kind, fields)
        self._advance(kind if kind in _SERVER_TYPES else _UNKNOWN)
        if event is _AGENT_READY:
            self.agent_ready = True
        return [event]

    def _event(self, kind: str, fields: dict[str, Any]) -> ClientEvent:
        if kind == "connected":
            return _CONNECTED
        if kind == "agent_ready":
            return _AGENT_READY
        if kind == "session_ended":
            reason = fields.get("reason")
            if reason is not None and not isinstance(reason, str):
                raise RemoteProtocolError(
                    f"session_ended reason is {_json_type(reason)}, expected a string", close_code=CloseCode.INVALID_PAYLOAD
                )
            return SessionEnded(None if reason is None else self._redact(reason))
        if kind == "error":
            code = fields.get("code")
            if code is not None and (isinstance(code, bool) or not isinstance(code, (str, int))):
                raise RemoteProtocolError(
                    f"error code is {_json_type(code)}, expected a string or an integer", close_code=CloseCode.INVALID_PAYLOAD
                )
            text = fields.get("message")
            if text is not None and not isinstance(text, str):
                raise RemoteProtocolError(
                    f"error message is {_json_type(text)}, expected a string", close_code=CloseCode.INVALID_PAYLOAD
                )
            if isinstance(code, str):
                code = self._redact(code)
            return AgentError(code, None if text is None else self._redact(text))
        return Unknown(self._redact(kind))

    def _redact(self, text: str) -> str:
        return _redact(text, self._token)

    def _advance(self, key: str) -> None:
        """Move by the table, or raise 1002 naming what arrived and when."""
        following = _CLIENT_TABLE[self.state].get(key)
        if following is None:
            if key == "connected" and self.state is ClientState.CONNECTED:
                reason = "second connected message"
            else:
                what = {_AUDIO: "audio", _UNKNOWN: "control message"}.get(key, f"{key} message")
                reason = f"{what} {_CLIENT_WHERE[self.state]}"
            raise RemoteProtocolError(reason, close_code=CloseCode.PROTOCOL_ERROR)
        self.state = following

    def send_audio(self, pcm: bytes | bytearray | memoryview) -> bytes:
        """One binary message of PCM16 LE 16 kHz mono: whole samples (even, non-zero length, at
        most `MAX_MESSAGE_BYTES`); send `FRAME_BYTES` (20 ms) per message, as the spec's page
        does. Only while CONNECTED (stop on `SessionEnded`); `LocalProtocolError` otherwise."""
        if self.state is not ClientState.CONNECTED:
            raise LocalProtocolError(f"send_audio only after connected, not in state {self.state.name}")
        return _check_pcm(pcm)


# --- server: the gateway serves browsers / SDK clients -------------------------------------


class ServerState(enum.Enum):
    """Where an `AgentServer` is in the session."""

    AWAITING_TOKEN = "awaiting_token"  #: WebSocket open, the token message not yet received
    TOKEN_PRESENTED = "token_presented"  #: `TokenPresented` delivered; waiting for `accept()`
    CONNECTED = "connected"  #: ``connected`` sent; audio flows both ways
    ENDED = "ended"  #: ``session_ended`` sent; further messages are dropped


#: (state, what we send) -> next state; anything missing is our misuse (LocalProtocolError).
_SERVER_SEND_TABLE: dict[tuple[ServerState, str], ServerState] = {
    (ServerState.TOKEN_PRESENTED, "connected"): ServerState.CONNECTED,
    (ServerState.CONNECTED, "agent_ready"): ServerState.CONNECTED,
    (ServerState.CONNECTED, _AUDIO): ServerState.CONNECTED,
    (ServerState.AWAITING_TOKEN, "session_ended"): ServerState.ENDED,
    (ServerState.TOKEN_PRESENTED, "session_ended"): ServerState.ENDED,
    (ServerState.CONNECTED, "session_ended"): ServerState.ENDED,
}
_FIRST = 'the first message must be {"token": …}: '  # 1008 reasons start with this


def _policy(what: str) -> RemoteProtocolError:
    return RemoteProtocolError(_FIRST + what, close_code=CloseCode.POLICY_VIOLATION)


@attrs.define(init=False)
class AgentServer:
    """The server side of one agent session (the gateway as an agent service), sans-IO.

    ``AgentServer()``. Feed every WebSocket message to `receive`. The first must be the token
    message: it gives `TokenPresented`; check the token, then send `accept()` (the
    ``connected`` text) or send `error_message(...)` and close with 1008. Then binary messages
    give `Audio`; send `agent_ready()`, `send_audio(pcm)` and finally `session_ended(reason)`.
    Messages received after `session_ended` (the client's audio in flight) are dropped: ``[]``.
    """

    state: ServerState
    """AWAITING_TOKEN → TOKEN_PRESENTED → CONNECTED → ENDED (see the module docstring)."""
    _token: str | None = attrs.field(repr=False)
    _carry: bytes

    def __init__(self) -> None:
        self.state = ServerState.AWAITING_TOKEN
        self._token = None
        self._carry = b""

    @property
    def pending_audio_bytes(self) -> int:
        """Bytes of an incomplete sample held for the next binary message (0 or 1)."""
        return len(self._carry)

    def receive(self, message: str | bytes | bytearray | memoryview) -> list[ServerEvent]:
        """Events from one WebSocket message.

        AWAITING_TOKEN: ``[TokenPresented]``, or 1008 for anything but
        ``{"token": <non-empty string>}``. TOKEN_PRESENTED: every message is 1002 (call
        `accept` first). CONNECTED: binary gives ``[Audio]`` (or ``[]`` for a held lone byte);
        text must be a JSON object with a string ``type`` (1007) and gives ``[Unknown]`` (the
        spec defines no client control messages), or ``[ClientDtmf]`` for type ``dtmf`` (a
        gateway extension); a second token message is 1002. ENDED: ``[]``.
        """
        if self.state is ServerState.ENDED:
            return []
        text, data = _classify(message)
        if self.state is ServerState.AWAITING_TOKEN:
            if text is None:
                raise _policy("got a binary message")
            token = self._parse_token(text)
            self._token = token
            self.state = ServerState.TOKEN_PRESENTED
            return [TokenPresented(token)]
        if self.state is ServerState.TOKEN_PRESENTED:
            raise RemoteProtocolError(
                f"{'audio' if text is None else 'text message'} before connected", close_code=CloseCode.PROTOCOL_ERROR
            )
        if text is None:
            pcm, self._carry = _align(self._carry, data or b"")
            return [Audio(pcm)] if pcm else []
        try:
            fields = _control(text)
        except RemoteProtocolError:
            if _is_token_message(text):
                raise RemoteProtocolError("token message sent twice", close_code=CloseCode.PROTOCOL_ERROR) from None
            raise
        if fields["type"] == "dtmf":
            digit = fields.get("digit")
            return [ClientDtmf(_redact(digit, self._token) if isinstance(digit, str) else None)]
        return [Unknown(_redact(fields["type"], self._token))]

    @staticmethod
    def _parse_token(text: str) -> str:
        try:
            value = _loads(text)
        except (ValueError, RecursionError):
            raise _policy("got text that is not JSON") from None
        if not isinstance(value, dict):
            raise _policy(f"got {_json_type(value)}, not an object")
        if "token" not in value:
            raise _policy("got an object with no token")
        token = value["token"]
        if not isinstance(token, str):
            raise _policy(f"token is {_json_type(token)}, not a string")
        if not token:
            raise _policy("token is empty")
        return token

    def _send(self, key: str) -> None:
        following = _SERVER_SEND_TABLE.get((self.state, key))
        if following is None:
            raise LocalProtocolError(f"cannot send {key} in state {self.state.name}")
        self.state = following

    def accept(self) -> str:
        """``{"type":"connected"}``: the token is good; the client starts its microphone.
        Only after `TokenPresented`."""
        self._send("connected")
        return _dumps({"type": "connected"})

    def agent_ready(self) -> str:
        """``{"type":"agent_ready"}``: the agent is listening. Only while CONNECTED; may be sent
        again (after the agent reconnected, say)."""
        self._send("agent_ready")
        return _dumps({"type": "agent_ready"})

    def session_ended(self, reason: str) -> str:
        """``{"type":"session_ended","reason":…}`` with `reason` one of `SESSION_END_REASONS`;
        moves to ENDED (then close the WebSocket with 1000). In any state but ENDED."""
        if reason not in SESSION_END_REASONS:
            raise LocalProtocolError(f"session_ended reason must be one of {SESSION_END_REASONS}, got {reason!r}")
        self._send("session_ended")
        return _dumps({"type": "session_ended", "reason": reason})

    def send_audio(self, pcm: bytes | bytearray | memoryview) -> bytes:
        """One binary message of PCM16 LE 16 kHz mono for the client to play: whole samples
        (the spec's page does ``new Int16Array(buf)``, which throws on an odd byte count), at
        most `MAX_MESSAGE_BYTES`. Only while CONNECTED; `LocalProtocolError` otherwise."""
        data = _check_pcm(pcm)
        self._send(_AUDIO)
        return data


def _is_token_message(text: str) -> bool:
    try:
        value = _loads(text)
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict) and "token" in value and "type" not in value


# --- token REST (spec: "1. Fetch Session Token") --------------------------------------------

#: Path of the token call under the API base URL.
TOKEN_PATH = "/api/v1/sdk/token"

_WHERE = "voice agent token request"
_WS_SCHEMES = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}  # as WHATWG WebSocket maps them
# status -> (cause, permanent)
_STATUS_CAUSES = {
    400: ("request refused as malformed", True),
    401: ("API key rejected", True),
    403: ("API key rejected", True),
    404: ("token endpoint not found (check api_url)", True),
    408: ("request timed out", False),
    429: ("rate limited", False),
}


class TokenRequestError(ServiceError):
    """The token call failed. `status` and `permanent` as in `ServiceError`; `retry_after` is
    the number of seconds the service asked us to wait (429), else None. The message names the
    cause and status, never the API key, the token or the response body."""


@attrs.frozen
class TokenGrant:
    """A successful token response: what to dial and what to send first."""

    token: str = attrs.field(repr=False)
    """The session token for the first WebSocket message (`AgentClient(token)`). Kept out of
    `repr`."""
    ws_url: str
    """The WebSocket URL to open: ws:// or wss:// (an http(s) URL or a path relative to the API
    URL in the response is resolved the way a browser's ``new WebSocket(ws_url)`` would)."""


def token_url(api_url: str) -> str:
    """``{api_url}/api/v1/sdk/token``: `api_url` with or without a trailing slash, its own path
    kept. `LocalProtocolError` unless it is an http:// or https:// URL with a host."""
    try:
        parts = urllib.parse.urlsplit(api_url)
    except (ValueError, TypeError, AttributeError):
        raise LocalProtocolError("api_url does not parse as a URL") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise LocalProtocolError("api_url must be an http:// or https:// URL with a host")
    return urllib.parse.urlunsplit(
        (parts.scheme, parts.netloc, parts.path.rstrip("/") + TOKEN_PATH, parts.query, "")
    )


def token_request_headers(api_key: str) -> dict[str, str]:
    """Headers of ``POST {api_url}/api/v1/sdk/token`` (no body), as the spec's step 1 sends
    them. The result holds the key: never log it."""
    if not isinstance(api_key, str) or not api_key or any(c.isspace() for c in api_key):
        raise LocalProtocolError("API key must be a non-empty string without whitespace")
    return {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}


def _retry_after(header: str | None, body: Any) -> float | None:
    """Seconds from a ``Retry-After`` delta-seconds value (RFC 9110 §10.2.3), else from a
    ``retry_after`` number in the JSON body; None otherwise (an HTTP-date needs a clock: the
    I/O layer converts it and passes `retry_after_s`)."""
    seconds = parse_retry_after(header)
    return seconds if seconds is not None else body_retry_after(body, ("retry_after",))


def _dial_url(ws_url: str, api_url: str | None) -> str | None:
    """`ws_url` made absolute against `api_url` and mapped to ws(s), or None if it cannot be."""
    try:
        if api_url:
            ws_url = urllib.parse.urljoin(api_url, ws_url)
        parts = urllib.parse.urlsplit(ws_url)
    except ValueError:
        return None
    scheme = _WS_SCHEMES.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        return None
    return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path, parts.query, ""))


def parse_token_response(
    status: int,
    body: bytes | str,
    *,
    api_url: str | None = None,
    retry_after: str | None = None,
    retry_after_s: float | None = None,
) -> TokenGrant:
    """The grant from a token response, or `TokenRequestError` (a `ServiceError`).

    2xx with ``{"token": …, "ws_url": …}`` → the grant (`ws_url` resolved against `api_url`
    when relative, http(s) mapped to ws(s)). Errors, by status: 401 and 403 "API key rejected",
    404 "token endpoint not found", 400 and other 4xx (all permanent); 429 "rate limited" (not
    permanent; `retry_after` from `retry_after_s` (seconds, e.g. `rest.parse_retry_after` of the
    header, both forms), else the ``Retry-After`` header value passed as `retry_after`, else
    from a ``retry_after`` number in the JSON body); 408, 5xx and anything else not permanent;
    2xx whose body is not a JSON object, lacks a non-empty string ``token`` or ``ws_url``
    (naming the field) or whose ``ws_url`` is not a WebSocket URL → not permanent.
    """
    try:
        parsed: Any = _loads(body) if body else None
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        parsed = None
    if 200 <= status < 300:
        if not isinstance(parsed, dict):
            raise TokenRequestError(f"{_WHERE}: response is not a JSON object", status=status, permanent=False)
        for key in ("token", "ws_url"):
            value = parsed.get(key)
            if not isinstance(value, str) or not value:
                raise TokenRequestError(f"{_WHERE}: response has no {key} field", status=status, permanent=False)
        dial = _dial_url(parsed["ws_url"], api_url)
        if dial is None:
            raise TokenRequestError(
                f"{_WHERE}: response ws_url is not a ws:// or wss:// URL", status=status, permanent=False
            )
        return TokenGrant(token=parsed["token"], ws_url=dial)
    cause, permanent = status_cause(status, _STATUS_CAUSES)
    seconds = None
    if status == 429:
        seconds = retry_after_s if retry_after_s is not None else _retry_after(retry_after, parsed)
    suffix = f", retry after {seconds:g} s" if seconds is not None else ""
    raise TokenRequestError(
        f"{_WHERE}: {cause} (HTTP {status}{suffix})", status=status, permanent=permanent, retry_after=seconds
    )


def token_response(token: str, ws_url: str) -> bytes:
    """JSON body of a successful token response (listen side): ``{"token":…,"ws_url":…}``."""
    if not isinstance(token, str) or not token:
        raise LocalProtocolError("token must be a non-empty string")
    if not isinstance(ws_url, str) or not ws_url:
        raise LocalProtocolError("ws_url must be a non-empty string")
    return _dumps({"token": token, "ws_url": ws_url}).encode()


def parse_bearer(header_value: str | bytes | None) -> str | None:
    """The credential of an ``Authorization: Bearer <credential>`` header (RFC 6750 §2.1), or
    None when the header is absent, uses another scheme, or has no single credential.

    The scheme is case-insensitive (RFC 9110 §11.1); spaces or tabs around the credential are
    allowed; the credential must be visible ASCII without whitespace (RFC 6750's b64token is
    stricter; API keys with ":" or "," are accepted). Bytes are read as Latin-1.
    """
    if header_value is None:
        return None
    if isinstance(header_value, (bytes, bytearray)):
        header_value = bytes(header_value).decode("latin-1")
    parts = header_value.strip(" \t").split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    credential = parts[1].strip(" \t")
    if not credential or not all("!" <= c <= "~" for c in credential):
        return None
    return credential
