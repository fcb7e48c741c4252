"""The control API on server.http: probes, routes, adding and deleting routes, reload, access.

A real gateway on loopback, called over HTTP with httpx; the route deleted through the API has a
real VoIPBIN client that must see a clean close.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import trio
from trio_websocket import ConnectionClosed, connect_websocket_url

from gateway.config import GatewayConfig
from gateway.control import ControlApi, is_loopback
from gateway.daemon import Gateway
from gateway.server import HttpRequest

CONTROL_TOKEN = "ctl-SECRET-6a0e19d4"
VOIPBIN_TOKEN = "vb-SECRET-ctl-2b77"

CONFIG = """\
server:
  http: "127.0.0.1:0"
  media: "127.0.0.1:0"
  control: {token: "%s"}
services:
  voipbin: {token: "%s", api_url: "http://127.0.0.1:9"}
routes:
  - name: call
    endpoints:
      - file: {path: "$clip", rate: 8000, loop: true}
      - voipbin: {role: listen, call_id: c1, encapsulation: sln}
""" % (CONTROL_TOKEN, VOIPBIN_TOKEN)


async def start(nursery, tmp_path: Path, speech_clip: Path, text: str = CONFIG) -> tuple[Gateway, httpx.AsyncClient]:
    path = tmp_path / "gateway.yaml"
    path.write_text(text.replace("$clip", str(speech_clip)))
    gateway = await nursery.start(Gateway(GatewayConfig.load(path), config_path=str(path)).run)
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.runtime.http.port}", timeout=10)
    return gateway, client


AUTH = {"authorization": f"Bearer {CONTROL_TOKEN}"}


async def test_probes_and_route_listing(tmp_path, speech_clip):
    async with trio.open_nursery() as nursery:
        gateway, api = await start(nursery, tmp_path, speech_clip)
        health = await api.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"

        ready = await api.get("/readyz")  # a listen route waiting for its client is ready
        assert ready.status_code == 200 and ready.json()["ready"] is True

        routes = (await api.get("/v1/routes")).json()["routes"]
        assert [(r["name"], r["state"]) for r in routes] == [("call", "waiting")]

        url = f"ws://127.0.0.1:{gateway.runtime.media.port}/v1.0/calls/c1/media_stream?encapsulation=sln&token={VOIPBIN_TOKEN}"
        ws = await connect_websocket_url(nursery, url)
        for _ in range(10):
            assert len(await ws.get_message()) == 320
        detail = (await api.get("/v1/routes/call")).json()
        assert detail["state"] == "up" and detail["sessions"] == 1 and detail["where"].endswith("gateway.yaml:8")
        sink = next(e for e in detail["endpoints"] if e["kind"] == "voipbin")
        assert sink["role"] == "listen" and sink["frames_out"] >= 10 and sink["bytes_out"] == 320 * sink["frames_out"]
        assert -60 < sink["level_dbfs"] < 0  # speech, not silence
        assert sink["latency_count"] > 0 and sink["latency_mean_ms"] < 30
        assert (await api.get("/v1/routes/nope")).status_code == 404
        assert CONTROL_TOKEN not in json.dumps(detail) and VOIPBIN_TOKEN not in json.dumps(detail)

        metrics = await api.get("/metrics")
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        assert 'route="call"' in metrics.text and VOIPBIN_TOKEN not in metrics.text
        nursery.cancel_scope.cancel()


async def test_readyz_names_a_route_that_is_not_up(tmp_path, speech_clip):
    failing = CONFIG + """\
  - name: dialer
    endpoints:
      - file: {path: "$clip", rate: 8000}
      - voipbin: {call_id: nowhere}
