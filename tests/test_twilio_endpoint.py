"""Twilio Media Streams end to end over real loopback WebSockets.

- The dial role (the gateway playing Twilio) against the listen role (the gateway as the
  Media Streams server), in one gateway process: each side's speech arrives intact on the
  other side, the upgrade is signed and checked, custom parameters arrive, and the dial's
  goodbye (``stop``) ends the listen session normally.
- The listen role against a raw client that behaves exactly as the docs' Twilio does
  (connected, start, media every 20 ms, dtmf, stop), and the refusals of a bad signature.
- The dial role against a raw Media Streams server written from the docs (a bot): what it
  receives first, the signature header, its burst played at real time, its mark echoed once
  the audio before it has played, ``clear`` dropping the rest and echoing the waiting mark.
- The voice webhook: TwiML for a signed request, 403 otherwise, busy while a call is up.
"""

from __future__ import annotations

import base64
import json
import logging
import string
import xml.etree.ElementTree as ET

import httpx
import numpy as np
import pytest
import trio
from trio_websocket import ConnectionClosed, serve_websocket

from audio_checks import best_alignment, blockwise_alignment, read_wav, write_wav
from conftest import ASSETS
from gateway.adapters.twilio import wire
from gateway.codecs import G711Decoder, G711Encoder
from gateway.codecs.formats import PCMU_8K, AudioFrame, EncodedFrame
from gateway.config import GatewayConfig
from gateway.demo import start_gateway
from gateway.endpoint import RouteEvent

RATE = 8000
AUTH_TOKEN = "twilio-SECRET-0f1e2d3c4b5a69788796a5b4c3d2e1f0"
AC = "AC" + "0123456789abcdef" * 2

SERVER = """\
server: {http: "127.0.0.1:$http_port", media: "127.0.0.1:$media_port"}
services:
  twilio: {auth_token: "%s", account_sid: %s}
""" % (AUTH_TOKEN, AC)


async def start(nursery, routes: str, **values):
    def make(http_port: int, media_port: int) -> GatewayConfig:
        text = string.Template(SERVER + routes).substitute(http_port=http_port, media_port=media_port, **values)
        return GatewayConfig.from_text(text, "test.yaml")

    return await start_gateway(nursery, make)


def speech(asset: str, at_s: float, seconds: float = 1.0) -> np.ndarray:
    pcm, rate = read_wav(ASSETS / asset)
    assert rate == RATE
    return pcm[int(at_s * RATE) : int((at_s + seconds) * RATE)]


def padded(pcm: np.ndarray, before_s: float, after_s: float) -> np.ndarray:
    zeros = lambda s: np.zeros((int(s * RATE), 1), np.int16)  # noqa: E731
    return np.concatenate([zeros(before_s), pcm, zeros(after_s)])


def stats(gateway) -> dict:
    return {f"{name}/{e.name}": e.stats.as_dict() for name, st in gateway.routes.items() for e in st.route.endpoints}


def assert_speech_arrived(source: np.ndarray, received: np.ndarray, rate: int, what) -> None:
    """`source` is in `received`, block by block (0.2 s), a little late at most (u-law twice)."""
    corr, lag = best_alignment(source, RATE, received, rate)
    assert -0.1 < lag < 0.3, f"speech arrived {lag * 1000:.0f} ms off (corr {corr:.2f}): {what}"
    blocks = blockwise_alignment(source, RATE, received, rate, block_s=0.2)
    good = sum(b > 0.9 for b in blocks)
    assert len(blocks) >= 4 and good >= 0.8 * len(blocks), f"blocks {np.round(blocks, 2)}: {what}"


def ulaw(pcm: np.ndarray) -> bytes:
    return G711Encoder().process(AudioFrame(np.ascontiguousarray(pcm.reshape(-1, 1)), RATE))[0].payload


def linear(payload: bytes) -> np.ndarray:
    return G711Decoder().process(EncodedFrame(payload, PCMU_8K, len(payload)))[0].pcm


# ===================================================================== dial against listen
CALL_AND_BOT = """\
routes:
  - name: phone                      # the gateway as the server a Twilio call streams to
    endpoints:
      - twilio: {role: listen, stream: desk, twiml: false}
      - file: {path: "$caller_voice", rate: 8000}
      - record: {path: "$out/phone-hears.wav", rate: 8000}
  - name: bot                        # the gateway playing Twilio toward that server
    endpoints:
      - twilio: {url: "ws://127.0.0.1:$media_port/twilio/desk", parameters: {caller: "+15551234567", lang: de}}
      - file: {path: "$bot_voice", rate: 8000}
      - record: {path: "$out/bot-hears.wav", rate: 8000}
"""


