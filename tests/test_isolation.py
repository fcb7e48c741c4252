"""Bad input closes only the offending connection, with the right close code and a log line
naming the cause; every other route of the process keeps streaming."""

from __future__ import annotations

import json
import logging

import numpy as np
import opuslib
import pytest
import trio
from trio_websocket import ConnectionClosed

from gateway.adapters.voipbin.wire import Audio, Encapsulation, MediaStreamProtocol
from gateway.demo import DEFAULT_AUDIO
from harness import VOIPBIN_TOKEN, start, ws_client
from test_argon_errors import CHANNEL, SPACE, connect_bot

ROUTES = """\
routes:
  - name: music                      # a call that keeps playing (looped speech)
    endpoints:
      - file: {path: "$audio", rate: 8000, loop: true}
      - voipbin: {role: listen, call_id: call-a}
  - name: other-call
    endpoints:
      - file: {path: "$audio", rate: 8000, loop: true}
      - voipbin: {role: listen, call_id: call-b}
  - name: channel
    endpoints:
      - argon: {role: listen, space_id: %s, channel_id: %s}
      - record: {path: "$out/channel.wav"}
""" % (SPACE, CHANNEL)


class Listener:
    """A VoIPBIN media-stream client (as a customer would write one) counting audio frames."""

    def __init__(self) -> None:
        self.frames = 0

    async def run(self, nursery, gateway, call_id, *, task_status=trio.TASK_STATUS_IGNORED):
        url = f"ws://127.0.0.1:{gateway.runtime.media.port}/v1.0/calls/{call_id}/media_stream?encapsulation=rtp&token={VOIPBIN_TOKEN}"
        ws = await ws_client(nursery, url)
        proto = MediaStreamProtocol(Encapsulation.RTP)
        task_status.started(ws)
        while True:
            for event in proto.receive(await ws.get_message()):
                if isinstance(event, Audio):
                    self.frames += 1


async def frames_during(listener: Listener, seconds: float) -> int:
    before = listener.frames
    await trio.sleep(seconds)
    return listener.frames - before


async def test_malformed_opus_packet_closes_only_that_bot(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    encoder = opuslib.Encoder(48000, 1, opuslib.APPLICATION_AUDIO)
    good = encoder.encode(np.zeros(960, np.int16).tobytes(), 960)
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, ROUTES, audio=DEFAULT_AUDIO, out=tmp_path)
        listener = Listener()
        await nursery.start(listener.run, nursery, gateway, "call-a")
        assert await frames_during(listener, 0.3) >= 12

        bot = await ws_client(nursery, await connect_bot(gateway))
        assert json.loads(await bot.get_message())["status"] == "ready"
        await bot.send_message(good)
        no_frames = bytes([good[0] | 0x03, 0x00]) + good[1:]  # code 3 with a frame count of 0
        await bot.send_message(no_frames)
        with pytest.raises(ConnectionClosed) as closed:
            with trio.fail_after(5):
                while True:
                    await bot.get_message()
        assert closed.value.reason.code == 1007
        assert "invalid Opus packet" in closed.value.reason.reason

        # the call route never noticed
        assert await frames_during(listener, 0.5) >= 20
        # and the channel takes the next, well-behaved bot
        with trio.fail_after(5):
            while gateway.routes["channel"].state != "waiting":
                await trio.sleep(0.05)
        bot2 = await ws_client(nursery, await connect_bot(gateway))
        assert json.loads(await bot2.get_message())["status"] == "ready"
        for _ in range(5):
            await bot2.send_message(good)
        nursery.cancel_scope.cancel()
    assert "closing the bot stream of" in caplog.text and "(1007): invalid Opus packet" in caplog.text


@pytest.mark.parametrize(
    "message, code, cause",
    [
        (b"\x80\x00\x00", 1002, "RTP"),  # truncated header
        ("hello", 1003, "text message"),  # text where binary is expected
        (bytes([0x80, 0x08]) + bytes(10) + bytes(160), 1003, "payload type 8"),  # PCMA: not ours
        (bytes([0x80, 0x00]) + bytes(10) + bytes(4000), 1009, "1920"),  # oversize payload
    ],
    ids=["truncated", "text", "payload-type", "oversize"],
)
async def test_malformed_rtp_closes_only_that_call(tmp_path, caplog, message, code, cause):
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, ROUTES, audio=DEFAULT_AUDIO, out=tmp_path)
        listener = Listener()
        await nursery.start(listener.run, nursery, gateway, "call-a")
        url = f"ws://127.0.0.1:{gateway.runtime.media.port}/v1.0/calls/call-b/media_stream?encapsulation=rtp&token={VOIPBIN_TOKEN}"
        bad = await ws_client(nursery, url)
        await bad.send_message(message)
        with pytest.raises(ConnectionClosed) as closed:
            with trio.fail_after(5):
                while True:
                    await bad.get_message()
        assert closed.value.reason.code == code
        assert cause.lower() in closed.value.reason.reason.lower()
        assert await frames_during(listener, 0.5) >= 20
        nursery.cancel_scope.cancel()
    assert f"closing the media stream ({code})" in caplog.text
    assert VOIPBIN_TOKEN not in caplog.text


async def test_wrong_token_and_second_client_are_refused(tmp_path):
    from gateway.adapters.voipbin.endpoint import REJECTED
    from gateway.adapters.ws import dial
    from gateway.errors import ServiceError

    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, ROUTES, audio=DEFAULT_AUDIO, out=tmp_path)
        base = f"ws://127.0.0.1:{gateway.runtime.media.port}/v1.0/calls"
        with pytest.raises(ServiceError) as bad_token:
            await dial(nursery, f"{base}/call-a/media_stream?encapsulation=rtp&token=nope", service="t", rejected=REJECTED)
        with pytest.raises(ServiceError) as no_call:
            await dial(nursery, f"{base}/call-z/media_stream?encapsulation=rtp&token={VOIPBIN_TOKEN}", service="t", rejected=REJECTED)
        listener = Listener()
        await nursery.start(listener.run, nursery, gateway, "call-a")
        with pytest.raises(ServiceError) as busy:
            await dial(nursery, f"{base}/call-a/media_stream?encapsulation=rtp&token={VOIPBIN_TOKEN}", service="t", rejected=REJECTED)
        assert await frames_during(listener, 0.3) >= 12
        nursery.cancel_scope.cancel()
    assert bad_token.value.status == 401 and "token rejected" in str(bad_token.value)
    assert no_call.value.status == 404 and "no such call" in str(no_call.value)
    assert busy.value.status == 409 and "already has a client" in str(busy.value)
