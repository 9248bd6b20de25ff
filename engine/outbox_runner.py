"""The outbox runner: renders reports in worker processes and delivers notifications.

Each tick (ticks never overlap):
1. claim due ``render_report`` jobs and render them in a process pool
   (:func:`lis_bridge.reports.render_job`, its own database session per process);
2. turn due ``notify`` jobs into notifications (one transaction per batch);
3. escalate notifications not delivered by their ``escalate_at``;
4. send due notifications in a thread pool (blocking senders of engine.notify).

Every failure is recorded (``outbox.fail`` / ``mark_failed``) and retried with backoff;
nothing is dropped. All database work runs off the reactor thread. Log lines carry ids
and error types, never patient data or result values.

:class:`OutboxRunner` is the Twisted service; :func:`run_once` does one tick
synchronously (the CLI and tests).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Generator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from engine.errors import LabrelayError
from engine.logging import configure_worker_logging, worker_logging_setup
from engine.notify import send as default_send
from lis_bridge.db import make_engine, session_factory, transaction
from lis_bridge.models import JobStatus, OutboxJob, utcnow
from lis_bridge.notifications import (
    ChannelSettings,
    Delivery,
    NotificationSettings,
    claim_due_notifications,
    create_notifications,
    delivery_of,
    escalate_overdue,
    mark_delivered,
    mark_failed,
    notification_settings_from_config,
    reroute_unrouted,
)
from lis_bridge.outbox import RetryPolicy, claim_due, complete, fail, payload_of
from lis_bridge.reports import (
    ReportSettings,
    render_in_transactions,
    render_job,
    report_settings_from_config,
)

log = structlog.get_logger(__name__)

Sender = Callable[[ChannelSettings, Delivery], None]


@dataclass
class TickSummary:
    """What one tick did (counts only: safe to log and print)."""

    rendered: int = 0
    render_unchanged: int = 0
    render_failed: int = 0
    notifications_created: int = 0
    notify_failed: int = 0
    delivered: int = 0
    delivery_failed: int = 0
    escalated: int = 0
    requeued: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "errors"}


@dataclass(frozen=True, slots=True)
class RenderTask:
    job_id: int
    sample_id: int


@dataclass(frozen=True, slots=True)
class SendTask:
    delivery: Delivery
    channel: ChannelSettings | None


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


class OutboxWork:
    """The database steps of a tick, each one short transaction (blocking: run in a thread)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        report_settings: ReportSettings | None,
        notification_settings: NotificationSettings,
        *,
        job_policy: RetryPolicy | None = None,
        batch: int = 20,
    ) -> None:
        self.sessions = sessions
        self.report_settings = report_settings
        self.notification_settings = notification_settings
        self.job_policy = job_policy or RetryPolicy()
        self.batch = batch

    def requeue_stale(self, now: datetime, older_than: timedelta) -> int:
        """RUNNING jobs left by a process that died mid-job become PENDING again (renders are
        idempotent, notify jobs are one transaction, so doing one again is safe)."""
        with transaction(self.sessions) as session:
            stale = list(session.scalars(
                select(OutboxJob).where(OutboxJob.status == JobStatus.RUNNING,
                                        OutboxJob.updated_at < now - older_than)))
            for job in stale:
                job.status = JobStatus.PENDING
                job.next_attempt_at = now
                job.updated_at = now
                job.last_error = "requeued: the worker stopped while the job was running"
            # Notifications stored without a channel get one if a route was added since.
            reroute_unrouted(session, self.notification_settings, now)
            return len(stale)

    def claim_render_jobs(self, now: datetime) -> list[RenderTask]:
        if self.report_settings is None:  # reports not configured: jobs wait, visible
            return []
        tasks: list[RenderTask] = []
        with transaction(self.sessions) as session:
            for job in claim_due(session, ("render_report",), now, self.batch):
                sample_id = payload_of(job).get("sample_id")
                if not isinstance(sample_id, int):
                    fail(job, "payload has no integer sample_id: the job cannot be done",
                         RetryPolicy(max_attempts=1), now)
                    continue
                tasks.append(RenderTask(job.id, sample_id))
        return tasks

    def finish_render_jobs(
        self, outcomes: list[tuple[RenderTask, dict[str, Any] | BaseException]], now: datetime,
        summary: TickSummary,
    ) -> None:
        with transaction(self.sessions) as session:
            for task, outcome in outcomes:
                job = session.get(OutboxJob, task.job_id)
                if job is None:
                    continue
                bound = log.bind(job_id=task.job_id, sample_id=task.sample_id)
                if isinstance(outcome, BaseException):
                    fail(job, _error_text(outcome), self.job_policy, now)
                    summary.render_failed += 1
                    summary.errors.append(f"render job {task.job_id}: {type(outcome).__name__}")
                    bound.warning("outbox.render.failed", error_type=type(outcome).__name__,
                                  attempts=job.attempts, status=job.status)
                else:
                    complete(job, now)
                    if outcome.get("created"):
                        summary.rendered += 1
                    else:
                        summary.render_unchanged += 1
                    bound.info("outbox.render.done", version=outcome.get("version"),
                               created=outcome.get("created"))

    def render_in_process(self, task: RenderTask) -> dict[str, Any]:
        assert self.report_settings is not None
        outcome = render_in_transactions(self.sessions, task.sample_id, self.report_settings)
        return {"report_id": outcome.report.id, "version": outcome.report.version,
                "created": outcome.created}

    def process_notify_jobs(self, now: datetime, summary: TickSummary) -> None:
        with transaction(self.sessions) as session:
            for job in claim_due(session, ("notify",), now, self.batch * 5):
                try:
                    with session.begin_nested():
                        created = create_notifications(
                            session, payload_of(job), self.notification_settings, now)
                except Exception as exc:  # noqa: BLE001 - one bad job must not stop the others
                    fail(job, _error_text(exc), self.job_policy, now)
                    summary.notify_failed += 1
                    log.warning("outbox.notify.failed", job_id=job.id,
                                error_type=type(exc).__name__)
                    continue
                complete(job, now)
                summary.notifications_created += len(created)

    def escalate(self, now: datetime, summary: TickSummary) -> None:
        with transaction(self.sessions) as session:
            summary.escalated += len(escalate_overdue(session, self.notification_settings, now))

    def claim_deliveries(self, now: datetime) -> list[SendTask]:
        channels = self.notification_settings.channels
        lease = max((c.timeout for c in channels), default=10.0) + 30.0
        with transaction(self.sessions) as session:
            return [
                SendTask(delivery_of(n), self.notification_settings.channel(n.channel))
                for n in claim_due_notifications(session, now, lease, self.batch * 5)
            ]

    def record_deliveries(
        self, outcomes: list[tuple[SendTask, BaseException | None]], now: datetime,
        summary: TickSummary,
    ) -> None:
        from lis_bridge.models import Notification

        policy = self.notification_settings.retry
        with transaction(self.sessions) as session:
            for task, error in outcomes:
                notification = session.get(Notification, task.delivery.id)
                if notification is None:
                    continue
                bound = log.bind(notification_id=notification.id, kind=notification.kind,
                                 channel=notification.channel)
                if error is None:
                    mark_delivered(notification, now)
                    summary.delivered += 1
                    bound.info("notify.delivered", attempts=notification.attempts)
                else:
                    mark_failed(notification, str(error) if isinstance(error, LabrelayError)
                                else _error_text(error), policy, now)
                    summary.delivery_failed += 1
                    bound.warning("notify.delivery.failed", error_type=type(error).__name__,
                                  attempts=notification.attempts, status=notification.status)


