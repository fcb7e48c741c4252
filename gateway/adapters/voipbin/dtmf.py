"""DTMF on a VoIPBIN media stream, pure: RFC 4733 telephone-events in and out, key presses.

Sources: RFC 4733 ("RTP Payload for DTMF Digits, Telephony Tones, and Telephony Signals")
§2.1 (events share the audio stream's SSRC, sequence numbers and timestamp clock), §2.3 (the
4-byte payload), §2.5.1 (sending: the marker bit on an event's first packet, one RTP timestamp
for the whole event, the duration growing in every update, the final packet with the E bit
sent three times, long events in segments), §2.5.2 (receiving), §3.2 (event codes 0-15 are
the keys "0"-"9", "*", "#", "A"-"D"); the spec /work/shared/protocols/002_fcf346ba8b7becb9.txt
for the stream itself (8 kHz, 20 ms per message, encapsulations rtp, sln, audiosocket).

Nothing here reads a clock or touches a socket:

- `TelephoneEvent` is one received telephone-event packet (`wire.MediaStreamProtocol` parses
  the RTP header and hands the payload here); `telephone_event_payload` builds one.
- `KeyPressReceiver` turns the packets into one `KeyPress` per event. The first packet of an
  event (marker bit; any packet with a new timestamp if that one was lost) opens it, the first
  packet with the E bit ends it, the other end packets (same timestamp) are ignored, so the
  three redundant end packets count once. A press whose end packets were all lost ends when a
  packet with a new timestamp shows a new event began, or once `LOST_END_MS` of audio has
  arrived since its last packet. That timeout is measured in audio received (media time), not
  in arrival time: after a stall of the WebSocket's TCP connection the packets arrive in a
  burst, and an arrival-time timeout would end a press whose updates are right behind.
- `DtmfSender` plays queued key presses into one stream, one 20 ms slot at a time, as the
  encapsulation allows: RFC 4733 packets in place of the audio (rtp), one AudioSocket DTMF
  frame (audiosocket), or the Q.23 tone pair replacing the audio (sln, `gateway.codecs.dtmf`).
"""

from __future__ import annotations

import collections
import struct
from typing import TYPE_CHECKING

import attrs
import numpy as np

from gateway.codecs.dtmf import KEYS, MIN_PAUSE_MS, tone

if TYPE_CHECKING:
    from gateway.adapters.voipbin.wire import MediaStreamProtocol

__all__ = [
    "DTMF_QUEUE",
    "DTMF_VOLUME",
    "END_PACKETS",
    "EVENT_BYTES",
    "LOST_END_MS",
    "PT_TELEPHONE_EVENT",
    "DtmfSender",
    "DtmfSlot",
    "KeyPress",
    "KeyPressReceiver",
    "TelephoneEvent",
    "event_updates",
    "telephone_event_payload",
]

PT_TELEPHONE_EVENT = 101  # RTP payload type of telephone-event by default (dynamic; the usual choice)
EVENT_BYTES = 4  # bytes of one telephone-event payload (RFC 4733 §2.3)
CLOCK_RATE = 8000  # Hz: the stream's RTP clock, so the duration field counts 1/8 ms
SLOT_SAMPLES = 160  # one 20 ms slot of the stream at 8 kHz
END_PACKETS = 3  # times the final packet of an event is sent (RFC 4733 §2.5.1.4)
DTMF_VOLUME = 10  # volume field we send: the tone's power is -10 dBm0 (RFC 4733 §2.3.4)
LOST_END_MS = 250  # ms of audio after a press's last packet that end it when its end packets were lost
DTMF_QUEUE = 32  # key presses waiting to be sent on one stream; more are refused
_REMEMBERED = 16  # timestamps of ended events kept to ignore their late and repeated packets
_PAYLOAD = struct.Struct("!BBH")  # event, E|R|volume, duration
_DURATION_MAX = 0xFFFF  # the duration field's limit (8.19 s at 8 kHz): longer events go in segments


