"""`labrelay status`: what needs attention, from the database (and the engine, if running)."""

from __future__ import annotations

import json
from typing import Any

import click

from engine.cli import CliState, config_option, database_option, pass_state


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@config_option
@database_option
@pass_state
def status_cmd(state: CliState, as_json: bool) -> None:
    """What needs a person: held and rejected messages, failed jobs, undelivered notifications;
    with --config also the running engine's interfaces (from its admin HTTP).

    \b
    Example:
      labrelay status --config config/labrelay.example.yaml
    """
    from lis_bridge.health import attention_summary

    with state.sessions()() as session:
        summary: dict[str, Any] = attention_summary(session)
    engine = _engine_status(state) if state.config_path is not None else None
    if as_json:
        click.echo(json.dumps({"database": summary, "engine": engine}, indent=2))
        return
    if engine is None and state.config_path is not None:
        click.echo("engine: not reachable on its admin address (is `labrelay run` running?)")
    elif engine is not None:
        click.echo(f"engine {engine.get('node')}: up since {engine.get('started_at', '?')[:19]}")
        for iface in engine.get("interfaces", []):
            reason = f" ({iface['reason']})" if iface.get("reason") else ""
            mapping = (f" mapping {iface['mapping_sha256'][:16]}"
                       if iface.get("mapping_sha256") else "")
            click.echo(f"  {iface['name']:<16} {iface['status']:<8} {iface['transport']:<40} "
                       f"conn {iface['connections']} recv {iface['received']} "
                       f"held {iface['held']}{mapping}{reason}")
    held = summary["held_messages"]
    click.echo(f"held messages: {held}" + (
        " (" + ", ".join(f"{k} {v}" for k, v in summary["held_by_reason"].items()) + ")"
        if held else ""))
    if held:
        click.echo("  see `labrelay messages list --status HELD`; fix, then "
                   "`labrelay messages reprocess --all-held --config FILE`")
    click.echo(f"rejected (unreadable) messages: {summary['rejected_messages']}")
    click.echo(f"stored but not yet applied: {summary['unapplied_messages']}")
    jobs = summary["outbox_jobs"]
    click.echo("outbox jobs: " + (", ".join(f"{k} {v}" for k, v in jobs.items()) or "none open"))
    n = summary["notifications"]
    click.echo(f"notifications: {n['pending']} pending, {n['failed']} failed, "
               f"{n['escalated']} escalated, {n['delivered']} delivered")
    if n["failed"]:
        click.echo("  see `labrelay notifications list --status FAILED`")


def _engine_status(state: CliState) -> dict[str, Any] | None:
    from engine.cli._admin import admin_request

    try:
        code, data = admin_request(state, "GET", "/status", timeout=3)
    except (OSError, ValueError, click.ClickException):
        return None
    return data if code == 200 else None


def register(group: click.Group) -> None:
    group.add_command(status_cmd)
