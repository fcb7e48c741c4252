"""VideoSDK custom WebSocket ingest, sans-IO: JSON text frames in, events out; audio in, text out.

Source: /work/shared/protocols/004_c69f0f37162481c1.txt ("Custom WebSocket": How It Works,
Step 1 "Create an Ingest Session", Step 2 "Connect and Stream", Messaging, Lifecycle Webhooks,
Troubleshooting, API Reference). The spec links its runnable example,
videosdk-live/videosdk-socket-ingest-example (app.js); where the spec is silent, that example
is the second source and is cited as "the example".

The flow (dial = `IngestClient`, listen = `IngestServer`):

1. The backend calls ``POST https://api.videosdk.live/v2/ingest/sessions`` (`SESSIONS_PATH`,
   `session_request`, `authorization_header`) → ``{"message": "Ingest session created",
   "data": {"wsUrl", "callId", "expiresIn": 90}}`` (`parse_session_response`; the listen side
   reads the request with `parse_session_request` and answers with `session_response` or
   `error_body`). The wsUrl's ``ref`` query parameter is a single-use claim, valid 90 s
   (`SESSION_EXPIRES_S`).
2. The device opens the wsUrl and sends ``{"event":"start"}`` within 5 s (`START_TIMEOUT_S`), or
   the server closes with 1008 "start timeout" (`START_TIMEOUT_CLOSE_CODE`,
   `START_TIMEOUT_REASON`). The server pings every 30 s (`PING_INTERVAL_S`).
3. Both sides send ``{"event":"media","payload":"<base64 PCM16-LE>"}``: signed 16-bit
   little-endian PCM, 8 kHz mono, 20 ms = 160 samples = 320 bytes = 428 base64 characters
   (`FRAME_BYTES`, `FRAME_BASE64_CHARS`).
4. Pub/sub on the same socket: ``subscribe`` / ``unsubscribe`` ``{"topic"}``; publishing is a
   ``{"event":"message","topic","data"}`` frame whose ``data`` is a string or any JSON value
   (JSON values are serialized before delivery); delivery to subscribers is a ``message``
   frame whose ``data`` is an object ``{"message", "senderId", "senderName", "timestamp",
   "id"}``. Topic: non-empty, at most 128 characters; payload at most 8 KB of UTF-8.
5. ``{"event":"stop"}`` (or closing the socket) ends the session.

Frames we build are compact JSON (``JSON.stringify`` style: no spaces, non-ASCII unescaped),
e.g. ``{"event":"start"}``. Frames we parse may use any JSON spacing.

Spec ambiguities and the choices made
-------------------------------------
- **Topic length** "up to 128 characters": counted in UTF-16 code units, as JavaScript's
  ``topic.length`` counts them (VideoSDK's examples are Node.js); identical to code points for
  every character of the Basic Multilingual Plane, while an emoji counts 2. So 128 "a" pass,
  129 do not, and 64 emoji pass while 65 do not.
- **Payload size** "up to 8 KB (UTF-8)": 8 KB is taken as 8192 bytes (`MAX_PAYLOAD_BYTES`) of
  the UTF-8 encoding of the string subscribers receive: the ``data`` string itself, or for
  any other JSON value its compact serialization (what "JSON values are serialized before
  delivery" produces).
- **Refused pub/sub on the listen side**: the spec says "A failed subscribe or publish never
  drops the call", so an empty or too long topic or a too large payload is *not* a
  `RemoteProtocolError`: `IngestServer.receive` returns a `MessagingRefused` event carrying
  the close code a strict server would use (1008 topic rule, 1009 payload too big, 1007 text
  that is not valid Unicode). A frame whose fields have the wrong JSON types (topic not a
  string, no data) is malformed, not a failed publish: 1007.
- **Refused publish on the dial side**: `IngestClient.publish` raises `PublishRefused`, a
  `LocalProtocolError` subclass (the data came from our side). It is the one
  `LocalProtocolError` an adapter should expect in normal operation: it carries application
  data, so catch it, report it to whoever published, and keep the call.
- **Lifecycle events** (``participant-joined``, ``participant-left`` with ``participant: {id,
  name, metadata}``; ``meeting-joined`` with ``roomId``, ``sessionId``; ``meeting-left`` with
  an optional ``message``): not in the spec text, only in the example. They are parsed
  leniently (a field of the wrong type reads as None; `raw` keeps the frame) and never close
  the stream. The spec defines no error frame; any event we do not know is `Unknown`.
- **Odd-length audio**: a media payload whose byte count is odd carries its last byte over to
  the next media frame (prepended), so samples stay aligned if a peer splits a sample across
  frames; `Media.pcm` always holds whole samples. (The example's decoder drops the byte.)
- **Order on the listen side**: before the start frame anything else closes with 1008 and a
  reason naming what came instead (the same code as the start timeout: the client did not
  start; the Troubleshooting table maps 1008 to "no start frame"). A second start is 1002.
  Frames after stop are ignored (a client's last media may cross its stop).
- **Session authorization**: the spec's curl sends ``Authorization: Bearer <token>``; the
  example and VideoSDK's other REST APIs send the bare token. We send ``Bearer``
  (`authorization_header`); the listen side accepts both (`parse_authorization`).
- **Webhooks**: the spec defers bodies to the SIP webhooks page, which lists event names
  (``call-started``, ``call-answered``, ``call-hangup``, ...) but shows no body. VideoSDK's
  other webhooks use ``{"webhookType": name, "data": {...}}``; `webhook_event` reads that
  envelope and also a top-level ``event`` / ``type``, with ``callId`` in ``data`` or at the top
  level. The signature (``videosdk-signature``: base64 RSA-SHA256, PKCS#1 v1.5) is checked
  over the raw body; VideoSDK's verification sample (docs "Webhook Verification - API")
  verifies ``JSON.stringify(req.body)`` instead, so a body that fails the raw check is checked
  once more in that compact re-serialized form. Use the dict `verify_webhook` returns, never a
  second parse of the raw body.

Errors (`RemoteProtocolError.close_code`, RFC 6455 §7.4.1)
----------------------------------------------------------
- 1003: a binary message (every frame is JSON text).
- 1007: not JSON (NaN / Infinity included), not a JSON object, ``event`` missing or not a
  string, media ``payload`` missing, not a string or not valid base64 (standard alphabet,
  padded, no whitespace), topic not a string, a ``message`` frame without ``data``, a
  delivered message whose ``data`` is neither a string nor an object with a string
  ``message``.
- 1008: (listen) any frame other than start before the start frame; the start timeout itself
  is the adapter's (`START_TIMEOUT_S`, `START_TIMEOUT_CLOSE_CODE`, `START_TIMEOUT_REASON`).
- 1009: a text message over `MAX_MESSAGE_BYTES` (64 KiB of UTF-8).
- 1002: (listen) a second start frame.

`str(err)` is the close reason, at most 123 bytes of UTF-8; peer-supplied strings in it are
shortened. "If this raises anything but RemoteProtocolError, that's a bug" (h11), except
`LocalProtocolError` when the adapter passes something that is neither str nor bytes.

Secrets: the REST token is never stored or put in a message here; `IngestSession` keeps its
wsUrl (which holds the single-use ref) out of `repr`, and no error message contains a wsUrl,
a ref, a response body or a signature.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import urllib.parse
from typing import Any

import attrs
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from gateway.adapters.rest import json_type as _json_type, loads_strict, status_cause
from gateway.errors import GatewayError, LocalProtocolError, RemoteProtocolError, ServiceError

__all__ = [
    "API_BASE_URL",
    "ClientEvent",
    "FRAME_BASE64_CHARS",
    "FRAME_BYTES",
    "INGEST_PATH",
    "IngestClient",
    "IngestServer",
    "IngestSession",
    "MAX_MESSAGE_BYTES",
    "MAX_PAYLOAD_BYTES",
    "MAX_PCM_BYTES",
    "MAX_TOPIC_LENGTH",
    "MEETING_JOINED",
    "MEETING_LEFT",
    "Media",
    "MeetingJoined",
    "MeetingLeft",
    "Message",
    "MessagingRefused",
    "PARTICIPANT_JOINED",
    "PARTICIPANT_LEFT",
    "PING_INTERVAL_S",
    "PTIME_MS",
    "ParticipantJoined",
    "ParticipantLeft",
    "Publish",
    "PublishRefused",
    "SAMPLES_PER_FRAME",
    "SAMPLE_RATE",
    "SESSIONS_PATH",
    "SESSION_CREATED_MESSAGE",
    "SESSION_EXPIRES_S",
    "START_TIMEOUT_CLOSE_CODE",
    "START_TIMEOUT_REASON",
    "START_TIMEOUT_S",
    "ServerEvent",
    "SessionError",
    "SessionRequest",
    "SessionRequestError",
    "Started",
    "Stopped",
    "Subscribe",
    "Unknown",
    "Unsubscribe",
    "WEBHOOK_PUBLIC_KEY_URL",
    "WEBHOOK_SIGNATURE_HEADER",
    "WebhookPayloadError",
    "WebhookSignatureError",
    "authorization_header",
    "error_body",
    "ingest_url",
    "load_webhook_key",
    "parse_authorization",
    "parse_ingest_ref",
    "parse_session_request",
    "parse_session_response",
    "session_request",
    "session_response",
    "sign_webhook",
    "verify_webhook",
    "webhook_body",
    "webhook_event",
]

# --- constants -----------------------------------------------------------------------------

SAMPLE_RATE = 8000  # Hz, mono, signed 16-bit little-endian PCM both ways (spec: "How It Works")
PTIME_MS = 20  # milliseconds per media frame the spec recommends ("about one frame every 20 ms")
SAMPLES_PER_FRAME = SAMPLE_RATE * PTIME_MS // 1000  # 160 samples per 20 ms
FRAME_BYTES = 2 * SAMPLES_PER_FRAME  # 320 bytes of PCM16 per 20 ms
FRAME_BASE64_CHARS = 4 * -(-FRAME_BYTES // 3)  # 428 base64 characters per 20 ms frame
MAX_MESSAGE_BYTES = 64 * 1024  # 64 KiB: UTF-8 bytes of one text message; larger → 1009
#: Largest PCM chunk `media()` builds: 3 s, 48 000 bytes → 64 000 base64 characters, so the
#: frame stays under `MAX_MESSAGE_BYTES`.
MAX_PCM_BYTES = 3 * SAMPLE_RATE * 2

START_TIMEOUT_S = 5  # seconds after connecting within which the start frame must arrive
START_TIMEOUT_CLOSE_CODE = 1008  # policy violation (spec: Step 2, Troubleshooting)
START_TIMEOUT_REASON = "start timeout"  # close reason sent with it
PING_INTERVAL_S = 30  # seconds between the server's WebSocket pings (spec: Step 2, note)
SESSION_EXPIRES_S = 90  # seconds an unclaimed session stays valid ("expiresIn": 90)

MAX_TOPIC_LENGTH = 128  # characters, counted in UTF-16 code units (see module docstring)
MAX_PAYLOAD_BYTES = 8 * 1024  # 8 KB: UTF-8 bytes of one published payload (see module docstring)

#: Room lifecycle events the server sends (the example's handleMessage; not in the spec text).
PARTICIPANT_JOINED = "participant-joined"
PARTICIPANT_LEFT = "participant-left"
MEETING_JOINED = "meeting-joined"
MEETING_LEFT = "meeting-left"

API_BASE_URL = "https://api.videosdk.live"  # REST base (spec: Step 1)
SESSIONS_PATH = "/v2/ingest/sessions"  # POST: create an ingest session
SESSION_CREATED_MESSAGE = "Ingest session created"  # "message" of a successful response
INGEST_PATH = "/videosdk"  # WebSocket path of the spec's wsUrl example

WEBHOOK_SIGNATURE_HEADER = "videosdk-signature"  # base64 RSA-SHA256 signature of the body
#: Where VideoSDK publishes its webhook RSA public key (docs "Webhook Verification - API").
WEBHOOK_PUBLIC_KEY_URL = "https://api.videosdk.live/v2/public/rsa-public-key"

_MAX_REASON_BYTES = 123  # a close frame's reason, RFC 6455 §5.5 (125 minus the 2-byte code)

# --- events --------------------------------------------------------------------------------


@attrs.frozen
class Media:
    """Audio from the peer (``{"event":"media"}``), base64-decoded."""

    pcm: bytes = attrs.field(repr=lambda pcm: f"<{len(pcm)} bytes>")
    """Signed 16-bit little-endian PCM, 8 kHz mono; always an even number of bytes (an odd
    trailing byte is carried into the next media frame). Usually 320 bytes (20 ms)."""


@attrs.frozen
class Message:
    """A pub/sub message another participant published to a topic we subscribed (dial side)."""

    topic: str
    """The topic it was published to."""
    data: str
    """The message text (``data.message``); a JSON value the publisher sent arrives here
    serialized, as the spec says: parse it if needed."""
    sender: dict[str, Any] | None
    """The delivered ``data`` object without its ``message`` key (``senderId``,
    ``senderName``, ``timestamp``, ``id`` and anything else the server added); None when the
    server delivered ``data`` as a bare string."""
    sender_id: str | None
    """``data.senderId``: the publishing participant's id; None if absent or not a string."""
    sender_name: str | None
    """``data.senderName``: the publisher's display name; None if absent or not a string."""
    timestamp: str | None
    """``data.timestamp``: ISO 8601 time the message was published, as sent (not parsed)."""
    message_id: str | None
    """``data.id``: the message's id in the meeting's pub/sub history."""