async def test_dial_and_listen_hear_each_other(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    caller, bot = speech("or105.wav", 0.9), speech("or109.wav", 1.9)
    write_wav(tmp_path / "caller.wav", padded(caller, 0.2, 2.3), RATE)  # speaks 0.2-1.2 s, outlasts the bot
    write_wav(tmp_path / "bot.wav", padded(bot, 1.4, 0.4), RATE)  # speaks 1.4-2.4 s, ends at 2.8 s
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, CALL_AND_BOT, out=tmp_path, caller_voice=tmp_path / "caller.wav",
                              bot_voice=tmp_path / "bot.wav")
        with trio.fail_after(20):
            await gateway.routes["bot"].sessions_done.wait()
            await gateway.routes["phone"].sessions_done.wait()
        listen = gateway.routes["phone"].route.endpoints[0]
        dial = gateway.routes["bot"].route.endpoints[0]
        nursery.cancel_scope.cancel()

    phone, rate = read_wav(tmp_path / "phone-hears.wav")
    bot_heard, _ = read_wav(tmp_path / "bot-hears.wav")
    assert_speech_arrived(padded(bot, 1.4, 0), phone, rate, stats(gateway))
    assert_speech_arrived(padded(caller, 0.2, 0), bot_heard, rate, stats(gateway))
    assert dial.stats.frames_out >= 100 and listen.stats.frames_out >= 100, stats(gateway)
    assert dial.stats.frames_in >= 100 and listen.stats.frames_in >= 100, stats(gateway)
    # the bot's file ended: its goodbye is Twilio's stop, which ends the call session normally
    assert gateway.routes["phone"].route.stats.ended_by == "twilio: Twilio stopped the stream (stop)"
    assert gateway.routes["phone"].restarts == 0 and gateway.routes["phone"].last_error == ""
    assert listen.call_sid == dial.call_sid
    started = [r.getMessage() for r in caplog.records if "started: call" in r.getMessage()]
    assert started and "parameters caller,lang" in started[0], started
    assert AUTH_TOKEN not in caplog.text and "+15551234567" not in caplog.text  # no secret, no parameter value


async def test_a_send_racing_twilios_stop_and_close_leaves_the_end_to_the_reader():
    """Twilio's stop then its close: a listen send that finds the connection closed before the
    reader got to the stop counts a drop and raises nothing, so the reader names the end
    (`stopped the stream (stop)`), not whichever task ran first (this once made the call of
    the test above end as "closed (1000 call ended)")."""
    from gateway.adapters.twilio.endpoint import TwilioListen
    from gateway.adapters.ws import WsSession, dial, encoded_payload

    endpoint = TwilioListen("twilio", stream="desk", runtime=None, auth_token=None)  # type: ignore[arg-type]
    frame = EncodedFrame(bytes(160), PCMU_8K, 160)
    checked = trio.Event()

    async def gateway_side(request):  # trio-websocket's server connection, as the listen role's
        ws = await request.accept()
        endpoint.session = WsSession(ws, payload=encoded_payload, wrap=lambda payload: "media", peer="Twilio ")
        with trio.fail_after(5):
            while ws.closed is None:  # its reader task read the close frame; the stop is still queued
                await trio.sleep(0.01)
        await endpoint.send(frame)  # raised CallEnded("Twilio closed (1000 call ended)") before
        assert endpoint.stats.dropped == 1 and endpoint.stats.frames_out == 0
        assert await ws.get_message() == '{"event": "stop"}'  # what the reader ends the session with
        checked.set()

    async with trio.open_nursery() as nursery:
        listener = await nursery.start(serve_websocket, gateway_side, "127.0.0.1", 0, None)
        twilio = await dial(None, f"ws://127.0.0.1:{listener.port}/twilio/desk", service="test")
        await twilio.send_message('{"event": "stop"}')
        await twilio.aclose(1000, "call ended")
        with trio.fail_after(5):
            await checked.wait()
        nursery.cancel_scope.cancel()


async def test_a_dial_send_on_a_connection_the_bot_closed_leaves_the_end_to_the_reader():
    """The bot's last media then its normal close: a send after the reader read that close
    counts a drop (the reader names the end: the call ended); it raised ServiceError before,
    and the route reconnected a call the bot had ended whenever the pacer's send came first."""
    from gateway.adapters.twilio.endpoint import TwilioDial
    from gateway.adapters.ws import WsSession, dial, encoded_payload

    async def bot(request):
        ws = await request.accept()
        await ws.send_message('{"event": "media"}')
        await ws.aclose(1000, "done")

    endpoint = TwilioDial("twilio", url="ws://127.0.0.1/unused")
    frame = EncodedFrame(bytes(160), PCMU_8K, 160)
    async with trio.open_nursery() as nursery:
        listener = await nursery.start(serve_websocket, bot, "127.0.0.1", 0, None)
        ws = await dial(None, f"ws://127.0.0.1:{listener.port}/bot", service="test")
        endpoint.session = WsSession(ws, payload=encoded_payload, wrap=lambda payload: "media")
        with trio.fail_after(5):
            assert await ws.get_message() == '{"event": "media"}'  # the dial's reader, as in run()
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
        assert closed.value.reason.code == 1000  # run() ends the call: CallEnded("the server closed (1000 done)")
        await endpoint.send(frame)
        assert endpoint.stats.dropped == 1 and endpoint.stats.frames_out == 0
        nursery.cancel_scope.cancel()


