"""Configuration: safe loading, validation errors that name file, line, key path and the
expectation; the example config is valid as shipped."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import load_config, parse_config
from engine.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_example_config_is_valid_and_documents_both_listeners() -> None:
    cfg = load_config(REPO / "config" / "labrelay.example.yaml")
    names = {i.name: i for i in cfg.interfaces}
    assert names["demo-hl7"].protocol == "hl7"
    assert names["demo-hl7"].listen == "tcp:2575:interface=127.0.0.1"
    assert names["demo-astm"].protocol == "astm"
    assert all("127.0.0.1" in (i.listen or "") for i in cfg.interfaces)


def _errors(text: str, tmp_path: Path) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def test_errors_name_file_line_key_path_and_expectation(tmp_path: Path) -> None:
    message = _errors(
        "interfaces:\n"
        "  - name: chem\n"
        "    protocol: hl7\n"
        "    transport:\n"
        "      listen: tcp:2575:interface=127.0.0.1\n"
        "    limits:\n"
        "      max_connections: lots\n",
        tmp_path,
    )
    assert f"{tmp_path / 'bad.yaml'}:7: interfaces[0].limits.max_connections: expected an " \
        "integer, got a string 'lots'" in message
    assert "will not start" in message


def test_all_errors_are_reported_together(tmp_path: Path) -> None:
    message = _errors(
        "databse: sqlite:///x.db\n"
        "interfaces:\n"
        "  - name: Bad Name\n"
        "    protocol: fax\n"
        "    transport: {listen: 'tcp:2575'}\n",
        tmp_path,
    )
    assert ":1: databse: unknown key" in message
    assert "interfaces[0].name: use lower-case letters" in message
    assert "interfaces[0].protocol: expected one of hl7, astm" in message
    # A listener must say which address it binds: never every address by default
    assert "interfaces[0].transport.listen: a listener must name the address" in message


def test_transport_needs_exactly_one_kind(tmp_path: Path) -> None:
    message = _errors(
        "interfaces:\n  - name: a\n    protocol: astm\n    transport:\n"
        "      listen: tcp:5001:interface=127.0.0.1\n"
        "      serial: {device: /dev/ttyS0}\n",
        tmp_path,
    )
    assert "give exactly one of listen, connect or serial" in message


def test_serial_settings_are_validated(tmp_path: Path) -> None:
    message = _errors(
        "interfaces:\n  - name: a\n    protocol: astm\n    transport:\n"
        "      serial: {device: /dev/ttyS0, baudrate: 9601, parity: X}\n",
        tmp_path,
    )
    assert "transport.serial.baudrate: expected one of 300, 1200, 2400, 4800, 9600" in message
    assert "transport.serial.parity: expected one of N, E, O" in message


def test_environment_variables_fill_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LR_TEST_DB", "sqlite:///from-env.db")
    cfg = parse_config("database: ${LR_TEST_DB}\n", tmp_path / "c.yaml")
    assert cfg.database == "sqlite:///from-env.db"
    message = _errors("database: ${LR_TEST_MISSING_VARIABLE}\n", tmp_path)
    assert "environment variable LR_TEST_MISSING_VARIABLE is not set" in message


def test_yaml_tags_that_build_objects_are_refused(tmp_path: Path) -> None:
    message = _errors("database: !!python/object/apply:os.system ['true']\n", tmp_path)
    assert "not valid YAML" in message


def test_broken_yaml_names_the_line(tmp_path: Path) -> None:
    message = _errors("interfaces:\n  - name: a\n   protocol: [\n", tmp_path)
    assert "bad.yaml:" in message and "not valid YAML" in message


def test_missing_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"copy config/labrelay\.example\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_run_refuses_an_unreachable_database_with_a_clear_reason(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "engine", "run", "--config",
         str(REPO / "config" / "labrelay.example.yaml"),
         "--database", "postgresql+psycopg2://postgres@127.0.0.1:9/nowhere"],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
    )
    assert done.returncode == 1
    assert "cannot open the database" in done.stderr and "did not start" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_ingest_process_is_on_by_default_and_can_be_turned_off(tmp_path: Path) -> None:
    assert parse_config("{}\n", tmp_path / "c.yaml").ingest_process is True
    assert parse_config("ingest_process: false\n", tmp_path / "c.yaml").ingest_process is False
    with pytest.raises(ConfigError, match=r"c.yaml:1: ingest_process: expected"):
        parse_config("ingest_process: sometimes\n", tmp_path / "c.yaml")
