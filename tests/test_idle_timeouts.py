"""Idle upgraded connections on the listen paths are closed after a documented timeout, over
real loopback sockets (a whole gateway, tests/harness.start).

- VoIPBIN listen: a client that upgrades and sends no media message for `idle_timeout_s`
  (default `IDLE_TIMEOUT_S`, 60 s; shrunk here with monkeypatch) is closed with 1008 "idle
  timeout: ...", one warning names it, and the route ends that session normally: it is back
  to waiting (not restarting) and serves the next client at once. A client that keeps sending
  (audio, or empty RTP keepalives) stays; `idle_timeout_s: 0` keeps a silent client.
- Argon listen: the seed's bare "/" is /audio/connect, so its 60 s idle limit
  (`room.CONNECT_IDLE`, shrunk here) ends a session that publishes nothing, by dropping TCP
  without a close frame as Argon's server does.

Timing margins are generous for a loaded 2-core machine (-n 2): the short timeout is 0.5 s (1 s
where the client must keep sending in time), a closure must come no earlier than the timeout
(measured from before the client starts connecting) and within a few seconds after it.
"""

from __future__ import annotations

import logging

import pytest
import trio
from trio_websocket import ConnectionClosed

from gateway.adapters.argon import room as argon_room
from gateway.adapters.argon.listen import ArgonListenService
from gateway.adapters.voipbin import endpoint as voipbin_endpoint
from gateway.adapters.voipbin.wire import Audio, Codec, Encapsulation, MediaStreamProtocol
from gateway.demo import DEFAULT_AUDIO
from gateway.errors import ConfigError
from harness import VOIPBIN_TOKEN, start, ws_client
from test_argon_refusals import (
    EOF,
    OPUS_20MS,
    ROOM,
    RawWs,
    audio_target,
    channel_gateway,
    room_token,
)

IDLE = 0.5  # seconds: the shrunk idle timeout
LATE = 4.0  # seconds after the timeout by which the closure must have come (a loaded machine)

ROUTES = """\
routes:
  - name: call                       # a call that keeps playing (looped speech) to its client
    endpoints:
      - file: {path: "$audio", rate: 8000, loop: true}
      - voipbin: {role: listen, call_id: call-a$extra}
"""


def media_url(gateway, call_id: str = "call-a", encapsulation: str = "rtp") -> str:
    return (f"ws://127.0.0.1:{gateway.runtime.media.port}/v1.0/calls/{call_id}/media_stream"
            f"?encapsulation={encapsulation}&token={VOIPBIN_TOKEN}")


async def call_gateway(nursery, tmp_path, extra: str = ""):
    return await start(nursery, ROUTES, audio=DEFAULT_AUDIO, out=tmp_path, extra=extra)


