"""Every refusal of shared/protocols/argon-voice-ws.md, on both sides, over real loopback sockets.

- Listen side: our Argon listen role (tests/harness.start with an `argon` listen route) answers
  as Argon's own server does: the exact HTTP status before the upgrade, a plain-text body naming
  the cause and no secret in it; Argon's JSON error body `{"error", "message"}` on the bot REST
  API; pings every 30 s, a 60 s pong deadline, the 60 s idle limit of /audio/connect (virtual
  time: pytest-trio's `mock_clock`).
- Dial side: our `argon` dial endpoint, pointed at a stub Argon written here (`StubArgon`: a
  small `HttpServer` and a trio-websocket server), names each refusal's cause in words, with
  its status, whether retrying can help, and no token in the message, the log or the repr;
  statuses with the older key `type` become route events; a malformed events-stream line is
  logged and skipped; a 429 on the events stream waits and resumes from the last event id; a
  caller's `target_left` ends the call session cleanly.
"""

from __future__ import annotations

import collections
import json
import logging
import time
import urllib.parse
from typing import Any, Callable

import httpx
import jwt
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from gateway.adapters.argon.dial import (
    INGRESS_REJECTED,
    ArgonDial,
    BotApi,
    EventsClient,
    StreamTokenLimiter,
)
from gateway.adapters.argon.events_hub import encode_sse
from gateway.adapters.argon.listen import ArgonListenService
from gateway.adapters.argon.sse import SseParser, parse_argon_event
from gateway.adapters.argon.wire import INTENT_CALLS, INTENT_VOICE, issue_room_token
from gateway.config import GatewayConfig
from gateway.errors import ServiceError
from gateway.runtime import Runtime
from gateway.server import HttpRequest, HttpResponse, HttpServer, serve_http, serve_media
from harness import BOT_TOKEN, JWT_SECRET, SECRETS, start
from test_argon_errors import run_dial
from voice_clients import Caller

SPACE = "550e8400-e29b-41d4-a716-446655440000"
CHANNEL = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
ROOM = f"{SPACE}/{CHANNEL}"
BOT_USER = "5b0e3f5e-6a3b-4c8e-9d55-0f2d9a1c7e11"  # the bot's user GUID: its identity in rooms
OTHER_BOT_USER = "9d1c2b3a-0000-4000-8000-00000000b0b2"
OTHER_BOT_TOKEN = "bot2-SECRET-c0ffee11"
ALICE = "a11ce000-0000-4000-8000-000000000001"
BOB = "b0b00000-0000-4000-8000-000000000002"
CALLER = "ca11e700-0000-4000-8000-000000000007"
STREAM_JWT = "stream-SECRET-eyJhbGciOiJIUzI1NiJ9.e30.c2lnbmF0dXJlLW9mLXRoZS1zdHViIQ"  # a stub's room token
ALL_SECRETS = (*SECRETS, OTHER_BOT_TOKEN, STREAM_JWT)
OPUS_20MS = b"\xf8\xff\xfe"  # 20 ms CELT silence (the reference bot's filler packet)

BOTS = (', listen_bots: [{token: "%s", user_id: %s, username: desk_bot}, {token: "%s", user_id: %s, '
        'username: other_bot}]' % (BOT_TOKEN, BOT_USER, OTHER_BOT_TOKEN, OTHER_BOT_USER))

CHANNEL_ROUTE = """\
routes:
  - name: channel
    endpoints:
      - argon: {role: listen, space_id: %s, channel_id: %s}
      - record: {path: "$out/channel.wav"}
""" % (SPACE, CHANNEL)

CALL_ROUTE = """\
routes:
  - name: app-user              # an Argon user calling the bot (a VoIPBIN client stands in for the app)
    endpoints:
      - voipbin: {role: listen, name: user, identity: %s, call_id: user-7}
      - argon: {role: listen, call: %s}
""" % (CALLER, BOT_USER)


# ------------------------------------------------------------------------------------ helpers
def assert_no_secret(*texts: str, also: tuple[str, ...] = ()) -> None:
    for text in texts:
        for secret in (*ALL_SECRETS, *also):
            assert secret not in text, f"a secret leaked into: {text[:200]!r}"


