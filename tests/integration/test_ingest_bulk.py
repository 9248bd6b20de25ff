"""The pipeline's fast lane gives the same outcome as one message at a time.

:func:`engine.ingest_bulk.ingest_bulk` stores and applies a group commit's messages
together. Whatever the mix (plain results, resends, reused control ids, unknown or not
received specimens, unmapped codes, critical values, corrections, preliminaries after
finals, several messages for one specimen), the database must end exactly as when each
message is ingested alone, in arrival order, and each message must get the same outcome
and ACK code. Hypothesis draws the mixes; each is run both ways on fresh databases and the
two are compared table by table (ids aside). DESIGN.md durability rules 3-5.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from drivers.registry import create_driver
from engine.config import InterfaceConfig
from engine.ingest_bulk import BulkItem, ingest_bulk, ingest_one, prepare_item
from engine.mapping import load_mapping
from engine.pipeline import IngestResult, InterfaceRuntime
from lis_bridge.db import make_engine, session_factory, upgrade
from lis_bridge.lifecycle import transition
from lis_bridge.models import MessageStatus, Sample
from lis_bridge.orders import import_orders_csv
from lis_bridge.types import ResultInput

REPO = Path(__file__).resolve().parents[2]
MAPPING = REPO / "mappings" / "generic_hl7.yaml"

ORDERS = (
    "specimen_id,patient_id,patient_name,sex,birth_date,tests,collected_at,location\n"
    "P-1,PX-1,A B,F,1970-01-01,GLU NA K ALT,2025-01-01T08:00:00Z,Ward\n"
    "P-2,PX-2,C D,M,1980-01-01,GLU ALT,2025-01-01T08:00:00Z,Ward\n"
    "P-3,PX-3,E F,F,1990-01-01,GLU,2025-01-01T08:00:00Z,Ward\n"
    + "".join(f"P-{n},PX-{n},G H,{'MF'[n % 2]},1960-01-01,GLU NA K ALT,2025-01-01T08:00:00Z,"
              "Ward\n" for n in range(5, 11))
)
# P-3 stays COLLECTED; P-4 is not in the LIS
RECEIVED = ("P-1", "P-2", *(f"P-{n}" for n in range(5, 11)))


# The same tests with one range each (none by sex or age): messages are then mapped on the
# reactor as they arrive (prepare_item), a path the generic mapping never takes.
PLAIN_MAPPING = """
metadata: {analyzer: plain, protocol: hl7, version: '1'}
tests:
  GLU:
    test: GLU
    units: {ucum: mmol/L}
    reference_ranges: [{low: 3.9, high: 6.1}]
    critical: {low: 2.5, high: 25.0}
  NA:
    test: NA
    units: {ucum: mmol/L}
    reference_ranges: [{low: 135, high: 145}]
    critical: {low: 120, high: 160}
  K:
    test: K
    units: {ucum: mmol/L}
    reference_ranges: [{low: 3.5, high: 5.1}]
    critical: {low: 2.8, high: 6.2}
  ALT:
    test: ALT
    units: {ucum: U/L}
    reference_ranges: [{high: 41}]
