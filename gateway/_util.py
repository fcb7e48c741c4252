"""Small helpers shared across the package."""

from __future__ import annotations

import trio


def collapse(exc: BaseException) -> BaseException:
    """The one meaningful exception inside (nested) exception groups.

    Endpoint `run()`s own nurseries (a WebSocket's reader task), so their errors arrive wrapped
    in ExceptionGroups. When a group holds exactly one leaf that is not `trio.Cancelled`, that
    leaf is what happened; otherwise the group is returned unchanged.
    """
    while isinstance(exc, BaseExceptionGroup):
        leaves = [e for e in _leaves(exc) if not isinstance(e, trio.Cancelled)]
        if len(leaves) != 1:
            return exc
        exc = leaves[0]
    return exc


def peer_address(stream: trio.SocketStream) -> tuple[str, int] | None:
    """(address, port) of a TCP stream's far end; None once its socket is gone (getpeername
    raises ENOTCONN after a reset) or is not an IP socket."""
    try:
        address, port = stream.socket.getpeername()[:2]
    except (OSError, AttributeError, ValueError):
        return None
    return str(address), int(port)


def format_peer(address: str, port: int) -> str:
    """`address:port`, `[v6 address]:port`, for log lines."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def peer_name(stream: trio.SocketStream) -> str:
    """`format_peer` of the stream's far end, or "?" once its socket is gone."""
    peer = peer_address(stream)
    return "?" if peer is None else format_peer(*peer)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


# Goodbyes (close frames, hangups) run shielded so a cancelled route still says them; a second
# SIGTERM must still be able to cut them short: every such scope is registered here.
_goodbye_scopes: set[trio.CancelScope] = set()
_aborted = False


class goodbye_scope:
    """`with goodbye_scope(seconds):` — shielded from outside cancellation, bounded by
    `seconds`, and cancelled by `abort_goodbyes()`."""

    def __init__(self, seconds: float) -> None:
        self._scope = trio.move_on_after(seconds)
        self._scope.shield = True

    def __enter__(self) -> trio.CancelScope:
        scope = self._scope.__enter__()
        if _aborted:
            scope.cancel()
        _goodbye_scopes.add(scope)
        return scope

    def __exit__(self, *exc) -> bool:
        _goodbye_scopes.discard(self._scope)
        return self._scope.__exit__(*exc)


def abort_goodbyes() -> None:
    """Cancel every goodbye in progress and any later one: the process is about to exit (the
    command line's second signal). Process-wide and final."""
    global _aborted
    _aborted = True
    for scope in list(_goodbye_scopes):
        scope.cancel()
