"""Rooms of the VideoSDK listen role, pure: who is in a room, which topics each participant
subscribed to, and which frames each participant must be sent when someone joins, leaves or
publishes.

Source: /work/shared/protocols/004_c69f0f37162481c1.txt ("Custom WebSocket": Messaging,
"Subscribe to a topic", "Publish to a topic", "Receive messages"; the spec says nothing of
who is in the room, so ``participant-joined`` / ``participant-left`` and ``meeting-joined``'s
``sessionId`` follow the spec's linked example, videosdk-live/videosdk-socket-ingest-example,
app.js handleMessage).

A `Room` is every device connected to one ``roomId`` through the gateway's listen role (one
`Participant` per listen session, from its start frame until it goes). The rules:

- **Joins**: a newcomer is told of everyone already there and everyone already there is told of
  the newcomer (``participant-joined`` with ``participant: {id, name, metadata}``). The room's
  meeting session id (`Room.session_id`, sent in ``meeting-joined``) is new when the room fills
  from empty and kept while anyone stays.
- **Leaves**: everyone left is told (``participant-left``); when the room empties its
  session id is forgotten. Leaving twice, or without having joined, sends nothing.
- **Pub/sub**: a message published to a topic reaches every *other* participant subscribed to
  that topic, never the publisher (the spec: "you never receive your own messages back"), as a
  ``message`` frame whose ``data`` is ``{"message", "senderId", "senderName", "timestamp",
  "id"}`` (``senderName`` only when the publisher has a name). Subscriptions are per
  participant; unsubscribing stops delivery.
- **Stopped participants** (their stop frame arrived, they have not left yet) are sent nothing;
  the others still are.

Audio is not the room's: each listen endpoint is an endpoint of its own route, and what a
device hears is that route's mix (mix-minus: never its own audio).

No trio, no sockets, no clock: the listen endpoint calls `Room.join`, `Room.leave`,
`Room.subscribe`, `Room.unsubscribe` and `Room.publish` and sends what they return
(`Outgoing`: a text frame for one participant) on that participant's own connection, in the
order returned. Each participant carries its connection's sans-IO `IngestServer`, which builds
(and checks) the frames. Timestamps are the caller's (`publish(timestamp=...)`); ids come from
`Room.new_id` (random UUIDs unless a test passes its own).
"""

from __future__ import annotations

import uuid
from typing import Any, Callable

import attrs

from gateway.adapters.videosdk.frames import PARTICIPANT_JOINED, PARTICIPANT_LEFT, IngestServer
from gateway.errors import LocalProtocolError

__all__ = ["Outgoing", "Participant", "Room"]


def _uuid4() -> str:
    return str(uuid.uuid4())


@attrs.define(eq=False)
class Participant:
    """A device connected to a room: a listen session after its start frame. Compared by
    identity (two devices may claim the same `id`)."""

    id: str
    """``participant.id``: the session request's, or one the listen side made up."""
    name: str | None
    """``participant.name``: display name; None when the request gave none."""
    metadata: dict[str, Any] | None
    """``participant.metadata``; None when the request gave none."""
    proto: IngestServer
    """The sans-IO state of its ingest WebSocket: builds the frames it is sent."""
    topics: set[str] = attrs.Factory(set)
    """Topics it subscribed to (and did not unsubscribe)."""

    def info(self) -> dict[str, Any]:
        """``participant`` of a participant-joined / -left frame."""
        data: dict[str, Any] = {"id": self.id}
        if self.name is not None:
            data["name"] = self.name
        if self.metadata is not None:
            data["metadata"] = self.metadata
        return data

    def sender(self) -> dict[str, Any]:
        """``senderId`` / ``senderName`` of the messages it publishes."""
        return {"senderId": self.id} | ({"senderName": self.name} if self.name is not None else {})


@attrs.frozen
class Outgoing:
    """One text frame the room wants sent to one participant."""

    to: Participant
    """Who it is for: send it on that participant's connection."""
    text: str
    """The WebSocket text message (built by ``to.proto``)."""


@attrs.define(eq=False)
class Room:
    """The participants of one room and the frames their comings, goings and messages cause
    (see the module doc for the rules). Every method returns the frames to send, in order."""

    room_id: str
    """``roomId``."""
    new_id: Callable[[], str] = _uuid4
    """Makes meeting session ids and message ids (random UUIDs by default)."""
    participants: list[Participant] = attrs.Factory(list)
    """Who is in the room, in the order they joined."""
    session_id: str | None = None
    """The current meeting session (``meeting-joined``'s sessionId); new when the room fills
    from empty, None while it is empty."""

    def join(self, newcomer: Participant) -> list[Outgoing]:
        """`newcomer` enters: ``participant-joined`` for it to each other participant, and for
        each other participant to it (a new `session_id` first if the room was empty)."""
        if not self.participants:
            self.session_id = self.new_id()
        out: list[Outgoing] = []
        for other in self.participants:
            _lifecycle(out, other, PARTICIPANT_JOINED, newcomer)
            _lifecycle(out, newcomer, PARTICIPANT_JOINED, other)
        self.participants.append(newcomer)
        return out

    def leave(self, gone: Participant) -> list[Outgoing]:
        """`gone` leaves: ``participant-left`` for it to everyone still there (nothing if it
        was not in the room); the `session_id` is forgotten when the room empties."""
        out: list[Outgoing] = []
        if gone in self.participants:
            self.participants.remove(gone)
            for other in self.participants:
                _lifecycle(out, other, PARTICIPANT_LEFT, gone)
        if not self.participants:
            self.session_id = None
        return out

    def subscribe(self, participant: Participant, topic: str) -> None:
        """`participant` receives what others publish to `topic` from now on (the topic was
        checked by its `IngestServer`)."""
        participant.topics.add(topic)

    def unsubscribe(self, participant: Participant, topic: str) -> None:
        """`participant` no longer receives `topic` (nothing happens if it did not)."""
        participant.topics.discard(topic)

    def publish(self, sender: Participant, topic: str, data: str, *, timestamp: str) -> list[Outgoing]:
        """`sender` published `data` (a `Publish.data`: the text subscribers receive) to
        `topic` (spec: Messaging): one delivered ``message`` frame to every other participant
        subscribed to it, all with the same message id and `timestamp` (ISO 8601, the caller's
        clock)."""
        meta = sender.sender() | {"timestamp": timestamp, "id": self.new_id()}
        out: list[Outgoing] = []
        for other in self.participants:
            if other is not sender and topic in other.topics:
                _build(out, other, lambda proto: proto.deliver(topic, data, meta))
        return out


def _build(out: list[Outgoing], to: Participant, build: Callable[[IngestServer], str]) -> None:
    """Append the frame `build(to.proto)` returns; nothing when its proto refuses (the device
    already sent stop, or the spec's limits refuse the delivery)."""
    try:
        out.append(Outgoing(to, build(to.proto)))
    except LocalProtocolError:  # PublishRefused included; after the device's stop
        pass


def _lifecycle(out: list[Outgoing], to: Participant, event: str, about: Participant) -> None:
    """Append ``{"event": event, "participant": about.info()}`` for `to`."""
    _build(out, to, lambda proto: proto.event(event, participant=about.info()))
