"""Per-endpoint reconnect: a call survives its far side blipping (issue 11, README "Reconnect").

One gateway plays three routes on loopback:

- `call`: a VoIPBIN-compatible call (the voipbin listen role, AudioSocket, so a hangup would be a
  frame the call sees): the caller's speech in a loop, and a recording of what the caller hears;
- `channel`: an Argon-compatible voice channel (the argon listen role) where a person speaks in a
  loop, and a recording of what the bridge publishes;
- `bridge`: the real dial adapters, VoIPBIN dial <-> Argon dial (duplex, hearing the person). Its
  Argon connection goes through a TCP proxy (`server.media_url` points StreamToken's ingressUrl at
  it) that the test cuts with a reset, no close frame, as Argon's server drops sessions.

The caller's connection must stay up through every cut (no hangup, one session), the bridge must
never restart, and the channel must hear the caller again within 1 s of each cut.
"""

from __future__ import annotations

import numpy as np
import pytest
import trio

import harness
from audio_checks import SPECTRAL_FOUND, loop_score, mono, read_wav, write_wav
from gateway.adapters.argon.dial import TOKEN_RENEW_BEFORE_S, token_fresh
from gateway.demo import ASSETS
from tcp_proxy import CuttableProxy

SPACE = "550e8400-e29b-41d4-a716-446655440000"
CHANNEL = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
CALL_S = 120.0  # the call's length
CUTS_AT_S = (30.0, 60.0, 90.0)  # when the Argon side is reset, from the bridge coming up
BACK_WITHIN_S = 1.0  # the channel hears the caller again this soon after each cut
RESUMED_FRAMES = 10  # ... counted as this many packets from the bridge reaching the channel

ROUTES = """\
routes:
  - name: call
    endpoints:
      - voipbin: {role: listen, call_id: c1}
      - file: {name: caller, path: "$caller", rate: 8000, loop: true}
      - record: {name: heard, path: "$out/caller-hears.wav", rate: 8000, hears: [voipbin]}
  - name: channel
    endpoints:
      - argon: {role: listen, space_id: $space, channel_id: $channel}
      - file: {name: person, identity: person, path: "$person", rate: 48000, loop: true}
      - record: {name: wav, path: "$out/channel.wav", rate: 8000, hears: [argon]}
  - name: bridge
$bridge_options    endpoints:
      - voipbin: {call_id: c1, encapsulation: audiosocket}
      - argon: {space_id: $space, channel_id: $channel, hear: person}
"""

CHANNEL_VALUES = {"person": ASSETS / "or109.wav", "space": SPACE, "channel": CHANNEL, "bridge_options": ""}


async def start(nursery, tmp_path, routes: str = ROUTES, **values):
    """A gateway running `routes` whose listen roles hand out URLs through a CuttableProxy
    (`server.media_url`): (gateway, proxy)."""
    proxy = CuttableProxy(lambda: media_port[0])
    media_port: list[int] = []
    await proxy.start(nursery)
    gateway = await harness.start(
        nursery, routes, server_extra=f', media_url: "ws://127.0.0.1:{proxy.port}"',
        prepare=lambda gw: media_port.append(gw.runtime.media.port),
        caller=ASSETS / "or105.wav", out=tmp_path, **values)
    return gateway, proxy


def route_events(gateway, route: str, kind: str) -> list[tuple[float, dict]]:
    return [(t, e.data) for t, e in gateway.routes[route].route.stats.recent_events if e.kind == kind]


