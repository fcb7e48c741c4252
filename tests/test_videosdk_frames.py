"""VideoSDK custom WebSocket frames (gateway/adapters/videosdk/frames.py): start / media / stop,
topic pub/sub and lifecycle events, both roles, no event loop.

Spec: /work/shared/protocols/004_c69f0f37162481c1.txt. Examples marked "spec" are copied from it
with their original spacing; frames we build are compared as exact strings.
"""

from __future__ import annotations

import base64
import json
import random
import struct

import numpy as np
import pytest

from gateway.adapters.videosdk.frames import (
    FRAME_BASE64_CHARS,
    FRAME_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_PAYLOAD_BYTES,
    MAX_PCM_BYTES,
    MAX_TOPIC_LENGTH,
    MEETING_JOINED,
    MEETING_LEFT,
    PARTICIPANT_JOINED,
    PARTICIPANT_LEFT,
    PING_INTERVAL_S,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    START_TIMEOUT_CLOSE_CODE,
    START_TIMEOUT_REASON,
    START_TIMEOUT_S,
    IngestClient,
    IngestServer,
    Media,
    MeetingJoined,
    MeetingLeft,
    Message,
    MessagingRefused,
    ParticipantJoined,
    ParticipantLeft,
    Publish,
    PublishRefused,
    Started,
    Stopped,
    Subscribe,
    Unknown,
    Unsubscribe,
)
from gateway.errors import LocalProtocolError, RemoteProtocolError

# 20 ms of a ramp, signed 16-bit little-endian: 160 samples, 320 bytes, every byte value varied.
PCM_20MS = struct.pack("<160h", *range(-16000, 16000, 200))

# --- spec examples, verbatim -----------------------------------------------------------------

SPEC_DELIVERED_MESSAGE = """{
"event": "message",
"topic": "CHAT",
"data": {
"message": "Hello everyone",
"senderId": "participant-uuid",
"senderName": "Alice",
"timestamp": "2026-06-27T14:41:00.000Z",
"id": "msg-uuid"
}
}"""
SPEC_SENDER = {
    "senderId": "participant-uuid",
    "senderName": "Alice",
    "timestamp": "2026-06-27T14:41:00.000Z",
    "id": "msg-uuid",
}


def started_server() -> IngestServer:
    server = IngestServer()
    assert server.receive('{ "event": "start" }') == [Started()]
    return server


def started_client() -> IngestClient:
    client = IngestClient()
    client.start()
    return client


def expect_rpe(role, message, close_code: int, *fragments: str) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        role.receive(message)
    err = info.value
    assert err.close_code == close_code, (str(err), err.close_code)
    for fragment in fragments:
        assert fragment in str(err), (fragment, str(err))
    assert len(str(err).encode("utf-8")) <= 123
    return err


def media_frame(payload) -> str:
    return json.dumps({"event": "media", "payload": payload})


# --- constants the adapter relies on ---------------------------------------------------------


def test_constants_from_the_spec():
    assert (SAMPLE_RATE, SAMPLES_PER_FRAME, FRAME_BYTES, FRAME_BASE64_CHARS) == (8000, 160, 320, 428)
    assert (START_TIMEOUT_S, START_TIMEOUT_CLOSE_CODE, START_TIMEOUT_REASON) == (5, 1008, "start timeout")
    assert PING_INTERVAL_S == 30
    assert (MAX_TOPIC_LENGTH, MAX_PAYLOAD_BYTES, MAX_MESSAGE_BYTES) == (128, 8192, 65536)


# --- client frames -----------------------------------------------------------------------------


def test_client_frames_are_the_spec_frames():
    client = IngestClient()
    assert client.start() == '{"event":"start"}'
    assert client.subscribe("CHAT") == '{"event":"subscribe","topic":"CHAT"}'
    assert client.publish("CHAT", "Hello everyone") == '{"event":"message","topic":"CHAT","data":"Hello everyone"}'
    assert client.unsubscribe("CHAT") == '{"event":"unsubscribe","topic":"CHAT"}'
    assert client.stop() == '{"event":"stop"}'
    # The same objects as the spec's spaced examples (Step 2 and Messaging).
    assert json.loads('{ "event": "start" }') == {"event": "start"}
    assert json.loads('{ "event": "subscribe", "topic": "CHAT" }') == json.loads(
        '{"event":"subscribe","topic":"CHAT"}'
    )


