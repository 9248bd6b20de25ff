"""Migrations and models agree, on SQLite and PostgreSQL; audit tables are append-only."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, text
from sqlalchemy.exc import DatabaseError

from lis_bridge.db import current_revision, head_revision, upgrade
from lis_bridge.models import APPEND_ONLY_TABLES, Base


def test_migrated_schema_matches_models(db_engine: Engine) -> None:
    with db_engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == []


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