# =========================================================== listen against a docs-exact Twilio
CALL = """\
routes:
  - name: call
    endpoints:
      - twilio: {role: listen, stream: desk, parameters: {greeting: "hi & <welcome>"}}
      - file: {path: "$voice", rate: 8000, loop: true}
      - record: {path: "$out/call.wav", rate: 8000, hears: [twilio]}
"""


def media_url(gateway) -> str:
    return f"ws://127.0.0.1:{gateway.runtime.media.port}/twilio/desk"


class Twilio:
    """A client that sends exactly what the docs' Twilio sends, built from dicts (not our wire)."""

    def __init__(self, ws) -> None:
        self.ws, self.seq, self.chunk = ws, 0, 0
        self.stream_sid = "MZ" + "ab" * 16

    async def send(self, message: dict) -> None:
        await self.ws.send_message(json.dumps(message))

    async def hello(self) -> None:
        await self.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        self.seq = 1
        await self.send({"event": "start", "sequenceNumber": "1", "streamSid": self.stream_sid,
                         "start": {"accountSid": AC, "streamSid": self.stream_sid, "callSid": "CA" + "cd" * 16,
                                   "tracks": ["inbound"], "customParameters": {},
                                   "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})

    async def media(self, payload: bytes) -> None:
        self.seq += 1
        self.chunk += 1
        await self.send({"event": "media", "sequenceNumber": str(self.seq), "streamSid": self.stream_sid,
                         "media": {"track": "inbound", "chunk": str(self.chunk), "timestamp": str(20 * (self.chunk - 1)),
                                   "payload": base64.b64encode(payload).decode()}})

    async def next(self, event: str) -> dict:
        while True:
            message = json.loads(await self.ws.get_message())
            if message["event"] == event:
                return message


def signed_headers(url: str, token: str = AUTH_TOKEN) -> list[tuple[bytes, bytes]]:
    return [(b"X-Twilio-Signature", wire.signature(token, url).encode())]


async def test_listen_serves_a_twilio_stream_and_raises_its_keys(tmp_path, speech_clip, caplog):
    caplog.set_level(logging.INFO)
    caller = speech("or105.wav", 0.9)
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, CALL, out=tmp_path, voice=speech_clip)
        state = gateway.routes["call"]
        url = media_url(gateway)
        from trio_websocket import connect_websocket_url

        ws = await connect_websocket_url(nursery, url, extra_headers=signed_headers(url), message_queue_size=64)
        twilio = Twilio(ws)
        await twilio.hello()
        heard = bytearray()
        clears: list[dict] = []

        async def listen() -> None:
            while True:
                try:
                    message = json.loads(await ws.get_message())
                except ConnectionClosed:
                    return  # after our stop, the gateway closes (1000)
                if message["event"] == "clear":
                    clears.append(message)
                    continue
                assert message["event"] == "media", message
                assert set(message) == {"event", "streamSid", "media"} and message["streamSid"] == twilio.stream_sid
                heard.extend(base64.b64decode(message["media"]["payload"], validate=True))

        nursery.start_soon(listen)
        payload = ulaw(padded(caller, 0.2, 0.3))
        endpoint = state.route.endpoints[0]
        with trio.fail_after(5):
            while endpoint.call_sid is None:  # the start was read
                await trio.sleep(0.005)
        endpoint.on_route_event(RouteEvent("bot", "clear", {}))  # a bot barged in: Twilio's buffer is dropped
        t0 = trio.current_time()
        for i in range(0, len(payload), 160):  # real time on absolute deadlines, as Twilio streams
            await trio.sleep_until(t0 + i / 8000)
            await twilio.media(payload[i:i + 160])
        twilio.seq += 1
        await twilio.send({"event": "dtmf", "streamSid": twilio.stream_sid, "sequenceNumber": str(twilio.seq),
                           "dtmf": {"track": "inbound_track", "digit": "7"}})
        twilio.seq += 1
        await twilio.send({"event": "stop", "sequenceNumber": str(twilio.seq), "streamSid": twilio.stream_sid,
                           "stop": {"accountSid": AC, "callSid": "CA" + "cd" * 16}})
        with trio.fail_after(5):
            await state.sessions_done.wait()
        events = [e for _, e in state.route.stats.recent_events]
        nursery.cancel_scope.cancel()

    assert [(e.kind, e.data) for e in events if e.kind == "dtmf"] == [("dtmf", {"digit": "7"})]
    assert clears == [{"event": "clear", "streamSid": twilio.stream_sid}]
    assert state.route.stats.ended_by == "twilio: Twilio stopped the stream (stop)"
    assert len(heard) >= 160 * 50 and len(heard) % 160 == 0  # 20 ms media messages, at least 1 s of them
    recorded, rate = read_wav(tmp_path / "call.wav")
    assert_speech_arrived(padded(caller, 0.2, 0), recorded, rate, stats(gateway))
    clip, _ = read_wav(speech_clip)  # what the route played back is the file, intact through u-law
    corr, _ = best_alignment(clip[:RATE].astype(float), RATE, linear(bytes(heard)).astype(float), RATE, max_lag_s=0.5)
    assert corr > 0.9, corr


async def test_listen_refuses_a_missing_or_wrong_signature(tmp_path, speech_clip, caplog):
    caplog.set_level(logging.INFO)
    from trio_websocket import ConnectionRejected, connect_websocket_url

    from gateway.adapters.wsclient import connect

    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, CALL, out=tmp_path, voice=speech_clip)
        url = media_url(gateway)
        for headers, cause in ((None, "no X-Twilio-Signature header"),
                               (signed_headers(url, "another-token"), "X-Twilio-Signature does not match"),
                               (signed_headers(url + "x"), "X-Twilio-Signature does not match")):
            try:
                await connect(url, extra_headers=headers)
            except ConnectionRejected as err:
                assert err.status_code == 403 and cause in err.body.decode(), (err.status_code, err.body)
            else:
                raise AssertionError("the upgrade was accepted")
        assert gateway.routes["call"].state == "waiting"
        # a signed client is then served at once
        ws = await connect_websocket_url(nursery, url, extra_headers=signed_headers(url))
        twilio = Twilio(ws)
        await twilio.hello()
        with trio.fail_after(5):
            await twilio.next("media")
        nursery.cancel_scope.cancel()
    refusals = [r.getMessage() for r in caplog.records if "refused the media upgrade" in r.getMessage()]
    assert len(refusals) == 3 and AUTH_TOKEN not in caplog.text


async def test_a_malformed_message_closes_that_stream_with_its_code(tmp_path, speech_clip):
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, CALL, out=tmp_path, voice=speech_clip)
        url = media_url(gateway)
        from trio_websocket import connect_websocket_url

        for bad, code in (({"event": "media", "sequenceNumber": "2", "streamSid": "MZ" + "ab" * 16,
                            "media": {"track": "inbound", "chunk": "1", "timestamp": "0", "payload": "%%%"}}, 1007),
                          ({"event": "start", "sequenceNumber": "2"}, 1002)):
            ws = await connect_websocket_url(nursery, url, extra_headers=signed_headers(url))
            twilio = Twilio(ws)
            await twilio.hello()
            await twilio.send(bad)
            with trio.fail_after(5):
                try:
                    while True:
                        await ws.get_message()
                except ConnectionClosed as closed:
                    assert closed.reason.code == code, closed.reason
        with trio.fail_after(5):
            while gateway.routes["call"].state != "waiting":
                await trio.sleep(0.01)
        assert gateway.routes["call"].restarts == 0
        nursery.cancel_scope.cancel()


