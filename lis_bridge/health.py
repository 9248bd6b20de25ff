"""What needs a person's attention, from the database: one summary for `labrelay status`
and the engine's /status page."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from lis_bridge.models import JobStatus, MessageStatus, OutboxJob, RawMessage
from lis_bridge.notifications import notification_counts


def attention_summary(session: Session) -> dict[str, Any]:
    held_by_reason = dict(
        session.execute(
            select(RawMessage.hold_reason, func.count())
            .where(RawMessage.status == MessageStatus.HELD)
            .group_by(RawMessage.hold_reason)
        ).tuples().all()
    )
    rejected = session.scalar(
        select(func.count()).select_from(RawMessage)
        .where(RawMessage.status == MessageStatus.REJECTED)
    )
    unapplied = session.scalar(
        select(func.count()).select_from(RawMessage)
        .where(RawMessage.status == MessageStatus.RECEIVED, RawMessage.direction == "in")
    )
    jobs = dict(
        session.execute(
            select(OutboxJob.status, func.count())
            .where(OutboxJob.status.in_((JobStatus.PENDING, JobStatus.RUNNING, JobStatus.FAILED)))
            .group_by(OutboxJob.status)
        ).tuples().all()
    )
    return {
        "held_messages": int(sum(held_by_reason.values())),
        "held_by_reason": {k or "(none)": int(v) for k, v in held_by_reason.items()},
        "rejected_messages": int(rejected or 0),
        "unapplied_messages": int(unapplied or 0),
        "outbox_jobs": {str(k): int(v) for k, v in jobs.items()},
        "notifications": notification_counts(session),
    }
