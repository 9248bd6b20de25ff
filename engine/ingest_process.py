"""Inbound messages stored, decoded, mapped and applied in a process of their own.

One CPython process runs Python on one core at a time. In one process, the reactor
(framing, the ASTM link, sockets) and the database writer take turns, and the writer,
which every acknowledgement waits for, spent about half its time waiting for its turn.
With ``ingest_process: true`` (the default for ``labrelay run``) the engine starts
``python -m engine.ingest_process`` beside itself and hands it every inbound message; it
runs the same group-commit writer (:mod:`engine.writer`) and the same
:func:`engine.ingest_bulk.ingest_bulk`, and answers with each message's outcome once its
transaction committed. The reactor builds the reply from that outcome, as before.

Two threads: the main one reads the engine's requests (and, on PostgreSQL, decodes and
maps each message as it arrives), and the writer runs the batches and sends each
committed batch's outcomes, in order, before its next batch.

The durability rules do not change:

1. the outcome comes back only after the commit, and the reply is built from it;
2. if the ingest process or the database fails, the messages it held get a storage
   error (HL7 AR, ASTM NAK), nothing positive; the process is started again, and while it
   is down every message gets the same answer, so analyzers resend;
3. to 5. are :func:`engine.pipeline.ingest`'s, unchanged.

Only one ingest process writes to a database at a time: it holds an ingest lock for its
whole life (an advisory lock on PostgreSQL, a file lock beside an SQLite file), so the one
an engine killed with SIGKILL leaves behind finishes its last batch before the next one
takes over, and the duplicate check always sees what the other committed.

It reads the configuration and the mapping files when it starts, as the engine does.
``labrelay mapping reload`` (or SIGHUP to the engine) has both read the mapping files
again; other configuration changes need a restart of the engine. A process started again
after a crash reads the mapping files as they are then.

Wire format, both ways, on the child's stdin and stdout: frames of two 4-byte big-endian
lengths, a JSON header and the payload bytes (the raw message; the replies an outcome
carries). Sizes are bounded, and JSON holds only plain values: nothing is unpickled.
Everything else the engine writes (alerts, order downloads, status, held messages'
reprocessing) stays on the engine's own writer thread.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import structlog
from twisted.internet.defer import Deferred, fail
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from engine.errors import LabrelayError, StorageError

log = structlog.get_logger("engine.ingest_process")

_LENGTHS = struct.Struct(">II")
MAX_HEADER = 1024 * 1024
MAX_PAYLOAD = 80 * 1024 * 1024  # above the largest max_message_bytes (64 MiB)
STOP_TIMEOUT = 30.0  # seconds the ingest process has to finish its batch at shutdown
RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# "labrelay-ingest": the advisory lock key one ingest process holds on PostgreSQL
INGEST_LOCK_KEY = int.from_bytes(b"lr-ingst", "big") & 0x7FFF_FFFF_FFFF_FFFF


class IngestProcessError(LabrelayError):
    """A fault in labrelay itself while the ingest process handled one message."""


def encode_frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    data = json.dumps(header, separators=(",", ":"), default=str).encode()
    return _LENGTHS.pack(len(data), len(payload)) + data + payload


class FrameReader:
    """Bytes in, ``(header, payload)`` frames out; bounded, with a clear error."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[dict[str, Any], bytes]]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= _LENGTHS.size:
            header_size, payload_size = _LENGTHS.unpack_from(self._buffer)
            if header_size > MAX_HEADER or payload_size > MAX_PAYLOAD:
                raise ValueError(f"ingest frame too large ({header_size} + {payload_size} "
                                 "bytes): the two processes are out of step")
            end = _LENGTHS.size + header_size + payload_size
            if len(self._buffer) < end:
                break
            start = _LENGTHS.size
            header = json.loads(bytes(self._buffer[start:start + header_size]))
            if not isinstance(header, dict):
                raise ValueError("ingest frame header is not a JSON object")
            payload = bytes(self._buffer[start + header_size:end])
            del self._buffer[:end]
            frames.append((header, payload))
        return frames


# ----------------------------------------------------------------- outcomes on the wire

