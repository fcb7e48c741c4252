"""Argon's events stream, listen side (gateway.adapters.argon.events_hub).

The hub's timing (heartbeat after 30 s idle, replay for 10 min) runs under MockClock; one test
serves the stream over real loopback HTTP (hypercorn + the streaming response) and reads it
with httpx and the small SSE parser below.
"""

from __future__ import annotations

import json
from contextlib import aclosing

import httpx
import pytest
import trio

from gateway.adapters.argon.events_hub import (
    ARGON_EPOCH_MS,
    INTENT_CALLS,
    INTENT_VOICE,
    STREAM_PATH,
    EventHub,
    encode_comment,
    encode_sse,
    stream_response,
)
from gateway.server import HttpRequest, HttpServer, serve_http

WALL = ARGON_EPOCH_MS / 1000 + 86_400.25  # one day and 250 ms after the Argon epoch, in Unix s
USER = {"userId": "u1", "username": "ada", "displayName": "Ada", "avatarUrl": None, "flags": 0}
JOIN = {"spaceId": "s1", "channelId": "c1", "user": USER}


def parse_sse(text: str) -> list[dict]:
    """Complete events of `text` (WHATWG §9.2.6, enough for these tests): id, event, data as JSON."""
    events = []
    for block in text.split("\n\n")[:-1]:
        fields: dict[str, str] = {}
        data: list[str] = []
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            else:
                fields[name] = value
        if data:
            events.append({"id": fields.get("id"), "event": fields.get("event", "message"), "data": json.loads("\n".join(data))})
    return events


def one(chunk: bytes) -> dict:
    [event] = parse_sse(chunk.decode("ascii"))
    return event


def hub(**kwargs) -> EventHub:
    kwargs.setdefault("first_id", 1)
    return EventHub(lambda: ["s2", "s1", "s1"], wall_clock=lambda: WALL, **kwargs)


# ---------------------------------------------------------------------------------- wire
def test_encode_sse_is_the_whatwg_framing_with_compact_ascii_json():
    assert encode_sse("voiceJoin", JOIN, id="7") == (
        b'id: 7\nevent: voiceJoin\ndata: {"spaceId":"s1","channelId":"c1","user":{"userId":"u1","username":"ada",'
        b'"displayName":"Ada","avatarUrl":null,"flags":0}}\n\n'
    )
    assert encode_sse("heartbeat", {"timestamp": 1}) == b'event: heartbeat\ndata: {"timestamp":1}\n\n'
    # a display name with a line separator, NEL and a newline stays on one data line, ASCII only
    odd = encode_sse("voiceJoin", {"displayName": "Zo\u00eb\u2028\x85\nx"})
    assert odd == b'event: voiceJoin\ndata: {"displayName":"Zo\\u00eb\\u2028\\u0085\\nx"}\n\n'
    assert len(odd.decode().splitlines()) == 3  # httpx's aiter_lines splits so: two fields, one blank line
    assert parse_sse(odd.decode())[0]["data"] == {"displayName": "Zo\u00eb\u2028\x85\nx"}
    for bad in ("", "a\nb", "a\rb"):
        with pytest.raises(ValueError, match="event name"):
            encode_sse(bad, {})
    for bad in ("1\n", "1\r2", "1\x002"):
        with pytest.raises(ValueError, match="event id"):
            encode_sse("x", {}, id=bad)
    with pytest.raises(ValueError):
        encode_sse("x", {"v": float("nan")})  # NaN is not JSON
    assert encode_comment("keep\nalive") == b": keep\n: alive\n"


# ------------------------------------------------------------------------------- the hub
async def test_ready_first_then_matching_live_events_with_increasing_ids(autojump_clock):
    events = hub()
    async with aclosing(events.stream(INTENT_VOICE)) as voice, aclosing(events.stream(INTENT_CALLS)) as calls:
        assert one(await voice.__anext__()) == {"id": "ready", "event": "ready",
                                                "data": {"intents": INTENT_VOICE, "spaceIds": ["s1", "s2"]}}
        assert one(await calls.__anext__())["data"] == {"intents": INTENT_CALLS, "spaceIds": ["s1", "s2"]}
        assert events.subscribers == 2
        ids = [
            events.publish("voiceJoin", JOIN, intent=INTENT_VOICE),
            events.publish("callIncoming", {"callId": "k1", "fromUserId": "u2", "fromLocale": "en-US"}, intent=INTENT_CALLS),
            events.publish("voiceLeave", JOIN, intent=INTENT_VOICE),
            events.publish("callEnded", {"callId": "k1"}, intent=INTENT_CALLS),
        ]
        assert ids == ["1", "2", "3", "4"]
        assert [one(await voice.__anext__())["event"] for _ in range(2)] == ["voiceJoin", "voiceLeave"]
        got = [one(await calls.__anext__()) for _ in range(2)]
        assert [(e["id"], e["event"]) for e in got] == [("2", "callIncoming"), ("4", "callEnded")]
        assert got[1]["data"] == {"callId": "k1"}
    assert events.subscribers == 0  # closing the generator removed both subscriptions
    assert events.published == 4


