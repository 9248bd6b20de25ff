"""a result's sample and message checked once per statement, not once per row (PostgreSQL)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05

Every result row names its sample (``sample_fk``) and the raw message it came from
(``message_fk``). Declared as foreign keys, PostgreSQL checks each of them with a query
of its own for every row: 50 queries for a 25-result message, a third of the server's
time on the ingest path (perf, bench/ingest_hl7.py; the writer every acknowledgement
waits for spent that long on them).

On PostgreSQL those two constraints are replaced by statement-level triggers that hold
the database to the same rules, with one query per statement for all its rows:

- a result row inserted or updated must name a sample that exists, and a raw message that
  exists (or none): the rows named are locked as a foreign key check locks them (FOR KEY
  SHARE, so a DELETE of one waits for this transaction), and a row that names a missing
  one fails the statement with SQLSTATE 23503 (foreign_key_violation), as the constraint
  did;
- a sample or a raw message that a result names cannot be deleted (23503 again), and no
  sample's or raw message's id can change.

SQLite keeps the declared foreign keys (its checks are cheap, and its writer is not
PostgreSQL's). The models declare them for both; tests/integration/test_schema.py knows
that PostgreSQL holds these two as triggers, and checks that both databases refuse the
same things.
"""
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# constraint name -> (column, referenced table)
REPLACED = {
    "fk_results_sample_fk_samples": ("sample_fk", "samples"),
    "fk_results_message_fk_raw_messages": ("message_fk", "raw_messages"),
}

# The ids are gathered into an array first: a transition table has no statistics, and a
# join with it let the planner scan the whole referenced table. The functions run with
# sequential scans off: PL/pgSQL keeps the plan it made at a session's first calls, and
# one made while a table was small scanned all of it at every statement from then on
# (seen: ``samples`` read whole twice per batch); these lookups are by primary key or
# indexed column, always.
_CHECK_NEW = """
CREATE OR REPLACE FUNCTION labrelay_results_refs() RETURNS trigger AS $$
DECLARE
    wanted bigint[];
    found integer;
BEGIN
    -- The rows named are locked as a foreign key check locks them, in id order (no
    -- deadlock between two writers); one missing fails the statement.
    SELECT array_agg(DISTINCT n.sample_fk) INTO wanted FROM new_results n;
    SELECT count(*) INTO found FROM (SELECT s.id FROM samples s WHERE s.id = ANY (wanted)
                                     ORDER BY s.id FOR KEY SHARE OF s) AS locked;
    IF found < coalesce(cardinality(wanted), 0) THEN
        RAISE EXCEPTION 'insert or update on table "results" violates foreign key '
            'constraint "fk_results_sample_fk_samples"'
            USING ERRCODE = 'foreign_key_violation',
                  DETAIL = 'a result names a sample that does not exist';
    END IF;
    SELECT array_agg(DISTINCT n.message_fk) INTO wanted FROM new_results n
        WHERE n.message_fk IS NOT NULL;
    SELECT count(*) INTO found FROM (SELECT r.id FROM raw_messages r WHERE r.id = ANY (wanted)
                                     ORDER BY r.id FOR KEY SHARE OF r) AS locked;
    IF found < coalesce(cardinality(wanted), 0) THEN
        RAISE EXCEPTION 'insert or update on table "results" violates foreign key '
            'constraint "fk_results_message_fk_raw_messages"'
            USING ERRCODE = 'foreign_key_violation',
                  DETAIL = 'a result names a raw message that does not exist';
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql SET enable_seqscan = off
"""

_CHECK_OLD = """
CREATE OR REPLACE FUNCTION labrelay_results_referenced() RETURNS trigger AS $$
BEGIN
    IF TG_TABLE_NAME = 'samples' THEN
        IF EXISTS (SELECT 1 FROM results r
                   WHERE r.sample_fk = ANY (ARRAY(SELECT o.id FROM old_rows o))) THEN
            RAISE EXCEPTION 'update or delete on table "samples" violates foreign key '
                'constraint "fk_results_sample_fk_samples" on table "results"'
                USING ERRCODE = 'foreign_key_violation',
                      DETAIL = 'results name this sample';
        END IF;
    ELSIF EXISTS (SELECT 1 FROM results r
                  WHERE r.message_fk = ANY (ARRAY(SELECT o.id FROM old_rows o))) THEN
        RAISE EXCEPTION 'update or delete on table "raw_messages" violates foreign key '
            'constraint "fk_results_message_fk_raw_messages" on table "results"'
            USING ERRCODE = 'foreign_key_violation',
                  DETAIL = 'results name this raw message';
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql SET enable_seqscan = off
"""

_ID_FIXED = """
CREATE OR REPLACE FUNCTION labrelay_id_fixed() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'labrelay: the id of a row of % never changes', TG_TABLE_NAME
        USING ERRCODE = 'foreign_key_violation';
END;
$$ LANGUAGE plpgsql
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(_CHECK_NEW)
    op.execute(_CHECK_OLD)
    op.execute(_ID_FIXED)
    for name in REPLACED:
        op.execute(f"ALTER TABLE results DROP CONSTRAINT {name}")
    for event in ("INSERT", "UPDATE"):
        op.execute(
            f"CREATE TRIGGER results_refs_{event.lower()} AFTER {event} ON results "
            "REFERENCING NEW TABLE AS new_results FOR EACH STATEMENT "
            "EXECUTE FUNCTION labrelay_results_refs()")
    for table in ("samples", "raw_messages"):
        op.execute(
            f"CREATE TRIGGER {table}_results_refs AFTER DELETE ON {table} "
            "REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT "
            "EXECUTE FUNCTION labrelay_results_referenced()")
        op.execute(
            f"CREATE TRIGGER {table}_id_fixed BEFORE UPDATE OF id ON {table} FOR EACH ROW "
            "WHEN (OLD.id IS DISTINCT FROM NEW.id) EXECUTE FUNCTION labrelay_id_fixed()")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in ("samples", "raw_messages"):
        op.execute(f"DROP TRIGGER IF EXISTS {table}_id_fixed ON {table}")
        op.execute(f"DROP TRIGGER IF EXISTS {table}_results_refs ON {table}")
    for event in ("insert", "update"):
        op.execute(f"DROP TRIGGER IF EXISTS results_refs_{event} ON results")
    for name, (column, table) in REPLACED.items():
        op.execute(f"ALTER TABLE results ADD CONSTRAINT {name} FOREIGN KEY ({column}) "
                   f"REFERENCES {table} (id)")
    for function in ("labrelay_id_fixed", "labrelay_results_referenced",
                     "labrelay_results_refs"):
        op.execute(f"DROP FUNCTION IF EXISTS {function}()")
