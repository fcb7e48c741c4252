"""Streaming HTTP responses (server-sent events) from gateway.server, on real loopback sockets.

hypercorn serves the app; httpx reads the chunks as they come. Ordering between the handler
and the client is coordinated with trio.Events, never with sleeps.
"""

from __future__ import annotations

import logging

import httpx
import pytest
import trio

from gateway.server import HttpRequest, HttpResponse, HttpServer, serve_http


async def start(nursery: trio.Nursery, app: HttpServer) -> httpx.AsyncClient:
    port = await nursery.start(serve_http, app, "127.0.0.1", 0)
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10)


async def test_chunks_reach_the_client_as_they_are_produced():
    seen_first = trio.Event()
    produced_second = False

    async def chunks():
        nonlocal produced_second
        yield b"data: one\n\n"
        await seen_first.wait()
        produced_second = True
        yield b"data: two\n\n"

    async def handler(request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, content_type="text/event-stream", headers=(("cache-control", "no-cache"),), stream=chunks)

    app = HttpServer()
    app.add("GET", "/events", handler)
    async with trio.open_nursery() as nursery:
        client = await start(nursery, app)
        with trio.fail_after(10):
            async with client.stream("GET", "/events") as response:
                assert response.status_code == 200
                assert response.headers["content-type"] == "text/event-stream"
                assert response.headers["cache-control"] == "no-cache"
                assert "content-length" not in response.headers
                assert response.headers["transfer-encoding"] == "chunked"
                raw = response.aiter_raw()
                assert await raw.__anext__() == b"data: one\n\n"
                assert not produced_second  # chunk 1 arrived before the handler made chunk 2
                seen_first.set()
                assert await raw.__anext__() == b"data: two\n\n"
                with pytest.raises(StopAsyncIteration):  # a clean end: the last chunk was sent
                    await raw.__anext__()
            # whole-body responses are unchanged: content-length, no chunking
            assert (await client.get("/nowhere")).headers["content-length"] == str(len(b'{"error": "no such resource: /nowhere"}'))
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_event_stream_constructor_and_validation():
    async def nothing():
        yield b""

    response = HttpResponse.event_stream(nothing, (("x-extra", "1"),))
    assert response.status == 200 and response.content_type == "text/event-stream" and response.body == b""
    assert dict(response.headers) == {"cache-control": "no-cache", "x-accel-buffering": "no", "x-extra": "1"}
    with pytest.raises(ValueError, match="body or a stream"):
        HttpResponse(200, b"x", stream=nothing)
    assert HttpResponse(204, b"", "text/plain", ()).stream is None  # positional use unchanged


async def test_client_disconnect_runs_the_generators_finally():
    subscribed = trio.Event()
    unsubscribed = trio.Event()

    async def chunks():
        try:
            subscribed.set()
            yield b": hello\n\n"
            await trio.sleep_forever()
            yield b"never"
        finally:
            unsubscribed.set()

    async def handler(request: HttpRequest) -> HttpResponse:
        return HttpResponse.event_stream(chunks)

    app = HttpServer()
    app.add("GET", "/events", handler)
    async with trio.open_nursery() as nursery:
        client = await start(nursery, app)
        with trio.fail_after(10):
            async with client.stream("GET", "/events") as response:
                assert await response.aiter_raw().__anext__() == b": hello\n\n"
                assert subscribed.is_set() and not unsubscribed.is_set()
            # leaving the block mid-body closes the connection
        with trio.fail_after(2):
            await unsubscribed.wait()
        assert (await client.get("/nowhere")).status_code == 404  # the server still answers
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_disconnect_while_a_chunk_is_being_sent_closes_the_generator():
    """ASGI level, no sockets: the client leaves while `send` is stuck on a chunk (the generator
    waits at its `yield`); the server closes the generator, so its `finally` runs now, not at GC."""
    closed = trio.Event()
    stuck = trio.Event()

    async def chunks():
        try:
            yield b"a"
            yield b"b"
        finally:
            closed.set()

    made = []  # holds the generator: its `finally` cannot come from garbage collection

    def factory():
        made.append(chunks())
        return made[-1]

    async def handler(request: HttpRequest) -> HttpResponse:
        return HttpResponse.event_stream(factory)

    app = HttpServer()
    app.add("GET", "/events", handler)
    to_app, inbox = trio.open_memory_channel(4)
    await to_app.send({"type": "http.request", "body": b"", "more_body": False})
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)
        if message.get("body") == b"a":
            stuck.set()
            await trio.sleep_forever()  # a client that does not read

    scope = {"type": "http", "method": "GET", "path": "/events", "query_string": b"", "headers": [], "client": ("127.0.0.1", 1)}
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(app, scope, inbox.receive, send)
            await stuck.wait()
            assert not closed.is_set()
            await to_app.send({"type": "http.disconnect"})
            await closed.wait()
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]  # no last body after a disconnect
    assert (b"content-type", b"text/event-stream") in sent[0]["headers"]
    assert not any(name == b"content-length" for name, _ in sent[0]["headers"])


