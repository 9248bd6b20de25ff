"""The writer's PostgreSQL connection (lis_bridge.pg_connection) and the writer's answer to
a connection the database dropped, on a real PostgreSQL."""

from __future__ import annotations

import io
import queue
import threading
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from engine.ingest_process import _Answerer
from engine.writer import DatabaseWriter
from lis_bridge.db import make_engine, session_factory
from lis_bridge.pg_connection import OneTripConnection
from tests.conftest import _fresh_postgres

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_url(postgres_template: str) -> Iterator[str]:
    yield from _fresh_postgres(postgres_template)


def _dsn(url: str) -> str:
    u = make_url(url)
    return f"host={u.host} port={u.port or 5432} user={u.username} dbname={u.database}"


@pytest.fixture
def conn(pg_url: str) -> Iterator[Any]:
    c = psycopg2.connect(_dsn(pg_url), connection_factory=OneTripConnection)
    with c.cursor() as cur:
        cur.execute("CREATE TABLE t (n int PRIMARY KEY, v text)")
    c.commit()
    yield c
    c.close()


def _count(url: str) -> int:
    with psycopg2.connect(_dsn(url)) as other, other.cursor() as cur:
        cur.execute("SELECT count(*) FROM t")
        return int(cur.fetchone()[0])


def test_transaction_begins_with_its_first_statement(conn: Any, pg_url: str) -> None:
    assert not conn.autocommit and not conn.in_transaction()
    with conn.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (%s, %s)", (1, "a"))
        assert conn.in_transaction()
        cur.execute("INSERT INTO t VALUES (2, 'b')")
        assert _count(pg_url) == 0  # nothing is visible before the commit
    conn.rollback()
    assert not conn.in_transaction() and _count(pg_url) == 0
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO t VALUES (%s, %s)", [(3, "c"), (4, "d")])
        cur.copy_expert("COPY t FROM STDIN", io.StringIO("5\te\n"))
        assert _count(pg_url) == 0
    conn.commit()
    assert _count(pg_url) == 3


def test_a_failed_transaction_is_never_reported_committed(conn: Any, pg_url: str) -> None:
    with conn.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (1, 'a')")
        with pytest.raises(psycopg2.errors.UniqueViolation):
            cur.execute("INSERT INTO t VALUES (1, 'again')")
    with pytest.raises(psycopg2.InternalError, match="rolled back, not committed"):
        conn.commit()
    assert not conn.in_transaction() and _count(pg_url) == 0
    with conn.cursor() as cur:  # and the connection goes on
        cur.execute("INSERT INTO t VALUES (1, 'a')")
    conn.commit()
    assert _count(pg_url) == 1


def test_a_statement_may_commit_the_transaction_itself(conn: Any, pg_url: str) -> None:
    with conn.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (1, 'a')")
        cur.copy_expert("INSERT INTO t VALUES (2, 'b');\nCOPY t FROM STDIN;\nCOMMIT",
                        io.StringIO("3\tc\n"))
    assert not conn.in_transaction() and _count(pg_url) == 3
    conn.commit()  # nothing left to do
    conn.rollback()  # nor to undo
    assert _count(pg_url) == 3


def test_autocommit_as_callers_ask_for_it(conn: Any, pg_url: str) -> None:
    conn.autocommit = True  # SQLAlchemy's ping does this
    with conn.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (1, 'a')")
        assert not conn.in_transaction() and _count(pg_url) == 1
    conn.autocommit = False
    with conn.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (2, 'b')")
        with pytest.raises(psycopg2.ProgrammingError, match="inside a transaction"):
            conn.autocommit = True
    conn.rollback()
    assert _count(pg_url) == 1