# ================================================================================= voice webhook
async def test_voice_webhook_answers_connect_stream_for_signed_requests(tmp_path, speech_clip):
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, CALL, out=tmp_path, voice=speech_clip)
        base = f"http://127.0.0.1:{gateway.runtime.http.port}"
        hook = base + "/twilio/desk/voice"
        form = {"CallSid": "CA" + "ef" * 16, "From": "+15550001111", "To": "+15550002222", "AccountSid": AC}
        async with httpx.AsyncClient() as client:
            good = await client.post(hook, data=form, headers={"X-Twilio-Signature": wire.signature(AUTH_TOKEN, hook, form)})
            assert good.status_code == 200 and good.headers["content-type"].startswith("text/xml"), good.text
            stream = ET.fromstring(good.text).find("Connect/Stream")
            assert stream.get("url") == media_url(gateway)
            (param,) = stream.findall("Parameter")
            assert (param.get("name"), param.get("value")) == ("greeting", "hi & <welcome>")
            # behind a TLS proxy Twilio signed https://
            proxied = await client.post(hook, data=form, headers={
                "X-Twilio-Signature": wire.signature(AUTH_TOKEN, hook.replace("http://", "https://"), form),
                "X-Forwarded-Proto": "https"})
            assert proxied.status_code == 200
            for headers in ({}, {"X-Twilio-Signature": wire.signature(AUTH_TOKEN, hook, dict(form, From="+1"))}):
                refused = await client.post(hook, data=form, headers=headers)
                assert refused.status_code == 403, refused.text
            get = await client.get(hook, headers={"X-Twilio-Signature": wire.signature(AUTH_TOKEN, hook)})
            assert get.status_code == 200 and "<Connect><Stream" in get.text

            # while a call streams, the next one is answered busy (a busy tone, not a failed stream)
            url = media_url(gateway)
            from trio_websocket import connect_websocket_url

            ws = await connect_websocket_url(nursery, url, extra_headers=signed_headers(url))
            await Twilio(ws).hello()
            with trio.fail_after(5):
                while gateway.routes["call"].state != "up":
                    await trio.sleep(0.01)
            busy = await client.post(hook, data=form, headers={"X-Twilio-Signature": wire.signature(AUTH_TOKEN, hook, form)})
            assert busy.status_code == 200 and ET.fromstring(busy.text).find("Reject").get("reason") == "busy"
        nursery.cancel_scope.cancel()


