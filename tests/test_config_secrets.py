"""Secret sources of config values: `${VAR}`, `${file:PATH}`, `${credential:NAME}` (systemd
LoadCredential=). Each missing one is named with file, line and key, never valued; `gateway
check` lists all of them in one run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gateway.cli import main
from gateway.config import GatewayConfig
from gateway.daemon import Gateway
from gateway.errors import ConfigError

ROUTES = """\
routes:
  - name: support-line
    endpoints:
      - voipbin: {call_id: c1, encapsulation: rtp}
      - argon: {space_id: s1, channel_id: c1, frame_duration_ms: 20}
"""


def config(services: str, path, env: dict[str, str] | None = None) -> GatewayConfig:
    """The services block (lines 1-3) and a route, loaded from a real file at `path`."""
    path.write_text(f"services:\n{services}{ROUTES}")
    return GatewayConfig.load(path, env=env or {})


def test_each_source_gives_its_value(tmp_path):
    (tmp_path / "voipbin.token").write_text("vb-from-file\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "argon_token").write_text("bot-from-credential\n")
    loaded = config(
        '  argon: {bot_token: "${credential:argon_token}"}\n'
        '  voipbin: {token: "${file:voipbin.token}", listen_tokens: ["${LISTEN}", "pre-${file:voipbin.token}-post"]}\n',
        tmp_path / "gateway.yaml",
        {"CREDENTIALS_DIRECTORY": str(creds), "LISTEN": "listen-from-env"},
    )
    assert loaded.services.argon.bot_token.reveal() == "bot-from-credential"
    assert loaded.services.voipbin.token.reveal() == "vb-from-file"
    assert [t.reveal() for t in loaded.services.voipbin.listen_tokens] == ["listen-from-env", "pre-vb-from-file-post"]
    Gateway(loaded).build()


def test_file_paths_are_relative_to_the_config_and_lose_one_newline(tmp_path):
    (tmp_path / "etc" / "secrets").mkdir(parents=True)
    absolute = tmp_path / "abs.token"
    absolute.write_bytes(b"abs-token\n\n")  # only the last newline goes
    (tmp_path / "etc" / "secrets" / "vb").write_bytes(b"crlf-token\r\n")
    loaded = config(
        f'  argon: {{bot_token: "${{file:{absolute}}}"}}\n'
        '  voipbin: {token: "${file:secrets/vb}"}\n',
        tmp_path / "etc" / "gateway.yaml",
    )
    assert loaded.services.argon.bot_token.reveal() == "abs-token\n"
    assert loaded.services.voipbin.token.reveal() == "crlf-token"


def test_a_secret_is_not_expanded_again(tmp_path):
    (tmp_path / "t").write_text("${file:/etc/passwd}")
    loaded = config('  voipbin: {token: "${file:t}"}\n', tmp_path / "gateway.yaml")
    assert loaded.services.voipbin.token.reveal() == "${file:/etc/passwd}"


@pytest.mark.parametrize(
    "value, env, expected",
    [
        ("${VOIPBIN_TOKEN}", {}, "gateway.yaml:3: services.voipbin.token: environment variable VOIPBIN_TOKEN is not set"),
        ("${file:/nonexistent/x}", {}, "gateway.yaml:3: services.voipbin.token: file /nonexistent/x: No such file or directory"),
        ("${file:nope.txt}", {}, "gateway.yaml:3: services.voipbin.token: file {dir}/nope.txt: No such file or directory"),
        ("${file:.}", {}, "gateway.yaml:3: services.voipbin.token: file {dir}/.: Is a directory"),
        ("${credential:voipbin_token}", {},
         ("gateway.yaml:3: services.voipbin.token: credential voipbin_token not found "
          "(no $CREDENTIALS_DIRECTORY: is LoadCredential=voipbin_token:... in the unit?)")),
        ("${credential:voipbin_token}", {"CREDENTIALS_DIRECTORY": "{dir}"},
         ("gateway.yaml:3: services.voipbin.token: credential voipbin_token not found in $CREDENTIALS_DIRECTORY ({dir}): "
          "is LoadCredential=voipbin_token:... in the unit?")),
        ("${credential:../gateway.yaml}", {"CREDENTIALS_DIRECTORY": "{dir}"},
         "services.voipbin.token: credential name '../gateway.yaml' must be a plain file name"),
        ("${credential:..}", {"CREDENTIALS_DIRECTORY": "{dir}"}, "credential name '..' must be a plain file name"),
    ],
    ids=["env", "file-absolute", "file-relative", "file-directory", "credential-no-directory",
         "credential-not-loaded", "credential-path", "credential-dotdot"],
)
def test_a_missing_secret_is_named_with_file_line_and_key(tmp_path, value, env, expected):
    env = {k: v.format(dir=tmp_path) for k, v in env.items()}
    (tmp_path / "other").write_text("other-secret-value")
    with pytest.raises(ConfigError) as info:
        config(f'  argon: {{bot_token: "${{file:other}}"}}\n  voipbin: {{token: "{value}"}}\n', tmp_path / "gateway.yaml", env)
    message = str(info.value)
    assert expected.format(dir=tmp_path) in message
    assert "other-secret-value" not in message


@pytest.mark.parametrize(
    "key, bad, expected",
    [
        ("${file:bad}", "12ab-SECRETISH", "services.argon.stream_token_per_minute: expected an integer, got '${file:bad}'"),
        ("${credential:bad}", "0", "services.argon.stream_token_per_minute: expected at least 1, got ${credential:bad}"),
        ("${BAD}", "0", "services.argon.stream_token_per_minute: expected at least 1, got ${BAD}"),
    ],
    ids=["int-from-file", "int-range-from-credential", "int-range-from-env"],
)
def test_an_error_about_a_value_from_a_secret_source_quotes_the_reference(tmp_path, key, bad, expected):
    (tmp_path / "bad").write_text(f"{bad}\n")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path), "BAD": bad}
    with pytest.raises(ConfigError) as info:
        config(f'  argon: {{bot_token: x, stream_token_per_minute: "{key}"}}\n', tmp_path / "gateway.yaml", env)
    message = str(info.value)
    assert message.endswith(expected)
    assert f"got {bad}" not in message and f"got {bad!r}" not in message and "SECRETISH" not in message


def test_helper_errors_quote_the_reference_not_the_value(tmp_path):
    # HostPort.parse quotes what get_str returned: Options.error() shows the reference instead
    (tmp_path / "gateway.yaml").write_text('server: {http: "${HTTP}"}\n' + ROUTES)
    with pytest.raises(ConfigError) as info:
        GatewayConfig.load(tmp_path / "gateway.yaml", env={"HTTP": "SECRET-host-no-port"})
    assert str(info.value).endswith("server.http: expected HOST:PORT, got '${HTTP}'")


@pytest.mark.parametrize("value", ["rtp-SECRET-ish", "xy"])
def test_choice_errors_quote_the_reference_not_the_value(tmp_path, value):
    (tmp_path / "gateway.yaml").write_text(
        "services: {voipbin: {token: vb}}\n" + ROUTES.replace("encapsulation: rtp", 'encapsulation: "${ENCAP}"')
    )
    with pytest.raises(ConfigError) as info:
        Gateway(GatewayConfig.load(tmp_path / "gateway.yaml", env={"ENCAP": value})).build()
    assert str(info.value).endswith("voipbin.encapsulation: expected one of rtp, sln, audiosocket, got '${ENCAP}'")


TWO_MISSING = """\
server: {http: 127.0.0.1:8080, media: 127.0.0.1:12880}
services:
  argon:   {bot_token: "${credential:argon_token}"}
  voipbin: {token: "${VOIPBIN_TOKEN}"}
  agent:   {api_key: "${file:present.key}"}
