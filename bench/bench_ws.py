"""CPU per WebSocket message: trio-websocket's client against gateway/adapters/wsclient.py.

    .venv/bin/python bench/bench_ws.py [--messages 20000] [--size 172]

One process, loopback: a trio-websocket server receives N binary messages of `size` bytes (a
20 ms Opus or RTP u-law packet is 70-180 bytes) from each client in turn; the figure is the
process's CPU time (user + sys) per message, so it counts both ends: the client's send and
the server's receive, which is the same for both rows.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import trio
from trio_websocket import ConnectionClosed, open_websocket_url, serve_websocket

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.adapters.wsclient import connect  # noqa: E402


async def run(count: int, size: int) -> None:
    got = trio.Semaphore(0)

    async def handler(request):
        ws = await request.accept()
        received = 0
        try:
            while True:
                await ws.get_message()
                received += 1
                if received == count:
                    got.release()
                    received = 0
        except ConnectionClosed:
            pass

    message = b"x" * size
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        url = f"ws://127.0.0.1:{server.port}/"

        async def measure(name, ws) -> None:
            c0 = time.process_time()
            for _ in range(count):
                await ws.send_message(message)
                await trio.sleep(0)  # let the server read, as at 50 packets a second
            await got.acquire()
            per = (time.process_time() - c0) / count * 1e6
            print(f"{name:16s} {per:7.1f} µs of CPU per message (send + the server's receive)")
            await ws.aclose()

        async with open_websocket_url(url) as ws:
            await measure("trio-websocket", ws)
        await measure("wsclient", await connect(url))
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--size", type=int, default=172)
    args = parser.parse_args()
    trio.run(run, args.messages, args.size)


if __name__ == "__main__":
    main()
