"""The listen roles' WebSocket server side (gateway/adapters/wsserver.py) on loopback sockets:
against trio-websocket's client for what a correct client does, and against raw TCP for
requests and frames a broken one sends (RFC 6455 §4.2, §5.1)."""

from __future__ import annotations

import json
import os
import struct

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from gateway.adapters.wsclient import _mask
from gateway.adapters.wsserver import read_upgrade

REQUEST = (b"GET /media/x?token=t HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def _client_frame(opcode: int, payload: bytes, *, mask: bool = True) -> bytes:
    """One final frame as a client sends it (masked unless told otherwise), payload < 126 bytes."""
    assert len(payload) < 126
    if not mask:
        return bytes([0x80 | opcode, len(payload)]) + payload
    key = os.urandom(4)
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + key + _mask(payload, key)


async def _serve(nursery, handler) -> tuple[int, list]:
    """A server that reads each upgrade with read_upgrade and hands it to `handler`; returns
    the port and the list of what read_upgrade returned (None for a refused request)."""
    requests: list = []

    async def connection(stream):
        with trio.fail_after(5):
            request = await read_upgrade(stream, max_message_size=65536)
        requests.append(request)
        if request is not None:
            await handler(request)
        await trio.aclose_forcefully(stream)

    listeners = await nursery.start(trio.serve_tcp, connection, 0)
    return listeners[0].socket.getsockname()[1], requests


async def _raw_exchange(port: int, data: bytes, *, eof: bool = False) -> bytes:
    """Send `data` on a fresh TCP connection (then EOF, if told); everything the server sends
    until it closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(data)
    if eof:
        await stream.send_eof()
    received = b""
    with trio.fail_after(5):
        try:
            while chunk := await stream.receive_some(65536):
                received += chunk
        except trio.BrokenResourceError:
            pass
    await stream.aclose()
    return received


def _frames_after_101(received: bytes) -> list[tuple[int, int, bytes]]:
    """(first byte, second byte, payload) of each server frame after the 101's headers."""
    head, _, rest = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    frames = []
    while rest:
        b0, b1 = rest[0], rest[1]
        length = b1 & 0x7F
        assert length < 126
        frames.append((b0, b1, rest[2:2 + length]))
        rest = rest[2 + length:]
    return frames


async def test_a_correct_client_exchanges_text_binary_and_large_messages_and_hears_the_close_code():
    async def echo(request):
        assert request.path == "/media/x?token=t"
        assert (b"x-probe", b"1") in request.headers
        ws = await request.accept(extra_headers=[(b"x-served-by", b"gateway")])
        for _ in range(3):
            await ws.send_message(await ws.get_message())
        await ws.aclose(4001, "call ended")

    async with trio.open_nursery() as nursery:
        port, _ = await _serve(nursery, echo)
        big = os.urandom(60_000)
        async with open_websocket_url(f"ws://127.0.0.1:{port}/media/x?token=t",
                                      extra_headers=[(b"x-probe", b"1")], max_message_size=2**17) as ws:
            with trio.fail_after(5):
                await ws.send_message("héllo")
                assert await ws.get_message() == "héllo"
                await ws.send_message(b"\x00\x01")
                assert await ws.get_message() == b"\x00\x01"
                await ws.send_message(big)
                assert await ws.get_message() == big
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
        assert (closed.value.reason.code, closed.value.reason.reason) == (4001, "call ended")
        nursery.cancel_scope.cancel()


async def test_a_refusal_carries_its_status_headers_and_body():
    async def refuse(request):
        body = json.dumps({"error": "bad token"}).encode()
        await request.reject(403, extra_headers=[(b"content-type", b"application/json")], body=body)

    async with trio.open_nursery() as nursery:
        port, _ = await _serve(nursery, refuse)
        with pytest.raises(ConnectionRejected) as refused:
            with trio.fail_after(5):
                async with open_websocket_url(f"ws://127.0.0.1:{port}/media/x"):
                    pass
        assert refused.value.status_code == 403
        assert json.loads(refused.value.body) == {"error": "bad token"}
        headers = dict(refused.value.headers)
        assert headers[b"content-type"] == b"application/json"
        assert headers[b"content-length"] == str(len(refused.value.body)).encode()
        nursery.cancel_scope.cancel()


async def test_a_frame_sent_with_the_request_is_the_first_message_and_server_frames_are_unmasked():
    got: list = []

    async def reply(request):
        ws = await request.accept()
        got.append(await ws.get_message())
        await ws.send_message(b"pong")
        await ws.aclose(1000, "bye")

    async with trio.open_nursery() as nursery:
        port, _ = await _serve(nursery, reply)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(REQUEST + _client_frame(0x2, b"first"))  # in one segment
        received = b""
        with trio.fail_after(5):
            while not received.endswith(b"bye"):
                received += await stream.receive_some(65536)
            await stream.send_all(_client_frame(0x8, b"\x03\xe8"))  # answer the close
            while chunk := await stream.receive_some(65536):
                received += chunk
        assert got == [b"first"]
        frames = _frames_after_101(received)
        assert frames[0] == (0x82, 4, b"pong")  # FIN + binary, no mask bit (RFC 6455 §5.1)
        assert frames[1] == (0x88, 5, b"\x03\xe8bye")
        nursery.cancel_scope.cancel()


async def test_an_unmasked_client_frame_closes_the_connection_with_1002_naming_the_cause():
    outcome: list = []

    async def read(request):
        ws = await request.accept()
        try:
            await ws.get_message()
        except ConnectionClosed as closed:
            outcome.append(closed.reason)

    async with trio.open_nursery() as nursery:
        port, _ = await _serve(nursery, read)
        received = await _raw_exchange(port, REQUEST + _client_frame(0x2, b"audio", mask=False))
        assert outcome[0].code == 1002 and "unmasked" in outcome[0].reason
        (b0, b1, body), = _frames_after_101(received)
        assert b0 == 0x88 and not b1 & 0x80
        assert struct.unpack("!H", body[:2])[0] == 1002
        assert "unmasked" in body[2:].decode()  # the client is told why (RFC 6455 §7.4.1)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /media/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"400"),  # plain HTTP, no upgrade
    (REQUEST.replace(b"Version: 13", b"Version: 8"), b"426"),  # RFC 6455 §4.4: version we do not speak
    (b"GET /media/x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 70_000 + b"\r\n\r\n", b"4"),  # headers too big
    (b"HELLO THERE\r\n\r\n", b"400"),  # not HTTP
], ids=["not-an-upgrade", "wrong-version", "huge-headers", "not-http"])
async def test_a_request_that_is_not_a_websocket_upgrade_is_refused_and_never_reaches_the_handler(
        request_bytes, status):
    handled: list = []

    async def handler(request):
        handled.append(request)

    async with trio.open_nursery() as nursery:
        port, requests = await _serve(nursery, handler)
        received = await _raw_exchange(port, request_bytes)
        assert received.startswith(b"HTTP/1.1 " + status), received[:80]
        assert requests == [None] and handled == []
        nursery.cancel_scope.cancel()


async def test_a_client_that_leaves_mid_request_is_none():
    async with trio.open_nursery() as nursery:
        port, requests = await _serve(nursery, lambda request: None)
        received = await _raw_exchange(port, REQUEST[:40], eof=True)  # half a request, then EOF
        assert received == b"" and requests == [None]
        nursery.cancel_scope.cancel()
