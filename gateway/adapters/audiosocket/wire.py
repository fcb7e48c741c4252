"""Asterisk AudioSocket framing, sans-IO: bytes in at any split, frames out; frames in, bytes out.

Sources
-------
- Protocol: Asterisk documentation, "AudioSocket" channel driver page
  (https://docs.asterisk.org/Configuration/Channel-Drivers/AudioSocket/, repository
  asterisk/documentation, docs/Configuration/Channel-Drivers/AudioSocket.md), and the original
  definition in github.com/CyCoreSystems/audiosocket (README.md "Protocol definition",
  audiosocket.go).
- What Asterisk does: asterisk/asterisk res/res_audiosocket.c (`ast_audiosocket_init`,
  `ast_audiosocket_send_frame`, `ast_audiosocket_receive_frame_with_hangup`),
  include/asterisk/res_audiosocket.h (`enum ast_audiosocket_msg_kind`), apps/app_audiosocket.c
  (the `AudioSocket(uuid,host:port)` dialplan application) and channels/chan_audiosocket.c
  (`Dial(AudioSocket/host:port/uuid[/c(codec)])`).

The frame
---------
Every frame is a 3-byte header, then the payload: 1 byte *kind*, 2 bytes payload length
(unsigned, big-endian), `length` bytes of payload. Over TCP frames follow each other with
nothing in between, so a read may end anywhere: inside a header, inside a payload, or on a
boundary. `FrameParser` buffers what a read leaves of a frame and yields each frame once it is
whole; the same bytes split at any offsets yield the same events (tests check every offset).

Kinds (`KIND_*`):

- 0x00 hangup: "terminate the connection (socket closure is also sufficient)"; no payload.
- 0x01 UUID: the call's identifier, 16 bytes binary (RFC 4122 byte order, what `uuid_parse`
  gives). Asterisk sends it first, once, right after connecting (`ast_audiosocket_init`).
- 0x03 DTMF: one ASCII digit (0-9, *, #, A-D) pressed on the call (Asterisk 20.x/21.x/22.x on).
- 0x10 audio: signed linear, 16-bit, 8 kHz, mono, little-endian ("slin").
- 0x11-0x18 audio at other rates (added to Asterisk 20.x-23.x in 2025; docs.asterisk.org lists
  them): 0x11 12 kHz, 0x12 16 kHz, 0x13 24 kHz, 0x14 32 kHz, 0x15 44.1 kHz, 0x16 48 kHz,
  0x17 96 kHz, 0x18 192 kHz, all signed linear 16-bit mono little-endian (`AUDIO_RATES`).
  The kind follows the format of the Asterisk frame (`ast_format_slin16` → 0x12, ...): the
  dialplan application always uses slin (0x10); the channel driver uses the codec negotiated
  or given with `c(slin16)`. (The first proposal, asterisk/asterisk#1492 and documentation#158,
  numbered slin16 0x11; the released enum and the documentation use the table above.)
- 0xff error: payload optional, application-specific; Asterisk's codes are single-byte bit
  flags: 0x01 hangup of the calling party, 0x02 frame forwarding error, 0x04 memory error.

Direction matters (`enum ast_audiosocket_msg_kind`): Asterisk *sends* UUID, DTMF, audio and
error frames; it *accepts* only audio and hangup (any other kind makes
`ast_audiosocket_receive_frame` log "Received AudioSocket message other than hangup or audio"
and end the call, as does an audio frame of length 0).

Errors (`RemoteProtocolError`)
------------------------------
Raised as soon as the bytes show the fault (an unknown kind or an oversize length once the
header is whole, before any payload is read). AudioSocket has no close codes: the adapter
closes the TCP connection; the codes carried are the WebSocket ones (RFC 6455 §7.4.1), used
where AudioSocket frames travel in WebSocket messages (VoIPBIN, `gateway.adapters.voipbin.wire`):

- 1002: a frame cut short (`FrameParser.receive_data(b"")` at end of stream, or a WebSocket
  message that ends inside a frame).
- 1003: a kind not in the parser's table (`UNKNOWN_KIND` wording: "unknown AudioSocket kind
  0x02").
- 1007: a UUID payload that is not 16 bytes, a DTMF payload that is not one digit, slin audio
  of an odd byte count.
- 1009: a payload longer than the kind allows (`limits`; default `MAX_AUDIO_MS` of audio at
  the kind's rate, `MAX_CONTROL_PAYLOAD` for the other kinds).

"If this raises anything but RemoteProtocolError, that's a bug" (h11).
"""

from __future__ import annotations

import struct
import uuid as uuid_module
from collections.abc import Mapping

import attrs

from gateway.errors import CloseCode, LocalProtocolError, RemoteProtocolError

