"""`gateway run` as systemd runs it: READY/RELOADING/STOPPING on a real NOTIFY_SOCKET, SIGHUP
and `gateway reload` re-reading the file, SIGTERM exiting 0, and a second signal exiting at once.
"""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import trio

from test_cli import free_port

CONTROL_TOKEN = "ctl-SECRET-cli-81c4"
VB_TOKEN = "vb-SECRET-cli-5d02"


class Notify:
    """systemd's side of sd_notify: a bound AF_UNIX datagram socket."""

    def __init__(self, tmp_path) -> None:
        self.path = str(tmp_path / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(10)

    def next(self, wanted: str) -> dict[str, str]:
        """The next message holding `wanted` (e.g. "READY=1"), skipping STATUS/WATCHDOG ones."""
        while True:
            message = self.sock.recv(4096).decode()
            fields = dict(line.split("=", 1) for line in message.split("\n") if "=" in line)
            if wanted in message.split("\n"):
                return fields


def spawn(tmp_path, config, notify: Notify) -> subprocess.Popen:
    env = dict(os.environ, NOTIFY_SOCKET=notify.path, VB_TOKEN=VB_TOKEN, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "gateway", "run", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sighup_and_gateway_reload_and_sigterm(tmp_path, speech_clip):
    http = free_port()
    config = tmp_path / "gateway.yaml"
    head = f"""\
server:
  http: 127.0.0.1:{http}
  media: 127.0.0.1:{free_port()}
  control: {{token: "{CONTROL_TOKEN}"}}
services:
  voipbin: {{token: "${{VB_TOKEN}}"}}
routes:
  - name: hold
    endpoints:
      - file: {{path: "{speech_clip}", rate: 8000, loop: true}}
      - voipbin: {{role: listen, call_id: c1}}
"""
    extra = f"""\
  - name: {{name}}
    endpoints:
      - file: {{{{path: "{speech_clip}", rate: 8000, loop: true}}}}
      - voipbin: {{{{role: listen, call_id: {{name}}}}}}
"""
    config.write_text(head)
    notify = Notify(tmp_path)
    proc = spawn(tmp_path, config, notify)
    try:
        ready = notify.next("READY=1")
        assert ready["STATUS"] == "1 route(s): 1 waiting"

        def routes() -> list[str]:
            return [r["name"] for r in httpx.get(f"http://127.0.0.1:{http}/v1/routes").json()["routes"]]

        assert routes() == ["hold"]

        # SIGHUP (systemctl reload): RELOADING=1 with a timestamp, then READY=1
        config.write_text(head + extra.format(name="second"))
        proc.send_signal(signal.SIGHUP)
        reloading = notify.next("RELOADING=1")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        notify.next("READY=1")
        assert routes() == ["hold", "second"]

        # `gateway reload` through the control API, with the token from the file
        config.write_text(head + extra.format(name="third"))
        result = subprocess.run([sys.executable, "-m", "gateway", "reload", str(config)],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert "reloaded: 1 unchanged, 1 removed (second), 1 added (third)" in result.stdout
        assert routes() == ["hold", "third"]

        # a token from --token-file is the one sent: a wrong one is refused (exit 2)
        (tmp_path / "wrong").write_text("not-the-token\n")
        result = subprocess.run([sys.executable, "-m", "gateway", "reload", "--token-file", str(tmp_path / "wrong"),
                                 str(config)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 2 and "reload: 401" in result.stderr

        # an invalid file: refused with file:line: key, nothing changes
        config.write_text(head + "  - name: broken\n    endpoints: nope\n")
        result = subprocess.run([sys.executable, "-m", "gateway", "reload", str(config)],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 1
        assert f"{config}:13: routes[1].endpoints: expected a list" in result.stderr
        assert routes() == ["hold", "third"]
        proc.send_signal(signal.SIGHUP)  # the same through the signal: logged, nothing changes
        notify.next("RELOADING=1")
        notify.next("READY=1")
        assert routes() == ["hold", "third"]

        proc.send_signal(signal.SIGTERM)
        notify.next("STOPPING=1")
        output, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    assert "received SIGHUP" in output and "reload refused, nothing changed" in output
    assert f"{config}:13: routes[1].endpoints: expected a list" in output
    assert CONTROL_TOKEN not in output and VB_TOKEN not in output


async def silent_websocket_server(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Accepts a WebSocket upgrade, then never reads or answers again: a peer that does not
    complete the close handshake, so the gateway's goodbye to it waits out its deadline."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])

    async def handle(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some(4096)
        key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key"))
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                              b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        await trio.sleep_forever()

    await trio.serve_listeners(handle, listeners)


async def test_second_signal_exits_at_once(tmp_path, speech_clip):
    async with trio.open_nursery() as nursery:
        port = await nursery.start(silent_websocket_server)
        config = tmp_path / "gateway.yaml"
        config.write_text(f"""\
services:
  voipbin: {{api_url: "http://127.0.0.1:{port}", token: "${{VB_TOKEN}}"}}
routes:
  - name: stuck
    endpoints:
      - file: {{path: "{speech_clip}", rate: 8000, loop: true}}
      - voipbin: {{call_id: c1, encapsulation: sln}}
""")
        notify = Notify(tmp_path)
        timings = []
        for second_signal in (False, True):
            proc = spawn(tmp_path, config, notify)
            try:
                await trio.to_thread.run_sync(notify.next, "READY=1")
                await trio.sleep(0.5)  # connected and streaming to the silent peer
                proc.send_signal(signal.SIGTERM)
                sent = time.monotonic()
                if second_signal:
                    await trio.sleep(0.2)
                    proc.send_signal(signal.SIGINT)
                output, _ = await trio.to_thread.run_sync(lambda: proc.communicate(timeout=15))
                timings.append(time.monotonic() - sent)
            finally:
                proc.kill()
            assert proc.returncode == 0, output
        # alone, SIGTERM waits for the goodbye (the silent peer never answers its close);
        # a second signal cuts that wait short
        assert timings[0] > 1.5, timings
        assert timings[1] < timings[0] - 1.0, timings
        assert "second signal: exiting now" in output
        nursery.cancel_scope.cancel()
