"""`services.argon`: the settings every Argon endpoint shares (registry row "argon"); specs:
shared/protocols/argon-voice-ws.md, 000_1537bbe3858d175f.txt, 001_bf359231651c17d3.txt."""

from __future__ import annotations

import uuid

import attrs

from gateway.config.options import Options
from gateway.config.secret import Secret

ARGON_API_URL = "https://gateway.argon.zone"  # argon-voice-ws.md "Calls and events" (the seed: api.argon.gl/api/bot)
ARGON_INGRESS_PATH = "/audio/connect"


@attrs.frozen
class ArgonBot:
    """One bot our Argon listen role knows (`services.argon.listen_bots[]`): the token it sends
    (`Authorization: Bot <token>`) and who it is (`GET /IBotSelf/v1/GetMe`, its identity in
    rooms, the callee of `call:` listen endpoints)."""

    token: Secret
    user_id: str
    """The bot's user id (a GUID in Argon): its identity in stream tokens and rooms."""
    bot_id: str = ""
    username: str = ""
    """Argon bot usernames end in `_bot`."""
    display_name: str = ""

    @classmethod
    def from_options(cls, opts: Options, index: int) -> ArgonBot:
        token = opts.get_str("token", secret=True, allow_empty=False)
        user_id = opts.get_str("user_id", allow_empty=False)
        username = opts.get_str("username", f"bot{index}_bot")
        result = cls(token=Secret(token), user_id=user_id, bot_id=opts.get_str("bot_id", user_id),
                     username=username, display_name=opts.get_str("display_name", username))
        opts.finish()
        return result


@attrs.frozen
class ArgonService:
    """`services.argon`: the Argon bot API (dial) and our Argon-compatible server (listen)."""

    api_url: str = ARGON_API_URL
    """Base of the bot REST API; StreamToken is POST {api_url}/IVoice/v1/StreamToken."""
    bot_token: Secret | None = None
    """`Authorization: Bot <token>` for dial endpoints."""
    ingress_path: str = ARGON_INGRESS_PATH
    """Appended to the ingressUrl from StreamToken ("" for the bare URL of the seed document)."""
    stream_token_per_minute: int = 5
    """StreamToken calls allowed per minute per bot (Argon: 5)."""
    listen_bot_tokens: tuple[Secret, ...] = ()
    """Bot tokens our listen StreamToken endpoint accepts (default: bot_token)."""
    jwt_secret: Secret | None = None
    """HS256 key for stream tokens issued by the listen role (default: random per process)."""
    listen_bots: tuple[ArgonBot, ...] = ()
    """Bots our listen role knows, with their user ids (`listen_bots: [{token, user_id, ...}]`);
    each `listen_bot_tokens` entry is a bot too, with a user id derived from its position."""
    events_per_minute: int = 5
    """Events-stream connects allowed per minute per bot (Argon: 5)."""
    calls_per_minute: int = 20
    """Calls Accept/Reject requests allowed per minute per bot (Argon: 20)."""
    max_sessions: int = 200
    """Listen role: audio WebSocket sessions served at once; more get 503, as Argon's ingress."""

    @classmethod
    def from_options(cls, opts: Options) -> ArgonService:
        bot_token = opts.get_str("bot_token", None, secret=True)
        tokens = opts.get_secrets("listen_bot_tokens")
        bots = [ArgonBot.from_options(opts.child(item, f"{opts.key_path('listen_bots')}[{i}]", line), i)
                for i, item, line in opts.items("listen_bots")]
        jwt_secret = opts.get_str("jwt_secret", None, secret=True)
        if not tokens and not bots and bot_token:
            tokens = (Secret(bot_token),)
        known = {b.token for b in bots}
        bots += [ArgonBot(token=t, user_id=_bot_user_id(i), username=f"bot{i}_bot", display_name=f"bot{i}_bot")
                 for i, t in enumerate(tokens) if t not in known]
        user_ids = [b.user_id for b in bots]
        if len(set(user_ids)) != len(user_ids):
            raise opts.error("listen_bots", f"two bots with the same user_id: {user_ids}")
        result = cls(
            api_url=opts.get_str("api_url", ARGON_API_URL).rstrip("/"),
            bot_token=Secret(bot_token) if bot_token else None,
            ingress_path=opts.get_str("ingress_path", ARGON_INGRESS_PATH),
            stream_token_per_minute=opts.get_int("stream_token_per_minute", 5, minimum=1),
            listen_bot_tokens=tuple(b.token for b in bots),
            jwt_secret=Secret(jwt_secret) if jwt_secret else None,
            listen_bots=tuple(bots),
            events_per_minute=opts.get_int("events_per_minute", 5, minimum=1),
            calls_per_minute=opts.get_int("calls_per_minute", 20, minimum=1),
            max_sessions=opts.get_int("max_sessions", 200, minimum=1),
        )
        opts.finish()
        return result


def _bot_user_id(index: int) -> str:
    """The user id of the `index`-th bot of `listen_bot_tokens` (stable, GUID-shaped)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"gateway:argon-bot:{index}"))
