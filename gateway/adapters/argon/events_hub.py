"""The listen side of Argon's events stream (shared/protocols/argon-voice-ws.md, "Calls and events").

Bots open `GET /IEvents/v1/Stream?intents=<bitmask>` (also under `/api/bot`) and read
server-sent events (WHATWG HTML §9.2): `ready` first, then the events their intents ask for,
`heartbeat` after 30 s without an event, and, when they reconnect with `Last-Event-ID` (the
header, or the `lastEventId` query parameter) naming an event of the last 10 minutes, the
events they missed followed by `resumed {"replayedCount": n}`.

    voiceJoin / voiceLeave   {spaceId, channelId, user: {userId, username, displayName,
                              avatarUrl, flags}}                      intent bit 11 (2048)
    callIncoming             {callId, fromUserId, fromLocale}         intent bit 12 (4096)
    callEnded                {callId}                                 intent bit 12 (4096)

One `EventHub` per bot identity, owned by the listen service: route endpoints `publish`
(synchronous, never blocks), each HTTP stream iterates `stream(...)`. Times come from the trio
clock (MockClock controls them); the heartbeat's wall-clock timestamp from `wall_clock`.
"""

from __future__ import annotations

import collections
import json
import re
import time
from typing import AsyncIterator, Callable, Iterable

import attrs
import trio

from gateway.adapters.argon.wire import ERROR_CONTENT_TYPE, error_body
from gateway.server import HttpRequest, HttpResponse

INTENT_VOICE = 1 << 11  # 2048: voiceJoin, voiceLeave
INTENT_CALLS = 1 << 12  # 4096: callIncoming, callEnded (verified bots)
EVENT_INTENTS = {"voiceJoin": INTENT_VOICE, "voiceLeave": INTENT_VOICE, "callIncoming": INTENT_CALLS, "callEnded": INTENT_CALLS}
"""The intent bit each event the gateway publishes needs."""

ARGON_EPOCH_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z in Unix milliseconds
HEARTBEAT_IDLE = 30.0  # seconds without an event on a stream before it gets a heartbeat
REPLAY_WINDOW = 600.0  # seconds: an event can be resumed from for 10 minutes
REPLAY_MAX = 1000  # events kept for resuming, whatever their age
SUBSCRIBER_QUEUE = 256  # events waiting for one stream; one more and it is too slow: disconnected
MAX_INTENTS = 2**31 - 1  # intents is a 31-bit mask
STREAM_PATH = "/IEvents/v1/Stream"

_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # the only line ends of text/event-stream (§9.2.5)
_DECIMAL = re.compile(r"[0-9]{1,19}")


# ----------------------------------------------------------------------------------- wire
def event_json(data: object) -> str:
    """The JSON text `encode_sse` sends for `data` (compact, ASCII-only); raises ValueError for
    data that is not JSON (NaN included). Encode once, publish to many hubs."""
    return json.dumps(data, separators=(",", ":"), allow_nan=False)


def encode_sse(event: str, data: object, *, id: str | None = None, text: str | None = None) -> bytes:
    """One server-sent event: `id:`, `event:`, one `data:` line per line of the JSON text of
    `data`, then a blank line. The JSON is compact and ASCII-only (every non-ASCII character as
    \\uXXXX), so a client that splits lines like `str.splitlines` (U+2028, U+0085 ...) still sees
    one line. Raises ValueError for an event name or id that would break the framing, or data
    that is not JSON (NaN included)."""
    if not event or _LINE_BREAK.search(event):
        raise ValueError(f"event name must be one non-empty line, got {event!r}")
    if id is not None and (_LINE_BREAK.search(id) or "\0" in id):
        raise ValueError(f"event id must be one line without NUL (a client ignores it otherwise), got {id!r}")
    if text is None:
        text = event_json(data)
    lines = [f"id: {id}"] if id is not None else []
    lines.append(f"event: {event}")
    lines += [f"data: {line}" for line in _LINE_BREAK.split(text)]
    return ("\n".join(lines) + "\n\n").encode()


