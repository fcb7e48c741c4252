"""`gateway run --workers N`: one supervisor, N worker processes (issue 12; README "Workers").

What a user checks: a listen client reaches the route it asked for, whichever worker runs it
(the connection is handed over with SCM_RIGHTS), and hears its audio; a killed worker is
restarted and its routes come back while the other worker's call goes on without a gap;
reload, the control API, `/metrics` (summed) and a graceful stop work as with one process.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from audio_checks import loop_score, read_wav
from gateway.config.schema import RouteConfig
from gateway.workers import placement_key, sum_metrics, worker_of
from harness import run_queue_wait
from test_cli import free_port
from test_service_cli import Notify

CONTROL_TOKEN = "ctl-SECRET-workers-77a1"
VB_TOKEN = "vb-SECRET-workers-31c9"


def route(data: dict) -> RouteConfig:
    return RouteConfig.from_data(data, "test")


# ------------------------------------------------------------------------------- placement
def test_routes_sharing_a_listen_service_share_a_worker_and_the_rest_spread():
    argon = [route({"name": f"a{i}", "endpoints": [{"argon": {"role": "listen", "space_id": "s", "channel_id": f"c{i}"}},
                                                  {"file": {"path": "x.wav"}}]}) for i in range(8)]
    assert {placement_key(rc) for rc in argon} == {"listen:argon"}
    assert len({worker_of(rc, 4) for rc in argon}) == 1  # one Argon listen service, one token table: one worker
    calls = [route({"name": f"c{i}", "endpoints": [{"argon": {"calls": "incoming"}}, {"file": {"path": "x.wav"}}]})
             for i in range(3)]
    assert {placement_key(rc) for rc in calls} == {"calls:argon"}
    phone = [route({"name": f"call-{i}", "endpoints": [{"voipbin": {"role": "listen", "call_id": f"c{i}"}},
                                                     {"file": {"path": "x.wav"}}]}) for i in range(40)]
    spread = [worker_of(rc, 4) for rc in phone]
    assert set(spread) == {0, 1, 2, 3}  # a VoIPBIN listen route has its own path: placed by name
    assert max(spread.count(i) for i in range(4)) <= 16  # roughly even (CRC-32 of the name)
    assert spread == [worker_of(rc, 4) for rc in phone]  # stable: the same in every process
    assert all(worker_of(rc, 1) == 0 for rc in phone)


def test_metrics_of_the_workers_are_summed():
    one = """\
# HELP gateway_frames_total Frames
# TYPE gateway_frames_total counter
gateway_frames_total{route="a",direction="ingress"} 10.0
gateway_frames_total{route="b",direction="ingress"} 1.0
# HELP gateway_sessions_active Sessions
# TYPE gateway_sessions_active gauge
gateway_sessions_active 2.0
# HELP process_start_time_seconds Start time
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1000.5
# HELP gateway_latency_seconds Latency
# TYPE gateway_latency_seconds histogram
gateway_latency_seconds_bucket{le="0.01"} 3.0
gateway_latency_seconds_bucket{le="+Inf"} 4.0
gateway_latency_seconds_count 4.0
gateway_latency_seconds_sum 0.25
"""
    two = one.replace('route="a",direction="ingress"} 10.0', 'route="c",direction="ingress"} 5.0').replace(
        "1000.5", "900.0").replace("sessions_active 2.0", "sessions_active 3.0")
    from prometheus_client.parser import text_string_to_metric_families

    summed = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in text_string_to_metric_families(sum_metrics([one, two])) for s in f.samples}
    assert summed[("gateway_frames_total", (("direction", "ingress"), ("route", "a")))] == 10
    assert summed[("gateway_frames_total", (("direction", "ingress"), ("route", "b")))] == 2
    assert summed[("gateway_frames_total", (("direction", "ingress"), ("route", "c")))] == 5
    assert summed[("gateway_sessions_active", ())] == 5
    assert summed[("process_start_time_seconds", ())] == 900.0  # the earliest, not a sum
    assert summed[("gateway_latency_seconds_bucket", (("le", "0.01"),))] == 6
    assert summed[("gateway_latency_seconds_count", ())] == 8
    assert summed[("gateway_latency_seconds_sum", ())] == 0.5


# ----------------------------------------------------------------------- the real processes
def _config(http: int, media: int, clip, names: list[str]) -> str:
    head = f"""\
