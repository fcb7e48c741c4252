"""Admission (issue 12): past its capacity the gateway refuses new sessions and degrades no call.

- The media clock monitor (`MediaClock`), pure, with synthetic times: steady ticks are not
  behind; a stall or sustained lag puts it behind; it recovers only after a calm period.
- The ticker ticks only while a session streams (`Admission.stream`): an idle gateway has no
  periodic task (600 virtual seconds pass at once with pytest-trio's autojump clock), and when
  the last session ends the clock stops and forgets its readings (not behind).
- A whole gateway on loopback with `server.max_sessions: 1`, or the media clock forced behind
  (`Admission.force_behind`, the public hook): a new VoIPBIN client gets 503 with Retry-After,
  the session REST calls (agent token) likewise, while the admitted call's audio arrives intact
  (every RTP packet in sequence, the looped speech still matches).
- A dial route waits (`held`) while the media clock is behind, `/readyz` says why, the metrics
  show it, and the route starts when admission reopens.
- An Argon bot's connections share one seat: its second connection (and a new StreamToken)
  is not refused at `server.max_sessions` once its first was admitted; another bot is.
- Config errors are clear.
"""

from __future__ import annotations

import audioop
import contextlib
import json
import logging
import math
import os
import time

import httpx
import numpy as np
import pytest
import trio
from trio_websocket import ConnectionRejected, connect_websocket_url

from audio_checks import assert_loop_heard, mono, read_wav
from gateway.adapters.voipbin.wire import Audio, Encapsulation, MediaStreamProtocol
from gateway.admission import (
    BLIND_SHARE,
    CALM_S,
    SESSION_COST_GUESS,
    STARTING_S,
    Admission,
    MachineCpu,
    MediaClock,
)
from gateway.config import GatewayConfig
from gateway.demo import DEFAULT_AUDIO
from gateway.errors import ConfigError
from gateway.metrics import render
from harness import BOT_TOKEN, VOIPBIN_TOKEN, Starvation, Timeline, start, ws_client
from test_argon_errors import CHANNEL, SPACE
from test_argon_refusals import ALICE, RawWs, Refusal, audio_target, open_audio, room_token

TICK = 0.020


def run_ticks(clock: MediaClock, start: float, seconds: float, lag: float = 0.0) -> float:
    """Wake the ticker `lag` s after each deadline for `seconds`; returns the time reached."""
    deadline = clock.start(start) if clock.next_deadline is None else clock.next_deadline
    end = start + seconds
    while deadline + lag < end:
        deadline = clock.tick(deadline + lag)
    return deadline


# ------------------------------------------------------------------------------ the monitor
def test_a_clock_served_on_time_is_not_behind():
    clock = MediaClock(0.010)
    run_ticks(clock, 0.0, 5.0, lag=0.002)  # 2 ms late every tick: a busy but healthy loop
    assert not clock.behind and clock.episodes == 0
    assert clock.lag == pytest.approx(0.002)


def test_sustained_lag_puts_the_clock_behind_and_it_recovers_after_a_calm_period():
    clock = MediaClock(0.010)
    now = run_ticks(clock, 0.0, 2.0, lag=0.001)
    now = run_ticks(clock, now, 0.5, lag=0.015)  # every slot 15 ms late
    assert clock.behind and clock.episodes == 1
    assert clock.lag == pytest.approx(0.015)
    behind_at = clock.behind_since
    assert behind_at is not None and now - 0.5 < behind_at < now - 0.3  # within the first 5 late slots

    # calm again: the late slots leave the 1 s window, then CALM_S more must pass
    calm_from = now
    now = run_ticks(clock, now, 0.5 + CALM_S, lag=0.001)
    assert clock.behind, "reopened before the calm period was over"
    now = run_ticks(clock, now, 0.6, lag=0.001)
    assert not clock.behind and clock.episodes == 1
    assert now - calm_from >= CALM_S
    assert clock.worst == pytest.approx(0.015)


def test_hysteresis_a_relapse_during_the_calm_period_restarts_it():
    clock = MediaClock(0.010)
    now = run_ticks(clock, 0.0, 1.5, lag=0.0)  # past the start-up window
    now = run_ticks(clock, now, 0.5, lag=0.020)
    assert clock.behind
    now = run_ticks(clock, now, 2.5, lag=0.0)  # calm for 1.5 s after the window cleared
    now = run_ticks(clock, now, 0.3, lag=0.030)  # relapse
    now = run_ticks(clock, now, 0.5 + CALM_S, lag=0.0)
    assert clock.behind and clock.episodes == 1  # one episode, never flapped
    run_ticks(clock, now, 0.6, lag=0.0)
    assert not clock.behind


def test_one_stall_is_not_an_overload_and_missed_slots_are_not_replayed():
    clock = MediaClock(0.010)
    deadline = clock.start(0.0)
    for _ in range(60):
        deadline = clock.tick(deadline)
    # one wake-up 450 ms late (a garbage collection of a big heap, a slow set-up)
    after = clock.tick(deadline + 0.450)
    assert deadline + 0.450 < after <= deadline + 0.450 + TICK  # the next slot after the stall
    for _ in range(60):
        after = clock.tick(after)
    assert not clock.behind and clock.episodes == 0


def test_repeated_stalls_are_an_overload():
    clock = MediaClock(0.010)
    deadline = clock.start(0.0)
    for _ in range(60):
        deadline = clock.tick(deadline)
    for i in range(50):  # every fifth wake-up 30 ms late: 20 % of them
        deadline = clock.tick(deadline + (0.030 if i % 5 == 0 else 0.0))
    assert clock.behind and clock.lag == pytest.approx(0.030)


