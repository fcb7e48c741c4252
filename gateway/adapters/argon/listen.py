"""The Argon listen role: an Argon-compatible voice server that bots written for Argon use
unchanged but for the URLs (spec: shared/protocols/argon-voice-ws.md whole; the seeds
000_1537bbe3858d175f.txt and 001_bf359231651c17d3.txt for what older clients do).

On `server.http` (both the current prefix-less paths and the older `/api/bot/...`):

- `POST /IVoice/v1/StreamToken {spaceId, channelId}` → `{token, ingressUrl, roomName}` (bot token
  in `Authorization: Bot …`; 401, 403 not a member, 404 no such channel, 429 with Retry-After);
- `GET /IEvents/v1/Stream?intents=` server-sent events: `ready`, `heartbeat`, `voiceJoin` /
  `voiceLeave` (intent 2048) as a channel's participants come and go, `callIncoming` /
  `callEnded` (intent 4096); `Last-Event-ID` resumes (gateway/adapters/argon/events_hub.py);
- `POST /ICalls/v20260401/Accept {callId}` → `{token, roomName, callerId, audioBaseUrl}`, `…/Reject`;
- `GET /IBotSelf/v1/GetMe` → `{botId, userId, username, displayName}` (`services.argon.listen_bots`).

On `server.media`: `/audio/connect`, `/audio/subscribe`, `/audio/duplex` (and the seed's bare
`/`, as connect): token in `Authorization: Bearer` or `?token=`; refusals are plain-text HTTP
errors before the upgrade (401 no or unparseable token, 403 bad token or no room grant, 400 no
`target_identity`, 404 no such room, 503 session limit); `ready` / `waiting` / `subscribed` /
`target_left` status messages; a ping every 30 s (gateway/adapters/argon/room.py).

An `argon` listen endpoint is either a voice channel (`space_id`, `channel_id`) whose participants
are its route's other endpoints, or a call to a bot (`call: BOT_USER_ID`): when the route's other
side connects (a VoIPBIN caller), the bot is rung (`callIncoming`), and the call is bridged once
the bot accepts and opens its duplex session with the caller as target.

What the room's publishing bot sends is played out by arrival time, as the dial role plays
out what it hears (gateway/adapters/argon/hear.py, gateway/codecs/playout.py): the packets
carry no sequence number and no timestamp, so only their arrival times tell a lost or late
packet ("Hearing": "the receiver fills the gaps (PLC or silence) from arrival times"). The
endpoint decodes itself, through an `OpusPlayout`, and emits PCM16 48 kHz: that is where the
arrival times are, and each rule needs the decoder in the same hands as the timeline: FEC
decodes the lost slot from the packet after it, so the playout must hold that packet when the
slot's deadline comes (a "lost" marker handed to the route's OpusDecoder could only be PLC,
or wait for the next packet and come too late for the route's pacer); winning latency back
from pauses and fading long gaps to silence work on decoded levels; and it is one decode per
packet instead of one per target format. It costs the playout's delay (at least 20 ms, and
up to 60 ms under jitter), which absorbs the bot's and the network's jitter instead of the
route's pacer filling late slots with silence. An Ogg stream (the seed's example, sent in a
burst) is decoded as it comes and queued by the route (`bursty`). `concealment: false` keeps
the packets as they are (Opus ingress, decoded by the route's chain, late slots silence from
the route's pacer): the silence-fill baseline a benchmark compares with.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from typing import Any

import trio
from trio_websocket import ConnectionClosed

from gateway.adapters.argon.config import ArgonBot
from gateway.adapters.argon.events_hub import EventHub, event_json
from gateway.adapters.argon.hear import play_out
from gateway.adapters.argon.room import BotSession, Room, user_object
from gateway.adapters.argon.wire import (
    CALL_TOKEN_TTL_S,
    CALLS_ACCEPT_PATH,
    CALLS_REJECT_PATH,
    EVENTS_PATH,
    GET_ME_PATH,
    INTENT_CALLS,
    INTENT_VOICE,
    STREAM_TOKEN_PATH,
    STREAM_TOKEN_TTL_S,
    AudioPath,
    AudioRefusal,
    AudioRequest,
    BotSelf,
    TokenError,
    accept_response,
    api_error_body,
    get_me_response,
    issue_room_token,
    parse_audio_request,
    room_name,
    stream_token_response,
    verify_room_token,
)
from gateway.adapters.kit import RATE_WINDOW, RateLimiter
from gateway.adapters.listen import ListenService, secret_in
from gateway.codecs.formats import (
    OPUS_48K,
    OPUS_48K_STEREO,
    PCM16_48K,
    PCM16_48K_STEREO,
    VALID_PTIMES_MS,
    AudioFormat,
    AudioFrame,
    EncodedFrame,
    Frame,
)
from gateway.codecs.opus import FEC_PACKET_LOSS_PERC, OpusDecoder
from gateway.codecs.playout import OpusPlayout
from gateway.config.options import Options
from gateway.endpoint import Emit, Endpoint
from gateway.errors import CallEnded
from gateway.runtime import Runtime
from gateway.server import HttpRequest, HttpResponse, MediaRequest

log = logging.getLogger("gateway.endpoint.argon")

ISSUER = "gateway"  # `iss` of the tokens we issue (LiveKit puts its API key there)
API_PREFIXES = ("", "/api/bot")  # today's paths, and the older `/api/bot/...` of the seed
RING_TIMEOUT = 30.0  # seconds a `call:` endpoint rings its bot before the call ends unanswered
CALL_ROOM_PREFIX = "call/"
DEFAULT_INTENTS = INTENT_VOICE  # "all non-privileged intents" of what we serve (calls are privileged)
HEAR_QUEUE = 256  # published packets waiting for the playout task (~5 s of 20 ms) before drops
PLAYOUT_TAIL_S = 0.5  # s a session's end waits for the playout to play what it holds (<= max delay)
REFUSAL_CODES = {413: "payload_too_large", 429: "rate_limited", 503: "service_unavailable"}
"""Argon's `error` code of a bot REST call refused before its handler ran (gateway.server), by
status; any other status (400 nested too deep, 408 body too slow) is `bad_request`. Argon's bot
API docs name 429 `rate_limited`; for a 503 they give the status's meaning only ("Service
unavailable: the server cannot do this particular work right now"; the one code they list,
`render_unavailable`, is an IExpressions render), so the admission 503 says `service_unavailable`."""


def seat(room: str, identity: str) -> tuple[str, str, str]:
    """The admission seat of a bot in a room (gateway.admission, "Seats"): one identity per
    room, so every connection (and StreamToken call) of it is one session."""
    return ("argon", room, identity)


class _PerMinute:
    """At most `limit` requests a minute per key (a bot and an API): a `RateLimiter` each, its
    limit read from the running config on every request (a reload applies at once)."""

    def __init__(self) -> None:
        self._limiters: dict[str, RateLimiter] = {}

    def retry_after(self, key: str, limit: int) -> int | None:
        """None when a request may go now (and count it), else whole seconds to wait (>= 1)."""
        limiter = self._limiters.get(key)
        if limiter is None:
            limiter = self._limiters[key] = RateLimiter(limit, RATE_WINDOW)
        limiter.per_window = limit
        wait = limiter.try_acquire()
        return None if wait is None else max(1, int(wait + 0.999))


class _Call:
    """A call a `call:` endpoint rings a bot with."""

    def __init__(self, call_id: str, bot: ArgonBot, caller_id: str, room: Room) -> None:
        self.call_id, self.bot, self.caller_id, self.room = call_id, bot, caller_id, room
        self.state = "ringing"  # ringing | accepted | rejected | ended
        self.rang = False
        """callIncoming was sent (the bot was online)."""
        self.reason = ""
        self.answered = trio.Event()


class ArgonListenService(ListenService):
    """The Argon-compatible REST and audio endpoints of one gateway process (module doc).

    Registered once per runtime. Rooms are those of the `argon` listen endpoints (voice
    channels) and of the calls they ring. Settings are read from the running config on each
    request, so a reload applies at once.
    """

    kind = "argon"

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self._random_secret = secrets.token_urlsafe(32)
        self.channels: dict[tuple[str, str], list[ArgonListen]] = {}
        """Listen endpoints by (space, channel); several routes may share a channel."""
        self.rooms: dict[str, Room] = {}
        self.calls: dict[str, _Call] = {}
        self.hubs: dict[str, EventHub] = {}
        self._limits = _PerMinute()
        self._sessions = 0
        for prefix in API_PREFIXES:  # a body too big or nested too deep: refused in Argon's error shape
            runtime.http.add("POST", prefix + STREAM_TOKEN_PATH, self.stream_token, refuse=self._refused,
                             seat=self._token_seat)
            runtime.http.add("GET", prefix + EVENTS_PATH, self.events, refuse=self._refused)
            runtime.http.add("POST", prefix + CALLS_ACCEPT_PATH, self.accept, refuse=self._refused)
            runtime.http.add("POST", prefix + CALLS_REJECT_PATH, self.reject, refuse=self._refused)
            runtime.http.add("GET", prefix + GET_ME_PATH, self.get_me, refuse=self._refused)
        for path in AudioPath:
            runtime.media.add(path.value, self.audio, seat=self._audio_seat)
        runtime.media.add("/", self.audio, seat=self._audio_seat)  # the seed's bare ingressUrl

    # -- settings -------------------------------------------------------------------------
    @property
    def secret(self) -> str:
        """HS256 key of the room tokens: services.argon.jwt_secret, else random per process."""
        service = self.settings
        return service.jwt_secret.reveal() if service.jwt_secret else self._random_secret

    @property
    def bots(self) -> tuple[ArgonBot, ...]:
        return self.settings.listen_bots

    def bot_by_user_id(self, user_id: str) -> ArgonBot | None:
        return next((b for b in self.bots if b.user_id == user_id), None)

    def _bot(self, request: HttpRequest) -> ArgonBot | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme != "Bot" or not token:
            return None
        return next((b for b in self.bots if secret_in(token, (b.token,))), None)

    def hub(self, bot: ArgonBot) -> EventHub:
        hub = self.hubs.get(bot.user_id)
        if hub is None:
            hub = self.hubs[bot.user_id] = EventHub(space_ids=lambda: sorted({s for s, _ in self.channels}))
        return hub

    # -- rooms ------------------------------------------------------------------------------
    def channel_room(self, space_id: str, channel_id: str) -> Room:
        name = room_name(space_id, channel_id)
        room = self.rooms.get(name)
        if room is None:
            def voice_event(kind: str, user: dict[str, Any]) -> None:
                data = {"spaceId": space_id, "channelId": channel_id, "user": user}
                text = event_json(data)  # once, for every bot's hub
                for bot in self.bots:
                    self.hub(bot).publish(kind, data, intent=INTENT_VOICE, text=text)

            room = self.rooms[name] = Room(name, space_id=space_id, channel_id=channel_id, events=voice_event)
        return room

    def register(self, endpoint: ArgonListen) -> None:
        if endpoint.channel is not None:
            self.channels.setdefault(endpoint.channel, []).append(endpoint)
            # The room exists from now on, not from the route's first run: a bot connecting
            # just after the gateway started was refused with 404 "no room" (found by
            # tests/test_fuzz.py), which an Argon client takes for a permanent refusal.
            self.channel_room(*endpoint.channel)

    def unregister(self, endpoint: ArgonListen) -> None:
        if endpoint.channel is not None:
            hosts = self.channels.get(endpoint.channel, [])
            if endpoint in hosts:
                hosts.remove(endpoint)
            if not hosts:
                self.channels.pop(endpoint.channel, None)
                room = self.rooms.get(room_name(*endpoint.channel))
                if room is not None and not room.sessions:
                    del self.rooms[room.name]

    def ring(self, bot: ArgonBot, caller_id: str, host: ArgonListen) -> _Call:
        call_id = str(uuid.uuid4())
        room = self.rooms[CALL_ROOM_PREFIX + call_id] = Room(CALL_ROOM_PREFIX + call_id, call_id=call_id)
        room.attach(host)
        call = self.calls[call_id] = _Call(call_id, bot, caller_id, room)
        return call

    async def ring_when_online(self, call: _Call) -> None:
        """Send `callIncoming` once the bot is online for calls (an events stream with the
        calls intent is open: Argon rings only online bots)."""
        hub = self.hub(call.bot)
        if not hub.listening(INTENT_CALLS):
            log.info("[argon] bot %s has no events stream with the calls intent yet: the call waits for it",
                     call.bot.user_id)
        while not hub.listening(INTENT_CALLS):
            await trio.sleep(0.05)
        hub.publish("callIncoming", {"callId": call.call_id, "fromUserId": call.caller_id, "fromLocale": "en"},
                    intent=INTENT_CALLS)
        call.rang = True

    def end_call(self, call: _Call) -> None:
        if call.state == "accepted" or call.state == "ringing" and call.rang:
            self.hub(call.bot).publish("callEnded", {"callId": call.call_id}, intent=INTENT_CALLS)
        call.state = "ended"
        call.answered.set()
        self.calls.pop(call.call_id, None)
        self.rooms.pop(call.room.name, None)

    # -- REST -------------------------------------------------------------------------------
    @staticmethod
    def _error(status: int, code: str, message: str, headers: tuple[tuple[str, str], ...] = ()) -> HttpResponse:
        return HttpResponse(status, api_error_body(code, message), "application/json", headers)

    @classmethod
    def _refused(cls, status: int, cause: str) -> HttpResponse:
        """A call refused before its handler ran (gateway.server: 413 too big, 400 nested too
        deep, 408 too slow, 503 admission closed): `REFUSAL_CODES`."""
        return cls._error(status, REFUSAL_CODES.get(status, "bad_request"), cause)

    # -- admission seats ------------------------------------------------------------------------
    def _token_seat(self, request: HttpRequest) -> tuple[str, str, str] | None:
        """The seat a StreamToken call asks for (a known bot, a well-formed body), else None.
        While that seat holds a slot (the bot is in the room), its new token (a renewal, a
        reconnect) is no new session: admission lets it through."""
        bot = self._bot(request)
        if bot is None:
            return None
        try:
            body = request.json()
            space_id, channel_id = body["spaceId"], body["channelId"]
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(space_id, str) or not isinstance(channel_id, str):
            return None
        return seat(room_name(space_id, channel_id), bot.user_id)

    def _audio_seat(self, request: MediaRequest) -> tuple[str, str, str] | None:
        """The seat of an audio upgrade: the room and identity of its token, once verified (a
        forged token names no seat, so it cannot borrow another bot's slot). A bot's second
        connection (it replaces the first in the room: one identity per room) shares the slot
        of the first, and is not refused at `server.max_sessions`."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.request.headers}
        try:
            audio = parse_audio_request(request.request.path, headers.get("authorization"))
            grant = verify_room_token(self.secret, audio.token, now=time.time(), issuer=ISSUER)
        except (AudioRefusal, TokenError):
            return None
        return seat(grant.room, grant.identity)

    def _limited(self, bot: ArgonBot, what: str, limit: int) -> HttpResponse | None:
        retry = self._limits.retry_after(f"{what}:{bot.user_id}", limit)
        if retry is None:
            return None
        return self._error(429, "rate_limited", f"{limit} {what} requests per minute", (("retry-after", str(retry)),))

    async def stream_token(self, request: HttpRequest) -> HttpResponse:
        bot = self._bot(request)
        if bot is None:
            return self._error(401, "unauthorized", "expected Authorization: Bot <token> of a known bot")
        limited = self._limited(bot, "StreamToken", self.settings.stream_token_per_minute)
        if limited is not None:
            return limited
        try:
            body = request.json()
            space_id, channel_id = body["spaceId"], body["channelId"]
            if not isinstance(space_id, str) or not isinstance(channel_id, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return self._error(400, "bad_request", "expected a JSON body {spaceId, channelId} of strings")
        if not any(space == space_id for space, _ in self.channels):
            return self._error(403, "not_a_member", "bot is not a member of the space")
        if (space_id, channel_id) not in self.channels:
            return self._error(404, "channel_not_found", "no such channel")
        room = room_name(space_id, channel_id)
        jwt = issue_room_token(self.secret, room=room, identity=bot.user_id, name=bot.username, now=time.time(),
                               ttl_s=STREAM_TOKEN_TTL_S, issuer=ISSUER)
        return HttpResponse(200, stream_token_response(jwt, self.runtime.media_url(), room))

    async def events(self, request: HttpRequest) -> HttpResponse:
        bot = self._bot(request)
        if bot is None:
            return self._error(401, "unauthorized", "expected Authorization: Bot <token> of a known bot")
        raw = request.query.get("intents")
        if raw is None:
            intents = DEFAULT_INTENTS
        elif raw.isdigit() and int(raw) < 1 << 31:
            intents = int(raw)
        else:
            return self._error(400, "bad_request", "intents must be a non-negative integer bitmask")
        limited = self._limited(bot, "events stream connect", self.settings.events_per_minute)
        if limited is not None:
            return limited
        last_id = request.headers.get("last-event-id") or request.query.get("lastEventId")
        hub = self.hub(bot)
        return HttpResponse.event_stream(lambda: hub.stream(intents, last_id))

    def _call_for(self, request: HttpRequest) -> tuple[ArgonBot, _Call] | HttpResponse:
        bot = self._bot(request)
        if bot is None:
            return self._error(401, "unauthorized", "expected Authorization: Bot <token> of a known bot")
        limited = self._limited(bot, "Calls", self.settings.calls_per_minute)
        if limited is not None:
            return limited
        try:
            body = request.json()
            call_id = body["callId"]
            reason = body.get("reason")
            if not isinstance(call_id, str) or not (reason is None or isinstance(reason, str)):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            return self._error(400, "bad_request", "expected a JSON body {callId[, reason]} of strings")
        call = self.calls.get(call_id)
        if call is None:
            return self._error(404, "call_not_found", "no such call (it ended, or was never rung)")
        if call.bot.user_id != bot.user_id:
            return self._error(403, "not_callee", "this call rings another bot")
        if call.state != "ringing":
            return self._error(409, "call_already_answered", f"the call was {call.state} already")
        call.reason = reason or ""
        return bot, call

    async def accept(self, request: HttpRequest) -> HttpResponse:
        found = self._call_for(request)
        if isinstance(found, HttpResponse):
            return found
        bot, call = found
        call.state = "accepted"
        call.answered.set()
        jwt = issue_room_token(self.secret, room=call.room.name, identity=bot.user_id, name=bot.username,
                               now=time.time(), ttl_s=CALL_TOKEN_TTL_S, issuer=ISSUER)
        return HttpResponse(200, accept_response(jwt, call.room.name, call.caller_id, self.runtime.media_url()))

    async def reject(self, request: HttpRequest) -> HttpResponse:
        found = self._call_for(request)
        if isinstance(found, HttpResponse):
            return found
        _, call = found
        call.state = "rejected"
        call.answered.set()
        return HttpResponse.json(200, {})

    async def get_me(self, request: HttpRequest) -> HttpResponse:
        bot = self._bot(request)
        if bot is None:
            return self._error(401, "unauthorized", "expected Authorization: Bot <token> of a known bot")
        return HttpResponse(200, get_me_response(BotSelf(bot.bot_id, bot.user_id, bot.username, bot.display_name)))

    # -- audio WebSocket --------------------------------------------------------------------
    async def audio(self, request: MediaRequest) -> None:
        """One upgrade on an audio path: refused before the upgrade, or served until it ends."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.request.headers}
        try:
            try:
                audio = parse_audio_request(request.request.path, headers.get("authorization"))
            except AudioRefusal as refusal:
                if refusal.token is not None:  # Argon verifies the token before it reads target_identity
                    verify_room_token(self.secret, refusal.token, now=time.time(), issuer=ISSUER)
                raise
            grant = verify_room_token(self.secret, audio.token, now=time.time(), issuer=ISSUER)
        except (AudioRefusal, TokenError) as err:
            status = getattr(err, "status", 401)
            log.info("[argon] refused %s on %s: %s (%d)", request.remote, request.path, err, status)
            await _refuse(request, status, str(err))
            return
        room = self.rooms.get(grant.room)
        if room is None or room.closed:
            await _refuse(request, 404, f"no room {grant.room} here")
            return
        if audio.path.publishes and not grant.can_publish or audio.path.hears and not grant.can_subscribe:
            await _refuse(request, 403, "the token does not grant this path")
            return
        replacing = grant.identity in room.sessions  # one identity per room: this one takes the other's place
        if self._sessions >= self.settings.max_sessions and not replacing:
            await _refuse(request, 503, "max audio WS sessions reached")
            return
        self._sessions += 1
        try:
            try:
                ws = await request.request.accept()
            except ConnectionClosed:
                return
            session = BotSession(room, audio, grant, ws, request.remote)
            log.info("[argon] bot session %s in %s: %s", session.session_id, room.name, session.describe())
            await room.join(session)
            try:
                await session.run()
            finally:
                await room.leave(session)
                log.info("[argon] bot session %s in %s ended: %s", session.session_id, room.name,
                         session.ended_by or "closed")
        finally:
            self._sessions -= 1


async def _refuse(request: MediaRequest, status: int, reason: str) -> None:
    """A plain-text HTTP error instead of the upgrade, as Argon's ingress answers."""
    # backslashreplace: the reason may quote a claim of a signed token ("no room X here"),
    # and JSON lets a claim hold a lone surrogate ("\ud800"), which strict UTF-8 refuses:
    # found by tests/test_fuzz.py, the handler crashed and the upgrade went unanswered
    await request.request.reject(status, extra_headers=[(b"content-type", b"text/plain; charset=utf-8")],
                                 body=reason.encode("utf-8", "backslashreplace"))


class ArgonListen(Endpoint[Frame]):
    """An Argon-compatible voice channel, or a call to a bot (module doc).

    As a source it emits the room's first publishing bot, played out by arrival time with PLC
    and FEC for what is lost (module doc; PCM16 48 kHz; with `concealment=False` the Opus
    packets as the bot sent them); an Ogg stream from the seed's example is demuxed and, being
    unpaced, played at real time. As a sink it takes each of its route's other sources on its
    own lane and forwards the packets to the bots that hear that participant's `identity`."""

    kind = "argon"
    role = "listen"
    mixes = False
    ingress: AudioFormat  # both set in __init__
    egress: AudioFormat

    def __init__(self, name: str, *, service: ArgonListenService, space_id: str | None = None,
                 channel_id: str | None = None, call_bot: ArgonBot | None = None, stereo: bool = False,
                 frame_duration_ms: int = 20, ring_timeout: float = RING_TIMEOUT, concealment: bool = True,
                 opus_fec: bool = False, expected_loss_pct: int = FEC_PACKET_LOSS_PERC) -> None:
        super().__init__(name)
        self.service = service
        self.space_id, self.channel_id = space_id, channel_id
        self.call_bot = call_bot
        self.concealment = concealment
        """Play the publishing bot out with PLC/FEC (PCM ingress), or hand its packets on as
        they are (Opus ingress: the route's silence fills the gaps)."""
        if concealment:
            self.ingress = PCM16_48K_STEREO if stereo else PCM16_48K
        else:
            self.ingress = OPUS_48K_STEREO if stereo else OPUS_48K
        self.egress = OPUS_48K_STEREO if stereo else OPUS_48K
        self.ptime_ms = frame_duration_ms
        # complexity "auto" as ArgonDial (1 at 8 kHz input, 5 above: opus.auto_complexity). FEC is off by default here: the
        # bots hear us over our own TCP socket, where nothing is lost, and it doubles the
        # encoder's cost (OpusEncoder); a relay onward may want it (`opus_fec: true`).
        self.encoder_options = {"opus_complexity": "auto", "opus_fec": opus_fec, "opus_expected_loss_pct": expected_loss_pct}
        self.playout: OpusPlayout | None = None
        """This session's playout of the publishing bot (None with `concealment=False`)."""
        self._packets: trio.MemorySendChannel[tuple[bytes, float]] | None = None
        self._burst_decoder: OpusDecoder | None = None
        self.ring_timeout = ring_timeout
        self.room: Room | None = None
        self.call: _Call | None = None
        self._emit: Emit | None = None
        self._timestamp = 0
        self._primary: BotSession | None = None
        self._joined: list[str] = []
        self.session_id: str | None = None
        self.params: AudioRequest | None = None
        """The primary bot's AudioRequest (stereo, frame_duration_ms, track_name...)."""
        self._emptied = False
        """The channel's session ended because every bot had left (goodbye closes nobody then)."""

    @property
    def channel(self) -> tuple[str, str] | None:
        return (self.space_id, self.channel_id) if self.space_id and self.channel_id else None

    @property
    def start_phase(self) -> int:
        # A call rings its bot once the caller is there: after the listen side connected.
        return 1 if self.call_bot is not None else 0

    @classmethod
    def from_config(cls, name: str, opts: Options, runtime: Runtime) -> ArgonListen:
        service = ArgonListenService.for_runtime(runtime)
        bot_id = opts.get_str("call", None)
        stereo = opts.get_bool("stereo", False)
        frame_ms = opts.get_int("frame_duration_ms", 20, choices=VALID_PTIMES_MS)
        opus = {"concealment": opts.get_bool("concealment", True), "opus_fec": opts.get_bool("opus_fec", False),
                "expected_loss_pct": opts.get_int("expected_loss_pct", FEC_PACKET_LOSS_PERC, minimum=0, maximum=100)}
        if bot_id is not None:
            if "space_id" in opts or "channel_id" in opts:
                raise opts.error("call", "a listen endpoint is a channel (space_id, channel_id) or a call, not both")
            bot = service.bot_by_user_id(bot_id)
            if bot is None:
                known = ", ".join(b.user_id for b in service.bots) or "none"
                raise opts.error("call", f"no bot with user_id {bot_id!r} in services.argon.listen_bots (known: {known})")
            endpoint = cls(name, service=service, call_bot=bot, stereo=stereo, frame_duration_ms=frame_ms,
                           ring_timeout=opts.get_float("ring_timeout_s", RING_TIMEOUT, minimum=1.0), **opus)
        else:
            endpoint = cls(name, service=service, space_id=opts.get_str("space_id", allow_empty=False),
                           channel_id=opts.get_str("channel_id", allow_empty=False), stereo=stereo,
                           frame_duration_ms=frame_ms, **opus)
        opts.finish()
        service.register(endpoint)
        return endpoint

    def detach(self) -> None:
        self.service.unregister(self)

    def describe(self) -> str:
        if self.call_bot is not None:
            return f"{self.name} (listen call to bot {self.call_bot.user_id})"
        return f"{self.name} (listen channel {self.space_id}/{self.channel_id})"

    # -- participants -----------------------------------------------------------------------
    def _participants(self) -> list[Endpoint]:
        return [p for p in self.peers if p.ingress is not None and (self.hears is None or p.name in self.hears)]

    def on_route_up(self) -> None:
        room = self.room
        if room is None:
            return
        for peer in self._participants():
            room.add_user(peer.identity, self, user_object(peer))
            self._joined.append(peer.identity)

    async def _leave(self) -> None:
        room, joined, self._joined = self.room, self._joined, []
        if room is not None:
            for identity in joined:
                await room.remove_user(identity, self)

    # -- from the room ------------------------------------------------------------------------
    def on_peer_error(self, session: BotSession) -> None:
        self.stats.peer_errors += 1

    def on_room_change(self) -> None:
        primary = self.room.primary if self.room is not None else None
        if primary is not self._primary:
            self._primary = primary
            if primary is not None:
                self.params = primary.request
                self.session_id = primary.session_id
        self.bursty = primary is not None and primary.bursty

    def on_bot_packet(self, session: BotSession, packet: bytes, samples: int) -> None:
        emit = self._emit
        if emit is None or session is not self._primary:
            return
        self.stats.frames_in += 1
        self.stats.bytes_in += len(packet)
        if self._packets is not None and not session.bursty:
            try:  # the arrival time is now: this runs in the bot session's reader, on its message
                self._packets.send_nowait((packet, trio.current_time()))
            except trio.WouldBlock:
                self.stats.dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            return
        if self._burst_decoder is not None:
            # An Ogg burst: arrival times say nothing, the route queues it. A packet libopus
            # refuses raises RemoteProtocolError: the room closes that bot with 1007.
            (frame,) = self._burst_decoder.process(EncodedFrame(packet, self._burst_decoder.input, samples, 0))
            emit(AudioFrame(frame.pcm, frame.rate, self._timestamp))
            self._timestamp += frame.samples
            return
        emit(EncodedFrame(packet, self.ingress, samples, self._timestamp))
        self._timestamp += samples

    # -- to the room ----------------------------------------------------------------------------
    def wants_from(self, source: Endpoint) -> bool:
        room = self.room
        return room is not None and room.wants(source.identity)

    async def send_from(self, source: Endpoint, frame: Frame) -> None:
        room = self.room
        if room is None or not isinstance(frame, EncodedFrame):
            self.stats.dropped += 1
            return
        room.forward(source.identity, frame.payload)
        self.stats.frames_out += 1
        self.stats.bytes_out += len(frame.payload)

    # -- session ----------------------------------------------------------------------------
    async def run(self, emit: Emit, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._timestamp = 0
        try:
            async with trio.open_nursery() as nursery:
                played = trio.Event()
                if self.concealment:
                    channels = self.ingress.channels
                    self.playout = OpusPlayout(channels)
                    self._burst_decoder = OpusDecoder(channels)
                    self._packets, packets = trio.open_memory_channel[tuple[bytes, float]](HEAR_QUEUE)
                    nursery.start_soon(self._play, packets, emit, self.playout, played)
                try:
                    if self.call_bot is not None:
                        await self._run_call(emit, task_status)
                    else:
                        await self._run_channel(emit, task_status)
                finally:
                    self._emit = None
                    if self._packets is not None:
                        self._packets.close()  # what the playout holds still plays (bounded)
                        self._packets = None
                        # leave the room first: a bot joining meanwhile belongs to the next
                        # session, and must not see this one's participants go (target_left)
                        await self._leave()
                        with trio.move_on_after(PLAYOUT_TAIL_S):
                            await played.wait()
        finally:
            self._emit = None
            await self._leave()

    async def _play(self, packets, emit: Emit, playout: OpusPlayout, played: trio.Event) -> None:
        try:
            await play_out(packets, emit, playout, self.stats)
        finally:
            played.set()

    async def _run_channel(self, emit: Emit, task_status) -> None:
        room = self.room = self.service.channel_room(self.space_id or "", self.channel_id or "")
        room.attach(self)
        self._emptied = False
        try:
            while not room.sessions:
                await room.wait_change()
            self.on_room_change()
            self._emit = emit
            self.stats.connects += 1
            log_bots = ", ".join(s.describe() for s in room.sessions.values())
            self.log.info("channel %s open: %s", room.name, log_bots)
            task_status.started()
            while room.sessions:
                await room.wait_change()
            self._emptied = True
            raise CallEnded(f"every bot left the channel (the last: {room.last_left})")
        finally:
            room.detach(self)

    async def _run_call(self, emit: Emit, task_status) -> None:
        bot = self.call_bot
        assert bot is not None
        callers = self._participants()
        caller_id = callers[0].identity if callers else self.name
        call = self.call = self.service.ring(bot, caller_id, self)
        room = self.room = call.room
        self.log.info("ringing bot %s (call %s from %s)", bot.user_id, call.call_id, caller_id)
        try:
            with trio.move_on_after(self.ring_timeout) as ringing:
                await self.service.ring_when_online(call)
                await call.answered.wait()
                if call.state == "rejected":
                    raise CallEnded(f"bot rejected the call{': ' + call.reason if call.reason else ''}")
                while bot.user_id not in room.sessions:
                    await room.wait_change()
            if ringing.cancelled_caught:
                raise CallEnded(f"bot did not answer within {self.ring_timeout:g} s")
            self.on_room_change()
            self._emit = emit
            self.stats.connects += 1
            self.log.info("call %s answered by %s", call.call_id, room.sessions[bot.user_id].describe())
            task_status.started()
            while bot.user_id in room.sessions:
                await room.wait_change()
            raise CallEnded(f"bot hung up ({room.last_left})")
        finally:
            self.service.end_call(call)
            room.detach(self)

    async def goodbye(self) -> None:
        await self._leave()
        room = self.room
        if room is None:
            return
        if self.call is not None:
            self.service.end_call(self.call)  # callEnded: the reference bot closes with 1000
            with trio.move_on_after(1.0):
                while room.sessions:
                    await room.wait_change()
            await room.close_all(1000, "call ended")
        else:
            room.detach(self)  # routes in the same channel stop together: the last one out closes it
            # A session that ended because every bot left has no bot of its own to close: the
            # bots in the room now joined while it was ending, and they are the next session's
            # (found by tests/test_fuzz.py: a bot arriving within ~20 ms of the last one leaving
            # was closed with 1000 "channel closed" instead of being served).
            if not room.hosts and (self.route_stopping or not self._emptied):
                await room.close_all(1000, "channel closed")
