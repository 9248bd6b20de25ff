"""`labrelay replay` and `labrelay capture show`: use what an interface captured.

A capture (``capture: true`` on an interface, see engine/capture.py) holds every byte of
every connection. ``replay`` sends one direction's bytes again, connection by connection
in their original order, as whole messages: HL7 blocks are re-framed and sent with the
MLLP client (each waits for its ACK); ASTM frames are re-extracted from the byte stream
and sent with the LIS01-A2 client, exactly as captured. ``capture show`` prints a
timeline an analyst can read, control characters spelled out (<STX>, <ETX>, ...).

Capture files hold patient data; both commands say so on stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from engine.capture import CaptureFormatError, CaptureRecord, read_capture
from engine.cli._client import answer_lines, parse_target, tls_click_options, tls_options
from engine.cli.send_hl7 import result_lines

PHI_WARNING = (
    "note: {path} contains patient data as it crossed the wire; keep it on this machine "
    "and do not paste it into tickets or e-mail"
)

CONTROL_NAMES = {
    0x02: "<STX>",
    0x03: "<ETX>",
    0x04: "<EOT>",
    0x05: "<ENQ>",
    0x06: "<ACK>",
    0x0A: "<LF>",
    0x0B: "<VT>",
    0x0D: "<CR>",
    0x15: "<NAK>",
    0x17: "<ETB>",
    0x1C: "<FS>",
}

_STX, _ETX, _EOT, _ENQ, _ETB = 0x02, 0x03, 0x04, 0x05, 0x17
MAX_ASTM_FRAME = 64_000 + 8  # PROTOCOLS 17: at most 63,993 text characters per frame


# --------------------------------------------------------------------------- reading


@dataclass
class Connection:
    """One captured connection: its number, peer and the bytes of one direction."""

    conn: int
    peer: str
    data: bytearray = field(default_factory=bytearray)


def connections(records: Iterable[CaptureRecord], direction: str) -> list[Connection]:
    """Each connection's bytes in ``direction``, connections in order of first appearance."""
    found: dict[int, Connection] = {}
    for record in records:
        entry = found.get(record.conn)
        if entry is None:
            entry = found[record.conn] = Connection(record.conn, record.peer)
        if record.dir == direction:
            entry.data += record.data
    return [c for c in found.values() if c.data]


def hl7_messages(data: bytes, max_message_size: int = 64 * 1024 * 1024) -> list[bytes]:
    """The MLLP blocks in a captured byte stream (commit blocks and torn blocks left out)."""
    from engine.errors import RemoteProtocolError
    from engine.protocols.mllp import MLLPCommit, MLLPFramer

    framer = MLLPFramer(max_message_size=max_message_size,
                        max_buffer_size=len(data) + max_message_size)
    framer.receive_data(data)
    messages: list[bytes] = []
    while True:
        try:
            event = framer.next_message()
        except RemoteProtocolError:
            continue  # an abandoned or oversized block was not a message the engine took
        if event is None:
            return messages
        if not isinstance(event, MLLPCommit):
            messages.append(event)


def astm_sessions(data: bytes) -> list[list[bytes]]:
    """ENQ ... EOT sessions of whole frames (``STX ... ETX|ETB C1 C2 CR LF``).

    A frame sent again with the same frame number replaces the earlier copy: the sender
    repeats a frame only after a NAK (PROTOCOLS 30), so the last copy is the one the
    receiver took. A session cut off before its EOT keeps the frames that arrived.
    """
    sessions: list[list[bytes]] = []
    current: list[bytes] | None = None
    pos, end = 0, len(data)
    while pos < end:
        byte = data[pos]
        if byte == _ENQ:
            if current:
                sessions.append(current)
            current = []
            pos += 1
        elif byte == _EOT:
            if current:
                sessions.append(current)
            current = None
            pos += 1
        elif byte == _STX:
            stop = pos + 1
            while stop < end and data[stop] not in (_ETX, _ETB, _STX) \
                    and stop - pos < MAX_ASTM_FRAME:
                stop += 1
            if stop >= end or data[stop] not in (_ETX, _ETB):
                pos = stop  # a torn frame: the receiver NAKed or never saw it whole
                continue
            stop += 1  # the terminator
            stop = min(stop + 2, end)  # checksum characters
            for trailer in (b"\r", b"\n"):
                if data[stop:stop + 1] == trailer:
                    stop += 1
            frame = bytes(data[pos:stop])
            if current is None:
                current = []  # frames without an ENQ: a capture started mid-session
            if current and len(frame) > 1 and len(current[-1]) > 1 \
                    and current[-1][1] == frame[1]:
                current[-1] = frame  # a retransmission (same FN) replaces the NAKed copy
            else:
                current.append(frame)
            pos = stop
        else:
            pos += 1  # ACK/NAK/noise between frames
    if current:
        sessions.append(current)
    return sessions