async def test_default_ids_start_from_the_wall_clock_so_a_restart_does_not_reuse_them(autojump_clock):
    first = hub(first_id=None)
    assert first.publish("callEnded", {"callId": "k"}, intent=INTENT_CALLS) == str(86_400_250 * 1000)
    later = EventHub(wall_clock=lambda: WALL + 1)  # the gateway restarted a second later
    assert int(later.publish("callEnded", {"callId": "k"}, intent=INTENT_CALLS)) == (86_400_250 + 1000) * 1000
    with pytest.raises(ValueError, match="intent bit"):
        first.publish("callEnded", {}, intent=0)
    with pytest.raises(TypeError):
        first.publish("callEnded", {"callId": object()}, intent=INTENT_CALLS)
    assert first.publish("callEnded", {}, intent=INTENT_CALLS) == str(86_400_250 * 1000 + 1)  # no id lost


async def test_heartbeat_after_30_s_idle_and_not_before(autojump_clock):
    events = hub()
    async with aclosing(events.stream(INTENT_VOICE)) as stream, trio.open_nursery() as nursery:
        await stream.__anext__()  # ready
        start = trio.current_time()
        heartbeat = one(await stream.__anext__())
        assert heartbeat == {"id": None, "event": "heartbeat", "data": {"timestamp": 86_400_250}}
        assert trio.current_time() - start == pytest.approx(30.0)

        async def publish_after(delay: float, intent: int) -> None:
            await trio.sleep(delay)
            events.publish("voiceJoin", JOIN, intent=intent)

        start = trio.current_time()
        nursery.start_soon(publish_after, 20.0, INTENT_VOICE)  # an event at 20 s resets the idle timer
        assert one(await stream.__anext__())["event"] == "voiceJoin"
        assert trio.current_time() - start == pytest.approx(20.0)
        nursery.start_soon(publish_after, 10.0, INTENT_CALLS)  # not for this stream: still idle
        assert one(await stream.__anext__())["event"] == "heartbeat"
        assert trio.current_time() - start == pytest.approx(50.0)


async def test_resume_replays_matching_events_within_10_minutes(autojump_clock):
    events = hub()
    join = events.publish("voiceJoin", JOIN, intent=INTENT_VOICE)
    await trio.sleep(100)
    events.publish("callIncoming", {"callId": "k1", "fromUserId": "u2", "fromLocale": "de"}, intent=INTENT_CALLS)
    leave = events.publish("voiceLeave", JOIN, intent=INTENT_VOICE)
    await trio.sleep(499)  # the join is 599 s old: still kept

    async def first_events(intents: int, last_event_id: str | None, n: int) -> list[dict]:
        async with aclosing(events.stream(intents, last_event_id)) as stream:
            return [one(await stream.__anext__()) for _ in range(n)]

    voice = await first_events(INTENT_VOICE, join, 3)
    assert [(e["id"], e["event"]) for e in voice] == [("ready", "ready"), (leave, "voiceLeave"), (None, "resumed")]
    assert voice[2]["data"] == {"replayedCount": 1}
    both = await first_events(INTENT_VOICE | INTENT_CALLS, join, 4)
    assert [e["event"] for e in both] == ["ready", "callIncoming", "voiceLeave", "resumed"]
    assert both[3]["data"] == {"replayedCount": 2}
    up_to_date = await first_events(INTENT_VOICE, leave, 2)
    assert up_to_date[1] == {"id": None, "event": "resumed", "data": {"replayedCount": 0}}

    await trio.sleep(2)  # the join is now more than 10 minutes old: forgotten, no replay, no `resumed`
    start = trio.current_time()
    assert [e["event"] for e in await first_events(INTENT_VOICE, join, 2)] == ["ready", "heartbeat"]
    assert trio.current_time() - start == pytest.approx(30.0)  # the next thing was live
    # the call (published 100 s after the join) is 531 s old: still a place to resume from
    assert [e["event"] for e in await first_events(INTENT_VOICE, str(int(join) + 1), 3)] == ["ready", "voiceLeave", "resumed"]
    for unknown in ("ready", "0", "99", "x1", "", " 2"):  # not an event kept here
        assert [e["event"] for e in await first_events(INTENT_VOICE, unknown, 2)] == ["ready", "heartbeat"]