""" + ROUTES


def test_check_lists_every_missing_secret_in_one_run(tmp_path, monkeypatch, capsys):
    (tmp_path / "present.key").write_text("agent-key-value\n")
    path = tmp_path / "gateway.yaml"
    path.write_text(TWO_MISSING)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.delenv("VOIPBIN_TOKEN", raising=False)
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        (f"invalid: {path}:3: services.argon.bot_token: credential argon_token not found "
         "(no $CREDENTIALS_DIRECTORY: is LoadCredential=argon_token:... in the unit?)"),
        f"invalid: {path}:4: services.voipbin.token: environment variable VOIPBIN_TOKEN is not set",
    ]
    assert "agent-key-value" not in err


def test_check_with_every_secret_present_is_ok_and_quiet_about_them(tmp_path):
    (tmp_path / "present.key").write_text("agent-key-value\n")
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "argon_token").write_text("argon-cred-value")
    path = tmp_path / "gateway.yaml"
    path.write_text(TWO_MISSING)
    env = {"PATH": "/usr/bin:/bin", "CREDENTIALS_DIRECTORY": str(tmp_path / "creds"), "VOIPBIN_TOKEN": "vb-env-value"}
    result = subprocess.run([sys.executable, "-m", "gateway", "check", str(path)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert f"ok: {path}: 1 route(s)" in result.stdout
    assert not any(v in result.stdout + result.stderr for v in ("agent-key-value", "argon-cred-value", "vb-env-value"))


def test_check_reports_the_missing_secrets_and_the_validation_error(tmp_path, monkeypatch, capsys):
    path = tmp_path / "gateway.yaml"
    path.write_text(TWO_MISSING.replace("http: 127.0.0.1:8080", "http: localhost"))
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.delenv("VOIPBIN_TOKEN", raising=False)
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert [line.split(": ", 3)[2] for line in err] == [
        "services.argon.bot_token", "services.voipbin.token", "services.agent.api_key", "server.http"
    ], err
    assert err[2].endswith("present.key: No such file or directory")
