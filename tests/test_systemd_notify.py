"""sd_notify over a real AF_UNIX datagram socket, as systemd listens for it."""

from __future__ import annotations

import os
import socket

import pytest
import trio

from gateway.systemd import Notifier


def receiver(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    return sock, path


def test_messages_reach_the_socket(tmp_path):
    sock, path = receiver(tmp_path)
    notifier = Notifier({"NOTIFY_SOCKET": path})
    notifier.ready("2 routes up, 0 failed")
    notifier.reloading()
    notifier.stopping()
    assert sock.recv(4096) == b"READY=1\nSTATUS=2 routes up, 0 failed"
    reloading = sock.recv(4096).decode().split("\n")
    assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=") and reloading[1][15:].isdigit()
    assert sock.recv(4096) == b"STOPPING=1"


def test_abstract_namespace_address():
    name = f"gateway-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    Notifier({"NOTIFY_SOCKET": "@" + name}).status("starting")
    assert sock.recv(4096) == b"STATUS=starting"


def test_without_systemd_nothing_is_sent_and_nothing_fails(tmp_path):
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready("x")  # no socket, no error
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing.sock")})
    gone.ready("x")  # systemd gone: logged once, never raised


async def test_watchdog_pings_at_half_the_interval(tmp_path, autojump_clock):
    sock, path = receiver(tmp_path)
    sock.setblocking(False)
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    assert notifier.watchdog_s == 2.0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(notifier.watchdog)
        await trio.sleep(4.5)  # pings at t = 0, 1, 2, 3, 4
        nursery.cancel_scope.cancel()
    pings = []
    while True:
        try:
            pings.append(sock.recv(64))
        except BlockingIOError:
            break
    assert pings == [b"WATCHDOG=1"] * 5


async def test_no_watchdog_without_watchdog_usec_or_for_another_pid(tmp_path):
    sock, path = receiver(tmp_path)
    sock.setblocking(False)
    without = Notifier({"NOTIFY_SOCKET": path})
    other_pid = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert without.watchdog_s is None and other_pid.watchdog_s is None
    with trio.fail_after(1):
        await without.watchdog()  # returns at once
        await other_pid.watchdog()
    with pytest.raises(BlockingIOError):
        sock.recv(64)  # and no ping was sent


async def test_daemon_says_ready_once_running_and_stopping_on_stop(tmp_path):
    from conftest import ASSETS
    from gateway.config import GatewayConfig
    from gateway.daemon import Gateway

    sock, path = receiver(tmp_path)
    sock.setblocking(False)
    config = GatewayConfig.from_text(f"""
routes:
  - name: tape
    endpoints:
      - file: {{path: "{ASSETS / 'or105.wav'}", rate: 8000, loop: true}}
      - record: {{path: "{tmp_path / 'out.wav'}", rate: 8000}}
""", "notify.yaml")
    gateway = Gateway(config, notifier=Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000"}))
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.run)
        with trio.fail_after(2):
            while True:
                try:
                    ready = sock.recv(4096)
                    break
                except BlockingIOError:
                    await trio.sleep(0.01)
        await gateway.stop()
        nursery.cancel_scope.cancel()
    messages = [ready]
    while True:
        try:
            messages.append(sock.recv(4096))
        except BlockingIOError:
            break
    assert messages[0].startswith(b"READY=1\nSTATUS=1 route(s)")
    assert b"WATCHDOG=1" in messages and b"STOPPING=1" in messages  # pinged from the loop; said on stop
