"""The dial roles' WebSocket client (gateway/adapters/wsclient.py) on loopback sockets: against
trio-websocket's server for what a correct server does, and against a raw TCP server for
frames a broken one sends (RFC 6455 §5)."""

from __future__ import annotations

import functools
import struct

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError, serve_websocket
from wsproto import ConnectionType
from wsproto.events import AcceptConnection, Request
from wsproto.handshake import H11Handshake

from gateway.adapters.wsclient import _mask, connect, encode_frame


async def _server(nursery, handler) -> int:
    server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
    return server.port


async def test_messages_both_ways_text_binary_and_large():
    got: list = []

    async def echo(request):
        ws = await request.accept()
        while True:
            try:
                message = await ws.get_message()
            except ConnectionClosed:
                return
            got.append(message)
            await ws.send_message(message)

    async with trio.open_nursery() as nursery:
        port = await _server(nursery, echo)
        ws = await connect(f"ws://127.0.0.1:{port}/x?token=t")
        big = bytes(range(256)) * 300  # 76,800 bytes: a 64-bit length field, masked
        for message in ["héllo", b"\x00\x01\x02", b"", big, b"x" * 126, b"y" * 65535]:
            await ws.send_message(message)
            assert await ws.get_message() == message
        assert got[3] == big  # the server unmasked it intact
        await ws.aclose()
        assert ws.closed is not None and ws.closed.code == 1000
        nursery.cancel_scope.cancel()


async def test_a_message_sent_with_the_upgrade_answer_is_not_lost():
    async def greet(request):
        ws = await request.accept()
        await ws.send_message('{"status": "ready"}')
        await ws.send_message(b"\x01" * 10)
        await trio.sleep(5)

    async with trio.open_nursery() as nursery:
        port = await _server(nursery, greet)
        ws = await connect(f"ws://127.0.0.1:{port}/")
        assert await ws.get_message() == '{"status": "ready"}'
        assert await ws.get_message() == b"\x01" * 10
        nursery.cancel_scope.cancel()


async def test_the_servers_close_code_and_reason_reach_the_reader():
    async def close_4001(request):
        ws = await request.accept()
        await ws.send_message(b"last")
        await ws.aclose(4001, "token expired")

    async with trio.open_nursery() as nursery:
        port = await _server(nursery, close_4001)
        ws = await connect(f"ws://127.0.0.1:{port}/")
        assert await ws.get_message() == b"last"  # what came before the close frame is read first
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
        assert (closed.value.reason.code, closed.value.reason.reason) == (4001, "token expired")
        with pytest.raises(ConnectionClosed):
            await ws.send_message(b"after")
        nursery.cancel_scope.cancel()


async def test_aclose_sends_the_code_and_waits_for_the_answer_while_another_task_reads():
    seen: list = []
    reader_saw: list = []

    async def record(request):
        ws = await request.accept()
        try:
            while True:
                await ws.send_message(b"audio")
                await trio.sleep(0.01)
        except ConnectionClosed as closed:
            seen.append((closed.reason.code, closed.reason.reason))

    async with trio.open_nursery() as nursery:
        port = await _server(nursery, record)
        ws = await connect(f"ws://127.0.0.1:{port}/")

        async def read():
            try:
                while True:
                    await ws.get_message()
            except ConnectionClosed as closed:
                reader_saw.append(closed.reason.code)

        nursery.start_soon(read)
        await trio.sleep(0.1)
        with trio.fail_after(2):
            await ws.aclose(1008, "idle timeout")
            while not seen:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert seen == [(1008, "idle timeout")]
    assert reader_saw == [1008]  # the server echoed our code; the reader ended with it


async def test_pings_both_ways():
    pinged: list = []

    async def ping_client(request):
        ws = await request.accept()
        with trio.fail_after(2):
            await ws.ping(b"srv1")  # answered by the client while it reads
        pinged.append("pong came")
        await ws.get_message()
        await trio.sleep(5)

    async with trio.open_nursery() as nursery:
        port = await _server(nursery, ping_client)
        ws = await connect(f"ws://127.0.0.1:{port}/")

        async def read():
            with pytest.raises(ConnectionClosed):
                while True:
                    await ws.get_message()

        nursery.start_soon(read)
        with trio.fail_after(2):
            await ws.ping()  # the server's reader answers
        await ws.send_message(b"go")
        with trio.fail_after(2):
            while not pinged:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert pinged == ["pong came"]


