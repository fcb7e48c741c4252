"""Command line: `gateway run CONFIG`, `gateway check CONFIG`, `gateway demo`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import trio

from gateway import __version__
from gateway.errors import ConfigError

STOP_DEADLINE = 5.0  # seconds for every route to say goodbye on SIGTERM/SIGINT


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Libraries log per request or per frame at INFO/DEBUG; keep them quiet.
    for noisy in ("httpx", "httpcore", "trio-websocket", "hypercorn", "hypercorn.error"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(path: str):
    from gateway.config import GatewayConfig

    return GatewayConfig.load(path)


async def _run(config) -> None:
    from gateway.daemon import Gateway

    gateway = Gateway(config)
    gateway.build()
    log = logging.getLogger("gateway")
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)

            async def wait_signal() -> None:
                async for sig in signals:
                    log.info("received %s: closing every route (again to exit at once)", signal.Signals(sig).name)
                    async with trio.open_nursery() as stopping:

                        async def second_signal() -> None:
                            async for _ in signals:
                                log.warning("second signal: exiting now")
                                stopping.cancel_scope.cancel()

                        stopping.start_soon(second_signal)
                        await gateway.stop(STOP_DEADLINE)
                        stopping.cancel_scope.cancel()
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(wait_signal)
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description="Real-time audio gateway between WebSocket voice protocols.")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the routes of a YAML config until SIGINT/SIGTERM")
    p_run.add_argument("config")
    p_check = sub.add_parser("check", help="validate a YAML config (exit 0 valid, 1 invalid)")
    p_check.add_argument("config")
    p_demo = sub.add_parser("demo", help="bridge a recorded phone call into a voice channel on loopback")
    p_demo.add_argument("--audio", help="audio file the caller plays (default: bundled 8 kHz speech)")
    p_demo.add_argument("--out", default="out/demo", help="directory for the channel's recordings (default out/demo)")
    p_demo.add_argument("--encapsulation", default="rtp", choices=["rtp", "sln", "audiosocket"])
    p_demo.add_argument("--frame-ms", type=int, default=20, choices=[10, 20, 40, 60], help="Argon Opus frame duration")
    p_demo.add_argument("--stereo", action="store_true", help="stream stereo Opus into the channel")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)

    if args.command == "check":
        try:
            config = _load(args.config)
            from gateway.daemon import Gateway

            Gateway(config).build()
        except ConfigError as err:
            print(f"invalid: {err}", file=sys.stderr)
            return 1
        print(f"ok: {args.config}: {len(config.routes)} route(s)")
        return 0
    if args.command == "run":
        try:
            config = _load(args.config)
            trio.run(_run, config)
        except ConfigError as err:
            print(f"invalid configuration: {err}", file=sys.stderr)
            return 1
        return 0
    if args.command == "demo":
        from gateway.demo import run_demo

        return trio.run(run_demo, args.audio, args.out, args.encapsulation, args.frame_ms, args.stereo)
    return 2
