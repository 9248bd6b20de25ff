"""`labrelay mapping reload` (and SIGHUP) against a running engine: the interface analyst's
fix for an unmapped code without a restart. A real `labrelay run` with its ingest process
on 127.0.0.1, python-hl7's `mllp_send` as the analyzer, the CLI as the analyst runs it.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select
from twisted.trial import unittest

from engine.cli import main as cli
from engine.pipeline import InterfaceRuntime, load_runtime, reload_mappings
from lis_bridge.db import make_engine, session_factory
from lis_bridge.models import MessageStatus, RawMessage, Result
from tests.integration.enginerun import REPO, free_port, running_engine
from tests.integration.test_engine_hl7_e2e import import_orders, mllp_send

pytestmark = pytest.mark.slow

TOKEN = "reload-test-token"  # a test engine on 127.0.0.1


def write_config(tmp_path: Path, port: int, admin_port: int, mapping: Path) -> Path:
    config = tmp_path / "labrelay.yaml"
    config.write_text(
        f"""
database: sqlite:///unused.db
interfaces:
  - name: reload-hl7
    protocol: hl7
    driver: hl7-generic
    mapping: {mapping}
    transport:
      listen: tcp:{port}:interface=127.0.0.1
    allowlist: [127.0.0.1]
admin:
  listen: tcp:{admin_port}:interface=127.0.0.1
  token: {TOKEN}
reports:
  output_dir: {tmp_path / 'reports'}
  signing_key: reload-signing-key-0123456789abcdef
