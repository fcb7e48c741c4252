"""Fuzzing every listen role and REST endpoint of a running gateway (issue 10).

The model is h11's fuzzing (python-hyper/h11, fuzz/afl-server.py): whatever garbage a peer
sends, the parser either accepts it or raises RemoteProtocolError, never anything else. Here
the parser is the whole daemon: a real gateway on loopback (tests/harness.py's secrets) gets a
few thousand seeded inputs per listen role and per REST endpoint, mutations of VALID messages
(tests/fuzz_inputs.py: bit flips, truncation, extension, splicing, text for binary and binary
for text, sizes at every boundary up to the 64 KiB message cap, valid-looking JSON with wrong
types, deep nesting, huge strings, unicode and control characters), for the first message and,
after an honest handshake, for the later ones; valid sequences are interrupted (a close, a TCP
abort without a close frame, a client that goes silent). Connections run concurrently, a
bounded number per role, and are reused while the protocol allows.

Invariants checked, whatever the input:

- no HTTP 5xx (but the documented backpressure answers: 503 with Retry-After, and /readyz);
- no "Traceback" and no ERROR record from the gateway or its servers in the log, and no
  secret of the config in it;
- every connection the gateway closes is closed with a code of its protocol, promptly after
  the message that broke it, or within the protocol's deadline for a silent client (token,
  start, idle timeouts, patched short here); no connection or upgrade hangs past that;
- the process is alive (the servers' nurseries did not crash, routes did not go into restart
  backoff) and afterwards the role still serves an honest client (audio arrives) and
  /healthz answers 200.

The sans-IO wire parsers get the same inputs directly, many more of them (h11's invariant).

Bounded in time: each test stops at GATEWAY_FUZZ_ITERATIONS inputs per listen role or per
REST endpoint (default 3000; the sans-IO tests take twice as many, the raw media-socket test
an eighth as many connections) or after GATEWAY_FUZZ_SECONDS (default 8 s, which keeps the
file under a minute with `pytest -n 2`), whichever comes first; the summary line of each
test (printed with -s, and in every failure) says how many inputs it sent. For a longer run:
GATEWAY_FUZZ_SECONDS=120 GATEWAY_FUZZ_ITERATIONS=50000.

Reproduce: the seed is printed in every failure; GATEWAY_FUZZ_SEED=<seed> reruns it
(GATEWAY_FUZZ_SEED=random picks a new one). Inputs are a pure function of the seed, per
worker; which inputs meet in the gateway at the same time depends on scheduling.
"""

from __future__ import annotations

import base64
import collections
import json
import logging
import math
import os
import random
import re
import time
from typing import Any, Callable
from urllib.parse import quote

import attrs
import httpx
import jwt
import numpy as np
import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    connect_websocket_url,
)

import fuzz_inputs as fz
from gateway.adapters.agent import wire as agent_wire
from gateway.adapters.argon import wire as argon_wire
from gateway.adapters.videosdk import (
    frames as vsdk_frames,
    sessions as vsdk_sessions,
    webhooks as vsdk_webhooks,
)
from gateway.adapters.voipbin.wire import Codec, Encapsulation, MediaStreamProtocol
from gateway.codecs.ogg import OggOpusDemuxer
from gateway.config import GatewayConfig
from gateway.demo import DEFAULT_AUDIO, start_gateway
from gateway.errors import GatewayError, RemoteProtocolError
from harness import AGENT_API_KEY, BOT_TOKEN, JWT_SECRET, SECRETS, VIDEOSDK_TOKEN, VOIPBIN_TOKEN

# CPU-heavy and real time: run on one xdist worker, one such file after another (dev.sh --dist loadgroup)
pytestmark = pytest.mark.xdist_group("realtime")


# ------------------------------------------------------------------------------ settings
_SEED_ENV = os.environ.get("GATEWAY_FUZZ_SEED", "")
SEED = random.randrange(2**32) if _SEED_ENV == "random" else int(_SEED_ENV or 20261001)
ITERATIONS = int(os.environ.get("GATEWAY_FUZZ_ITERATIONS", "3000"))
TIME_CAP = float(os.environ.get("GATEWAY_FUZZ_SECONDS", "8"))
REPRO = f"(seed {SEED}: GATEWAY_FUZZ_SEED={SEED} .venv/bin/python -m pytest -q tests/test_fuzz.py)"

CONTROL_TOKEN = "ctl-SECRET-fuzz-3c9e1a77"
ALL_SECRETS = SECRETS + (CONTROL_TOKEN,)
SPACE = "550e8400-e29b-41d4-a716-446655440000"
CHANNEL = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
ROOM = f"{SPACE}/{CHANNEL}"
BOT_USER = "5b0e3f5e-0000-4000-8000-00000000b0b0"
PARTICIPANT = "music"  # identity of the file playing in the Argon channel
VSDK_ROOM = "fz-room"

N_CALLS = 6  # VoIPBIN listen calls (one fuzz worker each)
N_AGENTS = 8  # agent listen endpoints
N_DEVICES = 6  # VideoSDK listen endpoints, all in one room (pub/sub between them)
N_BOTS = 8  # concurrent Argon bots

PROMPT_S = 2.0  # seconds within which a connection that broke its protocol must be closed
SLACK_S = 1.5  # seconds of slack on a protocol deadline (the loop is busy with the fuzz)
UPGRADE_S = 5.0  # seconds an upgrade may take to be accepted or refused
# protocol deadlines, patched short (fixture `short_deadlines`)
TOKEN_TIMEOUT_S = 0.5  # agent: token message (spec policy 5 s)
AGENT_TOKEN_TTL_S = 2.0  # agent: a session token not redeemed (60 s)
START_TIMEOUT_S = 0.5  # VideoSDK: start frame (spec 5 s)
CONNECT_IDLE_S = 1.0  # Argon /audio/connect without a packet (60 s)
VOIPBIN_IDLE_S = 1.0  # VoIPBIN listen media stream without a message (60 s)
WS_HANDSHAKE_S = 1.0  # media socket: opening handshake (gateway.server.WS_CONNECT_TIMEOUT, 10 s)
HTTP_BODY_S = 1.0  # REST socket: a request body (gateway.server.BODY_TIMEOUT, 10 s)
HTTP_IDLE_S = 5.0  # REST socket: a connection without a whole request head (hypercorn keep-alive, not patched)

# close codes each role's gateway side may use (README and each adapter's docstring); 1006
# (no close frame) only where the protocol drops the connection on purpose (see Argon)
CLOSE_CODES = {
    "voipbin": {1000, 1002, 1003, 1007, 1008, 1009},
    "argon": {1000, 1007, 1009},
    "agent": {1000, 1002, 1007, 1008, 1009},
    "videosdk": {1000, 1002, 1003, 1007, 1008, 1009, 1011},
}

CONFIG = """\
server:
  http: "127.0.0.1:$http_port"
  media: "127.0.0.1:$media_port"
  control: {token: "%(control)s"}
  setups_per_second: 2000   # the fuzz reaches the parsers; pacing is tested in test_session_burst.py
  setup_burst: 100
services:
  voipbin: {api_url: "http://127.0.0.1:$media_port", token: "%(voipbin)s"}
  argon: {api_url: "http://127.0.0.1:$http_port/api/bot", bot_token: "%(bot)s", jwt_secret: "%(jwt)s",
          listen_bots: [{token: "%(bot)s", user_id: %(bot_user)s, username: fuzz_bot}]}
  agent: {api_url: "http://127.0.0.1:$http_port", api_key: "%(agent)s", cors_origins: ["https://app.example"]}
  videosdk: {api_url: "http://127.0.0.1:$http_port", token: "%(vsdk)s", webhook_public_key_file: "$pem"}
routes:
""" % dict(control=CONTROL_TOKEN, voipbin=VOIPBIN_TOKEN, bot=BOT_TOKEN, jwt=JWT_SECRET, bot_user=BOT_USER,
           agent=AGENT_API_KEY, vsdk=VIDEOSDK_TOKEN)
CONFIG += "".join(f"""\
  - name: call-{i}
    endpoints:
      - voipbin: {{role: listen, name: call, call_id: fz-call-{i}}}
      - file: {{path: "$audio", rate: 8000, loop: true}}
      - record: {{path: "$out/call-{i}.wav", rate: 8000, hears: [call]}}
""" for i in range(N_CALLS))
CONFIG += f"""\
  - name: channel
    endpoints:
      - argon: {{role: listen, name: channel, space_id: {SPACE}, channel_id: {CHANNEL}}}
      - file: {{path: "$audio", identity: {PARTICIPANT}, loop: true}}
      - record: {{path: "$out/channel.wav", hears: [channel]}}
"""
CONFIG += "".join(f"""\
  - name: agent-{i}
    endpoints:
      - agent: {{role: listen, name: agent}}
      - file: {{path: "$audio", rate: 16000, loop: true}}
      - record: {{path: "$out/agent-{i}.wav", rate: 16000, hears: [agent]}}
""" for i in range(N_AGENTS))
CONFIG += "".join(f"""\
  - name: device-{i}
    endpoints:
      - videosdk: {{role: listen, name: device, room_id: {VSDK_ROOM}, publish_topic: dtmf}}
      - file: {{path: "$audio", rate: 8000, loop: true}}
      - record: {{path: "$out/device-{i}.wav", rate: 8000, hears: [device]}}
""" for i in range(N_DEVICES))

LISTEN_ROUTES = {
    "voipbin": [f"call-{i}" for i in range(N_CALLS)],
    "argon": ["channel"],
    "agent": [f"agent-{i}" for i in range(N_AGENTS)],
    "videosdk": [f"device-{i}" for i in range(N_DEVICES)],
}


# ------------------------------------------------------------------------------ the tally
@attrs.define
class Tally:
    """What one fuzz test sent and saw; failures are collected (with their input) and
    reported together at the end, each kind at most a few times."""

    name: str
    inputs: int = 0
    connections: int = 0
    requests: int = 0
    refused: collections.Counter = attrs.Factory(collections.Counter)
    """Upgrades or requests refused, by HTTP status."""
    closed_by_gateway: collections.Counter = attrs.Factory(collections.Counter)
    """Connections the gateway closed, by close code."""
    closed_by_client: int = 0
    aborted: int = 0
    busy_retries: int = 0
    failures: dict[str, list[str]] = attrs.Factory(dict)
    started: float = attrs.Factory(time.monotonic)
    recent: collections.deque = attrs.Factory(lambda: collections.deque(maxlen=6))
    """Descriptions of the last connections that ended (to name a crash's suspects)."""
    gateway_down: Callable[[], bool] = lambda: False
    """True once the gateway's nursery is being torn down by a crash."""
    after_crash: int = 0
    failed_at: list = attrs.Factory(list)

    def fail(self, kind: str, detail: str) -> None:
        if self.gateway_down() and not kind.startswith("the gateway crashed"):
            self.after_crash += 1  # the consequences of a crash, not findings of their own
            return
        self.failures.setdefault(kind, [])
        detail = detail[:1500].encode("utf-8", "backslashreplace").decode("utf-8")  # (a report must encode)
        self.failures[kind].append(detail if len(self.failures[kind]) < 3 else "")
        self.failed_at.append((time.monotonic(), kind))

    def forget_since(self, when: float) -> None:
        """Drop the failures recorded since `when` (a crash was under way: connections reset,
        upgrades unanswered), but the crash itself."""
        for at, kind in self.failed_at:
            if at >= when and kind in self.failures and not kind.startswith("the gateway crashed"):
                self.failures[kind].pop()
                self.after_crash += 1
                if not self.failures[kind]:
                    del self.failures[kind]
        self.failed_at = [(at, kind) for at, kind in self.failed_at if at < when]

    def count(self, kind: str) -> int:
        return len(self.failures.get(kind, ()))

    def budget_left(self, budget: int) -> bool:
        flood = sum(len(v) for v in self.failures.values()) > 100  # broken beyond counting: stop
        return self.inputs < budget and time.monotonic() - self.started < TIME_CAP and not flood \
            and not self.gateway_down()

    def summary(self) -> str:
        return (f"{self.name}: {self.inputs} inputs, {self.connections} connections, {self.requests} requests in "
                f"{time.monotonic() - self.started:.1f} s; refused {dict(self.refused)}; closed by the gateway "
                f"{dict(self.closed_by_gateway)}, by us {self.closed_by_client}, aborted {self.aborted}; "
                f"busy retries {self.busy_retries}")

    def report(self) -> str:
        lines = [self.summary()]
        for kind, details in self.failures.items():
            lines.append(f"  FAILED {kind} ({len(details)} times), e.g.:")
            lines += [f"    - {d}" for d in details if d]
        return "\n".join(lines)


def show(message: Any, limit: int = 120) -> str:
    """A short, printable description of an input."""
    if isinstance(message, (bytes, bytearray)):
        return f"bytes[{len(message)}] {bytes(message[:limit // 2]).hex()}{'…' if len(message) > limit // 2 else ''}"
    if isinstance(message, str):
        return f"text[{len(message)}] {message[:limit]!r}{'…' if len(message) > limit else ''}"
    return repr(message)[:limit]