async def test_replay_store_is_bounded_by_count(autojump_clock):
    events = hub(replay_max=3)
    ids = [events.publish("voiceJoin", JOIN, intent=INTENT_VOICE) for _ in range(5)]
    async with aclosing(events.stream(INTENT_VOICE, ids[1])) as stream:  # pushed out
        assert [one(await stream.__anext__())["event"] for _ in range(2)] == ["ready", "heartbeat"]
    async with aclosing(events.stream(INTENT_VOICE, ids[2])) as stream:
        got = [one(await stream.__anext__()) for _ in range(4)]
        assert [e["id"] for e in got] == ["ready", ids[3], ids[4], None]


async def test_a_slow_subscriber_is_disconnected_without_blocking_anyone(autojump_clock):
    events = hub(queue_size=2)
    async with aclosing(events.stream(INTENT_VOICE)) as slow, aclosing(events.stream(INTENT_VOICE)) as fast:
        await slow.__anext__()
        await fast.__anext__()
        ids = []
        for _ in range(2):
            ids.append(events.publish("voiceJoin", JOIN, intent=INTENT_VOICE))
            assert one(await fast.__anext__())["id"] == ids[-1]
        assert events.subscribers == 2 and events.slow_disconnects == 0
        ids.append(events.publish("voiceLeave", JOIN, intent=INTENT_VOICE))  # slow's queue is full
        assert events.subscribers == 1 and events.slow_disconnects == 1
        assert one(await fast.__anext__())["id"] == ids[2]
        # the slow stream still gets what was queued, then ends; it resumes from there
        assert [one(await slow.__anext__())["id"] for _ in range(2)] == ids[:2]
        with pytest.raises(StopAsyncIteration):
            await slow.__anext__()
    async with aclosing(events.stream(INTENT_VOICE, ids[1])) as again:
        assert [one(await again.__anext__())["event"] for _ in range(3)] == ["ready", "voiceLeave", "resumed"]


async def test_close_ends_every_stream(autojump_clock):
    events = hub()
    async with aclosing(events.stream(INTENT_VOICE)) as a, aclosing(events.stream(INTENT_CALLS)) as b:
        await a.__anext__()
        await b.__anext__()
        events.publish("voiceJoin", JOIN, intent=INTENT_VOICE)
        events.close()
        assert events.subscribers == 0 and events.closed
        assert one(await a.__anext__())["event"] == "voiceJoin"  # queued before close: delivered
        for stream in (a, b):
            with pytest.raises(StopAsyncIteration):
                await stream.__anext__()
    async with aclosing(events.stream(INTENT_VOICE)) as late:
        with pytest.raises(StopAsyncIteration):
            await late.__anext__()
    assert events.publish("voiceLeave", JOIN, intent=INTENT_VOICE) == "2"  # never raises while stopping


def request(query: dict[str, str], headers: dict[str, str] | None = None) -> HttpRequest:
    return HttpRequest("GET", STREAM_PATH, query, headers or {}, b"", {})


async def test_stream_response_checks_intents_and_picks_the_last_event_id(autojump_clock):
    events = hub()
    for bad in ({}, {"intents": "voice"}, {"intents": "-1"}, {"intents": "1_0"}, {"intents": "4294967296"}):
        refused = stream_response(events, request(bad))
        assert refused.status == 400 and refused.stream is None
        assert "intents must be a decimal bitmask" in json.loads(refused.body)["detail"]
    first = events.publish("voiceJoin", JOIN, intent=INTENT_VOICE)
    second = events.publish("voiceLeave", JOIN, intent=INTENT_VOICE)
    ok = stream_response(events, request({"intents": "2048", "lastEventId": first}, {"last-event-id": second}))
    assert ok.status == 200 and ok.content_type == "text/event-stream" and ("cache-control", "no-cache") in ok.headers
    async with aclosing(ok.stream()) as stream:  # the header wins: nothing after `second`
        assert [one(await stream.__anext__())["data"] for _ in range(2)][1] == {"replayedCount": 0}
    by_query = stream_response(events, request({"intents": "2048", "lastEventId": first}))
    async with aclosing(by_query.stream()) as stream:
        assert [one(await stream.__anext__())["event"] for _ in range(3)] == ["ready", "voiceLeave", "resumed"]
    events.close()
    stopping = stream_response(events, request({"intents": "2048"}))
    assert stopping.status == 503 and ("retry-after", "5") in stopping.headers


