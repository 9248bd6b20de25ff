"""SQLAlchemy 2.0 typed models of the LIS database.

Schema changes go through Alembic migrations in ``lis_bridge/migrations``; a test
checks that the migrated schema matches these models on SQLite and PostgreSQL.
Timestamps are stored in UTC.
"""

from __future__ import annotations

import enum
from datetime import UTC, date, datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BigInteger primary keys that still autoincrement on SQLite (which only does so for INTEGER).
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class SampleState(enum.StrEnum):
    COLLECTED = "COLLECTED"
    IN_TRANSIT = "IN_TRANSIT"
    RECEIVED_AT_LAB = "RECEIVED_AT_LAB"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    REPORTED = "REPORTED"


class MessageStatus(enum.StrEnum):
    RECEIVED = "RECEIVED"  # stored, not yet applied
    APPLIED = "APPLIED"  # results written
    HELD = "HELD"  # stored, cannot be applied yet (hold_reason says why)
    DUPLICATE = "DUPLICATE"  # a resend of an earlier message; receipt only
    REJECTED = "REJECTED"  # unreadable; kept for the operator
    IGNORED = "IGNORED"  # nothing to apply (keep-alive, ACK, QC without a QC module)
    QUEUED = "QUEUED"  # outbound message stored, waiting for the analyzer to accept it
    SENT = "SENT"  # outbound message written to the wire (and acknowledged, for orders)
    NOT_SENT = "NOT_SENT"  # outbound message the analyzer never accepted (an alert was raised)
    ANSWERED = "ANSWERED"  # a host query we answered


class OrderedTestStatus(enum.StrEnum):
    ORDERED = "ORDERED"
    PRELIMINARY = "PRELIMINARY"
    FINAL = "FINAL"
    CANCELLED = "CANCELLED"


class JobStatus(enum.StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"  # gave up after the configured attempts; visible, never silent


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)

    type_annotation_map = {
        datetime: DateTime(timezone=True),
    }


