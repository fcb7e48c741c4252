"""Configuration: the README's YAML shape loads; every mistake names file, line and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import GatewayConfig
from gateway.daemon import Gateway
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
ENV = {"ARGON_BOT_TOKEN": "bot-secret-123", "VOIPBIN_TOKEN": "vb-secret-456", "AGENT_API_KEY": "agent-secret-789"}

CONTRACT = """\
server:
  http: 127.0.0.1:8080
  media: 127.0.0.1:12880
services:
  argon:   {api_url: https://gateway.argon.zone, bot_token: "${ARGON_BOT_TOKEN}"}
  voipbin: {api_url: https://api.voipbin.net, token: "${VOIPBIN_TOKEN}"}
routes:
  - name: support-line
    endpoints:
      - voipbin: {call_id: 652af662-eb45-11ee-b1a5-6fde165f9226, encapsulation: rtp}
      - argon: {space_id: 550e8400-e29b-41d4-a716-446655440000,
                channel_id: 6ba7b810-9dad-11d1-80b4-00c04fd430c8,
                stereo: false, frame_duration_ms: 20, track_name: Support line}
"""


def load(text: str, env=ENV) -> GatewayConfig:
    return GatewayConfig.from_text(text, "gw.yaml", env=env)


def test_contract_shape_loads_and_builds():
    config = load(CONTRACT)
    assert [r.name for r in config.routes] == ["support-line"]
    voipbin, argon = config.routes[0].endpoints
    assert (voipbin.kind, voipbin.role, argon.kind, argon.role) == ("voipbin", "dial", "argon", "dial")
    assert config.services.argon.bot_token.reveal() == "bot-secret-123"
    assert "bot-secret-123" not in repr(config.services.argon)
    gateway = Gateway(config)
    gateway.build()
    bridge = gateway.routes["support-line"].route
    assert [e.kind for e in bridge.endpoints] == ["voipbin", "argon"]
    assert bridge.endpoints[1].ptime_ms == 20 and bridge.endpoints[1].egress.channels == 1


def test_example_config_is_valid(tmp_path):
    text = (ROOT / "config" / "gateway.example.yaml").read_text()
    (tmp_path / "control_token").write_text("ctl-example\n")
    config = GatewayConfig.from_text(text, "gateway.example.yaml", env=ENV | {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert config.server.control.token.reveal() == "ctl-example"
    gateway = Gateway(config)
    gateway.build()
    assert len(config.routes) == 10
    # the Argon scenarios as documented: two-way, follow, hear only, incoming calls, listen
    argon = {name: next(e for e in gateway.routes[name].route.endpoints if e.kind == "argon")
             for name in ("support-line", "open-line", "minutes", "hotline", "lobby", "call-the-desk")}
    assert argon["support-line"].ingress is not None and argon["support-line"].egress is not None
    assert argon["open-line"].hear == "follow"
    assert argon["minutes"].egress is None and argon["minutes"].ingress is not None
    assert argon["hotline"].calls == "incoming" and argon["hotline"].max_calls == 4
    assert gateway.routes["hotline"].takes_calls and gateway.routes["hotline"].has_listen
    assert argon["lobby"].channel is not None and argon["call-the-desk"].call_bot.username == "desk_bot"


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("frame_duration_ms: 20", "frame_duration_ms: 25",
         "gw.yaml:13: routes[0].endpoints[1].argon.frame_duration_ms: expected one of 10, 20, 40, 60, got 25"),
        ("encapsulation: rtp", "encapsulation: rtpx",
         "gw.yaml:10: routes[0].endpoints[0].voipbin.encapsulation: expected one of rtp, sln, audiosocket, got 'rtpx'"),
        ("stereo: false", "stereo: maybe", "routes[0].endpoints[1].argon.stereo: expected true or false, got 'maybe'"),
        ("track_name: Support line", "track_nme: x", "gw.yaml:13: routes[0].endpoints[1].argon.track_nme: unknown key"),
        ("- voipbin: {", "- voipbn: {", "gw.yaml:10: routes[0].endpoints[0]: unknown endpoint kind 'voipbn'"),
        ("  http: 127.0.0.1:8080", "  http: localhost", "gw.yaml:2: server.http: expected HOST:PORT, got 'localhost'"),
        ("call_id: 652af662-eb45-11ee-b1a5-6fde165f9226, ", "",
         "routes[0].endpoints[0].voipbin: expected exactly one of call_id or conference_id"),
        ("  - name: support-line", "  - name: ''", "gw.yaml:8: routes[0].name: expected a non-empty string"),
    ],
)
def test_errors_name_file_line_key_and_expectation(old, new, expected):
    assert old in CONTRACT
    with pytest.raises(ConfigError) as info:
        Gateway(load(CONTRACT.replace(old, new))).build()
    assert expected in str(info.value)


def test_missing_environment_variable_is_named_not_valued():
    with pytest.raises(ConfigError) as info:
        load(CONTRACT, env={"VOIPBIN_TOKEN": "vb-secret-456"})
    message = str(info.value)
    assert "gw.yaml:5: services.argon.bot_token: environment variable ARGON_BOT_TOKEN is not set" in message
    assert "vb-secret-456" not in message


def test_yaml_syntax_error_names_the_line():
    with pytest.raises(ConfigError) as info:
        load("routes:\n  - name: a\n    endpoints: [\n")
    assert str(info.value).startswith("gw.yaml:")
    assert "invalid YAML" in str(info.value)


def test_route_needs_two_endpoints_and_unique_names():
    one = CONTRACT.replace("      - argon: {space_id: 550e8400-e29b-41d4-a716-446655440000,\n", "").split("                channel_id")[0]
    with pytest.raises(ConfigError, match=r"routes\[0\]\.endpoints: a route joins two or more endpoints, got 1"):
        load(one)
    twice = CONTRACT + CONTRACT.split("routes:\n")[1]
    with pytest.raises(ConfigError, match="duplicate route name 'support-line'"):
        load(twice)


def test_listen_endpoint_needs_server_socket():
    text = CONTRACT.replace("server:\n  http: 127.0.0.1:8080\n  media: 127.0.0.1:12880\n", "").replace(
        "encapsulation: rtp}", "encapsulation: rtp, role: listen}"
    )
    with pytest.raises(ConfigError, match=r"a listen endpoint needs server.media"):
        Gateway(load(text)).build()


def test_cli_check_exit_codes(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(CONTRACT)
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONTRACT.replace("frame_duration_ms: 20", "frame_duration_ms: 7"))
    env = {"PATH": "/usr/bin:/bin", **ENV}
    ok = subprocess.run([sys.executable, "-m", "gateway", "check", str(good)], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "1 route" in ok.stdout
    ko = subprocess.run([sys.executable, "-m", "gateway", "check", str(bad)], capture_output=True, text=True, env=env)
    assert ko.returncode == 1
    assert f"{bad}:13: routes[0].endpoints[1].argon.frame_duration_ms: expected one of 10, 20, 40, 60, got 7" in ko.stderr
    assert "bot-secret-123" not in ko.stderr + ko.stdout


def test_local_endpoint_options_expand_references(tmp_path):
    """`file` and `record` options take `${...}` like every other option."""
    (tmp_path / "rec_dir").write_text(str(tmp_path / "recordings") + "\n")
    text = """\
routes:
  - name: r
    endpoints:
      - file: {path: "${CLIP}", rate: 8000}
      - record: {path: "${file:rec_dir}/call.wav"}
"""
    (tmp_path / "gw.yaml").write_text(text)
    config = GatewayConfig.load(tmp_path / "gw.yaml", env={"CLIP": "/srv/hello.wav"})
    gateway = Gateway(config)
    gateway.build()
    source, recorder = gateway.routes["r"].route.endpoints
    assert str(source.path) == "/srv/hello.wav" and source.ingress.rate == 8000
    assert str(recorder.path) == f"{tmp_path}/recordings/call.wav"
