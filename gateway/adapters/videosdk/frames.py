"""VideoSDK custom WebSocket frames, sans-IO: JSON text frames in, events out; audio in, text out.

Source: /work/shared/protocols/004_c69f0f37162481c1.txt ("Custom WebSocket": How It Works,
Step 2 "Connect and Stream", Messaging, Troubleshooting, API Reference). The spec links its
runnable example, videosdk-live/videosdk-socket-ingest-example (app.js); where the spec is
silent, that example is the second source and is cited as "the example".

The ingest WebSocket (dial = `IngestClient`, listen = `IngestServer`), opened on the wsUrl of
an ingest session (Step 1: `gateway.adapters.videosdk.sessions`):

1. The device opens the wsUrl and sends ``{"event":"start"}`` within 5 s (`START_TIMEOUT_S`), or
   the server closes with 1008 "start timeout" (`START_TIMEOUT_CLOSE_CODE`,
   `START_TIMEOUT_REASON`). The server pings every 30 s (`PING_INTERVAL_S`).
2. Both sides send ``{"event":"media","payload":"<base64 PCM16-LE>"}``: signed 16-bit
   little-endian PCM, 8 kHz mono, 20 ms = 160 samples = 320 bytes = 428 base64 characters
   (`FRAME_BYTES`, `FRAME_BASE64_CHARS`).
3. Pub/sub on the same socket: ``subscribe`` / ``unsubscribe`` ``{"topic"}``; publishing is a
   ``{"event":"message","topic","data"}`` frame whose ``data`` is a string or any JSON value
   (JSON values are serialized before delivery); delivery to subscribers is a ``message``
   frame whose ``data`` is an object ``{"message", "senderId", "senderName", "timestamp",
   "id"}``. Topic: non-empty, at most 128 characters; payload at most 8 KB of UTF-8. Who
   receives what in a room (the listen side) is `gateway.adapters.videosdk.room`.
4. ``{"event":"stop"}`` (or closing the socket) ends the session.

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

Secrets: nothing here sees the REST token, a wsUrl or its ref (those are `sessions`'); peer
strings in error messages are shortened and ASCII-quoted.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import attrs

from gateway.adapters.rest import json_type as _json_type, loads_strict
from gateway.errors import CloseCode, LocalProtocolError, RemoteProtocolError

__all__ = [
    "ClientEvent",
    "FRAME_BASE64_CHARS",
    "FRAME_BYTES",
    "IngestClient",
    "IngestServer",
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
    "START_TIMEOUT_CLOSE_CODE",
    "START_TIMEOUT_REASON",
    "START_TIMEOUT_S",
    "ServerEvent",
    "Started",
    "Stopped",
    "Subscribe",
    "Unknown",
    "Unsubscribe",
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
START_TIMEOUT_CLOSE_CODE = CloseCode.POLICY_VIOLATION  # policy violation (spec: Step 2, Troubleshooting)
START_TIMEOUT_REASON = "start timeout"  # close reason sent with it
PING_INTERVAL_S = 30  # seconds between the server's WebSocket pings (spec: Step 2, note)

MAX_TOPIC_LENGTH = 128  # characters, counted in UTF-16 code units (see module docstring)
MAX_PAYLOAD_BYTES = 8 * 1024  # 8 KB: UTF-8 bytes of one published payload (see module docstring)

#: Room lifecycle events the server sends (the example's handleMessage; not in the spec text).
PARTICIPANT_JOINED = "participant-joined"
PARTICIPANT_LEFT = "participant-left"
MEETING_JOINED = "meeting-joined"
MEETING_LEFT = "meeting-left"

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
        return f"topic is {_json_type(topic)}, expected a string", CloseCode.INVALID_PAYLOAD
    if not topic:
        return "topic is empty", CloseCode.POLICY_VIOLATION
    length = _topic_length(topic)
    if length > MAX_TOPIC_LENGTH:
        return f"topic is {length} characters, limit {MAX_TOPIC_LENGTH}", CloseCode.POLICY_VIOLATION
    try:
        topic.encode("utf-8")
    except UnicodeEncodeError:
        return "topic is not valid Unicode (lone surrogate)", CloseCode.INVALID_PAYLOAD
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
        return "payload is not valid Unicode (lone surrogate)", CloseCode.INVALID_PAYLOAD
    if size > MAX_PAYLOAD_BYTES:
        return f"payload is {size} bytes of UTF-8, limit {MAX_PAYLOAD_BYTES} (8 KB)", CloseCode.MESSAGE_TOO_BIG
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
            raise _remote("binary message; VideoSDK ingest frames are JSON text", CloseCode.UNSUPPORTED_DATA)
        raise LocalProtocolError(
            f"receive takes a str (text message) or bytes (binary message), got {type(message).__name__}"
        )
    chars = len(message)
    if chars > MAX_MESSAGE_BYTES or (
        4 * chars > MAX_MESSAGE_BYTES and len(message.encode("utf-8", "surrogatepass")) > MAX_MESSAGE_BYTES
    ):
        raise _remote(f"text message over {MAX_MESSAGE_BYTES} bytes", CloseCode.MESSAGE_TOO_BIG)
    try:
        frame = loads_strict(message)
    except (ValueError, RecursionError):
        raise _remote("frame is not valid JSON", CloseCode.INVALID_PAYLOAD) from None
    if not isinstance(frame, dict):
        raise _remote(f"frame is {_json_type(frame)}, expected a JSON object", CloseCode.INVALID_PAYLOAD)
    event = frame.get("event")
    if not isinstance(event, str):
        if "event" not in frame:
            raise _remote("frame has no event field", CloseCode.INVALID_PAYLOAD)
        raise _remote(f"frame event is {_json_type(event)}, expected a string", CloseCode.INVALID_PAYLOAD)
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
                raise _remote("media frame has no payload", CloseCode.INVALID_PAYLOAD)
            raise _remote(f"media payload is {_json_type(payload)}, expected a base64 string", CloseCode.INVALID_PAYLOAD)
        try:
            pcm = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _remote("media payload is not valid base64", CloseCode.INVALID_PAYLOAD) from None
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
        raise _remote(f"message frame topic is {_json_type(topic)}, expected a string", CloseCode.INVALID_PAYLOAD)
    if "data" not in frame:
        raise _remote("message frame has no data", CloseCode.INVALID_PAYLOAD)
    data = frame["data"]
    if isinstance(data, str):
        return Message(topic, data, None, None, None, None, None)
    if not isinstance(data, dict):
        raise _remote(f"message frame data is {_json_type(data)}, expected an object", CloseCode.INVALID_PAYLOAD)
    text = data.get("message")
    if not isinstance(text, str):
        raise _remote(f"message frame data.message is {_json_type(text)}, expected a string", CloseCode.INVALID_PAYLOAD)
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
                raise _remote(f"expected the start frame first, got {_show(event)}", CloseCode.POLICY_VIOLATION)
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
            raise _remote("start frame sent twice", CloseCode.PROTOCOL_ERROR)
        return [Unknown(event, frame)]

    @staticmethod
    def _topic(frame: dict[str, Any], event: str) -> str:
        topic = frame.get("topic")
        if not isinstance(topic, str):
            if "topic" not in frame:
                raise _remote(f"{event} frame has no topic", CloseCode.INVALID_PAYLOAD)
            raise _remote(f"{event} frame topic is {_json_type(topic)}, expected a string", CloseCode.INVALID_PAYLOAD)
        return topic

    def _publish(self, frame: dict[str, Any]) -> Publish | MessagingRefused:
        topic = self._topic(frame, "message")
        if "data" not in frame:
            raise _remote("message frame has no data", CloseCode.INVALID_PAYLOAD)
        value = frame["data"]
        problem = _topic_problem(topic)
        if problem is not None:
            return MessagingRefused("message", topic, problem[0], problem[1])
        try:
            text = _payload_text(value)
        except ValueError:  # nesting json.loads accepted but json.dumps cannot re-serialize
            raise _remote("message frame data cannot be serialized", CloseCode.INVALID_PAYLOAD) from None
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
