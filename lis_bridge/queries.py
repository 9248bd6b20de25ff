"""Read-side questions about samples: detail, trace, overdue, pending tests; access audit.

Patient details in :class:`SampleDetail` are for display to an authorised user only; they
never go to a log line. Callers that show them record the read with :func:`record_access`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from lis_bridge.models import (
    AccessAudit,
    MessageSpecimen,
    MessageStatus,
    OrderedTest,
    OrderedTestStatus,
    RawMessage,
    Report,
    Result,
    Sample,
    SampleEvent,
    SampleState,
    utcnow,
)

OPEN_STATES: tuple[str, ...] = (
    SampleState.COLLECTED,
    SampleState.IN_TRANSIT,
    SampleState.RECEIVED_AT_LAB,
    SampleState.PROCESSING,
    SampleState.COMPLETED,
)
PENDING_TEST_STATUSES = (OrderedTestStatus.ORDERED, OrderedTestStatus.PRELIMINARY)


def as_utc(moment: datetime) -> datetime:
    """SQLite returns naive timestamps; everything stored here is UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _opt_utc(moment: datetime | None) -> datetime | None:
    return as_utc(moment) if moment is not None else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class PatientInfo:
    patient_id: str
    name: str
    sex: str
    birth_date: date | None


@dataclass(frozen=True, slots=True)
class OrderedTestInfo:
    test_code: str
    status: str
    ordered_at: datetime


@dataclass(frozen=True, slots=True)
class ResultInfo:
    result_id: int
    test_code: str
    analyzer_code: str
    value_text: str
    comparator: str
    units: str
    reference_range: str
    flag: str
    is_critical: bool
    status: str  # P F C X
    observed_at: datetime | None
    received_at: datetime
    interface: str
    message_id: int | None
    history_count: int  # earlier (superseded) rows for the same test


@dataclass(frozen=True, slots=True)
class ReportInfo:
    version: int
    path: str
    sha256: str
    created_at: datetime
    superseded: bool


@dataclass(frozen=True, slots=True)
class HeldMessageInfo:
    message_id: int
    received_at: datetime
    interface: str
    hold_reason: str
    hold_detail: str


@dataclass(frozen=True, slots=True)
class SampleDetail:
    sample_id: int
    specimen_id: str
    state: str
    location: str
    state_changed_at: datetime
    collected_at: datetime | None
    created_at: datetime
    patient: PatientInfo | None
    ordered_tests: tuple[OrderedTestInfo, ...]
    results: tuple[ResultInfo, ...]
    reports: tuple[ReportInfo, ...]
    held_messages: tuple[HeldMessageInfo, ...]

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = _jsonable(asdict(self))
        return data


@dataclass(frozen=True, slots=True)
class TraceStep:
    at: datetime
    from_state: str  # "" for the creation
    to_state: str
    location: str
    actor: str
    note: str
    since_previous: timedelta | None  # None for the first step

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = _jsonable(asdict(self))
        return data


@dataclass(frozen=True, slots=True)
class OverdueSample:
    specimen_id: str
    state: str
    location: str
    since: datetime
    waiting: timedelta
    pending_tests: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = _jsonable(asdict(self))
        return data


