"""One database writer thread fed by a queue, with adaptive group commit.

Measured on a 2-core machine (DESIGN.md): a commit per message gives ~2,700 msg/s of raw
storage, an adaptive group commit ~4,100 (write at once when idle, gather what arrived
while the last commit ran), a fixed wait window is slower because instruments wait for
each ACK. So: no timer, no window; the thread takes everything queued, runs it in one
transaction and commits once. One thread hop costs ~60 µs, so one writer fed by a queue
beats a hop per message.

Each unit of work is a callable ``work(session) -> T``. A unit may also name a ``bulk``
function, ``bulk(session, items) -> results``: consecutive units of one batch that name the
same bulk function run as one call, which lets the pipeline store and apply a whole group
commit's messages with a few statements instead of a dozen per message. If one unit (or
one bulk call) raises, the batch is rolled back and its units are re-run one per
transaction through their own ``work``, so one bad message never sinks its neighbours.
If the database itself fails, every unit of the batch fails with :class:`StorageError`
and the caller sends no positive acknowledgement.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import structlog
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads

from engine.errors import LabrelayError, StorageError

log = structlog.get_logger(__name__)
T = TypeVar("T")

MAX_BATCH = 256
# session.info key: True while the batch's last group runs. Its final write may end the
# transaction itself (see engine.ingest_bulk); nothing may be written after it.
COMMIT_WITH_LAST_WRITE = "labrelay.commit_with_last_write"
MAX_QUEUE = 10_000
# A value quoted at the end of an error's first line, to the end of that line (a value
# with a newline in it ends the line before its closing quote).
_QUOTED_VALUE = re.compile(r""": ["'].*""")


BulkWork = Callable[[Session, list[Any]], list[Any]]


class UnitRefused(LabrelayError):
    """The database refused what one unit of work writes (an integrity or data error),
    while storage itself works: a fault of that unit, not of the database."""


@dataclass
class _Unit(Generic[T]):
    work: Callable[[Session], T]
    deferred: Deferred[T]
    queued_at: float = field(default_factory=time.perf_counter)
    bulk: BulkWork | None = None
    item: Any = None


@dataclass
class WriterStats:
    batches: int = 0
    units: int = 0
    failures: int = 0
    storage_errors: int = 0
    last_error: str = ""
    largest_batch: int = 0
    busy_seconds: float = 0.0  # time spent running batches (its share of wall time: load)
    # summed over units: how long each waited in the queue before its batch began (the
    # mean, wait_seconds / units, is what a message loses to the batch before its own)
    wait_seconds: float = 0.0


