"""The adapter kit itself (gateway/adapters/kit.py): Retry-After in both its forms (RFC 9110
§10.2.3), the one retry policy of REST calls (against a loopback HTTP server and httpx's
MockTransport), the rate limiter under MockClock, the WebSocket session's send() on a real
loopback connection, and the registry table's errors."""

from __future__ import annotations

import calendar
import email.utils
import logging
import time

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, serve_websocket

from gateway.adapters import registry
from gateway.adapters.kit import (
    RateLimiter,
    RetryPolicy,
    WsEndpoint,
    WsSession,
    pcm_payload,
    post_with_retry,
    request_with_retry,
    secret_in,
)
from gateway.adapters.rest import body_retry_after, parse_http_date, parse_retry_after, status_cause
from gateway.adapters.ws import dial
from gateway.codecs.formats import PCM16_8K, AudioFrame
from gateway.config.schema import GatewayConfig, Services
from gateway.config.secret import Secret
from gateway.errors import CallEnded, ConfigError, ServiceError
from gateway.server import HttpResponse, HttpServer, serve_http

NOW = calendar.timegm((2026, 12, 2, 12, 0, 0))  # Wed, 02 Dec 2026 12:00:00 GMT
TOKEN = "kit-SECRET-token-0123456789"
log = logging.getLogger("test.kit")


# ------------------------------------------------------------------------------ Retry-After
@pytest.mark.parametrize("value, seconds", [
    ("120", 120.0), (" 7 ", 7.0), ("0", 0.0),
    ("Wed, 02 Dec 2026 12:00:30 GMT", 30.0),  # IMF-fixdate
    ("Wednesday, 02-Dec-26 12:01:00 GMT", 60.0),  # obsolete RFC 850
    ("Wed Dec  2 12:00:05 2026", 5.0),  # obsolete asctime
    ("Tue, 01 Dec 2026 12:00:00 GMT", 0.0),  # already past: at once
    ("-1", None), ("1.5", None), ("soon", None), ("", None), (None, None), ("٣", None),  # not 1*DIGIT
    ("Wed, 02 Dec 2026 12:00:30 UTC", None), ("wed, 02 dec 2026 12:00:30 GMT", None),  # the grammar is exact
    ("Wed, 31 Feb 2026 12:00:30 GMT", None), ("Wed, 02 Dec 2026 25:00:30 GMT", None),  # no such time
])
def test_retry_after_both_forms(value, seconds):
    assert parse_retry_after(value, now=NOW) == seconds


def test_retry_after_date_needs_a_clock():
    """A sans-IO caller without a clock reads the delay-seconds form only."""
    assert parse_retry_after("Wed, 02 Dec 2026 12:00:30 GMT") is None
    assert parse_retry_after("30") == 30.0


