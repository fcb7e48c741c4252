"""Concurrent calls: one session per call (sessions of one route run side by side), bounded by
`max_calls`. End to end over real loopback sockets.

As in test_argon_calls.py, our Argon listen role plays Argon (each app user is a route: a
VoIPBIN-compatible caller + `argon {role: listen, call: BOT}`, which rings the bot) and the
route under test answers: `argon {calls: incoming, max_calls: 2}` + a VoIPBIN dial to a phone.

Each call needs a phone line of its own, but every session of the answering route is built
from the same config and so dials the same VoIPBIN call id (`call_id: desk-1`): the config
cannot give each call its own call id (no `${call.from}`-style substitution of the incoming
call's fields). Our VoIPBIN listen role cannot stand in for that phone either: one listen
endpoint serves one client at a time (a second gets 409), and two routes cannot listen on
the same call id. So the phone side here is `PhoneLines`, a VoIPBIN-compatible media server
written on the project's VoIPBIN wire layer that serves every media-stream connection as a
phone line of its own (as a PBX would hand each dialled stream its own extension): each line
plays a clip of its own and records what it hears. What comes out of a line must then be one
caller's speech, and that caller must hear that line's clip and not the other line's.
"""

from __future__ import annotations

import numpy as np
import pytest
import soxr
import trio
from trio_websocket import ConnectionClosed, serve_websocket

from audio_checks import SPECTRAL_FOUND, blockwise_blocks, found_share, read_wav, spectral_blocks
from conftest import ASSETS
from gateway.adapters.argon.dial import incoming_endpoint
from gateway.adapters.voipbin.wire import Audio, Codec, Encapsulation, Hangup, MediaStreamProtocol
from harness import Timeline, start
from test_argon_calls import BOT_USER, BOTS
from voice_clients import Caller

# CPU-heavy and real time: run on one xdist worker, one such file after another (dev.sh --dist loadgroup)
pytestmark = pytest.mark.xdist_group("realtime")


RATE = 8000
USERS = ("user-7", "user-8", "user-9")
MAX_CALLS = 2
SETTLE_S = 0.3  # after a call is set up, before anyone speaks
# Two relays in each direction (the app user's route, the answering session), each with a pacer
# that shortens pauses to win back latency and plays late audio a slot later: the lag of the
# speech through them is not constant, so each block is looked for at its own lag.
SEARCH_S = 0.3


def speech(source: str, start_s: float, end_s: float) -> np.ndarray:
    """int16 8 kHz mono: a cut of one of the bundled recordings (speech16k.wav resampled)."""
    pcm, rate = read_wav(ASSETS / source)
    cut = pcm[int(start_s * rate) : int(end_s * rate), 0]
    if rate != RATE:
        cut = np.clip(np.rint(soxr.resample(cut.astype(np.float64), rate, RATE)), -32768, 32767).astype(np.int16)
    return cut


# What each user says and what each phone line (in the order they are dialled) says: six
# different stretches of speech, so any crossing shows.
USER_SPEECH = {"user-7": ("or105.wav", 0.7, 2.5), "user-8": ("or109.wav", 0.9, 3.4), "user-9": ("or105.wav", 5.0, 7.0)}
LINE_SPEECH = [("speech16k.wav", 0.1, 1.6), ("speech16k.wav", 1.6, 3.05), ("or109.wav", 5.4, 7.0)]


def routes(pbx_port: int) -> str:
    users = "".join("""
  - name: app-%(u)s              # an Argon user calling the bot (a VoIPBIN client stands in for the app)
    endpoints:
      - voipbin: {role: listen, name: user, identity: %(u)s, call_id: %(u)s}
      - argon: {role: listen, call: %(bot)s}""" % {"u": u, "bot": BOT_USER} for u in USERS)
    return """
routes:%s
  - name: answer
    endpoints:
      - argon: {calls: incoming, max_calls: %d}
      - voipbin: {call_id: desk-1, encapsulation: audiosocket, api_url: "http://127.0.0.1:%d"}
""" % (users, MAX_CALLS, pbx_port)


class Line:
    """One phone line of `PhoneLines`: one media-stream connection."""

    def __init__(self, index: int, path: str, clip: np.ndarray) -> None:
        self.index, self.path, self.clip = index, path, clip
        self.heard: list[np.ndarray] = []
        self.heard_at = Timeline(RATE)  # when each of `heard` arrived
        self.sent = 0
        self.hung_up = False
        self.connected_at = trio.current_time()
        self.closed_at: float | None = None
        self.closed = trio.Event()
        self.talk = trio.Event()
        """Set by the test: the line says its clip from then on (silence until then)."""

    def recording(self) -> np.ndarray:
        return np.concatenate(self.heard) if self.heard else np.zeros(0, np.int16)