@attrs.frozen
class ParticipantJoined:
    """A participant joined the room (``participant-joined``, from the example)."""

    participant_id: str | None
    """``participant.id``; None if absent or not a string."""
    name: str | None
    """``participant.name``: display name; None if absent or not a string."""
    metadata: dict[str, Any] | None
    """``participant.metadata``; None if absent or not an object."""
    raw: dict[str, Any]
    """The whole frame as received."""


@attrs.frozen
class ParticipantLeft:
    """A participant left the room (``participant-left``, from the example)."""

    participant_id: str | None
    """``participant.id``; None if absent or not a string."""
    name: str | None
    """``participant.name``: display name; None if absent or not a string."""
    metadata: dict[str, Any] | None
    """``participant.metadata``; None if absent or not an object."""
    raw: dict[str, Any]
    """The whole frame as received."""


@attrs.frozen
class MeetingJoined:
    """The ingest participant joined the room (``meeting-joined``, from the example): audio
    and queued pub/sub frames flow from here on."""

    room_id: str | None
    """``roomId``: the room joined; None if absent or not a string."""
    session_id: str | None
    """``sessionId``: the room's current meeting session; None if absent or not a string."""
    raw: dict[str, Any]
    """The whole frame as received."""


@attrs.frozen
class MeetingLeft:
    """The ingest participant left the room or the meeting ended (``meeting-left``, from the
    example). The call is over; the server closes the socket next."""

    message: str | None
    """``message``: why, when the server says; None if absent or not a string."""
    raw: dict[str, Any]
    """The whole frame as received."""