@pytest.mark.timeout(CALL_S + 60)
async def test_a_two_minute_call_survives_three_argon_resets(tmp_path):
    async with trio.open_nursery() as nursery:
        gateway, proxy = await start(nursery, tmp_path, **CHANNEL_VALUES)
        bridge = gateway.routes["bridge"].route
        with trio.fail_after(10):
            await bridge.up.wait()
        caller_side = gateway.routes["call"].route.endpoints[0]
        heard_by_channel = gateway.routes["channel"].route.endpoints[0].stats  # what the bridge published
        argon = bridge.endpoints[1]
        grant = argon._grant
        samples: list[tuple[float, int]] = []

        async def watch() -> None:
            while True:
                samples.append((trio.current_time(), heard_by_channel.frames_in))
                await trio.sleep(0.01)

        nursery.start_soon(watch)
        t0 = trio.current_time()
        cuts = []
        for at in CUTS_AT_S:
            await trio.sleep_until(t0 + at)
            assert await proxy.cut() == 1, "the bridge's Argon session goes through the proxy"
            cuts.append(trio.current_time())
        await trio.sleep_until(t0 + CALL_S)
        states = {name: st.state for name, st in gateway.routes.items()}
        report = {f"{r}/{e.name}": e.stats.as_dict() for r, st in gateway.routes.items() for e in st.route.endpoints}
        nursery.cancel_scope.cancel()

    context = f"states {states}; events {[(round(t - t0, 2), e.kind, e.data) for t, e in bridge.stats.recent_events]}; {report}"
    # the caller: one connection the whole time, never hung up on
    assert states["call"] == "up" and gateway.routes["call"].route.stats.sessions == 1, context
    assert caller_side.stats.connects == 1 and bridge.endpoints[0].stats.connects == 1, context
    # the bridge: never restarted; its Argon side went away three times and came back each time
    assert states["bridge"] == "up" and bridge.stats.sessions == 1 and gateway.routes["bridge"].restarts == 0, context
    assert argon.stats.outages == 3 and argon.stats.connects == 4 and proxy.connections == 4, context
    downs, ups = route_events(gateway, "bridge", "endpoint-down"), route_events(gateway, "bridge", "endpoint-up")
    assert len(downs) == 3 and len(ups) == 3, context
    assert argon._grant is grant and token_fresh(grant.token, TOKEN_RENEW_BEFORE_S), "reconnects reuse the stream token"
    # ... and the channel heard the caller again within BACK_WITHIN_S of each cut
    for cut, (up_at, up) in zip(cuts, ups):
        before = max(n for t, n in samples if t <= cut)
        resumed = next((t for t, n in samples if t > cut and n >= before + RESUMED_FRAMES), None)
        assert resumed is not None and resumed - cut < BACK_WITHIN_S, (
            f"cut at {cut - t0:.1f} s: the channel heard the bridge again "
            f"{'never' if resumed is None else f'{resumed - cut:.2f} s later'}; {context}")
        assert up_at - cut < BACK_WITHIN_S and up["after_ms"] < 1000 * BACK_WITHIN_S, context
    assert argon.stats.down_s < 3 * BACK_WITHIN_S, context
    # what the channel heard is the caller's speech (in every recorded session), not noise
    speech, rate = read_wav(ASSETS / "or105.wav")
    # (the stand-in channel records each of the bridge's connections as a session of its own)
    recordings = sorted(tmp_path.glob("channel*.wav"))
    assert len(recordings) == 1 + len(CUTS_AT_S), recordings
    blocks = [b for path in recordings
              for b in loop_score(speech, rate, mono(read_wav(path)[0]), read_wav(path)[1], search_s=0.6, spectral=True)[1]]
    # A broken path (noise, wrong rate, garbled frames at a reconnect) fails most blocks (only
    # speech blocks count: about 40 % of the clip). The bridge codes the 8 kHz call at 8 kHz
    # input (narrowband SILK, with FEC), which keeps the spectrum but not the waveform: judged
    # by short-time spectra (`spectral_alignment`), about 0.9 per block. Each block is searched
    # within 0.6 s: a session of the stand-in channel may start with a backlog (the caller's audio
    # kept while a side came up), its latency won back in pauses, so its first blocks come later
    # than the rest.
    good = sum(b > SPECTRAL_FOUND for b in blocks)
    assert len(blocks) >= 0.3 * CALL_S / 0.25 and good >= 0.8 * len(blocks), f"{np.round(blocks, 2)}; {context}"


def tone(path, seconds: float, hz: float, rate: int = 8000) -> None:
    t = np.arange(int(seconds * rate)) / rate
    write_wav(path, (8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16), rate)


