"""Sans-I/O MLLP framer (PROTOCOLS 75-78).

h11 style: :meth:`MLLPFramer.receive_data` only buffers and splits, :meth:`MLLPFramer.next_message`
hands out one event at a time, :func:`frame` builds the bytes to write. Nothing here touches a
socket or a clock, so the same core serves TCP, TLS and tests.

Framing decisions (documented because real senders differ):

* A block starts at ``<VT>`` and is complete at ``<FS>``. The ``<CR>`` that should follow ``<FS>``
  is consumed when it arrives (as an inter-block byte) and its absence is tolerated, so a
  message is delivered as soon as its ``<FS>`` is read, never held back waiting for one more
  byte (PROTOCOLS 75, 76).
* Bytes outside a block (keep-alive newlines, ``<CR><LF>``, form feed, stray ``<CR>`` after
  ``<FS>``) are discarded; anything else outside a block is discarded too and counted in
  :attr:`MLLPFramer.discarded_bytes` so the adapter can log it (PROTOCOLS 76, 77).
* A ``<VT>`` inside an unfinished block means the sender gave up on it and started again: the
  partial block is dropped and :class:`AbandonedBlock` is raised (once) from ``next_message``.
* A block larger than ``max_message_size`` raises :class:`MessageTooLarge` (once); the rest of
  that block is skipped up to the next ``<VT>``.
* Complete messages waiting to be taken are bounded by ``max_buffer_size``; beyond it
  :class:`BufferOverflow` is raised from ``receive_data`` (the adapter closes the connection:
  a sender that waits for its ACK, as MLLP requires, never gets there).
* An MLLP release 2 commit block (``<VT><ACK><FS><CR>`` / ``<VT><NAK><FS><CR>``) comes out as
  :class:`MLLPCommit` (PROTOCOLS 78).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "COMMIT_ACK",
    "COMMIT_NAK",
    "CR",
    "END_BLOCK",
    "START_BLOCK",
    "AbandonedBlock",
    "BufferOverflow",
    "MLLPCommit",
    "MLLPFramer",
    "MessageTooLarge",
    "frame",
]

START_BLOCK = b"\x0b"  # <VT>, PROTOCOLS 75
END_BLOCK = b"\x1c"  # <FS>
CR = b"\x0d"
# PROTOCOLS 78: MLLP release 2 commit acknowledgement / negative acknowledgement blocks.
COMMIT_ACK = b"\x0b\x06\x1c\x0d"
COMMIT_NAK = b"\x0b\x15\x1c\x0d"

DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024

_VT = 0x0B
_FS = 0x1C
# Bytes a well-behaved peer may leave between blocks (PROTOCOLS 77): not worth reporting.
_QUIET = frozenset(b"\r\n\x0c\t \x00")


class MessageTooLarge(RemoteProtocolError):
    """A block grew past the configured maximum message size."""


class AbandonedBlock(RemoteProtocolError):
    """A new ``<VT>`` arrived before the current block's ``<FS>``: the partial block is dropped."""


class BufferOverflow(RemoteProtocolError):
    """The peer sent more complete messages than may wait unread; close the connection."""


@dataclass(frozen=True, slots=True)
class MLLPCommit:
    """An MLLP release 2 commit block: ``ok`` is True for ACK (0x06), False for NAK (0x15)."""

    ok: bool


_COMMIT_BODIES = {b"\x06": MLLPCommit(ok=True), b"\x15": MLLPCommit(ok=False)}


def frame(message: bytes) -> bytes:
    """Wrap one HL7 message in an MLLP block (PROTOCOLS 75).

    Raises :class:`LocalProtocolError` if the payload holds ``<VT>`` or ``<FS>``: such a
    message cannot be framed unambiguously and sending it would desynchronise the peer.
    """
    if START_BLOCK in message or END_BLOCK in message:
        raise LocalProtocolError(
            "cannot frame an HL7 message that contains <VT> (0x0B) or <FS> (0x1C); "
            "strip MLLP bytes from the payload before sending it"
        )
    return START_BLOCK + message + END_BLOCK + CR


