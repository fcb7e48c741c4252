"""Twilio Media Streams, sans-IO: JSON text messages in, typed events out; events in, text out.

Sources (Twilio's public documentation):

- "Media Streams - WebSocket Messages",
  https://www.twilio.com/docs/voice/media-streams/websocket-messages: what Twilio sends
  (``connected``, ``start``, ``media``, ``dtmf``, ``stop``, ``mark``) and what the WebSocket
  server may send back on a bidirectional stream (``media``, ``mark``, ``clear``).
- "TwiML Voice: <Stream>", https://www.twilio.com/docs/voice/twiml/stream: ``<Connect><Stream
  url>`` makes a bidirectional stream; ``<Parameter name value>`` nouns become
  ``start.customParameters``; the url takes no query string (error 31920,
  https://www.twilio.com/docs/api/errors/31920: "Use nested <Parameter> nouns to pass custom
  values instead").
- "Security", https://www.twilio.com/docs/usage/security#validating-requests, and "Media Streams
  Configuration", https://www.twilio.com/docs/global-infrastructure/firewall-configurations/
  media-streams-configuration ("validate the X-Twilio-Signature header ... how your application
  verifies that a Media Stream is coming from an authentic Twilio source"): the header is
  base64(HMAC-SHA1(auth token, URL + the POST parameters sorted by name, each name followed by
  its value)). Twilio's helper libraries (twilio-python ``RequestValidator``) also accept the
  URL with the default port added or removed ("sig generation on back end is inconsistent"),
  and sort repeated parameters' values; `signature_valid` does the same.
- Error pages 31950 (binary messages), 31951 (invalid message: not JSON, unknown type, missing
  field, wrong streamSid) and 31924 (protocol error) for what Twilio refuses from a server.

The two roles (the gateway plays either):

- `StreamServer`: the WebSocket server Twilio connects to (our listen role). `receive` takes
  Twilio's messages; `media`, `mark`, `clear` build what the server sends back.
- `StreamClient`: Twilio's part (our dial role, toward a Media Streams server such as an AI
  voice bot written for Twilio). `connected`, `start`, `media`, `dtmf`, `mark`, `stop` build
  what Twilio sends, numbered as Twilio numbers them; `receive` takes the server's ``media``,
  ``mark`` and ``clear``.

Audio is always ``audio/x-mulaw``, 8000 Hz, mono (`ENCODING`, `SAMPLE_RATE`, `CHANNELS`): one
byte per sample, base64 in ``media.payload``, without any file header. Twilio sends 20 ms
(160 bytes) per message; a server may send any length (`PTIME_MS`, `FRAME_BYTES`).

Wire facts and the choices made where the documentation is loose
----------------------------------------------------------------
- Numbers: ``sequenceNumber``, ``media.chunk`` and ``media.timestamp`` are decimal strings in
  every documented example (``"sequenceNumber": "1"``); we send them so. We accept a JSON
  integer too (Twilio-compatible services send integers), never a bool, a fraction or a sign.
- ``sequenceNumber`` counts every message but ``connected``, from 1 (the ``start``). We check
  that each message has one and that it grows; a gap is not an error (Twilio discards audio
  under upstream congestion, warning 31930), a repeat or a step back is (1002).
- ``media.chunk`` counts the media messages of a track from 1, ``media.timestamp`` is the
  presentation time in ms from the start of the stream. Both are passed on as parsed.
- ``start.mediaFormat``: anything but ``audio/x-mulaw`` / 8000 / 1 is 1003 (unsupported data):
  the docs say the value is always that, and we could not play anything else as it is.
- ``start.customParameters``: an object of strings (TwiML attributes are strings).
- ``dtmf.digit``: one key of ``0-9 * # A-D``; ``dtmf.track`` as sent (always
  ``inbound_track`` per the docs).
- Unknown event types are not errors (Twilio itself only warns, 31951): they come out as
  `Unknown` for the adapter to log once and ignore. Keys we do not use are ignored.
- A message naming another stream (``streamSid`` other than the ``start``'s) is 1002, one with
  no ``streamSid`` 1007.

Errors (`RemoteProtocolError.close_code`, RFC 6455 §7.4.1)
----------------------------------------------------------
- 1003: a binary message (every message is JSON text, 31950), a ``mediaFormat`` we cannot play.
- 1007: not JSON (NaN / Infinity refused), not an object, ``event`` missing or not a string, a
  field of a known message missing or of the wrong type, a payload that is not base64 (the
  standard alphabet, padded), a number that is not a non-negative integer, a DTMF digit that is
  not a key.
- 1002: out of order: a second ``connected`` or ``start``, ``connected`` after ``start``,
  ``media`` / ``dtmf`` / ``mark`` / ``stop`` before ``start``, anything after ``stop``; a
  ``sequenceNumber`` that does not grow; another stream's ``streamSid``.
- 1009: a message over `MAX_MESSAGE_BYTES` (64 KiB).

`str(err)` is the close reason (under 123 bytes); peer strings in it are shortened.
"If this raises anything but RemoteProtocolError, that's a bug" (h11); misuse of a protocol
object (media before start, a payload that is not bytes) raises `LocalProtocolError`.

Per-frame cost: one `json.loads` and one base64 decode per received media message, one base64
encode and one string join per sent one (no `json.dumps` on the media path: base64 and our SIDs
need no JSON escaping).

Secrets: the auth token is an argument of `signature` / `signature_valid` only; nothing here
keeps it or puts it in a message. Custom parameters may carry secrets of the application (a
per-call token, as some services pass): `Start.custom_parameters` is kept out of `repr`.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import json
import re
import secrets
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from gateway.adapters.rest import json_type as _json_type, loads_strict
from gateway.errors import CloseCode, LocalProtocolError, RemoteProtocolError

__all__ = [
    "CHANNELS",
    "ClientEvent",
    "Clear",
    "Connected",
    "DTMF_TRACK",
    "Dtmf",
    "ENCODING",
    "FRAME_BYTES",
    "MAX_MESSAGE_BYTES",
    "Mark",
    "Media",
    "PROTOCOL",
    "PTIME_MS",
    "Play",
    "SAMPLE_RATE",
    "SIGNATURE_HEADER",
    "ServerEvent",
    "Start",
    "State",
    "Stop",
    "StreamClient",
    "StreamServer",
    "TRACKS",
    "Unknown",
    "VERSION",
    "connect_stream_twiml",
    "new_sid",
    "parse_form",
    "reject_twiml",
    "signature",
    "signature_valid",
]

ENCODING = "audio/x-mulaw"  # start.mediaFormat.encoding: "Value is always audio/x-mulaw"
SAMPLE_RATE = 8000  # Hz, start.mediaFormat.sampleRate: "Value is always 8000"
CHANNELS = 1  # start.mediaFormat.channels: "Value is always 1"
PTIME_MS = 20  # ms of audio per media message Twilio sends
FRAME_BYTES = SAMPLE_RATE * PTIME_MS // 1000  # 160 bytes of u-law (one byte per sample) per 20 ms
MAX_MESSAGE_BYTES = 64 * 1024  # 64 KiB: far above a 20 ms media message (~300 bytes of JSON); 1009 beyond
PROTOCOL = "Call"  # connected.protocol in the docs' example
VERSION = "1.0.0"  # connected.version in the docs' example
TRACKS = ("inbound", "outbound")  # start.tracks / media.track values
DTMF_TRACK = "inbound_track"  # dtmf.track: "It is always inbound_track"
DTMF_KEYS = "0123456789*#ABCD"  # the keys of a DTMF keypad (ITU-T Q.23), as gateway.codecs.dtmf.KEYS
SIGNATURE_HEADER = "x-twilio-signature"  # lower-case, as header names are compared
MAX_REASON_CHARS = 40  # peer strings quoted in a close reason are cut to this

_SID = re.compile(r"[A-Za-z0-9]{1,64}")  # what we put into messages unescaped (ours: 2 letters + 32 hex)
_DIGITS = re.compile(r"[0-9]{1,18}")


# --- events ------------------------------------------------------------------------------------


@attrs.frozen
class Connected:
    """``connected``: the first message of a stream; names the protocol of the messages to come."""

    protocol: str
    """``protocol``, "Call" in the docs."""
    version: str
    """``version``, the protocol's semantic version ("1.0.0")."""


