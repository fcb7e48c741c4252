"""The VideoSDK adapter's edges (spec: shared/protocols/004_c69f0f37162481c1.txt).

Over real loopback sockets: the listen role's session REST (token Bearer or bare, body
fields, rooms), single-use refs, pub/sub between the participants of one room, DTMF from a
VoIPBIN AudioSocket call published to a topic, lifecycle webhooks (signature checks, a
call-hangup ending the dial endpoint), bad input closing only that connection, the dial
role's refusals and 429 retries, and secrets kept out of logs and errors.

In memory under trio's MockClock (no real time spent): ref expiry after 90 s, the 5 s start
timeout, the 30 s ping with a 10 s pong deadline, and a minute of room audio reaching a
device at exactly one frame per 20 ms.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import uuid
from collections import deque
from datetime import datetime
from urllib.parse import urlsplit

import numpy as np
import pytest
import trio
import trio.testing
import wsproto
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from trio_websocket import ConnectionClosed, wrap_server_stream
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from gateway._util import collapse
from gateway.adapters.videosdk.endpoint import (
    INGEST_REJECTED,
    VideosdkListen,
    VideosdkListenService,
)
from gateway.adapters.videosdk.frames import PublishRefused
from gateway.adapters.videosdk.sessions import INGEST_PATH, SESSIONS_PATH, parse_session_response
from gateway.adapters.videosdk.webhooks import sign_webhook, webhook_body
from gateway.adapters.voipbin.wire import Encapsulation, MediaStreamProtocol
from gateway.adapters.ws import dial as dial_ws
from gateway.config import GatewayConfig
from gateway.daemon import Gateway
from gateway.demo import DEFAULT_AUDIO
from gateway.endpoint import RouteEvent
from gateway.errors import CallEnded, ConfigError, ServiceError
from gateway.route import Route
from gateway.runtime import Runtime
from gateway.server import HttpRequest, HttpResponse, HttpServer, MediaRequest, serve_http
from harness import SECRETS, VIDEOSDK_TOKEN, VOIPBIN_TOKEN, start, ws_client
from test_route_pacing import Source, ramp_frame

ROOM = """\
routes:
  - name: room
    endpoints:
      - videosdk: {role: listen, room_id: r1}
      - record: {path: "$out/room.wav"}
