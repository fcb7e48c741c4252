"""Live reload: unchanged routes keep streaming without losing a frame, changed ones restart,
removed ones close cleanly, new ones start; an invalid file changes nothing.

Real sockets on loopback, real time (a 3 s clip): the frame check is on RTP sequence numbers and
timestamps as a VoIPBIN client sees them, and on arrival gaps measured with the trio clock.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
from aiortc.rtp import RtpPacket
from trio_websocket import ConnectionClosed, ConnectionRejected, connect_websocket_url

from audio_checks import read_wav, write_wav
from conftest import ASSETS
from gateway.adapters.voipbin.wire import Encapsulation, Hangup, MediaStreamProtocol
from gateway.config import GatewayConfig
from gateway.daemon import Gateway
from gateway.errors import ConfigError

VOIPBIN_TOKEN = "vb-SECRET-reload-3c1f"

HEAD = """\
server: {http: "127.0.0.1:0", media: "127.0.0.1:0"}
services:
  voipbin: {token: "%s"}
routes:
""" % VOIPBIN_TOKEN

KEEP = """\
  - name: keep
    endpoints:
      - file: {path: "$clip", rate: 8000}
      - voipbin: {role: listen, call_id: keep-call, encapsulation: rtp}
"""
CHANGE = """\
  - name: change
    jitter_ms: $jitter
    endpoints:
      - file: {path: "$clip", rate: 8000, loop: true}
      - voipbin: {role: listen, call_id: change-call, encapsulation: sln}
"""
GONE = """\
  - name: gone
    endpoints:
      - file: {path: "$clip", rate: 8000, loop: true}
      - voipbin: {role: listen, call_id: gone-call, encapsulation: audiosocket}
"""
NEW = """\
  - name: new
    endpoints:
      - file: {path: "$clip", rate: 8000}
      - record: {path: "$out/new.wav", rate: 8000}
