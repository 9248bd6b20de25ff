"""Play ASTM messages or a capture to a receiver as an instrument would (``send astm``).

The client speaks the whole LIS01-A2 link layer as the *instrument* (ENQ, frames, one
reply awaited per frame, NAK -> retransmit, EOT), reports what the other side answered
to every frame (ACK / NAK / EOT / timeout), and after its last EOT stays on the line
for ``listen_after`` seconds to receive what the other side sends back (a host-query
answer), acknowledging it like an analyzer. Captured frames are sent exactly as they
are, bad checksums included: the negative examples exist to be NAKed.

Every wait is bounded: ``timeout`` bounds the whole run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from engine.protocols.astm_link import (
    ASTMLink,
    FrameAnswered,
    LinkTimeout,
    MessageReceived,
    SendCompleted,
    SendFailed,
)

__all__ = ["FrameReport", "SendReport", "send_astm"]

log = structlog.get_logger(__name__)

Answer = Literal["ACK", "NAK", "EOT", "timeout", "other"]


@dataclass(frozen=True, slots=True)
class FrameReport:
    """One frame sent and what came back."""

    session: int  # 0-based index of the message / captured session
    frame: int  # 0-based within it
    fn: int
    answer: Answer


@dataclass
class SendReport:
    """What happened on the line."""

    frames: list[FrameReport] = field(default_factory=list)
    completed: list[int] = field(default_factory=list)  # sessions fully acknowledged
    failed: dict[int, str] = field(default_factory=dict)  # session -> reason
    received: list[bytes] = field(default_factory=list)  # messages the other side sent
    error: str = ""

    @property
    def all_accepted(self) -> bool:
        return not self.failed and not self.error and bool(self.completed)


Item = bytes | Sequence[bytes]
"""A message text (records joined by CR), or a captured session as a list of frames."""


class _SendProtocol(Protocol):
    def __init__(
        self,
        clock: Any,
        items: Sequence[Item],
        report: SendReport,
        done: Deferred[SendReport],
        listen_after: float,
        link_options: dict[str, Any],
    ) -> None:
        self.clock = clock
        self.items = list(items)
        self.report = report
        self.done = done
        self.listen_after = listen_after
        self.link = ASTMLink(role="instrument", **link_options)
        self._index_to_session: dict[int, int] = {}
        self._timer: Any = None
        self._listen_call: Any = None
        self._finished = False

    @property
    def _t(self) -> Any:
        return self.transport

    def connectionMade(self) -> None:
        now = self.clock.seconds()
        for session, item in enumerate(self.items):
            if isinstance(item, bytes | bytearray):
                index = self.link.send_message(bytes(item), now)
            else:
                index = self.link.send_raw_frames([bytes(f) for f in item], now)
            self._index_to_session[index] = session
        self._pump()

    def dataReceived(self, data: bytes) -> None:
        self.link.receive_data(data, self.clock.seconds())
        self._pump()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel()
        if not self._finished:
            if self.link.queued_messages:
                self.report.error = f"connection lost: {reason.getErrorMessage()}"
            self._finish()

    def _pump(self) -> None:
        out = self.link.data_to_send()
        if out:
            self._t.write(out)
        while (event := self.link.next_event()) is not None:
            match event:
                case FrameAnswered():
                    session = self._index_to_session.get(event.message_index, -1)
                    self.report.frames.append(
                        FrameReport(session, event.frame_index, event.fn, event.answer)
                    )
                case SendCompleted():
                    self.report.completed.append(self._index_to_session[event.message_index])
                case SendFailed():
                    self.report.failed[self._index_to_session[event.message_index]] = event.reason
                case MessageReceived():
                    self.report.received.append(event.text)
                    # we are a test instrument: "store" at once so the sender gets its ACK
                    self.link.message_committed(self.clock.seconds())
                case LinkTimeout():
                    log.info("astm.send.timeout", what=event.what)
                case _:
                    pass
        out = self.link.data_to_send()
        if out:
            self._t.write(out)
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        deadline = self.link.get_timer()
        if deadline is not None:
            delay = max(0.0, deadline - self.clock.seconds())
            self._timer = self.clock.callLater(delay, self._fire)
        idle = self.link.queued_messages == 0 and self.link.state.name == "NEUTRAL"
        if idle and not self._finished:
            # everything sent: listen for what comes back, restarting the window on
            # every activity (bounded by the overall timeout)
            if self._listen_call is not None and self._listen_call.active():
                self._listen_call.cancel()
            self._listen_call = self.clock.callLater(self.listen_after, self._stop)
        elif self._listen_call is not None and self._listen_call.active():
            self._listen_call.cancel()
            self._listen_call = None

    def _fire(self) -> None:
        self._timer = None
        self.link.handle_timer(self.clock.seconds())
        self._pump()

    def _cancel(self) -> None:
        for call in (self._timer, self._listen_call):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._listen_call = None

    def _stop(self) -> None:
        self._listen_call = None
        self._finish()
        self._t.loseConnection()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._cancel()
        if not self.done.called:
            self.done.callback(self.report)


def send_astm(
    reactor: Any,
    items: Sequence[Item],
    *,
    host: str | None = None,
    port: int | None = None,
    serial_device: str | None = None,
    baudrate: int = 9600,
    clock: Any = None,
    timeout: float = 120.0,
    listen_after: float = 5.0,
    frame_size: int = 240,
    max_frame_attempts: int = 6,
    tls_options: Any = None,
) -> Deferred[SendReport]:
    """Send ``items`` (message texts or captured frame lists) to a receiver.

    Exactly one of ``host``/``port`` or ``serial_device`` is given; ``tls_options``
    (:func:`engine.adapters.mllp.client_tls_options`) puts TLS on the TCP connection. The
    Deferred fires
    with a :class:`SendReport` (never errbacks for protocol outcomes: a refused frame
    is a report line, not an exception); ``report.error`` says when the line failed.
    """
    if (host is None) == (serial_device is None):
        raise ValueError("give either host and port, or serial_device")
    if not items:
        raise ValueError("nothing to send")
    clock = clock or reactor
    report = SendReport()
    done: Deferred[SendReport] = Deferred()
    link_options: dict[str, Any] = {
        "frame_size": frame_size,
        "max_frame_attempts": max_frame_attempts,
        "max_send_attempts": 1,  # a replay reports; it does not try again later
        "strict_fn": False,  # the other side may answer with anything
        "resend_delay": 1.0,  # after an aborted session, go on with the next one soon
    }
    protocol = _SendProtocol(clock, items, report, done, listen_after, link_options)

    def overall_timeout() -> None:
        if not done.called:
            report.error = f"gave up after {timeout:g} s"
            protocol._finish()
            if protocol.transport is not None:
                protocol._t.loseConnection()

    guard = clock.callLater(timeout, overall_timeout)

    def stop_guard(result: SendReport) -> SendReport:
        if guard.active():
            guard.cancel()
        return result

    done.addBoth(stop_guard)

    if serial_device is not None:
        from twisted.internet.serialport import SerialPort

        SerialPort(protocol, serial_device, reactor, baudrate=baudrate)
        return done

    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS

    assert host is not None and port is not None
    endpoint: Any = TCP4ClientEndpoint(reactor, host, port, timeout=min(timeout, 30.0))
    if tls_options is not None:
        endpoint = wrapClientTLS(tls_options, endpoint)
    connecting = connectProtocol(endpoint, protocol)

    def connect_failed(failure: Failure) -> None:
        report.error = f"could not connect to {host}:{port}: {failure.getErrorMessage()}"
        protocol._finish()

    connecting.addErrback(connect_failed)
    return done