_RESULT_FIELDS = ("message_id", "status", "outcome", "hold_reason", "hold_detail", "kind",
                  "control_id", "original_ack_code", "original_status")


def result_frame(request_id: int, result: Any, stats: dict[str, Any]) -> bytes:
    outgoing = list(result.outgoing)
    header = {"id": request_id, "ok": True,
              "result": {name: getattr(result, name) for name in _RESULT_FIELDS},
              "specimen_ids": list(result.specimen_ids),
              "logs": [[event, fields] for event, fields in result.logs],
              "outgoing": [len(o) for o in outgoing], "writer": stats}
    return encode_frame(header, b"".join(outgoing))


def result_from_frame(header: dict[str, Any], payload: bytes) -> Any:
    from engine.pipeline import IngestResult

    fields = header["result"]
    outgoing, offset = [], 0
    for size in header.get("outgoing", []):
        outgoing.append(payload[offset:offset + int(size)])
        offset += int(size)
    return IngestResult(
        int(fields["message_id"]), str(fields["status"]), str(fields["outcome"]),
        hold_reason=str(fields.get("hold_reason") or ""),
        hold_detail=str(fields.get("hold_detail") or ""),
        kind=str(fields.get("kind") or ""), control_id=str(fields.get("control_id") or ""),
        original_ack_code=str(fields.get("original_ack_code") or ""),
        original_status=str(fields.get("original_status") or ""),
        outgoing=outgoing, specimen_ids=tuple(str(s) for s in header.get("specimen_ids", [])),
        logs=[(str(event), dict(fields)) for event, fields in header.get("logs", [])])


# ----------------------------------------------------------------- the engine's side


class _ChildProtocol(ProcessProtocol):
    def __init__(self, owner: IngestProcess) -> None:
        self.owner = owner
        self.frames = FrameReader()

    def outReceived(self, data: bytes) -> None:
        try:
            frames = self.frames.feed(data)
        except ValueError as exc:
            log.error("ingest.process.protocol_error", reason=str(exc)[:300],
                      action="stopping it; it is started again")
            transport: Any = self.transport  # zope interfaces are opaque to mypy
            transport.signalProcess("KILL")
            return
        for header, payload in frames:
            self.owner._answer(header, payload)

    def processEnded(self, reason: Failure) -> None:
        self.owner._ended(reason)