"""


@pytest.fixture(scope="module")
def clip3(tmp_path_factory) -> Path:
    """3.0 s of recorded speech, 8 kHz mono: 150 frames of 20 ms."""
    pcm, rate = read_wav(ASSETS / "or105.wav")
    path = tmp_path_factory.mktemp("reload") / "speech-3s.wav"
    write_wav(path, pcm[int(0.3 * rate): int(3.3 * rate)], rate)
    return path


def write(path: Path, *parts: str, head: str = HEAD, **values) -> None:
    from string import Template

    path.write_text(Template(head + "".join(parts)).substitute(**values))


class Client:
    """A VoIPBIN media-stream client: every message with its arrival time."""

    def __init__(self, gateway: Gateway, call_id: str, encapsulation: str) -> None:
        self.url = (f"ws://127.0.0.1:{gateway.runtime.media.port}/v1.0/calls/{call_id}/media_stream"
                    f"?encapsulation={encapsulation}&token={VOIPBIN_TOKEN}")
        self.encapsulation = encapsulation
        self.messages: list[tuple[float, bytes]] = []
        self.events: list[object] = []
        self.closed: ConnectionClosed | None = None
        self.first = trio.Event()
        self.done = trio.Event()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        proto = MediaStreamProtocol(Encapsulation(self.encapsulation))
        async with trio.open_nursery() as nursery:
            ws = await connect_websocket_url(nursery, self.url, message_queue_size=256)
            task_status.started()
            try:
                while True:
                    message = await ws.get_message()
                    self.messages.append((trio.current_time(), message))
                    self.events += proto.receive(message)
                    self.first.set()
            except ConnectionClosed as closed:
                self.closed = closed
            finally:
                self.done.set()
                nursery.cancel_scope.cancel()


async def start(nursery: trio.Nursery, path: Path) -> Gateway:
    gateway = Gateway(GatewayConfig.load(path), config_path=str(path))
    return await nursery.start(gateway.run)


async def test_reload_applies_changes_and_unchanged_route_loses_no_frame(tmp_path, clip3, caplog):
    caplog.set_level(logging.INFO)
    config = tmp_path / "gateway.yaml"
    values = dict(clip=clip3, out=tmp_path, jitter=20)
    write(config, KEEP, CHANGE, GONE, **values)
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, config)
        keep, change, gone = (Client(gateway, "keep-call", "rtp"), Client(gateway, "change-call", "sln"),
                              Client(gateway, "gone-call", "audiosocket"))
        for client in (keep, change, gone):
            await nursery.start(client.run)
        with trio.fail_after(5):
            for client in (keep, change, gone):
                await client.first.wait()
        keep_state = gateway.routes["keep"]
        await trio.sleep(0.8)  # streaming for a while before the reload

        write(config, NEW, CHANGE, KEEP, **(values | {"jitter": 40}))  # keep moved: its lines changed
        report = await gateway.reload()

        assert (report.unchanged, report.restarted, report.removed, report.added) == (("keep",), ("change",), ("gone",), ("new",))
        assert gateway.routes["keep"] is keep_state
        assert list(gateway.routes) == ["new", "change", "keep"]
        assert gateway.routes["change"].config.jitter_ms == 40

        # the removed route's caller got the AudioSocket hangup, then a clean close
        with trio.fail_after(5):
            await gone.done.wait()
            await change.done.wait()
        assert any(isinstance(e, Hangup) for e in gone.events)
        assert gone.closed is not None and gone.closed.reason.code == 1000
        assert change.closed is not None and change.closed.reason.code == 1000
        assert "gone-call" not in str(gateway.runtime.media._routes)  # its path is unregistered

        # the changed route serves a new client with the new config
        again = Client(gateway, "change-call", "sln")
        await nursery.start(again.run)
        with trio.fail_after(5):
            await again.first.wait()

        # the unchanged route plays its clip to the end: every frame, in order, on time
        with trio.fail_after(10):
            await keep.done.wait()
        packets = [(t, RtpPacket.parse(m)) for t, m in keep.messages]
        seqs = [p.sequence_number for _, p in packets]
        stamps = [p.timestamp for _, p in packets]
        assert len(packets) == 150, (len(packets), keep_state.route.endpoints[1].stats)
        assert all((b - a) % 65536 == 1 for a, b in zip(seqs, seqs[1:])), "a sequence number is missing"
        assert all((b - a) % 2**32 == 160 for a, b in zip(stamps, stamps[1:])), "a timestamp jumped"
        gaps = [b - a for (a, _), (b, _) in zip(packets, packets[1:])]
        assert max(gaps) < 0.1, f"a {max(gaps) * 1000:.0f} ms gap in the unchanged route"
        assert keep_state.route.stats.sessions == 1
        sink = keep_state.route.endpoints[1].stats
        assert sink.late == 0 and sink.dropped == 0, sink

        # the new route ran: its recording has the clip
        with trio.fail_after(10):
            await gateway.routes["new"].finished.wait()
        recorded, rate = read_wav(tmp_path / "new.wav")
        assert rate == 8000 and abs(len(recorded) / rate - 3.0) < 0.1
        assert gateway.reloads == 1
        assert "reloaded" in caplog.text and "1 restarted (change), 1 removed (gone), 1 added (new)" in caplog.text
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "bad, expected",
    [
        ("  - name: other\n    endpoints:\n      - file: {path: x, rate: 8000, speed: 2}\n      - record: {path: y}\n",
         "gateway.yaml:11: routes[1].endpoints[0].file: file endpoint 'file': unknown option 'speed'"),
        ("  - name: [unclosed\n", "gateway.yaml:10: invalid YAML"),
        # valid alone, but its listen endpoint takes a call the running route already serves
        ("  - name: twin\n    endpoints:\n      - file: {path: x}\n"
         "      - voipbin: {role: listen, call_id: keep-call}\n", "keep-call"),
    ],
    ids=["unknown-key", "yaml-syntax", "listen-conflict"],
)
async def test_invalid_reload_changes_nothing(tmp_path, clip3, caplog, bad, expected):
    caplog.set_level(logging.INFO)
    config = tmp_path / "gateway.yaml"
    values = dict(clip=clip3, out=tmp_path, jitter=20)
    write(config, KEEP, **values)
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, config)
        keep = Client(gateway, "keep-call", "rtp")
        await nursery.start(keep.run)
        with trio.fail_after(5):
            await keep.first.wait()
        before = dict(gateway.routes)
        config_before = gateway.config
        await trio.sleep(0.3)

        write(config, KEEP, **values)
        with config.open("a") as f:
            f.write(bad)
        with pytest.raises(ConfigError) as err:
            await gateway.reload()
        assert expected in str(err.value)
        assert gateway.routes == before and gateway.config is config_before
        assert gateway.reload_failures == 1 and gateway.reloads == 0
        assert "reload refused, nothing changed" in caplog.text and expected in caplog.text

        with trio.fail_after(10):
            await keep.done.wait()
        seqs = [RtpPacket.parse(m).sequence_number for _, m in keep.messages]
        assert len(seqs) == 150 and all((b - a) % 65536 == 1 for a, b in zip(seqs, seqs[1:]))
        nursery.cancel_scope.cancel()


async def test_services_change_restarts_routes_that_use_them_and_applies_to_listen_roles(tmp_path, clip3):
    """A new services.voipbin token restarts the VoIPBIN routes; a file-only route stays."""
    config = tmp_path / "gateway.yaml"
    values = dict(clip=clip3, out=tmp_path, jitter=20)
    local = "  - name: local\n    endpoints:\n      - file: {path: \"$clip\", rate: 8000, loop: true}\n" \
            "      - record: {path: \"$out/local.wav\", rate: 8000}\n"
    write(config, CHANGE, local, **values)
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, config)
        config.write_text(config.read_text().replace(VOIPBIN_TOKEN, "vb-SECRET-rotated-77"))
        report = await gateway.reload()
        assert report.restarted == ("change",) and report.unchanged == ("local",)
        with pytest.raises(ExceptionGroup) as refused:  # the old token is refused at once
            async with trio.open_nursery() as attempt:
                await connect_websocket_url(attempt, Client(gateway, "change-call", "sln").url)
        assert refused.group_contains(ConnectionRejected, match="401", depth=None)
        new = Client(gateway, "change-call", "sln")
        new.url = new.url.replace(VOIPBIN_TOKEN, "vb-SECRET-rotated-77")
        await nursery.start(new.run)
        with trio.fail_after(5):
            await new.first.wait()
        nursery.cancel_scope.cancel()


async def test_reload_without_a_file_is_refused():
    config = GatewayConfig.from_text(HEAD.replace("routes:\n", "routes: []\n"), "inline.yaml")
    gateway = Gateway(config)
    with pytest.raises(ConfigError, match="not started from a configuration file"):
        await gateway.reload()


async def test_reload_applies_the_set_up_pacing_at_once_and_leaves_the_routes_running(tmp_path, clip3, caplog):
    """`server.setups_per_second` / `setup_burst` (listen upgrades) and
    `dial_starts_per_second` / `dial_start_burst` apply on reload, as the admission limits do:
    no route restarts, the counters go on. Two upgrades at once: neither waits at the default
    (50 per second after a burst of 10); after a reload to 1 per second with no burst, one of
    them waits its turn, a second after the other."""
    caplog.set_level(logging.INFO)
    config = tmp_path / "gateway.yaml"
    values = dict(clip=clip3, out=tmp_path, jitter=20)
    write(config, KEEP, CHANGE, **values)

    async def two_upgrades_at_once(gateway: Gateway) -> tuple[float, list[float]]:
        clients = (Client(gateway, "keep-call", "rtp"), Client(gateway, "change-call", "sln"))
        t0 = trio.current_time()
        upgraded: list[float] = []

        async def connect(client: Client) -> None:
            await nursery.start(client.run)
            upgraded.append(trio.current_time())

        async with trio.open_nursery() as both:
            for client in clients:
                both.start_soon(connect, client)
        return t0, upgraded

    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, config)
        pacer = gateway.runtime.media.pacer
        await two_upgrades_at_once(gateway)
        assert pacer.delayed == 0
        states = dict(gateway.routes)

        head_paced = HEAD.replace('media: "127.0.0.1:0"}', 'media: "127.0.0.1:0", setups_per_second: 1, setup_burst: 1, '
                                                          'dial_starts_per_second: 4, dial_start_burst: 1}')
        write(config, KEEP, CHANGE, head=head_paced, **values)
        report = await gateway.reload()
        assert report.unchanged == ("keep", "change") and report.restarted == report.added == ()
        assert dict(gateway.routes) == states  # the same routes, still running
        assert gateway.runtime.media.pacer is pacer  # configured in place: its counters go on

        for state in states.values():  # each route's next client (the first ones leave)
            await state.route.endpoints[1].session.ws.aclose()
        with trio.fail_after(10):
            while any(state.state != "waiting" for state in states.values()):
                await trio.sleep(0.01)
        await trio.sleep(0.1)  # the turns given before the reload (2 x 20 ms from the first round) are spent
        t0, upgraded = await two_upgrades_at_once(gateway)
        assert pacer.delayed == 1
        assert max(upgraded) - t0 >= 1.0  # the later one's turn came a second after the earlier one's
        dial = gateway.runtime.dial_pacer
        now = trio.current_time() + 100
        assert [dial.turn(now), dial.turn(now)] == [0.0, 0.25]  # 4 per second, no burst
        nursery.cancel_scope.cancel()
    assert ("reload: server.setups_per_second 1, server.setup_burst 1, server.dial_starts_per_second 4, "
            "server.dial_start_burst 1") in caplog.text
