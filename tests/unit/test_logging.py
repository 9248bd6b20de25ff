"""No patient data in logs: the PHI processor removes names, birth dates, patient ids and
result values even when a caller passes them by mistake."""

from __future__ import annotations

import logging

import structlog
from structlog.testing import capture_logs

from engine.logging import configure_logging, redact_phi


def test_phi_keys_never_reach_a_log_line() -> None:
    log = structlog.get_logger("test")
    with capture_logs(processors=[redact_phi]) as events:
        log.info("lis.result.written", patient_name="Testperson Alma", birth_date="1961-04-12",
                 patient_id="PX-1001", value="6.8", sample_id="DEMO0001", interface="demo")
    (event,) = events
    for key in ("patient_name", "birth_date", "patient_id", "value"):
        assert event[key] == "[redacted]"
    assert event["sample_id"] == "DEMO0001"  # specimen ids are not patient data
    assert event["interface"] == "demo"


def test_segments_inside_free_text_are_scrubbed() -> None:
    log = structlog.get_logger("test")
    with capture_logs(processors=[redact_phi]) as events:
        log.warning("decode.failed", error="bad field in PID|1||PX-1001||Testperson^Alma||19610412"
                    "\rOBX|1|NM|K^Potassium||6.8|mmol/L", chunk=b"MSH|...PID|1||PX-1001")
    text = repr(events)
    for secret in ("PX-1001", "Testperson", "19610412", "6.8"):
        assert secret not in text
    assert events[0]["chunk"] == "<21 bytes>"


def test_astm_patient_record_in_text_is_scrubbed() -> None:
    with capture_logs(processors=[redact_phi]) as events:
        structlog.get_logger("t").info("astm.x", detail="P|1||PX-77||Doe^Jane||19800101|F")
    assert "Doe" not in repr(events) and "PX-77" not in repr(events)


def test_configured_chain_includes_the_filter(capsys: object) -> None:
    configure_logging("json", level=logging.INFO)
    structlog.get_logger("t").info("x.y", patient_name="Someone Real", sample_id="S1")
    logging.getLogger().handlers[0].flush()
    out = capsys.readouterr().err  # type: ignore[attr-defined]
    assert "Someone Real" not in out and '"sample_id": "S1"' in out


def test_a_json_line_holds_what_an_operator_reads(capsys: object) -> None:
    """Event, level, logger, timestamp and the fields passed; no source file, line, thread
    or process is looked up for it (configure_logging turns those lookups off), and a
    foreign (standard library) line is rendered the same way."""
    import json

    configure_logging("json", level=logging.INFO)
    structlog.get_logger("engine.pipeline").info("message.applied", message_id=7)
    logging.getLogger("twisted").warning("a library line")
    logging.getLogger().handlers[0].flush()
    lines = [json.loads(line) for line in
             capsys.readouterr().err.splitlines()]  # type: ignore[attr-defined]
    assert lines[0].keys() == {"event", "level", "logger", "timestamp", "message_id"}
    assert lines[0]["logger"] == "engine.pipeline" and lines[0]["message_id"] == 7
    assert lines[1]["event"] == "a library line" and lines[1]["level"] == "warning"
    assert lines[1]["logger"] == "twisted"
    assert logging._srcfile is None and not logging.logThreads


def test_levels_are_the_standard_librarys_for_each_logger(capsys: object) -> None:
    """Our lines skip the standard library's handlers, not its levels: the root's level
    holds, and a level set for one module turns its debug lines on, even for a logger
    built before (cached)."""
    configure_logging("json", level=logging.INFO, cache_loggers=True)
    log = structlog.get_logger("engine.adapters.test_levels")
    log.debug("hidden.first")
    log.info("shown.first")
    module = logging.getLogger("engine.adapters.test_levels")
    module.setLevel(logging.DEBUG)
    try:
        log.debug("shown.then")
    finally:
        module.setLevel(logging.NOTSET)
    log.debug("hidden.again")
    out = capsys.readouterr().err  # type: ignore[attr-defined]
    assert "shown.first" in out and "shown.then" in out
    assert "hidden" not in out


def test_a_log_stream_that_is_gone_never_stops_the_caller(capfd: object) -> None:
    """A closed log stream (a service manager's pipe gone, a test's capture over): lines
    are dropped, said once on stderr, and the code that logs goes on."""
    import io

    stream = io.StringIO()
    configure_logging("json", level=logging.INFO, stream=stream)
    stream.close()
    structlog.get_logger("engine.pipeline").info("message.applied", message_id=1)
    structlog.get_logger("engine.pipeline").error("still.here")
    logging.getLogger("twisted").warning("a library line")
    err = capfd.readouterr().err  # type: ignore[attr-defined]
    assert err.count("log lines cannot be written") == 1, err