async def test_refused_upgrade_raises_with_status_and_body():
    async def refuse(request):
        await request.reject(429, extra_headers=[(b"retry-after", b"7")], body=b'{"error": "slow down"}')

    async with trio.open_nursery() as nursery:
        port = await _server(nursery, refuse)
        with pytest.raises(ConnectionRejected) as refused:
            await connect(f"ws://127.0.0.1:{port}/")
        assert refused.value.status_code == 429
        assert refused.value.body == b'{"error": "slow down"}'
        assert (b"retry-after", b"7") in refused.value.headers
        nursery.cancel_scope.cancel()


async def _raw_server(nursery, after_upgrade: bytes | None, answer: bytes | None = None) -> tuple[int, list]:
    """A TCP server that accepts the upgrade (or answers `answer`), then writes `after_upgrade`
    and records what the client sends."""
    received: list = []

    async def handler(stream):
        handshake = H11Handshake(ConnectionType.SERVER)
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += await stream.receive_some(65536)
        handshake.receive_data(buf)
        request = next(e for e in handshake.events() if isinstance(e, Request))
        assert request.target
        await stream.send_all(answer if answer is not None else handshake.send(AcceptConnection()))
        if after_upgrade is not None:
            await stream.send_all(after_upgrade)
        try:
            while data := await stream.receive_some(65536):
                received.append(data)
        except trio.BrokenResourceError:
            pass

    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    return listeners[0].socket.getsockname()[1], received


def _client_close(data: bytes) -> tuple[int, str]:
    """The (code, reason) of the masked close frame the client sent, from raw bytes."""
    assert data[0] == 0x88 and data[1] & 0x80, data[:2]
    length = data[1] & 0x7F
    body = _mask(data[6:6 + length], data[2:6])
    return struct.unpack("!H", body[:2])[0], body[2:].decode()


@pytest.mark.parametrize("frame, code, cause", [
    (b"\x82\x83abcd" + b"xyz", 1002, "masked"),  # RFC 6455 §5.1: a server must not mask
    (b"\xc2\x01x", 1002, "RSV"),  # RSV1 without an extension
    (b"\x89\x7e\x00\x80" + b"p" * 128, 1002, "control frame"),  # a 128-byte ping
    (b"\x80\x01x", 1002, "continuation"),  # continuation with no message begun
    (b"\x81\x02\xc3\x28", 1007, "UTF-8"),  # invalid UTF-8 text
    (b"\x83\x01x", 1002, "opcode"),  # reserved opcode 3
    (b"\x82\x7f" + struct.pack("!Q", 2**40), 1009, "limit"),  # a length that lies
    (b"\x88\x02\x03\xed", 1002, "close code"),  # close code 1005 on the wire
], ids=["masked", "rsv", "long-ping", "stray-continuation", "bad-utf8", "opcode-3", "lying-length", "close-1005"])
async def test_a_broken_server_frame_closes_with_the_rfc_code(frame, code, cause):
    async with trio.open_nursery() as nursery:
        port, received = await _raw_server(nursery, frame)
        ws = await connect(f"ws://127.0.0.1:{port}/", max_message_size=65536)
        with pytest.raises(ConnectionClosed) as closed:
            with trio.fail_after(2):
                await ws.get_message()
        assert closed.value.reason.code == code
        assert cause in closed.value.reason.reason
        with trio.fail_after(2):
            while not received:
                await trio.sleep(0.01)
        sent_code, reason = _client_close(b"".join(received))
        assert sent_code == code and cause in reason  # the server is told why
        nursery.cancel_scope.cancel()


async def test_fragments_are_joined_and_control_frames_between_them_answered():
    ping = b"\x89\x02hi"
    message = b"\x01\x03abc" + ping + b"\x00\x02de" + b"\x80\x01f"  # text "abc"+"de"+"f"
    async with trio.open_nursery() as nursery:
        port, received = await _raw_server(nursery, message)
        ws = await connect(f"ws://127.0.0.1:{port}/")
        with trio.fail_after(2):
            assert await ws.get_message() == "abcdef"
            while sum(map(len, received)) < 8:
                await trio.sleep(0.01)
        data = b"".join(received)
        assert data[0] == 0x8A and _mask(data[6:8], data[2:6]) == b"hi"  # the pong, masked
        nursery.cancel_scope.cancel()


async def test_a_connection_lost_without_a_close_frame_is_1006():
    async with trio.open_nursery() as nursery:
        port, _ = await _raw_server(nursery, b"\x82\x01a")

        ws = await connect(f"ws://127.0.0.1:{port}/")
        assert await ws.get_message() == b"a"
        nursery.cancel_scope.cancel()  # the server's task ends: its socket closes
    with pytest.raises(ConnectionClosed) as closed:
        with trio.fail_after(2):
            await ws.get_message()
    assert closed.value.reason.code == 1006


