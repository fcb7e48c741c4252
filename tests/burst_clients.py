"""Run by tests/test_session_burst.py in a process of its own (so its CPU is not the
gateway's): N sessions started evenly over one second against a gateway on loopback, each
ended as soon as it is served. Half are VoIPBIN calls (the route starts a session: a file
source, the codec graph, the upgrade and its close), half Argon bots (StreamToken over HTTP, a
stream JWT checked, a room joined, one packet, left). Prints one JSON line:
{"served": n, "failed": [...], "first_start": t, "last_start": t, "last_end": t} (time.time()).

    python tests/burst_clients.py HTTP_PORT MEDIA_PORT COUNT VOIPBIN_TOKEN SPACE CHANNEL BOT_TOKEN_PREFIX
"""

from __future__ import annotations

import json
import sys
import time

import httpx
import trio
from trio_websocket import open_websocket_url

SPREAD_S = float(__import__("os").environ.get("BURST_SPREAD_S", "0.5"))  # seconds over which the sessions start
OPUS_20MS = b"\xf8\xff\xfe"  # 20 ms of CELT silence


async def main(http: int, media: int, count: int, voipbin_token: str, space: str, channel: str, bot_prefix: str) -> None:
    report: dict = {"served": 0, "failed": [], "starts": [], "ends": []}
    async with httpx.AsyncClient(timeout=10) as client:

        async def call(i: int) -> None:
            url = f"ws://127.0.0.1:{media}/v1.0/calls/burst-{i}/media_stream?encapsulation=rtp&token={voipbin_token}"
            async with open_websocket_url(url) as ws:
                await ws.get_message()  # the call's first audio: the session is up

        async def bot(i: int) -> None:
            response = await client.post(
                f"http://127.0.0.1:{http}/api/bot/IVoice/v1/StreamToken",
                headers={"Authorization": f"Bot {bot_prefix}{i}"}, json={"spaceId": space, "channelId": channel})
            response.raise_for_status()
            data = response.json()
            url = f"{data['ingressUrl'].replace('http', 'ws', 1)}/audio/connect?token={data['token']}&track_name=t{i}"
            async with open_websocket_url(url) as ws:
                assert json.loads(await ws.get_message())["status"] == "ready"
                await ws.send_message(OPUS_20MS)

        async def session(k: int) -> None:
            report["starts"].append(time.time())
            try:
                with trio.fail_after(10):
                    await (call(k // 2) if k % 2 == 0 else bot(k // 2))
                report["served"] += 1
            except Exception as err:  # noqa: BLE001 - reported to the test, which fails on it
                report["failed"].append(f"session {k}: {type(err).__name__}: {err}")
            report["ends"].append(time.time())

        async with trio.open_nursery() as nursery:
            begin = trio.current_time()
            for k in range(count):
                await trio.sleep_until(begin + k * SPREAD_S / count)
                nursery.start_soon(session, k)
    print(json.dumps({"served": report["served"], "failed": report["failed"], "first_start": min(report["starts"]),
                      "last_start": max(report["starts"]), "last_end": max(report["ends"])}))


if __name__ == "__main__":
    http, media, count = (int(v) for v in sys.argv[1:4])
    trio.run(main, http, media, count, *sys.argv[4:8])
