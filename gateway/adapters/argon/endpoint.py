"""The Argon adapter's endpoints: `ArgonDial` (the gateway as an Argon bot: publish, hear,
follow, answer calls; gateway/adapters/argon/dial.py) and `ArgonListen` (an Argon-compatible
voice server: channels and calls, with StreamToken, the events stream, Calls and GetMe;
gateway/adapters/argon/listen.py). Specs: shared/protocols/argon-voice-ws.md, 000_…, 001_…."""

from gateway.adapters.argon.dial import INGRESS_REJECTED, ArgonDial, BotApi, StreamTokenLimiter
from gateway.adapters.argon.listen import ArgonListen, ArgonListenService

__all__ = ["INGRESS_REJECTED", "ArgonDial", "ArgonListen", "ArgonListenService", "BotApi", "StreamTokenLimiter"]
