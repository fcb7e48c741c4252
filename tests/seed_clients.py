"""Running the specs' own example clients (tests/seed_clients/) with Node.js, for real.

"The listen roles also serve the seeds' own example clients, unchanged but for URLs and
files": the scripts are the specs' examples, and this module runs them with whatever Node the
machine has, giving each what it needs:

- the VoIPBIN example does ``require('ws')``: Debian's node-ws lives in /usr/share/nodejs,
  so that directory is always on NODE_PATH;
- the Argon example uses the global ``fetch`` (Node >= 18) and the global ``WebSocket``:
  built in from Node 22, behind ``--experimental-websocket`` in Node 20 (NodeSource's
  nodejs), and missing in Debian's nodejs 18, which gets `seed_clients/websocket_preload.cjs`
  (``--require``): the ``ws`` package's WebSocket as the global. What Node can do is probed
  (``typeof WebSocket``), not guessed from its version.

A missing node, ws or ffmpeg is a test failure that says which Debian package to install
(``./dev.sh setup`` installs all three), never a skip: CI must run these tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

SEED_CLIENTS = Path(__file__).resolve().parent / "seed_clients"
VOIPBIN_AUDIOSOCKET = SEED_CLIENTS / "voipbin_audiosocket.js"
ARGON_STREAM = SEED_CLIENTS / "argon_stream.mjs"
WEBSOCKET_PRELOAD = SEED_CLIENTS / "websocket_preload.cjs"
DEBIAN_NODE_PATH = "/usr/share/nodejs"  # where Debian's node-* packages (node-ws) install
PROBE_TIMEOUT = 30.0  # seconds for one `node -e` probe (a cold machine's first node start is slow)
APT_HINT = "run ./dev.sh setup, or: apt-get install -y {packages}"

_node_setup: tuple[str, tuple[str, ...]] | None = None  # node path and its extra arguments, probed once


def _missing(what: str, packages: str) -> None:
    pytest.fail(f"{what}: {APT_HINT.format(packages=packages)}", pytrace=False)


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment scripts run in: ours, NODE_PATH with Debian's node modules, `extra`."""
    env = dict(os.environ)
    paths = [p for p in env.get("NODE_PATH", "").split(os.pathsep) if p]
    if DEBIAN_NODE_PATH not in paths:
        paths.append(DEBIAN_NODE_PATH)
    env["NODE_PATH"] = os.pathsep.join(paths)
    env.update(extra or {})
    return env


def _probe(node: str, args: list[str], code: str) -> subprocess.CompletedProcess:
    return subprocess.run([node, *args, "-e", code], env=node_env(), capture_output=True, text=True,
                          timeout=PROBE_TIMEOUT, check=False)


def node_command() -> tuple[str, tuple[str, ...]]:
    """The node executable and the arguments that give it a global WebSocket; fails the test
    (with the apt-get command) when node or the `ws` package is missing."""
    global _node_setup
    if _node_setup is not None:
        return _node_setup
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        _missing("Node.js is not installed (no node on PATH)", "nodejs node-ws")
    version = _probe(node, [], "process.stdout.write(process.version)")
    if version.returncode != 0:
        _missing(f"{node} does not run ({version.stderr.strip()[:200]})", "nodejs")
    major = int(version.stdout.lstrip("v").split(".")[0])
    if major < 18:  # no global fetch: the Argon example cannot run
        _missing(f"Node.js {version.stdout} is too old (the examples need >= 18)", "nodejs")
    ws = _probe(node, [], "require('ws')")
    if ws.returncode != 0:
        _missing(f"Node.js {version.stdout} cannot require('ws') (NODE_PATH {DEBIAN_NODE_PATH})", "node-ws")
    check = "process.exit(typeof WebSocket === 'function' ? 0 : 1)"
    for args in ([], ["--experimental-websocket"], ["--require", str(WEBSOCKET_PRELOAD)]):
        if _probe(node, args, check).returncode == 0:
            _node_setup = node, tuple(args)
            return _node_setup
    _missing(f"Node.js {version.stdout} has no WebSocket, even with the ws preload", "node-ws")
    raise AssertionError("unreachable")


def voipbin_env(media_url: str, call_id: str, token: str) -> dict[str, str]:
    """What `VOIPBIN_AUDIOSOCKET` reads: `media_url` is the ws:// origin of the media server
    (``ws://127.0.0.1:{port}``). It sends ``audio.pcm`` from its working directory (raw PCM16
    LE 8 kHz mono) and appends what it receives to ``received_audio.pcm`` there."""
    return {"VOIPBIN_MEDIA_URL": media_url, "VOIPBIN_CALL_ID": call_id, "VOIPBIN_TOKEN": token}


def argon_env(api_origin: str, bot_token: str, space_id: str, channel_id: str) -> dict[str, str]:
    """What `ARGON_STREAM` reads: `api_origin` is the http:// origin whose
    ``/api/bot/IVoice/v1/StreamToken`` it calls. It plays ``speech.wav`` from its working
    directory through ``ffmpeg -f opus`` (so `require_ffmpeg()` first)."""
    return {"ARGON_API_ORIGIN": api_origin, "ARGON_BOT_TOKEN": bot_token, "ARGON_SPACE_ID": space_id,
            "ARGON_CHANNEL_ID": channel_id}


def require_ffmpeg() -> str:
    """The ffmpeg executable (the Argon example spawns it); fails the test when missing."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        _missing("ffmpeg is not installed (the Argon example spawns it)", "ffmpeg")
    return ffmpeg


async def run_node(script: Path, *, env: dict[str, str], cwd: Path, timeout: float) -> tuple[int, str, str]:
    """Run a seed client with node until it exits; returns (exit status, stdout, stderr).

    `env` is added to this process's environment (with NODE_PATH for Debian's node-ws);
    `cwd` is where the script finds and writes its files. After `timeout` seconds the script
    is killed and the test fails, showing what it printed so far."""
    node, args = await trio.to_thread.run_sync(node_command)
    output: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}

    async def drain(stream, into: bytearray) -> None:
        async with stream:
            while chunk := await stream.receive_some(65536):
                into += chunk

    process = await trio.lowlevel.open_process(
        [node, *args, str(script)], cwd=str(cwd), env=node_env(env),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, process.stdout, output["stdout"])
            nursery.start_soon(drain, process.stderr, output["stderr"])
            with trio.move_on_after(timeout) as scope:
                await process.wait()
            if scope.cancelled_caught:
                process.kill()
                await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
    stdout, stderr = (output[k].decode(errors="replace") for k in ("stdout", "stderr"))
    if scope.cancelled_caught:
        pytest.fail(f"{script.name} did not exit within {timeout:.0f} s\nstdout:\n{stdout[-2000:]}\n"
                    f"stderr:\n{stderr[-2000:]}", pytrace=False)
    return process.returncode, stdout, stderr
