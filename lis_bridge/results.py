"""Writing analyzer results (in LIS vocabulary) for one sample, and what follows from them.

Rules, in the words a laboratory uses:

- Nothing is written unless everything in the call can be written: all checks run first,
  and a held outcome leaves the database untouched (the caller stores the raw message as
  HELD with :attr:`ApplyOutcome.reason`; this module never touches ``raw_messages``).
- Result statuses: P (preliminary) -> ordered test PRELIMINARY; F (final) and C
  (correction) -> FINAL; X (cannot be done) -> the result row is kept (so the report can
  say "not done", with the analyzer's comment) and the ordered test is CANCELLED, which
  counts as done for completion. A C without an earlier result is simply a final result.
- History is never overwritten or deleted: a new value for a test adds a row, and the
  previous current row gets ``is_current = False`` and ``superseded_by_fk``.
- A resend of the current value with the same status is not a new row (idempotent): same
  value text, number, comparator, units, flag, critical mark and status.
- A PRELIMINARY after a FINAL for the same test is held (INVALID_TRANSITION): it would turn
  a released value back into an unconfirmed one.
- Once a sample is COMPLETED or REPORTED only corrections (C) change it. A different F, P
  or X for a completed sample is held (INVALID_TRANSITION): a changed value after release
  without the analyzer saying "correction" may be a reused or misread barcode, and an
  operator must look. A correction on a COMPLETED sample queues a new render job; on a
  REPORTED sample it also writes the audited REPORTED -> REPORTED amendment event and the
  render job produces an amended report version.
- Sample moves (actor ``interface:<name>``): RECEIVED_AT_LAB -> PROCESSING with the first
  written result; PROCESSING -> COMPLETED when every ordered test is FINAL or CANCELLED, and
  that enqueues ``render_report`` in the same transaction.
- A written result marked critical enqueues a ``notify`` (critical_value) job at once,
  whatever the sample's completion.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, cast

import structlog
from sqlalchemy import Table, bindparam, func, insert, select, text, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from lis_bridge import lifecycle
from lis_bridge.models import (
    JobStatus,
    OrderedTest,
    OrderedTestStatus,
    OutboxJob,
    Result,
    Sample,
    SampleState,
    utcnow,
)
from lis_bridge.outbox import enqueue
from lis_bridge.types import ResultInput

log = structlog.get_logger(__name__)

# Hold reason codes (stored in raw_messages.hold_reason).
UNKNOWN_SPECIMEN = "UNKNOWN_SPECIMEN"  # no such sample: a misprinted or misread barcode
NOT_RECEIVED = "NOT_RECEIVED"  # sample is COLLECTED / IN_TRANSIT and auto-receive is off
NOT_ORDERED = "NOT_ORDERED"  # a result for a test the sample does not have ordered
INVALID_TRANSITION = "INVALID_TRANSITION"  # the sample or test cannot take this result now
INVALID_RESULT = "INVALID_RESULT"  # the result itself cannot be stored (status, field length)
UNMAPPED_CODE = "UNMAPPED_CODE"  # assigned by the engine: an analyzer code has no LIS mapping

HOLD_REASONS = frozenset(
    {UNKNOWN_SPECIMEN, NOT_RECEIVED, NOT_ORDERED, INVALID_TRANSITION, INVALID_RESULT,
     UNMAPPED_CODE}
)

RESULT_STATUSES = ("P", "F", "C", "X")
DONE_TEST_STATUSES = (OrderedTestStatus.FINAL, OrderedTestStatus.CANCELLED)

# Column widths of `results` (lis_bridge.models); PostgreSQL refuses longer values, and a
# refused INSERT would roll back the stored raw message with it, so check first.
_FIELD_LIMITS = {
    "test_code": 64,
    "analyzer_code": 64,
    "comparator": 2,
    "units": 40,
    "reference_range": 100,
    "flag": 4,
    "equipment": 100,
}
_LIMITED_FIELDS = operator.attrgetter(*_FIELD_LIMITS)
_LIMITS = tuple(_FIELD_LIMITS.values())
# Numeric(24, 8): 16 digits before the point. Larger numbers keep their text only; so do
# numbers with more than 8 decimal places, which the column would round (0.000000004 to
# 0, 0.123456789 to 0.12345679): a number is stored as sent or not at all.
_MAX_NUMBER = Decimal(10) ** 16
_MIN_EXPONENT = -8


@dataclass(frozen=True, slots=True)
class ApplyOutcome:
    """What became of one call: ``applied`` rows written, or held with a reason."""

    applied: int = 0
    held: bool = False
    reason: str = ""  # one of HOLD_REASONS when held
    detail: str = ""  # operator text: what is wrong and what to do
    unchanged: int = 0  # resends of the current value, not written again
    sample_state: str = ""  # the sample's state after the call ("" when unknown)
    result_ids: tuple[int, ...] = ()  # rows written, in input order

    @classmethod
    def hold(cls, reason: str, detail: str, sample_state: str = "") -> ApplyOutcome:
        return cls(held=True, reason=reason, detail=detail, sample_state=sample_state)


def interface_actor(interface: str) -> str:
    return f"interface:{interface}"[: lifecycle.MAX_ACTOR]


def _as_utc(moment: datetime | None) -> datetime:
    if moment is None:
        return utcnow()
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def observed_utc(item: ResultInput) -> datetime | None:
    """``item.observed_at`` as stored: an aware time in UTC (SQLite keeps only the wall
    clock, so 10:10+05:30 would read back as 10:10), a naive one as sent; None when the
    instant lies outside what a datetime holds in UTC."""
    moment = item.observed_at
    if moment is None or moment.tzinfo is None:
        return moment
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        return None


# Statements run for every message, prepared once (building one costs more than running it).
# The sample and its ordered tests come in one query (a sample with no tests gives one row
# with NULL test columns).
_SAMPLE_WITH_TESTS = (
    select(Sample, OrderedTest.test_code, OrderedTest.id, OrderedTest.status)
    .outerjoin(OrderedTest, OrderedTest.sample_fk == Sample.id)
    .where(Sample.specimen_id == bindparam("specimen_id"))
    .order_by(OrderedTest.id)
)
# Serialises two writers on one sample (engine and a CLI user); SQLite's BEGIN IMMEDIATE
# already does.
_SAMPLE_WITH_TESTS_FOR_UPDATE = _SAMPLE_WITH_TESTS.with_for_update(of=Sample)
_RESULTS_OF_SAMPLE = (
    select(Result.test_code, Result.is_current, Result.id, Result.status, Result.value_text,
           Result.value_number, Result.comparator, Result.units, Result.flag,
           Result.is_critical)
    .where(Result.sample_fk == bindparam("sample_id"))
    .order_by(Result.id)
)


@dataclass(slots=True)
class _Ordered:
    id: int | None  # None: added by this call (accept_unordered), not flushed yet
    status: str
    row: OrderedTest | None = None  # the pending ORM object of an added test


def _lock_sample(session: Session, specimen_id: str) -> tuple[Sample | None, dict[str, _Ordered]]:
    """The sample (locked for this transaction) and its ordered tests by test code."""
    postgres = session.get_bind().dialect.name == "postgresql"
    query = _SAMPLE_WITH_TESTS_FOR_UPDATE if postgres else _SAMPLE_WITH_TESTS
    rows = session.execute(query, {"specimen_id": specimen_id}).all()
    if not rows:
        return None, {}
    ordered = {code: _Ordered(ident, status) for _, code, ident, status in rows if code is not None}
    return rows[0][0], ordered


@dataclass(slots=True)
class _Stored:
    """A stored result row as far as the resend / transition checks need it."""

    id: int
    status: str
    value_text: str
    value_number: Decimal | None
    comparator: str
    units: str
    flag: str
    is_critical: bool


def _result_history(session: Session, sample: Sample) -> tuple[dict[str, _Stored], int]:
    """The sample's current result per test, and how many result rows it has in all.

    One query for both: the count names the render job (see :func:`enqueue_render`).
    """
    rows = session.execute(_RESULTS_OF_SAMPLE, {"sample_id": sample.id}).all()
    current = {row[0]: _Stored(*row[2:]) for row in rows if row[1]}
    return current, len(rows)


def _sync_loaded(session: Session, model: type[Any], ident: int, **values: Any) -> None:
    """Keep an ORM object this session already holds in step with a Core UPDATE.

    The bulk writes below bypass the unit of work; without this a caller that loaded the
    row earlier in the same session (a test, a CLI command) would read the old values.
    """
    obj = session.identity_map.get(session.identity_key(model, ident))
    if obj is not None:
        for key, value in values.items():
            set_committed_value(obj, key, value)


def _comments(item: ResultInput) -> str:
    return "\n".join(filter(None, item.comments)) if item.comments else ""


def _number(item: ResultInput) -> Decimal | None:
    number = item.value_number
    if number is None or not number.is_finite() or abs(number) >= _MAX_NUMBER:
        return None
    exponent = number.as_tuple().exponent
    if isinstance(exponent, int) and exponent < _MIN_EXPONENT:
        # more decimal places than the column keeps, unless they are trailing zeros
        normal = number.normalize().as_tuple().exponent
        if isinstance(normal, int) and normal < _MIN_EXPONENT:
            return None
    return number


def _same_value(row: _Stored, item: ResultInput) -> bool:
    number = _number(item)
    stored = row.value_number
    same_number = (stored is None and number is None) or (
        stored is not None and number is not None and Decimal(stored) == number
    )
    return (
        row.status == item.status
        and row.value_text == item.value_text
        and same_number
        and row.comparator == item.comparator
        and row.units == item.units
        and row.flag == item.flag
        and bool(row.is_critical) == bool(item.is_critical)
    )


def _check_item(item: ResultInput, specimen_id: str) -> str:
    """Why this result cannot be stored at all, or ""."""
    if (item.status in RESULT_STATUSES and item.test_code.strip()
            and all(map(operator.le, map(len, _LIMITED_FIELDS(item)), _LIMITS))):
        return ""  # the everyday case (25 a message), without a Python loop
    if not item.test_code.strip():
        return (f"a result for specimen {specimen_id} has no LIS test code; check the "
                f"mapping of analyzer code {item.analyzer_code!r}")
    if item.status not in RESULT_STATUSES:
        return (f"result {item.test_code} for specimen {specimen_id} has status "
                f"{item.status!r}; expected P, F, C or X (check the driver's status field)")
    for name, limit in _FIELD_LIMITS.items():
        value = getattr(item, name)
        if len(value) > limit:
            return (f"result {item.test_code} for specimen {specimen_id}: {name} is "
                    f"{len(value)} characters, the LIS stores at most {limit}; shorten it "
                    "in the mapping")
    return ""


def apply_results(
    session: Session,
    specimen_id: str,
    results: Sequence[ResultInput],
    *,
    interface: str,
    message_id: int | None,
    auto_receive: bool = False,
    accept_unordered: bool = False,
    now: datetime | None = None,
) -> ApplyOutcome:
    """Write ``results`` for ``specimen_id`` in the caller's transaction, or hold them all.

    ``accept_unordered``: a result for a test the sample has not ordered is held
    (NOT_ORDERED) by default, as a laboratory would; with True it is accepted and the test
    is added to the sample's orders (audited in access_audit as ``test.added``).
    """
    when = _as_utc(now)
    actor = interface_actor(interface)
    bound = log.bind(interface=interface, sample_id=specimen_id, message_id=message_id)

    sample, ordered = _lock_sample(session, specimen_id)
    if sample is None:
        return ApplyOutcome.hold(
            UNKNOWN_SPECIMEN,
            f"specimen {specimen_id} is not in the LIS: check the barcode on the tube and the "
            "order import (`labrelay orders import`), then `labrelay messages reprocess`",
        )
    state = sample.state

    # --- checks: nothing is written until every result of the call has passed them
    for item in results:
        problem = _check_item(item, specimen_id)
        if problem:
            return ApplyOutcome.hold(INVALID_RESULT, problem, state)

    if state in (SampleState.COLLECTED, SampleState.IN_TRANSIT) and not auto_receive:
        return ApplyOutcome.hold(
            NOT_RECEIVED,
            f"specimen {specimen_id} is {state} (location {sample.location or 'unknown'}), not "
            "received at the lab: receive it (`labrelay samples receive "
            f"{specimen_id} --location LAB --by USER`), then `labrelay messages reprocess`",
            state,
        )

    missing = [i.test_code for i in results if i.test_code not in ordered]
    if missing and not accept_unordered:
        codes = ", ".join(dict.fromkeys(missing))
        return ApplyOutcome.hold(
            NOT_ORDERED,
            f"specimen {specimen_id} has no order for {codes} (ordered: "
            f"{', '.join(ordered) or 'nothing'}): add the test (`labrelay orders import` "
            "with the test) or check the sample, then `labrelay messages reprocess`",
            state,
        )

    released = state in (SampleState.COMPLETED, SampleState.REPORTED)
    current, row_count = _result_history(session, sample)
    plan: list[ResultInput] = []
    unchanged = 0
    seen: dict[str, ResultInput] = {}
    for item in results:
        before = seen.get(item.test_code)
        row = current.get(item.test_code)
        if before is not None:
            # The same test twice in one message: the later one is what the analyzer means,
            # judged against the earlier one exactly as a resend would be.
            if _same_as_input(before, item):
                unchanged += 1
                continue
            prior_status = before.status
        elif row is not None and _same_value(row, item):
            unchanged += 1
            continue
        else:
            prior_status = row.status if row is not None else ""
        if item.status == "P" and prior_status in ("F", "C"):
            return ApplyOutcome.hold(
                INVALID_TRANSITION,
                f"specimen {specimen_id}: a preliminary result for {item.test_code} arrived "
                "after its final result; the final value stands. Check the analyzer's "
                "rerun, and send a correction (C) if the value changed",
                state,
            )
        if released and item.status != "C":
            return ApplyOutcome.hold(
                INVALID_TRANSITION,
                f"specimen {specimen_id} is {state} and a different result for "
                f"{item.test_code} arrived with status {item.status}, not as a correction "
                "(C). Check the tube's barcode and the rerun; the analyzer must send a "
                "changed value as a correction",
                state,
            )
        seen[item.test_code] = item
        plan.append(item)

    if not plan:
        bound.info("lis.results.unchanged", unchanged=unchanged)
        return ApplyOutcome(unchanged=unchanged, sample_state=state)

    # --- writes
    # A 25-result message used to cost ~30 ORM flushes (one per result for its id, more
    # for transitions and the completion check). Instead: one multi-row INSERT of the
    # results (RETURNING their ids), one UPDATE per new ordered-test status, the completion
    # decided from what was loaded above (the sample row is locked, so nobody else changes
    # its tests meanwhile), and one ORM flush at the end for the sample's moves and their
    # audit rows.
    if state in (SampleState.COLLECTED, SampleState.IN_TRANSIT):
        lifecycle.transition(session, sample, SampleState.RECEIVED_AT_LAB, actor=actor,
                             note="auto-received", at=when, flush=False)
        bound.warning("lis.sample.auto_received", from_state=state)

    for item in plan:
        if item.test_code not in ordered:  # accept_unordered: the analyzer's extra is ordered
            added = OrderedTest(sample_fk=sample.id, test_code=item.test_code, ordered_at=when)
            session.add(added)
            ordered[item.test_code] = _Ordered(None, OrderedTestStatus.ORDERED, added)
            _audit(session, actor, "test.added", specimen_id,
                   f"{item.test_code}: result arrived without an order (accept_unordered)", when)

    result_ids = _insert_results(session, sample, plan, interface, message_id, when)

    # Superseded rows: the previous current row of each test points at its replacement.
    # Within one call a test can appear twice; each new row supersedes the one before it.
    superseded: list[dict[str, Any]] = []
    latest: dict[str, int] = {code: row.id for code, row in current.items()}
    for item, new_id in zip(plan, result_ids, strict=True):
        previous_id = latest.get(item.test_code)
        if previous_id is not None:
            superseded.append({"old_id": previous_id, "new_id": new_id})
        latest[item.test_code] = new_id
    if superseded:
        session.execute(_SUPERSEDE, superseded)
        for change in superseded:
            _sync_loaded(session, Result, change["old_id"], is_current=False,
                         superseded_by_fk=change["new_id"])

    # Ordered tests take the status of the last result written for them.
    corrections: list[str] = []
    new_status: dict[str, str] = {}
    for item in plan:
        new_status[item.test_code] = _TEST_STATUS[item.status]
        if item.status == "C":
            corrections.append(item.test_code)
    by_status: dict[str, list[int]] = {}
    for code, status in new_status.items():
        test = ordered[code]
        if test.status == status:
            continue
        test.status = status
        if test.row is not None:  # added above, inserted with the next flush
            test.row.status = status
        else:
            assert test.id is not None
            by_status.setdefault(status, []).append(test.id)
    for status, ids in by_status.items():
        session.execute(_SET_TEST_STATUS, {"ids": ids, "status": status})
        for ident in ids:
            _sync_loaded(session, OrderedTest, ident, status=status)

    critical = [(item, new_id) for item, new_id in zip(plan, result_ids, strict=True)
                if item.is_critical]
    if critical:
        _enqueue_jobs(session, [
            ("notify", f"notify:critical_value:{new_id}", {
                "kind": "critical_value",
                "sample_id": sample.id,
                "specimen_id": specimen_id,
                "test_code": item.test_code,
                "result_id": new_id,
                # what the person phoning the ward needs to read back (no patient identity)
                "value": item.value_text,
                "units": item.units,
                "flag": item.flag,
                "reference_range": item.reference_range,
                "observed_at": item.observed_at.isoformat() if item.observed_at else "",
                "interface": interface,
                "analyzer_code": item.analyzer_code,
            })
            for item, new_id in critical
        ])
        for item, new_id in critical:
            bound.warning("lis.result.critical", test_code=item.test_code, result_id=new_id)

    row_count += len(result_ids)
    if sample.state == SampleState.RECEIVED_AT_LAB:
        lifecycle.transition(session, sample, SampleState.PROCESSING, actor=actor,
                             note="first result", at=when, flush=False)
    if sample.state == SampleState.PROCESSING:
        statuses = [t.status for t in ordered.values()]
        if statuses and all(s in DONE_TEST_STATUSES for s in statuses):
            lifecycle.transition(session, sample, SampleState.COMPLETED, actor=actor,
                                 note="every ordered test final or cancelled", at=when,
                                 flush=False)
            _enqueue_render(session, sample, row_count, reason="completed")
    elif corrections and sample.state in (SampleState.COMPLETED, SampleState.REPORTED):
        codes = ", ".join(corrections)
        if sample.state == SampleState.REPORTED:
            lifecycle.transition(session, sample, SampleState.REPORTED, actor=actor,
                                 note=f"correction of {codes}: amended report to follow",
                                 at=when, flush=False)
        _enqueue_render(session, sample, row_count, reason=f"correction: {codes}")

    # One flush for the sample's moves, their audit rows and any added tests: the caller
    # (a savepoint, a later query) sees everything of this call in the database.
    session.flush()
    bound.info("lis.results.applied", written=len(result_ids), unchanged=unchanged,
               state=sample.state)
    return ApplyOutcome(
        applied=len(result_ids),
        unchanged=unchanged,
        sample_state=sample.state,
        result_ids=tuple(result_ids),
    )


_TEST_STATUS = {
    "P": OrderedTestStatus.PRELIMINARY,
    "F": OrderedTestStatus.FINAL,
    "C": OrderedTestStatus.FINAL,
    "X": OrderedTestStatus.CANCELLED,
}

_RESULTS = cast(Table, Result.__table__)
_ORDERED_TESTS = cast(Table, OrderedTest.__table__)
_OUTBOX = cast(Table, OutboxJob.__table__)
# Core statements on the tables (not the ORM entities): no unit of work per row, and an
# executemany with RETURNING becomes one multi-row INSERT ("insertmanyvalues").
_INSERT_RESULTS = insert(_RESULTS).returning(_RESULTS.c.test_code, _RESULTS.c.id)
# Asking for the ids in input order makes SQLite insert row by row (it cannot promise the
# order of RETURNING); only needed when one call has the same test twice.
_INSERT_RESULTS_IN_ORDER = insert(_RESULTS).returning(_RESULTS.c.id,
                                                      sort_by_parameter_order=True)
_SUPERSEDE = (
    update(_RESULTS)
    .where(_RESULTS.c.id == bindparam("old_id"))
    .values(is_current=False, superseded_by_fk=bindparam("new_id"))
)
_SET_TEST_STATUS = (
    update(_ORDERED_TESTS)
    .where(_ORDERED_TESTS.c.id.in_(bindparam("ids", expanding=True)))
    .values(status=bindparam("status"))
)
# INSERT ... ON CONFLICT DO NOTHING, the same text on SQLite (>= 3.24) and PostgreSQL. As
# text() it is compiled once; SQLAlchemy's dialect insert() constructs are never cached.
_JOB_COLUMNS = [c for c in _OUTBOX.c if c.name != "id"]
_INSERT_JOB = text(
    f"INSERT INTO {_OUTBOX.name} ({', '.join(c.name for c in _JOB_COLUMNS)}) "
    f"VALUES ({', '.join(':' + c.name for c in _JOB_COLUMNS)}) "
    "ON CONFLICT (dedupe_key) DO NOTHING"
).bindparams(*(bindparam(c.name, type_=c.type) for c in _JOB_COLUMNS))


def _insert_results(
    session: Session, sample: Sample, plan: Sequence[ResultInput], interface: str,
    message_id: int | None, when: datetime,
) -> list[int]:
    """Insert one row per planned result; their ids, in ``plan`` order."""
    rows = [result_row(sample.id, item, interface, message_id, when) for item in plan]
    codes = [item.test_code for item in plan]
    if len(set(codes)) < len(codes):
        return list(session.scalars(_INSERT_RESULTS_IN_ORDER, rows))
    ids = dict(session.execute(_INSERT_RESULTS, rows).tuples().all())
    return [ids[code] for code in codes]


def result_row(sample_id: int, item: ResultInput, interface: str, message_id: int | None,
               when: datetime) -> dict[str, Any]:
    """The ``results`` row for one new, current result (every column; one place for both
    the one-sample path and :mod:`lis_bridge.results_bulk`)."""
    return {
        "sample_fk": sample_id,
        "test_code": item.test_code,
        "analyzer_code": item.analyzer_code,
        "value_text": item.value_text,
        "value_number": _number(item),
        "comparator": item.comparator,
        "units": item.units,
        "reference_range": item.reference_range,
        "flag": item.flag,
        "is_critical": item.is_critical,
        "status": item.status,
        "observed_at": observed_utc(item),
        "equipment": item.equipment,
        "comments": _comments(item),
        "interface": interface,
        "message_fk": message_id,
        "is_current": True,
        "superseded_by_fk": None,
        "created_at": when,
    }


def _same_as_input(a: ResultInput, b: ResultInput) -> bool:
    return (a.status, a.value_text, a.value_number, a.comparator, a.units, a.flag,
            a.is_critical) == (b.status, b.value_text, b.value_number, b.comparator, b.units,
                               b.flag, b.is_critical)


def _audit(session: Session, actor: str, action: str, specimen_id: str, detail: str,
           at: datetime) -> None:
    from lis_bridge.models import AccessAudit

    session.add(AccessAudit(actor=actor, action=action, object_type="sample",
                            object_id=specimen_id, detail=detail, at=at))


def enqueue_render(session: Session, sample: Sample, *, reason: str) -> None:
    """Queue a report rendering; a later change (more result rows) gets a new job.

    The dedupe key counts the sample's result rows: the same data never queues twice,
    and a correction (one more row) queues the amended version.
    """
    rows = session.scalar(select(func.count(Result.id)).where(Result.sample_fk == sample.id))
    enqueue(session, "render_report", f"render_report:{sample.id}:r{rows or 0}", {
        "sample_id": sample.id,
        "specimen_id": sample.specimen_id,
        "reason": reason,
    })


def _enqueue_render(session: Session, sample: Sample, result_rows: int, *, reason: str) -> None:
    """:func:`enqueue_render` when the caller already knows the sample's result row count."""
    _enqueue_jobs(session, [("render_report", f"render_report:{sample.id}:r{result_rows}", {
        "sample_id": sample.id,
        "specimen_id": sample.specimen_id,
        "reason": reason,
    })])


