"""Every core: `gateway run CONFIG --workers N`, one supervisor and N worker processes (issue 12).

The gateway's media path is one trio thread; one process uses one core. With `--workers N`
the process systemd starts is a **supervisor** that runs no route itself:

- It binds the public sockets (`server.http`, `server.media`) and starts N **workers**, each
  with a Unix `SOCK_SEQPACKET` channel to it. `gateway run` forks them from a **zygote**
  (`Zygote`: forked before the supervisor's event loop, every module imported), so a worker
  starts in ~0.1 s without imports and shares the zygote's pages; without one, a worker is
  `python -m gateway worker CONFIG --index i --count N`. Each worker loads the same file, validates all of it, and runs only its share of
  the routes: `worker_of(route, N)`, a stable hash (CRC-32) of the route's *placement key*.
  Routes that share a listen service (every `argon`, `videosdk` or `agent` listen route: one
  REST path and one token table per service) or an Argon bot's call desk (`calls: incoming`)
  have one key, so they land on one worker; a `voipbin` listen route (its own media path) and
  every dial route are placed by name.
- **Media (WebSocket) connections** are accepted by the supervisor, which reads the request
  line without consuming it (`MSG_PEEK`), finds the worker serving that path (each worker
  reports the patterns of its `MediaServer`), and hands the connection itself to that worker
  over the channel (`SCM_RIGHTS`, unix(7)). The worker serves it as if it had accepted it;
  from then on the supervisor is not in the media path at all. A path no worker serves goes
  to worker 0, which answers 404 as a single gateway would; a path whose worker is down (it
  is being restarted) gets `503` with `Retry-After: 1` from the supervisor.
- **AudioSocket (TCP) connections** (`server.audiosocket`) likewise: the supervisor peeks
  at the first frame (`MSG_PEEK`: the UUID frame, 19 bytes) and hands the connection, tagged
  `AUDIOSOCKET`, to the worker whose listen endpoints serve that UUID (each worker reports
  them), else to the catch-all's worker (`uuid: "*"`), else to worker 0, which refuses it
  as one gateway would (a hangup frame, the cause in its log).
- **REST** on `server.http`: the control API is the supervisor's (the same paths, guards and
  answers as one gateway's, README "Control API"), built from its workers' answers:
  `/metrics` is the sum of the workers' samples (`sum_metrics`), `/v1/routes` their routes
  together (each with its `worker`), `/readyz` ready when every worker is up and ready, a
  reload is validated once and then applied by every worker, `POST /v1/routes` goes to the
  worker the new route is placed on. Every other request (a listen service's token call, an
  events stream) is forwarded to the worker whose `HttpServer` serves that method and path,
  on the worker's own loopback port (headers and body as sent; a streamed answer streamed).
- A worker that dies is restarted (backoff 0.1 s doubling to 5 s, reset after 30 s up); its
  routes come back with it, the API-added ones included (the supervisor re-adds them). The
  others never notice. SIGTERM / SIGINT stop the workers (each says its goodbyes), SIGHUP
  reloads all of them. systemd hears READY=1 from the supervisor once every worker is
  running (workers do not inherit `$NOTIFY_SOCKET`), and the supervisor pets the watchdog.
- A worker whose supervisor is gone (its channel closes) stops on its own.

The supervisor talks to workers on their loopback port with a per-start secret
(`x-gateway-worker`); those internal paths (`/v1/worker/...`) answer nobody else.
"""

from __future__ import annotations

import array
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import attrs
import httpx
import trio

from gateway.config.schema import GatewayConfig, RouteConfig
from gateway.errors import ConfigError
from gateway.server import HttpRequest, HttpResponse, HttpServer, serve_http
from gateway.systemd import Notifier

log = logging.getLogger("gateway.workers")

SECRET_HEADER = "x-gateway-worker"
SECRET_ENV = "GATEWAY_WORKER_SECRET"
HEAD_TIMEOUT = 10.0  # seconds a media client has to send its request line (the handshake's own limit)
HEAD_LIMIT = 8192  # bytes of request line looked at
RESTART_FIRST = 0.1  # seconds before restarting a worker that died
RESTART_MAX = 5.0
OWNER_WAIT_S = 5.0  # seconds a client waits for the worker serving it to be up (start, restart)
STABLE_S = 30.0  # a worker up this long has its restart backoff reset
START_TIMEOUT = 60.0  # seconds a worker may take to report it runs (imports, routes built)
FORWARD_TIMEOUT = httpx.Timeout(30.0, read=None)  # a forwarded events stream may run for hours
MAX_FORWARD_BODY = 2**20  # bytes of request body the supervisor forwards (the workers bound their own)
HOP_HEADERS = {"host", "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-connection", "content-length"}
LISTEN_SERVICE_KINDS = ("argon", "videosdk", "agent")
"""Kinds whose listen role is one service per process (shared REST paths, tokens): their
listen routes share a worker."""


# ------------------------------------------------------------------------------- placement
def placement_key(rc: RouteConfig) -> str:
    """What decides a route's worker: routes with equal keys run in one process (see the
    module doc): `listen:argon` for every route with an Argon listen endpoint, `calls:argon`
    for every route answering Argon calls, else `route:NAME`."""
    for ec in rc.endpoints:
        if ec.role == "listen" and ec.kind in LISTEN_SERVICE_KINDS:
            return f"listen:{ec.kind}"
        if ec.kind == "argon" and "calls" in ec.options:
            return "calls:argon"
    return f"route:{rc.name}"


def worker_of(rc: RouteConfig, count: int) -> int:
    """The index (0 .. count-1) of the worker that runs `rc`: CRC-32 of its placement key,
    the same in every process and every run (Python's `hash` is salted per process)."""
    if count <= 1:
        return 0
    return zlib.crc32(placement_key(rc).encode()) % count


