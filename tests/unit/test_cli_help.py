"""Every command has help text with an example; --version and --help work."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from engine import __version__
from engine.cli import main


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, command in group.commands.items():
        path = (*prefix, name)
        if isinstance(command, click.Group):
            found.extend(_commands(command, path))
        else:
            found.append(path)
    return found


def test_version_and_help() -> None:
    runner = CliRunner()
    assert __version__ in runner.invoke(main, ["--version"]).output
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for group in ("run", "db", "config", "decode", "send", "orders", "samples", "messages",
                  "mapping", "reports", "notifications", "status"):
        assert group in result.output


@pytest.mark.parametrize("path", _commands(main), ids=" ".join)
def test_every_command_has_an_example(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output, f"`labrelay {' '.join(path)} --help` shows no example"
