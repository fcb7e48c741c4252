"""Asterisk AudioSocket over TCP (gateway/adapters/audiosocket/), on real loopback sockets.

- The dial role against the listen role: every frame arrives intact and in order, both ways,
  at every rate the protocol defines that the test runs (8, 16, 44.1 kHz); the hangup ends it.
- A raw TCP client that behaves like Asterisk's `AudioSocket(uuid,host:port)` (UUID frame
  first, then 320-byte slin frames every 20 ms, closes when it reads a hangup) against a
  whole gateway started from config: it hears the route's audio, the route records its audio,
  DTMF becomes a route event, and the route's end is a hangup frame and a close.
- Refusals (unknown UUID, a first frame that is not a UUID, none within 5 s, a malformed one,
  a busy endpoint) and bad input mid-call (truncated at EOF, unknown kind, oversize length, odd
  audio, another rate): that connection gets the hangup frame and the close, one warning names
  the cause, and every other call keeps running; the route serves the next call.
- A listen call that sends no frame for `idle_timeout_s` (60 s) is hung up and the endpoint
  takes the next call; any frame moves the deadline; `idle_timeout_s: 0` has none.
- A server that sends faster than real time is found out (bursty); DTMF route events go to a
  bot as DTMF frames; the config's errors name the key.

Time is trio's MockClock (autojump) wherever the test waits.
"""

from __future__ import annotations

import functools
import logging
import re
import signal
import string
import struct
import uuid
from pathlib import Path

import numpy as np
import pytest
import trio

from audio_checks import read_wav, write_wav
from gateway import metrics
from gateway.adapters.audiosocket import endpoint as as_endpoint, server as as_server
from gateway.adapters.audiosocket.endpoint import (
    UNPACED_AHEAD_S,
    AudioSocketDial,
    AudioSocketListen,
)
from gateway.adapters.audiosocket.server import listen_server, serve_audiosocket
from gateway.adapters.audiosocket.wire import (
    AUDIO_KIND_OF_RATE,
    Audio,
    Dtmf,
    FrameParser,
    Hangup,
    audio_frame,
    default_limits,
    dtmf_frame,
    error_frame,
    hangup_frame,
    uuid_frame,
)
from gateway.codecs.formats import AudioFrame
from gateway.config import GatewayConfig
from gateway.daemon import Gateway
from gateway.endpoint import RouteEvent
from gateway.errors import CallEnded, ConfigError, RemoteProtocolError
from gateway.runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent
CALL = "40325ec2-5efd-4bd3-805f-53576e581d13"  # the documentation's example UUID
OTHER = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"


def distinct_frames(count: int, rate: int, seed: int, ptime_ms: int = 20) -> list[AudioFrame]:
    """`count` frames of noise, each different (so a lost, repeated or swapped frame shows)."""
    samples = rate * ptime_ms // 1000
    rng = np.random.default_rng(seed)
    pcm = rng.integers(-20000, 20000, size=(count * samples, 1), dtype=np.int16)
    return [AudioFrame(pcm[k * samples : (k + 1) * samples], rate, k * samples) for k in range(count)]


def server_runtime() -> Runtime:
    return Runtime(GatewayConfig.from_text("server: {audiosocket: '127.0.0.1:0'}", "test.yaml"))


async def wait_for(predicate, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.001)


async def run_recording(endpoint, emit, outcome: dict, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """`endpoint.run(emit)`, keeping how it ended in `outcome[endpoint.name]`."""
    try:
        await endpoint.run(emit, task_status=task_status)
    except (CallEnded, RemoteProtocolError) as err:
        outcome[endpoint.name] = err
    else:
        outcome[endpoint.name] = None


# --- the dial role against the listen role -------------------------------------------------


@pytest.mark.parametrize("rate", [8000, 16000, 44100])
async def test_dial_to_listen_every_frame_intact_and_in_order_both_ways(autojump_clock, rate):
    runtime = server_runtime()
    up, down = distinct_frames(150, rate, 1), distinct_frames(150, rate, 2)  # 3 s each way
    heard_by_listen: list[AudioFrame] = []
    heard_by_dial: list[AudioFrame] = []
    outcome: dict = {}
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_audiosocket, listen_server(runtime), "127.0.0.1", 0)
        listen = AudioSocketListen("call", rate=rate, call_uuid=CALL)
        listen.attach(runtime)
        dial = AudioSocketDial("bot", host="127.0.0.1", port=port, rate=rate, call_uuid=CALL)
        nursery.start_soon(run_recording, listen, heard_by_listen.append, outcome)
        await nursery.start(run_recording, dial, heard_by_dial.append, outcome)
        await wait_for(lambda: listen._out is not None)
        assert listen.call_uuid == CALL
        t0 = trio.current_time()
        for k in range(150):  # both sides paced by "the route's clock": one frame per 20 ms
            await trio.sleep_until(t0 + k * 0.02)
            await dial.send(up[k])
            await listen.send(down[k])
        await wait_for(lambda: len(heard_by_listen) == 150 and len(heard_by_dial) == 150)
        await dial.goodbye()  # hangup: the listen side's call ends, then its connection closes
        await wait_for(lambda: len(outcome) == 2)
        nursery.cancel_scope.cancel()
    assert isinstance(outcome["call"], CallEnded) and outcome["call"].reason == "hangup"
    assert isinstance(outcome["bot"], CallEnded) and outcome["bot"].reason == "closed"
    for sent, heard in ((up, heard_by_listen), (down, heard_by_dial)):
        assert [f.rate for f in heard] == [rate] * 150
        assert np.array_equal(np.concatenate([f.pcm for f in heard]), np.concatenate([f.pcm for f in sent]))
        assert [f.timestamp for f in heard] == [f.timestamp for f in sent]  # in order, none missing
    assert dial.stats.frames_out == listen.stats.frames_in == 150
    assert listen.stats.bytes_in == 150 * 2 * rate // 50 and dial.stats.connects == listen.stats.connects == 1


