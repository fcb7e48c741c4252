"""Server-sent events parser and Argon's event payloads (gateway/adapters/argon/sse.py).

The parser follows the WHATWG HTML standard §9.2.6 "Interpreting an event stream"; the
examples marked "spec" are the standard's own (§9.2.6 and §9.2.4 "Parsing an event stream").
No event loop needed.
"""

from __future__ import annotations

import json

import pytest

from gateway.adapters.argon.sse import (
    ARGON_EPOCH_MS,
    MAX_EVENT_BYTES,
    MAX_LINE_BYTES,
    ArgonUser,
    CallEnded,
    CallIncoming,
    Heartbeat,
    OtherEvent,
    Ready,
    Resumed,
    SseEvent,
    SseMalformed,
    SseParser,
    VoiceJoin,
    VoiceLeave,
    parse_argon_event,
    parse_user_flags,
)
from gateway.errors import LocalProtocolError, RemoteProtocolError


def parse(stream: bytes, *, close: bool = True) -> list:
    parser = SseParser()
    out = parser.feed(stream)
    if close:
        out += parser.close()
    return out


def parse_split(stream: bytes, cuts: list[int]) -> list:
    parser = SseParser()
    out = []
    start = 0
    for cut in [*cuts, len(stream)]:
        out += parser.feed(stream[start:cut])
        start = cut
    return out + parser.close()


