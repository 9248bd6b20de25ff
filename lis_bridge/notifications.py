"""Notifications: one row per message per channel, retried with backoff, escalated, never dropped.

A ``notify`` outbox job becomes a :class:`~lis_bridge.models.Notification` on the route's
primary channel. Each delivery attempt is recorded (``mark_delivered`` / ``mark_failed``);
after ``retry.max_attempts`` the row is FAILED and stays listed. A notification not
delivered by its ``escalate_at`` gets a copy on the next channel of the route, linked by
``escalated_to_fk``; the original keeps retrying (a message delivered twice is better
than a critical value never heard).

What notifications carry (a deliberate choice):
- No patient identifiers at all (no name, birth date, patient id), on any channel, for
  any kind. Webhooks and e-mail cross systems the laboratory does not control, and the
  recipients (clinicians, ward staff, on-call) open the report or the LIS with the
  specimen id, which every notification carries together with the sample id.
- A ``critical_value`` notification is for staff and is precise: test, value, units,
  flag, reference range, specimen id, and what to do. The value is needed to act; the
  specimen id (not the name) links it to the patient in the LIS.
- ``report_ready`` texts may be forwarded to patients: calm, no values, and they say
  what happens next.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from engine.errors import ConfigError, LabrelayError
from lis_bridge.models import JobStatus, Notification, utcnow
from lis_bridge.outbox import RetryPolicy

log = structlog.get_logger(__name__)

KINDS = ("report_ready", "critical_value", "engine_alert")
NO_CHANNEL = "(none)"

# Fields of a notify payload that may travel on a channel. Anything else (a name a caller
# put in by mistake) is not copied into the stored payload or sent.
_SAFE_PAYLOAD_KEYS = frozenset({
    "kind", "sample_id", "specimen_id", "report_id", "version", "amended", "critical",
    "test_code", "display_name", "value", "units", "flag", "reference_range",
    "observed_at", "interface", "analyzer_code", "message", "severity", "detail",
    "location", "result_id",
})


@dataclass(frozen=True, slots=True)
class ChannelSettings:
    name: str
    type: str  # "webhook" | "smtp"
    url: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 25
    sender: str = ""
    recipients: tuple[str, ...] = ()
    starttls: bool = False
    username: str = ""
    password: str = field(default="", repr=False)
    timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.type not in ("webhook", "smtp"):
            raise ConfigError(f"notification channel {self.name!r}: type must be webhook or smtp")
        if self.type == "webhook" and not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"notification channel {self.name!r}: url must be http(s)://")
        if self.type == "smtp" and (not self.sender or not self.recipients):
            raise ConfigError(
                f"notification channel {self.name!r}: smtp needs a sender and recipients")
        if not 0 < self.timeout <= 300:
            raise ConfigError(f"notification channel {self.name!r}: timeout must be 0..300 s")


@dataclass(frozen=True, slots=True)
class NotificationSettings:
    channels: tuple[ChannelSettings, ...] = ()
    # kind -> channel names; the first is primary, each next one the escalation of the one before
    routes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    escalate_after: float = 300.0  # seconds
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        known = {c.name for c in self.channels}
        for kind, names in self.routes.items():
            for name in names:
                if name not in known:
                    raise ConfigError(
                        f"notifications.routes.{kind}: channel {name!r} is not defined")

    def channel(self, name: str) -> ChannelSettings | None:
        return next((c for c in self.channels if c.name == name), None)

    def next_channel(self, kind: str, name: str) -> str | None:
        route = tuple(self.routes.get(kind, ()))
        if name not in route:
            return None
        index = route.index(name)
        return route[index + 1] if index + 1 < len(route) else None


class NotificationError(LabrelayError):
    """A notification could not be found or changed."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """A plain snapshot of one notification, handed to a sender thread."""

    id: int
    kind: str
    channel: str
    subject: str
    body: str
    payload: Mapping[str, Any]
    attempt: int

    def webhook_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "subject": self.subject,
            "body": self.body,
            "attempt": self.attempt,
            **{k: v for k, v in self.payload.items() if k != "kind"},
        }


def delivery_of(notification: Notification) -> Delivery:
    return Delivery(
        id=notification.id,
        kind=notification.kind,
        channel=notification.channel,
        subject=notification.subject,
        body=notification.body,
        payload=json.loads(notification.payload or "{}"),
        attempt=notification.attempts + 1,
    )


def _aware(moment: datetime | None) -> datetime | None:
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


# --------------------------------------------------------------------------- texts


def _texts(kind: str, p: Mapping[str, Any]) -> tuple[str, str]:
    specimen = str(p.get("specimen_id", "")) or "unknown"
    if kind == "report_ready":
        version = int(p.get("version", 1) or 1)
        if p.get("amended") or version > 1:
            subject = f"Updated laboratory report available (specimen {specimen})"
            first = (
                f"An updated laboratory report (version {version}) is available for specimen "
                f"{specimen}. It replaces the earlier version."
            )
        else:
            subject = f"Laboratory report available (specimen {specimen})"
            first = f"The laboratory report for specimen {specimen} is complete and available."
        body = (
            f"{first}\n\n"
            "What happens next: the clinician who requested the tests reviews the results "
            "and will be in touch if anything needs to be discussed or followed up. "
            "There is nothing you need to do now.\n\n"
            "Staff: open the report in the LIS with the specimen id above.\n"
            "This message was sent automatically; please do not reply."
        )
        return subject, body
    if kind == "critical_value":
        test = str(p.get("display_name") or p.get("test_code") or "unknown test")
        value = str(p.get("value", "")).strip()
        units = str(p.get("units", "")).strip()
        flag = str(p.get("flag", "")).strip()
        ref = str(p.get("reference_range", "")).strip()
        subject = f"CRITICAL VALUE {test} {flag} - specimen {specimen}".replace("  ", " ")
        lines = [
            f"Critical value for specimen {specimen} (sample #{p.get('sample_id', '?')}):",
            f"  Test:            {test} ({p.get('test_code', '')})",
            f"  Result:          {value} {units}".rstrip(),
            f"  Flag:            {flag or 'critical'}",
            f"  Reference range: {ref or 'not given'}",
        ]
        if p.get("observed_at"):
            lines.append(f"  Observed at:     {p['observed_at']}")
        if p.get("interface"):
            lines.append(f"  Analyzer link:   {p['interface']}")
        lines += [
            "",
            "Action: telephone the requesting clinician now, ask for read-back of the value, "
            "and record the call (who, when) in the LIS against this specimen.",
        ]
        return subject, "\n".join(lines)
    if kind == "engine_alert":
        message = str(p.get("message", "")).strip() or "an engine alert was raised"
        severity = str(p.get("severity", "warning")).upper()
        subject = f"labrelay {severity}: {message[:120]}"
        lines = [message]
        for key in ("interface", "detail", "specimen_id", "sample_id"):
            if p.get(key):
                lines.append(f"{key}: {p[key]}")
        lines.append("")
        lines.append("See `labrelay status` and the engine log for details.")
        return subject, "\n".join(lines)
    return f"labrelay notification ({kind})", json.dumps(dict(p), sort_keys=True)


# --------------------------------------------------------------------------- database


def create_notifications(
    session: Session,
    job_payload: Mapping[str, Any],
    settings: NotificationSettings,
    now: datetime | None = None,
) -> list[Notification]:
    """Turn a ``notify`` outbox job into a notification on the route's primary channel.

    A kind without a route is not dropped: it is stored FAILED on channel ``(none)`` with
    the reason, so `labrelay notifications list --status FAILED` shows it.
    """
    now = now or utcnow()
    kind = str(job_payload.get("kind", ""))
    payload = {k: v for k, v in job_payload.items() if k in _SAFE_PAYLOAD_KEYS}
    subject, body = _texts(kind, payload)
    sample_fk = job_payload.get("sample_id")
    route = tuple(settings.routes.get(kind, ()))
    notification = Notification(
        kind=kind,
        subject=subject,
        body=body,
        payload=json.dumps(payload, sort_keys=True, default=str),
        sample_fk=int(sample_fk) if isinstance(sample_fk, int) else None,
        attempts=0,
        next_attempt_at=now,
        created_at=now,
    )
    if not route:
        notification.channel = NO_CHANNEL
        notification.status = JobStatus.FAILED
        notification.last_error = (
            f"no channel is routed for {kind!r}: add notifications.routes.{kind} to the "
            "configuration, then `labrelay notifications retry ID`"
        )
        log.warning("notify.unrouted", kind=kind)
    else:
        notification.channel = route[0]
        notification.status = JobStatus.PENDING
        if len(route) > 1:
            notification.escalate_at = now + timedelta(seconds=settings.escalate_after)
    session.add(notification)
    session.flush()
    return [notification]


def due_notifications(
    session: Session, now: datetime | None = None, limit: int = 50
) -> list[Notification]:
    """PENDING notifications whose next attempt is due, oldest first."""
    now = now or utcnow()
    query = (
        select(Notification)
        .where(Notification.status == JobStatus.PENDING, Notification.next_attempt_at <= now)
        .order_by(Notification.id)
        .limit(limit)
    )
    return list(session.scalars(query))


def claim_due_notifications(
    session: Session, now: datetime, lease: float, limit: int = 50
) -> list[Notification]:
    """Due notifications, leased: their next attempt moves ``lease`` seconds ahead, so a
    sender that dies mid-delivery leaves them due again later instead of stuck."""
    query = (
        select(Notification)
        .where(Notification.status == JobStatus.PENDING, Notification.next_attempt_at <= now)
        .order_by(Notification.id)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    claimed = list(session.scalars(query))
    for notification in claimed:
        notification.next_attempt_at = now + timedelta(seconds=lease)
    return claimed


def mark_delivered(notification: Notification, now: datetime | None = None) -> None:
    now = now or utcnow()
    notification.attempts += 1
    notification.status = JobStatus.DONE
    notification.delivered_at = now
    notification.last_error = ""


def mark_failed(
    notification: Notification, error: str, policy: RetryPolicy, now: datetime | None = None
) -> None:
    """Record a failed attempt: back off, or FAILED after the last attempt (still listed)."""
    now = now or utcnow()
    notification.attempts += 1
    notification.last_error = error[:2000]
    if notification.attempts >= policy.max_attempts:
        notification.status = JobStatus.FAILED
    else:
        notification.status = JobStatus.PENDING
        notification.next_attempt_at = now + policy.delay(notification.attempts)


def escalate_overdue(
    session: Session, settings: NotificationSettings, now: datetime | None = None
) -> list[Notification]:
    """Copy every notification not delivered by its escalate_at onto the next channel."""
    now = now or utcnow()
    overdue = list(
        session.scalars(
            select(Notification)
            .where(
                Notification.status.in_((JobStatus.PENDING, JobStatus.FAILED)),
                Notification.escalated_to_fk.is_(None),
                Notification.escalate_at.is_not(None),
                Notification.escalate_at <= now,
            )
            .order_by(Notification.id)
        )
    )
    created: list[Notification] = []
    for original in overdue:
        target = settings.next_channel(original.kind, original.channel)
        if target is None:  # the route changed since; nothing further to escalate to
            original.escalate_at = None
            continue
        waited = (now - (_aware(original.created_at) or now)).total_seconds()
        copy = Notification(
            kind=original.kind,
            channel=target,
            subject=f"[ESCALATED] {original.subject}",
            body=(
                f"Escalated: not delivered via {original.channel} after {waited:.0f} s "
                f"({original.attempts} attempt(s); last error: "
                f"{original.last_error[:200] or 'none'}).\n\n{original.body}"
            ),
            payload=original.payload,
            sample_fk=original.sample_fk,
            status=JobStatus.PENDING,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
        if settings.next_channel(original.kind, target) is not None:
            copy.escalate_at = now + timedelta(seconds=settings.escalate_after)
        session.add(copy)
        session.flush()
        original.escalated_to_fk = copy.id
        created.append(copy)
        log.warning("notify.escalated", notification_id=original.id, escalated_to=copy.id,
                    kind=original.kind, channel=target)
    return created


def list_notifications(
    session: Session, status: str | None = None, limit: int = 500
) -> list[Notification]:
    query = select(Notification).order_by(Notification.id.desc()).limit(limit)
    if status:
        query = query.where(Notification.status == status.upper())
    return list(reversed(list(session.scalars(query))))


def retry_notification(
    session: Session, notification_id: int, now: datetime | None = None
) -> Notification:
    """Make a PENDING or FAILED notification due now, with a full set of attempts again."""
    notification = session.get(Notification, notification_id)
    if notification is None:
        raise NotificationError(f"notification #{notification_id} does not exist")
    if notification.status == JobStatus.DONE:
        raise NotificationError(f"notification #{notification_id} was already delivered")
    if notification.channel == NO_CHANNEL:
        raise NotificationError(
            f"notification #{notification_id} has no channel: add a route for "
            f"{notification.kind!r} first")
    notification.status = JobStatus.PENDING
    notification.attempts = 0
    notification.next_attempt_at = now or utcnow()
    return notification


def reroute_unrouted(
    session: Session, settings: NotificationSettings, now: datetime | None = None
) -> int:
    """Give notifications stored on ``(none)`` the primary channel of a route added since."""
    now = now or utcnow()
    count = 0
    for notification in session.scalars(
        select(Notification).where(Notification.channel == NO_CHANNEL,
                                   Notification.status == JobStatus.FAILED)
    ):
        route = tuple(settings.routes.get(notification.kind, ()))
        if route:
            notification.channel = route[0]
            notification.status = JobStatus.PENDING
            notification.attempts = 0
            notification.next_attempt_at = now
            notification.last_error = ""
            count += 1
    return count


def notification_counts(session: Session) -> dict[str, int]:
    """For the engine status: pending, failed, escalated (undelivered), delivered."""
    by_status = dict(
        session.execute(
            select(Notification.status, func.count()).group_by(Notification.status)
        ).tuples().all()
    )
    escalated = session.scalar(
        select(func.count()).select_from(Notification).where(
            Notification.escalated_to_fk.is_not(None), Notification.status != JobStatus.DONE
        )
    )
    return {
        "pending": int(by_status.get(JobStatus.PENDING, 0)),
        "failed": int(by_status.get(JobStatus.FAILED, 0)),
        "escalated": int(escalated or 0),
        "delivered": int(by_status.get(JobStatus.DONE, 0)),
    }


def notification_settings_from_config(cfg: Any) -> NotificationSettings:
    """Settings from the engine configuration (``EngineConfig`` or its ``notifications``)."""
    cfg = getattr(cfg, "notifications", cfg)
    channels = tuple(
        ChannelSettings(
            name=c.name, type=c.type, url=c.url, headers=dict(c.headers), host=c.host,
            port=c.port, sender=c.sender, recipients=tuple(c.recipients),
            starttls=c.starttls, username=c.username, password=c.password,
            timeout=float(c.timeout),
        )
        for c in cfg.channels
    )
    return NotificationSettings(
        channels=channels,
        routes={k: tuple(v) for k, v in cfg.routes.items()},
        escalate_after=float(cfg.escalate_after),
        retry=RetryPolicy(
            max_attempts=int(cfg.max_attempts),
            initial_delay=float(cfg.initial_retry_delay),
            max_delay=float(cfg.max_retry_delay),
        ),
    )
