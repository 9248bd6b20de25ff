"""Database engines, sessions and schema upgrades (Alembic) for SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from engine.errors import StorageError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
DEFAULT_DATABASE_URL = "sqlite:///labrelay.db"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    if not isinstance(dbapi_connection, sqlite3.Connection):
        return
    # pysqlite's own transaction handling breaks SAVEPOINT (SQLAlchemy docs, "Serializable
    # isolation / Savepoints / Transactional DDL"): turn it off and emit BEGIN ourselves.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL: readers never block the writer; synchronous=FULL: a commit survives power loss,
    # which is what "stored before acknowledged" means.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    # Deferred: a reader never holds a lock in WAL mode, so an operator's open read can
    # never stall the engine's writer.
    conn.exec_driver_sql("BEGIN")


def _sqlite_begin_immediate(conn: Any) -> None:
    # IMMEDIATE takes the write lock at the start: a transaction that reads and then writes
    # waits for the lock (busy_timeout) instead of failing with SQLITE_BUSY on upgrade.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str, *, writer: bool = False, **kwargs: Any) -> Engine:
    """An Engine for ``url``; SQLite gets WAL and foreign keys, PostgreSQL a bounded pool.

    ``writer=True`` is for the engine's single writer thread (and other units that always
    write): on SQLite its transactions take the write lock when they begin.
    """
    # Error texts must not carry bound values (result values, names) into logs.
    kwargs.setdefault("hide_parameters", True)
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StorageError(
            f"database URL {url!r} is not valid: {exc}. Use e.g. sqlite:///labrelay.db or "
            "postgresql+psycopg2://user@host:5432/dbname"
        ) from exc
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": 10}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin_immediate if writer else _sqlite_begin)
        return engine
    connect_args: dict[str, Any] = {"connect_timeout": 10}
    if writer and parsed.get_driver_name() == "psycopg2":
        # One round trip fewer per transaction: BEGIN rides with the first statement.
        from lis_bridge.pg_connection import OneTripConnection

        connect_args["connection_factory"] = OneTripConnection
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 5)
    kwargs.setdefault("max_overflow", 5)
    kwargs.setdefault("pool_timeout", 10)
    kwargs.setdefault("connect_args", connect_args)
    return create_engine(url, **kwargs)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _alembic_config(engine: Engine) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Create or upgrade the schema; running it again changes nothing."""
    try:
        command.upgrade(_alembic_config(engine), revision)
    except SQLAlchemyError as exc:
        raise StorageError(f"could not upgrade the database schema: {exc}") from exc


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    script = ScriptDirectory.from_config(_alembic_config(create_engine("sqlite://")))
    head = script.get_current_head()
    assert head is not None
    return head


def ensure_current(engine: Engine) -> None:
    """Refuse to run on a schema that is older than this code."""
    current = current_revision(engine)
    if current != head_revision():
        raise StorageError(
            f"the database schema is at revision {current or 'none'}, this labrelay needs "
            f"{head_revision()}: run `labrelay db upgrade` first"
        )