"""


# ----------------------------------------------------------------------------- helpers
def log_text(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


def assert_no_secrets(*texts: str, refs: tuple[str, ...] = ()) -> None:
    """No known token, no ref we saw, and no unredacted `ref=` value anywhere."""
    for text in texts:
        for secret in SECRETS + refs:
            assert secret not in text
        assert not re.search(r"ref=(?!\*\*\*)", text), "an ingest ref reached the logs"


def ref_of(ws_url: str) -> str:
    return urlsplit(ws_url).query.removeprefix("ref=")


async def create_session(gateway, room="r1", *, authorization=f"Bearer {VIDEOSDK_TOKEN}", body=None, participant=None):
    headers = {"content-type": "application/json"}
    if authorization is not None:
        headers["authorization"] = authorization
    if body is None:
        body = json.dumps({"roomId": room} | ({"participant": participant} if participant else {}))
    client = gateway.runtime.http_client()
    return await client.post(f"http://127.0.0.1:{gateway.runtime.http.port}{SESSIONS_PATH}", content=body, headers=headers)


async def wait_for(predicate, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def route_events(gateway, route: str, kind: str | None = None) -> list[RouteEvent]:
    return [e for _, e in gateway.routes[route].route.stats.recent_events if kind is None or e.kind == kind]


class Device:
    """A VideoSDK device as a customer writes one (spec: Steps 1-2): the session call, the
    WebSocket, start, subscriptions; counts the room audio and keeps every other frame."""

    def __init__(self) -> None:
        self.frames = 0
        self.others: list[dict] = []
        self.closed: ConnectionClosed | None = None
        self.ws = None
        self.ws_url = ""

    async def join(self, nursery, gateway, room="r1", *, name=None, subscribe=(), read=True) -> Device:
        response = await create_session(gateway, room, participant={"name": name} if name else None)
        assert response.status_code == 200, response.text
        self.ws_url = response.json()["data"]["wsUrl"]
        self.ws = await ws_client(nursery, self.ws_url)
        await self.ws.send_message('{"event":"start"}')
        for topic in subscribe:
            await self.ws.send_message(json.dumps({"event": "subscribe", "topic": topic}))
        if read:
            nursery.start_soon(self._read)
        return self

    async def _read(self) -> None:
        try:
            while True:
                frame = json.loads(await self.ws.get_message())
                if frame["event"] == "media":
                    self.frames += 1
                else:
                    self.others.append(frame)
        except ConnectionClosed as closed:
            self.closed = closed

    def messages(self, topic: str) -> list[dict]:
        return [f["data"] for f in self.others if f["event"] == "message" and f["topic"] == topic]

    async def leave(self) -> None:
        """Stop and close, as a device does when done (so no close handshake is left
        waiting on a reader that the test's teardown cancels)."""
        with trio.move_on_after(2):
            try:
                await self.ws.send_message('{"event":"stop"}')
            except ConnectionClosed:
                pass
            await self.ws.aclose()

    async def frames_during(self, seconds: float) -> int:
        before = self.frames
        await trio.sleep(seconds)
        return self.frames - before


# ------------------------------------------------------------------------ session REST
async def test_session_rest_checks_token_body_and_room(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, ROOM, out=tmp_path)
        refused = {
            "no header": await create_session(gateway, authorization=None),
            "wrong Bearer": await create_session(gateway, authorization="Bearer not-the-token"),
            "wrong bare": await create_session(gateway, authorization="not-the-token"),
            "other scheme": await create_session(gateway, authorization=f"Basic {VIDEOSDK_TOKEN}"),
        }
        no_room = await create_session(gateway, body='{"participant": {"name": "x"}}')
        bad_metadata = await create_session(gateway, body='{"roomId": "r1", "participant": {"metadata": 5}}')
        agent_without_id = await create_session(gateway, body='{"roomId": "r1", "agent": {}}')
        not_json = await create_session(gateway, body="roomId=r1")
        unknown_room = await create_session(gateway, "nope")
        bearer = await create_session(gateway)
        bare = await create_session(gateway, authorization=VIDEOSDK_TOKEN)
        media_port = gateway.runtime.media.port
        nursery.cancel_scope.cancel()
    for case, response in refused.items():
        assert response.status_code == 401, case
        assert response.json() == {"message": "token missing or rejected"}
    assert no_room.status_code == 400 and "roomId is required" in no_room.json()["message"]
    assert bad_metadata.status_code == 400 and "participant.metadata must be an object" in bad_metadata.json()["message"]
    assert agent_without_id.status_code == 400 and "agent.id is required" in agent_without_id.json()["message"]
    assert not_json.status_code == 400 and "not JSON" in not_json.json()["message"]
    assert unknown_room.status_code == 404 and "room 'nope' not found" in unknown_room.json()["message"]
    refs = []
    for response in (bearer, bare):
        assert response.status_code == 200 and response.headers["content-type"] == "application/json"
        body = response.json()
        assert body["message"] == "Ingest session created" and set(body["data"]) == {"wsUrl", "callId", "expiresIn"}
        data = body["data"]
        assert data["wsUrl"].startswith(f"ws://127.0.0.1:{media_port}/videosdk?ref=")
        assert data["expiresIn"] == 90 and uuid.UUID(data["callId"])
        refs.append(ref_of(data["wsUrl"]))
        # the dial side's parser takes our answer as VideoSDK's
        session = parse_session_response(response.status_code, response.content, room_id="r1")
        assert session.call_id == data["callId"]
    assert refs[0] != refs[1] and len(refs[0]) >= 32  # fresh, unguessable refs
    assert bearer.json()["data"]["callId"] != bare.json()["data"]["callId"]
    assert_no_secrets(log_text(caplog), caplog.text, refs=tuple(refs))


async def test_ref_is_single_use_and_must_be_known(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, ROOM, out=tmp_path)
        device = await Device().join(nursery, gateway)
        await wait_for(lambda: gateway.routes["room"].state == "up")
        errors = {}
        base = f"ws://127.0.0.1:{gateway.runtime.media.port}{INGEST_PATH}"
        for case, url in {"reused": device.ws_url, "unknown": f"{base}?ref=vs_made_up", "missing": base}.items():
            with pytest.raises(ServiceError) as info:
                await dial_ws(nursery, url, service="VideoSDK room r1", rejected=INGEST_REJECTED)
            errors[case] = info.value
        assert device.closed is None and gateway.routes["room"].state == "up"  # the claimant is unaffected
        nursery.cancel_scope.cancel()
    assert errors["reused"].status == 410 and "already claimed" in str(errors["reused"])
    assert errors["unknown"].status == 403 and "unknown ingest ref" in str(errors["unknown"])
    assert errors["missing"].status == 401 and "missing ingest ref" in str(errors["missing"])
    assert not any(e.permanent for e in errors.values())  # a fresh session may work
    ref = ref_of(device.ws_url)
    assert_no_secrets(*(str(e) for e in errors.values()), log_text(caplog), caplog.text, refs=(ref,))


# ----------------------------------------------------------------- in memory, MockClock
MEMORY = """\
server: {media_url: "ws://gateway.test"}
services:
  videosdk: {token: "%s"}
""" % VIDEOSDK_TOKEN


class RawDevice:
    """A device on bare wsproto over any trio stream. trio-websocket answers every ping by
    itself; this one answers only when `answer_pings`, so a missed pong can be seen."""

    def __init__(self, stream, *, answer_pings: bool = True) -> None:
        self.stream = stream
        self.answer_pings = answer_pings
        self.conn = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.pings: list[float] = []
        self.media: list[tuple[float, bytes]] = []
        self.others: list[dict] = []
        self._events: deque = deque()

    async def handshake(self, target: str) -> tuple[int, bytes]:
        """(101, b"") when accepted, else (HTTP status, body)."""
        await self.stream.send_all(self.conn.send(Request(host="gateway.test", target=target)))
        event = await self.next_event()
        if isinstance(event, AcceptConnection):
            return 101, b""
        assert isinstance(event, RejectConnection), event
        status, body = event.status_code, b""
        if event.has_body:
            while True:
                data = await self.next_event()
                assert isinstance(data, RejectData), data
                body += data.data
                if data.body_finished:
                    break
        return status, body

    async def send_text(self, text: str) -> None:
        await self.stream.send_all(self.conn.send(TextMessage(data=text)))

    async def next_event(self):
        while not self._events:
            data = await self.stream.receive_some(65536)
            self.conn.receive_data(data or None)
            self._events.extend(self.conn.events())
        return self._events.popleft()

    async def read_until_closed(self) -> tuple[int, str, float]:
        """Read (keeping media and other frames, answering pings if asked) until the server
        closes; answer its close; return (code, reason, trio time)."""
        text = ""
        while True:
            event = await self.next_event()
            if isinstance(event, Ping):
                self.pings.append(trio.current_time())
                if self.answer_pings:
                    await self.stream.send_all(self.conn.send(event.response()))
            elif isinstance(event, TextMessage):
                text += event.data
                if event.message_finished:
                    frame = json.loads(text)
                    text = ""
                    if frame["event"] == "media":
                        self.media.append((trio.current_time(), base64.b64decode(frame["payload"])))
                    else:
                        self.others.append(frame)
            elif isinstance(event, CloseConnection):
                when = trio.current_time()
                if self.conn.state == wsproto.connection.ConnectionState.REMOTE_CLOSING:
                    await self.stream.send_all(self.conn.send(event.response()))
                return event.code, event.reason, when


class MemoryRoom:
    """The listen service with no sockets: session REST called directly, devices connected
    through `trio.testing.memory_stream_pair` and handed to its upgrade handler."""

    def __init__(self) -> None:
        self.runtime = Runtime(GatewayConfig.from_text(MEMORY, "memory.yaml"))
        self.service = VideosdkListenService.for_runtime(self.runtime)

    def endpoint(self, name: str = "room", room_id: str = "r1", **kw) -> VideosdkListen:
        endpoint = VideosdkListen(name, service=self.service, room_id=room_id, **kw)
        self.service.add(endpoint)
        return endpoint

    async def session(self, room_id: str = "r1") -> str:
        """A fresh session's request target, `/videosdk?ref=…`."""
        request = HttpRequest("POST", SESSIONS_PATH, {}, {"authorization": f"Bearer {VIDEOSDK_TOKEN}"},
                              json.dumps({"roomId": room_id}).encode(), {})
        response = await self.service.create_session(request)
        assert response.status == 200, response.body
        parts = urlsplit(json.loads(response.body)["data"]["wsUrl"])
        assert (parts.scheme, parts.netloc, parts.path) == ("ws", "gateway.test", INGEST_PATH)
        return f"{parts.path}?{parts.query}"

    async def connect(self, nursery, target: str, *, answer_pings: bool = True) -> tuple[RawDevice, int, bytes]:
        server_side, client_side = trio.testing.memory_stream_pair()

        async def serve() -> None:
            request = await wrap_server_stream(nursery, server_side)
            await self.service.ingest(MediaRequest(request, INGEST_PATH, {}, {}))

        nursery.start_soon(serve)
        device = RawDevice(client_side, answer_pings=answer_pings)
        status, body = await device.handshake(target)
        return device, status, body


async def run_capturing(endpoint, emit, outcome: list, *, task_status=trio.TASK_STATUS_IGNORED):
    """Run `endpoint` and keep how it ended (collapsed out of exception groups)."""
    task_status.started()
    try:
        await endpoint.run(emit)
        outcome.append("returned")
    except BaseException as raised:  # noqa: BLE001 - inspected by the test
        outcome.append(collapse(raised))
        if isinstance(outcome[-1], trio.Cancelled):
            raise


async def test_ref_expires_after_90_s(autojump_clock, caplog):
    caplog.set_level(logging.INFO)
    room = MemoryRoom()
    room.endpoint("a")
    room.endpoint("b")
    async with trio.open_nursery() as nursery:
        for endpoint in room.service.endpoints["r1"]:
            nursery.start_soon(endpoint.run, lambda frame: None)
        t0 = trio.current_time()
        early, late = await room.session(), await room.session()
        await trio.sleep_until(t0 + 89.9)
        _, status_early, _ = await room.connect(nursery, early)
        await trio.sleep_until(t0 + 90.0)
        _, status_late, body = await room.connect(nursery, late)
        nursery.cancel_scope.cancel()
    assert status_early == 101
    assert status_late == 410 and "expired (90 s)" in json.loads(body)["error"]
    assert "refused (410)" in log_text(caplog)


async def test_no_start_frame_within_5_s_closes_1008_and_the_room_takes_the_next_device(autojump_clock, caplog):
    caplog.set_level(logging.INFO)
    room = MemoryRoom()
    endpoint = room.endpoint()
    frames = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(endpoint.run, frames.append)
        silent, status, _ = await room.connect(nursery, await room.session())
        assert status == 101
        t0 = trio.current_time()
        code, reason, when = await silent.read_until_closed()
        assert (code, reason) == (1008, "start timeout")
        assert when - t0 == pytest.approx(5.0, abs=0.01)
        # the endpoint is free again (once the closed session's handler returned): a device
        # that starts in time streams
        await wait_for(lambda: not endpoint.busy)
        device, status, _ = await room.connect(nursery, await room.session())
        assert status == 101
        await trio.sleep(4.9)
        await device.send_text('{"event":"start"}')
        for _ in range(3):
            await device.send_text(json.dumps({"event": "media", "payload": base64.b64encode(bytes(320)).decode()}))
        await wait_for(lambda: len(frames) == 3)
        assert endpoint.stats.connects == 1
        nursery.cancel_scope.cancel()
    assert all(f.samples == 160 and f.rate == 8000 for f in frames)
    assert "closing the ingest stream (1008): start timeout" in log_text(caplog)


async def test_device_that_answers_pings_stays_and_one_that_misses_a_pong_is_closed_1011(autojump_clock, caplog):
    caplog.set_level(logging.INFO)
    room = MemoryRoom()
    good_endpoint, bad_endpoint = room.endpoint("good"), room.endpoint("bad")
    outcome: dict[str, list] = {"good": [], "bad": []}
    async with trio.open_nursery() as nursery:
        await nursery.start(run_capturing, good_endpoint, lambda f: None, outcome["good"])
        await nursery.start(run_capturing, bad_endpoint, lambda f: None, outcome["bad"])
        good, _, _ = await room.connect(nursery, await room.session(), answer_pings=True)
        bad, _, _ = await room.connect(nursery, await room.session(), answer_pings=False)
        t0 = trio.current_time()
        await good.send_text('{"event":"start"}')
        await bad.send_text('{"event":"start"}')
        nursery.start_soon(good.read_until_closed)
        code, reason, closed_at = await bad.read_until_closed()
        await wait_for(lambda: outcome["bad"])
        await trio.sleep_until(t0 + 305)
        assert not outcome["good"], "the device that answers pings was dropped"
        nursery.cancel_scope.cancel()
    assert (code, reason) == (1011, "ping timeout")
    assert [round(t - t0, 3) for t in bad.pings] == [30.0]
    assert closed_at - t0 == pytest.approx(40.0, abs=0.01)  # ping at 30 s + 10 s pong deadline
    assert isinstance(outcome["bad"][0], CallEnded) and "no pong within 10 s" in outcome["bad"][0].reason
    assert [round(t - t0, 3) for t in good.pings] == [30.0 * k for k in range(1, 11)]
    assert "closing the ingest stream (1011): no pong within 10 s" in log_text(caplog)


async def test_a_minute_of_room_audio_reaches_the_device_at_one_frame_per_20_ms(autojump_clock):
    """The route paces `send()` on absolute deadlines: 3000 frames, each 20 ms after the
    previous one to the microsecond, intact and in order, then meeting-left and close 1000."""
    room = MemoryRoom()
    endpoint = room.endpoint()
    frames = [ramp_frame(k) for k in range(3000)]
    source = Source("music", [k * 0.02 for k in range(3000)], frames)
    route = Route("room", [endpoint, source])
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(route.run)
            device, _, _ = await room.connect(nursery, await room.session())
            await device.send_text('{"event":"start"}')
            code, _, _ = await device.read_until_closed()
    assert code == 1000 and route.stats.ended_by == "music: ended"
    assert [f["event"] for f in device.others][:1] == ["meeting-joined"]
    assert device.others[-1] == {"event": "meeting-left", "message": "call ended"}
    times = np.array([t for t, _ in device.media])
    assert len(times) == 3000
    assert np.max(np.abs(np.diff(times) - 0.02)) < 1e-6  # no burst, no gap, no drift
    received = np.frombuffer(b"".join(pcm for _, pcm in device.media), "<i2")
    assert np.array_equal(received, np.concatenate([f.pcm[:, 0] for f in frames]))


# --------------------------------------------------------------------------- pub/sub
PUBSUB = """\
routes:
  - {name: room-1, endpoints: [{videosdk: {role: listen, room_id: team}}, {record: {path: "$out/1.wav"}}]}
  - {name: room-2, endpoints: [{videosdk: {role: listen, room_id: team}}, {record: {path: "$out/2.wav"}}]}
  - {name: room-3, endpoints: [{videosdk: {role: listen, room_id: team}}, {record: {path: "$out/3.wav"}}]}
  - name: alice
    endpoints:
      - file: {path: "$audio", rate: 8000, loop: true}
      - videosdk: {room_id: team, participant_name: Alice, subscribe: [CHAT], publish_topic: CHAT,
                   publish_events: [big]}
  - name: bob
    endpoints:
      - file: {path: "$audio", rate: 8000, loop: true}
      - videosdk: {room_id: team, participant_name: Bob, subscribe: [CHAT]}
"""


async def test_pubsub_between_participants_of_a_room(tmp_path, caplog):
    """Alice and Bob are the gateway's dial endpoints, Carol a device: each message reaches
    every other subscriber with its sender, nobody gets their own back."""
    caplog.set_level(logging.INFO)

    def heard(route):
        return [(e.data["data"], e.data["sender_name"]) for e in route_events(gateway, route, "message")]

    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, PUBSUB, out=tmp_path, audio=DEFAULT_AUDIO)
        await wait_for(lambda: all(gateway.routes[r].state == "up" for r in ("alice", "bob")))
        alice, bob = (gateway.routes[r].route.endpoints[1] for r in ("alice", "bob"))
        carol = await Device().join(nursery, gateway, "team", name="Carol", subscribe=["CHAT"])
        # frames of one connection are handled in order: once others hear Carol, her
        # subscription is in place
        await carol.ws.send_message('{"event":"message","topic":"CHAT","data":{"text":"hi from carol"}}')
        await wait_for(lambda: heard("alice") and heard("bob"))
        await alice.publish("CHAT", "hello from alice")
        await wait_for(lambda: len(carol.messages("CHAT")) == 1 and len(heard("bob")) == 2)
        await bob.publish("CHAT", "marker")
        await wait_for(lambda: len(carol.messages("CHAT")) == 2 and len(heard("alice")) == 2)
        await wait_for(lambda: any(e.data["name"] == "Carol" for e in route_events(gateway, "alice", "participant-joined")))

        # a topic over 128 characters is refused locally, clearly, and the audio goes on
        with pytest.raises(PublishRefused) as refused:
            await alice.publish("T" * 129, "too long a topic")
        # so is a route event whose payload is over 8 KB: logged, counted, stream kept
        alice.on_route_event(RouteEvent("test", "big", {"blob": "x" * 9000}))
        await wait_for(lambda: alice.publish_refused == 1)
        listen_of_alice = next(gateway.routes[r].route.endpoints[0] for r in ("room-1", "room-2", "room-3")
                               if gateway.routes[r].route.endpoints[0].call_id == alice.call_id)
        before = listen_of_alice.stats.frames_in
        await trio.sleep(0.3)
        assert listen_of_alice.stats.frames_in - before >= 10
        assert gateway.routes["alice"].state == "up"
        await carol.leave()
        await wait_for(lambda: any(e.data["name"] == "Carol" for e in route_events(gateway, "alice", "participant-left")))
        await gateway.stop()
        nursery.cancel_scope.cancel()

    assert "topic is 129 characters, limit 128" in str(refused.value)
    first, second = carol.messages("CHAT")
    assert first["message"] == "hello from alice" and first["senderName"] == "Alice"
    assert first["senderId"] and first["id"] and first["id"] != second["id"]
    assert datetime.fromisoformat(first["timestamp"].replace("Z", "+00:00")).tzinfo is not None
    assert second["message"] == "marker" and second["senderName"] == "Bob"  # never her own message
    carol_says = ('{"text":"hi from carol"}', "Carol")  # JSON data arrives serialized (spec)
    assert heard("alice") == [carol_says, ("marker", "Bob")]
    assert heard("bob") == [carol_says, ("hello from alice", "Alice")]
    assert "did not publish the big event to topic 'CHAT'" in log_text(caplog) and "8 KB" in log_text(caplog)
    # the room side raised what its own device published as route events
    published = [e.data["data"] for r in ("room-1", "room-2", "room-3") for e in route_events(gateway, r, "message")]
    assert sorted(published) == sorted(["hello from alice", '{"text":"hi from carol"}', "marker"])


