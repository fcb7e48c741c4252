"""Which agent listen endpoint a session token points at, over real loopback sockets.

A gateway with several agent listen routes (each: the agent-SDK client's session, a looping
speech clip it hears, a recorder of what the client says). The token endpoint must hand out a
free endpoint only (not in a session, not still ending the last one, not promised to another
unused token), so a client that got a token and connects in time is served at once; when none
is free the token request itself is refused (503, Retry-After, a JSON error naming the cause).
"""

from __future__ import annotations

import json
import math
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, connect_websocket_url

import gateway.adapters.agent.endpoint as agent_endpoint
from audio_checks import read_wav
from conftest import ASSETS
from gateway.adapters.agent import wire
from harness import AGENT_API_KEY, start

SPEECH = ASSETS / "speech16k.wav"
SERVED_WITHIN_S = 1.0  # a served client sees `connected` within this; the bug made it ~4-5 s


def routes(n: int) -> str:
    text = "routes:\n"
    for i in range(1, n + 1):
        text += f"""\
  - name: svc{i}
    endpoints:
      - agent: {{role: listen, name: agent}}
      - file: {{name: tts, path: "$tts", rate: 16000, loop: true}}
      - record: {{name: heard, path: "$out/heard{i}.wav", rate: 16000, hears: [agent]}}
"""
    return text


@pytest.fixture
def tts():
    return str(SPEECH)


@pytest.fixture
async def http():
    async with httpx.AsyncClient() as client:  # one per test: making one costs ~0.1-0.5 s of CPU
        yield client


async def get_token(http: httpx.AsyncClient, gateway) -> httpx.Response:
    return await http.post(f"http://127.0.0.1:{gateway.runtime.http.port}{wire.TOKEN_PATH}",
                           headers={"Authorization": f"Bearer {AGENT_API_KEY}", "Origin": "http://page.example"})


def path_of(response: httpx.Response) -> str:
    return urlsplit(response.json()["ws_url"]).path


