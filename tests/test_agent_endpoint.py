"""The voice-agent SDK adapter's edges over real loopback sockets: the listen role's token REST
(API keys, CORS preflight), handshake (token first, within 5 s, single use), bad input closing
only that connection with the right code, agent_ready and session_ended; the dial role's
errors (API key rejected, no connected in time, error messages with code and message)."""

from __future__ import annotations

import json

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, connect_websocket_url

import gateway.adapters.agent.endpoint as agent_endpoint
from gateway.adapters.agent import wire
from gateway.server import HttpResponse
from harness import AGENT_API_KEY, SECRETS, start

SERVICE = """
routes:
  - name: svc
    endpoints:
      - agent: {role: listen, name: agent}
      - file: {name: tts, path: "$tts", rate: 16000, loop: true}
  - name: other
    endpoints:
      - file: {name: music, path: "$tts", rate: 16000, loop: true}
      - record: {name: rec, path: "$out/other.wav", rate: 16000}
"""


@pytest.fixture
def tts(tmp_path):
    from conftest import ASSETS

    return str(ASSETS / "speech16k.wav")


def all_text(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


async def get_token(gateway, key=AGENT_API_KEY, origin=None):
    headers = {"Authorization": f"Bearer {key}"}
    if origin:
        headers["Origin"] = origin
    async with httpx.AsyncClient() as client:
        return await client.post(f"http://127.0.0.1:{gateway.runtime.http.port}{wire.TOKEN_PATH}", headers=headers)


async def open_session(nursery, gateway, token=None):
    response = await get_token(gateway)
    assert response.status_code == 200, response.text
    body = response.json()
    ws = await connect_websocket_url(nursery, body["ws_url"], message_queue_size=256)
    return ws, body["token"]


async def expect_close(ws) -> tuple[list, int, str]:
    """Read until the server closes; returns (messages, close code, reason)."""
    messages = []
    with trio.fail_after(5):
        try:
            while True:
                messages.append(await ws.get_message())
        except ConnectionClosed as closed:
            return messages, closed.reason.code, closed.reason.reason or ""


async def test_token_rest_keys_and_cors(tmp_path, tts, caplog):
    caplog.set_level("DEBUG")
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, SERVICE, tts=tts, out=str(tmp_path))
        url = f"http://127.0.0.1:{gateway.runtime.http.port}{wire.TOKEN_PATH}"
        async with httpx.AsyncClient() as client:
            # a page on another origin asks first (Fetch: Authorization is not a simple header)
            pre = await client.options(url, headers={
                "Origin": "http://page.example:8080", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization"})
            assert pre.status_code == 204
            assert pre.headers["access-control-allow-origin"] == "*"
            assert "authorization" in pre.headers["access-control-allow-headers"].lower()
            assert "POST" in pre.headers["access-control-allow-methods"]
            missing = await client.post(url)
            wrong = await client.post(url, headers={"Authorization": "Bearer not-the-key", "Origin": "http://page.example"})
            good = await client.post(url, headers={"Authorization": f"Bearer {AGENT_API_KEY}", "Origin": "http://page.example"})
        nursery.cancel_scope.cancel()
    assert missing.status_code == 401 and "Bearer" in missing.json()["error"]
    assert wrong.status_code == 401 and wrong.json()["error"] == "API key rejected"
    assert wrong.headers["access-control-allow-origin"] == "*"  # the page can read the error
    assert good.status_code == 200
    grant = wire.parse_token_response(good.status_code, good.content)
    assert grant.ws_url.startswith(f"ws://127.0.0.1:{gateway.runtime.media.port}/")
    assert good.headers["access-control-allow-origin"] == "*"
    assert not any(s in all_text(caplog) for s in SECRETS + (grant.token,))


async def test_cors_only_for_configured_origins(tmp_path, tts):
    from gateway.config import GatewayConfig
    from gateway.demo import start_gateway

    def make(http_port, media_port):
        return GatewayConfig.from_text(f"""
server: {{http: "127.0.0.1:{http_port}", media: "127.0.0.1:{media_port}"}}
services:
  agent: {{api_key: "{AGENT_API_KEY}", cors_origins: ["http://good.example"]}}
routes:
  - name: svc
    endpoints: [{{agent: {{role: listen}}}}, {{file: {{path: "{tts}", rate: 16000, loop: true}}}}]
""", "cors.yaml")

    async with trio.open_nursery() as nursery:
        gateway = await start_gateway(nursery, make)
        url = f"http://127.0.0.1:{gateway.runtime.http.port}{wire.TOKEN_PATH}"
        async with httpx.AsyncClient() as client:
            ok = await client.options(url, headers={"Origin": "http://good.example", "Access-Control-Request-Method": "POST"})
            bad = await client.options(url, headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
            bad_post = await client.post(url, headers={"Origin": "http://evil.example", "Authorization": f"Bearer {AGENT_API_KEY}"})
        nursery.cancel_scope.cancel()
    assert ok.status_code == 204 and ok.headers["access-control-allow-origin"] == "http://good.example"
    assert bad.status_code == 403 and "access-control-allow-origin" not in bad.headers
    assert bad_post.status_code == 403  # no token for a page the operator did not allow


async def test_session_connected_agent_ready_audio_and_shutdown(tmp_path, tts):
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, SERVICE, tts=tts, out=str(tmp_path))
        ws, token = await open_session(nursery, gateway)
        await ws.send_message(json.dumps({"token": token}))
        client = wire.AgentClient(token)
        client.start()  # already sent by hand above, as the spec's page does
        events = []
        with trio.fail_after(5):
            while len([e for e in events if isinstance(e, wire.Audio)]) < 25:
                events += client.receive(await ws.get_message())
        # connected first, then agent_ready (the route's other side is up), then audio
        assert isinstance(events[0], wire.Connected) and isinstance(events[1], wire.AgentReady)
        audio = [e for e in events if isinstance(e, wire.Audio)]
        assert {len(e.pcm) for e in audio} == {640}
        await ws.send_message(b"\0\1" * 320)
        await gateway.stop()
        messages, code, _ = await expect_close(ws)
        nursery.cancel_scope.cancel()
    ended = [json.loads(m) for m in messages if isinstance(m, str)]
    assert ended == [{"type": "session_ended", "reason": "server_shutdown"}]
    assert code == 1000


async def test_token_must_come_first_within_the_deadline(tmp_path, tts, monkeypatch, caplog):
    assert wire.TOKEN_TIMEOUT_S == 5.0
    monkeypatch.setattr(agent_endpoint, "TOKEN_TIMEOUT_S", 0.3)  # the same timer, shorter
    caplog.set_level("INFO")
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, SERVICE, tts=tts, out=str(tmp_path))
        results = {}
        # 1. silence: error token_timeout, then 1008
        ws, _ = await open_session(nursery, gateway)
        results["silent"] = await expect_close(ws)
        # 2. a token nobody issued
        ws, _ = await open_session(nursery, gateway)
        await ws.send_message(json.dumps({"token": "made-up"}))
        results["forged"] = await expect_close(ws)
        # 3. binary first
        ws, _ = await open_session(nursery, gateway)
        await ws.send_message(b"\0" * 640)
        results["binary"] = await expect_close(ws)
        # 4. a used token: the first session ends, the token does not work twice
        ws, token = await open_session(nursery, gateway)
        await ws.send_message(json.dumps({"token": token}))
        assert json.loads(await ws.get_message()) == {"type": "connected"}
        await ws.aclose()
        await gateway.routes["svc"].sessions_done.wait()
        response = await get_token(gateway)  # fresh path for the same endpoint
        ws = await connect_websocket_url(nursery, response.json()["ws_url"])
        await ws.send_message(json.dumps({"token": token}))
        results["reused"] = await expect_close(ws)
        # after all that, a good client still connects
        ws, token = await open_session(nursery, gateway)
        await ws.send_message(json.dumps({"token": token}))
        with trio.fail_after(5):
            assert json.loads(await ws.get_message()) == {"type": "connected"}
        nursery.cancel_scope.cancel()

    def error_of(messages):
        (first,) = [json.loads(m) for m in messages if isinstance(m, str)]
        return first["type"], first["code"]

    assert error_of(results["silent"][0]) == ("error", "token_timeout") and results["silent"][1] == 1008
    assert error_of(results["forged"][0]) == ("error", "invalid_token") and results["forged"][1] == 1008
    assert error_of(results["binary"][0]) == ("error", "protocol_error") and results["binary"][1] == 1008
    assert error_of(results["reused"][0]) == ("error", "invalid_token") and results["reused"][1] == 1008
    log = all_text(caplog)
    assert "sent no token within" in log and "session token rejected" in log and "binary message" in log


@pytest.mark.parametrize(
    "message, code, cause",
    [
        ("{not json", 1007, "not valid JSON"),
        ('{"type": 5}', 1007, "type"),
        ("[1, 2]", 1007, "object"),
        (b"\0" * (wire.MAX_MESSAGE_BYTES + 2), 1009, None),
        ('{"token": "again"}', 1002, "token message sent twice"),
    ],
    ids=["bad-json", "type-not-string", "not-object", "oversize", "token-twice"],
)
async def test_bad_input_closes_only_that_session(tmp_path, tts, caplog, message, code, cause):
    caplog.set_level("INFO")
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, SERVICE, tts=tts, out=str(tmp_path))
        other = gateway.routes["other"].route.endpoints[1]
        ws, token = await open_session(nursery, gateway)
        await ws.send_message(json.dumps({"token": token}))
        assert json.loads(await ws.get_message()) == {"type": "connected"}
        await ws.send_message(b"\1\0" * 321 + b"\7")  # odd sizes are fine: whole samples carried over
        before = other.stats.frames_out
        await ws.send_message(message)
        _, closed_with, reason = await expect_close(ws)
        await trio.sleep(0.3)
        after = other.stats.frames_out
        # the next client is served at once: a misbehaving client costs its route no backoff
        with trio.fail_after(0.8):
            ws, token = await open_session(nursery, gateway)
            await ws.send_message(json.dumps({"token": token}))
            assert json.loads(await ws.get_message()) == {"type": "connected"}
        nursery.cancel_scope.cancel()
    assert closed_with == code
    if cause:
        assert cause in reason
    assert after - before >= 10  # the other route kept streaming throughout
    # one log line names the close code and the cause (trio-websocket itself refuses an
    # oversize message with 1009; the adapter logs the closed session)
    lines = [r.getMessage() for r in caplog.records if getattr(r, "route", None) == "svc"]
    assert any(f"({code}" in line and (cause or "maximum message size") in line for line in lines), lines