"""


def runtime(mapping: Path = MAPPING) -> InterfaceRuntime:
    config = InterfaceConfig(name="t-hl7", protocol="hl7", driver="hl7-generic",
                             mapping=mapping, listen="tcp:0:interface=127.0.0.1")
    return InterfaceRuntime(config, create_driver("hl7-generic", "hl7"), load_mapping(mapping))


UNITS = {"GLU": "mmol/L", "NA": "mmol/L", "K": "mmol/L", "ALT": "U/L", "ZZZ": "g/L"}


def oru(control_id: str, specimen_id: str, observations: list[tuple[str, str, str]]) -> bytes:
    segments = [f"MSH|^~\\&|AN|LAB|LIS|LAB|20250303101500||ORU^R01|{control_id}|P|2.5.1",
                f"OBR|1|{specimen_id}|{specimen_id}|CHEM"]
    for n, (code, value, status) in enumerate(observations, start=1):
        segments.append(f"OBX|{n}|NM|{code}^x||{value}|{UNITS[code]}|||||{status}")
    return ("\r".join(segments) + "\r").encode()


def prepare(url: str) -> None:
    engine = make_engine(url)
    upgrade(engine)
    with session_factory(engine)() as session:
        assert import_orders_csv(session, ORDERS, actor="t").ok
        session.commit()
        for specimen in RECEIVED:
            sample = session.query(Sample).filter_by(specimen_id=specimen).one()
            transition(session, sample, "RECEIVED_AT_LAB", actor="t", location="Lab")
        session.commit()
    engine.dispose()


def snapshot(engine: Engine, results: list[IngestResult]) -> dict[str, Any]:
    """Everything the pipeline wrote, with database ids replaced by arrival positions."""
    position = {r.message_id: i for i, r in enumerate(results)}
    with engine.connect() as conn:
        def rows(sql: str) -> list[Any]:
            return [tuple(r) for r in conn.execute(text(sql))]

        messages = sorted(
            (position[i], status, reason, ack, position.get(dup), attempts)
            for i, status, reason, ack, dup, attempts in rows(
                "SELECT id, status, hold_reason, ack_code, duplicate_of_fk, attempts "
                "FROM raw_messages")
        )
        specimens = sorted((position[m], s) for m, s in rows(
            "SELECT message_fk, specimen_id FROM message_specimens"))
        # every column a result row holds, but its id and the time it was written
        result_rows = Counter(
            (specimen, code, value, status, flag, bool(current), bool(critical),
             position[message], superseded is not None, *rest)
            for specimen, code, value, status, flag, current, critical, message, superseded, *rest
            in rows("SELECT s.specimen_id, r.test_code, r.value_text, r.status, r.flag, "
                    "r.is_current, r.is_critical, r.message_fk, r.superseded_by_fk, "
                    "r.analyzer_code, r.value_number, r.comparator, r.units, "
                    "r.reference_range, r.observed_at, r.equipment, r.comments, r.interface "
                    "FROM results r JOIN samples s ON s.id = r.sample_fk")
        )
        samples = sorted(rows("SELECT specimen_id, state FROM samples"))
        tests = sorted(rows("SELECT s.specimen_id, t.test_code, t.status FROM ordered_tests t "
                            "JOIN samples s ON s.id = t.sample_fk"))
        events = rows("SELECT specimen_id, from_state, to_state, actor, note FROM "
                      "sample_events ORDER BY id")
        jobs = Counter()
        for kind, key, payload in rows("SELECT kind, dedupe_key, payload FROM outbox_jobs"):
            body = json.loads(payload)
            if kind == "render_report":
                jobs[(kind, key)] += 1  # names the sample and its result row count
            else:
                jobs[(kind, body.get("kind"), body.get("specimen_id"), body.get("test_code"),
                      body.get("value"), body.get("severity"))] += 1
    return {"messages": messages, "specimens": specimens, "results": result_rows,
            "samples": samples, "tests": tests, "events": events, "jobs": jobs}


def outcomes(results: list[IngestResult]) -> list[tuple[Any, ...]]:
    return [(r.status, r.outcome, r.hold_reason, r.original_ack_code, r.kind, r.control_id)
            for r in results]


# Mostly what a working lab sends (first final results for received samples, which take
# the fast lane), with every kind of exception mixed in: unmapped codes, critical values
# (GLU 30, K 1.0), comparators, preliminaries, corrections, cancellations, the same test
# twice, samples not received (P-3) or unknown (P-4), reused control ids and resends.
OBSERVATION = st.tuples(
    st.sampled_from([("GLU", "5.4"), ("NA", "140"), ("K", "4.1"), ("ALT", "38")] * 10
                    + [("GLU", "30"), ("K", "1.0"), ("GLU", "<0.5"), ("ZZZ", "1")]),
    st.sampled_from(["F"] * 30 + ["P", "C", "X"]),
).map(lambda o: (o[0][0], o[0][1], o[1]))
MESSAGE = st.tuples(
    st.sampled_from([f"c{n}" for n in range(1, 40)]),
    st.sampled_from([f"P-{n}" for n in (1, 2, 5, 6, 7, 8, 9, 10)] * 3 + ["P-3", "P-4"]),
    st.one_of(
        st.lists(OBSERVATION, min_size=1, max_size=4, unique_by=lambda o: o[0]),
        st.lists(OBSERVATION, min_size=1, max_size=4),  # may name a test twice
    ),
)


@st.composite
def batches(draw: st.DrawFn) -> list[bytes]:
    """1-12 messages; some repeat an earlier one byte for byte (a resend after a lost ACK)."""
    messages: list[bytes] = []
    for _ in range(draw(st.integers(1, 12))):
        if messages and draw(st.integers(0, 9)) == 0:
            messages.append(draw(st.sampled_from(messages)))
        else:
            control, specimen, observations = draw(MESSAGE)
            messages.append(oru(control, specimen, observations))
    return messages


def both_ways(template: Any, messages: list[bytes], mapping: Path = MAPPING) -> None:
    """One at a time (as undecoded items) against bulk (items prepared on arrival by
    prepare_item, as Pipeline.submit does, every other one with its results' COPY text
    worked out beforehand, as the ingest process does on PostgreSQL)."""
    rt = runtime(mapping)
    items = [BulkItem(rt, raw, "127.0.0.1:1", True) for raw in messages]
    prepared = [prepare_item(rt, raw, "127.0.0.1:1", True, copy_rows=n % 2 == 0)
                for n, raw in enumerate(messages)]
    with template() as (alone_url, bulk_url):
        alone_engine, bulk_engine = make_engine(alone_url), make_engine(bulk_url, writer=True)
        try:
            alone: list[IngestResult] = []
            sessions: sessionmaker[Session] = session_factory(alone_engine)
            for item in items:
                with sessions() as session:
                    alone.append(ingest_one(session, item))
                    session.commit()
            with session_factory(bulk_engine)() as session:
                together = ingest_bulk(session, prepared)
                session.commit()
            assert outcomes(together) == outcomes(alone)
            assert snapshot(bulk_engine, together) == snapshot(alone_engine, alone)
        finally:
            alone_engine.dispose()
            bulk_engine.dispose()


class SqliteCopies:
    """Two fresh copies of one prepared SQLite file per example."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.template = directory / "template.db"
        prepare(f"sqlite:///{self.template}")
        self.count = 0

    def __call__(self) -> Any:
        from contextlib import contextmanager

        @contextmanager
        def pair() -> Iterator[tuple[str, str]]:
            self.count += 1
            urls = []
            for side in ("alone", "bulk"):
                path = self.directory / f"{side}-{self.count}.db"
                shutil.copyfile(self.template, path)
                urls.append(f"sqlite:///{path}")
            try:
                yield urls[0], urls[1]
            finally:
                for side in ("alone", "bulk"):
                    (self.directory / f"{side}-{self.count}.db").unlink(missing_ok=True)

        return pair()