class Client:
    """One spec page: opens ws_url, sends the token first, reads until the first control
    message. `outcome` is "connected", "refused <status>" (the upgrade was refused) or the
    error code it was sent; `waited` the seconds from opening the socket to that outcome."""

    def __init__(self) -> None:
        self.ws = None
        self.outcome = ""
        self.waited = math.inf
        self.body = ""
        self.close_code: int | None = None

    async def connect(self, nursery: trio.Nursery, grant: dict, *, send_token: bool = True, url: str | None = None):
        started = trio.current_time()
        opened = await nursery.start(self._open, url or grant["ws_url"])
        if isinstance(opened, ConnectionRejected):
            self.outcome = f"refused {opened.status_code}"
            self.body = (opened.body or b"").decode()
            self.waited = trio.current_time() - started
            return self
        self.ws = opened
        if not send_token:
            self.outcome = "open"
            return self
        await self.ws.send_message(json.dumps({"token": grant["token"]}))
        try:
            while True:
                message = await self.ws.get_message()
                if isinstance(message, str):
                    parsed = json.loads(message)
                    self.outcome = parsed["type"] if parsed["type"] != "error" else parsed["code"]
                    break
            if self.outcome != "connected":
                await self.ws.get_message()
        except ConnectionClosed as closed:
            self.close_code = closed.reason.code
        self.waited = trio.current_time() - started
        return self


    @staticmethod
    async def _open(url: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Hold the connection in a nursery of its own: a refused upgrade is reported (as the
        ConnectionRejected) instead of failing the test's nursery from the reader task."""
        try:
            async with trio.open_nursery() as own:
                task_status.started(await connect_websocket_url(own, url, message_queue_size=512))
                await trio.sleep_forever()
        except* ConnectionRejected as group:
            rejected = group
            while isinstance(rejected, BaseExceptionGroup):
                rejected = rejected.exceptions[0]
            task_status.started(rejected)


async def token_when_free(http: httpx.AsyncClient, gateway, seconds: float) -> httpx.Response:
    """Ask again (as a page would after a 503) until a token is handed out."""
    with trio.fail_after(seconds):
        while True:
            response = await get_token(http, gateway)
            if response.status_code != 503:
                return response
            await trio.sleep(0.2)


async def test_n_tokens_go_to_n_endpoints_and_the_next_request_is_refused(tmp_path, tts, http, caplog):
    caplog.set_level("INFO")
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, routes(3), tts=tts, out=str(tmp_path))
        grants = [await get_token(http, gateway) for _ in range(3)]
        assert [g.status_code for g in grants] == [200] * 3, [g.text for g in grants]
        # every endpoint is promised to a client that has not connected yet: no token for anyone else
        promised = await get_token(http, gateway)
        clients = [Client() for _ in grants]
        with trio.fail_after(10):
            async with trio.open_nursery() as pages:  # the three pages connect at the same time
                for client, grant in zip(clients, grants):
                    pages.start_soon(client.connect, nursery, grant.json())
        in_use = await get_token(http, gateway)  # every endpoint has its client now
        # one client leaves: its endpoint is handed out again (its route ends and waits anew)
        await clients[1].ws.aclose()
        again = await token_when_free(http, gateway, 10)
        late = await Client().connect(nursery, again.json())
        nursery.cancel_scope.cancel()
    paths = [path_of(g) for g in grants]
    assert len(set(paths)) == 3, paths
    assert [c.outcome for c in clients] == ["connected"] * 3, [(c.outcome, c.body) for c in clients]
    assert max(c.waited for c in clients) < SERVED_WITHIN_S, [c.waited for c in clients]
    for refused, cause in ((promised, "promised to a client that has not connected yet"), (in_use, "in use")):
        assert refused.status_code == 503, refused.text
        body = refused.json()
        assert f"3 {cause}" in body["error"], body
        assert 1 <= int(refused.headers["retry-after"]) <= 5 and body["retry_after"] == int(refused.headers["retry-after"])
        assert refused.headers["access-control-allow-origin"] == "*"  # the page can read why
        assert "retry-after" in refused.headers["access-control-expose-headers"].lower()
    assert promised.json()["sessions"] == {"in_use": 0, "promised": 3, "ending": 0, "starting": 0}
    assert in_use.json()["sessions"] == {"in_use": 3, "promised": 0, "ending": 0, "starting": 0}
    assert again.status_code == 200 and path_of(again) == paths[1]
    assert late.outcome == "connected" and late.waited < SERVED_WITHIN_S
    assert "no free agent session" in "\n".join(r.getMessage() for r in caplog.records)


async def test_an_endpoint_still_ending_its_last_session_is_not_handed_out(tmp_path, tts, http, caplog):
    caplog.set_level("INFO")
    pcm, rate = read_wav(SPEECH)
    seconds = 8  # the route plays it out at real time; some of it already while it arrives
    speech = np.tile(pcm[:, 0], math.ceil(seconds * rate / len(pcm)))[: seconds * rate].astype("<i2").tobytes()
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, routes(2), tts=tts, out=str(tmp_path))
        first = await get_token(http, gateway)
        talker = await Client().connect(nursery, first.json())
        assert talker.outcome == "connected"
        # the client sends 8 s of speech at once (a bursty sender, like the spec's agent's TTS)
        # and leaves: its route queued them and plays them out at real time before it ends
        for i in range(0, len(speech), 640):
            await talker.ws.send_message(speech[i : i + 640])
        await talker.ws.aclose()
        await trio.sleep(0.3)
        second = await get_token(http, gateway)
        newcomer = await Client().connect(nursery, second.json())
        assert newcomer.outcome == "connected" and newcomer.waited < SERVED_WITHIN_S, (newcomer.outcome, newcomer.waited)
        # the idle endpoint is taken now too; the one still ending is not handed out either
        meanwhile = await get_token(http, gateway)
        meanwhile_at = trio.current_time()
        assert meanwhile.status_code == 503, meanwhile.text  # (else the wait below never ends)
        # once its route has played the queue out, it is handed out again and serves at once
        third = await token_when_free(http, gateway, 30)
        freed_after = trio.current_time() - meanwhile_at
        last = await Client().connect(nursery, third.json())
        nursery.cancel_scope.cancel()
    assert path_of(first) == "/api/v1/sdk/ws/1"
    assert second.status_code == 200 and path_of(second) == "/api/v1/sdk/ws/2", second.text
    assert meanwhile.status_code == 503, meanwhile.text
    assert meanwhile.json()["sessions"] == {"in_use": 1, "promised": 0, "ending": 1, "starting": 0}
    assert "1 ending its previous session" in meanwhile.json()["error"]
    assert third.status_code == 200 and path_of(third) == "/api/v1/sdk/ws/1"
    assert freed_after > 1.0  # it really was still playing the client's speech out
    assert last.outcome == "connected" and last.waited < SERVED_WITHIN_S
    heard, heard_rate = read_wav(tmp_path / "heard1.wav")
    assert len(heard) / heard_rate >= seconds - 0.2  # all of it reached the recorder: queued, not dropped


