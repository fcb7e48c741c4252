"""The pure room model of the VideoSDK listen role (gateway/adapters/videosdk/room.py): joins,
leaves and pub/sub between participants, driven by calls, no event loop. Each frame the room
returns is read back with the dial side's `IngestClient`, as a VideoSDK device would read it
(spec: /work/shared/protocols/004_c69f0f37162481c1.txt, Messaging)."""

from __future__ import annotations

import itertools
import json

import pytest

from gateway.adapters.videosdk.frames import (
    IngestClient,
    IngestServer,
    Message,
    ParticipantJoined,
    ParticipantLeft,
)
from gateway.adapters.videosdk.room import Outgoing, Participant, Room

TS = "2026-06-27T14:41:00.000Z"


def device(participant_id: str, name: str | None = None, metadata: dict | None = None) -> Participant:
    """A participant whose ingest WebSocket has received its start frame."""
    proto = IngestServer()
    proto.receive('{"event":"start"}')
    return Participant(participant_id, name, metadata, proto)


def room(room_id: str = "r1") -> Room:
    ids = itertools.count(1)
    return Room(room_id, new_id=lambda: f"id-{next(ids)}")


def read(out: list[Outgoing]) -> list[tuple[str, object]]:
    """(recipient id, the event a device's IngestClient reads from the frame)."""
    reader = IngestClient()
    events = []
    for frame in out:
        (event,) = reader.receive(frame.text)
        events.append((frame.to.id, event))
    return events


def joined(out: list[Outgoing]) -> list[tuple[str, str | None]]:
    """(recipient, who joined) for participant-joined frames; fails on any other frame."""
    pairs = []
    for to, event in read(out):
        assert isinstance(event, ParticipantJoined), event
        pairs.append((to, event.participant_id))
    return pairs


def delivered(out: list[Outgoing]) -> dict[str, Message]:
    """recipient → the message it receives; fails on any other frame or a double delivery."""
    messages: dict[str, Message] = {}
    for to, event in read(out):
        assert isinstance(event, Message), event
        assert to not in messages, f"{to} received the message twice"
        messages[to] = event
    return messages


# ------------------------------------------------------------------------------- joins
def test_a_newcomer_learns_who_is_there_and_everyone_learns_of_the_newcomer():
    r = room()
    a, b, c = device("a", "Alice"), device("b"), device("c", "Carol", {"desk": 3})
    assert r.join(a) == []  # alone: nobody to tell
    assert joined(r.join(b)) == [("a", "b"), ("b", "a")]
    assert joined(r.join(c)) == [("a", "c"), ("c", "a"), ("b", "c"), ("c", "b")]
    assert r.participants == [a, b, c]


def test_participant_joined_carries_id_and_only_the_name_and_metadata_given():
    r = room()
    r.join(device("a"))
    out = r.join(device("c", "Carol", {"desk": 3}))
    frames = {frame.to.id: json.loads(frame.text) for frame in out}
    assert frames["a"] == {"event": "participant-joined", "participant": {"id": "c", "name": "Carol", "metadata": {"desk": 3}}}
    assert frames["c"] == {"event": "participant-joined", "participant": {"id": "a"}}


def test_the_meeting_session_is_new_when_the_room_fills_from_empty_and_kept_while_anyone_stays():
    r = room()
    assert r.session_id is None
    a, b = device("a"), device("b")
    r.join(a)
    first = r.session_id
    assert first == "id-1"
    r.join(b)
    r.leave(a)
    assert r.session_id == first  # b is still there
    r.leave(b)
    assert r.session_id is None
    r.join(device("d"))
    assert r.session_id not in (None, first)