def test_publish_json_value_is_sent_as_is_not_as_a_string():
    client = started_client()
    frame = client.publish("CHAT", {"score": 3, "tags": ["a", "é"]})
    assert frame == '{"event":"message","topic":"CHAT","data":{"score":3,"tags":["a","é"]}}'
    assert client.publish("CHAT", None) == '{"event":"message","topic":"CHAT","data":null}'
    assert client.publish("CHAT", 12) == '{"event":"message","topic":"CHAT","data":12}'


def test_media_20ms_frame_is_428_base64_characters():
    client = started_client()
    frame = client.media(PCM_20MS)
    expected_payload = base64.b64encode(PCM_20MS).decode()
    assert frame == '{"event":"media","payload":"' + expected_payload + '"}'
    payload = json.loads(frame)["payload"]
    assert len(payload) == 428  # spec: "roughly 428 base64 characters"
    assert base64.b64decode(payload) == PCM_20MS
    assert client.media_out == 1


def test_media_accepts_buffers_and_numpy_int16():
    client = started_client()
    samples = np.arange(-80, 80, dtype="<i2") * 100
    expected = client.media(samples.tobytes())
    assert client.media(samples) == expected
    assert client.media(bytearray(samples.tobytes())) == expected
    assert client.media(memoryview(samples.tobytes())) == expected


@pytest.mark.parametrize(
    "pcm, fragment",
    [
        (b"\x01\x02\x03", "even byte count"),
        (b"", "0 bytes"),
        (bytes(MAX_PCM_BYTES + 2), "limit"),
        ("not bytes", "str"),
        (np.zeros(320, dtype="<i2")[::2], "contiguous"),
        (memoryview(bytes(640))[::2], "contiguous"),
    ],
)
def test_media_refuses_what_is_not_whole_pcm16(pcm, fragment):
    with pytest.raises(LocalProtocolError) as info:
        started_client().media(pcm)
    assert fragment in str(info.value)


