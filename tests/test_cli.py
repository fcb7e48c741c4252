"""The command line as a user runs it: `gateway demo`, and `gateway run` stopped by a signal."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from datetime import datetime

import pytest
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from audio_checks import read_wav
from harness import Starvation


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# the demo is three real-time routes with Opus both ways in one process: it takes its turn in the
# realtime group, never beside Chromium's start or the fuzz (which starve it of CPU for 100s of ms)
@pytest.mark.xdist_group("realtime")
async def test_demo_command_bridges_the_call_into_the_channel(tmp_path, speech_clip):
    out = tmp_path / "demo"
    pids: list[int] = []
    starvation = Starvation(pids=lambda: pids)  # the demo's process, kept off the cores
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(starvation.run)
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "gateway", "demo", "--audio", str(speech_clip), "--out", str(out)],
                stdout=stdout, stderr=stderr)
            pids.append(proc.pid)
            with trio.fail_after(60):
                await proc.wait()
            nursery.cancel_scope.cancel()
    output = (tmp_path / "stdout").read_text()
    assert proc.returncode == 0, output + (tmp_path / "stderr").read_text()
    assert "demo: OK" in output
    assert "(lost 0)" in output and "speech similarity" in output
    pcm, rate = read_wav(out / "channel.wav")
    # the speech, then 1 s of tail; longer by at most the time the machine kept the demo off the
    # cores (the slots its pacers filled meanwhile: a loaded machine)
    held = sum(end - start for start, end in starvation.stretches)
    assert rate == 48000 and 2.9 < len(pcm) / rate < 3.1 + held, (len(pcm) / rate, starvation.stretches)
    assert (out / "channel.ogg").stat().st_size > 1000


async def test_sigterm_closes_every_connection_cleanly(tmp_path, speech_clip):
    media = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(f"""\
server: {{http: 127.0.0.1:{free_port()}, media: 127.0.0.1:{media}}}
services:
  voipbin: {{token: "${{VB_TOKEN}}"}}
routes:
  - name: hold
    endpoints:
      - file: {{path: "{speech_clip}", rate: 8000, loop: true}}
      - voipbin: {{role: listen, call_id: c1}}
""")
    env = {**os.environ, "VB_TOKEN": "vb-SECRET-sig"}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"ws://127.0.0.1:{media}/v1.0/calls/c1/media_stream?encapsulation=sln&token=vb-SECRET-sig"
        with trio.fail_after(15):
            while True:
                try:
                    async with open_websocket_url(url) as ws:
                        frames = 0
                        while frames < 10:
                            message = await ws.get_message()
                            assert len(message) == 320  # 20 ms of slin
                            frames += 1
                        proc.send_signal(signal.SIGTERM)
                        with pytest.raises(ConnectionClosed) as closed:
                            while True:
                                await ws.get_message()
                    break
                except (OSError, HandshakeError):
                    await trio.sleep(0.1)  # the daemon is still starting
        assert closed.value.reason.code == 1000
        output, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    assert "received SIGTERM" in output and "stopped" in output
    # goodbyes run while connections are still read: no close handshake waits out its timeout
    stamps = {}
    for line in output.splitlines():
        for key in ("received SIGTERM", "gateway: stopped"):
            if key in line:
                stamps[key] = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    assert (stamps["gateway: stopped"] - stamps["received SIGTERM"]).total_seconds() < 1.5  # the bug it guards: 2 s close timeouts
    assert "vb-SECRET-sig" not in output