# ------------------------------------------------------------------------------ dial role
DIAL = """
routes:
  - name: bridge
    restart: never
    endpoints:
      - agent: {api_url: "http://127.0.0.1:$http_port/fake", connect_timeout_s: 0.5}
      - file: {path: "$tts", rate: 16000}
"""


def fake_service(behaviour):
    """A token endpoint + agent WebSocket on the gateway's own servers; `behaviour(ws, server)`
    runs after the token message arrived."""

    def install(gateway):
        runtime = gateway.runtime

        async def token(request):
            if wire.parse_bearer(request.headers.get("authorization")) != AGENT_API_KEY:
                return HttpResponse.json(401, {"error": "bad key"})
            if behaviour == "reject-key":
                return HttpResponse.json(401, {"error": "bad key"})
            return HttpResponse(200, wire.token_response("tok-123", f"{runtime.media_url()}/fake-agent"))

        async def session(request):
            ws = await request.request.accept()
            server = wire.AgentServer()
            server.receive(await ws.get_message())
            if behaviour == "silent":
                await trio.sleep(5)
            elif behaviour == "error":
                await ws.send_message(wire.error_message("invalid_token", "Token expired at 12:00"))
                await ws.aclose(1008)
            elif behaviour == "error-then-end":
                await ws.send_message(server.accept())
                await ws.send_message(wire.error_message("llm_unavailable", "the model is overloaded"))
                await ws.send_message(server.session_ended("agent_disconnected"))
                await trio.sleep(2)

        runtime.http.add("POST", "/fake" + wire.TOKEN_PATH, token)
        runtime.media.add("/fake-agent", session)

    return install


