"""VoIPBIN media stream framing, sans-IO: WebSocket messages in, events out; audio in, bytes out.

Source: /work/shared/protocols/002_fcf346ba8b7becb9.txt ("Bi-Directional Media Streaming",
"Encapsulation Types", "Audio Format Details"). The stream is one binary WebSocket message per
frame, 8 kHz mono, 20 ms, in one of three encapsulations chosen by the `encapsulation` query
parameter. The framing is symmetric, so the same object serves the gateway as a client of
VoIPBIN ("dial") and as a VoIPBIN-compatible server ("listen", external_media_start).

Encapsulations
--------------
- ``rtp``: each message is one RTP v2 packet (RFC 3550 §5.1), 12-byte header plus any CSRC list
  and header extension, parsed and serialized with aiortc's `RtpPacket`. Payload type 0 (PCMU,
  RFC 3551 §6) and 96 (dynamic; what the current service sends) are accepted; we answer with the
  payload type the peer last used (0 until its first audio packet arrives). Sequence numbers give
  `Audio.lost` (uint16 wrap-around aware, aiortc `uint16_gt`/`uint16_add`). The RTP timestamp is
  reported but never checked: the service has been seen to advance it by payload bytes instead of
  samples, which is harmless for u-law (1 byte = 1 sample) and wrong by 2x for slin; timing must
  come from the payload length and the sequence number, not from the timestamp.
- DTMF on ``rtp``: RFC 4733 telephone-events at payload type `dtmf_payload_type` (dynamic,
  97-127, default 101; 96 is the service's audio). Each packet's 4-byte payload gives one
  `TelephoneEvent` (never audio, never an error), and `KeyPress` comes once per key event (the
  receiver in `dtmf.py`: first packet, end packet, the three end packets counted once, a lost
  end). Event packets share the audio's SSRC and sequence numbers (RFC 4733 §2.1): they advance
  the sequence tracking, so the gap they leave between audio packets is not `Audio.lost`; a
  gap just before an event packet is its own `TelephoneEvent.lost`, not audio loss, and so are
  up to three packets missing between an event packet and the audio after it (its end packets,
  RFC 4733 §2.5.1.4: a press whose end packets were all lost conceals no audio). They do not
  take part in `Codec.AUTO` and never change the payload type we answer audio with. We send
  events with `send_telephone_event` (RFC 4733 §2.5.1; `dtmf.DtmfSender` schedules them).
- ``sln``: each message is raw audio, no header, no padding.
- ``audiosocket``: each message holds one Asterisk AudioSocket frame (or several back to back,
  ending on a frame boundary): 1-byte kind, 2-byte big-endian payload length, payload. The
  framing rules, events and serializers are AudioSocket's own, shared with the AudioSocket TCP
  adapter (`gateway.adapters.audiosocket.wire`, which cites the Asterisk sources). Kinds here:
  0x00 hangup, 0x01 UUID (16 bytes binary), 0x03 DTMF (one ASCII digit), 0x10 audio (slin 8 kHz
  little-endian), 0xff error (optional payload; Asterisk's own codes are 0x01 hangup of calling
  party, 0x02 frame forwarding error, 0x04 memory error). The audio kinds of other rates that
  newer Asterisk versions define (0x11-0x18) are not part of VoIPBIN's stream (8 kHz only):
  they are refused as unknown kinds (1003).

Headerless AudioSocket: the spec's own Node.js example
------------------------------------------------------
The spec's "Node.js Example (AudioSocket)" connects with ``encapsulation=audiosocket`` and sends
the raw file in 320-byte chunks: slin with no AudioSocket header, as fast as it can. Such a peer
is recognised on its first binary message, and the decision is final for the session:

- The first message is taken for raw slin ("headerless") when its length is even (whole
  16-bit samples) and it is not a well-formed AudioSocket message. Well-formed means: it
  parses whole into frames (known kinds, each length field matching what follows, the checks
  below), no audio frame in it is empty, and a hangup (with no payload) or an error frame
  comes only as its last frame. Otherwise it is parsed as AudioSocket, as every later message.
- From then on every message is raw slin audio (`Audio` events in slin whatever `Codec.AUTO`
  would make of the size; an odd length is 1007, more than `MAX_PAYLOAD_BYTES` is 1009, as on
  sln). `headerless` is True and the first message's events start with one `Headerless`
  event naming why its framing was refused, so the adapter can say so once.
- A session whose first message was well-formed AudioSocket stays AudioSocket: a later
  message that does not parse is refused as before (1002, 1003, 1007, 1009). An odd-length
  first message is parsed as AudioSocket (and refused if it does not parse): raw slin is
  never odd, while one audio frame of 320 bytes is 323. An explicit `Codec.ULAW` turns the
  detection off (raw u-law has no sample boundaries to check).

Why the rule holds: a chunk of raw speech starts with a known kind byte often enough (0x00,
0x01, 0x03, 0x10, 0xff), but it also has to chain frame lengths exactly to its end with valid
payloads; none of the 131,000 320-byte chunks taken at every even offset of the two bundled
8 kHz recordings does (the tests check or105.wav at every offset). The ambiguous cases are a
raw chunk that starts like a header, e.g. ``10 01 3d`` (audio, 317 bytes = its length - 3):
its payload is odd, so it is not slin and the message is headerless; and digital silence (all
zero bytes), which parses as a run of hangup frames when its length is a multiple of 3 (480,
960 or 1920 bytes): a hangup followed by anything is not well-formed, so it is headerless too.
A raw chunk that is well-formed AudioSocket by chance (it would have to end exactly on a frame
boundary with only plausible frames in it) is taken for AudioSocket, and the next raw message
is then refused with 1002/1003: it fails loudly, never as audio parsed from garbage.

What we send to a headerless peer: AudioSocket audio frames (kind 0x10, length, 320 bytes of
slin), the framing the client asked for with ``encapsulation=audiosocket`` and the one the
spec documents for it. A client that parses AudioSocket keeps working; the spec's example,
which appends every message it receives to a file, gets a 3-byte header before each 20 ms of
audio in that file (and the 3-byte hangup frame at the end), exactly what it would get from
an AudioSocket server that honours the encapsulation it asked for.

Codec: the contradiction in the spec, and the choice made
---------------------------------------------------------
The spec says "All formats use 16-bit, 8kHz, mono audio (ulaw for RTP/SLN, PCM little-endian
for AudioSocket)", but its "Audio Format Details" say SLN is "Raw PCM audio ... 16-bit signed"
(and call u-law "16-bit" for RTP, where G.711 is 8 bits per sample on the wire). The name SLN
("signed linear", Asterisk's ``slin``) agrees with the second statement. So:

- rtp defaults to u-law (G.711 μ-law, 160 bytes per 20 ms), sln and audiosocket default to slin
  (signed 16-bit little-endian PCM, 320 bytes per 20 ms);
- with `Codec.AUTO` the first audio payload decides: 160 bytes means u-law, 320 bytes means slin,
  any other size keeps the encapsulation's default. The decision is then final. (Consequence: a
  peer that sends 10 ms slin frames, 160 bytes, is taken for u-law; configure `Codec.SLIN`.)
- an explicit `Codec.ULAW` or `Codec.SLIN` never switches.
- on audiosocket, u-law (detected or configured) travels in kind 0x10 frames, which Asterisk
  defines as slin: that is the spec's "ulaw" reading, not Asterisk's; real Asterisk peers send
  320-byte slin frames and are detected as slin.

Empty payloads carry no audio and produce no `Audio` event (an RTP packet with an empty
payload still advances the sequence tracking; an AudioSocket audio frame of length 0 is
skipped); an empty WebSocket message is an error.

`MediaStreamProtocol.codec` is the resolved codec: what incoming payloads are and what
`send_audio` expects. Until the first audio arrives it is the encapsulation default, so an
adapter that sends first must re-read `codec` for every frame (or wait for `codec_resolved`).

Errors (`RemoteProtocolError.close_code`, RFC 6455 §7.4.1)
----------------------------------------------------------
- 1002: empty message, malformed RTP (aiortc's reason is named), truncated AudioSocket frame
  (expected vs got).
- 1003: text message on this binary stream, RTP payload type other than 0/96 and
  `dtmf_payload_type`, a telephone-event payload that is not 4 bytes (RFC 4733 §2.3; a packet
  of that type carrying audio-sized payloads is not a telephone-event), unknown AudioSocket kind.
- 1007: slin payload with an odd byte count (a raw message of a headerless session included),
  UUID frame not 16 bytes, DTMF frame not one valid digit.
- 1009: an audio (or AudioSocket) payload larger than `MAX_PAYLOAD_BYTES` (120 ms of slin).

After a `RemoteProtocolError` the adapter closes the WebSocket with `err.close_code` and
`str(err)` as the reason; the object is not meant to be used further. "If this raises anything
but RemoteProtocolError, that's a bug" (h11).
"""

