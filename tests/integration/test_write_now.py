"""engine.adapters._write.write_now on real TCP connections on 127.0.0.1: a reply leaves
in the same reactor turn, never overtakes bytes already queued, and what the socket does
not take goes through the transport as before; anything but plain TCP (TLS, capture
wrapper, serial, test transports) is handed to ``transport.write`` unchanged."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from engine.adapters._write import write_now
from tests.integration.reactor_turns import turns

reactor: Any = _reactor


class Collect(Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.ready: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.ready.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.data += data




class WriteNowTests(unittest.TestCase):
    async def connect(self) -> tuple[Any, Collect]:
        servers: list[Collect] = []

        def build(_addr: Any) -> Collect:
            servers.append(Collect())
            return servers[-1]

        factory = Factory.forProtocol(Collect)
        factory.buildProtocol = build
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = Collect()
        client_factory = ClientFactory.forProtocol(lambda: client)
        connector = reactor.connectTCP("127.0.0.1", port.getHost().port, client_factory)
        self.addCleanup(connector.disconnect)
        await client.ready
        await turns(lambda: bool(servers))
        return servers[0].transport, client

    async def test_a_reply_leaves_at_once(self) -> None:
        transport, client = await self.connect()
        write_now(transport, b"\x06")
        # nothing waits in Twisted's buffer for the next reactor turn: it was sent
        assert transport.dataBuffer == b"" and not transport._tempDataBuffer
        await turns(lambda: bytes(client.data) == b"\x06")

    async def test_bytes_already_queued_go_first(self) -> None:
        transport, client = await self.connect()
        transport.write(b"first ")
        write_now(transport, b"second")
        await turns(lambda: len(client.data) >= 12)
        assert bytes(client.data) == b"first second"

    async def test_what_the_socket_does_not_take_is_queued_in_order(self) -> None:
        transport, client = await self.connect()
        big = bytes(range(256)) * 40_000  # ~10 MB: more than the socket buffers hold
        write_now(transport, big)
        assert transport._tempDataBuffer or transport.dataBuffer  # the rest was queued
        write_now(transport, b"tail")
        await turns(lambda: len(client.data) >= len(big) + 4, limit=20_000)
        assert bytes(client.data) == big + b"tail"

    def test_other_transports_get_write(self) -> None:
        transport = StringTransport()
        write_now(transport, b"\x06")
        write_now(transport, b"\x15")
        assert transport.value() == b"\x06\x15"
