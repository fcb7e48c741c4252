"""`services.twilio`: what every Twilio endpoint of the file shares.

```yaml
services:
  twilio:
    auth_token: "${credential:twilio_auth_token}"   # checks / signs X-Twilio-Signature
    account_sid: AC0123456789abcdef0123456789abcdef  # dial: the start message's accountSid
```

- `auth_token`: the account's Auth Token (https://www.twilio.com/docs/usage/security). Listen:
  with it, every media upgrade and voice webhook must carry a valid ``X-Twilio-Signature``
  (else 403); without it they are not checked. Dial: with it, the upgrade carries the
  signature Twilio would send, for servers that check it.
- `account_sid`: dial only, the ``accountSid`` of the ``start`` and ``stop`` messages (default:
  a random ``AC…`` per stream).
"""

from __future__ import annotations

import re

import attrs

from gateway.config.options import Options
from gateway.config.secret import Secret

ACCOUNT_SID = re.compile(r"AC[0-9a-fA-F]{32}")  # "Pattern: ^AC[0-9a-fA-F]{32}$" (Streams subresource)


@attrs.frozen
class TwilioService:
    """`services.twilio` (module doc)."""

    auth_token: Secret | None = None
    """HMAC-SHA1 key of ``X-Twilio-Signature``; None: listen roles check nothing, dial roles sign nothing."""
    account_sid: str | None = None
    """Dial: ``start.accountSid``; None: a random one per stream."""

    @classmethod
    def from_options(cls, opts: Options) -> TwilioService:
        token = opts.get_str("auth_token", None, secret=True)
        account_sid = account_sid_option(opts)
        opts.finish()
        return cls(auth_token=Secret(token) if token else None, account_sid=account_sid)


def account_sid_option(opts: Options, default: str | None = None) -> str | None:
    """Option `account_sid`: ``AC`` and 32 hex digits, as Twilio's SIDs are."""
    value = opts.get_str("account_sid", default)
    if value is not None and not ACCOUNT_SID.fullmatch(value):
        raise opts.error("account_sid", f"expected AC and 32 hex digits, got {value[:40]!r}")
    return value
