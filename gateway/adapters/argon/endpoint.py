"""Argon bot voice ingress, dial and listen (spec: shared/protocols/000_1537bbe3858d175f.txt,
"Voice Streaming"; 001_bf359231651c17d3.txt for `Authorization: Bot <token>`).

Dial: `POST {api_url}/IVoice/v1/StreamToken` → `{token, ingressUrl, roomName}`, then a
WebSocket to `{ingressUrl}{ingress_path}?token=…&stereo=…&frame_duration_ms=…&track_name=…
&track_source=…&metadata=…` carrying one Opus packet (48 kHz, 10/20/40/60 ms) per binary
message. StreamToken allows 5 calls a minute per bot: one `StreamTokenLimiter` per bot spaces
the calls of every route, and a 429 is retried after the window.

Listen: the same REST call and ingress served by the gateway (HS256 stream tokens for the
room `{spaceId}/{channelId}`, 2 h TTL, checked on connect; `/audio/connect` and the bare
path; `{"status":"ready","session_id":…}` on accept; each packet's TOC validated per RFC 6716
§3.1, a malformed one closes the connection with 1007 and the reason).
"""

from __future__ import annotations

import collections
import hmac
import json
import secrets
import time
import uuid

import httpx
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from gateway.adapters.argon.wire import (
    ERROR_CONTENT_TYPE,
    STREAM_TOKEN_PATH,
    IngressParams,
    TokenError,
    build_ingress_url,
    error_body,
    issue_stream_token,
    parse_ingress_target,
    parse_retry_after,
    parse_stream_token_response,
    stream_token_request,
    stream_token_response,
    validate_opus_packet,
    verify_stream_token,
)
from gateway.adapters.listen import ListenSlot
from gateway.adapters.ws import Closing, close, close_description, dial, refuse
from gateway.codecs.formats import OPUS_48K, OPUS_48K_STEREO, VALID_PTIMES_MS, EncodedFrame
from gateway.config.options import Options
from gateway.endpoint import Emit, Endpoint
from gateway.errors import CallEnded, RemoteProtocolError, ServiceError
from gateway.runtime import Runtime
from gateway.server import HttpRequest, HttpResponse, MediaRequest

RATE_WINDOW = 60.0  # seconds: StreamToken allows `per_minute` calls per bot in this window
MAX_RATE_RETRIES = 20  # 429s retried for one StreamToken call before giving up
DEFAULT_COMPLEXITY = 5  # libopus 0-10: 5 costs ~1/4 of the CPU of 10 at nearly the same speech quality
READY_WAIT = 1.0  # seconds to wait for {"status":"ready"} before streaming anyway

INGRESS_REJECTED = {
    400: ("bad ingress parameters", True),
    401: ("stream token rejected (bad or expired token)", False),
    403: ("stream token not valid for this channel", False),
    404: ("no such voice channel at the ingress", True),
    409: ("the channel already has a stream from this bot", False),
}


class StreamTokenLimiter:
    """Spaces StreamToken calls: at most `per_window` in any `window` seconds, FIFO.

    One per bot token (by fingerprint) and API, shared by every route of that bot. Reads the
    trio clock only, so MockClock tests control it.
    """

    def __init__(self, per_window: int, window: float = RATE_WINDOW) -> None:
        self.per_window = per_window
        self.window = window
        self._calls: collections.deque[float] = collections.deque()
        self._blocked_until = 0.0
        self._lock = trio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = trio.current_time()
                while self._calls and self._calls[0] <= now - self.window:
                    self._calls.popleft()
                wake = self._blocked_until
                if len(self._calls) >= self.per_window:
                    wake = max(wake, self._calls[0] + self.window)
                if wake <= now:
                    self._calls.append(now)
                    return
                await trio.sleep_until(wake)

    def back_off(self, seconds: float) -> None:
        """The server said 429: no call for `seconds`."""
        self._blocked_until = max(self._blocked_until, trio.current_time() + seconds)


