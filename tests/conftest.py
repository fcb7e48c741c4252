from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from audio_checks import read_wav, write_wav  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent / "gateway" / "assets"


@pytest.fixture(scope="session")
def speech_clip(tmp_path_factory) -> Path:
    """2.0 s of recorded speech (8 kHz mono), cut from the bundled or105.wav."""
    pcm, rate = read_wav(ASSETS / "or105.wav")
    path = tmp_path_factory.mktemp("audio") / "speech-2s.wav"
    write_wav(path, pcm[int(0.3 * rate) : int(2.3 * rate)], rate)
    return path



UNGROUPED = pytest.StashKey[set]()
UNGROUPED_MESSAGE = ("--dist loadgroup did not put this xdist_group test in its group, so the real-time tests "
                     "run beside each other and starve each other of CPU: this pytest/pytest-xdist pair is "
                     "broken (pytest-dev/pytest-xdist#1386); pyproject pins pytest<9.2 for it")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Note the tests that `--dist loadgroup` failed to group; each of them then fails at setup.

    dev.sh runs the real-time tests (xdist_group "realtime") one after another on one worker.
    pytest-xdist marks them by appending "@group" to each node id on the worker; pytest 9.2 made
    that mutation a no-op (pytest-dev/pytest-xdist#1386), so the heavy tests ran beside each other
    with nothing saying so, and failed now and then. pyproject pins pytest below 9.2; this check
    keeps a future upgrade from bringing the silent failure back.
    """
    if getattr(config.option, "loadgroup", False):  # set on each xdist worker under --dist loadgroup
        config.stash[UNGROUPED] = {item.nodeid for item in items
                                   if item.get_closest_marker("xdist_group") and "@" not in item.nodeid}


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.nodeid in item.config.stash.get(UNGROUPED, set()):
        pytest.fail(UNGROUPED_MESSAGE, pytrace=False)


@pytest.fixture
async def stalls(nursery, monkeypatch):
    """harness.Stalls of this test: the stretches in which another process kept it off the
    cores (harness.Starvation, run in the test's nursery) and when each record endpoint wrote
    its frames, for the real-time checks to leave the audio the stalls reached unjudged
    (audio_checks.assert_blocks_found, assert_correlated). Async tests only."""
    from harness import Stalls

    stalls = Stalls(monkeypatch)
    nursery.start_soon(stalls.starvation.run)
    return stalls