DTMF = """\
routes:
  - name: call-bridge
    endpoints:
      - voipbin: {role: listen, call_id: dtmf-call, encapsulation: audiosocket}
      - videosdk: {room_id: desk, participant_name: Phone, publish_topic: DTMF}
  - {name: desk-1, endpoints: [{videosdk: {role: listen, room_id: desk}}, {record: {path: "$out/1.wav"}}]}
  - {name: desk-2, endpoints: [{videosdk: {role: listen, room_id: desk}}, {record: {path: "$out/2.wav"}}]}
"""


async def test_dtmf_from_an_audiosocket_call_is_published_to_a_topic(tmp_path):
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, DTMF, out=tmp_path)
        observer = await Device().join(nursery, gateway, "desk", name="Observer", subscribe=["DTMF"])
        url = (f"ws://127.0.0.1:{gateway.runtime.media.port}/v1.0/calls/dtmf-call/media_stream"
               f"?encapsulation=audiosocket&token={VOIPBIN_TOKEN}")
        caller = await ws_client(nursery, url)
        proto = MediaStreamProtocol(Encapsulation.AUDIOSOCKET)
        await caller.send_message(proto.send_audio(bytes(320)))
        await wait_for(lambda: gateway.routes["call-bridge"].state == "up")
        for digit in "5#":
            await caller.send_message(proto.send_dtmf(digit))
        await wait_for(lambda: len(observer.messages("DTMF")) == 2)
        bridge = gateway.routes["call-bridge"].route.endpoints[1]
        await observer.leave()
        await caller.aclose()
        await gateway.stop()
        nursery.cancel_scope.cancel()
    payloads = [json.loads(m["message"]) for m in observer.messages("DTMF")]
    assert payloads == [{"kind": "dtmf", "source": "voipbin", "digit": "5"}, {"kind": "dtmf", "source": "voipbin", "digit": "#"}]
    assert all(m["senderName"] == "Phone" for m in observer.messages("DTMF"))
    assert bridge.stats.events_out == 2 and bridge.events_dropped == 0


