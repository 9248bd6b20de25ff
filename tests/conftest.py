"""Shared fixtures: real databases (SQLite always, PostgreSQL when configured).

PostgreSQL tests run against LABRELAY_TEST_DATABASE_URL (``.ci/run`` sets it). Without it
they skip with a line saying how to enable them; with LABRELAY_REQUIRE_POSTGRES=1 a
missing server fails the run instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from lis_bridge.db import make_engine, session_factory, upgrade

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"
FIXTURES = REPO / "fixtures"

PG_ENV = "LABRELAY_TEST_DATABASE_URL"
HOW_TO_ENABLE = (
    f"PostgreSQL tests skipped: set {PG_ENV}=postgresql+psycopg2://postgres@127.0.0.1:5432/"
    "labrelay_test (an empty database you may drop) to run them; .ci/run does this"
)


def _require_postgres() -> bool:
    return os.environ.get("LABRELAY_REQUIRE_POSTGRES", "") not in ("", "0")


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[str]:
    """A migrated template database; each test gets a fresh copy (CREATE ... TEMPLATE is fast)."""
    base_url = os.environ.get(PG_ENV)
    if not base_url:
        if _require_postgres():
            pytest.fail(f"LABRELAY_REQUIRE_POSTGRES is set but {PG_ENV} is not")
        pytest.skip(HOW_TO_ENABLE)
    admin = create_engine(
        base_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
    )
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure to connect means the same thing
        if _require_postgres():
            pytest.fail(f"PostgreSQL at {PG_ENV} is not reachable: {exc}")
        pytest.skip(f"PostgreSQL not reachable ({exc}); {HOW_TO_ENABLE}")
    base_name = make_url(base_url).database
    template = f"{base_name}_tpl_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{template}"'))
    template_url = make_url(base_url).set(database=template).render_as_string(hide_password=False)
    engine = make_engine(template_url)
    upgrade(engine)
    engine.dispose()
    try:
        yield template
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)'))
        admin.dispose()


def _fresh_postgres(template: str) -> Iterator[str]:
    base_url = os.environ[PG_ENV]
    name = f"{make_url(base_url).database}_t_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
    try:
        yield make_url(base_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a freshly migrated database, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'lis.db'}"
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        yield url
    else:
        template = request.getfixturevalue("postgres_template")
        yield from _fresh_postgres(template)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A migrated SQLite database only (for tests where the engine does not matter)."""
    url = f"sqlite:///{tmp_path / 'lis.db'}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


@pytest.fixture
def db_engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(db_engine: Engine) -> sessionmaker[Session]:
    return session_factory(db_engine)


@pytest.fixture
def corpus() -> Path:
    if not CORPUS.is_dir():
        pytest.skip(f"the shared corpus is not at {CORPUS}")
    return CORPUS
