"""`labrelay reports`: render a sample's report on demand, verify a report or token."""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Any

import click

from engine.cli import CliState, config_option, database_option, pass_state


def report_settings_from_config(cfg: Any) -> Any:
    """ReportSettings from the engine configuration, with test panels and names from the
    interfaces' mappings."""
    from engine.report_names import with_mapping_names
    from lis_bridge.reports import report_settings_from_config as build

    return with_mapping_names(build(cfg), cfg)


def _actor() -> str:
    try:
        return f"user:{getpass.getuser()}"
    except (KeyError, OSError):
        return "user:unknown"


@click.group("reports")
def reports_group() -> None:
    """Render and verify laboratory reports (PDF with a signed QR verification token)."""


@reports_group.command("render")
@click.argument("specimen_id")
@click.option("--force", is_flag=True,
              help="Write a new version even if the data did not change (e.g. a lost file).")
@config_option
@database_option
@pass_state
def render_cmd(state: CliState, specimen_id: str, force: bool) -> None:
    """Render the report of SPECIMEN_ID now (the sample must be COMPLETED or REPORTED).

    Same data gives the existing version back; changed data writes a new version that
    supersedes the previous one. Uses `reports:` from the configuration.

    \b
    Examples:
      labrelay -c config/labrelay.example.yaml reports render S-2024-000123
      labrelay -c config/labrelay.example.yaml reports render S-2024-000123 --force
    """
    from sqlalchemy import select

    from lis_bridge.db import transaction
    from lis_bridge.models import Sample
    from lis_bridge.reports import render_report_outcome

    settings = report_settings_from_config(state.load_config())
    with transaction(state.sessions()) as session:
        sample = session.scalar(select(Sample).where(Sample.specimen_id == specimen_id))
        if sample is None:
            raise click.ClickException(
                f"no sample with specimen id {specimen_id!r}; check the id "
                "(`labrelay samples show` lists what the LIS knows)")
        outcome = render_report_outcome(session, sample.id, settings, actor=_actor(),
                                        force=force)
        report = outcome.report
        if outcome.created:
            click.echo(f"{specimen_id}: report version {report.version} written to {report.path}")
        else:
            click.echo(f"{specimen_id}: unchanged, version {report.version} at {report.path} "
                       "(use --force for a new version)")
        click.echo(f"  sha256 {report.sha256}")


@reports_group.command("verify")
@click.argument("pdf_or_token")
@config_option
@database_option
@click.option("--offline", is_flag=True,
              help="Check a token's signature only, without the database.")
@pass_state
def verify_cmd(state: CliState, pdf_or_token: str, offline: bool) -> None:
    """Is PDF_OR_TOKEN (a report file, or the token from its QR code) genuine and current?

    A file is genuine when its embedded token is correctly signed AND its sha256 is the
    one recorded when it was issued. Exit status 1 when it is not genuine.

    \b
    Examples:
      labrelay -c config/labrelay.example.yaml reports verify reports/S1/S1-v1.pdf
      labrelay -c config/labrelay.example.yaml reports verify LR1.eyJ....abc
    """
    from lis_bridge.db import transaction
    from lis_bridge.reports import verify

    settings = report_settings_from_config(state.load_config())
    candidate = Path(pdf_or_token)
    subject: bytes | str
    if not pdf_or_token.startswith("LR1.") and candidate.is_file():
        if candidate.stat().st_size > 50 * 1024 * 1024:
            raise click.ClickException(f"{candidate} is larger than 50 MB: not a labrelay report")
        subject = candidate.read_bytes()
    elif pdf_or_token.startswith("LR1."):
        subject = pdf_or_token
    else:
        raise click.ClickException(
            f"{pdf_or_token!r} is neither a readable file nor a token (LR1.<payload>.<mac>)")
    if offline:
        result = verify(None, settings, subject)
    else:
        with transaction(state.sessions()) as session:
            result = verify(session, settings, subject)
    if result.genuine:
        click.echo(f"GENUINE  {result.reason}")
    else:
        click.echo(f"REFUSED  {result.reason}")
    if result.superseded:
        click.echo(f"  superseded: version {result.latest_version} is the current report")
    if not result.genuine:
        click.get_current_context().exit(1)


def register(group: click.Group) -> None:
    group.add_command(reports_group)