def test_time_another_process_had_the_core_is_not_the_gateways_lag():
    clock = MediaClock(0.010)
    deadline = clock.start(0.0)
    for _ in range(100):  # every wake-up 25 ms late, 24 ms of it waiting for a core (OS run queue)
        deadline = clock.tick(deadline + 0.025, waited=0.024)
    assert not clock.behind and clock.lag == pytest.approx(0.001)


def test_nothing_is_judged_during_start_up():
    clock = MediaClock(0.010)
    deadline = clock.start(0.0)
    for _ in range(40):  # 0.8 s, every wake-up late (imports, the first routes starting)
        deadline = clock.tick(deadline + 0.015)
    assert not clock.behind and clock.lag == pytest.approx(0.015)
    for _ in range(20):
        deadline = clock.tick(deadline + 0.015)
    assert clock.behind


def test_threshold_0_never_falls_behind_and_force_is_explicit():
    clock = MediaClock(0.0)
    run_ticks(clock, 0.0, 1.0, lag=0.5)
    assert not clock.behind
    clock.force(0.040, now=1.0)
    assert clock.behind and clock.lag == 0.040
    clock.force(None, now=1.1)
    assert not clock.behind


def test_reset_forgets_the_readings_but_not_the_history():
    clock = MediaClock(0.010)
    now = run_ticks(clock, 0.0, 1.5, lag=0.0)
    run_ticks(clock, now, 0.5, lag=0.030)
    assert clock.behind and clock.episodes == 1
    ticks = clock.ticks
    clock.reset()
    assert not clock.behind and clock.lag == 0.0 and clock.next_deadline is None
    assert clock.episodes == 1 and clock.worst == pytest.approx(0.030) and clock.ticks == ticks
    deadline = clock.start(10.0)
    for _ in range(40):  # a fresh start-up window: 0.8 s of late ticks are not judged yet
        deadline = clock.tick(deadline + 0.015)
    assert not clock.behind and clock.lag == pytest.approx(0.015)
    clock.force(0.050, now=11.0)
    clock.reset()  # a forced lag outlives a reset
    assert clock.behind and clock.lag == 0.050


def test_bad_monitor_settings_are_refused():
    with pytest.raises(ValueError):
        MediaClock(-1)
    with pytest.raises(ValueError):
        MediaClock(0.01, window=0.001)


async def test_admission_counts_refusals_and_logs_once_per_spell(caplog):
    caplog.set_level(logging.INFO, logger="gateway.admission")
    admission = Admission(0.010, max_sessions=1)
    with admission.slot():
        for _ in range(20):
            refusal = admission.check("test session")
            assert refusal is not None and refusal.reason == "capacity" and refusal.retry_after >= 1
            assert "1 of server.max_sessions 1" in refusal.detail
    assert admission.open and admission.refused == {"overload": 0, "load": 0, "capacity": 20}
    closed = [r for r in caplog.records if "admission closed" in r.getMessage()]
    reopened = [r for r in caplog.records if "admission open again" in r.getMessage()]
    assert len(closed) == 1 and len(reopened) == 1 and "20 session(s) refused" in reopened[0].getMessage()

    admission.force_behind(0.034)
    refusal = admission.check()
    assert refusal is not None and refusal.reason == "overload"
    assert refusal.detail == "gateway at capacity (media clock 34 ms behind)"
    admission.force_behind(None)
    assert admission.open


async def test_admission_waiters_wake_when_it_reopens(autojump_clock):
    admission = Admission(0.010, max_sessions=1)
    holds: list[str] = []
    started = []

    async def dial(name):
        await admission.wait_open(lambda refusal: holds.append(refusal.detail))
        with admission.slot():
            started.append(name)
            await trio.sleep(10)

    async with trio.open_nursery() as nursery:
        admission.force_behind(0.050)
        nursery.start_soon(dial, "a")
        nursery.start_soon(dial, "b")
        await trio.sleep(5)
        assert started == [] and admission.held == 2
        assert holds[0] == "gateway at capacity (media clock 50 ms behind)"
        admission.force_behind(None)
        await trio.sleep(1)
        assert len(started) == 1  # the cap lets one through, the other keeps waiting
        assert any("max_sessions" in text for text in holds)
        await trio.sleep(10)
        assert len(started) == 2


async def test_the_ticker_sees_a_saturated_event_loop(caplog):
    """A loop with more work than time (a task holding it 30 ms at every turn) closes admission
    while a session streams: not a timing assertion, only the state it leads to. When that
    session ends, the ticker stops and admission is open again at once (nothing streams:
    nothing to protect), however busy the loop stays."""
    caplog.set_level(logging.INFO, logger="gateway.admission")
    admission = Admission(0.010)

    async def hog():
        while True:
            time.sleep(0.030)  # noqa: ASYNC251 - the point: hold the event loop
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(admission.run)
        nursery.start_soon(hog)
        with admission.stream():
            with trio.fail_after(10):
                while admission.open:
                    await trio.sleep(0.02)
            assert admission.clock.episodes == 1 and admission.refusal().reason == "overload"
        assert admission.open and admission.streaming == 0
        assert not admission.clock.behind and admission.clock.lag == 0.0
        ticks = admission.clock.ticks
        await trio.sleep(0.3)
        assert admission.clock.ticks == ticks and admission.open, "the ticker ran on with nothing streaming"
        nursery.cancel_scope.cancel()
    assert "admission open again" in caplog.text


