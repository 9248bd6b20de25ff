"""`labrelay send hl7 --to HOST:PORT FILE...`: send HL7 files over MLLP as an analyzer would.

Each file may hold one or many messages (split at each line starting with MSH). Every
message waits for its ACK before the next one leaves. One line per message:
``<file>#<n> <control_id> <code> <text>``; exit status 1 if any answer was not AA/CA.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import click

from drivers.hl7.parser import split_messages
from engine.adapters.mllp import AckResult
from engine.cli._client import parse_target, run_client, tls_click_options, tls_options


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
@tls_click_options
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def send_hl7(
    to: str,
    files: tuple[str, ...],
    timeout: float,
    tls: bool,
    ca_file: str | None,
    cert_file: str | None,
    key_file: str | None,
) -> None:
    """Send HL7 message FILES over MLLP and print each ACK.

    A file may hold one or many messages (segments ended by CR, LF or CRLF). Exits 1 if
    any message was not accepted (AA or CA).

    \b
    Examples:
      labrelay send hl7 --to 127.0.0.1:2575 fixtures/oru_DEMO0001.hl7
      labrelay send hl7 --to 127.0.0.1:2576 --tls --ca ca.pem --cert me.pem --key me.key F.hl7
    """
    host, port = parse_target(to)
    secure = tls_options(host, tls, ca_file, cert_file, key_file)  # checked before connecting
    labels: list[str] = []
    messages: list[bytes] = []
    for name in files:
        found = split_messages(Path(name).read_bytes())
        if not found:
            raise click.ClickException(f"{name}: no HL7 message (no line starts with MSH)")
        for n, message in enumerate(found, start=1):
            labels.append(f"{name}#{n}")
            messages.append(message)


    from engine.adapters.mllp import send_messages

    results: list[AckResult] = run_client(
        lambda reactor: send_messages(reactor, host, port, messages, timeout=timeout,
                                      tls_options=secure)
    )
    for line in result_lines(labels, results):
        click.echo(line)
    if len(results) != len(messages) or not all(r.ok for r in results):
        sys.exit(1)