def default_workers() -> int:
    """The CPUs this process may run on (its affinity mask, so a container's or a unit's
    `CPUAffinity=` counts), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------- metric sums
def sum_metrics(texts: list[str]) -> str:
    """Prometheus text of several processes as one: samples with the same name and labels
    summed (counters, gauges, histogram buckets, sums and counts alike), except the start
    time (`*_start_time_seconds`: the earliest). Families keep their HELP and TYPE."""
    from prometheus_client.parser import text_string_to_metric_families

    order: list[str] = []
    meta: dict[str, tuple[str, str]] = {}
    samples: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in meta:
                order.append(family.name)
                meta[family.name] = (family.type, family.documentation)
                samples[family.name] = {}
            into = samples[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in into:
                    into[key] = sample.value
                elif sample.name.endswith("_start_time_seconds"):
                    into[key] = min(into[key], sample.value)
                else:
                    into[key] += sample.value
    lines: list[str] = []
    for name in order:
        kind, doc = meta[name]
        lines.append(f"# HELP {name} {_escape_help(doc)}")
        lines.append(f"# TYPE {name} {kind}")
        for (sample_name, labels), value in samples[name].items():
            label_text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
            lines.append(f"{sample_name}{{{label_text}}} {_number(value)}" if labels else f"{sample_name} {_number(value)}")
    return "\n".join(lines) + "\n"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else f"{value:.1f}"


# ------------------------------------------------------------------------------ fd channel
def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(supervisor's end, worker's end): SOCK_SEQPACKET keeps each hand-over one message."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


MEDIA = b"m"  # the tag of a handed-over media (WebSocket) connection
AUDIOSOCKET = b"a"  # ... of an AudioSocket (TCP) connection


async def send_connection(channel: trio.socket.SocketType, sock: trio.socket.SocketType, tag: bytes = MEDIA) -> None:
    """Hand the connected socket `sock` to the process at the other end (SCM_RIGHTS, unix(7)),
    tagged with the server it is for (`MEDIA`, `AUDIOSOCKET`). Our copy stays open until the
    caller closes it; closing it does not end the connection."""
    fds = array.array("i", [sock.fileno()])
    await channel.sendmsg([tag], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])


class HandedOver:
    """The worker's end of the supervisor's channel: `run()` reads the connections handed
    over (one fd per message, tagged), and `listener(tag)` is a trio Listener of that tag's
    connections for its server (`serve_media`, `serve_audiosocket`). When the channel closes
    (the supervisor is gone) `closed` is set and every listener's `accept()` raises
    trio.ClosedResourceError."""

    def __init__(self, channel: trio.socket.SocketType) -> None:
        self.channel = channel
        self.closed = trio.Event()
        self._queues: dict[bytes, tuple[trio.MemorySendChannel[trio.SocketStream],
                                        trio.MemoryReceiveChannel[trio.SocketStream]]] = {}

    def listener(self, tag: bytes) -> _Handed:
        if tag not in self._queues:
            self._queues[tag] = trio.open_memory_channel(64)
        return _Handed(self, self._queues[tag][1])

    async def run(self) -> None:
        try:
            while True:
                try:
                    data, ancdata, _flags, _addr = await self.channel.recvmsg(16, socket.CMSG_SPACE(4 * 16))
                except OSError as err:
                    log.info("the supervisor's channel failed: %s", err)
                    return
                fds: list[int] = []
                for level, kind, payload in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        got = array.array("i")
                        got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                        fds.extend(got)
                if not data and not fds:
                    return  # the supervisor closed the channel
                for extra in fds[1:]:  # one connection per message: anything else is closed, not leaked
                    os.close(extra)
                if not fds:
                    continue
                sock = socket.socket(fileno=fds[0])
                queue = self._queues.get(data[:1])
                if queue is None:  # a server this worker does not run: nothing to hand it to
                    sock.close()
                    continue
                sock.setblocking(False)
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
                try:
                    queue[0].send_nowait(stream)
                except trio.WouldBlock:
                    log.warning("worker: %d connections wait for their server already; closing this one", 64)
                    await trio.aclose_forcefully(stream)
        finally:
            self.closed.set()
            for send, _ in self._queues.values():
                send.close()

    async def aclose(self) -> None:
        self.channel.close()
        await trio.lowlevel.checkpoint()


class _Handed(trio.abc.Listener[trio.SocketStream]):
    """One server's share of the handed-over connections (`HandedOver.listener`)."""

    def __init__(self, owner: HandedOver, queue: trio.MemoryReceiveChannel[trio.SocketStream]) -> None:
        self.owner, self.queue = owner, queue

    async def accept(self) -> trio.SocketStream:
        try:
            return await self.queue.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise trio.ClosedResourceError("the supervisor closed the channel") from None

    async def aclose(self) -> None:
        await self.owner.aclose()


# ---------------------------------------------------------------------------------- worker
async def run_worker(path: str, index: int, count: int, channel_fd: int, media_port: int | None,
                     audiosocket_port: int | None = None) -> None:
    """One worker (`gateway worker`): its share of `path`'s routes, media from the supervisor's
    channel, REST on a loopback port it reports on the channel. Stops on SIGTERM/SIGINT (the
    goodbyes), reloads on SIGHUP, and stops when the channel closes."""
    from gateway._util import abort_goodbyes
    from gateway.cli import STOP_DEADLINE
    from gateway.daemon import Gateway
    from gateway.runtime import Runtime
    from gateway.server import serve_media

    secret = os.environ.pop(SECRET_ENV, "")
    config = GatewayConfig.load(path)
    runtime = Runtime(config, workers=count)
    gateway = Gateway(config, runtime, notifier=Notifier({}), config_path=path,
                      placement=lambda rc: worker_of(rc, count) == index)
    gateway.build()
    channel = trio.socket.from_stdlib_socket(socket.socket(fileno=channel_fd))
    handed = HandedOver(channel)
    _install_internal(gateway, secret)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_http, runtime.http, "127.0.0.1", 0)
        media = config.server.media
        if media is not None:
            media_listener = handed.listener(MEDIA)
            await nursery.start(lambda task_status: serve_media(
                runtime.media, media.host, media_port or media.port, listeners=[media_listener], task_status=task_status))
        if config.server.audiosocket is not None:
            from gateway.adapters.audiosocket.server import listen_server, serve_audiosocket

            audiosocket = config.server.audiosocket
            tcp_listener = handed.listener(AUDIOSOCKET)
            await nursery.start(lambda task_status: serve_audiosocket(
                listen_server(runtime), audiosocket.host, audiosocket_port or audiosocket.port,
                listeners=[tcp_listener], task_status=task_status))
        nursery.start_soon(handed.run)
        await nursery.start(gateway.run)
        await channel.send(json.dumps({"hello": {"index": index, "pid": os.getpid(), "http_port": runtime.http.port,
                                                 "routes": len(gateway.routes)}}).encode())
        log.info("worker %d of %d running %d route(s) (pid %d)", index, count, len(gateway.routes), os.getpid())

        async def stop(why: str) -> None:
            log.info("worker %d: %s: closing its routes", index, why)
            with trio.move_on_after(STOP_DEADLINE + 1):
                await gateway.stop(STOP_DEADLINE)
            nursery.cancel_scope.cancel()

        async def orphaned() -> None:
            await handed.closed.wait()
            await stop("the supervisor is gone")

        async def signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as received:
                async for sig in received:
                    if sig == signal.SIGHUP:
                        nursery.start_soon(_reload_quietly, gateway)
                        continue
                    nursery.start_soon(stop, f"received {signal.Signals(sig).name}")
                    break
                async for sig in received:  # a second signal (the supervisor's): no goodbyes
                    if sig != signal.SIGHUP:
                        log.warning("worker %d: second signal: exiting now", index)
                        abort_goodbyes()
                        nursery.cancel_scope.cancel()
                        return

        nursery.start_soon(orphaned)
        nursery.start_soon(signals)


