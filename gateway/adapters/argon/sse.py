"""Argon's events stream, sans-IO: a server-sent events parser and the bot API's event payloads.

Sources: the WHATWG HTML Living Standard §9.2.6 "Interpreting an event stream" (the parser,
`SseParser`), /work/shared/protocols/argon-voice-ws.md "Calls and events" and the bot API
manifest of argon-chat/bot-api-docs (the payloads, `parse_argon_event`).

The dial adapter opens ``GET {api}/IEvents/v1/Stream?intents=<bitmask>`` with
``Authorization: Bot …`` and ``Accept: text/event-stream`` (``Last-Event-ID:
<SseParser.last_event_id>`` to resume within 10 minutes), feeds every chunk of the body to
`SseParser.feed`, logs each `SseMalformed` and each `RemoteProtocolError` of
`parse_argon_event` and skips it ("a malformed SSE line is logged and skipped"), and acts on
the typed events: `Ready` first, `Heartbeat` after 30 s idle, `Resumed` after a replay,
`VoiceJoin` / `VoiceLeave` (intent bit 11, 2048; there is no REST call listing a voice
channel's participants: follow these), `CallIncoming` / `CallEnded` (intent bit 12, 4096,
verified bots).

Deviations from the standard, all on input a conforming server never sends: a line that is
not valid UTF-8 is reported and skipped (a browser decodes it with U+FFFD replacements), a
line longer than `MAX_LINE_BYTES` is reported and skipped, and in both cases the event the
line belonged to is dropped (an event missing one of its lines is not the event the server
sent), unless the line was a comment. Data beyond `MAX_EVENT_BYTES` drops the event too.
Nothing here reads a clock or a socket; memory is bounded by the two limits.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from gateway.adapters.rest import json_type, loads_strict
from gateway.errors import CloseCode, LocalProtocolError, RemoteProtocolError

__all__ = [
    "ARGON_EPOCH_MS",
    "ArgonEvent",
    "ArgonUser",
    "CallEnded",
    "CallIncoming",
    "Heartbeat",
    "MAX_EVENT_BYTES",
    "MAX_LINE_BYTES",
    "OtherEvent",
    "Ready",
    "Resumed",
    "SseEvent",
    "SseMalformed",
    "SseParser",
    "USER_FLAGS",
    "VoiceJoin",
    "VoiceLeave",
    "parse_argon_event",
    "parse_user_flags",
]

MAX_LINE_BYTES = 64 * 1024  # 64 KiB: longest line kept; longer lines are reported and skipped
MAX_EVENT_BYTES = 1024 * 1024  # 1 MiB: largest data buffer of one event (data lines + their LFs)


# --- the event stream parser (WHATWG HTML §9.2.6) ------------------------------------------


@attrs.frozen
class SseEvent:
    """One dispatched event (WHATWG HTML §9.2.6 "dispatch the event")."""

    event: str
    """The event type: the last ``event`` field of the block, "message" when absent or empty."""
    data: str
    """The ``data`` field values joined with "\\n" (the data buffer minus its final LF); may
    be "" (a block with an empty ``data`` line)."""
    id: str | None
    """The last event ID buffer at dispatch: set by the last ``id`` field seen so far in the
    stream, this event's or an earlier one's (it persists); None while it is empty (never set,
    or reset by an ``id`` field with an empty value), when no ``Last-Event-ID`` is sent."""
    retry_ms: int | None
    """The stream's reconnection time in ms as last set by a ``retry`` field (ASCII digits
    only), in this event or earlier; None while the server has not set one."""


@attrs.frozen
class SseMalformed:
    """Something the parser skipped instead of dispatching; log it and go on."""

    reason: str
    """What was skipped and why, e.g. "line is not valid UTF-8; event dropped", "line longer
    than 65536 bytes; event dropped". Never quotes the line."""


_LINE_END = re.compile(rb"[\r\n]")
_BOM = b"\xef\xbb\xbf"
_CR, _LF = 0x0D, 0x0A


