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