__all__ = [
    "uuid_of_first_frame",
    "AUDIO_RATES",
    "AUDIO_KIND_OF_RATE",
    "Audio",
    "CallUuid",
    "DTMF_DIGITS",
    "Dtmf",
    "ERROR_FRAME_FORWARDING",
    "ERROR_HANGUP",
    "ERROR_MEMORY",
    "Event",
    "FrameParser",
    "HEADER",
    "Hangup",
    "KIND_AUDIO",
    "KIND_DTMF",
    "KIND_ERROR",
    "KIND_HANGUP",
    "KIND_UUID",
    "MAX_AUDIO_MS",
    "MAX_CONTROL_PAYLOAD",
    "PeerError",
    "audio_frame",
    "control_event",
    "default_limits",
    "dtmf_frame",
    "error_frame",
    "hangup_frame",
    "header_truncated",
    "kind_name",
    "payload_truncated",
    "read_header",
    "uuid_frame",
]

KIND_HANGUP = 0x00
KIND_UUID = 0x01
KIND_DTMF = 0x03
KIND_AUDIO = 0x10  # slin, 8 kHz
KIND_ERROR = 0xFF

#: Sample rate (Hz) of each audio kind: signed linear 16-bit mono little-endian at that rate.
AUDIO_RATES: Mapping[int, int] = {
    0x10: 8000,
    0x11: 12000,
    0x12: 16000,
    0x13: 24000,
    0x14: 32000,
    0x15: 44100,
    0x16: 48000,
    0x17: 96000,
    0x18: 192000,
}
AUDIO_KIND_OF_RATE: Mapping[int, int] = {rate: kind for kind, rate in AUDIO_RATES.items()}

ERROR_HANGUP = 0x01  # Asterisk error code: hangup of the calling party
ERROR_FRAME_FORWARDING = 0x02  # Asterisk error code: frame forwarding error
ERROR_MEMORY = 0x04  # Asterisk error code: memory (allocation) error

#: DTMF digits a DTMF frame may carry (lower-case a-d are accepted and reported upper-case).
DTMF_DIGITS = "0123456789*#ABCD"
HEADER = struct.Struct("!BH")  # kind, payload length (unsigned 16-bit, big-endian)
MAX_AUDIO_MS = 120  # ms: the longest audio payload accepted, at the frame's own rate
MAX_CONTROL_PAYLOAD = 1920  # bytes: the longest payload of a hangup, UUID, DTMF or error frame

_CONTROL_NAMES = {KIND_HANGUP: "hangup", KIND_UUID: "UUID", KIND_DTMF: "DTMF", KIND_ERROR: "error"}


def kind_name(kind: int) -> str:
    """"audio", "hangup", "UUID", "DTMF", "error", or "0x02" for a kind outside the protocol."""
    if kind in AUDIO_RATES:
        return "audio"
    return _CONTROL_NAMES.get(kind, f"0x{kind:02x}")


