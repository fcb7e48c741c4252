"""The specs' own example clients, run for real with Node.js (tests/seed_clients/).

- The VoIPBIN spec's "Node.js Example (AudioSocket)" against the gateway's VoIPBIN listen role:
  it connects with ``encapsulation=audiosocket`` and sends its whole file at once in 320-byte
  chunks of raw slin, with no AudioSocket header; it never closes the socket itself, and
  appends whatever it receives to received_audio.pcm. The call it joins plays an announcement
  to it and records what it hears; when the announcement ends the call hangs up.
- The same burst from a client that closes right after sending (written here, on trio): the
  route still plays out everything it queued before it ends.
- The Argon spec's TypeScript example pipes ``ffmpeg -f opus`` into ``ws.send(chunk)``: an Ogg
  Opus stream cut at arbitrary offsets. Its ffmpeg command is checked against our demuxer, and
  the script itself is run against a minimal stand-in of Argon's REST call and ingress
  written here (the test against the gateway's Argon listen role belongs with that role).

What is checked is what a user would check: the whole speech arrives, in order and intact
(block by block, and here bit-exact: slin 8 kHz end to end is never re-encoded), played at
real time (as long as the speech, though it arrived in a burst), and one warning names the
headerless client. Node's first start on a cold machine is slow: timeouts allow for it;
the checks do not loosen.
"""

from __future__ import annotations

import io
import json
from functools import partial
from urllib.parse import parse_qs, urlsplit

import av
import h11
import numpy as np
import opuslib
import soxr
import trio
from trio_websocket import ConnectionClosed, connect_websocket_url, serve_websocket

from audio_checks import active_duration, best_alignment, blockwise_alignment, read_wav, write_wav
from conftest import ASSETS
from gateway.adapters.voipbin.wire import Encapsulation, Hangup, MediaStreamProtocol
from gateway.codecs.ogg import OggOpusDemuxer, looks_like_ogg
from gateway.codecs.opus import packet_channels, packet_samples
from harness import VOIPBIN_TOKEN, start
from seed_clients import (
    ARGON_STREAM,
    VOIPBIN_AUDIOSOCKET,
    argon_env,
    require_ffmpeg,
    run_node,
    voipbin_env,
)

CALL_ID = "5eedc11e-0000-4000-8000-000000000002"
NODE_TIMEOUT = 90.0  # s: node's first start on a cold machine, plus the call itself
CALLER_S = 2.0  # the speech the example sends
ANNOUNCEMENT_S = 3.0  # what the call plays to it: the call ends when it ends

CALL = """
routes:
  - name: call
    endpoints:
      - voipbin: {role: listen, name: call, call_id: $call_id, encapsulation: audiosocket}
      - file: {name: announcement, path: "$announcement", rate: 8000}
      - record: {name: heard, path: "$out/heard.wav", rate: 8000, hears: [call]}
"""

CALL_WITHOUT_ANNOUNCEMENT = """
routes:
  - name: call
    endpoints:
      - voipbin: {role: listen, name: call, call_id: $call_id, encapsulation: audiosocket}
      - record: {name: heard, path: "$out/heard.wav", rate: 8000}
"""


def pyav_packets(data: bytes) -> list[bytes]:
    """The audio packets FFmpeg's Ogg demuxer finds in `data` (without its empty end packet)."""
    with av.open(io.BytesIO(data), format="ogg") as container:
        return [bytes(p) for p in container.demux(container.streams.audio[0]) if p.size]


def cut(source: str, start_s: float, seconds: float) -> tuple[np.ndarray, int]:
    pcm, rate = read_wav(ASSETS / source)
    return pcm[int(start_s * rate) : int((start_s + seconds) * rate)], rate


class Timed:
    """trio times at which an endpoint emitted ingress frames (what its peer sent), and at
    which the route sent it frames (what it played)."""

    def __init__(self) -> None:
        self.emitted: list[float] = []
        self.sent: list[float] = []

    def on_emit(self, endpoint) -> None:
        run = endpoint.run

        async def timed_run(emit, *, task_status=trio.TASK_STATUS_IGNORED):
            def timed(frame):
                self.emitted.append(trio.current_time())
                emit(frame)

            return await run(timed, task_status=task_status)

        endpoint.run = timed_run

    def on_send(self, endpoint) -> None:
        send = endpoint.send

        async def timed_send(frame):
            self.sent.append(trio.current_time())
            await send(frame)

        endpoint.send = timed_send


