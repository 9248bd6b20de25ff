"""Waiting in trial tests that use the real reactor: turn it until a condition holds."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet import task

reactor: Any = _reactor  # zope interfaces are opaque to mypy


async def turns(condition: Any, limit: int = 3000) -> None:
    """Let the reactor run (I/O included) until ``condition()``, at most ``limit`` turns of
    a millisecond; bounded, no sleeping."""
    for _ in range(limit):
        if condition():
            return
        await task.deferLater(reactor, 0.001, lambda: None)
    raise AssertionError("condition not reached")