def encode_comment(text: str) -> bytes:
    """A comment (`: text`, one per line): clients ignore it; it keeps idle proxies open."""
    return "".join(f": {line}\n" for line in _LINE_BREAK.split(text)).encode()


# ------------------------------------------------------------------------------------ hub
@attrs.frozen
class _Kept:
    """A published event, kept for resuming."""

    seq: int
    """Its id, as a number."""
    at: float
    """trio clock when published."""
    intent: int
    """The intent bit a stream needs to see it."""
    chunk: bytes
    """The encoded event, id line included."""


@attrs.define(eq=False)
class _Subscriber:
    intents: int
    send: trio.MemorySendChannel[bytes]


class EventHub:
    """The events of one bot identity: a bounded replay store and the open streams.

    `space_ids()` gives the spaces named in `ready`; `wall_clock()` (Unix seconds) the heartbeat
    timestamps. Event ids are decimal and increase by one per event from `first_id`; by default
    `first_id` is the wall clock at creation in ms since the Argon epoch × 1000, so a bot
    resuming with an id from before a gateway restart gets no replay rather than the wrong one.
    """

    def __init__(
        self,
        space_ids: Callable[[], Iterable[str]] = tuple,
        *,
        wall_clock: Callable[[], float] = time.time,
        first_id: int | None = None,
        heartbeat_idle: float = HEARTBEAT_IDLE,
        replay_window: float = REPLAY_WINDOW,
        replay_max: int = REPLAY_MAX,
        queue_size: int = SUBSCRIBER_QUEUE,
    ) -> None:
        self._space_ids = space_ids
        self._wall_clock = wall_clock
        self.heartbeat_idle = heartbeat_idle
        self.replay_window = replay_window
        self.queue_size = queue_size
        if first_id is None:
            first_id = max(1, (int(wall_clock() * 1000) - ARGON_EPOCH_MS) * 1000)
        self._next_seq = first_id
        self._kept: collections.deque[_Kept] = collections.deque(maxlen=replay_max)
        self._subscribers: set[_Subscriber] = set()
        self._closed = False
        self.published = 0
        """Events published."""
        self.slow_disconnects = 0
        """Streams ended because their queue was full (the bot read too slowly)."""

    @property
    def subscribers(self) -> int:
        """Open streams."""
        return len(self._subscribers)

    def listening(self, intent: int) -> bool:
        """Some open stream takes events of `intent` (the bot is online for them: a call
        rings only a bot that hears calls)."""
        return any(sub.intents & intent for sub in self._subscribers)

    @property
    def closed(self) -> bool:
        return self._closed

    def publish(self, event: str, data: dict, *, intent: int, text: str | None = None) -> str:
        """Send `event` to every stream whose intents include `intent`; returns its id.
        `text`: `event_json(data)` when the caller has it already (one event to many hubs).

        Never blocks: a stream whose queue is full is disconnected after the events already
        queued (it resumes from its last id); counted in `slow_disconnects`."""
        if intent <= 0 or intent > MAX_INTENTS:
            raise ValueError(f"intent must be an intent bit (e.g. {INTENT_VOICE}), got {intent}")
        seq = self._next_seq
        chunk = encode_sse(event, data, id=str(seq), text=text)  # raises before anything changed
        self._next_seq += 1
        self.published += 1
        now = trio.current_time()
        self._forget_old(now)
        self._kept.append(_Kept(seq, now, intent, chunk))
        for sub in list(self._subscribers):
            if not sub.intents & intent:
                continue
            try:
                sub.send.send_nowait(chunk)
            except trio.WouldBlock:
                self.slow_disconnects += 1
                self._drop(sub)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._drop(sub)
        return str(seq)

    def close(self) -> None:
        """End every stream (each sends what it has queued, then ends); later streams end at once."""
        self._closed = True
        for sub in list(self._subscribers):
            self._drop(sub)

    async def stream(self, intents: int, last_event_id: str | None = None) -> AsyncIterator[bytes]:
        """The encoded events of one bot connection, for `HttpResponse.event_stream`.

        `ready` (id "ready") first; then, when `last_event_id` names an event still kept, the
        later events matching `intents` and `resumed {"replayedCount": n}`; then live events
        matching `intents`, with a `heartbeat` after `heartbeat_idle` seconds without one.
        Ends on `close()` or when the stream falls behind; its subscription is removed when the
        generator finishes or is closed."""
        if not 0 <= intents <= MAX_INTENTS:
            raise ValueError(f"intents must be a bitmask between 0 and {MAX_INTENTS}, got {intents}")
        if self._closed:
            return
        # subscribe and take the replay in one step (no checkpoint): nothing missed, nothing twice
        send, receive = trio.open_memory_channel[bytes](self.queue_size)
        sub = _Subscriber(intents, send)
        self._subscribers.add(sub)
        replay = self._after(last_event_id, intents)
        try:
            yield encode_sse("ready", {"intents": intents, "spaceIds": sorted(set(self._space_ids()))}, id="ready")
            if replay is not None:
                for kept in replay:
                    yield kept.chunk
                yield encode_sse("resumed", {"replayedCount": len(replay)})
            while True:
                chunk = None
                with trio.move_on_after(self.heartbeat_idle):
                    try:
                        chunk = await receive.receive()
                    except trio.EndOfChannel:
                        return
                if chunk is None:
                    chunk = encode_sse("heartbeat", {"timestamp": int(self._wall_clock() * 1000) - ARGON_EPOCH_MS})
                yield chunk  # outside the cancel scope: the consumer's time is not ours
        finally:
            self._subscribers.discard(sub)
            send.close()
            receive.close()

    # ---------------------------------------------------------------------------- internals
    def _drop(self, sub: _Subscriber) -> None:
        self._subscribers.discard(sub)
        sub.send.close()  # the stream drains its queue, then sees EndOfChannel

    def _forget_old(self, now: float) -> None:
        horizon = now - self.replay_window
        kept = self._kept
        while kept and kept[0].at <= horizon:
            kept.popleft()

    def _after(self, last_event_id: str | None, intents: int) -> list[_Kept] | None:
        """The kept events after `last_event_id` matching `intents`; None when that id is not
        an event still kept (unknown, too old, pushed out, or from another process)."""
        if not last_event_id or not _DECIMAL.fullmatch(last_event_id):
            return None
        self._forget_old(trio.current_time())
        if not self._kept:
            return None
        seq = int(last_event_id)
        first = self._kept[0].seq
        if not first <= seq <= self._kept[-1].seq:
            return None
        return [k for k in list(self._kept)[seq - first + 1:] if k.intent & intents]  # ids are contiguous


