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


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]
