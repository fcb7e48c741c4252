"""Structured logs: plain lines for a terminal, JSON lines (`--log-format json`) for journald;
route and endpoint on every line that has them; secrets redacted in both, tracebacks too."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
from contextlib import contextmanager

import pytest

from gateway.adapters.local import FileSource, Recorder
from gateway.logs import log_handler
from gateway.route import Route

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJib3QifQ.c2lnbmF0dXJlLXNlY3JldA"
SECRETS = ("vb-SECRET-1", JWT, "bot-SECRET-2")


@contextmanager
def captured(log_format: str):
    """Lines the daemon's handler would write, for records of every logger."""
    stream = io.StringIO()
    handler = log_handler(log_format, stream)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


class Failing(Recorder):
    """A recorder that takes route events and fails on them (a bug in an endpoint)."""

    accepts_events = True

    def on_route_event(self, event):
        raise RuntimeError("dialing wss://api.example/media?token=vb-SECRET-1 failed")


def a_route(tmp_path, speech_clip) -> Route:
    return Route("support-line", [FileSource("call", speech_clip, rate=8000), Failing("rec", tmp_path / "rec.wav")])


def log_through_route(tmp_path, speech_clip) -> None:
    unbound = Recorder("lonely", tmp_path / "lonely.wav")
    unbound.log.info("made before any route")
    route = a_route(tmp_path, speech_clip)
    route.endpoints[0].route_event("dtmf", digit="5")  # the route logs it, rec fails to take it
    route.endpoints[1].log.warning("peer sent %s", "nonsense")


def test_json_lines_carry_route_and_endpoint_as_fields(tmp_path, speech_clip):
    with captured("json") as out:
        log_through_route(tmp_path, speech_clip)
    entries = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["logger"], e.get("route"), e.get("endpoint"), e["level"], e["msg"]) for e in entries] == [
        ("gateway.endpoint.record", None, "lonely", "info", "made before any route"),
        ("gateway.route", "support-line", None, "info", "event from call: dtmf digit=5"),
        ("gateway.route", "support-line", None, "error", "endpoint rec failed to take event dtmf"),
        ("gateway.endpoint.record", "support-line", "rec", "warning", "peer sent nonsense"),
    ]
    assert all(TS.match(e["ts"]) for e in entries)
    assert [list(e)[:3] for e in entries] == [["ts", "level", "logger"]] * 4
    assert ["exc" in e for e in entries] == [False, False, True, False]


def test_plain_lines_prefix_route_and_endpoint(tmp_path, speech_clip):
    with captured("plain") as out:
        log_through_route(tmp_path, speech_clip)
    lines = [line for line in out.getvalue().splitlines() if re.match(r"\d{4}-", line)]
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    expected = [
        r"INFO    gateway.endpoint.record: \[lonely\] made before any route",
        r"INFO    gateway.route: \[support-line\] event from call: dtmf digit=5",
        r"ERROR   gateway.route: \[support-line\] endpoint rec failed to take event dtmf",
        r"WARNING gateway.endpoint.record: \[support-line/rec\] peer sent nonsense",
    ]
    assert len(lines) == len(expected), out.getvalue()
    for line, pattern in zip(lines, expected):
        assert re.fullmatch(f"{stamp} {pattern}", line), line


def test_records_keep_a_clean_message_and_the_fields(tmp_path, speech_clip, caplog):
    caplog.set_level(logging.INFO)
    a_route(tmp_path, speech_clip).endpoints[1].log.info("hello")
    (record,) = [r for r in caplog.records if r.getMessage() == "hello"]
    assert (record.route, record.endpoint) == ("support-line", "rec")