async def test_dial_sends_the_uuid_first_then_audio_frames_then_hangup(autojump_clock):
    """What an AudioSocket server (a bot) sees from the dial role, byte for byte."""
    received = bytearray()
    done = trio.Event()

    async def bot(stream: trio.SocketStream) -> None:
        while data := await stream.receive_some(65536):
            received.extend(data)
        done.set()

    frames = distinct_frames(10, 8000, 3)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, bot, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        dial = AudioSocketDial("bot", host="127.0.0.1", port=port)  # no uuid: a fresh one
        nursery.start_soon(run_recording, dial, lambda f: None, {})
        await wait_for(lambda: dial._out is not None)
        for frame in frames:
            await dial.send(frame)
        with trio.move_on_after(2):  # the bot never closes: goodbye waits LINGER_S, no more
            await dial.goodbye()
        await done.wait()
        nursery.cancel_scope.cancel()
    call = uuid.UUID(dial.call_uuid)
    assert call.version == 4
    expected = uuid_frame(call) + b"".join(audio_frame(f.to_bytes()) for f in frames) + hangup_frame()
    assert bytes(received) == expected
    assert all(len(f.to_bytes()) == 320 for f in frames)  # ptime 20 ms at 8 kHz


async def test_dial_to_a_server_that_is_not_there_is_a_service_error():
    with trio.socket.socket() as probe:  # a port nobody listens on
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dial = AudioSocketDial("bot", host="127.0.0.1", port=port)
    with pytest.raises(Exception) as info:
        await dial.run(lambda f: None)
    assert f"AudioSocket server 127.0.0.1:{port}: cannot connect" in str(info.value)
    assert dial.reconnects_after(info.value)  # not permanent: the route may retry


# --- a raw client that behaves like Asterisk, against a gateway from config ---------------

ROUTES = """\
server: {audiosocket: "127.0.0.1:$as_port"}
routes:
  - name: ivr
    endpoints:
      - audiosocket: {role: listen, uuid: "$call", name: call}
      - file: {path: "$reply", rate: 8000, name: reply}
      - record: {path: "$rec", rate: 8000, hears: [call]}
  - name: other
    endpoints:
      - audiosocket: {role: listen, uuid: "$other", name: call}
      - file: {path: "$reply", rate: 8000, loop: true}
"""


async def start_gateway(nursery: trio.Nursery, routes: str, **values) -> Gateway:
    """A gateway from `routes` (a string.Template; $as_port is the AudioSocket server's
    port, bound first on an ephemeral loopback port)."""
    runtime = server_runtime()
    port = await nursery.start(serve_audiosocket, listen_server(runtime), "127.0.0.1", 0)
    config = GatewayConfig.from_text(string.Template(routes).substitute(as_port=port, **values), "test.yaml")
    gateway = Gateway(config, runtime)
    await nursery.start(gateway.run)
    return gateway


class Asterisk:
    """A raw TCP client, as Asterisk's app_audiosocket behaves (res_audiosocket.c): connect,
    the UUID frame, then audio; everything it reads goes through `FrameParser`; it closes when
    it reads a hangup (its receive returns no frame and the application ends)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.parser = FrameParser()
        self.events: list = []
        self.closed = trio.Event()
        self.raw = bytearray()

    @classmethod
    async def connect(cls, nursery: trio.Nursery, port: int, call: str | None = CALL) -> Asterisk:
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        if call is not None:
            await client.stream.send_all(uuid_frame(call))
        nursery.start_soon(client._read)
        return client

    async def _read(self) -> None:
        try:
            while True:
                data = await self.stream.receive_some(65536)
                self.raw.extend(data)
                self.events.extend(self.parser.receive_data(data))
                if not data or any(isinstance(e, Hangup) for e in self.events):
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await self.stream.aclose()
            self.closed.set()

    async def stream_audio(self, pcm: np.ndarray, frame_bytes: int = 320) -> None:
        """The audio as 20 ms frames on absolute deadlines (the channel's pace)."""
        data = pcm.astype("<i2").tobytes()
        t0 = trio.current_time()
        for k, i in enumerate(range(0, len(data), frame_bytes)):
            if self.closed.is_set():
                return
            await trio.sleep_until(t0 + k * 0.02)
            try:
                await self.stream.send_all(audio_frame(data[i : i + frame_bytes]))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    def audio(self) -> np.ndarray:
        chunks = [np.frombuffer(e.payload, "<i2") for e in self.events if isinstance(e, Audio)]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)


