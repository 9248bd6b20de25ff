"""`labrelay notifications` (list, retry) and `labrelay outbox run`."""

from __future__ import annotations

import json
from typing import Any

import click

from engine.cli import CliState, config_option, database_option, pass_state

STATUSES = ("PENDING", "DONE", "FAILED")


@click.group("notifications")
def notifications_group() -> None:
    """Notifications (report ready, critical values, engine alerts) and their delivery."""


def _row(n: Any) -> dict[str, Any]:
    payload = json.loads(n.payload or "{}")
    return {
        "id": n.id,
        "kind": n.kind,
        "channel": n.channel,
        "status": n.status,
        "attempts": n.attempts,
        "specimen_id": payload.get("specimen_id", ""),
        "sample_id": n.sample_fk,
        "subject": n.subject,
        "created_at": n.created_at.isoformat() if n.created_at else None,
        "next_attempt_at": n.next_attempt_at.isoformat() if n.next_attempt_at else None,
        "escalate_at": n.escalate_at.isoformat() if n.escalate_at else None,
        "escalated_to": n.escalated_to_fk,
        "delivered_at": n.delivered_at.isoformat() if n.delivered_at else None,
        "last_error": n.last_error,
    }


@notifications_group.command("list")
@click.option("--status", type=click.Choice(STATUSES, case_sensitive=False),
              help="Only this status (DONE = delivered).")
@click.option("--limit", type=click.IntRange(1, 100000), default=500, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@config_option
@database_option
@pass_state
def list_cmd(state: CliState, status: str | None, limit: int, as_json: bool) -> None:
    """List notifications, oldest first, with counts at the end.

    \b
    Examples:
      labrelay notifications list
      labrelay notifications list --status FAILED
      labrelay notifications list --json | jq .
    """
    from lis_bridge.db import transaction
    from lis_bridge.notifications import list_notifications, notification_counts

    with transaction(state.sessions()) as session:
        rows = [_row(n) for n in list_notifications(session, status, limit)]
        counts = notification_counts(session)
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, sort_keys=True))
        return
    if not rows:
        click.echo("no notifications" + (f" with status {status.upper()}" if status else ""))
    for r in rows:
        escalated = f" -> #{r['escalated_to']}" if r["escalated_to"] else ""
        click.echo(
            f"#{r['id']:<6} {r['kind']:<15} {r['channel']:<16} {r['status']:<8} "
            f"attempts {r['attempts']:<3} specimen {r['specimen_id'] or '-'}{escalated}"
        )
        click.echo(f"        {r['subject']}")
        if r["status"] != "DONE" and r["last_error"]:
            click.echo(f"        last error: {r['last_error'][:300]}")
    click.echo(
        f"pending {counts['pending']}, failed {counts['failed']}, "
        f"escalated {counts['escalated']}, delivered {counts['delivered']}"
    )


@notifications_group.command("retry")
@click.argument("notification_id", type=int)
@config_option
@database_option
@pass_state
def retry_cmd(state: CliState, notification_id: int) -> None:
    """Make notification ID due now with a fresh set of attempts (after fixing the channel).

    \b
    Example:
      labrelay notifications retry 42
    """
    from lis_bridge.db import transaction
    from lis_bridge.notifications import retry_notification

    with transaction(state.sessions()) as session:
        notification = retry_notification(session, notification_id)
        click.echo(f"notification #{notification.id} on {notification.channel} is due now; "
                   "the running engine (or `labrelay outbox run --once`) sends it")


@click.group("outbox")
def outbox_group() -> None:
    """The outbox: report rendering and notification jobs written by the engine."""


@outbox_group.command("run")
@click.option("--once", is_flag=True, help="Process what is due now, then exit.")
@click.option("--interval", type=click.FloatRange(0.1, 3600), default=1.0, show_default=True,
              help="Seconds between polls (without --once).")
@config_option
@database_option
@pass_state
def run_cmd(state: CliState, once: bool, interval: float) -> None:
    """Render due reports and deliver due notifications (the engine does this itself
    while `labrelay run` is up; this is for a separate worker, or a manual catch-up).

    \b
    Examples:
      labrelay -c config/labrelay.example.yaml outbox run --once
      labrelay -c config/labrelay.example.yaml outbox run --interval 2
    """
    from engine.cli.reports_cmd import report_settings_from_config
    from engine.errors import LabrelayError
    from engine.outbox_runner import OutboxRunner, run_once, summary_line
    from lis_bridge.notifications import notification_settings_from_config

    cfg = state.load_config()
    url = state.database_url()
    state.engine()  # refuses an old schema before any work
    notification_settings = notification_settings_from_config(cfg)
    try:
        report_settings = report_settings_from_config(cfg)
    except LabrelayError as exc:
        click.echo(f"warning: reports disabled ({exc}); render jobs stay pending", err=True)
        report_settings = None
    if once:
        summary = run_once(url, report_settings, notification_settings,
                           workers=0, engine=state.engine())
        click.echo(summary_line(summary))
        return

    from twisted.internet import reactor

    runner = OutboxRunner(url, report_settings, notification_settings,
                          workers=int(cfg.reports.workers), poll_interval=interval)
    reactor.callWhenRunning(runner.startService)  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger(  # type: ignore[attr-defined]
        "before", "shutdown", runner.stopService)
    click.echo(f"outbox runner polling every {interval:g} s; Ctrl-C stops it")
    reactor.run()  # type: ignore[attr-defined]


def register(group: click.Group) -> None:
    group.add_command(notifications_group)
    group.add_command(outbox_group)
