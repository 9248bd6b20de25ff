"""A psycopg2 connection whose BEGIN travels with the transaction's first statement.

psycopg2 opens every transaction with a ``BEGIN`` of its own, one round trip before the
first statement. On the 2-core virtual machines this project runs on, a round trip to
PostgreSQL on another core costs 0.4-0.5 ms of waiting (measured: ``SELECT 1`` p50 ~450 µs
across cores, ~70 µs on the same core), and the ingest writer's group commit ran seven per
batch. This connection keeps psycopg2's transaction semantics (a transaction begins with
the first statement and lasts until ``commit()`` or ``rollback()``), but sends the
``BEGIN`` in the same query string as that first statement.

It also lets a statement end the transaction itself (``...; COMMIT``): :meth:`commit` then
has nothing left to do, which it learns from libpq's transaction status, not from a flag
of ours. The ingest fast lane uses that to write a batch and commit it in one trip.

Only the database writer's engine uses it (:func:`lis_bridge.db.make_engine` with
``writer=True``). Server-side (named) cursors are not available on it.
"""

from __future__ import annotations

from typing import Any

import psycopg2
import psycopg2.extensions as ext

_BEGIN = "BEGIN;\n"


class OneTripConnection(ext.connection):
    """psycopg2 connection: transactional as usual, without psycopg2's separate BEGIN."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # psycopg2's own autocommit switch, so that it never sends a BEGIN itself; the
        # cursors below send ours. To callers the connection is not in autocommit.
        ext.connection.autocommit.__set__(self, True)
        self.cursor_factory = OneTripCursor
        self._autocommit = False  # what callers asked for (SQLAlchemy's ping asks for True)

    @property
    def autocommit(self) -> bool:
        return self._autocommit

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        if self.in_transaction():
            # as psycopg2 itself refuses it
            raise psycopg2.ProgrammingError(
                "set_session cannot be used inside a transaction")
        self._autocommit = bool(value)

    def set_session(self, isolation_level: Any = None, readonly: Any = None,
                    deferrable: Any = None, autocommit: Any = None) -> None:
        # psycopg2 would put these in a BEGIN of its own, which this connection never
        # sends: refused rather than silently ignored.
        if isolation_level is not None or readonly is not None or deferrable is not None:
            raise psycopg2.NotSupportedError(
                "labrelay's writer connection runs at the server's default isolation; "
                "set isolation, read-only or deferrable on another engine")
        if autocommit is not None:
            self.autocommit = autocommit

    def set_isolation_level(self, level: int) -> None:
        if level == ext.ISOLATION_LEVEL_AUTOCOMMIT:
            self.autocommit = True
        elif level == ext.ISOLATION_LEVEL_DEFAULT:
            self.autocommit = False
        else:
            self.set_session(isolation_level=level)

    def in_transaction(self) -> bool:
        """True while a transaction is open on the server (begun, not yet ended)."""
        return self.get_transaction_status() != ext.TRANSACTION_STATUS_IDLE

    def commit(self) -> None:
        if self._autocommit:
            return
        status = self.get_transaction_status()
        if status == ext.TRANSACTION_STATUS_IDLE:
            return  # nothing begun, or a statement committed it (``...; COMMIT``)
        with ext.cursor(self) as cursor:
            if status == ext.TRANSACTION_STATUS_INERROR:
                cursor.execute("ROLLBACK")
                raise psycopg2.InternalError(
                    "the transaction had failed and was rolled back, not committed")
            cursor.execute("COMMIT")
            if cursor.statusmessage != "COMMIT":
                raise psycopg2.InternalError(
                    f"COMMIT answered {cursor.statusmessage!r}: nothing was committed")

    def rollback(self) -> None:
        if self._autocommit or self.get_transaction_status() == ext.TRANSACTION_STATUS_IDLE:
            return
        with ext.cursor(self) as cursor:
            cursor.execute("ROLLBACK")


class OneTripCursor(ext.cursor):
    """Cursor of :class:`OneTripConnection`: the first statement of a transaction carries
    its BEGIN."""

    def _begin_needed(self) -> bool:
        conn = self.connection
        return (not conn.autocommit
                and conn.get_transaction_status() == ext.TRANSACTION_STATUS_IDLE)

    def _begin(self) -> None:
        if self._begin_needed():
            super().execute("BEGIN")

    def execute(self, query: Any, vars: Any = None) -> None:
        if self._begin_needed():
            query = _with_begin(self, query)
        super().execute(query, vars)

    def executemany(self, query: Any, vars_list: Any) -> None:
        self._begin()
        super().executemany(query, vars_list)

    def callproc(self, procname: Any, parameters: Any = None) -> Any:
        self._begin()
        return super().callproc(procname, parameters)

    def copy_expert(self, sql: Any, file: Any, size: int = 8192) -> None:
        if self._begin_needed():
            sql = _with_begin(self, sql)
        super().copy_expert(sql, file, size)

    def copy_from(self, *args: Any, **kwargs: Any) -> None:
        self._begin()
        super().copy_from(*args, **kwargs)

    def copy_to(self, *args: Any, **kwargs: Any) -> None:
        self._begin()
        super().copy_to(*args, **kwargs)


def _with_begin(cursor: ext.cursor, query: Any) -> Any:
    if isinstance(query, bytes):
        return _BEGIN.encode() + query
    if isinstance(query, str):
        return _BEGIN + query
    return _BEGIN + query.as_string(cursor)  # psycopg2.sql.Composable


__all__ = ["OneTripConnection", "OneTripCursor"]