def _send_one(sender: Sender, task: SendTask) -> BaseException | None:
    if task.channel is None:
        return LabrelayError(
            f"channel {task.delivery.channel!r} is not configured: add it under "
            "notifications.channels, or reroute")
    try:
        sender(task.channel, task.delivery)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded and retried
        return exc
    return None


def _as_utc(now: datetime | None) -> datetime:
    now = now or utcnow()
    return now if now.tzinfo is not None else now.replace(tzinfo=UTC)


def run_once(
    database_url: str,
    report_settings: ReportSettings | None,
    notification_settings: NotificationSettings,
    *,
    now: datetime | None = None,
    workers: int = 0,
    sender: Sender = default_send,
    job_policy: RetryPolicy | None = None,
    engine: Engine | None = None,
) -> TickSummary:
    """One tick, synchronously. ``workers=0`` renders in this process (tests, small runs);
    ``workers>0`` uses a spawn-safe process pool like the service."""
    explicit = now is not None
    now = _as_utc(now)
    own_engine = engine is None
    engine = engine or make_engine(database_url, writer=True)
    work = OutboxWork(session_factory(engine), report_settings, notification_settings,
                      job_policy=job_policy)
    summary = TickSummary()
    try:
        tasks = work.claim_render_jobs(now)
        outcomes: list[tuple[RenderTask, dict[str, Any] | BaseException]] = []
        if tasks and workers > 0:
            assert report_settings is not None
            context = multiprocessing.get_context("forkserver")
            with ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                     initializer=configure_worker_logging,
                                     initargs=worker_logging_setup()) as pool:
                futures = [(t, pool.submit(render_job, database_url, t.sample_id,
                                           report_settings)) for t in tasks]
                for task, future in futures:
                    try:
                        outcomes.append((task, future.result()))
                    except Exception as exc:  # noqa: BLE001 - recorded on the job
                        outcomes.append((task, exc))
        else:
            for task in tasks:
                try:
                    outcomes.append((task, work.render_in_process(task)))
                except Exception as exc:  # noqa: BLE001 - recorded on the job
                    outcomes.append((task, exc))
        if outcomes:
            work.finish_render_jobs(outcomes, now, summary)
        if not explicit:  # the notify jobs those renders just wrote are due now too
            now = utcnow()
        work.process_notify_jobs(now, summary)
        work.escalate(now, summary)
        sends = work.claim_deliveries(now)
        if sends:
            with ThreadPoolExecutor(max_workers=min(8, len(sends))) as threads:
                results = list(threads.map(lambda t: _send_one(sender, t), sends))
            work.record_deliveries(list(zip(sends, results, strict=True)), now, summary)
    finally:
        if own_engine:
            engine.dispose()
    return summary


