"""`labrelay send hl7 --to HOST:PORT FILE...`: send HL7 files over MLLP as an analyzer would.

Each file may hold one or many messages (split at each line starting with MSH). Every
message waits for its ACK before the next one leaves. One line per message:
``<file>#<n> <control_id> <code> <text>``; exit status 1 if any answer was not AA/CA.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from drivers.hl7.parser import split_messages
from engine.adapters.mllp import AckResult


def parse_target(to: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port)."""
    host, sep, port_text = to.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise click.BadParameter(
            f"{to!r} is not HOST:PORT (e.g. 127.0.0.1:2575)", param_hint="--to"
        )
    return host.strip("[]"), int(port_text)


def result_lines(labels: Sequence[str], results: Sequence[AckResult]) -> list[str]:
    lines = []
    for label, result in zip(labels, results, strict=True):
        code = result.code or "-"
        text = result.error if result.error else result.text
        lines.append(f"{label} {result.control_id or '-'} {code} {text}".rstrip())
    return lines


@click.command("send_hl7")
@click.option("--to", "to", required=True, help="Listener address, HOST:PORT.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    help="Seconds to wait for each ACK.",
)
@click.option("--tls", is_flag=True, help="Connect with TLS.")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def send_hl7(to: str, files: tuple[str, ...], timeout: float, tls: bool) -> None:
    """Send HL7 message FILES over MLLP and print each ACK.

    A file may hold one or many messages (segments ended by CR, LF or CRLF). Exits 1 if
    any message was not accepted (AA or CA).

    \b
    Example:
      labrelay send hl7 --to 127.0.0.1:2575 fixtures/oru_DEMO0001.hl7
    """
    host, port = parse_target(to)
    labels: list[str] = []
    messages: list[bytes] = []
    for name in files:
        found = split_messages(Path(name).read_bytes())
        if not found:
            raise click.ClickException(f"{name}: no HL7 message (no line starts with MSH)")
        for n, message in enumerate(found, start=1):
            labels.append(f"{name}#{n}")
            messages.append(message)

    from twisted.internet import task

    from engine.adapters.mllp import send_messages

    outcome: dict[str, list[AckResult]] = {}

    def main(reactor: Any) -> Any:
        d = send_messages(reactor, host, port, messages, timeout=timeout, tls=tls)
        d.addCallback(lambda results: outcome.update(r=results))
        return d

    try:
        task.react(main)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise click.ClickException("sending failed; see the messages above") from exc
    results = outcome.get("r", [])
    for line in result_lines(labels, results):
        click.echo(line)
    if len(results) != len(messages) or not all(r.ok for r in results):
        sys.exit(1)