@pytest.fixture(scope="module")
def sqlite_copies(tmp_path_factory: pytest.TempPathFactory) -> SqliteCopies:
    return SqliteCopies(tmp_path_factory.mktemp("bulk"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=batches())
def test_bulk_equals_one_at_a_time_on_sqlite(sqlite_copies: SqliteCopies,
                                             messages: list[bytes]) -> None:
    both_ways(sqlite_copies, messages)


@pytest.fixture(scope="module")
def plain_mapping(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plain") / "plain.yaml"
    path.write_text(PLAIN_MAPPING)
    return path


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=batches())
def test_bulk_with_messages_mapped_on_arrival_equals_one_at_a_time(
        sqlite_copies: SqliteCopies, plain_mapping: Path, messages: list[bytes]) -> None:
    rt = runtime(plain_mapping)
    mapped = [prepare_item(rt, raw, "p", True).mapped for raw in messages]
    # most messages arrive mapped (those about one specimen); the rest map in the writer
    assert any(m is not None for m in mapped) or len(messages) < 3
    both_ways(sqlite_copies, messages, plain_mapping)


class PostgresCopies:
    """Two fresh PostgreSQL databases per example, copied from one prepared template."""

    def __init__(self, base_template: str) -> None:
        import os
        import uuid

        from sqlalchemy import create_engine
        from sqlalchemy.engine import make_url

        self.base = make_url(os.environ["LABRELAY_TEST_DATABASE_URL"])
        self.admin = create_engine(self.base, isolation_level="AUTOCOMMIT")
        self.template = f"{self.base.database}_bulk_{uuid.uuid4().hex[:8]}"
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.template}" TEMPLATE "{base_template}"'))
        prepare(self._url(self.template))
        self.count = 0

    def _url(self, name: str) -> str:
        return self.base.set(database=name).render_as_string(hide_password=False)

    def close(self) -> None:
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.template}" WITH (FORCE)'))
        self.admin.dispose()

    def __call__(self) -> Any:
        from contextlib import contextmanager

        @contextmanager
        def pair() -> Iterator[tuple[str, str]]:
            self.count += 1
            names = [f"{self.template}_{side}{self.count}" for side in ("a", "b")]
            with self.admin.connect() as conn:
                for name in names:
                    conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"'))
            try:
                yield self._url(names[0]), self._url(names[1])
            finally:
                with self.admin.connect() as conn:
                    for name in names:
                        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

        return pair()


@pytest.fixture(scope="module")
def postgres_copies(postgres_template: str) -> Iterator[PostgresCopies]:
    copies = PostgresCopies(postgres_template)
    yield copies
    copies.close()


@pytest.mark.postgres
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=batches())
def test_bulk_equals_one_at_a_time_on_postgresql(postgres_copies: PostgresCopies,
                                                 messages: list[bytes]) -> None:
    both_ways(postgres_copies, messages)


# Batches where most or all messages take the fast lane: first final results for distinct
# received samples, now and then one exception (an unknown or not-received sample, a
# critical value, a repeated specimen), so that PostgreSQL's single-round-trip write
# (every message fast, lis_bridge.bulk_pg) and its fallback (some not) both run often.
PLAIN_OBSERVATION = st.sampled_from([("GLU", "5.4", "F"), ("NA", "140", "F"), ("K", "4.1", "F"),
                                     ("ALT", "38", "F"), ("NA", "139", "P")])


@st.composite
def mostly_plain_batches(draw: st.DrawFn) -> list[bytes]:
    specimens = draw(st.permutations(RECEIVED))
    count = draw(st.integers(1, len(specimens)))
    messages = []
    for n, specimen in enumerate(specimens[:count]):
        observations = draw(st.lists(PLAIN_OBSERVATION, min_size=1, max_size=4,
                                     unique_by=lambda o: o[0]))
        if draw(st.integers(0, 7)) == 0:  # an exception, now and then
            specimen = draw(st.sampled_from(["P-3", "P-4", specimens[0]]))
            observations = draw(st.sampled_from([observations, [("K", "1.0", "F")]]))
        messages.append(oru(f"plain{n}", specimen, observations))
    return messages


@pytest.mark.postgres
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=mostly_plain_batches())
def test_mostly_plain_batches_equal_one_at_a_time_on_postgresql(
        postgres_copies: PostgresCopies, messages: list[bytes]) -> None:
    both_ways(postgres_copies, messages)


@pytest.mark.postgres
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=mostly_plain_batches())
def test_batches_mapped_on_arrival_equal_one_at_a_time_on_postgresql(
        postgres_copies: PostgresCopies, plain_mapping: Path, messages: list[bytes]) -> None:
    """As the ingest process runs on PostgreSQL: messages decoded and mapped as they
    arrive, their results' COPY text written then (every other one here), the writer
    taking it from there."""
    both_ways(postgres_copies, messages, plain_mapping)