def test_session_settings_it_cannot_honour_are_refused(conn: Any, pg_url: str) -> None:
    import psycopg2.extensions as ext

    with pytest.raises(psycopg2.NotSupportedError, match="default isolation"):
        conn.set_session(isolation_level="SERIALIZABLE")
    with pytest.raises(psycopg2.NotSupportedError):
        conn.set_isolation_level(ext.ISOLATION_LEVEL_SERIALIZABLE)
    conn.set_isolation_level(ext.ISOLATION_LEVEL_AUTOCOMMIT)
    assert conn.autocommit
    conn.set_session(autocommit=False)
    assert not conn.autocommit
    with conn.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (1, 'a')")
    conn.rollback()
    assert _count(pg_url) == 0


def test_the_writer_engine_with_ping_and_sqlalchemy_sessions(pg_url: str) -> None:
    engine = make_engine(pg_url, writer=True)  # pool_pre_ping on, as the engine's own
    try:
        for _ in range(3):
            with session_factory(engine)() as session:
                session.execute(text("CREATE TABLE IF NOT EXISTS t (n int PRIMARY KEY)"))
                session.execute(text("INSERT INTO t VALUES (:n)"), {"n": _ + 1})
                session.commit()
        with session_factory(engine)() as session:
            session.execute(text("INSERT INTO t VALUES (99)"))
            session.rollback()
            assert session.scalar(text("SELECT count(*) FROM t")) == 3
    finally:
        engine.dispose()


def _terminate_other_backends(url: str) -> None:
    with psycopg2.connect(_dsn(url)) as admin, admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()")


def test_writer_runs_a_batch_again_on_a_connection_the_database_dropped(pg_url: str) -> None:
    """No ping per batch on the ingest writer: when its pooled connection is dead (here:
    terminated by the server, as in a PostgreSQL restart), the batch runs once more on a
    new connection, and is stored once."""
    engine = make_engine(pg_url, writer=True, pool_pre_ping=False, pool_size=1)
    answers: Any = _Answerer()  # no reactor: the ingest process's answer thread
    writer = DatabaseWriter(session_factory(engine), answers)
    writer.start()
    outcomes: queue.Queue[Any] = queue.Queue()

    def insert(n: int) -> Any:
        def work(session: Session) -> int:
            session.execute(text("CREATE TABLE IF NOT EXISTS t (n int PRIMARY KEY)"))
            session.execute(text("INSERT INTO t VALUES (:n)"), {"n": n})
            return n
        return work

    try:
        for n in (1, 2):
            if n == 2:
                _terminate_other_backends(pg_url)
            d = writer.submit(insert(n))
            d.addBoth(outcomes.put)
            assert outcomes.get(timeout=30) == n
        assert writer.stats.storage_errors == 0
        with engine.connect() as c:
            assert sorted(c.execute(text("SELECT n FROM t")).scalars()) == [1, 2]
    finally:
        writer.stop()
        answers.stop(30)
        engine.dispose()


def test_writer_still_refuses_when_the_database_stays_down(pg_url: str) -> None:
    """One more try, not a loop: with every new connection refused as well, the batch
    fails with a StorageError (the analyzer is told to resend)."""
    from engine.errors import StorageError

    engine = make_engine(pg_url, writer=True, pool_pre_ping=False, pool_size=1)
    answers: Any = _Answerer()  # no reactor: the ingest process's answer thread
    writer = DatabaseWriter(session_factory(engine), answers)
    writer.start()
    outcomes: queue.Queue[Any] = queue.Queue()
    calls = threading.Semaphore(0)

    def work(session: Session) -> int:
        calls.release()
        session.execute(text("SELECT 1"))
        _terminate_other_backends(pg_url)  # including this very session's connection
        session.execute(text("SELECT 1"))
        return 1

    try:
        writer.submit(work).addBoth(outcomes.put)
        outcome = outcomes.get(timeout=30)
        assert hasattr(outcome, "check") and outcome.check(StorageError)
        assert calls.acquire(timeout=0) and calls.acquire(timeout=0)  # ran twice
        assert not calls.acquire(timeout=0)  # and no more
    finally:
        writer.stop()
        answers.stop(30)
        engine.dispose()

