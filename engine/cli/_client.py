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


def tls_options(host: str, tls: bool, ca_file: str | None, cert_file: str | None,
                key_file: str | None) -> Any:
    """The client TLS options for ``--tls [--ca] [--cert --key]`` (None without --tls).

    A misuse is a usage error and an unreadable PEM file names the file, both before
    anything connects."""
    if (ca_file or cert_file or key_file) and not tls:
        raise click.UsageError("--ca, --cert and --key are TLS options: add --tls")
    if (cert_file is None) != (key_file is None):
        raise click.UsageError("a client certificate needs both --cert and --key")
    if not tls:
        return None
    from engine.adapters.mllp import client_tls_options

    try:
        return client_tls_options(host, ca_file=ca_file, cert_file=cert_file,
                                  key_file=key_file)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc


def tls_click_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--tls, --ca, --cert and --key, as the send commands take them."""
    file = click.Path(exists=True, dir_okay=False)
    for option in reversed((
        click.option("--tls", is_flag=True,
                     help="Connect with TLS (the server certificate is verified)."),
        click.option("--ca", "ca_file", type=file, default=None,
                     help="PEM CA certificate that signed the server's (default: system "
                     "trust store)."),
        click.option("--cert", "cert_file", type=file, default=None,
                     help="PEM client certificate for a mutual-TLS listener (with --key)."),
        click.option("--key", "key_file", type=file, default=None,
                     help="PEM private key of the client certificate."),
    )):
        command = option(command)
    return command


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