@pytest.mark.parametrize(
    "behaviour, expect",
    [
        ("reject-key", "API key rejected (HTTP 401)"),
        ("silent", "no connected message within 0.5 s"),
        ("error", "code=invalid_token message=Token expired at 12:00"),
    ],
)
async def test_dial_failures_name_the_cause(tmp_path, tts, caplog, behaviour, expect):
    caplog.set_level("INFO")
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, DIAL, tts=tts, prepare=fake_service(behaviour))
        with trio.fail_after(10):
            await gateway.routes["bridge"].finished.wait()
        nursery.cancel_scope.cancel()
    state = gateway.routes["bridge"]
    assert state.state == "failed" and expect in state.last_error
    assert expect in all_text(caplog)
    assert not any(s in all_text(caplog) + state.last_error for s in SECRETS + ("tok-123",))


async def test_dial_reports_agent_errors_and_ends_on_session_ended(tmp_path, tts, caplog):
    caplog.set_level("INFO")
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, DIAL, tts=tts, prepare=fake_service("error-then-end"))
        with trio.fail_after(10):
            await gateway.routes["bridge"].finished.wait()
        nursery.cancel_scope.cancel()
    state = gateway.routes["bridge"]
    assert state.state == "ended"  # a clean end, not a failure to retry
    assert "session_ended (agent_disconnected)" in state.route.stats.ended_by
    log = all_text(caplog)
    assert "code=llm_unavailable message=the model is overloaded" in log
    events = [e for _, e in state.route.stats.recent_events]
    assert any(e.kind == "agent_error" and e.data == {"code": "llm_unavailable", "message": "the model is overloaded"} for e in events)
