"""ASTM into the running engine (`labrelay run`): corpus sessions over TCP land in the
database, a bad checksum is NAKed and the retransmission accepted, a host query gets the
ordered tests, and the same engine reads an RS-232 line through a real pty.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import tty
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from engine.cli import main as cli
from engine.protocols.astm_link import checksum
from lis_bridge.db import make_engine, session_factory
from lis_bridge.models import MessageStatus, RawMessage, Result, Sample
from tests.conftest import CORPUS
from tests.integration.enginerun import REPO, free_port, running_engine

pytestmark = pytest.mark.slow

ENQ, ACK, NAK, EOT, STX, ETX = b"\x05", b"\x06", b"\x15", b"\x04", b"\x02", b"\x03"
ROCHE_SPECIMEN = "CL-PL-24-0370"  # corpus roche_cobas_c311__1 (SOURCES.md)


def write_config(tmp_path: Path, transport: str) -> Path:
    config = tmp_path / "astm.yaml"
    config.write_text(
        f"""
database: sqlite:///unused.db
interfaces:
  - name: e2e-astm
    protocol: astm
    driver: astm-generic
    mapping: {REPO / 'mappings' / 'roche_cobas_c311.yaml'}
    transport:
      {transport}
reports:
  output_dir: {tmp_path / 'reports'}
  signing_key: e2e-signing-key-0123456789abcdef