def test_rfc850_two_digit_year():
    """RFC 9110 §5.6.7: a two-digit year more than 50 years ahead is the century before."""
    assert time.gmtime(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT", NOW)).tm_year == 1994
    assert time.gmtime(parse_http_date("Monday, 06-Nov-76 08:49:37 GMT", NOW)).tm_year == 2076
    assert time.gmtime(parse_http_date("Thursday, 06-Nov-77 08:49:37 GMT", NOW)).tm_year == 1977
    # the RFC's own example, every form the same instant
    instants = {parse_http_date(text, NOW) for text in
                ("Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994")}
    assert instants == {784111777.0}


def test_body_retry_after_and_status_cause():
    assert body_retry_after({"retryAfter": 2}) == 2.0
    assert body_retry_after({"retry_after": 0.5}, ("retry_after",)) == 0.5
    assert body_retry_after({"retryAfter": True}) is None and body_retry_after({"retryAfter": -1}) is None
    assert body_retry_after({"retryAfter": float("inf")}) is None  # 1e400 in JSON
    assert body_retry_after(["retryAfter"]) is None
    assert status_cause(503, {}) == ("service error", False) and status_cause(404, {}) == ("request refused", True)


# ------------------------------------------------------------------------------ retry policy
def parse(status: int, body: bytes, retry_after_s: float | None) -> bytes:
    """A wire parser of the kind every adapter has: the body, or a ServiceError."""
    if 200 <= status < 300:
        return body
    cause, permanent = status_cause(status, {429: ("rate limited", False)})
    hint = retry_after_s if retry_after_s is not None else body_retry_after(_json(body))
    raise ServiceError(f"test call: {cause} (HTTP {status})", status=status, permanent=permanent,
                       retry_after=hint if status == 429 else None)


def _json(body: bytes):
    import json

    try:
        return json.loads(body)
    except ValueError:
        return None


def mock_client(answers: list[httpx.Response], seen: list[float]) -> httpx.AsyncClient:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(trio.current_time())
        return answers.pop(0)
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


async def test_429_then_5xx_then_success_waits_as_told(autojump_clock, caplog):
    """429 with Retry-After: 3 (delay-seconds), 503 with an HTTP-date 10 s ahead, 429 with
    nothing (backoff: 1 s doubling, so 4 s at the third retry), then 200."""
    caplog.set_level(logging.INFO)
    date = email.utils.formatdate(time.time() + 10, usegmt=True)
    answers = [httpx.Response(429, headers={"retry-after": "3"}), httpx.Response(503, headers={"retry-after": date}),
               httpx.Response(429), httpx.Response(200, content=b"ok")]
    seen: list[float] = []
    async with mock_client(answers, seen) as client:
        result = await post_with_retry(client, "https://api.example/token", parse=parse, what="test call", log=log)
    assert result == b"ok"
    waits = [round(b - a, 1) for a, b in zip(seen, seen[1:])]
    assert waits[0] == 3 and 8 <= waits[1] <= 10 and waits[2] == 4  # a date has 1 s resolution
    assert "test call: rate limited; retrying in 3 s" in caplog.text
    assert "test call: HTTP 503; retrying in" in caplog.text and "test call: rate limited; retrying in 4 s" in caplog.text


@pytest.mark.parametrize("status", [401, 404, 500, 502, 503])
async def test_4xx_and_5xx_without_retry_after_are_not_retried(autojump_clock, status):
    """A 5xx that names no Retry-After is raised at once: the route's restart backoff retries
    the endpoint (two layers of blind retries would multiply the load)."""
    seen: list[float] = []
    async with mock_client([httpx.Response(status), httpx.Response(200)], seen) as client:
        with pytest.raises(ServiceError) as raised:
            await post_with_retry(client, "https://api.example/token", parse=parse, what="test call", log=log)
    assert raised.value.status == status and raised.value.permanent is (status < 500) and len(seen) == 1


async def test_retries_are_bounded_in_count(autojump_clock):
    """Six attempts in all (RetryPolicy.retries = 5), then the last refusal."""
    seen: list[float] = []
    async with mock_client([httpx.Response(429) for _ in range(10)], seen) as client:
        with pytest.raises(ServiceError, match=r"HTTP 429"):
            await post_with_retry(client, "https://api.example/token", parse=parse, what="test call", log=log)
    assert len(seen) == 6
    assert seen[-1] - seen[0] == pytest.approx(1 + 2 + 4 + 8 + 16)


async def test_total_wait_is_bounded(autojump_clock):
    """A wait that would pass max_total_wait_s (120 s) is not made: 100 s, then a second 100 s
    is refused and the 429 is raised at once, with the service's hint in it."""
    seen: list[float] = []
    answers = [httpx.Response(429, headers={"retry-after": "100"}) for _ in range(3)]
    async with mock_client(answers, seen) as client:
        with pytest.raises(ServiceError) as raised:
            await post_with_retry(client, "https://api.example/token", parse=parse, what="test call", log=log)
    assert len(seen) == 2 and seen[1] - seen[0] == pytest.approx(100)
    assert raised.value.status == 429 and raised.value.retry_after == 100


async def test_a_body_hint_is_used_when_no_header(autojump_clock):
    seen: list[float] = []
    answers = [httpx.Response(429, json={"retryAfter": 0.5}), httpx.Response(200, content=b"ok")]
    async with mock_client(answers, seen) as client:
        assert await post_with_retry(client, "https://api.example/t", parse=parse, what="test call", log=log) == b"ok"
    assert seen[1] - seen[0] == pytest.approx(0.5)


async def test_the_policy_is_one_value(autojump_clock):
    policy = RetryPolicy(retries=1, backoff_s=0.25)
    seen: list[float] = []
    async with mock_client([httpx.Response(429), httpx.Response(429), httpx.Response(200)], seen) as client:
        with pytest.raises(ServiceError):
            await request_with_retry(client, "GET", "https://api.example/t", parse=parse, what="t", log=log,
                                     policy=policy)
    assert len(seen) == 2 and seen[1] - seen[0] == pytest.approx(0.25)


async def test_loopback_server_and_secrets_stay_out_of_errors(caplog):
    """Against a real HTTP server on loopback: a 429 with Retry-After 1 is waited for; a
    refused connection names the URL without its query or userinfo, and no secret is in any
    message or log line."""
    caplog.set_level(logging.DEBUG)
    app = HttpServer()
    hits: list[float] = []

    async def token(request):
        hits.append(trio.current_time())
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        if len(hits) == 1:
            return HttpResponse.json(429, {"error": "slow down"}, (("retry-after", "1"),))
        return HttpResponse.json(200, {"token": "t"})

    app.add("POST", "/token", token)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, app, "127.0.0.1", 0)
        async with httpx.AsyncClient() as client:
            body = await post_with_retry(client, f"http://127.0.0.1:{port}/token?key={TOKEN}", parse=parse,
                                         what="test call", log=log, headers={"Authorization": f"Bearer {TOKEN}"},
                                         json={"a": 1})
            assert b'"token"' in body and len(hits) == 2 and 1.0 <= hits[1] - hits[0] < 1.5
            nursery.cancel_scope.cancel()
    async with httpx.AsyncClient() as client:
        with pytest.raises(ServiceError) as raised:
            await post_with_retry(client, f"http://user:{TOKEN}@127.0.0.1:1/token?key={TOKEN}", parse=parse,
                                  what="test call", log=log, headers={"Authorization": f"Bearer {TOKEN}"})
    assert str(raised.value) == "test call: cannot reach http://127.0.0.1:1/token: ConnectError"
    assert TOKEN not in caplog.text