async def test_the_media_clock_ticks_only_while_a_session_streams(autojump_clock):
    admission = Admission(0.010)
    clock = admission.clock
    async with trio.open_nursery() as nursery:
        nursery.start_soon(admission.run)
        await trio.sleep(600)  # idle: no timer at all, so the autojump clock gets there at once
        assert clock.ticks == 0 and clock.next_deadline is None
        with admission.stream():
            with admission.stream():  # two sessions up, one ticker
                await trio.sleep(1.0)
            await trio.sleep(1.0)
            assert 95 <= clock.ticks <= 100 and clock.next_deadline is not None
            assert not clock.behind  # every autojumped wake-up is on time
        ticks = clock.ticks
        await trio.sleep(600)
        assert clock.ticks == ticks and clock.next_deadline is None
        admission.configure(0.0, None)  # admission_lag_ms: 0: no ticks even while streaming
        with admission.stream():
            await trio.sleep(600)
        assert clock.ticks == ticks
        admission.configure(0.010, None)
        with admission.stream():
            await trio.sleep(0.5)
            assert clock.ticks > ticks
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------ listen, e2e
ROUTES = """\
routes:
  - name: call-a
    endpoints:
      - file: {path: "$audio", rate: 8000, loop: true}
      - voipbin: {role: listen, call_id: call-a}
  - name: call-b
    endpoints:
      - file: {path: "$audio", rate: 8000, loop: true}
      - voipbin: {role: listen, call_id: call-b}
  - name: agent-line
    endpoints:
      - agent: {role: listen}
      - file: {path: "$audio", rate: 16000, loop: true}
  - name: channel
    endpoints:
      - argon: {role: listen, space_id: %s, channel_id: %s}
      - record: {path: "$out/channel.wav"}
""" % (SPACE, CHANNEL)


def media_url(gateway, call_id: str) -> str:
    return (f"ws://127.0.0.1:{gateway.runtime.media.port}/v1.0/calls/{call_id}/media_stream"
            f"?encapsulation=rtp&token={VOIPBIN_TOKEN}")


class Caller:
    """A VoIPBIN media-stream client keeping every audio payload it receives, in order."""

    def __init__(self) -> None:
        self.proto = MediaStreamProtocol(Encapsulation.RTP)
        self.audio: list[Audio] = []
        self.arrived = Timeline(8000)  # when each of `audio` arrived

    async def run(self, nursery, url, *, task_status=trio.TASK_STATUS_IGNORED):
        ws = await ws_client(nursery, url)
        task_status.started(ws)
        while True:
            for event in self.proto.receive(await ws.get_message()):
                if isinstance(event, Audio):
                    self.audio.append(event)
                    self.arrived.add(trio.current_time(), len(event.payload))

    async def packets(self, n: int) -> None:
        with trio.fail_after(20):
            while len(self.audio) < n:
                await trio.sleep(0.02)

    def check_intact(self, starvation: Starvation | None = None) -> None:
        """Every packet in sequence (none lost) and the speech matching the looped file (but
        for the audio `starvation`'s stretches reached: audio_checks.assert_loop_heard)."""
        sequences = [a.sequence for a in self.audio]
        assert all((b - a) % 65536 == 1 for a, b in zip(sequences, sequences[1:])), "a packet went missing"
        assert sum(a.lost for a in self.audio) == 0 and all(len(a.payload) == 160 for a in self.audio)
        pcm = np.frombuffer(b"".join(audioop.ulaw2lin(a.payload, 2) for a in self.audio), np.int16)
        clip, rate = read_wav(DEFAULT_AUDIO)
        assert_loop_heard(clip, rate, mono(pcm), 8000, "the call", starvation=starvation, timeline=self.arrived)


async def refused(url: str, nursery) -> ConnectionRejected:
    """Connect in a nursery of its own and return the refusal (trio-websocket raises it from its
    reader task, into the nursery the connection was opened in)."""
    rejected: BaseException | None = None
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as own:
                await connect_websocket_url(own, url)
    except* ConnectionRejected as group:
        rejected = group
        while isinstance(rejected, BaseExceptionGroup):
            rejected = rejected.exceptions[0]
    assert isinstance(rejected, ConnectionRejected), f"{url} was not refused"
    return rejected


async def test_past_max_sessions_a_new_session_is_refused_and_the_admitted_call_stays_intact(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    starvation = Starvation()  # the call's audio a stall of the machine reached is not judged
    async with trio.open_nursery() as nursery:
        nursery.start_soon(starvation.run)
        gateway = await start(nursery, ROUTES, audio=DEFAULT_AUDIO, out=tmp_path, server_extra=", max_sessions: 1")
        admission = gateway.runtime.admission
        caller = Caller()
        await nursery.start(caller.run, nursery, media_url(gateway, "call-a"))
        await caller.packets(25)

        for _ in range(5):  # a crowd knocking again and again
            rejected = await refused(media_url(gateway, "call-b"), nursery)
            assert rejected.status_code == 503
            assert dict(rejected.headers)[b"retry-after"] == b"1"
            assert b"gateway at capacity (1 of server.max_sessions 1 sessions)" in rejected.body
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.runtime.http.port}") as http:
            token = await http.post("/api/v1/sdk/token", json={}, headers={"x-api-key": "nope"})
            assert token.status_code == 503 and token.headers["retry-after"] == "1"
            assert "max_sessions" in token.json()["error"]
            for prefix in ("", "/api/bot"):  # Argon's StreamToken, in its own error shape
                stream = await http.post(prefix + "/IVoice/v1/StreamToken", json={"channelId": CHANNEL},
                                         headers={"authorization": f"Bot {BOT_TOKEN}"})
                assert stream.status_code == 503 and stream.headers["retry-after"] == "1"
                assert stream.json()["error"] == "service_unavailable"
                assert "gateway at capacity" in stream.json()["message"]
            me = await http.get("/IBotSelf/v1/GetMe", headers={"authorization": f"Bot {BOT_TOKEN}"})
            assert me.status_code != 503  # only calls that start a session are refused
            ready = await http.get("/readyz")
            assert ready.status_code == 503
            body = ready.json()
            assert body["admission"]["open"] is False and body["admission"]["sessions"] == 1
            assert "max_sessions" in body["admission"]["reason"]
        assert gateway.routes["call-b"].state == "waiting" and gateway.routes["call-b"].route.stats.sessions == 0

        ticks = admission.clock.ticks
        await caller.packets(len(caller.audio) + 75)  # the admitted call carries on, 1.5 s more
        caller.check_intact(starvation)
        # the call keeps the clock ticking: 75 ticks in 1.5 s, fewer only for wake-ups over 20 ms late
        assert admission.streaming == 1 and admission.clock.ticks - ticks >= 25, admission.clock.ticks - ticks
        text = render(gateway)[0].decode()
        assert 'gateway_sessions_refused_total{reason="capacity"} 8.0' in text
        assert "gateway_admission_open 0.0" in text and "gateway_sessions_active 1.0" in text
        assert "gateway_sessions_max 1.0" in text
        nursery.cancel_scope.cancel()
    closed = [r for r in caplog.records if "admission closed" in r.getMessage()]
    assert len(closed) == 1, "one log line per spell, not per refusal"


