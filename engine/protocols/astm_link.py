"""ASTM E1381 / CLSI LIS01-A2 link layer, sans-I/O.

One :class:`ASTMLink` serves both directions of one line: it receives frames from
the peer and sends our own messages (host-query answers, order downloads), with the
establishment / transfer / termination phases, contention, timers and
retransmissions of LIS01-A2 (PROTOCOLS 1-44).

Everything that changes the link state goes through :data:`_TRANSITIONS`, one table
``(state, input) -> handler``; the handler does the side effect and returns the next
state. A pair missing from the table is a bug (``LocalProtocolError``): every byte
the peer may send in every state is listed, most of them as "ignore" because
LIS01-A2 says to ignore them (PROTOCOLS 2, 3, 29).

The core never reads a clock and never does I/O (aioquic style): every call that may
arm a timer takes ``now`` (seconds, any monotonic origin) from the adapter;
:meth:`ASTMLink.get_timer` gives the next deadline and :meth:`ASTMLink.handle_timer`
fires it. Bytes to write are collected and fetched with :meth:`data_to_send`; events
are fetched with :meth:`next_event`.

Durability (DESIGN "Durability and acknowledgement rules" 1-2): the frame that
completes an H...L message is not acknowledged until the adapter calls
:meth:`message_committed` (ACK) or :meth:`message_failed` (NAK, so the sender
retransmits the frame and the message is delivered again).
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from engine.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "ACK",
    "ENQ",
    "EOT",
    "ETB",
    "ETX",
    "MAX_FRAME_SIZE",
    "MAX_FRAME_TEXT",
    "NAK",
    "RESTRICTED",
    "STX",
    "ASTMLink",
    "Contention",
    "DuplicateFrame",
    "Event",
    "FrameAnswered",
    "FrameRejected",
    "Interrupted",
    "LinkState",
    "LinkTimeout",
    "LocalProtocolError",
    "MessageReceived",
    "PeerRestarted",
    "RemoteProtocolError",
    "SendCompleted",
    "SendFailed",
    "SessionEnded",
    "SessionStarted",
    "checksum",
    "encode_frames",
    "parse_frame",
]

STX = 0x02
ETX = 0x03
EOT = 0x04
ENQ = 0x05
ACK = 0x06
NAK = 0x15
ETB = 0x17
CR = 0x0D
LF = 0x0A

# PROTOCOLS 13: 64,000 characters per frame including the 7 overhead characters.
MAX_FRAME_SIZE = 64_000
MAX_FRAME_TEXT = MAX_FRAME_SIZE - 7

# PROTOCOLS 37: characters that must never appear in message text.
RESTRICTED = frozenset(
    {0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x10, 0x15, 0x16, 0x17, 0x0A, 0x11, 0x12, 0x13, 0x14}
)

# LIS01-A2 timers (PROTOCOLS 4, 8, 9, 10, 27, 32, 33).
BUSY_RETRY_DELAY = 10.0
CONTENTION_INSTRUMENT_DELAY = 1.0
CONTENTION_COMPUTER_WINDOW = 20.0
REPLY_TIMEOUT = 15.0
INTERRUPT_PAUSE = 15.0
RECEIVE_TIMEOUT = 30.0
MAX_FRAME_ATTEMPTS = 6


# ------------------------------------------------------------------ pure helpers


def checksum(body: bytes) -> bytes:
    """Two upper-case hex digits: sum of FN..ETB/ETX modulo 256 (PROTOCOLS 19-20).

    ``body`` is everything from the frame number up to and including ETX or ETB.
    """
    return b"%02X" % (sum(body) & 0xFF)


def encode_frames(text: bytes, first_fn: int = 1, frame_size: int = 240) -> list[bytes]:
    """Split one message into wire frames ``STX FN text ETB|ETX C1 C2 CR LF``.

    ``frame_size`` is the number of text characters per frame (PROTOCOLS 13: 240 by
    default, at most 63,993). Intermediate frames end with ETB, the last with ETX
    (PROTOCOLS 12, 16). FN starts at ``first_fn`` and wraps 7 -> 0 (PROTOCOLS 18).
    """
    if not 1 <= frame_size <= MAX_FRAME_TEXT:
        raise LocalProtocolError(f"frame_size must be 1..{MAX_FRAME_TEXT}, got {frame_size}")
    if not text:
        raise LocalProtocolError("cannot frame an empty message")
    bad = RESTRICTED.intersection(text)
    if bad:
        raise LocalProtocolError(
            "message text contains characters LIS01-A2 forbids (PROTOCOLS 37): "
            + ", ".join(f"0x{b:02X}" for b in sorted(bad))
        )
    frames = []
    chunks = [text[i : i + frame_size] for i in range(0, len(text), frame_size)]
    for index, chunk in enumerate(chunks):
        fn = (first_fn + index) % 8
        terminator = ETX if index == len(chunks) - 1 else ETB
        body = b"%d" % fn + chunk + bytes([terminator])
        frames.append(bytes([STX]) + body + checksum(body) + b"\r\n")
    return frames


_FRAME = re.compile(rb"\x02([0-7])(.*?)([\x03\x17])([0-9A-Fa-f]{2})", re.DOTALL)


def parse_frame(frame: bytes) -> tuple[int, bytes, bool, bool]:
    """Read one whole frame: returns (fn, text, is_end_frame, checksum_ok)."""
    match = _FRAME.match(frame)
    if not match:
        raise RemoteProtocolError(f"not an E1381 frame: starts {frame[:8]!r}")
    fn, text, term, cs = match.groups()
    ok = cs.upper() == checksum(fn + text + term)
    return int(fn), text, term == b"\x03", ok


# ------------------------------------------------------------------------ events


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """The peer delivered one message (records joined by CR).

    ``complete`` is False for text left over at EOT without an L record. The adapter
    must answer each event with :meth:`ASTMLink.message_committed` or
    :meth:`ASTMLink.message_failed`.
    """

    text: bytes
    complete: bool = True


@dataclass(frozen=True, slots=True)
class FrameRejected:
    """We answered a frame with NAK (or dropped it); ``reason`` never holds content."""

    reason: str
    fn: int | None = None


@dataclass(frozen=True, slots=True)
class DuplicateFrame:
    """A retransmission of the last accepted frame: ACKed, not stored (PROTOCOLS 30)."""

    fn: int


@dataclass(frozen=True, slots=True)
class SessionStarted:
    role: Literal["receiver", "sender"]


@dataclass(frozen=True, slots=True)
class SessionEnded:
    role: Literal["receiver", "sender"]
    reason: str


@dataclass(frozen=True, slots=True)
class PeerRestarted:
    """ENQ in the middle of a transfer: partial text discarded (PROTOCOLS 36)."""

    discarded_bytes: int


@dataclass(frozen=True, slots=True)
class LinkTimeout:
    """A LIS01-A2 timer expired; ``what`` says which one."""

    what: str


@dataclass(frozen=True, slots=True)
class Contention:
    """Both sides sent ENQ (PROTOCOLS 6-8)."""

    we_yield: bool


@dataclass(frozen=True, slots=True)
class Interrupted:
    """The receiver answered a frame with EOT (receiver interrupt, PROTOCOLS 25-27)."""

    honoured: bool


@dataclass(frozen=True, slots=True)
class FrameAnswered:
    """What the peer answered to one of our frames (for replay reports)."""

    message_index: int
    frame_index: int
    fn: int
    answer: Literal["ACK", "NAK", "EOT", "timeout", "other"]


@dataclass(frozen=True, slots=True)
class SendCompleted:
    text: bytes
    message_index: int


@dataclass(frozen=True, slots=True)
class SendFailed:
    """A transfer of ``text`` was aborted. ``final`` False: the core will try again."""

    text: bytes
    message_index: int
    reason: str
    final: bool


Event = (
    MessageReceived
    | FrameRejected
    | DuplicateFrame
    | SessionStarted
    | SessionEnded
    | PeerRestarted
    | LinkTimeout
    | Contention
    | Interrupted
    | FrameAnswered
    | SendCompleted
    | SendFailed
)


# ------------------------------------------------------------------------ states


class LinkState(enum.Enum):
    NEUTRAL = "neutral"
    WAIT_ENQ_REPLY = "wait_enq_reply"  # we sent ENQ (PROTOCOLS 2)
    WAIT_FRAME_REPLY = "wait_frame_reply"  # we sent a frame (PROTOCOLS 22)
    RECEIVING = "receiving"  # peer is sender, transfer phase
    COMMIT_PENDING = "commit_pending"  # completing frame held until the commit


class _In(enum.Enum):
    ENQ = "enq"
    ACK = "ack"
    NAK = "nak"
    EOT = "eot"
    STX = "stx"  # only outside the receiving states
    OTHER = "other"
    FRAME = "frame"  # a whole frame assembled by the receiver
    COMMIT = "commit"
    FAIL = "fail"


@dataclass(slots=True)
class _Outgoing:
    text: bytes
    index: int
    raw_frames: tuple[bytes, ...] | None = None  # replay: frames sent exactly as captured
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class _Frame:
    fn: int | None  # None for lenient raw frames (PROTOCOLS 41)
    text: bytes
    is_end: bool
    checksum_ok: bool
    oversized: bool = False


class _Assembly(enum.Enum):
    OUTSIDE = 0
    TEXT = 1
    CHECKSUM = 2
    TRAILER = 3


class ASTMLink:
    """LIS01-A2 link state machine for one line (both receiver and sender).

    ``role`` decides contention (PROTOCOLS 6-8): ``"computer"`` (the LIS) yields,
    ``"instrument"`` waits 1 s and retries.

    Tolerance options (per interface):

    * ``accept_lowercase_checksum``: accept ``a-f`` in checksums (PROTOCOLS 20).
    * ``strict_trailer``: require ``CR LF`` after the checksum; by default a frame is
      judged after its two checksum characters and a following CR and/or LF is
      out-of-frame noise (PROTOCOLS 29, 42).
    * ``lenient``: a frame whose first character is not a digit is taken as raw text
      with no FN and no checksum, and STX opens a transfer even without ENQ
      (PROTOCOLS 41, MAGLUMI).
    * ``strict_first_fn``: require FN 1 on the first frame of a transfer; by default
      the first frame's FN is taken as given (some instruments continue numbering
      across sessions, corpus:electra_pro_m__1).
    * ``strict_fn``: NAK a frame whose FN is neither the last accepted one nor the next
      (PROTOCOLS 30c). Off, any FN is accepted and a retransmission is recognised by
      the same FN *and* the same text (corpus:horiba_yumizen_h500__1 restarts FN at
      its large M frames).
    """

    def __init__(
        self,
        role: Literal["computer", "instrument"] = "computer",
        frame_size: int = 240,
        lenient: bool = False,
        accept_lowercase_checksum: bool = True,
        *,
        strict_trailer: bool = False,
        strict_first_fn: bool = False,
        strict_fn: bool = True,
        max_frame_size: int = MAX_FRAME_SIZE,
        max_message_size: int = 16 * 1024 * 1024,
        max_queue: int = 1000,
        max_frame_attempts: int = MAX_FRAME_ATTEMPTS,
        max_send_attempts: int = 5,
        resend_delay: float = 30.0,
        honour_interrupt: bool = True,
        can_receive: bool = True,
    ) -> None:
        if role not in ("computer", "instrument"):
            raise LocalProtocolError(f"role must be 'computer' or 'instrument', got {role!r}")
        if not 1 <= frame_size <= MAX_FRAME_TEXT:
            raise LocalProtocolError(f"frame_size must be 1..{MAX_FRAME_TEXT}, got {frame_size}")
        if not 8 <= max_frame_size <= MAX_FRAME_SIZE:
            raise LocalProtocolError(f"max_frame_size must be 8..{MAX_FRAME_SIZE}")
        self.role = role
        self.frame_size = frame_size
        self.lenient = lenient
        self.accept_lowercase_checksum = accept_lowercase_checksum
        self.strict_trailer = strict_trailer
        self.strict_first_fn = strict_first_fn
        self.strict_fn = strict_fn
        self.max_frame_text = max_frame_size - 7
        self.max_message_size = max_message_size
        self.max_queue = max_queue
        self.max_frame_attempts = max_frame_attempts
        self.max_send_attempts = max_send_attempts
        self.resend_delay = resend_delay
        self.honour_interrupt = honour_interrupt
        self.can_receive = can_receive
        #: set by the adapter when it cannot accept a session now: ENQ gets NAK (PROTOCOLS 4)
        self.busy = False

        self._state = LinkState.NEUTRAL
        self._out = bytearray()
        self._events: deque[Event] = deque()
        # receiver
        self._asm = _Assembly.OUTSIDE
        self._fbuf = bytearray()
        self._fterm = 0
        self._fcs = bytearray()
        self._foversized = False
        self._fraw = False
        self._ftrailer_cr = False
        self._text = bytearray()  # accepted frame text not yet delivered
        self._last_fn: int | None = None
        self._last_text = b""
        self._receive_deadline: float | None = None
        self._interrupt_requested = False
        self._pending_frame: _Frame | None = None  # the completing frame, held
        self._pending_rest = b""  # its text after the last complete message
        self._pending_count = 0  # MessageReceived of the held frame not yet answered
        self._pending_failed = False
        self._outstanding = 0  # MessageReceived not yet answered (incl. orphans)
        # Answers still to come for messages no frame waits on any more (the sender gave up,
        # or text left at EOT). Answers arrive in order, so these come first and must never
        # be counted against a frame held later: that would ACK a message not yet stored.
        self._orphans = 0
        # sender
        self._queue: deque[_Outgoing] = deque()
        self._next_index = 0
        self._frames: list[bytes] = []
        self._frame_index = 0
        self._fn = 1
        self._failures = 0
        self._enq_refusals = 0
        self._reply_deadline: float | None = None
        self._not_before: float | None = None
        self._not_before_reason = ""

    # ------------------------------------------------------------------ public API

    @property
    def state(self) -> LinkState:
        return self._state

    @property
    def queued_messages(self) -> int:
        return len(self._queue)

    def receive_data(self, data: bytes, now: float) -> None:
        """Feed bytes read from the line."""
        sent_before = len(self._out)
        i, n = 0, len(data)
        while i < n:
            if self._asm is _Assembly.TEXT and self._fbuf:
                # Inside a frame's text only STX, ETX, ETB, ENQ and EOT mean anything:
                # take the plain bytes up to the next of them in one slice (a frame
                # is ~250 bytes; judging them one by one was most of the link's cost).
                # A single byte goes the byte-by-byte way, so a line fed one byte at a
                # time is judged by _assemble alone (the tests compare the two).
                found = _FRAME_TEXT_STOP.search(data, i)
                end = found.start() if found else n
                if end > i + 1:
                    self._take_text(data, i, end)
                    i = end
                    continue
            byte = data[i]
            i += 1
            if self._state in (LinkState.RECEIVING, LinkState.COMMIT_PENDING) or (
                self._asm is not _Assembly.OUTSIDE
            ):
                self._assemble(byte, now)
            elif (
                self._state in (LinkState.WAIT_FRAME_REPLY, LinkState.WAIT_ENQ_REPLY)
                and len(self._out) > sent_before
            ):
                # We answered an earlier byte of this same read with a new ENQ/frame
                # that is not even written yet: whatever follows in this read cannot be
                # the peer's reply to it. Taking a duplicated ACK as the answer to the
                # next frame would let a refused frame pass as accepted.
                continue
            else:
                self._dispatch(self._classify(byte), now, None)
        self._maybe_start_sending(now)

    def _take_text(self, data: bytes, start: int, end: int) -> None:
        """Plain frame text ``data[start:end]`` after the frame's first byte: what
        :meth:`_assemble` does byte by byte, for the whole slice (bounded buffer,
        PROTOCOLS 13: past ``max_frame_text`` + 1 bytes the frame is marked oversized)."""
        if self._foversized:
            return
        room = self.max_frame_text + 1 - len(self._fbuf)
        if end - start > room:
            # byte ``room`` overflows; like each later byte, it then meets an empty buffer,
            # where lenient mode takes any byte that is not a frame number as a raw frame
            self._foversized = True
            self._fbuf.clear()
            if self.lenient and data[start + room + 1 : end].translate(None, _FRAME_NUMBERS):
                self._fraw = True
            return
        self._fbuf += data[start:end]

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def get_timer(self) -> float | None:
        """The next deadline at which :meth:`handle_timer` must be called, or None."""
        deadlines = [d for d in (self._receive_deadline, self._reply_deadline) if d is not None]
        if self._state is LinkState.NEUTRAL and self._queue and self._not_before is not None:
            deadlines.append(self._not_before)
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        if self._reply_deadline is not None and now >= self._reply_deadline:
            self._reply_deadline = None
            self._on_reply_timeout(now)
        if self._receive_deadline is not None and now >= self._receive_deadline:
            self._receive_deadline = None
            self._on_receive_timeout(now)
        self._maybe_start_sending(now)

    def send_message(self, text: bytes, now: float) -> int:
        """Queue one outgoing message (records joined by CR) for the peer.

        Returns the message index that :class:`SendCompleted` / :class:`SendFailed`
        carry.

        Raises :class:`LocalProtocolError` for text LIS01-A2 cannot carry (PROTOCOLS 37)
        or when the queue is full.
        """
        if not text:
            raise LocalProtocolError("cannot send an empty message")
        if not text.endswith(b"\r"):
            text += b"\r"  # PROTOCOLS 46: the last record ends with CR too
        bad = RESTRICTED.intersection(text)
        if bad:
            raise LocalProtocolError(
                "message text contains characters LIS01-A2 forbids (PROTOCOLS 37): "
                + ", ".join(f"0x{b:02X}" for b in sorted(bad))
                + "; escape them at record level (&Xhh&)"
            )
        index = self._take_index()
        self._enqueue(_Outgoing(text=text, index=index), now)
        return index

    def send_raw_frames(self, frames: list[bytes], now: float) -> int:
        """Queue captured frames to be sent exactly as they are (replay, ``send astm``).

        Bad checksums and FNs are kept: that is the point of replaying negative
        examples. Each frame must be a whole ``STX ... CR LF`` frame.
        """
        if not frames:
            raise LocalProtocolError("no frames to send")
        for frame in frames:
            if not frame.startswith(b"\x02") or len(frame) > MAX_FRAME_SIZE + 2:
                raise LocalProtocolError("send_raw_frames takes whole frames starting with STX")
        text = b"".join(frames)
        index = self._take_index()
        self._enqueue(_Outgoing(text=text, index=index, raw_frames=tuple(frames)), now)
        return index

    def request_interrupt(self) -> None:
        """Answer the next accepted frame with EOT instead of ACK (PROTOCOLS 25-26).

        The request stays valid (repeated on every later frame) until the sender ends
        its transfer.
        """
        self._interrupt_requested = True

    def message_committed(self, now: float) -> None:
        """The adapter stored the oldest unanswered :class:`MessageReceived`."""
        self._answer_message(ok=True, now=now)

    def message_failed(self, now: float) -> None:
        """Storing failed: the completing frame is NAKed so the sender resends it."""
        self._answer_message(ok=False, now=now)

    # ------------------------------------------------------------ byte dispatch

    @staticmethod
    def _classify(byte: int) -> _In:
        return {
            ENQ: _In.ENQ,
            ACK: _In.ACK,
            NAK: _In.NAK,
            EOT: _In.EOT,
            STX: _In.STX,
        }.get(byte, _In.OTHER)

    def _dispatch(self, event: _In, now: float, frame: _Frame | None) -> None:
        handler = _TRANSITIONS.get((self._state, event))
        if handler is None:
            raise LocalProtocolError(f"no transition for {event.name} in {self._state.name}")
        self._state = handler(self, now, frame)

    def _emit(self, event: Event) -> None:
        self._events.append(event)

    def _reply(self, byte: int, now: float) -> None:
        self._out.append(byte)
        # PROTOCOLS 33: the 30 s receive timer restarts after every reply.
        self._receive_deadline = now + RECEIVE_TIMEOUT

    # ---------------------------------------------------------- frame assembly

    def _assemble(self, byte: int, now: float) -> None:
        asm = self._asm
        if asm is _Assembly.OUTSIDE:
            if byte == STX:
                self._start_frame()
            elif byte in (ENQ, EOT):
                self._dispatch(self._classify(byte), now, None)
            # PROTOCOLS 29: anything else outside a frame is ignored
            return
        if byte in (ENQ, EOT):
            # Neither can occur inside a frame (PROTOCOLS 37): the frame is broken and
            # the control character counts.
            self._emit(FrameRejected("frame interrupted by a control character"))
            self._asm = _Assembly.OUTSIDE
            self._fbuf.clear()
            self._dispatch(self._classify(byte), now, None)
            return
        if asm is _Assembly.TEXT:
            if byte == STX:
                # a new frame starts before the old one ended: the old one is lost
                self._emit(FrameRejected("frame truncated by a new STX"))
                self._start_frame()
                return
            if byte in (ETX, ETB):
                self._fterm = byte
                no_fn = not self._fbuf or not 0x30 <= self._fbuf[0] <= 0x37
                if (self.lenient and self._fraw) or (no_fn and not self._foversized):
                    # lenient raw frame, or not an E1381 frame at all (PROTOCOLS 41, 43):
                    # judged at once, there is no checksum to wait for
                    self._finish_frame(now)
                else:
                    self._asm = _Assembly.CHECKSUM
                return
            if len(self._fbuf) == 0 and self.lenient and not (0x30 <= byte <= 0x37):
                self._fraw = True
            if len(self._fbuf) >= self.max_frame_text + 1:
                # PROTOCOLS 13: bound the buffer; the frame is NAKed when it ends
                self._foversized = True
                self._fbuf.clear()
            if not self._foversized:
                self._fbuf.append(byte)
            return
        if asm is _Assembly.CHECKSUM:
            self._fcs.append(byte)
            if len(self._fcs) == 2:
                if self.strict_trailer:
                    self._asm = _Assembly.TRAILER
                else:
                    self._finish_frame(now)
            return
        # TRAILER (strict mode): CR then LF
        if byte == CR and not self._ftrailer_cr:
            self._ftrailer_cr = True
            return
        if byte == LF and self._ftrailer_cr:
            self._finish_frame(now)
            return
        self._emit(FrameRejected("frame trailer is not CR LF"))
        self._asm = _Assembly.OUTSIDE
        self._reply(NAK, now)

    def _start_frame(self) -> None:
        self._asm = _Assembly.TEXT
        self._fbuf.clear()
        self._fcs.clear()
        self._foversized = False
        self._fraw = False
        self._ftrailer_cr = False

    def _finish_frame(self, now: float) -> None:
        self._asm = _Assembly.OUTSIDE
        body = bytes(self._fbuf)
        term = self._fterm
        self._fbuf.clear()
        if self._foversized:
            frame = _Frame(None, b"", term == ETX, False, oversized=True)
        elif self._fraw:
            frame = _Frame(None, body, term == ETX, True)
        elif not body or not (0x30 <= body[0] <= 0x37):
            frame = _Frame(None, body, term == ETX, False)
        else:
            got = bytes(self._fcs)
            if not self.accept_lowercase_checksum and got != got.upper():
                ok = False
            else:
                ok = got.upper() == checksum(body + bytes([term]))
            frame = _Frame(body[0] - 0x30, body[1:], term == ETX, ok)
        self._dispatch(_In.FRAME, now, frame)

    # ------------------------------------------------------------- receiver side

    def _begin_receive(self, now: float) -> None:
        self._last_fn = None
        self._text.clear()
        self._receive_deadline = now + RECEIVE_TIMEOUT
        self._emit(SessionStarted("receiver"))

    def _on_enq_idle(self, now: float, _frame: _Frame | None) -> LinkState:
        if self.busy or not self.can_receive:
            self._out.append(NAK)  # PROTOCOLS 4-5
            return LinkState.NEUTRAL
        self._out.append(ACK)  # PROTOCOLS 3
        self._begin_receive(now)
        if self._not_before_reason in ("contention", "interrupt"):
            # The pause lasts until the other side has used the line (PROTOCOLS 27);
            # it is re-armed below when its session ends.
            self._not_before = None
        return LinkState.RECEIVING

    def _on_enq_receiving(self, now: float, _frame: _Frame | None) -> LinkState:
        # PROTOCOLS 36: the peer restarted; drop the partial message and accept.
        self._emit(PeerRestarted(len(self._text)))
        self._orphan_pending()
        self._asm = _Assembly.OUTSIDE
        self._out.append(ACK)
        self._begin_receive(now)
        return LinkState.RECEIVING

    def _on_eot_receiving(self, now: float, _frame: _Frame | None) -> LinkState:
        # PROTOCOLS 28: EOT returns the line to neutral.
        was_pending = self._state is LinkState.COMMIT_PENDING
        self._orphan_pending()
        leftover = bytes(self._text).strip(b"\r\n")
        # While a frame was held, the text before it belongs to the message already
        # delivered: do not deliver it a second time as a fragment.
        if leftover and not was_pending:
            self._outstanding += 1
            self._orphans += 1  # no frame waits on its answer
            self._emit(MessageReceived(leftover + b"\r", complete=False))
        self._end_receive("eot")
        return LinkState.NEUTRAL

    def _end_receive(self, reason: str) -> None:
        self._text.clear()
        self._last_fn = None
        self._receive_deadline = None
        self._interrupt_requested = False
        self._asm = _Assembly.OUTSIDE
        self._emit(SessionEnded("receiver", reason))

    def _on_receive_timeout(self, now: float) -> None:
        if self._state not in (LinkState.RECEIVING, LinkState.COMMIT_PENDING):
            return
        # PROTOCOLS 33: discard the incomplete message, line neutral.
        self._emit(LinkTimeout("receive: no frame or EOT within 30 s"))
        self._orphan_pending()
        self._end_receive("timeout")
        self._state = LinkState.NEUTRAL

    def _orphan_pending(self) -> None:
        # The sender gave up on the held frame; later commit answers are accepted but
        # send nothing.
        self._orphans += self._pending_count
        self._pending_frame = None
        self._pending_count = 0
        self._pending_failed = False

    def _on_frame(self, now: float, frame: _Frame | None) -> LinkState:
        assert frame is not None
        if frame.oversized:
            self._emit(FrameRejected(f"frame longer than {self.max_frame_text} characters"))
            self._reply(NAK, now)
            return LinkState.RECEIVING
        if frame.fn is None and not frame.checksum_ok:
            self._emit(FrameRejected("no frame number after STX (not an E1381 frame?)"))
            self._reply(NAK, now)
            return LinkState.RECEIVING
        if not frame.checksum_ok:
            self._emit(FrameRejected("checksum mismatch", frame.fn))  # PROTOCOLS 30(b)
            self._reply(NAK, now)
            return LinkState.RECEIVING
        if frame.fn is not None and self._last_fn is not None:
            if frame.fn == self._last_fn and (self.strict_fn or frame.text == self._last_text):
                # PROTOCOLS 30: retransmission after a lost ACK: ACK, store nothing.
                self._emit(DuplicateFrame(frame.fn))
                self._positive_reply(now)
                return LinkState.RECEIVING
            if frame.fn != (self._last_fn + 1) % 8 and self.strict_fn:
                self._emit(FrameRejected("unexpected frame number", frame.fn))  # 30(c)
                self._reply(NAK, now)
                return LinkState.RECEIVING
        elif frame.fn is not None and self.strict_first_fn and frame.fn != 1:
            self._emit(FrameRejected("first frame number is not 1", frame.fn))
            self._reply(NAK, now)
            return LinkState.RECEIVING
        if len(self._text) + len(frame.text) > self.max_message_size:
            self._emit(FrameRejected(f"message longer than {self.max_message_size} bytes"))
            self._text.clear()
            self._reply(NAK, now)
            return LinkState.RECEIVING
        joined = bytes(self._text) + frame.text
        messages, rest = _split_complete(joined, frame.is_end)
        if not messages:
            self._text[:] = joined
            self._accept(frame)
            self._positive_reply(now)
            return LinkState.RECEIVING
        # DESIGN durability rule 1: hold the reply until the adapter has committed.
        self._pending_frame = frame
        self._pending_rest = rest
        self._pending_count = len(messages)
        self._pending_failed = False
        self._outstanding += len(messages)
        for message in messages:
            self._emit(MessageReceived(message))
        return LinkState.COMMIT_PENDING

    def _accept(self, frame: _Frame) -> None:
        if frame.fn is not None:
            self._last_fn = frame.fn
            self._last_text = frame.text

    def _positive_reply(self, now: float) -> None:
        # PROTOCOLS 25: EOT instead of ACK is a receiver interrupt.
        self._reply(EOT if self._interrupt_requested else ACK, now)

    def _answer_message(self, ok: bool, now: float) -> None:
        if self._outstanding <= 0:
            raise LocalProtocolError("message_committed/failed called with no message waiting")
        self._outstanding -= 1
        if self._orphans > 0:
            self._orphans -= 1
            return  # an orphan's answer: the sender gave up meanwhile; nothing to answer
        if self._pending_frame is None or self._state is not LinkState.COMMIT_PENDING:
            return
        if not ok:
            self._pending_failed = True
        self._pending_count -= 1
        if self._pending_count > 0:
            return
        self._dispatch(_In.FAIL if self._pending_failed else _In.COMMIT, now, None)

    def _on_commit(self, now: float, _frame: _Frame | None) -> LinkState:
        frame = self._pending_frame
        assert frame is not None
        self._text[:] = self._pending_rest
        self._accept(frame)
        self._orphan_pending()
        self._positive_reply(now)
        return LinkState.RECEIVING

    def _on_fail(self, now: float, _frame: _Frame | None) -> LinkState:
        # The frame is NAKed and not accepted: its retransmission carries the same FN,
        # is taken as new and re-delivers the message (DESIGN durability rule 2).
        self._orphan_pending()
        self._emit(FrameRejected("storage failed; asking the sender to retransmit"))
        self._reply(NAK, now)
        return LinkState.RECEIVING

    # ---------------------------------------------------------------- sender side

    def _take_index(self) -> int:
        index = self._next_index
        self._next_index += 1
        return index

    def _enqueue(self, item: _Outgoing, now: float) -> None:
        if len(self._queue) >= self.max_queue:
            raise LocalProtocolError(f"outgoing queue full ({self.max_queue} messages)")
        self._queue.append(item)
        self._maybe_start_sending(now)

    def _maybe_start_sending(self, now: float) -> None:
        if self._state is not LinkState.NEUTRAL or not self._queue or not self.can_send:
            return
        if self._asm is not _Assembly.OUTSIDE:
            return
        if self._not_before is not None and now < self._not_before:
            return
        self._not_before = None
        self._not_before_reason = ""
        self._out.append(ENQ)  # PROTOCOLS 1
        self._reply_deadline = now + REPLY_TIMEOUT
        self._emit(SessionStarted("sender"))
        self._state = LinkState.WAIT_ENQ_REPLY

    @property
    def can_send(self) -> bool:
        return True

    def _pause(self, now: float, seconds: float, reason: str) -> None:
        self._not_before = now + seconds
        self._not_before_reason = reason

    def _on_enq_acked(self, now: float, _frame: _Frame | None) -> LinkState:
        self._enq_refusals = 0
        self._fn = 1  # PROTOCOLS 18: FN 1 for the first frame of the transfer phase
        self._load_head()
        return self._send_current_frame(now)

    def _load_head(self) -> None:
        head = self._queue[0]
        if head.raw_frames is not None:
            self._frames = list(head.raw_frames)
        else:
            self._frames = encode_frames(head.text, self._fn, self.frame_size)
        self._frame_index = 0
        self._failures = 0

    def _send_current_frame(self, now: float) -> LinkState:
        self._out += self._frames[self._frame_index]
        self._reply_deadline = now + REPLY_TIMEOUT  # PROTOCOLS 32
        return LinkState.WAIT_FRAME_REPLY

    def _current_fn(self) -> int:
        frame = self._frames[self._frame_index]
        return frame[1] - 0x30 if len(frame) > 1 and 0x30 <= frame[1] <= 0x37 else -1

    def _answered(self, answer: Literal["ACK", "NAK", "EOT", "timeout", "other"]) -> None:
        self._emit(
            FrameAnswered(self._queue[0].index, self._frame_index, self._current_fn(), answer)
        )

    def _on_enq_nak(self, now: float, _frame: _Frame | None) -> LinkState:
        # PROTOCOLS 4: receiver busy; wait at least 10 s before the next ENQ.
        self._reply_deadline = None
        self._enq_refusals += 1
        self._emit(SessionEnded("sender", "peer busy (NAK on ENQ)"))
        if self._enq_refusals < self.max_frame_attempts:
            self._pause(now, BUSY_RETRY_DELAY, "busy")
            return LinkState.NEUTRAL
        # After six refusals (as cobas e 411 does, PROTOCOLS 4) report and wait longer.
        self._enq_refusals = 0
        head = self._queue[0]
        head.attempts += 1
        final = head.attempts >= self.max_send_attempts
        if final:
            self._queue.popleft()
        self._emit(SendFailed(head.text, head.index, "peer busy: ENQ refused 6 times", final))
        self._pause(now, self.resend_delay, "abort")
        return LinkState.NEUTRAL

    def _on_enq_contention(self, now: float, _frame: _Frame | None) -> LinkState:
        self._reply_deadline = None
        if self.role == "computer":
            # PROTOCOLS 7, 9: the LIS yields and waits up to 20 s for the instrument.
            self._emit(Contention(we_yield=True))
            self._pause(now, CONTENTION_COMPUTER_WINDOW, "contention")
        else:
            # PROTOCOLS 8: the instrument waits at least 1 s, then ENQ again.
            self._emit(Contention(we_yield=False))
            self._pause(now, CONTENTION_INSTRUMENT_DELAY, "contention-instrument")
        return LinkState.NEUTRAL

    def _on_frame_ack(self, now: float, _frame: _Frame | None) -> LinkState:
        self._answered("ACK")
        return self._advance(now)

    def _advance(self, now: float) -> LinkState:
        self._failures = 0
        self._frame_index += 1
        self._fn = (self._fn + 1) % 8  # PROTOCOLS 23
        if self._frame_index < len(self._frames):
            return self._send_current_frame(now)
        done = self._queue.popleft()
        self._emit(SendCompleted(done.text, done.index))
        if self._queue and done.raw_frames is None and self._queue[0].raw_frames is None:
            # PROTOCOLS 15, 18: the next message starts a new frame, FN continues.
            # (Captured frames carry their own FNs: each replayed session gets its own
            # transfer phase.)
            self._load_head()
            return self._send_current_frame(now)
        return self._terminate("done")

    def _terminate(self, reason: str) -> LinkState:
        self._out.append(EOT)  # PROTOCOLS 28
        self._reply_deadline = None
        self._emit(SessionEnded("sender", reason))
        return LinkState.NEUTRAL

    def _on_frame_eot(self, now: float, _frame: _Frame | None) -> LinkState:
        self._answered("EOT")
        if not self.honour_interrupt:
            # PROTOCOLS 26: an ignored interrupt counts as an ACK.
            self._emit(Interrupted(honoured=False))
            return self._advance(now)
        # PROTOCOLS 25, 27: EOT acknowledges the frame and asks us to stop.
        self._emit(Interrupted(honoured=True))
        self._failures = 0
        self._frame_index += 1
        if self._frame_index >= len(self._frames):
            done = self._queue.popleft()
            self._emit(SendCompleted(done.text, done.index))
        # an unfinished message is sent again in full later (PROTOCOLS 32)
        self._pause(now, INTERRUPT_PAUSE, "interrupt")
        return self._terminate("receiver interrupt")

    def _on_frame_nak(self, now: float, _frame: _Frame | None) -> LinkState:
        self._answered("NAK")
        return self._retransmit(now, "NAK")

    def _on_frame_other(self, now: float, _frame: _Frame | None) -> LinkState:
        # PROTOCOLS 31: any byte other than ACK/EOT is a NAK condition.
        self._answered("other")
        return self._retransmit(now, "unexpected reply")

    def _retransmit(self, now: float, why: str) -> LinkState:
        self._failures += 1
        if self._failures >= self.max_frame_attempts:
            return self._abort(now, f"frame refused {self._failures} times (last: {why})")
        return self._send_current_frame(now)  # PROTOCOLS 24: same frame, same FN

    def _abort(self, now: float, reason: str) -> LinkState:
        head = self._queue[0]
        head.attempts += 1
        final = head.attempts >= self.max_send_attempts
        if final:
            self._queue.popleft()
        self._emit(SendFailed(head.text, head.index, reason, final))
        self._pause(now, self.resend_delay, "abort")
        return self._terminate(f"aborted: {reason}")

    def _on_reply_timeout(self, now: float) -> None:
        if self._state is LinkState.WAIT_ENQ_REPLY:
            # PROTOCOLS 10: no answer to ENQ within 15 s: termination phase.
            self._emit(LinkTimeout("sender: no reply to ENQ within 15 s"))
            self._state = self._abort(now, "no reply to ENQ within 15 s")
        elif self._state is LinkState.WAIT_FRAME_REPLY:
            # PROTOCOLS 32: no reply to a frame within 15 s: abort, keep the message.
            self._answered("timeout")
            self._emit(LinkTimeout("sender: no reply to frame within 15 s"))
            self._state = self._abort(now, "no reply to frame within 15 s")

    def _ignore(self, now: float, _frame: _Frame | None) -> LinkState:
        return self._state

    def _on_stx_neutral(self, now: float, _frame: _Frame | None) -> LinkState:
        if self.lenient:
            # PROTOCOLS 41: MAGLUMI sends STX without ENQ.
            self._start_frame()
            self._begin_receive(now)
            return LinkState.RECEIVING
        return LinkState.NEUTRAL  # PROTOCOLS 3: idle receiver ignores all but ENQ


def _split_complete(text: bytes, end_frame: bool) -> tuple[list[bytes], bytes]:
    """Cut complete H...L messages off ``text``; returns (messages, remainder).

    A message ends with a record starting ``L``/``l`` (then the field delimiter, or
    nothing) terminated by CR (PROTOCOLS 17, 59). An end frame (ETX) whose text ends
    with an unterminated L record also completes it (corpus:mindray_cl8000i__1 style).
    """
    messages: list[bytes] = []
    start = 0
    pos = 0
    delim = b"|"
    n = len(text)
    while pos < n:
        found = _RECORD_END.search(text, pos)
        end = found.start() if found else n
        if found is None and not end_frame:
            break  # the last record is not terminated yet
        record = text[pos:end].lstrip(b" \t")
        if record[:1] in (b"H", b"h") and len(record) > 1:
            delim = record[1:2]
        if record[:1] in (b"L", b"l") and (len(record) == 1 or record[1:2] == delim):
            message = text[start:end].strip(b"\r\n") + b"\r"
            messages.append(message)
            start = end + 1 if end < n else n
        pos = end + 1
    return messages, text[start:]


# Bytes that end a run of plain frame text, and the end of an ASTM record.
_FRAME_TEXT_STOP = re.compile(bytes([0x5B, STX, ETX, ETB, ENQ, EOT, 0x5D]))
_RECORD_END = re.compile(b"[\r\n]")
_FRAME_NUMBERS = b"01234567"


_Handler = Callable[[ASTMLink, float, "_Frame | None"], LinkState]
_S = LinkState

# The one transition table (h2 style). Rows the spec says to ignore are listed too, so
# a missing pair really is a bug.
_TRANSITIONS: dict[tuple[LinkState, _In], _Handler] = {
    # neutral (PROTOCOLS 3, 5): only ENQ matters; STX only in lenient mode
    (_S.NEUTRAL, _In.ENQ): ASTMLink._on_enq_idle,
    (_S.NEUTRAL, _In.STX): ASTMLink._on_stx_neutral,
    (_S.NEUTRAL, _In.ACK): ASTMLink._ignore,
    (_S.NEUTRAL, _In.NAK): ASTMLink._ignore,
    (_S.NEUTRAL, _In.EOT): ASTMLink._ignore,
    (_S.NEUTRAL, _In.OTHER): ASTMLink._ignore,
    # establishment, as sender (PROTOCOLS 2, 4, 6-8)
    (_S.WAIT_ENQ_REPLY, _In.ACK): ASTMLink._on_enq_acked,
    (_S.WAIT_ENQ_REPLY, _In.NAK): ASTMLink._on_enq_nak,
    (_S.WAIT_ENQ_REPLY, _In.ENQ): ASTMLink._on_enq_contention,
    (_S.WAIT_ENQ_REPLY, _In.EOT): ASTMLink._ignore,
    (_S.WAIT_ENQ_REPLY, _In.STX): ASTMLink._ignore,
    (_S.WAIT_ENQ_REPLY, _In.OTHER): ASTMLink._ignore,
    # transfer, as sender (PROTOCOLS 22-25, 31)
    (_S.WAIT_FRAME_REPLY, _In.ACK): ASTMLink._on_frame_ack,
    (_S.WAIT_FRAME_REPLY, _In.EOT): ASTMLink._on_frame_eot,
    (_S.WAIT_FRAME_REPLY, _In.NAK): ASTMLink._on_frame_nak,
    (_S.WAIT_FRAME_REPLY, _In.ENQ): ASTMLink._on_frame_other,
    (_S.WAIT_FRAME_REPLY, _In.STX): ASTMLink._on_frame_other,
    (_S.WAIT_FRAME_REPLY, _In.OTHER): ASTMLink._on_frame_other,
    # transfer, as receiver (PROTOCOLS 28, 30, 36)
    (_S.RECEIVING, _In.FRAME): ASTMLink._on_frame,
    (_S.RECEIVING, _In.ENQ): ASTMLink._on_enq_receiving,
    (_S.RECEIVING, _In.EOT): ASTMLink._on_eot_receiving,
    # holding the completing frame until the commit (DESIGN durability rule 1)
    (_S.COMMIT_PENDING, _In.COMMIT): ASTMLink._on_commit,
    (_S.COMMIT_PENDING, _In.FAIL): ASTMLink._on_fail,
    (_S.COMMIT_PENDING, _In.ENQ): ASTMLink._on_enq_receiving,
    (_S.COMMIT_PENDING, _In.EOT): ASTMLink._on_eot_receiving,
    (_S.COMMIT_PENDING, _In.FRAME): ASTMLink._ignore,  # the sender must wait for us
}
