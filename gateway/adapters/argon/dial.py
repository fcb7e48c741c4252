"""The Argon dial role: the gateway is an Argon bot (spec: shared/protocols/argon-voice-ws.md
whole; 000_1537bbe3858d175f.txt "Voice Streaming"; 001_bf359231651c17d3.txt for the `Bot`
authorization).

Publishing (no `hear:`): `POST {api_url}/IVoice/v1/StreamToken` → `{token, ingressUrl}`, then
`{ingressUrl}/audio/connect?token=…&stereo=…&frame_duration_ms=…` carrying one Opus packet per
binary message. `hear: USER_ID` opens `/audio/duplex` instead (`/audio/subscribe` with
`publish: false`) with `target_identity=USER_ID&target_track_source=microphone`: the endpoint
is then a source as well, what it hears played out by arrival time (`OpusPlayout`: jitter
buffer, PLC for gaps and DTX). `hear: follow` reads the events stream (voice intent) and hears
whoever of the channel joined last and is still there (not a bot, not ourselves); a change of
target reopens the session, the new one opened before the old is closed so publishing goes on.
`calls: incoming` answers calls: the daemon's call dispatcher hands each accepted
`callIncoming` to a fresh session of the route, whose endpoint accepts it (`POST
…/ICalls/v20260401/Accept`) and opens `{audioBaseUrl}/audio/duplex` with the caller as target.

Statuses (`ready`, `subscribed`, `waiting`, `target_left`; key `status`, or the older `type`)
are route events and log lines. The server ends sessions by dropping TCP (1006): unless we
closed it ourselves (a target change, a goodbye), that is a failure of this endpoint alone, which
reconnects on its own while the route keeps running (`Endpoint.reconnects`; README,
"Reconnect"). A reconnect reuses the StreamToken (or a call's Accept grant) until
TOKEN_RENEW_BEFORE_S before its `exp` (read from the JWT without verifying it: the ingress
verifies it), then asks for a new one through the bot's limiter; a token the ingress refuses
(401/403) is dropped, so the next attempt asks anew.
StreamToken, the events stream and the calls API are rate limited per bot (20, 5 and 20 a
minute at Argon; `services.argon.*_per_minute`): one limiter per bot spaces the calls of every
route, and a 429 waits for its Retry-After.
"""

from __future__ import annotations

import collections
import logging
import random
import time
from typing import Any, Callable, Iterator, Literal

import httpx
import jwt
import trio
from trio_websocket import ConnectionClosed

from gateway.adapters.argon.hear import play_out
from gateway.adapters.argon.sse import (
    ArgonUser,
    CallEnded as CallEndedEvent,
    CallIncoming,
    SseMalformed,
    SseParser,
    VoiceJoin,
    VoiceLeave,
    parse_argon_event,
)
from gateway.adapters.argon.wire import (
    CALLS_ACCEPT_PATH,
    CALLS_REJECT_PATH,
    EVENTS_PATH,
    GET_ME_PATH,
    INTENT_CALLS,
    INTENT_VOICE,
    STREAM_TOKEN_PATH,
    AudioPath,
    IngressParams,
    StatusMessage,
    accept_request,
    api_error_cause,
    build_audio_url,
    build_ingress_url,
    parse_accept_response,
    parse_get_me_response,
    parse_reject_response,
    parse_retry_after,
    parse_status_message,
    parse_stream_token_response,
    reject_request,
    stream_token_request,
)
from gateway.adapters.kit import RateLimiter, request_with_retry
from gateway.adapters.ws import WsEndpoint, WsSession, close_description, dial, encoded_payload
from gateway.adapters.wsclient import ClientWebSocket
from gateway.codecs.formats import (
    OPUS_48K,
    OPUS_48K_STEREO,
    PCM16_48K,
    PCM16_48K_STEREO,
    VALID_PTIMES_MS,
    EncodedFrame,
)
from gateway.codecs.opus import OPUS_INPUT_RATES
from gateway.codecs.playout import OpusPlayout
from gateway.config.options import Options
from gateway.endpoint import Emit, Endpoint
from gateway.errors import CallEnded, CloseCode, RemoteProtocolError, ServiceError
from gateway.runtime import Runtime

log = logging.getLogger("gateway.endpoint.argon")

#: libopus 0-10, or "auto": by the encoder's input rate (gateway.codecs.opus.auto_complexity: 1 for a
#: phone call's 8 kHz, with a 32 kb/s floor, 5 above; 5 costs ~1/4 of the CPU of 10 at nearly the same quality)
DEFAULT_COMPLEXITY: Literal["auto"] = "auto"
# opus_input_rate: auto (None) by default: what is published is encoded at the rate of the audio
# it is made of (`opus_input_rate_for`), so an 8 kHz call is fed to libopus as it is, with no 8 ->
# 48 kHz resampler, and coded narrowband (SILK) at about half the encoder CPU. Judged by PESQ
# (issue 12): NB 4.25-4.39 at 8 kHz input against 4.44-4.46 at 48 kHz (or105/or109, Argon
# defaults; the measurement: within 0.01-0.13). SILK keeps the spectrum, not the
# waveform: tests judge such audio with gateway.quality.spectral_alignment. `48000` forces the
# old full-band path.
DEFAULT_OPUS_INPUT_RATE: int | None = None
DEFAULT_EXPECTED_LOSS_PCT = 10  # loss the published Opus's in-band FEC is tuned for (option expected_loss_pct)
PUBLISH_MIN_PACKET = 3  # bytes: shorter packets go out as a silence packet (argon-voice-ws.md: 0-1 end the
# session; the reference bot sends F8 FF FE for any under 3). Without DTX libopus makes none.
READY_WAIT = 1.0  # seconds to wait for {"status":"ready"} before streaming anyway
HEAR_QUEUE = 256  # received packets waiting for the playout task (~5 s of 20 ms) before drops
EVENTS_READ_TIMEOUT = 90.0  # seconds of silence on the events stream (heartbeats every 30 s) = dead
EVENTS_BACKOFF = (1.0, 30.0)  # first and longest wait between events-stream reconnects, seconds
FOLLOW = "follow"

