"""Rooms of the Argon listen role: who is in a voice channel (or a call), who hears whom.

Source: shared/protocols/argon-voice-ws.md ("The three paths", "Hearing", "Publishing",
"Keepalive and close"). A room is what LiveKit calls a room: `{spaceId}/{channelId}` for a
voice channel, `call/{callId}` for a call. Its members are

- **bots**, one `BotSession` each: an audio WebSocket on `/audio/connect` (publish),
  `/audio/subscribe` (hear one participant) or `/audio/duplex` (both). One identity per room:
  a second session of the same identity takes the room from the first, which is dropped
  without a close frame, as LiveKit's duplicate-identity rule does.
- **users**: the endpoints of the routes attached to the room (`ArgonListen` hosts), each with
  its `identity` (a phone call bridged in as `call`, a file playing as `music`...). They join
  when their route comes up and leave when it ends.

A bot that hears identity X receives the Opus packets X publishes, one per binary message, as
the real server forwards them: not mixed, not decoded. What bots publish reaches every host
of the room (the route hears the room's first publishing bot; the others are heard by the
bots that subscribe to them).

Everything here runs in the gateway's trio thread; `deliver`/`forward`/`publish` are
synchronous and never block (bounded queues, overflow dropped and counted).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from typing import TYPE_CHECKING, Any, Callable, Protocol

import trio
from trio_websocket import ConnectionClosed

from gateway.adapters.argon.wire import AudioPath, AudioRequest, RoomGrant, status_message
from gateway.adapters.ws import close as close_ws, close_description
from gateway.adapters.wsclient import FramedWebSocket as WebSocketConnection
from gateway.codecs.ogg import OggOpusDemuxer, looks_like_ogg
from gateway.codecs.opus import packet_samples
from gateway.errors import CloseCode, RemoteProtocolError

if TYPE_CHECKING:
    from gateway.endpoint import Endpoint

log = logging.getLogger("gateway.endpoint.argon")

PING_INTERVAL = 30.0  # seconds between the server's pings (argon-voice-ws.md "Keepalive and close")
PONG_WAIT = 60.0  # seconds: the read deadline moves only on a pong
CONNECT_IDLE = 60.0  # seconds without a packet that end an /audio/connect session
MIN_PACKET, MAX_PACKET = 2, 3825  # bytes of one published Opus packet ("Publishing")
MAX_SUBSCRIBE_MESSAGE = 1024  # bytes: a subscribe client's messages beyond this get 1009
OUT_QUEUE = 64  # messages waiting for one slow bot before the newest are dropped (~1.3 s of 20 ms)


class Host(Protocol):
    """What a room needs of an endpoint attached to it (`ArgonListen`)."""

    def on_bot_packet(self, session: BotSession, packet: bytes, samples: int) -> None: ...

    def on_room_change(self) -> None: ...

    def on_peer_error(self, session: BotSession) -> None:
        """A bot of the room broke the protocol (its connection is being closed)."""
        ...


def track_sid(identity: str) -> str:
    """A stable LiveKit-style track id for a participant's microphone track."""
    return "TR_" + hashlib.sha1(identity.encode()).hexdigest()[:12]


