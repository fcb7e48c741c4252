"""`services.agent`: the settings every voice-agent endpoint shares (registry row "agent").
Spec: shared/protocols/003_300445899f8ad283.txt."""

from __future__ import annotations

import attrs

from gateway.config.options import Options
from gateway.config.secret import Secret


@attrs.frozen
class AgentService:
    """`services.agent`: a voice-agent SDK service (dial) and our compatible server (listen).
    Spec: shared/protocols/003_300445899f8ad283.txt."""

    api_url: str | None = None
    """Base URL of the agent API; the token call is POST {api_url}/api/v1/sdk/token."""
    api_key: Secret | None = None
    """`Authorization: Bearer <api_key>` of the token call (dial)."""
    listen_api_keys: tuple[Secret, ...] = ()
    """API keys our listen token endpoint accepts (default: api_key)."""
    cors_origins: tuple[str, ...] = ()
    """Origins allowed to call our listen token endpoint from a browser ("*" for any)."""
    connect_timeout_s: float = 10.0
    """Seconds a dial endpoint waits for {"type":"connected"} after sending its token."""

    @classmethod
    def from_options(cls, opts: Options) -> AgentService:
        api_key = opts.get_str("api_key", None, secret=True)
        api_url = opts.get_str("api_url", None)
        result = cls(
            api_url=api_url.rstrip("/") if api_url else None,
            api_key=Secret(api_key) if api_key else None,
            listen_api_keys=opts.get_secrets("listen_api_keys", (Secret(api_key),) if api_key else ()),
            cors_origins=opts.get_str_list("cors_origins"),
            connect_timeout_s=opts.get_float("connect_timeout_s", 10.0, minimum=0.1),
        )
        opts.finish()
        return result
