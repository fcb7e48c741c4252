"""A noisy machine on demand, to reproduce what a loaded CI host does to the real-time tests:
one process per CPU that takes its core for `--busy` seconds every `--every` seconds (at a
raised priority when run as root, so that it preempts the tests as another tenant's vCPU or a
burst of Chromium does). The real-time checks excuse what these stalls reach and nothing
else (harness.Starvation, audio_checks.assert_blocks_found); `./dev.sh stalled` runs the suite
beside it.

    python tests/noisy_machine.py --busy 0.05 --every 0.5 --seconds 600
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time


def spin(busy: float, every: float, until: float) -> None:
    try:
        os.nice(-15)  # root only: preempt the tests rather than share the core with them
    except PermissionError:
        pass
    while time.monotonic() < until:
        start = time.monotonic()
        while time.monotonic() - start < busy:
            pass
        time.sleep(max(0.0, every - busy))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--busy", type=float, default=0.05, help="seconds each spinner holds its core (0.05)")
    parser.add_argument("--every", type=float, default=0.5, help="seconds between the starts of two stalls (0.5)")
    parser.add_argument("--seconds", type=float, default=900, help="how long to run (900)")
    args = parser.parse_args()
    until = time.monotonic() + args.seconds
    spinners = [multiprocessing.Process(target=spin, args=(args.busy, args.every, until), daemon=True)
                for _ in range(os.cpu_count() or 1)]
    for p in spinners:
        p.start()
    for p in spinners:
        p.join()


if __name__ == "__main__":
    main()