async def until(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    """Wait until `condition()` is true (a state the code under test reaches on its own). Real
    time only: under `mock_clock` the polling would hold the clock back (wait for events)."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


def room_token(*, room: str = ROOM, identity: str = BOT_USER, secret: str = JWT_SECRET, issuer: str = "gateway",
               now: float | None = None, ttl_s: int = 3600) -> str:
    return issue_room_token(secret, room=room, identity=identity, name="desk_bot", now=time.time() if now is None else now,
                            ttl_s=ttl_s, issuer=issuer)


def raw_token(**claims: Any) -> str:
    """A room JWT signed with the listen role's secret, with exactly `claims`."""
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def grant(room: str = ROOM) -> dict[str, Any]:
    return {"room": room, "roomJoin": True, "canPublish": True, "canSubscribe": True}


EOF = "EOF"  # RawWs.next(): the server dropped TCP (no close frame)


class Refusal:
    """An HTTP answer instead of the upgrade."""

    def __init__(self, status: int, headers: dict[bytes, bytes], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


class RawWs:
    """A bare WebSocket client (wsproto over a trio TCP stream) that shows everything the server
    does: the HTTP refusal with its headers and body, each ping (answered only when
    `answer_pings`), a close frame, or TCP dropped without one (`EOF`)."""

    def __init__(self, stream: trio.SocketStream, answer_pings: bool, timeout: float) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.answer_pings = answer_pings
        self.timeout = timeout
        """Seconds (trio clock) each read waits before the test fails."""
        self.pings: list[float] = []
        """trio time of each ping received."""
        self._events: collections.deque = collections.deque()
        self._text = ""
        self._bytes = b""

    @classmethod
    async def open(cls, port: int, target: str, headers: list[tuple[bytes, bytes]] | None = None, *,
                   answer_pings: bool = True, timeout: float = 10.0) -> RawWs | Refusal:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        client = cls(stream, answer_pings, timeout)
        await client._send(Request(host=f"127.0.0.1:{port}", target=target, extra_headers=headers or []))
        first = await client._event()
        if isinstance(first, AcceptConnection):
            return client
        assert isinstance(first, RejectConnection), first
        body = b""
        while first.has_body:
            data = await client._event()
            assert isinstance(data, RejectData), data
            body += data.data
            if data.body_finished:
                break
        await stream.aclose()
        return Refusal(first.status_code, {k.lower(): v for k, v in first.headers}, body)

    async def _send(self, event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def _event(self):
        while not self._events:
            try:
                with trio.fail_after(self.timeout):
                    data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                return EOF
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, Ping):
                    self.pings.append(trio.current_time())
                    if self.answer_pings and self.ws.state is ConnectionState.OPEN:
                        await self._send(event.response())
                    continue
                if isinstance(event, CloseConnection) and self.ws.state is ConnectionState.REMOTE_CLOSING:
                    await self._send(event.response())  # answer the server's close frame, as clients do
                self._events.append(event)
        return self._events.popleft()

    async def next(self):
        """The next whole message (str or bytes), a `CloseConnection`, or `EOF`."""
        while True:
            event = await self._event()
            if isinstance(event, TextMessage):
                self._text += event.data
                if event.message_finished:
                    text, self._text = self._text, ""
                    return text
            elif isinstance(event, BytesMessage):
                self._bytes += event.data
                if event.message_finished:
                    data, self._bytes = self._bytes, b""
                    return data
            else:
                return event

    async def status(self) -> dict[str, Any]:
        message = await self.next()
        assert isinstance(message, str), message
        return json.loads(message)

    async def send(self, message: str | bytes) -> None:
        await self._send(TextMessage(data=message) if isinstance(message, str) else BytesMessage(data=message))

    async def close(self, code: int = 1000) -> None:
        await self._send(CloseConnection(code=code, reason="bye"))

    async def aclose(self) -> None:
        await self.stream.aclose()


def audio_target(path: str = "/audio/connect", token: str | None = None, **query: str) -> str:
    params = ({"token": token} if token is not None else {}) | query
    return f"{path}?{urllib.parse.urlencode(params)}" if params else path


async def open_audio(gateway, target: str, headers=None, **kwargs) -> RawWs | Refusal:
    return await RawWs.open(gateway.runtime.media.port, target, headers, **kwargs)


async def channel_gateway(nursery: trio.Nursery, tmp_path, argon_extra: str = ""):
    gateway = await start(nursery, CHANNEL_ROUTE, argon_extra=argon_extra, out=tmp_path)
    service = gateway.runtime.shared[ArgonListenService]
    await until(lambda: ROOM in service.rooms)  # the route's listen endpoint opened its room
    return gateway


def assert_plain_refusal(answer: RawWs | Refusal, status: int, cause: str, *secrets: str) -> None:
    assert isinstance(answer, Refusal), "the upgrade was accepted"
    assert answer.status == status, (answer.status, answer.body)
    assert answer.headers[b"content-type"].startswith(b"text/plain"), answer.headers
    assert cause in answer.text, answer.text
    assert_no_secret(answer.text, also=secrets)


# ================================================================== listen side: audio paths
def _bad_tokens() -> dict[str, tuple[str, int, str]]:
    now = time.time()
    return {
        "unparseable": ("not-a-jwt", 401, "room token malformed: not a JWT"),
        "wrong issuer": (room_token(issuer="APIsomeoneelse"), 403, "room token issuer is not accepted"),
        "bad signature": (room_token(secret="another-secret-of-32-bytes-or-more!!"), 403,
                          "room token signature does not verify"),
        "expired": (room_token(now=now - 3600 - 90), 403, "room token expired"),  # 90 s ago; leeway ~60 s
        "no room grant": (raw_token(iss="gateway", sub=BOT_USER, nbf=int(now), exp=int(now) + 600,
                                    video={"roomJoin": True}), 403, "room token has no room grant"),
        "no identity": (raw_token(iss="gateway", nbf=int(now), exp=int(now) + 600, video=grant()), 403,
                        "room token has no identity"),
    }


@pytest.mark.parametrize("case", list(_bad_tokens()))
@pytest.mark.parametrize("path", ["/audio/connect", "/audio/subscribe", "/audio/duplex"])
async def test_listen_refuses_a_bad_token_before_the_upgrade(tmp_path, caplog, case, path):
    caplog.set_level(logging.DEBUG)
    token, status, cause = _bad_tokens()[case]
    async with trio.open_nursery() as nursery:
        gateway = await channel_gateway(nursery, tmp_path)
        answer = await open_audio(gateway, audio_target(path, token, target_identity=ALICE))
        nursery.cancel_scope.cancel()
    assert_plain_refusal(answer, status, cause, token)
    assert_no_secret(caplog.text, also=(token,))


@pytest.mark.parametrize("path", ["/audio/connect", "/audio/subscribe", "/audio/duplex", "/"])
async def test_listen_refuses_a_missing_token_with_401(tmp_path, path):
    async with trio.open_nursery() as nursery:
        gateway = await channel_gateway(nursery, tmp_path)
        answer = await open_audio(gateway, audio_target(path, target_identity=ALICE))
        # a `Bot …` header is not read: still no token
        as_bot = await open_audio(gateway, audio_target(path, target_identity=ALICE),
                                  [(b"authorization", f"Bot {room_token()}".encode())])
        nursery.cancel_scope.cancel()
    assert_plain_refusal(answer, 401, "missing authorization token")
    assert_plain_refusal(as_bot, 401, "missing authorization token")


async def test_listen_accepts_an_expired_token_within_the_leeway(tmp_path):
    """exp 20 s ago is within Argon's ~1 min leeway; 90 s ago is not (see above)."""
    async with trio.open_nursery() as nursery:
        gateway = await channel_gateway(nursery, tmp_path)
        ws = await open_audio(gateway, audio_target(token=room_token(now=time.time() - 3600 - 20)))
        assert isinstance(ws, RawWs), (ws.status, ws.text)
        assert (await ws.status())["status"] == "ready"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("path", ["/audio/subscribe", "/audio/duplex"])
async def test_listen_refuses_hearing_without_target_identity_with_400(tmp_path, path):
    async with trio.open_nursery() as nursery:
        gateway = await channel_gateway(nursery, tmp_path)
        token = room_token()
        answer = await open_audio(gateway, audio_target(path, token))
        empty = await open_audio(gateway, audio_target(path, token, target_identity=""))
        nursery.cancel_scope.cancel()
    assert_plain_refusal(answer, 400, "missing target_identity parameter", token)
    assert_plain_refusal(empty, 400, "missing target_identity parameter", token)


async def test_listen_checks_the_token_before_target_identity(tmp_path):
    """The server verifies the token first: a bad token without a target is 401/403, not 400."""
    async with trio.open_nursery() as nursery:
        gateway = await channel_gateway(nursery, tmp_path)
        unparseable = await open_audio(gateway, audio_target("/audio/duplex", "not-a-jwt"))
        forged = await open_audio(gateway, audio_target("/audio/subscribe", room_token(secret="x" * 32)))
        nursery.cancel_scope.cancel()
    assert_plain_refusal(unparseable, 401, "room token malformed")
    assert_plain_refusal(forged, 403, "signature does not verify")


async def test_listen_answers_404_for_an_unknown_path_and_serves_the_bare_path_as_connect(tmp_path):
    async with trio.open_nursery() as nursery:
        gateway = await channel_gateway(nursery, tmp_path)
        token = room_token()
        unknown = await open_audio(gateway, audio_target("/audio/publish", token))
        bare = await open_audio(gateway, audio_target("/", token))  # the seed's bare ingressUrl
        assert isinstance(bare, RawWs), (bare.status, bare.text)
        ready = await bare.status()
        assert ready["status"] == "ready" and ready["session_id"].startswith("AWS_")
        await bare.send(OPUS_20MS)  # it publishes: the channel's route hears it
        channel = gateway.routes["channel"].route.endpoints[0]
        await until(lambda: channel.stats.frames_in == 1)
        nursery.cancel_scope.cancel()
    # 404 before the upgrade, naming the path. The body is the shared media server's JSON
    # ({"error": "no listen endpoint at …"}), not Argon's plain "404 page not found": a path no
    # listen endpoint registered never reaches the Argon listen role (gateway/server.py).
    assert isinstance(unknown, Refusal) and unknown.status == 404
    assert "no listen endpoint at /audio/publish" in unknown.text, unknown.text
    assert_no_secret(unknown.text, also=(token,))


async def test_listen_answers_404_for_a_room_it_does_not_serve(tmp_path):
    async with trio.open_nursery() as nursery:
        gateway = await channel_gateway(nursery, tmp_path)
        token = room_token(room=f"{SPACE}/00000000-0000-0000-0000-000000000000")
        answer = await open_audio(gateway, audio_target("/audio/connect", token))
        nursery.cancel_scope.cancel()
    assert_plain_refusal(answer, 404, f"no room {SPACE}/00000000-0000-0000-0000-000000000000 here", token)


async def test_listen_answers_503_over_max_sessions(tmp_path):
    async with trio.open_nursery() as nursery:
        gateway = await channel_gateway(nursery, tmp_path, argon_extra=", max_sessions: 1")
        first = await open_audio(gateway, audio_target(token=room_token()))
        assert isinstance(first, RawWs)
        assert (await first.status())["status"] == "ready"
        second = await open_audio(gateway, audio_target("/audio/subscribe", room_token(identity="listener"),
                                                        target_identity=BOT_USER))
        await first.close()  # the first leaves: a session is free again
        assert isinstance(await first.next(), CloseConnection)
        service = gateway.runtime.shared[ArgonListenService]
        await until(lambda: service._sessions == 0)
        third = await open_audio(gateway, audio_target(token=room_token()))
        assert isinstance(third, RawWs)
        nursery.cancel_scope.cancel()
    assert_plain_refusal(second, 503, "max audio WS sessions reached")


@pytest.mark.parametrize("where", ["bearer", "query"])
async def test_listen_reads_the_token_from_bearer_or_the_query(tmp_path, where):
    async with trio.open_nursery() as nursery:
        gateway = await channel_gateway(nursery, tmp_path)
        token = room_token()
        if where == "bearer":
            ws = await open_audio(gateway, "/audio/connect", [(b"authorization", f"Bearer {token}".encode())])
        else:
            ws = await open_audio(gateway, audio_target(token=token))
        assert isinstance(ws, RawWs), (ws.status, ws.text)
        assert (await ws.status())["status"] == "ready"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("kind", ["binary", "text"])
async def test_listen_closes_subscribe_with_1009_over_1_kib(tmp_path, kind):
    async with trio.open_nursery() as nursery:
        gateway = await channel_gateway(nursery, tmp_path)
        ws = await open_audio(gateway, audio_target("/audio/subscribe", room_token(), target_identity=ALICE))
        assert isinstance(ws, RawWs)
        assert (await ws.status()) == {"status": "waiting", "session_id": ws_session(gateway), "participant_identity": ALICE}
        await ws.send(b"x" * 1024 if kind == "binary" else "x" * 1024)  # 1 KiB: read and ignored
        await ws.send(b"x" * 1025 if kind == "binary" else "x" * 1025)
        closed = await ws.next()
        room = gateway.runtime.shared[ArgonListenService].rooms[ROOM]
        await until(lambda: not room.sessions)  # the session ended (then the servers may stop)
        nursery.cancel_scope.cancel()
    assert isinstance(closed, CloseConnection) and closed.code == 1009, closed


def ws_session(gateway) -> str:
    """The session id of the only bot session in the channel."""
    [session] = gateway.runtime.shared[ArgonListenService].rooms[ROOM].sessions.values()
    return session.session_id


async def test_listen_ignores_text_frames_and_the_session_goes_on(tmp_path):
    async with trio.open_nursery() as nursery:
        gateway = await channel_gateway(nursery, tmp_path)
        ws = await open_audio(gateway, audio_target(token=room_token()))
        assert isinstance(ws, RawWs)
        assert (await ws.status())["status"] == "ready"
        channel = gateway.routes["channel"].route.endpoints[0]
        await ws.send('{"status":"hello"}')
        await ws.send("not even JSON")
        await ws.send(OPUS_20MS)
        await until(lambda: channel.stats.frames_in == 1)
        await ws.send(OPUS_20MS)
        await until(lambda: channel.stats.frames_in == 2)
        await ws.close()
        closed = await ws.next()  # the server answers a client's close frame
        nursery.cancel_scope.cancel()
    assert isinstance(closed, CloseConnection) and closed.code == 1000


# ==================================================================== listen side: bot REST
def bot(token: str = BOT_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bot {token}"}


def api_client(gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.runtime.http.port}",
                             timeout=httpx.Timeout(10.0, read=None))


def assert_api_error(response: httpx.Response, status: int, code: str) -> None:
    """Argon's bot API error: the status, `{"error": code, "message": text}` as JSON, no secret."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "message"} and body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"]
    assert_no_secret(response.text)
    if status == 429:
        assert 1 <= int(response.headers["retry-after"]) <= 60


class ArgonEvents:
    """Reads the typed Argon events off an events-stream response (the project's SSE parser)."""

    def __init__(self, response: httpx.Response) -> None:
        self._chunks = response.aiter_bytes()
        self._parser = SseParser()
        self._ready: collections.deque = collections.deque()

    async def next(self):
        while not self._ready:
            for item in self._parser.feed(await self._chunks.__anext__()):
                if hasattr(item, "event"):
                    self._ready.append(parse_argon_event(item))
        return self._ready.popleft()


@pytest.mark.parametrize("prefix", ["", "/api/bot"])
async def test_listen_stream_token_refusals(tmp_path, prefix):
    path = prefix + "/IVoice/v1/StreamToken"
    async with trio.open_nursery() as nursery:
        gateway = await channel_gateway(nursery, tmp_path, argon_extra=", stream_token_per_minute: 4")
        async with api_client(gateway) as client:
            body = {"spaceId": SPACE, "channelId": CHANNEL}
            assert_api_error(await client.post(path, json=body), 401, "unauthorized")
            assert_api_error(await client.post(path, json=body, headers=bot("not-" + BOT_TOKEN)), 401, "unauthorized")
            assert_api_error(await client.post(path, json=body, headers={"Authorization": f"Bearer {BOT_TOKEN}"}),
                             401, "unauthorized")  # the bot API reads `Bot …` only
            assert_api_error(await client.post(path, content=b"{nope", headers=bot()), 400, "bad_request")
            assert_api_error(await client.post(path, json={"spaceId": "x", "channelId": CHANNEL}, headers=bot()),
                             403, "not_a_member")
            assert_api_error(await client.post(path, json={"spaceId": SPACE, "channelId": "y"}, headers=bot()),
                             404, "channel_not_found")
            ok = await client.post(path, json=body, headers=bot())  # the 4th counted call this minute
            assert ok.status_code == 200 and set(ok.json()) == {"token", "ingressUrl", "roomName"}
            assert_api_error(await client.post(path, json=body, headers=bot()), 429, "rate_limited")
        nursery.cancel_scope.cancel()


async def test_listen_calls_accept_and_reject_refusals(tmp_path):
    """A user calls bot A: Accept/Reject answer 401 without a bot token, 403 for another bot's
    call, 404 for no such call, 400 for a bad body, and 409 once the call was answered."""
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, CALL_ROUTE, argon_extra=BOTS)
        async with api_client(gateway) as client, \
                client.stream("GET", "/IEvents/v1/Stream", params={"intents": INTENT_CALLS}, headers=bot()) as stream:
            assert stream.status_code == 200
            events = ArgonEvents(stream)
            assert type(await events.next()).__name__ == "Ready"
            await Caller(gateway, "user-7").connect(nursery)  # the user calls: bot A is rung
            with trio.fail_after(10):
                ringing = await events.next()
            assert type(ringing).__name__ == "CallIncoming" and ringing.from_user_id == CALLER
            call = {"callId": ringing.call_id}
            for verb in ("Accept", "Reject"):
                path = f"/ICalls/v20260401/{verb}"
                assert_api_error(await client.post(path, json=call), 401, "unauthorized")
                assert_api_error(await client.post(path, json=call, headers={"Authorization": f"Bearer {BOT_TOKEN}"}),
                                 401, "unauthorized")
                assert_api_error(await client.post(path, json=call, headers=bot(OTHER_BOT_TOKEN)), 403, "not_callee")
                assert_api_error(await client.post(path, json={"callId": "no-such-call"}, headers=bot()), 404,
                                 "call_not_found")
                assert_api_error(await client.post(path, json={"call": 1}, headers=bot()), 400, "bad_request")
            accepted = await client.post("/ICalls/v20260401/Accept", json=call, headers=bot())
            assert accepted.status_code == 200, accepted.text
            assert set(accepted.json()) == {"token", "roomName", "callerId", "audioBaseUrl"}
            assert accepted.json()["callerId"] == CALLER
            assert_api_error(await client.post("/ICalls/v20260401/Accept", json=call, headers=bot()), 409,
                             "call_already_answered")
            assert_api_error(await client.post("/ICalls/v20260401/Reject", json=call, headers=bot()), 409,
                             "call_already_answered")
        nursery.cancel_scope.cancel()


async def test_listen_get_me_refuses_a_wrong_bot_token(tmp_path):
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, CALL_ROUTE, argon_extra=BOTS)
        async with api_client(gateway) as client:
            for prefix in ("", "/api/bot"):
                path = prefix + "/IBotSelf/v1/GetMe"
                assert_api_error(await client.get(path), 401, "unauthorized")
                assert_api_error(await client.get(path, headers=bot("not-" + BOT_TOKEN)), 401, "unauthorized")
                assert_api_error(await client.get(path, headers={"Authorization": f"Bearer {BOT_TOKEN}"}), 401,
                                 "unauthorized")
                me = await client.get(path, headers=bot(OTHER_BOT_TOKEN))
                assert me.status_code == 200 and me.json()["userId"] == OTHER_BOT_USER
                assert me.json()["username"] == "other_bot"
        nursery.cancel_scope.cancel()


async def test_listen_events_stream_refuses_a_wrong_token_and_a_sixth_connect_a_minute(tmp_path):
    async with trio.open_nursery() as nursery:
        gateway = await channel_gateway(nursery, tmp_path)
        async with api_client(gateway) as client:
            path = "/IEvents/v1/Stream"
            assert_api_error(await client.get(path, params={"intents": INTENT_VOICE}), 401, "unauthorized")
            assert_api_error(await client.get(path, params={"intents": INTENT_VOICE}, headers=bot("x" + BOT_TOKEN)),
                             401, "unauthorized")
            for _ in range(5):  # `events_per_minute`: 5, as Argon
                async with client.stream("GET", path, params={"intents": INTENT_VOICE}, headers=bot()) as stream:
                    assert stream.status_code == 200
                    assert type(await ArgonEvents(stream).next()).__name__ == "Ready"
            assert_api_error(await client.get(path, params={"intents": INTENT_VOICE}, headers=bot()), 429,
                             "rate_limited")
        nursery.cancel_scope.cancel()


async def test_listen_calls_are_rate_limited_with_retry_after(tmp_path):
    async with trio.open_nursery() as nursery:
        gateway = await channel_gateway(nursery, tmp_path, argon_extra=", calls_per_minute: 1")
        async with api_client(gateway) as client:
            assert_api_error(await client.post("/ICalls/v20260401/Reject", json={"callId": "c"}, headers=bot()), 404,
                             "call_not_found")
            assert_api_error(await client.post("/ICalls/v20260401/Accept", json={"callId": "c"}, headers=bot()), 429,
                             "rate_limited")
        nursery.cancel_scope.cancel()


# ============================================================ listen side: keepalive and idle
# Virtual time over real loopback: the clock jumps only when every task has waited 0.2 s of
# real time. These tests serve the listen role's audio paths alone (no route: a route's pacers
# would keep the clock from jumping), exactly the handler the daemon registers.
async def serve_audio_paths(nursery: trio.Nursery) -> int:
    config = GatewayConfig.from_text('server: {media: "127.0.0.1:0"}\nservices:\n  argon: {jwt_secret: "%s"}\n'
                                     % JWT_SECRET, "test.yaml")
    runtime = Runtime(config)
    service = ArgonListenService(runtime)
    service.channel_room(SPACE, CHANNEL)
    return await nursery.start(serve_media, runtime.media, "127.0.0.1", 0)


async def open_session(port: int, path: str, identity: str = BOT_USER, **kwargs) -> RawWs:
    query = {"target_identity": ALICE} if path != "/audio/connect" else {}
    ws = await RawWs.open(port, audio_target(path, room_token(identity=identity), **query), timeout=1000, **kwargs)
    assert isinstance(ws, RawWs), (ws.status, ws.text)
    return ws


async def test_listen_pings_every_30_s(mock_clock):
    mock_clock.autojump_threshold = 0.2
    async with trio.open_nursery() as nursery:
        port = await serve_audio_paths(nursery)
        ws = await open_session(port, "/audio/duplex")
        t0 = trio.current_time()
        assert (await ws.status())["status"] == "ready"
        with trio.move_on_at(t0 + 100):
            message = await ws.next()
            raise AssertionError(f"the server sent {message!r}")
        nursery.cancel_scope.cancel()
    assert [round(at - t0) for at in ws.pings] == [30, 60, 90], ws.pings


async def test_listen_drops_a_client_that_never_answers_pings_without_a_close_frame(mock_clock, caplog):
    mock_clock.autojump_threshold = 0.2
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        port = await serve_audio_paths(nursery)
        ws = await open_session(port, "/audio/duplex", answer_pings=False)
        t0 = trio.current_time()
        assert (await ws.status())["status"] == "ready"
        end = await ws.next()  # a close frame would come here first
        dropped_after = trio.current_time() - t0
        nursery.cancel_scope.cancel()
    assert end == EOF
    assert 60 <= dropped_after < 61, dropped_after  # the read deadline: 60 s, moved only by a pong
    assert [round(at - t0) for at in ws.pings] == [30]
    assert "missed its pong" in caplog.text


async def test_listen_ends_an_idle_connect_session_after_60_s_without_a_close_frame(mock_clock, caplog):
    """/audio/connect: 60 s without a packet end the session (the first packet too); each
    packet moves the deadline. Pings are answered throughout: the idle limit is the cause."""
    mock_clock.autojump_threshold = 0.2
    caplog.set_level(logging.INFO)
    ended: dict[str, float] = {}

    async def publisher(port: int, identity: str, packet_at: float | None) -> None:
        ws = await open_session(port, "/audio/connect", identity=identity)
        assert (await ws.status())["status"] == "ready"
        if packet_at is not None:
            await trio.sleep_until(t0 + packet_at)
            await ws.send(OPUS_20MS)
        assert await ws.next() == EOF  # no close frame
        ended[identity] = trio.current_time() - t0

    async with trio.open_nursery() as nursery:
        port = await serve_audio_paths(nursery)
        t0 = trio.current_time()
        async with trio.open_nursery() as bots:
            bots.start_soon(publisher, port, "silent-bot", None)
            bots.start_soon(publisher, port, "talking-bot", 40.0)
        nursery.cancel_scope.cancel()
    assert 60 <= ended["silent-bot"] < 61, ended
    assert 100 <= ended["talking-bot"] < 101, ended
    assert caplog.text.count("sent no packet for 60 s on /audio/connect") == 2


async def test_listen_keeps_a_silent_duplex_session(mock_clock):
    """/audio/duplex has no idle limit: a bot that sends nothing for minutes (but answers
    pings) stays; it leaves with a close frame, which the server answers."""
    mock_clock.autojump_threshold = 0.2
    async with trio.open_nursery() as nursery:
        port = await serve_audio_paths(nursery)
        ws = await open_session(port, "/audio/duplex")
        t0 = trio.current_time()
        assert (await ws.status())["status"] == "ready"
        with trio.move_on_at(t0 + 150):
            message = await ws.next()
            raise AssertionError(f"the server sent {message!r} or dropped the session")
        await ws.close()
        closed = await ws.next()
        nursery.cancel_scope.cancel()
    assert isinstance(closed, CloseConnection) and closed.code == 1000
    assert len(ws.pings) >= 4


# ================================================================ dial side: a stub Argon
class StubArgon:
    """Argon as one test wants it to answer, on loopback: the bot REST API and the events stream
    on a small `HttpServer`, the audio paths on a trio-websocket server. Every request and
    upgrade is recorded; each answer is a handler the test may replace (`route`, `on_audio`)."""

    def __init__(self) -> None:
        self.app = HttpServer()
        self.requests: list[HttpRequest] = []
        self.upgrades: list[dict[str, Any]] = []
        """Each audio upgrade: path, query, and (once known) how the client closed."""
        self.http_port = self.ws_port = 0
        self.on_audio: Callable[[WebSocketRequest, dict[str, Any]], Any] = self.serve_audio
        self._answers: dict[tuple[str, str], Callable[[HttpRequest], HttpResponse]] = {}
        self.route("POST", "/IVoice/v1/StreamToken", lambda request: HttpResponse.json(
            200, {"token": STREAM_JWT, "ingressUrl": self.ws_url, "roomName": ROOM}))
        self.route("GET", "/IBotSelf/v1/GetMe", lambda request: HttpResponse.json(
            200, {"botId": BOT_USER, "userId": BOT_USER, "username": "desk_bot", "displayName": "Desk"}))

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}"

    def route(self, method: str, path: str, answer: Callable[[HttpRequest], HttpResponse]) -> None:
        """Answer `method path` with `answer(request)` from now on."""
        key = (method, path)
        if key not in self._answers:
            async def handler(request: HttpRequest) -> HttpResponse:
                self.requests.append(request)
                return self._answers[key](request)

            self.app.add(method, path, handler)
        self._answers[key] = answer

    def hits(self, path: str) -> list[HttpRequest]:
        return [r for r in self.requests if r.path == path]

    async def start(self, nursery: trio.Nursery) -> StubArgon:
        self.http_port = await nursery.start(serve_http, self.app, "127.0.0.1", 0)
        server = await nursery.start(serve_websocket, self._audio, "127.0.0.1", 0, None)
        self.ws_port = server.port
        return self

    async def _audio(self, request: WebSocketRequest) -> None:
        parts = urllib.parse.urlsplit(request.path)
        upgrade = {"path": parts.path, "query": dict(urllib.parse.parse_qsl(parts.query)), "closed": None}
        self.upgrades.append(upgrade)
        await self.on_audio(request, upgrade)

    async def serve_audio(self, request: WebSocketRequest, upgrade: dict[str, Any]) -> None:
        """Accept; send `ready` on a publishing path; read until the client closes."""
        ws = await request.accept()
        if upgrade["path"] != "/audio/subscribe":
            await ws.send_message(json.dumps({"status": "ready", "session_id": f"AWS_{len(self.upgrades)}"}))
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed as closed:
            upgrade["closed"] = closed.reason.code


