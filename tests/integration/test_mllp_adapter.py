"""The MLLP Twisted adapters: real TCP on 127.0.0.1, and Twisted's in-memory transport with
task.Clock for time (PROTOCOLS 75-78, 83-89)."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Generator
from pathlib import Path
from typing import Any

import hl7.client
from structlog.testing import capture_logs
from twisted.internet import defer, task, threads, utils
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from drivers.hl7.ack import build_ack
from drivers.hl7.parser import parse_message
from engine.adapters.mllp import (
    AckResult,
    MLLPClientProtocol,
    MLLPServerFactory,
    MLLPServerProtocol,
    send_messages,
)
from engine.errors import StorageError
from engine.protocols.mllp import COMMIT_ACK, COMMIT_NAK, MLLPFramer, frame

TS = "20240101120000"
reactor: Any = _reactor  # zope interfaces are opaque to mypy


def oru(control_id: str) -> bytes:
    return (
        f"MSH|^~\\&|CHEM1|LAB|LIS|HOSP|20240101115959||ORU^R01^ORU_R01|{control_id}|P|2.5\r"
        f"OBR|1||S-{control_id}|GLU\rOBX|1|NM|GLU||5.4|mmol/L\r"
    ).encode()


class MemoryHandler:
    """In-memory pipeline stand-in: records messages, answers AA (or what a test asks)."""

    def __init__(self, *, manual: bool = False, fail: bool = False) -> None:
        self.received: list[tuple[bytes, str, str]] = []
        self.pending: list[Deferred[Any]] = []
        self.manual = manual
        self.fail = fail

    def message_received(self, raw: bytes, peer: str, interface: str) -> Deferred[Any]:
        self.received.append((raw, peer, interface))
        if self.fail:
            return defer.fail(StorageError("database is down"))
        message = parse_message(raw)
        ack = None if message.message_type == "ACK" else build_ack(message, "AA", "A1", TS)
        if self.manual:
            d: Deferred[Any] = Deferred()
            self.pending.append(d)
            d.addCallback(lambda _: ack)
            return d
        return defer.succeed(ack)


def _ack_control_ids(data: bytes) -> list[str]:
    framer = MLLPFramer()
    framer.receive_data(data)
    out = []
    while (event := framer.next_message()) is not None:
        assert isinstance(event, bytes)
        msa = parse_message(event).segment("MSA")
        assert msa is not None
        out.append(f"{msa.field(1)}:{msa.field(2)}")
    return out


# ===================================================================== real sockets


class RealSocketTests(unittest.TestCase):
    timeout = 20

    def listen(self, factory: Factory) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    @defer.inlineCallbacks
    def test_python_hl7_client_gets_ack(self) -> Generator[Deferred[Any], Any, None]:
        # PROTOCOLS 75, 83, 85: a real, independent client (python-hl7) over a real socket.
        handler = MemoryHandler()
        factory = MLLPServerFactory(handler, "chem1", idle_timeout=None)
        port = self.listen(factory)

        def send() -> bytes:
            with hl7.client.MLLPClient("127.0.0.1", port) as client:
                return bytes(client.send_message(oru("C77")))

        reply = yield threads.deferToThread(send)
        assert reply.startswith(b"\x0b") and reply.endswith(b"\x1c\x0d")
        ack = parse_message(reply[1:-2])
        msa = ack.segment("MSA")
        assert msa is not None and msa.field(1) == "AA" and msa.field(2) == "C77"
        assert handler.received[0][0] == oru("C77")
        assert handler.received[0][1].startswith("127.0.0.1:")
        assert handler.received[0][2] == "chem1"

    @defer.inlineCallbacks
    def test_send_messages_waits_for_each_ack(self) -> Generator[Deferred[Any], Any, None]:
        handler = MemoryHandler()
        port = self.listen(MLLPServerFactory(handler, "chem1", idle_timeout=None))
        results = yield send_messages(reactor, "127.0.0.1", port, [oru("1"), oru("2"), oru("3")])
        assert [(r.control_id, r.code, r.ok) for r in results] == [
            ("1", "AA", True),
            ("2", "AA", True),
            ("3", "AA", True),
        ]
        assert [parse_message(r[0]).control_id for r in handler.received] == ["1", "2", "3"]

    @defer.inlineCallbacks
    def test_client_reframes_ack_split_over_reads(self) -> Generator[Deferred[Any], Any, None]:
        # The classic bug: one recv() rarely holds one whole ACK. This server writes the ACK
        # in 3-byte pieces, with noise before it and a second block right behind it.
        class Dribble(Protocol):
            def dataReceived(self, data: bytes) -> None:
                framer = MLLPFramer()
                framer.receive_data(data)
                raw = framer.next_message()
                if not isinstance(raw, bytes):
                    return
                message = parse_message(raw)
                other = frame(build_ack(message, "AA", "X", TS).replace(b"|AA|", b"|AA|zz"))
                ack = frame(build_ack(message, "AE", "A9", TS, text="held: unknown sample"))
                stream = b"\r\n" + other + ack
                for i in range(0, len(stream), 3):
                    write: Any = self.transport
                    reactor.callLater(0.001 * i, write.write, stream[i : i + 3])

        port = self.listen(Factory.forProtocol(Dribble))
        results = yield send_messages(reactor, "127.0.0.1", port, [oru("55")], timeout=10)
        assert results == [AckResult("55", code="AE", text="held: unknown sample")]
        assert not results[0].ok

    @defer.inlineCallbacks
    def test_allowlist_refuses_peer(self) -> Generator[Deferred[Any], Any, None]:
        handler = MemoryHandler()
        factory = MLLPServerFactory(handler, "chem1", allowlist=["10.9.0.0/16"], idle_timeout=None)
        port = self.listen(factory)
        with capture_logs() as logs:
            data = yield threads.deferToThread(_connect_send_read, port, frame(oru("1")))
        assert data == b""  # closed at once, nothing answered
        assert handler.received == []
        refused = [e for e in logs if e["event"] == "mllp.connection.refused"]
        assert refused and "allowlist" in refused[0]["reason"]
        assert refused[0]["interface"] == "chem1"

    @defer.inlineCallbacks
    def test_allowlist_admits_loopback(self) -> Generator[Deferred[Any], Any, None]:
        handler = MemoryHandler()
        factory = MLLPServerFactory(handler, "chem1", allowlist=["127.0.0.1"], idle_timeout=None)
        port = self.listen(factory)
        results = yield send_messages(reactor, "127.0.0.1", port, [oru("5")])
        assert results[0].ok

    @defer.inlineCallbacks
    def test_connection_limit(self) -> Generator[Deferred[Any], Any, None]:
        handler = MemoryHandler()
        factory = MLLPServerFactory(handler, "chem1", max_connections=1, idle_timeout=None)
        port = self.listen(factory)
        first = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.addCleanup(first.close)
        # wait until the server has accepted the first connection
        for _ in range(200):
            if factory.connections:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        assert len(factory.connections) == 1
        with capture_logs() as logs:
            data = yield threads.deferToThread(_connect_send_read, port, frame(oru("2")))
        assert data == b""
        assert any(e["event"] == "mllp.connection.refused" and "limit" in e["reason"] for e in logs)

    @defer.inlineCallbacks
    def test_connection_refused_reported_per_message(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        # Find a port nobody listens on: bind, note it, close.
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        results = yield send_messages(reactor, "127.0.0.1", port, [oru("1"), oru("2")], timeout=5)
        assert [r.control_id for r in results] == ["1", "2"]
        assert all(r.error and "cannot connect" in r.error for r in results)


class SendHl7CommandTests(unittest.TestCase):
    """`send_hl7` run as a real process against a real listener (the reactor cannot be run
    twice in the test process, so the command runs in a child)."""

    timeout = 60

    @defer.inlineCallbacks
    def test_send_hl7_prints_one_line_per_message(self) -> Generator[Deferred[Any], Any, None]:
        class Mixed(MemoryHandler):
            def message_received(self, raw: bytes, peer: str, interface: str) -> Deferred[Any]:
                message = parse_message(raw)
                code = "AE" if message.control_id == "2" else "AA"
                return defer.succeed(build_ack(message, code, "Z", TS, text="held"))

        port = reactor.listenTCP(0, MLLPServerFactory(Mixed(), "x"), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        folder = Path(tempfile.mkdtemp(prefix="labrelay-send-hl7-"))
        self.addCleanup(shutil.rmtree, folder, True)
        path = folder / "two.hl7"
        path.write_bytes(oru("1") + b"\n" + oru("2").replace(b"\r", b"\n"))
        code = "from engine.cli.send_hl7 import send_hl7; send_hl7()"
        out, err, status = yield utils.getProcessOutputAndValue(
            sys.executable,
            ["-c", code, "--to", f"127.0.0.1:{port.getHost().port}", "--timeout", "10", str(path)],
            env=dict(os.environ),
            path=str(Path(__file__).resolve().parents[2]),
        )
        lines = out.decode().splitlines()
        assert lines == [f"{path}#1 1 AA held", f"{path}#2 2 AE held"], (out, err)
        assert status == 1


def _connect_send_read(port: int, payload: bytes) -> bytes:
    """Blocking helper run in a thread: send, then read until the server closes (bounded)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(payload)
        except OSError:
            return b""
        chunks = []
        try:
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
        return b"".join(chunks)