@pytest.mark.postgres
def test_a_plain_batch_on_postgresql_is_one_execute_and_one_copy(
        postgres_copies: PostgresCopies) -> None:
    """Eight plain messages on PostgreSQL, counted on the writer's real connection: one
    execute (BEGIN and the query that locks and reads everything the checks need) and one
    copy_expert (every row, the results by COPY, and the COMMIT when the writer allows it;
    otherwise a COMMIT follows). The raw messages' ids keep their arrival order."""
    import psycopg2.extensions

    from engine.writer import COMMIT_WITH_LAST_WRITE
    from lis_bridge.pg_connection import OneTripConnection, OneTripCursor

    sent: list[str] = []

    class Counting(OneTripCursor):
        def execute(self, query: Any, vars: Any = None) -> Any:
            sent.append("execute")
            return super().execute(query, vars)

        def executemany(self, query: Any, vars_list: Any) -> Any:
            sent.append("executemany")
            return super().executemany(query, vars_list)

        def copy_expert(self, sql: Any, file: Any, size: int = 8192) -> Any:
            sent.append("copy")
            return super().copy_expert(sql, file, size)

    class CountingConnection(OneTripConnection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.cursor_factory = Counting

        def commit(self) -> None:
            if self.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                sent.append("commit")
            super().commit()

    rt = runtime()
    observations = [("GLU", "5.4", "F"), ("ALT", "38", "F")]  # ordered for every one
    for last_write_commits in (False, True):
        with postgres_copies() as (_, url):
            engine = make_engine(url, writer=True, pool_pre_ping=False,
                                 connect_args={"connection_factory": CountingConnection})
            items = [prepare_item(rt, oru(f"m{n}", specimen, observations), "127.0.0.1:1",
                                  True) for n, specimen in enumerate(RECEIVED)]
            try:
                with session_factory(engine)() as session:
                    session.info[COMMIT_WITH_LAST_WRITE] = last_write_commits
                    session.connection()  # a new engine's first connection asks a few things
                    sent.clear()
                    results = ingest_bulk(session, items)
                    session.commit()
                statuses = [r.status for r in results]
                assert statuses == [MessageStatus.APPLIED] * len(RECEIVED), statuses
                # BEGIN rides with the checks; the writes, the COPY of the results and (as
                # the writer allows for a batch's last write) the COMMIT are one query string
                assert sent == ["execute", "copy"] + ([] if last_write_commits else ["commit"])
                ids = [r.message_id for r in results]
                assert ids == sorted(ids)
                with engine.connect() as conn:
                    assert conn.scalar(text("SELECT count(*) FROM results")) == 2 * len(RECEIVED)
                    assert list(conn.execute(text(
                        "SELECT id FROM raw_messages ORDER BY id")).scalars()) == ids
            finally:
                engine.dispose()


@pytest.mark.postgres
def test_the_postgresql_read_looks_up_indexes_in_its_generic_plan(
        postgres_copies: PostgresCopies) -> None:
    """DESIGN rule 5 at any table size, on PostgreSQL: the prepared read of the fast lane
    (lis_bridge.bulk_pg) finds earlier copies, waiting messages, samples, ordered tests
    and results by index, also in the generic plan PostgreSQL switches to after a few
    executions; checked on tables of a few thousand rows, analysed."""
    import psycopg2

    from lis_bridge import bulk_pg

    with postgres_copies() as (_, url):
        engine = make_engine(url)
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO samples (specimen_id, state, location, state_changed_at, created_at) "
                "SELECT 'F-' || n, 'RECEIVED_AT_LAB', '', now(), now() "
                "FROM generate_series(1, 3000) n"))
            conn.execute(text(
                "INSERT INTO ordered_tests (sample_fk, test_code, status, ordered_at) "
                "SELECT s.id, 'T' || k, 'ORDERED', now() FROM samples s, generate_series(1, 5) k"))
            conn.execute(text(
                "INSERT INTO raw_messages (interface, direction, protocol, peer, sender, "
                "control_id, message_type, payload, sha256, size, received_at, status, "
                "hold_reason, hold_detail, ack_code, attempts) SELECT 't-hl7', 'in', 'hl7', '', "
                "'AN|LAB', 'f' || n, 'ORU^R01', '\\x00', md5(n::text) || md5(n::text), 1, now(), "
                "'APPLIED', '', '', 'AA', 1 FROM generate_series(1, 3000) n"))
            conn.execute(text(
                "INSERT INTO message_specimens (message_fk, specimen_id) "
                "SELECT r.id, 'F-' || r.id FROM raw_messages r"))
            conn.execute(text(
                "INSERT INTO results (sample_fk, test_code, analyzer_code, value_text, "
                "comparator, units, reference_range, flag, is_critical, status, equipment, "
                "comments, interface, is_current, created_at) SELECT t.sample_fk, t.test_code, "
                "t.test_code, '1', '', '', '', '', false, 'F', '', '', 't-hl7', true, now() "
                "FROM ordered_tests t"))
            for table in ("samples", "ordered_tests", "raw_messages", "results",
                          "message_specimens", "patients"):
                conn.execute(text(f"ANALYZE {table}"))
        engine.dispose()
        dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        connection = psycopg2.connect(dsn)
        try:
            cursor = connection.cursor()
            arguments: dict[str, Any] = {
                "digests": ["a" * 64], "senders": {("t-hl7", "AN|LAB"): ["c1", "c2"]},
                "since": datetime(2026, 1, 1, tzinfo=UTC), "waiting": ["P-1", "F-9"],
                "samples": ["P-1", "F-9"], "new_ids": 2}
            info: dict[str, Any] = {}
            for _ in range(7):  # PostgreSQL weighs custom against generic after five
                facts = bulk_pg.read_stretch(cursor, info, **arguments)
            assert set(facts.samples) == {"P-1", "F-9"} and len(facts.new_ids) == 2
            # planned once, not at every batch (planning cost more than running it)
            cursor.execute("SELECT name, generic_plans, custom_plans "
                           "FROM pg_prepared_statements WHERE name IN (%s, %s) ORDER BY name",
                           (bulk_pg.LOCK, bulk_pg.READ))
            assert cursor.fetchall() == [(bulk_pg.LOCK, 7, 0), (bulk_pg.READ, 7, 0)]
            cursor.execute("SET plan_cache_mode = force_generic_plan")
            read = next(part for part in bulk_pg._EXECUTE.split(";\n")
                        if part.startswith(f"EXECUTE {bulk_pg.READ} "))
            cursor.execute("EXPLAIN " + read, {
                **arguments, "interfaces": ["t-hl7"] * 2, "senders": ["AN|LAB"] * 2,
                "control_ids": ["c1", "c2"]})
            plan = "\n".join(row[0] for row in cursor.fetchall())
        finally:
            connection.rollback()
            connection.close()
    # (patients, nine rows here, may be scanned: its primary key serves once it grows)
    for table in ("raw_messages", "message_specimens", "samples", "ordered_tests", "results"):
        assert f"Seq Scan on {table}" not in plan, plan
    for index in ("ix_raw_messages_sha256", "ix_raw_messages_dedupe",
                  "ix_message_specimens_specimen", "uq_samples_specimen_id",
                  "ix_ordered_tests_sample_fk", "ix_results_sample_test"):
        assert index in plan, (index, plan)