# ------------------------------------------------------------------------------ leaves
def test_everyone_left_is_told_and_leaving_twice_or_without_joining_sends_nothing():
    r = room()
    a, b, c = device("a"), device("b"), device("c")
    for p in (a, b, c):
        r.join(p)
    events = read(r.leave(b))
    assert [to for to, _ in events] == ["a", "c"]
    assert all(isinstance(e, ParticipantLeft) and e.participant_id == "b" for _, e in events), events
    assert r.participants == [a, c]
    assert r.leave(b) == []
    assert r.leave(device("stranger")) == []
    assert r.participants == [a, c]


def test_participants_are_told_apart_by_identity_not_by_id():
    r = room()
    first, second = device("same"), device("same")
    r.join(first)
    r.join(second)
    r.subscribe(first, "chat")
    r.subscribe(second, "chat")
    r.leave(first)
    assert r.participants == [second]
    sender = device("s")
    r.join(sender)
    assert [frame.to for frame in r.publish(sender, "chat", "hi", timestamp=TS)] == [second]


# ----------------------------------------------------------------------------- pub/sub
def test_a_publish_reaches_the_other_subscribers_of_that_topic_only():
    r = room()
    alice, bob, carol, dave = device("a", "Alice"), device("b"), device("c"), device("d")
    for p in (alice, bob, carol, dave):
        r.join(p)
    r.subscribe(alice, "chat")  # the publisher's own subscription: it still gets nothing back
    r.subscribe(bob, "chat")
    r.subscribe(carol, "other")  # another topic
    r.subscribe(dave, "chat")
    messages = delivered(r.publish(alice, "chat", "hello", timestamp=TS))
    assert sorted(messages) == ["b", "d"]
    message = messages["b"]
    assert (message.topic, message.data) == ("chat", "hello")
    assert message.sender == {"senderId": "a", "senderName": "Alice", "timestamp": TS, "id": "id-2"}
    assert messages["d"] == message  # one message id and timestamp for every recipient


def test_a_publisher_without_a_name_sends_no_sender_name_and_each_message_has_its_own_id():
    r = room()
    anon, bob = device("x"), device("b")
    r.join(anon)
    r.join(bob)
    r.subscribe(bob, "chat")
    first = delivered(r.publish(anon, "chat", '{"dtmf":"5"}', timestamp=TS))["b"]
    second = delivered(r.publish(anon, "chat", "again", timestamp=TS))["b"]
    assert first.sender == {"senderId": "x", "timestamp": TS, "id": "id-2"}
    assert first.data == '{"dtmf":"5"}'  # JSON text is delivered as the string it is
    assert second.message_id == "id-3"


def test_unsubscribing_stops_delivery_and_unsubscribing_an_unknown_topic_is_harmless():
    r = room()
    a, b = device("a"), device("b")
    r.join(a)
    r.join(b)
    r.subscribe(b, "chat")
    assert sorted(delivered(r.publish(a, "chat", "1", timestamp=TS))) == ["b"]
    r.unsubscribe(b, "chat")
    r.unsubscribe(b, "never")
    assert r.publish(a, "chat", "2", timestamp=TS) == []


def test_nobody_subscribed_or_alone_in_the_room_delivers_nothing():
    r = room()
    a = device("a")
    r.join(a)
    r.subscribe(a, "chat")
    assert r.publish(a, "chat", "echo?", timestamp=TS) == []
    r.join(device("b"))
    assert r.publish(a, "chat", "anyone?", timestamp=TS) == []


@pytest.mark.parametrize("what", ["publish", "join", "leave"])
def test_a_participant_that_sent_stop_is_sent_nothing_and_the_others_still_are(what):
    r = room()
    a, stopped, c = device("a"), device("stopped"), device("c")
    for p in (a, stopped, c):
        r.join(p)
        r.subscribe(p, "chat")
    stopped.proto.receive('{"event":"stop"}')
    if what == "publish":
        out = r.publish(a, "chat", "hi", timestamp=TS)
    elif what == "join":
        out = [frame for frame in r.join(device("new")) if frame.to.id != "new"]
    else:
        out = r.leave(a)
    assert "stopped" not in [frame.to.id for frame in out]
    assert out, "the others still get theirs"
