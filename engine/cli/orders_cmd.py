"""`labrelay orders`: import the ward's orders CSV into the LIS."""

from __future__ import annotations

import os
from pathlib import Path

import click

from engine.cli import CliState, config_option, database_option, pass_state

MAX_ERRORS_SHOWN = 200


def _default_user() -> str:
    return os.environ.get("USER", "") or "unknown"


@click.group("orders")
def orders_group() -> None:
    """Orders: import collected samples and their tests from a CSV file."""


@orders_group.command("import")
@click.argument("csv_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--skip-invalid", is_flag=True,
              help="Import the valid rows and report the invalid ones (default: import nothing "
                   "when any row is invalid).")
@click.option("--by", "actor", default=_default_user, show_default="$USER",
              help="Who imports (recorded in the audit trail).")
@config_option
@database_option
@pass_state
def import_cmd(state: CliState, csv_file: Path, skip_invalid: bool, actor: str) -> None:
    """Import orders from CSV_FILE; importing the same file again changes nothing.

    Columns: specimen_id,patient_id,patient_name,sex,birth_date,tests,collected_at,location
    (tests = LIS test codes separated by spaces; sex M/F/O/U; dates ISO 8601).

    \b
    Examples:
      labrelay orders import fixtures/orders_example.csv --by jsmith
      labrelay orders import ward7.csv --skip-invalid --database sqlite:///labrelay.db
    """
    from lis_bridge.db import transaction
    from lis_bridge.orders import import_orders_csv

    with transaction(state.sessions()) as session:
        report = import_orders_csv(session, csv_file, skip_invalid=skip_invalid, actor=actor)
    for error in report.errors[:MAX_ERRORS_SHOWN]:
        click.echo(f"  {error}", err=True)
    if len(report.errors) > MAX_ERRORS_SHOWN:
        click.echo(f"  ... and {len(report.errors) - MAX_ERRORS_SHOWN} more errors", err=True)
    if not report.ok:
        raise click.ClickException(
            f"{csv_file}: {len(report.errors)} error(s), nothing imported. Fix the lines "
            "above and import again, or use --skip-invalid to import the valid rows only."
        )
    click.echo(f"{csv_file}: {report.summary()}")
    if report.skipped:
        click.echo(f"WARNING: {report.skipped} invalid row(s) were NOT imported (listed above)",
                   err=True)


@orders_group.command("push")
@click.argument("specimen_ids", nargs=-1, required=True)
@click.option("--interface", required=True, help="The ASTM interface of the analyzer.")
@config_option
@pass_state
def push_cmd(state: CliState, specimen_ids: tuple[str, ...], interface: str) -> None:
    """Download the pending tests of SPECIMEN_IDS to an analyzer that accepts orders.

    The running engine reads the ordered tests, translates them through the interface's
    mapping and sends H P O... L on the link (the analyzer may also ask by host query).

    \b
    Example:
      labrelay orders push DEMO0001 DEMO0002 --interface demo-astm \\
          --config config/labrelay.example.yaml
    """
    from engine.cli._admin import admin_request

    try:
        code, result = admin_request(state, "POST", f"/interfaces/{interface}/orders",
                                     {"specimen_ids": list(specimen_ids)})
    except OSError as exc:
        raise click.ClickException(
            f"the engine is not reachable on its admin address ({exc}); is `labrelay run` "
            "running with this configuration?") from exc
    if "error" in result:
        raise click.ClickException(str(result["error"]))
    for specimen_id in result.get("queued", []):
        click.echo(f"queued   {specimen_id}")
    for specimen_id, reason in result.get("skipped", {}).items():
        click.echo(f"skipped  {specimen_id}: {reason}")
    if code != 202:
        raise SystemExit(1)


def register(group: click.Group) -> None:
    group.add_command(orders_group)
