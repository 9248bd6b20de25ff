"""The `labrelay` command line: one click group, subcommands in sibling modules.

Each subcommand module exposes ``register(group)``; they are imported when the
group is built so ``labrelay --help`` lists them all.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from engine import __version__
from engine.errors import LabrelayError

# Subcommand modules (each has `register(group: click.Group) -> None`).
COMMAND_MODULES = (
    "engine.cli.db_cmd",
    "engine.cli.config_cmd",
    "engine.cli.run_cmd",
    "engine.cli.decode_cmd",
    "engine.cli.send_cmd",
    "engine.cli.orders_cmd",
    "engine.cli.samples_cmd",
    "engine.cli.messages_cmd",
    "engine.cli.mapping_cmd",
    "engine.cli.reports_cmd",
    "engine.cli.notifications_cmd",
    "engine.cli.replay_cmd",
    "engine.cli.status_cmd",
)


@dataclass
class CliState:
    """Global options, resolved lazily so `--help` never touches a database."""

    config_path: Path | None = None
    database_option: str | None = None
    log_format: str = "auto"
    _engine: Engine | None = field(default=None, repr=False)

    def load_config(self) -> Any:
        from engine.config import load_config

        if self.config_path is None:
            raise click.UsageError(
                "this command needs --config FILE (e.g. config/labrelay.example.yaml)"
            )
        return load_config(self.config_path)

    def database_url(self) -> str:
        """--database, then LABRELAY_DATABASE_URL, then the config's `database:`, then SQLite."""
        from lis_bridge.db import DEFAULT_DATABASE_URL

        if self.database_option:
            return self.database_option
        env = os.environ.get("LABRELAY_DATABASE_URL")
        if env:
            return env
        if self.config_path is not None:
            return str(self.load_config().database)
        return DEFAULT_DATABASE_URL

    def engine(self, *, check_schema: bool = True) -> Engine:
        from lis_bridge.db import ensure_current, make_engine

        if self._engine is None:
            self._engine = make_engine(self.database_url())
            if check_schema:
                ensure_current(self._engine)
        return self._engine

    def sessions(self) -> sessionmaker[Session]:
        from lis_bridge.db import session_factory

        return session_factory(self.engine())


pass_state = click.make_pass_decorator(CliState, ensure=True)


def _set_config(ctx: click.Context, _param: click.Parameter, value: Path | None) -> None:
    if value is not None:
        ctx.ensure_object(CliState).config_path = value


def _set_database(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.ensure_object(CliState).database_option = value


def config_option(func: Any) -> Any:
    """`--config FILE` on a subcommand too (`labrelay run --config X`)."""
    return click.option(
        "--config",
        "-c",
        type=click.Path(dir_okay=False, path_type=Path),
        expose_value=False,
        callback=_set_config,
        help="Engine configuration YAML.",
    )(func)


def database_option(func: Any) -> Any:
    """`--database URL` on a subcommand too (`labrelay db upgrade --database URL`)."""
    return click.option(
        "--database",
        metavar="URL",
        expose_value=False,
        callback=_set_database,
        help="Database URL; overrides LABRELAY_DATABASE_URL and the config's `database:`.",
    )(func)


class LabrelayGroup(click.Group):
    """Turns LabrelayError into a clear one-line error and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LabrelayError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=LabrelayGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="labrelay")
@click.option(
    "--config",
    "-c",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="LABRELAY_CONFIG",
    help="Engine configuration YAML (env LABRELAY_CONFIG).",
)
@click.option(
    "--database",
    "database_option",
    metavar="URL",
    help="Database URL; overrides LABRELAY_DATABASE_URL and the config's `database:`.",
)
@click.option(
    "--log-format",
    type=click.Choice(["auto", "console", "json"]),
    default="auto",
    show_default=True,
    help="auto = console on a terminal, JSON otherwise.",
)
@click.pass_context
def main(
    ctx: click.Context, config_path: Path | None, database_option: str | None, log_format: str
) -> None:
    """labrelay connects laboratory analyzers (HL7 v2 / MLLP, ASTM over TCP and RS-232)
    to the LIS database.

    \b
    Examples:
      labrelay --config config/labrelay.example.yaml run
      labrelay db upgrade --database sqlite:///labrelay.db
      labrelay decode ../shared/corpus/hl7/roche_cobas_pure__1.hl7 --json
    """
    from engine.logging import configure_logging

    state = ctx.ensure_object(CliState)
    state.config_path = config_path
    state.database_option = database_option
    state.log_format = log_format
    configure_logging(log_format)


for _module in COMMAND_MODULES:
    try:
        importlib.import_module(_module).register(main)
    except ModuleNotFoundError as _exc:  # a module still being written; never in a release
        if _exc.name != _module:
            raise