class SseParser:
    """Incremental parser of a ``text/event-stream`` body (WHATWG HTML §9.2.6).

    `feed` takes any split of the byte stream and returns what completed: dispatched
    `SseEvent`s and `SseMalformed` reports, in stream order. The results do not depend on how
    the stream is split (CRLF, a multi-byte character or the BOM across two chunks included).

    The standard's rules: the stream is UTF-8, one leading BOM stripped; lines end with CRLF,
    LF or CR; an empty line dispatches the event; a line starting with ":" is a comment; else
    the field name runs to the first ":" (the whole line when there is none) and the value
    follows, one leading space removed. Fields: ``event`` sets the event type, ``data``
    appends the value and a LF to the data buffer, ``id`` sets the last event ID unless the
    value contains NUL, ``retry`` sets the reconnection time when the value is ASCII digits;
    other fields are ignored. A block whose data buffer is empty is not dispatched (its
    ``event`` is reset). At the end of the stream an incomplete event is discarded (`close`).

    Bounds: the pending line never exceeds `MAX_LINE_BYTES` (a longer line is reported once
    and the rest of it discarded up to the next line end) and the data buffer never exceeds
    `MAX_EVENT_BYTES` (beyond: reported and the event dropped).

    `last_event_id`, when given, starts the last event ID buffer (a parser made for a resumed
    connection keeps the ID of the previous one, as an EventSource does).
    """

    def __init__(self, *, last_event_id: str | None = None) -> None:
        if last_event_id is not None and "\0" in last_event_id:
            raise LocalProtocolError("last_event_id must not contain NUL")
        self._pending = bytearray()  # the incomplete line (never more than MAX_LINE_BYTES)
        self._at_start = True  # the BOM may still come (the stream's first bytes)
        self._skip_lf = False  # the last line ended with CR: a LF right after belongs to it
        self._discarding = False  # inside an overlong line: drop bytes up to the line end
        self._dropping = False  # the current event lost a line or overflowed: do not dispatch it
        self._closed = False
        self._data: list[str] = []
        self._data_bytes = 0
        self._event_type = ""
        self._last_id = last_event_id or ""
        self._retry: int | None = None

    @property
    def last_event_id(self) -> str | None:
        """The last event ID buffer: what to send as ``Last-Event-ID`` on reconnect; None
        while it is empty. Updated as soon as an ``id`` line is read."""
        return self._last_id or None

    @property
    def retry_ms(self) -> int | None:
        """The reconnection time (ms) the server last asked for, None while it has not."""
        return self._retry

    def feed(self, data: bytes | bytearray | memoryview) -> list[SseEvent | SseMalformed]:
        """Parse the next chunk of the stream; returns the events and reports it completed.

        Raises `LocalProtocolError` after `close`."""
        if self._closed:
            raise LocalProtocolError("SseParser.feed() after close()")
        out: list[SseEvent | SseMalformed] = []
        chunk = bytes(data)
        if self._at_start:
            head = bytes(self._pending) + chunk
            if len(head) < len(_BOM) and _BOM.startswith(head):
                self._pending[:] = head  # could still be the BOM: wait for more
                return out
            self._pending.clear()
            self._at_start = False
            chunk = head[len(_BOM) :] if head.startswith(_BOM) else head
        n = len(chunk)
        i = 0
        if self._skip_lf and n:
            self._skip_lf = False
            if chunk[0] == _LF:
                i = 1
        while i < n:
            match = _LINE_END.search(chunk, i)
            if match is None:
                self._extend(chunk, i, n, out)
                break
            j = match.start()
            if self._discarding:
                self._discarding = False  # the overlong line ends here; it was reported
            elif len(self._pending) + (j - i) > MAX_LINE_BYTES:
                self._overlong(self._pending[:1] or chunk[i : i + 1], out)
                self._pending.clear()
            else:
                if self._pending:
                    self._pending += chunk[i:j]
                    line = bytes(self._pending)
                    self._pending.clear()
                else:
                    line = chunk[i:j]
                self._line(line, out)
            if chunk[j] == _CR:
                if j + 1 < n:
                    i = j + 2 if chunk[j + 1] == _LF else j + 1
                else:
                    self._skip_lf = True
                    i = n
            else:
                i = j + 1
        return out

    def close(self) -> list[SseEvent | SseMalformed]:
        """The end of the stream. An incomplete event (or line) is discarded, as the standard
        says; that is reported as one `SseMalformed` so the adapter can log it. Later calls
        return []."""
        if self._closed:
            return []
        self._closed = True
        # a partial line (but a comment), or fields of an event without its blank line
        partial_line = bool(self._pending) and self._pending[:1] != b":"
        incomplete = partial_line or bool(self._data) or bool(self._event_type) or self._discarding
        self._pending.clear()
        self._data.clear()
        self._data_bytes = 0
        self._event_type = ""
        if incomplete:
            return [SseMalformed("stream ended inside an event; incomplete event discarded")]
        return []

    # -- internals --

    def _extend(self, chunk: bytes, start: int, end: int, out: list[SseEvent | SseMalformed]) -> None:
        """Keep chunk[start:end], the start of a line whose end has not arrived."""
        if self._discarding:
            return
        if len(self._pending) + (end - start) > MAX_LINE_BYTES:
            self._overlong(self._pending[:1] or chunk[start : start + 1], out)
            self._pending.clear()
            self._discarding = True
            return
        self._pending += chunk[start:end]

    def _overlong(self, first: bytes | bytearray, out: list[SseEvent | SseMalformed]) -> None:
        if first == b":":
            out.append(SseMalformed(f"comment line longer than {MAX_LINE_BYTES} bytes skipped"))
            return
        out.append(SseMalformed(f"line longer than {MAX_LINE_BYTES} bytes; event dropped"))
        self._drop_event()

    def _drop_event(self) -> None:
        self._dropping = True
        self._data.clear()
        self._data_bytes = 0
        self._event_type = ""

    def _line(self, line: bytes, out: list[SseEvent | SseMalformed]) -> None:
        """Process one complete line (WHATWG HTML §9.2.6, the steps after line splitting)."""
        if not line:
            event = self._dispatch()
            if event is not None:
                out.append(event)
            return
        if line[0] == 0x3A:  # ":" comment
            return
        name_bytes, colon, value_bytes = line.partition(b":")
        if colon and value_bytes[:1] == b" ":
            value_bytes = value_bytes[1:]
        try:
            name = name_bytes.decode("utf-8")
            value = value_bytes.decode("utf-8")
        except UnicodeDecodeError:
            out.append(SseMalformed("line is not valid UTF-8; event dropped"))
            self._drop_event()
            return
        if name == "data":
            if self._dropping:
                return
            size = len(value_bytes) + 1  # the value and its LF
            if self._data_bytes + size > MAX_EVENT_BYTES:
                out.append(SseMalformed(f"event data longer than {MAX_EVENT_BYTES} bytes; event dropped"))
                self._drop_event()
                return
            self._data.append(value)
            self._data_bytes += size
        elif name == "event":
            if not self._dropping:
                self._event_type = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                try:
                    self._retry = int(value)
                except ValueError:  # more digits than int() takes (sys.get_int_max_str_digits)
                    pass
        # any other field is ignored

    def _dispatch(self) -> SseEvent | None:
        """WHATWG HTML §9.2.6 "dispatch the event", at an empty line."""
        if self._dropping:
            self._dropping = False
            return None
        if not self._data:  # the data buffer is empty: reset the event type, dispatch nothing
            self._event_type = ""
            return None
        event = SseEvent(
            event=self._event_type or "message",
            data="\n".join(self._data),
            id=self._last_id or None,
            retry_ms=self._retry,
        )
        self._data.clear()
        self._data_bytes = 0
        self._event_type = ""
        return event


