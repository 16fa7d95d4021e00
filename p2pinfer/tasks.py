"""A trio nursery whose lone failure surfaces as itself.

trio wraps every error leaving a nursery in an exception group, so `except LinkClosed` around a
block that happens to use a nursery inside would miss it. When exactly one exception escapes (the
usual case: the body failed and the helper tasks were cancelled), re-raise that exception.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


def _single_leaf(group: BaseExceptionGroup) -> BaseException | None:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        if len(leaf.exceptions) != 1:
            return None
        leaf = leaf.exceptions[0]
    return leaf


@asynccontextmanager
async def open_nursery() -> AsyncIterator[trio.Nursery]:
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        leaf = _single_leaf(group)
        if leaf is None:
            raise
        raise leaf from None
