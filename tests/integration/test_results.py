"""Applying results: sample moves, completion and its report job, corrections, holds."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from lis_bridge.lifecycle import transition
from lis_bridge.models import (
    AccessAudit,
    OrderedTest,
    OrderedTestStatus,
    OutboxJob,
    Result,
    Sample,
    SampleEvent,
    SampleState,
)
from lis_bridge.orders import OrderError, cancel_test
from lis_bridge.queries import ordered_test_codes
from lis_bridge.results import (
    HOLD_REASONS,
    INVALID_RESULT,
    INVALID_TRANSITION,
    NOT_ORDERED,
    NOT_RECEIVED,
    UNKNOWN_SPECIMEN,
    UNMAPPED_CODE,
    ApplyOutcome,
    apply_results,
)
from lis_bridge.types import ResultInput

NOW = datetime(2025, 3, 3, 10, 0, tzinfo=UTC)
PATH = list(SampleState)


def make_sample(session: Session, specimen_id: str = "S1", tests: tuple[str, ...] = ("GLU", "NA"),
                state: SampleState = SampleState.RECEIVED_AT_LAB) -> Sample:
    sample = Sample(specimen_id=specimen_id)
    transition(session, sample, SampleState.COLLECTED, actor="nurse", location="ward 3")
    for code in tests:
        session.add(OrderedTest(sample_fk=sample.id, test_code=code))
    for target in PATH[1 : PATH.index(state) + 1]:
        transition(session, sample, target, actor="setup")
    session.flush()
    return sample


def res(code: str, value: str, status: str = "F", *, critical: bool = False,
        flag: str = "") -> ResultInput:
    return ResultInput(test_code=code, analyzer_code=f"A_{code}", value_text=value,
                       value_number=Decimal(value) if value else None, units="mmol/L",
                       reference_range="1-10", flag=flag, is_critical=critical, status=status)


def apply(session: Session, results: list[ResultInput], specimen_id: str = "S1",
          **kwargs: object) -> ApplyOutcome:
    return apply_results(session, specimen_id, results, interface="an1", message_id=None,
                         now=NOW, **kwargs)  # type: ignore[arg-type]


def events(session: Session, specimen_id: str = "S1") -> list[tuple[str, str, str, str]]:
    return list(session.execute(
        select(SampleEvent.from_state, SampleEvent.to_state, SampleEvent.actor, SampleEvent.note)
        .where(SampleEvent.specimen_id == specimen_id).order_by(SampleEvent.id)
    ).tuples())


def jobs(session: Session, kind: str) -> list[OutboxJob]:
    return list(session.scalars(select(OutboxJob).where(OutboxJob.kind == kind)
                                .order_by(OutboxJob.id)))


def count_results(session: Session) -> int:
    return session.scalar(select(func.count(Result.id))) or 0


def test_first_result_moves_to_processing(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        make_sample(session)
        outcome = apply(session, [res("GLU", "5.2")])
        session.commit()
    assert outcome == ApplyOutcome(applied=1, sample_state="PROCESSING",
                                   result_ids=outcome.result_ids)
    with sessions() as session:
        sample = session.scalars(select(Sample)).one()
        assert sample.state == SampleState.PROCESSING
        assert events(session)[-1] == ("RECEIVED_AT_LAB", "PROCESSING", "interface:an1",
                                       "first result")
        statuses = {t.test_code: t.status for t in sample.ordered_tests}
        assert statuses == {"GLU": "FINAL", "NA": "ORDERED"}
        row = session.scalars(select(Result)).one()
        assert (row.test_code, row.value_text, row.value_number, row.is_current,
                row.interface) == ("GLU", "5.2", Decimal("5.2"), True, "an1")
        assert jobs(session, "render_report") == []
        assert ordered_test_codes(session, "S1") == ["NA"]
        assert ordered_test_codes(session, "NOPE") is None


def test_completion_enqueues_the_report_in_the_same_transaction(
    sessions: sessionmaker[Session],
) -> None:
    with sessions() as session:
        make_sample(session)
        session.commit()
    with sessions() as session:  # rolled back: neither the state nor the job survives
        outcome = apply(session, [res("GLU", "5.2"), res("NA", "140")])
        assert outcome.sample_state == SampleState.COMPLETED
        assert len(jobs(session, "render_report")) == 1
        session.rollback()
    with sessions() as session:
        assert session.scalars(select(Sample)).one().state == SampleState.RECEIVED_AT_LAB
        assert jobs(session, "render_report") == []
        assert count_results(session) == 0
        apply(session, [res("GLU", "5.2"), res("NA", "140")])
        session.commit()
    with sessions() as session:
        sample = session.scalars(select(Sample)).one()
        assert sample.state == SampleState.COMPLETED
        assert [e[:2] for e in events(session)][-2:] == [("RECEIVED_AT_LAB", "PROCESSING"),
                                                         ("PROCESSING", "COMPLETED")]
        (job,) = jobs(session, "render_report")
        assert json.loads(job.payload) == {"sample_id": sample.id, "specimen_id": "S1",
                                           "reason": "completed"}
        assert ordered_test_codes(session, "S1") == []


def test_preliminary_then_final_keeps_history(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        make_sample(session, tests=("GLU",))
        assert apply(session, [res("GLU", "5.0", "P")]).sample_state == "PROCESSING"
        assert session.scalars(select(OrderedTest)).one().status == "PRELIMINARY"
        assert ordered_test_codes(session, "S1") == ["GLU"]
        assert apply(session, [res("GLU", "5.1", "F")]).sample_state == "COMPLETED"
        session.commit()
        old, new = session.scalars(select(Result).order_by(Result.id)).all()
        assert (old.is_current, old.superseded_by_fk, new.is_current) == (False, new.id, True)
        # A preliminary after the final would un-release the value: held.
        outcome = apply(session, [res("GLU", "4.0", "P")])
        assert (outcome.held, outcome.reason) == (True, INVALID_TRANSITION)
        assert count_results(session) == 2


def test_correction_supersedes_and_requests_an_amended_report(
    sessions: sessionmaker[Session],
) -> None:
    with sessions() as session:
        make_sample(session, tests=("GLU",))
        apply(session, [res("GLU", "5.2")])
        session.commit()
        first = session.scalars(select(Result)).one()
        outcome = apply(session, [res("GLU", "6.1", "C")])
        assert (outcome.applied, outcome.sample_state) == (1, "COMPLETED")
        session.commit()
        rows = session.scalars(select(Result).order_by(Result.id)).all()
        assert [(r.value_text, r.status, r.is_current) for r in rows] == [
            ("5.2", "F", False), ("6.1", "C", True)]
        assert rows[0].id == first.id and rows[0].superseded_by_fk == rows[1].id
        assert [json.loads(j.payload)["reason"] for j in jobs(session, "render_report")] == [
            "completed", "correction: GLU"]
        assert session.scalars(select(OrderedTest)).one().status == "FINAL"

        # Reported, then corrected again: audited amendment, and one more render job.
        sample = session.scalars(select(Sample)).one()
        transition(session, sample, SampleState.REPORTED, actor="renderer")
        session.commit()
        apply(session, [res("GLU", "6.3", "C")])
        session.commit()
        assert sample.state == SampleState.REPORTED
        assert events(session)[-1] == ("REPORTED", "REPORTED", "interface:an1",
                                       "correction of GLU: amended report to follow")
        assert len(jobs(session, "render_report")) == 3
        assert count_results(session) == 3
        # The same correction resent: nothing new.
        again = apply(session, [res("GLU", "6.3", "C")])
        assert (again.applied, again.unchanged, again.held) == (0, 1, False)
        assert len(jobs(session, "render_report")) == 3
        assert len(events(session)) == 7


def test_changed_final_after_completion_is_held(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        make_sample(session, tests=("GLU",))
        apply(session, [res("GLU", "5.2")])
        outcome = apply(session, [res("GLU", "9.9")])
        assert (outcome.held, outcome.reason) == (True, INVALID_TRANSITION)
        assert "correction" in outcome.detail
        assert count_results(session) == 1


def test_rerun_while_processing_supersedes(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        make_sample(session)
        apply(session, [res("GLU", "5.2")])
        outcome = apply(session, [res("GLU", "5.4")])
        assert (outcome.applied, outcome.sample_state) == (1, "PROCESSING")
        assert [r.is_current for r in session.scalars(select(Result).order_by(Result.id))] == [
            False, True]


def test_resent_results_are_not_written_twice(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        make_sample(session)
        first = apply(session, [res("GLU", "5.2"), res("NA", "140")])
        session.commit()
        n_events = len(events(session))
        second = apply(session, [res("GLU", "5.2"), res("NA", "140")])
        session.commit()
        assert (first.applied, second.applied, second.unchanged) == (2, 0, 2)
        assert count_results(session) == 2
        assert len(events(session)) == n_events
        assert len(jobs(session, "render_report")) == 1
        # The same test twice in one message with the same value: one row.
        make_sample(session, "S2", tests=("K",))
        twice = apply(session, [res("K", "4.1"), res("K", "4.1")], specimen_id="S2")
        assert (twice.applied, twice.unchanged) == (1, 1)


@pytest.mark.parametrize("state", [SampleState.COLLECTED, SampleState.IN_TRANSIT])
def test_not_received_is_held(sessions: sessionmaker[Session], state: SampleState) -> None:
    with sessions() as session:
        make_sample(session, state=state)
        session.commit()
        outcome = apply(session, [res("GLU", "5.2")])
        assert (outcome.held, outcome.reason, outcome.sample_state) == (True, NOT_RECEIVED, state)
        assert "labrelay samples receive S1" in outcome.detail
        assert count_results(session) == 0
        assert len(events(session)) == PATH.index(state) + 1


def test_auto_receive_is_audited(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        make_sample(session, state=SampleState.IN_TRANSIT)
        outcome = apply(session, [res("GLU", "5.2")], auto_receive=True)
        session.commit()
        assert outcome.sample_state == "PROCESSING"
        assert events(session)[-2:] == [
            ("IN_TRANSIT", "RECEIVED_AT_LAB", "interface:an1", "auto-received"),
            ("RECEIVED_AT_LAB", "PROCESSING", "interface:an1", "first result"),
        ]
        make_sample(session, "S2", state=SampleState.COLLECTED)
        apply(session, [res("GLU", "5.2")], specimen_id="S2", auto_receive=True)
        assert events(session, "S2")[1][:2] == ("COLLECTED", "RECEIVED_AT_LAB")


def test_holds_write_nothing(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        make_sample(session)
        session.commit()
        unknown = apply(session, [res("GLU", "5.2")], specimen_id="S9")
        assert (unknown.held, unknown.reason) == (True, UNKNOWN_SPECIMEN)
        assert "S9" in unknown.detail and "barcode" in unknown.detail

        # One unordered test holds the whole call, the ordered one included.
        unordered = apply(session, [res("GLU", "5.2"), res("TSH", "2.1")])
        assert (unordered.held, unordered.reason) == (True, NOT_ORDERED)
        assert "TSH" in unordered.detail

        bad = apply(session, [ResultInput("GLU", "A_GLU", "5.2", status="Q")])
        assert (bad.held, bad.reason) == (True, INVALID_RESULT)
        long_units = apply(session, [ResultInput("GLU", "A_GLU", "5.2", units="u" * 41)])
        assert (long_units.held, long_units.reason) == (True, INVALID_RESULT)

        assert count_results(session) == 0
        assert session.scalars(select(Sample)).one().state == SampleState.RECEIVED_AT_LAB
        assert session.scalar(select(func.count(OutboxJob.id))) == 0
    assert {UNKNOWN_SPECIMEN, NOT_RECEIVED, NOT_ORDERED, INVALID_TRANSITION,
            UNMAPPED_CODE} <= HOLD_REASONS


def test_accept_unordered_adds_the_test(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        make_sample(session, tests=("GLU",))
        outcome = apply(session, [res("GLU", "5.2"), res("TSH", "2.1")], accept_unordered=True)
        assert (outcome.applied, outcome.sample_state) == (2, "COMPLETED")
        codes = {t.test_code: t.status for t in session.scalars(select(OrderedTest))}
        assert codes == {"GLU": "FINAL", "TSH": "FINAL"}
        audit = session.scalars(select(AccessAudit)).one()
        assert (audit.action, audit.object_id) == ("test.added", "S1")


def test_critical_value_notifies_at_once(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        sample = make_sample(session)
        outcome = apply(session, [res("GLU", "1.1", critical=True, flag="LL")])
        session.commit()
        assert outcome.sample_state == "PROCESSING"  # not complete, no report yet
        (job,) = jobs(session, "notify")
        payload = json.loads(job.payload)
        assert {k: payload[k] for k in ("kind", "sample_id", "specimen_id", "test_code",
                                        "result_id")} == {
            "kind": "critical_value", "sample_id": sample.id, "specimen_id": "S1",
            "test_code": "GLU", "result_id": outcome.result_ids[0]}
        # what the person phoning the ward reads back
        assert (payload["value"], payload["flag"]) == ("1.1", "LL")
        assert job.dedupe_key == f"notify:critical_value:{outcome.result_ids[0]}"
        assert jobs(session, "render_report") == []
        apply(session, [res("GLU", "1.1", critical=True, flag="LL")])  # resend
        assert len(jobs(session, "notify")) == 1


def test_cannot_be_done_counts_as_done(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        make_sample(session)
        apply(session, [res("GLU", "5.2")])
        outcome = apply(session, [ResultInput("NA", "A_NA", "", status="X",
                                              comments=("sample haemolysed",))])
        assert outcome.sample_state == "COMPLETED"
        test = session.scalars(select(OrderedTest).where(OrderedTest.test_code == "NA")).one()
        assert test.status == OrderedTestStatus.CANCELLED
        row = session.scalars(select(Result).where(Result.test_code == "NA")).one()
        assert (row.status, row.comments) == ("X", "sample haemolysed")


def test_cancel_test_completes_the_sample(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        make_sample(session)
        apply(session, [res("GLU", "5.2")])
        with pytest.raises(OrderError, match="final result"):
            cancel_test(session, "S1", "GLU", "dr.who")
        cancel_test(session, "S1", "NA", "dr.who")
        cancel_test(session, "S1", "NA", "dr.who")  # again: nothing changes
        sample = session.scalars(select(Sample)).one()
        assert sample.state == SampleState.COMPLETED
        assert events(session)[-1][:3] == ("PROCESSING", "COMPLETED", "dr.who")
        assert len(jobs(session, "render_report")) == 1
        assert [a.action for a in session.scalars(select(AccessAudit))] == ["test.cancelled"]


def test_observed_at_with_an_offset_is_stored_in_utc(sessions: sessionmaker[Session]) -> None:
    """10:10+05:30 is 04:40 UTC on SQLite too (its DateTime keeps only the wall clock); a
    time without an offset (analyzer local time) is stored as sent."""
    from datetime import timedelta, timezone

    ist = timezone(timedelta(hours=5, minutes=30))
    with sessions() as session:
        make_sample(session)
        apply(session, [replace(res("GLU", "5.2"), observed_at=datetime(2025, 3, 1, 10, 10,
                                                                         tzinfo=ist)),
                        replace(res("NA", "140"), observed_at=datetime(2025, 3, 1, 10, 10))])
        session.commit()
    with sessions() as session:
        stored = dict(session.execute(select(Result.test_code, Result.observed_at)).tuples().all())
    glu, na = stored["GLU"], stored["NA"]
    assert glu is not None and na is not None
    assert (glu.astimezone(UTC) if glu.tzinfo else glu.replace(tzinfo=UTC)) == datetime(
        2025, 3, 1, 4, 40, tzinfo=UTC)
    assert na.replace(tzinfo=None) == datetime(2025, 3, 1, 10, 10)


@pytest.mark.parametrize("path", ["one at a time", "fast lane"])
def test_a_number_the_column_would_round_keeps_its_text_only(
        sessions: sessionmaker[Session], path: str) -> None:
    """value_number is Numeric(24, 8). A value with more decimal places was rounded by the
    database: 0.000000004 stored as 0, 0.123456789 as 0.12345679. Such a number is now
    stored as text only (value_number NULL), as one too large for the column already was;
    trailing zeros are no decimal places lost. Both write paths (the fast lane's COPY on
    PostgreSQL, its INSERT on SQLite)."""
    from lis_bridge import results_bulk

    values = {"GLU": "0.000000004", "NA": "140.0000000000", "K": "0.123456789",
              "CL": "0.00000001"}
    expected = {"GLU": None, "NA": Decimal("140"), "K": None, "CL": Decimal("0.00000001")}
    with sessions() as session:
        make_sample(session, tests=tuple(values))
        items = [res(code, value) for code, value in values.items()]
        if path == "one at a time":
            assert apply(session, items).applied == len(items)
        else:
            facts = results_bulk.load_samples(session, ["S1"])
            plan = results_bulk.plan(facts.get("S1"), items)
            assert plan is not None
            results_bulk.write_many(session, [plan], interface="an1", now=NOW)
        session.commit()
    with sessions() as session:
        stored = {code: (text, number) for code, text, number in session.execute(
            select(Result.test_code, Result.value_text, Result.value_number)).tuples()}
    assert {code: text for code, (text, _) in stored.items()} == values
    assert {code: number for code, (_, number) in stored.items()} == expected