from __future__ import annotations

import enum
import uuid as uuid_module

import attrs
from aiortc.rtp import RtpPacket
from aiortc.utils import random16, random32, uint16_add, uint16_gt, uint32_add

from gateway.adapters.audiosocket import wire as as_wire
from gateway.adapters.audiosocket.wire import DTMF_DIGITS, CallUuid, Dtmf, Hangup, PeerError
from gateway.adapters.voipbin.dtmf import (
    DTMF_VOLUME,
    END_PACKETS,
    PT_TELEPHONE_EVENT,
    KeyPress,
    KeyPressReceiver,
    TelephoneEvent,
    telephone_event_payload,
)
from gateway.errors import CloseCode, LocalProtocolError, RemoteProtocolError

__all__ = [
    "Audio",
    "CallUuid",
    "Codec",
    "DTMF_DIGITS",
    "Dtmf",
    "Encapsulation",
    "Event",
    "FRAME_BYTES",
    "Hangup",
    "Headerless",
    "KeyPress",
    "MAX_DROPOUT",
    "MAX_PAYLOAD_BYTES",
    "MediaStreamProtocol",
    "PAYLOAD_TYPES",
    "PT_PCMU",
    "PT_TELEPHONE_EVENT",
    "PT_VOIPBIN",
    "PTIME_MS",
    "PeerError",
    "SAMPLE_RATE",
    "SAMPLES_PER_FRAME",
    "TelephoneEvent",
]