async def test_while_the_media_clock_is_behind_new_sessions_get_503_and_the_admitted_call_stays_intact(tmp_path):
    starvation = Starvation()  # the call's audio a stall of the machine reached is not judged
    async with trio.open_nursery() as nursery:
        nursery.start_soon(starvation.run)
        gateway = await start(nursery, ROUTES, audio=DEFAULT_AUDIO, out=tmp_path)
        admission = gateway.runtime.admission
        caller = Caller()
        await nursery.start(caller.run, nursery, media_url(gateway, "call-a"))
        await caller.packets(25)

        admission.force_behind(0.034)
        rejected = await refused(media_url(gateway, "call-b"), nursery)
        assert rejected.status_code == 503 and dict(rejected.headers)[b"retry-after"] == b"3"
        assert b"gateway at capacity (media clock 34 ms behind)" in rejected.body
        await caller.packets(len(caller.audio) + 50)

        admission.force_behind(None)  # caught up: the next client is served
        other = Caller()
        await nursery.start(other.run, nursery, media_url(gateway, "call-b"))
        await other.packets(10)
        await caller.packets(len(caller.audio) + 25)
        caller.check_intact(starvation)
        assert admission.refused["overload"] == 1
        text = render(gateway)[0].decode()
        assert "gateway_admission_open 1.0" in text and "gateway_media_clock_behind_total 1.0" in text
        assert 'gateway_sessions_refused_total{reason="overload"} 1.0' in text
        nursery.cancel_scope.cancel()


async def test_an_idle_gateway_has_no_media_clock_ticking(tmp_path, mock_clock):
    """With no session up, the gateway has no 20 ms task: virtual time jumps over 600 s at once
    (the ticker used to hold trio's MockClock back, so tests waiting out a 60 s rate-limit
    window in virtual time ran for minutes)."""
    mock_clock.autojump_threshold = 0.05  # start-up does real I/O: jump only when really idle
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, ROUTES, audio=DEFAULT_AUDIO, out=tmp_path)
        admission = gateway.runtime.admission
        assert admission.clock.threshold > 0 and admission.streaming == 0
        mock_clock.autojump_threshold = 0  # nothing else to wait for now
        began, t0 = time.monotonic(), trio.current_time()
        await trio.sleep(600)
        assert trio.current_time() - t0 >= 600
        assert admission.clock.ticks == 0 and admission.clock.next_deadline is None
        assert time.monotonic() - began < 20, "600 virtual seconds took long: something ticks"
        assert admission.open
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------ Argon seats
async def test_an_argon_bots_second_connection_shares_its_seat_at_max_sessions(tmp_path):
    """`server.max_sessions: 1` (and the Argon role's own `max_sessions: 1`): a bot admitted
    once is one session, whatever it opens next with its grant (a new StreamToken, a second
    socket that takes its place in the room); a VoIPBIN caller and another bot are refused."""
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, ROUTES, audio=DEFAULT_AUDIO, out=tmp_path, server_extra=", max_sessions: 1",
                              argon_extra=", max_sessions: 1")
        admission = gateway.runtime.admission
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.runtime.http.port}") as http:
            async def stream_token() -> httpx.Response:
                return await http.post("/IVoice/v1/StreamToken", json={"spaceId": SPACE, "channelId": CHANNEL},
                                       headers={"authorization": f"Bot {BOT_TOKEN}"})

            issued = await stream_token()
            assert issued.status_code == 200, issued.text
            token = issued.json()["token"]
            first = await open_audio(gateway, audio_target("/audio/connect", token))
            assert isinstance(first, RawWs), (first.status, first.text)
            assert (await first.status())["status"] == "ready"
            assert admission.sessions == 1 and admission.streaming == 1

            again = await stream_token()  # the bot in the room asks anew: not a new session
            assert again.status_code == 200, again.text
            second = await open_audio(gateway, audio_target("/audio/duplex", again.json()["token"],
                                                            target_identity=ALICE))
            assert isinstance(second, RawWs), (second.status, second.text)
            assert (await second.status())["status"] in ("ready", "waiting", "subscribed")
            assert await first.next() == "EOF"  # taken over: one identity per room
            with trio.fail_after(5):
                while admission.streaming != 1:
                    await trio.sleep(0.01)
            assert admission.sessions == 1

            refused_caller = await refused(media_url(gateway, "call-a"), nursery)
            assert refused_caller.status_code == 503
            other_bot = await open_audio(gateway, audio_target("/audio/connect", room_token(identity="other-bot")))
            assert isinstance(other_bot, Refusal) and other_bot.status == 503
            assert "gateway at capacity" in other_bot.text
            forged = await open_audio(gateway, audio_target("/audio/connect", room_token(secret="x" * 32)))
            assert isinstance(forged, Refusal) and forged.status == 503  # names no seat: admission decides
            assert admission.refused["capacity"] == 3

            await second.close()
            with trio.fail_after(5):
                while admission.sessions:
                    await trio.sleep(0.01)
            assert admission.streaming == 0 and admission.open
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("status, code", [
    (503, "service_unavailable"), (429, "rate_limited"), (413, "payload_too_large"), (400, "bad_request"),
    (408, "bad_request"),
])
def test_argon_calls_refused_before_their_handler_carry_the_code_of_their_status(status, code):
    from gateway.adapters.argon.listen import ArgonListenService

    response = ArgonListenService._refused(status, "why")
    assert response.status == status and json.loads(response.body) == {"error": code, "message": "why"}


