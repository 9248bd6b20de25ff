"""The transactional outbox: work that must follow a commit, written in the same transaction.

Job kinds:
- ``render_report``: payload ``{"sample_id": <samples.id>, "specimen_id": str, "reason": str}``
- ``notify``: payload ``{"kind": "report_ready"|"critical_value"|"engine_alert", ...}``

Jobs are retried with exponential backoff and never dropped: after ``max_attempts`` a job
is FAILED, stays visible (``labrelay notifications list``, engine status) and can be retried.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from lis_bridge.models import JobStatus, OutboxJob, utcnow


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 12
    initial_delay: float = 5.0
    max_delay: float = 600.0

    def delay(self, attempts: int) -> timedelta:
        seconds = self.initial_delay * 2 ** max(0, attempts - 1)
        return timedelta(seconds=min(self.max_delay, seconds))


def enqueue(
    session: Session, kind: str, dedupe_key: str, payload: dict[str, Any]
) -> OutboxJob:
    """Add a job in the caller's transaction; the same dedupe_key is enqueued only once."""
    existing = session.scalar(select(OutboxJob).where(OutboxJob.dedupe_key == dedupe_key))
    if existing is not None:
        return existing
    job = OutboxJob(kind=kind, dedupe_key=dedupe_key, payload=json.dumps(payload, sort_keys=True))
    try:
        with session.begin_nested():
            session.add(job)
    except IntegrityError:  # a concurrent writer enqueued the same key first
        found = session.scalar(select(OutboxJob).where(OutboxJob.dedupe_key == dedupe_key))
        assert found is not None
        return found
    return job


def claim_due(
    session: Session, kinds: tuple[str, ...], now: datetime | None = None, limit: int = 50
) -> list[OutboxJob]:
    """Pending jobs whose time has come, marked RUNNING in the caller's transaction."""
    now = now or utcnow()
    query = (
        select(OutboxJob)
        .where(
            OutboxJob.status == JobStatus.PENDING,
            OutboxJob.kind.in_(kinds),
            OutboxJob.next_attempt_at <= now,
        )
        .order_by(OutboxJob.id)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    jobs = list(session.scalars(query))
    for job in jobs:
        job.status = JobStatus.RUNNING
        job.attempts += 1
        job.updated_at = now
    return jobs


def complete(job: OutboxJob, now: datetime | None = None) -> None:
    job.status = JobStatus.DONE
    job.last_error = ""
    job.updated_at = now or utcnow()


def fail(job: OutboxJob, error: str, policy: RetryPolicy, now: datetime | None = None) -> None:
    """Record a failed attempt: back off and retry, or FAILED (visible) after the last one."""
    now = now or utcnow()
    job.last_error = error[:2000]
    job.updated_at = now
    if job.attempts >= policy.max_attempts:
        job.status = JobStatus.FAILED
    else:
        job.status = JobStatus.PENDING
        job.next_attempt_at = now + policy.delay(job.attempts)


def payload_of(job: OutboxJob) -> dict[str, Any]:
    data = json.loads(job.payload)
    assert isinstance(data, dict)
    return data