def text_refusal(status: int, body: str):
    async def refuse(request: WebSocketRequest, upgrade: dict[str, Any]) -> None:
        await request.reject(status, extra_headers=[(b"content-type", b"text/plain; charset=utf-8")], body=body.encode())
    return refuse


def hand_dial(stub: StubArgon, **options: Any) -> ArgonDial:
    return ArgonDial("argon", api_url=stub.api_url, bot_token=BOT_TOKEN, limiter=StreamTokenLimiter(5),
                     client=httpx.AsyncClient(timeout=httpx.Timeout(10.0)), space_id=SPACE, channel_id=CHANNEL, **options)


@pytest.mark.parametrize(
    "status, options, path, body, cause, permanent",
    [
        (503, {}, "/audio/connect", "max audio WS sessions reached", "the ingress is at capacity", False),
        (400, {"hear": ALICE}, "/audio/duplex", "missing target_identity parameter",
         "bad ingress parameters (target_identity missing?)", True),
        (404, {}, "/audio/connect", "404 page not found", "no such path or room at the ingress", True),
        (401, {}, "/audio/connect", "missing authorization token", "stream token missing or unreadable", False),
        (403, {"hear": ALICE, "publish": False}, "/audio/subscribe", "room token expired",
         "stream token rejected (bad signature, expired, or not for this room)", False),
    ],
    ids=["503-capacity", "400-duplex", "404", "401", "403-subscribe"],
)
async def test_dial_names_the_cause_of_a_refused_upgrade(caplog, status, options, path, body, cause, permanent):
    caplog.set_level(logging.DEBUG)
    assert INGRESS_REJECTED[status] == (cause, permanent)
    async with trio.open_nursery() as nursery:
        stub = await StubArgon().start(nursery)
        stub.on_audio = text_refusal(status, body)
        err = await run_dial(hand_dial(stub, **options))
        nursery.cancel_scope.cancel()
    assert [u["path"] for u in stub.upgrades] == [path]
    assert stub.upgrades[0]["query"]["token"] == STREAM_JWT  # it was sent, and only there
    assert err.status == status and err.permanent is permanent
    assert f"refused the connection: {cause} (HTTP {status}; {body})" in str(err), str(err)
    assert path in str(err)
    assert_no_secret(str(err), repr(err), caplog.text)


