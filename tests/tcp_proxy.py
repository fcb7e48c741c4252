"""A loopback TCP proxy whose connections a test can cut with a reset, as a network would.

`CuttableProxy(upstream_port)`: `await proxy.start(nursery)` listens on 127.0.0.1 (an
ephemeral port, `proxy.port`) and joins each client to a new connection to the upstream port
(bytes copied both ways as they come). `await proxy.cut()` resets every open connection on
both sides (SO_LINGER 0, then close: the peers get RST, no close frame, no FIN), like Argon's
server dropping TCP; `proxy.refusing = True` resets new clients at once (the far side stays
away). `proxy.connections` counts the clients joined.
"""

from __future__ import annotations

import socket
import struct
from functools import partial
from typing import Callable

import trio

LINGER_RESET = struct.pack("ii", 1, 0)  # l_onoff=1, l_linger=0: close() sends RST


class CuttableProxy:
    def __init__(self, upstream_port: int | Callable[[], int]) -> None:
        self._upstream = upstream_port
        self.port = 0
        self.connections = 0
        self.refusing = False
        self._open: list[tuple[trio.SocketStream, trio.SocketStream]] = []

    async def start(self, nursery: trio.Nursery) -> int:
        listeners = await nursery.start(partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]
        return self.port

    def _upstream_port(self) -> int:
        return self._upstream() if callable(self._upstream) else self._upstream

    async def _handle(self, client: trio.SocketStream) -> None:
        if self.refusing:
            await _reset(client)
            return
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self._upstream_port())
        except OSError:
            await _reset(client)
            return
        self.connections += 1
        pair = (client, upstream)
        self._open.append(pair)
        try:
            async with trio.open_nursery() as pumps:
                pumps.start_soon(_pump, client, upstream, pumps.cancel_scope)
                pumps.start_soon(_pump, upstream, client, pumps.cancel_scope)
        finally:
            if pair in self._open:
                self._open.remove(pair)
            for stream in pair:
                await _close_quietly(stream)

    async def cut(self) -> int:
        """Reset every open connection, both sides; returns how many were cut."""
        pairs, self._open = self._open, []
        for pair in pairs:
            for stream in pair:
                await _reset(stream)
        return len(pairs)


async def _pump(source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope) -> None:
    try:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        scope.cancel()


async def _reset(stream: trio.SocketStream) -> None:
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    except OSError:
        pass
    await _close_quietly(stream)


async def _close_quietly(stream: trio.SocketStream) -> None:
    try:
        await stream.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