class OutboxRunner(Service):
    """Twisted service running the outbox on a LoopingCall (injectable clock).

    Reports render in a ``forkserver`` process pool: the program that starts the service
    must guard its entry point (``if __name__ == "__main__":``), because worker processes
    import the main module again (console scripts do this already).
    """

    name = "outbox"

    def __init__(
        self,
        database_url: str,
        report_settings: ReportSettings | None,
        notification_settings: NotificationSettings,
        *,
        reactor: Any = None,
        clock: Any = None,
        workers: int = 2,
        poll_interval: float = 1.0,
        threads: int = 4,
        job_policy: RetryPolicy | None = None,
        sender: Sender = default_send,
        stale_after: float = 900.0,
        mp_context: str = "forkserver",
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.database_url = database_url
        self.report_settings = report_settings
        self.notification_settings = notification_settings
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.workers = workers
        self.poll_interval = poll_interval
        self.threads = threads
        self.job_policy = job_policy
        self.sender = sender
        self.stale_after = timedelta(seconds=stale_after)
        self.mp_context = mp_context
        self.last_summary: TickSummary | None = None
        self.ticks = 0
        self._engine: Engine | None = None
        self._work: OutboxWork | None = None
        self._pool: ThreadPool | None = None
        self._executor: ProcessPoolExecutor | None = None
        self._loop: LoopingCall | None = None
        self._loop_done: Deferred[Any] | None = None

    # ------------------------------------------------------------------ lifecycle

    def startService(self) -> None:
        super().startService()
        self._engine = make_engine(self.database_url, writer=True)
        self._work = OutboxWork(session_factory(self._engine), self.report_settings,
                                self.notification_settings, job_policy=self.job_policy)
        self._pool = ThreadPool(minthreads=1, maxthreads=self.threads, name="labrelay-outbox")
        self._pool.start()
        if self.report_settings is not None and self.workers > 0:
            self._executor = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context(self.mp_context),
                initializer=configure_worker_logging,
                initargs=worker_logging_setup(),
            )
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop_done = self._loop.start(self.poll_interval, now=True)
        log.info("outbox.started", workers=self.workers, poll_interval=self.poll_interval)

    @defer.inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()  # waits for a running tick: LoopingCall fires when it ends
        if self._loop_done is not None:
            yield self._loop_done
        executor, pool = self._executor, self._pool
        self._executor = self._pool = None
        if executor is not None and pool is not None:
            yield deferToThreadPool(self.reactor, pool, executor.shutdown, True)
        if pool is not None:
            pool.stop()
        if self._engine is not None:
            self._engine.dispose()
        log.info("outbox.stopped")

    # ------------------------------------------------------------------ tick

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), UTC)

    def _db(self, func: Callable[..., Any], *args: Any) -> Deferred[Any]:
        assert self._pool is not None
        return deferToThreadPool(self.reactor, self._pool, func, *args)

    def _from_future(self, future: Future[Any]) -> Deferred[Any]:
        """A Deferred fired on the reactor thread when a concurrent future finishes."""
        d: Deferred[Any] = Deferred()

        def fire(done: Future[Any]) -> None:
            try:
                result = done.result()
            except Exception as exc:  # noqa: BLE001 - handed to the Deferred
                d.errback(Failure(exc))
            else:
                d.callback(result)

        future.add_done_callback(lambda done: self.reactor.callFromThread(fire, done))
        return d

    def _render(self, task: RenderTask) -> Deferred[Any]:
        assert self.report_settings is not None
        if self._executor is None:  # workers=0: render in a thread of this process
            assert self._work is not None
            return self._db(self._work.render_in_process, task)
        future = self._executor.submit(render_job, self.database_url, task.sample_id,
                                       self.report_settings)
        return self._from_future(future)

    def _tick(self) -> Deferred[Any]:
        d = self._tick_body()

        def failed(failure: Failure) -> None:
            # A tick that fails (database down) is logged and the next one tries again.
            log.error("outbox.tick.failed", error_type=failure.type.__name__ if failure.type
                      else "unknown")

        d.addErrback(failed)
        return d

    @defer.inlineCallbacks
    def _tick_body(self) -> Generator[Deferred[Any], Any, None]:
        assert self._work is not None
        work = self._work
        now = self._now()
        summary = TickSummary()
        self.ticks += 1
        if self.ticks == 1:
            summary.requeued = yield self._db(work.requeue_stale, now, self.stale_after)

        tasks: list[RenderTask] = yield self._db(work.claim_render_jobs, now)
        if tasks:
            results = yield defer.DeferredList(
                [self._render(t) for t in tasks], consumeErrors=True)
            outcomes: list[tuple[RenderTask, dict[str, Any] | BaseException]] = []
            for task, (ok, value) in zip(tasks, results, strict=True):
                outcomes.append((task, value if ok else value.value))
            yield self._db(work.finish_render_jobs, outcomes, self._now(), summary)

        now = self._now()
        yield self._db(work.process_notify_jobs, now, summary)
        yield self._db(work.escalate, now, summary)
        sends: list[SendTask] = yield self._db(work.claim_deliveries, now)
        if sends:
            sent = yield defer.DeferredList(
                [self._db(_send_one, self.sender, t) for t in sends], consumeErrors=True)
            send_outcomes: list[tuple[SendTask, BaseException | None]] = [
                (t, value if ok else value.value) for t, (ok, value) in zip(sends, sent,
                                                                            strict=True)
            ]
            yield self._db(work.record_deliveries, send_outcomes, self._now(), summary)
        self.last_summary = summary
        if any(summary.as_dict().values()):
            log.info("outbox.tick", **summary.as_dict())


def build_outbox_runner(config: Any, database_url: str, reactor: Any = None) -> OutboxRunner:
    """The runner for ``EngineConfig``: reports disabled (jobs wait) without a signing key."""
    report_settings: ReportSettings | None
    try:
        from engine.report_names import with_mapping_names

        report_settings = with_mapping_names(report_settings_from_config(config), config)
    except LabrelayError as exc:
        log.error("outbox.reports.disabled", reason=str(exc))
        report_settings = None
    return OutboxRunner(
        database_url,
        report_settings,
        notification_settings_from_config(config),
        reactor=reactor,
        workers=int(getattr(config.reports, "workers", 2)),
    )


def summary_line(summary: TickSummary) -> str:
    return ", ".join(f"{k} {v}" for k, v in summary.as_dict().items())


__all__ = [
    "OutboxRunner",
    "OutboxWork",
    "TickSummary",
    "build_outbox_runner",
    "run_once",
    "summary_line",
]