def argon_error(status: int, code: str, message: str, headers: tuple[tuple[str, str], ...] = ()) -> HttpResponse:
    return HttpResponse.json(status, {"error": code, "message": message}, headers)


def bot_api(stub: StubArgon) -> BotApi:
    return BotApi(httpx.AsyncClient(timeout=httpx.Timeout(10.0)), stub.api_url, BOT_TOKEN,
                  stream_tokens=StreamTokenLimiter(20), events=StreamTokenLimiter(5), calls=StreamTokenLimiter(20))


ECHOED = f"Authorization: Bot {BOT_TOKEN} was refused"  # a server quoting the token back: scrubbed


@pytest.mark.parametrize(
    "call, status, code, cause, permanent",
    [
        ("accept", 400, "not_ringing", "bad request", True),
        ("accept", 401, "unauthorized", "bot token rejected", True),
        ("accept", 403, "not_callee", "not allowed (bot not verified, or not the callee)", True),
        ("accept", 404, "call_not_found", "no such call (it ended or was taken)", True),
        ("accept", 409, "call_already_answered", "call already answered", True),
        ("accept", 503, "unavailable", "HTTP 503", False),
        ("reject", 404, "call_not_found", "no such call (it ended or was taken)", True),
        ("reject", 409, "call_already_answered", "call already answered", True),
        ("me", 401, "unauthorized", "bot token rejected", True),
        ("stream_token", 400, "not_voice_channel", "channel is not a voice channel", True),
        ("stream_token", 401, "unauthorized", "bot token rejected", True),
        ("stream_token", 403, "not_a_member", "bot is not a member of the space", True),
        ("stream_token", 404, "channel_not_found", "no such channel", True),
    ],
)
async def test_dial_bot_api_names_the_cause(caplog, call, status, code, cause, permanent):
    caplog.set_level(logging.DEBUG)
    paths = {"accept": ("POST", "/ICalls/v20260401/Accept"), "reject": ("POST", "/ICalls/v20260401/Reject"),
             "me": ("GET", "/IBotSelf/v1/GetMe"), "stream_token": ("POST", "/IVoice/v1/StreamToken")}
    async with trio.open_nursery() as nursery:
        stub = await StubArgon().start(nursery)
        stub.route(*paths[call], lambda request: argon_error(status, code, ECHOED))
        api = bot_api(stub)
        with pytest.raises(ServiceError) as info:
            with trio.fail_after(10):
                if call == "accept":
                    await api.accept("call-42")
                elif call == "reject":
                    await api.reject("call-42", "busy")
                elif call == "me":
                    await api.me()
                else:
                    await api.stream_token(SPACE, CHANNEL)
        nursery.cancel_scope.cancel()
    err = info.value
    assert err.status == status and err.permanent is permanent
    assert f"{cause} (HTTP {status})" in str(err) or f"({cause})" in str(err), str(err)
    assert len(stub.hits(paths[call][1])) == 1  # a refusal is not retried
    assert stub.hits(paths[call][1])[0].headers["authorization"] == f"Bot {BOT_TOKEN}"
    if call in ("accept", "reject"):
        assert "call call-42" in str(err) and code in str(err)  # the call and the server's own cause
    assert_no_secret(str(err), repr(err), caplog.text)


