"""Twisted adapters for HL7 over MLLP: a listening server and a sending client.

The server hands each unframed message to an :class:`MLLPHandler` (the pipeline) and writes
back whatever ACK it returns, strictly one message at a time per connection so arrival order
is kept. The framing itself is the sans-I/O core :mod:`engine.protocols.mllp`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from typing import Protocol as TypingProtocol

import structlog
from twisted.internet import defer, endpoints
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from drivers.hl7.ack import is_ack
from drivers.hl7.parser import HL7ParseError, parse_message
from engine.adapters._peers import host_allowed, parse_allowlist, peer_text
from engine.adapters._write import write_now
from engine.errors import LocalProtocolError, RemoteProtocolError
from engine.protocols.mllp import (
    COMMIT_ACK,
    COMMIT_NAK,
    AbandonedBlock,
    BufferOverflow,
    MessageTooLarge,
    MLLPCommit,
    MLLPFramer,
    frame,
)

__all__ = [
    "AckResult",
    "MLLPClientProtocol",
    "MLLPHandler",
    "MLLPServerFactory",
    "MLLPServerProtocol",
    "client_tls_options",
    "send_messages",
]

log = structlog.get_logger(__name__)

Reply = bytes | Sequence[bytes] | None


class MLLPHandler(TypingProtocol):
    """What the server needs from the pipeline.

    ``message_received`` fires with the unframed reply (one HL7 ACK, a sequence of them for
    enhanced mode's accept + application ACKs, in order) or None for no reply. An errback
    means the message was not stored: the adapter sends nothing positive (in MLLP release 2
    mode a COMMIT_NAK block) and logs it.
    """

    def message_received(self, raw: bytes, peer: str, interface: str) -> Deferred[Reply]: ...


class MLLPServerProtocol(Protocol):
    """One analyzer connection."""

    factory: MLLPServerFactory

    @property
    def _t(self) -> Any:
        # Twisted's zope interfaces are opaque to mypy; the transport is an ITCPTransport.
        return self.transport

    def __init__(self, factory: MLLPServerFactory, peer: str) -> None:
        self.factory = factory
        self.peer = peer
        self.framer = MLLPFramer(max_message_size=factory.max_message_size)
        self._busy = False
        self._closed = False
        self._idle_call: DelayedCall | None = None
        self.log = log.bind(interface=factory.interface_name, peer=peer)

    # ---------------------------------------------------------------- connection

    def connectionMade(self) -> None:
        self.factory.connections.add(self)
        # Replies are a few bytes (ACK, NAK, a short HL7 ACK): without TCP_NODELAY, Nagle
        # and the peer's delayed ACK add ~40 ms to every exchange.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        self.log.info("mllp.connection.opened", connections=len(self.factory.connections))
        self._arm_idle()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self._cancel_idle()
        self.factory.connections.discard(self)
        if self.framer.in_block:
            self.log.warning(
                "mllp.connection.lost_mid_message", buffered_bytes=self.framer.buffered_bytes
            )
        self.log.info("mllp.connection.closed", reason=reason.getErrorMessage())

    # ---------------------------------------------------------------- idle timeout

    def _arm_idle(self) -> None:
        self._cancel_idle()
        timeout = self.factory.idle_timeout
        if timeout and not self._closed:
            self._idle_call = self.factory.clock.callLater(timeout, self._idle_expired)

    def _cancel_idle(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None

    def _idle_expired(self) -> None:
        self._idle_call = None
        self.log.info("mllp.connection.idle_timeout", idle_timeout=self.factory.idle_timeout)
        self._t.loseConnection()

    # ---------------------------------------------------------------- data

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        if not self._busy:
            self._arm_idle()
        try:
            self.framer.receive_data(data)
        except BufferOverflow as exc:
            self.log.warning("mllp.buffer.overflow", reason=str(exc))
            self._drop()
            return
        self._drain()

    def _drain(self) -> None:
        while not self._busy and not self._closed:
            try:
                event = self.framer.next_message()
            except MessageTooLarge as exc:
                self.log.warning(
                    "mllp.message.too_large",
                    max_message_size=self.factory.max_message_size,
                    reason=str(exc),
                )
                if self.factory.mllp_release == 2:
                    write_now(self.transport, COMMIT_NAK)
                self._drop()
                return
            except AbandonedBlock as exc:
                self.log.warning("mllp.block.abandoned", reason=str(exc))
                continue
            if event is None:
                if self.framer.discarded_bytes:
                    self.log.warning(
                        "mllp.bytes.discarded", discarded_bytes=self.framer.discarded_bytes
                    )
                    self.framer.discarded_bytes = 0
                return
            if isinstance(event, MLLPCommit):
                self.log.warning("mllp.commit.unexpected", ok=event.ok)
                continue
            self._dispatch(event)

    def _dispatch(self, raw: bytes) -> None:
        self._busy = True
        self._cancel_idle()
        # Per-connection order: stop reading until this message is answered; the kernel's
        # TCP window then pushes back on the sender (and the framer bound covers the rest).
        self._t.pauseProducing()
        incoming_is_ack = is_ack(raw)
        try:
            d = defer.maybeDeferred(
                self.factory.handler.message_received,
                raw,
                self.peer,
                self.factory.interface_name,
            )
        except Exception as exc:  # noqa: BLE001 - maybeDeferred catches; belt and braces
            d = defer.fail(exc)
        d.addCallbacks(
            self._replied,
            self._failed,
            callbackArgs=(raw, incoming_is_ack),
            errbackArgs=(raw, incoming_is_ack),
        )
        d.addErrback(self._internal_error)

    def _internal_error(self, failure: Failure) -> None:
        # A bug while replying must not leave the connection stalled with _busy set.
        self.log.error(
            "mllp.adapter.error",
            error=failure.type.__name__ if failure.type else "unknown",
            reason=failure.getErrorMessage(),
        )
        self._busy = False
        if not self._closed:
            self._drop()

    def _replied(self, reply: Reply, raw: bytes, incoming_is_ack: bool) -> None:
        if self._closed:
            self.log.warning("mllp.ack.undeliverable", reason="connection closed before reply")
            return
        if self.factory.mllp_release == 2:
            write_now(self.transport, COMMIT_ACK)
        replies: Sequence[bytes]
        if reply is None:
            replies = ()
        elif isinstance(reply, bytes):
            replies = (reply,)
        else:
            replies = tuple(reply)
        if incoming_is_ack and replies:
            # PROTOCOLS 89: answering an ACK makes two engines ping-pong forever.
            self.log.warning("mllp.ack.suppressed", reason="the incoming message is an ACK")
            replies = ()
        for ack in replies:
            self._send_ack(ack)
        self._done()

    def _failed(self, failure: Failure, raw: bytes, incoming_is_ack: bool) -> None:
        self.log.error(
            "mllp.handler.failed",
            error=failure.type.__name__ if failure.type else "unknown",
            reason=failure.getErrorMessage(),
        )
        if self._closed:
            return
        if self.factory.mllp_release == 2:
            write_now(self.transport, COMMIT_NAK)
        self._done()

    def _send_ack(self, ack: bytes) -> None:
        try:
            framed = frame(ack)
        except LocalProtocolError as exc:  # a pipeline bug must not kill the connection
            self.log.error("mllp.ack.unframeable", reason=str(exc))
            return
        write_now(self.transport, framed)
        # A positive ACK is the everyday case, and the message's own line (message.applied)
        # already tells it: at info level only the ACKs an operator must look at.
        if _msa_code(ack) not in _POSITIVE:
            self.log.info("mllp.ack.sent", **_ack_context(ack))
        elif _STDLIB_LOG.isEnabledFor(logging.DEBUG):
            self.log.debug("mllp.ack.sent", **_ack_context(ack))

    def _done(self) -> None:
        self._busy = False
        if self._closed:
            return
        self._t.resumeProducing()
        self._arm_idle()
        self._drain()

    def _drop(self) -> None:
        self._closed = True
        self._cancel_idle()
        self._t.loseConnection()


_POSITIVE = frozenset({b"AA", b"CA"})
_STDLIB_LOG = logging.getLogger(__name__)


def _msa_code(ack: bytes) -> bytes:
    """MSA-1 of an ACK labrelay built (b"" if there is none), without parsing it all."""
    start = ack.find(b"\rMSA")
    if start < 0:
        return b""
    return ack[start + 5:start + 7]


def _ack_context(ack: bytes) -> dict[str, str]:
    """control_id and MSA-1 of an outgoing ACK for the log line (no patient data in ACKs)."""
    try:
        message = parse_message(ack)
    except HL7ParseError:
        return {}
    msa = message.segment("MSA")
    context = {"control_id": message.control_id}
    if msa is not None:
        context["ack_code"] = msa.field(1)
        context["acked_control_id"] = msa.field(2)
    return context


class MLLPServerFactory(Factory):
    """Builds one :class:`MLLPServerProtocol` per accepted connection.

    Refused peers (allowlist) and connections over ``max_connections`` are logged
    (``mllp.connection.refused``) and closed at once: returning None from
    ``buildProtocol`` makes Twisted close the socket.
    """

    def __init__(
        self,
        handler: MLLPHandler,
        interface_name: str,
        *,
        max_message_size: int = 1024 * 1024,
        idle_timeout: float | None = 300.0,
        max_connections: int = 16,
        allowlist: Iterable[str] | None = None,
        mllp_release: int = 1,
        clock: Any = None,
    ) -> None:
        if mllp_release not in (1, 2):
            raise ValueError(f"mllp_release must be 1 or 2, not {mllp_release!r}")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self.handler = handler
        self.interface_name = interface_name
        self.max_message_size = max_message_size
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.allowlist = parse_allowlist(allowlist)
        self.mllp_release = mllp_release
        self.clock: Any = clock
        self.connections: set[MLLPServerProtocol] = set()

    def peer_allowed(self, host: str) -> bool:
        return host_allowed(self.allowlist, host)

    def buildProtocol(self, addr: Any) -> MLLPServerProtocol | None:
        peer = peer_text(addr)
        host = getattr(addr, "host", "")
        if not self.peer_allowed(host):
            log.warning(
                "mllp.connection.refused",
                interface=self.interface_name,
                peer=peer,
                reason="peer address is not in the interface allowlist",
            )
            return None
        if len(self.connections) >= self.max_connections:
            log.warning(
                "mllp.connection.refused",
                interface=self.interface_name,
                peer=peer,
                reason=f"connection limit of {self.max_connections} reached",
            )
            return None
        return MLLPServerProtocol(self, peer)


# ==================================================================== client


@dataclass(frozen=True, slots=True)
class AckResult:
    """What became of one sent message."""

    control_id: str
    code: str = ""  # MSA-1 of the answer ("" when none came)
    text: str = ""  # MSA-3, or ERR-8 when MSA-3 is empty
    error: str | None = None  # transport problem: no answer, connection lost, ...

    @property
    def ok(self) -> bool:
        return self.error is None and self.code in ("AA", "CA")


def _control_id_of(message: bytes) -> str:
    try:
        return parse_message(message, header_only=True).control_id
    except HL7ParseError:
        return ""


def _wants_application_ack(message: bytes) -> bool:
    try:
        return parse_message(message, header_only=True).msh.field(16).strip().upper() == "AL"
    except HL7ParseError:
        return False


class MLLPClientProtocol(Protocol):
    """Sends messages one by one, waiting for each ACK (reframed from any number of reads)."""

    @property
    def _t(self) -> Any:
        return self.transport

    def __init__(
        self,
        messages: Sequence[bytes],
        timeout: float,
        clock: Any,
        max_message_size: int = 1024 * 1024,
    ) -> None:
        self.messages = list(messages)
        self.timeout = timeout
        self.clock = clock
        self.framer = MLLPFramer(max_message_size=max_message_size)
        self.results: list[AckResult] = []
        self.finished: Deferred[list[AckResult]] = Deferred()
        self._index = 0
        self._timer: DelayedCall | None = None
        self._current_id = ""
        self._awaiting_application = False
        self._pending_commit: AckResult | None = None

    def connectionMade(self) -> None:
        self._send_next()

    def _send_next(self) -> None:
        if self._index >= len(self.messages):
            self._finish()
            return
        message = self.messages[self._index]
        self._current_id = _control_id_of(message)
        self._awaiting_application = False
        self._pending_commit = None
        try:
            data = frame(message)
        except Exception as exc:  # noqa: BLE001 - reported per message, the rest still go
            self._record(AckResult(self._current_id, error=str(exc)))
            return
        self._t.write(data)
        self._timer = self.clock.callLater(self.timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        try:
            self.framer.receive_data(data)
        except RemoteProtocolError as exc:
            self._abort(f"answer stream unreadable: {exc}")
            return
        while self._index < len(self.messages):
            try:
                event = self.framer.next_message()
            except RemoteProtocolError as exc:
                self._abort(f"answer unreadable: {exc}")
                return
            if event is None:
                return
            if isinstance(event, MLLPCommit):
                if not event.ok:
                    self._record(
                        AckResult(self._current_id, code="", error="MLLP commit NAK received")
                    )
                continue
            self._answer(event)

    def _answer(self, raw: bytes) -> None:
        try:
            message = parse_message(raw)
        except HL7ParseError as exc:
            self._record(AckResult(self._current_id, error=f"unreadable answer: {exc}"))
            return
        msa = message.segment("MSA")
        if msa is None:
            return  # not an acknowledgement (e.g. an unsolicited message): keep waiting
        if self._current_id and msa.field(2) and msa.field(2) != self._current_id:
            return  # an answer to something else (PROTOCOLS 85): keep waiting
        code = msa.field(1).strip().upper()
        text = msa.field(3)
        if not text:
            err = message.segment("ERR")
            if err is not None:
                text = err.field(8) or err.component(3, 2)
        result = AckResult(self._current_id, code=code, text=text)
        if code == "CA" and _wants_application_ack(self.messages[self._index]):
            # Enhanced mode: the commit ACK comes first, the application ACK follows.
            self._pending_commit = result
            return
        self._record(result)

    def _record(self, result: AckResult) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.results.append(result)
        self._index += 1
        self._send_next()

    def _timed_out(self) -> None:
        self._timer = None
        if self._pending_commit is not None:
            self._record(self._pending_commit)
            return
        self._abort(f"no ACK within {self.timeout:g} s")

    def _abort(self, reason: str) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._index < len(self.messages):
            self.results.append(AckResult(self._current_id, error=reason))
            for message in self.messages[self._index + 1 :]:
                self.results.append(AckResult(_control_id_of(message), error="not sent: " + reason))
            self._index = len(self.messages)
        self._finish()

    def _finish(self) -> None:
        if not self.finished.called:
            self.finished.callback(self.results)
        if self.transport is not None:
            self._t.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._index < len(self.messages):
            self._abort(f"connection lost: {reason.getErrorMessage()}")
        elif not self.finished.called:
            self.finished.callback(self.results)


class _ClientFactory(Factory):
    def __init__(self, proto: MLLPClientProtocol) -> None:
        self.proto = proto

    def buildProtocol(self, addr: Any) -> MLLPClientProtocol:
        return self.proto


def send_messages(
    reactor: Any,
    host: str,
    port: int,
    messages: Sequence[bytes],
    timeout: float = 30.0,
    *,
    tls_options: Any = None,
) -> Deferred[list[AckResult]]:
    """Connect to ``host:port``, send each message framed, and wait for its ACK (bounded by
    ``timeout`` seconds per message) before sending the next.

    ``tls_options`` (:func:`client_tls_options`) puts TLS on the connection: the server
    certificate is verified and must name ``host``, and a client certificate is presented
    to a mutual-TLS listener when the options carry one.

    Fires with one :class:`AckResult` per message. A failed connection fires with results that
    all carry the error; messages after a timeout are reported as not sent.
    """
    proto = MLLPClientProtocol(messages, timeout, reactor)
    endpoint: Any = endpoints.HostnameEndpoint(reactor, host, port, timeout=int(timeout) or 1)
    if tls_options is not None:
        endpoint = endpoints.wrapClientTLS(tls_options, endpoint)
    if not messages:
        return defer.succeed([])

    def connect_failed(failure: Failure) -> list[AckResult]:
        reason = f"cannot connect to {host}:{port}: {failure.getErrorMessage()}"
        return [AckResult(_control_id_of(m), error=reason) for m in messages]

    connecting: Deferred[Any] = endpoint.connect(_ClientFactory(proto))
    result: Deferred[list[AckResult]] = Deferred()

    def connected(_: object) -> None:
        proto.finished.chainDeferred(result)

    def failed(failure: Failure) -> None:
        result.callback(connect_failed(failure))

    connecting.addCallbacks(connected, failed)
    return result


def client_tls_options(
    host: str,
    *,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
) -> Any:
    """TLS client options: verify the server (against ``ca_file`` if given), and present
    a client certificate when ``cert_file`` and ``key_file`` are given (raises ValueError
    naming the file that cannot be used)."""
    from pathlib import Path

    from OpenSSL import crypto
    from twisted.internet import ssl

    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs both the certificate and its private key")

    def read(path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc}") from exc

    trust_root: Any = None
    if ca_file is not None:
        try:
            trust_root = ssl.Certificate.loadPEM(read(ca_file))
        except crypto.Error as exc:
            raise ValueError(f"{ca_file} is not a PEM certificate: {exc}") from exc
    client_certificate: Any = None
    if cert_file is not None and key_file is not None:
        try:
            client_certificate = ssl.PrivateCertificate.loadPEM(
                read(cert_file) + b"\n" + read(key_file)
            )
        except (crypto.Error, ValueError) as exc:
            raise ValueError(
                f"{cert_file} / {key_file} are not a PEM certificate and matching key: {exc}"
            ) from exc
    return ssl.optionsForClientTLS(
        host, trustRoot=trust_root, clientCertificate=client_certificate
    )