class Encapsulation(enum.Enum):
    """How audio is carried in each WebSocket message (the `encapsulation` query parameter)."""

    RTP = "rtp"  #: one RTP v2 packet per message (RFC 3550)
    SLN = "sln"  #: raw audio, no header
    AUDIOSOCKET = "audiosocket"  #: Asterisk AudioSocket frames (kind, length, payload)


class Codec(enum.Enum):
    """Sample coding of the payload. AUTO is a request only; a resolved codec is ULAW or SLIN."""

    AUTO = "auto"  #: decide from the size of the first audio payload (see module docstring)
    ULAW = "ulaw"  #: G.711 μ-law, 1 byte per sample (ITU-T G.711; RTP PT 0, RFC 3551 §4.5.14)
    SLIN = "slin"  #: signed 16-bit linear PCM, little-endian, 2 bytes per sample


SAMPLE_RATE = 8000  # Hz, every encapsulation (spec: "Audio Format Details")
PTIME_MS = 20  # milliseconds of audio per message
SAMPLES_PER_FRAME = SAMPLE_RATE * PTIME_MS // 1000  # 160 samples per 20 ms
#: Payload bytes of one 20 ms frame, per resolved codec.
FRAME_BYTES = {Codec.ULAW: SAMPLES_PER_FRAME, Codec.SLIN: 2 * SAMPLES_PER_FRAME}
MAX_PAYLOAD_BYTES = 1920  # bytes: 120 ms of slin; larger payloads are refused with 1009