async def _reload_quietly(gateway: Any) -> None:
    try:
        await gateway.reload()
    except ConfigError:
        pass  # logged by the gateway; nothing changed


def _install_internal(gateway: Any, secret: str) -> None:
    """The supervisor's paths on a worker's loopback port, answered only with its secret."""
    from gateway.control import describe_route
    from gateway.metrics import render_async

    http: HttpServer = gateway.runtime.http

    def internal(handler):
        async def guarded(request: HttpRequest) -> HttpResponse:
            sent = request.headers.get(SECRET_HEADER, "")
            if not secret or not secrets.compare_digest(sent.encode(), secret.encode()):
                return HttpResponse.json(403, {"error": "internal to the gateway's supervisor"})
            return await handler(request)

        return guarded

    async def paths(request: HttpRequest) -> HttpResponse:
        from gateway.adapters.audiosocket.server import listen_server

        uuids = listen_server(gateway.runtime).uuids if gateway.config.server.audiosocket is not None else []
        return HttpResponse.json(200, {"http": gateway.runtime.http.patterns(), "media": gateway.runtime.media.patterns(),
                                       "audiosocket": uuids})

    async def state(request: HttpRequest) -> HttpResponse:
        return HttpResponse.json(200, {"ready": gateway.ready, "status": gateway.status_line(),
                                       "routes": {name: s.state for name, s in gateway.routes.items()}})

    async def metrics(request: HttpRequest) -> HttpResponse:
        body, content_type = await render_async(gateway)
        return HttpResponse(200, body, content_type)

    async def reload(request: HttpRequest) -> HttpResponse:
        try:
            report = await gateway.reload()
        except ConfigError as err:
            return HttpResponse.json(400, {"error": f"reload refused, nothing changed: {err}"})
        return HttpResponse.json(200, {**report.as_dict(), "summary": report.summary()})

    async def add(request: HttpRequest) -> HttpResponse:
        try:
            rc = RouteConfig.from_data(request.json(), "POST /v1/routes")
            added = await gateway.add_route(rc)
        except (ValueError, ConfigError, KeyError, RuntimeError) as err:
            return HttpResponse.json(400, {"error": str(err)})
        return HttpResponse.json(201, describe_route(added, events=False))

    http.add("GET", "/v1/worker/paths", internal(paths))
    http.add("GET", "/v1/worker/state", internal(state))
    http.add("GET", "/v1/worker/metrics", internal(metrics))
    http.add("POST", "/v1/worker/reload", internal(reload))
    http.add("POST", "/v1/worker/routes", internal(add))


# ------------------------------------------------------------------------------ supervisor
@attrs.define(eq=False)
class Worker:
    """The supervisor's view of one worker process."""

    index: int
    process: trio.Process | Forked | None = None
    channel: trio.socket.SocketType | None = None
    http_port: int | None = None
    """Its loopback REST port (None until it said hello, or while it is down)."""
    media: list[Any] = attrs.Factory(list)
    """Compiled patterns of the media paths it serves."""
    http: list[tuple[str, Any]] = attrs.Factory(list)
    """(method, compiled pattern) of the REST paths it serves."""
    audiosocket: set[str] = attrs.Factory(set)
    """The AudioSocket call UUIDs its listen endpoints serve ("*": the catch-all)."""
    routes: dict[str, str] = attrs.Factory(dict)
    """Its routes' states, as last read (`Supervisor.refresh`)."""
    ready: bool = False
    answering: bool = False
    """Whether it answered the last state read (a worker just killed may still look up
    until the zygote reports its exit; one that is stuck never answers)."""
    restarts: int = 0
    started_at: float = 0.0
    running: trio.Event = attrs.Factory(trio.Event)
    """Set while it runs and said hello; replaced when it dies."""

    @property
    def up(self) -> bool:
        """Running, and its paths are known (what the media front and forwarding route by)."""
        return self.running.is_set() and self.channel is not None

    def serves_media(self, path: str) -> bool:
        return any(p.match(path) for p in self.media)

    def serves_http(self, method: str, path: str) -> bool:
        return any(m in (method, "*") and p.match(path) for m, p in self.http)