_OUTSIDE = 0
_INSIDE = 1
_SKIPPING = 2

_Event = bytes | MLLPCommit | RemoteProtocolError


class MLLPFramer:
    """Split an MLLP byte stream into messages.

    Feed bytes with :meth:`receive_data`; call :meth:`next_message` until it returns ``None``.
    """

    def __init__(
        self,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_buffer_size: int | None = None,
    ) -> None:
        if max_message_size < 1:
            raise ValueError("max_message_size must be at least 1 byte")
        self.max_message_size = max_message_size
        self.max_buffer_size = (
            max_buffer_size if max_buffer_size is not None else 4 * max_message_size + 65536
        )
        self.discarded_bytes = 0
        self._state = _OUTSIDE
        self._block = bytearray()
        self._events: deque[_Event] = deque()
        self._queued_bytes = 0

    @property
    def in_block(self) -> bool:
        """True while part of a block has been read but not its ``<FS>``."""
        return self._state == _INSIDE

    @property
    def buffered_bytes(self) -> int:
        """Bytes held: complete messages not yet taken plus the unfinished block."""
        return self._queued_bytes + len(self._block)

    def receive_data(self, data: bytes) -> None:
        """Buffer ``data`` and split off every block it completes."""
        pos = 0
        end = len(data)
        while pos < end:
            if self._state == _INSIDE:
                fs = data.find(END_BLOCK, pos)
                stop = fs if fs >= 0 else end
                vt = data.find(START_BLOCK, pos, stop)
                if vt >= 0:
                    dropped = len(self._block) + (vt - pos)
                    self._block = bytearray()
                    self._push(
                        AbandonedBlock(
                            f"MLLP block of {dropped} bytes was abandoned: a new <VT> start "
                            "arrived before its <FS> end; the partial message was dropped and "
                            "the sender must resend it"
                        )
                    )
                    pos = vt + 1
                    continue
                if len(self._block) + (stop - pos) > self.max_message_size:
                    self._block = bytearray()
                    self._state = _SKIPPING
                    self._push(
                        MessageTooLarge(
                            f"MLLP block exceeds the maximum message size of "
                            f"{self.max_message_size} bytes; it was discarded. Raise "
                            "max_message_size for this interface if such messages are expected"
                        )
                    )
                    pos = stop
                    continue
                self._block += data[pos:stop]
                if fs < 0:
                    break
                body = bytes(self._block)
                self._block = bytearray()
                self._state = _OUTSIDE
                self._push(_COMMIT_BODIES.get(body, body))
                pos = fs + 1
            else:
                vt = data.find(START_BLOCK, pos)
                stop = vt if vt >= 0 else end
                if self._state == _OUTSIDE:
                    self._count_garbage(data, pos, stop)
                if vt < 0:
                    break
                self._state = _INSIDE
                pos = vt + 1
        if self.buffered_bytes > self.max_buffer_size:
            raise BufferOverflow(
                f"{self.buffered_bytes} bytes wait unacknowledged on this connection "
                f"(limit {self.max_buffer_size}); the sender does not wait for ACKs. "
                "Closing the connection"
            )

    def next_message(self) -> bytes | MLLPCommit | None:
        """Return the next complete message (without VT/FS/CR), a commit block, or None.

        Raises :class:`MessageTooLarge` or :class:`AbandonedBlock` in stream order when such a
        block was met; calling again continues with what follows it.
        """
        if not self._events:
            return None
        event = self._events.popleft()
        if isinstance(event, RemoteProtocolError):
            raise event
        if isinstance(event, bytes):
            self._queued_bytes -= len(event)
        return event

    def _push(self, event: _Event) -> None:
        if isinstance(event, bytes):
            self._queued_bytes += len(event)
        self._events.append(event)

    def _count_garbage(self, data: bytes, start: int, stop: int) -> None:
        if start >= stop:
            return
        chunk = data[start:stop]
        if chunk.strip(b"\r\n\x0c\t \x00\x1c"):
            self.discarded_bytes += sum(1 for b in chunk if b not in _QUIET and b != _FS)