@attrs.frozen
class TelephoneEvent:
    """One RFC 4733 telephone-event packet from the peer (its 4-byte payload and RTP header)."""

    event: int
    """Event code, 0-255 (§2.3.1); 0-15 are the DTMF keys of `gateway.codecs.dtmf.KEYS`."""
    end: bool
    """The E bit (§2.3.2): this is a final packet of the event (sent three times)."""
    volume: int
    """Power of the tone, 0-63, in -dBm0 (§2.3.4): 10 is -10 dBm0."""
    duration: int
    """Duration of the event so far, in RTP timestamp units (1/8 ms at 8 kHz), from `timestamp`
    (§2.3.5)."""
    marker: bool
    """The RTP marker bit: set on the first packet of an event (§2.5.1)."""
    timestamp: int
    """RTP timestamp: the event's start, the same in every packet of one event (§2.5.1)."""
    sequence: int
    """RTP sequence number (shared with the audio packets, §2.1)."""
    lost: int = 0
    """Packets missing by RTP sequence number just before this one (audio or events: there is
    no telling which); not audio loss, so not in `Audio.lost`."""

    @property
    def key(self) -> str | None:
        """The DTMF key of `event` ("0"-"9", "*", "#", "A"-"D"), None for other events."""
        return KEYS[self.event] if self.event < len(KEYS) else None

    @property
    def duration_ms(self) -> int:
        """`duration` in milliseconds (8 kHz clock), rounded."""
        return round(self.duration * 1000 / CLOCK_RATE)

    @classmethod
    def parse(cls, payload: bytes, *, marker: bool, timestamp: int, sequence: int, lost: int = 0) -> TelephoneEvent:
        """The event in a 4-byte payload (§2.3: event, E, R, volume, duration; R is ignored).
        Raises ValueError naming the size when `payload` is not 4 bytes."""
        if len(payload) != EVENT_BYTES:
            raise ValueError(f"telephone-event payload is {len(payload)} bytes, expected {EVENT_BYTES}")
        event, flags, duration = _PAYLOAD.unpack(payload)
        return cls(event, bool(flags & 0x80), flags & 0x3F, duration, marker, timestamp, sequence, lost)


def telephone_event_payload(event: int, duration: int, *, end: bool, volume: int = DTMF_VOLUME) -> bytes:
    """The 4-byte RFC 4733 payload (§2.3) for `event` (0-255) lasting `duration` timestamp
    units (0-65535) so far, the E bit set when `end`; `volume` 0-63 (-dBm0). Raises ValueError
    for a field out of range."""
    if not (0 <= event <= 255 and 0 <= duration <= _DURATION_MAX and 0 <= volume <= 63):
        raise ValueError(f"telephone-event field out of range: event {event}, duration {duration}, volume {volume}")
    return _PAYLOAD.pack(event, (0x80 if end else 0) | volume, duration)