# --------------------------------------------------------------------------- webhooks
WEBHOOK_ROUTES = """\
routes:
  - name: device
    endpoints:
      - file: {path: "$audio", rate: 8000, loop: true}
      - videosdk: {room_id: hq, participant_name: Dev}
  - name: room
    endpoints:
      - videosdk: {role: listen, room_id: hq}
      - record: {path: "$out/room.wav"}
"""


def rsa_pair(tmp_path, name="webhook"):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    path = tmp_path / f"{name}.pem"
    path.write_bytes(public)
    return private, path


async def post_webhook(gateway, body: bytes, signature: str | None):
    headers = {"content-type": "application/json"}
    if signature is not None:
        headers["videosdk-signature"] = signature
    client = gateway.runtime.http_client()
    return await client.post(f"http://127.0.0.1:{gateway.runtime.http.port}/webhooks/videosdk", content=body, headers=headers)


async def test_webhook_signature_is_checked_and_call_hangup_ends_the_dial(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    private, public_path = rsa_pair(tmp_path)
    other_private, _ = rsa_pair(tmp_path, "other")
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, WEBHOOK_ROUTES, out=tmp_path, audio=DEFAULT_AUDIO,
                              videosdk_extra=f", webhook_public_key_file: {public_path}")
        await wait_for(lambda: gateway.routes["device"].state == "up")
        dial = gateway.routes["device"].route.endpoints[1]
        call_id = dial.call_id
        hangup = webhook_body("call-hangup", call_id)
        forged = sign_webhook(hangup, other_private)
        refused = {
            "missing": await post_webhook(gateway, hangup, None),
            "not-base64": await post_webhook(gateway, hangup, "%%% not base64 %%%"),
            "bad-signature": await post_webhook(gateway, hangup, forged),
        }
        before = dial.stats.frames_out
        await trio.sleep(0.3)
        assert dial.stats.frames_out - before >= 10 and gateway.routes["device"].state == "up"  # nothing changed

        unknown = webhook_body("call-hangup", str(uuid.uuid4()))
        ignored = await post_webhook(gateway, unknown, sign_webhook(unknown, private))
        answered = webhook_body("call-answered", call_id)
        noted = await post_webhook(gateway, answered, sign_webhook(answered, private))
        assert gateway.routes["device"].state == "up"
        ended = await post_webhook(gateway, hangup, sign_webhook(hangup, private))
        with trio.fail_after(5):
            await gateway.routes["device"].sessions_done.wait()
            await gateway.routes["room"].sessions_done.wait()
        nursery.cancel_scope.cancel()
    for cause, response in refused.items():
        assert response.status_code == 401, cause
        message = response.json()["message"]
        assert f"({cause})" in message and "videosdk-signature" in message
        assert call_id not in response.text and forged not in response.text
    assert ignored.status_code == 200 and noted.status_code == 200 and ended.status_code == 200
    assert [e.data for e in route_events(gateway, "device", "call-answered")] == [{"call_id": call_id}]
    assert gateway.routes["device"].route.stats.ended_by == "videosdk: call-hangup webhook"
    assert gateway.routes["room"].route.stats.ended_by == "videosdk: stop"  # the dial said stop
    assert "webhook refused (401, bad-signature)" in log_text(caplog)
    assert "no running endpoint holds it (ignored)" in log_text(caplog)
    assert forged not in caplog.text