# ------------------------------------------------------------------------------- the log
class LogWatch(logging.Handler):
    """Every record at INFO and above, from any logger, as the daemon's handler would see it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self.allowed_errors: list[Callable[[logging.LogRecord], bool]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def problems(self) -> list[str]:
        out = []
        formatter = logging.Formatter()
        for record in self.records:
            try:
                text = record.getMessage()
            except Exception as err:  # noqa: BLE001 - a record that cannot format is a bug too
                out.append(f"unformattable record from {record.name}: {err!r}")
                continue
            exc = formatter.formatException(record.exc_info) if record.exc_info else (record.exc_text or "")
            if record.levelno >= logging.ERROR and not any(ok(record) for ok in self.allowed_errors):
                out.append(f"{record.levelname} from {record.name}: {text[:300]}" + (f"\n{exc[-1500:]}" if exc else ""))
            elif "Traceback" in text or exc:
                out.append(f"traceback in a {record.levelname} record from {record.name}: {text[:200]}\n{exc[-1500:]}")
            for secret in ALL_SECRETS:
                if secret in text or secret in exc:
                    out.append(f"secret {secret[:6]}… in a record from {record.name}: {text[:200]}")
        return out


def _encodable_records(factory):
    """A log record factory whose records' text never holds a lone surrogate: a fuzzed JSON
    string ("\\ud800") may reach a log line, and xdist cannot ship a test report holding one
    (the daemon's own handler writes to stderr, whose error handler escapes them too)."""

    def make(*args, **kwargs):
        record = factory(*args, **kwargs)
        try:
            text = record.getMessage()
            text.encode("utf-8")
        except UnicodeEncodeError:
            record.msg, record.args = text.encode("utf-8", "backslashreplace").decode("utf-8"), ()
        except Exception:  # noqa: BLE001 - LogWatch reports a record that cannot format
            pass
        return record

    return make


@pytest.fixture
def log_watch():
    watch = LogWatch()
    root = logging.getLogger()
    old_level = root.level
    old_factory = logging.getLogRecordFactory()
    logging.setLogRecordFactory(_encodable_records(old_factory))
    root.addHandler(watch)
    root.setLevel(logging.INFO)
    try:
        yield watch
    finally:
        root.removeHandler(watch)
        root.setLevel(old_level)
        logging.setLogRecordFactory(old_factory)


@pytest.fixture
def short_deadlines(monkeypatch):
    """Every protocol deadline a silent client meets, shortened so the fuzz can wait for it."""
    from gateway import server
    from gateway.adapters.agent import endpoint as agent_endpoint
    from gateway.adapters.argon import room
    from gateway.adapters.videosdk.endpoint import VideosdkListen
    from gateway.adapters.voipbin import endpoint as voipbin_endpoint

    monkeypatch.setattr(agent_endpoint, "TOKEN_TIMEOUT_S", TOKEN_TIMEOUT_S)
    # an agent token reserves its session for its lifetime (60 s): a client that never
    # connects (the fuzz's bad URLs) would hold it past the test
    monkeypatch.setattr(agent_endpoint, "TOKEN_TTL_S", AGENT_TOKEN_TTL_S)
    if hasattr(agent_endpoint, "TOKEN_WAIT_S"):  # how long a token call waits for a free session
        monkeypatch.setattr(agent_endpoint, "TOKEN_WAIT_S", 0.05)
    monkeypatch.setattr(VideosdkListen, "start_timeout", START_TIMEOUT_S)
    monkeypatch.setattr(room, "CONNECT_IDLE", CONNECT_IDLE_S)
    monkeypatch.setattr(server, "WS_CONNECT_TIMEOUT", WS_HANDSHAKE_S)
    if hasattr(server, "BODY_TIMEOUT"):  # a request body that never arrives in full: 408
        monkeypatch.setattr(server, "BODY_TIMEOUT", HTTP_BODY_S)
    # the default of a VoIPBIN listen endpoint's `idle_timeout_s` (read when the route is built)
    monkeypatch.setattr(voipbin_endpoint, "IDLE_TIMEOUT_S", VOIPBIN_IDLE_S)


@pytest.fixture
def webhook_key(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    path = tmp_path / "webhook.pem"
    path.write_bytes(pem)
    return path, key


async def start_fuzz_gateway(nursery, tmp_path, pem_path):
    """The fuzz config on ephemeral loopback ports; its text is also written to a file, so
    POST /v1/reload has something to re-read (an unchanged config: nothing restarts)."""
    out = tmp_path / "rec"
    out.mkdir()
    text_of = {}

    def make(http_port, media_port):
        import string

        text = string.Template(CONFIG).substitute(http_port=http_port, media_port=media_port, audio=DEFAULT_AUDIO,
                                                  out=out, pem=pem_path)
        text_of["text"] = text
        return GatewayConfig.from_text(text, str(tmp_path / "gateway.yaml"))

    gateway = await start_gateway(nursery, make)
    (tmp_path / "gateway.yaml").write_text(text_of["text"])
    gateway.config_path = str(tmp_path / "gateway.yaml")
    return gateway


def check_end_state(gateway, tally: Tally, watch: LogWatch, role: str | None) -> None:
    """After the fuzz: no route went into restart backoff, the log is clean."""
    for name, state in gateway.routes.items():
        if role is not None and name not in LISTEN_ROUTES[role]:
            continue
        if state.restarts or state.state in ("restarting", "failed"):
            tally.fail("a route went into restart backoff (or failed) during the fuzz",
                       f"route {name}: state {state.state}, {state.restarts} restarts, last error {state.last_error!r}")
    for problem in watch.problems():
        tally.fail("ERROR record, traceback or secret in the log", problem)


# --------------------------------------------------------------------------- WebSocket peer
class Peer:
    """One fuzz client connection: opens, sends, reads everything in the background (so the
    gateway's audio never fills our queue and hides its close frame), and checks how the
    connection ends."""

    def __init__(self, tally: Tally, role: str, what: str) -> None:
        self.tally = tally
        self.role = role
        self.what = what
        """What this connection is (for failure reports): the URL shape and the inputs sent."""
        self.ws = None
        self.closed = trio.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed_at = 0.0
        self.last_send = 0.0
        self.texts: list[str] = []
        self.binary = 0
        self.status: int | None = None
        self._client_closing = False
        self._aborted = False
        self.sent: list[str] = []
        self.text_arrived = trio.Event()

    def note(self, text: str) -> None:
        self.sent.append(text)

    def describe(self) -> str:
        return f"{self.role} {self.what}; sent: " + " | ".join(self.sent[-6:])

    async def open(self, nursery, url: str, headers: list[tuple[bytes, bytes]] | None = None) -> bool:
        """True when the upgrade was accepted; a refusal is checked (no 5xx) and counted."""
        self.tally.connections += 1
        self.tally.inputs += 1
        rejected: list[BaseException | None] = []
        ws = None
        try:
            with trio.fail_after(UPGRADE_S), trio.CancelScope() as handshake:
                ws = await connect_websocket_url(_ReaderNursery(nursery, rejected, handshake), url, extra_headers=headers,
                                                 message_queue_size=8, max_message_size=2**20)
            if ws is None:  # refused, or closed without an answer
                if rejected and rejected[0] is not None:
                    raise rejected[0]
                self.tally.fail("upgrade closed without an HTTP answer", self.describe())
                return False
            self.ws = ws
        except ConnectionRejected as err:
            self.status = err.status_code
            self.tally.refused[err.status_code] += 1
            if err.status_code >= 500 and err.status_code != 503:  # 503: backpressure (busy, not ready)
                self.tally.fail(f"upgrade refused with {err.status_code}",
                                f"{self.describe()}: {err.status_code} {(err.body or b'')[:200]!r}")
            return False
        except trio.TooSlowError:
            self.tally.fail("upgrade neither accepted nor refused in time", f"{self.describe()} ({UPGRADE_S} s)")
            return False
        except (HandshakeError, OSError, trio.BrokenResourceError) as err:
            self.tally.fail("upgrade failed without an HTTP answer", f"{self.describe()}: {err!r}")
            return False
        nursery.start_soon(self._reader)
        self.last_send = trio.current_time()
        return True

    async def _reader(self) -> None:
        try:
            while True:
                message = await self.ws.get_message()
                if isinstance(message, str):
                    self.texts.append(message)
                    self.text_arrived.set()
                    self.text_arrived = trio.Event()
                else:
                    self.binary += 1
        except ConnectionClosed as closed:
            self._closed(closed.reason)

    def _closed(self, reason) -> None:
        if self.closed.is_set():
            return
        self.closed_at = trio.current_time()
        self.close_code = getattr(reason, "code", None)
        self.close_reason = getattr(reason, "reason", "") or ""
        self.closed.set()
        if self._client_closing or self._aborted:
            return
        self.tally.closed_by_gateway[self.close_code] += 1

    async def send(self, message: str | bytes) -> bool:
        """Send one input; False when the connection is closed already."""
        if self.closed.is_set():
            return False
        self.tally.inputs += 1
        self.note(show(message, 60))
        try:
            with trio.fail_after(PROMPT_S + SLACK_S):
                await self.ws.send_message(message)
        except ConnectionClosed as closed:
            self._closed(closed.reason)
            return False
        except trio.TooSlowError:
            self.tally.fail("a send blocked (the gateway stopped reading)", self.describe())
            return False
        self.last_send = trio.current_time()
        return True

    async def wait_text(self, predicate: Callable[[dict], bool], timeout: float) -> dict | None:
        """The first JSON text message matching `predicate` (None on timeout or close)."""
        seen = 0
        with trio.move_on_after(timeout):
            while True:
                for text in self.texts[seen:]:
                    seen += 1
                    try:
                        data = json.loads(text)
                    except ValueError:
                        continue
                    if isinstance(data, dict) and predicate(data):
                        return data
                if self.closed.is_set():
                    return None
                arrived = self.text_arrived
                with trio.move_on_after(0.05):
                    await arrived.wait()
        return None

    def _check_close(self, allowed: set[int], *, deadline: float | None = None) -> None:
        code = self.close_code
        if code not in allowed:
            self.tally.fail(f"closed with {code}, not a code of the {self.role} protocol",
                            f"{self.describe()}: closed {code} {self.close_reason!r}")
        took = self.closed_at - self.last_send
        limit = PROMPT_S if deadline is None else deadline + SLACK_S
        if took > limit:
            self.tally.fail("closed later than the protocol's deadline",
                            f"{self.describe()}: closed {code} {took:.2f} s after the last input (limit {limit:.1f} s)")

    async def finish(self, tail: str, *, allowed: set[int], silent_deadline: float | None = None,
                     kind: str = "") -> None:
        """End the connection: `close` (grace for a close the last input caused, then ours),
        `abort` (TCP close without a close frame) or `silent` (wait for the gateway's deadline:
        `silent_deadline` seconds; None means the protocol has none, then we close)."""
        if not self.closed.is_set() and tail == "silent":
            if silent_deadline is not None:
                with trio.move_on_after(silent_deadline + SLACK_S):
                    await self.closed.wait()
                if not self.closed.is_set():
                    self.tally.fail(kind or "a silent client was not closed within the protocol's deadline",
                                    f"{self.describe()}: open {silent_deadline + SLACK_S:.1f} s after the last input")
                else:
                    self._check_close(allowed, deadline=silent_deadline)
                    return
            tail = "close"
        if not self.closed.is_set() and tail == "close":
            with trio.move_on_after(0.05):
                await self.closed.wait()
        if self.closed.is_set():
            if not self._client_closing:
                self._check_close(allowed)
            return
        if tail == "abort":
            self._aborted = True
            self.tally.aborted += 1
            stream = getattr(self.ws, "_stream", None)
            with trio.CancelScope(shield=True):
                try:
                    await stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
            return
        self._client_closing = True
        self.tally.closed_by_client += 1
        try:
            with trio.fail_after(PROMPT_S + SLACK_S):
                await self.ws.aclose(1000, "fuzz client done")
        except trio.TooSlowError:
            self.tally.fail("the gateway did not answer our close frame", self.describe())
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


class _ReaderNursery:
    """trio-websocket raises a refused upgrade in its reader task, not in connect (see
    gateway.adapters.ws.dial): catch it there and hand it to `Peer.open`."""

    def __init__(self, nursery, rejected: list, scope: trio.CancelScope) -> None:
        self._nursery, self._rejected, self._scope = nursery, rejected, scope

    def start_soon(self, fn, *args, name=None) -> None:
        async def guarded() -> None:
            try:
                await fn(*args)
            except HandshakeError as err:
                self._rejected.append(err)
                self._scope.cancel()
            else:  # the reader ended: before the handshake that is a close without an answer,
                # which trio-websocket's connect never reports (it waits on forever)
                self._rejected.append(None)
                self._scope.cancel()

        self._nursery.start_soon(guarded, name=name)


async def with_peer(tally: Tally, role: str, what: str, body) -> None:
    """Run `body(peer, nursery)` with a nursery for the connection's reader, cancelled after.
    A connection closed under an honest client's feet is a failure, not a crash of the test."""
    peer = Peer(tally, role, what)
    async with trio.open_nursery() as nursery:
        try:
            await body(peer, nursery)
        except ConnectionClosed as closed:
            tally.fail(f"{role}: the gateway closed an honest client's connection",
                       f"{peer.describe()}: {closed.reason}")
        finally:
            tally.recent.append(peer.describe()[:400])
            for secret in ALL_SECRETS:
                if any(secret in t for t in peer.texts) or secret in peer.close_reason:
                    tally.fail(f"{role}: a secret in what the gateway sent", peer.describe())
            if peer.ws is not None and not peer.closed.is_set() and not peer._aborted:
                with trio.move_on_after(1):
                    try:
                        await peer.ws.aclose()
                    except Exception:  # noqa: BLE001 - best effort at teardown
                        pass
            nursery.cancel_scope.cancel()


def pick_tail(rng: random.Random) -> str:
    return fz.pick(rng, [(0.72, lambda: "close"), (0.16, lambda: "abort"), (0.12, lambda: "silent")])


async def workers(n: int, worker) -> None:
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(worker, i)


def media_base(gateway) -> str:
    return f"ws://127.0.0.1:{gateway.runtime.media.port}"


def http_base(gateway) -> str:
    return f"http://127.0.0.1:{gateway.runtime.http.port}"


def assert_clean(tally: Tally) -> None:
    print(tally.summary())
    if tally.failures:
        pytest.fail(f"fuzz failures {REPRO}\n{tally.report()}", pytrace=False)


async def healthz(gateway, tally: Tally) -> None:
    client = gateway.runtime.http_client()
    try:
        response = await client.get(http_base(gateway) + "/healthz")
    except httpx.HTTPError as err:
        tally.fail("/healthz after the fuzz", repr(err))
        return
    if response.status_code != 200:
        tally.fail("/healthz after the fuzz", f"{response.status_code} {response.text[:200]}")


# ------------------------------------------------------------------------------- VoIPBIN
def voipbin_valid(rng: random.Random, enc: Encapsulation, codec: Codec, n: int) -> list[bytes]:
    """`n` valid consecutive messages of one stream (our own wire layer builds them)."""
    proto = MediaStreamProtocol(enc, codec, ssrc=rng.randrange(2**32), sequence=rng.randrange(2**16),
                                timestamp=rng.randrange(2**32))
    size = 160 if proto.codec is Codec.ULAW else 320
    out = []
    for _ in range(n):
        payload = rng.randbytes(size) if rng.random() < 0.5 else bytes([0xFF if size == 160 else 0]) * size
        out.append(proto.send_audio(payload))
        if enc is Encapsulation.AUDIOSOCKET and rng.random() < 0.15:
            out.append(rng.choice((proto.send_dtmf(rng.choice("0123456789*#ABCD")),
                                   proto.send_uuid("652af662-eb45-11ee-b1a5-6fde165f9226"),
                                   b"\xff\x00\x01\x02", b"\xff\x00\x00")))
    return out


async def voipbin_case(rng: random.Random, gateway, worker: int, tally: Tally) -> None:
    enc = rng.choice(list(Encapsulation))
    codec = rng.choice((Codec.ULAW, Codec.SLIN)) if enc is not Encapsulation.SLN else Codec.SLIN
    call = f"fz-call-{worker}"
    target, token, encap = f"calls/{call}", VOIPBIN_TOKEN, enc.value
    roll = rng.random()
    refused = True
    if roll < 0.03:
        token = fz.mutate_text(rng, token)[:200]
    elif roll < 0.05:
        encap = fz.mutate_text(rng, encap)[:200]
    elif roll < 0.06:
        target = rng.choice((f"calls/fz-call-{N_CALLS + 3}", f"conferences/{call}", f"calls/{call}%2F..", "calls/"))
    elif roll < 0.07:
        token = ""
    else:
        refused = False
    query = f"encapsulation={quote(encap, safe='')}&token={quote(token, safe='')}"
    url = f"{media_base(gateway)}/v1.0/{target}/media_stream?{query}"
    valid = voipbin_valid(rng, enc, codec, 24)
    others = voipbin_valid(rng, rng.choice(list(Encapsulation)), rng.choice((Codec.ULAW, Codec.SLIN)), 4)
    tail = pick_tail(rng)
    if rng.random() < 0.5 and tail == "silent":
        tail = "close"

    async def body(peer: Peer, nursery) -> None:
        for attempt in range(100):  # the call's previous session may still be finishing
            if await peer.open(nursery, url):
                break
            if peer.status != 409:
                return
            tally.busy_retries += 1
            await trio.sleep(0.03)
        else:
            tally.fail("a VoIPBIN call stayed busy (409) after its client left", peer.describe())
            return
        if refused and tally.count("a refused URL was accepted") < 3 and token != VOIPBIN_TOKEN:
            tally.fail("a refused URL was accepted", peer.describe())
        good = iter(valid)
        lead = rng.choice((0, 1, 1, 2, 3, 8))  # valid messages before the first mutation
        for i in range(rng.randrange(1, 14)):
            message: str | bytes
            if i < lead:
                message = next(good)
            else:
                message = fz.pick(rng, [
                    (0.35, lambda: next(good)),
                    (0.45, lambda: fz.mutate_bytes(rng, next(good), valid + others)),
                    (0.05, lambda: fz.mutate_text(rng, next(good).decode("latin-1"))),
                    (0.05, lambda: rng.choice(others)),
                    (0.05, lambda: bytes(rng.choice((fz.MESSAGE_CAP - 1, fz.MESSAGE_CAP, 1920, 1921, 4000)))),
                    (0.05, lambda: b"\x00\x00\x00" if enc is Encapsulation.AUDIOSOCKET else next(good)),
                ])
            if not await peer.send(message):
                break
            if rng.random() < 0.3:
                await trio.sleep(0.02)
        await peer.finish(tail, allowed=CLOSE_CODES["voipbin"], silent_deadline=VOIPBIN_IDLE_S,
                          kind="a silent VoIPBIN client was not closed (idle timeout)")

    await with_peer(tally, "voipbin", f"/v1.0/{target}/media_stream?encapsulation={encap[:20]!r} ({enc.value}, "
                    f"{codec.value}, tail {tail})", body)


async def honest_voipbin(gateway, tally: Tally) -> None:
    """A VoIPBIN client as a customer writes it: it hears the call's audio and is heard."""
    url = f"{media_base(gateway)}/v1.0/calls/fz-call-0/media_stream?encapsulation=rtp&token={VOIPBIN_TOKEN}"
    proto = MediaStreamProtocol(Encapsulation.RTP, Codec.ULAW)
    route = gateway.routes["call-0"].route
    heard_before = route.endpoints[0].stats.frames_in

    async def body(peer: Peer, nursery) -> None:
        for _ in range(100):
            if await peer.open(nursery, url) or peer.status != 409:
                break
            await trio.sleep(0.05)
        if peer.ws is None:
            tally.fail("honest VoIPBIN client refused after the fuzz", f"status {peer.status}")
            return
        for _ in range(25):
            await peer.ws.send_message(proto.send_audio(b"\xff" * 160))
            await trio.sleep(0.02)
        if peer.binary < 10 or peer.closed.is_set():
            tally.fail("honest VoIPBIN client heard no audio after the fuzz",
                       f"{peer.binary} messages, closed {peer.close_code}")
        if route.endpoints[0].stats.frames_in - heard_before < 20:
            tally.fail("honest VoIPBIN client was not heard after the fuzz",
                       f"{route.endpoints[0].stats.frames_in - heard_before} frames in")
        await peer.ws.aclose()

    await with_peer(tally, "voipbin", "honest", body)


# --------------------------------------------------------------------------------- Argon
ARGON_PATHS = ("/audio/connect", "/audio/subscribe", "/audio/duplex", "/")


def room_token(identity: str, *, secret: str = JWT_SECRET, **kw) -> str:
    return argon_wire.issue_room_token(secret, room=kw.pop("room", ROOM), identity=identity, name=kw.pop("name", identity),
                                       now=time.time(), ttl_s=3600, issuer="gateway", **kw)


def evil_token(rng: random.Random, identity: str) -> str:
    """A token the ingress must refuse or read safely: havoc on a valid one, or a properly
    signed one whose claims have wrong types, huge numbers, missing grants."""
    valid = room_token(identity)
    roll = rng.random()
    if roll < 0.3:
        return fz.mutate_text(rng, valid, cap=4000)
    if roll < 0.85:
        claims = {"iss": "gateway", "sub": identity, "name": identity, "exp": int(time.time()) + 3600,
                  "nbf": int(time.time()) - 10, "iat": int(time.time()),
                  "video": {"room": ROOM, "roomJoin": True, "canPublish": True, "canSubscribe": True}}
        if rng.random() < 0.4:  # a registered claim of the wrong type or size
            claims[rng.choice(("exp", "nbf", "iat", "sub", "iss", "name"))] = fz.pick(rng, [
                (0.6, lambda: fz.evil_number(rng)), (0.4, lambda: fz.evil_value(rng))])
        else:
            claims = fz.mutate_json(rng, claims)
        if not isinstance(claims, dict):
            claims = {"claims": claims}
        header = {"kid": fz.evil_value(rng)} if rng.random() < 0.1 else None
        try:
            return jwt.encode(claims, JWT_SECRET, algorithm="HS256", headers=header)
        except (TypeError, ValueError, RecursionError, OverflowError, jwt.PyJWTError):
            return valid[: rng.randrange(len(valid))]
    if roll < 0.9:
        return room_token(identity, secret="not-the-secret-" + "x" * 32)
    if roll < 0.95:
        return jwt.encode({"sub": identity, "iss": "gateway", "video": {"room": ROOM, "roomJoin": True},
                           "exp": time.time() + 60}, None, algorithm="none")
    return rng.choice(("", "e30.e30.", "a.b.c", "Bearer", "null", valid + "." + valid))


def argon_target(rng: random.Random, path: str, token: str | None) -> str:
    """A request target: path and query (token, target, publish parameters), percent-encoded,
    sometimes with bad escapes, duplicate or too many parameters."""
    params: list[tuple[str, str]] = []
    if token is not None:
        params.append(("token", token))
    if path in ("/audio/subscribe", "/audio/duplex") or rng.random() < 0.1:
        roll = rng.random()
        if roll < 0.8:
            params.append(("target_identity", PARTICIPANT))
        elif roll < 0.9:
            params.append(("target_identity", fz.evil_string(rng)[:300]))
        if rng.random() < 0.2:
            params.append(("target_track_source", rng.choice(("microphone", "screen_share_audio", fz.evil_string(rng)[:50]))))
    for key, make in (("frame_duration_ms", lambda: rng.choice(("10", "20", "40", "60", "0", "-20", "25", "999999999999",
                                                               "1e3", " 20", "+20", "9" * 40, ""))),
                      ("stereo", lambda: rng.choice(("true", "false", "1", "TRUE", ""))),
                      ("channels", lambda: rng.choice(("1", "2", "3", "-1", "two"))),
                      ("track_name", lambda: fz.evil_string(rng)[:400]),
                      ("track_source", lambda: rng.choice(("microphone", "screen_share_audio", "camera", ""))),
                      ("metadata", lambda: fz.dumps_any(rng, fz.evil_value(rng))[:800])):
        if rng.random() < 0.25:
            params.append((key, make()))
    if rng.random() < 0.03:
        params += [(f"p{i}", "x") for i in range(rng.choice((63, 64, 65, 200)))]
    if rng.random() < 0.1 and params:
        params.append(rng.choice(params))  # a duplicate: the first wins
    query = "&".join(f"{quote(k, safe='')}={quote(v.encode('utf-8', 'surrogatepass'), safe='')}" for k, v in params)
    if rng.random() < 0.04:
        query += rng.choice(("&%zz=1", "&a=%E0%A4", "&%=", "&&&", "&token", "&=x", "&a=%C0%AF"))
    return f"{path}?{query}" if query else path


async def argon_case(rng: random.Random, gateway, worker: int, tally: Tally) -> None:
    identity = f"fz-bot-{worker}-{rng.randrange(10**9)}"
    path = fz.pick(rng, [(0.3, lambda: "/audio/connect"), (0.2, lambda: "/audio/subscribe"),
                         (0.35, lambda: "/audio/duplex"), (0.1, lambda: "/"),
                         (0.05, lambda: rng.choice(("/audio/connect/", "/AUDIO/connect", "/audio/%63onnect", "//audio/duplex",
                                                    "/audio", "/audio/connect%00", "/audio/../audio/connect")))])
    evil = rng.random() >= 0.88
    # at most 6,000 characters: the request stays under h11's 16 KiB, whose refusal (400, then
    # a reset while trio-websocket's client still sends) that client never reports
    token = evil_token(rng, identity)[:6000] if evil else room_token(identity)
    headers = None
    value = rng.choice((b"Bearer ", b"bearer ", b"BEARER  ")) + token.encode("utf-8", "replace")
    in_header = rng.random() < 0.3 and re.fullmatch(rb"[\x21-\x7e][\x20-\x7e]*[\x21-\x7e]", value) is not None
    if in_header:  # (h11 sends only valid header values)
        headers = [(b"authorization", value)]
    # under h11's 16 KiB request head: a bigger one is refused with 400 and a reset that
    # trio-websocket's client reports as no answer (the raw media-socket test sends those)
    target = argon_target(rng, path, None if in_header else token)[:12_000]
    url = media_base(gateway) + target
    publishes = path in ("/audio/connect", "/audio/duplex", "/")
    corpus = fz.opus_corpus()
    tail = pick_tail(rng)

    def packet() -> bytes:
        return rng.choice(corpus)

    def next_message() -> str | bytes:
        if not publishes:  # subscribe: everything is read and ignored up to 1 KiB, then 1009
            return fz.pick(rng, [
                (0.4, lambda: fz.mutate_text(rng, '{"status":"ping"}', cap=1100)),
                (0.4, lambda: fz.mutate_bytes(rng, packet(), corpus, cap=1100)),
                (0.2, lambda: rng.choice((bytes(1024), bytes(1025), "é" * 512, "é" * 513, "x" * 1025))),
            ])
        return fz.pick(rng, [
            (0.45, packet),
            (0.3, lambda: fz.mutate_bytes(rng, packet(), corpus, cap=4000)),
            (0.1, lambda: fz.mutate_text(rng, '{"type":"hello"}')),
            (0.1, lambda: rng.choice((b"", b"\xf8", b"\xf8\xff", b"\xf8\xff\xfe", bytes(3826), bytes(fz.MESSAGE_CAP),
                                      rng.randbytes(3825)))),
            (0.05, lambda: fz.mutate_bytes(rng, b"OggS" + rng.randbytes(40), corpus)),
        ])

    async def body(peer: Peer, nursery) -> None:
        if not await peer.open(nursery, url, headers):
            return
        opened = trio.current_time()
        messages: list[str | bytes] = []
        if publishes and rng.random() < 0.12:  # the seed's TypeScript example: an Ogg stream, cut anywhere
            stream = fz.ogg_stream(rng, [rng.choice(corpus[:12]) for _ in range(rng.randrange(1, 30))])
            if rng.random() < 0.5:
                stream = fz.mutate_bytes(rng, stream, [stream], cap=fz.MESSAGE_CAP)
            messages = fz.split(rng, stream, rng.randrange(1, 12))
        else:
            messages = [next_message() for _ in range(rng.randrange(1, 20))]
        if rng.random() < 0.03 and publishes:  # a second session of the same identity takes the room
            async def second(peer2: Peer, nursery2) -> None:
                if await peer2.open(nursery2, url, headers):
                    with trio.move_on_after(PROMPT_S):
                        await peer.closed.wait()
                    if not peer.closed.is_set():
                        tally.fail("Argon: a replaced session (same identity) was not dropped", peer.describe())
                    elif peer.close_code != 1006:
                        tally.fail("Argon: a replaced session was closed with a close frame", f"{peer.close_code}")
                    await peer2.finish("close", allowed=CLOSE_CODES["argon"])
            await with_peer(tally, "argon", f"second session of {path}", second)
            return
        for message in messages:
            if not await peer.send(message):
                break
            if rng.random() < 0.3:
                await trio.sleep(0.02)
        idle = path in ("/audio/connect", "/", "/audio/%63onnect")  # only connect has an idle deadline
        allowed = set(CLOSE_CODES["argon"])
        if idle and (trio.current_time() - opened > CONNECT_IDLE_S * 0.9 or tail == "silent"):
            allowed.add(1006)  # the ingress drops an idle /audio/connect without a close frame
        await peer.finish(tail, allowed=allowed, silent_deadline=CONNECT_IDLE_S if idle else None,
                          kind="an idle Argon /audio/connect session was not ended")

    await with_peer(tally, "argon", f"{target[:160]} (token {'header' if in_header else 'query'}, tail {tail}"
                    f"{', evil token ' + repr(token[:300]) if evil else ''})", body)


async def honest_argon(gateway, tally: Tally) -> None:
    """A bot hearing the channel's participant gets its Opus packets; a bot publishing is heard."""
    channel = gateway.routes["channel"].route.endpoints[0]
    url = f"{media_base(gateway)}/audio/subscribe?token={room_token('honest-ear')}&target_identity={PARTICIPANT}"
    publish_url = f"{media_base(gateway)}/audio/connect?token={room_token('honest-voice')}"
    packets = [p for p in fz.opus_corpus() if p[0] >> 3 == (fz.opus_corpus()[1][0] >> 3)][:1] or fz.opus_corpus()[1:2]

    async def body(peer: Peer, nursery) -> None:
        if not await peer.open(nursery, url):
            tally.fail("honest Argon bot refused after the fuzz", f"status {peer.status}")
            return

        async def voice(peer2: Peer, nursery2) -> None:
            if not await peer2.open(nursery2, publish_url):
                tally.fail("honest Argon publisher refused after the fuzz", f"status {peer2.status}")
                return
            before = channel.stats.frames_in
            # Sent at 20 ms until 20 are heard (at most 3 s): the fuzz's last bot leaving ends the
            # channel's session, and packets that arrive before the route has started the next
            # one are not the channel's (what it hears of them is the claim, not all 25 of them)
            with trio.move_on_after(3):
                while channel.stats.frames_in - before < 20:
                    await peer2.ws.send_message(packets[0])
                    await trio.sleep(0.02)
            with trio.move_on_after(2):  # the last packets still in the playout buffer (arrival-time playout)
                while channel.stats.frames_in - before < 20:
                    await trio.sleep(0.02)
            if channel.stats.frames_in - before < 20:
                tally.fail("honest Argon publisher was not heard after the fuzz", f"{channel.stats.frames_in - before} frames")
            await peer2.ws.aclose()

        await with_peer(tally, "argon", "honest publisher", voice)
        if await peer.wait_text(lambda m: m.get("status") == "subscribed", 2) is None or peer.binary < 10:
            tally.fail("honest Argon bot heard nothing after the fuzz", f"texts {peer.texts[:3]}, {peer.binary} packets")
        await peer.ws.aclose()

    await with_peer(tally, "argon", "honest subscriber", body)


# ------------------------------------------------------------------------ voice agent SDK
async def agent_token(gateway, tally: Tally) -> tuple[str, str] | None:
    """An honest token call (spec §1): (token, ws_url), None when every session is busy."""
    client = gateway.runtime.http_client()
    tally.requests += 1
    try:
        response = await client.post(http_base(gateway) + agent_wire.TOKEN_PATH,
                                     headers={"authorization": f"Bearer {AGENT_API_KEY}", "origin": "https://app.example"})
    except httpx.HTTPError as err:
        tally.fail("REST call got no HTTP answer", f"agent token: {err!r}")
        return None
    if response.status_code == 503:
        return None
    if response.status_code != 200:
        tally.fail("agent token call refused an honest client", f"{response.status_code} {response.text[:200]}")
        return None
    data = response.json()
    return data["token"], data["ws_url"]


def agent_later(rng: random.Random, token: str) -> str | bytes:
    """A message after ``connected``: audio (any size, any bytes), control JSON, or a wrong one."""
    pcm = rng.randbytes(640)
    return fz.pick(rng, [  # audio is any bytes; the control messages mostly end the session
        (0.45, lambda: pcm),
        (0.25, lambda: fz.mutate_bytes(rng, pcm, [pcm[:1], pcm * 3])),
        (0.1, lambda: fz.json_message(rng, rng.choice(({"type": "ping"}, {"type": "agent_ready"},
                                                      {"type": "session_ended", "reason": "session_closed"},
                                                      {"type": "error", "code": "x", "message": "y"})))),
        (0.02, lambda: json.dumps({"token": token})),
        (0.02, lambda: fz.mutate_text(rng, "x")),
        (0.13, lambda: bytes(rng.choice(fz.INTERESTING_SIZES)) or b"\x01"),
        (0.03, lambda: "x" * rng.choice((fz.MESSAGE_CAP - 20, fz.MESSAGE_CAP + 1))),
    ])


async def agent_case(rng: random.Random, gateway, worker: int, tally: Tally) -> None:
    grant = None
    for _ in range(200):  # every session busy: the others are finishing theirs
        grant = await agent_token(gateway, tally)
        if grant is not None or tally.failures:
            break
        tally.busy_retries += 1
        await trio.sleep(0.02)
    if grant is None:
        return
    token, ws_url = grant
    url = ws_url
    if rng.random() < 0.04:
        url = rng.choice((ws_url.rsplit("/", 1)[0] + f"/{rng.randrange(100)}", ws_url + "/x", ws_url + "?token=" + token))
    first = fz.pick(rng, [
        (0.65, lambda: json.dumps({"token": token}, separators=rng.choice(((",", ":"), (", ", ": "))))),
        (0.2, lambda: fz.json_message(rng, {"token": token})),
        (0.05, lambda: fz.dumps_any(rng, {"token": token, "extra": fz.evil_value(rng)})),
        (0.06, lambda: rng.choice((token.encode(), b"", json.dumps({"token": token}).encode()))),
        (0.06, lambda: None),  # nothing: the token timeout closes it
        (0.04, lambda: json.dumps({"token": token[:-1] + ("A" if token[-1] != "A" else "B")})),
        (0.04, lambda: fz.mutate_text(rng, json.dumps({"token": token}))),
    ])
    # the wire layer is the oracle of what the gateway must do with the first message
    expect_connected = False
    if first is not None:
        try:
            events = agent_wire.AgentServer().receive(first)
            expect_connected = isinstance(events[0], agent_wire.TokenPresented) and events[0].token == token
        except RemoteProtocolError:
            pass
    tail = pick_tail(rng)

    async def body(peer: Peer, nursery) -> None:
        for _ in range(100):
            if await peer.open(nursery, url):
                break
            if peer.status != 409 or url != ws_url:
                return
            tally.busy_retries += 1  # another client holds that session (known: which endpoint a token names)
            await trio.sleep(0.03)
        else:
            tally.fail("agent: the session a token names stayed busy (409)", peer.describe())
            return
        if first is None:
            await peer.finish("silent", allowed=CLOSE_CODES["agent"], silent_deadline=TOKEN_TIMEOUT_S,
                              kind="agent: a client that sent no token was not closed (token timeout)")
            return
        if not await peer.send(first):
            return
        if not expect_connected:
            await peer.finish("silent", allowed=CLOSE_CODES["agent"], silent_deadline=0.0,
                              kind="agent: a bad first message did not close the session")
            return
        if await peer.wait_text(lambda m: m.get("type") == "connected", PROMPT_S) is None:
            if not peer.closed.is_set():
                tally.fail("agent: no connected after a valid token", peer.describe())
            return
        for _ in range(rng.randrange(1, 35)):
            if not await peer.send(agent_later(rng, token)):
                break
            if rng.random() < 0.3:
                await trio.sleep(0.02)
        await peer.finish(tail, allowed=CLOSE_CODES["agent"], silent_deadline=None)

    await with_peer(tally, "agent", f"{url.split('/api', 1)[-1][:60]} (first {show(first, 80)}, tail {tail})", body)


async def honest_agent(gateway, tally: Tally) -> None:
    """The spec's page: token, WebSocket, {"token"}, connected, then audio both ways."""
    for _ in range(100):
        grant = await agent_token(gateway, tally)
        if grant is not None:
            break
        await trio.sleep(0.05)
    else:
        tally.fail("honest agent client got no token after the fuzz", "every session busy for 5 s")
        return
    token, ws_url = grant
    before = sum(s.route.endpoints[0].stats.frames_in for n, s in gateway.routes.items() if n.startswith("agent-"))

    async def body(peer: Peer, nursery) -> None:
        if not await peer.open(nursery, ws_url):
            tally.fail("honest agent client refused after the fuzz", f"status {peer.status}")
            return
        await peer.ws.send_message(json.dumps({"token": token}))
        if await peer.wait_text(lambda m: m.get("type") == "connected", 2) is None:
            tally.fail("honest agent client not connected after the fuzz", f"{peer.texts[:3]}")
            return
        for _ in range(25):
            await peer.ws.send_message(bytes(640))
            await trio.sleep(0.02)
        heard = sum(s.route.endpoints[0].stats.frames_in for n, s in gateway.routes.items() if n.startswith("agent-"))
        if peer.binary < 10 or heard - before < 20:
            tally.fail("honest agent client: audio did not flow after the fuzz", f"{peer.binary} in, {heard - before} heard")
        await peer.ws.aclose()

    await with_peer(tally, "agent", "honest", body)


# ------------------------------------------------------------------------------ VideoSDK
async def videosdk_session(gateway, tally: Tally, body: dict | None = None) -> str | None:
    client = gateway.runtime.http_client()
    tally.requests += 1
    try:
        response = await client.post(http_base(gateway) + vsdk_sessions.SESSIONS_PATH,
                                     content=json.dumps(body or {"roomId": VSDK_ROOM}),
                                     headers={"authorization": f"Bearer {VIDEOSDK_TOKEN}", "content-type": "application/json"})
    except httpx.HTTPError as err:
        tally.fail("REST call got no HTTP answer", f"VideoSDK session: {err!r}")
        return None
    if response.status_code == 200:
        return response.json()["data"]["wsUrl"]
    if body is None or response.status_code >= 500 and response.status_code != 503:
        tally.fail("VideoSDK session call refused an honest client", f"{response.status_code} {response.text[:200]}")
    return None


def videosdk_media(rng: random.Random) -> str:
    return json.dumps({"event": "media", "payload": base64.b64encode(rng.randbytes(320)).decode()},
                      separators=(",", ":"))


def videosdk_later(rng: random.Random) -> str | bytes:
    media = {"event": "media", "payload": base64.b64encode(rng.randbytes(320)).decode()}
    topic = rng.choice(("dtmf", "chat", "t" * 128, "🎵"))
    return fz.pick(rng, [
        (0.45, lambda: videosdk_media(rng)),
        (0.1, lambda: fz.json_message(rng, media)),
        (0.05, lambda: json.dumps({"event": "media", "payload": base64.b64encode(rng.randbytes(rng.choice(
            (0, 1, 3, 319, 321, 48000)))).decode() + rng.choice(("", "=", "==", "\n", "*"))})),
        (0.1, lambda: fz.json_message(rng, {"event": rng.choice(("subscribe", "unsubscribe")), "topic": topic})),
        (0.12, lambda: fz.json_message(rng, {"event": "message", "topic": topic,
                                             "data": rng.choice(("hi", {"k": [1, 2]}, "x" * 8192, "x" * 8193))})),
        (0.02, lambda: '{"event":"stop"}'),
        (0.02, lambda: '{"event":"start"}'),
        (0.06, lambda: fz.json_message(rng, {"event": fz.evil_string(rng)[:40]})),
        (0.03, lambda: fz.mutate_bytes(rng, json.dumps(media).encode())),
        (0.03, lambda: "x" * rng.choice((fz.MESSAGE_CAP - 20, fz.MESSAGE_CAP + 1))),
    ])


async def videosdk_case(rng: random.Random, gateway, worker: int, tally: Tally) -> None:
    body = None
    if rng.random() < 0.3:  # participant fields of every valid type (bad ones are the REST fuzz's)
        body = {"roomId": VSDK_ROOM, "participant": {"id": fz.evil_string(rng)[:200] or "p",
                                                     "name": fz.evil_string(rng)[:200] or "n",
                                                     "metadata": {"m": rng.choice((fz.evil_string(rng),
                                                                                   fz.evil_number(rng), [], {}))}}}
    ws_url = None
    for _ in range(200):
        ws_url = await videosdk_session(gateway, tally, body)
        if ws_url is not None or body is not None or tally.failures:
            break
        tally.busy_retries += 1
        await trio.sleep(0.02)
    if ws_url is None:
        return
    url = ws_url
    roll = rng.random()
    if roll < 0.02:  # no ref: 401
        url = ws_url.split("?")[0]
    elif roll < 0.04:  # an unknown ref: 403
        url = ws_url[:-2] + ("AA" if not ws_url.endswith("AA") else "BB")
    elif roll < 0.05:  # the ref twice: not one ref, 401
        url = ws_url + "&ref=" + ws_url.rsplit("=", 1)[1]
    first = fz.pick(rng, [
        (0.6, lambda: rng.choice(('{"event":"start"}', '{ "event" : "start" }', '{"event":"start","x":[1]}'))),
        (0.15, lambda: fz.json_message(rng, {"event": "start"})),
        (0.05, lambda: b'{"event":"start"}'),
        (0.08, lambda: None),
        (0.06, lambda: videosdk_media(rng)),
        (0.06, lambda: fz.mutate_text(rng, '{"event":"start"}')),
    ])
    expect_started = False
    if first is not None:
        try:
            expect_started = bool(vsdk_frames.IngestServer().receive(first))
        except RemoteProtocolError:
            pass
    tail = pick_tail(rng)
    reuse = rng.random() < 0.05  # open the same wsUrl again afterwards: 410

    used = []

    async def case_body(peer: Peer, nursery) -> None:
        if not await peer.open(nursery, url):
            return
        used.append(url)
        if url != ws_url:
            tally.fail("VideoSDK: a missing, unknown or repeated ref was accepted", peer.describe())
        if first is None:
            await peer.finish("silent", allowed=CLOSE_CODES["videosdk"], silent_deadline=START_TIMEOUT_S,
                              kind="VideoSDK: a device that sent no start was not closed (start timeout)")
            return
        if not await peer.send(first):
            return
        if not expect_started:
            await peer.finish("silent", allowed=CLOSE_CODES["videosdk"], silent_deadline=0.0,
                              kind="VideoSDK: a bad first frame did not close the device")
            return
        for _ in range(rng.randrange(1, 35)):
            if not await peer.send(videosdk_later(rng)):
                break
            if rng.random() < 0.3:
                await trio.sleep(0.02)
        await peer.finish(tail, allowed=CLOSE_CODES["videosdk"], silent_deadline=None)

    await with_peer(tally, "videosdk", f"{url.split('?')[0][-10:]} (first {show(first, 80)}, tail {tail})", case_body)
    if reuse and used == [ws_url]:
        async def again(peer: Peer, nursery) -> None:
            if await peer.open(nursery, ws_url):
                tally.fail("VideoSDK: a used wsUrl was accepted again", peer.describe())
            elif peer.status not in (409, 410):
                tally.fail("VideoSDK: a used wsUrl was not refused with 410", f"{peer.status}")

        await with_peer(tally, "videosdk", "reused wsUrl", again)


async def honest_videosdk(gateway, tally: Tally) -> None:
    """A device (spec Steps 1-2): session, start, meeting-joined, media both ways."""
    ws_url = None
    for _ in range(100):
        ws_url = await videosdk_session(gateway, tally)
        if ws_url is not None:
            break
        await trio.sleep(0.05)
    if ws_url is None:
        tally.fail("honest VideoSDK device got no session after the fuzz", "")
        return
    before = sum(s.route.endpoints[0].stats.frames_in for n, s in gateway.routes.items() if n.startswith("device-"))

    async def body(peer: Peer, nursery) -> None:
        if not await peer.open(nursery, ws_url):
            tally.fail("honest VideoSDK device refused after the fuzz", f"status {peer.status}")
            return
        await peer.ws.send_message('{"event":"start"}')
        if await peer.wait_text(lambda m: m.get("event") == "meeting-joined", 2) is None:
            tally.fail("honest VideoSDK device did not join after the fuzz", f"{peer.texts[:3]}")
            return
        rng = random.Random(1)
        for _ in range(25):
            await peer.ws.send_message(videosdk_media(rng))
            await trio.sleep(0.02)
        media = sum(1 for t in peer.texts if '"media"' in t)
        heard = sum(s.route.endpoints[0].stats.frames_in for n, s in gateway.routes.items() if n.startswith("device-"))
        if media < 10 or heard - before < 20:
            tally.fail("honest VideoSDK device: audio did not flow after the fuzz", f"{media} in, {heard - before} heard")
        await peer.ws.send_message('{"event":"stop"}')
        with trio.move_on_after(PROMPT_S):
            await peer.closed.wait()

    await with_peer(tally, "videosdk", "honest", body)


# ---------------------------------------------------------------------------- the tests
ROLE_WORKERS = {"voipbin": N_CALLS, "argon": N_BOTS, "agent": N_AGENTS + 1, "videosdk": N_DEVICES + 1}


@pytest.mark.parametrize("role", ["voipbin", "argon", "agent", "videosdk"])
async def test_fuzz_listen_role(role, tmp_path, log_watch, short_deadlines, webhook_key):
    """One listen role's WebSocket (and the REST call before it), a bounded number of clients
    at a time, each with its own seeded generator: upgrades with good and bad URLs and
    tokens, first messages and later ones mutated, sessions ended by a close, an abort or
    silence; then an honest client of the role, /healthz, the routes' states and the log."""
    tally = Tally(f"{role} listen role")
    case, honest = globals()[f"{role}_case"], globals()[f"honest_{role}"]

    async def fuzz(gateway) -> None:
        async def worker(i: int) -> None:
            rng = random.Random(f"{SEED}:{role}:{i}")
            while tally.budget_left(ITERATIONS):
                await case(rng, gateway, i, tally)

        await workers(ROLE_WORKERS[role], worker)
        await trio.sleep(0.3)  # let the last sessions end
        await honest(gateway, tally)
        await healthz(gateway, tally)
        check_end_state(gateway, tally, log_watch, role)

    await run_fuzz(tmp_path, webhook_key[0], tally, fuzz)
    assert_clean(tally)


async def run_fuzz(tmp_path, pem_path, tally: Tally, fuzz) -> None:
    """Run `fuzz(gateway)` against a fuzz gateway; a crash of the gateway (a server's or a
    route supervisor's nursery raising) ends the fuzz and is reported with the tally."""
    crashed: list[BaseException] = []
    down_at = [math.inf]  # the last moment the gateway was seen whole
    async with trio.open_nursery() as outer:
        async def serve(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
            try:
                async with trio.open_nursery() as inner:
                    tally.gateway_down = lambda: inner.cancel_scope.cancel_called and not outer.cancel_scope.cancel_called
                    task_status.started(await start_fuzz_gateway(inner, tmp_path, pem_path))
                    while not inner.cancel_scope.cancel_called:  # how long a crash took to unwind
                        down_at[0] = time.monotonic()
                        await trio.sleep(0.05)
            except* Exception as group:
                crashed.append(group)
                outer.cancel_scope.cancel()

        gateway = await outer.start(serve)
        await fuzz(gateway)
        outer.cancel_scope.cancel()
    if crashed:
        tally.forget_since(down_at[0] - 1.0)  # what the crash's own unwinding caused
    for group in crashed:
        import traceback

        leaf = group
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        trace = "".join(traceback.format_exception(leaf))[-1200:]
        tally.fail("the gateway crashed (its process would be dead)",
                   f"{type(leaf).__name__}: {leaf}; last connections: {' || '.join(tally.recent)}\n{trace}"
                   f"\n({tally.after_crash} failures after the crash not reported)")


# ---------------------------------------------------------------------------------- REST
@attrs.frozen
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


class RawHttp:
    """An HTTP/1.1 client that sends whatever bytes it is given (httpx and h11 refuse to send
    malformed requests) over one keep-alive connection, reconnecting when the server closes."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stream: trio.SocketStream | None = None
        self.buf = b""

    async def close(self) -> None:
        if self.stream is not None:
            with trio.CancelScope(shield=True):
                await self.stream.aclose()
        self.stream, self.buf = None, b""

    async def _send(self, request: bytes) -> None:
        try:
            await self.stream.send_all(request)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        if not data:
            return False
        self.buf += data
        return True

    async def exchange(self, request: bytes, *, head: bool = False) -> Answer | None:
        """Send one request, read its answer; None when the server closed without one. A
        streaming answer (server-sent events) is cut after its headers (the connection too)."""
        if self.stream is None:
            self.stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        try:
            async with trio.open_nursery() as nursery:
                # send while reading: a server may answer (413) and close before the body is in
                nursery.start_soon(self._send, request)
                answer = await self._read(head)
            return answer
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self.close()
            return None

    async def _read(self, head: bool) -> Answer | None:
        while b"\r\n\r\n" not in self.buf:
            if not await self._fill():
                await self.close()
                return None
        head_bytes, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head_bytes.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if head or status in (204, 304) or status < 200:
            body = b""
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            await self.close()  # a stream (SSE): we have its status and headers
            return Answer(status, headers, b"")
        elif "content-length" in headers:
            n = int(headers["content-length"])
            while len(self.buf) < n:
                if not await self._fill():
                    break
            body, self.buf = self.buf[:n], self.buf[n:]
        else:
            while await self._fill():
                pass
            body, self.buf = self.buf, b""
            await self.close()
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return Answer(status, headers, body)


def http_request(method: str, target: str, headers: list[tuple[str, str]], body: bytes = b"", *,
                 length: int | None = None) -> bytes:
    """A request's bytes (header values may hold anything the fuzz wants to try)."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body or method in ("POST", "PUT", "DELETE", "PATCH") or length is not None:
        lines.append(f"Content-Length: {len(body) if length is None else length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogatepass") + body


def header_value(rng: random.Random, valid: str) -> str:
    """`valid`, or a header value the server must read safely (no CR/LF: that would be
    another request, which the raw-HTTP cases try on purpose)."""
    roll = rng.random()
    if roll < 0.6:
        return valid
    value = fz.pick(rng, [(0.5, lambda: fz.mutate_text(rng, valid, cap=3000)), (0.5, lambda: fz.evil_string(rng))])
    return re.sub(r"[\r\n]", "", value)[:6000]


def json_body(rng: random.Random, valid: Any, *, cap: int = 2**20 + 10) -> bytes:
    """A request body: the valid JSON, a mutation of it, raw malformed JSON, deep nesting,
    huge strings (over and under the body limits), or bytes that are not UTF-8."""
    return fz.pick(rng, [
        (0.25, lambda: json.dumps(valid).encode()),
        (0.45, lambda: fz.json_message(rng, valid, cap=cap).encode("utf-8", "surrogatepass")),
        (0.08, lambda: fz.mutate_bytes(rng, json.dumps(valid).encode(), cap=cap)),
        (0.07, lambda: json.dumps({**valid, "pad": "x" * rng.choice((60_000, 70_000, 2**20))}).encode()
                       if isinstance(valid, dict) else b"[]"),
        (0.05, lambda: ("[" * rng.choice((100_000, 600_000)) + "]" * 10).encode()),
        (0.05, lambda: rng.choice((b"", b"\xff\xfe{", b"\xef\xbb\xbf{}", b"\x00" * 100, b"a=1&b=2"))),
        (0.05, lambda: ('{"a":' * 3000 + "1" + "}" * 3000).encode()),
    ])


@attrs.frozen
class RestEndpoint:
    """One REST endpoint of the gateway and how to make a request to it."""

    name: str
    method: str
    make: Callable[[random.Random], tuple[str, str, list[tuple[str, str]], bytes]]
    """rng → (method, target, headers, body)."""
    ok_5xx: tuple[int, ...] = ()
    """5xx statuses that are the endpoint's documented answer (503 with Retry-After)."""
    raw: bool = False
    """The request is havoc on a whole request's bytes, sent on a connection of its own."""


def _argon_auth(rng: random.Random) -> list[tuple[str, str]]:
    value = fz.pick(rng, [(0.7, lambda: f"Bot {BOT_TOKEN}"), (0.1, lambda: f"Bearer {BOT_TOKEN}"),
                          (0.1, lambda: header_value(rng, f"Bot {BOT_TOKEN}")), (0.1, lambda: None)])
    return [("Authorization", value)] if value is not None else []


def _prefix(rng: random.Random) -> str:
    return rng.choice(argon_prefixes())


def argon_prefixes() -> tuple[str, ...]:
    from gateway.adapters.argon.listen import API_PREFIXES

    return API_PREFIXES


def _ct(rng: random.Random) -> list[tuple[str, str]]:
    return [("Content-Type", rng.choice(("application/json", "application/json; charset=utf-8", "text/plain",
                                        header_value(rng, "application/json"))))] if rng.random() < 0.8 else []


def _query(rng: random.Random, valid: dict[str, str]) -> str:
    params = [(k, header_value(rng, v)) for k, v in valid.items() if rng.random() < 0.9]
    if rng.random() < 0.1:
        params.append((fz.evil_string(rng)[:30], fz.evil_string(rng)[:100]))
    query = "&".join(f"{quote(k.encode('utf-8', 'surrogatepass'), safe='')}="
                     f"{quote(v.encode('utf-8', 'surrogatepass'), safe='')}" for k, v in params)
    if rng.random() < 0.05:
        query += rng.choice(("&%zz", "&a=%E0%A4", "&&", "&=", "&a=%00"))
    return "?" + query if query else ""


def _path_variant(rng: random.Random, path: str) -> str:
    if rng.random() < 0.93:
        return path
    return rng.choice((path + "/", path.upper(), path + "%00", path.replace("/", "//", 1), path + "/..",
                       path + "/" + quote(fz.evil_string(rng)[:40].encode("utf-8", "surrogatepass"), safe=""), path + ";x"))


def rest_endpoints(webhook_private) -> dict[str, list[RestEndpoint]]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    from gateway.adapters.argon.wire import (
        CALLS_ACCEPT_PATH,
        CALLS_REJECT_PATH,
        EVENTS_PATH,
        GET_ME_PATH,
        STREAM_TOKEN_PATH,
    )

    def stream_token(rng):
        body = json_body(rng, {"spaceId": SPACE, "channelId": rng.choice((CHANNEL, "11111111-1111-1111-1111-111111111111"))})
        return "POST", _path_variant(rng, _prefix(rng) + STREAM_TOKEN_PATH), _argon_auth(rng) + _ct(rng), body

    def events(rng):
        headers = _argon_auth(rng)
        if rng.random() < 0.3:
            headers.append(("Last-Event-ID", header_value(rng, rng.choice(("1", "0", "999999999", "-1", "abc")))))
        query = _query(rng, {"intents": rng.choice(("2048", "4096", "6144", "0", "-1", "2147483648", "1e3", "99999999999999999999"))})
        return "GET", _path_variant(rng, _prefix(rng) + EVENTS_PATH) + query, headers, b""

    def calls(path):
        def make(rng):
            body = json_body(rng, {"callId": rng.choice((str(__import__("uuid").uuid4()), "x")), "reason": "busy"})
            return "POST", _path_variant(rng, _prefix(rng) + path), _argon_auth(rng) + _ct(rng), body
        return make

    def get_me(rng):
        return "GET", _path_variant(rng, _prefix(rng) + GET_ME_PATH) + (_query(rng, {"x": "1"}) if rng.random() < 0.1 else ""), \
            _argon_auth(rng), b""

    def agent_headers(rng):
        headers = []
        auth = fz.pick(rng, [(0.6, lambda: f"Bearer {AGENT_API_KEY}"), (0.15, lambda: header_value(rng, f"Bearer {AGENT_API_KEY}")),
                             (0.1, lambda: AGENT_API_KEY), (0.15, lambda: None)])
        if auth is not None:
            headers.append(("Authorization", auth))
        if rng.random() < 0.7:
            headers.append(("Origin", rng.choice(("https://app.example", "https://evil.example", "null",
                                                  header_value(rng, "https://app.example")))))
        return headers

    def agent_token_call(rng):
        body = json_body(rng, {}) if rng.random() < 0.3 else b""
        return "POST", _path_variant(rng, agent_wire.TOKEN_PATH), agent_headers(rng) + _ct(rng), body

    def agent_preflight(rng):
        headers = agent_headers(rng)
        headers.append(("Access-Control-Request-Method", header_value(rng, "POST")))
        headers.append(("Access-Control-Request-Headers", header_value(rng, "authorization, content-type")))
        return "OPTIONS", _path_variant(rng, agent_wire.TOKEN_PATH), headers, b""

    def sessions(rng):
        valid = {"roomId": rng.choice((VSDK_ROOM, "nope")), "participant": {"id": "p1", "name": "Pat", "metadata": {"a": 1}},
                 "agent": {"id": "a1", "metadata": {}}, "region": "us002"}
        if rng.random() < 0.5:
            valid = {"roomId": valid["roomId"]}
        auth = fz.pick(rng, [(0.6, lambda: f"Bearer {VIDEOSDK_TOKEN}"), (0.1, lambda: VIDEOSDK_TOKEN),
                             (0.15, lambda: header_value(rng, f"Bearer {VIDEOSDK_TOKEN}")), (0.15, lambda: None)])
        headers = [("Authorization", auth)] if auth is not None else []
        return "POST", _path_variant(rng, vsdk_sessions.SESSIONS_PATH), headers + _ct(rng), json_body(rng, valid)

    def webhook(rng):
        body = vsdk_webhooks.webhook_body(rng.choice(("call-started", "call-answered", "call-hangup", "x")),
                                      rng.choice(("c-1", str(__import__("uuid").uuid4()))))
        if rng.random() < 0.5:
            body = json_body(rng, json.loads(body))
        # vsdk_webhooks.sign_webhook's signature, with the key loaded once (loading costs 60 ms)
        signature = base64.b64encode(webhook_private.sign(body, padding.PKCS1v15(), hashes.SHA256())).decode()
        value = fz.pick(rng, [(0.5, lambda: signature), (0.2, lambda: header_value(rng, signature)),
                              (0.1, lambda: base64.b64encode(rng.randbytes(rng.choice((0, 1, 256, 512)))).decode()),
                              (0.2, lambda: None)])
        headers = [("videosdk-signature", value)] if value is not None else []
        return "POST", _path_variant(rng, "/webhooks/videosdk"), headers + _ct(rng), body

    def control_auth(rng, read: bool = False):
        value = fz.pick(rng, [(0.2 if read else 0.6, lambda: f"Bearer {CONTROL_TOKEN}"),
                              (0.15, lambda: header_value(rng, f"Bearer {CONTROL_TOKEN}")),
                              (0.05, lambda: f"bearer  {CONTROL_TOKEN} "), (0.2, lambda: None)])
        return [("Authorization", value)] if value is not None else []

    def probe(path):
        def make(rng):
            return "GET", _path_variant(rng, path) + (_query(rng, {"x": "1"}) if rng.random() < 0.2 else ""), \
                control_auth(rng, read=True), b""
        return make

    def route_name(rng):
        return fz.pick(rng, [(0.5, lambda: rng.choice(("call-0", "channel", "agent-0", "device-0", "nope"))),
                             (0.5, lambda: quote(fz.evil_string(rng)[:200].encode("utf-8", "surrogatepass"), safe=""))])

    def get_route(rng):
        return "GET", "/v1/routes/" + route_name(rng), control_auth(rng, read=True), b""

    def add_route(rng):
        n = rng.randrange(10**9)
        valid = rng.choice((
            {"name": f"fz-{n}", "endpoints": [{"file": {"path": str(DEFAULT_AUDIO), "rate": 8000, "loop": True}},
                                              {"voipbin": {"role": "listen", "call_id": f"fz-api-{n}", "encapsulation": "sln"}}]},
            {"name": f"fz-{n}", "endpoints": [{"videosdk": {"role": "listen", "room_id": f"fz-api-{n}"}},
                                              {"file": {"path": str(DEFAULT_AUDIO), "rate": 8000}}],
             "jitter_ms": 40},
            {"name": f"fz-{n}", "endpoints": [{"agent": {"role": "listen"}}, {"file": {"path": str(DEFAULT_AUDIO)}}]},
        ))
        body = json_body(rng, valid)
        # never a `record` endpoint: a mutated path could be anywhere on this machine
        body = re.sub(rb'"record"', b'"recordx"', body)
        return "POST", _path_variant(rng, "/v1/routes"), control_auth(rng) + _ct(rng), body

    def delete_route(rng):
        name = route_name(rng) if rng.random() < 0.5 else f"fz-{rng.randrange(10**9)}"
        if name in ("call-0", "channel", "agent-0", "device-0"):
            name = "nope"  # the fuzz gateway keeps its listen routes
        return "DELETE", "/v1/routes/" + name, control_auth(rng), b""

    def reload(rng):
        auth = control_auth(rng)
        if auth and auth[0][1] == f"Bearer {CONTROL_TOKEN}" and rng.random() < 0.9:
            auth = []  # a real reload re-reads and re-builds the whole file: keep them few
        return "POST", _path_variant(rng, "/v1/reload"), auth + _ct(rng), json_body(rng, {}) if rng.random() < 0.3 else b""

    def unknown(rng):
        method = rng.choice(("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "CONNECT", "FOO", "get"))
        path = rng.choice(("/", "/v1", "/v1/routes", "/healthz", "/IVoice/v1/StreamToken", "/api/bot", "/v2/ingest/sessions",
                           "/%2e%2e/%2e%2e/etc/passwd", "/" + quote(fz.evil_string(rng)[:100].encode("utf-8", "surrogatepass"), safe="")))
        target = path if method != "CONNECT" else "127.0.0.1:80"
        return method, target, _ct(rng), json_body(rng, {}) if rng.random() < 0.3 else b""

    def malformed(rng):
        method, target, headers, body = rng.choice((stream_token, events, get_me, sessions, add_route))(rng)
        return method, target, headers, body

    argon = [RestEndpoint("malformed HTTP", "*", malformed, raw=True),
             RestEndpoint("StreamToken", "POST", stream_token), RestEndpoint("events", "GET", events),
             RestEndpoint("Calls Accept", "POST", calls(CALLS_ACCEPT_PATH)), RestEndpoint("Calls Reject", "POST", calls(CALLS_REJECT_PATH)),
             RestEndpoint("GetMe", "GET", get_me)]
    services = [RestEndpoint("agent token", "POST", agent_token_call, ok_5xx=(503,)),
                RestEndpoint("agent preflight", "OPTIONS", agent_preflight),
                RestEndpoint("VideoSDK sessions", "POST", sessions, ok_5xx=(503,)),
                RestEndpoint("VideoSDK webhooks", "POST", webhook)]
    control = [RestEndpoint("/healthz", "GET", probe("/healthz")), RestEndpoint("/readyz", "GET", probe("/readyz"), ok_5xx=(503,)),
               RestEndpoint("/metrics", "GET", probe("/metrics")), RestEndpoint("/v1/routes", "GET", probe("/v1/routes")),
               RestEndpoint("/v1/routes/{name}", "GET", get_route), RestEndpoint("POST /v1/routes", "POST", add_route),
               RestEndpoint("DELETE /v1/routes/{name}", "DELETE", delete_route), RestEndpoint("/v1/reload", "POST", reload),
               RestEndpoint("unknown paths and methods", "*", unknown)]
    return {"argon": argon, "services": services, "control": control}


async def rest_case(rng: random.Random, client: RawHttp, endpoint: RestEndpoint, tally: Tally, created: set[str],
                    stats: collections.Counter) -> None:
    method, target, headers, body = endpoint.make(rng)
    request = http_request(method, target, headers, body)
    tally.inputs += 1
    tally.requests += 1
    stats[endpoint.name] += 1
    what = f"{endpoint.name}: {method} {target[:120]!r} headers {[(k, v[:60]) for k, v in headers]} body {show(body, 100)}"
    if endpoint.raw:
        await malformed_case(rng, client.port, request, tally)
        return
    try:
        with trio.fail_after(10):
            answer = await client.exchange(request, head=method == "HEAD")
    except trio.TooSlowError:
        tally.fail("REST request got no answer within 10 s", what)
        await client.close()
        return
    if answer is None:
        if len(request) < 2**20:  # hypercorn may close on a body over its limit without answering
            tally.fail("REST request: connection closed without an answer", what)
        return
    tally.refused[answer.status] += 1
    for secret in ALL_SECRETS:
        if secret.encode() in answer.body or any(secret in v for v in answer.headers.values()):
            tally.fail("REST: a secret in an answer", f"{what} → {answer.body[:300]!r}")
    if answer.status >= 500 and not (answer.status in endpoint.ok_5xx and
                                     ("retry-after" in answer.headers or endpoint.name == "/readyz")):
        tally.fail(f"REST {endpoint.name} answered {answer.status}", f"{what} → {answer.body[:300]!r}")
    if endpoint.name == "POST /v1/routes" and answer.status == 201:
        try:
            name = json.loads(answer.body)["name"]
        except (ValueError, KeyError, TypeError):
            tally.fail("POST /v1/routes: a 201 without the route's name", f"{what} → {answer.body[:200]!r}")
            return
        created.add(name)
        # the route goes again at once: the fuzz gateway keeps only its own routes
        delete = http_request("DELETE", "/v1/routes/" + quote(name.encode("utf-8", "surrogatepass"), safe=""),
                              [("Authorization", f"Bearer {CONTROL_TOKEN}")])
        with trio.fail_after(10):
            gone = await client.exchange(delete)
        if gone is None or gone.status != 200:
            tally.fail("DELETE of a route the fuzz added failed", f"{name!r}: {gone and gone.status} {gone and gone.body[:200]!r}")


async def malformed_case(rng: random.Random, port: int, request: bytes, tally: Tally) -> None:
    """Havoc on a whole request's bytes (request line, header names and values, framing,
    CR/LF), then a blank line so the head ends: the server answers (a 4xx) or closes, within
    the body timeout when the mutated framing promises more body than comes."""
    head, _, body = request.partition(b"\r\n\r\n")
    head = fz.mutate_bytes(rng, head, [head], cap=20_000)
    if rng.random() < 0.2:
        head += rng.choice((b"\r\nX-Injected: 1\r\n\r\nGET / HTTP/1.1", b"\r\nTransfer-Encoding: chunked",
                            b"\r\nContent-Length: 5\r\nContent-Length: 7", b"\r\nContent-Length: -1",
                            b"\r\n: empty name", b"\r\n folded: line", b"\nLF-only: 1"))
    data = head + b"\r\n\r\n" + (body[: rng.randrange(len(body) + 1)] if rng.random() < 0.15 else body)
    read_s = HTTP_BODY_S + PROMPT_S
    got, closed_after = await raw_exchange(port, [data], read_s=read_s, until_close=False)
    what = f"malformed HTTP: {show(data, 200)} → {got[:100]!r}"
    if not whole_answer(got) and closed_after is None:
        tally.fail("a malformed HTTP request got neither an answer nor a close", f"{what} ({read_s:.1f} s)")
        return
    if got.startswith(b"HTTP/1."):
        try:
            status = int(got.split(b" ", 2)[1])
        except (ValueError, IndexError):
            tally.fail("REST: a malformed status line", what)
            return
        tally.refused[status] += 1
        if status >= 500 and not (status == 503 and b"retry-after" in got.lower()):
            tally.fail(f"REST: a malformed request answered {status}", what)


async def http_stalls(port: int, tally: Tally) -> None:
    """Clients that stop half way: the REST socket must not keep them (slowloris)."""
    cases = [
        ("a request head cut short", b"POST /v1/routes HTTP/1.1\r\nHost: x\r\nContent-Le", HTTP_IDLE_S),
        ("a connection that sends nothing", b"", HTTP_IDLE_S),
        ("a body that never arrives in full",
         b"POST /v1/routes HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"name\"", HTTP_BODY_S),
        ("a chunked body that never ends",
         b"POST /api/v1/sdk/token HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n", HTTP_BODY_S),
    ]

    async def one(name: str, data: bytes, deadline: float) -> None:
        tally.inputs += 1
        got, closed_after = await raw_exchange(port, [data] if data else [], read_s=deadline + SLACK_S)
        if closed_after is None:
            tally.fail("REST: a stalled client was kept past the deadline", f"{name}: open {deadline + SLACK_S:.1f} s, got {got[:80]!r}")
        elif got.startswith(b"HTTP/1.") and got[9:10] == b"5":
            tally.fail("REST: a stalled client got a 5xx", f"{name}: {got[:120]!r}")

    async with trio.open_nursery() as nursery:
        for case in cases:
            nursery.start_soon(one, *case)


@pytest.mark.parametrize("group", ["argon", "services", "control"])
async def test_fuzz_rest(group, tmp_path, log_watch, short_deadlines, webhook_key):
    """Every REST endpoint of a group, authenticated and not, a few thousand requests each."""
    tally = Tally(f"REST {group}")
    endpoints = rest_endpoints(webhook_key[1])[group]
    created: set[str] = set()
    stats: collections.Counter = collections.Counter()
    # a route the fuzz added and deleted may log its own failure (a mutated config whose
    # file does not play, a dial endpoint refused): that is the route's error, not the gateway's
    log_watch.allowed_errors.append(lambda r: getattr(r, "route", None) in created and "route failed" in r.getMessage())
    per_endpoint = ITERATIONS

    async def fuzz(gateway) -> None:
        async def worker(i: int) -> None:
            rng = random.Random(f"{SEED}:rest:{group}:{i}")
            client = RawHttp(gateway.runtime.http.port)
            try:
                while tally.budget_left(per_endpoint * len(endpoints)):
                    endpoint = rng.choice(endpoints)
                    # a scrape renders every route's metrics in a thread (50 ms here): fewer of them
                    if stats[endpoint.name] >= per_endpoint or (endpoint.name == "/metrics" and stats[endpoint.name] >= per_endpoint // 30):
                        if all(stats[e.name] >= per_endpoint for e in endpoints if e.name != "/metrics"):
                            break
                        continue
                    await rest_case(rng, client, endpoint, tally, created, stats)
            finally:
                await client.close()

        async with trio.open_nursery() as nursery:
            if group == "argon":
                nursery.start_soon(http_stalls, gateway.runtime.http.port, tally)
            await workers(4, worker)
        await healthz(gateway, tally)
        check_end_state(gateway, tally, log_watch, None)
        for name in created:
            if name in gateway.routes:
                tally.fail("a route the fuzz added is still there", name)

    await run_fuzz(tmp_path, webhook_key[0], tally, fuzz)
    print("per endpoint:", dict(stats))
    assert_clean(tally)


# ------------------------------------------------------------------------------ sans-IO
# h11's invariant, checked on the wire layers directly (no sockets: many more inputs per
# second): every input is accepted, or refused with the error the layer documents; anything
# else is a bug. These are the parsers the listen roles call, plus their dial-side twins.
WIRE_INPUTS = ITERATIONS * 2


def _wire_voipbin(rng: random.Random, check) -> None:
    enc = rng.choice(list(Encapsulation))
    codec = rng.choice(list(Codec))
    proto = MediaStreamProtocol(enc, codec)
    valid = voipbin_valid(rng, enc, rng.choice((Codec.ULAW, Codec.SLIN)) if enc is not Encapsulation.SLN else Codec.SLIN, 8)
    for message in valid[: rng.randrange(0, 4)] + [fz.mutate_bytes(rng, m, valid) for m in valid[:3]] + \
            [fz.mutate_text(rng, "x"), fz.mutate_bytes(rng, b"", valid)]:
        with check(message, RemoteProtocolError, codes={1002, 1003, 1007, 1008, 1009}):
            proto.receive(message)


def _wire_agent(rng: random.Random, check) -> None:
    token = "t" * rng.randrange(1, 60)
    server = agent_wire.AgentServer()
    first = fz.pick(rng, [(0.5, lambda: fz.json_message(rng, {"token": token})), (0.3, lambda: json.dumps({"token": token})),
                          (0.2, lambda: fz.mutate_bytes(rng, b'{"token":"x"}'))])
    with check(first, RemoteProtocolError, codes={1002, 1007, 1008, 1009}):
        events = server.receive(first)
        if events and isinstance(events[0], agent_wire.TokenPresented):
            server.accept()
            for _ in range(5):
                message = agent_later(rng, token)
                with check(message, RemoteProtocolError, codes={1002, 1007, 1008, 1009}):
                    server.receive(message)
    client = agent_wire.AgentClient(token)
    client.start()
    for _ in range(4):
        message = fz.pick(rng, [(0.6, lambda: fz.json_message(rng, rng.choice((
            {"type": "connected"}, {"type": "agent_ready"}, {"type": "session_ended", "reason": "session_closed"},
            {"type": "error", "code": 4, "message": "m"})))), (0.4, lambda: fz.mutate_bytes(rng, bytes(640)))])
        with check(message, RemoteProtocolError, codes={1002, 1007, 1008, 1009}):
            client.receive(message)
    body = json_body(rng, {"token": token, "ws_url": "ws://127.0.0.1:1/x"}, cap=70_000)
    with check(body, GatewayError):
        agent_wire.parse_token_response(rng.choice((200, 201, 400, 401, 429, 500)), body, api_url="http://127.0.0.1:1",
                                        retry_after=rng.choice((None, "5", "-1", "abc", "9" * 400)))


def _wire_videosdk(rng: random.Random, check) -> None:
    server = vsdk_frames.IngestServer()
    messages = [rng.choice(('{"event":"start"}', fz.json_message(rng, {"event": "start"})))] + \
        [videosdk_later(rng) for _ in range(6)]
    for message in messages:
        with check(message, RemoteProtocolError, codes={1002, 1003, 1007, 1008, 1009}):
            for event in server.receive(message):
                if isinstance(event, vsdk_frames.Publish):
                    server.deliver(event.topic, event.data, {"senderId": "s"})
    client = vsdk_frames.IngestClient()
    client.start()
    for _ in range(4):
        message = fz.json_message(rng, rng.choice(({"event": "media", "payload": "AAAA"}, {"event": "meeting-joined", "roomId": "r"},
                                                   {"event": "message", "topic": "t", "data": {"message": "m", "senderId": "s"}},
                                                   {"event": "participant-joined", "participant": {"id": "p"}})))
        with check(message, RemoteProtocolError, codes={1002, 1003, 1007, 1008, 1009}):
            client.receive(message)
    body = json_body(rng, {"roomId": "r", "participant": {"id": "p", "name": "n", "metadata": {}}}, cap=70_000)
    with check(body, vsdk_sessions.SessionRequestError):
        vsdk_sessions.parse_session_request(body)
    response = json_body(rng, {"message": "Ingest session created", "data": {"wsUrl": "ws://h/videosdk?ref=x",
                                                                                "callId": "c", "expiresIn": 90}}, cap=70_000)
    with check(response, GatewayError):
        vsdk_sessions.parse_session_response(rng.choice((200, 400, 401, 429, 503)), response, room_id="r")
    target = fz.mutate_text(rng, "/videosdk?ref=abc&x=1", cap=3000)
    with check(target, ()):
        vsdk_sessions.parse_ingest_ref(target)
    with check(target, ()):
        vsdk_sessions.parse_authorization(fz.mutate_text(rng, "Bearer abc", cap=300))


def _wire_argon(rng: random.Random, check) -> None:
    identity = "bot"
    token = evil_token(rng, identity) if rng.random() < 0.7 else room_token(identity)
    with check(token, argon_wire.TokenError):
        argon_wire.verify_room_token(JWT_SECRET, token, now=time.time(), issuer="gateway")
    with check(token, argon_wire.TokenError):
        argon_wire.verify_stream_token(JWT_SECRET, token, now=time.time())
    target = argon_target(rng, rng.choice(ARGON_PATHS), token) if rng.random() < 0.7 else \
        fz.mutate_text(rng, "/audio/duplex?token=x&target_identity=y", cap=3000)
    auth = rng.choice((None, f"Bearer {token}", fz.mutate_text(rng, "Bearer x", cap=200)))
    with check(target, argon_wire.AudioRefusal):
        argon_wire.parse_audio_request(target, auth)
    with check(target, RemoteProtocolError):
        argon_wire.parse_ingress_target(target)
    packet = fz.mutate_bytes(rng, rng.choice(fz.opus_corpus()), fz.opus_corpus(), cap=5000)
    with check(packet, RemoteProtocolError, codes={1007, 1009}):
        argon_wire.validate_opus_packet(packet, channels=rng.choice((None, 1, 2)),
                                        frame_duration_ms=rng.choice((None, 10, 20, 40, 60)))
    status = fz.json_message(rng, {"status": "ready", "session_id": "AWS_1"})
    with check(status, RemoteProtocolError, codes={1007, 1009}):
        argon_wire.parse_status_message(status)
    body = json_body(rng, {"token": token, "ingressUrl": "ws://127.0.0.1:1", "roomName": "s/c"}, cap=70_000)
    with check(body, GatewayError):
        argon_wire.parse_stream_token_response(rng.choice((200, 400, 401, 403, 404, 429, 500)), body,
                                               space_id="s", channel_id="c")
    with check(body, GatewayError):
        argon_wire.parse_accept_response(rng.choice((200, 404, 409, 429)), body, call_id="c")
    with check(body, GatewayError):
        argon_wire.parse_get_me_response(rng.choice((200, 401, 429)), body)


def _wire_ogg(rng: random.Random, check) -> None:
    stream = fz.ogg_stream(rng, [rng.choice(fz.opus_corpus()[:12]) for _ in range(rng.randrange(1, 12))])
    stream = fz.mutate_bytes(rng, stream, [stream], cap=fz.MESSAGE_CAP)
    demuxer = OggOpusDemuxer()
    for chunk in fz.split(rng, stream, rng.randrange(1, 8)):
        with check(chunk, RemoteProtocolError, codes={1007, 1009}):
            demuxer.feed(chunk)


@pytest.mark.parametrize("wire", ["voipbin", "agent", "videosdk", "argon", "ogg"])
def test_fuzz_wire(wire):
    """Each wire layer on its own: accepted, or refused with its documented error and a close
    code of its protocol; never any other exception."""
    rng = random.Random(f"{SEED}:wire:{wire}")
    bugs: dict[str, list[str]] = {}
    started = time.monotonic()
    count = 0

    class Check:
        def __init__(self, given, allowed, codes=None) -> None:
            self.given, self.allowed, self.codes = given, allowed, codes

        def __enter__(self):
            nonlocal count
            count += 1

        def __exit__(self, kind, err, tb) -> bool:
            if err is None:
                return False
            if isinstance(err, self.allowed or ()):
                code = getattr(err, "close_code", None)
                if self.codes is not None and isinstance(err, RemoteProtocolError) and code not in self.codes:
                    bugs.setdefault(f"close code {code}", []).append(f"{show(self.given)}: {err}")
                return True
            import traceback

            where = traceback.extract_tb(tb)[-1]
            bugs.setdefault(f"{type(err).__name__} at {where.filename.rsplit('/', 1)[-1]}:{where.lineno}", []).append(
                f"{show(self.given)}: {err!r}")
            return True

    make = globals()[f"_wire_{wire}"]
    while count < WIRE_INPUTS and time.monotonic() - started < TIME_CAP:
        make(rng, Check)
    print(f"{wire} wire: {count} inputs in {time.monotonic() - started:.1f} s")
    if bugs:
        pytest.fail(f"wire fuzz {REPRO}:\n" + "\n".join(f"  {k} ({len(v)}x), e.g. {v[0][:300]}" for k, v in bugs.items()),
                    pytrace=False)


def test_huge_numeric_claim_is_a_refused_token():
    """Regression (found by this fuzz): a JSON integer beyond any float (``exp`` of 1 and 400
    zeros) raised OverflowError in the Argon token checks, so the audio upgrade of an
    unauthenticated client crashed its handler instead of answering 401."""
    for claim in ("exp", "nbf", "iat"):
        claims = {"iss": "gateway", "sub": "bot", "exp": int(time.time()) + 60, "video": {"room": ROOM, "roomJoin": True}}
        claims[claim] = 10**400
        token = jwt.encode(claims, JWT_SECRET, algorithm="HS256")
        with pytest.raises(argon_wire.TokenError) as refused:
            argon_wire.verify_room_token(JWT_SECRET, token, now=time.time(), issuer="gateway")
        assert refused.value.status == 401 and "not a number" in str(refused.value)
        with pytest.raises(argon_wire.TokenError):
            argon_wire.verify_stream_token(JWT_SECRET, token, now=time.time())


# ------------------------------------------------------------------ media socket, raw
def upgrade_request(rng: random.Random, target: str, extra: list[tuple[str, str]] = ()) -> bytes:
    """An opening handshake (RFC 6455 §4.1), sometimes mutated at the byte level."""
    headers = [("Host", "127.0.0.1"), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
               ("Sec-WebSocket-Key", base64.b64encode(rng.randbytes(16)).decode()), ("Sec-WebSocket-Version", "13"),
               *extra]
    text = f"GET {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return text.encode("utf-8", "surrogatepass")


def ws_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0) -> bytes:
    """One WebSocket frame (RFC 6455 §5.2) as a client sends it (masked unless told)."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    n = len(payload)
    length = bytes([n | (0x80 if mask else 0)]) if n < 126 else \
        bytes([126 | (0x80 if mask else 0)]) + n.to_bytes(2, "big") if n < 2**16 else \
        bytes([127 | (0x80 if mask else 0)]) + n.to_bytes(8, "big")
    if not mask:
        return head + length + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if n < 4096 else \
        (np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(key, np.uint8), n)).tobytes()
    return head + length + key + masked


def bad_frames(rng: random.Random, valid_payload: bytes) -> list[bytes]:
    """Frames a WebSocket server must refuse (RFC 6455 §5, §7.4), after valid ones."""
    bad = rng.choice((
        ws_frame(0x1, b"\xff\xfe invalid UTF-8"),  # 1007
        ws_frame(0x2, valid_payload, mask=False),  # unmasked client frame: 1002
        ws_frame(0x3, b"reserved opcode"),  # 1002
        ws_frame(0x2, valid_payload, rsv=rng.choice((1, 2, 4))),  # reserved bits without an extension
        ws_frame(0x9, bytes(126)),  # control frame over 125 bytes
        ws_frame(0x9, b"fragmented ping", fin=False),
        ws_frame(0x8, (999).to_bytes(2, "big")),  # close with a code that may not be sent
        ws_frame(0x8, b"\x03"),  # close with a 1-byte payload
        ws_frame(0x0, b"continuation without a start"),
        ws_frame(0x2, valid_payload, fin=False) + ws_frame(0x1, b"new message inside a fragmented one"),
        fz.mutate_bytes(rng, ws_frame(0x2, valid_payload)),
    ))
    frames = [ws_frame(0x2, valid_payload) for _ in range(rng.randrange(0, 3))] + [bad]
    if rng.random() < 0.3:  # and a message over the 64 KiB cap while the server is closing
        frames.append(ws_frame(0x2, bytes(2**16 + rng.choice((1, 100)))))
    return frames


def whole_answer(got: bytes) -> bool:
    """`got` holds a whole HTTP response (headers, and the body its Content-Length says)."""
    head, sep, body = got.partition(b"\r\n\r\n")
    if not sep:
        return False
    found = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return len(body) >= int(found.group(1)) if found else True


async def raw_exchange(port: int, data: list[bytes], *, read_s: float, until_close: bool = True,
                       then: list[bytes] = (), then_read_s: float = 0.0) -> tuple[bytes, float | None]:
    """Send `data` (one chunk at a time), read for up to `read_s`: (what came back, seconds
    until the server closed, None if it did not). With `until_close` False, reading stops at
    the first whole HTTP answer; then `then` is sent and read until the server closes (up to
    `then_read_s`), which appends b"<closed>" to what came back."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    got = b""
    closed_after = None
    start = trio.current_time()
    try:
        async with trio.open_nursery() as nursery:
            async def send():
                try:
                    for chunk in data:
                        await stream.send_all(chunk)
                        await trio.sleep(0)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass

            nursery.start_soon(send)
            with trio.move_on_after(read_s):
                while True:
                    try:
                        chunk = await stream.receive_some(65536)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        chunk = b""
                    if not chunk:
                        closed_after = trio.current_time() - start
                        break
                    got += chunk
                    if not until_close and whole_answer(got):
                        break
            nursery.cancel_scope.cancel()
        if then and closed_after is None and got.startswith(b"HTTP/1.1 101"):
            for chunk in then:
                try:
                    await stream.send_all(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    break
            with trio.move_on_after(then_read_s):
                while True:
                    try:
                        chunk = await stream.receive_some(65536)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        chunk = b""
                    if not chunk:
                        got += b"<closed>"
                        break
                    got += chunk
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()
    return got, closed_after


REFUSED_CLOSE_S = 5.0  # seconds a refused upgrade's connection may stay open (hypercorn's keep-alive)


async def test_fuzz_media_socket(tmp_path, log_watch, short_deadlines, webhook_key):
    """The media socket below the listen roles: opening handshakes mutated, cut short or never
    finished, then invalid WebSocket frames after a valid upgrade. The server answers (a 4xx,
    or 101), closes what it refused, times out what stalls, never crashes."""
    tally = Tally("media socket (raw)")
    budget = max(100, ITERATIONS // 8)  # connections of opening handshakes; a third as many of frames
    exp_token = jwt.encode({"iss": "gateway", "sub": "x", "exp": 10**400, "video": {"room": ROOM, "roomJoin": True}},
                           JWT_SECRET, algorithm="HS256")

    def target(rng: random.Random) -> str:
        return rng.choice((
            f"/v1.0/calls/fz-call-{rng.randrange(N_CALLS)}/media_stream?encapsulation=sln&token={VOIPBIN_TOKEN}",
            f"/audio/connect?token={room_token('raw-' + str(rng.randrange(10**6)))}",
            f"/audio/subscribe?target_identity={PARTICIPANT}&token={room_token('raw-' + str(rng.randrange(10**6)))}",
            f"/audio/connect?token={exp_token}",  # regression: a token whose exp is beyond any float → 401
            "/api/v1/sdk/ws/1", "/videosdk?ref=nope", "/", "/nope", "*", "http://[::1/x", "//", "/%",
        ))

    async def handshake_case(rng: random.Random, linger_check: bool) -> None:
        t = target(rng)
        request = upgrade_request(rng, t)
        plain = request
        roll = rng.random()
        if roll < 0.45:
            request = fz.mutate_bytes(rng, request, [request], cap=20_000)
        elif roll < 0.55:
            request = upgrade_request(rng, t, [("X-Pad", "a" * rng.choice((8_000, 17_000, 70_000)))])
        elif roll < 0.6:
            request = request.replace(b"\r\n", b"\n")
        stall = rng.random() < 0.12
        if stall:  # cut short: the server's opening-handshake timeout must end it
            request = request[: rng.randrange(max(1, len(request)))]
        tally.inputs += 1
        tally.connections += 1
        read_s = WS_HANDSHAKE_S + SLACK_S if stall else (REFUSED_CLOSE_S + SLACK_S if linger_check else PROMPT_S)
        try:
            got, closed_after = await raw_exchange(gateway.runtime.media.port, [request], read_s=read_s,
                                                   until_close=stall or linger_check)
        except OSError as err:
            tally.fail("media socket refused a TCP connection", repr(err))
            return
        status = None
        if got.startswith(b"HTTP/1."):
            try:
                status = int(got.split(b" ", 2)[1])
            except (ValueError, IndexError):
                tally.fail("media socket answered a malformed status line", f"{show(request)} → {got[:100]!r}")
        what = f"{show(request, 160)} → {got[:80]!r}"
        if status is not None:
            tally.refused[status] += 1
            if status >= 500 and status != 503:
                tally.fail(f"media socket answered {status}", what)
            if t.endswith(exp_token) and request == plain and status != 401:
                tally.fail("Argon: a token whose exp is beyond any float was not refused with 401", what)
        if stall and status is None and closed_after is None:
            tally.fail("a half-sent opening handshake was not timed out", f"{what} (open {read_s:.1f} s)")
        elif not stall and status is None and closed_after is None and not whole_answer(got):
            tally.fail("an opening handshake got neither an answer nor a close", what)
        elif t.endswith(exp_token) and request == plain and status is None:
            tally.fail("Argon: a token whose exp is beyond any float got no answer", what)
        elif linger_check and status not in (None, 101) and closed_after is None:
            tally.fail("a refused upgrade's connection stayed open", f"{what}: open {read_s:.1f} s after the refusal")

    async def frames_case(rng: random.Random) -> None:
        t = f"/v1.0/calls/fz-call-{rng.randrange(N_CALLS)}/media_stream?encapsulation=sln&token={VOIPBIN_TOKEN}" \
            if rng.random() < 0.5 else f"/audio/connect?token={room_token('raw-' + str(rng.randrange(10**6)))}"
        payload = bytes(320) if "media_stream" in t else fz.opus_corpus()[1]
        frames = bad_frames(rng, payload)
        tally.inputs += len(frames) + 1
        tally.connections += 1
        # the handshake first (RFC 6455 §4.1: a client waits for the server's answer before
        # it sends frames; frames sent with the request are dropped unread)
        got, _ = await raw_exchange(gateway.runtime.media.port, [upgrade_request(rng, t)], read_s=PROMPT_S,
                                    until_close=False, then=frames, then_read_s=PROMPT_S + SLACK_S)
        if b" 409 " in got[:20] or b" 503 " in got[:20]:
            tally.busy_retries += 1
            return
        if not got.startswith(b"HTTP/1.1 101"):
            tally.fail("an honest upgrade was refused", f"{t[:60]} → {got[:100]!r}")
        elif not got.endswith(b"<closed>"):
            tally.fail("invalid WebSocket frames did not close the connection", f"{t[:40]} {[show(f, 40) for f in frames]}")

    async def phase(n: int, case, seconds: float) -> None:
        until = time.monotonic() + seconds

        async def worker(i: int) -> None:
            rng = random.Random(f"{SEED}:media:{case.__name__}:{i}")
            while tally.connections < n and not tally.gateway_down() and time.monotonic() < until:
                await case(rng)

        await workers(8, worker)

    async def fuzz(gw) -> None:
        nonlocal gateway
        gateway = gw
        # a few refusals whose connection we leave open, to see the server close it
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(handshake_case, random.Random(f"{SEED}:linger:{i}"), True)
            await phase(budget, lambda rng: handshake_case(rng, False), TIME_CAP * 0.5)
        await phase(tally.connections + budget // 3, frames_case, TIME_CAP * 0.3)
        await trio.sleep(0.5)
        await honest_voipbin(gateway, tally)
        await healthz(gateway, tally)
        check_end_state(gateway, tally, log_watch, "voipbin")

    gateway = None
    await run_fuzz(tmp_path, webhook_key[0], tally, fuzz)
    assert_clean(tally)


async def test_a_bot_arriving_as_the_last_one_leaves_is_served(tmp_path, webhook_key):
    """Regressions (found by this fuzz): when the last bot left an Argon listen channel, the
    route's session ended and its goodbye closed every bot in the room with 1000 "channel
    closed", including bots that had joined during those ~20 ms: they belong to the next
    session, which must serve them. And right after start the channel had no room yet (404)."""
    packet = fz.opus_corpus()[1]
    async with trio.open_nursery() as nursery:
        gateway = await start_fuzz_gateway(nursery, tmp_path, webhook_key[0])
        base = media_base(gateway)
        # and a bot connecting as soon as the gateway is up finds its channel (it was 404
        # "no room" until the channel's route had run once)
        first = await connect_websocket_url(nursery, f"{base}/audio/connect?token={room_token('early')}")
        assert json.loads(await first.get_message())["status"] == "ready"
        await first.aclose()
        for attempt in range(2):
            last = await connect_websocket_url(nursery, f"{base}/audio/connect?token={room_token('last')}")
            for _ in range(3):
                await last.send_message(packet)
            await last.aclose()  # the channel is empty: its session ends
            voice = await connect_websocket_url(nursery, f"{base}/audio/connect?token={room_token('voice')}")
            statuses, packets = [], 0
            ears = 0

            async def subscribe():
                nonlocal ears
                ears += 1
                return await connect_websocket_url(nursery, f"{base}/audio/subscribe?token={room_token('ear')}"
                                                            f"&target_identity={PARTICIPANT}")

            ear = await subscribe()
            with trio.move_on_after(1.0):
                async with trio.open_nursery() as reading:
                    async def hear() -> None:
                        nonlocal packets, ear
                        while True:
                            try:
                                message = await ear.get_message()
                            except ConnectionClosed:
                                # A subscriber that joined while the ending session's participants
                                # were still there saw its target leave, and Argon drops a subscribe
                                # session whose target left (without a close frame, so the status
                                # may not arrive; it may even have been subscribed to the leaving
                                # participant for a moment): subscribe again, once, as a bot would. (What must
                                # not happen is the ending session closing the bots that joined
                                # meanwhile: `voice` tests that, and so does the second subscription.)
                                if ears > 1:
                                    raise
                                ear = await subscribe()
                                continue
                            if isinstance(message, str):
                                statuses.append(json.loads(message)["status"])
                            else:
                                packets += 1

                    reading.start_soon(hear)
                    for _ in range(50):
                        await voice.send_message(packet)
                        await trio.sleep(0.02)
            assert ear.closed is None and voice.closed is None, (attempt, ear.closed, voice.closed)
            assert "subscribed" in statuses and packets >= 10, (attempt, statuses, packets)
            await ear.aclose()
            await voice.aclose()
            await trio.sleep(0.2)
        nursery.cancel_scope.cancel()


async def test_used_videosdk_sessions_do_not_exhaust_the_session_call(tmp_path, webhook_key, monkeypatch):
    """Regression (found by this fuzz in a longer run): the 503 "too many unclaimed ingest
    sessions" counted the sessions already used too, so after 1,024 sessions within 180 s
    every client was refused. Only sessions still waiting for their device count."""
    from gateway.adapters.videosdk import listen as vsdk_listen

    monkeypatch.setattr(vsdk_listen, "MAX_PENDING_SESSIONS", 3)
    monkeypatch.setattr(vsdk_listen, "MAX_REMEMBERED_SESSIONS", 5)
    tally = Tally("videosdk sessions")
    async with trio.open_nursery() as nursery:
        gateway = await start_fuzz_gateway(nursery, tmp_path, webhook_key[0])
        for i in range(8):  # used ones: never a 503 (and the oldest are forgotten past 5)
            ws_url = await videosdk_session(gateway, tally)
            assert ws_url is not None, (i, tally.report())
            device = await connect_websocket_url(nursery, ws_url)
            await device.send_message('{"event":"start"}')
            await device.send_message('{"event":"stop"}')
            with trio.fail_after(5):
                try:
                    while True:
                        await device.get_message()
                except ConnectionClosed:
                    pass
        service = vsdk_listen.VideosdkListenService.for_runtime(gateway.runtime)
        assert len(service._claims) <= 5
        unclaimed = [await videosdk_session(gateway, tally) for _ in range(3)]
        assert all(unclaimed), tally.report()
        refused = tally.failures.copy()
        assert await videosdk_session(gateway, tally) is None  # the 4th unclaimed one: 503
        assert "503" in str(tally.failures) and not refused
        nursery.cancel_scope.cancel()


async def test_a_refusal_quoting_an_unencodable_claim_is_answered(tmp_path, webhook_key):
    """Regression (found by this fuzz): a signed token whose room claim is a lone surrogate
    (JSON "\\ud800") made the 404 "no room … here" fail to encode: the audio handler crashed
    and the upgrade got no answer. It gets its 404."""
    token = jwt.encode({"iss": "gateway", "sub": "bot", "exp": int(time.time()) + 60,
                        "video": {"room": "\ud800", "roomJoin": True}}, JWT_SECRET, algorithm="HS256")
    async with trio.open_nursery() as nursery:
        gateway = await start_fuzz_gateway(nursery, tmp_path, webhook_key[0])
        got, _ = await raw_exchange(gateway.runtime.media.port,
                                    [upgrade_request(random.Random(0), f"/audio/connect?token={token}")],
                                    read_s=PROMPT_S, until_close=False)
        nursery.cancel_scope.cancel()
    assert got.startswith(b"HTTP/1.1 404"), got[:200]