async def test_a_token_left_unused_frees_its_endpoint_when_it_expires(tmp_path, tts, http, monkeypatch):
    assert agent_endpoint.TOKEN_TTL_S == 60.0
    ttl = 2.5
    monkeypatch.setattr(agent_endpoint, "TOKEN_TTL_S", ttl)  # the same timer, shorter
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, routes(1), tts=tts, out=str(tmp_path))
        unused = await get_token(http, gateway)
        issued = trio.current_time()  # it expires at the latest `ttl` after this
        promised = await get_token(http, gateway)
        await trio.sleep_until(issued + ttl + 0.1)  # the first token expires unused
        # its holder comes too late: told why, on the WebSocket (the spec's error message)
        too_late = await Client().connect(nursery, unused.json())
        fresh = await get_token(http, gateway)
        served = await Client().connect(nursery, fresh.json())
        nursery.cancel_scope.cancel()
    assert unused.status_code == 200
    assert promised.status_code == 503, promised.text
    assert promised.json()["sessions"] == {"in_use": 0, "promised": 1, "ending": 0, "starting": 0}
    assert 1 <= int(promised.headers["retry-after"]) <= math.ceil(ttl)  # when the promise ends, not 5 s
    assert too_late.outcome == "invalid_token" and too_late.close_code == 1008
    assert fresh.status_code == 200 and path_of(fresh) == path_of(unused), fresh.text
    assert served.outcome == "connected" and served.waited < SERVED_WITHIN_S


async def test_a_promised_endpoint_serves_its_token_holder_not_a_stale_client(tmp_path, tts, http):
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, routes(1), tts=tts, out=str(tmp_path))
        old = await get_token(http, gateway)
        previous = await Client().connect(nursery, old.json())
        assert previous.outcome == "connected"
        await previous.ws.aclose()
        grant = await token_when_free(http, gateway, 10)
        # the previous page reconnects with its old URL (and sends nothing yet): it must not
        # take the session promised to the holder of the new token
        stale = await Client().connect(nursery, old.json(), send_token=False)
        honest = await Client().connect(nursery, grant.json())
        nursery.cancel_scope.cancel()
    assert grant.status_code == 200
    assert honest.outcome == "connected" and honest.waited < SERVED_WITHIN_S, (honest.outcome, honest.body)
    assert stale.outcome == "refused 409" and "promised" in json.loads(stale.body)["error"], (stale.outcome, stale.body)


async def test_a_url_without_its_session_parameter_is_refused_while_promised(tmp_path, tts, http):
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, routes(1), tts=tts, out=str(tmp_path))
        grant = (await get_token(http, gateway)).json()
        bare = urlunsplit(urlsplit(grant["ws_url"])._replace(query=""))
        squatter = await Client().connect(nursery, grant, url=bare, send_token=False)
        honest = await Client().connect(nursery, grant)
        nursery.cancel_scope.cancel()
    assert honest.outcome == "connected" and honest.waited < SERVED_WITHIN_S, (honest.outcome, honest.body)
    assert squatter.outcome == "refused 409"
    assert urlsplit(grant["ws_url"]).query.startswith("session=")