async def test_webhook_with_an_unusable_key_answers_500(tmp_path):
    key_file = tmp_path / "bad.pem"
    key_file.write_text("not a key\n")
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, WEBHOOK_ROUTES, out=tmp_path, audio=DEFAULT_AUDIO,
                              videosdk_extra=f", webhook_public_key_file: {key_file}")
        response = await post_webhook(gateway, webhook_body("call-hangup", "c1"), "c2lnbmF0dXJl")
        nursery.cancel_scope.cancel()
    assert response.status_code == 500 and "not a PEM public key" in response.json()["message"]


# ------------------------------------------------------------------------- bad input
BAD_INPUT = """\
routes:
  - name: music
    endpoints:
      - file: {path: "$audio", rate: 8000, loop: true}
      - videosdk: {role: listen, room_id: music}
  - name: victim
    endpoints:
      - videosdk: {role: listen, room_id: victim}
      - record: {path: "$out/victim.wav"}
"""


@pytest.mark.parametrize(
    "message, code, cause",
    [
        ("{nope", 1007, "not valid JSON"),
        ('{"event":"media","payload":"@@@@"}', 1007, "not valid base64"),
        ('{"event":"media","payload":320}', 1007, "payload is a number"),
        ('{"event":"subscribe","topic":["CHAT"]}', 1007, "topic is an array"),
        (b'{"event":"media"}', 1003, "binary message"),
        ('{"event":"media","payload":"' + "A" * 70000 + '"}', 1009, "65536"),
        ("before-start", 1008, "expected the start frame first"),
    ],
    ids=["not-json", "bad-base64", "payload-type", "topic-type", "binary", "oversize", "before-start"],
)
async def test_bad_input_closes_only_that_connection(tmp_path, caplog, message, code, cause):
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, BAD_INPUT, out=tmp_path, audio=DEFAULT_AUDIO)
        listener = await Device().join(nursery, gateway, "music")
        assert await listener.frames_during(0.3) >= 10
        if message == "before-start":  # the device's first frame is not start
            bad_url = (await create_session(gateway, "victim")).json()["data"]["wsUrl"]
            bad_ws = await ws_client(nursery, bad_url)
            message = '{"event":"subscribe","topic":"CHAT"}'
        else:
            bad = await Device().join(nursery, gateway, "victim", read=False)
            bad_url, bad_ws = bad.ws_url, bad.ws
            await bad_ws.send_message(json.dumps({"event": "media", "payload": base64.b64encode(bytes(320)).decode()}))
        await bad_ws.send_message(message)
        with pytest.raises(ConnectionClosed) as closed:
            with trio.fail_after(5):
                while True:
                    await bad_ws.get_message()
        assert closed.value.reason.code == code
        assert cause.lower() in closed.value.reason.reason.lower()
        assert await listener.frames_during(0.5) >= 20  # the other route never noticed
        await listener.leave()
        nursery.cancel_scope.cancel()
    assert f"closing the ingest stream ({code})" in log_text(caplog)
    assert cause.lower() in log_text(caplog).lower()
    assert_no_secrets(log_text(caplog), caplog.text, refs=(ref_of(bad_url), ref_of(listener.ws_url)))