def _enqueue_jobs(session: Session, jobs: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
    """Outbox jobs ``(kind, dedupe_key, payload)`` in the caller's transaction, each key once.

    Same outcome as :func:`lis_bridge.outbox.enqueue` per job, but one ``INSERT ... ON
    CONFLICT (dedupe_key) DO NOTHING`` instead of a lookup, a savepoint and a flush each:
    this runs for every completed sample and every critical value.
    """
    now = utcnow()
    session.execute(_INSERT_JOB, [
        {"kind": kind, "dedupe_key": key, "payload": json.dumps(payload, sort_keys=True),
         "status": JobStatus.PENDING, "attempts": 0, "next_attempt_at": now, "last_error": "",
         "created_at": now, "updated_at": now}
        for kind, key, payload in jobs
    ])


def is_done(session: Session, sample: Sample) -> bool:
    """Every ordered test FINAL or CANCELLED (and at least one test ordered)."""
    statuses = list(
        session.scalars(select(OrderedTest.status).where(OrderedTest.sample_fk == sample.id))
    )
    return bool(statuses) and all(s in DONE_TEST_STATUSES for s in statuses)


def complete_if_done(
    session: Session, sample: Sample, *, actor: str, now: datetime | None = None
) -> bool:
    """PROCESSING -> COMPLETED (and the render job) once every ordered test is done."""
    if sample.state != SampleState.PROCESSING or not is_done(session, sample):
        return False
    lifecycle.transition(session, sample, SampleState.COMPLETED, actor=actor,
                         note="every ordered test final or cancelled", at=_as_utc(now))
    enqueue_render(session, sample, reason="completed")
    return True
