"""Capture files (rotation, day change, connection numbers, mode 0600), the capture
wrapper, and the replay helpers that re-extract messages from captured bytes."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from engine.capture import (
    CaptureFactory,
    CaptureFile,
    CaptureFormatError,
    read_capture,
)
from engine.cli.replay_cmd import astm_sessions, connections, hl7_messages, render_bytes
from engine.protocols.astm_link import checksum


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2025, 3, 3, 23, 59, 59, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def test_records_round_trip_and_file_is_private(tmp_path: Path) -> None:
    clock = Clock()
    capture = CaptureFile(tmp_path / "cap", "chem", now=clock)
    conn = capture.next_connection()
    capture.record("open", "10.0.0.1:1", conn)
    capture.record("in", "10.0.0.1:1", conn, b"\x0bMSH|\xff\r\x1c\r")
    capture.record("out", "10.0.0.1:1", conn, b"")
    capture.record("close", "10.0.0.1:1", conn, reason="done")
    capture.close()
    path = tmp_path / "cap" / "chem-20250303.jsonl"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "cap").stat().st_mode) == 0o700
    found = list(read_capture(path))
    assert [r.dir for r in found] == ["open", "in", "out", "close"]
    assert found[1].data == b"\x0bMSH|\xff\r\x1c\r"
    assert found[3].reason == "done"
    assert found[0].t == "2025-03-03T23:59:59.000000Z"


def test_existing_file_is_tightened_to_0600(tmp_path: Path) -> None:
    path = tmp_path / "chem-20250303.jsonl"
    path.write_text("")
    path.chmod(0o644)
    capture = CaptureFile(tmp_path, "chem", now=Clock())
    capture.record("in", "p", 1, b"x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_new_day_new_file_and_connection_numbers_go_on(tmp_path: Path) -> None:
    clock = Clock()
    capture = CaptureFile(tmp_path, "chem", now=clock)
    assert capture.next_connection() == 1
    capture.record("in", "p", 1, b"a")
    clock.now += timedelta(seconds=2)  # past midnight UTC
    assert capture.next_connection() == 2
    capture.record("in", "p", 2, b"b")
    capture.close()
    assert [r.data for r in read_capture(tmp_path / "chem-20250303.jsonl")] == [b"a"]
    assert [r.data for r in read_capture(tmp_path / "chem-20250304.jsonl")] == [b"b"]
    # after a restart the same day, numbering continues from the file
    again = CaptureFile(tmp_path, "chem", now=clock)
    assert again.next_connection() == 3


def test_rotation_keeps_old_files(tmp_path: Path) -> None:
    capture = CaptureFile(tmp_path, "chem", max_bytes=400, keep=2, now=Clock())
    for n in range(30):
        capture.record("in", "p", 1, bytes([65 + n % 26]) * 40)
    capture.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["chem-20250303.1.jsonl", "chem-20250303.2.jsonl", "chem-20250303.jsonl"]
    assert all(p.stat().st_size <= 400 for p in tmp_path.iterdir())
    # the newest rotated file holds the records just before the current file's
    last_rotated = list(read_capture(tmp_path / "chem-20250303.1.jsonl"))[-1]
    first_current = next(read_capture(tmp_path / "chem-20250303.jsonl"))
    assert ord(first_current.data[:1]) - ord(last_rotated.data[:1]) == 1


def test_unwritable_directory_does_not_raise(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    capture = CaptureFile(blocker / "cap", "chem", now=Clock())
    capture.record("in", "p", 1, b"x")  # logged, never raised: the interface keeps serving
    assert capture.failed_writes == 1


def test_reader_rejects_what_is_not_a_capture(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"dir": "in", "conn": 1, "b64": "!!"}\n')
    with pytest.raises(CaptureFormatError, match=r"bad.jsonl:1: b64 is not base64"):
        list(read_capture(path))
    path.write_text("MSH|^~\\&|\n")
    with pytest.raises(CaptureFormatError, match="not JSON"):
        list(read_capture(path))
    # a last line torn by a crash is skipped
    path.write_text('{"t":"x","dir":"in","peer":"p","conn":1,"b64":"QQ=="}\n{"t":"x","di')
    assert [r.data for r in read_capture(path)] == [b"A"]


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        transport: Any = self.transport  # zope interfaces are opaque to mypy
        transport.write(data.upper())


def test_wrapper_records_both_directions_and_keeps_refusals(tmp_path: Path) -> None:
    capture = CaptureFile(tmp_path, "chem", now=Clock())
    wrapped = CaptureFactory(Factory.forProtocol(Echo), capture)
    protocol = wrapped.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4242))
    assert protocol is not None
    transport = StringTransport()
    protocol.makeConnection(transport)
    for byte in b"abc":  # byte by byte
        protocol.dataReceived(bytes([byte]))
    protocol.connectionLost(Failure(ConnectionDone("gone")))
    assert transport.value() == b"ABC"
    found = list(read_capture(tmp_path / "chem-20250303.jsonl"))
    assert [(r.dir, r.data) for r in found[1:-1]] == [
        ("in", b"a"), ("out", b"A"), ("in", b"b"), ("out", b"B"), ("in", b"c"), ("out", b"C")]
    assert {r.peer for r in found} == {"127.0.0.1:4242"}
    assert found[-1].dir == "close" and "gone" in found[-1].reason

    class Refusing(Factory):
        def buildProtocol(self, addr: object) -> None:
            return None

    refused = CaptureFactory(Refusing(), capture)
    assert refused.buildProtocol(IPv4Address("TCP", "10.9.9.9", 1)) is None


def _frame(fn: int, text: bytes) -> bytes:
    body = str(fn).encode() + text + b"\x03"
    return b"\x02" + body + checksum(body) + b"\r\n"


def test_astm_sessions_keep_the_retransmitted_frame() -> None:
    good = _frame(1, b"H|\\^&\rL|1|N\r")
    bad = good[:-4] + b"00\r\n"
    second = _frame(2, b"H|\\^&\rL|1|N\r")
    # PROTOCOLS 30: the frame after a NAK carries the same FN; only the last copy counts
    stream = b"\x05" + bad + good + b"\x04" + b"\x05" + second + b"\x04"
    assert astm_sessions(stream) == [[good], [second]]
    # torn frame at the end is left out; frames without ENQ still count
    assert astm_sessions(good + b"\x02" + b"1H|") == [[good]]


def test_hl7_messages_skip_commits_and_torn_blocks() -> None:
    stream = b"\x0bMSH|1\r\x1c\r\x0b\x06\x1c\r\x0bMSH|half\x0bMSH|2\r\x1c\r\x0bMSH|torn"
    assert hl7_messages(stream) == [b"MSH|1\r", b"MSH|2\r"]


def test_connections_group_by_number_in_order(tmp_path: Path) -> None:
    capture = CaptureFile(tmp_path, "chem", now=Clock())
    capture.record("in", "a", 2, b"x1")
    capture.record("in", "b", 1, b"y1")
    capture.record("out", "a", 2, b"ack")
    capture.record("in", "a", 2, b"x2")
    result = connections(read_capture(tmp_path / "chem-20250303.jsonl"), "in")
    assert [(c.conn, c.peer, bytes(c.data)) for c in result] == [(2, "a", b"x1x2"),
                                                                  (1, "b", b"y1")]


def test_render_bytes_names_control_characters() -> None:
    data = b"\x05\x02" + b"1H|\\^&\r" + b"\x03A5\r\n\x04\x0bMSH\x1c\r\x06\x15\x17\x01"
    assert render_bytes(data) == [
        "<ENQ><STX>1H|\\^&<CR>",
        "<ETX>A5<CR><LF>",
        "<EOT><VT>MSH<FS><CR>",
        "<ACK><NAK><ETB><0x01>",
    ]