class Supervisor:
    """`gateway run --workers N`: see the module doc."""

    def __init__(self, config: GatewayConfig, path: str, count: int, *, log_level: str = "info",
                 log_format: str = "plain", notifier: Notifier | None = None, zygote: Zygote | None = None) -> None:
        if count < 1:
            raise ValueError("workers: at least 1")
        self.config = config
        self.path = path
        self.count = count
        self.log_level = log_level
        self.log_format = log_format
        self.notifier = notifier or Notifier()
        self.workers = [Worker(i) for i in range(count)]
        self.zygote = zygote
        """Forks the workers (`Zygote`); None: each worker is a new `python -m gateway worker`."""
        self.secret = secrets.token_urlsafe(24)
        self.http = HttpServer()
        self.media_port: int | None = None
        self.audiosocket_port: int | None = None
        self.client: httpx.AsyncClient | None = None
        self.api_routes: dict[str, tuple[int, bytes]] = {}
        """Routes added through the control API: name → (worker, the JSON body), re-added
        when that worker is restarted."""
        self.stopping = False
        self.started_at = time.time()
        self.reloads = 0
        self._changing = trio.Lock()
        self._nursery: trio.Nursery | None = None

    # ------------------------------------------------------------------------------ running
    async def run(self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED) -> None:
        server = self.config.server
        self.client = httpx.AsyncClient(timeout=FORWARD_TIMEOUT)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.zygote is not None:
                    nursery.start_soon(self.zygote.read)
                media_listeners: list[trio.SocketListener] = []
                if server.media is not None:
                    media_listeners = await trio.open_tcp_listeners(server.media.port, host=server.media.host)
                    self.media_port = media_listeners[0].socket.getsockname()[1]
                    log.info("media listening on %s:%d (handed to %d workers)", server.media.host, self.media_port, self.count)
                tcp_listeners: list[trio.SocketListener] = []
                if server.audiosocket is not None:
                    tcp_listeners = await trio.open_tcp_listeners(server.audiosocket.port, host=server.audiosocket.host)
                    self.audiosocket_port = tcp_listeners[0].socket.getsockname()[1]
                    log.info("AudioSocket listening on %s:%d (handed to %d workers)", server.audiosocket.host,
                             self.audiosocket_port, self.count)
                if server.http is not None:  # bound first: a worker's dial route may call another's service
                    self._install_control()
                    await nursery.start(serve_http, self.http, server.http.host, server.http.port)
                if media_listeners:
                    await nursery.start(trio.serve_listeners, self._front, media_listeners)
                if tcp_listeners:
                    await nursery.start(trio.serve_listeners, self._front_audiosocket, tcp_listeners)
                for worker in self.workers:
                    nursery.start_soon(self._keep_running, worker)
                with trio.move_on_after(START_TIMEOUT):
                    for worker in self.workers:
                        await worker.running.wait()
                await self.refresh()
                log.info("gateway running: %d worker(s), %s", self.count, self.status_line())
                self.notifier.ready(self.status_line())
                nursery.start_soon(self.notifier.watchdog)
                nursery.start_soon(self._report_status)
                task_status.started(self)
        finally:
            with trio.CancelScope(shield=True):
                await self.client.aclose()

    def status_line(self) -> str:
        """`3 route(s): 2 up, 1 waiting` over every worker, as one gateway says it (systemd's
        STATUS=); `; 1 of 2 workers down` when one is, `; 1 of 2 workers not answering`
        when one that is up did not answer the last read (its routes are then not counted)."""
        counts: dict[str, int] = {}
        total = 0
        for worker in self.workers:
            for state in worker.routes.values():
                counts[state] = counts.get(state, 0) + 1
                total += 1
        parts = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
        down = sum(not w.up for w in self.workers)
        silent = sum(w.up and not w.answering for w in self.workers)
        return (f"{total} route(s)" + (f": {parts}" if parts else "")
                + (f"; {down} of {self.count} workers down" if down else "")
                + (f"; {silent} of {self.count} workers not answering" if silent else ""))

    async def refresh(self) -> None:
        """Read every worker's route states (for `status_line`, `/readyz`)."""
        states = await self._gather("GET", "/v1/worker/state")
        for worker in self.workers:
            answer = states.get(worker.index)
            worker.routes = answer["routes"] if answer is not None else {}
            worker.ready = bool(answer and answer["ready"])
            worker.answering = answer is not None

    @property
    def ready(self) -> bool:
        return not self.stopping and all(w.up and w.ready for w in self.workers)

    async def _report_status(self) -> None:
        """Keep systemd's STATUS= current, read once a second (as one gateway does)."""
        last = ""
        while True:
            await self.refresh()
            line = self.status_line()
            if line != last:
                self.notifier.status(line)
                last = line
            await trio.sleep(1.0)

    def order(self, names: Any) -> list[str]:
        """`names` in the file's route order, the others (added through the API) after."""
        rank = {rc.name: i for i, rc in enumerate(self.config.routes)}
        return sorted(names, key=lambda name: (rank.get(name, len(rank)), name))

    def _spawn_args(self, worker: Worker) -> dict[str, Any]:
        return {"path": self.path, "index": worker.index, "count": self.count, "media_port": self.media_port,
                "audiosocket_port": self.audiosocket_port, "secret": self.secret}

    def _command(self, worker: Worker, fd: int) -> list[str]:
        command = [sys.executable, "-m", "gateway", "--log-level", self.log_level, "--log-format", self.log_format,
                   "worker", self.path, "--index", str(worker.index), "--count", str(self.count), "--channel-fd", str(fd)]
        if self.media_port is not None:
            command += ["--media-port", str(self.media_port)]
        if self.audiosocket_port is not None:
            command += ["--audiosocket-port", str(self.audiosocket_port)]
        return command

    async def _keep_running(self, worker: Worker) -> None:
        """Start `worker`, and again whenever it dies (backoff), until the supervisor stops."""
        backoff = RESTART_FIRST
        while not self.stopping:
            ours, theirs = channel_pair()
            env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
            env[SECRET_ENV] = self.secret
            try:
                if self.zygote is not None:  # forked from the warm zygote: no imports, pages shared
                    process: trio.Process | Forked = await self.zygote.spawn(self._spawn_args(worker), theirs.fileno())
                else:
                    process = await trio.lowlevel.open_process(
                        self._command(worker, theirs.fileno()), pass_fds=(theirs.fileno(),), env=env,
                        stdin=subprocess.DEVNULL, start_new_session=True)  # a terminal's ^C reaches the supervisor alone
            except (OSError, ZygoteGone) as err:
                theirs.close()
                ours.close()
                log.error("worker %d could not start: %s", worker.index, err)
                await trio.sleep(backoff)
                backoff = min(RESTART_MAX, backoff * 2)
                continue
            theirs.close()
            worker.process, worker.channel, worker.started_at = process, trio.socket.from_stdlib_socket(ours), time.monotonic()
            try:
                async with trio.open_nursery() as watch:
                    watch.start_soon(self._hello, worker, watch.cancel_scope)
                    await process.wait()
                    watch.cancel_scope.cancel()
            finally:
                worker.http_port, worker.media, worker.http = None, [], []
                worker.channel.close()
                worker.channel = None
                worker.running = trio.Event()
            if self.stopping:
                return
            if time.monotonic() - worker.started_at >= STABLE_S:
                backoff = RESTART_FIRST
            worker.restarts += 1
            log.warning("worker %d (pid %d) exited with %s; restarting it in %.1f s (its routes come back with it)",
                        worker.index, process.pid, _exit_text(process.returncode), backoff)
            await trio.sleep(backoff)
            backoff = min(RESTART_MAX, backoff * 2)

    async def _hello(self, worker: Worker, scope: trio.CancelScope) -> None:
        """Wait for the worker's hello on its channel, then learn its paths and re-add its
        API routes."""
        assert worker.channel is not None
        with trio.move_on_after(START_TIMEOUT):
            data = await worker.channel.recv(4096)
            if not data:
                return
            hello = json.loads(data)["hello"]
            worker.http_port = int(hello["http_port"])
            await self._learn_paths(worker)
            for name, (index, body) in list(self.api_routes.items()):
                if index == worker.index:
                    response = await self._internal(worker, "POST", "/v1/worker/routes", content=body)
                    if response is None or response.status_code != 201:
                        log.warning("worker %d: route %s (added through the API) did not come back: %s", worker.index,
                                    name, _answer_text(response))
            await self._learn_paths(worker)
            worker.running.set()
            log.info("worker %d up (pid %d, %d route(s))", worker.index, hello["pid"], hello.get("routes", 0))
            return
        log.warning("worker %d did not report within %.0f s; restarting it", worker.index, START_TIMEOUT)
        if worker.process is not None:
            worker.process.kill()

    async def _learn_paths(self, worker: Worker) -> None:
        import re

        response = await self._internal(worker, "GET", "/v1/worker/paths")
        if response is None or response.status_code != 200:
            return
        paths = response.json()
        worker.media = [re.compile(p) for p in paths["media"]]
        worker.http = [(m, re.compile(p)) for m, p in paths["http"]]
        worker.audiosocket = set(paths.get("audiosocket", ()))

    async def _internal(self, worker: Worker, method: str, path: str, **kwargs: Any) -> httpx.Response | None:
        """A call to `worker`'s loopback port (None when it is down or does not answer)."""
        if worker.http_port is None or self.client is None:
            return None
        headers = {SECRET_HEADER: self.secret, **kwargs.pop("headers", {})}
        try:
            return await self.client.request(method, f"http://127.0.0.1:{worker.http_port}{path}", headers=headers,
                                             timeout=kwargs.pop("timeout", 30.0), **kwargs)
        except httpx.HTTPError as err:
            log.info("worker %d: %s %s failed: %s", worker.index, method, path, type(err).__name__)
            return None

    def signal_workers(self, sig: int) -> None:
        """Send `sig` to every worker still running."""
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(sig)

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM every worker (each closes its routes with their goodbyes); SIGKILL what is
        still running after `timeout` + 1 s."""
        self.stopping = True
        self.notifier.stopping()
        self.signal_workers(signal.SIGTERM)
        with trio.move_on_after(timeout + 1):
            for worker in self.workers:
                if worker.process is not None:
                    await worker.process.wait()
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                log.warning("worker %d did not stop within %.0f s: killed", worker.index, timeout + 1)
                worker.process.kill()
                await worker.process.wait()

    async def reload(self) -> dict[str, Any]:
        """Validate the file once, then have every worker apply it (each its share). Raises
        ConfigError (nothing changed anywhere) when the file is invalid."""
        from gateway.daemon import Gateway, ReloadReport

        async with self._changing:
            self.notifier.reloading()
            try:
                def check() -> GatewayConfig:
                    new = GatewayConfig.load(self.path)
                    Gateway(new, notifier=Notifier({})).build()
                    return new

                try:
                    new = await trio.to_thread.run_sync(check)
                except ConfigError as err:
                    log.error("reload refused, nothing changed: %s", err)
                    raise
                self.config = attrs.evolve(new, server=self.config.server)  # the sockets stay as bound
                answers: dict[int, Any] = {}

                async def one(worker: Worker) -> None:
                    response = await self._internal(worker, "POST", "/v1/worker/reload")
                    answers[worker.index] = response.json() if response is not None else {"error": "worker down"}
                    await self._learn_paths(worker)

                async with trio.open_nursery() as nursery:
                    for worker in self.workers:
                        nursery.start_soon(one, worker)
                self.reloads += 1
                await self.refresh()
                failed = {i: a["error"] for i, a in answers.items() if "error" in a}
                def merged(key: str) -> tuple[str, ...]:
                    return tuple(self.order(n for a in answers.values() for n in a.get(key, ())))

                report = ReloadReport(merged("unchanged"), merged("restarted"), merged("removed"), merged("added"),
                                      kept_server=any(a.get("kept_server") for a in answers.values()))
                summary = report.summary() + "".join(f"; worker {i}: {e}" for i, e in sorted(failed.items()))
                log.info("reloaded %s: %s", self.path, summary)
                return {**report.as_dict(), "summary": summary}
            finally:
                self.notifier.ready(self.status_line())

    async def _owner(self, match) -> Worker | None:
        """The worker `match(worker)` picks (worker 0 when none does), once it is up: while
        workers start or one is restarted, a client waits for it up to OWNER_WAIT_S (a dial
        route of one worker may call a listen service of another that is still starting);
        None when it is still down then."""
        with trio.move_on_after(OWNER_WAIT_S):
            while True:
                settled = all(w.up for w in self.workers)
                owner = next((w for w in self.workers if match(w)), None)
                if owner is None and settled:
                    owner = self.workers[0]
                if owner is not None and owner.up:
                    return owner
                waiting = owner or next(w for w in self.workers if not w.up)
                with trio.move_on_after(0.1):  # its `running` is a new Event after each death: look again
                    await waiting.running.wait()
        return None

    # ------------------------------------------------------------------------- media front
    async def _front(self, stream: trio.SocketStream) -> None:
        """Hand one media connection to the worker serving its path (module doc)."""
        sock = stream.socket
        try:
            head = b""
            with trio.move_on_after(HEAD_TIMEOUT):
                while b"\r\n" not in head and len(head) < HEAD_LIMIT:
                    got = await sock.recv(HEAD_LIMIT, socket.MSG_PEEK)
                    if not got:
                        return  # the client left before its request line
                    if got == head:
                        await trio.sleep(0.005)  # nothing new yet: peeking again would spin
                    head = got
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split(" ")
            try:
                path = urlsplit(parts[1]).path or "/" if len(parts) == 3 else "/"
            except ValueError:
                path = "/"
            owner = await self._owner(lambda w: w.serves_media(path))
            if owner is None or owner.channel is None:
                log.warning("media: the worker serving %s is down (being restarted): 503", path)
                await _raw_answer(stream, 503, "the worker serving this path is restarting; retry in a second",
                                  "Retry-After: 1\r\n")
                return
            try:
                await send_connection(owner.channel, sock)
            except OSError as err:
                log.warning("media: could not hand a connection for %s to worker %d: %s", path, owner.index, err)
                await _raw_answer(stream, 503, "the worker serving this path is restarting; retry in a second",
                                  "Retry-After: 1\r\n")
        except (OSError, trio.BrokenResourceError):
            pass
        finally:
            sock.close()  # our copy: the worker's keeps the connection open
            await trio.lowlevel.checkpoint()

    async def _front_audiosocket(self, stream: trio.SocketStream) -> None:
        """Hand one AudioSocket connection to the worker serving the UUID of its first frame
        (read with MSG_PEEK: the worker reads it again), the catch-all's worker for a UUID no
        endpoint claims, and worker 0 for anything else (it refuses it, with the cause in its
        log, as one gateway does: `gateway.adapters.audiosocket.server`)."""
        from gateway.adapters.audiosocket.server import CATCH_ALL, FIRST_FRAME_TIMEOUT
        from gateway.adapters.audiosocket.wire import uuid_of_first_frame

        sock = stream.socket
        try:
            head = b""
            with trio.move_on_after(FIRST_FRAME_TIMEOUT):
                while len(head) < UUID_FRAME_BYTES:
                    got = await sock.recv(UUID_FRAME_BYTES, socket.MSG_PEEK)
                    if not got:
                        return  # the peer left before its first frame
                    if got == head:
                        await trio.sleep(0.005)  # nothing new yet: peeking again would spin
                    head = got
                    if len(head) >= 3 and head[:3] != UUID_FRAME_HEADER:
                        break  # not a UUID frame: worker 0 refuses it at once
            call_uuid = uuid_of_first_frame(head)
            owner = await self._owner(lambda w: call_uuid is not None and call_uuid in w.audiosocket)
            if call_uuid is not None and owner is self.workers[0] and call_uuid not in owner.audiosocket:
                owner = await self._owner(lambda w: CATCH_ALL in w.audiosocket)
            if owner is None or owner.channel is None:
                log.warning("audiosocket: the worker serving call %s is down (being restarted): hangup", call_uuid)
                await _hangup(stream)
                return
            try:
                await send_connection(owner.channel, sock, AUDIOSOCKET)
            except OSError as err:
                log.warning("audiosocket: could not hand call %s to worker %d: %s", call_uuid, owner.index, err)
                await _hangup(stream)
        except (OSError, trio.BrokenResourceError):
            pass
        finally:
            sock.close()  # our copy: the worker's keeps the connection open
            await trio.lowlevel.checkpoint()

    # ------------------------------------------------------------------------ control API
    def _install_control(self) -> None:
        from gateway.control import AccessGuards

        guards = AccessGuards(self)
        http = self.http
        http.add("GET", "/healthz", self.healthz)
        http.add("GET", "/readyz", self.readyz)
        http.add("GET", "/metrics", guards.reader(self.metrics))
        http.add("GET", "/v1/routes", guards.reader(self.list_routes))
        http.add("GET", "/v1/routes/{name}", guards.reader(self.get_route))
        http.add("POST", "/v1/routes", guards.writer(self.add_route))
        http.add("DELETE", "/v1/routes/{name}", guards.writer(self.delete_route))
        http.add("POST", "/v1/routes/{name}/clear", guards.writer(self._first))  # the route's worker
        http.add("POST", "/v1/routes/{name}/mark", guards.writer(self._first))
        http.add("POST", "/v1/reload", guards.writer(self.reload_api))
        http.set_fallback(self.forward, max_body=MAX_FORWARD_BODY)

    def _workers_view(self) -> list[dict[str, Any]]:
        return [{"index": w.index, "pid": w.process.pid if w.process is not None else None, "up": w.up,
                 "restarts": w.restarts} for w in self.workers]

    async def healthz(self, request: HttpRequest) -> HttpResponse:
        from gateway import __version__

        down = [w.index for w in self.workers if not w.up]
        body = {"status": "ok" if not down else "degraded", "version": __version__,
                "uptime_s": round(time.time() - self.started_at, 1), "workers": self._workers_view()}
        return HttpResponse.json(200, body)  # the supervisor answers: alive (a worker down is /readyz's)

    async def readyz(self, request: HttpRequest) -> HttpResponse:
        await self.refresh()
        not_ready = {name: state for w in self.workers for name, state in w.routes.items()
                     if state not in ("up", "waiting", "ended")}
        not_ready.update({f"worker {w.index}": "down" if not w.up else "not answering"
                          for w in self.workers if not (w.up and w.answering)})
        body = {"ready": self.ready, "status": self.status_line(), "not_ready": not_ready, "workers": self._workers_view()}
        return HttpResponse.json(200 if self.ready else 503, body)

    async def _gather(self, method: str, path: str) -> dict[int, Any]:
        """JSON answers (200 only) of every worker that is up, by index."""
        answers: dict[int, Any] = {}

        async def one(worker: Worker) -> None:
            response = await self._internal(worker, method, path)
            if response is not None and response.status_code == 200:
                answers[worker.index] = response.json() if "json" in response.headers.get("content-type", "") else response.text

        async with trio.open_nursery() as nursery:
            for worker in self.workers:
                nursery.start_soon(one, worker)
        return answers

    async def metrics(self, request: HttpRequest) -> HttpResponse:
        from prometheus_client import CONTENT_TYPE_LATEST

        texts = await self._gather("GET", "/v1/worker/metrics")
        own = (f"# HELP gateway_workers Worker processes, by state\n# TYPE gateway_workers gauge\n"
               f'gateway_workers{{state="up"}} {sum(w.up for w in self.workers)}.0\n'
               f'gateway_workers{{state="down"}} {sum(not w.up for w in self.workers)}.0\n'
               f"# HELP gateway_worker_restarts_total Worker processes restarted after they died\n"
               f"# TYPE gateway_worker_restarts_total counter\n"
               f"gateway_worker_restarts_total {sum(w.restarts for w in self.workers)}.0\n")
        body = await trio.to_thread.run_sync(sum_metrics, [own, *[texts[i] for i in sorted(texts)]])
        return HttpResponse(200, body.encode(), CONTENT_TYPE_LATEST)

    async def _public(self, worker: Worker, request: HttpRequest, path: str | None = None,
                      content: bytes | None = None) -> httpx.Response | None:
        headers = {k: v for k, v in request.headers.items() if k not in HOP_HEADERS}
        return await self._internal(worker, request.method, path or request.path, headers=headers,
                                    content=request.body if content is None else content)

    async def list_routes(self, request: HttpRequest) -> HttpResponse:
        routes: list[dict[str, Any]] = []
        for worker in self.workers:
            response = await self._public(worker, request)
            if response is not None and response.status_code == 200:
                routes += [{**r, "worker": worker.index} for r in response.json()["routes"]]
        rank = {name: i for i, name in enumerate(self.order(r["name"] for r in routes))}
        routes.sort(key=lambda r: rank[r["name"]])
        return HttpResponse.json(200, {"status": self.status_line(), "routes": routes, "workers": self._workers_view()})

    async def _first(self, request: HttpRequest) -> HttpResponse:
        """The first worker's answer that is not 404 (a route lives on one worker)."""
        last: httpx.Response | None = None
        for worker in self.workers:
            response = await self._public(worker, request)
            if response is None:
                continue
            last = response
            if response.status_code != 404:
                return _relay(response, worker.index if response.status_code < 300 else None)
        if last is None:
            return HttpResponse.json(503, {"error": "no worker is up"})
        return _relay(last)

    async def get_route(self, request: HttpRequest) -> HttpResponse:
        return await self._first(request)

    async def delete_route(self, request: HttpRequest) -> HttpResponse:
        async with self._changing:
            response = await self._first(request)
            if response.status == 200:
                self.api_routes.pop(request.params["name"], None)
                for worker in self.workers:
                    await self._learn_paths(worker)
            return response

    async def add_route(self, request: HttpRequest) -> HttpResponse:
        try:
            rc = RouteConfig.from_data(request.json(), "POST /v1/routes")
        except (ValueError, ConfigError) as err:
            return HttpResponse.json(400, {"error": str(err)})
        async with self._changing:
            for worker in self.workers:  # a name is unique across the workers
                response = await self._public(worker, request, f"/v1/routes/{rc.name}", b"")
                if response is not None and response.status_code == 200:
                    return HttpResponse.json(409, {"error": f"a route named {rc.name!r} exists (DELETE it first, "
                                                            "or change it in the file and reload)"})
            worker = self.workers[worker_of(rc, self.count)]
            response = await self._public(worker, request)
            if response is None:
                return HttpResponse.json(503, {"error": f"worker {worker.index}, where this route is placed, is restarting; "
                                                        "retry in a second"}, (("retry-after", "1"),))
            if response.status_code == 201:
                self.api_routes[rc.name] = (worker.index, request.body)
                await self._learn_paths(worker)
            return _relay(response, worker.index if response.status_code == 201 else None)

    async def reload_api(self, request: HttpRequest) -> HttpResponse:
        try:
            report = await self.reload()
        except ConfigError as err:
            return HttpResponse.json(400, {"error": f"reload refused, nothing changed: {err}"})
        return HttpResponse.json(200, {"reloaded": self.path, **report})

    async def forward(self, request: HttpRequest) -> HttpResponse:
        """Any other request: to the worker whose REST server serves it (module doc)."""
        owner = await self._owner(lambda w: w.serves_http(request.method, request.path))
        if owner is None or self.client is None:
            return HttpResponse.json(503, {"error": "the worker serving this path is restarting; retry in a second"},
                                     (("retry-after", "1"),))
        headers = {k: v for k, v in request.headers.items() if k not in HOP_HEADERS}
        headers["x-forwarded-for"] = request.client
        url = f"http://127.0.0.1:{owner.http_port}{request.path}"
        query: list[tuple[str, str | int | float | bool | None]] = [(k, v) for k, v in request.query.items()]  # httpx's type
        try:
            upstream = await self.client.send(self.client.build_request(request.method, url, params=query, headers=headers,
                                                                        content=request.body), stream=True)
        except httpx.HTTPError as err:
            log.info("forwarding %s %s to worker %d failed: %s", request.method, request.path, owner.index, type(err).__name__)
            return HttpResponse.json(503, {"error": "the worker serving this path did not answer; retry in a second"},
                                     (("retry-after", "1"),))
        kept = tuple((k, v) for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS | {"content-type"})
        content_type = upstream.headers.get("content-type", "application/octet-stream")
        if not content_type.startswith("text/event-stream"):
            try:
                body = await upstream.aread()
            finally:
                await upstream.aclose()
            return HttpResponse(upstream.status_code, body, content_type, kept)

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                with trio.CancelScope(shield=True):
                    await upstream.aclose()

        return HttpResponse(upstream.status_code, content_type=content_type, headers=kept, stream=chunks)


