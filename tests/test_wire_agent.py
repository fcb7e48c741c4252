"""Voice-agent SDK wire layer (gateway/adapters/agent/wire.py), no event loop needed.

Spec: /work/shared/protocols/003_300445899f8ad283.txt. The spec's page reads control messages
with ``JSON.parse(event.data)`` and switches on ``msg.type``; the tests read them the same way.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from gateway.adapters.agent.wire import (
    FRAME_BYTES,
    MAX_MESSAGE_BYTES,
    PTIME_MS,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    SESSION_END_REASONS,
    TOKEN_PATH,
    AgentClient,
    AgentError,
    AgentReady,
    AgentServer,
    Audio,
    ClientState,
    Connected,
    ServerState,
    SessionEnded,
    TokenGrant,
    TokenPresented,
    TokenRequestError,
    Unknown,
    error_message,
    parse_bearer,
    parse_token_response,
    token_request_headers,
    token_response,
    token_url,
)
from gateway.errors import LocalProtocolError, RemoteProtocolError, ServiceError

TOKEN = "sdk-tok-7f3a9c2e5b1d"  # a session token: must never show in a repr or an error
API_KEY = "ak_live_Q9z8Y7x6W5"  # an API key: likewise

CONNECTED_TEXT = '{"type":"connected"}'
AGENT_READY_TEXT = '{"type":"agent_ready"}'


def pcm_of(samples) -> bytes:
    return np.asarray(samples, dtype="<i2").tobytes()


def samples_of(pcm: bytes) -> np.ndarray:
    assert len(pcm) % 2 == 0, f"{len(pcm)} bytes is not whole samples"
    return np.frombuffer(pcm, dtype="<i2")


# A 20 ms frame whose samples all differ and use both bytes, so a one-byte shift shows.
FRAME = pcm_of(np.arange(SAMPLES_PER_FRAME) * 197 - 31000)


def expect_rpe(proto, message, close_code: int, *fragments: str) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        proto.receive(message)
    err = info.value
    assert err.close_code == close_code, str(err)
    for fragment in fragments:
        assert fragment in str(err), (fragment, str(err))
    assert len(str(err).encode()) <= 123  # fits a WebSocket close reason
    assert TOKEN not in str(err) and TOKEN not in repr(err)
    return err


def connected_client() -> AgentClient:
    client = AgentClient(TOKEN)
    client.start()
    assert client.receive(CONNECTED_TEXT) == [Connected()]
    return client


def connected_server() -> AgentServer:
    server = AgentServer()
    server.receive(json.dumps({"token": TOKEN}))
    server.accept()
    return server


def audio_bytes(events) -> bytes:
    out = b""
    for event in events:
        assert isinstance(event, Audio)
        assert len(event.pcm) > 0 and len(event.pcm) % 2 == 0
        out += event.pcm
    return out


# --- constants ----------------------------------------------------------------------------


def test_audio_constants_match_the_spec():
    assert SAMPLE_RATE == 16000
    assert PTIME_MS == 20
    assert SAMPLES_PER_FRAME == 320  # spec: FRAME_SAMPLES = 320
    assert FRAME_BYTES == 640  # spec: "send 640-byte frames"
    assert SESSION_END_REASONS == ("agent_disconnected", "session_closed", "server_shutdown")
    assert MAX_MESSAGE_BYTES == 65536
    assert TOKEN_PATH == "/api/v1/sdk/token"


# --- the spec's sequence, both roles --------------------------------------------------------


def test_client_spec_sequence():
    client = AgentClient(TOKEN)
    assert client.state is ClientState.AWAITING_CONNECTED
    first = client.start()
    assert first == '{"token":"' + TOKEN + '"}'  # JSON.stringify({ token })
    assert json.loads(first) == {"token": TOKEN}

    assert client.receive('{"type":"connected"}') == [Connected()]
    assert client.state is ClientState.CONNECTED
    assert client.agent_ready is False
    assert client.receive('{"type":"agent_ready"}') == [AgentReady()]
    assert client.agent_ready is True

    assert client.send_audio(FRAME) == FRAME  # binary message: the PCM itself
    assert client.receive(FRAME) == [Audio(FRAME)]

    assert client.receive('{"type":"error","code":"rate_limit","message":"slow down"}') == [
        AgentError("rate_limit", "slow down")
    ]
    assert client.state is ClientState.CONNECTED  # an error report is not the end

    assert client.receive('{"type":"session_ended","reason":"agent_disconnected"}') == [
        SessionEnded("agent_disconnected")
    ]
    assert client.state is ClientState.ENDED


def test_server_spec_sequence_exact_texts():
    server = AgentServer()
    assert server.state is ServerState.AWAITING_TOKEN
    # What the spec's page sends on open: ws.send(JSON.stringify({ token }))
    events = server.receive('{"token":"' + TOKEN + '"}')
    assert events == [TokenPresented(TOKEN)]
    assert events[0].token == TOKEN
    assert server.state is ServerState.TOKEN_PRESENTED

    connected = server.accept()
    assert connected == '{"type":"connected"}'
    assert json.loads(connected)["type"] == "connected"  # the page's `case 'connected'`
    assert server.state is ServerState.CONNECTED

    ready = server.agent_ready()
    assert ready == '{"type":"agent_ready"}'
    assert json.loads(ready)["type"] == "agent_ready"

    assert server.receive(FRAME) == [Audio(FRAME)]  # the page's mic frames
    assert server.send_audio(FRAME) == FRAME

    ended = server.session_ended("session_closed")
    assert ended == '{"type":"session_ended","reason":"session_closed"}'
    assert json.loads(ended) == {"type": "session_ended", "reason": "session_closed"}
    assert server.state is ServerState.ENDED


def test_error_message_exact_text():
    text = error_message("invalid_token", "Invalid or expired token")
    assert text == '{"type":"error","code":"invalid_token","message":"Invalid or expired token"}'
    msg = json.loads(text)
    assert (msg["type"], msg["code"], msg["message"]) == ("error", "invalid_token", "Invalid or expired token")
    # Non-ASCII text survives the trip (escaped on the wire, equal after JSON.parse).
    assert json.loads(error_message("x", "Sitzung beendet – Grüße"))["message"] == "Sitzung beendet – Grüße"


@pytest.mark.parametrize("bad", [("", "m"), (None, "m"), (5, "m"), ("code", None), ("code", 3)])
def test_error_message_misuse(bad):
    with pytest.raises(LocalProtocolError):
        error_message(*bad)


@pytest.mark.parametrize("reason", SESSION_END_REASONS)
def test_client_and_server_talk_to_each_other(reason):
    """Every message one side produces is what the other side parses."""
    client, server = AgentClient(TOKEN), AgentServer()
    (presented,) = server.receive(client.start())
    assert presented.token == TOKEN
    assert client.receive(server.accept()) == [Connected()]
    assert client.receive(server.agent_ready()) == [AgentReady()]
    up = pcm_of(range(-500, 500, 3))
    down = pcm_of(range(1000, -1000, -7))
    assert server.receive(client.send_audio(up)) == [Audio(up)]
    assert client.receive(server.send_audio(down)) == [Audio(down)]
    assert client.receive(error_message("busy", "agent busy")) == [AgentError("busy", "agent busy")]
    assert client.receive(server.session_ended(reason)) == [SessionEnded(reason)]
    assert (client.state, server.state) == (ClientState.ENDED, ServerState.ENDED)


# --- client: control messages ----------------------------------------------------------------


def test_client_error_before_connected_keeps_waiting():
    client = AgentClient(TOKEN)
    client.start()
    assert client.receive('{"type":"error","code":4001,"message":"Invalid token"}') == [
        AgentError(4001, "Invalid token")
    ]
    assert client.state is ClientState.AWAITING_CONNECTED
    assert client.receive('{"type":"error"}') == [AgentError(None, None)]


def test_client_session_ended_before_connected():
    client = AgentClient(TOKEN)
    client.start()
    assert client.receive('{"type":"session_ended","reason":"server_shutdown"}') == [SessionEnded("server_shutdown")]
    assert client.state is ClientState.ENDED


def test_client_session_ended_reason_passthrough_and_missing():
    client = connected_client()
    assert client.receive('{"type":"session_ended","reason":"idle_timeout"}') == [SessionEnded("idle_timeout")]
    client = connected_client()
    assert client.receive('{"type":"session_ended"}') == [SessionEnded(None)]
    client = connected_client()
    assert client.receive('{"type":"session_ended","reason":null}') == [SessionEnded(None)]


def test_client_unknown_types_are_reported_not_fatal():
    client = AgentClient(TOKEN)
    client.start()
    assert client.receive('{"type":"queued","position":3}') == [Unknown("queued")]
    assert client.state is ClientState.AWAITING_CONNECTED
    assert client.receive(CONNECTED_TEXT) == [Connected()]
    assert client.receive('{"type":"transcript","text":"hi"}') == [Unknown("transcript")]
    assert client.state is ClientState.CONNECTED
    assert client.receive('{"type":"connected_v2"}') == [Unknown("connected_v2")]


def test_client_known_messages_ignore_extra_fields():
    client = AgentClient(TOKEN)
    client.start()
    assert client.receive('{"type":"connected","session_id":"s1"}') == [Connected()]
    assert client.receive('{"type":"agent_ready","agent":"a"}') == [AgentReady()]


def test_client_agent_ready_may_repeat():
    client = connected_client()
    assert client.receive(AGENT_READY_TEXT) == [AgentReady()]
    assert client.receive(AGENT_READY_TEXT) == [AgentReady()]
    assert client.state is ClientState.CONNECTED


# --- client: malformed input, with its close code ---------------------------------------------

_TO_CONNECTED = "connected"
_TO_AWAITING = "awaiting"
_TO_ENDED = "ended"

CLIENT_MALFORMED = [
    # (state to be in, message, close code, fragment of the reason)
    (_TO_AWAITING, FRAME, 1002, "audio before connected"),
    (_TO_AWAITING, b"\x00", 1002, "audio before connected"),
    (_TO_AWAITING, AGENT_READY_TEXT, 1002, "agent_ready message before connected"),
    (_TO_CONNECTED, CONNECTED_TEXT, 1002, "second connected"),
    (_TO_ENDED, CONNECTED_TEXT, 1002, "after session_ended"),
    (_TO_ENDED, '{"type":"session_ended","reason":"session_closed"}', 1002, "after session_ended"),
    (_TO_ENDED, "not json at all", 1002, "after session_ended"),
    (_TO_ENDED, FRAME, 1002, "audio after session_ended"),
    (_TO_CONNECTED, "not json", 1007, "not valid JSON"),
    (_TO_CONNECTED, "", 1007, "not valid JSON"),
    (_TO_CONNECTED, '{"type":"connected"', 1007, "not valid JSON"),
    (_TO_CONNECTED, '{"type":"agent_ready","x":NaN}', 1007, "not valid JSON"),
    (_TO_CONNECTED, "[" * 60000, 1007, "not valid JSON"),  # nesting too deep for the parser
    (_TO_CONNECTED, '["connected"]', 1007, "an array, expected a JSON object"),
    (_TO_CONNECTED, '"connected"', 1007, "a string, expected a JSON object"),
    (_TO_CONNECTED, "42", 1007, "a number, expected a JSON object"),
    (_TO_CONNECTED, "null", 1007, "null, expected a JSON object"),
    (_TO_CONNECTED, "{}", 1007, "has no type"),
    (_TO_CONNECTED, '{"Type":"connected"}', 1007, "has no type"),
    (_TO_CONNECTED, '{"type":5}', 1007, "type is a number"),
    (_TO_CONNECTED, '{"type":null}', 1007, "type is null"),
    (_TO_CONNECTED, '{"type":["error"]}', 1007, "type is an array"),
    (_TO_CONNECTED, '{"type":"session_ended","reason":5}', 1007, "reason is a number"),
    (_TO_CONNECTED, '{"type":"error","code":["x"],"message":"m"}', 1007, "error code is an array"),
    (_TO_CONNECTED, '{"type":"error","code":true,"message":"m"}', 1007, "error code is a boolean"),
    (_TO_CONNECTED, '{"type":"error","code":1.5,"message":"m"}', 1007, "error code is a number"),
    (_TO_CONNECTED, '{"type":"error","code":"c","message":{"a":1}}', 1007, "error message is an object"),
    (_TO_CONNECTED, b"\x00" * (MAX_MESSAGE_BYTES + 1), 1009, "65537 bytes"),
    (_TO_CONNECTED, '{"type":"x","pad":"' + "a" * MAX_MESSAGE_BYTES + '"}', 1009, "64 KiB"),
    # 40 000 characters, 80 000 bytes of UTF-8: the limit is in bytes.
    (_TO_CONNECTED, '{"type":"x","pad":"' + "é" * 40000 + '"}', 1009, "64 KiB"),
]


def client_in(where: str) -> AgentClient:
    if where == _TO_AWAITING:
        client = AgentClient(TOKEN)
        client.start()
        return client
    client = connected_client()
    if where == _TO_ENDED:
        client.receive('{"type":"session_ended","reason":"session_closed"}')
    return client


@pytest.mark.parametrize(("where", "message", "close_code", "fragment"), CLIENT_MALFORMED)
def test_client_malformed(where, message, close_code, fragment):
    client = client_in(where)
    if where == _TO_CONNECTED:
        assert client.receive(FRAME[:3]) == [Audio(FRAME[:2])]  # one byte held
    before = (client.state, client.agent_ready, client.pending_audio_bytes)
    expect_rpe(client, message, close_code, fragment)
    # A refused message changes nothing: the held byte still completes the next sample.
    assert (client.state, client.agent_ready, client.pending_audio_bytes) == before
    if where == _TO_CONNECTED:
        assert client.receive(FRAME[3:]) == [Audio(FRAME[2:])]


def test_client_message_of_exactly_the_limit_is_accepted():
    client = connected_client()
    big = pcm_of(np.arange(MAX_MESSAGE_BYTES // 2) % 30000)
    assert client.receive(big) == [Audio(big)]
    text = '{"type":"x","pad":"' + "a" * (MAX_MESSAGE_BYTES - 21) + '"}'
    assert len(text.encode()) == MAX_MESSAGE_BYTES
    assert client.receive(text) == [Unknown("x")]


def test_client_misuse():
    with pytest.raises(LocalProtocolError):
        AgentClient("")
    with pytest.raises(LocalProtocolError):
        AgentClient(None)  # type: ignore[arg-type]
    client = AgentClient(TOKEN)
    with pytest.raises(LocalProtocolError, match="connected"):
        client.send_audio(FRAME)  # before connected
    client.start()
    with pytest.raises(LocalProtocolError, match="once"):
        client.start()
    with pytest.raises(LocalProtocolError, match="str or bytes"):
        client.receive(42)  # type: ignore[arg-type]
    client.receive(CONNECTED_TEXT)
    for bad in (FRAME[:639], b"", b"\x01", 5, "text"):
        with pytest.raises(LocalProtocolError):
            client.send_audio(bad)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="65538"):
        client.send_audio(b"\x00" * (MAX_MESSAGE_BYTES + 2))
    assert client.send_audio(bytearray(FRAME)) == FRAME
    assert client.send_audio(memoryview(FRAME)) == FRAME
    assert type(client.send_audio(bytearray(FRAME))) is bytes
    client.receive('{"type":"session_ended","reason":"session_closed"}')
    with pytest.raises(LocalProtocolError, match="ENDED"):
        client.send_audio(FRAME)


# --- audio alignment ------------------------------------------------------------------------


def test_641_then_639_bytes_give_two_aligned_frames():
    samples = np.arange(2 * SAMPLES_PER_FRAME, dtype=np.int64) * 101 - 32000
    stream = pcm_of(samples)
    client = connected_client()
    first = client.receive(stream[:641])
    assert [len(e.pcm) for e in first] == [640]
    assert client.pending_audio_bytes == 1
    second = client.receive(stream[641:])
    assert [len(e.pcm) for e in second] == [640]
    assert client.pending_audio_bytes == 0
    assert list(samples_of(first[0].pcm)) == list(samples[:320])
    assert list(samples_of(second[0].pcm)) == list(samples[320:])


@pytest.mark.parametrize("side", ["client", "server"])
def test_split_at_every_byte_offset_reassembles_exactly(side):
    stream = FRAME + FRAME[::-1]  # 1280 bytes, 640 samples
    expected = samples_of(stream)
    for cut in range(len(stream) + 1):
        proto = connected_client() if side == "client" else connected_server()
        events = proto.receive(stream[:cut]) + proto.receive(stream[cut:])
        got = audio_bytes(events)
        assert got == stream, cut
        assert np.array_equal(samples_of(got), expected)
        assert proto.pending_audio_bytes == 0


@pytest.mark.parametrize("side", ["client", "server"])
def test_random_odd_messages_with_text_between_keep_alignment(side):
    rng = random.Random(20240611)
    samples = np.array([rng.randint(-32768, 32767) for _ in range(16000)])  # 1 s
    stream = pcm_of(samples)
    proto = connected_client() if side == "client" else connected_server()
    got = b""
    pos = 0
    while pos < len(stream):
        size = rng.choice([1, 1, 3, 639, 640, 641, 1279, 7])
        got += audio_bytes(proto.receive(stream[pos : pos + size]))
        pos += size
        if rng.random() < 0.2:  # a control message between audio messages
            text = AGENT_READY_TEXT if side == "client" else '{"type":"ping"}'
            assert len(proto.receive(text)) == 1
    assert got == stream
    assert np.array_equal(samples_of(got), samples)


def test_lone_bytes_wait_for_their_partner():
    client = connected_client()
    assert client.receive(b"\x34") == []
    assert client.pending_audio_bytes == 1
    assert client.receive(b"\x12") == [Audio(b"\x34\x12")]
    assert list(samples_of(b"\x34\x12")) == [0x1234]
    assert client.receive(b"") == []  # an empty message carries nothing
    assert client.pending_audio_bytes == 0


def test_odd_byte_held_across_a_text_message():
    client = connected_client()
    assert client.receive(b"\x01\x00\xff") == [Audio(b"\x01\x00")]
    assert client.receive('{"type":"agent_ready"}') == [AgentReady()]
    assert client.receive(b"\x7f") == [Audio(b"\xff\x7f")]
    assert list(samples_of(b"\x01\x00\xff\x7f")) == [1, 32767]


def test_audio_repr_shows_length_not_bytes():
    assert repr(Audio(FRAME)) == "Audio(pcm=<640 bytes>)"


# --- server: the token message ----------------------------------------------------------------

SERVER_FIRST_MALFORMED = [
    (FRAME, "got a binary message"),
    (b"", "got a binary message"),
    ("hello", "got text that is not JSON"),
    ("", "got text that is not JSON"),
    (TOKEN, "got text that is not JSON"),  # the bare token, not wrapped in JSON
    ('{"token": NaN}', "got text that is not JSON"),
    ('["' + TOKEN + '"]', "got an array, not an object"),
    ('"' + TOKEN + '"', "got a string, not an object"),
    ("{}", "got an object with no token"),
    ('{"type":"hello"}', "got an object with no token"),
    ('{"Token":"' + TOKEN + '"}', "got an object with no token"),
    ('{"token":5}', "token is a number, not a string"),
    ('{"token":null}', "token is null, not a string"),
    ('{"token":["' + TOKEN + '"]}', "token is an array, not a string"),
    ('{"token":{"value":"' + TOKEN + '"}}', "token is an object, not a string"),
    ('{"token":""}', "token is empty"),
]


@pytest.mark.parametrize(("message", "fragment"), SERVER_FIRST_MALFORMED)
def test_server_first_message_must_be_the_token(message, fragment):
    server = AgentServer()
    err = expect_rpe(server, message, 1008, fragment)
    assert str(err).startswith('the first message must be {"token": …}: ')
    assert server.state is ServerState.AWAITING_TOKEN


def test_server_first_message_too_big_is_1009():
    server = AgentServer()
    expect_rpe(server, '{"token":"' + "t" * MAX_MESSAGE_BYTES + '"}', 1009, "64 KiB")
    assert server.state is ServerState.AWAITING_TOKEN


def test_server_token_message_extra_fields_ignored():
    server = AgentServer()
    assert server.receive(json.dumps({"token": TOKEN, "client": "web", "type": "auth"})) == [TokenPresented(TOKEN)]


@pytest.mark.parametrize("message", [FRAME, CONNECTED_TEXT, '{"token":"again"}', "garbage"])
def test_server_nothing_between_token_and_accept(message):
    server = AgentServer()
    server.receive(json.dumps({"token": TOKEN}))
    expect_rpe(server, message, 1002, "before connected")
    assert server.state is ServerState.TOKEN_PRESENTED
    assert server.accept() == CONNECTED_TEXT


SERVER_CONNECTED_MALFORMED = [
    ("not json", 1007, "not valid JSON"),
    ("[1,2]", 1007, "an array, expected a JSON object"),
    ('{"kind":"ping"}', 1007, "has no type"),
    ('{"type":7}', 1007, "type is a number"),
    ('{"token":"' + TOKEN + '"}', 1002, "token message sent twice"),
    (b"\x00" * (MAX_MESSAGE_BYTES + 1), 1009, "65537 bytes"),
]


@pytest.mark.parametrize(("message", "close_code", "fragment"), SERVER_CONNECTED_MALFORMED)
def test_server_connected_malformed(message, close_code, fragment):
    server = connected_server()
    assert server.receive(FRAME[:5]) == [Audio(FRAME[:4])]
    expect_rpe(server, message, close_code, fragment)
    assert server.state is ServerState.CONNECTED
    assert server.pending_audio_bytes == 1
    assert server.receive(FRAME[5:]) == [Audio(FRAME[4:])]


def test_server_unknown_client_control_messages():
    server = connected_server()
    assert server.receive('{"type":"ping","t":1}') == [Unknown("ping")]
    assert server.receive('{"type":"mute"}') == [Unknown("mute")]
    assert server.state is ServerState.CONNECTED


def test_server_drops_messages_after_session_ended():
    server = connected_server()
    server.session_ended("agent_disconnected")
    # The client's mic audio in flight, and anything else, until it closes.
    for message in (FRAME, b"\x01", "garbage", CONNECTED_TEXT, b"\x00" * (MAX_MESSAGE_BYTES + 1)):
        assert server.receive(message) == []
    assert server.state is ServerState.ENDED


def test_server_session_ended_reasons_and_misuse():
    for reason in SESSION_END_REASONS:
        server = connected_server()
        assert json.loads(server.session_ended(reason)) == {"type": "session_ended", "reason": reason}
    server = connected_server()
    for bad in ("bye", "", None, "Session_Closed"):
        with pytest.raises(LocalProtocolError, match="agent_disconnected"):
            server.session_ended(bad)  # type: ignore[arg-type]
    assert server.state is ServerState.CONNECTED
    server.session_ended("session_closed")
    with pytest.raises(LocalProtocolError, match="ENDED"):
        server.session_ended("session_closed")
    for call in (server.accept, server.agent_ready, lambda: server.send_audio(FRAME)):
        with pytest.raises(LocalProtocolError):
            call()


def test_server_may_end_before_accept():
    server = AgentServer()
    server.receive(json.dumps({"token": TOKEN}))
    assert server.session_ended("server_shutdown") == '{"type":"session_ended","reason":"server_shutdown"}'
    assert server.state is ServerState.ENDED


def test_server_send_order_misuse():
    server = AgentServer()
    for call in (server.accept, server.agent_ready, lambda: server.send_audio(FRAME)):
        with pytest.raises(LocalProtocolError, match="AWAITING_TOKEN"):
            call()
    server.receive(json.dumps({"token": TOKEN}))
    for call in (server.agent_ready, lambda: server.send_audio(FRAME)):
        with pytest.raises(LocalProtocolError, match="TOKEN_PRESENTED"):
            call()
    server.accept()
    with pytest.raises(LocalProtocolError, match="CONNECTED"):
        server.accept()
    for bad in (FRAME[:-1], b"", b"\x00" * (MAX_MESSAGE_BYTES + 2)):
        with pytest.raises(LocalProtocolError):
            server.send_audio(bad)
    assert server.agent_ready() == AGENT_READY_TEXT
    assert server.agent_ready() == AGENT_READY_TEXT  # again after an agent reconnect


# --- secrets ---------------------------------------------------------------------------------


def test_token_never_in_reprs():
    client = AgentClient(TOKEN)
    client.start()
    client.receive(CONNECTED_TEXT)
    server = AgentServer()
    (presented,) = server.receive(json.dumps({"token": TOKEN}))
    grant = TokenGrant(token=TOKEN, ws_url="wss://agent.example.com/ws")
    for obj in (client, server, presented, grant):
        assert TOKEN not in repr(obj), repr(obj)
        assert TOKEN not in str(obj)
    assert repr(presented) == "TokenPresented()"
    assert repr(grant) == "TokenGrant(ws_url='wss://agent.example.com/ws')"
    assert presented.token == TOKEN and grant.token == TOKEN  # still there for who needs it


def test_peer_strings_echoing_the_token_are_redacted():
    client = connected_client()
    (err,) = client.receive(json.dumps({"type": "error", "code": "bad:" + TOKEN, "message": f"token {TOKEN} expired"}))
    assert err == AgentError("bad:[token]", "token [token] expired")
    (unknown,) = client.receive(json.dumps({"type": TOKEN}))
    assert unknown == Unknown("[token]")
    (ended,) = client.receive(json.dumps({"type": "session_ended", "reason": "revoked " + TOKEN}))
    assert ended == SessionEnded("revoked [token]")

    server = connected_server()
    assert server.receive(json.dumps({"type": "echo-" + TOKEN})) == [Unknown("echo-[token]")]


def test_no_error_raised_anywhere_contains_the_token():
    """Drive every refusal with the token inside the offending message."""
    messages = [
        TOKEN,
        "[" + json.dumps(TOKEN) + "]",
        json.dumps({"type": 1, "t": TOKEN}),
        json.dumps({"type": "session_ended", "reason": [TOKEN]}),
        json.dumps({"type": "error", "code": [TOKEN]}),
        json.dumps({"type": "error", "message": {"t": TOKEN}}),
        json.dumps({"type": "agent_ready", "t": TOKEN}),
        json.dumps({"token": TOKEN}),
        TOKEN.encode() + b"\x00" * MAX_MESSAGE_BYTES,
    ]
    for where in (_TO_AWAITING, _TO_CONNECTED, _TO_ENDED):
        for message in messages:
            client = client_in(where)
            try:
                client.receive(message)
            except RemoteProtocolError as exc:
                assert TOKEN not in str(exc) and TOKEN not in repr(exc)
    for message in messages:
        for server in (AgentServer(), connected_server()):
            try:
                server.receive(message)
            except RemoteProtocolError as exc:
                assert TOKEN not in str(exc) and TOKEN not in repr(exc)
    with pytest.raises(LocalProtocolError) as info:
        AgentClient(TOKEN).send_audio(b"x")
    assert TOKEN not in str(info.value)


# --- REST: token request and response ---------------------------------------------------------


@pytest.mark.parametrize(
    ("api_url", "expected"),
    [
        ("https://api.example.com", "https://api.example.com/api/v1/sdk/token"),
        ("https://api.example.com/", "https://api.example.com/api/v1/sdk/token"),
        ("https://example.com/voice/", "https://example.com/voice/api/v1/sdk/token"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080/api/v1/sdk/token"),
    ],
)
def test_token_url(api_url, expected):
    assert token_url(api_url) == expected


@pytest.mark.parametrize("api_url", ["api.example.com", "ftp://user:hunter2pw@example.com", "wss://x.example.com", ""])
def test_token_url_refuses_non_http(api_url):
    with pytest.raises(LocalProtocolError) as info:
        token_url(api_url)
    assert "hunter2pw" not in str(info.value)


def test_token_request_headers():
    assert token_request_headers(API_KEY) == {
        "Authorization": f"Bearer {API_KEY}",
        "Content-Type": "application/json",
    }
    assert parse_bearer(token_request_headers(API_KEY)["Authorization"]) == API_KEY
    for bad in ("", "two words", None):
        with pytest.raises(LocalProtocolError) as info:
            token_request_headers(bad)  # type: ignore[arg-type]
        assert "two words" not in str(info.value)


def test_token_response_round_trip():
    body = token_response(TOKEN, "wss://agent.example.com/ws")
    assert body == ('{"token":"' + TOKEN + '","ws_url":"wss://agent.example.com/ws"}').encode()
    assert parse_token_response(200, body) == TokenGrant(TOKEN, "wss://agent.example.com/ws")
    for bad in (("", "wss://x"), (TOKEN, ""), (None, "wss://x")):
        with pytest.raises(LocalProtocolError) as info:
            token_response(*bad)  # type: ignore[arg-type]
        assert TOKEN not in str(info.value)


@pytest.mark.parametrize(
    ("ws_url", "api_url", "expected"),
    [
        ("wss://agent.example.com/ws?s=1", None, "wss://agent.example.com/ws?s=1"),
        ("ws://127.0.0.1:9000/ws", None, "ws://127.0.0.1:9000/ws"),
        ("https://agent.example.com/ws", None, "wss://agent.example.com/ws"),  # as new WebSocket() maps it
        ("http://agent.example.com/ws", None, "ws://agent.example.com/ws"),
        ("/ws/session", "https://api.example.com/base/", "wss://api.example.com/ws/session"),
        ("wss://other.example.com/ws", "https://api.example.com", "wss://other.example.com/ws"),
    ],
)
def test_parse_token_response_ws_url(ws_url, api_url, expected):
    body = json.dumps({"token": TOKEN, "ws_url": ws_url}).encode()
    grant = parse_token_response(200, body, api_url=api_url)
    assert grant.ws_url == expected
    assert grant.token == TOKEN


def expect_token_error(status, body, *fragments, permanent, **kwargs) -> TokenRequestError:
    with pytest.raises(TokenRequestError) as info:
        parse_token_response(status, body, **kwargs)
    err = info.value
    assert isinstance(err, ServiceError)
    assert err.status == status
    assert err.permanent is permanent, str(err)
    for fragment in fragments:
        assert fragment in str(err), (fragment, str(err))
    for secret in (TOKEN, API_KEY):
        assert secret not in str(err) and secret not in repr(err)
    return err


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "not a JSON object"),
        (b"<html>ok</html>", "not a JSON object"),
        (b"[]", "not a JSON object"),
        (b"\xff\xfe", "not a JSON object"),
        (json.dumps({"ws_url": "wss://a.example.com/ws"}).encode(), "no token field"),
        (json.dumps({"token": "", "ws_url": "wss://a.example.com/ws"}).encode(), "no token field"),
        (json.dumps({"token": 5, "ws_url": "wss://a.example.com/ws"}).encode(), "no token field"),
        (json.dumps({"token": TOKEN}).encode(), "no ws_url field"),
        (json.dumps({"token": TOKEN, "wsUrl": "wss://a.example.com/ws"}).encode(), "no ws_url field"),
        (json.dumps({"token": TOKEN, "ws_url": None}).encode(), "no ws_url field"),
        (json.dumps({"token": TOKEN, "ws_url": "/ws"}).encode(), "ws_url is not a ws:// or wss:// URL"),
        (json.dumps({"token": TOKEN, "ws_url": "ftp://a.example.com/ws"}).encode(), "ws_url is not"),
    ],
)
def test_parse_token_response_bad_2xx_is_not_permanent(body, fragment):
    expect_token_error(200, body, fragment, permanent=False)


@pytest.mark.parametrize(
    ("status", "fragment", "permanent"),
    [
        (401, "API key rejected", True),
        (403, "API key rejected", True),
        (404, "token endpoint not found", True),
        (400, "malformed", True),
        (418, "request refused", True),
        (408, "timed out", False),
        (429, "rate limited", False),
        (500, "service error", False),
        (502, "service error", False),
        (503, "service error", False),
        (302, "unexpected response", False),
    ],
)
def test_parse_token_response_status_mapping(status, fragment, permanent):
    body = json.dumps({"error": f"bad key {API_KEY}", "token": TOKEN}).encode()
    err = expect_token_error(status, body, fragment, f"HTTP {status}", permanent=permanent)
    assert err.retry_after is None
    assert "bad key" not in str(err)  # the body is never echoed


def test_parse_token_response_429_retry_after():
    err = expect_token_error(429, b"", "rate limited", "retry after 7 s", permanent=False, retry_after="7")
    assert err.retry_after == 7.0
    err = expect_token_error(429, b'{"retry_after": 2.5}', "retry after 2.5 s", permanent=False)
    assert err.retry_after == 2.5
    # The header wins over the body; an HTTP-date needs a clock: not parsed here.
    assert expect_token_error(429, b'{"retry_after": 2}', permanent=False, retry_after="30").retry_after == 30.0
    err = expect_token_error(429, b"", permanent=False, retry_after="Wed, 21 Oct 2015 07:28:00 GMT")
    assert err.retry_after is None
    assert "retry after" not in str(err)
    # retry_after is only read from a 429.
    assert expect_token_error(503, b"", permanent=False, retry_after="7").retry_after is None


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (f"Bearer {API_KEY}", API_KEY),
        (f"bearer {API_KEY}", API_KEY),
        (f"BEARER   {API_KEY}  ", API_KEY),
        (f"Bearer\t{API_KEY}", API_KEY),
        (f"Bearer {API_KEY}".encode(), API_KEY),
        ("Bearer abc+/=:", "abc+/=:"),
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer ", None),
        (f"Basic {API_KEY}", None),
        (f"Token {API_KEY}", None),
        (f"Bearer{API_KEY}", None),
        (f"Bearer {API_KEY} extra", None),
        ("Bearer k\x00ey", None),
        ("Bearer kéy", None),
    ],
)
def test_parse_bearer(header, expected):
    assert parse_bearer(header) == expected