@attrs.frozen
class Unknown:
    """A frame with an ``event`` we do not know (forward compatibility; ignore or log it)."""

    event: str
    """The frame's ``event`` value."""
    raw: dict[str, Any]
    """The whole frame as received."""


@attrs.frozen
class Started:
    """The client sent the start frame: it claims the session (listen side)."""


@attrs.frozen
class Stopped:
    """The client sent the stop frame: the session ends; close the socket (listen side)."""


@attrs.frozen
class Subscribe:
    """The client subscribes to a topic (listen side)."""

    topic: str
    """Non-empty, at most `MAX_TOPIC_LENGTH` UTF-16 code units."""


@attrs.frozen
class Unsubscribe:
    """The client unsubscribes from a topic (listen side)."""

    topic: str
    """Non-empty, at most `MAX_TOPIC_LENGTH` UTF-16 code units."""


@attrs.frozen
class Publish:
    """The client publishes to a topic (a ``message`` frame, listen side)."""

    topic: str
    """Non-empty, at most `MAX_TOPIC_LENGTH` UTF-16 code units."""
    data: str
    """What subscribers receive: the ``data`` string, or a JSON value serialized compactly;
    at most `MAX_PAYLOAD_BYTES` bytes of UTF-8. Pass it to `IngestServer.deliver`."""
    value: Any
    """``data`` exactly as received: a string or any JSON value (None for JSON null)."""