# ------------------------------------------------------------------- over loopback HTTP
class SseReader:
    """Reads events off an httpx streaming response as they arrive; notes the trio time of each."""

    def __init__(self, response: httpx.Response) -> None:
        self._chunks = response.aiter_bytes()
        self._text = ""

    async def next(self) -> dict:
        while "\n\n" not in self._text:
            self._text += (await self._chunks.__anext__()).decode("ascii")
        block, self._text = self._text.split("\n\n", 1)
        event = parse_sse(block + "\n\n")[0]
        event["at"] = trio.current_time()
        return event


async def wait_for_subscribers(events: EventHub, n: int) -> None:
    """Under the test's MockClock each poll ends after 0.2 s of real idleness: ≤ 2 s real in all."""
    with trio.fail_after(10):
        while events.subscribers != n:
            await trio.sleep(1)


async def test_events_stream_over_http(mock_clock):
    mock_clock.autojump_threshold = 0.2  # virtual time jumps only when nothing moved for 0.2 s (real)
    events = hub()
    app = HttpServer()

    async def handler(req: HttpRequest):
        return stream_response(events, req)

    for prefix in ("/api/bot", ""):
        app.add("GET", prefix + STREAM_PATH, handler)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, app, "127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            async with client.stream("GET", STREAM_PATH, params={"intents": INTENT_VOICE}) as voice_response, \
                    client.stream("GET", "/api/bot" + STREAM_PATH, params={"intents": INTENT_CALLS}) as calls_response:
                assert voice_response.headers["content-type"] == "text/event-stream"
                voice, calls = SseReader(voice_response), SseReader(calls_response)
                ready = await voice.next()
                assert (ready["id"], ready["event"], ready["data"]) == ("ready", "ready", {"intents": 2048, "spaceIds": ["s1", "s2"]})
                assert (await calls.next())["event"] == "ready"
                assert events.subscribers == 2

                join = events.publish("voiceJoin", JOIN, intent=INTENT_VOICE)
                events.publish("callIncoming", {"callId": "k1", "fromUserId": "u2", "fromLocale": "en"}, intent=INTENT_CALLS)
                leave = events.publish("voiceLeave", JOIN, intent=INTENT_VOICE)
                got = [await voice.next() for _ in range(3)]
                assert [(e["id"], e["event"]) for e in got] == [(join, "voiceJoin"), (leave, "voiceLeave"), (None, "heartbeat")]
                assert got[0]["data"] == JOIN and got[2]["data"] == {"timestamp": 86_400_250}
                assert got[2]["at"] - got[1]["at"] == pytest.approx(30.0, abs=0.5)  # 30 s idle, not before
                call = await calls.next()
                assert (call["event"], call["data"]["callId"]) == ("callIncoming", "k1")  # voice events filtered out
            # both clients went away: their subscriptions go with them
            await wait_for_subscribers(events, 0)

            # resume after the join: the leave is replayed, then `resumed`, then live events
            async with client.stream("GET", STREAM_PATH, params={"intents": INTENT_VOICE}, headers={"last-event-id": join}) as response:
                resumed = SseReader(response)
                assert [(e["id"], e["event"]) for e in [await resumed.next() for _ in range(3)]] == [
                    ("ready", "ready"), (leave, "voiceLeave"), (None, "resumed")]
                later = events.publish("voiceJoin", JOIN, intent=INTENT_VOICE)
                assert (await resumed.next())["id"] == later
                params = {"intents": INTENT_VOICE | INTENT_CALLS, "lastEventId": join}
                async with client.stream("GET", STREAM_PATH, params=params) as by_query:
                    replay = SseReader(by_query)
                    got = [await replay.next() for _ in range(5)]
                    assert [e["event"] for e in got] == ["ready", "callIncoming", "voiceLeave", "voiceJoin", "resumed"]
                    assert got[4]["data"] == {"replayedCount": 3}
                    assert events.subscribers == 2
                await wait_for_subscribers(events, 1)
                events.close()  # the gateway stops: the open stream ends cleanly
                with pytest.raises(StopAsyncIteration):
                    await resumed.next()
            assert (await client.get(STREAM_PATH, params={"intents": "2048"})).status_code == 503
            assert (await client.get(STREAM_PATH, params={"intents": "all"})).status_code == 400
        nursery.cancel_scope.cancel()
