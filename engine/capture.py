"""Raw-byte capture of an interface's connections (DESIGN rule 7).

With ``capture: true`` every byte that arrives on, or leaves by, any connection of the
interface is appended to ``<capture_dir>/<interface>-<YYYYMMDD>.jsonl`` (UTC date), one
JSON object a line::

    {"t": "2025-03-03T10:15:00.123456Z", "dir": "in", "peer": "10.1.2.3:40001",
     "conn": 7, "b64": "C01TSHxe..."}

``dir`` is ``in`` or ``out`` for data. Two more kinds mark a connection's life for the
analyst reading a trace: ``open`` and ``close`` (with ``reason``); they carry no ``b64``.
``conn`` numbers the connections of the interface; it goes on from the last number in
today's file after a restart, so one day's file never mixes two connections under one
number.

The capture sits between the transport and the protocol (a ``ProtocolWrapper``), so it
sees what the protocol sees: plain text on TLS listeners, the same bytes on TCP and on
RS-232. Each record is written with one ``write(2)`` on a file opened ``O_APPEND`` (a
record is on disk, not in a Python buffer, as soon as the chunk is handled). Files are
created mode 0600: they hold patient data. A file that reaches ``max_bytes`` is renamed
``<interface>-<YYYYMMDD>.1.jsonl`` (older ones shift to .2, .3, ...; ``keep`` of them stay)
and a new one begins. A capture that cannot be written is logged and never stops the
interface: the analyzer's traffic matters more than its trace.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from twisted.internet.protocol import connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure

from engine.adapters._peers import peer_text

__all__ = [
    "CaptureFactory",
    "CaptureFile",
    "CaptureProtocol",
    "CaptureRecord",
    "read_capture",
]

log = structlog.get_logger(__name__)

DEFAULT_MAX_BYTES = 100 * 1024 * 1024
_TAIL_BYTES = 64 * 1024  # enough to find the last record's connection number
_ERROR_LOG_INTERVAL = 60.0  # seconds between repeated "capture.write.failed" lines
MAX_RECORD_LINE = 64 * 1024 * 1024  # a reader refuses longer lines (bounded memory)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class CaptureFile:
    """The capture files of one interface: one per UTC day, rotated at ``max_bytes``."""

    def __init__(
        self,
        directory: Path,
        interface: str,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        keep: int = 5,
        now: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.directory = Path(directory)
        self.interface = interface
        self.max_bytes = max_bytes
        self.keep = keep
        self._now = now
        self._fd: int | None = None
        self._day = ""
        self._size = 0
        self._last_conn: int | None = None
        self._last_error_at: float | None = None
        self.failed_writes = 0

    # ------------------------------------------------------------------ paths

    def path_for(self, day: str, generation: int = 0) -> Path:
        suffix = f".{generation}" if generation else ""
        return self.directory / f"{self.interface}-{day}{suffix}.jsonl"

    @property
    def current_path(self) -> Path | None:
        return self.path_for(self._day) if self._day else None

    # ------------------------------------------------------------------ records

    def next_connection(self) -> int:
        if self._last_conn is None:
            self._last_conn = self._last_conn_on_disk(self._now())
        self._last_conn += 1
        return self._last_conn

    def record(self, direction: str, peer: str, conn: int, data: bytes = b"",
               **extra: str) -> None:
        """Append one record; never raises (a failed capture is logged, not fatal)."""
        moment = self._now()
        entry: dict[str, Any] = {"t": _timestamp(moment), "dir": direction, "peer": peer,
                                 "conn": conn}
        if direction in ("in", "out"):
            entry["b64"] = base64.b64encode(data).decode("ascii")
        entry.update(extra)
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode("ascii")
        try:
            self._write(line, moment)
        except OSError as exc:
            self.failed_writes += 1
            self._close_fd()
            now = moment.timestamp()
            if self._last_error_at is None or now - self._last_error_at >= _ERROR_LOG_INTERVAL:
                self._last_error_at = now
                log.error("capture.write.failed", interface=self.interface,
                          directory=str(self.directory), reason=str(exc),
                          failed_writes=self.failed_writes)

    def close(self) -> None:
        self._close_fd()

    # ------------------------------------------------------------------ files

    def _write(self, line: bytes, moment: datetime) -> None:
        day = moment.astimezone(UTC).strftime("%Y%m%d")
        if self._fd is None or day != self._day:
            self._open(day)
        elif self._size and self._size + len(line) > self.max_bytes:
            self._rotate()
        assert self._fd is not None
        written = os.write(self._fd, line)
        if written != len(line):  # a short write on a regular file: the disk is full
            raise OSError(f"short write ({written} of {len(line)} bytes)")
        self._size += written

    def _open(self, day: str) -> None:
        self._close_fd()
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.path_for(day)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        # An existing file keeps the mode it had: captures hold patient data, so tighten it.
        os.fchmod(fd, 0o600)
        self._fd = fd
        self._day = day
        self._size = os.fstat(fd).st_size
        if self._size >= self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        self._close_fd()
        day = self._day
        if self.keep <= 0:
            self.path_for(day).unlink(missing_ok=True)
        else:
            oldest = self.path_for(day, self.keep)
            oldest.unlink(missing_ok=True)
            for generation in range(self.keep - 1, -1, -1):
                source = self.path_for(day, generation)
                if source.exists():
                    source.rename(self.path_for(day, generation + 1))
        log.info("capture.rotated", interface=self.interface, day=day, keep=self.keep)
        self._open(day)

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _last_conn_on_disk(self, moment: datetime) -> int:
        day = moment.astimezone(UTC).strftime("%Y%m%d")
        for path in (self.path_for(day), self.path_for(day, 1)):
            found = _last_conn(path)
            if found is not None:
                return found
        return 0


def _last_conn(path: Path) -> int | None:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - _TAIL_BYTES))
            tail = handle.read()
    except OSError:
        return None
    best: int | None = None
    for match in re.finditer(rb'"conn":(\d+)', tail):
        value = int(match.group(1))
        best = value if best is None else max(best, value)
    return best


# ---------------------------------------------------------------------- Twisted wrapper


class CaptureProtocol(ProtocolWrapper):
    """Records each chunk in both directions, then passes it on unchanged."""

    factory: CaptureFactory

    def __init__(self, factory: CaptureFactory, wrapped: Any, peer: str) -> None:
        super().__init__(factory, wrapped)
        self.peer = peer
        self.conn = factory.capture.next_connection()

    def makeConnection(self, transport: Any) -> None:
        self.factory.capture.record("open", self.peer, self.conn)
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        # Recorded before the protocol sees it: if handling the bytes kills the process,
        # the trace still shows what arrived.
        self.factory.capture.record("in", self.peer, self.conn, data)
        super().dataReceived(data)

    def write(self, data: bytes) -> None:
        self.factory.capture.record("out", self.peer, self.conn, data)
        super().write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        chunks = list(data)
        self.factory.capture.record("out", self.peer, self.conn, b"".join(chunks))
        super().writeSequence(chunks)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.capture.record("close", self.peer, self.conn,
                                    reason=reason.getErrorMessage()[:200])
        super().connectionLost(reason)


class CaptureFactory(WrappingFactory):
    """Wraps an interface's factory so that every connection it builds is captured.

    A refused connection (the inner factory returns None: allowlist, connection limit)
    stays refused and is not captured.
    """

    protocol = CaptureProtocol

    def __init__(self, wrapped: Any, capture: CaptureFile) -> None:
        super().__init__(wrapped)
        self.capture = capture

    def buildProtocol(self, addr: Any) -> CaptureProtocol | None:
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            return None
        return CaptureProtocol(self, inner, peer_text(addr))

    def doStop(self) -> None:
        super().doStop()
        if self.numPorts == 0:
            self.capture.close()


# ---------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class CaptureRecord:
    """One line of a capture file."""

    line: int
    t: str
    dir: str  # in | out | open | close
    peer: str
    conn: int
    data: bytes = b""
    reason: str = ""


class CaptureFormatError(ValueError):
    """A capture line that is not a capture record (with its line number)."""


def read_capture(path: Path, *, conn: int | None = None) -> Iterator[CaptureRecord]:
    """The records of a capture file in order (optionally one connection's).

    Lines are parsed as JSON data only (nothing is turned into objects); a line that is
    not a capture record raises :class:`CaptureFormatError` naming the line. A last line
    cut short by a crash is skipped.
    """
    with Path(path).open("rb") as handle:
        number = 0
        while True:
            raw = handle.readline(MAX_RECORD_LINE + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_RECORD_LINE:
                raise CaptureFormatError(f"{path}:{number}: line longer than "
                                         f"{MAX_RECORD_LINE} bytes; not a labrelay capture")
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw)
            except ValueError as exc:
                if not raw.endswith(b"\n"):
                    return  # the process died while writing the last record
                raise CaptureFormatError(f"{path}:{number}: not JSON ({exc}); "
                                         "is this a labrelay capture file?") from exc
            record = _record(entry, number, path)
            if conn is None or record.conn == conn:
                yield record


def _record(entry: Any, number: int, path: Path) -> CaptureRecord:
    where = f"{path}:{number}"
    if not isinstance(entry, dict):
        raise CaptureFormatError(f"{where}: expected a JSON object")
    direction = entry.get("dir")
    conn = entry.get("conn")
    if direction not in ("in", "out", "open", "close"):
        raise CaptureFormatError(f"{where}: dir must be in, out, open or close, got {direction!r}")
    if not isinstance(conn, int) or isinstance(conn, bool):
        raise CaptureFormatError(f"{where}: conn must be a connection number, got {conn!r}")
    data = b""
    if direction in ("in", "out"):
        text = entry.get("b64")
        if not isinstance(text, str):
            raise CaptureFormatError(f"{where}: b64 (the bytes, base64) is missing")
        try:
            data = base64.b64decode(text, validate=True)
        except ValueError as exc:
            raise CaptureFormatError(f"{where}: b64 is not base64: {exc}") from exc
    return CaptureRecord(
        line=number,
        t=str(entry.get("t", "")),
        dir=direction,
        peer=str(entry.get("peer", "")),
        conn=conn,
        data=data,
        reason=str(entry.get("reason", "")),
    )