# ===================================================================== dial against a docs-exact bot
BOT = """\
routes:
  - name: caller
    endpoints:
      - twilio: {url: "ws://127.0.0.1:$bot_port/media-stream", parameters: {agent: support}}
      - record: {path: "$out/caller-hears.wav", rate: 8000, hears: [twilio]}
      - file: {path: "$voice", rate: 8000, loop: true}
"""


async def greet_then_barge_in(ws, sid: str, first: bytes, got: dict) -> None:
    """What a voice bot does (the server's side of Media Streams): `first` (u-law) and a mark
    "greeting" at once, until that mark comes back; then `first` three times and a mark
    "answer", interrupted 0.4 s in by a clear, until that mark comes back. got["marks"] gets
    (name, seconds from the audio to the mark's return, the message); got["dtmf"] a dtmf."""
    async def send_and_mark(payload: bytes, name: str) -> float:
        await ws.send_message(json.dumps({"event": "media", "streamSid": sid,
                                          "media": {"payload": base64.b64encode(payload).decode()}}))
        await ws.send_message(json.dumps({"event": "mark", "streamSid": sid, "mark": {"name": name}}))
        return trio.current_time()

    async def mark_back(since: float) -> None:
        while True:
            message = json.loads(await ws.get_message())
            if message["event"] == "dtmf":
                got["dtmf"] = message
            if message["event"] == "mark":
                got["marks"].append((message["mark"]["name"], trio.current_time() - since, message))
                return

    await mark_back(await send_and_mark(first, "greeting"))
    t1 = await send_and_mark(first * 3, "answer")  # a second, long utterance, cut after 0.4 s (barge-in)
    await trio.sleep(0.4)
    await ws.send_message(json.dumps({"event": "clear", "streamSid": sid}))
    await mark_back(t1)


