"""`labrelay db`: create or upgrade the LIS database schema."""

from __future__ import annotations

import click

from engine.cli import CliState, config_option, database_option, pass_state


@click.group("db")
def db_group() -> None:
    """Create, upgrade and inspect the LIS database schema."""


@db_group.command("upgrade")
@config_option
@database_option
@pass_state
def upgrade_cmd(state: CliState) -> None:
    """Create the schema, or upgrade it to this version. Safe to run again.

    \b
    Examples:
      labrelay db upgrade                                  # ./labrelay.db (SQLite)
      labrelay db upgrade --database postgresql+psycopg2://postgres@127.0.0.1/lis
    """
    from lis_bridge.db import current_revision, head_revision, upgrade

    engine = state.engine(check_schema=False)
    before = current_revision(engine)
    upgrade(engine)
    after = current_revision(engine)
    url = engine.url.render_as_string(hide_password=True)
    if before == after:
        click.echo(f"{url}: schema already at {after} (nothing to do)")
    else:
        click.echo(f"{url}: schema upgraded {before or 'empty'} -> {after} "
                   f"(head {head_revision()})")


@db_group.command("status")
@config_option
@database_option
@pass_state
def status_cmd(state: CliState) -> None:
    """Show the schema revision of the database and the one this labrelay needs.

    \b
    Example:
      labrelay db status --database sqlite:///labrelay.db
    """
    from lis_bridge.db import current_revision, head_revision

    engine = state.engine(check_schema=False)
    current, head = current_revision(engine), head_revision()
    click.echo(f"database: {engine.url.render_as_string(hide_password=True)}")
    click.echo(f"schema:   {current or 'empty'} (this labrelay needs {head})")
    if current != head:
        raise click.ClickException("schema is not current: run `labrelay db upgrade`")


def register(group: click.Group) -> None:
    group.add_command(db_group)