class Patient(Base):
    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    sex: Mapped[str] = mapped_column(String(1), default="U")  # M F O U
    birth_date: Mapped[date | None] = mapped_column(Date, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    samples: Mapped[list[Sample]] = relationship(back_populates="patient")


class Sample(Base):
    __tablename__ = "samples"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    specimen_id: Mapped[str] = mapped_column(String(64), unique=True)
    patient_fk: Mapped[int | None] = mapped_column(ForeignKey("patients.id"), nullable=True)
    state: Mapped[str] = mapped_column(String(20), default=SampleState.COLLECTED, index=True)
    location: Mapped[str] = mapped_column(String(100), default="")
    collected_at: Mapped[datetime | None] = mapped_column(nullable=True)
    state_changed_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    patient: Mapped[Patient | None] = relationship(back_populates="samples")
    ordered_tests: Mapped[list[OrderedTest]] = relationship(
        back_populates="sample", order_by="OrderedTest.id"
    )
    results: Mapped[list[Result]] = relationship(back_populates="sample", order_by="Result.id")


class OrderedTest(Base):
    __tablename__ = "ordered_tests"
    __table_args__ = (UniqueConstraint("sample_fk", "test_code"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    sample_fk: Mapped[int] = mapped_column(ForeignKey("samples.id"), index=True)
    test_code: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20), default=OrderedTestStatus.ORDERED)
    ordered_at: Mapped[datetime] = mapped_column(default=utcnow)

    sample: Mapped[Sample] = relationship(back_populates="ordered_tests")


class Result(Base):
    """One reported value. History is kept: a correction adds a row that supersedes.

    ``sample_fk`` and ``message_fk`` are foreign keys on SQLite; on PostgreSQL the same
    rules are held by statement-level triggers, one check per statement instead of one
    query per row (migration 0004)."""

    __tablename__ = "results"
    __table_args__ = (Index("ix_results_sample_test", "sample_fk", "test_code"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    sample_fk: Mapped[int] = mapped_column(ForeignKey("samples.id"))
    test_code: Mapped[str] = mapped_column(String(64))
    analyzer_code: Mapped[str] = mapped_column(String(64), default="")
    value_text: Mapped[str] = mapped_column(Text, default="")
    value_number: Mapped[Decimal | None] = mapped_column(Numeric(24, 8), nullable=True)
    comparator: Mapped[str] = mapped_column(String(2), default="")
    units: Mapped[str] = mapped_column(String(40), default="")
    reference_range: Mapped[str] = mapped_column(String(100), default="")
    flag: Mapped[str] = mapped_column(String(4), default="")
    is_critical: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(1), default="F")
    observed_at: Mapped[datetime | None] = mapped_column(nullable=True)
    equipment: Mapped[str] = mapped_column(String(100), default="")
    comments: Mapped[str] = mapped_column(Text, default="")
    interface: Mapped[str] = mapped_column(String(64), default="")
    message_fk: Mapped[int | None] = mapped_column(ForeignKey("raw_messages.id"), nullable=True)
    is_current: Mapped[bool] = mapped_column(Boolean, default=True)
    superseded_by_fk: Mapped[int | None] = mapped_column(
        ForeignKey("results.id"), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    sample: Mapped[Sample] = relationship(back_populates="results")


class RawMessage(Base):
    """Exact bytes of every message that arrived or left, stored before any ACK."""

    __tablename__ = "raw_messages"
    __table_args__ = (
        Index("ix_raw_messages_dedupe", "interface", "sender", "control_id"),
        Index("ix_raw_messages_status", "status"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    interface: Mapped[str] = mapped_column(String(64))
    direction: Mapped[str] = mapped_column(String(3), default="in")  # in / out
    protocol: Mapped[str] = mapped_column(String(8), default="")  # hl7 / astm
    peer: Mapped[str] = mapped_column(String(100), default="")
    sender: Mapped[str] = mapped_column(String(200), default="")
    control_id: Mapped[str] = mapped_column(String(100), default="")
    message_type: Mapped[str] = mapped_column(String(40), default="")
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(Integer, default=0)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    status: Mapped[str] = mapped_column(String(12), default=MessageStatus.RECEIVED)
    hold_reason: Mapped[str] = mapped_column(String(40), default="")
    hold_detail: Mapped[str] = mapped_column(Text, default="")
    duplicate_of_fk: Mapped[int | None] = mapped_column(
        ForeignKey("raw_messages.id"), nullable=True
    )
    ack_code: Mapped[str] = mapped_column(String(4), default="")
    applied_at: Mapped[datetime | None] = mapped_column(nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)

    specimens: Mapped[list[MessageSpecimen]] = relationship(
        back_populates="message", cascade="all, delete-orphan"
    )


class MessageSpecimen(Base):
    """Which specimens a message speaks of: keeps per-sample order behind a held message."""

    __tablename__ = "message_specimens"
    __table_args__ = (Index("ix_message_specimens_specimen", "specimen_id", "message_fk"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    message_fk: Mapped[int] = mapped_column(ForeignKey("raw_messages.id"), index=True)
    specimen_id: Mapped[str] = mapped_column(String(64))

    message: Mapped[RawMessage] = relationship(back_populates="specimens")


class SampleEvent(Base):
    """Lifecycle audit: append-only, enforced by database triggers."""

    __tablename__ = "sample_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    sample_fk: Mapped[int] = mapped_column(ForeignKey("samples.id"), index=True)
    specimen_id: Mapped[str] = mapped_column(String(64))
    from_state: Mapped[str] = mapped_column(String(20), default="")
    to_state: Mapped[str] = mapped_column(String(20))
    location: Mapped[str] = mapped_column(String(100), default="")
    actor: Mapped[str] = mapped_column(String(100))
    note: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(default=utcnow)


class AccessAudit(Base):
    """Who read or changed what (stored payloads, held messages, reports): append-only."""

    __tablename__ = "access_audit"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(60))
    object_type: Mapped[str] = mapped_column(String(40))
    object_id: Mapped[str] = mapped_column(String(100))
    detail: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(default=utcnow)


class Report(Base):
    __tablename__ = "reports"
    __table_args__ = (UniqueConstraint("sample_fk", "version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    sample_fk: Mapped[int] = mapped_column(ForeignKey("samples.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    content_hash: Mapped[str] = mapped_column(String(64))  # of the data rendered: idempotency
    token: Mapped[str] = mapped_column(Text, default="")
    superseded_by_fk: Mapped[int | None] = mapped_column(ForeignKey("reports.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class OutboxJob(Base):
    """Work that must happen after a commit: report rendering, notifications.

    Written in the same transaction as the change that causes it; retried with backoff;
    never dropped (FAILED jobs stay visible).
    """

    __tablename__ = "outbox_jobs"
    __table_args__ = (Index("ix_outbox_jobs_due", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[str] = mapped_column(String(40))  # render_report, notify
    dedupe_key: Mapped[str] = mapped_column(String(200), unique=True)
    payload: Mapped[str] = mapped_column(Text, default="{}")  # JSON text
    status: Mapped[str] = mapped_column(String(12), default=JobStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Notification(Base):
    """One notification on one channel; escalation creates a row on the next channel."""

    __tablename__ = "notifications"
    __table_args__ = (Index("ix_notifications_due", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[str] = mapped_column(String(40))  # report_ready, critical_value, engine_alert
    channel: Mapped[str] = mapped_column(String(40))  # name of a configured channel
    subject: Mapped[str] = mapped_column(Text, default="")
    body: Mapped[str] = mapped_column(Text, default="")
    payload: Mapped[str] = mapped_column(Text, default="{}")  # JSON text
    sample_fk: Mapped[int | None] = mapped_column(ForeignKey("samples.id"), nullable=True)
    status: Mapped[str] = mapped_column(String(12), default=JobStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    escalate_at: Mapped[datetime | None] = mapped_column(nullable=True)
    escalated_to_fk: Mapped[int | None] = mapped_column(
        ForeignKey("notifications.id"), nullable=True
    )
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(nullable=True)


APPEND_ONLY_TABLES = ("sample_events", "access_audit")
