"""The sample lifecycle table, exhaustively, and its append-only audit trail (both databases)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, text
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import Session, sessionmaker

from engine.errors import InvalidTransition
from lis_bridge.db import make_engine, session_factory
from lis_bridge.lifecycle import NEW, TRANSITIONS, allowed_targets, transition
from lis_bridge.models import Sample, SampleEvent, SampleState

STATES = [NEW, *SampleState]
TARGETS = list(SampleState)
AT = datetime(2025, 3, 3, 9, 30, tzinfo=UTC)


def _naive_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=None) if moment.tzinfo is None else (
        moment.astimezone(UTC).replace(tzinfo=None)
    )


def _sample_in(session: Session, specimen_id: str, state: str) -> Sample:
    sample = Sample(specimen_id=specimen_id)
    if state == NEW:
        return sample  # not yet in the database: the creation move
    transition(session, sample, SampleState.COLLECTED, actor="setup", location="ward")
    sample.state = state  # test setup only: place the sample in the state under test
    session.flush()
    return sample


def test_the_table_is_the_documented_lifecycle() -> None:
    assert (NEW, SampleState.COLLECTED) in TRANSITIONS
    line = [NEW, *SampleState]
    for before, after in itertools.pairwise(line):
        assert (before, after) in TRANSITIONS, (before, after)
    # The two documented extras (lifecycle module text): on-site collection, amendment.
    extras = set(TRANSITIONS) - set(itertools.pairwise(line))
    assert extras == {
        (SampleState.COLLECTED, SampleState.RECEIVED_AT_LAB),
        (SampleState.REPORTED, SampleState.REPORTED),
    }
    assert allowed_targets(SampleState.PROCESSING) == [SampleState.COMPLETED]


def test_every_pair_of_states(sessions: sessionmaker[Session]) -> None:
    """Every allowed move works and writes its audit row; every other pair is refused."""
    with sessions() as session:
        for n, (before, after) in enumerate(
            (b, a) for b in STATES for a in TARGETS
        ):
            specimen_id = f"LC{n:03d}"
            sample = _sample_in(session, specimen_id, before)
            events_before = session.scalar(
                select(func.count(SampleEvent.id)).where(SampleEvent.specimen_id == specimen_id)
            )
            if (before, after) in TRANSITIONS:
                event = transition(session, sample, after, actor="tech.ono",
                                   location="bench 4", note="test", at=AT)
                session.flush()
                assert sample.state == after
                assert sample.location == "bench 4"
                stored = session.get(SampleEvent, event.id)
                assert stored is not None
                assert (stored.sample_fk, stored.specimen_id, stored.from_state, stored.to_state,
                        stored.location, stored.actor, stored.note) == (
                    sample.id, specimen_id, before, after, "bench 4", "tech.ono", "test")
                assert _naive_utc(stored.at) == _naive_utc(AT)
                if before != after:
                    assert _naive_utc(sample.state_changed_at) == _naive_utc(AT)
            else:
                state_before = sample.state
                with pytest.raises(InvalidTransition) as raised:
                    transition(session, sample, after, actor="tech.ono", location="bench 4")
                message = str(raised.value)
                assert specimen_id in message
                assert (before or "(new)") in message
                assert after in message
                assert sample.state == state_before
                if before != NEW:
                    assert sample.location == "ward"
                    count = session.scalar(select(func.count(SampleEvent.id))
                                           .where(SampleEvent.specimen_id == specimen_id))
                    assert count == events_before
        session.commit()


def test_transition_commits_with_the_callers_transaction(
    sessions: sessionmaker[Session],
) -> None:
    with sessions() as session:
        transition(session, Sample(specimen_id="TX1"), SampleState.COLLECTED, actor="a")
        session.rollback()
    with sessions() as session:
        assert session.scalar(select(func.count(Sample.id))) == 0
        assert session.scalar(select(func.count(SampleEvent.id))) == 0


def test_actor_is_required(sessions: sessionmaker[Session]) -> None:
    with sessions() as session, pytest.raises(InvalidTransition, match="actor"):
        transition(session, Sample(specimen_id="TX2"), SampleState.COLLECTED, actor="  ")


def test_audit_rows_cannot_be_changed(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        sample = Sample(specimen_id="AU1")
        transition(session, sample, SampleState.COLLECTED, actor="nurse", location="ward 3")
        transition(session, sample, SampleState.IN_TRANSIT, actor="driver", location="van")
        session.commit()
    for statement in ("UPDATE sample_events SET actor = 'someone else'",
                      "UPDATE sample_events SET to_state = 'REPORTED' WHERE id = 1",
                      "DELETE FROM sample_events"):
        with sessions() as session:
            with pytest.raises(DatabaseError, match="append-only"):
                session.execute(text(statement))
            session.rollback()
    with sessions() as session:  # the ORM goes through the same triggers
        event = session.scalars(select(SampleEvent).order_by(SampleEvent.id)).first()
        assert event is not None
        event.actor = "tampered"
        with pytest.raises(DatabaseError, match="append-only"):
            session.commit()
    with sessions() as session:
        rows = session.execute(
            select(SampleEvent.from_state, SampleEvent.to_state, SampleEvent.actor)
            .order_by(SampleEvent.id)
        ).tuples().all()
        assert rows == [("", "COLLECTED", "nurse"), ("COLLECTED", "IN_TRANSIT", "driver")]


_walks = itertools.count()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(TARGETS), max_size=12))
def test_any_walk_keeps_state_and_audit_in_step(sqlite_url: str,
                                                 targets: list[SampleState]) -> None:
    """Whatever is asked, the sample's state is the last audit row's, and refused moves
    leave no row (a property over the whole table)."""
    engine = make_engine(sqlite_url)
    specimen_id = f"W{next(_walks)}"
    try:
        with session_factory(engine)() as session:
            sample = Sample(specimen_id=specimen_id)
            expected: list[tuple[str, str]] = []
            for target in targets:
                before = sample.state or NEW
                try:
                    transition(session, sample, target, actor="walker")
                except InvalidTransition:
                    assert (before, target) not in TRANSITIONS
                    continue
                expected.append((before, target))
            session.commit()
            rows = session.execute(
                select(SampleEvent.from_state, SampleEvent.to_state)
                .where(SampleEvent.specimen_id == specimen_id).order_by(SampleEvent.id)
            ).tuples().all()
            assert rows == expected
            if rows:
                assert sample.state == rows[-1][1]
            for (_, to), (frm, _) in itertools.pairwise(rows):
                assert to == frm
    finally:
        engine.dispose()