# --- Argon's event payloads (argon-voice-ws.md "Calls and events"; bot API manifest) -------

#: Names of the user flags, as the bot API manifest lists the .NET [Flags] enum's values.
USER_FLAGS = ("none", "bot", "system", "verified", "premium", "banned", "deleted")
#: The Argon epoch (2025-01-01T00:00:00Z) in ms since the Unix epoch: `Heartbeat.timestamp` is
#: ms since this instant.
ARGON_EPOCH_MS = 1_735_689_600_000


def parse_user_flags(value: Any) -> frozenset[str]:
    """The names in a ``user.flags`` value.

    A string of names as .NET writes a [Flags] enum as text ("bot, verified"; names compared
    in lowercase, "none" means no flag), or a JSON array of such names. An integer carries no
    names the manifest maps to bits, so it gives the empty set (unknown names); so do null
    and anything else. Unknown names are kept (lowercased)."""
    if isinstance(value, str):
        names: list[Any] = value.split(",")
    elif isinstance(value, list):
        names = value
    else:
        return frozenset()
    flags = {name.strip().lower() for name in names if isinstance(name, str)}
    flags.discard("")
    flags.discard("none")
    return frozenset(flags)


@attrs.frozen
class ArgonUser:
    """``user`` of a voice event (the manifest's ``BotUserV1``)."""

    user_id: str
    """``userId``: the user's GUID, their identity in rooms (``target_identity``)."""
    username: str
    """``username`` ("" when absent); a bot's ends in "_bot"."""
    display_name: str
    """``displayName`` ("" when absent)."""
    avatar_url: str | None
    """``avatarUrl``, None when absent or null."""
    flags: frozenset[str]
    """Flag names from `USER_FLAGS` (see `parse_user_flags`); empty when unknown."""

    @property
    def is_bot(self) -> bool:
        """True for the "bot" flag or a username ending in "_bot" (001_bf359231651c17d3.txt:
        "Every bot has a linked user account (with a _bot username suffix)")."""
        return "bot" in self.flags or self.username.lower().endswith("_bot")


