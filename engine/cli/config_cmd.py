"""`labrelay config check`: validate a configuration file."""

from __future__ import annotations

from pathlib import Path

import click


@click.group("config")
def config_group() -> None:
    """Validate and summarise engine configuration files."""


@config_group.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def check_cmd(file: Path) -> None:
    """Validate FILE and print a summary of its interfaces.

    \b
    Example:
      labrelay config check config/labrelay.example.yaml
    """
    from engine.config import load_config

    cfg = load_config(file)
    click.echo(f"{file}: valid")
    click.echo(f"  database: {_safe_url(cfg.database)}")
    click.echo("  inbound messages applied by: " + (
        "the ingest process" if cfg.ingest_process else "the engine's writer thread"))
    click.echo(f"  interfaces: {len(cfg.interfaces)}")
    for iface in cfg.interfaces:
        state = "" if iface.enabled else " (disabled)"
        mapping = iface.mapping.name if iface.mapping else "no mapping"
        click.echo(
            f"    {iface.name:<16} {iface.protocol:<5} {iface.driver:<14} "
            f"{iface.transport_summary}  ack={iface.ack_policy}  {mapping}{state}"
        )
    click.echo(f"  reports: {cfg.reports.output_dir} ({cfg.reports.workers} workers)")
    channels = ", ".join(f"{c.name} ({c.type})" for c in cfg.notifications.channels) or "none"
    click.echo(f"  notification channels: {channels}")
    if cfg.admin.listen:
        click.echo(f"  admin HTTP: {cfg.admin.listen}")


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for display
        return "(unparseable URL)"


def register(group: click.Group) -> None:
    group.add_command(config_group)