async def test_refused_subscribe_or_publish_is_dropped_and_the_call_goes_on(tmp_path, caplog):
    """The spec: "A failed subscribe or publish never drops the call"."""
    caplog.set_level(logging.INFO)
    media = json.dumps({"event": "media", "payload": base64.b64encode(bytes(320)).decode()})
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, BAD_INPUT, out=tmp_path, audio=DEFAULT_AUDIO)
        device = await Device().join(nursery, gateway, "victim")
        victim = gateway.routes["victim"].route.endpoints[0]
        await device.ws.send_message(json.dumps({"event": "subscribe", "topic": "T" * 129}))
        await device.ws.send_message(json.dumps({"event": "message", "topic": "CHAT", "data": "x" * 9000}))
        await device.ws.send_message(json.dumps({"event": "unsubscribe", "topic": ""}))
        for _ in range(5):
            await device.ws.send_message(media)
        await wait_for(lambda: victim.stats.frames_in == 5)
        assert victim.messaging_refused == 3 and device.closed is None
        assert gateway.routes["victim"].state == "up"
        await device.leave()
        nursery.cancel_scope.cancel()
    text = log_text(caplog)
    assert "dropped the device's subscribe frame" in text and "topic is 129 characters, limit 128" in text
    assert "dropped the device's message frame" in text and "payload is 9000 bytes" in text
    assert "dropped the device's unsubscribe frame" in text and "topic is empty" in text
    assert not route_events(gateway, "victim", "message")