@pytest.mark.parametrize("log_format", ["plain", "json"])
def test_a_traceback_is_kept_and_redacted(tmp_path, speech_clip, log_format):
    with captured(log_format) as out:
        a_route(tmp_path, speech_clip).endpoints[0].route_event("dtmf", digit="5")
    text = out.getvalue()
    if log_format == "json":
        (failed,) = [e for e in map(json.loads, text.splitlines()) if e["level"] == "error"]
        assert failed["exc"].startswith("Traceback (most recent call last):")
        assert "RuntimeError: dialing wss://api.example/media?token=*** failed" in failed["exc"]
    else:
        assert "Traceback (most recent call last):" in text and "token=*** failed" in text
    assert "vb-SECRET-1" not in text


@pytest.mark.parametrize("log_format", ["plain", "json"])
def test_secrets_are_redacted_whatever_the_logger(log_format):
    with captured(log_format) as out:
        # child loggers: a filter on "gateway" or "httpcore" alone would not see these
        logging.getLogger("gateway.endpoint.voipbin").info("dialing %s", "wss://x/media_stream?encapsulation=rtp&token=vb-SECRET-1")
        logging.getLogger("httpcore.http11").warning("stream token %s", JWT)
        logging.getLogger("gateway.endpoint.argon").info("headers: {'Authorization': 'Bot bot-SECRET-2'}")
        try:
            raise ValueError(f"bad key={SECRETS[2]}")
        except ValueError:
            logging.getLogger("somelib").exception("oops %s", JWT)
    text = out.getvalue()
    assert not any(s in text for s in SECRETS), text
    assert "token=***" in text and "'Authorization': 'Bot ***'" in text and "key=***" in text
    if log_format == "json":
        assert len([json.loads(line) for line in text.splitlines()]) == 4  # one line each, traceback included


def _env(**extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **extra}


CONFIG = """\
services:
  voipbin: {token: "${VB_TOKEN}"}
routes:
  - name: support-line
    endpoints:
      - file: {path: "%s", rate: 8000, loop: true}
      - record: {path: "%s"}
"""


def test_cli_check_writes_json_lines(tmp_path, speech_clip):
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG % (speech_clip, tmp_path / "out.wav"))
    ok = subprocess.run([sys.executable, "-m", "gateway", "--log-format", "json", "check", str(path)],
                        capture_output=True, text=True, env=_env(VB_TOKEN="vb-SECRET-1"), timeout=60)
    assert ok.returncode == 0, ok.stderr
    (entry,) = [json.loads(line) for line in ok.stderr.splitlines()]
    assert (entry["level"], entry["logger"], entry["msg"]) == ("info", "gateway.check", f"ok: {path}: 1 route(s)")
    bad = subprocess.run([sys.executable, "-m", "gateway", "check", str(path)],  # format from the environment
                         capture_output=True, text=True, env=_env(GATEWAY_LOG_FORMAT="json"), timeout=60)
    assert bad.returncode == 1
    (entry,) = [json.loads(line) for line in bad.stderr.splitlines()]
    assert entry["level"] == "error"
    assert entry["msg"] == f"invalid: {path}:2: services.voipbin.token: environment variable VB_TOKEN is not set"


def test_cli_rejects_an_unknown_log_format(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gateway", "check", str(tmp_path / "x.yaml")],
                            capture_output=True, text=True, env=_env(GATEWAY_LOG_FORMAT="xml"), timeout=60)
    assert result.returncode == 2 and "GATEWAY_LOG_FORMAT: expected one of plain, json, got 'xml'" in result.stderr


def test_daemon_json_lines_name_route_and_endpoint(tmp_path, speech_clip):
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG % (speech_clip, tmp_path / "out.wav"))
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "--log-format", "json", "run", str(path)],
                            env=_env(VB_TOKEN="vb-SECRET-1"), stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "route up" in line:
                break
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=15)
    finally:
        proc.kill()
    entries = [json.loads(line) for line in lines + rest.splitlines()]
    assert proc.returncode == 0, entries
    up = next(e for e in entries if e["msg"].startswith("route up"))
    assert (up["logger"], up["route"], "endpoint" in up) == ("gateway.route", "support-line", False)
    assert any(e["msg"] == "stopped" and "route" not in e for e in entries)
    assert "vb-SECRET-1" not in "".join(lines) + rest
