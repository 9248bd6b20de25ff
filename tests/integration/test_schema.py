"""Migrations and models agree, on SQLite and PostgreSQL; audit tables are append-only."""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, text
from sqlalchemy.exc import DatabaseError, IntegrityError

from lis_bridge.db import current_revision, head_revision, make_engine, upgrade
from lis_bridge.models import APPEND_ONLY_TABLES, Base


def _replaced_on_postgresql() -> dict[str, tuple[str, str]]:
    """The results foreign keys that migration 0004 holds as triggers on PostgreSQL."""
    import importlib

    module = importlib.import_module(
        "lis_bridge.migrations.versions.0004_results_refs_per_statement")
    return dict(module.REPLACED)


def test_migrated_schema_matches_models(db_engine: Engine) -> None:
    with db_engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    if db_engine.dialect.name == "postgresql":
        # Declared in the models, held by triggers on PostgreSQL (checked below): exactly
        # these two, and nothing else differs.
        missing = sorted(entry[1].name for entry in diff if entry[0] == "add_fk")
        assert missing == sorted(_replaced_on_postgresql())
        diff = [entry for entry in diff if entry[0] != "add_fk"]
    assert diff == []


def _sample_and_message(conn: Any) -> tuple[int, int]:
    conn.execute(text(
        "INSERT INTO samples (specimen_id, state, location, state_changed_at, created_at) "
        "VALUES ('REF1', 'PROCESSING', '', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
    conn.execute(text(
        "INSERT INTO raw_messages (interface, direction, protocol, peer, sender, control_id, "
        "message_type, payload, sha256, size, received_at, status, hold_reason, hold_detail, "
        "ack_code, attempts) VALUES ('i', 'in', 'hl7', '', '', 'c1', '', :p, 'x', 1, "
        "CURRENT_TIMESTAMP, 'APPLIED', '', '', '', 1)"), {"p": b"x"})
    sample = conn.execute(text("SELECT id FROM samples")).scalar_one()
    message = conn.execute(text("SELECT id FROM raw_messages")).scalar_one()
    return sample, message


def _insert_result(conn: Any, sample: int, message: int | None, code: str = "GLU") -> None:
    conn.execute(text(
        "INSERT INTO results (sample_fk, test_code, analyzer_code, value_text, comparator, "
        "units, reference_range, flag, is_critical, status, equipment, comments, interface, "
        "message_fk, is_current, created_at) VALUES (:s, :code, :code, '5', '', '', '', '', "
        "false, 'F', '', '', 'i', :m, true, CURRENT_TIMESTAMP)"),
        {"s": sample, "m": message, "code": code})


def test_a_result_must_name_a_sample_and_a_message_that_exist(db_engine: Engine) -> None:
    """Foreign keys on SQLite, statement-level triggers on PostgreSQL (migration 0004):
    the same rows refused, with the same kind of error (SQLSTATE 23503 on PostgreSQL)."""
    with db_engine.begin() as conn:
        sample, message = _sample_and_message(conn)
        _insert_result(conn, sample, message)
        _insert_result(conn, sample, None, "ALT")  # a result need not name a message
    for bad_sample, bad_message in ((sample + 1000, message), (sample, message + 1000)):
        with pytest.raises(IntegrityError), db_engine.begin() as conn:
            _insert_result(conn, bad_sample, bad_message, "K")
    # an UPDATE that points a result elsewhere is held to the same rules
    with pytest.raises(IntegrityError), db_engine.begin() as conn:
        conn.execute(text("UPDATE results SET sample_fk = sample_fk + 1000"))
    with pytest.raises(IntegrityError), db_engine.begin() as conn:
        conn.execute(text("UPDATE results SET message_fk = :m"), {"m": message + 1000})
    # nor can what a result names go away
    with pytest.raises(IntegrityError), db_engine.begin() as conn:
        conn.execute(text("DELETE FROM raw_messages"))
    with pytest.raises(IntegrityError), db_engine.begin() as conn:
        conn.execute(text("DELETE FROM samples"))
    with db_engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM results")).scalar_one() == 2
        assert conn.execute(text("SELECT count(*) FROM samples")).scalar_one() == 1
        assert conn.execute(text("SELECT count(*) FROM raw_messages")).scalar_one() == 1


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_the_results_triggers_lock_what_a_result_names(db_url: str) -> None:
    """On PostgreSQL, what a result names is locked as a foreign key check locks it (FOR
    KEY SHARE): a DELETE in another transaction waits, and then fails; ids never change.
    Only meaningful there (SQLite has one writer at a time)."""
    import psycopg2
    from sqlalchemy.engine import make_url

    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            sample, message = _sample_and_message(conn)
        dsn = make_url(db_url).set(drivername="postgresql").render_as_string(
            hide_password=False)
        writer, deleter = psycopg2.connect(dsn), psycopg2.connect(dsn)
        try:
            with writer.cursor() as cur:
                cur.execute(
                    "INSERT INTO results (sample_fk, test_code, analyzer_code, value_text, "
                    "comparator, units, reference_range, flag, is_critical, status, equipment, "
                    "comments, interface, message_fk, is_current, created_at) VALUES (%s, 'GLU', "
                    "'GLU', '5', '', '', '', '', false, 'F', '', '', 'i', %s, true, now())",
                    (sample, message))
            with deleter.cursor() as cur:
                cur.execute("SET lock_timeout = '200ms'")
                # the writer's uncommitted result holds the sample: the DELETE waits for it
                with pytest.raises(psycopg2.errors.LockNotAvailable):
                    cur.execute("DELETE FROM samples WHERE id = %s", (sample,))
            deleter.rollback()
            writer.commit()
            with deleter.cursor() as cur, pytest.raises(psycopg2.errors.ForeignKeyViolation):
                cur.execute("DELETE FROM samples WHERE id = %s", (sample,))
            deleter.rollback()
            for table in ("samples", "raw_messages"):
                with deleter.cursor() as cur, pytest.raises(
                        psycopg2.errors.ForeignKeyViolation, match="never changes"):
                    cur.execute(f"UPDATE {table} SET id = id + 1000")
                deleter.rollback()
        finally:
            writer.close()
            deleter.close()
    finally:
        engine.dispose()


def test_upgrade_is_idempotent(db_engine: Engine) -> None:
    upgrade(db_engine)
    upgrade(db_engine)
    assert current_revision(db_engine) == head_revision()


@pytest.mark.parametrize("table", APPEND_ONLY_TABLES)
def test_audit_rows_cannot_be_changed_by_raw_sql(db_engine: Engine, table: str) -> None:
    with db_engine.begin() as conn:
        if table == "sample_events":
            conn.execute(
                text(
                    "INSERT INTO samples (specimen_id, state, location, state_changed_at, "
                    "created_at) VALUES ('S1', 'COLLECTED', '', CURRENT_TIMESTAMP, "
                    "CURRENT_TIMESTAMP)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO sample_events (sample_fk, specimen_id, from_state, to_state, "
                    "location, actor, note, at) SELECT id, 'S1', '', 'COLLECTED', '', 'test', "
                    "'', CURRENT_TIMESTAMP FROM samples"
                )
            )
        else:
            conn.execute(
                text(
                    "INSERT INTO access_audit (actor, action, object_type, object_id, detail, "
                    "at) VALUES ('t', 'read', 'message', '1', '', CURRENT_TIMESTAMP)"
                )
            )
    column = "to_state" if table == "sample_events" else "actor"
    with pytest.raises(DatabaseError, match="append-only"), db_engine.begin() as conn:
        conn.execute(text(f"UPDATE {table} SET {column} = 'X'"))
    with pytest.raises(DatabaseError, match="append-only"), db_engine.begin() as conn:
        conn.execute(text(f"DELETE FROM {table}"))
    with db_engine.connect() as conn:
        assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one() == 1


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_the_results_triggers_scan_no_table_while_tables_are_small(db_url: str) -> None:
    """PL/pgSQL keeps the plans of a session's first calls: made while ``samples`` and
    ``raw_messages`` were small, they read those tables whole at every statement from
    then on. The trigger functions run with sequential scans off; counted in the
    transaction's own statistics."""
    engine = make_engine(db_url)
    try:
        counts = text("SELECT relname, seq_scan FROM pg_stat_xact_user_tables "
                      "WHERE relname IN ('samples', 'raw_messages') ORDER BY relname")
        with engine.connect() as conn:
            sample, message = _sample_and_message(conn)
            before = conn.execute(counts).all()
            for n in range(8):  # past the five custom plans PostgreSQL tries first
                _insert_result(conn, sample, message, f"T{n}")
            scanned = conn.execute(counts).all()
            conn.rollback()
    finally:
        engine.dispose()
    assert scanned == before