class BotSession:
    """One bot's audio WebSocket in a room (listen side): what it publishes goes to the room,
    what its target publishes comes back; statuses, pings and close as the real server."""

    def __init__(self, room: Room, request: AudioRequest, grant: RoomGrant, ws: WebSocketConnection, remote: str) -> None:
        self.room = room
        self.request = request
        self.path = request.path
        self.identity = grant.identity
        self.name = grant.name or grant.identity
        self.ws = ws
        self.remote = remote
        self.session_id = "AWS_" + secrets.token_hex(8)
        self.target = request.target_identity if self.path.hears else None
        self.subscribed = False
        self.ogg: OggOpusDemuxer | None = None
        self.packets_in = 0
        self.bytes_in = 0
        self.dropped_out = 0
        """Messages for this bot dropped because it read too slowly."""
        self.ended_by = ""
        self._send, self._recv = trio.open_memory_channel[bytes | str](OUT_QUEUE)
        self._done = trio.Event()
        self._kicked = False
        self._last_packet = 0.0

    @property
    def publishes(self) -> bool:
        return self.path.publishes

    @property
    def bursty(self) -> bool:
        """The bot sends an Ogg stream as fast as it is made (the seed's TypeScript example)."""
        return self.ogg is not None

    def describe(self) -> str:
        target = f" hearing {self.target}" if self.target else ""
        return f"{self.path.value} {self.identity}{target} from {self.remote}"

    # -- out ------------------------------------------------------------------------------
    def deliver(self, message: bytes | str) -> None:
        """Queue one message for the bot (a packet of its target, a status); never blocks."""
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            self.dropped_out += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def status(self, status: str, **fields: str) -> None:
        self.deliver(status_message(status, session_id=self.session_id, **fields))

    # -- lifecycle --------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve the session until the bot leaves, the room drops it or it breaks the
        protocol (then it is closed with the close code naming the cause)."""
        self._last_packet = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                nursery.start_soon(self._pinger)
                if self.path is AudioPath.CONNECT:
                    nursery.start_soon(self._idle_watch)
                try:
                    await self._reader()
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._done.set()
            self._send.close()

    async def _reader(self) -> None:
        ws = self.ws
        while True:
            try:
                message = await ws.get_message()
            except ConnectionClosed as closed:
                if not self.ended_by:
                    self.ended_by = close_description(closed)
                return
            if self.path is AudioPath.SUBSCRIBE:
                # the read limit counts every message, text too (1009 before the text is ignored)
                size = len(message.encode()) if isinstance(message, str) else len(message)
                if size > MAX_SUBSCRIBE_MESSAGE:
                    await self._refuse(RemoteProtocolError(
                        f"message of {size} bytes on /audio/subscribe (limit {MAX_SUBSCRIBE_MESSAGE})",
                        close_code=CloseCode.MESSAGE_TOO_BIG))
                    return
                continue  # a subscriber publishes nothing
            if isinstance(message, str):
                continue  # "client text frames are ignored"
            try:
                if self.ogg is None and self.packets_in == 0 and looks_like_ogg(message):
                    self.ogg = OggOpusDemuxer()
                    log.warning("[argon] bot %s sends an Ogg stream, not one Opus packet per message (the seed's "
                                "TypeScript example): demuxing it and playing it at real time", self.identity)
                    self.room.changed()
                packets = self.ogg.feed(message) if self.ogg is not None else [message]
                for packet in packets:
                    samples = self._check(packet)
                    self.packets_in += 1
                    self.bytes_in += len(packet)
                    self._last_packet = trio.current_time()
                    self.room.publish(self, packet, samples)
            except RemoteProtocolError as err:
                await self._refuse(err)
                return

    @staticmethod
    def _check(packet: bytes) -> int:
        """One published packet: 2 to 3,825 bytes of valid Opus framing (RFC 6716 §3.2);
        returns its duration in samples at 48 kHz (from the TOC, §3.1).
        The real server drops TCP for a bad size and checks nothing else; we close with 1007
        and the cause, so the bot's log says what was wrong."""
        if not MIN_PACKET <= len(packet) <= MAX_PACKET:
            raise RemoteProtocolError(f"Opus packet of {len(packet)} bytes: the ingress takes {MIN_PACKET} to "
                                      f"{MAX_PACKET} bytes per message", close_code=CloseCode.INVALID_PAYLOAD)
        return packet_samples(packet)

    async def _refuse(self, err: RemoteProtocolError) -> None:
        log.warning("[argon] closing the bot stream of %s (%d): %s", self.identity, err.close_code, err)
        self.ended_by = f"broke the protocol: {err}"
        for host in list(self.room.hosts):
            host.on_peer_error(self)
        await close_ws(self.ws, err.close_code, str(err))

    async def _writer(self) -> None:
        async for message in self._recv:
            try:
                await self.ws.send_message(message)
            except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def _pinger(self) -> None:
        while True:
            await trio.sleep(PING_INTERVAL)
            with trio.move_on_after(PONG_WAIT - PING_INTERVAL) as waited:
                try:
                    await self.ws.ping()
                except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                    return
            if waited.cancelled_caught:
                log.info("[argon] bot %s missed its pong for %.0f s: dropping it", self.identity, PONG_WAIT)
                self.ended_by = "missed its pong"
                await self.kick()
                return

    async def _idle_watch(self) -> None:
        while True:
            deadline = self._last_packet + CONNECT_IDLE
            if trio.current_time() >= deadline:
                log.info("[argon] bot %s sent no packet for %.0f s on /audio/connect: ending its session",
                         self.identity, CONNECT_IDLE)
                self.ended_by = f"no packet for {CONNECT_IDLE:.0f} s"
                await self.kick()
                return
            await trio.sleep_until(deadline)

    async def kick(self) -> None:
        """Drop the connection without a close frame (the real server's way of ending a
        session): the bot sees 1006."""
        if self._kicked:
            return
        self._kicked = True
        stream = getattr(self.ws, "_stream", None)
        if stream is not None:
            with trio.CancelScope(shield=True):
                try:
                    await stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass

    async def close(self, code: int = CloseCode.NORMAL, reason: str | None = None) -> None:
        """A goodbye: close frame, bounded; then wait for the session's task to finish."""
        await close_ws(self.ws, code, reason)
        with trio.move_on_after(1.0):
            await self._done.wait()