@pytest.mark.postgres
def test_the_postgresql_prepared_inserts_refuse_a_value_too_long(
        postgres_copies: PostgresCopies) -> None:
    """The fast lane's prepared inserts take strings as text[] and leave the column's
    varchar(n) to the assignment, which refuses a value too long as INSERT ... VALUES did;
    a cast to varchar(n) on the way would have cut it short without a word."""
    import psycopg2
    import psycopg2.errors

    from lis_bridge import bulk_pg

    with postgres_copies() as (_, url):
        dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        connection = psycopg2.connect(dsn)
        try:
            cursor = connection.cursor()
            bulk_pg.read_stretch(cursor, {}, digests=[], senders={},
                                 since=datetime(2026, 1, 1, tzinfo=UTC), waiting=[],
                                 samples=[], new_ids=0)  # prepares the statements
            quote = bulk_pg._Quoter(cursor)
            link = bulk_pg._LINK.execute(quote, [{"message_fk": 1, "specimen_id": "S" * 65}])
            with pytest.raises(psycopg2.errors.StringDataRightTruncation):
                cursor.execute(link)
            connection.rollback()
            with pytest.raises(ValueError, match="columns"):
                bulk_pg._LINK.execute(quote, [{"message_fk": 1}])
        finally:
            connection.rollback()
            connection.close()


@pytest.mark.postgres
def test_the_postgresql_writes_quote_values_as_psycopg2_does(
        postgres_copies: PostgresCopies) -> None:
    """The fast lane's writes quote each distinct value once a batch; what they send is
    what ``cursor.mogrify`` writes for the same list, whatever the text (quotes,
    backslashes, NUL-free unicode), bytes, times, numbers and NULLs."""
    import psycopg2
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from lis_bridge import bulk_pg
    from lis_bridge.models import MessageStatus

    with postgres_copies() as (_, url):
        dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        connection = psycopg2.connect(dsn)
        try:
            cursor = connection.cursor()
            fixed = ["it's", "back\\slash", "Łukasz ü", "", None, 0, -7, 2**62, True, False,
                     b"\x00\x0bMSH|'\\", datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
                     datetime(2026, 1, 2, 3, 4, 5), MessageStatus.APPLIED]
            quote = bulk_pg._Quoter(cursor)
            for value in fixed:
                plain = str(value) if isinstance(value, str) else value
                assert quote(value) == cursor.mogrify("%s", (plain,)), value
            assert quote.array([]) == cursor.mogrify("%s", ([],))

            text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))
            values = st.lists(st.one_of(text, st.none(), st.integers(-2**63, 2**63 - 1),
                                        st.binary(max_size=40), st.booleans()), max_size=8)

            @settings(max_examples=200, deadline=None)
            @given(values)
            def same(items: list[Any]) -> None:
                again = bulk_pg._Quoter(cursor)
                assert again.array(items) == cursor.mogrify("%s", (items,))
                assert again.array(items) == again.array(items)  # remembered, unchanged

            same()
        finally:
            connection.rollback()
            connection.close()


