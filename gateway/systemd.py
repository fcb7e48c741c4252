"""systemd's service notification protocol (sd_notify(3)): READY=1, STATUS=, RELOADING=1,
STOPPING=1, WATCHDOG=1 as datagrams to the AF_UNIX socket named by `$NOTIFY_SOCKET`.

The protocol is one `sendto` of newline-separated KEY=VALUE assignments; an address starting
with "@" is in the abstract namespace (a leading NUL byte). Without `$NOTIFY_SOCKET` (not run
by systemd, or `Type=` other than notify) every call does nothing. `$WATCHDOG_USEC` (set when
the unit has `WatchdogSec=`) gives the interval; `$WATCHDOG_PID`, when set, must be our pid.
"""

from __future__ import annotations

import logging
import os
import socket
import time

import trio

log = logging.getLogger("gateway.systemd")


class Notifier:
    """Sends sd_notify messages; a no-op when `$NOTIFY_SOCKET` is unset.

    Errors sending (systemd gone, socket full) are logged once and never raised: a gateway
    that cannot tell systemd it is alive keeps streaming (the watchdog will say the rest).
    """

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if address.startswith("@"):
            self.address = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self.address = address
        self._sock: socket.socket | None = None
        self._warned = False
        self.watchdog_s: float | None = None
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> None:
        """Send `KEY=value` lines, e.g. `notify(READY=1, STATUS="3 routes up")`; names are
        upper-cased as systemd expects. A value may not contain a newline."""
        if self.address is None:
            return
        message = "\n".join(f"{key.upper()}={str(value).replace(chr(10), ' ')}" for key, value in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message.encode(), self.address)
        except OSError as err:
            if not self._warned:
                log.warning("cannot notify systemd at %s: %s", self.address, err)
                self._warned = True

    def ready(self, status: str) -> None:
        self.notify(READY=1, STATUS=status)

    def status(self, status: str) -> None:
        self.notify(STATUS=status)

    def reloading(self) -> None:
        """RELOADING=1 with MONOTONIC_USEC (required by systemd ≥ 253 for Type=notify-reload)."""
        self.notify(RELOADING=1, MONOTONIC_USEC=int(time.monotonic() * 1e6))

    def stopping(self) -> None:
        self.notify(STOPPING=1)

    async def watchdog(self) -> None:
        """Send WATCHDOG=1 at half the interval from inside the event loop, so a stalled
        loop stops the pings and systemd restarts the service. Returns at once when the unit
        has no `WatchdogSec=`."""
        if self.address is None or self.watchdog_s is None:
            return
        while True:
            self.notify(WATCHDOG=1)
            await trio.sleep(self.watchdog_s / 2)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