def detect_protocol(data: bytes) -> str:
    if b"\x0b" in data and b"\x1c" in data:
        return "hl7"
    if data[:1] in (b"\x05", b"\x02") or b"\x05" in data:
        return "astm"
    raise click.ClickException(
        "cannot tell whether this capture is HL7 (MLLP) or ASTM; give --interface-protocol"
    )


# --------------------------------------------------------------------------- show


def render_bytes(data: bytes) -> list[str]:
    """Text with control characters spelled out, one line per CR / LF / CR LF."""
    lines: list[str] = []
    current: list[str] = []
    for index, byte in enumerate(data):
        name = CONTROL_NAMES.get(byte)
        if name is not None:
            current.append(name)
        elif byte < 0x20 or byte == 0x7F:
            current.append(f"<0x{byte:02X}>")
        else:
            current.append(chr(byte))  # latin-1: every byte shows as one character
        next_byte = data[index + 1] if index + 1 < len(data) else None
        if byte == 0x0A or (byte == 0x0D and next_byte != 0x0A):
            lines.append("".join(current))
            current = []
    if current:
        lines.append("".join(current))
    return lines


def show_lines(records: Iterable[CaptureRecord]) -> Iterable[str]:
    for record in records:
        head = f"{record.t}  conn {record.conn}  {record.peer}  "
        if record.dir == "open":
            yield head + "connection opened"
        elif record.dir == "close":
            yield head + f"connection closed ({record.reason or 'no reason given'})"
        else:
            arrow = "in  <-" if record.dir == "in" else "out ->"
            yield head + f"{arrow} {len(record.data)} bytes"
            for line in render_bytes(record.data):
                yield "    " + line


@click.group("capture")
def capture_group() -> None:
    """Read raw-byte captures of interfaces (capture: true).

    \b
    Example:
      labrelay capture show captures/chem-hl7-20250303.jsonl --conn 4
    """


@capture_group.command("show")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--conn", "conn", type=int, default=None, help="Only this connection number.")
def capture_show(file: Path, conn: int | None) -> None:
    """Print a capture FILE as a timeline: time, connection, peer, direction, bytes.

    "in <-" is what the analyzer sent, "out ->" what labrelay answered. Control characters
    are shown as <STX> <ETX> <ETB> <ENQ> <ACK> <NAK> <EOT> <VT> <FS> <CR> <LF>, others
    as <0xNN>; a new line starts after each CR or LF.

    \b
    Example:
      labrelay capture show captures/chem-hl7-20250303.jsonl --conn 4
    """
    click.echo(PHI_WARNING.format(path=file), err=True)
    try:
        for line in show_lines(read_capture(file, conn=conn)):
            click.echo(line)
    except CaptureFormatError as exc:
        raise click.ClickException(str(exc)) from exc


# --------------------------------------------------------------------------- replay


def _replay_hl7(reactor: Any, host: str, port: int, conns: Sequence[Connection],
                timeout: float, lines: list[str], tls_options: Any = None) -> Any:
    from twisted.internet import defer

    from engine.adapters.mllp import send_messages

    @defer.inlineCallbacks
    def run() -> Any:
        failures = 0
        for connection in conns:
            messages = hl7_messages(bytes(connection.data))
            if not messages:
                lines.append(f"conn {connection.conn}: no whole MLLP message in the capture")
                continue
            results = yield send_messages(reactor, host, port, messages, timeout=timeout,
                                          tls_options=tls_options)
            labels = [f"conn {connection.conn} #{n}" for n in range(1, len(results) + 1)]
            lines.extend(result_lines(labels, results))
            failures += sum(0 if result.ok else 1 for result in results)
            failures += max(0, len(messages) - len(results))
        return failures

    return run()