@pytest.mark.postgres
def test_the_postgresql_fast_lane_scans_no_table_while_tables_are_small(
        postgres_copies: PostgresCopies) -> None:
    """A connection's generic plans are made at its first batches, from the statistics
    of the moment: made while ``samples`` held a few rows, the lock's plan read the whole
    table at every batch from then on. The fast lane's transaction turns sequential scans
    off; counted in the transaction's own statistics (pg_stat_xact_user_tables)."""
    import psycopg2

    from lis_bridge import bulk_pg

    with postgres_copies() as (_, url):
        dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        connection = psycopg2.connect(dsn)
        try:
            cursor = connection.cursor()
            info: dict[str, Any] = {}
            for n in range(7):  # past the five custom plans PostgreSQL tries first
                facts = bulk_pg.read_stretch(
                    cursor, info, digests=["a" * 64], since=datetime(2026, 1, 1, tzinfo=UTC),
                    senders={("t-hl7", "AN|LAB"): [f"c{n}"]}, waiting=["P-1", "P-2"],
                    samples=["P-1", "P-2"], new_ids=1)
            assert set(facts.samples) == {"P-1", "P-2"}
            cursor.execute("SELECT relname, seq_scan FROM pg_stat_xact_user_tables "
                           "WHERE seq_scan > 0 AND relname <> 'patients' ORDER BY relname")
            scanned = cursor.fetchall()
        finally:
            connection.rollback()
            connection.close()
    assert scanned == []


def test_a_plain_batch_takes_the_fast_lane_and_is_complete(sqlite_url: str) -> None:
    """Eight first results for received samples: written together, every row there, the
    samples moved and audited, each message APPLIED with its ACK code."""
    prepare_more = (
        "specimen_id,patient_id,patient_name,sex,birth_date,tests,collected_at,location\n"
        + "".join(f"B-{i},PB-{i},X Y,F,1970-01-01,GLU NA,2025-01-01T08:00:00Z,Ward\n"
                  for i in range(8))
    )
    engine = make_engine(sqlite_url, writer=True)
    sessions = session_factory(engine)
    with sessions() as session:
        assert import_orders_csv(session, prepare_more, actor="t").ok
        session.commit()
        for i in range(8):
            sample = session.query(Sample).filter_by(specimen_id=f"B-{i}").one()
            transition(session, sample, "RECEIVED_AT_LAB", actor="t", location="Lab")
        session.commit()
    rt = runtime()
    items = [BulkItem(rt, oru(f"m{i}", f"B-{i}", [("GLU", "5.4", "F"), ("NA", "140", "F")]),
                      "127.0.0.1:1", True) for i in range(8)]
    statements: list[str] = []
    from sqlalchemy import event

    event.listen(engine, "before_cursor_execute",
                 lambda *args: statements.append(args[2].split()[0]))
    with sessions() as session:
        results = ingest_bulk(session, items)
        session.commit()
    assert [r.status for r in results] == [MessageStatus.APPLIED] * 8
    # what the pipeline logs for each on the reactor once committed: the sample's move,
    # then the message, as the one-at-a-time path logs them
    for i, result in enumerate(results):
        assert [event for event, _ in result.logs] == ["lis.sample.transition",
                                                        "message.applied"]
        move, applied = result.logs[0][1], result.logs[1][1]
        assert (move["sample_id"], move["from_state"], move["to_state"], move["through"]) == (
            f"B-{i}", "RECEIVED_AT_LAB", "COMPLETED", "PROCESSING")
        assert applied == {"interface": "t-hl7", "message_id": result.message_id,
                           "result_count": 2, "control_id": f"m{i}"}
    # a dozen statements for eight messages, not a dozen per message
    assert len(statements) <= 14, statements
    with engine.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM results")) == 16
        assert conn.scalar(text("SELECT count(*) FROM raw_messages WHERE ack_code = 'AA' "
                                "AND status = 'APPLIED'")) == 8
        states = set(conn.execute(text("SELECT state FROM samples")).scalars())
        assert states == {"COMPLETED"}
        assert conn.scalar(text("SELECT count(*) FROM sample_events WHERE to_state IN "
                                "('PROCESSING', 'COMPLETED')")) == 16
        assert conn.scalar(text("SELECT count(*) FROM outbox_jobs WHERE kind = "
                                "'render_report'")) == 8
    engine.dispose()