UUID_FRAME_BYTES = 19  # AudioSocket's first frame: kind 0x01, length 16, the UUID
UUID_FRAME_HEADER = b"\x01\x00\x10"


async def _hangup(stream: trio.SocketStream) -> None:
    """AudioSocket's one refusal Asterisk understands: the hangup frame, then the close."""
    from gateway.adapters.audiosocket.wire import hangup_frame

    with trio.move_on_after(1.0):
        try:
            await stream.send_all(hangup_frame())
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def _relay(response: httpx.Response, worker: int | None = None) -> HttpResponse:
    """A worker's JSON answer as the supervisor's (with `worker` added to an object body)."""
    content_type = response.headers.get("content-type", "application/json")
    kept = tuple((k, v) for k, v in response.headers.items() if k.lower() not in HOP_HEADERS | {"content-type", "date", "server"})
    if worker is not None and content_type.startswith("application/json"):
        data = response.json()
        if isinstance(data, dict):
            return HttpResponse.json(response.status_code, {**data, "worker": worker}, kept)
    return HttpResponse(response.status_code, response.content, content_type, kept)


def _answer_text(response: httpx.Response | None) -> str:
    if response is None:
        return "the worker did not answer"
    try:
        return str(response.json().get("error", response.status_code))
    except ValueError:
        return str(response.status_code)


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