# -------------------------------------------------------------------------------- dial
DIAL_ROUTES = """\
routes:
  - name: callee
    endpoints:
      - voipbin: {role: listen, call_id: dialed}
      - record: {path: "$out/callee.wav"}
  - name: dialer
    endpoints:
      - file: {path: "$audio", rate: 8000, loop: true}
      - voipbin: {call_id: dialed, encapsulation: rtp}
"""


async def test_a_dial_route_waits_while_behind_and_readyz_says_why(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, DIAL_ROUTES, audio=DEFAULT_AUDIO, out=tmp_path,
                              prepare=lambda gw: gw.runtime.admission.force_behind(0.045))
        dialer = gateway.routes["dialer"]
        assert dialer.state == "held"
        assert dialer.reason == "waiting: gateway at capacity (media clock 45 ms behind)"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.runtime.http.port}") as http:
            ready = await http.get("/readyz")
            assert ready.status_code == 503
            body = ready.json()
            assert body["not_ready"] == {"dialer": "held"}
            assert body["held"] == {"dialer": "waiting: gateway at capacity (media clock 45 ms behind)"}
            assert body["admission"] == {"open": False, "reason": "gateway at capacity (media clock 45 ms behind)",
                                         "media_clock_lag_ms": 45.0, "loop_cpu_percent": 0.0,
                                         "machine_cpu_percent": 0.0, "sessions": 0,
                                         "max_sessions": None}
            assert "admission closed" in body["status"]
            route = (await http.get("/v1/routes/dialer")).json()
            assert route["state"] == "held" and route["reason"].startswith("waiting: gateway at capacity")
            text = render(gateway)[0].decode()
            assert 'gateway_route_state{route="dialer",state="held"} 1.0' in text
            assert "gateway_media_clock_lag_seconds 0.045" in text and "gateway_routes_held_total 1.0" in text
            assert gateway.routes["callee"].route.stats.sessions == 0  # nothing was dialed

            gateway.runtime.admission.force_behind(None)
            with trio.fail_after(10):
                while not (dialer.state == "up" and gateway.routes["callee"].state == "up"):
                    await trio.sleep(0.02)
            assert dialer.reason == ""
            ready = await http.get("/readyz")
            assert ready.status_code == 200 and ready.json()["admission"]["open"] is True
            assert gateway.runtime.admission.sessions == 2  # the dial route and the media connection it made
            assert gateway.runtime.admission.streaming == 2  # both up: the media clock ticks
        nursery.cancel_scope.cancel()
    assert "not starting yet: gateway at capacity (media clock 45 ms behind)" in caplog.text


async def test_a_held_dial_route_stops_at_once(tmp_path):
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, DIAL_ROUTES, audio=DEFAULT_AUDIO, out=tmp_path,
                              prepare=lambda gw: gw.runtime.admission.force_behind(0.045))
        assert gateway.routes["dialer"].state == "held"
        with trio.fail_after(5):
            await gateway.stop()
        assert gateway.routes["dialer"].state == "stopped" and gateway.routes["dialer"].finished.is_set()
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------ CPU budget
def test_the_clock_reads_the_loops_share_of_a_core():
    clock = MediaClock(0.020)
    deadline, cpu = clock.start(100.0), 7.0
    while deadline < 100.4:  # under half a window: no reading yet
        cpu += 0.6 * TICK
        deadline = clock.tick(deadline, cpu=cpu)
    assert clock.busy is None
    while deadline < 102.0:  # 60 % of every 20 ms slot spent working
        cpu += 0.6 * TICK
        deadline = clock.tick(deadline, cpu=cpu)
    assert clock.busy == pytest.approx(0.6, abs=0.01)
    while deadline < 102.5:  # then half a second at 10 %: the reading covers the last second only
        cpu += 0.1 * TICK
        deadline = clock.tick(deadline, cpu=cpu)
    assert clock.busy == pytest.approx(0.35, abs=0.02)
    assert not clock.behind  # on time: the lag rule is another matter
    clock.reset()
    assert clock.busy is None