INGRESS_REJECTED = {
    400: ("bad ingress parameters (target_identity missing?)", True),
    401: ("stream token missing or unreadable", False),
    403: ("stream token rejected (bad signature, expired, or not for this room)", False),
    404: ("no such path or room at the ingress", True),
    409: ("the channel already has a stream from this bot", False),
    503: ("the ingress is at capacity", False),
}


TOKEN_RENEW_BEFORE_S = 300  # a stream token is reused for reconnects until this long before its exp


def token_fresh(token: str, margin_s: float) -> bool:
    """True when the JWT `token` has an `exp` more than `margin_s` seconds away (Unix time).
    Read without verifying the signature (the ingress verifies it; we only decide whether to
    reuse it); False for a token without `exp` or one that is not a JWT."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False, "verify_exp": False})
        exp = float(claims["exp"])
    except (jwt.PyJWTError, KeyError, TypeError, ValueError, OverflowError):
        return False
    return exp - time.time() > margin_s


StreamTokenLimiter = RateLimiter
"""A bot's limiter of one API (the kit's `RateLimiter`: at most `per_window` calls in any
`window` seconds, FIFO); one per bot token, API and purpose, shared by every route of that bot."""


class BotApi:
    """The REST calls of one bot (`Authorization: Bot <token>`), each through its limiter, a
    429 (or 5xx) retried per the kit's `RetryPolicy` after its Retry-After, the wait held in the
    limiter so every route of the bot waits too. Errors are ServiceErrors naming the cause,
    never the token."""

    def __init__(self, client: httpx.AsyncClient, api_url: str, bot_token: str, *, stream_tokens: StreamTokenLimiter,
                 events: StreamTokenLimiter, calls: StreamTokenLimiter) -> None:
        self.client = client
        self.api_url = api_url
        self._token = bot_token
        self.stream_tokens, self.events_limiter, self.calls_limiter = stream_tokens, events, calls
        self._me: Any = None

    @classmethod
    def for_bot(cls, runtime: Runtime, api_url: str, bot_token: str) -> BotApi:
        """The bot's API with the limiters every route of that bot shares (`services.argon`
        `stream_token_per_minute`, `events_per_minute`, `calls_per_minute`)."""
        service = runtime.config.services.argon

        def limiter(what: str, per_minute: int) -> StreamTokenLimiter:
            return runtime.singleton((what, api_url, hash(bot_token)), lambda: StreamTokenLimiter(per_minute))

        return cls(runtime.http_client(), api_url, bot_token,
                   stream_tokens=limiter("argon-limiter", service.stream_token_per_minute),
                   events=limiter("argon-events-limiter", service.events_per_minute),
                   calls=limiter("argon-calls-limiter", service.calls_per_minute))

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bot {self._token}"}

    async def request(self, method: str, path: str, limiter: StreamTokenLimiter, parse: Callable[..., Any],
                      body: Any = None, what: str = "Argon API") -> Any:
        """One call (`request_with_retry`): `parse(status, body, retry_after_s)` is the wire's."""
        return await request_with_retry(self.client, method, f"{self.api_url}{path}", parse=parse, what=what, log=log,
                                        headers=self.headers, json=body, limiter=limiter)

    async def stream_token(self, space_id: str, channel_id: str):
        """`StreamTokenGrant` for a voice channel (400 not voice, 403 not a member, 404 no such channel)."""
        return await self.request(
            "POST", STREAM_TOKEN_PATH, self.stream_tokens,
            lambda status, body, retry_after_s: parse_stream_token_response(
                status, body, space_id=space_id, channel_id=channel_id, retry_after_s=retry_after_s),
            stream_token_request(space_id, channel_id), "Argon StreamToken")

    async def accept(self, call_id: str):
        """`CallGrant` of an incoming call."""
        return await self.request(
            "POST", CALLS_ACCEPT_PATH, self.calls_limiter,
            lambda status, body, retry_after_s: parse_accept_response(status, body, call_id=call_id, retry_after_s=retry_after_s),
            accept_request(call_id), "Argon Calls Accept")

    async def reject(self, call_id: str, reason: str | None) -> None:
        await self.request(
            "POST", CALLS_REJECT_PATH, self.calls_limiter,
            lambda status, body, retry_after_s: parse_reject_response(status, body, call_id=call_id, retry_after_s=retry_after_s),
            reject_request(call_id, reason), "Argon Calls Reject")

    async def me(self):
        """`BotSelf` (cached): who we are, so `hear: follow` never hears ourselves."""
        if self._me is None:
            self._me = await self.request(
                "GET", GET_ME_PATH, self.calls_limiter,
                lambda status, body, retry_after_s: parse_get_me_response(status, body, retry_after_s=retry_after_s),
                what="Argon GetMe")
        return self._me