server:
  http: 127.0.0.1:{http}
  media: 127.0.0.1:{media}
  control: {{token: "{CONTROL_TOKEN}"}}
services:
  voipbin: {{token: "${{VB_TOKEN}}"}}
routes:
"""
    return head + "".join(f"""\
  - name: {name}
    endpoints:
      - file: {{path: "{clip}", rate: 8000, loop: true}}
      - voipbin: {{role: listen, call_id: {name}}}
""" for name in names)


class Listener:
    """A VoIPBIN media client (sln: 320 bytes of PCM16 8 kHz per 20 ms) on the public media
    socket; keeps what it heard with the arrival time of each message."""

    def __init__(self, media: int, call: str) -> None:
        self.url = f"ws://127.0.0.1:{media}/v1.0/calls/{call}/media_stream?encapsulation=sln&token={VB_TOKEN}"
        self.chunks: list[bytes] = []
        self.arrivals: list[float] = []
        self.waited: list[float] = []
        """This thread's run-queue wait (s) at each arrival (harness.run_queue_wait)."""
        self.closed_code: int | None = None
        self.frames = trio.Event()

    async def run(self, frames: int | None = None, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.fail_after(30):
            while True:
                try:
                    async with open_websocket_url(self.url) as ws:
                        task_status.started()
                        try:
                            while frames is None or len(self.chunks) < frames:
                                message = await ws.get_message()
                                self.chunks.append(message)
                                self.arrivals.append(time.monotonic())
                                self.waited.append(run_queue_wait())
                                if len(self.chunks) >= 25:
                                    self.frames.set()
                        except ConnectionClosed as closed:
                            self.closed_code = closed.reason.code
                    return
                except (OSError, HandshakeError):
                    await trio.sleep(0.1)  # still starting, or its worker is being restarted

    def pcm(self) -> np.ndarray:
        return np.frombuffer(b"".join(self.chunks), "<i2")

    def largest_gap(self) -> tuple[float, float]:
        """(the longest time between two messages, the same without the time this thread was
        kept off the cores meanwhile), s."""
        if len(self.arrivals) < 2:
            return 0.0, 0.0
        gaps = np.diff(self.arrivals)
        return float(gaps.max()), float((gaps - np.diff(self.waited)).max())


def _get(http: int, path: str, **kw) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{http}{path}", timeout=10, **kw)


def _egress_counts(http: int, route: str) -> dict[str, dict[str, int]]:
    """The gateway's own pacing counts of one route's endpoints: late, dropped, skipped."""
    return {e["name"]: {k: e[k] for k in ("late", "dropped", "skipped")}
            for r in _get(http, "/v1/routes").json()["routes"] if r["name"] == route for e in r["endpoints"]}


async def _wait_for(check, what: str, timeout: float = 30.0):
    with trio.move_on_after(timeout):
        while True:
            result = await trio.to_thread.run_sync(check)
            if result:
                return result
            await trio.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


@pytest.mark.xdist_group("realtime")
async def test_two_workers_serve_route_reload_restart_and_stop(tmp_path, speech_clip):
    http, media = free_port(), free_port()
    names = ["desk-1", "desk-2", "desk-3", "desk-4", "desk-5", "desk-6"]
    config = tmp_path / "gateway.yaml"
    config.write_text(_config(http, media, speech_clip, names))
    notify = Notify(tmp_path)
    env = dict(os.environ, NOTIFY_SOCKET=notify.path, VB_TOKEN=VB_TOKEN, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", str(config), "--workers", "2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    clip, clip_rate = read_wav(speech_clip)
    try:
        ready = await trio.to_thread.run_sync(notify.next, "READY=1")
        assert ready["STATUS"] == "6 route(s): 6 waiting"  # one READY=1, from the supervisor, for all of it
        listing = _get(http, "/v1/routes").json()
        placed = {r["name"]: r["worker"] for r in listing["routes"]}
        assert list(placed) == names  # the file's order, whichever worker runs each
        assert set(placed.values()) == {0, 1}
        assert placed == {name: worker_of(route({"name": name, "endpoints": [
            {"file": {"path": "x.wav"}}, {"voipbin": {"role": "listen", "call_id": name}}]}), 2) for name in names}
        pids = {w["index"]: w["pid"] for w in listing["workers"]}
        assert len(set(pids.values())) == 2 and proc.pid not in pids.values()

        # every listen client lands on the worker running its route, and hears that route's file
        listeners = {name: Listener(media, name) for name in names}
        egress_of = functools.partial(_egress_counts, http)
        async with trio.open_nursery() as nursery:
            for name, listener in listeners.items():
                nursery.start_soon(listener.run, 50)
        for name, listener in listeners.items():
            corr, _ = loop_score(clip, clip_rate, listener.pcm(), 8000)
            assert len(listener.chunks) == 50 and corr > 0.95, (name, corr)
        sessions = {r["name"]: r["sessions"] for r in _get(http, "/v1/routes").json()["routes"]}
        assert sessions == {name: 1 for name in names}

        # /metrics: the workers' counters summed into one text (one route label per route)
        text = _get(http, "/metrics").text
        assert 'gateway_workers{state="up"} 2.0' in text
        for name in names:
            assert f'route="{name}"' in text

        # a killed worker is restarted and its routes come back; a call on the other worker
        # goes on without a gap, and a client of a killed route reconnects and hears it again
        victim = placed["desk-1"]
        survivor_route = next(n for n in names if placed[n] != victim)
        survivor = Listener(media, survivor_route)
        async with trio.open_nursery() as nursery:
            await nursery.start(survivor.run)
            await survivor.frames.wait()
            before = await trio.to_thread.run_sync(egress_of, survivor_route)  # earlier sessions' counts too
            os.kill(pids[victim], signal.SIGKILL)
            down = await _wait_for(lambda: (r := _get(http, "/readyz")).status_code == 503 and r.json(),
                                   "readyz says a worker is not ready")
            # the answer names the killed worker ("down", or "not answering" until the zygote
            # reports its exit) or, once it is back (a restart takes ~0.1 s), its routes still
            # starting; nothing of the other worker
            victim_parts = {f"worker {victim}"} | {n for n in names if placed[n] == victim}
            assert down["not_ready"] and set(down["not_ready"]) <= victim_parts, down
            back = await _wait_for(lambda: (r := _get(http, "/readyz")).status_code == 200 and r.json(),
                                   "the killed worker is back")
            worker = next(w for w in back["workers"] if w["index"] == victim)
            assert worker["restarts"] == 1 and worker["pid"] != pids[victim]
            states = {r["name"]: (r["worker"], r["state"]) for r in _get(http, "/v1/routes").json()["routes"]}
            assert states == {name: (placed[name], "waiting" if name != survivor_route else "up") for name in names}
            again = Listener(media, "desk-1")
            await again.run(50)
            corr, _ = loop_score(clip, clip_rate, again.pcm(), 8000)
            assert corr > 0.95, corr
            heard = len(survivor.chunks)
            await trio.sleep(0.5)
            assert len(survivor.chunks) >= heard + 15  # still streaming
            after = await trio.to_thread.run_sync(egress_of, survivor_route)  # read while its client listens
            nursery.cancel_scope.cancel()
        # the other worker's call never paused: its pacer sent every frame in time (its own
        # count), and no gap reached this client but the time this test's thread itself
        # waited for a core (the restarted worker competes for the two cores)
        wall, own = survivor.largest_gap()
        assert own < 0.25, (wall, own)
        assert after == before, (before, after)  # no late, dropped or skipped frame while the other worker restarted
        corr, blocks = loop_score(clip, clip_rate, survivor.pcm(), 8000)
        assert corr > 0.95 and min(blocks) > 0.9, (corr, min(blocks))
        assert _get(http, "/metrics").text.count("gateway_worker_restarts_total 1.0") == 1

        # reload across workers: SIGHUP and `gateway reload` change every worker's share
        config.write_text(_config(http, media, speech_clip, names[1:] + ["desk-7"]))
        proc.send_signal(signal.SIGHUP)
        await trio.to_thread.run_sync(notify.next, "RELOADING=1")
        await trio.to_thread.run_sync(notify.next, "READY=1")
        assert [r["name"] for r in _get(http, "/v1/routes").json()["routes"]] == names[1:] + ["desk-7"]
        config.write_text(_config(http, media, speech_clip, names[1:] + ["desk-8"]))
        result = await trio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-m", "gateway", "reload", str(config)], capture_output=True, text=True, timeout=30))
        assert result.returncode == 0, result.stderr
        assert "reloaded: 5 unchanged, 1 removed (desk-7), 1 added (desk-8)" in result.stdout
        late = Listener(media, "desk-8")
        await late.run(50)
        assert loop_score(clip, clip_rate, late.pcm(), 8000)[0] > 0.95

        # the control API's writes: a route added lands on its worker, and comes back with it
        body = {"name": "api-1", "endpoints": [{"file": {"path": str(speech_clip), "rate": 8000, "loop": True}},
                                              {"voipbin": {"role": "listen", "call_id": "api-1"}}]}
        auth = {"authorization": f"Bearer {CONTROL_TOKEN}"}
        added = httpx.post(f"http://127.0.0.1:{http}/v1/routes", json=body, headers=auth, timeout=10)
        assert added.status_code == 201 and added.json()["worker"] == worker_of(route(body), 2), added.text
        assert httpx.post(f"http://127.0.0.1:{http}/v1/routes", json=body, headers=auth, timeout=10).status_code == 409
        assert httpx.post(f"http://127.0.0.1:{http}/v1/routes", json=body, timeout=10).status_code == 401
        pid = next(w["pid"] for w in _get(http, "/readyz").json()["workers"] if w["index"] == added.json()["worker"])
        os.kill(pid, signal.SIGKILL)
        await _wait_for(lambda: _get(http, "/readyz").status_code == 503, "the worker is down")
        await _wait_for(lambda: _get(http, "/readyz").status_code == 200, "the worker is back")
        assert _get(http, "/v1/routes/api-1").json()["origin"] == "api"
        assert httpx.delete(f"http://127.0.0.1:{http}/v1/routes/api-1", headers=auth, timeout=10).status_code == 200
        assert _get(http, "/v1/routes/api-1").status_code == 404

        # graceful stop: every worker says its goodbyes (close 1000), the supervisor exits 0
        last = Listener(media, "desk-2")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(last.run)
            await last.frames.wait()
            proc.send_signal(signal.SIGTERM)
        assert last.closed_code == 1000
        await trio.to_thread.run_sync(notify.next, "STOPPING=1")
        output, _ = await trio.to_thread.run_sync(lambda: proc.communicate(timeout=15))
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    assert "worker 0 of 2 running" in output and "worker 1 of 2 running" in output
    assert "exited with signal SIGKILL; restarting it" in output
    assert "gateway.daemon[w0]" in output and "gateway.daemon[w1]" in output  # each line names its worker
    assert CONTROL_TOKEN not in output and VB_TOKEN not in output
    assert "Traceback" not in output, output


@pytest.mark.xdist_group("realtime")
async def test_the_demo_call_bridged_across_two_workers(tmp_path):
    """The demo's routes under `--workers 2`: the phone call's listen route on one worker, the
    voice channel (Argon listen) and the bridge on the other. The bridge dials both through the
    public sockets: VoIPBIN media handed to the other worker, the Argon StreamToken forwarded
    by the supervisor's REST, the Argon media handed back to its own. Each side hears the other."""
    from gateway.demo import CALL_ID, DEFAULT_AUDIO, DEFAULT_PERSON, DEMO_CONFIG, padded, similarity

    http, media = free_port(), free_port()
    out = tmp_path / "demo"
    out.mkdir()
    caller = padded(DEFAULT_AUDIO, out, "caller-says.wav", 1.0)
    call_s = len(read_wav(caller)[0]) / 8000
    person = padded(DEFAULT_PERSON, out, "person-says.wav", 2.0, at_least_s=call_s + 2.0, speech_at_most_s=call_s - 0.5)
    text = DEMO_CONFIG.substitute(
        http_port=http, media_port=media, audio=caller, out=out, encapsulation="rtp", frame_ms=20, stereo="false",
        channels=1, voipbin_token=VB_TOKEN, bot_token="bot-SECRET-workers", jwt_secret="jwt-SECRET-workers-0123456789abcdef",
        call_id=CALL_ID, space_id="550e8400-e29b-41d4-a716-446655440000", channel_id="6ba7b810-9dad-11d1-80b4-00c04fd430c8",
        listen_codec="auto",
        person_endpoint=f'      - file: {{name: person, identity: person, path: "{person}", rate: 48000, channels: 1}}\n')
    config = tmp_path / "demo.yaml"
    config.write_text(text)
    from gateway.config.schema import GatewayConfig

    placed = {rc.name: worker_of(rc, 2) for rc in GatewayConfig.load(str(config)).routes}
    assert placed["phone-call"] != placed["voice-channel"] == placed["support-line"]  # what this test is about
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", str(config), "--workers", "2"],
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        def call_done() -> bool:
            try:
                routes = {r["name"]: r for r in _get(http, "/v1/routes").json()["routes"]}
            except (httpx.HTTPError, ValueError, KeyError):
                return False
            return all(n in routes and routes[n]["sessions"] >= 1 and routes[n]["state"] == "waiting"
                       for n in ("phone-call", "voice-channel"))

        def sessions() -> dict[str, int]:
            return {r["name"]: r["sessions"] for r in _get(http, "/v1/routes").json()["routes"]}


        try:
            await _wait_for(call_done, "the call was made and ended", timeout=60)
        except AssertionError:
            raise AssertionError(f"the call did not end: {_get(http, '/v1/routes').json()}") from None
        assert sessions()["phone-call"] == 1  # one call, at the first try: no route started before its peer
        stats = {f'{r["name"]}/{e["name"]}': {k: e[k] for k in ("frames_in", "frames_out", "late", "dropped", "concealed", "late_packets")}
                 for r in _get(http, "/v1/routes").json()["routes"] for e in r["endpoints"]}
        proc.send_signal(signal.SIGTERM)
        output, _ = await trio.to_thread.run_sync(lambda: proc.communicate(timeout=15))
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    # as the demo's own report measures them: the call reaches the channel through the bridge's
    # Opus at 8 kHz input (narrowband SILK, which keeps the spectrum, not the waveform: its
    # waveform score was 0.93 calm, one block from the edge), the person reaches the call
    # through u-law (the waveform)
    to_channel = similarity(str(caller), out / "channel.wav", waveform=False)
    to_caller = similarity(str(person), out / "caller-hears.wav")
    assert to_channel >= 0.8 and to_caller >= 0.8, (to_channel, to_caller, stats)
    assert "Traceback" not in output, output


@pytest.mark.xdist_group("realtime")
async def test_by_default_every_cpu_gets_a_worker(tmp_path, speech_clip):
    """`gateway run CONFIG` with neither --workers nor $GATEWAY_WORKERS: one worker per CPU the
    process may use (issue 12: "default: the number of CPUs"); the supervisor says so once
    READY, and /v1/routes lists them."""
    from gateway.workers import default_workers

    http, media = free_port(), free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(_config(http, media, speech_clip, ["desk-1", "desk-2"]))
    notify = Notify(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_WORKERS"}
    env.update(NOTIFY_SOCKET=notify.path, VB_TOKEN=VB_TOKEN, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        await trio.to_thread.run_sync(notify.next, "READY=1")
        listing = _get(http, "/v1/routes").json()
        proc.send_signal(signal.SIGTERM)
        output, _ = await trio.to_thread.run_sync(lambda: proc.communicate(timeout=15))
    finally:
        proc.kill()
    cpus = default_workers()
    if cpus > 1:
        assert len(listing["workers"]) == cpus, listing
        assert f"gateway running: {cpus} worker(s)" in output, output
    else:  # one CPU: auto is one process, which has no workers to list
        assert "workers" not in listing, listing
    assert proc.returncode == 0, output