"""
    )
    return config


def oru(path: Path, control_id: str, specimen_id: str, code: str, value: str) -> Path:
    path.write_bytes(
        ("\r".join([
            f"MSH|^~\\&|DEMOANALYZER|CHEM1|LABRELAY|LAB|20250303101500||ORU^R01^ORU_R01|"
            f"{control_id}|P|2.5.1",
            "PID|1||PX-TEST",
            f"OBR|1|{specimen_id}|{specimen_id}|CHEM^Chemistry panel",
            f"OBX|1|NM|{code}^Glucose, new reagent lot||{value}|mmol/L|3.9-6.1|N|||F",
        ]) + "\r").encode())
    return path


def cli_run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_a_fixed_mapping_is_taken_without_a_restart(db_url: str, tmp_path: Path) -> None:
    import_orders(db_url, "DEMO0001", "DEMO0004")
    mapping = tmp_path / "chem.yaml"
    shutil.copyfile(REPO / "mappings" / "generic_hl7.yaml", mapping)
    port, admin_port = free_port(), free_port()
    config = write_config(tmp_path, port, admin_port, mapping)
    with running_engine(config, db_url, tmp_path) as engine:
        # an analyzer code the mapping does not know: stored, HELD, AE
        output = mllp_send(port, oru(tmp_path / "a.hl7", "RL-1", "DEMO0004", "GLUX", "5.4"))
        assert "MSA|AE|RL-1" in output and "UNMAPPED_CODE" in output

        code, text = cli_run("mapping", "set", str(mapping), "--code", "GLUX", "--test", "GLU",
                             "--units", "mmol/L")
        assert code == 0, text
        code, text = cli_run("mapping", "reload", "--config", str(config))
        assert code == 0, text
        assert "reload-hl7: reloaded, 23 tests" in text
        assert "ingest process: reloaded" in text
        # `labrelay status` says which version of the file is in use
        digest = hashlib.sha256(mapping.read_bytes()).hexdigest()
        code, text = cli_run("status", "--config", str(config), "--database", db_url)
        assert code == 0, text
        assert f"mapping {digest[:16]}" in text
        # the next message is mapped with the file as it is now, by the ingest process
        output = mllp_send(port, oru(tmp_path / "b.hl7", "RL-2", "DEMO0001", "GLUX", "5.9"))
        assert "MSA|AA|RL-2" in output

        # a mistake in the file: refused with the line, the mapping in use is kept
        with mapping.open("a") as stream:
            stream.write("tests: [\n")
        code, text = cli_run("mapping", "reload", "--config", str(config))
        assert code == 1, text
        assert "reload-hl7: NOT reloaded, still using the mapping loaded before" in text
        assert "not valid YAML" in text and f"{mapping}:" in text
        output = mllp_send(port, oru(tmp_path / "c.hl7", "RL-3", "DEMO0001", "GLUX", "6.0"))
        assert "MSA|AA|RL-3" in output  # still served, with the mapping that has GLUX

        # SIGHUP does the same; the outcome is in the log
        engine.process.send_signal(signal.SIGHUP)
        done = engine.wait_for("mapping.reload.done", count=3)
        assert engine.events("mapping.reload.done")[-1]["failed"] == ["reload-hl7"]
        assert done["ok"] is True  # the first one, after the fix
        assert engine.stop() == 0

    # the held message applies with the new mapping (the CLI reads the file as it is:
    # repaired first)
    text = mapping.read_text().replace("tests: [\n", "")
    mapping.write_text(text)
    code, output = cli_run("messages", "reprocess", "--all-held", "--config", str(config),
                           "--database", db_url)
    assert code == 0, output
    assert output.strip().endswith(": APPLIED")  # the one held message
    sessions = session_factory(make_engine(db_url))
    with sessions() as session:
        statuses = [r.status for r in session.scalars(select(RawMessage).order_by(RawMessage.id))]
        assert statuses == [MessageStatus.APPLIED] * 3
        assert session.scalar(select(func.count()).select_from(Result)) >= 3
    log_text = "".join(engine.raw_lines)
    # no patient data in the log: not the patient id, not a value as the message holds it
    # (a bare "5.9" can be part of a timestamp)
    assert "PX-TEST" not in log_text and "|5.9|" not in log_text
    assert not any(line.get("value") or line.get("value_text") for line in engine.lines)


def test_an_interface_that_could_not_start_starts_on_reload(db_url: str,
                                                            tmp_path: Path) -> None:
    import_orders(db_url, "DEMO0001")
    mapping = tmp_path / "chem.yaml"
    mapping.write_text("tests:\n  GLU: {test: GLU, units: {ucum: mmol/L}\n")  # unclosed
    port, admin_port = free_port(), free_port()
    config = write_config(tmp_path, port, admin_port, mapping)
    with running_engine(config, db_url, tmp_path) as engine:
        assert engine.events("engine.started")[0]["failed"] == ["reload-hl7"]
        code, text = cli_run("mapping", "reload", "--config", str(config))
        assert code == 1 and "reload-hl7: NOT reloaded" in text, text

        shutil.copyfile(REPO / "mappings" / "generic_hl7.yaml", mapping)
        code, text = cli_run("mapping", "reload", "--config", str(config))
        assert code == 0, text
        assert "reload-hl7: started, 22 tests" in text
        engine.wait_for("interface.started")
        output = mllp_send(port, REPO / "fixtures" / "oru_DEMO0001.hl7")
        assert "MSA|AA|DEMO-0001" in output
        assert engine.stop() == 0


def test_reload_without_a_running_engine_says_so(tmp_path: Path) -> None:
    mapping = REPO / "mappings" / "generic_hl7.yaml"
    config = write_config(tmp_path, free_port(), free_port(), mapping)
    code, text = cli_run("mapping", "reload", "--config", str(config))
    assert code == 1
    assert "the engine is not reachable on its admin address" in text


def test_a_reload_gives_new_runtimes_and_keeps_the_old_one_on_a_mistake(tmp_path: Path) -> None:
    from engine.config import load_config

    mapping = tmp_path / "chem.yaml"
    shutil.copyfile(REPO / "mappings" / "generic_hl7.yaml", mapping)
    config = load_config(write_config(tmp_path, free_port(), free_port(), mapping))
    runtimes: dict[str, InterfaceRuntime] = {"reload-hl7": load_runtime(config.interfaces[0])}
    before = runtimes["reload-hl7"]

    outcome = reload_mappings(runtimes, config.interfaces)
    assert outcome["reload-hl7"]["reloaded"] and not outcome["reload-hl7"]["changed"]
    # a message already taken keeps the runtime (and mapping) it started with
    assert runtimes["reload-hl7"] is not before
    assert runtimes["reload-hl7"].driver is before.driver

    mapping.write_text(mapping.read_text() + "\nbogus_key: 1\n")
    kept = runtimes["reload-hl7"]
    outcome = reload_mappings(runtimes, config.interfaces)
    assert not outcome["reload-hl7"]["reloaded"]
    assert "bogus_key" in outcome["reload-hl7"]["error"]
    assert runtimes["reload-hl7"] is kept


class IngestSilentTests(unittest.TestCase):
    """The wait for the ingest process's answer is bounded (a Clock stands in for time)."""

    def test_an_ingest_process_that_does_not_answer_is_reported(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.defer import Deferred
        from twisted.internet.task import Clock

        from engine.config import load_config
        from engine.service import RELOAD_TIMEOUT, EngineService

        clock = Clock()

        class Reactor:  # threads from the real reactor, time from the Clock
            callLater = clock.callLater
            getThreadPool = reactor.getThreadPool  # type: ignore[attr-defined]
            callFromThread = reactor.callFromThread  # type: ignore[attr-defined]

        class SilentIngest:
            def reload_mappings(self) -> Deferred[dict[str, object]]:
                # once the engine waits for the answer, let the time run out
                reactor.callLater(0, clock.advance, RELOAD_TIMEOUT + 1)  # type: ignore[attr-defined]
                return Deferred()

        tmp = Path(tempfile.mkdtemp(prefix="labrelay-reload-"))  # not in the work tree
        self.addCleanup(shutil.rmtree, tmp, True)
        config = load_config(write_config(tmp, free_port(), free_port(),
                                          REPO / "mappings" / "generic_hl7.yaml"))
        service = EngineService(config, "sqlite:///unused.db", Reactor())
        service.runtimes = {"reload-hl7": load_runtime(config.interfaces[0])}
        service.ingest = SilentIngest()

        def check(result: dict[str, object]) -> None:
            assert result["ok"] is False
            assert "did not answer within 30 s" in str(result["ingest_process"])

        return service.reload_mappings().addCallback(check)