@attrs.frozen
class MessagingRefused:
    """A subscribe, unsubscribe or publish frame broke the topic or payload rules (listen side).

    The spec says a failed subscribe or publish never drops the call: drop the frame, keep the
    stream. A strict server may instead close with `close_code` and `reason`."""

    event: str
    """The refused frame's event: "subscribe", "unsubscribe" or "message"."""
    topic: str
    """The topic as received (possibly empty or very long)."""
    reason: str
    """What was wrong, e.g. "topic is 129 characters, limit 128"; short enough for a close
    reason."""
    close_code: int
    """1008 for a topic rule, 1009 for a payload over 8 KB, 1007 for text that is not valid
    Unicode."""


ClientEvent = Media | Message | ParticipantJoined | ParticipantLeft | MeetingJoined | MeetingLeft | Unknown
ServerEvent = Started | Media | Subscribe | Unsubscribe | Publish | MessagingRefused | Stopped | Unknown

_STARTED = Started()
_STOPPED = Stopped()

# --- errors --------------------------------------------------------------------------------


class PublishRefused(LocalProtocolError):
    """We asked to publish (or deliver) something the spec's limits refuse: a topic that is not
    a non-empty string of at most 128 characters, a payload over 8 KB of UTF-8, data that is
    not JSON-serializable or not valid Unicode.

    A `LocalProtocolError` because the data came from our side; unlike other local errors it
    is expected in operation (the data is an application's): catch it, report it, keep the
    call. `field` is "topic" or "data"."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


# --- helpers -------------------------------------------------------------------------------


def _remote(reason: str, close_code: int) -> RemoteProtocolError:
    """A RemoteProtocolError whose reason fits a close frame (≤ 123 bytes of UTF-8)."""
    data = reason.encode("utf-8", "replace")
    if len(data) > _MAX_REASON_BYTES:
        reason = data[: _MAX_REASON_BYTES - 3].decode("utf-8", "ignore") + "..."
    return RemoteProtocolError(reason, close_code=close_code)


def _show(value: str, limit: int = 24) -> str:
    """A peer-supplied string for a message: ASCII-quoted and shortened."""
    return ascii(value[:limit]) + ("..." if len(value) > limit else "")


def _dumps(value: Any) -> str:
    """Compact JSON, as JavaScript's JSON.stringify writes it (non-ASCII left unescaped)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _topic_length(topic: str) -> int:
    """Length in UTF-16 code units (JavaScript's ``String.length``)."""
    return len(topic.encode("utf-16-le", "surrogatepass")) // 2


def _topic_problem(topic: Any) -> tuple[str, int] | None:
    """Why `topic` breaks the spec's topic rule, with the close code a strict server would use."""
    if not isinstance(topic, str):
        return f"topic is {_json_type(topic)}, expected a string", 1007
    if not topic:
        return "topic is empty", 1008
    length = _topic_length(topic)
    if length > MAX_TOPIC_LENGTH:
        return f"topic is {length} characters, limit {MAX_TOPIC_LENGTH}", 1008
    try:
        topic.encode("utf-8")
    except UnicodeEncodeError:
        return "topic is not valid Unicode (lone surrogate)", 1007
    return None


def _payload_text(data: Any) -> str:
    """What subscribers receive for `data`: the string itself or its compact serialization.

    Raises ValueError (with a message) when `data` is not a JSON value; returns text of any
    size and content (`_payload_problem` checks those)."""
    if isinstance(data, str):
        text = data
    else:
        try:
            text = _dumps(data)
        except (TypeError, ValueError, RecursionError):
            raise ValueError(f"data ({type(data).__name__}) is not a JSON value") from None
    return text