def test_the_duplicate_check_looks_up_indexes_not_the_whole_table(sqlite_url: str) -> None:
    """DESIGN rule 5 at any table size: the batch duplicate check must seek by content
    hash and by (interface, sender, control id), never scan raw_messages (one query with
    OR did, and got slower with every message an analyzer had sent)."""
    from sqlalchemy import event

    from engine.ingest_bulk import _earlier_copies

    engine = make_engine(sqlite_url)
    plans: list[str] = []

    def explain(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        return f"EXPLAIN QUERY PLAN {statement}", parameters

    event.listen(engine, "before_cursor_execute", explain, retval=True)
    with session_factory(engine)() as session:
        for senders in ({}, {("t-hl7", "AN|LAB"): ["c1", "c2"], ("t-hl7", "X"): ["c3"]}):
            rows = _earlier_copies(session, ["a" * 64, "b" * 64], senders,
                                   datetime(2026, 1, 1, tzinfo=UTC))
            plans.extend(str(row[-1]) for row in rows)
    engine.dispose()
    assert not any(d.startswith("SCAN raw_messages") for d in plans), plans
    assert sum("ix_raw_messages_sha256" in d for d in plans) == 2, plans
    assert sum("ix_raw_messages_dedupe" in d for d in plans) == 2, plans


def test_large_messages_are_decoded_by_the_writer_not_the_reactor() -> None:
    """The reactor serves every analyzer: it decodes a message as it arrives only when
    that is quick. A large one goes to the writer undecoded, and is stored all the same."""
    from engine.ingest_bulk import REACTOR_DECODE_LIMIT, prepare_item

    rt = runtime()
    small = prepare_item(rt, oru("s1", "P-1", [("GLU", "5.4", "F")]), "p", True)
    assert small.decoded is not None and small.decoded.message is not None
    assert small.mapped is None  # generic_hl7 ranges depend on sex: mapped in the writer
    filler = [("NA", "140", "F")] * (REACTOR_DECODE_LIMIT // 20)
    large = prepare_item(rt, oru("s2", "P-1", filler), "p", True)
    assert large.decoded is None and large.mapped is None


RESULT_VALUES = st.fixed_dictionaries({
    "value_number": st.one_of(st.none(), st.decimals(allow_nan=False, allow_infinity=False,
                                                     places=3, min_value=-10**6,
                                                     max_value=10**6)),
    "observed_at": st.one_of(st.none(), st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
        timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)),
                                   timezone(timedelta(hours=-3))]))),
    "is_critical": st.booleans(),
    "comments": st.text(max_size=20),
})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(RESULT_VALUES, min_size=1, max_size=6))
def test_the_sqlite_results_insert_stores_what_sqlalchemy_stores(
        sqlite_copies: SqliteCopies, values: list[dict[str, Any]]) -> None:
    """lis_bridge.results_bulk._insert_rows converts each value with its column type's own
    bind processor: every column of every row reads back byte for byte as SQLAlchemy's
    insert() stores it (datetimes in several zones, the same instant twice, None,
    decimals, booleans)."""
    from sqlalchemy import insert

    from lis_bridge.models import Result
    from lis_bridge.results_bulk import _insert_rows

    when = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
    # the same instant in another zone: equal datetimes, different wall-clock text
    values = [*values, {**values[0], "observed_at": when.astimezone(timezone(timedelta(hours=2)))},
              {**values[0], "observed_at": when}]
    with sqlite_copies() as (a_url, b_url):
        stored = []
        for url, how in ((a_url, "sqlalchemy"), (b_url, "driver")):
            engine = make_engine(url)
            try:
                with engine.begin() as conn:
                    sample = conn.scalar(text("SELECT id FROM samples ORDER BY id LIMIT 1"))
                    rows = [{"sample_fk": sample, "test_code": "GLU", "analyzer_code": "GLU",
                             "value_text": "1", "value_number": v["value_number"],
                             "comparator": "", "units": "", "reference_range": "", "flag": "",
                             "is_critical": v["is_critical"], "status": "F",
                             "observed_at": v["observed_at"], "equipment": "",
                             "comments": v["comments"], "interface": "t", "message_fk": None,
                             "is_current": True, "superseded_by_fk": None, "created_at": when}
                            for v in values]
                    if how == "sqlalchemy":
                        conn.execute(insert(Result), rows)
                    else:
                        _insert_rows(conn, Result.__table__, rows)  # type: ignore[arg-type]
                    columns = ", ".join(f"quote({c.name})" for c in Result.__table__.c)
                    stored.append(conn.execute(text(
                        f"SELECT {columns} FROM results ORDER BY id")).all())
            finally:
                engine.dispose()
        assert stored[0] == stored[1]


def _copy_text(value: Any) -> str:
    """One value as PostgreSQL's COPY text format reads it, spelled out one type at a time
    (the reference for lis_bridge.results_bulk.result_copy_text)."""
    if value is None:
        return "\\N"
    if value is True:
        return "t"
    if value is False:
        return "f"
    if isinstance(value, str):
        return (value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
                .replace("\r", "\\r"))
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)  # int, Decimal


RESULT_INPUTS = st.builds(
    ResultInput,
    test_code=st.text(min_size=1, max_size=8), analyzer_code=st.text(max_size=8),
    value_text=st.text(max_size=12),
    value_number=st.one_of(st.none(), st.decimals(allow_nan=False, allow_infinity=False,
                                                  places=4, min_value=-10**9,
                                                  max_value=10**9)),
    comparator=st.sampled_from(["", "<", ">=", "\t"]), units=st.text(max_size=6),
    reference_range=st.text(max_size=10), flag=st.sampled_from(["", "H", "L\\", "N\n"]),
    is_critical=st.booleans(), status=st.sampled_from(["P", "F", "C", "X"]),
    observed_at=st.one_of(st.none(), st.datetimes(timezones=st.sampled_from(
        [UTC, timezone(timedelta(hours=5, minutes=30))]))),
    equipment=st.text(max_size=6), comments=st.lists(st.text(max_size=6), max_size=3).map(tuple))