class ArgonDial(Endpoint):
    """Streams the route's audio into an Argon voice channel as a bot (sink only: Argon's
    ingress takes audio; hearing a channel needs verified-bot egress, not offered here)."""

    kind = "argon"
    role = "dial"
    ingress = None

    def __init__(
        self,
        name: str,
        *,
        api_url: str,
        bot_token: str,
        limiter: StreamTokenLimiter,
        client: httpx.AsyncClient,
        space_id: str,
        channel_id: str,
        stereo: bool = False,
        frame_duration_ms: int = 20,
        track_name: str = "",
        track_source: str = "",
        metadata: str = "",
        ingress_path: str = "/audio/connect",
        ready_wait: float = READY_WAIT,
        bitrate: int | None = None,
        complexity: int = DEFAULT_COMPLEXITY,
    ) -> None:
        super().__init__(name)
        self.api_url = api_url
        self._bot_token = bot_token
        self.limiter = limiter
        self.client = client
        self.space_id = space_id
        self.channel_id = channel_id
        self.stereo = stereo
        self.egress = OPUS_48K_STEREO if stereo else OPUS_48K
        self.ptime_ms = frame_duration_ms
        self.track_name = track_name
        self.track_source = track_source
        self.metadata = metadata
        self.ingress_path = ingress_path
        self.ready_wait = ready_wait
        self.encoder_options = {"opus_bitrate": bitrate, "opus_complexity": complexity}
        self._ws: WebSocketConnection | None = None
        self._closing = Closing()
        self.session_id: str | None = None

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
        per_minute = service.stream_token_per_minute
        limiter = runtime.singleton(("argon-limiter", api_url, hash(bot_token)), lambda: StreamTokenLimiter(per_minute))
        endpoint = cls(
            name,
            api_url=api_url,
            bot_token=bot_token,
            limiter=limiter,
            client=runtime.http_client(),
            space_id=opts.get_str("space_id", allow_empty=False),
            channel_id=opts.get_str("channel_id", allow_empty=False),
            stereo=stereo,
            frame_duration_ms=opts.get_int("frame_duration_ms", 20, choices=VALID_PTIMES_MS),
            track_name=opts.get_str("track_name", ""),
            track_source=opts.get_str("track_source", ""),
            metadata=opts.get_str("metadata", ""),
            ingress_path=opts.get_str("ingress_path", service.ingress_path),
            ready_wait=opts.get_int("ready_wait_ms", int(READY_WAIT * 1000), minimum=0) / 1000,
            bitrate=opts.get_int("bitrate", None, minimum=6000, maximum=510000),
            complexity=opts.get_int("complexity", DEFAULT_COMPLEXITY, minimum=0, maximum=10),
        )
        opts.finish()
        return endpoint

    def describe(self) -> str:
        ch = "stereo" if self.stereo else "mono"
        return f"{self.name} (dial channel {self.space_id}/{self.channel_id}, opus {ch} {self.ptime_ms} ms)"

    async def stream_token(self):
        """POST StreamToken through the bot's limiter; retries 429 after the window.

        Returns `StreamTokenGrant`; raises ServiceError naming the cause (400 not a voice
        channel, 403 not a member, 404 no such channel, 401 bad token) without the token.
        """
        url = f"{self.api_url}{STREAM_TOKEN_PATH}"
        body = stream_token_request(self.space_id, self.channel_id)
        headers = {"Authorization": f"Bot {self._bot_token}", "Content-Type": "application/json"}
        for attempt in range(MAX_RATE_RETRIES + 1):
            await self.limiter.acquire()
            try:
                response = await self.client.post(url, json=body, headers=headers)
            except httpx.HTTPError as err:
                raise ServiceError(f"Argon StreamToken: cannot reach {url}: {err.__class__.__name__}") from None
            try:
                return parse_stream_token_response(
                    response.status_code, response.content, space_id=self.space_id, channel_id=self.channel_id,
                    retry_after_s=parse_retry_after(response.headers.get("retry-after")),
                )
            except ServiceError as err:
                if err.status != 429 or attempt == MAX_RATE_RETRIES:
                    raise
                retry_after = getattr(err, "retry_after", None) or RATE_WINDOW
                self.log.warning("StreamToken rate limited; retrying in %.0f s", retry_after)
                self.limiter.back_off(retry_after)
        raise AssertionError("unreachable")

    async def run(self, emit: Emit, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._closing = Closing()
        grant = await self.stream_token()
        params = IngressParams(
            token=grant.token,
            stereo=self.stereo,
            frame_duration_ms=self.ptime_ms,
            track_name=self.track_name,
            track_source=self.track_source,
            metadata=self.metadata,
        )
        url = build_ingress_url(grant.ingress_url, self.ingress_path, params)
        async with trio.open_nursery() as nursery:
            ws = await dial(nursery, url, service=f"Argon ingress for {self.space_id}/{self.channel_id}", rejected=INGRESS_REJECTED)
            self.stats.connects += 1
            try:
                first = None
                with trio.move_on_after(self.ready_wait):
                    first = await ws.get_message()
                self._on_message(first)
                self._ws = ws
                self.log.info("streaming into %s%s", grant.room_name or f"{self.space_id}/{self.channel_id}",
                              f" (session {self.session_id})" if self.session_id else "")
                task_status.started()
                while True:
                    self._on_message(await ws.get_message())
            except ConnectionClosed as closed:
                if self._closing.started:
                    return
                raise ServiceError(f"Argon ingress {close_description(closed)}") from None
            finally:
                self._ws = None
                await self._closing.settle()
                await close(ws, 1000)
                nursery.cancel_scope.cancel()

    def _on_message(self, message: str | bytes | None) -> None:
        if message is None or isinstance(message, bytes):
            return
        try:
            data = json.loads(message)
        except ValueError:
            self.log.info("ingress says: %.200s", message)
            return
        if isinstance(data, dict) and data.get("status") == "ready":
            self.session_id = str(data.get("session_id") or "") or None
        elif isinstance(data, dict) and (data.get("error") or data.get("status") == "error"):
            self.log.warning("ingress error: %.200s", message)

    async def send(self, frame: EncodedFrame) -> None:
        ws = self._ws
        if ws is None:
            self.stats.dropped += 1
            return
        try:
            await ws.send_message(frame.payload)
        except ConnectionClosed as closed:
            raise ServiceError(f"Argon ingress {close_description(closed)}") from None
        self.stats.frames_out += 1
        self.stats.bytes_out += len(frame.payload)

    async def goodbye(self) -> None:
        ws = self._ws
        if ws is not None:
            await self._closing.close(ws, 1000, "stream ended")


# ------------------------------------------------------------------------------ listen role
class ArgonListenService:
    """The Argon-compatible StreamToken endpoint and ingress of one gateway process.

    Registered once per runtime on `server.http` (`/api/bot/IVoice/v1/StreamToken` and
    `/IVoice/v1/StreamToken`) and `server.media` (`/audio/connect` and `/`). Channels are the
    `argon` endpoints with `role: listen`.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._random_secret = secrets.token_urlsafe(32)
        self.channels: dict[tuple[str, str], ArgonListen] = {}
        self._calls: dict[int, collections.deque[float]] = {}
        for prefix in ("/api/bot", ""):
            runtime.http.add("POST", prefix + STREAM_TOKEN_PATH, self.stream_token)
        runtime.media.add("/audio/connect", self.ingress)
        runtime.media.add("/", self.ingress)
        self.log = ArgonListen.log_for()

    # Settings are read from the running config on each request, so a reload applies at once.
    @property
    def secret(self) -> str:
        """HS256 key of the stream tokens: services.argon.jwt_secret, else random per process."""
        service = self.runtime.config.services.argon
        return service.jwt_secret.reveal() if service.jwt_secret else self._random_secret

    @property
    def bot_tokens(self) -> tuple[str, ...]:
        return tuple(t.reveal() for t in self.runtime.config.services.argon.listen_bot_tokens)

    @property
    def per_minute(self) -> int:
        return self.runtime.config.services.argon.stream_token_per_minute

    def _reply(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> HttpResponse:
        return HttpResponse(status, error_body(status, message), ERROR_CONTENT_TYPE, headers)

    async def stream_token(self, request: HttpRequest) -> HttpResponse:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme != "Bot" or not token:
            return self._reply(401, "expected Authorization: Bot <token>")
        index = next((i for i, t in enumerate(self.bot_tokens) if hmac.compare_digest(t.encode(), token.encode())), None)
        if index is None:
            return self._reply(401, "bot token rejected")
        calls = self._calls.setdefault(index, collections.deque())
        now = trio.current_time()
        while calls and calls[0] <= now - RATE_WINDOW:
            calls.popleft()
        if len(calls) >= self.per_minute:
            retry = max(1, int(calls[0] + RATE_WINDOW - now + 0.999))
            return self._reply(429, f"rate limited: {self.per_minute} StreamToken calls per minute", (("retry-after", str(retry)),))
        calls.append(now)
        try:
            body = request.json()
            space_id, channel_id = body["spaceId"], body["channelId"]
            if not isinstance(space_id, str) or not isinstance(channel_id, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return self._reply(400, "expected a JSON body {spaceId, channelId} of strings")
        if not any(space == space_id for space, _ in self.channels):
            return self._reply(403, "bot is not a member of the space")
        if (space_id, channel_id) not in self.channels:
            return self._reply(404, "no such channel")
        jwt = issue_stream_token(self.secret, space_id=space_id, channel_id=channel_id, identity=f"bot-{index}", now=time.time())
        room = f"{space_id}/{channel_id}"
        return HttpResponse(200, stream_token_response(jwt, self.runtime.media_url(), room))

    async def ingress(self, request: MediaRequest) -> None:
        try:
            _, params = parse_ingress_target(request.request.path)
        except RemoteProtocolError as err:
            await request.reject(401 if err.close_code == 1008 else 400, str(err))
            return
        except ValueError as err:
            await request.reject(400, str(err))
            return
        try:
            grant = verify_stream_token(self.secret, params.token, now=time.time())
        except TokenError as err:
            self.log.info("argon ingress: refused %s: %s", request.remote, err)
            await request.reject(401, str(err))
            return
        endpoint = self.channels.get((grant.space_id, grant.channel_id))
        if endpoint is None:
            await request.reject(404, f"no voice channel {grant.room} at this ingress")
            return
        await endpoint._slot.offer(request, params)


class ArgonListen(Endpoint):
    """An Argon-compatible voice channel: bots stream Opus into it (source only)."""

    kind = "argon"
    role = "listen"
    egress = None

    @classmethod
    def log_for(cls):
        import logging

        return logging.getLogger("gateway.endpoint.argon")

    def __init__(self, name: str, *, service: ArgonListenService, space_id: str, channel_id: str, stereo: bool = False) -> None:
        super().__init__(name)
        self.service = service
        self.space_id = space_id
        self.channel_id = channel_id
        self.ingress = OPUS_48K_STEREO if stereo else OPUS_48K
        self._slot = ListenSlot(f"Argon channel {space_id}/{channel_id}")
        self.session_id: str | None = None
        self.params: IngressParams | None = None

    @classmethod
    def from_config(cls, name: str, opts: Options, runtime: Runtime) -> ArgonListen:
        service = runtime.singleton(ArgonListenService, lambda: ArgonListenService(runtime))
        space_id = opts.get_str("space_id", allow_empty=False)
        channel_id = opts.get_str("channel_id", allow_empty=False)
        if (space_id, channel_id) in service.channels:
            raise opts.error("channel_id", f"channel {space_id}/{channel_id} already has a listen endpoint")
        endpoint = cls(name, service=service, space_id=space_id, channel_id=channel_id, stereo=opts.get_bool("stereo", False))
        opts.finish()
        service.channels[(space_id, channel_id)] = endpoint
        return endpoint

    def detach(self) -> None:
        self.service.channels.pop((self.space_id, self.channel_id), None)

    def describe(self) -> str:
        return f"{self.name} (listen channel {self.space_id}/{self.channel_id})"

    async def run(self, emit: Emit, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        session = await self._slot.take()
        params: IngressParams = session.context
        try:
            ws = await session.accept()
            self.params = params
            self.session_id = uuid.uuid4().hex
            await ws.send_message(json.dumps({"status": "ready", "session_id": self.session_id}))
            self.stats.connects += 1
            self.log.info("bot stream from %s (%s, %d ms, track %r)", session.request.remote,
                "stereo" if params.stereo else "mono", params.frame_duration_ms, params.track_name,
            )
            task_status.started()
            channels = 2 if params.stereo else 1
            fmt = OPUS_48K_STEREO if params.stereo else OPUS_48K
            samples = 48 * params.frame_duration_ms
            timestamp = 0
            stats = self.stats
            while True:
                try:
                    message = await ws.get_message()
                except ConnectionClosed as closed:
                    raise CallEnded(f"bot {close_description(closed)}") from None
                try:
                    if isinstance(message, str):
                        raise RemoteProtocolError("text message on the audio ingress: send Opus packets as binary", close_code=1003)
                    validate_opus_packet(message, channels=channels, frame_duration_ms=params.frame_duration_ms)
                except RemoteProtocolError as err:
                    await refuse(ws, err, self.log, "bot stream")
                    raise
                stats.frames_in += 1
                stats.bytes_in += len(message)
                emit(EncodedFrame(message, fmt, samples, timestamp))
                timestamp += samples
        finally:
            if session.ws is not None:
                await close(session.ws, 1000)
            session.finished.set()
