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


def _fail_if(condition: str, message: str, detail: str) -> str:
    """PL/pgSQL: raise foreign_key_violation (SQLSTATE 23503) when ``condition`` holds."""
    return f"""
    IF {condition} THEN
        RAISE EXCEPTION '{message}' USING ERRCODE = 'foreign_key_violation',
                                          DETAIL = '{detail}';
    END IF;"""


def _constraint(column: str, table: str) -> str:
    return next(name for name, ref in REPLACED.items() if ref == (column, table))


def _check_named(column: str, table: str, what: str) -> str:
    """PL/pgSQL: the distinct ids of ``column`` in the statement's rows, locked in
    ``table`` as a foreign key check locks them, in id order (no deadlock between two
    writers); one missing fails the statement as the constraint did."""
    return f"""
    SELECT array_agg(DISTINCT n.{column}) INTO wanted FROM new_results n
        WHERE n.{column} IS NOT NULL;
    SELECT count(*) INTO found FROM (SELECT t.id FROM {table} t WHERE t.id = ANY (wanted)
                                     ORDER BY t.id FOR KEY SHARE OF t) AS locked;""" + _fail_if(
        "found < coalesce(cardinality(wanted), 0)",
        'insert or update on table "results" violates foreign key constraint '
        f'"{_constraint(column, table)}"',
        f"a result names {what} that does not exist")


def _still_named(column: str, table: str, what: str) -> str:
    """PL/pgSQL: fail the DELETE on ``table`` when a result still names one of the rows
    deleted (the table tested first, on its own: SQL does not promise to stop at AND)."""
    return f"""
    IF TG_TABLE_NAME = '{table}' THEN""" + _fail_if(
        f"EXISTS (SELECT 1 FROM results r "
        f"WHERE r.{column} = ANY (ARRAY(SELECT o.id FROM old_rows o)))",
        f'update or delete on table "{table}" violates foreign key constraint '
        f'"{_constraint(column, table)}" on table "results"',
        f"results name this {what}") + """
    END IF;"""


_CHECK_NEW = f"""
CREATE OR REPLACE FUNCTION labrelay_results_refs() RETURNS trigger AS $$
DECLARE
    wanted bigint[];
    found integer;
BEGIN{_check_named("sample_fk", "samples", "a sample")}{
    _check_named("message_fk", "raw_messages", "a raw message")}
    RETURN NULL;
END;
$$ LANGUAGE plpgsql SET enable_seqscan = off
"""

_CHECK_OLD = f"""
CREATE OR REPLACE FUNCTION labrelay_results_referenced() RETURNS trigger AS $$
BEGIN{_still_named("sample_fk", "samples", "sample")}{
    _still_named("message_fk", "raw_messages", "raw message")}
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