def noise_wav(path: Path, seconds: float, seed: int, rate: int = 8000) -> np.ndarray:
    pcm = np.random.default_rng(seed).integers(-12000, 12000, size=(int(seconds * rate), 1), dtype=np.int16)
    pcm[0] = 1000  # never 0: the first sample marks where the audio starts
    write_wav(path, pcm, rate)
    return pcm[:, 0]


def find(haystack: np.ndarray, needle: np.ndarray) -> int:
    """Where `needle` starts in `haystack` (its first 8 samples are distinct enough), or -1."""
    for i in np.flatnonzero(haystack == needle[0]):
        if np.array_equal(haystack[i : i + 8], needle[:8]):
            return int(i)
    return -1


async def test_an_asterisk_like_client_hears_the_route_and_is_recorded(autojump_clock, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    reply = noise_wav(tmp_path / "reply.wav", 1.0, 4)
    says = noise_wav(tmp_path / "says.wav", 3.0, 5)[:, None]
    async with trio.open_nursery() as nursery:
        gateway = await start_gateway(nursery, ROUTES, call=CALL, other=OTHER, reply=tmp_path / "reply.wav",
                                      rec=tmp_path / "rec.wav")
        port = listen_server(gateway.runtime).port
        asterisk = await Asterisk.connect(nursery, port)
        await asterisk.stream.send_all(dtmf_frame("5"))  # a key press on the call
        await asterisk.stream.send_all(error_frame(2))  # an error report: logged, the call goes on
        nursery.start_soon(asterisk.stream_audio, says)  # (one task sends: a stream has one writer)
        with trio.fail_after(30):
            await asterisk.closed.wait()  # the reply file ends, the route ends: hangup, close
        route = gateway.routes["ivr"].route
        await wait_for(lambda: gateway.routes["ivr"].state == "waiting")
        exposition = metrics.render(gateway)[0].decode()
        nursery.cancel_scope.cancel()
    # what Asterisk read: only audio frames (kind 0x10, 320 bytes each) and the hangup at the end
    assert isinstance(asterisk.events[-1], Hangup) and asterisk.raw.endswith(b"\x00\x00\x00")
    audio = [e for e in asterisk.events if isinstance(e, Audio)]
    assert len(audio) == len(asterisk.events) - 1 and all(len(e.payload) == 320 and e.rate == 8000 for e in audio)
    heard = asterisk.audio()
    start = find(heard, reply)
    assert start >= 0 and np.array_equal(heard[start : start + len(reply)], reply)  # intact, in order
    # what the route recorded of the call: Asterisk's audio, intact, until the route ended
    recorded, rate = read_wav(tmp_path / "rec.wav")
    recorded = recorded[:, 0]
    at = find(recorded, says[:, 0])
    assert rate == 8000 and at >= 0
    got = recorded[at:]
    assert len(got) >= 0.8 * 8000 and np.array_equal(got, says[: len(got), 0])
    assert any(e.kind == "dtmf" and e.data == {"digit": "5"} for _, e in route.stats.recent_events)
    assert route.endpoints[0].stats.dtmf_in == 1
    assert "Asterisk 127.0.0.1:" in caplog.text and f"connected (call {CALL})" in caplog.text
    assert "reported an AudioSocket error (code 0x02: frame forwarding error)" in caplog.text
    assert route.stats.ended_by == "reply: ended"  # the file's end ended the call, not the error frame
    # the endpoint's counters in /metrics, labelled with its kind
    labels = 'endpoint="call",kind="audiosocket",route="ivr"'
    assert f"gateway_dtmf_received_total{{{labels}}} 1.0" in exposition
    received = re.search(rf"gateway_frames_received_total{{{labels}}} (\S+)", exposition)
    assert received and float(received.group(1)) >= 40  # at least 0.8 s of 20 ms frames


# --- refusals and bad input ----------------------------------------------------------------

LISTEN_ROUTES = """\
server: {audiosocket: "127.0.0.1:$as_port"}
routes:
  - name: ivr
    endpoints:
      - audiosocket: {role: listen, uuid: "$call", name: call}
      - file: {path: "$reply", rate: 8000, loop: true}
"""


async def refused(port: int, data: bytes) -> bytes:
    """Connect, send `data`, and read until the gateway closes: what it sent."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = bytearray()
    async with stream:
        await stream.send_all(data)
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                received.extend(chunk)
    return bytes(received)


REFUSALS = [
    (uuid_frame(OTHER), f"no listen endpoint for UUID {OTHER}"),
    (audio_frame(bytes(320)), "the first frame is an audio frame, not the UUID frame (kind 0x01)"),
    (dtmf_frame("1"), "the first frame is a DTMF frame, not the UUID frame"),
    (b"\x02\x00\x00", "its first frame broke the protocol: unknown AudioSocket kind 0x02"),
    (b"\x01\x00\x0f" + bytes(15), "its first frame broke the protocol: AudioSocket UUID payload 15 bytes, expected 16"),
    (b"\x01\xff\xff", "its first frame broke the protocol: AudioSocket UUID payload 65535 bytes, limit 1920"),
]


@pytest.mark.parametrize("data, cause", REFUSALS, ids=[c.split(":")[0][:30] for _, c in REFUSALS])
async def test_refused_connections_get_a_hangup_and_a_close_and_a_log_line(autojump_clock, tmp_path, caplog, data, cause):
    noise_wav(tmp_path / "reply.wav", 1.0, 6)
    async with trio.open_nursery() as nursery:
        gateway = await start_gateway(nursery, LISTEN_ROUTES, call=CALL, reply=tmp_path / "reply.wav")
        port = listen_server(gateway.runtime).port
        assert await refused(port, data) == hangup_frame()
        nursery.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.audiosocket" and r.levelname == "WARNING"]
    assert len(lines) == 1 and cause in lines[0] and "(hangup, then close)" in lines[0], lines


async def test_no_uuid_frame_within_5_s_is_refused(autojump_clock, tmp_path, caplog):
    noise_wav(tmp_path / "reply.wav", 1.0, 6)
    async with trio.open_nursery() as nursery:
        gateway = await start_gateway(nursery, LISTEN_ROUTES, call=CALL, reply=tmp_path / "reply.wav")
        port = listen_server(gateway.runtime).port
        t0 = trio.current_time()
        assert await refused(port, b"\x01\x00") == hangup_frame()  # half a header, then nothing
        assert trio.current_time() - t0 == pytest.approx(as_server.FIRST_FRAME_TIMEOUT, abs=0.01)
        nursery.cancel_scope.cancel()
    assert "no UUID frame within 5 s of connecting" in caplog.text


BAD_INPUT = [
    # (bytes sent mid-call, then EOF; the cause in the warning)
    (audio_frame(bytes(320))[:200], "AudioSocket audio frame truncated at end of stream: expected 320 payload bytes, got 197"),
    (b"\x10\x01", "AudioSocket header truncated at end of stream: expected 3 bytes, got 2"),
    (b"\x02\x00\x00", "unknown AudioSocket kind 0x02"),
    (b"\x10\xff\xff", "AudioSocket audio payload 65535 bytes, limit 1920"),
    (b"\x10\x00\x03" + bytes(3), "odd length (3 bytes)"),
    (audio_frame(bytes(640), AUDIO_KIND_OF_RATE[16000]), "audio at 16000 Hz on an endpoint configured for 8000 Hz"),
    (b"\x03\x00\x01x", "AudioSocket DTMF payload is not one digit"),
]


@pytest.mark.parametrize("bad, cause", BAD_INPUT, ids=[c[:30] for _, c in BAD_INPUT])
async def test_bad_input_mid_call_closes_that_connection_alone(autojump_clock, tmp_path, caplog, bad, cause):
    """One call breaks the protocol: it gets the hangup and the close, one warning names the
    cause; the call on the other route never notices, and the broken call's route serves the
    next call."""
    noise_wav(tmp_path / "reply.wav", 1.0, 7)
    says = noise_wav(tmp_path / "says.wav", 0.2, 8)[:, None]
    async with trio.open_nursery() as nursery:
        gateway = await start_gateway(nursery, ROUTES, call=CALL, other=OTHER, reply=tmp_path / "reply.wav",
                                      rec=tmp_path / "rec.wav")
        port = listen_server(gateway.runtime).port
        good = await Asterisk.connect(nursery, port, OTHER)  # a call on the other route
        nursery.start_soon(good.stream_audio, np.zeros((8000 * 3, 1), np.int16))
        await wait_for(lambda: gateway.routes["other"].route.up.is_set())
        broken = await Asterisk.connect(nursery, port, CALL)
        await wait_for(lambda: gateway.routes["ivr"].route.up.is_set())
        await broken.stream_audio(says)
        before = len(good.events)
        try:
            await broken.stream.send_all(bad)
            await broken.stream.send_eof()  # EOF after the bad bytes (a truncated frame is cut by it)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the gateway refused the frame already and closed
        with trio.fail_after(5):
            await broken.closed.wait()
        await trio.sleep(0.5)
        assert len(good.events) >= before + 20  # the other call kept streaming (20 ms frames)
        assert not good.closed.is_set()
        await wait_for(lambda: gateway.routes["ivr"].state == "waiting")
        # the broken call's route takes the next call
        nxt = await Asterisk.connect(nursery, port, CALL)
        await wait_for(lambda: len(nxt.events) >= 5)
        nursery.cancel_scope.cancel()
    assert isinstance(broken.events[-1], Hangup)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "closing the AudioSocket" in r.getMessage()]
    assert len(warnings) == 1 and cause in warnings[0] and "broke the protocol" in warnings[0], warnings
    assert gateway.routes["other"].route.stats.sessions == 1  # never restarted


async def test_a_second_call_for_a_busy_endpoint_is_refused(autojump_clock, tmp_path, caplog):
    noise_wav(tmp_path / "reply.wav", 1.0, 9)
    async with trio.open_nursery() as nursery:
        gateway = await start_gateway(nursery, LISTEN_ROUTES, call=CALL, reply=tmp_path / "reply.wav")
        port = listen_server(gateway.runtime).port
        first = await Asterisk.connect(nursery, port)
        await wait_for(lambda: len(first.events) >= 3)
        assert await refused(port, uuid_frame(CALL)) == hangup_frame()
        assert not first.closed.is_set()
        nursery.cancel_scope.cancel()
    assert f"call {CALL}: AudioSocket listen endpoint call (call {CALL}) already has a connected call" in caplog.text


async def test_a_catch_all_endpoint_takes_the_calls_no_other_claims(autojump_clock, tmp_path):
    noise_wav(tmp_path / "reply.wav", 1.0, 10)
    routes = LISTEN_ROUTES + """\
  - name: any
    endpoints:
      - audiosocket: {role: listen, uuid: "*", name: call}
      - file: {path: "$reply", rate: 8000, loop: true}
"""
    async with trio.open_nursery() as nursery:
        gateway = await start_gateway(nursery, routes, call=CALL, reply=tmp_path / "reply.wav")
        port = listen_server(gateway.runtime).port
        exact = await Asterisk.connect(nursery, port, CALL)
        anyone = await Asterisk.connect(nursery, port, OTHER)
        await wait_for(lambda: len(exact.events) >= 3 and len(anyone.events) >= 3)
        assert gateway.routes["ivr"].route.endpoints[0].call_uuid == CALL
        assert gateway.routes["any"].route.endpoints[0].call_uuid == OTHER
        nursery.cancel_scope.cancel()



# --- idle calls (listen) ---------------------------------------------------------------------


async def test_a_call_that_goes_silent_is_hung_up_after_the_idle_timeout_and_the_next_is_served(
        autojump_clock, tmp_path, caplog):
    """Asterisk gone without a FIN (a crash, a partition): the connection stays open and sends
    nothing. `IDLE_TIMEOUT_S` (60 s) after its last frame it gets the hangup frame and the
    close, one warning names the cause, the call ends normally (no restart, no error) and the
    endpoint, which serves one call at a time, takes the next call at once."""
    noise_wav(tmp_path / "reply.wav", 1.0, 12)
    says = noise_wav(tmp_path / "says.wav", 1.0, 13)[:, None]
    async with trio.open_nursery() as nursery:
        gateway = await start_gateway(nursery, LISTEN_ROUTES, call=CALL, reply=tmp_path / "reply.wav")
        state = gateway.routes["ivr"]
        port = listen_server(gateway.runtime).port
        gone = await Asterisk.connect(nursery, port)
        await gone.stream_audio(says)  # 1 s of audio, then nothing, the connection left open
        last = trio.current_time()
        heard_before = len(gone.events)
        with trio.fail_after(as_server.FIRST_FRAME_TIMEOUT + 2 * as_endpoint.IDLE_TIMEOUT_S):
            await gone.closed.wait()
        silent_for = trio.current_time() - last
        await wait_for(lambda: state.state == "waiting")
        assert state.restarts == 0 and state.last_error == "", (state.restarts, state.last_error)
        assert state.route.stats.ended_by == "call: idle timeout: no frame for 60 s"
        nxt = await Asterisk.connect(nursery, port)  # the next call is served, not refused as busy
        await wait_for(lambda: len(nxt.events) >= 5)
        assert not nxt.closed.is_set()
        nursery.cancel_scope.cancel()
    assert silent_for == pytest.approx(as_endpoint.IDLE_TIMEOUT_S, abs=0.05), silent_for
    assert as_endpoint.IDLE_TIMEOUT_S == 60.0
    assert isinstance(gone.events[-1], Hangup) and gone.raw.endswith(hangup_frame())
    # the route played to the call the whole minute: about 50 frames a second until the hangup
    assert len(gone.events) - heard_before >= 50 * 55
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("closing the AudioSocket connection: idle timeout: Asterisk 127.0.0.1:")
    assert warnings[0].endswith("sent no frame for 60 s (idle_timeout_s: 0 turns the limit off)")


@pytest.mark.parametrize("option, presses", [("", True), (", idle_timeout_s: 0", False)],
                         ids=["dtmf-frames-count", "idle_timeout_s-0"])
async def test_a_call_that_sends_frames_or_has_no_limit_is_not_hung_up(autojump_clock, tmp_path, monkeypatch,
                                                                       option, presses):
    """A frame of any kind moves the deadline (a caller pressing a key every 8 s, no audio,
    with the default shrunk to 10 s); `idle_timeout_s: 0` keeps a call that sends nothing at
    all. Over three times the timeout each."""
    monkeypatch.setattr(as_endpoint, "IDLE_TIMEOUT_S", 10.0)
    noise_wav(tmp_path / "reply.wav", 1.0, 14)
    routes = LISTEN_ROUTES.replace('name: call}', 'name: call' + option + '}')
    async with trio.open_nursery() as nursery:
        gateway = await start_gateway(nursery, routes, call=CALL, reply=tmp_path / "reply.wav")
        endpoint = gateway.routes["ivr"].route.endpoints[0]
        assert endpoint.idle_timeout == (10.0 if presses else 0.0)
        asterisk = await Asterisk.connect(nursery, listen_server(gateway.runtime).port)
        for _ in range(4):
            await trio.sleep(8)
            if presses:
                await asterisk.stream.send_all(dtmf_frame("7"))
        heard = len(asterisk.events)
        await trio.sleep(1)
        assert len(asterisk.events) >= heard + 40  # still streaming to it
        assert not asterisk.closed.is_set() and gateway.routes["ivr"].state == "up"
        assert endpoint.stats.dtmf_in == (4 if presses else 0)
        nursery.cancel_scope.cancel()


# --- pacing, DTMF, the daemon, the config ---------------------------------------------------


async def test_a_server_that_sends_faster_than_real_time_is_queued_as_bursty(autojump_clock, caplog):
    caplog.set_level(logging.INFO)
    speech = distinct_frames(100, 8000, 11)  # 2 s, written at once, as a TTS bot may

    async def bot(stream: trio.SocketStream) -> None:
        await stream.receive_some(19)  # the UUID frame
        await stream.send_all(b"".join(audio_frame(f.to_bytes()) for f in speech))
        await trio.sleep_forever()

    frames: list[AudioFrame] = []
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, bot, 0, host="127.0.0.1"))
        dial = AudioSocketDial("bot", host="127.0.0.1", port=listeners[0].socket.getsockname()[1])
        assert not dial.bursty
        nursery.start_soon(run_recording, dial, frames.append, {})
        await wait_for(lambda: len(frames) == 100)
        nursery.cancel_scope.cancel()
    assert dial.bursty
    assert f"sends audio faster than real time (more than {UNPACED_AHEAD_S:g} s ahead)" in caplog.text
    assert np.array_equal(np.concatenate([f.pcm for f in frames]), np.concatenate([f.pcm for f in speech]))


async def test_dtmf_route_events_go_to_a_bot_as_dtmf_frames_before_the_audio(autojump_clock):
    received = bytearray()

    async def bot(stream: trio.SocketStream) -> None:
        while data := await stream.receive_some(65536):
            received.extend(data)

    frames = distinct_frames(3, 8000, 12)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, bot, 0, host="127.0.0.1"))
        dial = AudioSocketDial("bot", host="127.0.0.1", port=listeners[0].socket.getsockname()[1], call_uuid=CALL)
        nursery.start_soon(run_recording, dial, lambda f: None, {})
        await wait_for(lambda: dial._out is not None)
        await dial.send(frames[0])
        dial.on_route_event(RouteEvent("call", "dtmf", {"digit": "7"}))
        dial.on_route_event(RouteEvent("call", "dtmf", {"digit": "x"}))  # not a key: ignored
        await dial.send(frames[1])
        await dial.send(frames[2])
        await wait_for(lambda: len(received) >= 19 + 3 * 323 + 4)
        nursery.cancel_scope.cancel()
    events = FrameParser().receive_data(bytes(received))
    assert [type(e).__name__ for e in events] == ["CallUuid", "Audio", "Dtmf", "Audio", "Audio"]
    assert events[2] == Dtmf("7") and dial.stats.dtmf_out == 1
    assert not AudioSocketListen.accepts_events  # Asterisk reads no DTMF from the server


async def test_the_daemon_starts_the_audiosocket_server_from_config(autojump_clock, tmp_path):
    noise_wav(tmp_path / "reply.wav", 1.0, 13)
    text = string.Template(LISTEN_ROUTES).substitute(as_port=0, call=CALL, reply=tmp_path / "reply.wav")
    gateway = Gateway(GatewayConfig.from_text(text, "test.yaml"))
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.run)
        port = listen_server(gateway.runtime).port
        assert port  # bound by the daemon (port 0: an ephemeral one)
        asterisk = await Asterisk.connect(nursery, port)
        await wait_for(lambda: len(asterisk.events) >= 5)
        assert gateway.routes["ivr"].route.up.is_set()
        nursery.cancel_scope.cancel()


def test_example_config_loads_and_builds():
    config = GatewayConfig.load(ROOT / "config" / "audiosocket.example.yaml")
    assert str(config.server.audiosocket) == "0.0.0.0:9092"
    gateway = Gateway(config)
    gateway.build()
    endpoints = {name: [e for e in r.route.endpoints if e.kind == "audiosocket"] for name, r in gateway.routes.items()}
    assert {name: [e.role for e in eps] for name, eps in endpoints.items() if eps} == {
        "ivr": ["listen"], "any-call": ["listen"], "voice-bot": ["listen", "dial"],
    }
    assert endpoints["ivr"][0].uuid_option == CALL
    assert endpoints["any-call"][0].uuid_option == "*"
    dial = endpoints["voice-bot"][1]
    assert (dial.host, dial.port, dial.rate, dial.egress.rate) == ("127.0.0.1", 9093, 16000, 16000)
    for state in gateway.routes.values():
        for endpoint in state.route.endpoints:
            endpoint.detach()


@pytest.mark.parametrize(
    "endpoint, message",
    [
        ("{role: listen}", 'endpoints[0].audiosocket.uuid: a listen endpoint needs the uuid: of its calls'),
        ("{role: listen, uuid: nope}", "endpoints[0].audiosocket.uuid: expected a UUID such as"),
        ("{role: listen, uuid: \"%s\", rate: 11025}" % CALL, "endpoints[0].audiosocket.rate: expected one of 8000, 12000, 16000, "
         "24000, 32000, 44100, 48000, 96000, 192000, got 11025"),
        ("{role: listen, uuid: \"%s\", ptime_ms: 30}" % CALL, "endpoints[0].audiosocket.ptime_ms: expected one of 10, 20, 40, 60"),
        ("{}", "endpoints[0].audiosocket: missing required key 'address'"),
        ("{address: nowhere}", "endpoints[0].audiosocket.address: expected HOST:PORT, got 'nowhere'"),
        ("{address: '127.0.0.1:9092', uuid: '*'}", "endpoints[0].audiosocket.uuid: expected a UUID"),
        ("{address: '127.0.0.1:9092', speed: 2}", "speed"),
        ("{role: listen, uuid: \"%s\", idle_timeout_s: -1}" % CALL, "endpoints[0].audiosocket.idle_timeout_s: expected at least 0"),
        ("{address: '127.0.0.1:9092', idle_timeout_s: 60}", "idle_timeout_s"),  # listen only
    ],
)
def test_config_errors_name_the_key(endpoint, message):
    text = f"""\
server: {{audiosocket: "127.0.0.1:0"}}
routes:
  - name: r
    endpoints:
      - audiosocket: {endpoint}
      - record: {{path: /tmp/x.wav}}
"""
    with pytest.raises(ConfigError) as info:
        Gateway(GatewayConfig.from_text(text, "gw.yaml")).build()
    assert message in str(info.value), str(info.value)
    assert str(info.value).startswith("gw.yaml:")


def test_a_listen_endpoint_needs_server_audiosocket_and_a_uuid_of_its_own():
    route = """\
  - name: %s
    endpoints:
      - audiosocket: {role: listen, uuid: "%s"}
      - record: {path: /tmp/x.wav}
"""
    with pytest.raises(ConfigError, match=r"a listen endpoint needs server.audiosocket \(HOST:PORT\)"):
        Gateway(GatewayConfig.from_text("routes:\n" + route % ("a", CALL), "gw.yaml")).build()
    text = "server: {audiosocket: '127.0.0.1:0'}\nroutes:\n" + route % ("a", CALL) + route % ("b", CALL.upper())
    with pytest.raises(ConfigError, match=f"AudioSocket UUID {CALL} already has a listen endpoint"):
        Gateway(GatewayConfig.from_text(text, "gw.yaml")).build()


def test_golden_refusal_bytes_are_what_asterisk_understands():
    # the only frames Asterisk reads from a server are audio and hangup (res_audiosocket.c)
    assert hangup_frame() == struct.pack("!BH", 0, 0)


@pytest.mark.xdist_group("realtime")
async def test_under_workers_each_call_reaches_the_worker_that_serves_its_uuid(tmp_path):
    """`gateway run --workers 2`: the supervisor accepts every AudioSocket connection, peeks at
    its UUID frame and hands the connection to the worker whose listen endpoint has that UUID
    (a UUID nobody claims: the catch-all's worker; a first frame that is not a UUID frame:
    worker 0, which refuses it). Each call hears its own route's file, intact."""
    import os
    import subprocess
    import sys

    from gateway.config.schema import GatewayConfig
    from gateway.workers import worker_of
    from test_cli import free_port

    http, port = free_port(), free_port()
    files = {name: noise_wav(tmp_path / f"{name}.wav", 2.0, seed) for seed, name in enumerate(["a", "b", "any"])}
    text = f"""\
server: {{http: "127.0.0.1:{http}", audiosocket: "127.0.0.1:{port}"}}
routes:
""" + "".join(f"""\
  - name: {route}
    endpoints:
      - audiosocket: {{role: listen, uuid: "{uuid}"}}
      - file: {{path: "{tmp_path / (file + '.wav')}", rate: 8000, loop: true}}
""" for route, uuid, file in [("desk-a", CALL, "a"), ("desk-d", OTHER, "b"), ("anyone", "*", "any")])
    config = tmp_path / "gw.yaml"
    config.write_text(text)
    placed = {rc.name: worker_of(rc, 2) for rc in GatewayConfig.load(str(config)).routes}
    assert placed["desk-a"] != placed["desk-d"], placed  # what this test is about: two workers
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", str(config), "--workers", "2"],
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        heard: dict[str, np.ndarray] = {}
        async with trio.open_nursery() as nursery:
            with trio.fail_after(30):
                while True:  # the supervisor and its workers start
                    try:
                        await (await trio.open_tcp_stream("127.0.0.1", http)).aclose()
                        break
                    except OSError:
                        await trio.sleep(0.1)
                for key, call in (("a", CALL), ("b", OTHER), ("any", "0f000000-0000-4000-8000-000000000001")):
                    while True:
                        asterisk = await Asterisk.connect(nursery, port, call)
                        while len(asterisk.audio()) < 8000 and not asterisk.closed.is_set():
                            await trio.sleep(0.05)
                        if not asterisk.closed.is_set():
                            break
                        await trio.sleep(0.2)  # refused while the workers were still coming up: again
                    heard[key] = asterisk.audio()
                    await asterisk.stream.send_all(hangup_frame())
                bad = await Asterisk.connect(nursery, port, None)
                await bad.stream.send_all(audio_frame(b"\0" * 320))  # audio before the UUID frame
                await bad.closed.wait()
            nursery.cancel_scope.cancel()
        proc.send_signal(signal.SIGTERM)
        output, _ = await trio.to_thread.run_sync(lambda: proc.communicate(timeout=15))
    finally:
        proc.kill()
    for key, pcm in heard.items():
        start = find(pcm, files[key])
        assert start >= 0, f"call {key} did not hear its route's file"
        got = pcm[start:start + 4000]
        assert np.array_equal(got, files[key][:len(got)]) and len(got) == 4000, key  # intact, in order
    assert isinstance(bad.events[-1], Hangup) and "not the UUID frame" in output, output
    assert proc.returncode == 0 and "Traceback" not in output, output


async def test_a_call_at_8_khz_talks_to_a_bot_at_16_khz_through_the_codec_graph(autojump_clock, tmp_path):
    """The example's voice-bot route: Asterisk (slin 8 kHz) ⇄ listen | dial ⇄ an echo bot that
    serves AudioSocket at 16 kHz (kind 0x12, 640 bytes per 20 ms). The bot gets 16 kHz frames
    only and the caller hears its own words back, resampled twice."""
    bot_kinds: list[int] = []
    bot_sizes: list[int] = []

    async def echo_bot(stream: trio.SocketStream) -> None:
        parser = FrameParser()
        while data := await stream.receive_some(65536):
            for event in parser.receive_data(data):
                if isinstance(event, Audio):
                    bot_kinds.append(AUDIO_KIND_OF_RATE[event.rate])
                    bot_sizes.append(len(event.payload))
                    await stream.send_all(audio_frame(event.payload, AUDIO_KIND_OF_RATE[event.rate]))

    t = np.arange(8000 * 2) / 8000
    tone = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)[:, None]  # 2 s of 440 Hz
    routes = """\
server: {audiosocket: "127.0.0.1:$as_port"}
routes:
  - name: voice-bot
    endpoints:
      - audiosocket: {role: listen, uuid: "$call", name: caller}
      - audiosocket: {address: "127.0.0.1:$bot_port", rate: 16000, name: bot}
"""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, echo_bot, 0, host="127.0.0.1"))
        gateway = await start_gateway(nursery, routes, call=CALL, bot_port=listeners[0].socket.getsockname()[1])
        asterisk = await Asterisk.connect(nursery, listen_server(gateway.runtime).port)
        await asterisk.stream_audio(tone)
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    assert bot_kinds and set(bot_kinds) == {0x12} and set(bot_sizes) == {640}
    heard = asterisk.audio().astype(np.float64)
    assert {e.rate for e in asterisk.events if isinstance(e, Audio)} == {8000}
    loud = np.flatnonzero(np.abs(heard) > 1000)
    assert len(loud) > 8000  # more than a second of the tone came back
    middle = (loud[0] + loud[-1]) // 2
    spectrum = np.abs(np.fft.rfft(heard[middle - 4000 : middle + 4000]))  # a second from the middle of it
    assert np.argmax(spectrum) == 440  # 1 Hz bins: the caller hears 440 Hz


