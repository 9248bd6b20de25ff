"""`labrelay messages`: list, inspect and reprocess stored messages."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click
from sqlalchemy import func, select

from engine.cli import CliState, config_option, database_option, pass_state

STATUSES = ("RECEIVED", "APPLIED", "HELD", "DUPLICATE", "REJECTED", "IGNORED", "QUEUED", "SENT",
            "NOT_SENT", "ANSWERED")


@click.group("messages")
def messages_group() -> None:
    """Stored messages: list them, show one, reprocess held ones."""


@messages_group.command("list")
@click.option("--status", type=click.Choice(STATUSES, case_sensitive=False),
              help="Only messages in this status (e.g. HELD).")
@click.option("--interface", help="Only this interface.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@config_option
@database_option
@pass_state
def list_cmd(state: CliState, status: str | None, interface: str | None, limit: int,
             as_json: bool) -> None:
    """List stored messages, newest first.

    \b
    Examples:
      labrelay messages list --status HELD
      labrelay messages list --interface demo-hl7 --limit 20 --json
    """
    from lis_bridge.models import RawMessage

    with state.sessions()() as session:
        query = select(RawMessage).order_by(RawMessage.id.desc()).limit(limit)
        if status:
            query = query.where(RawMessage.status == status.upper())
        if interface:
            query = query.where(RawMessage.interface == interface)
        rows = session.scalars(query).all()
        counts = dict(
            session.execute(select(RawMessage.status, func.count()).group_by(RawMessage.status))
            .tuples().all()
        )
    items: list[dict[str, Any]] = [
        {
            "id": r.id, "received_at": r.received_at.isoformat(), "interface": r.interface,
            "direction": r.direction, "protocol": r.protocol, "peer": r.peer,
            "control_id": r.control_id, "type": r.message_type, "status": r.status,
            "hold_reason": r.hold_reason, "hold_detail": r.hold_detail, "ack": r.ack_code,
            "size": r.size, "sha256": r.sha256,
        }
        for r in rows
    ]
    if as_json:
        click.echo(json.dumps({"messages": items, "counts": counts}, indent=2))
        return
    click.echo("totals: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for it in items:
        line = (f"#{it['id']:<7} {it['received_at'][:19]} {it['interface']:<14}"
                f" {it['direction']:<3} {it['type'] or '-':<10} {it['control_id'] or '-':<18}"
                f" {it['status']:<9}"
                f" {it['ack'] or '':<3}")
        if it["hold_reason"]:
            line += f" {it['hold_reason']}: {it['hold_detail'][:120]}"
        click.echo(line)


@messages_group.command("show")
@click.argument("message_id", type=int)
@click.option("--payload", is_flag=True,
              help="Also print the stored bytes (contains patient data; the read is audited).")
@click.option("--by", "actor", default=lambda: os.environ.get("USER", "unknown"),
              help="Who is reading (for the access audit).")
@config_option
@database_option
@pass_state
def show_cmd(state: CliState, message_id: int, payload: bool, actor: str) -> None:
    """Show one stored message; with --payload also its exact bytes (audited).

    \b
    Example:
      labrelay messages show 42 --payload --by jsmith
    """
    from lis_bridge.db import transaction
    from lis_bridge.models import AccessAudit, RawMessage

    with transaction(state.sessions()) as session:
        row = session.get(RawMessage, message_id)
        if row is None:
            raise click.ClickException(f"message #{message_id} does not exist")
        click.echo(f"message #{row.id}: {row.protocol} {row.direction} on {row.interface} "
                   f"from {row.peer or '?'} at {row.received_at.isoformat()}")
        click.echo(f"  type {row.message_type or '-'}, control id {row.control_id or '-'}, "
                   f"sender {row.sender or '-'}, {row.size} bytes, sha256 {row.sha256}")
        click.echo(f"  status {row.status}, ack {row.ack_code or '-'}, attempts {row.attempts}")
        if row.hold_reason:
            click.echo(f"  held: {row.hold_reason}: {row.hold_detail}")
        if row.duplicate_of_fk:
            click.echo(f"  duplicate of message #{row.duplicate_of_fk}")
        specimens = ", ".join(s.specimen_id for s in row.specimens)
        click.echo(f"  specimens: {specimens or '-'}")
        if payload:
            session.add(AccessAudit(actor=actor, action="read_payload", object_type="message",
                                    object_id=str(row.id), detail="labrelay messages show"))
            click.echo("  payload:")
            text = row.payload.decode("latin-1")
            for segment in text.replace("\r\n", "\r").replace("\n", "\r").split("\r"):
                if segment:
                    click.echo(f"    {segment}")


@messages_group.command("reprocess")
@click.argument("message_ids", nargs=-1, type=int)
@click.option("--all-held", is_flag=True, help="Every HELD message, oldest first.")
@click.option("--interface", help="With --all-held: only this interface.")
@config_option
@database_option
@pass_state
def reprocess_cmd(state: CliState, message_ids: tuple[int, ...], all_held: bool,
                  interface: str | None) -> None:
    """Apply held messages again after the cause was fixed (mapping, orders, receipt).

    Messages are applied in arrival order, so per-sample order is kept. Needs --config
    for each interface's driver and mapping.

    \b
    Examples:
      labrelay messages reprocess 42 43 --config config/labrelay.example.yaml
      labrelay messages reprocess --all-held --config config/labrelay.example.yaml
    """
    from engine.errors import LabrelayError
    from engine.pipeline import load_runtime, reprocess
    from lis_bridge.db import transaction
    from lis_bridge.models import MessageStatus, RawMessage

    config = state.load_config()
    sessions = state.sessions()
    ids = list(message_ids)
    if all_held:
        with sessions() as session:
            query = select(RawMessage.id).where(RawMessage.status == MessageStatus.HELD)
            if interface:
                query = query.where(RawMessage.interface == interface)
            ids.extend(session.scalars(query.order_by(RawMessage.id)).all())
    if not ids:
        click.echo("nothing to reprocess")
        return
    runtimes: dict[str, Any] = {}
    failures = 0
    for message_id in sorted(set(ids)):
        try:
            with transaction(sessions) as session:
                row = session.get(RawMessage, message_id)
                if row is None:
                    raise LabrelayError(f"message #{message_id} does not exist")
                if row.interface not in runtimes:
                    runtimes[row.interface] = load_runtime(config.interface(row.interface))
                result = reprocess(session, runtimes[row.interface], message_id)
        except LabrelayError as exc:
            failures += 1
            click.echo(f"#{message_id}: not reprocessed: {exc}", err=True)
            continue
        detail = f" {result.hold_reason}: {result.hold_detail}" if result.hold_reason else ""
        click.echo(f"#{message_id}: {result.status}{detail}")
    if failures:
        sys.exit(1)


def register(group: click.Group) -> None:
    group.add_command(messages_group)