def event_updates(duration_ms: int, slot_samples: int = SLOT_SAMPLES) -> list[tuple[int, bool]]:
    """The packets of one event sent one per slot (RFC 4733 §2.5.1): (duration field, E bit).

    The duration grows by one slot per packet up to the whole event (`duration_ms` at 8 kHz,
    at most 65535: one segment), the last update carries the E bit, and that final packet is
    sent `END_PACKETS` times in all: a 100 ms press is 160, 320, 480, 640, then 800 three times
    with E, seven slots (140 ms) in which no audio is sent."""
    total = min(_DURATION_MAX, max(1, duration_ms * CLOCK_RATE // 1000))
    updates = [(min(k * slot_samples, total), False) for k in range(1, -(-total // slot_samples) + 1)]
    updates[-1] = (total, True)
    return updates + [(total, True)] * (END_PACKETS - 1)


# --- receiving ---------------------------------------------------------------------------


@attrs.frozen
class KeyPress:
    """One key pressed on the call: one RFC 4733 event, its packets counted once."""

    digit: str
    """The key: one of "0"-"9", "*", "#", "A"-"D"."""
    duration_ms: int
    """How long it was held, ms: the event's duration field (8 kHz clock), its last value
    received (all segments of a long event added up)."""
    timestamp: int
    """RTP timestamp of the event (of its first segment)."""
    end_seen: bool
    """True when an end packet (E bit) arrived; False when all of them were lost and a new
    event or `LOST_END_MS` of audio ended the press."""


@attrs.define
class _Open:
    """The event being received."""

    key: str
    event: int
    first_timestamp: int
    timestamp: int  # of the current segment
    earlier: int  # duration of the segments before the current one (timestamp units)
    duration: int  # of the current segment so far
    audio: int = 0  # samples of audio received since its last packet


class KeyPressReceiver:
    """RFC 4733 telephone-event packets in, one `KeyPress` per key event out (module doc).

    `event(packet)` takes every telephone-event packet in arrival order; `audio(samples)`
    every audio packet's sample count (so a press whose end packets were all lost ends after
    `lost_end_ms` of audio); `flush()` ends what is open when the stream ends. Each returns
    the presses it ended, in order. Events other than the sixteen keys are ignored (RFC 4733
    §2.5.2: a receiver ignores events it does not support), except that a new one ends the
    open press like any new event. Late or repeated packets of an event that already ended
    (the end packets' copies, an update overtaken by its end) are ignored."""

    def __init__(self, *, lost_end_ms: int = LOST_END_MS) -> None:
        self.lost_end_samples = lost_end_ms * CLOCK_RATE // 1000
        self._open: _Open | None = None
        self._ended: collections.deque[int] = collections.deque(maxlen=_REMEMBERED)

    @property
    def open(self) -> bool:
        """True while a press has begun and not ended."""
        return self._open is not None

    def event(self, packet: TelephoneEvent) -> list[KeyPress]:
        """The presses `packet` ends: [] (an update, a repeated end packet, another event's
        start), one (an end packet, or the start of a new event ending one whose end was
        lost), or two (a new event that ends at once, after one whose end was lost)."""
        ts = packet.timestamp
        if ts in self._ended:
            return []
        pressed = self._open
        if pressed is not None and ts == pressed.timestamp:
            pressed.duration = max(pressed.duration, packet.duration)
            pressed.audio = 0
            return [self._close(pressed, True)] if packet.end else []
        out: list[KeyPress] = []
        if pressed is not None:
            if (packet.event == pressed.event and not packet.marker
                    and ts == (pressed.timestamp + pressed.duration) & 0xFFFFFFFF):
                # The next segment of a long event (§2.5.1.3): same key, no marker bit, it
                # starts where the last one ended.
                self._ended.append(pressed.timestamp)
                pressed.earlier += pressed.duration
                pressed.timestamp, pressed.duration, pressed.audio = ts, packet.duration, 0
                return [self._close(pressed, True)] if packet.end else []
            out.append(self._close(pressed, False))
        key = packet.key
        if key is None:
            return out
        pressed = self._open = _Open(key, packet.event, ts, ts, 0, packet.duration)
        if packet.end:  # every packet before the end was lost
            out.append(self._close(pressed, True))
        return out

    def audio(self, samples: int) -> list[KeyPress]:
        """`samples` of audio arrived: the open press, if its last packet is `lost_end_ms` of
        audio ago (its end packets were all lost), as [KeyPress]; else []."""
        pressed = self._open
        if pressed is None:
            return []
        pressed.audio += samples
        return [self._close(pressed, False)] if pressed.audio >= self.lost_end_samples else []

    def flush(self) -> list[KeyPress]:
        """The stream ended: the open press, if any (its end packets never came)."""
        pressed = self._open
        return [self._close(pressed, False)] if pressed is not None else []

    def _close(self, pressed: _Open, end_seen: bool) -> KeyPress:
        self._open = None
        self._ended.append(pressed.timestamp)
        samples = pressed.earlier + pressed.duration
        return KeyPress(pressed.key, round(samples * 1000 / CLOCK_RATE), pressed.first_timestamp, end_seen)


# --- sending -----------------------------------------------------------------------------


@attrs.frozen
class DtmfSlot:
    """What one 20 ms slot of the outgoing stream carries while key presses are sent."""

    messages: tuple[bytes, ...]
    """WebSocket messages to send in this slot, before its audio (if any)."""
    audio: bool
    """False when the slot's audio is not sent (rtp: an event packet takes its place)."""
    tone: np.ndarray | None
    """sln: 160 samples (int16, 20 ms at 8 kHz) of tone or pause to send instead of the audio."""
    started: str | None
    """The key whose press begins in this slot (count it, once), else None."""


_AUDIO_SLOT = DtmfSlot((), True, None, None)


class DtmfSender:
    """Queued key presses, played into one media stream slot by slot (module doc).

    ``DtmfSender(encapsulation)`` ("rtp", "sln" or "audiosocket", `wire.Encapsulation`'s
    values). `press(key, duration_ms)` queues one (False when `DTMF_QUEUE` are waiting);
    while `busy`, the sender of the stream calls `slot(proto)` once per 20 ms slot, sends
    `messages`, then the slot's audio unless `audio` is False, replaced by `tone` if set.

    - rtp: one RFC 4733 packet per slot in place of the audio (`event_updates`), from our
      audio stream's SSRC and sequence numbers (`MediaStreamProtocol.send_telephone_event`);
      after the three end packets, at least `MIN_PAUSE_MS` of audio before the next press.
    - audiosocket: one DTMF frame (kind 0x03) per press, the audio goes on.
    - sln: the Q.23 tone pair for the duration, then at least `MIN_PAUSE_MS` of silence,
      replacing the audio (in-band is all sln can carry).
    """

    def __init__(self, encapsulation: str, *, queue: int = DTMF_QUEUE) -> None:
        if encapsulation not in ("rtp", "sln", "audiosocket"):
            raise ValueError(f"unknown encapsulation {encapsulation!r}")
        self.encapsulation = encapsulation
        self.queue_size = queue
        self._queue: collections.deque[tuple[str, int]] = collections.deque()
        self._code = 0
        self._updates: list[tuple[int, bool]] = []  # rtp: packets of the press being sent
        self._next = 0
        self._pause = 0  # rtp: slots of audio still due before the next press
        self._tone: np.ndarray | None = None  # sln: what is left of the press's tone and pause

    @property
    def busy(self) -> bool:
        """True while a press is queued or being sent (then call `slot` for every slot)."""
        return bool(self._queue) or self._next < len(self._updates) or self._pause > 0 or self._tone is not None

    @property
    def queued(self) -> int:
        """Presses waiting, not counting the one being sent."""
        return len(self._queue)

    def press(self, key: str, duration_ms: int) -> bool:
        """Queue `key` (one of `KEYS`) held `duration_ms` (a positive number of ms); False
        when the queue is full (nothing queued). Raises ValueError for a key not in `KEYS`."""
        if key not in KEYS or len(key) != 1:
            raise ValueError(f"not a DTMF key: {key!r}")
        if len(self._queue) >= self.queue_size:
            return False
        self._queue.append((key, max(1, int(duration_ms))))
        return True

    def slot(self, proto: MediaStreamProtocol) -> DtmfSlot:
        """What the next 20 ms slot of `proto`'s stream carries (see the class doc). Raises
        `LocalProtocolError` (from `proto`) when `proto` is not of this encapsulation."""
        if self.encapsulation == "rtp":
            return self._rtp_slot(proto)
        if self.encapsulation == "audiosocket":
            if not self._queue:
                return _AUDIO_SLOT
            key, _ = self._queue.popleft()
            return DtmfSlot((proto.send_dtmf(key),), True, None, key)
        return self._sln_slot()

    def _rtp_slot(self, proto: MediaStreamProtocol) -> DtmfSlot:
        started = None
        if self._next >= len(self._updates):
            if self._pause > 0 or not self._queue:
                self._pause = max(0, self._pause - 1)
                return _AUDIO_SLOT
            started, duration_ms = self._queue.popleft()
            self._code = KEYS.index(started)
            self._updates, self._next = event_updates(duration_ms), 0
        duration, end = self._updates[self._next]
        message = proto.send_telephone_event(self._code, duration, start=self._next == 0, end=end)
        self._next += 1
        if self._next == len(self._updates):
            # The end packets gave (END_PACKETS - 1) slots of silence after the tone's end;
            # audio slots make up the rest of the pause before the next press.
            self._pause = max(0, -(-MIN_PAUSE_MS // 20) - (END_PACKETS - 1))
        return DtmfSlot((message,), False, None, started)

    def _sln_slot(self) -> DtmfSlot:
        started = None
        if self._tone is None:
            if not self._queue:
                return _AUDIO_SLOT
            started, duration_ms = self._queue.popleft()
            self._tone = tone(started, duration_ms, frame_samples=SLOT_SAMPLES)
        chunk, rest = self._tone[:SLOT_SAMPLES], self._tone[SLOT_SAMPLES:]
        self._tone = rest if rest.size else None
        return DtmfSlot((), True, chunk, started)
