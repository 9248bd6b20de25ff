"""structlog, configured in one place.

JSON when stdout is not a terminal (or with ``--log-format json``), a readable console
otherwise. The PHI filter runs on every event, so patient data never reaches a log
line even when passed by mistake. Twisted's own log goes through the standard
library and ends in the same processors. Our own lines go straight from structlog to the
stream (no standard-library record, handler or formatter: ~12 µs a line instead of ~23),
each logger still honouring the level the standard library holds for its name; both
kinds share one lock, so lines never interleave.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
from collections.abc import MutableMapping
from typing import Any

import structlog

# Keys that carry patient data. Their values are replaced, never printed.
PHI_KEYS = frozenset(
    {
        "patient_name",
        "name",
        "patient",
        "patient_id",
        "pid",
        "birth_date",
        "dob",
        "date_of_birth",
        "value",
        "value_text",
        "value_number",
        "result_value",
        "result",
        "results",
        "observation",
        "observations",
        "payload",
        "raw",
        "message_text",
        "address",
        "phone",
    }
)
REDACTED = "[redacted]"

# (format, level, to stdout) of the last configure_logging(): worker processes repeat it.
_ACTIVE: tuple[str, int, bool] = ("console", logging.INFO, False)

# Inside free text (an exception message, an event name someone wrote badly) an HL7 PID
# segment or an ASTM P record may appear: blank everything after the segment id.
_HL7_PID = re.compile(r"PID\|[^\r\n]*")
_ASTM_P = re.compile(r"(?<![A-Za-z0-9])P\|\d*\|[^\r\n]*")
_OBX_R = re.compile(r"(OBX\|[^\r\n]*|(?<![A-Za-z0-9])R\|\d+\|[^\r\n]*)")


def _scrub_text(text: str) -> str:
    if "|" not in text:  # every pattern below needs a field separator: most lines have none
        return text
    text = _HL7_PID.sub("PID|" + REDACTED, text)
    text = _ASTM_P.sub("P|" + REDACTED, text)
    return _OBX_R.sub(REDACTED, text)


def redact_phi(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: remove patient data from every event."""
    for key in list(event_dict):
        value = event_dict[key]
        if key.lower() in PHI_KEYS:
            event_dict[key] = REDACTED
        elif isinstance(value, str):
            event_dict[key] = _scrub_text(value)
        elif isinstance(value, bytes | bytearray):
            event_dict[key] = f"<{len(value)} bytes>"
        elif isinstance(value, dict):
            event_dict[key] = {
                k: (REDACTED if str(k).lower() in PHI_KEYS else v) for k, v in value.items()
            }
    return event_dict


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact_phi,
    ]


_LEVELS = logging.getLevelNamesMapping()


def _filter_by_level(
    logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Drop a line below its logger's level, as the standard library sets it (the root's
    level, or one set for a module: a test turns one module's debug lines on)."""
    level = _LEVELS.get(method.upper(), logging.ERROR if method == "exception" else 0)
    if not logger.stdlib.isEnabledFor(level):
        raise structlog.DropEvent
    return event_dict


def _add_logger_name(
    logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """The ``logger`` field: the module's name for our own lines, the standard library
    logger's for the others (Twisted's, a library's)."""
    record = event_dict.get("_record")
    event_dict["logger"] = record.name if record is not None else getattr(logger, "name", "")
    return event_dict


class _Lines:
    """The one stream every log line goes to, a whole line per write, in the order written:
    structlog's lines and the standard library's share this lock."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.lock = threading.Lock()
        self.failed = False

    def write(self, line: str) -> None:
        """Never raises: a log stream that is gone (closed, a broken pipe) must not stop
        the engine. Said once on the process's own stderr, as the standard library says
        it for each record."""
        with self.lock:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError) as exc:
                if not self.failed:
                    self.failed = True
                    stderr = sys.__stderr__
                    with contextlib.suppress(OSError, ValueError, AttributeError):
                        if stderr is not None:
                            stderr.write(f"labrelay: log lines cannot be written "
                                         f"({type(exc).__name__}: {exc}); they are dropped\n")


class _LineLogger:
    """What structlog hands a rendered line to: our own lines skip the standard library's
    records, handlers and formatter (half the cost of a line, and the engine writes two
    for every message it applies)."""

    def __init__(self, name: str, lines: _Lines) -> None:
        self.name = name
        self._lines = lines
        # its level, as the standard library holds it (the root's, unless set for it)
        self.stdlib = logging.getLogger(name or None)

    def msg(self, message: str) -> None:
        self._lines.write(message)

    debug = info = warning = warn = error = critical = exception = fatal = msg


class _LineHandler(logging.Handler):
    """The standard library's records (Twisted, libraries), rendered by structlog's
    formatter, to the same lines."""

    def __init__(self, lines: _Lines) -> None:
        super().__init__()
        self._lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - as logging.StreamHandler does
            self.handleError(record)
            return
        self._lines.write(line)


def configure_logging(
    log_format: str = "auto", level: int = logging.INFO, stream: Any = None, *,
    cache_loggers: bool = False,
) -> None:
    """Configure structlog and stdlib logging (Twisted's log is routed through it).

    The engine (`labrelay run`) logs to stdout; other commands log to stderr so their
    own output stays clean for pipes. ``cache_loggers``: each module's logger is built
    once, not again for every line (the engine logs a few lines per message); off by
    default so that ``structlog.testing.capture_logs`` sees every logger in tests.
    """
    global _ACTIVE
    stream = stream if stream is not None else sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()
    use_json = log_format == "json" or (log_format == "auto" and not tty)
    _ACTIVE = ("json" if use_json else "console", level, stream is sys.stdout)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=tty)
    )
    lines = _Lines(stream)
    structlog.configure(
        processors=[_filter_by_level, *_shared_processors(), renderer],
        logger_factory=lambda name="", *_args: _LineLogger(name, lines),
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=cache_loggers,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    # Our lines carry no source file, line, thread or process: the standard library need
    # not look them up for every record (its documented optimisations).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = _LineHandler(lines)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Library chatter that says nothing to an operator.
    for noisy in ("alembic", "sqlalchemy", "hpack", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def route_twisted_logs() -> None:
    """Send Twisted's log events to the standard library logger `twisted`."""
    from twisted.logger import ILogObserver, STDLibLogObserver, globalLogBeginner

    observer = ILogObserver(STDLibLogObserver(name="twisted"))
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def worker_logging_setup() -> tuple[str, int, bool]:
    """Arguments for :func:`configure_worker_logging` in a child process."""
    return _ACTIVE


def configure_worker_logging(log_format: str, level: int, to_stdout: bool) -> None:
    """Process-pool initializer: report workers log like the engine, PHI filter included."""
    configure_logging(log_format, level, stream=sys.stdout if to_stdout else sys.stderr)
