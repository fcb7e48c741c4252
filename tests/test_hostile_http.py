"""Hostile input on the REST socket and in names: what a client sees, and what the log says.

A real gateway on loopback (an Argon listen channel and the control API), called over HTTP
with httpx and raw sockets. Each test checks the status (400 / 413), the JSON error naming the
cause, that nothing was created, that the process still answers /healthz, and that the log,
in both formats at once, has no traceback and no line a peer's value started: every plain line
starts with a timestamp (or is the indented continuation of a traceback), every JSON line is
one object.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import trio

from gateway.adapters.argon.wire import STREAM_TOKEN_PATH
from gateway.config import GatewayConfig
from gateway.config.yaml_lines import load_yaml
from gateway.daemon import Gateway
from gateway.errors import ConfigError
from gateway.logs import log_handler
from gateway.server import (
    MAX_JSON_BODY,
    MAX_JSON_DEPTH,
    HttpResponse,
    HttpServer,
    json_depth,
    serve_http,
)
from harness import BOT_TOKEN, JWT_SECRET

CONTROL_TOKEN = "ctl-SECRET-hostile-93c1"
AUTH = {"authorization": f"Bearer {CONTROL_TOKEN}"}
BOT = {"authorization": f"Bot {BOT_TOKEN}"}
SPACE = "550e8400-e29b-41d4-a716-446655440000"
CHANNEL = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
FORGED = "2026-01-01 00:00:00,000 ERROR forged"
EVIL_NAME = f"evil\n{FORGED} line"
NAME_RULE = "use 1 to 64 of A-Z a-z 0-9 . _ -"

CONFIG = f"""\
server:
  http: "127.0.0.1:0"
  media: "127.0.0.1:0"
  control: {{token: "{CONTROL_TOKEN}"}}
services:
  argon: {{listen_bot_tokens: ["{BOT_TOKEN}"], jwt_secret: "{JWT_SECRET}"}}
routes:
  - name: channel
    endpoints:
      - argon: {{role: listen, space_id: {SPACE}, channel_id: {CHANNEL}}}
      - record: {{path: "$out/channel.wav"}}
"""

PLAIN_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) +\S")
CONTINUATION = "  | "


# ------------------------------------------------------------------------------- helpers
@contextmanager
def both_logs():
    """(plain, json) StringIOs that the daemon's two handlers write every record to."""
    plain, js = io.StringIO(), io.StringIO()
    handlers = [log_handler("plain", plain), log_handler("json", js)]
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.INFO)
    for handler in handlers:
        root.addHandler(handler)
    try:
        yield plain, js
    finally:
        for handler in handlers:
            root.removeHandler(handler)
        root.setLevel(old_level)


def assert_clean_logs(plain: io.StringIO, js: io.StringIO, *, tracebacks: bool = False) -> tuple[list[str], list[dict]]:
    """Every line is a record of ours (or the indented continuation of one); no forged line.
    Lines are split as str.splitlines() does (\\r, \\x85, \\u2028, ... end a line there too)."""
    text = plain.getvalue()
    lines = text.splitlines()
    for line in lines:
        assert PLAIN_START.match(line) or (tracebacks and line.startswith(CONTINUATION)), repr(line)
        assert not line.startswith(FORGED[:23]), repr(line)
    if not tracebacks:
        assert "Traceback" not in text
    entries = []
    for line in js.getvalue().splitlines():
        entry = json.loads(line)
        assert isinstance(entry, dict) and {"ts", "level", "logger", "msg"} <= set(entry), line
        entries.append(entry)
    if not tracebacks:
        assert not any("exc" in e for e in entries) and "Traceback" not in js.getvalue()
    assert not re.search("[\u2028\u2029\x85]", text + js.getvalue())
    return lines, entries


async def start(nursery, tmp_path: Path) -> tuple[Gateway, httpx.AsyncClient]:
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG.replace("$out", str(tmp_path)))
    gateway = await nursery.start(Gateway(GatewayConfig.load(path), config_path=str(path)).run)
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.runtime.http.port}", timeout=10)
    return gateway, client


async def assert_alive(api: httpx.AsyncClient) -> None:
    health = await api.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def nested(depth: int, inner: str = "") -> str:
    return "[" * depth + inner + "]" * depth


def a_route(name: str = "added", **extra) -> dict:
    return {"name": name, "endpoints": [{"file": {"path": "nowhere.wav"}}, {"record": {"path": "out.wav"}}], **extra}


