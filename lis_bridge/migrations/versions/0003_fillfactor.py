"""room on each page for the rows the engine updates in place (PostgreSQL)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25

An ordered test changes status when its result arrives, a sample changes state five times
in its life, a raw message once (RECEIVED or HELD to APPLIED). With full pages (the
default fillfactor 100) every such UPDATE writes the new row version on another page and
a new entry in every index of the table. With room left on the page, PostgreSQL updates
the row in place (a HOT update: no index entry, nothing for VACUUM to chase). Measured
with bench/ingest_hl7.py: the status UPDATE of 25 ordered tests per message cost more than
writing the 25 result rows. Only new pages take the setting; SQLite has no such knob.
"""
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

FILLFACTOR = {"ordered_tests": 50, "samples": 70, "raw_messages": 90, "outbox_jobs": 70}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, fillfactor in FILLFACTOR.items():
        op.execute(f"ALTER TABLE {table} SET (fillfactor = {fillfactor})")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in FILLFACTOR:
        op.execute(f"ALTER TABLE {table} RESET (fillfactor)")