def assert_split_invariant(stream: bytes) -> list:
    """One piece, one byte at a time, and cut in two at every offset: the same results."""
    whole = parse(stream)
    assert parse_split(stream, list(range(1, len(stream)))) == whole
    for offset in range(len(stream) + 1):
        assert parse_split(stream, [offset]) == whole, offset
    assert parse_split(stream, [0, 0, len(stream) // 2, len(stream) // 2]) == whole  # empty feeds
    return whole


def ev(data: str, event: str = "message", id: str | None = None, retry_ms: int | None = None) -> SseEvent:
    return SseEvent(event=event, data=data, id=id, retry_ms=retry_ms)


# --- the standard's examples ------------------------------------------------------------


def test_spec_stock_ticker_example():
    # spec §9.2.6: "data: YHOO / data: +2 / data: 10" fires one event, data "YHOO\n+2\n10"
    assert assert_split_invariant(b"data: YHOO\ndata: +2\ndata: 10\n\n") == [ev("YHOO\n+2\n10")]


def test_spec_test_stream_with_ids():
    # spec: three events: "first event" with id 1, "second event" with the id reset to empty,
    # " third event" (one leading space kept) with an empty id
    stream = b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n"
    assert assert_split_invariant(stream) == [ev("first event", id="1"), ev("second event"), ev(" third event")]


def test_spec_empty_data_example():
    # spec: the first block fires an event with empty data, the middle one data "\n"; the
    # last block is not followed by a blank line: discarded
    stream = b"data\n\ndata\ndata\n\ndata:"
    out = assert_split_invariant(stream)
    assert out[:2] == [ev(""), ev("\n")]
    assert out[2:] == [SseMalformed("stream ended inside an event; incomplete event discarded")]


def test_spec_two_identical_events():
    # spec: "data:test" and "data: test" are the same (one leading space removed)
    assert assert_split_invariant(b"data:test\n\ndata: test\n\n") == [ev("test"), ev("test")]


def test_spec_event_types():
    stream = b"event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\nevent: add\ndata: 113411\n\n"
    assert assert_split_invariant(stream) == [
        ev("73857293", "add"), ev("2153", "remove"), ev("113411", "add"),
    ]


def test_spec_comments_and_two_line_message():
    stream = b": this is a test stream\n\ndata: some text\n\ndata: another message\ndata: with two lines\n\n"
    assert assert_split_invariant(stream) == [ev("some text"), ev("another message\nwith two lines")]


def test_retry_and_id_examples():
    stream = b"retry: 10000\n\nid: 42\nevent: messageCreate\ndata: {}\n\nretry: 5x\ndata: a\n\nretry:\ndata: b\n\n"
    assert assert_split_invariant(stream) == [
        ev("{}", "messageCreate", id="42", retry_ms=10000),  # the retry-only block set it
        ev("a", id="42", retry_ms=10000),  # "5x" is not digits: ignored
        ev("b", id="42", retry_ms=10000),
    ]
    parser = SseParser()
    parser.feed(b"retry: 3000\n")
    assert parser.retry_ms == 3000  # set as soon as the line is read
    for bad in (b"-1", b"1.5", b" 7", b"\xd9\xa3"):  # Arabic-Indic digit three is not ASCII
        parser = SseParser()
        assert parser.feed(b"retry: " + bad + b"\ndata: x\n\n") == [ev("x")]
        assert parser.retry_ms is None
    parser = SseParser()
    parser.feed(b"retry: " + b"9" * 5000 + b"\n")  # more digits than int() takes: ignored
    assert parser.retry_ms is None


# --- line ends, fields ------------------------------------------------------------------


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"])
def test_every_line_end(eol):
    stream = eol.join([b"event: a", b"id: 7", b"data: one", b"data: two", b"", b"data: three", b"", b""])
    assert assert_split_invariant(stream) == [ev("one\ntwo", "a", id="7"), ev("three", id="7")]


def test_mixed_line_ends_and_crlf_split_across_feeds():
    stream = b"data: a\r\ndata: b\rdata: c\n\r\ndata: d\r\r"
    assert assert_split_invariant(stream) == [ev("a\nb\nc"), ev("d")]
    # CR at the end of one feed, LF at the start of the next: one line end, not two
    parser = SseParser()
    assert parser.feed(b"data: x\r") == []
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\r") == [ev("x")]
    # CR then CR: two line ends (the second is the blank line)
    parser = SseParser()
    assert parser.feed(b"data: y\r") == []
    assert parser.feed(b"\r") == [ev("y")]


def test_field_parsing():
    stream = (
        b"data:no space\n\n"
        b"data:  two spaces\n\n"
        b"data: colon: inside\n\n"
        b"data\n\n"
        b"unknown: field\ndata: kept\nDATA: ignored (names are case-sensitive)\n\n"
        b"event\ndata: e\n\n"
        b"data: \n\n"
    )
    assert assert_split_invariant(stream) == [
        ev("no space"), ev(" two spaces"), ev("colon: inside"), ev(""), ev("kept"), ev("e"), ev(""),
    ]


def test_event_without_data_is_not_dispatched_and_its_type_is_reset():
    stream = b"event: lonely\n\ndata: after\n\nevent: x\nid: 3\n\ndata: y\n\n"
    assert assert_split_invariant(stream) == [ev("after"), ev("y", id="3")]


def test_ids_persist_reset_and_refuse_nul():
    stream = b"id: 1\ndata: a\n\ndata: b\n\nid: 2\0x\ndata: c\n\nid:\ndata: d\n\nid: 5\n\ndata: e\n\n"
    assert assert_split_invariant(stream) == [
        ev("a", id="1"), ev("b", id="1"), ev("c", id="1"),  # an id with NUL is ignored
        ev("d"), ev("e", id="5"),  # the empty id resets; an id-only block still sets it
    ]
    parser = SseParser()
    parser.feed(b"id: abc123def456_42\n")
    assert parser.last_event_id == "abc123def456_42"  # known before the event is dispatched
    parser.feed(b"id\n")
    assert parser.last_event_id is None


def test_parser_for_a_resumed_connection_starts_from_the_last_id():
    parser = SseParser(last_event_id="42")
    assert parser.last_event_id == "42"
    assert parser.feed(b"data: replayed\n\n") == [ev("replayed", id="42")]
    with pytest.raises(LocalProtocolError):
        SseParser(last_event_id="a\0b")


def test_bom_stripped_once():
    bom = b"\xef\xbb\xbf"
    assert assert_split_invariant(bom + b"data: x\n\n") == [ev("x")]
    # a second BOM is part of the first line: field "\ufeffdata" is unknown, ignored
    assert assert_split_invariant(bom + bom + b"data: x\n\ndata: y\n\n") == [ev("y")]
    # only at the start of the stream
    assert assert_split_invariant(b"data: x\n\n" + bom + b"data: y\n\n") == [ev("x")]
    # something that starts like a BOM but is not one is kept (and is not UTF-8 here)
    out = assert_split_invariant(b"\xef\xbbdata: x\n\ndata: y\n\n")
    assert out == [SseMalformed("line is not valid UTF-8; event dropped"), ev("y")]
    assert parse(b"\xef\xbb\xbf") == []  # a BOM and nothing else
    assert parse(b"\xef\xbb") == [  # not a whole BOM: the start of a line that never ended
        SseMalformed("stream ended inside an event; incomplete event discarded")
    ]


def test_multibyte_utf8_split_across_feeds():
    text = "naïve ☃ 日本語 🎵"
    stream = f"event: schön\ndata: {text}\nid: ✓\n\n".encode()
    assert assert_split_invariant(stream) == [ev(text, "schön", id="✓")]


def test_invalid_utf8_line_is_reported_and_its_event_dropped():
    stream = b"data: ok\n\ndata: first\ndata: \xff\xfe\ndata: last\n\ndata: after\n\n"
    assert assert_split_invariant(stream) == [
        ev("ok"), SseMalformed("line is not valid UTF-8; event dropped"), ev("after"),
    ]
    # in a field name, and a truncated multi-byte character
    out = assert_split_invariant(b"\xc3: x\ndata: a\n\ndata: \xe2\x98\n\n")
    assert [type(item) for item in out] == [SseMalformed, SseMalformed]
    # a comment is never decoded
    assert assert_split_invariant(b": \xff\xfe\ndata: x\n\n") == [ev("x")]
    # an id line that is not UTF-8 does not change the id
    assert parse(b"id: 1\n\nid: \xff\n\ndata: x\n\n")[-1] == ev("x", id="1")


def test_overlong_line():
    at_limit = b"data: " + b"a" * (MAX_LINE_BYTES - 6)
    assert len(at_limit) == MAX_LINE_BYTES
    assert parse(at_limit + b"\n\n") == [ev("a" * (MAX_LINE_BYTES - 6))]
    over = at_limit + b"a"
    report = SseMalformed(f"line longer than {MAX_LINE_BYTES} bytes; event dropped")
    stream = b"data: before\n" + over + b"\ndata: rest\n\ndata: next\n\n"
    assert parse(stream) == [report, ev("next")]
    # the same whatever the chunk size (every offset of a 64 KiB stream is too slow: sizes)
    for size in (1, 7, 4096, MAX_LINE_BYTES - 1, MAX_LINE_BYTES, MAX_LINE_BYTES + 1):
        parser = SseParser()
        out = []
        for start in range(0, len(stream), size):
            out += parser.feed(stream[start : start + size])
            assert len(parser._pending) <= MAX_LINE_BYTES  # the pending line stays bounded
        assert out + parser.close() == [report, ev("next")], size
    # an overlong comment is reported but does not drop the event around it
    comment = b":" + b"x" * MAX_LINE_BYTES
    assert parse(b"data: a\n" + comment + b"\r\ndata: b\n\n") == [
        SseMalformed(f"comment line longer than {MAX_LINE_BYTES} bytes skipped"), ev("a\nb"),
    ]
    # the end of a discarded line is not a blank line
    parser = SseParser()
    assert parser.feed(b"data: x\n" + b"y" * (MAX_LINE_BYTES + 10)) == [report]
    assert parser.feed(b"zzz\r") == []
    # the LF completes the CRLF (not a blank line); "data: z" still belongs to the dropped event
    assert parser.feed(b"\ndata: z\n\ndata: w\n\n") == [ev("w")]


def test_huge_unterminated_stream_stays_bounded():
    parser = SseParser()
    reports = []
    for _ in range(64):
        reports += parser.feed(b"q" * 65536)
        assert len(parser._pending) <= MAX_LINE_BYTES
    assert len(reports) == 1  # one report per line, not per chunk
    assert parser.close() == [SseMalformed("stream ended inside an event; incomplete event discarded")]


def test_event_data_limit():
    line = b"data: " + b"d" * 1023 + b"\n"  # 1,024 bytes in the data buffer with its LF
    fits = line * (MAX_EVENT_BYTES // 1024)
    out = parse(fits + b"\n")
    assert len(out) == 1 and len(out[0].data) == MAX_EVENT_BYTES - 1  # the last LF removed
    report = SseMalformed(f"event data longer than {MAX_EVENT_BYTES} bytes; event dropped")
    assert parse(fits + b"data: x\ndata: more\n\ndata: next\n\n") == [report, ev("next")]
    assert parse(fits + b"data:\n\n") == [report]  # even an empty data line adds its LF


def test_close():
    parser = SseParser()
    assert parser.feed(b"data: done\n\n") == [ev("done")]
    assert parser.close() == []
    assert parser.close() == []
    with pytest.raises(LocalProtocolError):
        parser.feed(b"data: late\n\n")
    incomplete = [SseMalformed("stream ended inside an event; incomplete event discarded")]
    for tail in (b"data: x", b"data: x\n", b"event: y\n", b"data: x\r"):
        assert parse(b"data: a\n\n" + tail) == [ev("a"), *incomplete], tail
    for tail in (b"", b"id: 3\n", b": keepalive", b"retry: 5\n"):
        assert parse(b"data: a\n\n" + tail) == [ev("a")], tail


def test_argon_stream_split_at_every_offset():
    stream = (
        "id: ready\nevent: ready\ndata: {\"intents\":6144,\"spaceIds\":[\"s-1\"]}\n\n"
        ": keepalive\r\n"
        "id: a1b2:42,e5f6:17\r\nevent: heartbeat\r\ndata: {\"timestamp\":40953660000}\r\n\r\n"
        "id: abc_43\nevent: callIncoming\ndata: {\"callId\":\"c-1\",\"fromUserId\":\"u-1\",\"fromLocale\":\"uk-UA\"}\n\n"
        "id: abc_44\nevent: voiceJoin\ndata: {\"spaceId\":\"s\",\"channelId\":\"c\",\"user\":{\"userId\":\"u-2\","
        "\"username\":\"Ärger_bot\",\"displayName\":\"Бот ☃\",\"avatarUrl\":null,\"flags\":\"bot, verified\"}}\n\n"
    ).encode()
    events = assert_split_invariant(stream)
    assert [parse_argon_event(e) for e in events] == [
        Ready(id="ready", intents=6144, space_ids=("s-1",)),
        Heartbeat(id="a1b2:42,e5f6:17", timestamp=40953660000),
        CallIncoming(id="abc_43", call_id="c-1", from_user_id="u-1", from_locale="uk-UA"),
        VoiceJoin(
            id="abc_44", space_id="s", channel_id="c",
            user=ArgonUser("u-2", "Ärger_bot", "Бот ☃", None, frozenset({"bot", "verified"})),
        ),
    ]


# --- Argon payloads ----------------------------------------------------------------------


def argon(event: str, data, id: str | None = "7"):
    text = data if isinstance(data, str) else json.dumps(data)
    return parse_argon_event(SseEvent(event=event, data=text, id=id, retry_ms=None))


def test_ready_variants():
    assert argon("ready", {"intents": 4045, "spaceIds": ["uuid-1", "uuid-2"]}) == Ready("7", 4045, ("uuid-1", "uuid-2"))
    spaces = {"intents": 6144, "spaces": [
        {"spaceId": "s-1", "grantedEntitlements": "viewChannel, connect", "pendingApproval": False},
        {"spaceId": "s-2"}, {"name": "no id"}, "s-3",
    ]}
    assert argon("Ready", spaces) == Ready("7", 6144, ("s-1", "s-2", "s-3"))
    assert argon("ready", {}) == Ready("7", None, ())
    assert argon("ready", {"intents": "all", "spaceIds": "s"}) == Ready("7", None, ())  # optional: lenient
    assert argon("ready", {"intents": 2048.0}).intents == 2048


def test_heartbeat_and_resumed():
    beat = argon("heartbeat", {"timestamp": 40953660000})
    assert beat == Heartbeat("7", 40953660000)
    assert ARGON_EPOCH_MS == 1_735_689_600_000  # 2025-01-01T00:00:00Z
    assert argon("Heartbeat", {}) == Heartbeat("7", None)
    assert argon("resumed", {"replayedCount": 3}) == Resumed("7", 3)
    assert argon("Resumed", {"replayedCount": 0}) == Resumed("7", 0)  # the docs' spelling
    assert argon("resumed", {"replayedCount": True}) == Resumed("7", None)


USER = {"userId": "u-1", "username": "alice", "displayName": "Alice", "avatarUrl": "https://cdn/a.png", "flags": "none"}


@pytest.mark.parametrize("name, cls", [("voiceJoin", VoiceJoin), ("VoiceJoin", VoiceJoin),
                                       ("voiceLeave", VoiceLeave), ("VoiceLeave", VoiceLeave)])
def test_voice_events(name, cls):
    got = argon(name, {"spaceId": "s", "channelId": "c", "user": USER})
    assert got == cls(id="7", space_id="s", channel_id="c",
                      user=ArgonUser("u-1", "alice", "Alice", "https://cdn/a.png", frozenset()))
    assert not got.user.is_bot


@pytest.mark.parametrize(
    "flags, expected",
    [
        ("none", set()),
        ("bot", {"bot"}),
        ("bot, verified", {"bot", "verified"}),
        ("Bot, Verified", {"bot", "verified"}),  # .NET's default PascalCase names
        ("bot,premium , banned", {"bot", "premium", "banned"}),
        ("", set()),
        ("none, deleted", {"deleted"}),
        ("partner", {"partner"}),  # an unknown name is kept
        (["bot", "system"], {"bot", "system"}),
        (["Bot", 3, None], {"bot"}),
        ([], set()),
        (5, set()),  # an integer: the names of its bits are not known
        (0, set()),
        (None, set()),
        ({"bot": True}, set()),
    ],
)
def test_user_flags(flags, expected):
    assert parse_user_flags(flags) == frozenset(expected)
    user = argon("voiceJoin", {"spaceId": "s", "channelId": "c", "user": {**USER, "flags": flags}}).user
    assert user.flags == frozenset(expected)
    assert user.is_bot is ("bot" in expected)


def test_is_bot_from_username_suffix():
    def user(**fields):
        return argon("voiceJoin", {"spaceId": "s", "channelId": "c", "user": {"userId": "u", **fields}}).user
    assert user(username="music_bot").is_bot
    assert user(username="Music_BOT").is_bot
    assert not user(username="robot").is_bot
    assert not user(username="bot_music").is_bot
    assert user(username="x", flags="verified, bot").is_bot
    bare = user()
    assert bare == ArgonUser("u", "", "", None, frozenset()) and not bare.is_bot


def test_call_events():
    assert argon("callIncoming", {"callId": "c-1", "fromUserId": "u-1", "fromLocale": "en-US"}) == (
        CallIncoming("7", "c-1", "u-1", "en-US")
    )
    assert argon("CallIncoming", {"callId": "c-1", "fromUserId": "u-1"}) == CallIncoming("7", "c-1", "u-1", "")
    assert argon("callEnded", {"callId": "c-1"}, id=None) == CallEnded(None, "c-1")
    assert argon("CallEnded", {"callId": "c-1", "reason": "hangup"}) == CallEnded("7", "c-1")


def test_other_events_are_never_errors():
    assert argon("messageCreate", "not even json") == OtherEvent("7", "messageCreate", "not even json")
    assert argon("message", "[1]") == OtherEvent("7", "message", "[1]")
    assert argon("VOICEJOIN", "{}") == OtherEvent("7", "VOICEJOIN", "{}")  # only the first letter is folded
    assert argon("", "x") == OtherEvent("7", "", "x")


@pytest.mark.parametrize(
    "name, data, fragment",
    [
        ("callIncoming", "{", "Argon event callIncoming: data is not JSON"),
        ("CallIncoming", "", "Argon event callIncoming: data is not JSON"),
        ("ready", "NaN", "data is not JSON"),
        ("callEnded", "[]", "Argon event callEnded: data is an array, not an object"),
        ("heartbeat", "42", "Argon event heartbeat: data is a number, not an object"),
        ("callIncoming", {"fromUserId": "u"}, "Argon event callIncoming: no callId"),
        ("callIncoming", {"callId": "c"}, "Argon event callIncoming: no fromUserId"),
        ("callIncoming", {"callId": 5, "fromUserId": "u"}, "callId is a number, not a string"),
        ("callEnded", {"callId": ""}, "Argon event callEnded: callId is empty"),
        ("callEnded", {"callId": None}, "no callId"),
        ("voiceJoin", {"channelId": "c", "user": USER}, "Argon event voiceJoin: no spaceId"),
        ("VoiceLeave", {"spaceId": "s", "user": USER}, "Argon event voiceLeave: no channelId"),
        ("voiceJoin", {"spaceId": "s", "channelId": "c"}, "Argon event voiceJoin: no user"),
        ("voiceJoin", {"spaceId": "s", "channelId": "c", "user": "u-1"}, "user is a string, not an object"),
        ("voiceJoin", {"spaceId": "s", "channelId": "c", "user": {"username": "a"}}, "no user.userId"),
        ("voiceLeave", {"spaceId": "s", "channelId": "c", "user": {"userId": 12}}, "user.userId is a number, not a string"),
        ("voiceJoin", {"spaceId": ["s"], "channelId": "c", "user": USER}, "spaceId is an array, not a string"),
    ],
)
def test_malformed_payloads_name_the_event_and_the_cause(name, data, fragment):
    with pytest.raises(RemoteProtocolError) as info:
        argon(name, data)
    assert info.value.close_code == 1007
    assert fragment in str(info.value), str(info.value)


def test_optional_fields_of_the_wrong_type_count_as_absent():
    got = argon("voiceJoin", {"spaceId": "s", "channelId": "c",
                              "user": {"userId": "u", "username": 1, "displayName": [], "avatarUrl": 5}})
    assert got.user == ArgonUser("u", "", "", None, frozenset())
    assert argon("callIncoming", {"callId": "c", "fromUserId": "u", "fromLocale": 7}).from_locale == ""
