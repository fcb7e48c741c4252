"""Argon dial errors name their cause and never print the token; StreamToken is rate limited
(5 a minute per bot) and a dozen channels still all start; the listen ingress refuses bad
tokens and malformed packets without disturbing other routes."""

from __future__ import annotations

import json
import logging
import time

import pytest
import trio
from trio_websocket import ConnectionClosed

from gateway._util import collapse
from gateway.adapters.argon.endpoint import INGRESS_REJECTED, ArgonDial, StreamTokenLimiter
from gateway.adapters.argon.wire import IngressParams, build_ingress_url, issue_stream_token
from gateway.adapters.ws import dial as dial_ws
from gateway.errors import ServiceError
from gateway.server import HttpResponse, HttpServer, serve_http
from harness import BOT_TOKEN, JWT_SECRET, SECRETS, start, ws_client

SPACE = "550e8400-e29b-41d4-a716-446655440000"
CHANNEL = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"

CHANNEL_ROUTE = """\
routes:
  - name: channel
    endpoints:
      - argon: {role: listen, space_id: %s, channel_id: %s}
      - record: {path: "$out/channel.wav"}
""" % (SPACE, CHANNEL)


def dial(gateway, *, space=SPACE, channel=CHANNEL, bot_token=BOT_TOKEN, api_url=None, limiter=None) -> ArgonDial:
    runtime = gateway.runtime
    return ArgonDial(
        "argon",
        api_url=api_url or f"http://127.0.0.1:{runtime.http.port}/api/bot",
        bot_token=bot_token,
        limiter=limiter or StreamTokenLimiter(5),
        client=runtime.http_client(),
        space_id=space,
        channel_id=channel,
    )


def assert_no_secret(*texts):
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


async def run_dial(endpoint: ArgonDial) -> ServiceError:
    """Run a dial endpoint that must be refused; the ServiceError it failed with."""
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(endpoint.run, lambda frame: None)
    except BaseException as raised:  # noqa: BLE001 - unwrapped and checked below
        err = collapse(raised)
        assert isinstance(err, ServiceError), repr(raised)
        return err
    raise AssertionError("the dial endpoint connected")


@pytest.mark.parametrize(
    "case, cause, status",
    [
        ("not a member", "bot is not a member of the space", 403),
        ("no such channel", "no such channel", 404),
        ("bad token", "bot token rejected", 401),
    ],
)
async def test_stream_token_refusals_name_the_cause(tmp_path, caplog, case, cause, status):
    caplog.set_level(logging.DEBUG)
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, CHANNEL_ROUTE, out=tmp_path)
        kwargs = {
            "not a member": {"space": "00000000-0000-0000-0000-000000000000"},
            "no such channel": {"channel": "11111111-1111-1111-1111-111111111111"},
            "bad token": {"bot_token": "not-" + BOT_TOKEN},
        }[case]
        err = await run_dial(dial(gateway, **kwargs))
        nursery.cancel_scope.cancel()
    assert err.status == status and err.permanent
    assert cause in str(err)
    assert_no_secret(str(err), repr(err), caplog.text)


async def test_stream_token_400_is_not_a_voice_channel(caplog):
    """Argon answers 400 for a text channel; our listen role has only voice channels, so a
    one-route stand-in gives the 400 over a real socket."""
    app = HttpServer()

    async def text_channel(request):
        assert request.headers["authorization"] == f"Bot {BOT_TOKEN}"
        return HttpResponse.json(400, {"title": "Channel is not a voice channel"})

    app.add("POST", "/api/bot/IVoice/v1/StreamToken", text_channel)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, app, "127.0.0.1", 0)
        import httpx

        endpoint = ArgonDial("argon", api_url=f"http://127.0.0.1:{port}/api/bot", bot_token=BOT_TOKEN,
                             limiter=StreamTokenLimiter(5), client=httpx.AsyncClient(), space_id=SPACE, channel_id=CHANNEL)
        err = await run_dial(endpoint)
        nursery.cancel_scope.cancel()
    assert err.status == 400 and err.permanent
    assert "channel is not a voice channel" in str(err) and CHANNEL in str(err)
    assert_no_secret(str(err), caplog.text)


async def test_rejected_upgrade_names_the_cause(tmp_path, caplog):
    """A stream token the ingress does not accept (here: expired) → 403 on the upgrade, as
    Argon's ingress answers (argon-voice-ws.md, "Authentication")."""
    caplog.set_level(logging.DEBUG)
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, CHANNEL_ROUTE, out=tmp_path)
        expired = issue_stream_token(JWT_SECRET, space_id=SPACE, channel_id=CHANNEL, identity="bot", now=time.time() - 3 * 3600)
        app = HttpServer()

        async def stale_token(request):
            return HttpResponse.json(200, {"token": expired, "ingressUrl": gateway.runtime.media_url(), "roomName": f"{SPACE}/{CHANNEL}"})

        app.add("POST", "/api/bot/IVoice/v1/StreamToken", stale_token)
        port = await nursery.start(serve_http, app, "127.0.0.1", 0)
        err = await run_dial(dial(gateway, api_url=f"http://127.0.0.1:{port}/api/bot"))
        nursery.cancel_scope.cancel()
    assert err.status == 403 and not err.permanent  # a fresh token may work: the route retries
    assert "stream token rejected" in str(err) and "expired" in str(err)
    assert expired not in str(err) and expired not in caplog.text
    assert_no_secret(str(err), caplog.text)