async def test_a_cpu_budget_admits_a_crowd_by_batches_of_what_fits(autojump_clock):
    """Nothing measured yet: each start counts SESSION_COST_GUESS (5 % of a core), and only
    half the budget (BLIND_SHARE) may be filled. Once the loop's share is read, the whole
    budget is open and each new start counts what one settled session costs."""
    assert SESSION_COST_GUESS == 0.05 and BLIND_SHARE == 0.5
    admission = Admission(0.020, cpu_limit=0.33)
    with contextlib.ExitStack() as sessions:
        admitted = 0
        while (refusal := admission.check("dial route start")) is None:
            sessions.enter_context(admission.slot())
            sessions.enter_context(admission.stream())
            admitted += 1
        assert admitted == 3  # 3 x 5 % = 15 %; a 4th would make 20 % > half of 33 %
        assert refusal.reason == "load" and admission.refused["load"] == 1
        assert refusal.detail == ("gateway at capacity (loop 0 % of a core, 3 session(s) starting, 20 % projected "
                                  "with one more; server.admission_cpu_percent 33, 50 % of it until it is measured)")
        await trio.sleep(STARTING_S)  # they have started: their cost is in the reading from now on
        clock, cpu = admission.clock, 0.0
        deadline = clock.start(trio.current_time())
        while deadline < trio.current_time() + 1.0:  # the 3 sessions cost 6 % of a core: 2 % each
            cpu += 0.06 * TICK
            deadline = clock.tick(deadline, cpu=cpu)
        await trio.sleep_until(deadline)
        assert clock.busy == pytest.approx(0.06, abs=0.005)
        more = 0
        while (refusal := admission.check("dial route start")) is None:
            sessions.enter_context(admission.slot())
            more += 1
        assert more == 13  # the whole budget now: 6 % + 13 x 2 % = 32 %; a 14th would make 34 %
        assert refusal.detail.endswith("server.admission_cpu_percent 33)")
        assert admission.sessions == 16
    assert admission.sessions == 0 and admission.open  # all ended: nothing starting, nothing measured


@pytest.mark.parametrize("percent, fits", [(60, 6), (30, 3), (10, 1), (4, 1)])
async def test_a_budget_admits_half_its_whole_number_of_guesses_before_it_is_measured(autojump_clock, percent, fits):
    """60 % is 12 guesses of 5 %: 6 fit in its blind half, not a hair fewer (rounding). A
    budget below one guess still lets one session start (and then one more once it has
    settled, STARTING_S later): only streaming sessions produce the reading."""
    admission = Admission(0.020, cpu_limit=percent / 100)  # as the config gives it
    with contextlib.ExitStack() as sessions:
        admitted = 0
        while admission.check() is None:
            sessions.enter_context(admission.slot())
            admitted += 1
        assert admitted == fits  # fits x 5 % is half the budget itself, not a rounding error over it
        await trio.sleep(STARTING_S + 0.1)  # settled: no reading yet (nothing streams), a next one may start
        assert admission.check() is None


MANY_DIAL_ROUTES = "routes:\n" + "".join(f"""\
  - name: bot-{n}
    endpoints:
      - file: {{path: "$audio", rate: 8000, loop: true}}
      - record: {{path: "$out/bot-{n}.wav"}}
""" for n in range(6))


async def test_dial_routes_starting_together_wait_for_the_cpu_budget_and_readyz_says_why(tmp_path, mock_clock,
                                                                                         caplog):
    """Six dial routes at boot with a 10 % budget: nothing is measured yet, so each start is
    taken to cost 5 % and half the budget is open: one starts, five are held (state, reason,
    /readyz), and a reload that lifts the budget starts them. The clock stands still (virtual
    time), so no reading or ageing changes the count while it is checked."""
    caplog.set_level(logging.INFO)
    mock_clock.autojump_threshold = math.inf
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, MANY_DIAL_ROUTES, audio=DEFAULT_AUDIO, out=tmp_path,
                              server_extra=", admission_cpu_percent: 10")
        admission = gateway.runtime.admission
        assert admission.cpu_limit == 0.10
        held = sorted(name for name, state in gateway.routes.items() if state.state == "held")
        assert len(held) == 5 and admission.sessions == 1, {n: s.state for n, s in gateway.routes.items()}
        reason = ("gateway at capacity (loop 0 % of a core, 1 session(s) starting, 10 % projected with one more; "
                  "server.admission_cpu_percent 10, 50 % of it until it is measured)")
        assert {gateway.routes[name].reason for name in held} == {f"waiting: {reason}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.runtime.http.port}") as http:
            ready = await http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["admission"]["reason"] == reason
        assert ready.json()["held"] == {name: f"waiting: {reason}" for name in held}
        assert f"not starting yet: {reason}" in caplog.text
        assert "admission closed: " + reason in caplog.text

        gateway.runtime.admission.configure(0.020, None, 0.0)  # what a reload to admission_cpu_percent: 0 does
        for _ in range(50):
            await trio.testing.wait_all_tasks_blocked()
        assert admission.sessions == 6 and not [s for s in gateway.routes.values() if s.state == "held"]
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------ machine budget
def test_the_machine_counters_are_read_from_proc_stat(tmp_path, caplog):
    """The first line of /proc/stat, in clock ticks: busy is all but idle and iowait (steal,
    the hypervisor's share, counts as busy); no file or a line that is not `cpu` gives None."""
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 50 800 20 3 2 10 0 0\ncpu0 50 2 25 400 10 1 1 5 0 0\nintr 12345 0 0\n")
    reader = MachineCpu(str(stat))
    assert reader.read() == (170.0, 990.0)  # 100+5+50+3+2+10 busy of 990
    reader.close()
    stat.write_text("intr 1 2 3\n")
    assert MachineCpu(str(stat)).read() is None
    missing = MachineCpu(str(tmp_path / "none"))
    assert missing.read() is None and missing.read() is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"server.admission_machine_cpu_percent: cannot read {tmp_path / 'none'}: the machine "
                        "budget counts only the gateway's own sessions"]  # once, not per read
    real = MachineCpu().read()  # this machine's, where it is Linux
    assert real is None or 0 <= real[0] <= real[1]


