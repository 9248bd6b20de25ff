"""`labrelay send hl7|astm`: play message files to a listener as an analyzer would."""

from __future__ import annotations

import importlib

import click


@click.group("send")
def send_group() -> None:
    """Send message files to an engine or analyzer, as an instrument would."""


def register(group: click.Group) -> None:
    commands = (("engine.cli.send_hl7", "send_hl7"), ("engine.cli.send_astm", "send_astm"))
    for module, attr in commands:
        try:
            command = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        command.name = module.rsplit("_", 1)[1]
        send_group.add_command(command)
    group.add_command(send_group)
