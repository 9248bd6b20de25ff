"""Results for many samples in a few statements: the common case of a group commit.

:func:`lis_bridge.results.apply_results` writes one sample's results with about ten
statements. At a thousand messages a second those statements, not the data, are the cost.
Nearly every message is the simple case: first results for a received sample, for tests it
has ordered. This module writes a whole batch of such messages with one query to read and
five statements to write, however many samples the batch holds.

It never decides anything :func:`apply_results` would decide differently. :func:`plan_many`
reads what the checks need and returns a plan only for a sample where every rule of
``apply_results`` gives the plain outcome (no hold, no resend, no correction, no
supersede, no auto-receive, no added test, no critical value); for anything else it
returns None and the caller hands that message to ``apply_results``, which holds,
supersedes or alerts exactly as before. :func:`write_many` then writes the plans: the
result rows, the ordered tests' statuses, the sample moves with their audit rows, and the
render jobs of completed samples, in the caller's transaction.

The samples are locked (PostgreSQL ``FOR UPDATE``, in id order so two writers cannot
deadlock on them; SQLite's writer holds ``BEGIN IMMEDIATE``), so what was read stays true
until the commit.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import BigInteger, Table, any_, bindparam, insert, select, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from lis_bridge.models import (
    OrderedTest,
    Patient,
    Result,
    Sample,
    SampleEvent,
    SampleState,
)
from lis_bridge.results import (
    _TEST_STATUS,
    DONE_TEST_STATUSES,
    _as_utc,
    _check_item,
    _comments,
    _enqueue_jobs,
    _number,
    interface_actor,
    observed_utc,
    result_row,
)
from lis_bridge.types import ResultInput

_SAMPLES = cast(Table, Sample.__table__)
_TESTS = cast(Table, OrderedTest.__table__)
_RESULTS = cast(Table, Result.__table__)
_EVENTS = cast(Table, SampleEvent.__table__)

# States in which a first result is simply written: a COLLECTED / IN_TRANSIT sample needs
# a hold or an auto-receive, a COMPLETED / REPORTED one a correction rule.
_OPEN_STATES = (SampleState.RECEIVED_AT_LAB, SampleState.PROCESSING)

_SAMPLES_BY_SPECIMEN = (
    select(_SAMPLES.c.id, _SAMPLES.c.specimen_id, _SAMPLES.c.state, _SAMPLES.c.location,
           Patient.sex, Patient.birth_date)
    .select_from(_SAMPLES.outerjoin(Patient, Patient.id == _SAMPLES.c.patient_fk))
    .where(_SAMPLES.c.specimen_id.in_(bindparam("specimen_ids", expanding=True)))
    .order_by(_SAMPLES.c.id)
)
_SAMPLES_BY_SPECIMEN_LOCKED = _SAMPLES_BY_SPECIMEN.with_for_update(of=_SAMPLES)
_TESTS_OF_SAMPLES = (
    select(_TESTS.c.sample_fk, _TESTS.c.test_code, _TESTS.c.id, _TESTS.c.status)
    .where(_TESTS.c.sample_fk.in_(bindparam("sample_ids", expanding=True)))
)
_RESULT_CODES_OF_SAMPLES = (
    select(_RESULTS.c.sample_fk, _RESULTS.c.test_code)
    .where(_RESULTS.c.sample_fk.in_(bindparam("sample_ids", expanding=True)))
)
_INSERT_RESULTS = insert(_RESULTS)
_INSERT_EVENTS = insert(_EVENTS)
_SET_TEST_STATUS = (
    update(_TESTS)
    .where(_TESTS.c.id.in_(bindparam("ids", expanding=True)))
    .values(status=bindparam("status"))
)
_MOVE_SAMPLES = (
    update(_SAMPLES)
    .where(_SAMPLES.c.id.in_(bindparam("ids", expanding=True)))
    .values(state=bindparam("to_state"), state_changed_at=bindparam("at"))
)
# PostgreSQL: the ids as one array parameter. An IN list of 200 parameters costs more to
# render, quote and plan than updating the 200 rows.
_SET_TEST_STATUS_PG = (
    update(_TESTS)
    .where(_TESTS.c.id == any_(bindparam("ids", type_=postgresql.ARRAY(BigInteger))))
    .values(status=bindparam("status"))
)
_MOVE_SAMPLES_PG = (
    update(_SAMPLES)
    .where(_SAMPLES.c.id == any_(bindparam("ids", type_=postgresql.ARRAY(BigInteger))))
    .values(state=bindparam("to_state"), state_changed_at=bindparam("at"))
)


@dataclass(frozen=True, slots=True)
class SampleFacts:
    """What :func:`load_samples` read about one sample (locked until the commit)."""

    id: int
    specimen_id: str
    state: str
    location: str
    sex: str
    birth_date: Any
    tests: dict[str, tuple[int, str]]  # test code -> (ordered_tests.id, status)
    result_codes: frozenset[str]  # test codes with any result row, current or not
    result_rows: int  # result rows in all (names the render job)


@dataclass(slots=True)
class BulkPlan:
    """Results :func:`write_many` writes for one sample, checked against ``facts``."""

    facts: SampleFacts
    results: Sequence[ResultInput]
    message_id: int | None = None
    # result_own_rows(results), when worked out beforehand (off the writer's thread)
    copy_rows: Sequence[str] | None = None


def load_samples(session: Session, specimen_ids: Sequence[str]) -> dict[str, SampleFacts]:
    """The samples named (locked), with their ordered tests and result codes, in 3 queries."""
    if not specimen_ids:
        return {}
    conn = session.connection()
    postgres = conn.dialect.name == "postgresql"
    query = _SAMPLES_BY_SPECIMEN_LOCKED if postgres else _SAMPLES_BY_SPECIMEN
    rows = conn.execute(query, {"specimen_ids": list(dict.fromkeys(specimen_ids))}).all()
    if not rows:
        return {}
    ids = [row[0] for row in rows]
    # .all(): one fetch for the batch's ~200 rows, not a fetch per row
    test_rows = conn.execute(_TESTS_OF_SAMPLES, {"sample_ids": ids}).all()
    code_rows = conn.execute(_RESULT_CODES_OF_SAMPLES, {"sample_ids": ids}).all()
    return sample_facts(rows, test_rows, code_rows)


def sample_facts(sample_rows: Sequence[Any], test_rows: Sequence[Any],
                 code_rows: Sequence[Any]) -> dict[str, SampleFacts]:
    """:class:`SampleFacts` by specimen id, from rows ``(id, specimen_id, state, location,
    sex, birth_date)``, ``(sample_fk, test_code, ordered_tests.id, status)`` and
    ``(sample_fk, test_code)`` of every result row."""
    tests: dict[int, dict[str, tuple[int, str]]] = {row[0]: {} for row in sample_rows}
    for sample_fk, code, ident, status in test_rows:
        tests[sample_fk][code] = (ident, status)
    codes: dict[int, set[str]] = {row[0]: set() for row in sample_rows}
    counts = dict.fromkeys(codes, 0)
    for sample_fk, code in code_rows:
        codes[sample_fk].add(code)
        counts[sample_fk] += 1
    return {
        specimen: SampleFacts(ident, specimen, state, location or "", sex or "U", birth,
                              tests[ident], frozenset(codes[ident]), counts[ident])
        for ident, specimen, state, location, sex, birth in sample_rows
    }


def plan(facts: SampleFacts | None, results: Sequence[ResultInput]) -> BulkPlan | None:
    """A plan when ``apply_results`` would write every result plainly, else None.

    None covers: unknown sample, a state that needs a hold, auto-receive or the
    correction rules, an invalid field, a test not ordered, a test that already has a
    result (resend, supersede, P after F), the same test twice, a critical value (its
    notification names the new row's id), or nothing to write.
    """
    if facts is None or facts.state not in _OPEN_STATES or not results:
        return None
    seen: set[str] = set()
    for item in results:
        code = item.test_code
        if (code in seen or code not in facts.tests or code in facts.result_codes
                or item.is_critical or _check_item(item, facts.specimen_id)):
            return None
        seen.add(code)
    return BulkPlan(facts, results)


@dataclass(slots=True)
class BulkWrites:
    """What :func:`write_many` writes for a set of plans, worked out before any statement:
    so a caller may send the statements its own way (one round trip on PostgreSQL,
    :mod:`lis_bridge.bulk_pg`)."""

    # the result rows, in plan order, as (sample id, message id, interface, results):
    # :meth:`result_rows` as dicts, :func:`result_copy_text` as COPY text
    result_groups: list[tuple[int, int | None, str, Sequence[ResultInput]]]
    test_ids: dict[str, list[int]]  # new ordered-test status -> ordered_tests ids
    moves: dict[str, list[int]]  # new sample state -> sample ids
    events: list[dict[str, Any]]  # sample_events rows
    jobs: list[tuple[str, str, dict[str, Any]]]  # outbox jobs (kind, dedupe key, payload)
    moved: dict[str, dict[str, Any]]  # specimen id -> fields of its transition log line
    when: datetime
    # by result group: its result_own_rows() if worked out beforehand, else None
    copy_rows: list[Sequence[str] | None] = field(default_factory=list)

    def result_rows(self) -> list[dict[str, Any]]:
        """The ``results`` rows, as :func:`lis_bridge.results.result_row` makes them."""
        return [result_row(sample_id, item, interface, message_id, self.when)
                for sample_id, message_id, interface, items in self.result_groups
                for item in items]


def plan_writes(plans: Sequence[BulkPlan], *, interface: str, now: datetime) -> BulkWrites:
    """The rows and updates that write ``plans`` (each sample once, each with its
    ``message_id``): result rows, the ordered tests' statuses, the sample moves with
    their audit rows, and the render jobs of completed samples."""
    when = _as_utc(now)
    actor = interface_actor(interface)
    # plan() let no critical value through: is_critical is False in every row
    groups = [(p.facts.id, p.message_id, interface, p.results) for p in plans]
    # Ordered tests take the status of their result; one UPDATE per status.
    test_ids: dict[str, list[int]] = {}
    events: list[dict[str, Any]] = []
    moves: dict[str, list[int]] = {}
    jobs: list[tuple[str, str, dict[str, Any]]] = []
    moved: dict[str, dict[str, Any]] = {}
    for p in plans:
        facts = p.facts
        statuses = {code: status for code, (_, status) in facts.tests.items()}
        for item in p.results:
            status = _TEST_STATUS[item.status]
            ident, before = facts.tests[item.test_code]
            if before != status:
                test_ids.setdefault(status, []).append(ident)
            statuses[item.test_code] = status
        state: str = facts.state
        path: list[tuple[str, str]] = []
        if state == SampleState.RECEIVED_AT_LAB:
            path.append((SampleState.PROCESSING, "first result"))
            state = SampleState.PROCESSING
        if all(s in DONE_TEST_STATUSES for s in statuses.values()):
            path.append((SampleState.COMPLETED, "every ordered test final or cancelled"))
            state = SampleState.COMPLETED
            jobs.append(("render_report",
                         f"render_report:{facts.id}:r{facts.result_rows + len(p.results)}",
                         {"sample_id": facts.id, "specimen_id": facts.specimen_id,
                          "reason": "completed"}))
        before_state = facts.state
        for to_state, note in path:
            events.append({"sample_fk": facts.id, "specimen_id": facts.specimen_id,
                           "from_state": before_state, "to_state": to_state,
                           "location": facts.location, "actor": actor, "note": note,
                           "at": when})
            before_state = to_state
        if path:
            # one line per sample, however many moves (each move has its audit row)
            moved[facts.specimen_id] = {
                "sample_id": facts.specimen_id, "from_state": facts.state, "to_state": state,
                "actor": actor, "location": facts.location,
                **({"through": path[0][0]} if len(path) > 1 else {}),
            }
            moves.setdefault(state, []).append(facts.id)
    return BulkWrites(groups, test_ids, moves, events, jobs, moved, when,
                      [p.copy_rows for p in plans])


def plan_writes_many(by_interface: dict[str, list[BulkPlan]], *,
                     now: datetime) -> BulkWrites:
    """:func:`plan_writes` for each interface's plans, as one set of writes: the rows in
    the order :func:`write_many` called once per interface would write them."""
    merged: BulkWrites | None = None
    for interface, plans in by_interface.items():
        writes = plan_writes(plans, interface=interface, now=now)
        if merged is None:
            merged = writes
            continue
        merged.result_groups += writes.result_groups
        merged.copy_rows += writes.copy_rows
        for status, ids in writes.test_ids.items():
            merged.test_ids.setdefault(status, []).extend(ids)
        for state, ids in writes.moves.items():
            merged.moves.setdefault(state, []).extend(ids)
        merged.events += writes.events
        merged.jobs += writes.jobs
        merged.moved.update(writes.moved)
    assert merged is not None, "no plans"
    return merged


def write_many(session: Session, plans: Sequence[BulkPlan], *, interface: str,
               now: datetime) -> dict[str, dict[str, Any]]:
    """Write ``plans`` (each sample once, each with its ``message_id``) in the caller's
    transaction. Returns, by specimen id, the fields of the ``lis.sample.transition`` log
    line of each sample that moved (from and to state, the state it went through): the
    caller logs them once committed, off the writer thread every message waits for."""
    if not plans:
        return {}
    writes = plan_writes(plans, interface=interface, now=now)
    conn = session.connection()
    if conn.dialect.driver == "psycopg2":
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.copy_expert(RESULT_COPY, io.StringIO(result_copy_text(writes)))
        finally:
            cursor.close()
    else:
        _insert_rows(conn, _RESULTS, writes.result_rows())
    postgres = conn.dialect.name == "postgresql"
    set_status = _SET_TEST_STATUS_PG if postgres else _SET_TEST_STATUS
    move = _MOVE_SAMPLES_PG if postgres else _MOVE_SAMPLES
    for test_status, test_group in writes.test_ids.items():
        conn.execute(set_status, {"ids": test_group, "status": test_status})
    for to_state, sample_group in writes.moves.items():
        conn.execute(move, {"ids": sample_group, "to_state": to_state, "at": writes.when})
    if writes.events:
        conn.execute(_INSERT_EVENTS, writes.events)
    if writes.jobs:
        _enqueue_jobs(session, writes.jobs)
    return writes.moved


def _insert_rows(conn: Any, table: Table, rows: list[dict[str, Any]]) -> None:
    """``rows`` (same keys each) into ``table`` with one driver-level executemany, each
    value converted by its column type's own bind processor: what SQLAlchemy stores,
    without its per-row parameter machinery (on SQLite a third of the writer's time)."""
    names = list(rows[0])
    processors = [table.c[name].type._cached_bind_processor(conn.dialect) for name in names]
    datetimes: dict[Any, Any] = {}
    values = []
    for row in rows:
        converted = []
        for value, process in zip(row.values(), processors, strict=True):
            if process is None or value is None:
                converted.append(value)
            elif type(value) is datetime:
                key = (value, value.utcoffset())
                done = datetimes.get(key)
                if done is None:
                    done = datetimes[key] = process(value)
                converted.append(done)
            else:
                converted.append(process(value))
        values.append(tuple(converted))
    marks = ", ".join("?" * len(names))
    conn.exec_driver_sql(f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({marks})",
                         values)


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


# The result rows' COPY columns: first those one sample's rows of a message share, written
# once per sample, then each result's own.
_RESULT_SHARED = ("sample_fk", "interface", "message_fk", "is_current", "superseded_by_fk",
                  "created_at")
_RESULT_OWN = ("test_code", "analyzer_code", "value_text", "value_number", "comparator",
               "units", "reference_range", "flag", "is_critical", "status", "observed_at",
               "equipment", "comments")
RESULT_COPY_COLUMNS = _RESULT_SHARED + _RESULT_OWN
_NULL = "\\N"
RESULT_COPY = f"COPY {_RESULTS.name} ({', '.join(RESULT_COPY_COLUMNS)}) FROM STDIN"


def result_own_rows(items: Sequence[ResultInput], escaped: dict[str, str] | None = None,
                    times: dict[int, str] | None = None) -> tuple[str, ...]:
    """Each result's own COPY columns (``_RESULT_OWN``), tab-separated: the part of its
    row that :func:`result_copy_text` writes after the columns a sample's rows share.
    Each value as COPY's text format reads it (NULL as ``\\N``; backslash, tab, newline
    and carriage return escaped, so no value can end a field or a row early).
    ``escaped`` and ``times`` remember strings and times already written, across calls."""
    escaped = {} if escaped is None else escaped
    times = {} if times is None else times

    def esc(value: str) -> str:
        text = escaped.get(value)
        if text is None:
            text = escaped[value] = value.translate(_COPY_ESCAPES)
        return text

    rows = []
    for item in items:
        number = _number(item)
        when = item.observed_at  # cached by the item's own (live) object
        if when is None:
            observed = _NULL
        elif (cached := times.get(id(when))) is not None:
            observed = cached
        else:
            utc = observed_utc(item)
            observed = times[id(when)] = _NULL if utc is None else utc.isoformat()
        rows.append("\t".join((
            esc(item.test_code), esc(item.analyzer_code), esc(item.value_text),
            _NULL if number is None else str(number), esc(item.comparator),
            esc(item.units), esc(item.reference_range), esc(item.flag),
            "t" if item.is_critical else "f", esc(item.status), observed,
            esc(item.equipment), esc(_comments(item)))))
    return tuple(rows)


def result_copy_text(writes: BulkWrites) -> str:
    """The result rows of ``writes`` as COPY text for :data:`RESULT_COPY`: the rows of
    :meth:`BulkWrites.result_rows`, each value as COPY's text format reads it, without a
    dict per row (a test holds the two to each other). The fast lane's busiest Python (25
    rows a message): the columns a sample's rows share are written once per sample, each
    result's own columns come from :func:`result_own_rows`, worked out beforehand where
    ``writes.copy_rows`` has them (on the ingest process's reading thread, while the
    writer waits for the database), and each distinct string is escaped once per batch
    (a batch's rows share most of their units, flags, statuses, codes and ranges)."""
    escaped: dict[str, str] = {}
    times: dict[int, str] = {}
    lines: list[str] = []
    created = writes.when.isoformat()
    ready = writes.copy_rows
    for n, (sample_id, message_id, interface, items) in enumerate(writes.result_groups):
        message = _NULL if message_id is None else str(message_id)
        # sample_fk, interface, message_fk, is_current t, superseded_by_fk NULL, created_at
        shared = (f"{sample_id}\t{interface.translate(_COPY_ESCAPES)}\t{message}\tt\t"
                  f"{_NULL}\t{created}\t")
        own = ready[n] if n < len(ready) else None
        if own is None:
            own = result_own_rows(items, escaped, times)
        lines.extend(shared + row for row in own)
    lines.append("")
    return "\n".join(lines)


__all__ = ["RESULT_COPY", "RESULT_COPY_COLUMNS", "BulkPlan", "BulkWrites", "SampleFacts",
           "load_samples", "plan",
           "plan_writes", "plan_writes_many", "result_copy_text", "result_own_rows",
           "sample_facts", "write_many"]