def refusal(response: httpx.Response, status: int) -> str:
    """The cause of a refusal: the status, a JSON body, no raw control character in it."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    cause = body.get("message", body.get("error"))
    assert isinstance(cause, str) and not re.search(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", cause), body
    return cause


# ------------------------------------------------------------------------- nesting, size
@pytest.mark.parametrize("prefix", ["", "/api/bot"])
async def test_nested_json_to_stream_token_is_refused_before_parsing(tmp_path, prefix):
    path = prefix + STREAM_TOKEN_PATH
    ok_body = {"spaceId": SPACE, "channelId": CHANNEL}
    with both_logs() as (plain, js):
        async with trio.open_nursery() as nursery:
            gateway, api = await start(nursery, tmp_path)
            # the body, made to fit under the size limit: 30,000 "[" then 30,000 "]"
            deep = await api.post(path, content=nested(30_000).encode(), headers=BOT)
            assert f"nested deeper than {MAX_JSON_DEPTH} levels" in refusal(deep, 400)
            assert deep.json()["error"] == "bad_request"  # Argon's error shape: {"error": code, "message"}
            # valid JSON one level too deep: parsed before, now refused
            too_deep = dict(ok_body, extra=json.loads(nested(MAX_JSON_DEPTH)))
            answer = await api.post(path, json=too_deep, headers=BOT)
            assert f"nested deeper than {MAX_JSON_DEPTH} levels" in refusal(answer, 400)
            # brackets inside strings do not count; exactly the limit passes
            fits = dict(ok_body, extra=json.loads(nested(MAX_JSON_DEPTH - 1)), note="[[[[" * 40 + '\\"' + "{{" * 40)
            accepted = await api.post(path, json=fits, headers=BOT)
            assert accepted.status_code == 200 and set(accepted.json()) == {"token", "ingressUrl", "roomName"}
            # the exact body: 200,000 "[" then 200,000 "]" is over the size limit
            huge = await api.post(path, content=nested(200_000).encode(), headers=BOT)
            assert refusal(huge, 413) == "body over 64 KiB" and huge.json()["error"] == "payload_too_large"
            await assert_alive(api)
            await api.aclose()
            nursery.cancel_scope.cancel()
    assert_clean_logs(plain, js)
    assert "nested deeper than 32 levels" in plain.getvalue()  # one line says why


async def test_nested_and_oversize_json_to_post_routes(tmp_path):
    with both_logs() as (plain, js):
        async with trio.open_nursery() as nursery:
            gateway, api = await start(nursery, tmp_path)
            before = set(gateway.routes)
            deep = await api.post("/v1/routes", content=nested(30_000).encode(), headers=AUTH)
            assert refusal(deep, 400) == f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
            deep_option = a_route("deep", endpoints=[{"file": {"path": "x", "meta": json.loads(nested(40))}},
                                                     {"record": {"path": "y"}}])
            answer = await api.post("/v1/routes", json=deep_option, headers=AUTH)
            assert refusal(answer, 400) == f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
            # over 64 KiB: announced by Content-Length, or sent chunked without one
            big = a_route("big", pad="x" * MAX_JSON_BODY)
            assert refusal(await api.post("/v1/routes", json=big, headers=AUTH), 413) == "body over 64 KiB"

            async def chunks():
                for _ in range(20):
                    yield b" " * 8192

            chunked = await api.post("/v1/routes", content=chunks(), headers=AUTH)
            assert chunked.request.headers["transfer-encoding"] == "chunked"
            assert refusal(chunked, 413) == "body over 64 KiB"
            assert set(gateway.routes) == before
            await assert_alive(api)
            await api.aclose()
            nursery.cancel_scope.cancel()
    assert_clean_logs(plain, js)


async def test_a_huge_content_length_is_refused_without_reading_the_body(tmp_path):
    with both_logs() as (plain, js):
        async with trio.open_nursery() as nursery:
            gateway, api = await start(nursery, tmp_path)
            stream = await trio.open_tcp_stream("127.0.0.1", gateway.runtime.http.port)
            await stream.send_all(b"POST /v1/routes HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                                  b"authorization: Bearer " + CONTROL_TOKEN.encode() + b"\r\n"
                                  b"content-length: 1000000000\r\n\r\n{\"name\": ")  # and never the rest
            received = b""
            with trio.fail_after(5):  # before: the server waited for the gigabyte
                while b"\r\n\r\n" not in received or not received.endswith(b"}"):
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    received += chunk
            head, _, body = received.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 413 ") and b"connection: close" in head.lower()
            assert json.loads(body) == {"error": "body over 64 KiB"}
            await stream.aclose()
            await assert_alive(api)
            await api.aclose()
            nursery.cancel_scope.cancel()
    lines, _ = assert_clean_logs(plain, js)
    assert any("refused (413): body over 64 KiB (Content-Length 1000000000)" in line for line in lines)


async def test_a_body_that_never_arrives_gets_408_after_the_body_timeout(tmp_path, monkeypatch):
    import gateway.server as server

    monkeypatch.setattr(server, "BODY_TIMEOUT", 0.5)
    with both_logs() as (plain, js):
        async with trio.open_nursery() as nursery:
            gateway, api = await start(nursery, tmp_path)
            stream = await trio.open_tcp_stream("127.0.0.1", gateway.runtime.http.port)
            began = trio.current_time()
            await stream.send_all(b"POST /v1/routes HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                                  b"content-length: 100\r\n\r\n{\"name\": ")  # and never the rest
            received = b""
            with trio.fail_after(5):  # before: held open for as long as the client liked
                while not received.endswith(b"}"):
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    received += chunk
            waited = trio.current_time() - began
            head, _, body = received.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower(), received
            assert "did not arrive within 0.5 s" in json.loads(body)["error"]
            assert waited >= 0.5
            await stream.aclose()
            await assert_alive(api)
            await api.aclose()
            nursery.cancel_scope.cancel()
    lines, _ = assert_clean_logs(plain, js)
    assert any("refused (408)" in line for line in lines)


@pytest.mark.parametrize("text, depth", [
    ("", 0), ("1", 0), ("[]", 1), ('{"a": [1, {"b": []}]}', 4), ('["[[[", "]]]", "\\"[["]', 1),
    ('{"k\\"{": "}}}}"}', 1), ('["unterminated [[[[', 1), ("]]][[", 0), ('"\\', 0),
])
def test_json_depth_counts_brackets_outside_strings(text, depth):
    assert json_depth(text.encode()) == depth


@pytest.mark.parametrize("body", [
    b"[" * MAX_JSON_BODY, b'"' + b'\\"' * (MAX_JSON_BODY // 2), b'"\\"' * (MAX_JSON_BODY // 3),
    b'"' + b"\\" * MAX_JSON_BODY, b'"a"[' * (MAX_JSON_BODY // 4),
])
def test_json_depth_is_linear_on_hostile_bodies(body):
    started = time.perf_counter()
    json_depth(body)
    assert time.perf_counter() - started < 0.05  # one regex pass, translate, numpy: ~2 ms here


# --------------------------------------------------------------------------------- names
async def test_a_route_name_with_a_newline_is_refused_by_the_api(tmp_path):
    with both_logs() as (plain, js):
        async with trio.open_nursery() as nursery:
            gateway, api = await start(nursery, tmp_path)
            before = set(gateway.routes)
            answer = await api.post("/v1/routes", json=a_route(EVIL_NAME), headers=AUTH)
            cause = refusal(answer, 400)
            assert cause == f"POST /v1/routes: name: {EVIL_NAME!r} is not a valid route name: {NAME_RULE}"
            for name in ("a" * 65, "with space", "slash/name", "caf\u00e9", "..", "\u2028"):
                assert NAME_RULE in refusal(await api.post("/v1/routes", json=a_route(name), headers=AUTH), 400)
            endpoint = a_route("fine", endpoints=[{"file": {"path": "x", "name": EVIL_NAME}}, {"record": {"path": "y"}}])
            cause = refusal(await api.post("/v1/routes", json=endpoint, headers=AUTH), 400)
            assert f"{EVIL_NAME!r} is not a valid endpoint name: {NAME_RULE}" in cause
            assert set(gateway.routes) == before
            await assert_alive(api)
            await api.aclose()
            nursery.cancel_scope.cancel()
    lines, entries = assert_clean_logs(plain, js)
    assert not any("forged" in e["msg"] for e in entries)  # a refused name is not logged at all


def test_a_route_name_with_a_newline_is_refused_in_yaml():
    text = 'routes:\n  - name: ok\n    endpoints: [{file: {path: a}}, {record: {path: b}}]\n' \
           '  - name: "evil\\n%s line"\n    endpoints: [{file: {path: a}}, {record: {path: b}}]\n' % FORGED
    with pytest.raises(ConfigError) as refused:
        GatewayConfig.from_text(text, "gw.yaml")
    assert str(refused.value) == f"gw.yaml:4: routes[1].name: {EVIL_NAME!r} is not a valid route name: {NAME_RULE}"
    assert "\n" not in str(refused.value)


def test_an_endpoint_name_with_a_newline_is_refused_in_yaml(tmp_path):
    text = ('routes:\n  - name: ok\n    endpoints:\n      - file: {path: a, name: "rec\\n%s"}\n'
            '      - record: {path: b}\n' % FORGED)
    gateway = Gateway(GatewayConfig.from_text(text, "gw.yaml"))
    with pytest.raises(ConfigError) as refused:
        gateway.build()
    shown = repr("rec\n" + FORGED)
    assert str(refused.value) == f"gw.yaml:4: routes[0].endpoints[0].file.name: {shown} is not a valid endpoint name: {NAME_RULE}"


def test_names_in_the_shipped_configs_and_the_readme_follow_the_rule():
    root = Path(__file__).parent.parent
    texts = [p.read_text() for p in sorted((root / "config").glob("*.yaml"))]
    texts += re.findall(r"```yaml\n(.*?)```", (root / "README.md").read_text(), re.S)
    names = []
    for text in texts:
        data = load_yaml(text, "x.yaml") or {}
        for route in data.get("routes") or () if isinstance(data, dict) else ():
            names.append(route["name"])
            names += [body["name"] for item in route["endpoints"] for body in item.values() if body and "name" in body]
    assert names and all(re.fullmatch(r"[A-Za-z0-9._-]{1,64}", str(n)) for n in names), names


# ----------------------------------------------------------------------------------- logs
@pytest.mark.parametrize("peer", [
    f"hello\n{FORGED}", f"hello\r\n{FORGED}", f"hello\r{FORGED}", f"hello\u2028{FORGED}",
    f"hello\u2029{FORGED}", f"hello\x85{FORGED}", f"hello\x0b{FORGED}", f"hello\x1e{FORGED}",
])
def test_a_peer_value_cannot_start_a_log_line(peer):
    secret = "key=peer-SECRET-1234"
    with both_logs() as (plain, js):
        log = logging.getLogger("gateway.endpoint.argon")
        log.warning("peer said %s with %s", peer, secret, extra={"route": f"r{peer}", "endpoint": f"e{peer}"})
        logging.getLogger(f"gateway.{peer}").info("a logger named by a peer")
        try:
            raise ValueError(f"peer sent {peer} with token={secret}")
        except ValueError:
            log.exception("handling %s failed", peer)
    lines, entries = assert_clean_logs(plain, js, tracebacks=True)
    text = plain.getvalue()
    assert "peer-SECRET" not in text + js.getvalue()
    assert re.match(r"\S+ \S+ WARNING gateway\.endpoint\.argon: \[r.*/e.*\] peer said hello\\.+" + re.escape(FORGED), lines[0])
    assert len([line for line in lines if PLAIN_START.match(line)]) == 3
    # the traceback stays multi-line, every line of it indented; the peer's text stays on its line
    tb = lines[3:]
    assert tb[0] == CONTINUATION + "Traceback (most recent call last):" and all(line.startswith(CONTINUATION) for line in tb)
    assert re.fullmatch(re.escape(CONTINUATION) + r"ValueError: peer sent hello\\.+" + re.escape(FORGED)
                        + r" with token=\*\*\*", tb[-1]), tb[-1]
    # JSON keeps the values (escaped by JSON itself), one line per record
    assert [e["level"] for e in entries] == ["warning", "info", "error"]
    assert entries[0]["msg"] == f"peer said {peer} with key=***" and entries[0]["route"] == f"r{peer}"
    assert entries[1]["logger"] == f"gateway.{peer}"
    assert entries[2]["exc"].startswith("Traceback (most recent call last):")
    escaped = peer.encode("unicode_escape").decode()
    assert entries[2]["exc"].endswith(f"ValueError: peer sent {escaped} with token=***"), entries[2]["exc"]


# -------------------------------------------------------------------------------- headers
async def test_a_header_value_with_control_characters_is_dropped_not_a_500():
    app = HttpServer()

    async def created(request):
        return HttpResponse.json(201, {"ok": True}, (("location", f"/v1/routes/{EVIL_NAME}"), ("x-fine", "yes")))

    async def streamed(request):
        async def chunks():
            yield b"data: one\n\n"

        return HttpResponse.event_stream(chunks, (("x-bad", "a\r\nset-cookie: forged=1"),))

    app.add("POST", "/made", created)
    app.add("GET", "/events", streamed)
    with both_logs() as (plain, js):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_http, app, "127.0.0.1", 0)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                answer = await client.post("/made")
                assert answer.status_code == 201 and answer.json() == {"ok": True}
                assert "location" not in answer.headers and answer.headers["x-fine"] == "yes"
                events = await client.get("/events")
                assert events.status_code == 200 and events.text == "data: one\n\n"
                assert "x-bad" not in events.headers and "set-cookie" not in events.headers
            nursery.cancel_scope.cancel()
    lines, _ = assert_clean_logs(plain, js)
    dropped = [line for line in lines if "dropped the response header" in line]
    assert len(dropped) == 2 and "'location'" in dropped[0] and "'x-bad'" in dropped[1]
