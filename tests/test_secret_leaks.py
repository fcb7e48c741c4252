"""No secret ever leaves the daemon: a real `gateway run` (debug logs, plain and JSON) takes
its secrets from the environment, files and systemd credentials, then goes through error
paths (refused tokens, failing dial routes, malformed media, a bad reload, control API calls
with and without the token). Everything it wrote and answered is searched for every secret
and for any JWT.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from test_cli import free_port
from test_service_cli import Notify

SECRETS = {
    "control_token": "ctl-SECRET-leak-0d9e",
    "VB_TOKEN": "vb-SECRET-leak-6b1a",
    "argon_token": "bot-SECRET-leak-43c2",
    "jwt": "jwt-SECRET-leak-9f0e0d1c2b3a49586776",
    "agent_key": "agent-SECRET-leak-51aa",
    "vsdk": "vsdk-SECRET-leak-e7d3",
}
JWT = re.compile(r"eyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]{4,}")


@pytest.mark.parametrize("log_format", ["plain", "json"])
async def test_no_secret_in_logs_errors_api_or_metrics(tmp_path, speech_clip, log_format):
    creds = tmp_path / "credentials"
    creds.mkdir()
    for name in ("control_token", "jwt", "agent_key"):
        (creds / name).write_text(SECRETS[name] + "\n")
    for name in ("argon_token", "vsdk"):
        (tmp_path / name).write_text(SECRETS[name] + "\n")
    http, media = free_port(), free_port()
    head = f"""\
server:
  http: 127.0.0.1:{http}
  media: 127.0.0.1:{media}
  control: {{token: "${{credential:control_token}}"}}
services:
  voipbin: {{api_url: "http://127.0.0.1:{media}", token: "${{VB_TOKEN}}"}}
  argon: {{api_url: "http://127.0.0.1:{http}/api/bot", bot_token: "${{file:argon_token}}", jwt_secret: "${{credential:jwt}}"}}
  agent: {{api_url: "http://127.0.0.1:{http}/nowhere", api_key: "${{credential:agent_key}}"}}
  videosdk: {{api_url: "http://127.0.0.1:{http}/nowhere", token: "${{file:vsdk}}"}}
routes:
  - name: call
    endpoints:
      - file: {{path: "{speech_clip}", rate: 8000, loop: true}}
      - voipbin: {{role: listen, call_id: c1}}
  - name: channel
    endpoints:
      - argon: {{role: listen, space_id: s1, channel_id: ch1}}
      - record: {{path: "{tmp_path}/ch.wav"}}
  - name: missing-call        # dials our own media server, where no such call is served
    endpoints:
      - voipbin: {{call_id: nobody}}
      - record: {{path: "{tmp_path}/a.wav"}}
  - name: unknown-channel     # StreamToken from our own Argon listen role: 404
    endpoints:
      - file: {{path: "{speech_clip}", rate: 8000, loop: true}}
      - argon: {{space_id: s1, channel_id: nope}}
  - name: no-agent            # token call answered 404
    endpoints:
      - agent: {{}}
      - record: {{path: "{tmp_path}/b.wav"}}
  - name: no-room             # session call answered 404
    endpoints:
      - videosdk: {{room_id: r1}}
      - record: {{path: "{tmp_path}/c.wav"}}
