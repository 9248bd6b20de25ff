"""Twisted adapter for ASTM E1381 / LIS01-A2 lines: TCP server, TCP client, RS-232.

One :class:`ASTMProtocol` joins the sans-I/O core :class:`engine.protocols.astm_link.ASTMLink`
to any transport (a TCP connection or a ``SerialPort``: PROTOCOLS 40, the link layer is
the same). It hands every received message to an :class:`ASTMHandler` (the pipeline);
the frame that completes the message is acknowledged only when the handler's Deferred
fires (DESIGN durability rule 1), and NAKed when it fails (rule 2). What the handler
returns (host-query answers) is queued on the same line, sent by us as sender once the
line is neutral (contention rules in the core).

Timers of the core are armed with the injectable ``clock`` (``IReactorTime``), so tests
drive the 15 / 20 / 30 s timers with ``task.Clock``.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from typing import Protocol as TypingProtocol

import structlog
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from engine.adapters._peers import host_allowed, parse_allowlist, peer_text
from engine.adapters._write import write_now
from engine.errors import LocalProtocolError
from engine.protocols.astm_link import (
    ASTMLink,
    Contention,
    DuplicateFrame,
    FrameAnswered,
    FrameRejected,
    Interrupted,
    LinkTimeout,
    MessageReceived,
    PeerRestarted,
    SendCompleted,
    SendFailed,
    SessionEnded,
    SessionStarted,
)

__all__ = [
    "ASTMFactory",
    "ASTMHandler",
    "ASTMProtocol",
    "SendNotDelivered",
    "make_client_service",
    "open_serial",
    "parse_allowlist",
]

log = structlog.get_logger(__name__)


class ASTMHandler(TypingProtocol):
    """What the adapter needs from the pipeline.

    ``message_received`` fires once the message is committed, with the outgoing
    messages (record text, CR-separated, e.g. a host-query answer) to queue on the line.
    An errback means storage failed: the completing frame is NAKed and the analyzer
    resends it (the message then arrives again).
    """

    def message_received(self, text: bytes, peer: str, interface: str) -> Deferred[list[bytes]]: ...


class SendNotDelivered(Exception):
    """An outgoing message was given up after its attempts (see the reason)."""


@dataclass
class _Outgoing:
    text: bytes
    done: Deferred[None] = field(default_factory=Deferred)


class ASTMProtocol(Protocol):
    """One ASTM line (a TCP connection or a serial port)."""

    factory: ASTMFactory

    def __init__(self, factory: ASTMFactory, peer: str) -> None:
        self.factory = factory
        self.peer = peer
        self.link = ASTMLink(**factory.link_options)
        self.clock: Any = factory.clock
        self.log = log.bind(interface=factory.interface_name, peer=peer)
        # Link-level events come a dozen per message; at INFO they are skipped before
        # structlog builds an event for them.
        self._debug = logging.getLogger(__name__).isEnabledFor(logging.DEBUG)
        self._timer: DelayedCall | None = None
        self._timer_at: float | None = None
        self._closed = False
        self._inbox: deque[MessageReceived] = deque()
        self._handling = False
        self._sending: dict[int, _Outgoing] = {}

    @property
    def _t(self) -> Any:
        # Twisted's zope interfaces are opaque to mypy (ITransport / SerialPort).
        return self.transport

    # ---------------------------------------------------------------- connection

    def connectionMade(self) -> None:
        self.factory.connections.add(self)
        # Replies are a few bytes (ACK, NAK, a short HL7 ACK): without TCP_NODELAY, Nagle
        # and the peer's delayed ACK add ~40 ms to every exchange.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        self.log.info("astm.connection.opened", connections=len(self.factory.connections))
        self.factory.connection_made(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self._cancel_timer()
        self.factory.connections.discard(self)
        if self.link.state.name != "NEUTRAL":
            self.log.warning("astm.connection.lost_mid_transfer", state=self.link.state.value)
        # Messages we had not delivered go back to the factory for the next connection.
        unsent = [self._sending[k] for k in sorted(self._sending)]
        self._sending.clear()
        self.factory.requeue(unsent)
        self.log.info("astm.connection.closed", reason=reason.getErrorMessage())

    # ---------------------------------------------------------------- I/O

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        self.link.receive_data(data, self.clock.seconds())
        self._pump()

    def send_message(self, text: bytes) -> Deferred[None]:
        """Queue a message for the analyzer (order download); fires when it is ACKed."""
        item = _Outgoing(text)
        self._queue_outgoing(item)
        return item.done

    def _queue_outgoing(self, item: _Outgoing) -> None:
        try:
            index = self.link.send_message(item.text, self.clock.seconds())
        except LocalProtocolError as exc:
            item.done.errback(Failure(exc))
            return
        self._sending[index] = item
        self._pump()

    def _pump(self) -> None:
        if self._closed:
            return
        out = self.link.data_to_send()
        if out:
            write_now(self.transport, out)
        while True:
            event = self.link.next_event()
            if event is None:
                break
            self._on_event(event)
        out = self.link.data_to_send()
        if out:
            write_now(self.transport, out)
        self._arm_timer()

    def _on_event(self, event: object) -> None:
        match event:
            case MessageReceived():
                # the pipeline logs each message's outcome (message.applied / held / ...)
                if not event.complete:
                    self.log.warning("astm.message.incomplete", size=len(event.text))
                elif self._debug:
                    self.log.debug("astm.message.received", size=len(event.text))
                self._inbox.append(event)
                self._next_message()
            case FrameRejected():
                self.log.warning("astm.frame.rejected", reason=event.reason, fn=event.fn)
            case DuplicateFrame():
                self.log.info("astm.frame.duplicate", fn=event.fn)
            case LinkTimeout():
                self.log.warning("astm.link.timeout", what=event.what)
            case PeerRestarted():
                self.log.warning("astm.peer.restarted", discarded_bytes=event.discarded_bytes)
            case Contention():
                self.log.info("astm.link.contention", we_yield=event.we_yield)
            case Interrupted():
                self.log.info("astm.send.interrupted", honoured=event.honoured)
            case SendCompleted():
                self.log.info("astm.send.completed", size=len(event.text))
                item = self._sending.pop(event.message_index, None)
                if item is not None and not item.done.called:
                    item.done.callback(None)
            case SendFailed():
                self.log.warning("astm.send.failed", reason=event.reason, final=event.final)
                if event.final:
                    item = self._sending.pop(event.message_index, None)
                    if item is not None and not item.done.called:
                        item.done.errback(Failure(SendNotDelivered(event.reason)))
            case SessionStarted() | SessionEnded() | FrameAnswered():
                if self._debug:
                    self.log.debug("astm.link.session", kind=type(event).__name__)

    # ---------------------------------------------------------------- handler

    def _next_message(self) -> None:
        # One message at a time, in arrival order: the core answers them in order.
        if self._handling or not self._inbox:
            return
        message = self._inbox.popleft()
        self._handling = True
        d = defer.maybeDeferred(
            self.factory.handler.message_received,
            message.text,
            self.peer,
            self.factory.interface_name,
        )
        d.addCallbacks(self._committed, self._store_failed)
        d.addErrback(self._internal_error)

    def _internal_error(self, failure: Failure) -> None:
        # A bug in our own code: log it loudly and drop the line so the analyzer
        # reconnects and resends (nothing was acknowledged for the failed message).
        self.log.error("astm.adapter.internal_error", error=failure.getTraceback())
        if not self._closed:
            self._t.loseConnection()

    def _committed(self, outgoing: list[bytes] | None) -> None:
        self._handling = False
        if self._closed:
            return
        now = self.clock.seconds()
        self.link.message_committed(now)
        if outgoing:
            self.log.info("astm.replies.queued", replies=len(outgoing))
        for text in outgoing or []:
            self._queue_outgoing(_Outgoing(text))
        self._pump()
        self._next_message()

    def _store_failed(self, failure: Failure) -> None:
        self._handling = False
        if self._closed:
            return
        self.log.error(
            "astm.message.store_failed",
            error=failure.getErrorMessage(),
            error_type=failure.type.__name__ if failure.type else "",
        )
        self.link.message_failed(self.clock.seconds())
        self._pump()
        self._next_message()

    # ---------------------------------------------------------------- timers

    def _arm_timer(self) -> None:
        deadline = self.link.get_timer()
        if deadline == self._timer_at and self._timer is not None and self._timer.active():
            return
        if deadline is None or self._closed:
            self._cancel_timer()
            return
        delay = max(0.0, deadline - self.clock.seconds())
        self._timer_at = deadline
        if self._timer is not None and self._timer.active():
            # The receive deadline moves with every frame: moving the armed call is
            # cheaper than cancelling it and scheduling a new one each time.
            self._timer.reset(delay)
        else:
            self._timer = self.clock.callLater(delay, self._timer_fired)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timer_at = None

    def _timer_fired(self) -> None:
        self._timer = None
        self._timer_at = None
        if self._closed:
            return
        self.link.handle_timer(self.clock.seconds())
        self._pump()


class ASTMFactory(Factory):
    """Builds :class:`ASTMProtocol` for one interface (server, client or serial)."""

    protocol = ASTMProtocol  # type: ignore[assignment]

    def __init__(
        self,
        handler: ASTMHandler,
        interface_name: str,
        *,
        clock: Any = None,
        role: str = "computer",
        link_options: Mapping[str, Any] | None = None,
        allowlist: Iterable[str] | None = None,
        max_connections: int = 4,
    ) -> None:
        if clock is None:  # an IReactorTime; tests pass task.Clock
            from twisted.internet import reactor as default_reactor

            clock = default_reactor
        self.handler = handler
        self.interface_name = interface_name
        # zope interfaces are opaque to mypy: the clock is an IReactorTime
        self.clock: Any = clock
        self.link_options: dict[str, Any] = {"role": role, **dict(link_options or {})}
        self.allowed = parse_allowlist(allowlist)
        self.max_connections = max_connections
        self.connections: set[ASTMProtocol] = set()
        self._outbox: deque[_Outgoing] = deque()
        self.log = log.bind(interface=interface_name)

    def peer_allowed(self, host: str) -> bool:
        return host_allowed(self.allowed, host)

    def buildProtocol(self, addr: Any) -> ASTMProtocol | None:
        peer = peer_text(addr)
        if isinstance(addr, IPv4Address | IPv6Address):
            if not self.peer_allowed(addr.host):
                self.log.warning("astm.connection.refused", peer=peer, reason="not in allowlist")
                return None
            if len(self.connections) >= self.max_connections:
                self.log.warning(
                    "astm.connection.refused",
                    peer=peer,
                    reason=f"connection limit {self.max_connections} reached",
                )
                return None
        return ASTMProtocol(self, peer)

    # ------------------------------------------------------------ outgoing orders

    def send_message(self, text: bytes) -> Deferred[None]:
        """Queue an order download for the analyzer; fires when the analyzer ACKed it.

        With no connection open the message waits for the next one (client mode
        reconnects; in server mode the analyzer connects back).
        """
        item = _Outgoing(text)
        active = self._active()
        if active is None:
            self._outbox.append(item)
        else:
            active._queue_outgoing(item)
        return item.done

    def _active(self) -> ASTMProtocol | None:
        for connection in self.connections:
            if not connection._closed:
                return connection
        return None

    def connection_made(self, connection: ASTMProtocol) -> None:
        while self._outbox:
            connection._queue_outgoing(self._outbox.popleft())

    def requeue(self, items: list[_Outgoing]) -> None:
        active = self._active()
        for item in items:
            if active is None:
                self._outbox.append(item)
            else:
                active._queue_outgoing(item)


def make_client_service(
    reactor: Any,
    host: str,
    port: int,
    factory: ASTMFactory,
    *,
    clock: Any = None,
    initial_delay: float = 1.0,
    max_delay: float = 60.0,
    connect_timeout: float = 10.0,
) -> ClientService:
    """LIS connects to the analyzer (PROTOCOLS 11, other way round), reconnecting with
    exponential backoff. Call ``startService()`` on the result."""
    from twisted.internet.endpoints import TCP4ClientEndpoint

    endpoint: Any = TCP4ClientEndpoint(reactor, host, port, timeout=connect_timeout)
    service_factory: Any = factory
    policy = backoffPolicy(initialDelay=initial_delay, maxDelay=max_delay)
    return ClientService(endpoint, service_factory, retryPolicy=policy, clock=clock or reactor)


_PARITY = {"none": "N", "n": "N", "even": "E", "e": "E", "odd": "O", "o": "O"}


def open_serial(
    reactor: Any,
    factory: ASTMFactory,
    device: str,
    *,
    baudrate: int = 9600,
    bytesize: int = 8,
    parity: str = "N",
    stopbits: float = 1,
) -> Any:
    """Open an RS-232 line (PROTOCOLS 38-39: 9600 8N1 by default)."""
    from twisted.internet.serialport import SerialPort

    parity_code = _PARITY.get(parity.lower(), parity.upper())
    if parity_code not in ("N", "E", "O", "M", "S"):
        raise ValueError(f"serial parity must be none, even or odd, got {parity!r}")
    if bytesize not in (7, 8):
        raise ValueError(f"serial data bits must be 7 or 8, got {bytesize}")
    protocol = factory.buildProtocol(f"serial:{device}")
    assert protocol is not None
    return SerialPort(
        protocol,
        device,
        reactor,
        baudrate=baudrate,
        bytesize=bytesize,
        parity=parity_code,
        stopbits=stopbits,
    )
