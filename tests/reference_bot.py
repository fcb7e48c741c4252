"""What Argon's reference bot (argon-chat/echo-bot) does, restated from
shared/protocols/argon-voice-ws.md ("What the reference bot does") as a client of our listen
role: open the events stream; on `callIncoming` accept (`POST /ICalls/v20260401/Accept`), then
open `{audioBaseUrl}/audio/duplex?token=…&target_identity=<callerId>&target_track_source=
microphone&stereo=false&frame_duration_ms=20` (token in the query); drop received packets of
≤ 2 bytes; wait for `subscribed` (15 s at most); send Opus packets demuxed from an Ogg file,
paced by their TOC durations, replacing invalid ones with the 3-byte silence packet F8 FF FE;
close with 1000 on `target_left` or `callEnded` (or when its file is done).

Written independently on httpx, trio-websocket and PyAV (no gateway code), so it checks the
listen role against the protocol rather than against our own client."""

from __future__ import annotations

import json
import urllib.parse

import av
import httpx
import trio
from trio_websocket import ConnectionClosed, connect_websocket_url

SILENCE = b"\xf8\xff\xfe"


def ogg_packets(path: str) -> list[bytes]:
    """The Opus packets of an Ogg Opus file (PyAV's demuxer)."""
    with av.open(path) as container:
        return [bytes(p) for p in container.demux(audio=0) if p.size]


def toc_ms(packet: bytes) -> float:
    """Duration of an Opus packet from its TOC byte (RFC 6716 §3.1)."""
    config, code = packet[0] >> 3, packet[0] & 3
    if config < 12:
        frame = (10, 20, 40, 60)[config % 4]
    elif config < 16:
        frame = (10, 20)[config % 2]
    else:
        frame = (2.5, 5, 10, 20)[config % 4]
    frames = 1 if code == 0 else 2 if code in (1, 2) else (packet[1] & 0x3F if len(packet) > 1 else 1)
    return frame * frames


class ReferenceBot:
    def __init__(self, api_url: str, token: str, ogg: str) -> None:
        self.api_url, self.token = api_url.rstrip("/"), token
        self.packets = ogg_packets(ogg)
        self.received: list[bytes] = []
        self.received_at: list[float] = []  # trio time each of `received` arrived
        self.statuses: list[dict] = []
        self.close_code: int | None = None
        self.accepted: dict | None = None
        self.ended = trio.Event()
        self._call_ended = trio.Event()
        self._subscribed = trio.Event()
        self._target_left = trio.Event()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bot {self.token}"}

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as client:
            url = f"{self.api_url}/IEvents/v1/Stream?intents=16383"
            headers = {**self.headers, "Accept": "text/event-stream"}
            async with trio.open_nursery() as nursery, client.stream("GET", url, headers=headers) as response:
                assert response.status_code == 200, response.status_code
                task_status.started()
                kind = data = ""
                async for line in response.aiter_lines():
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: "):
                        data = line[6:]
                    elif line == "" and kind:
                        if kind == "callIncoming":
                            nursery.start_soon(self.handle_call, client, json.loads(data))
                        elif kind == "callEnded":
                            self._call_ended.set()
                        kind = data = ""
                    if self.ended.is_set():
                        nursery.cancel_scope.cancel()
                        return

    async def handle_call(self, client: httpx.AsyncClient, event: dict) -> None:
        try:
            response = await client.post(f"{self.api_url}/ICalls/v20260401/Accept", json={"callId": event["callId"]},
                                         headers=self.headers)
            assert response.status_code == 200, response.text
            self.accepted = grant = response.json()
            query = urllib.parse.urlencode({"token": grant["token"], "target_identity": grant["callerId"],
                                            "target_track_source": "microphone", "stereo": "false",
                                            "frame_duration_ms": "20"})
            url = f"{grant['audioBaseUrl'].rstrip('/')}/audio/duplex?{query}"
            async with trio.open_nursery() as nursery:
                ws = await connect_websocket_url(nursery, url, message_queue_size=256)
                nursery.start_soon(self._read, ws)
                with trio.move_on_after(15):
                    await self._subscribed.wait()
                start = trio.current_time()
                at = 0.0
                for packet in self.packets:
                    if self._call_ended.is_set() or self._target_left.is_set():
                        break
                    if len(packet) < 3:
                        packet = SILENCE
                    await trio.sleep_until(start + at / 1000)
                    try:
                        await ws.send_message(packet)
                    except ConnectionClosed:
                        break
                    at += toc_ms(packet)
                await ws.aclose(1000, "bye")
                self.close_code = 1000
                nursery.cancel_scope.cancel()
        finally:
            self.ended.set()

    async def _read(self, ws) -> None:
        try:
            while True:
                message = await ws.get_message()
                if isinstance(message, str):
                    status = json.loads(message)
                    self.statuses.append(status)
                    if status.get("status") == "subscribed":
                        self._subscribed.set()
                    elif status.get("status") == "target_left":
                        self._target_left.set()
                elif len(message) > 2:  # drops packets of 2 bytes or less
                    self.received.append(message)
                    self.received_at.append(trio.current_time())
        except ConnectionClosed:
            pass