async def test_dial_bot_api_waits_for_retry_after_on_429(mock_clock, caplog):
    """StreamToken, Accept and GetMe: a 429 is retried once its Retry-After (3 s here) passed."""
    mock_clock.autojump_threshold = 0.2
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        stub = await StubArgon().start(nursery)
        answers = {
            "/IVoice/v1/StreamToken": HttpResponse.json(200, {"token": STREAM_JWT, "ingressUrl": "ws://h:1", "roomName": ROOM}),
            "/ICalls/v20260401/Accept": HttpResponse.json(200, {"token": STREAM_JWT, "roomName": "call/1", "callerId": CALLER,
                                                                  "audioBaseUrl": "ws://h:1"}),
            "/IBotSelf/v1/GetMe": HttpResponse.json(200, {"userId": BOT_USER}),
        }

        def limited_once(path: str):
            def answer(request: HttpRequest) -> HttpResponse:
                if len(stub.hits(path)) == 1:
                    return argon_error(429, "rate_limited", "20 requests per minute", (("retry-after", "3"),))
                return answers[path]
            return answer

        for path in answers:
            stub.route("GET" if path.endswith("GetMe") else "POST", path, limited_once(path))
        api = bot_api(stub)
        waited = {}
        for path, call in (("/IVoice/v1/StreamToken", lambda: api.stream_token(SPACE, CHANNEL)),
                           ("/ICalls/v20260401/Accept", lambda: api.accept("call-1")),
                           ("/IBotSelf/v1/GetMe", api.me)):
            t0 = trio.current_time()
            result = await call()
            waited[path] = trio.current_time() - t0
            assert result is not None and len(stub.hits(path)) == 2
        nursery.cancel_scope.cancel()
    assert all(3 <= seconds < 4 for seconds in waited.values()), waited  # not the 60 s window
    assert caplog.text.count("rate limited; retrying in 3 s") == 3
    assert_no_secret(caplog.text)