class PhoneLines:
    """A VoIPBIN-compatible media server (audiosocket, slin) on which every connection is a
    phone line of its own: it sends silence in real time, as a live line does, says `clips[k]`
    once its `talk` is set, and records what it hears, until the gateway hangs up."""

    def __init__(self, clips: list[np.ndarray]) -> None:
        self.clips = clips
        self.lines: list[Line] = []
        self.port = 0

    async def serve(self, nursery: trio.Nursery) -> None:
        server = await nursery.start(serve_websocket, self._handler, "127.0.0.1", 0, None)
        self.port = server.port

    async def _handler(self, request) -> None:
        line = Line(len(self.lines), request.path, self.clips[len(self.lines)])
        self.lines.append(line)
        ws = await request.accept()
        proto = MediaStreamProtocol(Encapsulation.AUDIOSOCKET, Codec.SLIN)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._say, ws, proto, line)
                try:
                    while True:
                        for event in proto.receive(await ws.get_message()):
                            if isinstance(event, Audio):
                                line.heard.append(np.frombuffer(event.payload, dtype="<i2"))
                                line.heard_at.add(trio.current_time(), len(line.heard[-1]))
                            elif isinstance(event, Hangup):
                                line.hung_up = True
                except ConnectionClosed:
                    pass
                nursery.cancel_scope.cancel()
        finally:
            line.closed_at = trio.current_time()
            line.closed.set()

    @staticmethod
    async def _say(ws, proto: MediaStreamProtocol, line: Line) -> None:
        clip = line.clip
        start = trio.current_time()
        k = 0
        said_from: int | None = None  # the frame at which the clip started
        try:
            while True:
                await trio.sleep_until(start + 0.02 * k)
                frame = np.zeros(160, np.int16)
                if said_from is None and line.talk.is_set():
                    said_from = k
                if said_from is not None:
                    piece = clip[(k - said_from) * 160 : (k - said_from + 1) * 160]
                    frame[: len(piece)] = piece
                await ws.send_message(proto.send_audio(frame.astype("<i2").tobytes()))
                line.sent += 1
                k += 1
        except ConnectionClosed:
            pass


def found(reference: np.ndarray, received: np.ndarray, *, waveform: bool = True, starvation=None,
          timeline=None) -> float:
    """The share of `reference`'s speech blocks found in `received`, each at its own lag within
    SEARCH_S of the overall one: near 1 for the speech that was sent there, near 0 for other
    speech. By waveform correlation (> 0.85), or with `waveform` False by short-time spectra
    (`spectral_alignment` > SPECTRAL_FOUND): what the answering bot publishes of a phone line
    (8 kHz) is coded at 8 kHz input, narrowband SILK, which keeps the spectrum, not the waveform.
    `starvation`, `timeline`: the share of the blocks judged, the bad ones a stall of the
    machine reached left out (audio_checks.found_share): for the "holds it" checks only."""
    if waveform:
        blocks, threshold = blockwise_blocks(reference, RATE, received, RATE, search_s=SEARCH_S), 0.85
    else:
        blocks, threshold = spectral_blocks(reference, RATE, received, RATE, search_s=SEARCH_S), SPECTRAL_FOUND
    assert len(blocks) >= 3, "too little speech in the reference"
    return found_share(blocks, threshold, starvation, timeline)


def matches(reference: np.ndarray, received: np.ndarray) -> bool:
    """`received` holds `reference`, block by block (test_argon_calls.check_heard's criterion)."""
    return found(reference, received) >= 0.8


async def wait_until(predicate, what: str, timeout: float = 10.0) -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"waited {timeout:g} s for {what}")


