"""Twilio Media Streams wire (gateway/adapters/twilio/wire.py), without an event loop: the
documented messages both ways, every malformed field with its close code, the order rules,
X-Twilio-Signature against Twilio's own published vectors, and the TwiML we answer with.

Golden messages are the examples of https://www.twilio.com/docs/voice/media-streams/
websocket-messages (the SIDs filled in with hex digits)."""

from __future__ import annotations

import base64
import copy
import json
import xml.etree.ElementTree as ET

import pytest

from gateway.adapters.twilio import wire
from gateway.adapters.twilio.wire import (
    Clear,
    Connected,
    Dtmf,
    Mark,
    Media,
    Play,
    Start,
    State,
    Stop,
    StreamClient,
    StreamServer,
    Unknown,
)
from gateway.errors import LocalProtocolError, RemoteProtocolError

MZ = "MZ" + "0123456789abcdef" * 2
AC = "AC" + "fedcba9876543210" * 2
CA = "CA" + "00112233445566778899aabbccddeeff"
PAYLOAD = bytes(range(256))[:160]  # 20 ms of u-law

CONNECTED = {"event": "connected", "protocol": "Call", "version": "1.0.0"}
START = {
    "event": "start",
    "sequenceNumber": "1",
    "start": {
        "accountSid": AC,
        "streamSid": MZ,
        "callSid": CA,
        "tracks": ["inbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": {"FirstName": "Jane", "LastName": "Doe", "RemoteParty": "Bob"},
    },
    "streamSid": MZ,
}


def media(seq: int = 2, track: str = "inbound", chunk="1", timestamp="5", payload: bytes = PAYLOAD) -> dict:
    return {"event": "media", "sequenceNumber": str(seq),
            "media": {"track": track, "chunk": chunk, "timestamp": timestamp,
                      "payload": base64.b64encode(payload).decode()},
            "streamSid": MZ}


DTMF = {"event": "dtmf", "streamSid": MZ, "sequenceNumber": "5", "dtmf": {"track": "inbound_track", "digit": "1"}}
MARK = {"event": "mark", "sequenceNumber": "4", "streamSid": MZ, "mark": {"name": "my label"}}
STOP = {"event": "stop", "sequenceNumber": "5", "stop": {"accountSid": AC, "callSid": CA}, "streamSid": MZ}


def text(message: dict) -> str:
    return json.dumps(message)


def started() -> StreamServer:
    server = StreamServer()
    assert isinstance(server.receive(text(CONNECTED)), Connected)
    assert isinstance(server.receive(text(START)), Start)
    return server


def refused(server: StreamServer, message, code: int, cause: str) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        server.receive(message if isinstance(message, (str, bytes)) else text(message))
    assert info.value.close_code == code, (info.value.close_code, str(info.value))
    assert cause in str(info.value), str(info.value)
    assert len(str(info.value).encode()) <= 123  # fits a close frame's reason
    return info.value


# =========================================================================== server: Twilio's messages
def test_the_documented_stream_parses_to_events():
    server = StreamServer()
    assert server.receive(text(CONNECTED)) == Connected("Call", "1.0.0")
    start = server.receive(text(START))
    assert start == Start(MZ, AC, CA, ("inbound",), {"FirstName": "Jane", "LastName": "Doe", "RemoteParty": "Bob"}, 1)
    assert server.state is State.STREAMING and server.stream_sid == MZ
    assert "Jane" not in repr(start)  # parameters may be secrets: kept out of repr
    assert server.receive(text(media(2, "outbound", "1", "5"))) == Media("outbound", 1, 5, PAYLOAD)
    assert server.receive(text(media(3, "inbound", "2", "5"))) == Media("inbound", 2, 5, PAYLOAD)
    assert server.receive(text(dict(MARK, sequenceNumber="4"))) == Mark("my label")
    assert server.receive(text(DTMF)) == Dtmf("1", "inbound_track")
    assert server.receive(text(dict(STOP, sequenceNumber="6"))) == Stop(AC, CA)
    assert server.state is State.STOPPED


def test_start_without_connected_and_numbers_as_json_integers_are_accepted():
    # Twilio-compatible services send integers; a start first is still a start
    server = StreamServer()
    start = copy.deepcopy(START)
    start["sequenceNumber"] = 1
    server.receive(text(start))
    event = server.receive(text(dict(media(2, chunk=7, timestamp=140), sequenceNumber=2)))
    assert (event.chunk, event.timestamp) == (7, 140)


def test_a_sequence_gap_is_not_an_error_a_repeat_is():
    server = started()
    server.receive(text(media(2)))
    server.receive(text(media(9)))  # Twilio discarded audio (warning 31930): a gap
    refused(server, media(9), 1002, "sequenceNumber 9 does not follow 9")
    refused(started(), media(1), 1002, "does not follow 1")


def test_order_rules():
    refused(StreamServer(), media(2), 1002, "'media' before start")
    refused(StreamServer(), DTMF, 1002, "'dtmf' before start")
    server = StreamServer()
    server.receive(text(CONNECTED))
    refused(server, CONNECTED, 1002, "connected twice")
    server = started()
    refused(server, START, 1002, "start twice")
    refused(started(), CONNECTED, 1002, "connected")
    server = started()
    server.receive(text(STOP))
    refused(server, media(6), 1002, "'media' after stop")


def test_unknown_events_are_reported_not_refused():
    server = StreamServer()
    assert server.receive('{"event":"hello","x":1}') == Unknown("hello")
    assert server.state is State.AWAITING_START
    server.receive(text(START))
    assert server.receive('{"event":"future-thing"}') == Unknown("future-thing")
    assert server.receive(text(media(2))).payload == PAYLOAD


@pytest.mark.parametrize("message, code, cause", [
    (b'{"event":"media"}', 1003, "binary message"),
    ("not json", 1007, "not valid JSON"),
    ('{"event": NaN}', 1007, "not valid JSON"),
    ("[1,2]", 1007, "an array, expected a JSON object"),
    ('{"streamSid":"x"}', 1007, "no event"),
    ('{"event":5}', 1007, "event is a number"),
    ('{"event":"' + "x" * 70000 + '"}', 1009, "over 65536 bytes"),
])
def test_malformed_messages(message, code, cause):
    refused(started(), message, code, cause)


def _with(message: dict, path: str, value=...) -> dict:
    """A deep copy of `message` with the field at dotted `path` set to `value` (deleted for ...)."""
    result = copy.deepcopy(message)
    *parents, last = path.split(".")
    node = result
    for key in parents:
        node = node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return result


MALFORMED_START = [
    ("sequenceNumber", ..., 1007, "start has no sequenceNumber"),
    ("sequenceNumber", "-1", 1007, "start.sequenceNumber is '-1'"),
    ("sequenceNumber", 1.5, 1007, "expected a non-negative integer"),
    ("sequenceNumber", True, 1007, "a boolean"),
    ("start", ..., 1007, "start has no start"),
    ("start", [], 1007, "start.start is an array, expected an object"),
    ("start.streamSid", ..., 1007, "start has no streamSid"),
    ("start.streamSid", "", 1007, "start.streamSid is empty"),
    ("start.streamSid", 'MZ"<>', 1007, "expected letters and digits"),
    ("streamSid", ..., 1007, "start has no streamSid"),
    ("streamSid", "MZother", 1002, "streamSid differs"),
    ("start.accountSid", 7, 1007, "start.accountSid is a number"),
    ("start.callSid", ..., 1007, "start has no callSid"),
    ("start.tracks", ..., 1007, "start has no tracks"),
    ("start.tracks", [], 1007, "must list inbound"),
    ("start.tracks", ["sideways"], 1007, "must list inbound"),
    ("start.customParameters", {"a": 1}, 1007, "customParameters must be an object of strings"),
    ("start.customParameters", "x", 1007, "customParameters must be an object of strings"),
    ("start.mediaFormat", ..., 1007, "start has no mediaFormat"),
    ("start.mediaFormat.encoding", "audio/x-alaw", 1003, "is not audio/x-mulaw 8000 Hz mono"),
    ("start.mediaFormat.sampleRate", 16000, 1003, "16000 Hz"),
    ("start.mediaFormat.channels", 2, 1003, "2 ch"),
    ("start.mediaFormat.channels", "x", 1007, "start.mediaFormat.channels is 'x'"),
]


@pytest.mark.parametrize("path, value, code, cause", MALFORMED_START)
def test_every_malformed_start_field(path, value, code, cause):
    refused(StreamServer(), _with(START, path, value), code, cause)


def test_start_without_custom_parameters_has_none():
    assert StreamServer().receive(text(_with(START, "start.customParameters"))).custom_parameters == {}


MALFORMED_STREAMING = [
    (media(), "streamSid", ..., 1007, "media has no streamSid"),
    (media(), "streamSid", "MZ" + "1" * 32, 1002, "media names another stream"),
    (media(), "sequenceNumber", ..., 1007, "media has no sequenceNumber"),
    (media(), "sequenceNumber", "2a", 1007, "media.sequenceNumber is '2a'"),
    (media(), "media", ..., 1007, "media has no media"),
    (media(), "media", "x", 1007, "media.media is a string, expected an object"),
    (media(), "media.track", ..., 1007, "media has no track"),
    (media(), "media.track", "both", 1007, "expected inbound or outbound"),
    (media(), "media.chunk", ..., 1007, "media has no chunk"),
    (media(), "media.chunk", "one", 1007, "media.chunk is 'one'"),
    (media(), "media.timestamp", None, 1007, "media.timestamp is null"),
    (media(), "media.payload", ..., 1007, "media has no payload"),
    (media(), "media.payload", 12, 1007, "media.payload is a number"),
    (media(), "media.payload", "no+JhoaJjpz", 1007, "not valid base64"),  # unpadded
    (media(), "media.payload", "no+J hoaJ", 1007, "not valid base64"),
    (media(), "media.payload", "no-_hoaJ", 1007, "not valid base64"),  # the URL-safe alphabet
    (DTMF, "dtmf", ..., 1007, "dtmf has no dtmf"),
    (DTMF, "dtmf.digit", ..., 1007, "dtmf has no digit"),
    (DTMF, "dtmf.digit", "12", 1007, "dtmf.digit is '12'"),
    (DTMF, "dtmf.digit", "x", 1007, "expected one of 0-9 * # A-D"),
    (DTMF, "dtmf.digit", 1, 1007, "dtmf.digit is a number"),
    (DTMF, "dtmf.track", ..., 1007, "dtmf has no track"),
    (MARK, "mark", ..., 1007, "mark has no mark"),
    (MARK, "mark.name", ..., 1007, "mark has no name"),
    (MARK, "mark.name", ["a"], 1007, "mark.name is an array"),
    (STOP, "stop", ..., 1007, "stop has no stop"),
    (STOP, "stop.accountSid", ..., 1007, "stop has no accountSid"),
    (STOP, "stop.callSid", False, 1007, "stop.callSid is a boolean"),
]


@pytest.mark.parametrize("message, path, value, code, cause", MALFORMED_STREAMING)
def test_every_malformed_field_while_streaming(message, path, value, code, cause):
    refused(started(), _with(message, path, value), code, cause)


def test_a_refused_message_changes_nothing():
    server = started()
    refused(server, _with(media(2), "media.payload", "!!"), 1007, "base64")
    assert server.state is State.STREAMING
    assert server.receive(text(media(2))).payload == PAYLOAD  # its sequence number was not taken


def test_dtmf_digits_are_upper_cased_and_empty_payloads_kept():
    server = started()
    assert server.receive(text(_with(DTMF, "dtmf.digit", "a"))).digit == "A"
    assert server.receive(text(media(6, payload=b""))).payload == b""


def test_receive_misuse_is_local():
    with pytest.raises(LocalProtocolError):
        StreamServer().receive(42)  # type: ignore[arg-type]


# ============================================================================ server: what we send
def test_server_messages_match_the_documented_shapes():
    server = started()
    sent = json.loads(server.media(PAYLOAD))
    assert sent == {"event": "media", "streamSid": MZ, "media": {"payload": base64.b64encode(PAYLOAD).decode()}}
    assert json.loads(server.mark("my label")) == {"event": "mark", "streamSid": MZ, "mark": {"name": "my label"}}
    assert server.marks_pending == {"my label"}
    assert json.loads(server.clear()) == {"event": "clear", "streamSid": MZ}
    server.receive(text(dict(MARK, sequenceNumber="3")))
    assert server.marks_pending == set()
    assert json.loads(server.mark('quote " and \\'))["mark"]["name"] == 'quote " and \\'


def test_server_cannot_send_before_start():
    for call in (lambda s: s.media(PAYLOAD), lambda s: s.mark("m"), lambda s: s.clear()):
        with pytest.raises(LocalProtocolError, match="before start"):
            call(StreamServer())
    with pytest.raises(LocalProtocolError, match="u-law bytes"):
        started().media("text")  # type: ignore[arg-type]


# ============================================================================== client (Twilio's part)
def client() -> StreamClient:
    return StreamClient(stream_sid=MZ, call_sid=CA, account_sid=AC, custom_parameters={"FirstName": "Jane"})


def test_client_sends_what_twilio_sends_and_a_server_reads_it_back():
    c, server = client(), StreamServer()
    assert json.loads(c.connected()) == CONNECTED
    start = json.loads(c.start())
    assert start == dict(START, start=dict(START["start"], customParameters={"FirstName": "Jane"}))
    messages = [c.media(PAYLOAD), c.media(PAYLOAD[:80]), c.dtmf("5"), c.mark("m1"), c.media(PAYLOAD), c.stop()]
    first = json.loads(messages[0])
    assert first == {"event": "media", "sequenceNumber": "2",
                     "media": {"track": "inbound", "chunk": "1", "timestamp": "0",
                               "payload": base64.b64encode(PAYLOAD).decode()},
                     "streamSid": MZ}
    server.receive(text(CONNECTED))
    server.receive(json.dumps(start))
    events = [server.receive(m) for m in messages]
    assert events == [Media("inbound", 1, 0, PAYLOAD), Media("inbound", 2, 20, PAYLOAD[:80]), Dtmf("5", "inbound_track"),
                      Mark("m1"), Media("inbound", 3, 30, PAYLOAD), Stop(AC, CA)]
    assert [json.loads(m)["sequenceNumber"] for m in messages] == ["2", "3", "4", "5", "6", "7"]


def test_client_order_and_arguments():
    c = client()
    with pytest.raises(LocalProtocolError):
        c.start()  # before connected
    c.connected()
    with pytest.raises(LocalProtocolError, match="media before start"):
        c.media(PAYLOAD)
    c.start()
    with pytest.raises(LocalProtocolError):
        c.connected()
    with pytest.raises(LocalProtocolError, match="DTMF digit"):
        c.dtmf("x")
    with pytest.raises(LocalProtocolError, match="track"):
        c.media(PAYLOAD, track="both")
    c.stop()
    with pytest.raises(LocalProtocolError, match="after stop"):
        c.media(PAYLOAD)
    with pytest.raises(LocalProtocolError):
        StreamClient(stream_sid='MZ"')
    with pytest.raises(LocalProtocolError):
        StreamClient(custom_parameters={"a": 1})  # type: ignore[dict-item]
    sid = wire.new_sid("MZ")
    assert len(sid) == 34 and sid.startswith("MZ") and int(sid[2:], 16) >= 0
    assert "Jane" not in repr(client())


def test_client_reads_the_servers_messages():
    c = client()
    assert c.receive(json.dumps({"event": "media", "streamSid": MZ, "media": {"payload": "a3242sa="}})) \
        == Play(base64.b64decode("a3242sa="))
    assert c.receive(json.dumps({"event": "mark", "streamSid": MZ, "mark": {"name": "my label"}})) == Mark("my label")
    assert c.receive(json.dumps({"event": "clear", "streamSid": MZ})) == Clear()
    assert c.receive('{"event":"transcript","text":"hi"}') == Unknown("transcript")


@pytest.mark.parametrize("message, code, cause", [
    (b"\xff\x00", 1003, "binary message"),
    ('{"event":"media","media":{"payload":""}}', 1007, "media has no streamSid"),
    ('{"event":"media","streamSid":"MZother","media":{"payload":""}}', 1002, "media names another stream"),
    ('{"event":"clear","streamSid":5}', 1007, "clear.streamSid is a number"),
    ('{"event":"media","streamSid":"%s"}' % MZ, 1007, "media has no media"),
    ('{"event":"media","streamSid":"%s","media":{}}' % MZ, 1007, "media has no payload"),
    ('{"event":"media","streamSid":"%s","media":{"payload":"@@@@"}}' % MZ, 1007, "not valid base64"),
    ('{"event":"mark","streamSid":"%s","mark":{"name":3}}' % MZ, 1007, "mark.name is a number"),
    ('{"event":"mark","streamSid":"%s"}' % MZ, 1007, "mark has no mark"),
])
def test_client_refuses_malformed_server_messages(message, code, cause):
    with pytest.raises(RemoteProtocolError) as info:
        client().receive(message)
    assert info.value.close_code == code and cause in str(info.value), (info.value.close_code, str(info.value))


# ================================================================================ X-Twilio-Signature
URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
PARAMS = {"CallSid": "CA1234567890ABCDE", "Caller": "+14158675309", "Digits": "1234", "From": "+14158675309",
          "To": "+18005551212"}


def test_signature_matches_twilios_published_vectors():
    # twilio-python tests/unit/test_request_validator.py (token "12345")
    assert wire.signature("12345", URL, PARAMS) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    repeated = {"Sid": "CA123", "SidAccount": "AC123", "Digits": ["5678", "1234", "1234"]}
    assert wire.signature("12345", URL, repeated) == "IK+Dwps556ElfBT0I3Rgjkr1wJU="
    assert wire.signature_valid("12345", URL, PARAMS, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    assert wire.signature_valid("12345", URL, {k: [v] for k, v in PARAMS.items()}, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")


def test_signature_is_refused_for_any_other_input():
    good = "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    assert not wire.signature_valid("12346", URL, PARAMS, good)
    assert not wire.signature_valid("12345", URL + "&x=1", PARAMS, good)
    assert not wire.signature_valid("12345", URL, dict(PARAMS, Digits="9999"), good)
    assert not wire.signature_valid("12345", URL, PARAMS, None)
    assert not wire.signature_valid("12345", URL, PARAMS, "")
    assert not wire.signature_valid("12345", URL, PARAMS, "invalid 王")
    assert not wire.signature_valid("", URL, PARAMS, wire.signature("", URL, PARAMS))  # no token: nothing is valid


def test_signature_with_and_without_the_default_port():
    signed = wire.signature("tok", "wss://gw.example.com:443/twilio/desk")
    assert wire.signature_valid("tok", "wss://gw.example.com/twilio/desk", None, signed)
    signed = wire.signature("tok", "wss://gw.example.com/twilio/desk")
    assert wire.signature_valid("tok", "wss://gw.example.com:443/twilio/desk", None, signed)
    assert wire.signature_valid("tok", ["http://a/x", "wss://gw.example.com/twilio/desk"], None, signed)
    signed = wire.signature("tok", "wss://gw.example.com:9443/twilio/desk")  # another port is another URL
    assert not wire.signature_valid("tok", "wss://gw.example.com:8443/twilio/desk", None, signed)
    assert not wire.signature_valid("tok", "ws://gw.example.com/twilio/desk", None, signed)


def test_parse_form_keeps_repeated_and_blank_values():
    assert wire.parse_form(b"A=1&A=2&B=&C=%2B1") == {"A": ["1", "2"], "B": [""], "C": ["+1"]}


# ============================================================================================ TwiML
def test_connect_stream_twiml():
    twiml = wire.connect_stream_twiml("wss://gw.example.com/twilio/desk", {"caller": 'a "b" <c> & d'})
    assert twiml.startswith('<?xml version="1.0" encoding="UTF-8"?><Response>')
    root = ET.fromstring(twiml)
    (connect,) = root
    (stream,) = connect
    (param,) = stream
    assert (root.tag, connect.tag, stream.tag, param.tag) == ("Response", "Connect", "Stream", "Parameter")
    assert stream.get("url") == "wss://gw.example.com/twilio/desk"
    assert (param.get("name"), param.get("value")) == ("caller", 'a "b" <c> & d')
    with pytest.raises(LocalProtocolError, match="31920"):
        wire.connect_stream_twiml("wss://gw.example.com/x?token=1")
    reject = ET.fromstring(wire.reject_twiml())
    assert reject[0].tag == "Reject" and reject[0].get("reason") == "busy"


# ============================================================================================= fuzz
def _mutations(rng, message: dict) -> str | bytes:
    """One seeded corruption of a valid message: a field dropped, retyped or replaced, the text
    cut or garbled, or the message sent as binary."""
    choice = rng.randrange(6)
    data = copy.deepcopy(message)
    paths = []

    def walk(node, prefix):
        for key, value in node.items():
            paths.append(prefix + [key])
            if isinstance(value, dict):
                walk(value, prefix + [key])

    walk(data, [])
    path = rng.choice(paths)
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    odd = [None, True, 0, -1, 1.5, "", "x" * 200, [], {}, "MZ", "\u2028", "9" * 30, "%%", "1e3"]
    if choice == 0:
        del parent[path[-1]]
    elif choice == 1:
        parent[path[-1]] = rng.choice(odd)
    elif choice == 2:
        parent[rng.choice(["extra", "sequenceNumber", "event"])] = rng.choice(odd)
    text = json.dumps(data)
    if choice == 3:
        cut = rng.randrange(len(text))
        text = text[:cut] + text[cut + 1:]
    elif choice == 4:
        return text.encode()
    elif choice == 5:
        i = rng.randrange(len(text))
        text = text[:i] + chr(rng.randrange(32, 0x2000)) + text[i + 1:]
    return text


@pytest.mark.parametrize("seed", range(4))
def test_fuzzed_messages_are_accepted_or_refused_with_a_close_code(seed):
    """h11's invariant: anything a peer sends gives an event or a RemoteProtocolError with a
    close code, never another exception; a refusal leaves the protocol usable."""
    import random

    rng = random.Random(seed)
    server_messages = [CONNECTED, START, media(2), DTMF, MARK, STOP]
    client_messages = [{"event": "media", "streamSid": MZ, "media": {"payload": "AAAA"}},
                       {"event": "mark", "streamSid": MZ, "mark": {"name": "m"}}, {"event": "clear", "streamSid": MZ}]
    for _ in range(1500):
        server = started()
        message = _mutations(rng, rng.choice(server_messages[2:]))
        try:
            server.receive(message)
        except RemoteProtocolError as err:
            assert err.close_code in (1002, 1003, 1007, 1009) and len(str(err).encode()) <= 123
        first = _mutations(rng, rng.choice(server_messages[:2]))
        try:
            StreamServer().receive(first)
        except RemoteProtocolError as err:
            assert err.close_code in (1002, 1003, 1007, 1009)
        try:
            client().receive(_mutations(rng, rng.choice(client_messages)))
        except RemoteProtocolError as err:
            assert err.close_code in (1002, 1003, 1007, 1009)