async def test_hold_file_plays_while_away_and_reconnect_s_bounds_the_outage(tmp_path):
    """While the Argon side is away the caller hears the hold file; when it stays away longer
    than reconnect_s, the route fails as before (and the daemon restarts it)."""
    tone(tmp_path / "hold.wav", 1.0, 440.0)
    bridge_options = f'    reconnect_s: 2\n    on_hold: "{tmp_path / "hold.wav"}"\n'
    async with trio.open_nursery() as nursery:
        gateway, proxy = await start(nursery, tmp_path, **CHANNEL_VALUES | {"bridge_options": bridge_options})
        state = gateway.routes["bridge"]
        with trio.fail_after(10):
            await state.route.up.wait()
        await trio.sleep(1.0)
        proxy.refusing = True  # the far side stays away
        await proxy.cut()
        cut = trio.current_time()
        await trio.sleep(0.5)
        argon = state.route.endpoints[1]
        assert state.state == "up" and state.route.away_since(argon) is not None  # away, the route runs on
        with trio.fail_after(10):
            while state.state == "up":
                await trio.sleep(0.05)
        failed_after = trio.current_time() - cut
        ended_by = state.route.stats.ended_by
        outages, dropped = argon.stats.outages, argon.stats.dropped_while_down
        nursery.cancel_scope.cancel()

    assert 2.0 <= failed_after < 4.0, (failed_after, ended_by)
    assert "reconnect_s 2" in ended_by and ended_by.startswith("argon: failed"), ended_by
    assert outages == 1 and dropped > 50, (outages, dropped)  # the caller's audio for it: dropped, not queued
    # the caller heard the hold tone while the Argon side was away, and the person before
    heard, rate = read_wav(tmp_path / "caller-hears.wav")
    x = heard[:, 0].astype(np.float64)
    spectrum = lambda seg: np.abs(np.fft.rfft(seg * np.hanning(len(seg))))  # noqa: E731
    freqs = np.fft.rfftfreq(rate // 5, 1 / rate)
    held = [seg for seg in np.split(x[: len(x) // (rate // 5) * (rate // 5)], len(x) // (rate // 5))
            if np.sqrt(np.mean(seg ** 2)) > 500 and abs(freqs[np.argmax(spectrum(seg))] - 440) < 10]
    assert len(held) >= 5, f"{len(held)} blocks of 200 ms of the hold tone in what the caller heard"


def test_stream_token_freshness_is_read_from_its_exp():
    import time

    import jwt

    now = time.time()
    assert token_fresh(jwt.encode({"exp": now + 3600}, "k" * 32, algorithm="HS256"), 300)
    assert not token_fresh(jwt.encode({"exp": now + 200}, "k" * 32, algorithm="HS256"), 300)
    assert not token_fresh(jwt.encode({"sub": "x"}, "k" * 32, algorithm="HS256"), 300)  # no exp: ask anew
    assert not token_fresh("not a jwt", 300)


async def test_a_reset_during_the_websocket_handshake_fails_the_dial_at_once():
    """A far side that resets the connection before answering the upgrade (an ingress going
    down) fails the dial at once, so a reconnect tries again soon, rather than after
    CONNECT_TIMEOUT of waiting for an answer that cannot come."""
    from gateway.adapters.ws import CONNECT_TIMEOUT, dial
    from gateway.errors import ServiceError

    async with trio.open_nursery() as nursery:
        proxy = CuttableProxy(1)
        proxy.refusing = True
        await proxy.start(nursery)
        with trio.fail_after(CONNECT_TIMEOUT / 2):
            try:
                await dial(nursery, f"ws://127.0.0.1:{proxy.port}/audio/connect?token=SECRET", service="Argon connect")
            except ServiceError as err:
                failure = err
        nursery.cancel_scope.cancel()
    assert "closed during the WebSocket handshake" in str(failure) and "SECRET" not in str(failure), failure
    assert not failure.permanent


AGENT_ROUTES = """\
routes:
  - name: call
    endpoints:
      - voipbin: {role: listen, call_id: c1}
      - file: {name: caller, path: "$caller", rate: 8000, loop: true}
  - name: agent-service
    endpoints:
      - agent: {role: listen}
      - file: {name: tts, path: "$tts", rate: 16000, loop: true}
      - record: {name: heard, path: "$out/agent.wav", rate: 16000, hears: [agent]}
  - name: bridge
    endpoints:
      - voipbin: {call_id: c1}
      - agent: {bursty: false}
"""


async def test_an_agent_dial_reconnects_with_a_new_token(tmp_path):
    """The agent side of a call is reset: the agent dial reconnects on its own with a new
    session token (they are single use), the caller's connection stays up, and the agent
    hears the caller again in its next session."""
    async with trio.open_nursery() as nursery:
        gateway, proxy = await start(nursery, tmp_path, AGENT_ROUTES, tts=ASSETS / "speech16k.wav")
        bridge = gateway.routes["bridge"].route
        with trio.fail_after(10):
            await bridge.up.wait()
        agent_side = gateway.routes["agent-service"].route.endpoints[0]
        await trio.sleep(2.0)
        assert await proxy.cut() == 1
        cut = trio.current_time()
        with trio.fail_after(5):
            while agent_side.stats.connects < 2 or agent_side.stats.frames_in < 50:  # the caller, heard again
                await trio.sleep(0.02)
        back_after = trio.current_time() - cut
        await trio.sleep(1.0)
        agent, call = bridge.endpoints[1], gateway.routes["call"].route
        states = {name: st.state for name, st in gateway.routes.items()}
        nursery.cancel_scope.cancel()
    context = f"states {states}; {[(e.kind, e.data) for _, e in bridge.stats.recent_events]}"
    assert states["bridge"] == "up" and bridge.stats.sessions == 1 and agent.stats.outages == 1, context
    assert agent.stats.connects == 2 and proxy.connections == 2, context  # a new token and session
    assert states["call"] == "up" and call.stats.sessions == 1 and call.endpoints[0].stats.connects == 1, context
    assert back_after < 3.0, f"the agent heard the caller again {back_after:.2f} s after the cut; {context}"
    recordings = sorted(tmp_path.glob("agent*.wav"))
    assert len(recordings) == 2, recordings  # one per agent session
    speech, rate = read_wav(ASSETS / "or105.wav")
    _, blocks = loop_score(speech, rate, mono(read_wav(recordings[-1])[0]), 16000, search_s=0.6)
    assert len(blocks) >= 2 and np.median(blocks) > 0.8, np.round(blocks, 2)