def _payload_problem(text: str) -> tuple[str, int] | None:
    """Why a payload string breaks the spec's size rule (or is not valid Unicode)."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return "payload is not valid Unicode (lone surrogate)", 1007
    if size > MAX_PAYLOAD_BYTES:
        return f"payload is {size} bytes of UTF-8, limit {MAX_PAYLOAD_BYTES} (8 KB)", 1009
    return None


def _encode_media(pcm: Any) -> str:
    try:
        view = memoryview(pcm)
        if not view.c_contiguous:
            raise TypeError
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
    except TypeError:
        raise LocalProtocolError(
            f"media takes PCM16 bytes (a contiguous buffer), got {type(pcm).__name__}"
        ) from None
    size = view.nbytes
    if size == 0:
        raise LocalProtocolError("media takes at least one sample, got 0 bytes")
    if size % 2:
        raise LocalProtocolError(f"media takes whole PCM16 samples (an even byte count), got {size} bytes")
    if size > MAX_PCM_BYTES:
        raise LocalProtocolError(f"media chunk {size} bytes, limit {MAX_PCM_BYTES} (3 s); send 20 ms frames")
    # base64 needs no JSON escaping, so the frame is assembled directly (the per-frame path).
    return '{"event":"media","payload":"' + base64.b64encode(view).decode("ascii") + '"}'


def _encode_frame(frame: dict[str, Any], what: str) -> str:
    try:
        text = _dumps(frame)
        text.encode("utf-8")
    except (TypeError, ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        raise LocalProtocolError(f"{what} frame is not serializable JSON text") from None
    return text


def _decode_frame(message: Any) -> tuple[dict[str, Any], str]:
    """One WebSocket message → (the JSON object, its event name); raises RemoteProtocolError."""
    if not isinstance(message, str):
        if isinstance(message, (bytes, bytearray, memoryview)):
            raise _remote("binary message; VideoSDK ingest frames are JSON text", 1003)
        raise LocalProtocolError(
            f"receive takes a str (text message) or bytes (binary message), got {type(message).__name__}"
        )
    chars = len(message)
    if chars > MAX_MESSAGE_BYTES or (
        4 * chars > MAX_MESSAGE_BYTES and len(message.encode("utf-8", "surrogatepass")) > MAX_MESSAGE_BYTES
    ):
        raise _remote(f"text message over {MAX_MESSAGE_BYTES} bytes", 1009)
    try:
        frame = loads_strict(message)
    except (ValueError, RecursionError):
        raise _remote("frame is not valid JSON", 1007) from None
    if not isinstance(frame, dict):
        raise _remote(f"frame is {_json_type(frame)}, expected a JSON object", 1007)
    event = frame.get("event")
    if not isinstance(event, str):
        if "event" not in frame:
            raise _remote("frame has no event field", 1007)
        raise _remote(f"frame event is {_json_type(event)}, expected a string", 1007)
    return frame, event


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _dict_or_none(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


# --- the two roles ---------------------------------------------------------------------------


@attrs.define
class _IngestStream:
    """What both roles share: media decoding with the odd-byte carry, and counters."""

    media_in: int = attrs.field(default=0, init=False)
    """Media frames received that produced audio."""
    media_out: int = attrs.field(default=0, init=False)
    """Media frames built by `media`."""
    _carry: bytes = attrs.field(default=b"", init=False)

    def _receive_media(self, frame: dict[str, Any]) -> list[Any]:
        payload = frame.get("payload")
        if not isinstance(payload, str):
            if "payload" not in frame:
                raise _remote("media frame has no payload", 1007)
            raise _remote(f"media payload is {_json_type(payload)}, expected a base64 string", 1007)
        try:
            pcm = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _remote("media payload is not valid base64", 1007) from None
        if self._carry:
            pcm = self._carry + pcm
            self._carry = b""
        if len(pcm) & 1:
            self._carry = pcm[-1:]
            pcm = pcm[:-1]
        if not pcm:
            return []
        self.media_in += 1
        return [Media(pcm)]

    def _build_media(self, pcm: Any) -> str:
        text = _encode_media(pcm)
        self.media_out += 1
        return text


@attrs.define
class IngestClient(_IngestStream):
    """The device side of one ingest WebSocket (the gateway dialing VideoSDK), sans-IO.

    Send: `start` once, first; then `media`, `subscribe`, `unsubscribe`, `publish` in any
    order; `stop` last (or just close the socket). Each returns the text message to send;
    calling them out of order raises `LocalProtocolError`. Receive: `receive(message)` turns
    each incoming WebSocket message into a list of `ClientEvent`s, in any state. Pings,
    pacing (one 20 ms frame every 20 ms) and the socket belong to the adapter.
    """

    started: bool = attrs.field(default=False, init=False)
    """True once `start` was called."""
    stopped: bool = attrs.field(default=False, init=False)
    """True once `stop` was called; nothing more may be sent."""
    _topics: set[str] = attrs.field(factory=set, init=False)

    @property
    def subscriptions(self) -> frozenset[str]:
        """Topics subscribed and not unsubscribed: resubscribe them after a reconnect (the
        example does; a new session starts with none)."""
        return frozenset(self._topics)

    def _require_open(self, what: str) -> None:
        if not self.started:
            raise LocalProtocolError(f"{what} before start: send the start frame first")
        if self.stopped:
            raise LocalProtocolError(f"{what} after stop")

    # --- sending ---------------------------------------------------------------------------

    def start(self) -> str:
        """``{"event":"start"}``: claims the session. Send within `START_TIMEOUT_S` of
        connecting. Only once."""
        if self.started:
            raise LocalProtocolError("start sent twice")
        self.started = True
        return '{"event":"start"}'

    def media(self, pcm: Any) -> str:
        """``{"event":"media","payload":"<base64>"}`` for `pcm`: signed 16-bit little-endian
        PCM, 8 kHz mono, any buffer (bytes, bytearray, memoryview, a C-contiguous int16 numpy
        array). Send 320 bytes (20 ms, 428 base64 characters) every 20 ms. Raises
        `LocalProtocolError` for an odd or zero byte count or more than `MAX_PCM_BYTES`."""
        self._require_open("media")
        return self._build_media(pcm)

    def stop(self) -> str:
        """``{"event":"stop"}``: ends the session. Close the socket after sending it."""
        self._require_open("stop")
        self.stopped = True
        return '{"event":"stop"}'

    def subscribe(self, topic: str) -> str:
        """``{"event":"subscribe","topic":…}``. Raises `LocalProtocolError` for a topic that is
        not a non-empty string of at most `MAX_TOPIC_LENGTH` UTF-16 code units."""
        self._require_open("subscribe")
        self._check_topic(topic)
        self._topics.add(topic)
        return _encode_frame({"event": "subscribe", "topic": topic}, "subscribe")

    def unsubscribe(self, topic: str) -> str:
        """``{"event":"unsubscribe","topic":…}``; the same topic checks as `subscribe`."""
        self._require_open("unsubscribe")
        self._check_topic(topic)
        self._topics.discard(topic)
        return _encode_frame({"event": "unsubscribe", "topic": topic}, "unsubscribe")

    def publish(self, topic: str, data: Any) -> str:
        """``{"event":"message","topic":…,"data":…}``: publish `data` (a str, or any JSON
        value, sent as is; the server serializes it for subscribers) to everyone in the room
        subscribed to `topic`. We never receive our own messages back.

        Raises `PublishRefused` (a `LocalProtocolError`) when `topic` is not a non-empty string
        of at most 128 UTF-16 code units, or `data` is not a JSON value, or what subscribers
        would receive (the string, or the compact serialization) is over `MAX_PAYLOAD_BYTES`
        bytes of UTF-8 or not valid Unicode. The message names the cause and the sizes."""
        self._require_open("publish")
        problem = _topic_problem(topic)
        if problem is not None:
            raise PublishRefused(f"publish refused: {problem[0]}", field="topic")
        try:
            text = _payload_text(data)
        except ValueError as exc:
            raise PublishRefused(f"publish refused: {exc}", field="data") from None
        problem = _payload_problem(text)
        if problem is not None:
            raise PublishRefused(f"publish refused: {problem[0]}", field="data")
        return _encode_frame({"event": "message", "topic": topic, "data": data}, "message")

    @staticmethod
    def _check_topic(topic: Any) -> None:
        problem = _topic_problem(topic)
        if problem is not None:
            raise LocalProtocolError(problem[0])

    # --- receiving -------------------------------------------------------------------------

    def receive(self, message: str | bytes) -> list[ClientEvent]:
        """Events from one WebSocket message (a text message as str, a binary one as bytes).

        Returns [] or one event: `Media` (none for an empty payload or a lone carried byte),
        `Message`, `ParticipantJoined`, `ParticipantLeft`, `MeetingJoined`, `MeetingLeft` or
        `Unknown`. Raises `RemoteProtocolError` with the close code to send (module
        docstring)."""
        frame, event = _decode_frame(message)
        if event == "media":
            return self._receive_media(frame)
        if event == "message":
            return [_parse_message(frame)]
        if event == PARTICIPANT_JOINED or event == PARTICIPANT_LEFT:
            participant = _dict_or_none(frame.get("participant")) or {}
            cls = ParticipantJoined if event == PARTICIPANT_JOINED else ParticipantLeft
            return [
                cls(
                    participant_id=_str_or_none(participant.get("id")),
                    name=_str_or_none(participant.get("name")),
                    metadata=_dict_or_none(participant.get("metadata")),
                    raw=frame,
                )
            ]
        if event == MEETING_JOINED:
            return [
                MeetingJoined(
                    room_id=_str_or_none(frame.get("roomId")),
                    session_id=_str_or_none(frame.get("sessionId")),
                    raw=frame,
                )
            ]
        if event == MEETING_LEFT:
            return [MeetingLeft(message=_str_or_none(frame.get("message")), raw=frame)]
        return [Unknown(event, frame)]


def _parse_message(frame: dict[str, Any]) -> Message:
    """A delivered pub/sub ``message`` frame (spec: Messaging, "Receive messages")."""
    topic = frame.get("topic")
    if not isinstance(topic, str):
        raise _remote(f"message frame topic is {_json_type(topic)}, expected a string", 1007)
    if "data" not in frame:
        raise _remote("message frame has no data", 1007)
    data = frame["data"]
    if isinstance(data, str):
        return Message(topic, data, None, None, None, None, None)
    if not isinstance(data, dict):
        raise _remote(f"message frame data is {_json_type(data)}, expected an object", 1007)
    text = data.get("message")
    if not isinstance(text, str):
        raise _remote(f"message frame data.message is {_json_type(text)}, expected a string", 1007)
    sender = {key: value for key, value in data.items() if key != "message"}
    return Message(
        topic=topic,
        data=text,
        sender=sender,
        sender_id=_str_or_none(sender.get("senderId")),
        sender_name=_str_or_none(sender.get("senderName")),
        timestamp=_str_or_none(sender.get("timestamp")),
        message_id=_str_or_none(sender.get("id")),
    )


@attrs.define
class IngestServer(_IngestStream):
    """The VideoSDK side of one ingest WebSocket (the gateway as a compatible server), sans-IO.

    `receive(message)`: before the start frame only ``{"event":"start"}`` is valid
    (→ `Started`; anything else → `RemoteProtocolError` 1008); then `Media`, `Subscribe`,
    `Unsubscribe`, `Publish`, `MessagingRefused`, `Unknown`, and `Stopped` (after which every
    message is ignored). Builders, valid between `Started` and `Stopped`: `media`, `deliver`,
    `event`. The adapter owns the start timeout (close with `START_TIMEOUT_CLOSE_CODE` and
    `START_TIMEOUT_REASON` unless `started` within `START_TIMEOUT_S`), pings every
    `PING_INTERVAL_S`, and the room.
    """

    started: bool = attrs.field(default=False, init=False)
    """True once the start frame arrived."""
    stopped: bool = attrs.field(default=False, init=False)
    """True once the stop frame arrived; later messages are ignored."""

    # --- receiving -------------------------------------------------------------------------

    def receive(self, message: str | bytes) -> list[ServerEvent]:
        """Events from one WebSocket message from the device (text as str, binary as bytes).

        Returns [] or one event. Raises `RemoteProtocolError` with the close code to send
        (module docstring); pub/sub frames that break the topic or payload rules give a
        `MessagingRefused` event instead (the spec: they never drop the call)."""
        if self.stopped:
            return []
        frame, event = _decode_frame(message)
        if not self.started:
            if event != "start":
                raise _remote(f"expected the start frame first, got {_show(event)}", 1008)
            self.started = True
            return [_STARTED]
        if event == "media":
            return self._receive_media(frame)
        if event == "subscribe" or event == "unsubscribe":
            topic = self._topic(frame, event)
            problem = _topic_problem(topic)
            if problem is not None:
                return [MessagingRefused(event, topic, problem[0], problem[1])]
            return [Subscribe(topic) if event == "subscribe" else Unsubscribe(topic)]
        if event == "message":
            return [self._publish(frame)]
        if event == "stop":
            self.stopped = True
            return [_STOPPED]
        if event == "start":
            raise _remote("start frame sent twice", 1002)
        return [Unknown(event, frame)]

    @staticmethod
    def _topic(frame: dict[str, Any], event: str) -> str:
        topic = frame.get("topic")
        if not isinstance(topic, str):
            if "topic" not in frame:
                raise _remote(f"{event} frame has no topic", 1007)
            raise _remote(f"{event} frame topic is {_json_type(topic)}, expected a string", 1007)
        return topic

    def _publish(self, frame: dict[str, Any]) -> Publish | MessagingRefused:
        topic = self._topic(frame, "message")
        if "data" not in frame:
            raise _remote("message frame has no data", 1007)
        value = frame["data"]
        problem = _topic_problem(topic)
        if problem is not None:
            return MessagingRefused("message", topic, problem[0], problem[1])
        try:
            text = _payload_text(value)
        except ValueError:  # nesting json.loads accepted but json.dumps cannot re-serialize
            raise _remote("message frame data cannot be serialized", 1007) from None
        problem = _payload_problem(text)
        if problem is not None:
            return MessagingRefused("message", topic, problem[0], problem[1])
        return Publish(topic, text, value)

    # --- sending ---------------------------------------------------------------------------

    def _require_open(self, what: str) -> None:
        if not self.started:
            raise LocalProtocolError(f"{what} before the client's start frame")
        if self.stopped:
            raise LocalProtocolError(f"{what} after the client's stop frame")

    def media(self, pcm: Any) -> str:
        """``{"event":"media","payload":"<base64>"}``: room audio for the device, signed
        16-bit little-endian PCM, 8 kHz mono (320 bytes per 20 ms). Same checks as
        `IngestClient.media`."""
        self._require_open("media")
        return self._build_media(pcm)

    def deliver(self, topic: str, data: Any, sender: dict[str, Any] | None = None) -> str:
        """A delivered pub/sub message, in the spec's shape: ``{"event":"message","topic":…,
        "data":{"message":…, **sender}}``.

        `data` is the text (a `Publish.data`), or any JSON value, serialized compactly first
        (subscribers receive a string). `sender` holds the rest of the ``data`` object, in
        order: ``senderId``, ``senderName``, ``timestamp`` (ISO 8601), ``id`` (and anything
        else); it may not contain ``message``. Raises `PublishRefused` for a topic or payload
        the spec's limits refuse, `LocalProtocolError` for a bad `sender`."""
        self._require_open("deliver")
        problem = _topic_problem(topic)
        if problem is not None:
            raise PublishRefused(f"deliver refused: {problem[0]}", field="topic")
        try:
            text = _payload_text(data)
        except ValueError as exc:
            raise PublishRefused(f"deliver refused: {exc}", field="data") from None
        problem = _payload_problem(text)
        if problem is not None:
            raise PublishRefused(f"deliver refused: {problem[0]}", field="data")
        if sender is None:
            sender = {}
        if not isinstance(sender, dict) or not all(isinstance(key, str) for key in sender):
            raise LocalProtocolError("deliver sender must be a dict with string keys")
        if "message" in sender:
            raise LocalProtocolError("deliver sender may not contain 'message' (that is the data)")
        return _encode_frame(
            {"event": "message", "topic": topic, "data": {"message": text, **sender}}, "message"
        )

    def event(self, name: str, /, **fields: Any) -> str:
        """``{"event": name, **fields}``: a room lifecycle event for the device, e.g.
        ``event(PARTICIPANT_JOINED, participant={"id": …, "name": …, "metadata": {…}})``,
        ``event(MEETING_JOINED, roomId=…, sessionId=…)``, ``event(MEETING_LEFT, message=…)``
        (the shapes the example reads). Raises `LocalProtocolError` for an empty name or
        fields that are not JSON."""
        self._require_open("event")
        if not isinstance(name, str) or not name:
            raise LocalProtocolError("event name must be a non-empty string")
        if "event" in fields:
            raise LocalProtocolError("event fields may not contain 'event'")
        return _encode_frame({"event": name, **fields}, name)


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
    if isinstance(body, dict):
        for key in ("retryAfter", "retry_after"):
            value = body.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
                return float(value)
    return None


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