class IngestProcess:
    """The engine's handle on its ingest process: start, submit, watch, stop."""

    def __init__(self, reactor: Any, command: list[str], env: dict[str, str],
                 alert: Callable[[str, str], None] | None = None,
                 restarted: Callable[[], None] | None = None) -> None:
        self.reactor = reactor
        # called each time the process is started again after an exit (the engine applies
        # the after_commit messages it stored but could not report: engine.service)
        self.restarted = restarted
        self.command = command
        self.env = env
        self.alert = alert
        self.pending: dict[int, Deferred[Any]] = {}
        self.next_id = 1
        self.transport: Any = None
        self.running = False
        self.stopping = False
        self.restarts = 0
        self._failures = 0  # exits since it last answered: how long to wait before a restart
        self.last_exit = ""
        self.writer_stats: dict[str, Any] = {}
        self._ended_waiters: list[Deferred[None]] = []
        self._restart: Any = None  # the DelayedCall of a pending restart

    def start(self) -> None:
        self._restart = None
        if self.stopping:
            return
        try:
            self.transport = self.reactor.spawnProcess(
                _ChildProtocol(self), self.command[0], self.command, env=self.env,
                childFDs={0: "w", 1: "r", 2: 1})
        except OSError as exc:
            self.last_exit = f"could not start: {exc}"
            log.error("ingest.process.start_failed", reason=str(exc)[:300])
            self._restart_later()
            return
        self.running = True
        log.info("ingest.process.started", process_id=self.transport.pid)
        if self.restarts and self.restarted is not None:
            self.restarted()

    def submit(self, interface: str, raw: bytes, peer: str, apply_now: bool) -> Deferred[Any]:
        """The message's outcome (an IngestResult), once committed by the ingest process."""
        if not self.running or self.transport is None:
            return fail(StorageError(
                "the ingest process is not running (it is being started again); nothing was "
                "acknowledged, the analyzer should resend"))
        return self._request({"interface": interface, "peer": peer, "apply_now": apply_now},
                             raw)

    def _request(self, header: dict[str, Any], payload: bytes = b"") -> Deferred[Any]:
        """Send one frame; the Deferred fires with the answer carrying its id."""
        request_id = self.next_id
        self.next_id += 1
        d: Deferred[Any] = Deferred()
        self.pending[request_id] = d
        self.transport.write(encode_frame({"id": request_id, **header}, payload))
        return d

    def reload_mappings(self) -> Deferred[dict[str, Any]]:
        """Have the ingest process read its interfaces' mapping files again; fires with
        its outcome per interface (:func:`engine.pipeline.reload_mappings`). Messages sent
        to it after this take the new mappings."""
        if not self.running or self.transport is None:
            return fail(LabrelayError(
                "the ingest process is not running; it reads the mapping files when it is "
                "started again"))
        return self._request({"control": "reload_mappings"})

    def _answer(self, header: dict[str, Any], payload: bytes) -> None:
        d = self.pending.pop(int(header.get("id", 0)), None)
        if isinstance(header.get("writer"), dict):
            self.writer_stats = header["writer"]
        if d is None:
            log.error("ingest.process.unknown_answer", request=header.get("id"))
            return
        self._failures = 0  # it answers: after a later exit, the shortest delay again
        if header.get("ok") and isinstance(header.get("reloaded"), dict):
            d.callback(header["reloaded"])
        elif header.get("ok"):
            try:
                result = result_from_frame(header, payload)
            except (KeyError, TypeError, ValueError) as exc:
                d.errback(IngestProcessError(f"unreadable outcome: {exc}"))
                return
            d.callback(result)
        elif header.get("storage"):
            d.errback(StorageError(str(header.get("message", ""))[:500]))
        else:
            d.errback(IngestProcessError(
                f"{header.get('type', 'Exception')}: {header.get('message', '')}"[:500]))

    def _ended(self, reason: Failure) -> None:
        self.running = False
        self.transport = None
        value = reason.value
        sig = getattr(value, "signal", None)
        self.last_exit = f"signal {sig}" if sig else f"exit code {getattr(value, 'exitCode', None)}"
        pending, self.pending = self.pending, {}
        for d in pending.values():
            d.errback(StorageError(
                f"the ingest process stopped ({self.last_exit}) before committing; nothing was "
                "acknowledged, the analyzer should resend"))
        waiters, self._ended_waiters = self._ended_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        if self.stopping:
            log.info("ingest.process.stopped", how=self.last_exit)
            return
        log.error("ingest.process.exited", how=self.last_exit, unanswered=len(pending),
                  action="starting it again")
        if self.alert is not None:
            self.alert(f"the ingest process exited ({self.last_exit})",
                       f"{len(pending)} message(s) were answered with a storage error and "
                       "will be resent by their analyzers; it is being started again")
        self._restart_later()

    def _restart_later(self) -> None:
        delay = RESTART_DELAYS[min(self._failures, len(RESTART_DELAYS) - 1)]
        self._failures += 1
        self.restarts += 1
        self._restart = self.reactor.callLater(delay, self.start)

    def stop(self) -> Deferred[None]:
        """Close its input: it finishes the batch it holds, answers, and exits. Killed if
        it has not ended within ``STOP_TIMEOUT`` seconds."""
        self.stopping = True
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        done: Deferred[None] = Deferred()
        if not self.running or self.transport is None:
            done.callback(None)
            return done
        self._ended_waiters.append(done)
        self.transport.closeStdin()
        transport = self.transport

        def kill() -> None:
            if self.running:
                log.error("ingest.process.kill", reason=f"not stopped after {STOP_TIMEOUT:g} s")
                transport.signalProcess("KILL")

        call = self.reactor.callLater(STOP_TIMEOUT, kill)

        def cancel(result: Any) -> Any:
            if call.active():
                call.cancel()
            return result

        return done.addBoth(cancel)

    def status(self) -> dict[str, Any]:
        return {"running": self.running,
                "process_id": getattr(self.transport, "pid", None), "restarts": self.restarts,
                "last_exit": self.last_exit, "in_flight": len(self.pending),
                "writer": self.writer_stats}