def test_the_clock_reads_the_machines_share_of_its_cores():
    clock = MediaClock(0.020)
    deadline, busy, total = clock.start(50.0), 1000.0, 4000.0
    while deadline < 51.5:  # 2 CPUs at 100 ticks a second: 200 ticks a second, 130 of them busy (65 %)
        busy, total = busy + 130 * TICK, total + 200 * TICK
        deadline = clock.tick(deadline, machine=(busy, total))
    assert clock.machine_busy == pytest.approx(0.65, abs=0.01)
    assert clock.busy is None  # the loop's own share is another reading
    clock.reset()
    assert clock.machine_busy is None


@pytest.mark.parametrize("workers, fits", [(1, 3), (2, 1)])
async def test_a_machine_budget_counts_every_process_on_the_cores(autojump_clock, workers, fits):
    """2 CPUs, an 80 % machine budget. The gateway's loop uses 20 % of a core for 4 sessions
    (5 % each: 2.5 % of the machine), and with a neighbour the machine is 71 % busy in all:
    three more fit (71 + 3 x 2.5 = 78.5 %), a fourth would make 81 % with the three still
    starting: refused, reason `load`, the text names the machine; the loop's own budget had
    room. With 2 workers each counts its starts twice (the other reads the same machine and
    may be starting as many): one fits (71 + 2 x 2.5 = 76 %), a second would make 81 %."""
    admission = Admission(0.020, cpu_limit=0.9, machine_limit=0.80, cpus=2, workers=workers)
    clock = admission.clock
    with contextlib.ExitStack() as sessions:
        for _ in range(4):
            sessions.enter_context(admission.slot())
            sessions.enter_context(admission.stream())
        await trio.sleep(STARTING_S)
        deadline, cpu, busy, total = clock.start(trio.current_time()), 0.0, 0.0, 0.0
        while deadline < trio.current_time() + 1.0:
            cpu += 0.20 * TICK
            busy, total = busy + 142 * TICK, total + 200 * TICK  # 71 % of 2 CPUs
            deadline = clock.tick(deadline, cpu=cpu, machine=(busy, total))
        await trio.sleep_until(deadline)
        assert clock.busy == pytest.approx(0.20, abs=0.005) and clock.machine_busy == pytest.approx(0.71, abs=0.005)
        more = 0
        while (refusal := admission.check("dial route start")) is None:
            sessions.enter_context(admission.slot())
            more += 1
        assert more == fits
        assert refusal.reason == "load" and admission.refused["load"] == 1
        assert refusal.detail == (f"machine at capacity (2 CPU(s) 71 % busy, {fits} session(s) starting, 81 % "
                                  "projected with one more; server.admission_machine_cpu_percent 80)")
        assert admission.projected_load()[2] <= 0.40 + 0.01  # the loop's budget (90 %) had room
        admission.configure(0.020, None, 0.9, 0.0)  # a reload to admission_machine_cpu_percent: 0
        assert admission.check() is None


async def test_a_machine_budget_without_proc_stat_is_judged_on_the_loops_reading(autojump_clock):
    """Where /proc/stat cannot be read, the machine's share is never measured: once the loop's
    own share is, the whole budget opens (it is not blind for ever). 2 CPUs, one worker, 4
    settled sessions at 5 % of a core each (2.5 % of the machine each), a 30 % budget: with
    the machine unmeasured, 6 starts of 2.5 % fit its blind half; judged on the loop's reading,
    6 more (12 x 2.5 % = 30 %)."""
    admission = Admission(0.020, machine_limit=0.30, cpus=2)
    clock = admission.clock
    with contextlib.ExitStack() as sessions:
        for _ in range(4):
            sessions.enter_context(admission.slot())
            sessions.enter_context(admission.stream())
        await trio.sleep(STARTING_S + 0.1)
        deadline, cpu = clock.start(trio.current_time()), 0.0
        while deadline < trio.current_time() + 1.0:
            cpu += 0.20 * TICK
            deadline = clock.tick(deadline, cpu=cpu)  # no machine counters: none could be read
        await trio.sleep_until(deadline)
        assert clock.busy == pytest.approx(0.20, abs=0.005) and clock.machine_busy is None

        def admit():
            n = 0
            while (refusal := admission.check()) is None:
                sessions.enter_context(admission.slot())
                n += 1
            return n, refusal

        blind, refusal = admit()
        assert blind == 6 and refusal.detail.endswith("50 % of it until it is measured)")
        admission.machine_unreadable = True  # what the ticker sets from MachineCpu.missing
        more, refusal = admit()
        assert more == 6 and refusal.detail.endswith("server.admission_machine_cpu_percent 30)")