# ------------------------------------------------------------------------------ events stream
class EventsClient:
    """One events stream of one bot for one intent set, shared by the routes that need it
    (`hear: follow` endpoints, the call dispatcher): `GET {api_url}/IEvents/v1/Stream?intents=`,
    reconnected with `Last-Event-ID` after a break (backoff 1 s doubling to 30 s, within the
    bot's connects-per-minute limit). It runs while it has subscribers, as a task of the
    gateway's nursery. A malformed event is logged and skipped.

    It keeps who is in each voice channel (`present`), from voiceJoin / voiceLeave, in join
    order: Argon has no REST call that lists a channel's participants."""

    def __init__(self, runtime: Runtime, api: BotApi, intents: int) -> None:
        self.runtime = runtime
        self.api = api
        self.intents = intents
        self.last_event_id: str | None = None
        self.present: dict[tuple[str, str], collections.OrderedDict[str, ArgonUser]] = {}
        self.connected = False
        self.failure: ServiceError | None = None
        """A permanent failure (bad bot token): the subscribers end with it."""
        self._subscribers: list[Callable[[Any], None]] = []
        self._scope: trio.CancelScope | None = None
        self._change = trio.Event()

    @classmethod
    def shared(cls, runtime: Runtime, api: BotApi, intents: int) -> EventsClient:
        return runtime.singleton(("argon-events", api.api_url, hash(api.headers["Authorization"]), intents),
                                 lambda: cls(runtime, api, intents))

    def subscribe(self, callback: Callable[[Any], None]) -> Callable[[], None]:
        """Call `callback(event)` for every Argon event (sync, must not block); returns the
        function that unsubscribes. Starts the stream if it is not running."""
        self._subscribers.append(callback)
        if self._scope is None:
            self.failure = None  # a new start (a reload may have fixed what failed)
            nursery = self.runtime.nursery
            if nursery is None:
                raise RuntimeError("the events stream needs a running gateway (Runtime.nursery)")
            self._scope = trio.CancelScope()
            nursery.start_soon(self._run, self._scope)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)
            if not self._subscribers and self._scope is not None:
                self._scope.cancel()
                self._scope = None

        return unsubscribe

    def changed(self) -> None:
        self._change.set()
        self._change = trio.Event()

    async def wait_change(self) -> None:
        await self._change.wait()

    def _dispatch(self, event: Any) -> None:
        if isinstance(event, VoiceJoin):
            users = self.present.setdefault((event.space_id, event.channel_id), collections.OrderedDict())
            users.pop(event.user.user_id, None)
            users[event.user.user_id] = event.user  # most recent last
        elif isinstance(event, VoiceLeave):
            self.present.get((event.space_id, event.channel_id), collections.OrderedDict()).pop(event.user.user_id, None)
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:  # a bug in one subscriber must not stop the stream
                log.exception("events subscriber failed on %s", type(event).__name__)
        self.changed()

    async def _run(self, scope: trio.CancelScope) -> None:
        backoff = EVENTS_BACKOFF[0]
        url = f"{self.api.api_url}{EVENTS_PATH}?intents={self.intents}"
        with scope:
            while True:
                try:
                    await self._stream(url)  # returns only by raising: every end is a break
                except ServiceError as err:
                    if err.permanent:
                        log.error("%s (permanent: not reconnecting)", err)
                        self.failure = err
                        if self._scope is scope:
                            self._scope = None  # the next subscriber starts it afresh
                        self.changed()
                        return
                    if self.connected:  # it was up: a fresh break, not one more failed attempt
                        backoff = EVENTS_BACKOFF[0]
                    # a 429's Retry-After holds the limiter back: the next connect waits for both
                    log.warning("%s; reconnecting in %.0f s", err, max(backoff, err.retry_after or 0.0))
                self.connected = False
                self.changed()
                await trio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, EVENTS_BACKOFF[1])

    async def _stream(self, url: str) -> None:
        await self.api.events_limiter.acquire()
        headers = {**self.api.headers, "Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        parser = SseParser()
        timeout = httpx.Timeout(10.0, read=EVENTS_READ_TIMEOUT)
        try:
            async with self.api.client.stream("GET", url, headers=headers, timeout=timeout) as response:
                if response.status_code != 200:
                    body = await response.aread()
                    permanent = response.status_code in (400, 401, 403)
                    retry = parse_retry_after(response.headers.get("retry-after"), now=time.time())
                    if response.status_code == 429 and retry:
                        self.api.events_limiter.back_off(retry)
                    cause = {401: "bot token rejected", 403: "intents not allowed (calls need a verified bot)",
                             429: "rate limited"}.get(response.status_code, f"HTTP {response.status_code}")
                    detail = api_error_cause(body) if response.status_code != 401 else None
                    raise ServiceError(f"Argon events stream: {cause} (HTTP {response.status_code}"
                                       f"{'; ' + detail if detail else ''})",
                                       status=response.status_code, permanent=permanent, retry_after=retry)
                self.connected = True
                log.info("Argon events stream connected (intents %d%s)", self.intents,
                         f", resuming after {self.last_event_id}" if self.last_event_id else "")
                async for chunk in response.aiter_bytes():
                    for item in parser.feed(chunk):
                        self._handle(item)
        except httpx.HTTPError as err:
            raise ServiceError(f"Argon events stream broke: {err.__class__.__name__}") from None
        raise ServiceError("Argon events stream ended by the server")

    def _handle(self, item: Any) -> None:
        if isinstance(item, SseMalformed):
            log.warning("Argon events stream: skipped a malformed line: %s", item.reason)
            return
        if item.id and item.id != "ready":  # `ready` carries id "ready": no place to resume from
            self.last_event_id = item.id
        try:
            event = parse_argon_event(item)
        except RemoteProtocolError as err:
            log.warning("Argon events stream: skipped event %r: %s", item.event[:40], err)
            return
        self._dispatch(event)


# --------------------------------------------------------------------------------- sessions
class _Session(WsSession[EncodedFrame]):
    """One audio WebSocket of the dial endpoint (connect, subscribe or duplex); what it
    publishes is one Opus packet per binary message (`WsEndpoint.send`)."""

    def __init__(self, ws: ClientWebSocket, path: AudioPath, target: str | None) -> None:
        super().__init__(ws, payload=encoded_payload)
        self.path, self.target = path, target
        self.ready = trio.Event()
        self.ended = trio.Event()
        self.closing = False
        """We are closing it (a target change, a goodbye): its end is not a failure."""
        self.session_id: str | None = None
        self.end: str = ""
        self.target_left = False
        self.left = trio.Event()
        """Set on `target_left` (the server keeps a duplex socket open after it)."""
        # `closer` (WsSession): our close handshake, which `run()` lets finish before it stops
        # the socket's reader

    def describe(self) -> str:
        return f"{self.path.value}" + (f" hearing {self.target}" if self.target else "")


class ArgonDial(WsEndpoint[EncodedFrame]):
    """The gateway as an Argon bot in a voice channel or a call (module doc). A sink (it
    publishes the route's audio) unless `publish: false`; a source too when it hears someone
    (`hear:` or `calls: incoming`)."""

    kind = "argon"
    role = "dial"
    ingress = None
    reconnects = True

    def __init__(
        self,
        name: str,
        *,
        api_url: str,
        bot_token: str,
        limiter: StreamTokenLimiter | None = None,
        client: httpx.AsyncClient | None = None,
        space_id: str = "",
        channel_id: str = "",
        stereo: bool = False,
        frame_duration_ms: int = 20,
        track_name: str = "",
        track_source: str = "",
        metadata: str = "",
        ingress_path: str = "/audio/connect",
        ready_wait: float = READY_WAIT,
        bitrate: int | None = None,
        complexity: int | Literal["auto"] = DEFAULT_COMPLEXITY,
        opus_fec: bool = True,
        expected_loss_pct: int = DEFAULT_EXPECTED_LOSS_PCT,
        opus_input_rate: int | None = DEFAULT_OPUS_INPUT_RATE,
        concealment: bool = True,
        hear: str | None = None,
        publish: bool = True,
        target_track_source: str = "microphone",
        calls: str | None = None,
        callers: tuple[str, ...] = (),
        max_calls: int = 1,
        runtime: Runtime | None = None,
    ) -> None:
        super().__init__(name)
        self.api_url = api_url
        self._bot_token = bot_token
        self.runtime = runtime
        self.limiter = limiter or StreamTokenLimiter(5)
        self.client = client
        self.space_id = space_id
        self.channel_id = channel_id
        self.stereo = stereo
        self.publish = publish
        self.hear = hear
        self.calls = calls
        self.callers = callers
        self.max_calls = max_calls
        self.target_track_source = target_track_source
        self.egress = (OPUS_48K_STEREO if stereo else OPUS_48K) if publish else None
        if hear is not None or calls is not None:
            self.ingress = PCM16_48K_STEREO if stereo else PCM16_48K
        self.ptime_ms = frame_duration_ms
        self.track_name = track_name
        self.track_source = track_source
        self.metadata = metadata
        self.ingress_path = ingress_path
        self.ready_wait = ready_wait
        self.encoder_options = {"opus_bitrate": bitrate, "opus_complexity": complexity, "opus_fec": opus_fec,
                                "opus_expected_loss_pct": expected_loss_pct, "opus_min_packet_bytes": PUBLISH_MIN_PACKET,
                                "opus_input_rate": opus_input_rate}
        """`opus_input_rate` None (auto, the default): the route encodes at the rate of what it
        publishes (`Route.pacing_format`: 8 kHz for a phone call, 48 kHz for an Argon peer or a
        48 kHz file); an int forces that input rate (Hz)."""
        self.concealment = concealment
        """What is heard: PLC/FEC for lost packets and DTX (True), or silence (False, a baseline)."""
        self.session_id: str | None = None
        self.call: CallIncoming | None = None
        """The call this session answers (`calls: incoming`; set by the call dispatcher)."""
        self.playout: OpusPlayout | None = None
        self.session: _Session | None = None
        """The session we publish on (the newest, during a target change): `send()`'s."""
        self.sessions: list[_Session] = []
        self._closing: list[_Session] = []
        """Sessions whose close handshake is in progress (it needs their reader to finish)."""
        self._nursery: trio.Nursery | None = None
        self._packets: trio.MemorySendChannel[tuple[bytes, float]] | None = None
        self._call_ended = trio.Event()
        self._stopping = False
        self._api: BotApi | None = None
        self._room = f"{space_id}/{channel_id}"
        self._grant: Any = None
        """The StreamTokenGrant (or a call's Accept grant, with its call id) reconnects reuse."""

    # -- config ----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, name: str, opts: Options, runtime: Runtime) -> ArgonDial:
        service = runtime.config.services.argon
        bot_token = opts.get_str("bot_token", None, secret=True) or (service.bot_token.reveal() if service.bot_token else None)
        if not bot_token:
            raise opts.error(None, "no Argon bot token: set services.argon.bot_token (or bot_token: on the endpoint)")
        api_url = opts.get_str("api_url", service.api_url).rstrip("/")
        stereo = opts.get_bool("stereo", False)
        channels = opts.get_int("channels", None, choices=(1, 2))
        if channels is not None:
            if "stereo" in opts and stereo != (channels == 2):
                raise opts.error("channels", f"conflicts with stereo: {str(stereo).lower()}")
            stereo = channels == 2
        calls = opts.get_choice("calls", ("incoming",), None) if "calls" in opts else None
        hear = opts.get_str("hear", None, allow_empty=False) if "hear" in opts else None
        publish = opts.get_bool("publish", True)
        callers = tuple(opts.child({"v": v}, f"{opts.key_path('from')}[{i}]", line).get_str("v", allow_empty=False)
                        for i, v, line in opts.items("from"))
        if calls is not None:
            for key in ("space_id", "channel_id", "hear"):
                if key in opts:
                    raise opts.error(key, "not with calls: incoming (a call's room and caller come with the call)")
            if not publish:
                raise opts.error("publish", "a call is two-way: publish: false does not go with calls: incoming")
            space_id = channel_id = ""
        else:
            if callers:
                raise opts.error("from", "only with calls: incoming")
            if "max_calls" in opts:
                raise opts.error("max_calls", "only with calls: incoming")
            space_id = opts.get_str("space_id", allow_empty=False)
            channel_id = opts.get_str("channel_id", allow_empty=False)
            if not publish and hear is None:
                raise opts.error("publish", "publish: false needs hear: (USER_ID or follow): the endpoint would do nothing")
        endpoint = cls(
            name,
            api_url=api_url,
            bot_token=bot_token,
            limiter=None,
            client=runtime.http_client(),
            space_id=space_id,
            channel_id=channel_id,
            stereo=stereo,
            frame_duration_ms=opts.get_int("frame_duration_ms", 20, choices=VALID_PTIMES_MS),
            track_name=opts.get_str("track_name", ""),
            track_source=opts.get_str("track_source", ""),
            metadata=opts.get_str("metadata", ""),
            ingress_path=opts.get_str("ingress_path", service.ingress_path),
            ready_wait=opts.get_int("ready_wait_ms", int(READY_WAIT * 1000), minimum=0) / 1000,
            bitrate=opts.get_int("bitrate", None, minimum=6000, maximum=510000),
            complexity=_complexity(opts),
            opus_fec=opts.get_bool("opus_fec", True),
            expected_loss_pct=opts.get_int("expected_loss_pct", DEFAULT_EXPECTED_LOSS_PCT, minimum=0, maximum=100),
            opus_input_rate=_opus_input_rate(opts),
            concealment=opts.get_bool("concealment", True),
            hear=hear,
            publish=publish,
            target_track_source=opts.get_choice("target_track_source", ("microphone", "screen_share_audio", "any"),
                                                "microphone"),
            calls=calls,
            callers=callers,
            max_calls=opts.get_int("max_calls", 1, minimum=1, maximum=1000),
            runtime=runtime,
        )
        endpoint._api = BotApi.for_bot(runtime, api_url, bot_token)
        endpoint.limiter = endpoint._api.stream_tokens
        opts.finish()
        return endpoint

    @property
    def api(self) -> BotApi:
        """The bot's REST calls (an endpoint built by hand, without a runtime, gets its own
        limiters and the `client` it was given)."""
        if self._api is None:
            if self.runtime is not None:
                self._api = BotApi.for_bot(self.runtime, self.api_url, self._bot_token)
            else:
                client = self.client or httpx.AsyncClient(timeout=httpx.Timeout(10.0))
                self._api = BotApi(client, self.api_url, self._bot_token, stream_tokens=self.limiter,
                                   events=StreamTokenLimiter(5), calls=StreamTokenLimiter(20))
        return self._api

    @property
    def start_phase(self) -> int:
        # An incoming call is the route's reason to exist: answer it first, then dial the rest
        # (as listen routes do); the caller's speech meanwhile waits in the route.
        return 0 if self.calls is not None else 1

    def describe(self) -> str:
        ch = "stereo" if self.stereo else "mono"
        if self.calls is not None:
            where = f"call {self.call.call_id} from {self.call.from_user_id}" if self.call else "incoming calls"
        else:
            where = f"channel {self.space_id}/{self.channel_id}"
        hearing = f", hearing {self.hear}" if self.hear else ""
        publishing = "" if self.publish else ", hear only"
        return f"{self.name} (dial {where}, opus {ch} {self.ptime_ms} ms{hearing}{publishing})"

    # -- run --------------------------------------------------------------------------------
    async def stream_token(self):
        """POST StreamToken through the bot's limiter; retries 429 after the window.

        Returns `StreamTokenGrant`; raises ServiceError naming the cause (400 not a voice
        channel, 403 not a member, 404 no such channel, 401 bad token) without the token.
        """
        return await self.api.stream_token(self.space_id, self.channel_id)

    async def run(self, emit: Emit, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._stopping = False
        self._call_ended = trio.Event()
        self.session_id = None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                if self.ingress is not None:
                    self.playout = OpusPlayout(2 if self.stereo else 1, concealment=self.concealment)
                    self._packets, packets = trio.open_memory_channel[tuple[bytes, float]](HEAR_QUEUE)
                    nursery.start_soon(self._play, packets, emit)
                if self.calls is not None:
                    await self._run_call(task_status)
                elif self.hear == FOLLOW:
                    await self._run_follow(task_status)
                else:
                    await self._run_fixed(task_status)
            finally:
                self.session = None
                await self._close_all()
                for session in list(self._closing):  # e.g. goodbye()'s: the reader has to see the reply
                    await session.closer.settle()
                if self._packets is not None:
                    self._packets.close()
                nursery.cancel_scope.cancel()

    async def _play(self, packets, emit: Emit) -> None:
        playout = self.playout
        assert playout is not None
        # play_out adds this session's concealments and FEC recoveries to `stats` (they add up
        # across reconnects, each with its own playout, and across the calls of a route)
        await play_out(packets, emit, playout, self.stats)

    async def _base(self) -> tuple[str, str]:
        """(ingressUrl, token) of the channel from StreamToken: the last grant while its token
        is good for more than TOKEN_RENEW_BEFORE_S (a reconnect), else a new one."""
        grant = self._grant
        if grant is None or not token_fresh(grant.token, TOKEN_RENEW_BEFORE_S):
            grant = self._grant = await self.stream_token()
        else:
            self.log.debug("reusing the stream token (valid for more than %d s)", TOKEN_RENEW_BEFORE_S)
        self._room = grant.room_name or f"{self.space_id}/{self.channel_id}"
        return grant.ingress_url, grant.token

    async def _run_fixed(self, task_status) -> None:
        base, token = await self._base()
        target = self.hear
        session = await self._open(base, token, target)
        await self._wait_ready(session)
        self.log.info("streaming into %s%s%s", self._room, f" (session {self.session_id})" if self.session_id else "",
                      f", hearing {target}" if target else "")
        task_status.started()
        while True:
            await session.ended.wait()
            if session.closing or self._stopping:
                return
            if session.path is AudioPath.SUBSCRIBE and session.target_left:
                # the server closes a subscribe session when its target leaves: wait for them again
                session = await self._open(base, token, target)
                continue
            raise ServiceError(f"Argon ingress {session.end}")

    async def _run_follow(self, task_status) -> None:
        api = self.api
        me = await api.me()
        events = EventsClient.shared(self.runtime, api, INTENT_VOICE)  # type: ignore[arg-type]
        unsubscribe = events.subscribe(lambda event: None)
        try:
            base, token = await self._base()
            target = self._follow_target(events, me.user_id)
            session = await self._open(base, token, target) if self.publish or target else None
            if session is not None:
                await self._wait_ready(session)
            self.log.info("in %s, following the channel: %s", self._room,
                          f"hearing {target}" if target else "nobody to hear yet")
            task_status.started()
            while True:
                if events.failure is not None:
                    raise events.failure
                if session is not None and session.ended.is_set() and not session.closing and not self._stopping:
                    if session.path is AudioPath.SUBSCRIBE and session.target_left:
                        session = None
                    else:
                        raise ServiceError(f"Argon ingress {session.end}")
                wanted = self._follow_target(events, me.user_id)
                if wanted is not None and (session is None or wanted != session.target):
                    self.log.info("following %s (was %s)", wanted, session.target if session else "nobody")
                    self.route_event("follow", target=wanted, previous=session.target if session else None)
                    old, session = session, await self._open(base, token, wanted)
                    if old is not None:
                        old.closing = True
                        self._nursery.start_soon(self._close_session, old)  # type: ignore[union-attr]
                with trio.CancelScope() as wait:
                    async with trio.open_nursery() as waiters:
                        async def wake(fn) -> None:
                            await fn()
                            wait.cancel()

                        waiters.start_soon(wake, events.wait_change)
                        if session is not None:
                            waiters.start_soon(wake, session.ended.wait)
        finally:
            unsubscribe()

    def _follow_target(self, events: EventsClient, me: str) -> str | None:
        """Who `hear: follow` hears: whoever of this channel joined most recently and is
        still there, not a bot, not ourselves; None when nobody is."""
        users: dict[str, ArgonUser] = events.present.get((self.space_id, self.channel_id), {})
        for user_id in reversed(list(users)):
            user = users[user_id]
            if user_id != me and not user.is_bot:
                return user_id
        return None

    async def _run_call(self, task_status) -> None:
        call = self.call
        if call is None:
            raise RuntimeError("calls: incoming: the call dispatcher gives each session its call")
        held = self._grant
        if isinstance(held, tuple) and held[0] == call.call_id and token_fresh(held[1].token, TOKEN_RENEW_BEFORE_S):
            grant = held[1]  # a reconnect of this call: Accept is once per call
        else:
            grant = await self.api.accept(call.call_id)
            self._grant = (call.call_id, grant)
        self._room = grant.room_name
        self.log.info("accepted call %s from %s", call.call_id, grant.caller_id or call.from_user_id)
        target = grant.caller_id or call.from_user_id
        session = await self._open(grant.audio_base_url, grant.token, target)
        await self._wait_ready(session)
        task_status.started()
        with trio.CancelScope() as wait:
            async with trio.open_nursery() as waiters:
                async def wake(fn) -> None:
                    await fn()
                    wait.cancel()

                waiters.start_soon(wake, session.ended.wait)
                waiters.start_soon(wake, session.left.wait)  # the caller left the call's room
                waiters.start_soon(wake, self._call_ended.wait)
        if self._call_ended.is_set():
            raise CallEnded("the caller hung up (callEnded)")
        if session.target_left:
            raise CallEnded("the caller left the call (target_left)")
        if session.closing or self._stopping:
            return
        raise ServiceError(f"Argon call audio {session.end}")

    def call_ended(self) -> None:
        """The dispatcher saw `callEnded` for this session's call."""
        self._call_ended.set()

    # -- sessions ---------------------------------------------------------------------------
    async def _open(self, base: str, token: str, target: str | None) -> _Session:
        """Open an audio session: connect (publish only), subscribe (hear only) or duplex."""
        if target is None:
            path = AudioPath.CONNECT
            url = build_ingress_url(base, self.ingress_path, IngressParams(
                token=token, stereo=self.stereo, frame_duration_ms=self.ptime_ms, track_name=self.track_name,
                track_source=self.track_source, metadata=self.metadata))
        else:
            path = AudioPath.DUPLEX if self.publish else AudioPath.SUBSCRIBE
            url = build_audio_url(
                base, path, token=token, stereo=self.stereo, frame_duration_ms=self.ptime_ms,
                track_name=self.track_name, track_source=self.track_source, metadata=self.metadata,
                target_identity=target,
                target_track_source=None if self.target_track_source == "any" else self.target_track_source)
        assert self._nursery is not None
        where = self.call.call_id if self.call else f"{self.space_id}/{self.channel_id}"
        try:
            ws = await dial(self._nursery, url, service=f"Argon {path.value} for {where}", rejected=INGRESS_REJECTED)
        except ServiceError as err:
            if err.status in (401, 403):
                self._grant = None  # the token is no good (expired, revoked): the next try asks anew
            raise
        self.stats.connects += 1
        session = _Session(ws, path, target)
        self.sessions.append(session)
        self._nursery.start_soon(self._read, session)
        if path.publishes:
            self.session = session
        return session

    async def _wait_ready(self, session: _Session) -> None:
        """Wait (at most `ready_wait`) for `ready` on a publishing session; streaming starts
        either way (an ingress without `ready`, or a slow one: the route keeps the audio)."""
        if session.path.publishes:
            with trio.move_on_after(self.ready_wait):
                await session.ready.wait()

    async def _read(self, session: _Session) -> None:
        ws = session.ws
        packets = self._packets
        try:
            while True:
                message = await ws.get_message()
                if isinstance(message, bytes):
                    self.stats.frames_in += 1
                    self.stats.bytes_in += len(message)
                    if packets is not None and session.path.hears:
                        try:
                            packets.send_nowait((message, trio.current_time()))
                        except trio.WouldBlock:
                            self.stats.dropped += 1
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass
                    continue
                self._on_status(session, message)
        except ConnectionClosed as closed:
            session.end = close_description(closed)
        finally:
            session.ended.set()
            if session in self.sessions:
                self.sessions.remove(session)
            if self.session is session:
                self.session = None

    def _on_status(self, session: _Session, text: str) -> None:
        try:
            status: StatusMessage = parse_status_message(text)
        except RemoteProtocolError as err:
            self.log.info("ingress says something else than a status (%s): %.120s", err, text)
            return
        kind = status.status
        fields = {k: v for k, v in (("participant", status.participant_identity), ("track_sid", status.track_sid),
                                    ("session_id", status.session_id)) if v}
        if kind == "ready":
            session.session_id = status.session_id
            if session is self.session:
                self.session_id = status.session_id
            session.ready.set()
        elif kind == "target_left":
            session.target_left = True
            session.left.set()
        elif kind == "error":
            self.log.warning("ingress error: %.200s", status.message or text)
            self.route_event("error", message=(status.message or "")[:200])
            return
        elif kind not in ("subscribed", "waiting"):
            self.log.info("ingress status %s: %.120s", kind, text)
        self.route_event(kind, **fields)

    async def _close_session(self, session: _Session) -> None:
        session.closing = True
        self._closing.append(session)
        try:
            await session.closer.close(session.ws, CloseCode.NORMAL, "stream ended")
        finally:
            self._closing.remove(session)

    async def _close_all(self) -> None:
        for session in list(self.sessions):
            session.closing = True
        with trio.move_on_after(2.0):
            async with trio.open_nursery() as nursery:
                for session in list(self.sessions):
                    nursery.start_soon(self._close_session, session)

    # -- egress: WsEndpoint.send() on the publishing session ----------------------------------
    async def goodbye(self) -> None:
        self._stopping = True
        for session in list(self.sessions):
            session.closing = True
        await self._close_all()


def _complexity(opts: Options) -> int | Literal["auto"]:
    """Option `complexity`: `auto` by default (DEFAULT_COMPLEXITY: by the encoder's input rate,
    `gateway.codecs.opus.auto_complexity`), or 0-10 (OPUS_SET_COMPLEXITY) at every rate."""
    value = opts.raw("complexity", "auto")
    if value == "auto":
        return "auto"
    if isinstance(value, str) and not value.strip().isdigit() and "${" not in value:
        raise opts.error("complexity", f"expected auto or an integer 0-10, got {value!r}")
    return opts.get_int("complexity", minimum=0, maximum=10)


def _opus_input_rate(opts: Options) -> int | None:
    """Option `opus_input_rate`: `auto` by default (None: from the sources, `opus_input_rate_for`;
    DEFAULT_OPUS_INPUT_RATE), or one of OPUS_INPUT_RATES (Hz), the rate the encoder of what is
    published takes (`48000`: everything resampled to 48 kHz and coded full band)."""
    choices = ("auto",) + tuple(str(r) for r in OPUS_INPUT_RATES)
    default = "auto" if DEFAULT_OPUS_INPUT_RATE is None else str(DEFAULT_OPUS_INPUT_RATE)
    value = opts.get_choice("opus_input_rate", choices, default)
    return None if value == "auto" else int(value)


# ------------------------------------------------------------------------------ calls in
class CallDesk:
    """The routes of one bot that answer calls, fed by one events stream (calls intent).

    For each `callIncoming`, the routes are asked in order (`offer`: the caller is in its
    `from:` list, if it has one, and it has a free session); the first that takes it gets the
    call, and if none does, the call is rejected with the reason. `callEnded` goes to the
    session holding the call."""

    def __init__(self, runtime: Runtime, api: BotApi) -> None:
        self.runtime = runtime
        self.api = api
        self.lines: list[CallLine] = []
        self._unsubscribe: Callable[[], None] | None = None

    @classmethod
    def shared(cls, runtime: Runtime, api: BotApi) -> CallDesk:
        return runtime.singleton(("argon-calls", api.api_url, hash(api.headers["Authorization"])), lambda: cls(runtime, api))

    @property
    def events(self) -> EventsClient:
        return EventsClient.shared(self.runtime, self.api, INTENT_CALLS)

    def add(self, line: CallLine) -> None:
        self.lines.append(line)
        if self._unsubscribe is None:
            self._unsubscribe = self.events.subscribe(self._on_event)

    def remove(self, line: CallLine) -> None:
        if line in self.lines:
            self.lines.remove(line)
        if not self.lines and self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def _on_event(self, event: Any) -> None:
        if isinstance(event, CallIncoming):
            reasons = []
            for line in self.lines:
                why = line.refusal(event)
                if why is None:
                    line.take(event)
                    return
                reasons.append(why)
            reason = "busy" if "busy" in reasons else "not accepted from this caller"
            log.info("Argon call %s from %s: rejecting (%s)", event.call_id, event.from_user_id, reason)
            assert self.runtime.nursery is not None
            self.runtime.nursery.start_soon(self._reject, event.call_id, reason)
        elif isinstance(event, CallEndedEvent):
            for line in self.lines:
                line.ended(event.call_id)

    async def _reject(self, call_id: str, reason: str) -> None:
        try:
            await self.api.reject(call_id, reason)
        except ServiceError as err:
            log.warning("Argon call %s: reject failed: %s", call_id, err)


class CallLine:
    """One route's place at the `CallDesk`: its `from:` filter and capacity, and the calls
    waiting for a session (`calls`, a memory channel the daemon's dispatcher reads)."""

    def __init__(self, endpoint: ArgonDial, active: Callable[[], int]) -> None:
        self.endpoint = endpoint
        self.active = active
        self.callers = set(endpoint.callers)
        self.max_calls = endpoint.max_calls
        self._send, self.calls = trio.open_memory_channel[CallIncoming](16)
        self.sessions: dict[str, ArgonDial] = {}
        """The endpoint of each running call session, by call id."""

    def refusal(self, call: CallIncoming) -> str | None:
        if self.callers and call.from_user_id not in self.callers:
            return "not accepted from this caller"
        if self.active() + self._send.statistics().current_buffer_used >= self.max_calls:
            return "busy"
        return None

    def take(self, call: CallIncoming) -> None:
        try:
            self._send.send_nowait(call)
        except trio.WouldBlock:  # refusal() counted the queue: cannot happen
            log.error("Argon call %s: call queue full", call.call_id)

    def ended(self, call_id: str) -> None:
        endpoint = self.sessions.get(call_id)
        if endpoint is not None:
            endpoint.call_ended()

    def close(self) -> None:
        self._send.close()


def incoming_endpoint(endpoints: Iterator[Endpoint] | list[Endpoint]) -> ArgonDial | None:
    """The `argon` endpoint with `calls: incoming` among a route's endpoints, if any."""
    return next((e for e in endpoints if isinstance(e, ArgonDial) and e.calls is not None), None)