async def test_two_calls_at_once_each_on_its_own_line_a_third_is_busy_then_served(tmp_path, caplog, stalls):
    caplog.set_level("INFO")
    said = {u: speech(*USER_SPEECH[u]) for u in USERS}
    pbx = PhoneLines([speech(*s) for s in LINE_SPEECH])
    starvation = stalls.starvation  # the speech a stall of the machine reached is not judged
    async with trio.open_nursery() as nursery:
        await pbx.serve(nursery)
        gateway = await start(nursery, routes(pbx.port), argon_extra=BOTS)
        answer = gateway.routes["answer"]
        app = {u: gateway.routes[f"app-{u}"] for u in USERS}
        assert answer.state == "waiting"
        callers = {u: Caller(gateway, u) for u in USERS}

        # two users call at once: both answered, side by side, each dialled its own line
        with trio.fail_after(15):
            async with trio.open_nursery() as calling:
                for u in USERS[:2]:
                    calling.start_soon(callers[u].connect, nursery)
            for u in USERS[:2]:
                await app[u].route.up.wait()
            await wait_until(lambda: len(pbx.lines) == 2, "both phone lines dialled")
        assert answer.state == "up" and len(answer.calls) == 2
        rung = {u: app[u].route.endpoints[1].call.call_id for u in USERS[:2]}
        assert set(answer.calls) == set(rung.values())
        sessions = list(answer.calls.values())
        assert sessions[0] is not sessions[1] and answer.route not in sessions
        answering = [incoming_endpoint(s.endpoints) for s in sessions]  # each session's own argon endpoint
        assert all(line.path.startswith("/v1.0/calls/desk-1/media_stream?encapsulation=audiosocket&token=")
                   for line in pbx.lines)  # the same call id for every session: the config says so

        # a third caller while two are up: turned away, busy
        with trio.fail_after(15):
            await callers["user-9"].connect(nursery)
            await app["user-9"].sessions_done.wait()
        busy = app["user-9"].route.stats.ended_by
        assert busy == "argon: bot rejected the call: busy", busy
        assert "rejecting (busy)" in caplog.text
        assert answer.state == "up" and len(answer.calls) == 2 and len(pbx.lines) == 2

        # both users and both lines speak at the same time (after the call set-up work: this
        # checks where the audio goes, not how a loaded machine copes with set-up and speech)
        await trio.sleep(SETTLE_S)
        with trio.fail_after(20):
            async with trio.open_nursery() as talking:
                for u in USERS[:2]:
                    talking.start_soon(callers[u].speak, said[u])
                for line in pbx.lines:
                    line.talk.set()
            await trio.sleep(0.6)  # the last words reach the lines and come back

        # one call ends: the route takes the next caller, on a third line
        with trio.fail_after(15):
            await callers["user-7"].hang_up()
            await wait_until(lambda: len(answer.calls) == 1, "user-7's session to end")
            assert answer.state == "up"  # user-8's call goes on
            app["user-9"].sessions_done = trio.Event()
            callers["user-9"] = Caller(gateway, "user-9")
            await callers["user-9"].connect(nursery)
            await app["user-9"].route.up.wait()
            await wait_until(lambda: len(pbx.lines) == 3, "the third line dialled")
            assert answer.state == "up" and len(answer.calls) == 2
            answering += [incoming_endpoint(s.endpoints) for s in answer.calls.values() if s not in sessions]
            await trio.sleep(SETTLE_S)
            pbx.lines[2].talk.set()
            await callers["user-9"].speak(said["user-9"])
            await trio.sleep(0.6)
            for u in USERS[1:]:
                await callers[u].hang_up()
            await wait_until(lambda: not answer.calls, "every session to end")
            for line in pbx.lines:
                await line.closed.wait()
        assert answer.state == "waiting"
        nursery.cancel_scope.cancel()

    # which line each caller got: the one whose recording holds the caller's speech; and it
    # holds only that caller's
    line_of: dict[str, Line] = {}
    for line in pbx.lines:
        heard = line.recording()
        shares = {u: round(found(said[u], heard), 2) for u in USERS}
        # holding it: judged but for the blocks a stall of the machine reached
        held = {u: round(found(said[u], heard, starvation=starvation, timeline=line.heard_at), 2) for u in USERS}
        callers_heard = [u for u in USERS if held[u] >= 0.8]
        assert len(callers_heard) == 1, (line.index, shares, held, starvation.stretches)
        line_of[callers_heard[0]] = line
        assert all(shares[u] < 0.3 for u in USERS if u not in callers_heard), (line.index, shares)
    assert set(line_of) == set(USERS) and line_of["user-9"] is pbx.lines[2]
    # ...and each caller heard its own line, not the other one of its time
    for u in USERS:
        recording = callers[u].recording()
        shares = [round(found(line.clip, recording, waveform=False), 2) for line in pbx.lines]
        held = found(line_of[u].clip, recording, waveform=False, starvation=starvation, timeline=callers[u].timeline())
        assert held >= 0.8, (u, shares, held, starvation.stretches)
        assert all(share < 0.3 for i, share in enumerate(shares) if i != line_of[u].index), (u, shares)
        assert line_of[u].hung_up  # the gateway hung the line up (audiosocket hangup) when the call ended
    # the first two calls ran side by side
    first, second = line_of["user-7"], line_of["user-8"]
    assert max(first.connected_at, second.connected_at) < min(first.closed_at, second.closed_at) - 2.0

    # the route's counters are shared by its sessions: they add up across the three calls
    argon_in, phone_out = answer.route.endpoints
    assert answer.route.stats.sessions == 3
    assert argon_in.stats.connects == 3 and phone_out.stats.connects == 3
    assert phone_out.stats.frames_out == sum(len(line.heard) for line in pbx.lines)
    sent_by_lines = sum(line.sent for line in pbx.lines)
    assert sent_by_lines - 10 * len(pbx.lines) <= phone_out.stats.frames_in <= sent_by_lines
    forwarded = sum(app[u].route.endpoints[1].stats.frames_out for u in USERS)  # to the bot's duplex
    assert forwarded - 10 * len(USERS) <= argon_in.stats.frames_in <= forwarded
    published = sum(app[u].route.endpoints[1].stats.frames_in for u in USERS)  # what the bot published
    assert published <= argon_in.stats.frames_out <= published + 10 * len(USERS)
    # (packets the bot's playout concealed, per session: the shared counter is their sum)
    print("CONCEALED", argon_in.stats.concealed, [e.playout.stats.concealed for e in answering])
    assert len(answering) == 3 and argon_in.stats.concealed == sum(e.playout.stats.concealed for e in answering)
    assert "the caller hung up (callEnded)" in answer.route.stats.ended_by