async def until(condition, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


async def read_until_closed(ws, counter: list[int]) -> ConnectionClosed:
    """Read (and count the audio frames of) everything the gateway sends until it closes."""
    proto = MediaStreamProtocol(Encapsulation.RTP)
    while True:
        try:
            message = await ws.get_message()
        except ConnectionClosed as closed:
            return closed
        counter[0] += sum(isinstance(e, Audio) for e in proto.receive(message))


async def read_for(ws, seconds: float) -> int:
    """Audio frames received within `seconds`; fails if the gateway closes meanwhile."""
    frames = [0]
    with trio.move_on_after(seconds):
        closed = await read_until_closed(ws, frames)
        raise AssertionError(f"the gateway closed the client: {closed.reason}")
    return frames[0]


# ================================================================================= VoIPBIN
async def test_silent_voipbin_client_is_closed_after_the_idle_timeout(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(voipbin_endpoint, "IDLE_TIMEOUT_S", IDLE)  # the default of idle_timeout_s
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        gateway = await call_gateway(nursery, tmp_path)
        state = gateway.routes["call"]
        t0 = trio.current_time()  # before the upgrade: the closure cannot come before t0 + IDLE
        silent = await ws_client(nursery, media_url(gateway))
        frames = [0]
        with trio.fail_after(IDLE + LATE):
            closed = await read_until_closed(silent, frames)
        elapsed = trio.current_time() - t0
        assert IDLE <= elapsed < IDLE + LATE, elapsed
        assert closed.reason.code == 1008, closed.reason
        assert closed.reason.reason == "idle timeout: no media for 0.5 s", closed.reason
        assert frames[0] > 0  # it was served (the call played to it) until then

        # the session ended normally: back to waiting at once, no restart, no error
        await until(lambda: state.state == "waiting")
        assert state.restarts == 0 and state.last_error == "", (state.restarts, state.last_error)
        assert state.route.stats.ended_by == "voipbin: idle timeout: no media for 0.5 s (closed 1008)"

        # the next, honest client is served at once and is not closed while it sends audio
        t1 = trio.current_time()
        honest = await ws_client(nursery, media_url(gateway))
        sender = MediaStreamProtocol(Encapsulation.RTP, Codec.ULAW)

        async def talk() -> None:
            while True:
                await honest.send_message(sender.send_audio(b"\xff" * 160))
                await trio.sleep(0.1)

        nursery.start_soon(talk)
        got = await read_for(honest, 4 * IDLE)
        assert got >= 10, got
        assert trio.current_time() - t1 < 4 * IDLE + LATE
        assert state.state == "up" and state.restarts == 0
        nursery.cancel_scope.cancel()
    idle_lines = [r for r in caplog.records if "idle timeout" in r.getMessage() and r.name.startswith("gateway.endpoint")]
    assert len(idle_lines) == 1, [r.getMessage() for r in idle_lines]
    line = idle_lines[0]
    assert line.levelno == logging.WARNING
    assert line.getMessage().startswith("closing the media stream (1008): idle timeout: client ")
    assert "sent no media message for 0.5 s" in line.getMessage() and "idle_timeout_s: 0" in line.getMessage()
    assert VOIPBIN_TOKEN not in caplog.text


@pytest.mark.parametrize("keepalive", [False, True], ids=["audio", "empty-rtp-keepalive"])
async def test_voipbin_client_that_keeps_sending_is_not_closed(tmp_path, monkeypatch, keepalive):
    """Each well-formed media message moves the deadline: audio, or an RTP packet with no
    payload (the RFC 6263 keepalive). 1 s timeout, a message every 0.1 s, 3 s in all."""
    monkeypatch.setattr(voipbin_endpoint, "IDLE_TIMEOUT_S", 1.0)
    async with trio.open_nursery() as nursery:
        gateway = await call_gateway(nursery, tmp_path)
        ws = await ws_client(nursery, media_url(gateway))
        sender = MediaStreamProtocol(Encapsulation.RTP, Codec.ULAW)

        async def talk() -> None:
            while True:
                message = sender.send_audio(b"\xff" * 160)
                if keepalive:
                    message = message[:12]  # the RTP header alone: an empty payload
                await ws.send_message(message)
                await trio.sleep(0.1)

        nursery.start_soon(talk)
        assert await read_for(ws, 3.0) > 0
        assert gateway.routes["call"].state == "up"
        nursery.cancel_scope.cancel()


async def test_voipbin_audiosocket_frames_other_than_audio_count(tmp_path, monkeypatch):
    """AudioSocket: a UUID frame first, then only DTMF frames: well-formed media messages, so
    the client is not idle (it is a caller pressing keys)."""
    monkeypatch.setattr(voipbin_endpoint, "IDLE_TIMEOUT_S", 1.0)
    async with trio.open_nursery() as nursery:
        gateway = await call_gateway(nursery, tmp_path)
        ws = await ws_client(nursery, media_url(gateway, encapsulation="audiosocket"))
        sender = MediaStreamProtocol(Encapsulation.AUDIOSOCKET)

        async def press() -> None:
            await ws.send_message(sender.send_uuid("0f2d9a1c-7e11-4c8e-9d55-5b0e3f5e6a3b"))
            while True:
                await trio.sleep(0.2)
                await ws.send_message(sender.send_dtmf("5"))

        nursery.start_soon(press)
        with trio.move_on_after(3.0):
            while True:
                await ws.get_message()  # ConnectionClosed here fails the test
        assert gateway.routes["call"].state == "up"
        nursery.cancel_scope.cancel()


async def test_idle_timeout_zero_keeps_a_silent_receive_only_client(tmp_path, monkeypatch):
    """`idle_timeout_s: 0` (a recorder that only listens): never closed for silence, even with
    the default shrunk to 0.5 s."""
    monkeypatch.setattr(voipbin_endpoint, "IDLE_TIMEOUT_S", IDLE)
    async with trio.open_nursery() as nursery:
        gateway = await call_gateway(nursery, tmp_path, extra=", idle_timeout_s: 0")
        assert gateway.routes["call"].route.endpoints[1].idle_timeout == 0
        recorder = await ws_client(nursery, media_url(gateway))
        assert await read_for(recorder, 6 * IDLE) > 0
        assert gateway.routes["call"].state == "up"
        nursery.cancel_scope.cancel()


async def test_idle_timeout_option_from_the_config(tmp_path):
    """The option is the endpoint's (seconds, any value >= 0); a negative one is refused
    naming it, and the dial role has no such option."""
    async with trio.open_nursery() as nursery:
        gateway = await call_gateway(nursery, tmp_path, extra=", idle_timeout_s: 2.5")
        assert gateway.routes["call"].route.endpoints[1].idle_timeout == 2.5
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        gateway = await call_gateway(nursery, tmp_path)
        assert gateway.routes["call"].route.endpoints[1].idle_timeout == voipbin_endpoint.IDLE_TIMEOUT_S == 60.0
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        with pytest.raises(ConfigError, match=r"idle_timeout_s.*expected at least 0"):
            await call_gateway(nursery, tmp_path, extra=", idle_timeout_s: -1")
        nursery.cancel_scope.cancel()
    dial_route = ROUTES.replace("role: listen", "role: dial")
    async with trio.open_nursery() as nursery:
        with pytest.raises(ConfigError, match="idle_timeout_s"):
            await start(nursery, dial_route, audio=DEFAULT_AUDIO, out=tmp_path, extra=", idle_timeout_s: 5")
        nursery.cancel_scope.cancel()


# =================================================================================== Argon
async def test_argon_bare_path_is_connect_and_ends_when_idle(tmp_path, caplog, monkeypatch):
    """The seed's bare "/" is /audio/connect: no packet for CONNECT_IDLE ends the session
    (TCP dropped, no close frame: Argon's way); a bot that keeps publishing stays."""
    monkeypatch.setattr(argon_room, "CONNECT_IDLE", IDLE)
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        gateway = await channel_gateway(nursery, tmp_path)
        port = gateway.runtime.media.port
        t0 = trio.current_time()
        silent = await RawWs.open(port, audio_target("/", room_token()), timeout=IDLE + LATE)
        assert isinstance(silent, RawWs), (silent.status, silent.text)
        assert (await silent.status())["status"] == "ready"
        assert await silent.next() == EOF  # dropped, no close frame
        elapsed = trio.current_time() - t0
        assert IDLE <= elapsed < IDLE + LATE, elapsed
        await silent.aclose()

        # a publishing bot on the bare path is not idle (a packet every 0.1 s, 3 s, 1 s limit)
        monkeypatch.setattr(argon_room, "CONNECT_IDLE", 1.0)
        service_room = gateway.runtime.shared[ArgonListenService].rooms[ROOM]
        await until(lambda: not service_room.sessions)
        bot = await RawWs.open(port, audio_target("/", room_token()), timeout=10)
        assert isinstance(bot, RawWs)
        assert (await bot.status())["status"] == "ready"

        async def publish() -> None:
            while True:
                await bot.send(OPUS_20MS)
                await trio.sleep(0.1)

        nursery.start_soon(publish)
        with trio.move_on_after(3.0):
            message = await bot.next()
            raise AssertionError(f"the server sent {message!r} to a publishing bot")
        assert len(service_room.sessions) == 1
        nursery.cancel_scope.cancel()
    assert caplog.text.count("sent no packet for") == 1
    assert "on /audio/connect: ending its session" in caplog.text
