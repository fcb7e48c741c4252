"""Voice-agent SDK, dial and listen (spec: shared/protocols/003_300445899f8ad283.txt).

Both roles carry PCM16 LE, 16 kHz mono, 20 ms (640-byte) binary frames both ways after a
token handshake (framing and state machines in `wire.py`).

Dial (`AgentDial`): ``POST {api_url}/api/v1/sdk/token`` with ``Authorization: Bearer
<api_key>`` → ``{token, ws_url}`` (spec §1); WebSocket to ws_url, ``{"token"}`` first (§2);
``{"type":"connected"}`` within `connect_timeout_s` or a ServiceError naming the wait. The
agent's audio is text-to-speech that arrives in bursts, faster than real time: the endpoint
is `bursty`, so the route queues it (bounded by `burst_buffer_ms`, depth in
`stats.buffered_ms`) and plays it at real time without drops. ``agent_ready`` and ``error``
become route events; ``session_ended`` ends the endpoint cleanly with its reason.

Listen (`AgentListen`): the gateway as an agent service, so the spec's page (§5) works against
it with only `API_URL` / `API_KEY` changed. One token endpoint per process
(`AgentListenService`, on `server.http`, with CORS for `services.agent.cors_origins`) hands a
single-use session token (valid `TOKEN_TTL_S`) for a free listen endpoint whose API keys
include the caller's; the page opens ``ws_url`` (on `server.media`) and must send the token
within `TOKEN_TIMEOUT_S` (5 s), else it gets ``{"type":"error","code":"token_timeout"}`` and
close 1008. Then ``connected``; ``agent_ready`` once the route's other side is up; on stop
``session_ended`` with ``server_shutdown`` (``agent_disconnected`` when the other side hung up).
A client message ``{"type":"dtmf","digit":"5"}`` (a gateway extension; the spec has no DTMF
message) raises a ``dtmf`` route event with that digit (played into the route's phone call);
a digit that is not a DTMF key is logged and ignored; other unknown types stay ignored.

Free means: the endpoint's route is waiting for a client (`AgentListen.phase` "waiting": not
starting, not in a session or a handshake, not still ending the last session — a route plays
out what a bursty client queued before it ends — nor restarting) and no unused, unexpired
token is promised it. A token promises its endpoint until it is used, its handshake fails, or
it expires: its holder is served at once, and the ``?session=`` of its ws_url keeps anyone
else (a previous page reconnecting with its old URL) from taking that endpoint meanwhile
(409). When none is free the token request is refused: 503 with Retry-After and
``{"error": "no free agent session (… by cause); try again in N s", "retry_after": N,
"sessions": {"in_use": …, "promised": …, "ending": …, "starting": …}}``
(the spec says nothing about the token endpoint's errors; this follows RFC 9110 §15.6.4).
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable
from typing import Any

import attrs
import httpx
import trio
from trio_websocket import ConnectionClosed

from gateway.adapters.agent.wire import (
    TOKEN_PATH,
    TOKEN_TIMEOUT_S,
    AgentClient,
    AgentError,
    AgentReady,
    AgentServer,
    Audio,
    ClientDtmf,
    ClientState,
    ServerState,
    SessionEnded,
    TokenPresented,
    Unknown,
    error_message,
    parse_bearer,
    parse_token_response,
    token_request_headers,
    token_response,
    token_url,
)
from gateway.adapters.kit import post_with_retry
from gateway.adapters.listen import ListenService, ListenSlot, PendingSession, secret_in
from gateway.adapters.ws import (
    WebSocket,
    WsEndpoint,
    WsSession,
    close,
    close_description,
    dial,
    pcm_payload,
    refuse,
    send_quietly,
)
from gateway.adapters.wsclient import FramedWebSocket as WebSocketConnection
from gateway.codecs.dtmf import dtmf_key
from gateway.codecs.formats import PCM16_16K, AudioFrame
from gateway.config.options import Options
from gateway.endpoint import Emit, PcmIngress
from gateway.errors import (
    CallEnded,
    CloseCode,
    LocalProtocolError,
    RemoteProtocolError,
    ServiceError,
)
from gateway.runtime import Runtime
from gateway.server import HttpRequest, HttpResponse, MediaRequest

TOKEN_TTL_S = 60.0  # seconds a listen session token stays valid if unused
TOKEN_WAIT_S = 0.5  # seconds a token request waits for an endpoint about to be free (its route
# re-arming after a session or a failed handshake) before it is refused with 503
RETRY_AFTER_S = 5  # seconds a 503 asks the caller to wait (less when a promise expires sooner)
WS_PATH = "/api/v1/sdk/ws/{slot}"  # listen WebSocket path (the token response names it)
SESSION_PARAM = "session"  # query parameter of ws_url: which token's promise the upgrade claims
CORS_MAX_AGE_S = 600  # seconds a browser may cache our preflight answer

REJECTED = {
    401: ("session token rejected", False),
    403: ("session token rejected", False),
    404: ("no agent WebSocket at ws_url", True),
    409: ("the agent session already has a client", False),
}


class _AgentEndpoint(WsEndpoint[AudioFrame]):
    """What both roles share: PCM16 16 kHz mono, 20 ms, audio out through the state machine
    (`WsEndpoint.send`: the session is set while the state machine is connected)."""

    kind = "agent"
    ingress = PCM16_16K
    egress = PCM16_16K
    ptime_ms = 20
    _peer = "agent"  # who is on the other end, for reasons in logs

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._proto: AgentClient | AgentServer | None = None

    def _ws_session(self, ws: WebSocket, proto: AgentClient | AgentServer) -> WsSession[AudioFrame]:
        return WsSession(ws, payload=pcm_payload, wrap=proto.send_audio, peer=f"{self._peer} ")


class AgentDial(_AgentEndpoint):
    """The gateway as a client of a voice-agent service: the agent hears the route (PCM16
    16 kHz, 20 ms binary frames) and the route hears the agent (bursty TTS, played at real
    time). Raises ServiceError for a failed token call (401/403 permanent, 429 retried after
    Retry-After), a refused WebSocket, or no ``connected`` in time."""

    role = "dial"
    reconnects = True  # a mid-call failure reconnects this endpoint alone (Endpoint.reconnects_after)
    bursty = True

    def __init__(
        self,
        name: str,
        *,
        api_url: str,
        api_key: str,
        client: httpx.AsyncClient,
        connect_timeout_s: float = 10.0,
        bursty: bool = True,
        burst_buffer_ms: int = 60_000,
    ) -> None:
        super().__init__(name)
        self.api_url = api_url
        self._api_key = api_key
        self.client = client
        self.connect_timeout_s = connect_timeout_s
        self.bursty = bursty
        self.burst_buffer_ms = burst_buffer_ms
        self.agent_ready = False
        self.ended_reason: str | None = None

    @classmethod
    def from_config(cls, name: str, opts: Options, runtime: Runtime) -> AgentDial:
        service = runtime.config.services.agent
        api_key = opts.get_str("api_key", None, secret=True) or (service.api_key.reveal() if service.api_key else None)
        if not api_key:
            raise opts.error(None, "no agent API key: set services.agent.api_key (or api_key: on the endpoint)")
        api_url = opts.get_str("api_url", service.api_url)
        if not api_url:
            raise opts.error("api_url", "no agent API URL: set services.agent.api_url (or api_url: on the endpoint)")
        try:
            token_url(api_url)
            token_request_headers(api_key)
        except LocalProtocolError as err:
            raise opts.error("api_url" if "api_url" in str(err) else "api_key", str(err)) from None
        endpoint = cls(
            name,
            api_url=api_url.rstrip("/"),
            api_key=api_key,
            client=runtime.http_client(),
            connect_timeout_s=opts.get_float("connect_timeout_s", service.connect_timeout_s, minimum=0.1),
            bursty=opts.get_bool("bursty", True),
            burst_buffer_ms=opts.get_int("burst_buffer_ms", 60_000, minimum=200, maximum=600_000),
        )
        opts.finish()
        return endpoint

    def describe(self) -> str:
        return f"{self.name} (dial agent {self.api_url})"

    async def session_token(self):
        """POST the token call; returns `TokenGrant`. 429 and 5xx are retried per the kit's
        `RetryPolicy` (after the service's Retry-After, else backoff); other errors raise
        TokenRequestError (a ServiceError) naming the cause and status, never the key."""
        return await post_with_retry(
            self.client, token_url(self.api_url), headers=token_request_headers(self._api_key),
            parse=lambda status, body, retry_after_s: parse_token_response(
                status, body, api_url=self.api_url, retry_after_s=retry_after_s),
            what="voice agent token request", log=self.log)

    async def run(self, emit: Emit, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.agent_ready = False
        self.ended_reason = None
        grant = await self.session_token()
        proto = AgentClient(grant.token)
        session = self._ws_session(await dial(None, grant.ws_url, service="voice agent", rejected=REJECTED), proto)
        ws = session.ws
        try:
            await ws.send_message(proto.start())
            with trio.move_on_after(self.connect_timeout_s) as waiting:
                while proto.state is ClientState.AWAITING_CONNECTED:
                    for event in proto.receive(await ws.get_message()):
                        self._before_connected(event)
            if waiting.cancelled_caught:
                raise ServiceError(f"voice agent: no connected message within {self.connect_timeout_s:g} s of sending the token")
            self.stats.connects += 1
            self.session, self._proto = session, proto
            self.log.info("agent session connected")
            task_status.started()
            audio = PcmIngress(emit, 16000, self.stats)
            while True:
                for event in proto.receive(await ws.get_message()):
                    self._on_event(event, audio)
        except ConnectionClosed as closed:
            if session.closer.started:
                return
            if closed.reason is not None and closed.reason.code == CloseCode.NORMAL:
                raise CallEnded(f"agent {close_description(closed)}") from None
            raise ServiceError(f"voice agent {close_description(closed)}") from None
        except RemoteProtocolError as err:
            await session.refuse(err, self.log, "agent session")
            raise
        finally:
            self.session = self._proto = None
            await session.finish()

    def _before_connected(self, event: Any) -> None:
        """An event while waiting for ``connected``: an error or an ended session there means
        the service refused us (ServiceError, retried with backoff by the daemon)."""
        if isinstance(event, AgentError):
            raise ServiceError(f"voice agent refused the session: code={event.code} message={event.message}")
        if isinstance(event, SessionEnded):
            raise ServiceError(f"voice agent ended the session before connected ({event.reason or 'no reason given'})")
        if isinstance(event, Unknown):
            self.log.debug("ignoring agent control message of type %r", event.type)

    def _on_event(self, event: Any, audio: PcmIngress) -> None:
        """Handle one event of the connected session."""
        if isinstance(event, Audio):
            audio(event.pcm)
        elif isinstance(event, AgentReady):
            self.agent_ready = True
            self.route_event("agent_ready")
        elif isinstance(event, SessionEnded):
            self.ended_reason = event.reason or "no reason given"
            raise CallEnded(f"agent session_ended ({self.ended_reason})")
        elif isinstance(event, AgentError):
            self.log.warning("agent reported an error: code=%s message=%s", event.code, event.message)
            self.route_event("agent_error", code=event.code, message=event.message)
        elif isinstance(event, Unknown):
            self.log.debug("ignoring agent control message of type %r", event.type)

    async def goodbye(self) -> None:
        session = self.session
        if session is not None:
            await session.goodbye(reason="session over")


# ------------------------------------------------------------------------------ listen role
@attrs.define(eq=False)
class Grant:
    """An issued session token not used yet: its endpoint is promised to its holder."""

    token: str = attrs.field(repr=False)
    """The session token (single use; never logged)."""
    endpoint: AgentListen
    """The listen endpoint its ws_url points at."""
    expires: float
    """trio clock time after which the token is invalid and the promise void."""
    session: str = attrs.field(repr=False)
    """The ``?session=`` value of its ws_url: an upgrade carrying it may take the endpoint."""


def _same(a: str | None, b: str) -> bool:
    """Constant-time equality of a value the peer sent and one we issued."""
    return secret_in(a, (b,))


class AgentListenService(ListenService):
    """The agent-compatible token endpoint of one gateway process (spec §1), registered once
    per runtime on `server.http`: ``POST /api/v1/sdk/token`` and its CORS preflight
    ``OPTIONS``. Sessions go to the `agent` listen endpoints, first free one first (see the
    module doc: a free endpoint waits for a client and is promised to no unused token)."""

    kind = "agent"

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.endpoints: list[AgentListen] = []
        """The agent listen endpoints, in the order tokens are handed out for them."""
        self.next_slot = 1
        """Slot number of the next listen endpoint (never reused, so a reload that removes one
        cannot hand its path to another)."""
        self.grants: dict[str, Grant] = {}
        """Unused tokens by token; expired ones are dropped by the next token request."""
        self._change = trio.Event()  # set (and replaced) when an endpoint may have become free
        runtime.http.add("POST", TOKEN_PATH, self.token)
        runtime.http.add("OPTIONS", TOKEN_PATH, self.preflight)
        self.log = logging.getLogger("gateway.endpoint.agent")

    def add(self, endpoint: AgentListen) -> None:
        self.endpoints.append(endpoint)

    def remove(self, endpoint: AgentListen) -> None:
        if endpoint in self.endpoints:
            self.endpoints.remove(endpoint)

    @property
    def origins(self) -> tuple[str, ...]:
        """services.agent.cors_origins of the running config (a reload applies at once)."""
        return self.settings.cors_origins

    def _cors(self, request: HttpRequest) -> tuple[tuple[str, str], ...] | None:
        """CORS headers for the request's Origin (Fetch standard §3.2), () when it sent none
        (not a browser), None when the origin is not allowed."""
        origin = request.headers.get("origin")
        if origin is None:
            return ()
        if "*" in self.origins:
            allowed = "*"
        elif origin in self.origins:
            allowed = origin
        else:
            return None
        return (("access-control-allow-origin", allowed), ("vary", "Origin"))

    async def preflight(self, request: HttpRequest) -> HttpResponse:
        cors = self._cors(request)
        if not cors:
            return HttpResponse.json(403, {"error": "origin not allowed (services.agent.cors_origins)"})
        headers = cors + (
            ("access-control-allow-methods", "POST, OPTIONS"),
            ("access-control-allow-headers", "Authorization, Content-Type"),
            ("access-control-max-age", str(CORS_MAX_AGE_S)),
        )
        return HttpResponse(204, b"", "text/plain", headers)

    async def token(self, request: HttpRequest) -> HttpResponse:
        cors = self._cors(request)
        if cors is None:
            return HttpResponse.json(403, {"error": "origin not allowed (services.agent.cors_origins)"})
        key = parse_bearer(request.headers.get("authorization"))
        if key is None:
            return HttpResponse.json(401, {"error": "expected Authorization: Bearer <api key>"}, cors)
        if not any(e.accepts_key(key) for e in self.endpoints):
            self.log.info("agent token: refused %s: API key rejected", request.headers.get("origin", "a client"))
            return HttpResponse.json(401, {"error": "API key rejected"}, cors)
        # A free endpoint now, or within TOKEN_WAIT_S (a route re-arming after a session, a
        # handshake that just failed, a promise about to expire); else 503 naming the cause.
        deadline = trio.current_time() + TOKEN_WAIT_S
        while True:
            now = trio.current_time()
            self._expire(now)
            candidates = [e for e in self.endpoints if e.accepts_key(key)]
            promised = {id(g.endpoint) for g in self.grants.values()}
            endpoint = next((e for e in candidates if e.phase == "waiting" and id(e) not in promised), None)
            if endpoint is not None or now >= deadline:
                break
            with trio.move_on_at(min([deadline] + [g.expires for g in self.grants.values()])):
                await self._change.wait()
        if endpoint is None:
            return self._refuse(candidates, now, cors)
        grant = Grant(secrets.token_urlsafe(32), endpoint, now + TOKEN_TTL_S, secrets.token_urlsafe(16))
        self.grants[grant.token] = grant
        ws_url = f"{self.runtime.media_url()}{endpoint.ws_path}?{SESSION_PARAM}={grant.session}"
        self.log.debug("agent token: %s promised for %g s", endpoint.ws_path, TOKEN_TTL_S)
        return HttpResponse(200, token_response(grant.token, ws_url), "application/json", cors)

    def _refuse(self, candidates: list[AgentListen], now: float, cors: tuple[tuple[str, str], ...]) -> HttpResponse:
        """503: no endpoint free. Counts the candidates by cause; Retry-After is RETRY_AFTER_S,
        or less when a promise expires sooner (its endpoint is free then)."""
        promises = {id(g.endpoint): g.expires for g in self.grants.values()}
        counts = {"in_use": 0, "promised": 0, "ending": 0, "starting": 0}
        for e in candidates:
            if e.busy:
                counts["in_use"] += 1
            elif id(e) in promises:
                counts["promised"] += 1
            elif e.phase == "ending":
                counts["ending"] += 1
            else:
                counts["starting"] += 1
        retry = RETRY_AFTER_S
        expiries = [promises[id(e)] for e in candidates if id(e) in promises]
        if expiries:
            retry = max(1, min(retry, math.ceil(min(expiries) - now)))
        labels = {"in_use": "in use", "promised": "promised to a client that has not connected yet",
                  "ending": "ending its previous session", "starting": "not started yet"}
        causes = ", ".join(f"{n} {labels[k]}" for k, n in counts.items() if n) or "no agent listen endpoint running"
        message = f"no free agent session ({causes}); try again in {retry} s"
        self.log.info("agent token: refused: %s", message)
        headers = cors + (("retry-after", str(retry)),)
        if cors:  # a page may read why, and when to ask again (Retry-After is not CORS-safelisted)
            headers += (("access-control-expose-headers", "Retry-After"),)
        return HttpResponse.json(503, {"error": message, "retry_after": retry, "sessions": counts}, headers)

    def _expire(self, now: float) -> None:
        for token, grant in list(self.grants.items()):
            if grant.expires <= now:
                del self.grants[token]

    def changed(self) -> None:
        """An endpoint may have become free (it waits for a client again, a promise ended):
        wake the token requests waiting for one."""
        self._change.set()
        self._change = trio.Event()

    def promise_of(self, endpoint: AgentListen) -> Grant | None:
        """The unused, unexpired token promised `endpoint`, if any."""
        now = trio.current_time()
        return next((g for g in self.grants.values() if g.endpoint is endpoint and g.expires > now), None)

    def release(self, grant: Grant) -> None:
        """End a promise (its handshake failed: a ws_url is single use, like its token)."""
        if self.grants.get(grant.token) is grant:
            del self.grants[grant.token]
            self.changed()

    def redeem(self, token: str, endpoint: AgentListen, grant: Grant | None = None) -> bool:
        """True if `token` was issued for `endpoint` and is unexpired; single use. `grant` is
        the promise the connection claimed with its ``?session=`` (released whatever the
        outcome)."""
        now = trio.current_time()
        matched = None
        for issued in list(self.grants):
            if _same(token, issued):
                matched = self.grants.pop(issued)
                break
        if grant is not None:
            self.grants.pop(grant.token, None)
        if matched is not None or grant is not None:
            self.changed()
        return matched is not None and matched.endpoint is endpoint and matched.expires > now


class AgentListen(_AgentEndpoint):
    """An agent-compatible session server for one client at a time (a browser page, an SDK).

    The client's audio is bursty by default too: the spec's page captures its microphone with
    a 4096-sample ScriptProcessor, so 256 ms of audio (12.8 frames) arrive at once, four times
    a second; as live audio with a 20 ms jitter allowance ~14 % of it would be concealed and
    dropped. Queued, it plays whole at real time (`bursty: false` for clients that stream
    20 ms at a time and want the lowest latency).
    """

    role = "listen"
    _peer = "client"
    _proto: AgentServer | None

    def __init__(self, name: str, *, service: AgentListenService, slot_id: int, api_keys: tuple[str, ...],
                 bursty: bool = True) -> None:
        super().__init__(name)
        self.service = service
        self.slot_id = slot_id
        self._keys = api_keys
        self.bursty = bursty
        self.ws_path = WS_PATH.format(slot=slot_id)
        self._slot: ListenSlot[Grant | None] = ListenSlot(f"agent session {slot_id}")
        self._unregister: Callable[[], None] | None = None
        self._route_up: trio.Event | None = None
        self._announced = False  # agent_ready sent in this session
        self.phase = "starting"
        """Where the endpoint is, for the token endpoint: "starting" (its route has not run it
        yet), "waiting" (for a client: the only phase in which it is handed out), "connecting"
        (a client's upgrade claimed it; handshake), "in use" (a session), "ending" (the session
        is over but the route is still playing out what the client sent, saying goodbye or
        restarting; also after a stop)."""

    @classmethod
    def from_config(cls, name: str, opts: Options, runtime: Runtime) -> AgentListen:
        service = AgentListenService.for_runtime(runtime)
        keys = tuple(k.reveal() for k in opts.get_secrets("api_keys", runtime.config.services.agent.listen_api_keys))
        if not keys:
            raise opts.error(None, "no API keys for the listen token endpoint: set services.agent.listen_api_keys "
                             "(or services.agent.api_key, or api_keys: on the endpoint)")
        endpoint = cls(name, service=service, slot_id=service.next_slot, api_keys=keys,
                       bursty=opts.get_bool("bursty", True))
        opts.finish()
        service.next_slot += 1
        service.add(endpoint)
        endpoint._unregister = runtime.media.add(endpoint.ws_path, endpoint._on_upgrade)
        return endpoint

    def detach(self) -> None:
        if self._unregister:
            self._unregister()
            self._unregister = None
        self.service.remove(self)

    @property
    def busy(self) -> bool:
        """A client holds it (handshake or session)."""
        return self.phase in ("connecting", "in use")

    def accepts_key(self, key: str) -> bool:
        return secret_in(key, self._keys)

    def describe(self) -> str:
        return f"{self.name} (listen agent session at {self.ws_path})"

    async def _on_upgrade(self, request: MediaRequest) -> None:
        """An upgrade to our path (in the media server's handler task). While a token is
        promised this endpoint only the upgrade carrying its ``?session=`` may take it; others
        get 409 at once. An upgrade that would have to wait for the route (starting, ending) is
        refused with 503, so it can never take the endpoint from under a promise made later."""
        slot = f"agent session {self.slot_id}"
        grant = self.service.promise_of(self)
        if grant is not None and not _same(request.query.get(SESSION_PARAM), grant.session):
            self.log.info("client %s refused (409): %s is promised to another client's token", request.remote, slot)
            await request.reject(409, f"{slot} is promised to another client (an unused session token); "
                                 "fetch a token of your own")
            return
        if self.busy:
            await request.reject(409, f"{slot} already has a connected client")
            return
        if self.phase == "waiting":
            self.phase = "connecting"  # claimed: no token is handed out for it during the handshake
        elif grant is None:
            await request.reject(503, f"{slot} is not ready (its route is {self.phase}); fetch a new token")
            return
        await self._slot.offer(request, grant)

    def on_route_up(self) -> None:
        if self._route_up is not None:
            self._route_up.set()

    async def _before_first_audio(self, session: WsSession[AudioFrame], frame: AudioFrame) -> AudioFrame:
        """`session.interleave` until agent_ready is out: it goes before the route's first
        audio whichever task runs first (spec: connected, agent_ready, then audio)."""
        proto, up = self._proto, self._route_up
        if proto is not None and up is not None and up.is_set():
            await self._announce(session.ws, proto)
        if self._announced:
            session.interleave = None
        return frame

    async def _handshake(self, session: PendingSession) -> tuple[WebSocketConnection, AgentServer] | None:
        """Accept the upgrade, wait for the token (5 s), check it, send ``connected``.
        Returns None (after an error message and close 1008) when the client fails."""
        ws = await session.accept()
        proto = AgentServer()
        remote = session.request.remote
        try:
            with trio.move_on_after(TOKEN_TIMEOUT_S) as waiting:
                events = proto.receive(await ws.get_message())
            if waiting.cancelled_caught:
                self.log.info("client %s sent no token within %g s: closing (1008)", remote, TOKEN_TIMEOUT_S)
                await send_quietly(ws, error_message("token_timeout", f"no token message within {TOKEN_TIMEOUT_S:g} s"))
                await close(ws, CloseCode.POLICY_VIOLATION, "token timeout")
                return None
        except RemoteProtocolError as err:
            await refuse(ws, err, self.log, f"session of client {remote}", error_message("protocol_error", str(err)))
            return None
        except ConnectionClosed:
            self.log.info("client %s closed before sending its token", remote)
            return None
        presented = events[0]
        assert isinstance(presented, TokenPresented)
        if not self.service.redeem(presented.token, self, session.context):
            self.log.info("client %s: session token rejected: closing (1008)", remote)
            await send_quietly(ws, error_message("invalid_token", "session token rejected (unknown, used or expired)"))
            await close(ws, CloseCode.POLICY_VIOLATION, "invalid token")
            return None
        await ws.send_message(proto.accept())
        return ws, proto

    async def run(self, emit: Emit, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._session(emit, task_status)
        finally:
            # not free until the route runs this again: it may still be playing out what the
            # client sent (a bursty client's queue), saying goodbye, restarting or stopped
            self.phase = "ending"

    async def _session(self, emit: Emit, task_status) -> None:
        while True:  # a client that fails the handshake does not take the route down
            self.phase = "waiting"
            self.service.changed()
            session = await self._slot.take()
            self.phase = "connecting"
            try:
                shook = await self._handshake(session)
            except ConnectionClosed:
                shook = None
            if shook is None:
                if session.context is not None:
                    self.service.release(session.context)
                session.finished.set()
                continue
            break
        ws, proto = shook
        self.phase = "in use"
        route_up = self._route_up = trio.Event()
        self._announced = False
        self.stats.connects += 1
        self.log.info("client %s connected", session.request.remote)
        ws_session = self._ws_session(ws, proto)
        ws_session.interleave = self._before_first_audio
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._announce_ready, ws, proto, route_up)
                self.session, self._proto = ws_session, proto
                task_status.started()
                await self._stream(ws, proto, emit)
        finally:
            self.session = self._proto = None
            await ws_session.finish(CloseCode.NORMAL, "session ended")
            session.finished.set()

    async def _announce_ready(self, ws: WebSocketConnection, proto: AgentServer, route_up: trio.Event) -> None:
        await route_up.wait()
        await self._announce(ws, proto)

    async def _announce(self, ws: WebSocket, proto: AgentServer) -> None:
        """agent_ready, once per session (from `_announce_ready` or the first `send`)."""
        if self._announced or proto.state is not ServerState.CONNECTED:
            return
        self._announced = True
        await send_quietly(ws, proto.agent_ready())

    async def _stream(self, ws: WebSocketConnection, proto: AgentServer, emit: Emit) -> None:
        audio = PcmIngress(emit, 16000, self.stats)
        while True:
            try:
                message = await ws.get_message()
            except ConnectionClosed as closed:
                raise CallEnded(f"client {close_description(closed)}") from None
            try:
                events = proto.receive(message)
            except RemoteProtocolError as err:
                await refuse(ws, err, self.log, "client session", error_message("protocol_error", str(err)))
                raise
            for event in events:
                if isinstance(event, Audio):
                    audio(event.pcm)
                elif isinstance(event, ClientDtmf):  # gateway extension: {"type":"dtmf","digit":"5"}
                    if (key := dtmf_key(event.digit)) is not None:
                        self.route_event("dtmf", digit=key)
                    else:
                        self.log.warning("ignoring the client's dtmf message: digit %r is not a DTMF key "
                                         "(0-9, *, #, A-D)", (event.digit or "")[:20])
                elif isinstance(event, Unknown):
                    self.log.debug("ignoring client control message of type %r", event.type)

    async def goodbye(self) -> None:
        session, proto = self.session, self._proto
        if session is None or proto is None:
            return
        self.session = None  # no audio after session_ended (the state machine refuses it)
        farewell = None
        if proto.state is not ServerState.ENDED:
            farewell = proto.session_ended("server_shutdown" if self.route_stopping else "agent_disconnected")
        await session.goodbye(farewell, reason="session ended", timeout=1.0)