@attrs.frozen
class Start:
    """``start``: the stream's metadata, once, right after ``connected``."""

    stream_sid: str
    """``start.streamSid`` (``MZ`` + 32 hex digits at Twilio): names the stream in every later
    message both ways."""
    account_sid: str
    """``start.accountSid``: the account that created the stream (``AC…``)."""
    call_sid: str
    """``start.callSid``: the call the stream belongs to (``CA…``)."""
    tracks: tuple[str, ...]
    """``start.tracks``: the media flows to expect, of `TRACKS` (``("inbound",)`` for
    ``<Connect><Stream>``)."""
    custom_parameters: dict[str, str] = attrs.field(repr=lambda p: f"<{len(p)} parameters>")
    """``start.customParameters``: the ``<Parameter>`` nouns of the TwiML, name → value. May hold
    an application's secrets: kept out of `repr`, never log the values."""
    sequence: int
    """Its ``sequenceNumber`` (1 from Twilio)."""


@attrs.frozen
class Media:
    """``media`` from Twilio: audio of one track."""

    track: str
    """``media.track``: "inbound" (what the caller says) or "outbound" (what the caller hears,
    on a ``<Start><Stream track="both_tracks">``)."""
    chunk: int
    """``media.chunk``: counts the track's media messages from 1."""
    timestamp: int
    """``media.timestamp``: presentation time, ms from the start of the stream."""
    payload: bytes = attrs.field(repr=lambda p: f"<{len(p)} bytes>")
    """u-law 8 kHz mono, one byte per sample (160 bytes for 20 ms); may be empty."""