async def test_dial_routes_at_boot_wait_for_the_machine_budget_and_readyz_says_why(tmp_path, mock_clock, caplog):
    """`server.admission_machine_cpu_percent: 5` on this machine's N CPUs, N + 2 dial routes at
    boot: nothing measured, each start is taken to cost 5 % of a core (5/N % of the machine)
    and half the budget is open, so N // 2 start (at least one) and the others are held, with
    the machine in their reason and in /readyz's."""
    caplog.set_level(logging.INFO)
    mock_clock.autojump_threshold = math.inf
    cpus = os.cpu_count() or 1
    routes = "routes:\n" + "".join(f"""\
  - name: bot-{n}
    endpoints:
      - file: {{path: "$audio", rate: 8000, loop: true}}
      - record: {{path: "$out/bot-{n}.wav"}}
""" for n in range(cpus + 2))
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, routes, audio=DEFAULT_AUDIO, out=tmp_path,
                              server_extra=", admission_machine_cpu_percent: 5")
        admission = gateway.runtime.admission
        assert admission.machine_limit == 0.05 and admission.cpus == cpus
        held = sorted(name for name, state in gateway.routes.items() if state.state == "held")
        fits = max(1, cpus // 2)
        assert len(held) == cpus + 2 - fits and admission.sessions == fits, {n: s.state for n, s in gateway.routes.items()}
        reason = (f"machine at capacity ({cpus} CPU(s) 0 % busy, {fits} session(s) starting, "
                  f"{5 * (fits + 1) / cpus:.0f} % projected with one more; server.admission_machine_cpu_percent 5, "
                  "50 % of it until it is measured)")
        assert {gateway.routes[name].reason for name in held} == {f"waiting: {reason}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.runtime.http.port}") as http:
            ready = await http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["admission"]["reason"] == reason
        assert "admission closed: " + reason in caplog.text
        admission.configure(0.020, None, 0.0, 0.0)
        for _ in range(50):
            await trio.testing.wait_all_tasks_blocked()
        assert admission.sessions == cpus + 2 and not [s for s in gateway.routes.values() if s.state == "held"]
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------ config
SERVER = "server: {media: '127.0.0.1:0'%s}\nroutes: []\n"


def test_admission_config_defaults_and_values():
    server = GatewayConfig.from_text(SERVER % "", "g.yaml").server
    assert server.admission_lag_ms == 20 and server.max_sessions is None
    assert server.admission_cpu_percent == 0 and server.admission_machine_cpu_percent == 0
    server = GatewayConfig.from_text(SERVER % ", admission_lag_ms: 0, max_sessions: 40, admission_cpu_percent: 80, "
                                              "admission_machine_cpu_percent: 85", "g.yaml").server
    assert server.admission_lag_ms == 0 and server.max_sessions == 40 and server.admission_cpu_percent == 80
    assert server.admission_machine_cpu_percent == 85


@pytest.mark.parametrize("extra, message", [
    (", admission_lag_ms: -5", "g.yaml:1: server.admission_lag_ms: expected at least 0, got -5"),
    (", admission_lag_ms: 5000", "g.yaml:1: server.admission_lag_ms: expected at most 1000, got 5000"),
    (", admission_lag_ms: fast", "g.yaml:1: server.admission_lag_ms: expected an integer, got 'fast'"),
    (", max_sessions: 0", "g.yaml:1: server.max_sessions: expected at least 1, got 0"),
    (", admission_cpu_percent: 150", "g.yaml:1: server.admission_cpu_percent: expected at most 100, got 150"),
    (", admission_machine_cpu_percent: -1",
     "g.yaml:1: server.admission_machine_cpu_percent: expected at least 0, got -1"),
    (", max_sessions: many", "g.yaml:1: server.max_sessions: expected an integer, got 'many'"),
])
def test_admission_config_errors_name_the_key(extra, message):
    with pytest.raises(ConfigError) as err:
        GatewayConfig.from_text(SERVER % extra, "g.yaml")
    assert message in str(err.value)


# ------------------------------------------------------------------------------ reload
RELOAD_CONFIG = """\
server: {http: "127.0.0.1:0", media: "127.0.0.1:0"%s}
services:
  voipbin: {token: "%s", api_url: "http://127.0.0.1:9"}
routes:
  - name: call-a
    endpoints:
      - file: {path: "%s", rate: 8000, loop: true}
      - voipbin: {role: listen, call_id: call-a}
  - name: call-b
    endpoints:
      - file: {path: "%s", rate: 8000, loop: true}
      - voipbin: {role: listen, call_id: call-b}
"""


async def test_a_reload_applies_new_limits_to_new_sessions_only(tmp_path):
    from gateway.daemon import Gateway

    path = tmp_path / "gateway.yaml"
    text = lambda extra: RELOAD_CONFIG % (extra, VOIPBIN_TOKEN, DEFAULT_AUDIO, DEFAULT_AUDIO)  # noqa: E731
    path.write_text(text(""))
    starvation = Starvation()  # the call's audio a stall of the machine reached is not judged
    async with trio.open_nursery() as nursery:
        nursery.start_soon(starvation.run)
        gateway = await nursery.start(Gateway(GatewayConfig.load(path), config_path=str(path)).run)
        caller = Caller()
        await nursery.start(caller.run, nursery, media_url(gateway, "call-a"))
        await caller.packets(10)

        path.write_text(text(", max_sessions: 1, admission_lag_ms: 50, admission_machine_cpu_percent: 95"))
        report = await gateway.reload()
        assert report.unchanged == ("call-a", "call-b") and not report.kept_server
        admission = gateway.runtime.admission
        assert admission.max_sessions == 1 and admission.clock.threshold == 0.050
        assert admission.machine_limit == 0.95
        assert gateway.config.server.max_sessions == 1
        rejected = await refused(media_url(gateway, "call-b"), nursery)
        assert rejected.status_code == 503
        await caller.packets(len(caller.audio) + 25)  # the call in progress never noticed

        path.write_text(text(""))
        await gateway.reload()
        other = Caller()
        await nursery.start(other.run, nursery, media_url(gateway, "call-b"))
        await other.packets(5)
        await caller.packets(100)
        caller.check_intact(starvation)
        nursery.cancel_scope.cancel()
