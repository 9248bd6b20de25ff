"""`labrelay run`: start the engine in the foreground."""

from __future__ import annotations

from typing import Any

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
    import gc
    import sys

    from twisted.internet import reactor

    from engine.logging import configure_logging, route_twisted_logs
    from engine.service import EngineService

    configure_logging(state.log_format, stream=sys.stdout, cache_loggers=True)
    config = state.load_config()
    database_url = state.database_url()
    _check_database(database_url)
    route_twisted_logs()
    # inbound messages are applied in a process of their own (engine.ingest_process)
    ingest_command = [sys.executable, "-m", "engine.ingest_process", "--config",
                      str(config.source.resolve()), "--log-format", state.log_format]
    service = EngineService(config, database_url, reactor, ingest_command=ingest_command)
    failed: list[str] = []

    def start() -> None:
        try:
            service.startService()
            # What is loaded at start (modules, mappings, SQLAlchemy's compiled statements)
            # lives as long as the engine: moved out of the collector's reach, a full
            # collection no longer walks it, which was a stall of tens of milliseconds
            # in an analyzer's ACK now and then.
            gc.freeze()
        except Exception as exc:  # noqa: BLE001 - reported, then the engine stops with exit 1
            import structlog

            structlog.get_logger(__name__).critical(
                "engine.start.failed", reason=f"{type(exc).__name__}: {exc}"[:500])
            failed.append(str(exc))
            reactor.stop()  # type: ignore[attr-defined]

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.callWhenRunning(_stop_once_on_signals, reactor)  # type: ignore[attr-defined]
    reactor.callWhenRunning(_reload_on_sighup, reactor, service)  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    if failed:
        raise click.ClickException(f"the engine did not start: {failed[0][:300]}")


def _stop_once_on_signals(reactor: Any) -> None:
    """SIGINT and SIGTERM stop the engine once. Twisted's own handlers stop the reactor on
    every signal, and a second one (Ctrl-C pressed twice, `timeout` signalling the engine
    and then its process group) ended in a critical ReactorNotRunning traceback while the
    engine was already stopping cleanly."""
    import signal

    import structlog

    log = structlog.get_logger(__name__)
    stopping: list[int] = []

    def handler(number: int, _frame: Any) -> None:
        name = signal.Signals(number).name
        if stopping:
            reactor.callFromThread(lambda: log.info(
                "engine.stop.in_progress", signal=name,
                hint="already stopping: queued messages are being written first"))
            return
        stopping.append(number)
        reactor.callFromThread(lambda: log.info("engine.stop.requested", signal=name))
        reactor.callFromThread(reactor.stop)

    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, handler)


def _reload_on_sighup(reactor: Any, service: Any) -> None:
    """SIGHUP: read the mapping files again (``labrelay mapping reload`` without the
    admin address); the outcome is logged (mapping.reloaded, mapping.reload.failed,
    mapping.reload.done)."""
    import signal

    import structlog

    log = structlog.get_logger(__name__)

    def reload() -> None:
        log.info("mapping.reload.requested", signal="SIGHUP")
        service.reload_mappings().addErrback(
            lambda f: log.error("mapping.reload.error", reason=f.getErrorMessage()[:300]))

    signal.signal(signal.SIGHUP, lambda _n, _f: reactor.callFromThread(reload))


def _check_database(url: str) -> None:
    """Refuse to start, with a clear reason, when the database cannot be reached or is not
    at this version's schema (SQLite is created and upgraded on first run)."""
    from sqlalchemy.exc import SQLAlchemyError

    from lis_bridge.db import ensure_current, make_engine, upgrade

    engine = make_engine(url)
    shown = engine.url.render_as_string(hide_password=True)
    try:
        if engine.dialect.name == "sqlite":
            upgrade(engine)
        else:
            ensure_current(engine)
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        first = (str(cause).strip().splitlines() or [type(exc).__name__])[0]
        raise click.ClickException(
            f"cannot open the database {shown}: {first}. Check that the server runs and the "
            "URL (--database, LABRELAY_DATABASE_URL or `database:` in the config) is right; "
            "the engine did not start."
        ) from exc
    finally:
        engine.dispose()


def register(group: click.Group) -> None:
    group.add_command(run_cmd)
