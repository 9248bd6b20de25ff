"""Alembic environment: the engine is passed in by lis_bridge.db.upgrade()."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from lis_bridge.models import Base

config = context.config
target_metadata = Base.metadata

engine = config.attributes.get("engine")
if engine is None:  # the alembic command line, for developers generating revisions
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "sqlite:///labrelay.db")

with engine.begin() as connection:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    context.run_migrations()
