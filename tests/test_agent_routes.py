"""A phone call answered by an AI voice agent, end to end over real loopback sockets.

The gateway plays every part: a VoIPBIN-compatible call (voipbin listen + a caller clip + a
recorder of what the call hears), an agent service (agent listen + a TTS clip + a recorder of
what the agent hears, or a bursty fake agent written here on the wire layer), and the bridge
under test (voipbin dial ↔ agent dial: u-law 8 kHz ↔ PCM16 16 kHz).
"""

from __future__ import annotations

import numpy as np
import trio

from audio_checks import (
    SPECTRAL_FOUND,
    assert_blocks_found,
    assert_correlated,
    best_alignment,
    blockwise_blocks,
    read_wav,
    spectral_blocks,
    write_wav,
)
from conftest import ASSETS
from gateway.adapters.agent import wire
from gateway.server import HttpResponse
from harness import AGENT_API_KEY, SECRETS, start

CALL_ID = "c0ffee00-0000-4000-8000-000000000001"


class Arrivals:
    """trio times at which an endpoint emitted each ingress frame (what its peer sent)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.samples = 0

    def attach(self, endpoint) -> None:
        run = endpoint.run

        async def timed_run(emit, *, task_status=trio.TASK_STATUS_IGNORED):
            def timed(frame):
                self.times.append(trio.current_time())
                self.samples += frame.samples
                emit(frame)

            return await run(timed, task_status=task_status)

        endpoint.run = timed_run

    def check_paced(self, ptime: float = 0.02, starvation=None) -> None:
        """One packet per ptime: no bursts (never more than 2 packets' worth ahead within any
        200 ms, but for the windows that hold a stretch of `starvation` or the 2 ptimes after
        it: a sender on absolute deadlines sends at once what a stall of the machine held
        back) and no drift (the span matches the packet count within 3 %)."""
        t = np.array(self.times)
        assert len(t) > 25, f"only {len(t)} packets arrived"
        window = 0.2
        judged = [i for i in range(len(t))
                  if starvation is None or not starvation.overlaps(t[i], t[i] + window, 2 * ptime)]
        # (a quarter of the windows, 10 packets each, still covers most of the stream)
        assert len(judged) >= len(t) / 4, f"only {len(judged)} of {len(t)} windows clear of the machine's stalls"
        ahead = max(np.searchsorted(t, t[i] + window) - i for i in judged)
        assert ahead <= window / ptime + 2, f"burst: {ahead} packets within {window * 1000:.0f} ms"
        span = t[-1] - t[0]
        assert abs(span - (len(t) - 1) * ptime) < 0.03 * len(t) * ptime + 0.04, (span, len(t))


def clip(tmp_path, name: str, source: str, start_s: float, seconds: float) -> tuple[str, np.ndarray, int]:
    pcm, rate = read_wav(ASSETS / source)
    cut = pcm[int(start_s * rate) : int((start_s + seconds) * rate)]
    path = tmp_path / name
    write_wav(path, cut, rate)
    return str(path), cut, rate


def check_speech(reference, ref_rate, path, *, min_seconds: float, what: str, waveform: bool = True,
                 stalls=None) -> None:
    """The recording holds the reference speech, block by block, with little delay; a broken
    path (noise, silence, wrong rate or byte order) fails every block. `waveform`: the path
    keeps the waveform (G.711, PCM, Opus at 48 kHz input), judged by waveform correlation;
    False: it went through a parametric codec (an Argon bot publishing an 8 or 16 kHz source:
    SILK), judged by short-time spectra (`spectral_alignment`). `stalls` (the fixture): the
    blocks the machine's stalls reached, by the record endpoint's timeline of `path`, are not
    judged (audio_checks.assert_blocks_found)."""
    starvation = None if stalls is None else stalls.starvation
    timeline = None if stalls is None else stalls.timeline(path)
    received, rate = read_wav(path)
    assert len(received) / rate >= min_seconds, f"{what}: only {len(received) / rate:.2f} s recorded"
    corr, lag = best_alignment(reference, ref_rate, received, rate)
    if waveform:
        blocks, found = blockwise_blocks(reference, ref_rate, received, rate), 0.85
    else:
        blocks, found = spectral_blocks(reference, ref_rate, received, rate), SPECTRAL_FOUND
    assert_blocks_found(blocks, found, what, starvation=starvation, timeline=timeline, context=f"lag {lag:.3f} s")


CALL_AND_AGENT = """
routes:
  - name: call
    endpoints:
      - voipbin: {role: listen, name: call, call_id: $call_id, jitter_buffer_ms: 0}  # emits on arrival (Arrivals)
      - file: {name: caller, path: "$caller", rate: 8000}
      - record: {name: heard, path: "$out/call.wav", rate: 8000, hears: [call]}
  - name: agent-service
    endpoints:
      - agent: {role: listen, name: agent}
      - file: {name: tts, path: "$tts", rate: 16000}
      - record: {name: heard, path: "$out/agent.wav", rate: 16000, hears: [agent]}
  - name: bridge
    endpoints:
      - voipbin: {call_id: $call_id, encapsulation: rtp}
      - agent: {}
