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
import soxr
import trio
from trio_websocket import ConnectionClosed, serve_websocket

from audio_checks import blockwise_alignment, read_wav
from conftest import ASSETS
from gateway.adapters.voipbin.wire import Audio, Codec, Encapsulation, Hangup, MediaStreamProtocol
from harness import start
from test_argon_calls import BOT_USER, BOTS, check_heard
from voice_clients import Caller

RATE = 8000
USERS = ("user-7", "user-8", "user-9")
MAX_CALLS = 2


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
        self.sent = 0
        self.hung_up = False
        self.connected_at = trio.current_time()
        self.closed_at: float | None = None
        self.closed = trio.Event()

    def recording(self) -> np.ndarray:
        return np.concatenate(self.heard) if self.heard else np.zeros(0, np.int16)


class PhoneLines:
    """A VoIPBIN-compatible media server (audiosocket, slin) on which every connection is a
    phone line of its own: it says `clips[k]` (then silence, as a live line does) in real time
    and records what it hears, until the gateway hangs up."""

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
        try:
            while True:
                await trio.sleep_until(start + 0.02 * k)
                frame = np.zeros(160, np.int16)
                piece = clip[k * 160 : (k + 1) * 160]
                frame[: len(piece)] = piece
                await ws.send_message(proto.send_audio(frame.astype("<i2").tobytes()))
                line.sent += 1
                k += 1
        except ConnectionClosed:
            pass


def matches(reference: np.ndarray, received: np.ndarray) -> bool:
    """`received` holds `reference`, block by block (the check_heard criterion)."""
    blocks = blockwise_alignment(reference, RATE, received, RATE)
    return len(blocks) >= 3 and sum(b > 0.85 for b in blocks) >= 0.8 * len(blocks)


def crossed(reference: np.ndarray, received: np.ndarray) -> float:
    """The share of `reference`'s speech blocks found in `received` (near 0 for other speech)."""
    blocks = blockwise_alignment(reference, RATE, received, RATE)
    return sum(b > 0.85 for b in blocks) / max(1, len(blocks))


async def wait_until(predicate, what: str, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def test_two_calls_at_once_each_on_its_own_line_a_third_is_busy_then_served(tmp_path, caplog):
    caplog.set_level("INFO")
    said = {u: speech(*USER_SPEECH[u]) for u in USERS}
    pbx = PhoneLines([speech(*s) for s in LINE_SPEECH])
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
        assert all(line.path.startswith("/v1.0/calls/desk-1/media_stream?encapsulation=audiosocket&token=")
                   for line in pbx.lines)  # the same call id for every session: the config says so

        # both speak at the same time; meanwhile a third caller is turned away: busy
        with trio.fail_after(20):
            async with trio.open_nursery() as talking:
                for u in USERS[:2]:
                    talking.start_soon(callers[u].speak, said[u])
                await trio.sleep(0.5)
                await callers["user-9"].connect(nursery)
                await app["user-9"].sessions_done.wait()
                assert answer.state == "up" and len(answer.calls) == 2 and len(pbx.lines) == 2
            await trio.sleep(0.6)  # the last words reach the lines and come back
        busy = app["user-9"].route.stats.ended_by
        assert busy == "argon: bot rejected the call: busy", busy
        assert "rejecting (busy)" in caplog.text

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
            await callers["user-9"].speak(said["user-9"])
            await trio.sleep(0.6)
            for u in USERS[1:]:
                await callers[u].hang_up()
            await wait_until(lambda: not answer.calls, "every session to end")
            for line in pbx.lines:
                await line.closed.wait()
        assert answer.state == "waiting"
        nursery.cancel_scope.cancel()

    # which line each caller got: the one whose recording holds the caller's speech, and only
    # that caller's
    line_of: dict[str, Line] = {}
    for line in pbx.lines:
        heard = line.recording()
        found = [u for u in USERS if matches(said[u], heard)]
        assert len(found) == 1, (line.index, {u: round(crossed(said[u], heard), 2) for u in USERS})
        line_of[found[0]] = line
        for other in USERS:
            if other != found[0]:
                assert crossed(said[other], heard) < 0.2, (line.index, other)
    assert set(line_of) == set(USERS) and line_of["user-9"] is pbx.lines[2]
    # ...and each caller heard its own line, not the other one of its time
    for u in USERS:
        recording = callers[u].recording()
        check_heard(line_of[u].clip, RATE, recording, RATE, f"line {line_of[u].index} → {u}")
        for line in pbx.lines:
            if line is not line_of[u]:
                assert crossed(line.clip, recording) < 0.2, (u, line.index)
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
    assert "the caller hung up (callEnded)" in answer.route.stats.ended_by