async def test_an_answer_that_is_not_an_upgrade_is_a_handshake_error():
    bad = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: wrong\r\n\r\n"
    async with trio.open_nursery() as nursery:
        port, _ = await _raw_server(nursery, None, answer=bad)
        with pytest.raises(HandshakeError):
            with trio.fail_after(2):
                await connect(f"ws://127.0.0.1:{port}/")
        nursery.cancel_scope.cancel()


def test_client_frames_are_masked_with_a_fresh_key():
    a, b = encode_frame(0x2, b"\x00" * 8), encode_frame(0x2, b"\x00" * 8)
    assert a[1] == 0x88 and b[1] == 0x88  # mask bit, length 8
    assert a[2:6] != b[2:6]  # RFC 6455 §5.3: a new unpredictable key per frame
    assert a[6:] == a[2:6] * 2  # zeros XOR key = key
    assert encode_frame(0x2, b"x" * 200, mask=False)[:4] == b"\x82\x7e\x00\xc8"


def test_mask_keys_are_all_different_across_a_refill_and_a_forked_worker_draws_its_own():
    """Keys are cut from a pool of os.urandom: none repeats over 3 pools' worth, and a process
    forked mid-pool (a worker forked from the zygote) does not go on with the parent's keys."""
    import os

    keys = [encode_frame(0x2, b"")[2:6] for _ in range(3 * 1024)]
    assert len(set(keys)) > len(keys) - 3  # 2**32 keys: a repeat in 3,072 is a ~0.1 % event
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next keys
        os.write(write, b"".join(encode_frame(0x2, b"")[2:6] for _ in range(8)))
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64)
    parent = b"".join(encode_frame(0x2, b"")[2:6] for _ in range(8))
    os.close(read)
    os.close(write)
    assert len(child) == 32 and child != parent  # the same pool would give the same keys


async def test_messages_split_across_reads_and_several_in_one_read_all_arrive():
    """The plain-TCP read path (waits for readable after a read that drained the socket):
    a frame cut in three writes, then 50 frames in one write, then a close."""
    frames = [encode_frame(0x2, bytes([i]) * 10, mask=False) for i in range(50)]

    async def server(stream):
        handshake = H11Handshake(ConnectionType.SERVER)
        while True:
            handshake.receive_data(await stream.receive_some(4096))
            if any(isinstance(e, Request) for e in handshake.events()):
                break
        await stream.send_all(handshake.send(AcceptConnection()))
        first = encode_frame(0x1, b"hello there", mask=False)
        for piece in (first[:1], first[1:5], first[5:]):
            await stream.send_all(piece)
            await trio.sleep(0.01)
        await stream.send_all(b"".join(frames))
        await stream.send_all(encode_frame(0x8, struct.pack("!H", 1000), mask=False))
        await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, server, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        ws = await connect(f"ws://127.0.0.1:{port}/")
        got = []
        with trio.fail_after(5):
            try:
                while True:
                    got.append(await ws.get_message())
            except ConnectionClosed as closed:
                code = closed.reason.code
        nursery.cancel_scope.cancel()
    assert got == ["hello there"] + [bytes([i]) * 10 for i in range(50)] and code == 1000



async def test_sends_from_two_tasks_through_a_full_socket_buffer_stay_whole_and_in_order():
    """The server reads nothing for a while: the kernel's buffer fills, sends take the queued
    path (a short write, then the rest behind it), and every frame still arrives whole."""
    got: list[bytes] = []
    count = 150

    async def slow_reader(request):
        ws = await request.accept()
        await trio.sleep(0.3)  # not reading: its socket and ours fill up
        while len(got) < 2 * count:
            got.append(await ws.get_message())
        await trio.sleep(5)

    async with trio.open_nursery() as nursery:
        port = await _server(nursery, slow_reader)
        ws = await connect(f"ws://127.0.0.1:{port}/", max_message_size=2**20)

        async def sender(tag: int):
            for i in range(count):
                await ws.send_message(bytes([tag]) + i.to_bytes(2, "big") + bytes([tag]) * 20000)

        with trio.fail_after(10):
            async with trio.open_nursery() as senders:
                senders.start_soon(sender, 1)
                senders.start_soon(sender, 2)
            while len(got) < 2 * count:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    for tag in (1, 2):
        mine = [m for m in got if m[0] == tag]
        assert [int.from_bytes(m[1:3], "big") for m in mine] == list(range(count))
        assert all(m[3:] == bytes([tag]) * 20000 for m in mine)