def check_speech_played_at_real_time(clip: np.ndarray, recording: np.ndarray, sent: list[float], gateway) -> int:
    """The clip is in the recording whole, in order and bit-exact, and its frames went out one
    per 20 ms; returns where it starts (samples)."""
    stats = {e.name: e.stats.as_dict() for e in gateway.routes["call"].route.endpoints}
    blocks = blockwise_alignment(clip, 8000, recording, 8000)
    assert len(blocks) >= 5 and min(blocks) > 0.99, f"speech blocks {np.round(blocks, 3)}: {stats}"
    _, lag = best_alignment(clip, 8000, recording, 8000)
    start = round(lag * 8000)
    assert 0 <= start < 8000 * 0.2, f"the speech starts {lag:.3f} s into the recording: {stats}"
    np.testing.assert_array_equal(recording[start : start + len(clip)], clip)  # slin end to end: untouched
    assert abs(active_duration(recording, 8000) - active_duration(clip, 8000)) <= 0.02
    # played at real time: the frames holding the speech were sent over its duration
    first, last = start // 160, (start + len(clip) - 1) // 160
    span = sent[last] - sent[first]
    expected = (last - first) * 0.020
    assert abs(span - expected) < 0.03 * expected + 0.04, f"{last - first + 1} frames played in {span:.3f} s"
    return start