class Room:
    """The members of one room and who hears whom (see the module doc).

    `events(kind, user)` is told when a participant joins or leaves ("voiceJoin" /
    "voiceLeave" with the user object of argon-voice-ws.md's events), for voice channels."""

    def __init__(self, name: str, *, space_id: str | None = None, channel_id: str | None = None,
                 call_id: str | None = None, events: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.name = name
        self.space_id, self.channel_id, self.call_id = space_id, channel_id, call_id
        self.sessions: dict[str, BotSession] = {}
        """Bot sessions by identity (one per identity), in join order."""
        self.users: dict[str, tuple[Any, dict[str, Any]]] = {}
        """User participants by identity: (the host endpoint publishing them, user object)."""
        self.hosts: list[Host] = []
        self._events = events
        self._change = trio.Event()
        self.closed = False
        self.last_left = ""
        """Who left last and how ("desk_bot closed (1000 stream ended)"), for logs."""

    # -- membership -------------------------------------------------------------------------
    def attach(self, host: Host) -> None:
        if host not in self.hosts:
            self.hosts.append(host)

    def detach(self, host: Host) -> None:
        if host in self.hosts:
            self.hosts.remove(host)

    def changed(self) -> None:
        """Wake whoever waits for the room to change; hosts re-read it."""
        self._change.set()
        self._change = trio.Event()
        for host in list(self.hosts):
            host.on_room_change()

    async def wait_change(self) -> None:
        await self._change.wait()

    @property
    def primary(self) -> BotSession | None:
        """The first publishing bot still in the room: what the room's routes hear."""
        return next((s for s in self.sessions.values() if s.publishes), None)

    def present(self, identity: str) -> bool:
        """Someone with this identity publishes here (a user, or a publishing bot)."""
        if identity in self.users:
            return True
        session = self.sessions.get(identity)
        return session is not None and session.publishes

    async def join(self, session: BotSession) -> None:
        """Add a bot session; a previous session of the same identity is dropped (1006)."""
        old = self.sessions.pop(session.identity, None)
        self.sessions[session.identity] = session
        if old is not None:
            log.info("[argon] %s opened a new session in %s: dropping its previous one (one identity per room)",
                     session.identity, self.name)
            old.ended_by = "replaced by a new session of the same identity"
            await old.kick()
        else:
            self._tell("voiceJoin", self._bot_user(session))
        if session.publishes:
            session.status("ready")
        if session.target is not None:
            if self.present(session.target):
                self._subscribed(session)
            elif session.path is AudioPath.SUBSCRIBE:
                session.status("waiting", participant_identity=session.target)
        if session.publishes:
            self._notify_target_present(session.identity)
        self.changed()

    async def leave(self, session: BotSession) -> None:
        if self.sessions.get(session.identity) is not session:
            return  # replaced: its successor holds the identity
        del self.sessions[session.identity]
        self.last_left = f"{session.name} {session.ended_by or 'left'}"
        self._tell("voiceLeave", self._bot_user(session))
        if session.publishes:
            await self._notify_target_left(session.identity)
        self.changed()

    def add_user(self, identity: str, host: Host, user: dict[str, Any]) -> None:
        """A route endpoint joins as a participant publishing `identity`."""
        self.users[identity] = (host, user)
        self._tell("voiceJoin", user)
        self._notify_target_present(identity)
        self.changed()

    async def remove_user(self, identity: str, host: Host) -> None:
        entry = self.users.get(identity)
        if entry is None or entry[0] is not host:
            return
        del self.users[identity]
        self._tell("voiceLeave", entry[1])
        await self._notify_target_left(identity)
        self.changed()

    def _tell(self, kind: str, user: dict[str, Any]) -> None:
        if self._events is not None:
            self._events(kind, user)

    @staticmethod
    def _bot_user(session: BotSession) -> dict[str, Any]:
        return {"userId": session.identity, "username": session.name, "displayName": session.name,
                "avatarUrl": "", "flags": "bot"}

    # -- subscriptions ----------------------------------------------------------------------
    def _subscribed(self, session: BotSession) -> None:
        if not session.subscribed and session.target is not None:
            session.subscribed = True
            session.status("subscribed", track_sid=track_sid(session.target), participant_identity=session.target)

    def _notify_target_present(self, identity: str) -> None:
        for session in list(self.sessions.values()):
            if session.target == identity:
                self._subscribed(session)

    async def _notify_target_left(self, identity: str) -> None:
        for session in list(self.sessions.values()):
            if session.target == identity and session.subscribed:
                session.subscribed = False
                session.status("target_left", participant_identity=identity)
                if session.path is AudioPath.SUBSCRIBE:  # "subscribe then closes"
                    session.ended_by = "its target left"
                    with trio.move_on_after(0.5):  # let the status go out first
                        while session._recv.statistics().current_buffer_used:
                            await trio.sleep(0.01)
                    await session.kick()

    def listeners(self, identity: str) -> list[BotSession]:
        """Bots hearing `identity` now."""
        return [s for s in self.sessions.values() if s.target == identity and s.subscribed]

    def wants(self, identity: str) -> bool:
        return any(s.target == identity and s.subscribed for s in self.sessions.values())

    def forward(self, identity: str, packet: bytes) -> None:
        """`identity` published `packet`: to every bot hearing it."""
        for session in self.sessions.values():
            if session.subscribed and session.target == identity:
                session.deliver(packet)

    def publish(self, session: BotSession, packet: bytes, samples: int) -> None:
        """A bot published `packet`: to the routes (when it is the room's primary publisher)
        and to the bots hearing it."""
        if self.sessions.get(session.identity) is not session:
            return  # a replaced session's last packets
        self.forward(session.identity, packet)
        for host in self.hosts:
            host.on_bot_packet(session, packet, samples)

    async def close_all(self, code: int = CloseCode.NORMAL, reason: str | None = None) -> None:
        """Close every bot session (a goodbye), concurrently and bounded."""
        async with trio.open_nursery() as nursery:
            for session in list(self.sessions.values()):
                nursery.start_soon(session.close, code, reason)


def user_object(endpoint: Endpoint) -> dict[str, Any]:
    """The `user` of voiceJoin/voiceLeave for a route endpoint in a listen room."""
    return {"userId": endpoint.identity, "username": endpoint.identity, "displayName": endpoint.name,
            "avatarUrl": "", "flags": "none"}