async def test_dial_plays_twilios_part_toward_a_bot(tmp_path, speech_clip, caplog):
    """The bot: checks the signature and the first messages as the docs give them, answers with
    a 1 s burst of speech and a mark, then (once 0.4 s have played) a second burst, a mark and
    a clear. The caller must hear the first second at real time, the mark must come back once it
    has played, and clear must cut the second burst short and send its mark back at once."""
    caplog.set_level(logging.INFO)
    speech_pcm = speech("or109.wav", 1.9)
    first = ulaw(speech_pcm)  # 8000 bytes: 1 s
    got: dict = {"marks": []}

    async def bot(request) -> None:
        got["signature"] = dict((k.lower(), v) for k, v in request.headers).get(b"x-twilio-signature")
        got["path"] = request.path
        ws = await request.accept()
        got["connected"] = json.loads(await ws.get_message())
        start = json.loads(await ws.get_message())
        got["start"] = start
        sid = start["streamSid"]
        media = json.loads(await ws.get_message())
        got["media"] = media
        await greet_then_barge_in(ws, sid, first, got)
        await trio.sleep(0.3)
        await ws.aclose(1000)  # the bot hangs up: the end of <Connect><Stream>
        got["done"] = True

    async with trio.open_nursery() as nursery:
        bot_server = await nursery.start(serve_websocket, bot, "127.0.0.1", 0, None)
        bot_port = bot_server.port
        gateway = await start(nursery, BOT, out=tmp_path, voice=speech_clip, bot_port=bot_port)
        with trio.fail_after(5):
            while gateway.routes["caller"].state != "up":
                await trio.sleep(0.01)
        gateway.routes["caller"].route.endpoints[0].on_route_event(RouteEvent("call", "dtmf", {"digit": "5"}))
        with trio.fail_after(20):
            await gateway.routes["caller"].sessions_done.wait()
        dial = gateway.routes["caller"].route.endpoints[0]
        events = [e for _, e in gateway.routes["caller"].route.stats.recent_events]
        nursery.cancel_scope.cancel()

    assert got.get("done"), got
    url = f"ws://127.0.0.1:{bot_port}/media-stream"
    assert got["signature"] == wire.signature(AUTH_TOKEN, url).encode()
    assert got["connected"] == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    first_start = got["start"]
    meta = first_start["start"]
    assert first_start["sequenceNumber"] == "1" and first_start["streamSid"] == meta["streamSid"]
    assert meta["accountSid"] == AC and meta["callSid"].startswith("CA")
    assert meta["tracks"] == ["inbound"] and meta["customParameters"] == {"agent": "support"}
    assert meta["mediaFormat"] == {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
    media = got["media"]
    assert media["sequenceNumber"] == "2" and media["media"]["chunk"] == "1" and media["media"]["track"] == "inbound"
    assert len(base64.b64decode(media["media"]["payload"])) == 160

    dtmf = got["dtmf"]
    assert dtmf["dtmf"] == {"track": "inbound_track", "digit": "5"} and dtmf["streamSid"] == meta["streamSid"]
    assert int(dtmf["sequenceNumber"]) > 2
    (greeting, after_s, echo), (answer, cleared_s, _) = got["marks"]
    assert (greeting, answer) == ("greeting", "answer")
    assert 0.95 < after_s < 1.6, after_s  # once the 1 s burst has played at real time, not at once
    assert set(echo) == {"event", "sequenceNumber", "streamSid", "mark"}
    assert 0.35 < cleared_s < 0.9, cleared_s  # at the clear (0.4 s), not after the 3 s utterance
    assert [e.kind for e in events].count("clear") == 1
    assert gateway.routes["caller"].route.stats.ended_by.startswith("twilio: the server closed (1000")

    heard, rate = read_wav(tmp_path / "caller-hears.wav")
    assert_speech_arrived(speech_pcm, heard, rate, stats(gateway))
    # the cleared utterance was cut: about 0.4 s of it played, not 3 s
    total_s = len(heard) / rate
    assert dial.stats.frames_in * 0.02 < 1.0 + 0.4 + 0.3, (dial.stats.frames_in, total_s)
    assert AUTH_TOKEN not in caplog.text


CALLER_AND_BOT = """\
routes:
  - name: desk                       # a Twilio call answered by a bot written for Twilio
    endpoints:
      - twilio: {name: caller, role: listen, stream: desk, twiml: false}
      - twilio: {name: bot, url: "ws://127.0.0.1:$bot_port/media-stream"}
"""


async def test_a_bots_mark_waits_for_twilio_to_play_and_its_clear_reaches_twilio(autojump_clock, tmp_path):
    """Under the virtual clock: Twilio (a raw client, playing what it is sent 0.5 s late, as its buffer does) ↔ the
    gateway ↔ a bot. The bot's 1 s greeting and mark: Twilio gets the audio, then a mark of the
    gateway's; the bot's mark comes back only once Twilio sent that one back (≥ 1.5 s), not when
    the gateway sent the audio. The bot's 3 s answer, a mark, and a clear 0.4 s in: Twilio gets
    ``clear``, the answer stops, and the bot's mark comes back at the clear, not after 3 s."""
    speech_pcm = speech("or109.wav", 1.9)
    first = ulaw(speech_pcm)  # 8000 bytes: 1 s
    got: dict = {"marks": []}
    at_twilio: dict = {"speech": 0, "marks": [], "clears": []}

    async def bot(request) -> None:
        ws = await request.accept()
        await ws.get_message()  # connected
        sid = json.loads(await ws.get_message())["streamSid"]
        await greet_then_barge_in(ws, sid, first, got)
        got["done"] = True
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        bot_server = await nursery.start(serve_websocket, bot, "127.0.0.1", 0, None)
        gateway = await start(nursery, CALLER_AND_BOT, bot_port=bot_server.port)
        url = media_url(gateway)
        from trio_websocket import connect_websocket_url

        ws = await connect_websocket_url(nursery, url, extra_headers=signed_headers(url), message_queue_size=64)
        twilio = Twilio(ws)
        await twilio.hello()

        pending: list[str] = []

        async def send_back(name: str) -> None:
            if name in pending:
                pending.remove(name)
                twilio.seq += 1
                await twilio.send({"event": "mark", "sequenceNumber": str(twilio.seq), "streamSid": twilio.stream_sid,
                                   "mark": {"name": name}})

        async def echo_later(name: str) -> None:
            await trio.sleep(0.5)  # Twilio plays what it buffered, then sends the mark back
            await send_back(name)

        async def listen() -> None:
            while True:
                message = json.loads(await ws.get_message())
                if message["event"] == "media":
                    at_twilio["speech"] += base64.b64decode(message["media"]["payload"]) != b"\xff" * 160
                elif message["event"] == "mark":
                    at_twilio["marks"].append(message["mark"]["name"])
                    pending.append(message["mark"]["name"])
                    nursery.start_soon(echo_later, message["mark"]["name"])
                elif message["event"] == "clear":
                    at_twilio["clears"].append(trio.current_time())
                    for name in list(pending):  # Twilio sends back the marks waiting behind the clear
                        await send_back(name)

        nursery.start_soon(listen)
        silence = b"\xff" * 160
        t0 = done_at = trio.current_time()
        with trio.fail_after(15):
            k = 0
            while not got.get("done") or not at_twilio["clears"] or trio.current_time() < done_at + 0.3:
                await trio.sleep_until(t0 + k * 0.02)
                await twilio.media(silence)
                k += 1
                if not got.get("done"):
                    done_at = trio.current_time()
        events = [e for _, e in gateway.routes["desk"].route.stats.recent_events]
        nursery.cancel_scope.cancel()

    (greeting, after_s, _), (answer, cleared_s, _) = got["marks"]
    assert (greeting, answer) == ("greeting", "answer")
    # the virtual clock: the greeting played (its last packet at 0.98 s), our mark went with the
    # next packet, Twilio sent it back 0.5 s later, the bot got its own mark back
    assert 1.5 <= after_s <= 1.56, after_s  # not at 1.0 (when the gateway had sent the audio)
    assert 0.4 - 1e-9 <= cleared_s <= 0.42, cleared_s  # at the clear (0.4 s), not after the 3 s answer
    assert len(at_twilio["clears"]) == 1 and at_twilio["marks"][:1] == ["gw-1"]
    # the greeting's mark went through the route; the answer's was still in the bot's own
    # playout when the clear came, so it went back from there
    assert [e.kind for e in events if e.kind in ("mark", "mark-played", "clear")] == ["mark", "mark-played", "clear"]
    # Twilio got the greeting and the answer's first 0.4 s, no more: the rest was cleared
    assert 69 <= at_twilio["speech"] <= 71, at_twilio  # 50 + 20 frames of 20 ms


# ====================================================================================== config
def test_the_twilio_example_config_is_valid(tmp_path):
    from pathlib import Path

    from gateway.daemon import Gateway

    root = Path(__file__).resolve().parent.parent
    (tmp_path / "twilio_auth_token").write_text(AUTH_TOKEN + "\n")
    text = (root / "config" / "twilio.example.yaml").read_text()
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path), "VOIPBIN_TOKEN": "vb-example"}
    config = GatewayConfig.from_text(text, "twilio.example.yaml", env=env)
    assert config.services.twilio.auth_token.reveal() == AUTH_TOKEN
    gateway = Gateway(config)
    gateway.build()
    desk = gateway.routes["front-desk"].route.endpoints
    assert [(e.kind, e.role, e.name) for e in desk] == [("twilio", "listen", "caller"), ("twilio", "dial", "bot"),
                                                        ("record", "dial", "record")]
    assert desk[0].stream_url() == "wss://gw.example.com/twilio/front-desk"
    assert desk[0].twiml and desk[1].parameters == {"tenant": "acme", "language": "en-US"}
    assert gateway.routes["front-desk"].has_listen and not gateway.routes["bot-on-voipbin"].has_listen
    voicemail = gateway.routes["voicemail"].route.endpoints[0]
    assert not voicemail.twiml and voicemail.idle_timeout == 5.0
    assert ("GET", r"^/twilio/front\-desk/voice$") in gateway.runtime.http.patterns()
    assert not any("voicemail" in p for _, p in gateway.runtime.http.patterns())
    assert r"^/twilio/voicemail$" in gateway.runtime.media.patterns()