class DatabaseWriter:
    """Runs units of work on one thread, in batches, and fires Deferreds on the reactor."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        reactor: IReactorFromThreads,
        *,
        max_batch: int = MAX_BATCH,
        max_queue: int = MAX_QUEUE,
        name: str = "labrelay-db-writer",
    ) -> None:
        self._sessions = sessions
        self._reactor = reactor
        self._max_batch = max_batch
        self._queue: queue.Queue[_Unit[Any] | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False
        self._stopping = False
        self.stats = WriterStats()

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then stop. Blocks up to ``timeout`` seconds."""
        if not self._started or self._stopping:
            return
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout)

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    def submit(self, work: Callable[[Session], T], *, bulk: BulkWork | None = None,
               item: Any = None) -> Deferred[T]:
        """Queue ``work``; the Deferred fires on the reactor thread with its result.

        With ``bulk``, this unit may instead run as ``bulk(session, [..., item, ...])``
        together with the units around it that name the same function; ``bulk`` must
        return one result per item, in order, exactly what each ``work`` would return.
        """
        d: Deferred[T] = Deferred()
        if self._stopping or not self._started:
            d.errback(StorageError("the database writer is not running"))
            return d
        try:
            self._queue.put_nowait(_Unit(work, d, bulk=bulk, item=item))
        except queue.Full:
            d.errback(StorageError("the database writer is overloaded; the sender should resend"))
        return d

    # ------------------------------------------------------------------ writer thread

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch: list[_Unit[Any]] = [first]
            stop_after = False
            while len(batch) < self._max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop_after = True
                    break
                batch.append(nxt)
            self._run_batch(batch)
            if stop_after:
                return

    def _run_batch(self, batch: list[_Unit[Any]]) -> None:
        started = time.perf_counter()
        self.stats.wait_seconds += sum(started - unit.queued_at for unit in batch)
        try:
            self._run_batch_timed(batch)
        finally:
            self.stats.busy_seconds += time.perf_counter() - started

    def _run_batch_timed(self, batch: list[_Unit[Any]], *, again: bool = False) -> None:
        if not again:
            self.stats.batches += 1
            self.stats.units += len(batch)
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        session = self._sessions()
        results: list[Any] = []
        failed_unit = False
        try:
            groups = _groups(batch)
            for number, group in enumerate(groups, start=1):
                # The last group's final write may commit the batch itself (PostgreSQL fast
                # lane: "...; COMMIT" in the same round trip); session.commit() below then
                # finds nothing left to commit.
                session.info[COMMIT_WITH_LAST_WRITE] = number == len(groups)
                try:
                    bulk = group[0].bulk
                    if bulk is not None:
                        done = bulk(session, [unit.item for unit in group])
                        if len(done) != len(group):
                            raise RuntimeError("bulk unit returned the wrong number of results")
                        results.extend(done)
                    else:
                        results.append(group[0].work(session))
                except (OperationalError, DBAPIError) as exc:
                    if _is_storage_failure(exc):
                        raise
                    failed_unit = True
                    break
                except Exception:  # noqa: BLE001 - isolate the unit below, one per transaction
                    failed_unit = True
                    break
            if failed_unit:
                session.rollback()
            else:
                session.commit()
        except SQLAlchemyError as exc:
            session.rollback()
            session.close()
            if (not again and isinstance(exc, DBAPIError) and exc.connection_invalidated):
                # A pooled connection the database dropped (a restart, a network cut): the
                # pool has discarded it, and the batch runs once more on a new one. Had the
                # first run committed after all, the second finds each message stored and
                # answers it as a duplicate: nothing is applied twice.
                log.warning("db.connection.lost", units=len(batch), error=type(exc).__name__)
                self._run_batch_timed(batch, again=True)
                return
            self._fail_all(batch, exc)
            return
        finally:
            session.close()
        if failed_unit:
            for unit in batch:
                self._run_alone(unit)
            return
        # One hop to the reactor for the whole batch, not one per unit.
        self._reactor.callFromThread(_fire_all, [(u.deferred, r) for u, r in
                                                 zip(batch, results, strict=True)])

    def _run_alone(self, unit: _Unit[Any]) -> None:
        session = self._sessions()
        try:
            result = unit.work(session)
            session.commit()
        except SQLAlchemyError as exc:
            session.rollback()
            self.stats.last_error = type(exc).__name__
            if isinstance(exc, DBAPIError) and not _is_storage_failure(exc):
                # The database refused what this unit writes (a constraint, a value it
                # cannot take): storage works, and the same unit would be refused again.
                # A fault of the unit's content, as an exception raised in it is: the
                # pipeline keeps the message and holds it, rather than having the
                # analyzer resend it for ever to "the database is unavailable".
                self.stats.failures += 1
                log.error("db.write.refused", error=type(exc).__name__,
                          detail=_first_line(exc))
                self._reactor.callFromThread(unit.deferred.errback, UnitRefused(
                    f"the database refused the write ({_first_line(exc)})"))
                return
            self.stats.storage_errors += 1
            log.error("db.write.failed", error=type(exc).__name__, detail=_first_line(exc))
            self._reactor.callFromThread(unit.deferred.errback, StorageError(_describe(exc)))
        except Exception as exc:  # noqa: BLE001 - handed to the caller's errback, never lost
            session.rollback()
            self.stats.failures += 1
            self.stats.last_error = type(exc).__name__
            self._reactor.callFromThread(unit.deferred.errback, exc)
        else:
            self._reactor.callFromThread(unit.deferred.callback, result)
        finally:
            session.close()

    def _fail_all(self, batch: list[_Unit[Any]], exc: Exception) -> None:
        self.stats.storage_errors += 1
        self.stats.last_error = type(exc).__name__
        log.error("db.commit.failed", error=type(exc).__name__, units=len(batch),
                  detail=_first_line(exc))
        error = StorageError(_describe(exc))
        for unit in batch:
            self._reactor.callFromThread(unit.deferred.errback, error)


def _groups(batch: list[_Unit[Any]]) -> list[list[_Unit[Any]]]:
    """Consecutive units naming the same bulk function, together; every other unit alone."""
    groups: list[list[_Unit[Any]]] = []
    for unit in batch:
        if groups and unit.bulk is not None and groups[-1][-1].bulk is unit.bulk:
            groups[-1].append(unit)
        else:
            groups.append([unit])
    return groups


def _fire_all(outcomes: list[tuple[Deferred[Any], Any]]) -> None:
    for deferred, result in outcomes:
        deferred.callback(result)


def _is_storage_failure(exc: DBAPIError) -> bool:
    return bool(exc.connection_invalidated) or isinstance(exc, OperationalError)


def _first_line(exc: Exception) -> str:
    """What went wrong, without the data: the error's first line, less a value it quotes
    at the end (``invalid input syntax for type numeric: "5.4x"``). The lines after it
    (psycopg2's ``LINE 1:`` excerpt of the statement, ``DETAIL: Key (...)=(...)``,
    SQLAlchemy's ``[parameters: ...]``) hold results, units and ids: never logged."""
    lines = str(exc).splitlines()
    first = lines[0] if lines else type(exc).__name__
    return _QUOTED_VALUE.sub(": ...", first)[:200]


def _describe(exc: Exception) -> str:
    return f"the database did not store the message ({_first_line(exc)}); nothing was acknowledged"