# ======================================================= dial side: routes against the stub
EVENTS_PATH = "/IEvents/v1/Stream"
FOLLOW_ROUTE = """\
routes:
  - name: follow
    endpoints:
      - argon: {space_id: %s, channel_id: %s, hear: follow, api_url: "$stub_api"}
      - record: {path: "$out/heard.wav"}
""" % (SPACE, CHANNEL)
HEAR_ROUTE = """\
routes:
  - name: hear
    endpoints:
      - argon: {space_id: %s, channel_id: %s, hear: %s, api_url: "$stub_api"}
      - record: {path: "$out/heard.wav"}
""" % (SPACE, CHANNEL, ALICE)
CALLS_ROUTE = """\
routes:
  - name: phone                 # the phone line the bot bridges calls to (our VoIPBIN listen role)
    endpoints:
      - voipbin: {role: listen, name: call, call_id: desk-1}
      - record: {name: heard, path: "$out/phone-hears.wav", rate: 8000, hears: [call]}
  - name: answer
    endpoints:
      - argon: {calls: incoming, api_url: "$stub_api"}
      - voipbin: {call_id: desk-1, encapsulation: audiosocket}
"""


def user(user_id: str, name: str) -> dict[str, Any]:
    return {"userId": user_id, "username": name, "displayName": name.title(), "avatarUrl": None, "flags": "none"}


def voice_join(user_id: str, name: str, event_id: str) -> bytes:
    return encode_sse("voiceJoin", {"spaceId": SPACE, "channelId": CHANNEL, "user": user(user_id, name)}, id=event_id)


READY = encode_sse("ready", {"intents": INTENT_VOICE, "spaceIds": [SPACE]}, id="ready")


class EventFeed:
    """One events-stream connection of the stub: what the test pushes is sent as it comes."""

    def __init__(self, *chunks: bytes) -> None:
        self._send, self._recv = trio.open_memory_channel[bytes](64)
        for chunk in chunks:
            self.push(chunk)

    def push(self, chunk: bytes) -> None:
        self._send.send_nowait(chunk)

    def end(self) -> None:
        self._send.close()

    async def chunks(self):
        async for chunk in self._recv:
            yield chunk

    def response(self) -> HttpResponse:
        return HttpResponse.event_stream(self.chunks)


