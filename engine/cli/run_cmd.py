"""`labrelay run`: start the engine in the foreground."""

from __future__ import annotations

import click

from engine.cli import CliState, config_option, database_option, pass_state


@click.command("run")
@config_option
@database_option
@pass_state
def run_cmd(state: CliState) -> None:
    """Start the engine in the foreground; Ctrl-C stops it cleanly.

    Loads the configuration, opens the database (an SQLite file is created and upgraded on
    first run; PostgreSQL must be upgraded with `labrelay db upgrade`), starts every
    configured interface and logs each one started or not started with the reason.

    \b
    Example:
      labrelay run --config config/labrelay.example.yaml
    """
    import sys

    from twisted.internet import reactor

    from engine.logging import configure_logging, route_twisted_logs
    from engine.service import EngineService

    configure_logging(state.log_format, stream=sys.stdout)
    config = state.load_config()
    database_url = state.database_url()
    route_twisted_logs()
    service = EngineService(config, database_url, reactor)

    def start() -> None:
        try:
            service.startService()
        except Exception:
            reactor.stop()  # type: ignore[attr-defined]
            raise

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def register(group: click.Group) -> None:
    group.add_command(run_cmd)
