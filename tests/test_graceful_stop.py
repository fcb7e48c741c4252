"""Graceful stop: every endpoint says its protocol's goodbye, and the far side hears it.

Gateway B (the harness) plays the services: VoIPBIN, Argon, the voice-agent SDK and VideoSDK in
their listen roles. Gateway A, under test, dials all four and also serves a VoIPBIN call to a
client of its own. `A.stop()` is what SIGTERM calls (tests/test_service_cli.py shows the signal
and the exit code): B's endpoints must see an AudioSocket hangup, a WebSocket close 1000, the
agent client's close, the VideoSDK `stop` frame; A's own client a close 1000.
"""

from __future__ import annotations

import logging

import pytest
import trio
from trio_websocket import ConnectionClosed, connect_websocket_url

from gateway.config import GatewayConfig
from gateway.daemon import Gateway
from harness import AGENT_API_KEY, BOT_TOKEN, SECRETS, VIDEOSDK_TOKEN, VOIPBIN_TOKEN, start
from test_argon_errors import CHANNEL, SPACE

SERVICES_ROUTES = """\
routes:
  - name: b-call
    endpoints:
      - voipbin: {role: listen, call_id: c1, encapsulation: audiosocket}
      - file: {path: "$clip", rate: 8000, loop: true}
  - name: b-channel
    endpoints:
      - argon: {role: listen, space_id: %s, channel_id: %s}
      - record: {path: "$out/b-channel.wav"}
  - name: b-agent
    endpoints:
      - agent: {role: listen}
      - file: {path: "$clip", rate: 8000, loop: true}
  - name: b-room
    endpoints:
      - videosdk: {role: listen, room_id: standup}
      - record: {path: "$out/b-room.wav", rate: 8000}
""" % (SPACE, CHANNEL)

UNDER_TEST = """\
server: {http: "127.0.0.1:0", media: "127.0.0.1:0"}
services:
  voipbin: {api_url: "http://127.0.0.1:%(b_media)d", token: "%(voipbin)s"}
  argon: {api_url: "http://127.0.0.1:%(b_http)d/api/bot", bot_token: "%(bot)s"}
  agent: {api_url: "http://127.0.0.1:%(b_http)d", api_key: "%(agent)s"}
  videosdk: {api_url: "http://127.0.0.1:%(b_http)d", token: "%(videosdk)s"}
routes:
  - name: bridge
    endpoints:
      - voipbin: {call_id: c1, encapsulation: audiosocket}
      - argon: {space_id: %(space)s, channel_id: %(channel)s}
  - name: agent-room
    endpoints:
      - agent: {}
      - videosdk: {room_id: standup}
  - name: own-call
    endpoints:
      - file: {path: "%(clip)s", rate: 8000, loop: true}
      - voipbin: {role: listen, call_id: a1, encapsulation: sln}
"""


async def test_stop_sends_every_protocols_goodbye(tmp_path, speech_clip, caplog):
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        b = await start(nursery, SERVICES_ROUTES, clip=speech_clip, out=tmp_path)
        text = UNDER_TEST % dict(b_media=b.runtime.media.port, b_http=b.runtime.http.port, voipbin=VOIPBIN_TOKEN,
                                 bot=BOT_TOKEN, agent=AGENT_API_KEY, videosdk=VIDEOSDK_TOKEN, space=SPACE,
                                 channel=CHANNEL, clip=speech_clip)
        a = await nursery.start(Gateway(GatewayConfig.from_text(text, "a.yaml")).run)
        url = f"ws://127.0.0.1:{a.runtime.media.port}/v1.0/calls/a1/media_stream?encapsulation=sln&token={VOIPBIN_TOKEN}"
        client = await connect_websocket_url(nursery, url)
        with trio.fail_after(10):
            while not all(s.state == "up" for s in a.routes.values()):
                await trio.sleep(0.02)
            await client.get_message()
        await trio.sleep(0.3)  # media flowing everywhere

        started = trio.current_time()
        await a.stop(timeout=5)
        took = trio.current_time() - started
        assert all(s.finished.is_set() for s in a.routes.values()), a.status_line()
        assert took < 2.5, f"stop took {took:.1f} s: a goodbye waited out a timeout"
        assert {s.state for s in a.routes.values()} == {"stopped"}

        with pytest.raises(ConnectionClosed) as closed:
            with trio.fail_after(2):
                while True:
                    await client.get_message()
        assert closed.value.reason.code == 1000

        # what the services saw (B's routes end when their peer says goodbye)
        with trio.fail_after(5):
            for name in ("b-call", "b-channel", "b-agent", "b-room"):
                await b.routes[name].sessions_done.wait()
        ended = {name: b.routes[name].route.stats.ended_by for name in ("b-call", "b-channel", "b-agent", "b-room")}
        assert ended == {
            "b-call": "voipbin: hangup",                           # AudioSocket hangup frame
            "b-channel": "argon: every bot left the channel (the last: bot0_bot closed (1000 stream ended))",
            "b-agent": "agent: client closed (1000 session over)",
            "b-room": "videosdk: stop",                            # VideoSDK stop frame
        }
        for secret in SECRETS:
            assert secret not in caplog.text
        nursery.cancel_scope.cancel()