@attrs.frozen
class Dtmf:
    """``dtmf``: a key pressed on the call (bidirectional streams)."""

    digit: str
    """``dtmf.digit``: one of ``0-9 * # A-D``."""
    track: str
    """``dtmf.track``, "inbound_track"."""


@attrs.frozen
class Mark:
    """``mark``: from Twilio, the mark a server sent, now that the audio before it has played
    (or was cleared); from a server, a mark to echo once the audio sent before it has played."""

    name: str
    """``mark.name``, as the server chose it."""


@attrs.frozen
class Stop:
    """``stop``: the stream stopped or the call ended; Twilio closes the WebSocket next."""

    account_sid: str
    """``stop.accountSid``."""
    call_sid: str
    """``stop.callSid``."""


@attrs.frozen
class Play:
    """``media`` from a server (client side): audio to play into the call, after what it sent
    before (Twilio buffers it and plays it at real time)."""

    payload: bytes = attrs.field(repr=lambda p: f"<{len(p)} bytes>")
    """u-law 8 kHz mono, any length (may be empty)."""


@attrs.frozen
class Clear:
    """``clear`` from a server (client side): drop the audio buffered and not yet played, and
    send back every mark still waiting (barge-in)."""


@attrs.frozen
class Unknown:
    """A message whose ``event`` this module does not know: ignore it (Twilio warns, 31951, and
    goes on). Reported so the adapter can log it."""

    event: str
    """The message's ``event``, shortened to `MAX_REASON_CHARS`."""


ServerEvent = Connected | Start | Media | Dtmf | Mark | Stop | Unknown
"""What `StreamServer.receive` returns (one per message)."""
ClientEvent = Play | Mark | Clear | Unknown
"""What `StreamClient.receive` returns (one per message)."""

_CLEAR = Clear()
_STREAM_EVENTS = frozenset(("media", "dtmf", "mark", "stop"))


class State(enum.Enum):
    """Where a `StreamServer` is: the literal table of what each state accepts (h11 style).

    ::

        AWAITING_START --connected--> AWAITING_START (once) --start--> STREAMING
        STREAMING --media | dtmf | mark--> STREAMING --stop--> STOPPED
        AWAITING_START, STREAMING --an unknown event--> no change (`Unknown`)
        STOPPED: nothing more (1002)
    """

    AWAITING_START = "awaiting start"
    STREAMING = "streaming"
    STOPPED = "stopped"


# --- parsing helpers ---------------------------------------------------------------------------


def _remote(message: str, code: CloseCode) -> RemoteProtocolError:
    return RemoteProtocolError(message, close_code=code)


