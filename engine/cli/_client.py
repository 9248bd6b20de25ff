"""Shared by the commands that talk to analyzers or engines as a client (send, replay)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


def parse_target(to: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port)."""
    host, sep, port_text = to.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise click.BadParameter(
            f"{to!r} is not HOST:PORT (e.g. 127.0.0.1:2575)", param_hint="--to"
        )
    return host.strip("[]"), int(port_text)


def answer_lines(messages: list[bytes], prefix: str = "") -> list[str]:
    """ASTM messages the other side sent back (e.g. a worklist), a record a line: this is how
    an analyst checks what an analyzer or engine answered."""
    lines: list[str] = []
    for n, message in enumerate(messages, start=1):
        lines.append(f"{prefix}received #{n} ({len(message)} bytes):")
        lines.extend(f"  {record}" for record in
                     message.decode("latin-1", errors="replace").split("\r") if record)
    return lines


def run_client(start: Callable[[Any], Any], what: str = "sending") -> Any:
    """Run ``start(reactor) -> Deferred`` under the reactor once; return its result.

    A failure becomes a ClickException (exit 1) after Twisted printed what went wrong.
    """
    from twisted.internet import task

    outcome: dict[str, Any] = {}

    def main(reactor: Any) -> Any:
        d = start(reactor)
        d.addCallback(lambda result: outcome.update(result=result))
        return d

    try:
        task.react(main)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise click.ClickException(f"{what} failed; see the messages above") from exc
    if "result" not in outcome:
        raise click.ClickException(f"{what} did not finish")
    return outcome["result"]