async def _raw_answer(stream: trio.SocketStream, status: int, reason: str, headers: str = "") -> None:
    """An HTTP answer written straight to a connection nobody serves (JSON, then close)."""
    body = json.dumps({"error": reason}).encode()
    phrase = {503: "Service Unavailable", 404: "Not Found"}.get(status, "Error")
    head = (f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{headers}connection: close\r\n\r\n").encode()
    with trio.move_on_after(1.0):
        await stream.send_all(head + body)


async def run_supervisor(config: GatewayConfig, path: str, count: int, log_level: str, log_format: str,
                         zygote: Zygote | None = None) -> None:
    """`gateway run --workers N` until SIGINT/SIGTERM; a second one is passed on to the
    workers (each then exits without its goodbyes) and kills what is left a second later.
    Its log lines are those of one gateway (`gateway: stopped`, ...), so what reads them
    need not know."""
    from gateway.cli import STOP_DEADLINE

    top = logging.getLogger("gateway")
    supervisor = Supervisor(config, path, count, log_level=log_level, log_format=log_format, zygote=zygote)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)

            async def reload() -> None:
                try:
                    await supervisor.reload()
                except ConfigError:
                    pass  # logged; nothing changed

            async for sig in signals:
                if sig == signal.SIGHUP:
                    top.info("received SIGHUP: reloading %s", path)
                    nursery.start_soon(reload)
                    continue
                top.info("received %s: closing every route (again to exit at once)", signal.Signals(sig).name)
                async with trio.open_nursery() as stopping:

                    async def second() -> None:
                        async for again in signals:
                            if again == signal.SIGHUP:
                                continue
                            top.warning("second signal: exiting now")
                            supervisor.signal_workers(signal.SIGINT)
                            await trio.sleep(1.0)
                            supervisor.signal_workers(signal.SIGKILL)

                    stopping.start_soon(second)
                    await supervisor.stop(STOP_DEADLINE)
                    stopping.cancel_scope.cancel()
                nursery.cancel_scope.cancel()
                break
    top.info("stopped")


