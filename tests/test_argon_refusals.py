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
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from gateway._util import collapse
from gateway.adapters.argon.dial import INGRESS_REJECTED, ArgonDial, BotApi, EventsClient, StreamTokenLimiter
from gateway.adapters.argon.listen import ArgonListenService
from gateway.adapters.argon.sse import SseParser, parse_argon_event
from gateway.adapters.argon.wire import INTENT_CALLS, INTENT_VOICE, issue_room_token
from gateway.config import GatewayConfig
from gateway.errors import ServiceError
from gateway.runtime import Runtime
from gateway.server import HttpRequest, HttpResponse, HttpServer, serve_http, serve_media
from harness import BOT_TOKEN, JWT_SECRET, SECRETS, start
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
    """Wait until `condition()` is true (a state the code under test reaches on its own)."""
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
                    if self.answer_pings:
                        await self._send(event.response())
                    continue
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
EXPIRED_BEYOND_LEEWAY = -3600 - 90  # ttl such that exp was 90 s ago (leeway: about 60 s)


def _bad_tokens() -> dict[str, tuple[str, int, str]]:
    now = time.time()
    return {
        "unparseable": ("not-a-jwt", 401, "room token malformed: not a JWT"),
        "wrong issuer": (room_token(issuer="APIsomeoneelse"), 403, "room token issuer is not accepted"),
        "bad signature": (room_token(secret="another-secret-of-32-bytes-or-more!!"), 403,
                          "room token signature does not verify"),
        "expired": (room_token(now=now - 3600 - 90), 403, "room token expired"),
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
    assert isinstance(unknown, Refusal) and unknown.status == 404
    assert "/audio/publish" in unknown.text or "not found" in unknown.text
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