"""


async def test_call_and_agent_hear_each_other(tmp_path, caplog, stalls):
    caller, caller_pcm, caller_rate = clip(tmp_path, "caller.wav", "or105.wav", 0.3, 2.5)
    tts, tts_pcm, tts_rate = clip(tmp_path, "tts.wav", "speech16k.wav", 0.2, 2.0)
    arrivals = {"call": Arrivals(), "agent": Arrivals()}

    def prepare(gateway):
        arrivals["call"].attach(gateway.routes["call"].route.endpoints[0])
        arrivals["agent"].attach(gateway.routes["agent-service"].route.endpoints[0])

    caplog.set_level("INFO")
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, CALL_AND_AGENT, prepare=prepare, call_id=CALL_ID, caller=caller, tts=tts,
                              out=str(tmp_path))
        with trio.fail_after(20):
            await gateway.routes["bridge"].sessions_done.wait()
            await gateway.routes["call"].sessions_done.wait()
            await gateway.routes["agent-service"].sessions_done.wait()
        nursery.cancel_scope.cancel()
    bridge = gateway.routes["bridge"].route
    phone, agent = bridge.endpoints
    # the agent's TTS reached the caller; the caller's speech reached the agent
    check_speech(tts_pcm, tts_rate, tmp_path / "call.wav", min_seconds=1.5, what="agent → call", stalls=stalls)
    check_speech(caller_pcm, caller_rate, tmp_path / "agent.wav", min_seconds=1.5, what="call → agent", stalls=stalls)
    # on the wire: 640-byte PCM16 frames to the agent, 20 ms u-law packets to the call, paced
    assert agent.stats.frames_out > 70 and agent.stats.bytes_out == 640 * agent.stats.frames_out
    assert phone.stats.frames_out > 70 and phone.stats.bytes_out == 160 * phone.stats.frames_out
    arrivals["call"].check_paced(starvation=stalls.starvation)
    arrivals["agent"].check_paced(starvation=stalls.starvation)
    # the agent service said agent_ready once the bridge was up: a route event of the bridge
    kinds = [e.kind for _, e in bridge.stats.recent_events]
    assert "agent_ready" in kinds
    # the TTS ended first: the agent service ended the session (agent_disconnected) and the
    # bridge ended cleanly with that reason
    assert "session_ended (agent_disconnected)" in bridge.stats.ended_by
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert not any(secret in text for secret in SECRETS)


BURSTY = """
routes:
  - name: call
    endpoints:
      - voipbin: {role: listen, name: call, call_id: $call_id}
      - record: {name: heard, path: "$out/call.wav", rate: 8000, hears: [call]}
  - name: bridge
    endpoints:
      - voipbin: {call_id: $call_id, encapsulation: sln}
      - agent: {api_url: "http://127.0.0.1:$http_port/fake"}