PT_PCMU = 0  # RTP payload type of G.711 μ-law (RFC 3551 §6, Table 4)
PT_VOIPBIN = 96  # dynamic payload type the current VoIPBIN service sends (u-law)
PAYLOAD_TYPES = frozenset({PT_PCMU, PT_VOIPBIN})
#: A sequence number this far ahead of the highest seen, or more, is a restart of the stream,
#: not loss (RFC 3550 Appendix A.1; 3000 packets is 60 s at 20 ms).
MAX_DROPOUT = 3000
_KIND_AUDIO = as_wire.KIND_AUDIO
#: AudioSocket kinds VoIPBIN carries (audio is 0x10 only: the spec defines no other rate), each
#: payload at most MAX_PAYLOAD_BYTES.
_AS_LIMITS = {kind: (name, MAX_PAYLOAD_BYTES) for kind, (name, _) in as_wire.default_limits({_KIND_AUDIO: SAMPLE_RATE}).items()}


# --- events ------------------------------------------------------------------------------


@attrs.frozen
class Audio:
    """One audio payload from the peer, as coded on the wire (no transport header)."""

    payload: bytes
    """u-law bytes (1 per sample) or slin bytes (signed 16-bit little-endian, 2 per sample)."""
    codec: Codec
    """How `payload` is coded: `Codec.ULAW` or `Codec.SLIN` (never AUTO)."""
    sequence: int | None
    """RTP sequence number (0..65535); None for sln and audiosocket."""
    timestamp: int | None
    """RTP timestamp as sent, unchecked (may grow by bytes, not samples); None otherwise."""
    lost: int
    """Packets missing just before this one by RTP sequence number (wrap-around aware); 0 for
    the first packet, for a late or duplicate packet, after a restart, and for sln/audiosocket.
    Sequence numbers taken by RFC 4733 telephone-event packets are not missing audio (module
    docstring, "DTMF on rtp")."""


# Hangup, CallUuid, Dtmf and PeerError are AudioSocket's own events
# (`gateway.adapters.audiosocket.wire`), re-exported here.


@attrs.frozen
class Headerless:
    """The peer sends raw slin without AudioSocket headers (the spec's Node.js example),
    decided on its first message; reported once, before that message's `Audio`."""

    reason: str
    """Why the first message is not AudioSocket framing (e.g. "unknown AudioSocket kind 0xe8")."""


Event = Audio | Hangup | CallUuid | Dtmf | PeerError | Headerless | TelephoneEvent | KeyPress

# --- the protocol object -------------------------------------------------------------------


def _default_codec(encapsulation: Encapsulation) -> Codec:
    return Codec.ULAW if encapsulation is Encapsulation.RTP else Codec.SLIN