def test_media_largest_chunk_fits_one_message():
    pcm = PCM_20MS * (MAX_PCM_BYTES // len(PCM_20MS))
    assert len(pcm) == MAX_PCM_BYTES
    frame = started_client().media(pcm)
    assert len(frame.encode()) <= MAX_MESSAGE_BYTES
    assert started_server().receive(frame) == [Media(pcm)]


def test_client_send_order_is_enforced():
    client = IngestClient()
    for send in (lambda: client.media(PCM_20MS), client.stop, lambda: client.subscribe("A"),
                 lambda: client.publish("A", "x")):
        with pytest.raises(LocalProtocolError, match="before start"):
            send()
    client.start()
    with pytest.raises(LocalProtocolError, match="twice"):
        client.start()
    client.stop()
    assert client.stopped
    with pytest.raises(LocalProtocolError, match="after stop"):
        client.media(PCM_20MS)
    with pytest.raises(LocalProtocolError, match="after stop"):
        client.stop()
    # Room audio still in flight after our stop is still decoded.
    assert client.receive(media_frame(base64.b64encode(PCM_20MS).decode())) == [Media(PCM_20MS)]


def test_subscriptions_are_tracked_for_resubscribe():
    client = started_client()
    client.subscribe("CHAT")
    client.subscribe("ALERTS")
    client.unsubscribe("CHAT")
    assert client.subscriptions == frozenset({"ALERTS"})


# --- client receiving ------------------------------------------------------------------------


def test_client_receives_the_spec_delivered_message():
    [event] = started_client().receive(SPEC_DELIVERED_MESSAGE)
    assert event == Message(
        topic="CHAT",
        data="Hello everyone",
        sender=SPEC_SENDER,
        sender_id="participant-uuid",
        sender_name="Alice",
        timestamp="2026-06-27T14:41:00.000Z",
        message_id="msg-uuid",
    )


def test_client_receives_a_message_whose_data_is_a_bare_string():
    [event] = IngestClient().receive('{"event":"message","topic":"CHAT","data":"hi"}')
    assert (event.topic, event.data, event.sender, event.sender_id) == ("CHAT", "hi", None, None)


def test_client_receives_room_audio_in_the_spec_shape():
    payload = base64.b64encode(PCM_20MS).decode()
    client = IngestClient()
    assert client.receive('{ "event": "media", "payload": "%s" }' % payload) == [Media(PCM_20MS)]
    assert client.media_in == 1
    assert client.receive(media_frame("")) == []  # no audio, no event


def test_client_lifecycle_events_from_the_example():
    client = IngestClient()
    joined = {"event": PARTICIPANT_JOINED, "participant": {"id": "p1", "name": "Bob", "metadata": {"k": 1}}}
    assert client.receive(json.dumps(joined)) == [ParticipantJoined("p1", "Bob", {"k": 1}, joined)]
    left = {"event": PARTICIPANT_LEFT, "participant": {"id": "p1"}}
    assert client.receive(json.dumps(left)) == [ParticipantLeft("p1", None, None, left)]
    meeting = {"event": MEETING_JOINED, "roomId": "abcd-efgh-ijkl", "sessionId": "s1"}
    assert client.receive(json.dumps(meeting)) == [MeetingJoined("abcd-efgh-ijkl", "s1", meeting)]
    ended = {"event": MEETING_LEFT, "message": "Meeting Ended."}
    assert client.receive(json.dumps(ended)) == [MeetingLeft("Meeting Ended.", ended)]
    assert client.receive('{"event":"meeting-left"}') == [MeetingLeft(None, {"event": "meeting-left"})]


def test_lifecycle_events_are_lenient_about_field_types():
    client = IngestClient()
    odd = {"event": PARTICIPANT_JOINED, "participant": {"id": 7, "name": ["x"], "metadata": "m"}}
    assert client.receive(json.dumps(odd)) == [ParticipantJoined(None, None, None, odd)]
    odd = {"event": PARTICIPANT_LEFT, "participant": "p1"}
    assert client.receive(json.dumps(odd)) == [ParticipantLeft(None, None, None, odd)]
    odd = {"event": MEETING_JOINED, "roomId": 5}
    assert client.receive(json.dumps(odd)) == [MeetingJoined(None, None, odd)]


def test_unknown_events_are_forwarded_not_refused():
    frame = {"event": "error", "code": 4001, "message": "something new"}
    assert IngestClient().receive(json.dumps(frame)) == [Unknown("error", frame)]
    frame = {"event": "mark", "name": "x"}
    assert started_server().receive(json.dumps(frame)) == [Unknown("mark", frame)]


@pytest.mark.parametrize(
    "frame, fragment",
    [
        ('{"event":"message","data":"x"}', "topic is null"),
        ('{"event":"message","topic":5,"data":"x"}', "topic is a number"),
        ('{"event":"message","topic":"CHAT"}', "no data"),
        ('{"event":"message","topic":"CHAT","data":[1]}', "data is an array"),
        ('{"event":"message","topic":"CHAT","data":{"senderId":"p"}}', "data.message is null"),
        ('{"event":"message","topic":"CHAT","data":{"message":{"a":1}}}', "data.message is an object"),
    ],
)
def test_client_refuses_malformed_delivered_messages(frame, fragment):
    expect_rpe(IngestClient(), frame, 1007, fragment)


# --- malformed frames, both roles --------------------------------------------------------------

ROLES = {"client": IngestClient, "server": started_server}


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(
    "message, close_code, fragment",
    [
        (b'{"event":"start"}', 1003, "binary"),
        (bytearray(b"\x00\x01"), 1003, "binary"),
        (memoryview(b"{}"), 1003, "binary"),
        ("not json", 1007, "not valid JSON"),
        ("", 1007, "not valid JSON"),
        ('{"event":"media","payload":NaN}', 1007, "not valid JSON"),
        ('{"event":"media"', 1007, "not valid JSON"),
        ("[1, 2]", 1007, "array"),
        ('"media"', 1007, "string"),
        ("{}", 1007, "no event"),
        ('{"event":null}', 1007, "event is null"),
        ('{"event":5}', 1007, "event is a number"),
        ('{"event":"media"}', 1007, "no payload"),
        ('{"event":"media","payload":null}', 1007, "payload is null"),
        ('{"event":"media","payload":320}', 1007, "payload is a number"),
        ('{"event":"media","payload":"!!!!"}', 1007, "base64"),
        ('{"event":"media","payload":"QUJ"}', 1007, "base64"),  # padding missing
        ('{"event":"media","payload":"QUJD\\nRA=="}', 1007, "base64"),  # whitespace
        ('{"event":"media","payload":"QU-_"}', 1007, "base64"),  # URL-safe alphabet
        ('{"event":"media","payload":"QUJDé"}', 1007, "base64"),
    ],
)
def test_malformed_frames_close_with_the_right_code(role, message, close_code, fragment):
    expect_rpe(ROLES[role](), message, close_code, fragment)


@pytest.mark.parametrize("role", ROLES)
def test_message_size_limit_is_64_kib_of_utf8(role):
    head, tail = '{"event":"x-pad","pad":"', '"}'
    at_limit = head + "a" * (MAX_MESSAGE_BYTES - len(head) - len(tail)) + tail
    assert len(at_limit.encode()) == MAX_MESSAGE_BYTES
    [event] = ROLES[role]().receive(at_limit)
    assert isinstance(event, Unknown)
    expect_rpe(ROLES[role](), at_limit[:-2] + 'a"}', 1009, "65536")
    # Fewer than 64 Ki characters, more than 64 KiB: measured in UTF-8 bytes, not characters.
    wide = head + "é" * ((MAX_MESSAGE_BYTES - len(head) - len(tail)) // 2 + 1) + tail
    assert len(wide) < MAX_MESSAGE_BYTES < len(wide.encode())
    expect_rpe(ROLES[role](), wide, 1009)


def test_close_reasons_stay_within_123_bytes_for_long_peer_strings():
    err = expect_rpe(IngestServer(), json.dumps({"event": "é" * 500}), 1008, "expected the start frame")
    assert "..." in str(err)


def test_receive_of_another_type_is_our_bug():
    with pytest.raises(LocalProtocolError):
        IngestClient().receive({"event": "start"})  # type: ignore[arg-type]


def test_fuzz_never_raises_anything_but_remote_protocol_error():
    rng = random.Random(4)
    seeds = [
        '{"event":"start"}',
        '{"event":"media","payload":"%s"}' % base64.b64encode(PCM_20MS[:30]).decode(),
        '{"event":"message","topic":"CHAT","data":{"message":"hi","senderId":"p"}}',
        '{"event":"subscribe","topic":"CHAT"}',
        '{"event":"participant-joined","participant":{"id":"p","name":"n","metadata":{}}}',
        '{"event":"stop"}',
    ]
    alphabet = '{}[]":,\\0123456789abcdefghijklmnopqrstuvwxyzé=+/ \n-'
    for _ in range(3000):
        text = list(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(text) + 1)
            op = rng.random()
            if op < 0.4 and text:
                del text[min(pos, len(text) - 1)]
            elif op < 0.8:
                text.insert(pos, rng.choice(alphabet))
            elif text:
                text[min(pos, len(text) - 1)] = rng.choice(alphabet)
        message = "".join(text)
        for role in (IngestClient(), started_server(), IngestServer()):
            try:
                events = role.receive(message)
            except RemoteProtocolError as err:
                assert err.close_code in (1002, 1003, 1007, 1008, 1009)
                assert len(str(err).encode()) <= 123
            else:
                assert isinstance(events, list) and len(events) <= 1


# --- odd byte counts ---------------------------------------------------------------------------


def test_odd_payload_carries_a_byte_to_the_next_frame():
    client = IngestClient()
    b64 = lambda data: media_frame(base64.b64encode(data).decode())  # noqa: E731
    assert client.receive(b64(PCM_20MS[:3])) == [Media(PCM_20MS[:2])]
    assert client.receive(b64(PCM_20MS[3:4])) == [Media(PCM_20MS[2:4])]
    assert client.receive(b64(PCM_20MS[4:5])) == []  # one byte: half a sample, held
    assert client.receive(media_frame("")) == []  # empty payload keeps the held byte
    assert client.receive(b64(PCM_20MS[5:8])) == [Media(PCM_20MS[4:8])]


@pytest.mark.parametrize("role", ROLES)
def test_frame_split_at_every_byte_offset_gives_the_same_samples(role):
    for cut in range(len(PCM_20MS) + 1):
        receiver = ROLES[role]()
        pcm = b""
        for part in (PCM_20MS[:cut], PCM_20MS[cut:]):
            for event in receiver.receive(media_frame(base64.b64encode(part).decode())):
                assert len(event.pcm) % 2 == 0
                pcm += event.pcm
        assert pcm == PCM_20MS, cut


# --- server (listen side) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame, shown",
    [
        (media_frame(base64.b64encode(PCM_20MS).decode()), "'media'"),
        ('{"event":"stop"}', "'stop'"),
        ('{"event":"subscribe","topic":"CHAT"}', "'subscribe'"),
        ('{"event":"hello"}', "'hello'"),
    ],
)
def test_server_requires_the_start_frame_first(frame, shown):
    server = IngestServer()
    expect_rpe(server, frame, 1008, "expected the start frame first", shown)
    assert not server.started


def test_server_checks_framing_before_order():
    expect_rpe(IngestServer(), b"\x00" * 320, 1003)
    expect_rpe(IngestServer(), "garbage", 1007)


def test_server_second_start_is_a_protocol_error():
    expect_rpe(started_server(), '{"event":"start"}', 1002, "twice")


def test_server_ignores_everything_after_stop():
    server = started_server()
    assert server.receive('{"event":"stop"}') == [Stopped()]
    assert server.stopped
    assert server.receive(media_frame(base64.b64encode(PCM_20MS).decode())) == []
    assert server.receive(b"binary") == []
    assert server.receive("not json") == []


@pytest.mark.parametrize(
    "frame, fragment",
    [
        ('{"event":"subscribe"}', "subscribe frame has no topic"),
        ('{"event":"unsubscribe","topic":null}', "topic is null"),
        ('{"event":"subscribe","topic":["CHAT"]}', "topic is an array"),
        ('{"event":"message","data":"x"}', "message frame has no topic"),
        ('{"event":"message","topic":"CHAT"}', "no data"),
    ],
)
def test_server_refuses_malformed_messaging_frames(frame, fragment):
    expect_rpe(started_server(), frame, 1007, fragment)


def test_server_builders_need_a_started_open_session():
    server = IngestServer()
    for build in (lambda: server.media(PCM_20MS), lambda: server.deliver("CHAT", "x"),
                  lambda: server.event(MEETING_JOINED)):
        with pytest.raises(LocalProtocolError, match="before"):
            build()
    server.receive('{"event":"start"}')
    server.receive('{"event":"stop"}')
    with pytest.raises(LocalProtocolError, match="after"):
        server.media(PCM_20MS)


def test_server_deliver_is_the_spec_delivered_message():
    frame = started_server().deliver("CHAT", "Hello everyone", SPEC_SENDER)
    assert json.loads(frame) == json.loads(SPEC_DELIVERED_MESSAGE)
    assert frame == (
        '{"event":"message","topic":"CHAT","data":{"message":"Hello everyone","senderId":"participant-uuid",'
        '"senderName":"Alice","timestamp":"2026-06-27T14:41:00.000Z","id":"msg-uuid"}}'
    )


def test_server_deliver_serializes_json_values_and_checks_sender():
    server = started_server()
    frame = json.loads(server.deliver("CHAT", {"a": [1, 2]}))
    assert frame["data"] == {"message": '{"a":[1,2]}'}
    with pytest.raises(LocalProtocolError, match="message"):
        server.deliver("CHAT", "x", {"message": "spoof"})
    with pytest.raises(LocalProtocolError, match="dict"):
        server.deliver("CHAT", "x", ["senderId"])  # type: ignore[arg-type]
    with pytest.raises(PublishRefused):
        server.deliver("", "x")


def test_server_event_builder():
    server = started_server()
    assert server.event(MEETING_JOINED, roomId="abcd-efgh-ijkl", sessionId="s1") == (
        '{"event":"meeting-joined","roomId":"abcd-efgh-ijkl","sessionId":"s1"}'
    )
    with pytest.raises(LocalProtocolError):
        server.event("")
    with pytest.raises(LocalProtocolError):
        server.event("x", value=object())


# --- round trips --------------------------------------------------------------------------------


def test_round_trip_client_to_server_every_frame():
    client, server = IngestClient(), IngestServer()
    assert server.receive(client.start()) == [Started()]
    assert server.receive(client.media(PCM_20MS)) == [Media(PCM_20MS)]
    assert server.receive(client.subscribe("CHAT")) == [Subscribe("CHAT")]
    hello = "Hello everyone"
    assert server.receive(client.publish("CHAT", hello)) == [Publish("CHAT", hello, hello)]
    value = {"ok": True, "n": [1, 2.5, None], "text": "naïve €"}
    serialized = '{"ok":true,"n":[1,2.5,null],"text":"naïve €"}'  # what subscribers receive
    assert server.receive(client.publish("CHAT", value)) == [Publish("CHAT", serialized, value)]
    assert server.receive(client.unsubscribe("CHAT")) == [Unsubscribe("CHAT")]
    assert server.receive(client.stop()) == [Stopped()]
    assert (server.media_in, client.media_out) == (1, 1)


def test_round_trip_server_to_client_every_frame():
    client, server = IngestClient(), started_server()
    assert client.receive(server.media(PCM_20MS)) == [Media(PCM_20MS)]
    [message] = client.receive(server.deliver("CHAT", "Hello everyone", SPEC_SENDER))
    assert (message.topic, message.data, message.sender) == ("CHAT", "Hello everyone", SPEC_SENDER)
    [message] = client.receive(server.deliver("CHAT", "plain"))
    assert (message.data, message.sender) == ("plain", {})
    participant = {"id": "p1", "name": "Bob", "metadata": {"deviceId": "dev_12"}}
    [joined] = client.receive(server.event(PARTICIPANT_JOINED, participant=participant))
    assert (joined.participant_id, joined.name, joined.metadata) == ("p1", "Bob", {"deviceId": "dev_12"})
    [left] = client.receive(server.event(PARTICIPANT_LEFT, participant=participant))
    assert isinstance(left, ParticipantLeft) and left.participant_id == "p1"
    [meeting] = client.receive(server.event(MEETING_JOINED, roomId="r", sessionId="s"))
    assert (meeting.room_id, meeting.session_id) == ("r", "s")
    [ended] = client.receive(server.event(MEETING_LEFT, message="bye"))
    assert ended.message == "bye"


def test_publish_delivered_to_a_subscriber_end_to_end():
    """Publisher → gateway server → deliver → subscriber: the subscriber gets the serialized text."""
    publisher, server, subscriber = started_client(), started_server(), IngestClient()
    [publish] = server.receive(publisher.publish("CHAT", {"x": 1}))
    [message] = subscriber.receive(server.deliver(publish.topic, publish.data, {"senderId": "pub"}))
    assert (message.topic, json.loads(message.data), message.sender_id) == ("CHAT", {"x": 1}, "pub")


# --- topic and payload limits -------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic, ok",
    [
        ("a" * 128, True),
        ("a" * 129, False),
        ("é" * 128, True),  # BMP characters count 1 each
        ("😀" * 64, True),  # 64 emoji = 128 UTF-16 code units
        ("😀" * 65, False),  # 65 code points, 130 UTF-16 code units
        ("", False),
    ],
)
def test_topic_limit_at_and_over_the_edge(topic, ok):
    client, server = started_client(), started_server()
    frame = json.dumps({"event": "message", "topic": topic, "data": "x"})
    if ok:
        assert json.loads(client.publish(topic, "x"))["topic"] == topic
        assert json.loads(client.subscribe(topic))["topic"] == topic
        assert server.receive(frame) == [Publish(topic, "x", "x")]
        assert server.receive(json.dumps({"event": "subscribe", "topic": topic})) == [Subscribe(topic)]
        return
    with pytest.raises(PublishRefused) as info:
        client.publish(topic, "x")
    assert info.value.field == "topic"
    assert isinstance(info.value, LocalProtocolError)
    with pytest.raises(LocalProtocolError):
        client.subscribe(topic)
    [refused] = server.receive(frame)
    assert isinstance(refused, MessagingRefused)
    assert (refused.event, refused.topic, refused.close_code) == ("message", topic, 1008)
    [refused] = server.receive(json.dumps({"event": "unsubscribe", "topic": topic}))
    assert (refused.event, refused.close_code) == ("unsubscribe", 1008)
    if topic:
        assert "130" in refused.reason or "129" in refused.reason
        assert "limit 128" in refused.reason
    else:
        assert refused.reason == "topic is empty"