"""


class FakeAgent:
    """An agent service that speaks like a TTS engine: its whole answer, far faster than real
    time, in messages of awkward sizes (odd byte counts, not 640), then ends the session."""

    def __init__(self, pcm: np.ndarray, sizes=(641, 639, 1000, 2, 1280, 333, 3)) -> None:
        self.data = pcm.astype("<i2").tobytes()
        self.sizes = sizes
        self.heard = 0
        self.token = "fake-session-token"

    def install(self, gateway) -> None:
        runtime = gateway.runtime

        async def token(request):
            assert wire.parse_bearer(request.headers.get("authorization")) == AGENT_API_KEY
            url = f"{runtime.media_url()}/fake-agent"
            return HttpResponse(200, wire.token_response(self.token, url))

        runtime.http.add("POST", "/fake" + wire.TOKEN_PATH, token)
        runtime.media.add("/fake-agent", self.session)

    async def session(self, request) -> None:
        ws = await request.request.accept()
        server = wire.AgentServer()
        (presented,) = server.receive(await ws.get_message())
        assert presented.token == self.token
        await ws.send_message(server.accept())
        await ws.send_message(server.agent_ready())
        pos, i = 0, 0
        while pos < len(self.data):  # 5x real time: 200 ms of audio every 40 ms
            chunk = self.data[pos : pos + self.sizes[i % len(self.sizes)]]
            await ws.send_message(chunk if len(chunk) % 2 == 0 else chunk)  # odd sizes on purpose
            pos += len(chunk)
            i += 1
            if pos % 6400 < len(chunk):
                await trio.sleep(0.04)
        await ws.send_message(server.session_ended("session_closed"))
        try:
            while True:
                message = await ws.get_message()
                self.heard += len(message)
        except Exception:
            pass


async def test_bursty_agent_is_played_to_the_call_at_real_time_without_drops(tmp_path, caplog, stalls):
    _, tts_pcm, tts_rate = clip(tmp_path, "tts.wav", "speech16k.wav", 0.2, 2.0)
    fake = FakeAgent(tts_pcm[:, 0] if tts_pcm.ndim > 1 else tts_pcm)
    arrivals = Arrivals()
    depth = []

    def prepare(gateway):
        fake.install(gateway)
        arrivals.attach(gateway.routes["call"].route.endpoints[0])

    caplog.set_level("INFO")
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, BURSTY, prepare=prepare, call_id=CALL_ID, out=str(tmp_path))
        phone = gateway.routes["bridge"].route.endpoints[0]

        async def watch():
            while True:
                depth.append(phone.stats.buffered_ms)
                await trio.sleep(0.05)

        nursery.start_soon(watch)
        with trio.fail_after(20):
            await gateway.routes["bridge"].sessions_done.wait()
            await gateway.routes["call"].sessions_done.wait()
        nursery.cancel_scope.cancel()
    bridge = gateway.routes["bridge"].route
    # the whole answer reached the call, intact (sample-aligned across odd messages), at
    # real time: every packet paced, none dropped, the queue depth visible while it played
    received, rate = read_wav(tmp_path / "call.wav")
    assert_correlated(tts_pcm, tts_rate, received, rate, 0.9, "agent → call", starvation=stalls.starvation,
                      timeline=stalls.timeline(tmp_path / "call.wav"))
    assert phone.stats.dropped == 0 and phone.stats.late <= 2
    assert abs(arrivals.samples / 8000 - 2.0) < 0.1, arrivals.samples / 8000
    arrivals.check_paced(starvation=stalls.starvation)
    assert max(depth) >= 800, depth  # TTS ran ahead by up to ~1.6 s: queued, not dropped
    assert "session_ended (session_closed)" in bridge.stats.ended_by
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert "session_closed" in log