# ------------------------------------------------------------------------- dial side
DEVICE = """\
routes:
  - name: device
    restart: never
    endpoints:
      - file: {path: "$audio", rate: 8000}
      - videosdk: {room_id: r1$dial_extra}
  - name: room
    endpoints:
      - videosdk: {role: listen, room_id: r1}
      - record: {path: "$out/room.wav"}
"""


async def test_refused_session_names_the_cause_and_never_the_token(tmp_path, speech_clip, caplog):
    caplog.set_level(logging.DEBUG)
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, DEVICE, out=tmp_path, audio=speech_clip, dial_extra=", token: wrong-SECRET-token")
        with trio.fail_after(10):
            await gateway.routes["device"].finished.wait()
        nursery.cancel_scope.cancel()
    state = gateway.routes["device"]
    assert state.state == "failed"
    assert "token rejected (missing or expired) (HTTP 401)" in state.last_error and "room r1" in state.last_error
    assert "permanent" in log_text(caplog)
    for text in (state.last_error, log_text(caplog), caplog.text):
        assert "wrong-SECRET-token" not in text
    assert_no_secrets(log_text(caplog), caplog.text)


async def test_rate_limited_session_call_waits_retry_after_then_streams(tmp_path, speech_clip, caplog):
    """Two 429s (Retry-After: 1 header, then retryAfter 0.5 in the body), then VideoSDK's
    answer: the dial waits what it was told each time, then streams."""
    caplog.set_level(logging.INFO)
    calls: list[float] = []
    holder = {}
    app = HttpServer()

    async def sessions(request: HttpRequest) -> HttpResponse:
        calls.append(trio.current_time())
        assert request.headers["authorization"] == f"Bearer {VIDEOSDK_TOKEN}"
        if len(calls) == 1:
            return HttpResponse(429, b'{"message":"slow down"}', headers=(("retry-after", "1"),))
        if len(calls) == 2:
            return HttpResponse(429, b'{"message":"slow down","retryAfter":0.5}')
        return await VideosdkListenService.for_runtime(holder["gateway"].runtime).create_session(request)

    app.add("POST", SESSIONS_PATH, sessions)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, app, "127.0.0.1", 0)
        gateway = await start(nursery, DEVICE, out=tmp_path, audio=speech_clip,
                              dial_extra=f", api_url: 'http://127.0.0.1:{port}'", prepare=lambda gw: holder.update(gateway=gw))
        with trio.fail_after(15):
            await gateway.routes["device"].sessions_done.wait()
        nursery.cancel_scope.cancel()
    assert len(calls) == 3
    waits = [b - a for a, b in zip(calls, calls[1:])]
    assert 1.0 <= waits[0] < 1.4 and 0.5 <= waits[1] < 0.9
    assert gateway.routes["device"].route.stats.ended_by == "file: ended"
    assert gateway.routes["device"].route.endpoints[1].stats.frames_out >= 90
    text = log_text(caplog)
    assert "retrying in 1 s" in text and "retrying in 0.5 s" in text
    assert_no_secrets(text, caplog.text)