def _replay_astm(reactor: Any, host: str, port: int, conns: Sequence[Connection],
                 timeout: float, listen_after: float, lines: list[str],
                 tls_options: Any = None) -> Any:
    from twisted.internet import defer

    from engine.adapters.astm_send import send_astm

    @defer.inlineCallbacks
    def run() -> Any:
        failures = 0
        for connection in conns:
            sessions = astm_sessions(bytes(connection.data))
            if not sessions:
                lines.append(f"conn {connection.conn}: no whole ASTM frame in the capture")
                continue
            report = yield send_astm(reactor, sessions, host=host, port=port,
                                     timeout=timeout, listen_after=listen_after,
                                     tls_options=tls_options)
            label = f"conn {connection.conn}"
            for frame in report.frames:
                lines.append(f"{label} session {frame.session + 1} frame {frame.frame + 1} "
                             f"FN {frame.fn} {frame.answer}")
            for index, reason in sorted(report.failed.items()):
                lines.append(f"{label} session {index + 1} NOT ACCEPTED: {reason}")
            lines.extend(answer_lines(report.received, prefix=f"{label} "))
            if report.error:
                lines.append(f"{label} error: {report.error}")
            if report.error or report.failed or len(report.completed) != len(sessions):
                failures += 1
        return failures

    return run()


@click.command("replay")
@click.argument("capture_file", metavar="CAPTURE.jsonl",
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--to", "to", required=True, help="Where to send, HOST:PORT.")
@click.option("--interface-protocol", "protocol", type=click.Choice(["hl7", "astm"]),
              default=None, help="hl7 or astm (default: recognised from the bytes).")
@click.option("--direction", type=click.Choice(["in", "out"]), default="in", show_default=True,
              help="in: what the analyzer sent (to replay into an engine); out: what labrelay "
                   "sent (e.g. orders, to replay to an analyzer simulator).")
@click.option("--conn", "conn", type=int, default=None, help="Only this connection number.")
@click.option("--timeout", type=click.FloatRange(min=0.5), default=30.0, show_default=True,
              help="Seconds to wait for each answer (HL7) / for each connection (ASTM).")
@click.option("--listen-after", "listen_after", type=click.FloatRange(min=0.0), default=1.0,
              show_default=True, help="ASTM: seconds to stay on the line for answers.")
@tls_click_options
def replay(capture_file: Path, to: str, protocol: str | None, direction: str,
           conn: int | None, timeout: float, listen_after: float, tls: bool,
           ca_file: str | None, cert_file: str | None, key_file: str | None) -> None:
    """Send the bytes of a capture again, per connection in order, as whole messages.

    HL7: every MLLP block is sent again and its ACK printed. ASTM: every ENQ..EOT session
    is sent again frame by frame, exactly as captured, and each frame's answer printed.
    Exits 1 if anything was not accepted. A capture of a TLS interface holds the plain
    bytes; --tls (with --ca, and --cert/--key for mutual TLS) sends them over TLS again.

    \b
    Examples:
      labrelay replay captures/chem-hl7-20250303.jsonl --to 127.0.0.1:12575
      labrelay replay captures/chem-hl7-20250303.jsonl --to 127.0.0.1:12576 --tls --ca ca.pem
    """
    host, port = parse_target(to)
    secure = tls_options(host, tls, ca_file, cert_file, key_file)
    click.echo(PHI_WARNING.format(path=capture_file), err=True)
    try:
        conns = connections(read_capture(capture_file, conn=conn), direction)
    except CaptureFormatError as exc:
        raise click.ClickException(str(exc)) from exc
    if not conns:
        which = f" of connection {conn}" if conn is not None else ""
        raise click.ClickException(f"{capture_file}: no '{direction}' bytes{which} to replay")
    kind = protocol or detect_protocol(b"".join(bytes(c.data) for c in conns))

    from twisted.internet import task

    lines: list[str] = []
    outcome: dict[str, int] = {}

    def main(reactor: Any) -> Any:
        if kind == "hl7":
            d = _replay_hl7(reactor, host, port, conns, timeout, lines, secure)
        else:
            d = _replay_astm(reactor, host, port, conns, timeout, listen_after, lines, secure)
        d.addCallback(lambda failures: outcome.update(failures=failures))
        return d

    try:
        task.react(main)
    except SystemExit as exc:
        if exc.code not in (0, None):
            for line in lines:
                click.echo(line)
            raise click.ClickException("replay failed; see the messages above") from exc
    for line in lines:
        click.echo(line)
    if outcome.get("failures", 1):
        sys.exit(1)


def register(group: click.Group) -> None:
    group.add_command(replay)
    group.add_command(capture_group)