@given(groups=st.lists(st.tuples(st.integers(1, 10**12), st.one_of(st.none(),
                                                                   st.integers(1, 10**12)),
                                 st.sampled_from(["bench-hl7", "a\tb\\c"]),
                                 st.lists(RESULT_INPUTS, min_size=1, max_size=5)),
                       min_size=1, max_size=4))
def test_the_fast_result_copy_text_is_the_row_by_row_text(
        groups: list[tuple[int, int | None, str, list[ResultInput]]]) -> None:
    """The fast lane's result rows go to PostgreSQL as lis_bridge.results_bulk.
    result_copy_text writes them, straight from the results; it must be, byte for byte,
    the same rows built one by one by result_row (the rows the one-at-a-time path
    inserts) with each value written as COPY reads it: escapes, NULLs, numbers, booleans,
    times, comments."""
    from lis_bridge.results_bulk import (
        RESULT_COPY_COLUMNS,
        BulkWrites,
        result_copy_text,
        result_own_rows,
    )

    when = datetime(2026, 12, 4, 9, 30, tzinfo=UTC)
    writes = BulkWrites([(s, m, i, tuple(items)) for s, m, i, items in groups], {}, {}, [], [],
                        {}, when)
    rows = writes.result_rows()
    assert set(RESULT_COPY_COLUMNS) == set(rows[0])
    expected = "".join("\t".join(_copy_text(row[name]) for name in RESULT_COPY_COLUMNS) + "\n"
                       for row in rows)
    assert result_copy_text(writes) == expected
    # the same with some groups' own columns worked out beforehand (prepare_item)
    writes.copy_rows = [result_own_rows(items) if n % 2 else None
                        for n, (_, _, _, items) in enumerate(writes.result_groups)]
    assert result_copy_text(writes) == expected


def test_observed_at_with_an_offset_is_stored_in_utc_by_both_paths(db_url: str) -> None:
    """OBX-14 10:10+05:30 is stored as 04:40 UTC whichever way the result is written: the
    fast lane (SQLite rows, PostgreSQL COPY text) and one message at a time."""
    from lis_bridge.models import Result

    prepare(db_url)
    rt = runtime()

    def message(control_id: str, specimen_id: str) -> bytes:
        return oru(control_id, specimen_id, [("GLU", "5.4", "F")]).replace(
            b"|F\r", b"|F|||20250301101000+0530\r")

    engine = make_engine(db_url, writer=True)
    try:
        with session_factory(engine)() as session:
            bulk = ingest_bulk(session, [BulkItem(rt, message(f"m{n}", specimen), "p", True)
                                         for n, specimen in enumerate(("P-1", "P-2"))])
            session.commit()
            alone = ingest_one(session, BulkItem(rt, message("m9", "P-5"), "p", True))
            session.commit()
        assert [r.status for r in [*bulk, alone]] == [MessageStatus.APPLIED] * 3
        with session_factory(engine)() as session:
            stored = session.scalars(select(Result.observed_at).order_by(Result.id)).all()
        assert [t.astimezone(UTC) if t.tzinfo else t.replace(tzinfo=UTC) for t in stored] == [
            datetime(2025, 3, 1, 4, 40, tzinfo=UTC)] * 3
    finally:
        engine.dispose()


def test_a_refused_write_logs_what_went_wrong_not_the_values(db_url: str) -> None:
    """psycopg2's error text quotes the statement (``LINE 1: ...``) and the value it
    refused; SQLAlchemy's adds the parameters. The writer's log line and the error's text
    (which reaches the held message's detail and the ACK) keep only the first line, less
    the quoted value. A refused value is the unit's fault, not the database's
    (UnitRefused, not StorageError: test_pipeline's held-not-refused test)."""
    import threading

    from sqlalchemy.exc import DataError
    from structlog.testing import capture_logs

    from engine.writer import DatabaseWriter, UnitRefused

    secret = "7.4242477x"

    def work(session: Session) -> None:
        if session.bind.dialect.name == "postgresql":  # type: ignore[union-attr]
            session.execute(text("SELECT CAST(:v AS numeric), 'mmol/L'"), {"v": secret})
        raise DataError("SELECT CAST(?)", {"v": secret}, ValueError(
            f'invalid input syntax for type numeric: "{secret}"\nLINE 1: SELECT CAST(\'{secret}\''))

    class Reactor:
        def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
            f(*args, **kwargs)

    engine = make_engine(db_url, writer=True)
    writer = DatabaseWriter(session_factory(engine), Reactor())  # type: ignore[arg-type]
    done = threading.Event()
    failures: list[Any] = []
    try:
        with capture_logs() as logs:
            writer.start()
            writer.submit(work).addErrback(lambda f: (failures.append(f.value), done.set()))
            assert done.wait(20)
            writer.stop()
    finally:
        engine.dispose()
    (error,) = failures
    assert isinstance(error, UnitRefused)
    (line,) = [entry for entry in logs if entry["event"] == "db.write.refused"]
    assert "invalid input syntax for type numeric" in line["detail"]
    assert secret not in repr(logs) and secret not in str(error)
    assert "LINE" not in line["detail"] and "mmol" not in repr(logs)