# ------------------------------------------------------------------------------------ HTTP
def stream_response(hub: EventHub, request: HttpRequest) -> HttpResponse:
    """The HTTP answer to `GET /IEvents/v1/Stream?intents=<bitmask>` for an authorised bot.

    400 for a missing or malformed `intents`, 503 when the hub is closed (the gateway is
    stopping), else the event stream. `Last-Event-ID` (header) wins over `lastEventId` (query):
    a browser's EventSource sends the header on reconnect, fresher than an id in the URL."""
    text = request.query.get("intents", "")
    if not _DECIMAL.fullmatch(text) or int(text) > MAX_INTENTS:
        return HttpResponse(400, error_body(400, f"intents must be a decimal bitmask between 0 and {MAX_INTENTS} "
                                                 f"(voice {INTENT_VOICE}, calls {INTENT_CALLS})"), ERROR_CONTENT_TYPE)
    if hub.closed:
        return HttpResponse(503, error_body(503, "the gateway is stopping", retry_after_s=5), ERROR_CONTENT_TYPE,
                            (("retry-after", "5"),))
    intents = int(text)
    last_event_id = request.headers.get("last-event-id") or request.query.get("lastEventId") or None
    return HttpResponse.event_stream(lambda: hub.stream(intents, last_event_id))