def sample_detail(session: Session, specimen_id: str) -> SampleDetail | None:
    """Everything an operator needs about one sample, or None when it is unknown."""
    sample = session.scalar(select(Sample).where(Sample.specimen_id == specimen_id))
    if sample is None:
        return None
    patient = None
    if sample.patient is not None:
        p = sample.patient
        patient = PatientInfo(p.patient_id, p.name, p.sex, p.birth_date)
    tests = tuple(
        OrderedTestInfo(t.test_code, t.status, as_utc(t.ordered_at))
        for t in session.scalars(
            select(OrderedTest).where(OrderedTest.sample_fk == sample.id).order_by(OrderedTest.id)
        )
    )
    history = dict(
        session.execute(
            select(Result.test_code, func.count(Result.id))
            .where(Result.sample_fk == sample.id, Result.is_current.is_(False))
            .group_by(Result.test_code)
        ).tuples().all()
    )
    results = tuple(
        ResultInfo(
            result_id=r.id, test_code=r.test_code, analyzer_code=r.analyzer_code,
            value_text=r.value_text, comparator=r.comparator, units=r.units,
            reference_range=r.reference_range, flag=r.flag, is_critical=bool(r.is_critical),
            status=r.status, observed_at=_opt_utc(r.observed_at),
            received_at=as_utc(r.created_at), interface=r.interface, message_id=r.message_fk,
            history_count=int(history.get(r.test_code, 0)),
        )
        for r in session.scalars(
            select(Result)
            .where(Result.sample_fk == sample.id, Result.is_current.is_(True))
            .order_by(Result.id)
        )
    )
    reports = tuple(
        ReportInfo(r.version, r.path, r.sha256, as_utc(r.created_at),
                   r.superseded_by_fk is not None)
        for r in session.scalars(
            select(Report).where(Report.sample_fk == sample.id).order_by(Report.version)
        )
    )
    held = tuple(
        HeldMessageInfo(m.id, as_utc(m.received_at), m.interface, m.hold_reason, m.hold_detail)
        for m in session.scalars(
            select(RawMessage)
            .join(MessageSpecimen, MessageSpecimen.message_fk == RawMessage.id)
            .where(MessageSpecimen.specimen_id == specimen_id,
                   RawMessage.status == MessageStatus.HELD)
            .distinct()
            .order_by(RawMessage.id)
        )
    )
    return SampleDetail(
        sample_id=sample.id, specimen_id=sample.specimen_id, state=sample.state,
        location=sample.location, state_changed_at=as_utc(sample.state_changed_at),
        collected_at=_opt_utc(sample.collected_at), created_at=as_utc(sample.created_at),
        patient=patient, ordered_tests=tests, results=results, reports=reports,
        held_messages=held,
    )


def sample_trace(session: Session, specimen_id: str) -> list[TraceStep]:
    """The sample's audit trail, oldest first (empty when the specimen is unknown)."""
    steps: list[TraceStep] = []
    previous: datetime | None = None
    for event in session.scalars(
        select(SampleEvent).where(SampleEvent.specimen_id == specimen_id).order_by(SampleEvent.id)
    ):
        at = as_utc(event.at)
        steps.append(TraceStep(
            at=at, from_state=event.from_state, to_state=event.to_state,
            location=event.location, actor=event.actor, note=event.note,
            since_previous=(at - previous) if previous is not None else None,
        ))
        previous = at
    return steps


def overdue_samples(
    session: Session,
    older_than: timedelta,
    now: datetime | None = None,
    states: Iterable[str] = OPEN_STATES,
) -> list[OverdueSample]:
    """Samples that have been in one of ``states`` for longer than ``older_than``, oldest first.

    The tube found two days later in a transport cooler shows up here as IN_TRANSIT.
    """
    now = as_utc(now or utcnow())
    cutoff = now - older_than
    samples = list(
        session.scalars(
            select(Sample)
            .where(Sample.state.in_(list(states)), Sample.state_changed_at <= cutoff)
            .order_by(Sample.state_changed_at, Sample.id)
        )
    )
    pending: dict[int, list[str]] = {}
    if samples:
        for sample_fk, code in session.execute(
            select(OrderedTest.sample_fk, OrderedTest.test_code)
            .where(OrderedTest.sample_fk.in_([s.id for s in samples]),
                   OrderedTest.status.in_(PENDING_TEST_STATUSES))
            .order_by(OrderedTest.id)
        ).tuples():
            pending.setdefault(sample_fk, []).append(code)
    return [
        OverdueSample(
            specimen_id=s.specimen_id, state=s.state, location=s.location,
            since=as_utc(s.state_changed_at), waiting=now - as_utc(s.state_changed_at),
            pending_tests=tuple(pending.get(s.id, ())),
        )
        for s in samples
    ]


def ordered_test_codes(session: Session, specimen_id: str) -> list[str] | None:
    """LIS test codes still to do for a host query (not FINAL, not CANCELLED).

    None when the specimen is unknown, [] when nothing is pending.
    """
    sample_fk = session.scalar(select(Sample.id).where(Sample.specimen_id == specimen_id))
    if sample_fk is None:
        return None
    return list(
        session.scalars(
            select(OrderedTest.test_code)
            .where(OrderedTest.sample_fk == sample_fk,
                   OrderedTest.status.in_(PENDING_TEST_STATUSES))
            .order_by(OrderedTest.id)
        )
    )


def record_access(
    session: Session, actor: str, action: str, object_type: str, object_id: str,
    detail: str = "",
) -> AccessAudit:
    """Append one access-audit row (who read or changed what) in the caller's transaction."""
    row = AccessAudit(actor=actor[:100], action=action[:60], object_type=object_type[:40],
                      object_id=object_id[:100], detail=detail, at=utcnow())
    session.add(row)
    session.flush()
    return row