@pytest.mark.parametrize(
    "data, size",
    [
        ("a" * 8192, 8192),
        ("é" * 4096, 8192),  # 4096 characters, 2 bytes each
        ("€" * 2730 + "é", 8192),  # 3-byte characters
        ({"k": "a" * 8184}, 8192),  # serialized: {"k":"…"} = 6 + 8184 + 2 bytes
        ("a" * 8193, 8193),
        ("é" * 4096 + "a", 8193),
        ("€" * 2731, 8193),  # only 2731 characters, but 8193 bytes
        ({"k": "a" * 8185}, 8193),
    ],
)
def test_payload_limit_is_8192_utf8_bytes(data, size):
    client, server = started_client(), started_server()
    frame = json.dumps({"event": "message", "topic": "CHAT", "data": data}, ensure_ascii=False)
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    assert len(text.encode()) == size
    if size <= MAX_PAYLOAD_BYTES:
        assert json.loads(client.publish("CHAT", data))["data"] == data
        assert server.receive(frame) == [Publish("CHAT", text, data)]
        assert json.loads(server.deliver("CHAT", text))["data"]["message"] == text
        return
    with pytest.raises(PublishRefused) as info:
        client.publish("CHAT", data)
    assert info.value.field == "data"
    assert "8193 bytes" in str(info.value) and "8192" in str(info.value)
    [refused] = server.receive(frame)
    assert refused == MessagingRefused("message", "CHAT", "payload is 8193 bytes of UTF-8, limit 8192 (8 KB)", 1009)
    with pytest.raises(PublishRefused, match="8193 bytes"):
        server.deliver("CHAT", text)


@pytest.mark.parametrize("data", [object(), float("nan"), {1, 2}, "\ud800"])
def test_publish_refuses_data_that_is_not_json_text(data):
    with pytest.raises(PublishRefused) as info:
        started_client().publish("CHAT", data)
    assert info.value.field == "data"


def test_server_refuses_lone_surrogates_without_dropping_the_call():
    server = started_server()
    [refused] = server.receive('{"event":"message","topic":"CHAT","data":"\\ud800"}')
    assert (refused.close_code, refused.event) == (1007, "message")
    assert server.receive('{"event":"stop"}') == [Stopped()]  # the stream goes on