# ----------------------------------------------------------------- the ingest process


def _one(item: Any) -> Callable[[Any], Any]:
    from engine.ingest_bulk import ingest_one

    return lambda session: ingest_one(session, item)


class _Answerer:
    """The writer's 'reactor' in the ingest process (no Twisted reactor runs here): what the
    writer hands over after a commit (the outcomes of a batch) runs at once, on the writer's
    thread, in order, before its next batch. A thread of its own for the answers (session 7)
    made each of them wait for the interpreter while the writer started its next batch;
    sending them first costs the writer ~20 µs a message and brings every analyzer its ACK
    sooner, so each batch finds more messages waiting. HL7 PostgreSQL x8, nine alternating
    pairs: faster in eight (811-893 -> 822-895 msg/s), with less CPU per message."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            f(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - one failed answer must not stop the writer
            log.error("ingest.process.answer_failed", error=type(exc).__name__,
                      detail=str(exc)[:300])

    def stop(self, timeout: float) -> None:
        """Nothing waits: every answer was sent when its batch committed."""


def _hold_ingest_lock(url: str) -> Any:
    """Take the ingest lock for this process's life (see the module text). Returns what
    holds it: a file descriptor (SQLite) or a connection of its own (PostgreSQL); the lock
    goes when that is closed, or with the process."""
    import fcntl

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if not database or database == ":memory:":
            return None
        fd = os.open(f"{database}.ingest-lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("ingest.process.waiting",
                        reason="another ingest process holds the ingest lock of this database")
            fcntl.flock(fd, fcntl.LOCK_EX)
        return fd
    # its own connection, not a pooled one: closing it must end the session (and the lock)
    conn = create_engine(parsed, poolclass=NullPool, hide_parameters=True).connect()
    got = conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": INGEST_LOCK_KEY})
    if not got:
        log.warning("ingest.process.waiting",
                    reason="another ingest process holds the ingest lock of this database")
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": INGEST_LOCK_KEY})
    conn.commit()
    return conn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.ingest_process",
                                     description="labrelay's ingest process (started by "
                                     "`labrelay run`; not for use on its own)")
    parser.add_argument("--config", required=True)
    parser.add_argument("--log-format", default="json")
    args = parser.parse_args(argv)

    from pathlib import Path

    from engine.config import load_config
    from engine.ingest_bulk import BulkItem, ingest_bulk, prepare_item
    from engine.logging import configure_logging
    from engine.pipeline import load_runtime, reload_mappings
    from engine.writer import DatabaseWriter
    from lis_bridge.db import make_engine, session_factory

    # Ctrl-C in a terminal and a service manager's SIGTERM reach the whole process group.
    # The engine stops this process itself: it closes our input, and we finish the batch
    # we hold and answer first. So both signals are left to the engine.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(args.log_format, stream=sys.stderr, cache_loggers=True)
    structlog.contextvars.bind_contextvars(engine_process="ingest")
    url = os.environ.get("LABRELAY_DATABASE_URL", "")
    if not url:
        log.error("ingest.process.no_database", reason="LABRELAY_DATABASE_URL is not set")
        return 2
    config = load_config(Path(args.config))
    runtimes = {}
    for iface in config.interfaces:
        if iface.enabled:
            try:
                runtimes[iface.name] = load_runtime(iface)
            except LabrelayError as exc:
                log.error("ingest.interface.failed", interface=iface.name, reason=str(exc))
    lock = _hold_ingest_lock(url)
    # No ping per checkout (a round trip per batch): the writer runs a batch again when
    # its connection turns out dead before anything was committed (engine.writer).
    engine = make_engine(url, writer=True, pool_pre_ping=False)
    # Where a message is decoded and mapped. On PostgreSQL the writer thread spends about
    # half its time waiting for the server with the interpreter released, and this thread
    # decodes meanwhile: HL7 x8 575-592 -> 620-639 msg/s (A/B, three pairs). On SQLite
    # the writer holds the interpreter for most of a batch, and decoding here made it wait
    # for it: 755-802 -> 694-754 msg/s (ASTM x8, session 3: 840-870 -> ~650).
    decode_on_arrival = engine.dialect.name == "postgresql"
    answerer = _Answerer()
    writer = DatabaseWriter(session_factory(engine), cast(Any, answerer),
                            name="labrelay-ingest-writer")
    writer.start()
    out = os.fdopen(1, "wb", buffering=0)
    out_lock = threading.Lock()

    def send(frame: bytes) -> None:
        with out_lock:
            view = memoryview(frame)
            while view:
                written = out.write(view)
                view = view[written or 0:]

    def stats() -> dict[str, Any]:
        s = writer.stats
        return {"batches": s.batches, "units": s.units, "largest_batch": s.largest_batch,
                "busy_seconds": round(s.busy_seconds, 3), "storage_errors": s.storage_errors,
                "wait_seconds": round(s.wait_seconds, 3)}

    def answered(result: Any, request_id: int) -> None:
        send(result_frame(request_id, result, stats()))

    def failed(failure: Failure, request_id: int) -> None:
        storage = failure.check(StorageError) is not None
        send(encode_frame({"id": request_id, "ok": False, "storage": storage,
                           "type": getattr(failure.type, "__name__", "Exception"),
                           "message": failure.getErrorMessage()[:500], "writer": stats()}))

    frames = FrameReader()
    # As `labrelay run` does: what is loaded now lives as long as the process; out of the
    # collector's reach, a full collection no longer walks it and stalls the writer.
    import gc

    gc.freeze()
    log.info("ingest.process.ready", interfaces=len(runtimes))
    try:
        while True:
            data = os.read(0, 1024 * 1024)
            if not data:
                break  # the engine closed our input: finish and exit
            for header, payload in frames.feed(data):
                request_id = int(header["id"])
                if header.get("control") == "reload_mappings":
                    # Between two messages: each message takes the runtime (and mapping)
                    # of its interface as it is when it arrives here.
                    send(encode_frame({"id": request_id, "ok": True,
                                       "reloaded": reload_mappings(runtimes, config.interfaces)}))
                    continue
                rt = runtimes.get(str(header.get("interface", "")))
                if rt is None:
                    send(encode_frame({"id": request_id, "ok": False, "storage": False,
                                       "type": "LabrelayError",
                                       "message": "no such interface in the ingest process"}))
                    continue
                peer, apply_now = str(header.get("peer", "")), bool(header.get("apply_now", True))
                if decode_on_arrival:
                    # decoded and mapped here while the writer waits on the server
                    item = prepare_item(rt, payload, peer, apply_now, copy_rows=True)
                else:
                    # left to the writer thread, in its batch (ingest_bulk decodes an item
                    # that is not)
                    item = BulkItem(rt, payload, peer, apply_now)
                d = writer.submit(_one(item), bulk=ingest_bulk, item=item)
                d.addCallbacks(answered, failed, callbackArgs=(request_id,),
                               errbackArgs=(request_id,))
                if decode_on_arrival:
                    # Let the writer have the interpreter between two messages: back from
                    # the server, it waited for this thread to decode the rest of a burst
                    # of arrivals (a batch's worth, ~0.2 ms each) before it could go on.
                    # HL7 PostgreSQL x8, three alternating pairs: 781-801 -> 819-828
                    # msg/s. Not on SQLite, where this thread only reads and the writer
                    # decodes: ASTM x8 there went 581-607 -> 471-487 with it.
                    time.sleep(0)
    finally:
        writer.stop(STOP_TIMEOUT)
        answerer.stop(STOP_TIMEOUT)
        engine.dispose()
        if isinstance(lock, int):
            os.close(lock)
        elif lock is not None:
            lock.close()
    log.info("ingest.process.exit")
    return 0


__all__ = ["FrameReader", "IngestProcess", "IngestProcessError", "encode_frame", "main"]

if __name__ == "__main__":
    sys.exit(main())