async def test_voipbin_node_example_is_heard_whole_at_real_time(tmp_path, caplog):
    clip, rate = cut("or105.wav", 0.3, CALLER_S)
    announcement, _ = cut("or109.wav", 0.2, ANNOUNCEMENT_S)
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    (client_dir / "audio.pcm").write_bytes(clip.astype("<i2").tobytes())  # raw PCM16 LE 8 kHz mono
    write_wav(tmp_path / "announcement.wav", announcement, rate)
    timed = Timed()

    def prepare(gateway):
        call, _, heard = gateway.routes["call"].route.endpoints
        timed.on_emit(call)
        timed.on_send(heard)

    caplog.set_level("INFO")
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, CALL, prepare=prepare, call_id=CALL_ID,
                              announcement=str(tmp_path / "announcement.wav"), out=str(tmp_path))
        env = voipbin_env(f"ws://127.0.0.1:{gateway.runtime.media.port}", CALL_ID, VOIPBIN_TOKEN)
        with trio.fail_after(NODE_TIMEOUT + 10):
            # the example never closes: it exits once the call hangs up (the announcement ended)
            status, stdout, stderr = await run_node(VOIPBIN_AUDIOSOCKET, env=env, cwd=client_dir, timeout=NODE_TIMEOUT)
            await gateway.routes["call"].sessions_done.wait()
        nursery.cancel_scope.cancel()

    route = gateway.routes["call"].route
    call, _, heard = route.endpoints
    assert status == 0 and "Error" not in stderr, (status, stdout, stderr)
    lines = stdout.splitlines()
    assert lines[0] == "AudioSocket connected" and lines[-1] == "AudioSocket closed", stdout[-500:]
    assert route.stats.ended_by == "announcement: ended"

    # one warning names the headerless client; the session was bursty
    warnings = [r for r in caplog.records
                if r.levelname == "WARNING" and "without AudioSocket headers" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "client sends raw slin" in warnings[0].getMessage() and "Node.js example" in warnings[0].getMessage()
    assert warnings[0].name == "gateway.endpoint.voipbin" and call.bursty

    # what the client sent: every chunk, in a burst far shorter than the speech
    assert call.stats.frames_in == len(clip) // 160 and call.stats.bytes_in == 2 * len(clip)
    burst = timed.emitted[-1] - timed.emitted[0]
    assert burst < CALLER_S / 2, f"the example's {len(timed.emitted)} chunks arrived over {burst:.3f} s"
    # what the call heard: the whole speech, intact, played at real time, nothing dropped
    recording, rec_rate = read_wav(tmp_path / "heard.wav")
    assert rec_rate == 8000 and heard.stats.dropped == 0 and heard.stats.late == 0
    check_speech_played_at_real_time(clip, recording, timed.sent, gateway)

    # what the client received: AudioSocket audio frames (our choice), then the hangup frame
    received = (client_dir / "received_audio.pcm").read_bytes()
    events = MediaStreamProtocol(Encapsulation.AUDIOSOCKET).receive(received)
    assert isinstance(events[-1], Hangup) and len(received) == 323 * (len(events) - 1) + 3
    assert sum(line == "Received 323 bytes" for line in lines) == len(events) - 1
    played = np.frombuffer(b"".join(e.payload for e in events[:-1]), dtype="<i2")
    assert abs(len(played) / 8000 - ANNOUNCEMENT_S) < 0.1
    blocks = blockwise_alignment(announcement, rate, played, 8000)
    assert len(blocks) >= 6 and sum(b > 0.9 for b in blocks) >= 0.9 * len(blocks), np.round(blocks, 2)


async def test_voipbin_burst_then_close_is_played_out_before_the_route_ends(tmp_path, caplog):
    """The same unpaced burst from a client that closes right after sending: the route
    queues it (bursty) and plays it to the end before ending the session."""
    clip, _ = cut("or105.wav", 0.3, CALLER_S)
    raw = clip.astype("<i2").tobytes()
    timed = Timed()

    def prepare(gateway):
        timed.on_send(gateway.routes["call"].route.endpoints[1])

    caplog.set_level("INFO")
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, CALL_WITHOUT_ANNOUNCEMENT, prepare=prepare, call_id=CALL_ID, out=str(tmp_path))
        url = (f"ws://127.0.0.1:{gateway.runtime.media.port}/v1.0/calls/{CALL_ID}/media_stream"
               f"?encapsulation=audiosocket&token={VOIPBIN_TOKEN}")
        with trio.fail_after(30):
            ws = await connect_websocket_url(nursery, url)
            for i in range(0, len(raw), 320):
                await ws.send_message(raw[i : i + 320])
            closed_at = trio.current_time()
            await ws.aclose()
            await gateway.routes["call"].sessions_done.wait()
        nursery.cancel_scope.cancel()
    route = gateway.routes["call"].route
    assert route.stats.ended_by.startswith("call: closed")
    recording, _ = read_wav(tmp_path / "heard.wav")
    offset = check_speech_played_at_real_time(clip, recording, timed.sent, gateway)
    # the client had closed while most of the speech was still queued; the route ended
    # only once its last frame was played
    last_played = timed.sent[(offset + len(clip) - 1) // 160]
    assert last_played - closed_at > CALLER_S / 2, f"closed {last_played - closed_at:.3f} s before the end"
    assert route.stats.ended_at >= last_played
    assert sum("without AudioSocket headers" in r.getMessage() for r in caplog.records) == 1


# --- the Argon example ---------------------------------------------------------------------------


def decode_stereo(packets: list[bytes]) -> np.ndarray:
    decoder = opuslib.Decoder(48000, 2)
    pcm = b"".join(decoder.decode(packet, 960) for packet in packets)
    return np.frombuffer(pcm, dtype="<i2").reshape(-1, 2)


def check_opus_speech(packets: list[bytes], speech: np.ndarray, rate: int) -> None:
    """Every packet one 20 ms stereo Opus packet, and the speech in them block by block."""
    assert all(packet_samples(p) == 960 and packet_channels(p) == 2 for p in packets)
    assert abs(len(packets) * 0.020 - len(speech) / rate) < 0.1
    decoded = decode_stereo(packets)
    reference = soxr.resample(speech.astype(np.float64), rate, 48000)
    blocks = blockwise_alignment(reference, 48000, decoded.mean(axis=1), 48000)
    assert len(blocks) >= 5 and sum(b > 0.9 for b in blocks) >= 0.9 * len(blocks), np.round(blocks, 2)


async def test_argon_examples_ffmpeg_command_makes_ogg_opus_our_demuxer_parses(tmp_path):
    ffmpeg = require_ffmpeg()
    speech, rate = cut("or105.wav", 0.3, CALLER_S)
    write_wav(tmp_path / "speech.wav", speech, rate)
    # the example's command, verbatim but for its input file
    done = await trio.run_process(
        [ffmpeg, "-i", "speech.wav", "-f", "opus", "-ar", "48000", "-ac", "2", "-frame_duration", "20", "pipe:1"],
        cwd=str(tmp_path), capture_stdout=True, capture_stderr=True, check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-1000:]
    stream = done.stdout
    assert looks_like_ogg(stream)
    demuxer = OggOpusDemuxer()
    packets = [p for i in range(0, len(stream), 4096) for p in demuxer.feed(stream[i : i + 4096])]
    assert packets == pyav_packets(stream)  # what FFmpeg's own demuxer finds in it
    assert demuxer.head.channels == 2 and demuxer.head.input_sample_rate == 48000 and demuxer.eos  # -ar 48000
    assert (demuxer.skipped_bytes, demuxer.bad_pages, demuxer.lost_pages) == (0, 0, 0)
    check_opus_speech(packets, speech[:, 0], rate)


class FakeArgon:
    """What the Argon example talks to, and nothing more: POST /api/bot/IVoice/v1/StreamToken
    (h11) and a WebSocket ingress (trio-websocket) that keeps every message."""

    BOT_TOKEN = "bot-seed-token"
    SPACE_ID = "550e8400-e29b-41d4-a716-446655440000"
    CHANNEL_ID = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"

    def __init__(self) -> None:
        self.http_port = self.ws_port = 0
        self.token_requests: list[tuple[str, dict[str, str], dict]] = []
        self.ingress_query: dict[str, list[str]] = {}
        self.messages: list[bytes | str] = []
        self.close_code: int | None = None
        self.done = trio.Event()

    async def serve(self, nursery: trio.Nursery) -> None:
        server = await nursery.start(serve_websocket, self._ingress, "127.0.0.1", 0, None)
        self.ws_port = server.port
        [listener] = await nursery.start(partial(trio.serve_tcp, self._http, 0, host="127.0.0.1"))
        self.http_port = listener.socket.getsockname()[1]

    async def _http(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        request, body = None, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        self.token_requests.append((f"{request.method.decode()} {request.target.decode()}", headers, json.loads(body)))
        payload = json.dumps({"token": "stream-token", "ingressUrl": f"ws://127.0.0.1:{self.ws_port}",
                              "roomName": f"{self.SPACE_ID}/{self.CHANNEL_ID}"}).encode()
        fields = [("content-type", "application/json"), ("content-length", str(len(payload))), ("connection", "close")]
        response = h11.Response(status_code=200, headers=fields)
        await stream.send_all(conn.send(response) + conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage()))
        await stream.aclose()

    async def _ingress(self, request) -> None:
        self.ingress_query = parse_qs(urlsplit(request.path).query)
        ws = await request.accept()
        try:
            while True:
                self.messages.append(await ws.get_message())
        except ConnectionClosed as closed:
            self.close_code = closed.reason.code
        finally:
            self.done.set()


async def test_argon_node_example_streams_an_ogg_opus_stream_in_chunks(tmp_path):
    """The script runs as the spec wrote it (fetch, WebSocket, ffmpeg) with this machine's
    node, and what it sends is Ogg Opus cut anywhere: the demuxer gets every packet back."""
    require_ffmpeg()
    speech, rate = cut("or105.wav", 0.3, CALLER_S)
    write_wav(tmp_path / "speech.wav", speech, rate)
    argon = FakeArgon()
    async with trio.open_nursery() as nursery:
        await argon.serve(nursery)
        env = argon_env(f"http://127.0.0.1:{argon.http_port}", argon.BOT_TOKEN, argon.SPACE_ID, argon.CHANNEL_ID)
        with trio.fail_after(NODE_TIMEOUT + 10):
            status, stdout, stderr = await run_node(ARGON_STREAM, env=env, cwd=tmp_path, timeout=NODE_TIMEOUT)
            await argon.done.wait()
        nursery.cancel_scope.cancel()
    assert status == 0, (status, stdout, stderr)
    [(request_line, headers, body)] = argon.token_requests
    assert request_line == "POST /api/bot/IVoice/v1/StreamToken"
    assert headers["authorization"] == f"Bot {argon.BOT_TOKEN}" and headers["content-type"] == "application/json"
    assert body == {"spaceId": argon.SPACE_ID, "channelId": argon.CHANNEL_ID}
    assert argon.ingress_query == {"token": ["stream-token"], "stereo": ["true"], "frame_duration_ms": ["20"],
                                   "track_name": ["music"]}
    assert argon.close_code in (1000, 1005)  # ws.close() with no code: 1005 "no status received"
    messages = argon.messages
    assert all(isinstance(m, bytes) for m in messages) and looks_like_ogg(messages[0])
    demuxer = OggOpusDemuxer()
    packets = [p for m in messages for p in demuxer.feed(m)]
    assert len(messages) < len(packets)  # chunks of a stream, not one packet per message
    assert packets == pyav_packets(b"".join(messages)) and demuxer.eos
    check_opus_speech(packets, speech[:, 0], rate)