"""
    async with trio.open_nursery() as nursery:
        gateway, api = await start(nursery, tmp_path, speech_clip, failing)
        with trio.fail_after(5):
            while gateway.routes["dialer"].state != "restarting":
                await trio.sleep(0.02)
        ready = await api.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["not_ready"] == {"dialer": "restarting"}
        detail = (await api.get("/v1/routes/dialer")).json()
        assert detail["last_error"] and VOIPBIN_TOKEN not in detail["last_error"]
        nursery.cancel_scope.cancel()


async def test_add_and_delete_routes_need_the_control_token(tmp_path, speech_clip):
    new_route = {"name": "announce", "endpoints": [
        {"file": {"path": str(speech_clip), "rate": 8000, "loop": True}},
        {"voipbin": {"role": "listen", "call_id": "c2", "encapsulation": "sln"}},
    ]}
    async with trio.open_nursery() as nursery:
        gateway, api = await start(nursery, tmp_path, speech_clip)
        assert (await api.post("/v1/routes", json=new_route)).status_code == 401
        wrong = await api.post("/v1/routes", json=new_route, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert "announce" not in gateway.routes

        created = await api.post("/v1/routes", json=new_route, headers=AUTH)
        assert created.status_code == 201, created.text
        assert created.headers["location"] == "/v1/routes/announce"
        assert gateway.routes["announce"].origin == "api"
        assert (await api.post("/v1/routes", json=new_route, headers=AUTH)).status_code == 409

        bad = dict(new_route, name="bad", endpoints=[{"file": {"path": "x", "speed": 2}}, {"record": {"path": "y"}}])
        refused = await api.post("/v1/routes", json=bad, headers=AUTH)
        assert refused.status_code == 400 and "POST /v1/routes: endpoints[0].file" in refused.json()["error"]
        assert "speed" in refused.json()["error"] and "bad" not in gateway.routes
        clash = dict(new_route, name="clash")  # call c2 is served by "announce"
        refused = await api.post("/v1/routes", json=clash, headers=AUTH)
        assert refused.status_code == 400 and "c2 already has a listen endpoint" in refused.json()["error"]
        sneaky = dict(new_route, name="sneaky", endpoints=[new_route["endpoints"][0], {"voipbin": {
            "call_id": "${file:/etc/hostname}"}}])
        refused = await api.post("/v1/routes", json=sneaky, headers=AUTH)
        assert refused.status_code == 400 and "references are not expanded" in refused.json()["error"]
        sneaky["endpoints"][1]["voipbin"] = {"call_id": "x", "api_url": "http://evil.example"}  # would get the token
        refused = await api.post("/v1/routes", json=sneaky, headers=AUTH)
        assert refused.status_code == 400 and "api_url: not allowed" in refused.json()["error"]
        not_json = await api.post("/v1/routes", content=b"{", headers=AUTH)
        assert not_json.status_code == 400 and "not JSON" in not_json.json()["error"]

        # the added route serves a client; deleting it closes that client cleanly
        url = f"ws://127.0.0.1:{gateway.runtime.media.port}/v1.0/calls/c2/media_stream?encapsulation=sln&token={VOIPBIN_TOKEN}"
        ws = await connect_websocket_url(nursery, url)
        assert len(await ws.get_message()) == 320
        assert (await api.delete("/v1/routes/announce")).status_code == 401
        deleted = await api.delete("/v1/routes/announce", headers=AUTH)
        assert deleted.status_code == 200 and deleted.json() == {"removed": "announce"}
        with pytest.raises(ConnectionClosed) as closed:
            with trio.fail_after(5):
                while True:
                    await ws.get_message()
        assert closed.value.reason.code == 1000
        assert "announce" not in gateway.routes
        assert (await api.get("/v1/routes/announce")).status_code == 404
        assert (await api.delete("/v1/routes/announce", headers=AUTH)).status_code == 404
        # its call id is free again
        assert (await api.post("/v1/routes", json=new_route, headers=AUTH)).status_code == 201
        nursery.cancel_scope.cancel()


async def test_reload_through_the_api(tmp_path, speech_clip):
    async with trio.open_nursery() as nursery:
        gateway, api = await start(nursery, tmp_path, speech_clip)
        path = tmp_path / "gateway.yaml"
        path.write_text(path.read_text() + "  - name: extra\n    endpoints:\n"
                        f"      - file: {{path: \"{speech_clip}\", rate: 8000}}\n"
                        f"      - record: {{path: \"{tmp_path}/extra.wav\", rate: 8000}}\n")
        assert (await api.post("/v1/reload")).status_code == 401
        reloaded = await api.post("/v1/reload", headers=AUTH)
        assert reloaded.status_code == 200, reloaded.text
        assert reloaded.json()["added"] == ["extra"] and reloaded.json()["unchanged"] == ["call"]

        path.write_text(path.read_text() + "  - oops\n")
        refused = await api.post("/v1/reload", headers=AUTH)
        assert refused.status_code == 400
        assert "nothing changed" in refused.json()["error"] and "gateway.yaml:" in refused.json()["error"]
        assert set(gateway.routes) == {"call", "extra"}
        nursery.cancel_scope.cancel()


async def test_without_a_control_token_mutations_are_refused(tmp_path, speech_clip):
    text = CONFIG.replace('  control: {token: "%s"}\n' % CONTROL_TOKEN, "")
    async with trio.open_nursery() as nursery:
        gateway, api = await start(nursery, tmp_path, speech_clip, text)
        refused = await api.post("/v1/reload", headers=AUTH)
        assert refused.status_code == 403 and "server.control.token" in refused.json()["error"]
        assert (await api.get("/v1/routes")).status_code == 200  # reads stay open on loopback
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.5", False), ("192.168.1.2", False), ("2001:db8::1", False), ("", False), ("host", False),
])
def test_loopback_addresses(address, loopback):
    assert is_loopback(address) is loopback


@pytest.mark.parametrize("open_reads, token, status", [
    (False, None, 403), (False, CONTROL_TOKEN, 200), (False, "wrong", 403), (True, None, 200),
])
async def test_reads_from_other_hosts(open_reads, token, status):
    """A read from a non-loopback address: refused unless open_reads or the control token."""
    text = ("server: {http: '0.0.0.0:0', control: {token: '%s', open_reads: %s}}\nroutes: []\n"
            % (CONTROL_TOKEN, str(open_reads).lower()))
    gateway = Gateway(GatewayConfig.from_text(text, "t.yaml"))
    api = ControlApi(gateway)
    headers = {"authorization": f"Bearer {token}"} if token else {}
    request = HttpRequest("GET", "/v1/routes", {}, headers, b"", {}, "203.0.113.7")
    response = await api.reader(api.list_routes)(request)
    assert response.status == status
    if status == 403:
        assert b"loopback" in response.body


async def test_reload_rotates_the_control_token(tmp_path, speech_clip):
    async with trio.open_nursery() as nursery:
        gateway, api = await start(nursery, tmp_path, speech_clip)
        path = tmp_path / "gateway.yaml"
        path.write_text(path.read_text().replace(CONTROL_TOKEN, "ctl-SECRET-rotated-1f"))
        assert (await api.post("/v1/reload", headers=AUTH)).status_code == 200
        assert (await api.post("/v1/reload", headers=AUTH)).status_code == 401  # the old token is gone
        rotated = {"authorization": "Bearer ctl-SECRET-rotated-1f"}
        reloaded = await api.post("/v1/reload", headers=rotated)
        assert reloaded.status_code == 200 and reloaded.json()["kept_server"] is False
        nursery.cancel_scope.cancel()


async def test_a_route_that_played_to_its_end_is_ready(tmp_path, speech_clip):
    text = CONFIG + f"""\
  - name: once
    endpoints:
      - file: {{path: "$clip", rate: 8000}}
      - record: {{path: "{tmp_path}/once.wav", rate: 8000}}
