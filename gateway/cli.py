"""Command line: `gateway run CONFIG`, `gateway check CONFIG`, `gateway demo`."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys

import trio

from gateway import __version__
from gateway._util import abort_goodbyes
from gateway.errors import ConfigError
from gateway.logs import LOG_FORMATS, log_handler

STOP_DEADLINE = 5.0  # seconds for every route to say goodbye on SIGTERM/SIGINT


def setup_logging(level: str = "info", log_format: str = "plain") -> None:
    """Log to stderr, `plain` lines for a terminal or `json` lines for journald (gateway/logs.py);
    both redact secrets. Like `logging.basicConfig`, a no-op when logging is already set up."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[log_handler(log_format, sys.stderr)])
    # Libraries log per request or per frame at INFO/DEBUG; keep them quiet.
    for noisy in ("httpx", "httpcore", "trio-websocket", "hypercorn", "hypercorn.error"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _check(path: str, log_format: str) -> int:
    """`gateway check`: every `${...}` reference that cannot be resolved (all of them, one line
    each, where validation stops at the first), and the validation's error when it is another
    one; 0 when valid."""
    from gateway.config.yaml_lines import load_yaml, unresolved_in
    from gateway.daemon import Gateway

    problems: list[str] = []
    references = []
    try:
        with open(path, encoding="utf-8") as f:
            references = unresolved_in(load_yaml(f.read(), path), path)
    except (OSError, UnicodeDecodeError, ConfigError):
        pass  # the validation below says what is wrong with the file
    problems += [f"{where}: {err}" for where, err in references]
    config = None
    try:
        config = _load(path)
        Gateway(config).build()
    except ConfigError as err:
        if not any(str(err).endswith(f": {missing}") for _, missing in references):
            problems.append(str(err))
    log = logging.getLogger("gateway.check")
    for problem in problems:
        if log_format == "json":
            log.error("invalid: %s", problem)
        else:
            print(f"invalid: {problem}", file=sys.stderr)
    if problems or config is None:
        return 1
    ok = f"ok: {path}: {len(config.routes)} route(s)"
    if log_format == "json":
        log.info("%s", ok)
    else:
        print(ok)
    return 0


def _reload(path: str, url: str | None, token_file: str | None) -> int:
    """`gateway reload`: POST /v1/reload to the running gateway. Exit 0 reloaded, 1 refused
    (the gateway's reason printed: nothing changed), 2 not reachable or not allowed."""
    import httpx

    from gateway.config.options import Options
    from gateway.config.schema import ServerConfig
    from gateway.config.yaml_lines import load_yaml

    token = os.environ.get("GATEWAY_CONTROL_TOKEN", "")
    try:
        if token_file:
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip()
        # only the server section: the routes are the daemon's to validate (and to refuse)
        with open(path, encoding="utf-8") as f:
            data = load_yaml(f.read(), path) or {}
        server_data = dict(data.get("server") or {}) if isinstance(data, dict) else {}
        if token:  # the token came from elsewhere: server.control (maybe a credential) is not read
            server_data.pop("control", None)
        server = ServerConfig.from_options(Options(server_data, filename=path, path="server"))
    except (OSError, ConfigError) as err:
        hint = ("; outside the service, use `systemctl reload gateway`, or --token-file"
                if "server.control" in str(err) else "")
        print(f"reload: {err}{hint}", file=sys.stderr)
        return 2
    if not token and server.control.token:
        token = server.control.token.reveal()
    if url is None:
        if server.http is None:
            print(f"reload: {path} has no server.http (the control API's address); pass --url", file=sys.stderr)
            return 2
        host = server.http.host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
        url = f"http://[{host}]:{server.http.port}" if ":" in host else f"http://{host}:{server.http.port}"
    if not token:
        print("reload: no control token (server.control.token, --token-file or $GATEWAY_CONTROL_TOKEN)", file=sys.stderr)
        return 2
    try:
        response = httpx.post(url.rstrip("/") + "/v1/reload", headers={"authorization": f"Bearer {token}"}, timeout=30)
    except httpx.HTTPError as err:
        print(f"reload: cannot reach the gateway at {url}: {err}", file=sys.stderr)
        return 2
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code == 200:
        print(f"reloaded: {body.get('summary', '')}")
        return 0
    print(f"reload: {response.status_code}: {body.get('error', response.text)}", file=sys.stderr)
    return 1 if response.status_code == 400 else 2


def _load(path: str):
    from gateway.config import GatewayConfig

    return GatewayConfig.load(path)


async def _run(config, path: str | None = None) -> None:
    from gateway.daemon import Gateway

    gateway = Gateway(config, config_path=path)
    gateway.build()
    log = logging.getLogger("gateway")
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            # What start-up built (modules, config, routes) lives as long as the process: out of
            # the cyclic collector's sight, so a full collection scans only what calls make, a
            # few ms rather than tens of ms of stalled media (gc.freeze, Python >= 3.7).
            gc.collect()
            gc.freeze()

            async def reload() -> None:
                try:
                    await gateway.reload()
                except ConfigError:
                    pass  # logged by the gateway (file:line: key: why); nothing changed

            async def wait_signal() -> None:
                async for sig in signals:
                    if sig == signal.SIGHUP:
                        log.info("received SIGHUP: reloading %s", path)
                        nursery.start_soon(reload)
                        continue
                    log.info("received %s: closing every route (again to exit at once)", signal.Signals(sig).name)
                    async with trio.open_nursery() as stopping:

                        async def second_signal() -> None:
                            async for again in signals:
                                if again == signal.SIGHUP:
                                    continue  # stopping: no reload
                                log.warning("second signal: exiting now")
                                abort_goodbyes()
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
    parser.add_argument("--log-format", default=os.environ.get("GATEWAY_LOG_FORMAT") or "plain", choices=LOG_FORMATS,
                        help="plain lines for a terminal or JSON lines for journald (default: $GATEWAY_LOG_FORMAT or plain)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the routes of a YAML config until SIGINT/SIGTERM")
    p_run.add_argument("config")
    p_run.add_argument("--workers", default=os.environ.get("GATEWAY_WORKERS") or "auto",
                       help="worker processes under one supervisor: a number (1: the gateway is one process), or "
                            "`auto`, one per CPU this process may use (default: $GATEWAY_WORKERS, else auto; "
                            "README, \"Workers\")")
    p_worker = sub.add_parser("worker", help=argparse.SUPPRESS)  # started by `run --workers N`, not by people
    p_worker.add_argument("config")
    p_worker.add_argument("--index", type=int, required=True)
    p_worker.add_argument("--count", type=int, required=True)
    p_worker.add_argument("--channel-fd", type=int, required=True)
    p_worker.add_argument("--media-port", type=int)
    p_worker.add_argument("--audiosocket-port", type=int)
    p_check = sub.add_parser("check", help="validate a YAML config (exit 0 valid, 1 invalid)")
    p_check.add_argument("config")
    p_reload = sub.add_parser("reload", help="ask the running gateway to re-read its config (control API)")
    p_reload.add_argument("config", help="the config the gateway runs (for server.http and server.control.token)")
    p_reload.add_argument("--url", help="control API base URL (default: http://{server.http})")
    p_reload.add_argument("--token-file", help="file holding the control token (default: $GATEWAY_CONTROL_TOKEN, "
                          "else server.control.token of the config)")
    p_demo = sub.add_parser("demo", help="a phone caller and a person in a voice channel talk through the gateway, on loopback")
    p_demo.add_argument("--audio", help="audio file the caller plays (default: bundled 8 kHz speech)")
    p_demo.add_argument("--person", help="audio file the person in the voice channel plays (default: another voice)")
    p_demo.add_argument("--out", default="out/demo", help="directory for the recordings of both sides (default out/demo)")
    p_demo.add_argument("--encapsulation", default="rtp", choices=["rtp", "sln", "audiosocket"])
    p_demo.add_argument("--frame-ms", type=int, default=20, choices=[10, 20, 40, 60], help="Argon Opus frame duration")
    p_demo.add_argument("--stereo", action="store_true", help="stream stereo Opus into the channel")
    args = parser.parse_args(argv)
    if args.log_format not in LOG_FORMATS:
        parser.error(f"GATEWAY_LOG_FORMAT: expected one of {', '.join(LOG_FORMATS)}, got {args.log_format!r}")
    setup_logging(args.log_level, args.log_format)

    if args.command == "check":
        return _check(args.config, args.log_format)
    if args.command == "worker":
        from gateway.workers import run_worker, tag_worker_logs

        tag_worker_logs(args.index)
        try:
            trio.run(run_worker, args.config, args.index, args.count, args.channel_fd, args.media_port,
                     args.audiosocket_port)
        except ConfigError as err:
            logging.getLogger("gateway").error("worker %d: invalid configuration: %s", args.index, err)
            return 1
        return 0
    if args.command == "run":
        from gateway.workers import default_workers

        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # no BLAS thread: the zygote may fork (gateway.workers)

        workers = default_workers() if args.workers == "auto" else int(args.workers) if args.workers.isdigit() else 0
        if workers < 1:
            parser.error(f"--workers: expected a number of at least 1 or `auto`, got {args.workers!r}")
        try:
            config = _load(args.config)
            if workers > 1:
                from gateway.daemon import Gateway
                from gateway.systemd import Notifier
                from gateway.workers import run_supervisor

                Gateway(config, notifier=Notifier({})).build()  # every route valid, or exit 1 now (not N restarting workers)
                from gateway.workers import Zygote

                zygote = Zygote.fork(args.log_level, args.log_format)  # before trio runs: it forks the workers
                trio.run(run_supervisor, config, args.config, workers, args.log_level, args.log_format, zygote)
                return 0
            else:
                trio.run(_run, config, args.config)
        except ConfigError as err:
            if args.log_format == "json":
                logging.getLogger("gateway").error("invalid configuration: %s", err)
            else:
                print(f"invalid configuration: {err}", file=sys.stderr)
            return 1
        return 0
    if args.command == "reload":
        return _reload(args.config, args.url, args.token_file)
    if args.command == "demo":
        from gateway.demo import run_demo

        return trio.run(run_demo, args.audio, args.out, args.encapsulation, args.frame_ms, args.stereo, args.person)
    return 2