@attrs.frozen
class Ready:
    """``ready``: the first event of every connection."""

    id: str | None
    """The SSE event id (the last event ID as of this event)."""
    intents: int | None
    """The intents the server granted (bitmask), None when absent."""
    space_ids: tuple[str, ...]
    """The spaces the bot belongs to: ``spaceIds`` (strings), or the ``spaceId`` of each
    object in ``spaces`` (newer servers); () when neither is given."""


@attrs.frozen
class Heartbeat:
    """``heartbeat``: sent after 30 s without other events."""

    id: str | None
    """The SSE event id: a cursor of the bot's position in each space's stream."""
    timestamp: int | None
    """``timestamp``: ms since the Argon epoch (`ARGON_EPOCH_MS`), None when absent."""


@attrs.frozen
class Resumed:
    """``resumed`` (``Resumed`` in the docs): the replay after a reconnect is complete."""

    id: str | None
    """The SSE event id."""
    replayed_count: int | None
    """``replayedCount``: how many events were replayed, None when absent."""


@attrs.frozen
class VoiceJoin:
    """``voiceJoin`` (intent 2048): `user` joined a voice channel."""

    id: str | None
    """The SSE event id."""
    space_id: str
    """``spaceId``."""
    channel_id: str
    """``channelId``: the voice channel; its room is ``{spaceId}/{channelId}``."""
    user: ArgonUser
    """Who joined."""


@attrs.frozen
class VoiceLeave:
    """``voiceLeave`` (intent 2048): `user` left a voice channel."""

    id: str | None
    """The SSE event id."""
    space_id: str
    """``spaceId``."""
    channel_id: str
    """``channelId``."""
    user: ArgonUser
    """Who left."""


@attrs.frozen
class CallIncoming:
    """``callIncoming`` (intent 4096, verified bots): a user calls the bot; answer with Calls
    Accept or Reject."""

    id: str | None
    """The SSE event id."""
    call_id: str
    """``callId``: for `accept_request` / `reject_request`."""
    from_user_id: str
    """``fromUserId``: the caller's user GUID."""
    from_locale: str
    """``fromLocale``: the caller's locale (e.g. "en-US"), "" when absent."""


@attrs.frozen
class CallEnded:
    """``callEnded`` (intent 4096): the call ended (hung up, or taken elsewhere)."""

    id: str | None
    """The SSE event id."""
    call_id: str
    """``callId``."""


@attrs.frozen
class OtherEvent:
    """Any other event (messages, members, ...): not parsed, never an error."""

    id: str | None
    """The SSE event id."""
    event: str
    """The SSE event type as sent."""
    data: str
    """The SSE data, unparsed."""


ArgonEvent = Ready | Heartbeat | Resumed | VoiceJoin | VoiceLeave | CallIncoming | CallEnded | OtherEvent
"""What `parse_argon_event` returns."""


class _Payload:
    """Typed access to one event's JSON object; errors name the event and the field."""

    def __init__(self, event: str, obj: dict[str, Any]) -> None:
        self.event = event
        self.obj = obj

    def error(self, cause: str) -> RemoteProtocolError:
        return RemoteProtocolError(f"Argon event {self.event}: {cause}", close_code=CloseCode.INVALID_PAYLOAD)

    def string(self, obj: dict[str, Any], key: str, where: str = "") -> str:
        """A required non-empty string."""
        value = obj.get(key)
        if value is None:
            raise self.error(f"no {where}{key}")
        if not isinstance(value, str):
            raise self.error(f"{where}{key} is {json_type(value)}, not a string")
        if not value:
            raise self.error(f"{where}{key} is empty")
        return value

    @staticmethod
    def optional_string(obj: dict[str, Any], key: str) -> str | None:
        """An optional string: None when absent, null or of another type (lenient)."""
        value = obj.get(key)
        return value if isinstance(value, str) else None

    @staticmethod
    def optional_int(obj: dict[str, Any], key: str) -> int | None:
        """An optional integer (an integral float counts): None when absent or ill-typed."""
        value = obj.get(key)
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return None

    def user(self) -> ArgonUser:
        value = self.obj.get("user")
        if value is None:
            raise self.error("no user")
        if not isinstance(value, dict):
            raise self.error(f"user is {json_type(value)}, not an object")
        return ArgonUser(
            user_id=self.string(value, "userId", "user."),
            username=self.optional_string(value, "username") or "",
            display_name=self.optional_string(value, "displayName") or "",
            avatar_url=self.optional_string(value, "avatarUrl"),
            flags=parse_user_flags(value.get("flags")),
        )