@pytest.mark.parametrize("endpoint, error", [
    ("{role: listen}", "routes[0].endpoints[0].twilio: missing required key 'stream'"),
    ("{role: listen, stream: 'a/b'}", "'a/b' is not a valid stream name"),
    ("{role: listen, stream: s, parameters: [1]}", "twilio.parameters: expected a mapping"),
    ("{role: listen, stream: s, bogus: 1}", "twilio.bogus: unknown key"),
    ("{url: 'http://bot.example.com/x'}", "twilio.url: expected a ws:// or wss:// URL"),
    ("{url: 'wss://bot.example.com/x', account_sid: AC12}", "twilio.account_sid: expected AC and 32 hex digits"),
    ("{url: 'wss://bot.example.com/x', buffer_ms: 10}", "twilio.buffer_ms: expected at least 200"),
])
def test_config_errors_name_the_key(endpoint, error):
    from gateway.daemon import Gateway
    from gateway.errors import ConfigError

    text = ("server: {http: 127.0.0.1:0, media: 127.0.0.1:0}\nroutes:\n  - name: r\n    endpoints:\n"
            f"      - twilio: {endpoint}\n      - record: {{path: /tmp/x.wav}}\n")
    with pytest.raises(ConfigError) as info:
        Gateway(GatewayConfig.from_text(text, "gw.yaml")).build()
    assert error in str(info.value), str(info.value)


