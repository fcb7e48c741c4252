"""Test clients written as a customer would write them, on the project's wire layers: a
VoIPBIN media-stream caller that speaks a clip in real time and records what it hears."""

from __future__ import annotations

import numpy as np
import trio
from trio_websocket import ConnectionClosed

from gateway.adapters.voipbin.wire import Audio, Codec, Encapsulation, MediaStreamProtocol
from harness import VOIPBIN_TOKEN, Timeline, ws_client


class Caller:
    """A VoIPBIN client on `/v1.0/calls/{call_id}/media_stream` (slin, 20 ms): `speak()` sends
    int16 8 kHz `pcm` paced on absolute deadlines, `heard` collects what the call sends back
    (with the trio time of each frame)."""

    def __init__(self, gateway, call_id: str, encapsulation: str = "sln") -> None:
        self.url = (f"ws://127.0.0.1:{gateway.runtime.media.port}/v1.0/calls/{call_id}/media_stream"
                    f"?encapsulation={encapsulation}&token={VOIPBIN_TOKEN}")
        self.proto = MediaStreamProtocol(Encapsulation(encapsulation), Codec.SLIN)
        self.heard: list[tuple[float, np.ndarray]] = []
        self.ws = None
        self.sent = 0

    async def connect(self, nursery: trio.Nursery) -> None:
        self.ws = await ws_client(nursery, self.url)
        nursery.start_soon(self._listen)

    async def _listen(self) -> None:
        try:
            while True:
                for event in self.proto.receive(await self.ws.get_message()):
                    if isinstance(event, Audio):
                        self.heard.append((trio.current_time(), np.frombuffer(event.payload, dtype="<i2")))
        except ConnectionClosed:
            pass

    async def speak(self, pcm: np.ndarray) -> None:
        pcm = pcm.reshape(-1)
        start = trio.current_time()
        for k, i in enumerate(range(0, len(pcm) - 159, 160)):
            await trio.sleep_until(start + 0.02 * k)
            await self.ws.send_message(self.proto.send_audio(pcm[i : i + 160].astype("<i2").tobytes()))
            self.sent += 1

    async def hang_up(self) -> None:
        if self.ws is not None:
            await self.ws.aclose(1000, "bye")

    def recording(self) -> np.ndarray:
        return np.concatenate([pcm for _, pcm in self.heard]) if self.heard else np.zeros(0, dtype=np.int16)

    def timeline(self) -> Timeline:
        """When each part of `recording()` arrived (8 kHz)."""
        return Timeline(8000, ((at, len(pcm)) for at, pcm in self.heard))
