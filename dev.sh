#!/usr/bin/env bash
# One entry point for a fresh Debian machine (Python >= 3.11):
#   ./dev.sh demo   set up if needed, then run the demo (phone call -> voice channel)
#   ./dev.sh test   set up if needed, then lint (ruff, mypy) and run the whole test suite
#   ./dev.sh lint   set up if needed, then only ruff and mypy (configs in pyproject.toml)
#   ./dev.sh bench  set up if needed, then run the concurrency benchmark
#   ./dev.sh stalled [pytest args]  the tests beside tests/noisy_machine.py (both cores taken 50 ms every 0.5 s)
#   ./dev.sh setup  only the set-up: system packages (libopus0, chromium, nodejs, node-ws, ffmpeg), .venv, the project and its test extras
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
    # Installs Debian packages once; apt-get update only when something is missing.
    if [ ! -f /tmp/.gateway-apt-updated ]; then
        as_root apt-get update -qq && touch /tmp/.gateway-apt-updated
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

setup() {
    # `setup browser` (set-up for the tests) also installs Chromium for tests/test_browser.py
    local missing=()
    ldconfig -p 2>/dev/null | grep -q 'libopus\.so\.0' || missing+=(libopus0)
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
    if [ "${1:-}" = browser ] && [ ! -x /usr/bin/chromium ]; then missing+=(chromium); fi
    if [ "${1:-}" = browser ]; then
        # tests/test_systemd_unit.py: systemd-analyze (verify, security, syscall groups) and what
        # reproduces the unit's sandbox (unshare, setpriv; libseccomp through ctypes)
        command -v systemd-analyze >/dev/null || missing+=(systemd)
        { command -v unshare && command -v setpriv; } >/dev/null || missing+=(util-linux)
        ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2' || missing+=(libseccomp2)
        # tests/test_seed_clients.py: the specs' own example clients (Node.js with `ws`, and the
        # Argon example's ffmpeg); any node on PATH will do (tests/seed_clients.py adapts to it)
        command -v node >/dev/null || missing+=(nodejs)
        if ! command -v node >/dev/null \
            || ! NODE_PATH=/usr/share/nodejs node -e "require('ws')" >/dev/null 2>&1; then
            missing+=(node-ws)
        fi
        command -v ffmpeg >/dev/null || missing+=(ffmpeg)
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        echo "setup: installing ${missing[*]} with apt-get" >&2
        apt_install "${missing[@]}"
    fi
    local stamp="$VENV/.installed"
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
    fi
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "setup: installing the project into $VENV" >&2
        "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
        "$VENV/bin/python" -m pip install -q -e '.[test]'
        touch "$stamp"
    fi
}

lint() {
    # ruff (pyproject.toml [tool.ruff]) and mypy ([tool.mypy]: the gateway package); exits on the
    # first that fails (set -e)
    "$VENV/bin/ruff" check gateway tests bench
    "$VENV/bin/mypy"
}

cmd=${1:-help}
shift || true
case "$cmd" in
    setup) setup browser ;;
    demo)  setup; exec "$VENV/bin/gateway" demo "$@" ;;
    lint)  setup; lint ;;
    test)  setup browser  # the browser test runs, not skips: a missing Chromium is a failure
           lint  # a lint or type error fails the build before the tests run
           export GATEWAY_REQUIRE_BROWSER=${GATEWAY_REQUIRE_BROWSER:-1}
           # loadgroup: the tests marked xdist_group("realtime") (CPU-heavy real-time calls, the
           # session burst, the fuzz) run one after another on one worker, never against each other
           exec "$VENV/bin/python" -m pytest -n 2 --dist loadgroup -q "$@" ;;
    bench) setup; exec "$VENV/bin/python" bench/bench_routes.py "$@" ;;
    stalled) setup browser
           # a loaded CI host on demand: the real-time checks must excuse only what the stalls reach
           "$VENV/bin/python" tests/noisy_machine.py --busy "${STALL_BUSY:-0.05}" --every "${STALL_EVERY:-0.5}" &
           noisy=$!
           trap 'kill $noisy 2>/dev/null' EXIT
           GATEWAY_REQUIRE_BROWSER=${GATEWAY_REQUIRE_BROWSER:-1} "$VENV/bin/python" -m pytest -n 2 --dist loadgroup -q "${@:-tests}" ;;
    *) sed -n '2,8p' "$0"; exit 2 ;;
esac