# ===================================================================== in-memory transport


def connect(factory: MLLPServerFactory, host: str = "127.0.0.1") -> tuple[Any, StringTransport]:
    proto = factory.buildProtocol(IPv4Address("TCP", host, 40001))
    assert proto is not None
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40001))
    proto.makeConnection(transport)
    return proto, transport


def test_messages_handled_strictly_in_order() -> None:
    handler = MemoryHandler(manual=True)
    proto, transport = connect(MLLPServerFactory(handler, "chem1", clock=task.Clock()))
    proto.dataReceived(frame(oru("1")) + frame(oru("2")))
    # the second message waits until the first is answered
    assert len(handler.received) == 1
    assert transport.producerState == "paused"
    handler.pending[0].callback(None)
    assert len(handler.received) == 2
    assert _ack_control_ids(transport.value()) == ["AA:1"]
    handler.pending[1].callback(None)
    assert _ack_control_ids(transport.value()) == ["AA:1", "AA:2"]
    assert transport.producerState == "producing"


def test_message_split_byte_by_byte() -> None:
    handler = MemoryHandler()
    proto, transport = connect(MLLPServerFactory(handler, "chem1", clock=task.Clock()))
    for byte in frame(oru("9")):
        proto.dataReceived(bytes([byte]))
    assert _ack_control_ids(transport.value()) == ["AA:9"]