# ------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "options, key, problem",
    [
        ("{room_id: r1, publish_topic: %s}" % ("t" * 129), "publish_topic", "topic is 129 characters, limit 128"),
        ("{room_id: r1, subscribe: [CHAT, '']}", "subscribe[1]", "expected a non-empty string"),
        ("{room_id: r1, subscribe: CHAT}", "subscribe", "expected a list"),
        ("{room_id: r1, participant_metadata: 5}", "participant_metadata", "expected a mapping"),
        ("{room_id: r1, agent_metadata: {a: 1}}", "agent_metadata", "needs agent_id"),
        ("{room_id: r1, publish_events: [dtmf]}", "publish_events", "needs publish_topic"),
        ("{participant_name: x}", "videosdk", "missing required key 'room_id'"),
        ("{role: listen, room_id: r1, publish_topic: ''}", "publish_topic", "topic is empty"),
    ],
    ids=["long-topic", "empty-subscribe", "subscribe-not-list", "metadata", "agent", "events", "room", "listen-topic"],
)
def test_config_errors_name_the_key(options, key, problem):
    text = f"""\
server: {{http: "127.0.0.1:0", media: "127.0.0.1:0"}}
services: {{videosdk: {{token: "{VIDEOSDK_TOKEN}"}}}}
routes:
  - name: r
    endpoints:
      - videosdk: {options}
      - record: {{path: /tmp/vsdk_never_written.wav}}
"""
    with pytest.raises(ConfigError) as info:
        Gateway(GatewayConfig.from_text(text, "gw.yaml")).build()
    message = str(info.value)
    assert message.startswith("gw.yaml:") and key in message and problem in message
    assert VIDEOSDK_TOKEN not in message
