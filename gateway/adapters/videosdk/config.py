"""`services.videosdk`: the settings every VideoSDK endpoint shares (registry row "videosdk").
Spec: shared/protocols/004_c69f0f37162481c1.txt."""

from __future__ import annotations

import attrs

from gateway.config.options import Options
from gateway.config.secret import Secret

VIDEOSDK_API_URL = "https://api.videosdk.live"


@attrs.frozen
class VideosdkService:
    """`services.videosdk`: VideoSDK custom WebSocket ingest (dial) and our compatible server
    (listen). Spec: shared/protocols/004_c69f0f37162481c1.txt."""

    api_url: str = VIDEOSDK_API_URL
    """REST base; sessions are POST {api_url}/v2/ingest/sessions."""
    token: Secret | None = None
    """The token of the session call (dial)."""
    auth_scheme: str = "Bearer"
    """`Authorization: <auth_scheme> <token>` as the spec shows; "" sends the bare token."""
    listen_tokens: tuple[Secret, ...] = ()
    """Tokens our listen sessions endpoint accepts (default: token)."""
    webhook_public_key: str | None = None
    """PEM of the RSA key that signs lifecycle webhooks (`webhook_public_key` or
    `webhook_public_key_file`); without it POST /webhooks/videosdk is not served."""

    @classmethod
    def from_options(cls, opts: Options) -> VideosdkService:
        token = opts.get_str("token", None, secret=True)
        pem = opts.get_str("webhook_public_key", None)
        pem_file = opts.get_str("webhook_public_key_file", None)
        if pem and pem_file:
            raise opts.error("webhook_public_key_file", "set webhook_public_key or webhook_public_key_file, not both")
        if pem_file:
            try:
                with open(pem_file, encoding="ascii") as f:
                    pem = f.read()
            except (OSError, UnicodeDecodeError) as err:
                raise opts.error("webhook_public_key_file", f"cannot read {pem_file}: {err}") from None
        result = cls(
            api_url=opts.get_str("api_url", VIDEOSDK_API_URL).rstrip("/"),
            token=Secret(token) if token else None,
            auth_scheme=opts.get_str("auth_scheme", "Bearer"),
            listen_tokens=opts.get_secrets("listen_tokens", (Secret(token),) if token else ()),
            webhook_public_key=pem or None,
        )
        opts.finish()
        return result
