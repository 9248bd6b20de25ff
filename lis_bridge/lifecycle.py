"""The sample lifecycle: one transition table, and the only function that moves a sample.

    (new) -> COLLECTED -> IN_TRANSIT -> RECEIVED_AT_LAB -> PROCESSING -> COMPLETED -> REPORTED
                  \\__________________________/^                                       |   ^
                   collected on site (no transport)                    amendment:      \\__/

Everything that changes ``samples.state`` goes through :func:`transition`, which writes the
audit row (``sample_events``, append-only in the database) in the caller's transaction, so a
state change and its audit row are committed together or not at all.

Two moves beyond the straight line, and why:

- ``COLLECTED -> RECEIVED_AT_LAB``: a specimen drawn in the laboratory's own phlebotomy room
  (or an auto-received one, see ``lis_bridge.results``) never travels; recording an
  ``IN_TRANSIT`` step that did not happen would falsify the trace.
- ``REPORTED -> REPORTED``: a correction (result status C) for a sample already reported.
  The sample stays REPORTED (the clinician has a report in hand), the amendment is an
  audited event, and an amended report version is rendered from the outbox. Making it a
  table entry keeps "who changed a reported sample, and when" in the one audit trail.

A COMPLETED sample that receives a correction stays COMPLETED without an event: no report
has left yet, and the render job simply renders the corrected data.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

import structlog
from sqlalchemy.orm import Session

from engine.errors import InvalidTransition
from lis_bridge.models import Sample, SampleEvent, SampleState, utcnow

log = structlog.get_logger(__name__)

NEW = ""  # the "from" state of a sample that is being created

COLLECTED = SampleState.COLLECTED
IN_TRANSIT = SampleState.IN_TRANSIT
RECEIVED_AT_LAB = SampleState.RECEIVED_AT_LAB
PROCESSING = SampleState.PROCESSING
COMPLETED = SampleState.COMPLETED
REPORTED = SampleState.REPORTED

# (from_state, to_state) -> what the move means. Any pair not here raises InvalidTransition.
TRANSITIONS: Mapping[tuple[str, str], str] = {
    (NEW, COLLECTED): "registered as collected",
    (COLLECTED, IN_TRANSIT): "dispatched to the laboratory",
    (COLLECTED, RECEIVED_AT_LAB): "received at the laboratory (collected on site)",
    (IN_TRANSIT, RECEIVED_AT_LAB): "received at the laboratory",
    (RECEIVED_AT_LAB, PROCESSING): "first result arrived",
    (PROCESSING, COMPLETED): "every ordered test final or cancelled",
    (COMPLETED, REPORTED): "report rendered",
    (REPORTED, REPORTED): "amended after report (correction)",
}

MAX_ACTOR = 100  # sample_events.actor
MAX_LOCATION = 100  # samples.location, sample_events.location


def allowed_targets(from_state: str) -> list[str]:
    """States a sample in ``from_state`` may move to, in lifecycle order."""
    return [to for (frm, to) in TRANSITIONS if frm == from_state]


def is_allowed(from_state: str, to_state: str) -> bool:
    return (from_state, to_state) in TRANSITIONS


def _state_name(state: str) -> str:
    return state or "(new)"


def _as_utc(moment: datetime) -> datetime:
    # SQLite hands timestamps back without tzinfo; every timestamp in this database is UTC.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def transition(
    session: Session,
    sample: Sample,
    to_state: str,
    *,
    actor: str,
    location: str | None = None,
    note: str = "",
    at: datetime | None = None,
    flush: bool = True,
) -> SampleEvent:
    """Move ``sample`` to ``to_state`` and write its audit row in the caller's transaction.

    A new, not yet flushed ``Sample`` (state unset) may only move to COLLECTED; it is added
    to the session and flushed so the audit row can reference it. ``location`` (when given)
    becomes the sample's location; otherwise the event records where the sample already is.
    Raises :class:`InvalidTransition` naming both states and the specimen id.

    ``flush=False`` leaves the state change and its audit row pending in the session (they
    are still written by the caller's next flush or commit, together): for callers such as
    :func:`lis_bridge.results.apply_results` that move a sample more than once per call and
    do not need the event's id.
    """
    from_state = str(sample.state or NEW)
    target = str(to_state)
    if not is_allowed(from_state, target):
        allowed = ", ".join(_state_name(s) for s in allowed_targets(from_state)) or "nothing"
        raise InvalidTransition(
            f"sample {sample.specimen_id} cannot move from {_state_name(from_state)} to "
            f"{_state_name(target)}; from {_state_name(from_state)} it may only move to "
            f"{allowed}"
        )
    actor = actor.strip()
    if not actor:
        raise InvalidTransition(
            f"sample {sample.specimen_id}: a move to {target} needs an actor (a user name, or "
            "interface:<name>); pass --by USER"
        )
    if len(actor) > MAX_ACTOR:
        raise InvalidTransition(f"actor name longer than {MAX_ACTOR} characters: {actor[:40]}...")
    if location is not None:
        location = location.strip()
        if len(location) > MAX_LOCATION:
            raise InvalidTransition(
                f"sample {sample.specimen_id}: location longer than {MAX_LOCATION} characters"
            )
    when = _as_utc(at) if at is not None else utcnow()

    if location is not None:
        sample.location = location
    elif sample.location is None:
        sample.location = ""
    if from_state != target or sample.state_changed_at is None:
        # A self-move (amendment) keeps "in this state since": the sample did not move.
        sample.state_changed_at = when
    sample.state = target
    if sample.id is None:
        session.add(sample)
        session.flush()

    event = SampleEvent(
        sample_fk=sample.id,
        specimen_id=sample.specimen_id,
        from_state=from_state,
        to_state=target,
        location=sample.location,
        actor=actor,
        note=note,
        at=when,
    )
    session.add(event)
    if flush:
        session.flush()
    log.info(
        "lis.sample.transition",
        sample_id=sample.specimen_id,
        from_state=_state_name(from_state),
        to_state=target,
        actor=actor,
        location=sample.location,
    )
    return event