def _space_ids(obj: dict[str, Any]) -> tuple[str, ...]:
    ids = obj.get("spaceIds")
    if isinstance(ids, list):
        return tuple(item for item in ids if isinstance(item, str) and item)
    spaces = obj.get("spaces")
    if isinstance(spaces, list):
        found = []
        for item in spaces:
            if isinstance(item, dict):
                item = item.get("spaceId")
            if isinstance(item, str) and item:
                found.append(item)
        return tuple(found)
    return ()


_KNOWN = ("ready", "heartbeat", "resumed", "voiceJoin", "voiceLeave", "callIncoming", "callEnded")


def parse_argon_event(event: SseEvent) -> ArgonEvent:
    """The typed Argon event in one SSE event.

    The SSE ``event`` field names it, matched with its first letter in either case ("voiceJoin"
    and "VoiceJoin"; "Resumed" as the docs spell it); ``data`` is the payload, a JSON object
    (argon-voice-ws.md "Calls and events"; the manifest's payload shapes):

    - ``ready`` {intents, spaceIds | spaces: [{spaceId, …}]} → `Ready`
    - ``heartbeat`` {timestamp} → `Heartbeat`; ``resumed`` {replayedCount} → `Resumed`
    - ``voiceJoin`` / ``voiceLeave`` {spaceId, channelId, user: {userId, username,
      displayName, avatarUrl, flags}} → `VoiceJoin` / `VoiceLeave`
    - ``callIncoming`` {callId, fromUserId, fromLocale} → `CallIncoming`; ``callEnded``
      {callId} → `CallEnded`
    - any other name → `OtherEvent` (never an error, data not parsed).

    Required: spaceId, channelId, user, user.userId, callId, fromUserId (non-empty strings,
    user an object). Optional fields of the wrong type count as absent (a server adding a
    shape must not make the bot miss a call). Raises `RemoteProtocolError(close_code=1007)`
    naming the event and the cause ("Argon event callIncoming: data is not JSON", "…: data is
    an array, not an object", "…: no callId", "…: user.userId is a number, not a string");
    the adapter logs it and skips the event.
    """
    name = event.event
    key = name[:1].lower() + name[1:]
    if key not in _KNOWN:
        return OtherEvent(id=event.id, event=name, data=event.data)
    try:
        parsed = loads_strict(event.data)
    except (ValueError, RecursionError):
        raise RemoteProtocolError(f"Argon event {key}: data is not JSON", close_code=CloseCode.INVALID_PAYLOAD) from None
    if not isinstance(parsed, dict):
        raise RemoteProtocolError(f"Argon event {key}: data is {json_type(parsed)}, not an object", close_code=CloseCode.INVALID_PAYLOAD)
    p = _Payload(key, parsed)
    if key == "ready":
        return Ready(id=event.id, intents=p.optional_int(parsed, "intents"), space_ids=_space_ids(parsed))
    if key == "heartbeat":
        return Heartbeat(id=event.id, timestamp=p.optional_int(parsed, "timestamp"))
    if key == "resumed":
        return Resumed(id=event.id, replayed_count=p.optional_int(parsed, "replayedCount"))
    if key in ("voiceJoin", "voiceLeave"):
        cls = VoiceJoin if key == "voiceJoin" else VoiceLeave
        return cls(
            id=event.id,
            space_id=p.string(parsed, "spaceId"),
            channel_id=p.string(parsed, "channelId"),
            user=p.user(),
        )
    if key == "callIncoming":
        return CallIncoming(
            id=event.id,
            call_id=p.string(parsed, "callId"),
            from_user_id=p.string(parsed, "fromUserId"),
            from_locale=p.optional_string(parsed, "fromLocale") or "",
        )
    return CallEnded(id=event.id, call_id=p.string(parsed, "callId"))