def default_limits(rates: Mapping[int, int] = AUDIO_RATES) -> dict[int, tuple[str, int]]:
    """The kinds a parser accepts, each with its name and largest payload (bytes): the four
    control kinds (`MAX_CONTROL_PAYLOAD`) and the audio kinds of `rates` (`MAX_AUDIO_MS` of
    slin at the kind's rate: 1920 bytes for 0x10, 3840 for 0x12 (16 kHz), ...)."""
    limits = {kind: (name, MAX_CONTROL_PAYLOAD) for kind, name in _CONTROL_NAMES.items()}
    for kind, rate in rates.items():
        limits[kind] = ("audio", 2 * rate * MAX_AUDIO_MS // 1000)
    return limits


# --- events ------------------------------------------------------------------------------


@attrs.frozen
class Audio:
    """One audio frame (kind 0x10-0x18), its payload as on the wire."""

    payload: bytes
    """Signed 16-bit linear PCM, little-endian, mono: an even, non-zero number of bytes."""
    rate: int
    """Sample rate of the payload, Hz (`AUDIO_RATES` of the frame's kind)."""


@attrs.frozen
class Hangup:
    """The peer ended the call (kind 0x00). Closing the connection means the same."""


@attrs.frozen
class CallUuid:
    """The call's identifier (kind 0x01); Asterisk sends it first, once."""

    uuid: str
    """Canonical lower-case 8-4-4-4-12 form of the 16 bytes received."""


@attrs.frozen
class Dtmf:
    """A DTMF digit pressed on the call (kind 0x03)."""

    digit: str
    """One of `DTMF_DIGITS` ("0"-"9", "*", "#", "A"-"D")."""


@attrs.frozen
class PeerError:
    """The peer reported an error (kind 0xff); the stream usually ends after it."""

    code: int | None
    """First payload byte (Asterisk: `ERROR_HANGUP` 0x01, `ERROR_FRAME_FORWARDING` 0x02,
    `ERROR_MEMORY` 0x04, bit flags); None when the payload is empty."""
    detail: bytes
    """The whole payload as received (application-specific; often empty or the code alone)."""


Event = Audio | Hangup | CallUuid | Dtmf | PeerError

_HANGUP = Hangup()


# --- framing rules, shared by the stream parser and message-based carriers ----------------


def read_header(data: bytes, pos: int, limits: Mapping[int, tuple[str, int]]) -> tuple[int, int, str] | None:
    """The header at `data[pos:]`: (kind, payload length, kind name), or None when fewer than 3
    bytes are left. Raises RemoteProtocolError for a kind not in `limits` (1003) or a length
    over the kind's limit (1009): both are known from the header alone."""
    if len(data) - pos < HEADER.size:
        return None
    kind, length = HEADER.unpack_from(data, pos)
    entry = limits.get(kind)
    if entry is None:
        raise RemoteProtocolError(f"unknown AudioSocket kind 0x{kind:02x}", close_code=CloseCode.UNSUPPORTED_DATA)
    name, limit = entry
    if length > limit:
        raise RemoteProtocolError(f"AudioSocket {name} payload {length} bytes, limit {limit}", close_code=CloseCode.MESSAGE_TOO_BIG)
    return kind, length, name


def control_event(kind: int, payload: bytes) -> Hangup | CallUuid | Dtmf | PeerError:
    """The event of one whole hangup, UUID, DTMF or error frame (`kind` already checked by
    `read_header`). Raises RemoteProtocolError (1007) for a UUID payload that is not 16 bytes
    or a DTMF payload that is not one digit. A hangup's payload, if any, is ignored (Asterisk
    reads none)."""
    if kind == KIND_HANGUP:
        return _HANGUP
    if kind == KIND_UUID:
        if len(payload) != 16:
            raise RemoteProtocolError(f"AudioSocket UUID payload {len(payload)} bytes, expected 16", close_code=CloseCode.INVALID_PAYLOAD)
        return CallUuid(str(uuid_module.UUID(bytes=payload)))
    if kind == KIND_DTMF:
        digit = payload.decode("latin-1").upper()
        if len(payload) != 1 or digit not in DTMF_DIGITS:
            raise RemoteProtocolError(
                f"AudioSocket DTMF payload is not one digit of {DTMF_DIGITS} ({len(payload)} bytes)", close_code=CloseCode.INVALID_PAYLOAD
            )
        return Dtmf(digit)
    return PeerError(payload[0] if payload else None, payload)


def uuid_of_first_frame(head: bytes) -> str | None:
    """The call UUID (canonical form) when `head`, the first bytes of a connection, starts
    with a whole UUID frame (kind 0x01, length 16); None otherwise: too short yet, or another
    frame (what a supervisor that routes connections by UUID peeks at, `gateway.workers`)."""
    if len(head) < 19 or head[0] != KIND_UUID or head[1:3] != b"\x00\x10":
        return None
    return str(uuid_module.UUID(bytes=bytes(head[3:19])))


def header_truncated(got: int, when: str = "") -> RemoteProtocolError:
    """The error for a stream or message that ends `got` bytes into a header (1002); `when`
    is appended to the message (e.g. " at end of stream")."""
    return RemoteProtocolError(f"AudioSocket header truncated{when}: expected 3 bytes, got {got}", close_code=CloseCode.PROTOCOL_ERROR)


def payload_truncated(name: str, length: int, got: int, when: str = "") -> RemoteProtocolError:
    """The error for a frame whose payload ends after `got` of its `length` bytes (1002)."""
    return RemoteProtocolError(
        f"AudioSocket {name} frame truncated{when}: expected {length} payload bytes, got {got}", close_code=CloseCode.PROTOCOL_ERROR
    )


# --- the stream parser --------------------------------------------------------------------

_AT_EOF = " at end of stream"


class FrameParser:
    """AudioSocket frames from a byte stream (one TCP connection, one direction), sans-IO.

    ``FrameParser(rates=AUDIO_RATES, limits=None)``: `rates` are the audio kinds accepted
    (kind → Hz; a kind outside it is "unknown", 1003); `limits` overrides `default_limits(rates)`.

    `receive_data(data)` takes the next bytes as read, cut anywhere, and returns the events of
    every frame they complete, in order; ``receive_data(b"")`` says the stream ended (EOF) and
    raises if it ended inside a frame. Audio frames of length 0 carry nothing and yield no
    event; audio of an odd length is refused (1007: slin is whole 16-bit samples). After a
    `RemoteProtocolError` the parser is not meant to be used further.

    Cost per frame: one header unpack, one dict look-up, one slice (the payload) and the event;
    bytes are joined only when a read ended inside a frame.
    """

    __slots__ = ("_limits", "_pending", "_rates", "eof", "frames_in")

    def __init__(self, rates: Mapping[int, int] = AUDIO_RATES,
                 limits: Mapping[int, tuple[str, int]] | None = None) -> None:
        self._rates = rates
        self._limits = dict(limits) if limits is not None else default_limits(rates)
        for kind in rates:
            if kind not in self._limits:
                raise LocalProtocolError(f"audio kind 0x{kind:02x} has no limit")
        self._pending = b""  # the start of a frame a read left incomplete
        self.eof = False
        """True once `receive_data(b"")` reported the end of the stream on a frame boundary."""
        self.frames_in = 0
        """Whole frames parsed (every kind, empty audio frames included)."""

    @property
    def buffered(self) -> int:
        """Bytes held of a frame not yet complete (0 on a frame boundary)."""
        return len(self._pending)

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Events of the frames completed by `data` (the next bytes of the stream), in order.

        ``b""`` is the end of the stream: returns ``[]`` on a frame boundary, else raises
        RemoteProtocolError naming what was cut ("AudioSocket audio frame truncated at end
        of stream: expected 320 payload bytes, got 100"). Raises RemoteProtocolError for the
        faults in the module docstring, never anything else."""
        if not data:
            self.eof = True
            pending = self._pending
            if not pending:
                return []
            header = read_header(pending, 0, self._limits)
            if header is None:
                raise header_truncated(len(pending), _AT_EOF)
            raise payload_truncated(header[2], header[1], len(pending) - HEADER.size, _AT_EOF)
        if self.eof:
            raise LocalProtocolError("receive_data after the end of the stream")
        buf = self._pending + data if self._pending else bytes(data)
        events: list[Event] = []
        pos, end = 0, len(buf)
        limits, rates = self._limits, self._rates
        while True:
            header = read_header(buf, pos, limits)
            if header is None:
                break
            kind, length, _ = header
            start = pos + HEADER.size
            if end - start < length:
                break
            pos = start + length
            self.frames_in += 1
            rate = rates.get(kind)
            if rate is not None:
                if length & 1:
                    raise RemoteProtocolError(
                        f"AudioSocket audio payload has an odd length ({length} bytes): slin is 16-bit samples",
                        close_code=CloseCode.INVALID_PAYLOAD,
                    )
                if length:
                    events.append(Audio(buf[start:pos], rate))
            else:
                events.append(control_event(kind, buf[start:pos]))
        self._pending = buf[pos:] if pos < end else b""
        return events


# --- serializers --------------------------------------------------------------------------


def audio_frame(payload: bytes | bytearray | memoryview, kind: int = KIND_AUDIO) -> bytes:
    """One audio frame: `kind` (0x10 for 8 kHz, `AUDIO_KIND_OF_RATE` for the others), length,
    `payload` (slin, an even number of bytes, at most 65535). Raises LocalProtocolError for
    an odd or too long payload or a kind that is not audio."""
    size = len(payload)
    if kind not in AUDIO_RATES or size & 1 or size > 0xFFFF:
        raise LocalProtocolError(f"not an AudioSocket audio frame: kind 0x{kind:02x}, {size} bytes")
    return HEADER.pack(kind, size) + payload


def hangup_frame() -> bytes:
    """The hangup frame ``00 00 00``."""
    return HEADER.pack(KIND_HANGUP, 0)


def uuid_frame(call_uuid: str | uuid_module.UUID) -> bytes:
    """The UUID frame (kind 0x01, 16 bytes binary) for `call_uuid` (a `uuid.UUID` or its string
    form); raises LocalProtocolError for anything else."""
    try:
        value = call_uuid if isinstance(call_uuid, uuid_module.UUID) else uuid_module.UUID(call_uuid)
    except (ValueError, TypeError, AttributeError):
        raise LocalProtocolError(f"not a UUID: {call_uuid!r}") from None
    return HEADER.pack(KIND_UUID, 16) + value.bytes


def dtmf_frame(digit: str) -> bytes:
    """The DTMF frame (kind 0x03) for one digit of `DTMF_DIGITS` (a-d upper-cased); raises
    LocalProtocolError for anything else."""
    if not isinstance(digit, str) or len(digit) != 1 or digit.upper() not in DTMF_DIGITS:
        raise LocalProtocolError(f"not a DTMF digit: {digit!r}")
    return HEADER.pack(KIND_DTMF, 1) + digit.upper().encode("ascii")


def error_frame(code: int | None = None) -> bytes:
    """An error frame (kind 0xff) with the one-byte `code` (0-255), or no payload for None."""
    if code is None:
        return HEADER.pack(KIND_ERROR, 0)
    if isinstance(code, bool) or not isinstance(code, int) or not 0 <= code <= 255:
        raise LocalProtocolError(f"an AudioSocket error code is one byte, got {code!r}")
    return HEADER.pack(KIND_ERROR, 1) + bytes((code,))
