"""What a listener checks, as numbers: does the audio that arrived match what was sent?
(The functions live in gateway/quality.py, which the demo uses too.)"""

from gateway.quality import active_duration, best_alignment, blockwise_alignment, read_wav, write_wav

__all__ = ["active_duration", "best_alignment", "blockwise_alignment", "read_wav", "write_wav"]