async def test_a_dozen_channels_start_within_the_rate_limit(tmp_path, mock_clock):
    """12 routes of one bot, StreamToken at 5 a minute: the shared limiter spaces the calls so
    the server never says 429, and all 12 have tokens within 3 minutes."""
    mock_clock.autojump_threshold = 0.05  # jump only when the process is really idle
    channels = [f"00000000-0000-0000-0000-0000000000{i:02d}" for i in range(12)]
    routes = "routes:\n" + "".join(
        f"  - name: c{i}\n    endpoints:\n      - argon: {{role: listen, space_id: {SPACE}, channel_id: {c}}}\n"
        f"      - record: {{path: \"$out/c{i}.wav\"}}\n"
        for i, c in enumerate(channels)
    )
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, routes, out=tmp_path)
        limiter = StreamTokenLimiter(5)
        issued: list[float] = []
        t0 = trio.current_time()

        async def get(channel):
            grant = await dial(gateway, channel=channel, limiter=limiter).stream_token()
            assert grant.room_name == f"{SPACE}/{channel}"
            issued.append(trio.current_time() - t0)

        async with trio.open_nursery() as calls:
            for c in channels:
                calls.start_soon(get, c)
        nursery.cancel_scope.cancel()
    assert len(issued) == 12
    assert max(issued) < 180
    issued.sort()
    for i in range(5, 12):  # never more than 5 in any 60 s window
        assert issued[i] - issued[i - 5] >= 60 - 0.01


async def test_429_is_retried_after_the_window(tmp_path, mock_clock, caplog):
    """A limiter allowing more than the server (misconfigured, or another process using the
    same bot): the server's 429 + Retry-After is honoured and every call still succeeds."""
    mock_clock.autojump_threshold = 0.05
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, CHANNEL_ROUTE, out=tmp_path)
        limiter = StreamTokenLimiter(100)
        t0 = trio.current_time()
        grants = []
        async with trio.open_nursery() as calls:
            for _ in range(7):
                calls.start_soon(lambda: _append(grants, dial(gateway, limiter=limiter).stream_token()))
        elapsed = trio.current_time() - t0
        nursery.cancel_scope.cancel()
    assert len(grants) == 7
    assert 55 <= elapsed < 130
    assert "rate limited" in caplog.text
    assert_no_secret(caplog.text)


async def _append(out, awaitable):
    out.append(await awaitable)


async def test_limiter_spaces_calls_fifo(autojump_clock):
    limiter = StreamTokenLimiter(5)
    times = []
    async with trio.open_nursery() as nursery:
        for _ in range(11):
            nursery.start_soon(lambda: _acquire(limiter, times))
    assert times == [0.0] * 5 + [60.0] * 5 + [120.0]


async def _acquire(limiter, times):
    await limiter.acquire()
    times.append(round(trio.current_time(), 3))


# ------------------------------------------------------------------------------ listen side
async def connect_bot(gateway, *, token=None, frame_duration_ms=20, stereo=False):
    """A bot written for Argon: StreamToken over HTTP, then the ingress WebSocket."""
    client = gateway.runtime.http_client()
    response = await client.post(
        f"http://127.0.0.1:{gateway.runtime.http.port}/api/bot/IVoice/v1/StreamToken",
        headers={"Authorization": f"Bot {BOT_TOKEN}"}, json={"spaceId": SPACE, "channelId": CHANNEL},
    )
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["roomName"] == f"{SPACE}/{CHANNEL}"
    params = IngressParams(token=token or data["token"], stereo=stereo, frame_duration_ms=frame_duration_ms, track_name="t")
    return build_ingress_url(data["ingressUrl"], "/audio/connect", params)


async def test_ingress_refuses_forged_token(tmp_path):
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, CHANNEL_ROUTE, out=tmp_path)
        forged = issue_stream_token("another-secret-of-32-bytes-or-more!!", space_id=SPACE, channel_id=CHANNEL,
                                    identity="x", now=time.time())
        url = await connect_bot(gateway, token=forged)
        with pytest.raises(ServiceError) as info:
            await dial_ws(nursery, url, service="bot", rejected=INGRESS_REJECTED)
        nursery.cancel_scope.cancel()
    assert info.value.status == 403  # Argon: a bad signature is 403 (a missing token 401)
    assert "stream token rejected" in str(info.value) and "signature" in str(info.value)
    assert forged not in str(info.value)


async def test_ingress_sends_ready_then_closes_on_malformed_packet(tmp_path):
    import numpy as np
    import opuslib

    encoder = opuslib.Encoder(48000, 1, opuslib.APPLICATION_AUDIO)
    good = encoder.encode(np.zeros(960, np.int16).tobytes(), 960)
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, CHANNEL_ROUTE, out=tmp_path)
        ws = await ws_client(nursery, await connect_bot(gateway))
        ready = json.loads(await ws.get_message())
        assert ready["status"] == "ready" and ready["session_id"]
        for _ in range(3):
            await ws.send_message(good)
        await ws.send_message(b"\x78")  # one byte: not a packet Argon accepts
        with pytest.raises(ConnectionClosed) as info:
            with trio.fail_after(5):
                while True:
                    await ws.get_message()
        channel = gateway.routes["channel"].route.endpoints[0]
        assert channel.stats.frames_in == 3
        nursery.cancel_scope.cancel()
    assert info.value.reason.code == 1007
    assert "Opus packet of 1 bytes: the ingress takes 2 to 3825 bytes" in info.value.reason.reason