def route_events(gateway, name: str) -> list:
    return [event for _, event in gateway.routes[name].route.stats.recent_events]


def upgrade_for(stub: StubArgon, target: str) -> dict[str, Any] | None:
    return next((u for u in stub.upgrades if u["query"].get("target_identity") == target), None)


@pytest.mark.parametrize("status, code, cause", [
    (401, "unauthorized", "bot token rejected (HTTP 401)"),
    (403, "intents_not_allowed", "intents not allowed (calls need a verified bot) (HTTP 403; intents_not_allowed: "
                                 "Authorization: Bot … was refused)"),
])
async def test_dial_follow_route_fails_naming_an_events_stream_refusal(tmp_path, caplog, status, code, cause):
    caplog.set_level(logging.DEBUG)
    async with trio.open_nursery() as nursery:
        stub = await StubArgon().start(nursery)
        stub.route("GET", EVENTS_PATH, lambda request: argon_error(status, code, ECHOED))
        gateway = await start(nursery, FOLLOW_ROUTE, stub_api=stub.api_url, out=tmp_path)
        follow = gateway.routes["follow"]
        with trio.fail_after(10):
            await follow.finished.wait()
        nursery.cancel_scope.cancel()
    assert follow.state == "failed"  # permanent: not retried
    assert f"Argon events stream: {cause}" in follow.last_error, follow.last_error
    assert len(stub.hits(EVENTS_PATH)) == 1
    assert "(permanent: not retrying)" in caplog.text
    assert_no_secret(follow.last_error, caplog.text)


async def test_dial_follow_skips_malformed_events_and_follows_the_next_participant(tmp_path, caplog):
    """A malformed events-stream line (invalid UTF-8), a voiceJoin whose data is not JSON and
    one without its user are each logged and skipped; the stream is kept (no reconnect) and the
    next valid voiceJoin is followed."""
    caplog.set_level(logging.INFO)
    feed = EventFeed(READY, voice_join(ALICE, "alice", "101"))
    async with trio.open_nursery() as nursery:
        stub = await StubArgon().start(nursery)
        stub.route("GET", EVENTS_PATH, lambda request: feed.response())
        gateway = await start(nursery, FOLLOW_ROUTE, stub_api=stub.api_url, out=tmp_path)
        await until(lambda: upgrade_for(stub, ALICE))  # it hears alice
        feed.push(b"id: 102\nevent: voiceJoin\ndata: {\"user\": \"\xff\xfe\"}\n\n")
        feed.push(b"id: 103\nevent: voiceJoin\ndata: {not json\n\n")
        feed.push(f'id: 104\nevent: voiceJoin\ndata: {{"spaceId":"{SPACE}","channelId":"{CHANNEL}"}}\n\n'.encode())
        feed.push(voice_join(BOB, "bob", "105"))
        await until(lambda: upgrade_for(stub, BOB))  # then bob
        await until(lambda: upgrade_for(stub, ALICE)["closed"] == 1000)  # alice's session closed cleanly
        bridge = gateway.routes["follow"]
        assert bridge.state == "up"
        nursery.cancel_scope.cancel()
    follows = [e.data for e in route_events(gateway, "follow") if e.kind == "follow"]
    assert follows[-1] == {"target": BOB, "previous": ALICE}, follows
    assert len(stub.hits(EVENTS_PATH)) == 1  # the stream was kept
    assert "skipped a malformed line: line is not valid UTF-8; event dropped" in caplog.text
    assert "skipped event 'voiceJoin': Argon event voiceJoin: data is not JSON" in caplog.text
    assert "skipped event 'voiceJoin': Argon event voiceJoin: no user" in caplog.text
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "skipped" in r.getMessage()]
    assert len(warnings) == 3
    assert_no_secret(caplog.text)


async def test_dial_turns_statuses_with_the_older_key_type_into_route_events(tmp_path, caplog):
    """Servers before mid-2026 said `type`, not `status`: each status is a route event and a
    log line all the same; a text message that is not JSON is logged and ignored."""
    caplog.set_level(logging.INFO)
    statuses = (
        json.dumps({"type": "subscribed", "session_id": "AWS_1", "track_sid": "TR_a1", "participant_identity": ALICE}),
        "this is not JSON",
        json.dumps({"type": "waiting", "session_id": "AWS_1", "participant_identity": ALICE}),
        json.dumps({"type": "target_left", "session_id": "AWS_1", "participant_identity": ALICE}),
    )

    async def old_server(request: WebSocketRequest, upgrade: dict[str, Any]) -> None:
        ws = await request.accept()
        await ws.send_message(json.dumps({"type": "ready", "session_id": "AWS_1"}))
        for status in statuses:
            await ws.send_message(status)
        await ws.send_message(OPUS_20MS)  # and the session goes on: audio after all of them
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed as closed:
            upgrade["closed"] = closed.reason.code

    async with trio.open_nursery() as nursery:
        stub = await StubArgon().start(nursery)
        stub.on_audio = old_server
        gateway = await start(nursery, HEAR_ROUTE, stub_api=stub.api_url, out=tmp_path)
        endpoint = gateway.routes["hear"].route.endpoints[0]
        await until(lambda: endpoint.stats.frames_in == 1)
        assert gateway.routes["hear"].state == "up" and stub.upgrades[0]["closed"] is None
        assert endpoint.session_id == "AWS_1"
        await gateway.stop()  # goodbyes while the stub still answers them
        nursery.cancel_scope.cancel()
    assert [u["path"] for u in stub.upgrades] == ["/audio/duplex"]
    events = [(e.kind, e.data) for e in route_events(gateway, "hear")]
    assert events == [
        ("ready", {"session_id": "AWS_1"}),
        ("subscribed", {"participant": ALICE, "track_sid": "TR_a1", "session_id": "AWS_1"}),
        ("waiting", {"participant": ALICE, "session_id": "AWS_1"}),
        ("target_left", {"participant": ALICE, "session_id": "AWS_1"}),
    ], events
    for kind in ("ready", "subscribed", "waiting", "target_left"):
        assert f"event from argon: {kind} " in caplog.text
    assert "ingress says something else than a status (status message is not JSON): this is not JSON" in caplog.text


