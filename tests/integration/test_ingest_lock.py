"""One ingest process writes to a database at a time (engine.ingest_process): the one an
engine killed with SIGKILL leaves behind holds the ingest lock until it has finished its
last batch, so the next cannot run a duplicate check that misses it."""

from __future__ import annotations

import fcntl
import os

from sqlalchemy import text

from engine.ingest_process import INGEST_LOCK_KEY, _hold_ingest_lock
from lis_bridge.db import make_engine


def test_the_ingest_lock_is_held_until_released(db_url: str) -> None:
    held = _hold_ingest_lock(db_url)
    engine = make_engine(db_url)
    try:
        if engine.dialect.name == "sqlite":
            assert isinstance(held, int)
            other = os.open(f"{engine.url.database}.ingest-lock", os.O_RDWR)
            try:
                try:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    raise AssertionError("a second ingest process got the lock")
                except BlockingIOError:
                    pass
                os.close(held)  # the first process ends
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # now it is free
            finally:
                os.close(other)
        else:
            with engine.connect() as conn:
                assert conn.scalar(text("SELECT pg_try_advisory_lock(:k)"),
                                   {"k": INGEST_LOCK_KEY}) is False
                held.close()  # the first process's connection ends with it
                assert conn.scalar(text("SELECT pg_try_advisory_lock(:k)"),
                                   {"k": INGEST_LOCK_KEY}) is True
                conn.scalar(text("SELECT pg_advisory_unlock(:k)"), {"k": INGEST_LOCK_KEY})
    finally:
        engine.dispose()
