"""`services.voipbin`: the settings every VoIPBIN endpoint shares (registry row "voipbin")."""

from __future__ import annotations

import attrs

from gateway.config.options import Options
from gateway.config.secret import Secret

VOIPBIN_API_URL = "https://api.voipbin.net"


@attrs.frozen
class VoipbinService:
    """`services.voipbin`: the VoIPBIN API (dial) and our compatible media server (listen)."""

    api_url: str = VOIPBIN_API_URL
    """Base URL; media streams are {api_url as ws/wss}/v1.0/calls/{id}/media_stream."""
    token: Secret | None = None
    """The `token=` query parameter for dial endpoints."""
    listen_tokens: tuple[Secret, ...] = ()
    """Tokens our listen media server accepts (default: token)."""

    @classmethod
    def from_options(cls, opts: Options) -> VoipbinService:
        token = opts.get_str("token", None, secret=True)
        result = cls(
            api_url=opts.get_str("api_url", VOIPBIN_API_URL).rstrip("/"),
            token=Secret(token) if token else None,
            listen_tokens=opts.get_secrets("listen_tokens", (Secret(token),) if token else ()),
        )
        opts.finish()
        return result
