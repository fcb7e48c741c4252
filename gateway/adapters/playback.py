"""A peer's audio played out at real time, as a pure object: what a platform that buffers the
audio a server sends it does (Twilio Media Streams, "Send WebSocket Messages to Twilio", is
the model; the Twilio dial role uses it for its server's audio). Any fixed-size sample format:
`frame_bytes` bytes per `ptime_s` frame, `bytes_per_s` (u-law 8 kHz by default: 160 bytes per
20 ms, one byte per sample).

Twilio's rules ("Media Streams - WebSocket Messages", https://www.twilio.com/docs/voice/media-
streams/websocket-messages): the server's ``media`` messages are audio to play in the order
sent, however long each is and however fast they come (a bot's text to speech arrives faster
than real time); a ``mark`` sent after them is sent back "when the audio that you have sent has
been completed"; ``clear`` "empties all buffered audio and causes any mark messages to be sent
back".

`Playback` is that buffer: bytes in (`push`), frames out at real time (`pop`: the frames due
by `now`, back to back from the first push, one `frame_bytes` frame per `ptime_s`), marks at
the byte position where they were sent, due once the frame holding that byte has finished
playing (or at once when nothing is queued before them). An empty buffer idles, and the next
push starts a new run at its arrival time, so an idle peer costs no wake-ups. A run's last
bytes that do not fill a frame go out as a shorter frame when due (the next frame follows it
exactly, so no sample is added or lost). `clear` drops what is queued and gives the waiting
marks.

Times are trio seconds passed in (`now`); nothing here reads a clock, sleeps or logs, so it is
tested without an event loop. Cost per frame: one slice of a bytearray.
"""

from __future__ import annotations

import collections
import math

__all__ = ["BYTES_PER_S", "FRAME_BYTES", "PTIME_S", "Playback"]

FRAME_BYTES = 160  # default: u-law bytes (samples) per 20 ms frame at 8 kHz
PTIME_S = 0.020  # default: seconds per frame
BYTES_PER_S = 8000  # default: u-law 8 kHz, one byte per sample
COMPACT_AT = 1 << 16  # bytes already played before the buffer drops them (amortized copy)


class Playback:
    """A peer's audio, played out at real time; see the module doc.

    `frame_bytes` per frame of `frame_bytes / bytes_per_s` seconds (a whole number of samples:
    PCM16 8 kHz is 320 bytes per 20 ms and 16000 bytes per second). `max_bytes` bounds what may
    wait (default 60 s); a push beyond it keeps what fits and counts the rest in
    `dropped_bytes`. Raises ValueError for a frame or rate that is not positive.
    """

    __slots__ = ("_buf", "_read", "_pushed", "_played", "_next", "_marks", "_due_marks", "max_bytes",
                 "dropped_bytes", "frame_bytes", "bytes_per_s")

    def __init__(self, max_bytes: int | None = None, *, frame_bytes: int = FRAME_BYTES,
                 bytes_per_s: int = BYTES_PER_S) -> None:
        if frame_bytes <= 0 or bytes_per_s <= 0:
            raise ValueError(f"frame_bytes and bytes_per_s must be positive, got {frame_bytes} and {bytes_per_s}")
        self.frame_bytes = frame_bytes
        self.bytes_per_s = bytes_per_s
        self._buf = bytearray()
        self._read = 0  # offset of the first unplayed byte in _buf
        self._pushed = 0  # bytes accepted since the start
        self._played = 0  # bytes handed out by pop
        self._next = math.inf  # when the next frame is due (inf: idle)
        self._marks: collections.deque[tuple[int, str]] = collections.deque()  # (byte position, name)
        self._due_marks: collections.deque[tuple[float, str]] = collections.deque()  # (time, name) reached
        self.max_bytes = 60 * bytes_per_s if max_bytes is None else max_bytes
        self.dropped_bytes = 0
        """Bytes a push could not queue (the buffer was full)."""

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting to be played."""
        return self._pushed - self._played

    @property
    def queued_ms(self) -> int:
        return self.queued_bytes * 1000 // self.bytes_per_s

    @property
    def marks_waiting(self) -> int:
        """Marks not sent back yet."""
        return len(self._marks) + len(self._due_marks)

    def next_due(self) -> float | None:
        """When `pop` has something next (a frame or a mark), or None while idle."""
        due = self._next if self.queued_bytes else math.inf
        if self._due_marks:
            due = min(due, self._due_marks[0][0])
        return None if due == math.inf else due

    def push(self, payload: bytes, now: float) -> None:
        """Queue u-law bytes to play after what is queued. With nothing queued they follow the
        frame still playing back to back, or start at `now` when that has ended (or none was)."""
        if not payload:
            return
        room = self.max_bytes - self.queued_bytes
        if len(payload) > room:
            self.dropped_bytes += len(payload) - room
            payload = payload[:room]
            if not payload:
                return
        if not self.queued_bytes and not now <= self._next < math.inf:
            self._next = now
        self._buf += payload
        self._pushed += len(payload)

    def mark(self, name: str, now: float) -> None:
        """A mark after what was pushed so far: due once that has finished playing (with nothing
        queued: when the frame still playing ends, or at `now`)."""
        if self.queued_bytes:
            self._marks.append((self._pushed, name))
        else:
            self._due_marks.append((max(now, self._next) if self._next < math.inf else now, name))

    def clear(self) -> tuple[int, list[str]]:
        """Drop what is queued (barge-in): (bytes dropped, names of every waiting mark, in order).
        The frame already handed out plays on; the next push follows it."""
        dropped = self.queued_bytes
        names = [name for _, name in self._due_marks] + [name for _, name in self._marks]
        self._due_marks.clear()
        self._marks.clear()
        self._buf.clear()
        self._read = 0
        self._played = self._pushed
        return dropped, names

    def pop(self, now: float) -> tuple[list[bytes], list[str]]:
        """(frames due by `now`, `frame_bytes` each but a run's shorter last one; names of the
        marks whose audio has finished playing by `now`), in order."""
        frames: list[bytes] = []
        buf, marks, due_marks = self._buf, self._marks, self._due_marks
        frame_bytes, bytes_per_s = self.frame_bytes, self.bytes_per_s
        while self._next <= now and self._pushed > self._played:
            start = self._read
            size = min(frame_bytes, self._pushed - self._played)
            frames.append(bytes(buf[start:start + size]))
            self._read = start + size
            self._played += size
            self._next += size / bytes_per_s  # this frame has finished playing then; the next is due
            while marks and marks[0][0] <= self._played:
                due_marks.append((self._next, marks.popleft()[1]))
        if self._pushed == self._played:
            buf.clear()
            self._read = 0
            if self._next < now:
                self._next = math.inf  # ran dry: idle until the next push
        elif self._read >= COMPACT_AT:
            del buf[: self._read]
            self._read = 0
        names: list[str] = []
        while due_marks and due_marks[0][0] <= now:
            names.append(due_marks.popleft()[1])
        return frames, names