@attrs.define(init=False)
class MediaStreamProtocol:
    """One VoIPBIN media stream (either direction of one WebSocket), sans-IO.

    ``MediaStreamProtocol(encapsulation, codec=Codec.AUTO, *, ssrc=None, sequence=None,
    timestamp=None, dtmf_payload_type=101)``: `ssrc`, `sequence` and `timestamp` are the first
    values of our outgoing RTP stream (random 32/16/32-bit, RFC 3550 §5.1, when None);
    `dtmf_payload_type` is the RTP payload type of RFC 4733 telephone-events both ways (97-127,
    else `LocalProtocolError`); they matter for rtp only.

    `receive(message)` turns one WebSocket message into events; `send_audio(payload)` (and
    `send_telephone_event`, `send_hangup`, `send_uuid`, `send_dtmf`) turn ours into one binary
    message; `flush()` ends a key press left open when the stream ends. Pacing, the WebSocket
    itself and any transcoding belong to the adapter.
    """

    encapsulation: Encapsulation
    """Framing of every message, fixed for the stream's life."""
    codec: Codec
    """Resolved codec (ULAW or SLIN): how received payloads are coded and what `send_audio`
    takes. Before the first audio with `Codec.AUTO`: u-law for rtp, slin for sln/audiosocket."""
    codec_resolved: bool
    """True once `codec` is final (explicit codec, or the first audio arrived with AUTO)."""
    ssrc: int
    """Our RTP synchronization source (rtp only)."""
    payload_type: int
    """RTP payload type we send audio with: the peer's last audio one (0 or 96), 0 before its
    first audio packet (telephone-events never change it)."""
    dtmf_payload_type: int
    """RTP payload type of RFC 4733 telephone-events, received and sent (rtp only)."""
    events_in: int
    """RFC 4733 telephone-event packets received (every copy; `KeyPress` counts presses)."""
    events_out: int
    """RFC 4733 telephone-event packets produced by `send_telephone_event`."""
    peer_ssrc: int | None
    """The peer's RTP SSRC, None before its first packet (rtp only)."""
    packets_in: int
    """Audio packets received (RTP packets, sln messages, AudioSocket audio frames)."""
    packets_out: int
    """Audio packets produced by `send_audio`."""
    lost: int
    """Packets missing by RTP sequence number before audio packets so far (sum of
    `Audio.lost`; gaps left by telephone-event packets are not loss)."""
    headerless: bool
    """audiosocket only: True once the peer's first message showed raw slin without AudioSocket
    headers (module docstring); every message is then raw slin audio."""
    _framed: bool  # audiosocket: a message parsed as AudioSocket frames, so the framing is settled
    _out_sequence: int
    _out_timestamp: int
    _highest_sequence: int | None
    _keys: KeyPressReceiver
    _after_event: bool  # the packet with the highest sequence number was a telephone-event
    _event_timestamp: int | None  # RTP timestamp of the telephone-event we are sending

    def __init__(
        self,
        encapsulation: Encapsulation,
        codec: Codec = Codec.AUTO,
        *,
        ssrc: int | None = None,
        sequence: int | None = None,
        timestamp: int | None = None,
        dtmf_payload_type: int = PT_TELEPHONE_EVENT,
    ) -> None:
        if not isinstance(encapsulation, Encapsulation):
            raise LocalProtocolError(f"encapsulation must be an Encapsulation, got {encapsulation!r}")
        if not isinstance(codec, Codec):
            raise LocalProtocolError(f"codec must be a Codec, got {codec!r}")
        for name, value, bits in (("ssrc", ssrc, 32), ("sequence", sequence, 16), ("timestamp", timestamp, 32)):
            if value is not None and not (0 <= value < 1 << bits):
                raise LocalProtocolError(f"{name} must be a {bits}-bit unsigned integer, got {value}")
        if isinstance(dtmf_payload_type, bool) or not isinstance(dtmf_payload_type, int) or not (
            97 <= dtmf_payload_type <= 127
        ):
            raise LocalProtocolError(
                f"dtmf_payload_type must be a dynamic RTP payload type 97-127 (96 is VoIPBIN's audio), "
                f"got {dtmf_payload_type!r}"
            )
        self.encapsulation = encapsulation
        self.codec_resolved = codec is not Codec.AUTO
        self.codec = codec if self.codec_resolved else _default_codec(encapsulation)
        self.ssrc = random32() if ssrc is None else ssrc
        self.payload_type = PT_PCMU
        self.dtmf_payload_type = dtmf_payload_type
        self.events_in = 0
        self.events_out = 0
        self.peer_ssrc = None
        self.packets_in = 0
        self.packets_out = 0
        self.lost = 0
        self.headerless = False
        self._framed = False
        self._out_sequence = random16() if sequence is None else sequence
        self._out_timestamp = random32() if timestamp is None else timestamp
        self._highest_sequence = None
        self._keys = KeyPressReceiver()
        self._after_event = False
        self._event_timestamp = None

    # --- receiving ---------------------------------------------------------------------

    def receive(self, message: bytes | bytearray | memoryview | str) -> list[Event]:
        """Events from one WebSocket message.

        Returns a list: one `Audio` for rtp/sln (none for an RTP packet with an empty
        payload), and one event per AudioSocket frame for audiosocket (for a headerless peer,
        one `Audio` per message, the first preceded by `Headerless`). rtp telephone-events:
        one `TelephoneEvent` per packet; a `KeyPress` follows the packet that ends a press, or
        comes before the `Audio` that ends one whose end packets were lost. Raises
        `RemoteProtocolError` with the close code to send (module docstring) when the message
        breaks the protocol; never anything else.
        """
        if isinstance(message, str):
            raise RemoteProtocolError("text message on a binary media stream", close_code=CloseCode.UNSUPPORTED_DATA)
        data = bytes(message)
        if not data:
            raise RemoteProtocolError(f"empty message on the {self.encapsulation.value} media stream", close_code=CloseCode.PROTOCOL_ERROR)
        if self.encapsulation is Encapsulation.RTP:
            return self._receive_rtp(data)
        if self.encapsulation is Encapsulation.SLN:
            return [self._audio(data, self._resolve(data), None, None, 0)]
        return self._receive_audiosocket(data)

    def _resolve(self, payload: bytes) -> Codec:
        """The codec of one non-empty audio payload; raises if the payload is refused.

        Changes no state, so a refused payload leaves the codec decision open."""
        size = len(payload)
        if size > MAX_PAYLOAD_BYTES:
            raise RemoteProtocolError(
                f"audio payload {size} bytes, limit {MAX_PAYLOAD_BYTES} (120 ms of slin)", close_code=CloseCode.MESSAGE_TOO_BIG
            )
        codec = self.codec
        if not self.codec_resolved:
            if size == FRAME_BYTES[Codec.ULAW]:
                codec = Codec.ULAW
            elif size == FRAME_BYTES[Codec.SLIN]:
                codec = Codec.SLIN
        if codec is Codec.SLIN and size % 2:
            raise RemoteProtocolError(f"slin audio payload has an odd length ({size} bytes)", close_code=CloseCode.INVALID_PAYLOAD)
        return codec

    def _audio(self, payload: bytes, codec: Codec, sequence: int | None, timestamp: int | None, lost: int) -> Audio:
        """Commit the codec decision, count the packet, wrap it."""
        self.codec = codec
        self.codec_resolved = True
        self.packets_in += 1
        return Audio(payload, codec, sequence, timestamp, lost)

    def _receive_rtp(self, data: bytes) -> list[Event]:
        try:
            packet = RtpPacket.parse(data)
        except ValueError as exc:  # aiortc names the cause: truncated header, CSRC, extension...
            raise RemoteProtocolError(f"malformed RTP packet: {exc}", close_code=CloseCode.PROTOCOL_ERROR) from None
        pt = packet.payload_type
        payload = packet.payload
        if pt == self.dtmf_payload_type:
            return self._receive_telephone_event(packet)
        if pt not in PAYLOAD_TYPES:
            raise RemoteProtocolError(
                f"RTP payload type {pt} not supported (expected 0 PCMU, 96, "
                f"or {self.dtmf_payload_type} telephone-event)", close_code=CloseCode.UNSUPPORTED_DATA
            )
        codec = self._resolve(payload) if payload else self.codec
        lost = self._track_sequence(packet.ssrc, packet.sequence_number)
        if self._highest_sequence == packet.sequence_number:  # the newest packet (not a late one)
            if lost and self._after_event:
                lost = max(0, lost - END_PACKETS)  # the event's end packets, lost (RFC 4733 §2.5.1.4)
            self._after_event = False
        self.lost += lost
        self.payload_type = pt
        if not payload:
            return []
        audio = self._audio(payload, codec, packet.sequence_number, packet.timestamp, lost)
        if self._keys.open:  # a press whose end packets were all lost ends after enough audio
            ended = self._keys.audio(len(payload) if codec is Codec.ULAW else len(payload) // 2)
            if ended:
                return [*ended, audio]
        return [audio]

    def _receive_telephone_event(self, packet: RtpPacket) -> list[Event]:
        """One RFC 4733 packet: `TelephoneEvent`, then any `KeyPress` it ends. An empty
        payload only advances the sequence tracking (as for audio)."""
        payload = packet.payload
        event = None
        if payload:
            try:
                event = TelephoneEvent.parse(
                    payload, marker=bool(packet.marker), timestamp=packet.timestamp,
                    sequence=packet.sequence_number,
                )
            except ValueError as exc:
                raise RemoteProtocolError(
                    f"RTP payload type {packet.payload_type} (telephone-event): {exc} (RFC 4733 §2.3)",
                    close_code=CloseCode.UNSUPPORTED_DATA,
                ) from None
        lost = self._track_sequence(packet.ssrc, packet.sequence_number)
        if self._highest_sequence == packet.sequence_number:
            self._after_event = True
        if event is None:
            return []
        self.events_in += 1
        if lost:
            event = attrs.evolve(event, lost=lost)
        return [event, *self._keys.event(event)]

    def flush(self) -> list[KeyPress]:
        """The stream ended: a `KeyPress` still open (its end packets never came, no audio
        after it) as ``[KeyPress]``, else ``[]``."""
        return list(self._keys.flush())

    def _track_sequence(self, ssrc: int, seq: int) -> int:
        """Packets lost before `seq`; updates the highest sequence number seen."""
        highest = self._highest_sequence
        if highest is None or ssrc != self.peer_ssrc:
            # First packet, or the peer restarted its RTP stream under a new SSRC.
            self.peer_ssrc = ssrc
            self._highest_sequence = seq
            return 0
        if not uint16_gt(seq, highest):
            return 0  # duplicate or late: already counted as lost when the gap was seen
        self._highest_sequence = seq
        gap = uint16_add(seq, 0xFFFF - highest)  # seq - highest - 1, modulo 2**16
        if gap + 1 >= MAX_DROPOUT:
            return 0  # a restart of the sequence, not a minute of loss
        return gap

    def _receive_audiosocket(self, data: bytes) -> list[Event]:
        if self.headerless:
            return [self._audio(data, self._resolve(data), None, None, 0)]
        if self._framed or len(data) % 2 or (self.codec_resolved and self.codec is Codec.ULAW):
            events = self._parse_audiosocket(data, first=False)
            self._framed = True
            return events
        # The first message, of even length: AudioSocket frames, or raw slin without headers?
        packets_in = self.packets_in
        try:
            events = self._parse_audiosocket(data, first=True)
        except RemoteProtocolError as err:
            # Raw slin: undo what frames parsed before the failure committed (count, codec).
            self.packets_in = packets_in
            self.headerless = True
            self.codec, self.codec_resolved = Codec.SLIN, True
            return [Headerless(str(err)), self._audio(data, self._resolve(data), None, None, 0)]
        self._framed = True
        return events

    def _parse_audiosocket(self, data: bytes, *, first: bool) -> list[Event]:
        """Events of every frame in `data` (the framing rules: `gateway.adapters.audiosocket.wire`;
        a message must end on a frame boundary). With `first`, also refuse what a well-formed
        first message never holds: an empty audio frame, a hangup with a payload, or anything
        after a hangup or error frame (then the caller takes the message for raw slin)."""
        events: list[Event] = []
        pos = 0
        end = len(data)
        while pos < end:
            header = as_wire.read_header(data, pos, _AS_LIMITS)
            if header is None:
                raise as_wire.header_truncated(end - pos)
            kind, length, name = header
            if first and events and isinstance(events[-1], (Hangup, PeerError)):
                last = "a hangup" if isinstance(events[-1], Hangup) else "an error"
                raise RemoteProtocolError(f"AudioSocket {name} frame after {last} frame", close_code=CloseCode.PROTOCOL_ERROR)
            pos += as_wire.HEADER.size
            if end - pos < length:
                raise as_wire.payload_truncated(name, length, end - pos)
            payload = data[pos : pos + length]
            pos += length
            if kind == _KIND_AUDIO:
                if payload:
                    events.append(self._audio(payload, self._resolve(payload), None, None, 0))
                elif first:
                    raise RemoteProtocolError("empty AudioSocket audio frame", close_code=CloseCode.PROTOCOL_ERROR)
            else:
                if first and kind == as_wire.KIND_HANGUP and length:
                    raise RemoteProtocolError(
                        f"AudioSocket hangup frame with a {length}-byte payload", close_code=CloseCode.PROTOCOL_ERROR
                    )
                events.append(as_wire.control_event(kind, payload))
        return events

    # --- sending -----------------------------------------------------------------------

    def send_audio(self, payload: bytes | bytearray | memoryview) -> bytes:
        """One binary WebSocket message carrying one 20 ms frame of `payload`.

        `payload` is already coded in `self.codec`: 160 bytes of u-law or 320 bytes of slin
        (`FRAME_BYTES`); anything else raises `LocalProtocolError`. rtp: RTP v2 packet with our
        SSRC, sequence +1 per packet (wrapping at 65536), timestamp +160 samples per packet,
        marker bit on the first packet, payload type `self.payload_type`. sln: the payload
        itself. audiosocket: kind 0x10, length, payload.
        """
        data = bytes(payload)
        expected = FRAME_BYTES[self.codec]
        if len(data) != expected:
            raise LocalProtocolError(
                f"send_audio takes one 20 ms frame: {expected} bytes of {self.codec.value}, got {len(data)}"
            )
        self.packets_out += 1
        if self.encapsulation is Encapsulation.SLN:
            return data
        if self.encapsulation is Encapsulation.AUDIOSOCKET:
            return as_wire.audio_frame(data)
        packet = RtpPacket(
            payload_type=self.payload_type,
            marker=1 if self.packets_out == 1 else 0,
            sequence_number=self._out_sequence,
            timestamp=self._out_timestamp,
            ssrc=self.ssrc,
            payload=data,
        )
        self._out_sequence = uint16_add(self._out_sequence, 1)
        self._out_timestamp = uint32_add(self._out_timestamp, SAMPLES_PER_FRAME)
        return packet.serialize()

    def send_telephone_event(
        self, event: int, duration: int, *, start: bool, end: bool, volume: int = DTMF_VOLUME
    ) -> bytes:
        """rtp only: one RFC 4733 telephone-event packet, sent in place of one 20 ms audio packet.

        `event` 0-255 (0-15: the keys, RFC 4733 §3.2), `duration` its length so far in timestamp
        units (8 kHz: 160 per 20 ms; 0-65535), `end` the E bit, `volume` 0-63 (-dBm0). `start`
        begins an event: its packet has the marker bit, and the event keeps the RTP timestamp
        of this slot in all its packets (RFC 4733 §2.5.1); repeat the final packet with `end`
        three times (§2.5.1.4). Every packet takes the next sequence number of our audio stream
        and its SSRC (§2.1), and advances the audio timestamp by one slot (160 samples), so the
        audio after the event resumes at the time it is played. Payload type
        `dtmf_payload_type`. Raises `LocalProtocolError` off rtp, for a continuation with no
        event started, or a field out of range."""
        if self.encapsulation is not Encapsulation.RTP:
            raise LocalProtocolError(f"send_telephone_event exists only on rtp, not {self.encapsulation.value}")
        if not start and self._event_timestamp is None:
            raise LocalProtocolError("send_telephone_event: no event started (pass start=True first)")
        try:
            payload = telephone_event_payload(event, duration, end=end, volume=volume)
        except ValueError as exc:
            raise LocalProtocolError(str(exc)) from None
        if start:
            self._event_timestamp = self._out_timestamp
        assert self._event_timestamp is not None  # just set, or checked on entry
        packet = RtpPacket(
            payload_type=self.dtmf_payload_type,
            marker=1 if start else 0,
            sequence_number=self._out_sequence,
            timestamp=self._event_timestamp,
            ssrc=self.ssrc,
            payload=payload,
        )
        self._out_sequence = uint16_add(self._out_sequence, 1)
        self._out_timestamp = uint32_add(self._out_timestamp, SAMPLES_PER_FRAME)
        self.events_out += 1
        return packet.serialize()

    def send_hangup(self) -> bytes | None:
        """audiosocket: the hangup frame ``00 00 00``. rtp/sln: None (close the WebSocket)."""
        if self.encapsulation is Encapsulation.AUDIOSOCKET:
            return as_wire.hangup_frame()
        return None

    def send_uuid(self, call_uuid: str | uuid_module.UUID) -> bytes:
        """audiosocket only: the UUID frame (kind 0x01, 16 bytes binary) for `call_uuid`."""
        self._require_audiosocket("send_uuid")
        return as_wire.uuid_frame(call_uuid)

    def send_dtmf(self, digit: str) -> bytes:
        """audiosocket only: the DTMF frame (kind 0x03) for one digit of `DTMF_DIGITS`."""
        self._require_audiosocket("send_dtmf")
        return as_wire.dtmf_frame(digit)

    def _require_audiosocket(self, what: str) -> None:
        if self.encapsulation is not Encapsulation.AUDIOSOCKET:
            raise LocalProtocolError(f"{what} exists only on audiosocket, not {self.encapsulation.value}")