def _short(text: str) -> str:
    return repr(text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…")


def _decode(message: Any) -> tuple[dict[str, Any], str]:
    """One WebSocket message → (the JSON object, its event); raises RemoteProtocolError."""
    if not isinstance(message, str):
        if isinstance(message, (bytes, bytearray, memoryview)):
            raise _remote("binary message; Media Streams messages are JSON text", CloseCode.UNSUPPORTED_DATA)
        raise LocalProtocolError(f"receive takes a str (text message) or bytes, got {type(message).__name__}")
    chars = len(message)
    if chars > MAX_MESSAGE_BYTES or (4 * chars > MAX_MESSAGE_BYTES
                                     and len(message.encode("utf-8", "surrogatepass")) > MAX_MESSAGE_BYTES):
        raise _remote(f"text message over {MAX_MESSAGE_BYTES} bytes", CloseCode.MESSAGE_TOO_BIG)
    try:
        data = loads_strict(message)
    except (ValueError, RecursionError):
        raise _remote("message is not valid JSON", CloseCode.INVALID_PAYLOAD) from None
    if not isinstance(data, dict):
        raise _remote(f"message is {_json_type(data)}, expected a JSON object", CloseCode.INVALID_PAYLOAD)
    event = data.get("event")
    if not isinstance(event, str):
        if "event" not in data:
            raise _remote("message has no event", CloseCode.INVALID_PAYLOAD)
        raise _remote(f"event is {_json_type(event)}, expected a string", CloseCode.INVALID_PAYLOAD)
    return data, event


def _field(obj: dict[str, Any], key: str, kind: type[Any], where: str) -> Any:
    """obj[key], which must be of `kind` (str, dict or list); 1007 naming `where.key` otherwise."""
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        if key not in obj:
            raise _remote(f"{where} has no {key}", CloseCode.INVALID_PAYLOAD)
        expected = "a string" if kind is str else "an object" if kind is dict else "an array"
        raise _remote(f"{where}.{key} is {_json_type(value)}, expected {expected}", CloseCode.INVALID_PAYLOAD)
    return value


def _number(obj: dict[str, Any], key: str, where: str) -> int:
    """A non-negative integer sent as a decimal string (Twilio) or a JSON integer; 1007 otherwise."""
    value = obj.get(key)
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**18:
        return value
    if key not in obj:
        raise _remote(f"{where} has no {key}", CloseCode.INVALID_PAYLOAD)
    shown = _short(value) if isinstance(value, str) else _json_type(value)
    raise _remote(f"{where}.{key} is {shown}, expected a non-negative integer (decimal string)", CloseCode.INVALID_PAYLOAD)


def _payload(media: dict[str, Any], where: str) -> bytes:
    payload = media.get("payload")
    if not isinstance(payload, str):
        if "payload" not in media:
            raise _remote(f"{where} has no payload", CloseCode.INVALID_PAYLOAD)
        raise _remote(f"{where}.payload is {_json_type(payload)}, expected a base64 string", CloseCode.INVALID_PAYLOAD)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _remote(f"{where}.payload is not valid base64", CloseCode.INVALID_PAYLOAD) from None


def _b64(payload: Any) -> str:
    """base64 of u-law bytes we send; LocalProtocolError for anything but bytes."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise LocalProtocolError(f"media takes u-law bytes, got {type(payload).__name__}")
    return base64.b64encode(payload).decode("ascii")


def _dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def _check_sid(sid: Any, what: str) -> str:
    if not isinstance(sid, str) or not _SID.fullmatch(sid):
        raise LocalProtocolError(f"{what} must be 1 to 64 letters and digits, got {sid!r}")
    return sid


def new_sid(prefix: str) -> str:
    """A fresh SID in Twilio's shape: `prefix` (``MZ`` stream, ``CA`` call, ``AC`` account) and 32
    random lower-case hex digits (the docs' ``^MZ[0-9a-fA-F]{32}$``)."""
    return prefix + secrets.token_hex(16)


# --- the server (listen role) ------------------------------------------------------------------


@attrs.define
class StreamServer:
    """The WebSocket server's side of one stream (the gateway as the server Twilio connects to).

    `receive(message)` turns each message from Twilio into one `ServerEvent` and checks its
    order (`State`); once the ``start`` came, `media`, `mark` and `clear` build the messages to
    send back (bidirectional streams). Calling them before ``start`` raises LocalProtocolError.
    A message that raises changes no state (its sequence number is not taken), so the adapter
    closes from a consistent object.
    """

    state: State = State.AWAITING_START
    start_event: Start | None = None
    """The ``start``, once received."""
    marks_pending: set[str] = attrs.field(factory=set)
    """Names of the marks sent (`mark`) that Twilio has not sent back yet."""
    _connected: bool = False
    _sequence: int = 0  # the last sequenceNumber received
    _prefix: str = ""  # '{"event":"media","streamSid":"MZ…","media":{"payload":"'

    @property
    def stream_sid(self) -> str | None:
        return self.start_event.stream_sid if self.start_event else None

    def receive(self, message: str | bytes) -> ServerEvent:
        """One message from Twilio → its event. Raises RemoteProtocolError (module doc, Errors)."""
        data, event = _decode(message)
        state = self.state
        if state is State.STOPPED:
            raise _remote(f"{_short(event)} after stop", CloseCode.PROTOCOL_ERROR)
        if event == "connected":
            if self._connected or state is not State.AWAITING_START:
                raise _remote("connected twice" if self._connected else "connected after start", CloseCode.PROTOCOL_ERROR)
            result: ServerEvent = Connected(_field(data, "protocol", str, "connected"),
                                            _field(data, "version", str, "connected"))
            self._connected = True
            return result
        if event == "start":
            if state is not State.AWAITING_START:
                raise _remote("start twice", CloseCode.PROTOCOL_ERROR)
            start = self._parse_start(data)
            self.start_event = start
            self._sequence = start.sequence
            self._prefix = '{"event":"media","streamSid":"' + start.stream_sid + '","media":{"payload":"'
            self.state = State.STREAMING
            return start
        if event not in _STREAM_EVENTS:
            return Unknown(event[:MAX_REASON_CHARS])  # forward compatible: no field of it is checked
        if state is State.AWAITING_START:
            raise _remote(f"{_short(event)} before start", CloseCode.PROTOCOL_ERROR)
        sequence = self._next_sequence(data, event)
        if event == "media":  # first: the per-frame path
            media = _field(data, "media", dict, "media")
            track = _field(media, "track", str, "media")
            if track not in TRACKS:
                raise _remote(f"media.track is {_short(track)}, expected inbound or outbound", CloseCode.INVALID_PAYLOAD)
            result = Media(track, _number(media, "chunk", "media"), _number(media, "timestamp", "media"),
                           _payload(media, "media"))
        elif event == "dtmf":
            dtmf = _field(data, "dtmf", dict, "dtmf")
            digit = _field(dtmf, "digit", str, "dtmf")
            if len(digit) != 1 or digit.upper() not in DTMF_KEYS:
                raise _remote(f"dtmf.digit is {_short(digit)}, expected one of 0-9 * # A-D", CloseCode.INVALID_PAYLOAD)
            result = Dtmf(digit.upper(), _field(dtmf, "track", str, "dtmf"))
        elif event == "mark":
            name = _field(_field(data, "mark", dict, "mark"), "name", str, "mark")
            self.marks_pending.discard(name)
            result = Mark(name)
        else:  # stop
            stop = _field(data, "stop", dict, "stop")
            result = Stop(_field(stop, "accountSid", str, "stop"), _field(stop, "callSid", str, "stop"))
            self.state = State.STOPPED
        self._sequence = sequence  # only once the message is whole: a refused one changes nothing
        return result

    def _stream_of(self, data: dict[str, Any], event: str) -> str:
        sid: str = _field(data, "streamSid", str, event)
        if self.start_event is not None and sid != self.start_event.stream_sid:
            raise _remote(f"{event} names another stream ({_short(sid)})", CloseCode.PROTOCOL_ERROR)
        return sid

    def _next_sequence(self, data: dict[str, Any], event: str) -> int:
        self._stream_of(data, event)
        sequence = _number(data, "sequenceNumber", event)
        if sequence <= self._sequence:
            raise _remote(f"{event} sequenceNumber {sequence} does not follow {self._sequence}", CloseCode.PROTOCOL_ERROR)
        return sequence

    def _parse_start(self, data: dict[str, Any]) -> Start:
        sequence = _number(data, "sequenceNumber", "start")
        start = _field(data, "start", dict, "start")
        sid = _field(start, "streamSid", str, "start")
        if not sid:
            raise _remote("start.streamSid is empty", CloseCode.INVALID_PAYLOAD)
        if not _SID.fullmatch(sid):
            raise _remote(f"start.streamSid is {_short(sid)}, expected letters and digits", CloseCode.INVALID_PAYLOAD)
        if _field(data, "streamSid", str, "start") != sid:
            raise _remote("start: streamSid differs from start.streamSid", CloseCode.PROTOCOL_ERROR)
        tracks = _field(start, "tracks", list, "start")
        if not tracks or not all(isinstance(t, str) and t in TRACKS for t in tracks):
            raise _remote("start.tracks must list inbound and/or outbound", CloseCode.INVALID_PAYLOAD)
        params = start.get("customParameters", {})  # absent: no <Parameter> (not in the docs; lenient)
        if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
            raise _remote("start.customParameters must be an object of strings", CloseCode.INVALID_PAYLOAD)
        fmt = _field(start, "mediaFormat", dict, "start")
        encoding = _field(fmt, "encoding", str, "start.mediaFormat")
        rate = _number(fmt, "sampleRate", "start.mediaFormat")
        channels = _number(fmt, "channels", "start.mediaFormat")
        if (encoding, rate, channels) != (ENCODING, SAMPLE_RATE, CHANNELS):
            raise _remote(f"start.mediaFormat {_short(encoding)} {rate} Hz {channels} ch is not "
                          f"{ENCODING} {SAMPLE_RATE} Hz mono", CloseCode.UNSUPPORTED_DATA)
        return Start(sid, _field(start, "accountSid", str, "start"), _field(start, "callSid", str, "start"),
                     tuple(tracks), dict(params), sequence)

    # sending (bidirectional streams) --------------------------------------------------------

    def _require_start(self, what: str) -> str:
        if self.start_event is None:
            raise LocalProtocolError(f"{what} before start: the streamSid is not known yet")
        return self.start_event.stream_sid

    def media(self, payload: bytes) -> str:
        """``{"event":"media","streamSid":…,"media":{"payload":"<base64>"}}`` for u-law 8 kHz mono
        bytes (160 for 20 ms). The per-frame path: one base64 encode and one string join."""
        if not self._prefix:
            self._require_start("media")
        return self._prefix + _b64(payload) + '"}}'

    def mark(self, name: str) -> str:
        """``mark``: Twilio sends it back once the audio sent before it has played (or was
        cleared); `marks_pending` holds it until then."""
        sid = self._require_start("mark")
        if not isinstance(name, str):
            raise LocalProtocolError(f"a mark name is a string, got {type(name).__name__}")
        self.marks_pending.add(name)
        return _dumps({"event": "mark", "streamSid": sid, "mark": {"name": name}})

    def clear(self) -> str:
        """``clear``: Twilio drops the audio it buffered and not yet played, and sends back the
        marks waiting behind it (barge-in)."""
        return '{"event":"clear","streamSid":"' + self._require_start("clear") + '"}'


# --- the client (dial role: Twilio's part) -----------------------------------------------------


@attrs.define
class StreamClient:
    """Twilio's side of one stream (the gateway playing Twilio toward a Media Streams server).

    Send `connected` then `start` first, then `media` (and `dtmf`, `mark` echoes) in any order,
    `stop` last; each returns the text message, numbered as Twilio numbers them
    (``sequenceNumber`` from 1 at ``start``; ``media.chunk`` from 1; ``media.timestamp`` the ms
    of audio sent before the chunk). `receive` takes the server's ``media``, ``mark`` and
    ``clear``, checking they name this stream. Out of order calls raise LocalProtocolError.
    """

    stream_sid: str = attrs.field(factory=lambda: new_sid("MZ"))
    call_sid: str = attrs.field(factory=lambda: new_sid("CA"))
    account_sid: str = attrs.field(factory=lambda: new_sid("AC"))
    custom_parameters: Mapping[str, str] = attrs.field(factory=dict, repr=lambda p: f"<{len(p)} parameters>")
    """``start.customParameters`` (the ``<Parameter>`` nouns Twilio would have had)."""
    tracks: tuple[str, ...] = ("inbound",)
    """``start.tracks``: ``("inbound",)``, as a ``<Connect><Stream>`` has."""
    started: bool = False
    stopped: bool = False
    _connected: bool = False
    _sequence: int = 0  # the last sequenceNumber sent
    _chunk: int = 0  # media messages sent
    _samples: int = 0  # samples of audio sent (timestamp = samples / 8 ms)
    _suffix: str = ""  # '"}},"streamSid":"MZ…"}' closing every media message

    def __attrs_post_init__(self) -> None:
        for sid, what in ((self.stream_sid, "stream_sid"), (self.call_sid, "call_sid"),
                          (self.account_sid, "account_sid")):
            _check_sid(sid, what)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.custom_parameters.items()):
            raise LocalProtocolError("custom parameters are strings")
        if not self.tracks or not all(t in TRACKS for t in self.tracks):
            raise LocalProtocolError(f"tracks are of {TRACKS}, got {self.tracks!r}")
        self._suffix = '"},"streamSid":"' + self.stream_sid + '"}'

    def _require_open(self, what: str) -> None:
        if not self.started:
            raise LocalProtocolError(f"{what} before start")
        if self.stopped:
            raise LocalProtocolError(f"{what} after stop")

    def connected(self) -> str:
        """``{"event":"connected","protocol":"Call","version":"1.0.0"}``, first, once."""
        if self._connected or self.started:
            raise LocalProtocolError("connected is the first message, sent once")
        self._connected = True
        return _dumps({"event": "connected", "protocol": PROTOCOL, "version": VERSION})

    def start(self) -> str:
        """``start`` with the stream's metadata and ``mediaFormat`` u-law 8000 Hz mono
        (``sequenceNumber`` "1"), once, after `connected`."""
        if not self._connected or self.started:
            raise LocalProtocolError("start goes once, right after connected")
        self.started = True
        self._sequence = 1
        return _dumps({
            "event": "start",
            "sequenceNumber": "1",
            "start": {
                "accountSid": self.account_sid,
                "streamSid": self.stream_sid,
                "callSid": self.call_sid,
                "tracks": list(self.tracks),
                "mediaFormat": {"encoding": ENCODING, "sampleRate": SAMPLE_RATE, "channels": CHANNELS},
                "customParameters": dict(self.custom_parameters),
            },
            "streamSid": self.stream_sid,
        })

    def media(self, payload: bytes, track: str = "inbound") -> str:
        """``media`` of the caller's audio (u-law 8 kHz mono, 160 bytes per 20 ms) on `track`.
        The per-frame path: counters, one base64 encode, one string join."""
        if not self.started or self.stopped:
            self._require_open("media")
        if track not in TRACKS:
            raise LocalProtocolError(f"track is one of {TRACKS}, got {track!r}")
        data = _b64(payload)
        self._sequence += 1
        self._chunk += 1
        timestamp = self._samples // 8  # ms: 8 samples per ms at 8 kHz
        self._samples += len(payload)
        return ('{"event":"media","sequenceNumber":"' + str(self._sequence) + '","media":{"track":"' + track
                + '","chunk":"' + str(self._chunk) + '","timestamp":"' + str(timestamp) + '","payload":"' + data
                + self._suffix)

    def dtmf(self, digit: str) -> str:
        """``dtmf``: the caller pressed `digit` (one of ``0-9 * # A-D``)."""
        self._require_open("dtmf")
        if not isinstance(digit, str) or len(digit) != 1 or digit.upper() not in DTMF_KEYS:
            raise LocalProtocolError(f"a DTMF digit is one of 0-9 * # A-D, got {digit!r}")
        self._sequence += 1
        return _dumps({"event": "dtmf", "streamSid": self.stream_sid, "sequenceNumber": str(self._sequence),
                       "dtmf": {"track": DTMF_TRACK, "digit": digit.upper()}})

    def mark(self, name: str) -> str:
        """``mark``: the server's mark `name`, sent back once the audio before it has played."""
        self._require_open("mark")
        if not isinstance(name, str):
            raise LocalProtocolError(f"a mark name is a string, got {type(name).__name__}")
        self._sequence += 1
        return _dumps({"event": "mark", "sequenceNumber": str(self._sequence), "streamSid": self.stream_sid,
                       "mark": {"name": name}})

    def stop(self) -> str:
        """``stop``: the stream ends (the call hung up); close the WebSocket after it."""
        self._require_open("stop")
        self.stopped = True
        self._sequence += 1
        return _dumps({"event": "stop", "sequenceNumber": str(self._sequence),
                       "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
                       "streamSid": self.stream_sid})

    def receive(self, message: str | bytes) -> ClientEvent:
        """One message from the server → its event. Raises RemoteProtocolError (module doc)."""
        data, event = _decode(message)
        if event not in ("media", "mark", "clear"):
            return Unknown(event[:MAX_REASON_CHARS])
        sid = _field(data, "streamSid", str, event)
        if sid != self.stream_sid:
            raise _remote(f"{event} names another stream ({_short(sid)})", CloseCode.PROTOCOL_ERROR)
        if event == "media":
            return Play(_payload(_field(data, "media", dict, "media"), "media"))
        if event == "mark":
            name: str = _field(_field(data, "mark", dict, "mark"), "name", str, "mark")
            return Mark(name)
        return _CLEAR


# --- request validation (X-Twilio-Signature) ---------------------------------------------------


def signature(auth_token: str, url: str, params: Mapping[str, str | Iterable[str]] | None = None) -> str:
    """The ``X-Twilio-Signature`` of a request to `url` (as Twilio requested it: scheme, host,
    port if any, path, query) with form `params` (a POST's body; none for a GET or a WebSocket
    upgrade): base64 of HMAC-SHA1 keyed with the auth token over `url` followed by each
    parameter name, in sorted order, and its value (a repeated name: each distinct value, sorted).
    https://www.twilio.com/docs/usage/security#validating-requests"""
    text = url
    for name in sorted(params or ()):
        value = (params or {})[name]
        values = [value] if isinstance(value, str) else sorted(set(value))
        for item in values:
            text += name + item
    digest = hmac.new(auth_token.encode("utf-8"), text.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


_DEFAULT_PORTS = {"https": 443, "wss": 443, "http": 80, "ws": 80}


def _port_variants(url: str) -> list[str]:
    """`url` as given, without its port, and with the scheme's default port (twilio-python's
    RequestValidator checks the URL with and without the port)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return [url]
    variants = [url]
    host = parts.netloc.rpartition("@")[2]
    userinfo = parts.netloc[: len(parts.netloc) - len(host)]
    bare = host.rsplit(":", 1)[0] if port is not None else host
    if port is not None:
        variants.append(urllib.parse.urlunsplit(parts._replace(netloc=userinfo + bare)))
    elif parts.scheme in _DEFAULT_PORTS:
        variants.append(urllib.parse.urlunsplit(parts._replace(netloc=f"{userinfo}{bare}:{_DEFAULT_PORTS[parts.scheme]}")))
    return variants


def signature_valid(auth_token: str, urls: str | Iterable[str], params: Mapping[str, str | Iterable[str]] | None,
                    header: str | None) -> bool:
    """Whether `header` (the ``X-Twilio-Signature`` received; None when absent) signs a request
    to one of `urls` (each also tried without / with its default port) with `params`, under
    `auth_token`. Constant-time comparison (hmac.compare_digest)."""
    if not header or not auth_token:
        return False
    candidates = [urls] if isinstance(urls, str) else list(urls)
    given = header.strip().encode("ascii", "replace")
    ok = False
    for url in candidates:
        for variant in _port_variants(url):
            ok |= hmac.compare_digest(signature(auth_token, variant, params).encode("ascii"), given)
    return ok


def parse_form(body: bytes) -> dict[str, list[str]]:
    """An ``application/x-www-form-urlencoded`` body (Twilio's webhooks) → name → values, blank
    values kept (they are signed too). Raises ValueError for a body that is not UTF-8."""
    return urllib.parse.parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)


# --- TwiML ------------------------------------------------------------------------------------


def connect_stream_twiml(url: str, parameters: Mapping[str, str] | None = None, name: str | None = None) -> str:
    """The TwiML that answers a voice webhook with a bidirectional stream to `url`:
    ``<Response><Connect><Stream url="…"><Parameter name="…" value="…"/>…</Stream></Connect>
    </Response>`` (https://www.twilio.com/docs/voice/twiml/stream). `url` takes no query string
    (Twilio refuses it, 31920): pass values as `parameters`, which arrive in
    ``start.customParameters``. Built with xml.etree, so every value is escaped."""
    if urllib.parse.urlsplit(url).query:
        raise LocalProtocolError("a <Stream> url takes no query string (Twilio error 31920): use parameters")
    response = ET.Element("Response")
    stream = ET.SubElement(ET.SubElement(response, "Connect"), "Stream", {"url": url})
    if name:
        stream.set("name", name)
    for key, value in (parameters or {}).items():
        ET.SubElement(stream, "Parameter", {"name": key, "value": value})
    return '<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(response, encoding="unicode")


def reject_twiml(reason: str = "busy") -> str:
    """``<Response><Reject reason="busy"/></Response>``: the caller hears a busy tone (TwiML
    <Reject>, https://www.twilio.com/docs/voice/twiml/reject; reason "busy" or "rejected")."""
    if reason not in ("busy", "rejected"):
        raise LocalProtocolError(f"a <Reject> reason is busy or rejected, got {reason!r}")
    response = ET.Element("Response")
    ET.SubElement(response, "Reject", {"reason": reason})
    return '<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(response, encoding="unicode")