# --- webhooks -------------------------------------------------------------------------------


class WebhookSignatureError(GatewayError):
    """A webhook's ``videosdk-signature`` does not prove it came from VideoSDK.

    `cause`: "missing" (no header), "not-base64" (the header is not base64), "bad-signature"
    (it does not verify over the body), "bad-key" (our configured key is not an RSA public key
    in PEM: a configuration error, answer 500 rather than 401). The message names the cause,
    never the signature or the body."""

    def __init__(self, message: str, *, cause: str) -> None:
        super().__init__(message)
        self.cause = cause


class WebhookPayloadError(GatewayError):
    """A verified webhook body is not a JSON object, or names no event (`webhook_event`)."""


def load_webhook_key(public_key_pem: bytes | str | rsa.RSAPublicKey) -> rsa.RSAPublicKey:
    """VideoSDK's webhook public key (PEM, from `WEBHOOK_PUBLIC_KEY_URL`) as an RSA key object;
    load it once and pass the object to `verify_webhook`. Raises `WebhookSignatureError`
    (cause "bad-key")."""
    if isinstance(public_key_pem, rsa.RSAPublicKey):
        return public_key_pem
    data = public_key_pem.encode("ascii", "replace") if isinstance(public_key_pem, str) else public_key_pem
    try:
        key = serialization.load_pem_public_key(bytes(data))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise WebhookSignatureError("webhook public key is not a PEM public key", cause="bad-key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise WebhookSignatureError("webhook public key is not an RSA key", cause="bad-key")
    return key


def _rsa_verifies(key: rsa.RSAPublicKey, signature: bytes, data: bytes) -> bool:
    try:
        key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


def verify_webhook(
    body: bytes, signature_b64: str | None, public_key_pem: bytes | str | rsa.RSAPublicKey
) -> dict[str, Any]:
    """Check a webhook's ``videosdk-signature`` header and return its JSON body.

    The signature is base64 (whitespace around it ignored) of RSA-SHA256, PKCS#1 v1.5, over
    the raw `body`; if that fails and the body is JSON, over its compact re-serialization
    (what VideoSDK's Node.js sample verifies: ``JSON.stringify(req.body)``). Raises
    `WebhookSignatureError` with cause "bad-key", "missing", "not-base64" or "bad-signature"
    (checked in that order), and `WebhookPayloadError` when a verified body is not a JSON
    object. No timestamp is signed, so replays cannot be detected here (dedupe on callId and
    event if that matters)."""
    key = load_webhook_key(public_key_pem)
    if signature_b64 is None or not signature_b64.strip():
        raise WebhookSignatureError(f"webhook has no {WEBHOOK_SIGNATURE_HEADER} header", cause="missing")
    try:
        signature = base64.b64decode(signature_b64.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise WebhookSignatureError(f"webhook {WEBHOOK_SIGNATURE_HEADER} is not base64", cause="not-base64") from None
    body = bytes(body)
    try:
        parsed: Any = loads_strict(body)
        is_json = True
    except (ValueError, RecursionError):
        parsed, is_json = None, False
    verified = _rsa_verifies(key, signature, body)
    if not verified and is_json:
        try:
            compact = _dumps(parsed).encode("utf-8")
        except (ValueError, RecursionError):
            compact = body
        verified = compact != body and _rsa_verifies(key, signature, compact)
    if not verified:
        raise WebhookSignatureError(
            f"webhook {WEBHOOK_SIGNATURE_HEADER} does not verify over the body", cause="bad-signature"
        )
    if not isinstance(parsed, dict):
        raise WebhookPayloadError("verified webhook body is not a JSON object")
    return parsed


def sign_webhook(body: bytes, private_key_pem: bytes) -> str:
    """The ``videosdk-signature`` value for `body` (listen side and tests): base64 of
    RSA-SHA256, PKCS#1 v1.5, with an unencrypted PEM RSA private key. Raises
    `LocalProtocolError` for any other key."""
    try:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise LocalProtocolError("webhook signing key is not an unencrypted PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise LocalProtocolError("webhook signing key is not an RSA key")
    return base64.b64encode(key.sign(bytes(body), padding.PKCS1v15(), hashes.SHA256())).decode("ascii")


def webhook_body(event: str, call_id: str, **data: Any) -> bytes:
    """A lifecycle webhook body (listen side) in VideoSDK's webhook envelope:
    ``{"webhookType": event, "data": {"callId": call_id, **data}}``, compact JSON, which
    `webhook_event` reads. Event names: ``call-started``, ``call-answered``, ``call-hangup``,
    ... (SIP webhooks list)."""
    if not isinstance(event, str) or not event or not isinstance(call_id, str) or not call_id:
        raise LocalProtocolError("webhook_body needs a non-empty event name and callId")
    return _encode_frame({"webhookType": event, "data": {"callId": call_id, **data}}, "webhook").encode("utf-8")


def webhook_event(payload: dict[str, Any]) -> tuple[str, str | None]:
    """(event name, callId) of a verified webhook body.

    The name is the first string among ``webhookType`` (VideoSDK's envelope), ``event`` and
    ``type``; the call id the first string among ``data.callId``, ``callId``,
    ``data.call_id`` and ``call_id`` (None when there is none: not every webhook is about an
    ingest call). Raises `WebhookPayloadError` when no event name is found."""
    if not isinstance(payload, dict):
        raise WebhookPayloadError("webhook body is not a JSON object")
    names = (payload.get("webhookType"), payload.get("event"), payload.get("type"))
    name = next((value for value in names if isinstance(value, str) and value), None)
    if name is None:
        raise WebhookPayloadError("webhook body names no event (webhookType, event or type)")
    data = payload.get("data")
    data = data if isinstance(data, dict) else {}
    candidates = (data.get("callId"), payload.get("callId"), data.get("call_id"), payload.get("call_id"))
    call_id = next((value for value in candidates if isinstance(value, str) and value), None)
    return name, call_id