"""
    async with trio.open_nursery() as nursery:
        gateway, api = await start(nursery, tmp_path, speech_clip, text)
        with trio.fail_after(10):
            await gateway.routes["once"].finished.wait()
        ready = await api.get("/readyz")
        assert gateway.routes["once"].state == "ended"
        assert ready.status_code == 200, ready.json()
        nursery.cancel_scope.cancel()


AGENT_KEY = "agent-SECRET-ctl-5c1d"
BARGE_IN = """\
server:
  http: "127.0.0.1:0"
  media: "127.0.0.1:0"
  control: {token: "%s"}
services:
  voipbin: {token: "%s", api_url: "http://127.0.0.1:9"}
  agent: {api_url: "http://127.0.0.1:9", api_key: "%s"}
routes:
  - name: call
    endpoints:
      - agent: {role: listen, name: agent}
      - voipbin: {role: listen, name: phone, call_id: c1, encapsulation: sln}
""" % (CONTROL_TOKEN, VOIPBIN_TOKEN, AGENT_KEY)


async def test_clear_and_mark_an_agents_speech_through_the_api(tmp_path, speech_clip):
    """An agent sends 3 s of speech at once (text to speech); half a second in, a clear through
    the API drops the rest from the route, so the caller hears about 0.5 s of it, not 3 s; a
    mark comes back as mark-played in the route's events; bad calls name their fault."""
    from gateway.adapters.agent import wire as agent_wire

    async with trio.open_nursery() as nursery:
        gateway, api = await start(nursery, tmp_path, speech_clip, BARGE_IN)
        media = f"ws://127.0.0.1:{gateway.runtime.media.port}"
        phone = await connect_websocket_url(nursery, f"{media}/v1.0/calls/c1/media_stream?encapsulation=sln"
                                                     f"&token={VOIPBIN_TOKEN}", message_queue_size=512)
        token = await api.post(agent_wire.TOKEN_PATH, headers={"authorization": f"Bearer {AGENT_KEY}"})
        agent = await connect_websocket_url(nursery, token.json()["ws_url"], message_queue_size=512)
        await agent.send_message(json.dumps({"token": token.json()["token"]}))
        with trio.fail_after(5):
            while gateway.routes["call"].state != "up":
                await trio.sleep(0.01)
        speech = (np.arange(16000 * 3) % 200 * 50 + 1000).astype("<i2").tobytes()  # 3 s at 16 kHz, never silent
        for i in range(0, len(speech), 640):
            await agent.send_message(speech[i:i + 640])
        heard = 0

        async def count() -> None:
            nonlocal heard
            while True:
                frame = await phone.get_message()
                heard += any(frame)

        nursery.start_soon(count)
        await trio.sleep(0.5)
        cleared = await api.post("/v1/routes/call/clear", json={"endpoint": "agent"}, headers=AUTH)
        heard_at_clear = heard  # for the message only: the reader may lag
        await trio.sleep(0.5)
        marked = await api.post("/v1/routes/call/mark", json={"endpoint": "agent", "name": "after-clear"}, headers=AUTH)
        await trio.sleep(0.1)
        events = (await api.get("/v1/routes/call")).json()["recent_events"]
        refused = [
            await api.post("/v1/routes/call/clear", json={"endpoint": "agent"}),  # no token
            await api.post("/v1/routes/nope/clear", json={"endpoint": "agent"}, headers=AUTH),
            await api.post("/v1/routes/call/clear", json={"endpoint": "nobody"}, headers=AUTH),
            await api.post("/v1/routes/call/mark", json={"endpoint": "agent"}, headers=AUTH),
            await api.post("/v1/routes/call/clear", content=b"[1]", headers=AUTH),
        ]
        nursery.cancel_scope.cancel()

    assert cleared.status_code == 200 and cleared.json()["route"] == "call"
    assert 2000 <= cleared.json()["dropped_ms"] <= 2700, cleared.json()
    assert 15 <= heard <= 50, (heard, heard_at_clear)  # about half a second of the 3 s (20 ms frames), not 150
    assert marked.status_code == 202 and marked.json() == {"route": "call", "endpoint": "agent", "name": "after-clear"}
    kinds = [(e["source"], e["kind"]) for e in events]
    assert ("agent", "clear") in kinds and ("agent", "mark-played") in kinds, kinds
    assert [r.status_code for r in refused] == [401, 404, 404, 400, 400]
    assert "'name'" in refused[3].json()["error"] and "nobody" in refused[2].json()["error"]