async def test_goodbye_while_a_send_is_blocked_waits_for_it_and_the_hangup_follows_whole(autojump_clock):
    """A bot that stops reading fills the socket buffers, so the pacer's send blocks; the
    route's goodbye then waits for that send (never writing beside it) and the hangup frame
    follows the last audio frame whole."""
    start_reading = trio.Event()
    received = bytearray()

    async def slow_bot(stream: trio.SocketStream) -> None:
        await start_reading.wait()
        while data := await stream.receive_some(65536):
            received.extend(data)

    big = AudioFrame(np.full((32000, 1), 1234, np.int16), 8000, 0)  # 64000 bytes per frame
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, slow_bot, 0, host="127.0.0.1"))
        dial = AudioSocketDial("bot", host="127.0.0.1", port=listeners[0].socket.getsockname()[1], call_uuid=CALL)
        nursery.start_soon(run_recording, dial, lambda f: None, {})
        await wait_for(lambda: dial._out is not None)

        async def pacer() -> None:
            while dial._out is not None:
                await dial.send(big)

        nursery.start_soon(pacer)
        with trio.fail_after(30):
            while not dial._sending:  # until a send is blocked on the full buffers
                await trio.sleep(0.01)
            await trio.sleep(0.1)
        assert dial._sending
        async with trio.open_nursery() as inner:
            inner.start_soon(dial.goodbye)
            await trio.sleep(0.05)
            start_reading.set()  # the blocked send completes, then the hangup and FIN go
        await wait_for(lambda: received.endswith(hangup_frame()))
        nursery.cancel_scope.cancel()
    events = FrameParser(limits={**default_limits(), 0x10: ("audio", 0xFFFF)}).receive_data(bytes(received))
    sent = dial.stats.frames_out
    assert [type(e).__name__ for e in events] == ["CallUuid"] + ["Audio"] * sent + ["Hangup"]
    assert sent >= 2 and all(e.payload == big.to_bytes() for e in events[1:-1])