def tag_worker_logs(index: int) -> None:
    """Every log line of worker `index` names it: `gateway.route[w1]` in plain lines, a
    `worker` field in JSON ones (gateway.logs)."""

    def tag(record: logging.LogRecord) -> bool:
        record.worker = index
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(tag)


# ---------------------------------------------------------------------------------- zygote
class ZygoteGone(Exception):
    """The zygote process is not there to fork a worker."""


class Forked:
    """A worker forked by the zygote: what the supervisor uses of a `trio.Process` (the
    zygote is its parent, reaps it and reports its exit status)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._exited = trio.Event()

    def _exit(self, code: int) -> None:
        self.returncode = code
        self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """A process forked from the supervisor before its event loop starts, with every module a
    worker needs imported (the supervisor validated the whole file, which imports them), that
    forks the workers on request (`spawn`). A worker so made starts in milliseconds, with no
    imports, and shares the zygote's pages until it writes them: restarting a dead worker
    costs the running calls of the others next to nothing, where a fresh interpreter would
    take a core for a second or more (numpy, PyAV, libopus, hypercorn). The zygote runs no
    event loop and no thread (`OPENBLAS_NUM_THREADS=1`: numpy's BLAS would start one), so a
    fork from it is safe; it reaps its children and reports their exits."""

    def __init__(self, pid: int, sock: socket.socket, log_level: str, log_format: str) -> None:
        self.pid = pid
        self.sock = sock
        self.log_level = log_level
        self.log_format = log_format
        self._trio_sock: trio.socket.SocketType | None = None
        self._lock = trio.Lock()
        self._spawned: trio.MemoryReceiveChannel[int] | None = None
        self._send_spawned: trio.MemorySendChannel[int] | None = None
        self._children: dict[int, Forked] = {}
        self._early_exits: dict[int, int] = {}

    @classmethod
    def fork(cls, log_level: str, log_format: str) -> Zygote:
        """Fork the zygote (call before `trio.run`; the caller is the supervisor)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the zygote
            ours.close()
            code = 0
            try:
                _zygote_loop(theirs)
            except BaseException:  # noqa: BLE001 - a zygote never returns into the supervisor's code
                logging.getLogger("gateway.workers").exception("zygote failed")
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        return cls(pid, ours, log_level, log_format)

    async def read(self) -> None:
        """Dispatch the zygote's messages (spawned pids, exits); runs in the supervisor's nursery."""
        self._trio_sock = trio.socket.from_stdlib_socket(self.sock)
        self._send_spawned, self._spawned = trio.open_memory_channel[int](1)
        try:
            while True:
                data = await self._trio_sock.recv(4096)
                if not data:
                    log.error("the zygote (pid %d) is gone: workers that die can no longer be restarted", self.pid)
                    return
                message = json.loads(data)
                if "spawned" in message:
                    await self._send_spawned.send(int(message["spawned"]))
                elif "exited" in message:
                    pid, code = int(message["exited"]), int(message["code"])
                    child = self._children.pop(pid, None)
                    if child is not None:
                        child._exit(code)
                    else:
                        self._early_exits[pid] = code
        finally:
            self._send_spawned.close()

    async def spawn(self, args: dict[str, Any], channel_fd: int) -> Forked:
        """Fork one worker (`run_worker` with `args`) holding `channel_fd`; raises ZygoteGone."""
        async with self._lock:
            if self._trio_sock is None or self._spawned is None:
                raise ZygoteGone("the zygote is not running")
            message = json.dumps({"spawn": {**args, "log_level": self.log_level, "log_format": self.log_format}}).encode()
            try:
                await self._trio_sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                           array.array("i", [channel_fd]).tobytes())])
                with trio.fail_after(10):
                    pid = await self._spawned.receive()
            except (OSError, trio.EndOfChannel, trio.TooSlowError) as err:
                raise ZygoteGone(f"the zygote did not fork a worker: {err!r}") from None
            child = Forked(pid)
            if pid in self._early_exits:
                child._exit(self._early_exits.pop(pid))
            else:
                self._children[pid] = child
            return child