# ------------------------------------------------------------------------------ rate limiter
async def test_rate_limiter_spaces_calls_fifo(autojump_clock):
    limiter = RateLimiter(2, window=10.0)
    times: list[tuple[int, float]] = []

    async def call(i: int) -> None:
        await limiter.acquire()
        times.append((i, trio.current_time()))

    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(call, i)
            await trio.sleep(0)  # in this order
    assert [i for i, _ in times] == [0, 1, 2, 3, 4]
    assert [t for _, t in times] == [0.0, 0.0, 10.0, 10.0, 20.0]


async def test_rate_limiter_try_acquire_and_back_off(autojump_clock):
    limiter = RateLimiter(2, window=60.0)
    assert limiter.try_acquire() is None
    await trio.sleep(15)
    assert limiter.try_acquire() is None
    assert limiter.try_acquire() == pytest.approx(45.0)  # the first call leaves the window then
    await trio.sleep(45)
    assert limiter.try_acquire() is None
    limiter.back_off(30)
    t0 = trio.current_time()
    await limiter.acquire()  # the window has room (one call 15 s ago): only the back-off holds it
    assert trio.current_time() - t0 == pytest.approx(30)
    limiter.per_window = 10  # a reload raises the limit: it applies at once
    assert limiter.try_acquire() is None


def test_secret_in():
    secrets = (Secret("abc"), Secret("def"))
    assert secret_in("def", secrets) and not secret_in("de", secrets) and not secret_in(None, secrets)
    assert not secret_in("abc", ()) and not secret_in("\ud800", secrets)