def test_idle_timeout_with_clock() -> None:
    clock = task.Clock()
    factory = MLLPServerFactory(MemoryHandler(), "chem1", idle_timeout=30, clock=clock)
    proto, transport = connect(factory)
    with capture_logs() as logs:
        clock.advance(29)
        proto.dataReceived(b"\r\n")  # any traffic resets the idle timer
        clock.advance(29)
        assert not transport.disconnecting
        clock.advance(2)
    assert transport.disconnecting
    assert any(e["event"] == "mllp.connection.idle_timeout" for e in logs)


def test_idle_timer_paused_while_handler_works() -> None:
    clock = task.Clock()
    handler = MemoryHandler(manual=True)
    proto, transport = connect(MLLPServerFactory(handler, "chem1", idle_timeout=5, clock=clock))
    proto.dataReceived(frame(oru("1")))
    clock.advance(60)  # slow database: the connection stays open
    assert not transport.disconnecting
    handler.pending[0].callback(None)
    clock.advance(6)
    assert transport.disconnecting


def test_storage_failure_sends_nothing_positive_r1() -> None:
    handler = MemoryHandler(fail=True)
    proto, transport = connect(MLLPServerFactory(handler, "chem1", clock=task.Clock()))
    with capture_logs() as logs:
        proto.dataReceived(frame(oru("1")))
    assert transport.value() == b""
    failed = [e for e in logs if e["event"] == "mllp.handler.failed"]
    assert failed and failed[0]["error"] == "StorageError"


def test_r2_commit_ack_then_ack() -> None:
    # PROTOCOLS 78: release 2: commit ACK block, then the HL7 ACK.
    factory = MLLPServerFactory(MemoryHandler(), "chem1", mllp_release=2, clock=task.Clock())
    proto, transport = connect(factory)
    proto.dataReceived(frame(oru("4")))
    assert transport.value().startswith(COMMIT_ACK)
    assert _ack_control_ids(transport.value()[len(COMMIT_ACK) :]) == ["AA:4"]


def test_r2_storage_failure_commit_nak() -> None:
    factory = MLLPServerFactory(
        MemoryHandler(fail=True), "chem1", mllp_release=2, clock=task.Clock()
    )
    proto, transport = connect(factory)
    proto.dataReceived(frame(oru("4")))
    assert transport.value() == COMMIT_NAK


def test_never_acknowledge_an_ack() -> None:
    # PROTOCOLS 89: even if the pipeline returned a reply, an incoming ACK is not answered.
    class Echo(MemoryHandler):
        def message_received(self, raw: bytes, peer: str, interface: str) -> Deferred[Any]:
            return defer.succeed(build_ack(parse_message(raw), "AA", "Z", TS))

    proto, transport = connect(MLLPServerFactory(Echo(), "chem1", clock=task.Clock()))
    incoming = build_ack(parse_message(oru("3")), "AA", "X", TS)
    with capture_logs() as logs:
        proto.dataReceived(frame(incoming))
    assert transport.value() == b""
    assert any(e["event"] == "mllp.ack.suppressed" for e in logs)


def test_enhanced_mode_two_acks_in_order() -> None:
    class TwoAcks(MemoryHandler):
        def message_received(self, raw: bytes, peer: str, interface: str) -> Deferred[Any]:
            message = parse_message(raw)
            return defer.succeed(
                [build_ack(message, "CA", "1", TS), build_ack(message, "AA", "2", TS)]
            )

    proto, transport = connect(MLLPServerFactory(TwoAcks(), "chem1", clock=task.Clock()))
    proto.dataReceived(frame(oru("8")))
    assert _ack_control_ids(transport.value()) == ["CA:8", "AA:8"]