# ========================================================================= deadlines, reconnect
async def test_a_silent_stream_is_closed_after_the_idle_timeout(tmp_path, speech_clip, caplog):
    routes = CALL.replace("parameters: {greeting: \"hi & <welcome>\"}", "idle_timeout_s: 0.5")
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, routes, out=tmp_path, voice=speech_clip)
        url = media_url(gateway)
        from gateway.adapters.wsclient import connect

        t0 = trio.current_time()
        ws = await connect(url, extra_headers=signed_headers(url))
        await ws.send_message(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        with trio.fail_after(5):
            try:
                while True:
                    await ws.get_message()
            except ConnectionClosed as closed:
                reason = closed.reason
        assert trio.current_time() - t0 >= 0.5
        assert (reason.code, reason.reason) == (1008, "idle timeout: no message for 0.5 s")
        state = gateway.routes["call"]
        with trio.fail_after(5):
            while state.state != "waiting":
                await trio.sleep(0.01)
        assert state.restarts == 0 and state.route.stats.ended_by.endswith("(closed 1008)")
        nursery.cancel_scope.cancel()


async def test_the_idle_timeout_counts_from_the_last_message_not_from_a_refresh(tmp_path, speech_clip):
    """A stream that sends media for a while and then nothing is closed no sooner than
    `idle_timeout_s` after its last message. (The deadline used to move only every half idle
    period, so a stream quiet from just before a refresh was closed after half the timeout.)"""
    routes = CALL.replace("parameters: {greeting: \"hi & <welcome>\"}", "idle_timeout_s: 0.6")
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, routes, out=tmp_path, voice=speech_clip)
        url = media_url(gateway)
        from gateway.adapters.wsclient import connect

        ws = await connect(url, extra_headers=signed_headers(url))
        t0 = trio.current_time()
        twilio = Twilio(ws)
        await twilio.hello()
        last = trio.current_time()
        while last - t0 < 0.27:  # media up to just before half the idle period
            await twilio.media(b"\xff" * 160)
            last = trio.current_time()  # the last message went out by then
            await trio.sleep(0.02)
        with trio.fail_after(5):
            try:
                while True:
                    await ws.get_message()
            except ConnectionClosed as closed:
                reason = closed.reason
        quiet = trio.current_time() - last
        assert (reason.code, reason.reason) == (1008, "idle timeout: no message for 0.6 s")
        assert quiet >= 0.6, f"closed {quiet:.3f} s after the last message, before the 0.6 s idle timeout"
        nursery.cancel_scope.cancel()


async def test_a_dropped_bot_connection_reconnects_with_a_new_stream(tmp_path, speech_clip):
    starts: list[dict] = []

    async def bot(request) -> None:
        ws = await request.accept()
        json.loads(await ws.get_message())  # connected
        starts.append(json.loads(await ws.get_message()))
        if len(starts) == 1:
            await trio.aclose_forcefully(ws._stream)  # TCP dropped, no close frame (1006)
            return
        await ws.get_message()  # media flows again
        await ws.aclose(1000)

    async with trio.open_nursery() as nursery:
        bot_server = await nursery.start(serve_websocket, bot, "127.0.0.1", 0, None)
        gateway = await start(nursery, BOT, out=tmp_path, voice=speech_clip, bot_port=bot_server.port)
        with trio.fail_after(20):
            await gateway.routes["caller"].sessions_done.wait()
        dial = gateway.routes["caller"].route.endpoints[0]
        nursery.cancel_scope.cancel()
    assert len(starts) == 2, starts
    first, second = (s["start"] for s in starts)
    assert first["streamSid"] != second["streamSid"] and first["callSid"] == second["callSid"]
    assert dial.stats.outages == 1 and dial.stats.connects == 2