# ------------------------------------------------------------------------------ WebSocket session
class Sink(WsEndpoint[AudioFrame]):
    kind = "test"
    egress = PCM16_8K

    async def run(self, emit, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        raise NotImplementedError


async def test_session_send_counts_interleaves_and_ends_on_close():
    received: list[bytes | str] = []
    closed = trio.Event()

    async def server(request):
        ws = await request.accept()
        for _ in range(3):
            received.append(await ws.get_message())
        await ws.aclose(1000, "bye")
        closed.set()

    frame = AudioFrame.silence(160, 8000)
    async with trio.open_nursery() as nursery:
        listener = await nursery.start(serve_websocket, server, "127.0.0.1", 0, None)
        port = listener.port
        sink = Sink("sink")
        await sink.send(frame)
        assert sink.stats.dropped == 1 and sink.stats.frames_out == 0  # no session yet

        ws = await dial(None, f"ws://127.0.0.1:{port}/x?token={TOKEN}", service="test")
        session: WsSession[AudioFrame] = WsSession(ws, payload=pcm_payload, wrap=lambda pcm: b"M" + pcm,
                                                   peer="device ")
        sink.session = session

        async def mark(s, f):  # what goes before one slot's audio, then unhooks itself
            await s.ws.send_message("mark")
            s.interleave = None
            return f

        session.interleave = mark
        await sink.send(frame)
        await sink.send(frame)
        read_closed = trio.Event()

        ended: list[CallEnded] = []

        async def reader() -> None:  # as an endpoint's run() does: it reads the close frame
            with pytest.raises(ConnectionClosed) as raised:
                await ws.get_message()
            ended.append(session.call_ended(raised.value))  # what run() raises: the reader names the end
            read_closed.set()

        nursery.start_soon(reader)
        with trio.fail_after(5):
            await closed.wait()
            await read_closed.wait()
        await sink.send(frame)  # the connection is closed: a drop; the reader ended the session
        nursery.cancel_scope.cancel()
    assert [str(e) for e in ended] == ["device closed (1000 bye)"]
    assert received == ["mark", b"M" + bytes(320), b"M" + bytes(320)]
    assert sink.stats.frames_out == 2 and sink.stats.bytes_out == 640 and sink.stats.dropped == 2


# ------------------------------------------------------------------------------ registry table
def test_table_is_the_source_of_kinds_and_services():
    assert registry.ENDPOINT_KINDS == tuple(k.name for k in registry.KINDS)
    assert set(Services().by_kind) == {k.name for k in registry.KINDS if k.config is not None}
    voipbin = registry.kind_of("voipbin")
    assert voipbin.roles == ("dial", "listen") and voipbin.listen_servers == ("media",)
    assert registry.kind_of("file").roles == ("dial",)
    assert voipbin.endpoint_class("listen").__name__ == "VoipbinListen"
    with pytest.raises(ValueError, match="a file endpoint has no listen role"):
        registry.kind_of("file").endpoint_class("listen")


def test_unknown_kind_is_a_clear_config_error():
    with pytest.raises(ConfigError) as raised:
        registry.kind_of("voipbn", "gw.yaml:4", "routes[0].endpoints[0]")
    assert str(raised.value) == ("gw.yaml:4: routes[0].endpoints[0]: unknown endpoint kind 'voipbn', expected one "
                                 f"of {', '.join(registry.ENDPOINT_KINDS)}")
    assert registry.ENDPOINT_KINDS[:4] == ("voipbin", "argon", "agent", "videosdk")
    text = "routes:\n  - name: r\n    endpoints:\n      - voipbn: {call_id: c}\n      - record: {path: x.wav}\n"
    with pytest.raises(ConfigError, match=r"^gw.yaml:4: routes\[0\].endpoints\[0\]: unknown endpoint kind 'voipbn'"):
        GatewayConfig.from_text(text, "gw.yaml")
    with pytest.raises(ConfigError, match=r"^gw.yaml:2: services.voipbn: unknown key$"):
        GatewayConfig.from_text("services:\n  voipbn: {token: t}\n", "gw.yaml")


@pytest.mark.parametrize("kind, options, missing", [
    ("voipbin", "call_id: c", "media"),
    ("agent", "name: a", "media"),
    ("videosdk", "room_id: r", "http"),
    ("audiosocket", "uuid: 40325ec2-5efd-4bd3-805f-53576e581d13", "audiosocket"),  # a socket of its own
])
def test_listen_role_without_its_server_is_a_clear_config_error(kind, options, missing):
    from gateway.runtime import Runtime

    server = {"media": "  http: 127.0.0.1:0\n", "http": "  media: 127.0.0.1:0\n",
              "audiosocket": "  media: 127.0.0.1:0\n"}[missing]
    text = f"server:\n{server}" + ("services:\n  agent: {api_key: k}\n" if kind == "agent" else "")
    text += f"routes:\n  - name: r\n    endpoints:\n      - {kind}: {{role: listen, {options}}}\n      - record: {{path: x.wav}}\n"
    config = GatewayConfig.from_text(text, "gw.yaml")
    endpoint = config.routes[0].endpoints[0]
    with pytest.raises(ConfigError) as raised:
        registry.build_endpoint(endpoint, Runtime(config), kind)
    assert str(raised.value) == f"{endpoint.where}: {endpoint.path}: a listen endpoint needs server.{missing} (HOST:PORT)"


def test_a_role_the_kind_lacks_is_a_clear_config_error():
    from gateway.runtime import Runtime

    text = "routes:\n  - name: r\n    endpoints:\n      - file: {role: listen, path: x.wav}\n      - record: {path: y.wav}\n"
    config = GatewayConfig.from_text(text, "gw.yaml")
    with pytest.raises(ConfigError, match=r"^gw.yaml:4: routes\[0\].endpoints\[0\].file.role: a file endpoint has no "
                                          r"listen role$"):
        registry.build_endpoint(config.routes[0].endpoints[0], Runtime(config), "file")
