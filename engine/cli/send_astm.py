"""`labrelay send astm --to HOST:PORT | --serial DEVICE FILE...`: play ASTM captures.

Over TCP, ``--tls`` (with ``--ca``, and ``--cert``/``--key`` for a mutual-TLS listener)
speaks TLS, as an analyzer on a TLS interface does. Each file is read in any of the four
corpus storage styles (session, frames with lost
CR, one frame, plain records). Its frames go on the wire exactly as captured, bad
checksums included, with the whole LIS01-A2 link layer as an instrument speaks it.
One line per frame (``<file>#<session>.<frame> FN <n> <answer>``) and per message the
other side sent back; exit status 1 if any session was not accepted.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from drivers.astm.files import read_astm_file
from engine.cli._client import (
    answer_lines,
    parse_target,
    run_client,
    tls_click_options,
    tls_options,
)


@click.command("send_astm")
@click.option("--to", "to", default=None, help="Listener address, HOST:PORT.")
@click.option("--serial", "serial", default=None, help="Serial device, e.g. /dev/ttyUSB0.")
@click.option("--baud", "baud", type=int, default=9600, show_default=True, help="Serial speed.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1.0),
    default=120.0,
    show_default=True,
    help="Seconds the whole exchange may take.",
)
@click.option(
    "--listen-after",
    "listen_after",
    type=click.FloatRange(min=0.0),
    default=5.0,
    show_default=True,
    help="Seconds to stay on the line after the last EOT for answers (host queries).",
)
@tls_click_options
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def send_astm(
    to: str | None,
    serial: str | None,
    baud: int,
    files: tuple[str, ...],
    timeout: float,
    listen_after: float,
    tls: bool,
    ca_file: str | None,
    cert_file: str | None,
    key_file: str | None,
) -> None:
    """Send ASTM capture FILES to a receiver and print what it answered to each frame.

    Reads all four storage styles of captures (full sessions, frames, one frame, plain
    records). Exits 1 if any message was not accepted.

    \b
    Examples:
      labrelay send astm --to 127.0.0.1:5001 ../shared/corpus/astm/roche_cobas_c311__1.txt
      labrelay send astm --serial /dev/ttyUSB0 --baud 9600 results.astm
      labrelay send astm --to 127.0.0.1:5002 --tls --ca ca.pem --cert me.pem --key me.key F.astm
    """
    if (to is None) == (serial is None):
        raise click.UsageError("give exactly one of --to HOST:PORT or --serial DEVICE")
    if serial is not None and (tls or ca_file or cert_file or key_file):
        raise click.UsageError("--tls, --ca, --cert and --key are for --to HOST:PORT")
    labels: list[str] = []
    sessions: list[tuple[bytes, ...]] = []
    for name in files:
        capture = read_astm_file(Path(name).read_bytes())
        if not capture.is_astm:
            raise click.ClickException(f"{name}: {capture.not_astm_reason}")
        for problem in capture.problems:
            click.echo(f"{name}: note: {problem.describe()}", err=True)
        for n, session in enumerate(capture.sessions, start=1):
            labels.append(f"{name}#{n}")
            sessions.append(session)


    from engine.adapters.astm_send import SendReport
    from engine.adapters.astm_send import send_astm as send

    target: dict[str, Any] = {}
    if to is not None:
        target["host"], target["port"] = parse_target(to)
        target["tls_options"] = tls_options(target["host"], tls, ca_file, cert_file, key_file)
    else:
        target["serial_device"] = serial
        target["baudrate"] = baud

    report: SendReport = run_client(
        lambda reactor: send(reactor, sessions, timeout=timeout, listen_after=listen_after,
                             **target)
    )
    for frame in report.frames:
        label = labels[frame.session] if 0 <= frame.session < len(labels) else "?"
        click.echo(f"{label}.{frame.frame + 1} FN {frame.fn} {frame.answer}")
    for index, reason in sorted(report.failed.items()):
        click.echo(f"{labels[index]} NOT ACCEPTED: {reason}")
    for line in answer_lines(report.received):
        click.echo(line)
    if report.error:
        click.echo(f"error: {report.error}", err=True)
    if report.error or report.failed or len(report.completed) != len(sessions):
        sys.exit(1)