async def test_exception_mid_stream_is_logged_and_the_server_carries_on(caplog):
    async def chunks():
        yield b"data: partial\n\n"
        raise RuntimeError("stream bug")

    async def broken(request: HttpRequest) -> HttpResponse:
        return HttpResponse.event_stream(chunks)

    async def ok(request: HttpRequest) -> HttpResponse:
        return HttpResponse.json(200, {"ok": True})

    app = HttpServer()
    app.add("GET", "/broken", broken)
    app.add("GET", "/ok", ok)
    caplog.set_level(logging.ERROR, logger="gateway.server")
    async with trio.open_nursery() as nursery:
        client = await start(nursery, app)
        with trio.fail_after(10):
            received = b""
            with pytest.raises(httpx.RemoteProtocolError):  # truncated: no last chunk
                async with client.stream("GET", "/broken") as response:
                    assert response.status_code == 200
                    async for chunk in response.aiter_raw():
                        received += chunk
            assert received == b"data: partial\n\n"
            records = [r for r in caplog.records if r.name == "gateway.server"]
            assert len(records) == 1 and "GET /broken" in records[0].getMessage()
            assert records[0].exc_info and records[0].exc_info[1].args == ("stream bug",)
            for _ in range(3):
                answer = await client.get("/ok")
                assert answer.status_code == 200 and answer.json() == {"ok": True}
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_a_chunk_that_is_not_bytes_is_a_logged_bug(caplog):
    async def chunks():
        yield "text"  # bytes(5) would have sent five NULs; refuse anything but bytes

    async def handler(request: HttpRequest) -> HttpResponse:
        return HttpResponse.event_stream(chunks)

    app = HttpServer()
    app.add("GET", "/events", handler)
    async with trio.open_nursery() as nursery:
        client = await start(nursery, app)
        with trio.fail_after(10), pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("GET", "/events") as response:
                await response.aread()
        assert "yields bytes, not str" in caplog.text
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_an_open_stream_does_not_hold_up_the_server_stopping():
    streaming = trio.Event()
    cleaned_up = trio.Event()
    stopped = trio.Event()

    async def chunks():
        try:
            yield b": open\n\n"
            streaming.set()
            await trio.sleep_forever()
            yield b"never"
        finally:
            cleaned_up.set()

    async def handler(request: HttpRequest) -> HttpResponse:
        return HttpResponse.event_stream(chunks)

    app = HttpServer()
    app.add("GET", "/events", handler)
    server_scope = trio.CancelScope()

    async def run_server(task_status=trio.TASK_STATUS_IGNORED):
        with server_scope:
            await serve_http(app, "127.0.0.1", 0, task_status=task_status)
        stopped.set()

    async with trio.open_nursery() as nursery:
        port = await nursery.start(run_server)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            with trio.fail_after(10):
                async with client.stream("GET", "/events") as response:
                    raw = response.aiter_raw()
                    assert await raw.__anext__() == b": open\n\n"
                    await streaming.wait()
                    began = trio.current_time()
                    server_scope.cancel()
                    with trio.fail_after(2):
                        await stopped.wait()
                    assert trio.current_time() - began < 1.0  # not even graceful_timeout (1 s)
                    assert cleaned_up.is_set()
                    with pytest.raises(httpx.RemoteProtocolError):  # the stream was cut, not ended
                        async for _ in raw:
                            pass


async def test_deeply_nested_json_is_a_value_error_not_a_500():
    direct = HttpRequest("POST", "/x", {}, {}, b"[" * 200_000, {})
    with pytest.raises(ValueError, match="JSON nested deeper than 32 levels"):
        direct.json()

    async def handler(request: HttpRequest) -> HttpResponse:
        try:
            data = request.json()
        except ValueError as err:
            return HttpResponse.json(400, {"error": str(err)})
        return HttpResponse.json(200, {"got": data})

    app = HttpServer()
    app.add("POST", "/echo", handler)
    async with trio.open_nursery() as nursery:
        client = await start(nursery, app)
        refused = await client.post("/echo", content=b"[" * 60_000)  # refused before the handler parses it
        assert refused.status_code == 400
        assert refused.json() == {"error": "JSON nested deeper than 32 levels"}
        too_big = await client.post("/echo", content=b"[" * 200_000)
        assert too_big.status_code == 413 and too_big.json() == {"error": "body over 64 KiB"}
        assert (await client.post("/echo", content=b"[[1]]")).json() == {"got": [[1]]}
        assert (await client.post("/echo", content=b"{")).status_code == 400
        await client.aclose()
        nursery.cancel_scope.cancel()