"""
    config = tmp_path / "gateway.yaml"
    config.write_text(head)
    notify = Notify(tmp_path)
    env = dict(os.environ, NOTIFY_SOCKET=notify.path, VB_TOKEN=SECRETS["VB_TOKEN"], CREDENTIALS_DIRECTORY=str(creds))
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "--log-level", "debug", "--log-format", log_format,
                             "run", str(config)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    answers: list[str] = []
    try:
        await trio.to_thread.run_sync(notify.next, "READY=1")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http}", timeout=10) as api:
            async def call(method: str, path: str, **kw) -> httpx.Response:
                response = await api.request(method, path, **kw)
                answers.append(f"{method} {path} {response.status_code} {response.headers} {response.text}")
                return response

            # refused credentials at every door
            await call("POST", "/api/bot/IVoice/v1/StreamToken", headers={"authorization": "Bot wrong"},
                       json={"spaceId": "s1", "channelId": "c"})
            await call("POST", "/api/v1/sdk/token", headers={"authorization": "Bearer wrong"})
            await call("POST", "/v1/routes", headers={"authorization": "Bearer wrong"}, json={})
            # a stream token is issued (a JWT: the one answer that may hold it), then used by a
            # bot that breaks the protocol: its URL (token in the query) must not be logged
            issued = await api.post("/api/bot/IVoice/v1/StreamToken", json={"spaceId": "s1", "channelId": "ch1"},
                                    headers={"authorization": f"Bot {SECRETS['argon_token']}"})
            assert issued.status_code == 200 and JWT.search(issued.text)
            stream = issued.json()
            ingress = f"{stream['ingressUrl']}/audio/connect?token={stream['token']}&frame_duration_ms=20"
            jwt = stream["token"]
            async with open_websocket_url(ingress) as bot:
                await bot.get_message()  # ready
                await bot.send_message("text is ignored, as Argon does")
                await bot.send_message(b"\x01")  # one byte: not an Opus packet the ingress takes
                with pytest.raises(ConnectionClosed):
                    with trio.fail_after(2):
                        await bot.get_message()
            listed = await call("GET", "/v1/routes", headers={"authorization": f"Bearer {jwt}"})
            assert jwt not in listed.text  # a read from loopback is served; the stream token is not echoed
            # a VoIPBIN client with a wrong token, then one that breaks the protocol
            for token in ("wrong", SECRETS["VB_TOKEN"]):
                url = f"ws://127.0.0.1:{media}/v1.0/calls/c1/media_stream?encapsulation=rtp&token={token}"
                try:
                    async with open_websocket_url(url) as ws:
                        await ws.send_message(b"\x00\x01 not rtp")
                        with trio.move_on_after(2):
                            await ws.get_message()
                except Exception:  # noqa: BLE001 - refused or closed: both expected here
                    pass
            await trio.sleep(1.0)  # the failing dial routes fail and log
            auth = {"authorization": f"Bearer {SECRETS['control_token']}"}
            for path in ("/healthz", "/readyz", "/metrics", "/v1/routes", "/v1/routes/missing-call", "/v1/routes/no-agent"):
                assert (await call("GET", path)).status_code in (200, 503)
            # a route added with its own secret, and a bad one echoing a secret-like value
            own = {"name": "extra", "endpoints": [{"file": {"path": str(speech_clip), "loop": True}},
                                                  {"voipbin": {"call_id": "x", "token": SECRETS["VB_TOKEN"]}}]}
            assert (await call("POST", "/v1/routes", json=own, headers=auth)).status_code == 201
            await call("POST", "/v1/routes", json={"name": "bad", "endpoints": [{"voipbin": {"token": 5}}]}, headers=auth)
            await call("GET", "/v1/routes/extra")
            # a reload that fails on a value read from a credential
            config.write_text(head.replace("  - name: call\n", "  - name: call\n    jitter_ms: \"${credential:jwt}\"\n"))
            assert (await call("POST", "/v1/reload", headers=auth)).status_code == 400
            await call("GET", "/metrics")
        proc.send_signal(signal.SIGTERM)
        output, _ = await trio.to_thread.run_sync(lambda: proc.communicate(timeout=15))
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    written = output + "\n".join(answers)
    assert "credential:jwt" in written  # the bad reload's error is there, naming the reference
    assert "StreamToken" in output and "no-agent" in output  # the error paths did run and log
    if log_format == "json":
        assert all(line.startswith("{") for line in output.splitlines() if line.strip()), output[:500]
    for name, secret in SECRETS.items():
        assert secret not in written, f"{name} leaked: {[line for line in written.splitlines() if secret in line][:3]}"
    assert jwt not in written and not JWT.search(written), JWT.search(written)
    assert "closing the" in output and "(1007)" in output  # the bot's malformed packet was refused