def test_oversized_message_dropped_and_logged() -> None:
    handler = MemoryHandler()
    factory = MLLPServerFactory(handler, "chem1", max_message_size=50, clock=task.Clock())
    proto, transport = connect(factory)
    with capture_logs() as logs:
        proto.dataReceived(frame(oru("1")))
    assert handler.received == []
    assert transport.value() == b""
    assert transport.disconnecting
    assert any(e["event"] == "mllp.message.too_large" for e in logs)


def test_connection_bookkeeping() -> None:
    factory = MLLPServerFactory(MemoryHandler(), "chem1", max_connections=1, clock=task.Clock())
    proto, _ = connect(factory)
    assert factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2)) is None
    proto.connectionLost()
    assert isinstance(factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2)), MLLPServerProtocol)


def test_allowlist_cidr_and_bad_entry() -> None:
    factory = MLLPServerFactory(
        MemoryHandler(), "x", allowlist=["192.0.2.0/24", "::1"], clock=task.Clock()
    )
    assert factory.peer_allowed("192.0.2.77")
    assert factory.peer_allowed("::1")
    assert not factory.peer_allowed("198.51.100.1")
    assert not factory.peer_allowed("not-an-ip")
    try:
        MLLPServerFactory(MemoryHandler(), "x", allowlist=["nonsense"], clock=task.Clock())
    except ValueError as exc:
        assert "CIDR" in str(exc)
    else:
        raise AssertionError("a bad allowlist entry must be refused")


def test_client_timeout_with_clock() -> None:
    clock = task.Clock()
    proto = MLLPClientProtocol([oru("1"), oru("2")], timeout=30, clock=clock)
    transport = StringTransport()
    proto.makeConnection(transport)
    assert transport.value() == frame(oru("1"))
    clock.advance(31)
    results = proto.finished.result
    assert isinstance(results, list)
    assert results[0].error == "no ACK within 30 s"
    assert results[1].error is not None and results[1].error.startswith("not sent")
    assert transport.disconnecting


def test_client_waits_for_application_ack_after_commit() -> None:
    clock = task.Clock()
    message = oru("7").replace(b"|P|2.5\r", b"|P|2.5|||AL|AL\r")
    proto = MLLPClientProtocol([message], timeout=30, clock=clock)
    proto.makeConnection(StringTransport())
    parsed = parse_message(message)
    proto.dataReceived(frame(build_ack(parsed, "CA", "a", TS)))
    assert not proto.finished.called
    proto.dataReceived(frame(build_ack(parsed, "AA", "b", TS)))
    assert proto.finished.result == [AckResult("7", code="AA")]


def test_logs_carry_no_patient_data() -> None:
    handler = MemoryHandler()
    proto, _ = connect(MLLPServerFactory(handler, "chem1", clock=task.Clock()))
    stdlib = logging.getLogger("engine.adapters.mllp")
    stdlib.setLevel(logging.DEBUG)  # the line of a positive ACK is a debug line
    try:
        with capture_logs() as logs:
            proto.dataReceived(frame(oru("1")))
    finally:
        stdlib.setLevel(logging.NOTSET)
    text = repr(logs)
    assert "5.4" not in text and "S-1" not in text
    assert any(e["event"] == "mllp.ack.sent" and e["control_id"] == "A1" for e in logs)


def test_positive_ack_is_not_an_info_line_but_a_negative_one_is() -> None:
    class Refusing(MemoryHandler):
        def message_received(self, raw: bytes, peer: str, interface: str) -> Deferred[Any]:
            return defer.succeed(build_ack(parse_message(raw), "AE", "unknown specimen", TS))

    for handler, expected in ((MemoryHandler(), []), (Refusing(), ["AE"])):
        proto, _ = connect(MLLPServerFactory(handler, "chem1", clock=task.Clock()))
        with capture_logs() as logs:
            proto.dataReceived(frame(oru("1")))
        sent = [e for e in logs if e["event"] == "mllp.ack.sent" and e["log_level"] == "info"]
        assert [e["ack_code"] for e in sent] == expected


def test_reply_bug_drops_connection_instead_of_stalling() -> None:
    class Broken(MemoryHandler):
        def message_received(self, raw: bytes, peer: str, interface: str) -> Deferred[Any]:
            return defer.succeed(12345)  # not bytes: a pipeline bug

    proto, transport = connect(MLLPServerFactory(Broken(), "chem1", clock=task.Clock()))
    with capture_logs() as logs:
        proto.dataReceived(frame(oru("1")))
    assert transport.disconnecting
    assert any(e["event"] == "mllp.adapter.error" for e in logs)