"""
    )
    return config


def orders(db_url: str, tmp_path: Path, rows: list[str], receive: list[str]) -> None:
    csv = tmp_path / "orders.csv"
    csv.write_text(
        "specimen_id,patient_id,patient_name,sex,birth_date,tests,collected_at,location\n"
        + "\n".join(rows) + "\n"
    )
    runner = CliRunner()
    result = runner.invoke(cli, ["orders", "import", str(csv), "--database", db_url])
    assert result.exit_code == 0, result.output
    if receive:
        result = runner.invoke(cli, ["samples", "receive", *receive, "--location", "Lab",
                                     "--by", "tester", "--database", db_url])
        assert result.exit_code == 0, result.output


def send_astm(port: int, path: Path, listen_after: float = 0.5) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine", "send", "astm", "--to", f"127.0.0.1:{port}",
         "--listen-after", str(listen_after), str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )


def sessions_for(db_url: str) -> Callable[[], object]:
    return session_factory(make_engine(db_url))


def test_corpus_session_lands_in_database(db_url: str, tmp_path: Path) -> None:
    orders(db_url, tmp_path,
           [f"{ROCHE_SPECIMEN},PX-9,Roche Test,F,1970-01-01,ALT AST BILD LDH BILT GLU CREA,"
            "2024-01-01T08:00:00Z,Ward"], [ROCHE_SPECIMEN])
    port = free_port()
    with running_engine(write_config(tmp_path, f"listen: tcp:{port}:interface=127.0.0.1"),
                        db_url, tmp_path):
        done = send_astm(port, CORPUS / "astm" / "roche_cobas_c311__1.txt")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "ACK" in done.stdout
    with session_factory(make_engine(db_url))() as session:
        row = session.scalars(select(RawMessage)).one()
        assert row.status == MessageStatus.APPLIED, row.hold_detail
        sample = session.scalars(select(Sample).where(Sample.specimen_id == ROCHE_SPECIMEN)).one()
        rows = session.execute(
            select(Result.analyzer_code, Result.value_text, Result.comments)
            .where(Result.sample_fk == sample.id)
        ).tuples().all()
    # SOURCES.md: 685/ 22.4, 687/ 15.0, 712/ 4.1, 158/ 301, 735/ 1.6, 717/ 5.85, 690/ 34.
    # Shown values are rounded to the mapping's decimals; the analyzer's text is kept.
    expected = {"685/": "22.4", "687/": "15.0", "712/": "4.1", "158/": "301",
                "735/": "1.6", "717/": "5.85", "690/": "34"}
    assert {code for code, _v, _c in rows} == set(expected)
    for code, shown, comments in rows:
        assert shown == expected[code] or f"as sent by the analyzer: {expected[code]}" in comments


def _frame(fn: int, text: bytes) -> bytes:
    body = str(fn).encode() + text + ETX
    return STX + body + checksum(body) + b"\r\n"


def _reply(sock: socket.socket) -> bytes:
    data = sock.recv(1)
    assert data, "engine closed the line"
    return data


def test_bad_checksum_is_naked_and_retransmission_accepted(db_url: str, tmp_path: Path) -> None:
    """PROTOCOLS 19, 24, 30: a frame with a wrong checksum gets NAK; the same frame resent
    with the right checksum gets ACK, and the message is stored once."""
    orders(db_url, tmp_path, ["T-100,PX-1,A B,M,1980-01-01,NA,2024-01-01T08:00:00Z,Ward"],
           ["T-100"])
    text = (b"H|\\^&|||cobas c311^1|||||host|RSUPL^REAL|P|1\rP|1\r"
            b"O|1|T-100||^^^989/|R||||||N||||||||||||||F\r"
            b"R|1|^^^989/|140|mmol/l|||N||F||||20240101090000|P1\rL|1|N\r")
    good = _frame(1, text)
    bad = good[:-4] + (b"00" if good[-4:-2] != b"00" else b"01") + b"\r\n"
    port = free_port()
    config = write_config(tmp_path, f"listen: tcp:{port}:interface=127.0.0.1")
    with (
        running_engine(config, db_url, tmp_path),
        socket.create_connection(("127.0.0.1", port), timeout=20) as sock,
    ):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(ENQ)
        assert _reply(sock) == ACK
        sock.sendall(bad)
        assert _reply(sock) == NAK
        sock.sendall(good)
        assert _reply(sock) == ACK  # only after the message was committed (DESIGN rule 1)
        sock.sendall(EOT)
    with session_factory(make_engine(db_url))() as session:
        rows = session.scalars(select(RawMessage)).all()
        assert [r.status for r in rows] == [MessageStatus.APPLIED]
        assert session.scalar(select(func.count()).select_from(Result)) == 1


def test_host_query_gets_the_ordered_tests(db_url: str, tmp_path: Path) -> None:
    """PROTOCOLS 71-73: corpus roche_cobas_c311__2 asks for specimen 00002; the answer lists
    its ordered tests in analyzer codes; an unknown specimen is answered `L|1|I`."""
    orders(db_url, tmp_path, ["00002,PX-2,Q Test,F,1990-01-01,NA K GLU,2024-01-01T08:00:00Z,Ward"],
           [])
    port = free_port()
    with running_engine(write_config(tmp_path, f"listen: tcp:{port}:interface=127.0.0.1"),
                        db_url, tmp_path):
        done = send_astm(port, CORPUS / "astm" / "roche_cobas_c311__2.txt", listen_after=5)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "received" in done.stdout
        answer = done.stdout[done.stdout.index("received"):]
        assert "00002" in answer
        for code in ("989", "990", "717"):
            assert f"^^^{code}" in answer
    with session_factory(make_engine(db_url))() as session:
        out = session.scalars(select(RawMessage).where(RawMessage.direction == "out")).one()
        assert b"O|1|00002" in out.payload
        assert b"L|1" in out.payload


def test_serial_line_through_a_pty(db_url: str, tmp_path: Path) -> None:
    """PROTOCOLS 38-40: the same link layer over RS-232 (Twisted SerialPort on a real pty)."""
    orders(db_url, tmp_path, ["S-7,PX-7,S Test,M,1980-01-01,K,2024-01-01T08:00:00Z,Ward"], ["S-7"])
    master, slave = os.openpty()
    tty.setraw(master)
    device = os.ttyname(slave)
    config = write_config(tmp_path, f"serial: {{device: {device}, baudrate: 9600}}")
    text = (b"H|\\^&|||c311^1|||||host||P|1\rP|1\rO|1|S-7||^^^990/|R||||||N||||||||||||||F\r"
            b"R|1|^^^990/|4.2|mmol/l|||N||F||||20240101090000|P1\rL|1|N\r")
    try:
        with running_engine(config, db_url, tmp_path):
            os.set_blocking(master, False)

            def reply(timeout: float = 20.0) -> bytes:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    try:
                        data = os.read(master, 1)
                    except BlockingIOError:
                        time.sleep(0.005)  # polling a pty fd; bounded by the deadline
                        continue
                    if data in (ACK, NAK, EOT):
                        return data
                raise AssertionError("no reply on the serial line")

            os.write(master, ENQ)
            assert reply() == ACK
            os.write(master, _frame(1, text))
            assert reply() == ACK
            os.write(master, EOT)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                with session_factory(make_engine(db_url))() as session:
                    if session.scalar(select(func.count()).select_from(Result)) == 1:
                        break
                time.sleep(0.05)
    finally:
        os.close(master)
        os.close(slave)
    with session_factory(make_engine(db_url))() as session:
        row = session.scalars(select(RawMessage)).one()
        assert row.status == MessageStatus.APPLIED, row.hold_detail
        assert row.peer.startswith("serial")


def test_orders_pushed_to_a_connected_analyzer(db_url: str, tmp_path: Path) -> None:
    """The LIS downloads orders (PROTOCOLS 1, 12, 67): `labrelay orders push` makes the running
    engine send H P O L as the sender side of the link to the connected analyzer."""
    orders(db_url, tmp_path, ["PUSH-1,PX-3,P Test,F,1990-01-01,NA GLU,2024-01-01T08:00:00Z,Ward"],
           [])
    port, admin = free_port(), free_port()
    config = write_config(tmp_path, f"listen: tcp:{port}:interface=127.0.0.1")
    config.write_text(config.read_text() + f"admin:\n  listen: tcp:{admin}:interface=127.0.0.1\n"
                      "  token: push-token\n")
    with (
        running_engine(config, db_url, tmp_path) as engine,
        socket.create_connection(("127.0.0.1", port), timeout=20) as analyzer,
    ):
        engine.wait_for("astm.connection.opened")
        push = subprocess.run(
            [sys.executable, "-m", "engine", "orders", "push", "PUSH-1", "NOPE-9",
             "--interface", "e2e-astm", "--config", str(config)],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert "queued   PUSH-1" in push.stdout, push.stdout + push.stderr
        assert "skipped  NOPE-9: not in the LIS" in push.stdout
        assert _reply_any(analyzer) == ENQ  # the engine establishes the link
        analyzer.sendall(ACK)
        text = b""
        while True:
            data = _read_frame_or_eot(analyzer)
            if data == EOT:
                break
            text += data[2:data.index(ETX) if ETX in data else data.index(b"\x17")]
            analyzer.sendall(ACK)
        # stored before it was sent; SENT once the analyzer accepted every frame
        deadline = time.monotonic() + 20
        status = ""
        while time.monotonic() < deadline and status != "SENT":
            with session_factory(make_engine(db_url))() as session:
                status = session.scalars(select(RawMessage.status).where(
                    RawMessage.direction == "out", RawMessage.message_type == "ORDERS")).one()
            time.sleep(0.05)  # polling the database; bounded by the deadline
        assert status == "SENT"
    assert b"O|1|PUSH-1" in text
    assert b"^^^989" in text and b"^^^717" in text  # NA and GLU in Roche codes
    assert text.rstrip(b"\r").endswith(b"L|1|N")


def _reply_any(sock: socket.socket) -> bytes:
    data = sock.recv(1)
    assert data, "engine closed the line"
    return data


def _read_frame_or_eot(sock: socket.socket) -> bytes:
    buffer = b""
    while True:
        chunk = sock.recv(1)
        assert chunk, "engine closed the line"
        if not buffer and chunk == EOT:
            return EOT
        buffer += chunk
        if buffer.endswith(b"\r\n") and (ETX in buffer or b"\x17" in buffer):
            return buffer