def _zygote_loop(sock: socket.socket) -> None:
    """The zygote's life: fork a worker per request, report each child's exit, end when the
    supervisor's end of `sock` closes. Plain blocking calls: no event loop runs here."""
    import select

    os.setsid()  # a terminal's ^C is the supervisor's alone
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):  # only the supervisor talks to systemd
        os.environ.pop(name, None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    children: set[int] = set()
    while True:
        readable, _, _ = select.select([sock], [], [], 0.2)
        while children:  # reap whoever ended, and say so
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            children.discard(pid)
            sock.send(json.dumps({"exited": pid, "code": os.waitstatus_to_exitcode(status)}).encode())
        if not readable:
            continue
        data, ancdata, _flags, _addr = sock.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
        if not data:
            return  # the supervisor is gone; its workers see their channels close and stop
        fds = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        request = json.loads(data)["spawn"]
        pid = os.fork()
        if pid == 0:
            sock.close()
            _become_worker(request, fds[0])
        for fd in fds:
            os.close(fd)
        children.add(pid)
        sock.send(json.dumps({"spawned": pid}).encode())


def _become_worker(request: dict[str, Any], channel_fd: int) -> None:
    """In a fresh fork of the zygote: run worker `request["index"]`, then exit."""
    code = 0
    try:
        os.setsid()
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        tag_worker_logs(int(request["index"]))
        os.environ[SECRET_ENV] = request["secret"]
        trio.run(run_worker, request["path"], int(request["index"]), int(request["count"]), channel_fd,
                 request["media_port"], request.get("audiosocket_port"))
    except ConfigError as err:
        logging.getLogger("gateway").error("worker %s: invalid configuration: %s", request.get("index"), err)
        code = 1
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 - logged; the supervisor restarts the worker
        logging.getLogger("gateway.workers").exception("worker %s failed", request.get("index"))
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)