async def test_dial_events_stream_429_waits_and_resumes_from_the_last_event_id(mock_clock, caplog):
    """The events stream ends (twice), then answers 429 with Retry-After: 7: the client waits
    that long, and every reconnect after the first real event sends its id as Last-Event-ID
    (never "ready", the id of the `ready` event)."""
    mock_clock.autojump_threshold = 0.2
    caplog.set_level(logging.INFO)
    feeds = [
        EventFeed(READY),  # only `ready`, then the stream ends: nothing to resume from
        EventFeed(READY, voice_join(ALICE, "alice", "41"), encode_sse("heartbeat", {"timestamp": 1})),
        None,  # 429
        EventFeed(READY),
    ]
    feeds[0].end()
    feeds[1].end()
    connects: list[tuple[float, str | None]] = []
    fourth = trio.Event()

    def events(request: HttpRequest) -> HttpResponse:
        connects.append((trio.current_time(), request.headers.get("last-event-id")))
        if len(connects) == 4:
            fourth.set()
        feed = feeds[len(connects) - 1] if len(connects) <= len(feeds) else EventFeed(READY)
        if feed is None:
            return argon_error(429, "rate_limited", "5 connects per minute", (("retry-after", "7"),))
        return feed.response()

    async with trio.open_nursery() as nursery:
        stub = await StubArgon().start(nursery)
        stub.route("GET", EVENTS_PATH, events)
        config = GatewayConfig.from_text("server: {}\n", "test.yaml")
        runtime = Runtime(config)
        runtime.nursery = nursery
        client = EventsClient(runtime, bot_api(stub), INTENT_VOICE)
        seen: list = []
        unsubscribe = client.subscribe(seen.append)
        with trio.fail_after(120):  # virtual seconds
            await fourth.wait()
            while [type(e).__name__ for e in seen].count("Ready") < 3:  # connects 1, 2 and 4
                await client.wait_change()
        assert client.connected
        unsubscribe()
        nursery.cancel_scope.cancel()
    assert [last_id for _, last_id in connects] == [None, None, "41", "41"], connects
    assert connects[3][0] - connects[2][0] >= 7 - 1e-6, connects  # Retry-After honoured
    assert [type(e).__name__ for e in seen].count("VoiceJoin") == 1
    assert client.present[(SPACE, CHANNEL)].keys() == {ALICE}
    assert "Argon events stream: rate limited (HTTP 429" in caplog.text and "reconnecting in 7 s" in caplog.text
    assert_no_secret(caplog.text)


def calls_stub(stub: StubArgon, accept: Callable[[HttpRequest], HttpResponse] | None = None) -> EventFeed:
    """The stub rings the bot once its events stream (calls intent) connects."""
    feed = EventFeed(encode_sse("ready", {"intents": INTENT_CALLS}, id="ready"),
                     encode_sse("callIncoming", {"callId": "call-1", "fromUserId": CALLER, "fromLocale": "en"}, id="7"))
    stub.route("GET", EVENTS_PATH, lambda request: feed.response())
    stub.route("POST", "/ICalls/v20260401/Accept", accept or (lambda request: HttpResponse.json(200, {
        "token": STREAM_JWT, "roomName": "call/call-1", "callerId": CALLER, "audioBaseUrl": stub.ws_url})))
    return feed


@pytest.mark.parametrize("status, code, cause", [
    (404, "call_not_found", "no such call (it ended or was taken)"),
    (409, "call_already_answered", "call already answered"),
])
async def test_dial_call_session_names_a_refused_accept(tmp_path, caplog, status, code, cause):
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        stub = await StubArgon().start(nursery)
        calls_stub(stub, lambda request: argon_error(status, code, "the call is gone"))
        gateway = await start(nursery, CALLS_ROUTE, stub_api=stub.api_url, out=tmp_path)
        answer = gateway.routes["answer"]
        with trio.fail_after(10):
            await answer.sessions_done.wait()
        await until(lambda: answer.state == "waiting" and not answer.calls)
        nursery.cancel_scope.cancel()
    assert stub.hits("/ICalls/v20260401/Accept")[0].json() == {"callId": "call-1"}
    expected = f"Argon Calls Accept (call call-1): {cause} (HTTP {status}): {code}: the call is gone"
    assert expected in answer.last_error, answer.last_error
    assert expected in caplog.text
    assert not stub.upgrades and gateway.routes["phone"].route.stats.sessions == 0  # nothing dialed
    assert_no_secret(answer.last_error, caplog.text)


async def test_dial_refused_accept_is_logged_as_a_failure_not_a_crash(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        stub = await StubArgon().start(nursery)
        calls_stub(stub, lambda request: argon_error(404, "call_not_found", "the call is gone"))
        gateway = await start(nursery, CALLS_ROUTE, stub_api=stub.api_url, out=tmp_path)
        answer = gateway.routes["answer"]
        with trio.fail_after(10):
            await answer.sessions_done.wait()
        nursery.cancel_scope.cancel()
    assert answer.last_error.startswith("Argon Calls Accept (call call-1): no such call"), answer.last_error
    assert "call call-1 failed: Argon Calls Accept (call call-1): no such call" in caplog.text
    assert "crashed" not in caplog.text


@pytest.mark.parametrize("how, reason", [
    ("target_left", "the caller left the call (target_left)"),
    ("callEnded", "the caller hung up (callEnded)"),
])
async def test_dial_call_ends_cleanly_when_the_caller_leaves(tmp_path, caplog, how, reason):
    """The caller leaves: Argon says `target_left` on the call's duplex socket (no `callEnded`
    first; the socket stays open), or `callEnded` on the events stream. Either way the
    answering session ends as the caller leaving, closes its socket with 1000, hangs up the
    phone, and the route waits for the next call."""
    caplog.set_level(logging.INFO)
    leave = trio.Event()

    async def call_audio(request: WebSocketRequest, upgrade: dict[str, Any]) -> None:
        ws = await request.accept()
        await ws.send_message(json.dumps({"status": "subscribed", "session_id": "AWS_c", "track_sid": "TR_c",
                                          "participant_identity": CALLER}))
        await ws.send_message(json.dumps({"status": "ready", "session_id": "AWS_c"}))
        await leave.wait()
        if how == "target_left":
            await ws.send_message(json.dumps({"status": "target_left", "session_id": "AWS_c",
                                              "participant_identity": CALLER}))
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed as closed:
            upgrade["closed"] = closed.reason.code

    async with trio.open_nursery() as nursery:
        stub = await StubArgon().start(nursery)
        feed = calls_stub(stub)
        stub.on_audio = call_audio
        gateway = await start(nursery, CALLS_ROUTE, stub_api=stub.api_url, out=tmp_path)
        answer, phone = gateway.routes["answer"], gateway.routes["phone"]
        with trio.fail_after(10):
            await phone.route.up.wait()  # the call is bridged to the phone
        assert answer.state == "up" and list(answer.calls) == ["call-1"]
        leave.set()
        if how == "callEnded":
            feed.push(encode_sse("callEnded", {"callId": "call-1"}, id="8"))
        with trio.fail_after(10):
            await phone.sessions_done.wait()  # the phone was hung up
        await until(lambda: answer.state == "waiting" and not answer.calls)
        await until(lambda: stub.upgrades[0]["closed"] is not None)
        nursery.cancel_scope.cancel()
    assert [u["path"] for u in stub.upgrades] == ["/audio/duplex"]
    assert stub.upgrades[0]["query"]["target_identity"] == CALLER
    assert stub.upgrades[0]["closed"] == 1000  # a clean goodbye, not a dropped socket
    assert answer.route.stats.ended_by == f"argon: {reason}", answer.route.stats.ended_by
    assert phone.route.stats.ended_by == "call: hangup", phone.route.stats.ended_by  # AudioSocket hangup
    assert answer.last_error == ""  # ended, not failed
    assert_no_secret(caplog.text)
