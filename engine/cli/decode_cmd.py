"""`labrelay decode`: what a driver sees in a capture, without a database or network."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from engine.errors import LabrelayError

MAX_FILE_BYTES = 64 * 1024 * 1024


def detect_protocol(data: bytes) -> str:
    """hl7 when the file starts with MSH (after blanks or an MLLP start byte), else astm."""
    head = data.removeprefix(b"\xef\xbb\xbf").lstrip(b"\x0b\r\n \t")
    return "hl7" if head[:3] == b"MSH" else "astm"


def split_file(data: bytes, protocol: str) -> tuple[list[bytes], list[str]]:
    """The messages in a capture file, and notes about the file itself."""
    if protocol == "hl7":
        from drivers.hl7.parser import split_messages

        stripped = data.replace(b"\x0b", b"").replace(b"\x1c", b"")
        return split_messages(stripped), []
    from drivers.astm.files import read_astm_file

    capture = read_astm_file(data)
    if not capture.is_astm:
        raise LabrelayError(f"not an ASTM E1381/E1394 capture: {capture.not_astm_reason}")
    notes = [p.describe() for p in capture.problems] + list(capture.notes)
    return list(capture.messages), notes


def parse_driver_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as an interface's ``driver_options``; each value is read as YAML
    (``[OBR-2, OBR-3]`` a list, ``4`` a number), safely: plain values only."""
    import yaml

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE "
                                     "(e.g. 'specimen_id_order=[OBR-2, OBR-3]')",
                                     param_hint="--option")
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise click.BadParameter(f"{pair!r}: the value is not YAML ({exc})",
                                     param_hint="--option") from exc
    return options


def decode_file(path: Path, driver_name: str = "auto", validate: bool = False,
                options: dict[str, Any] | None = None) -> dict[str, Any]:
    from drivers.registry import create_driver

    data = path.read_bytes()
    if len(data) > MAX_FILE_BYTES:
        raise LabrelayError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    protocol = detect_protocol(data)
    messages, notes = split_file(data, protocol)
    driver = create_driver(driver_name, protocol, options)
    decoded: list[dict[str, Any]] = []
    errors: list[str] = []
    for index, raw in enumerate(messages, start=1):
        try:
            message = driver.decode(raw)
        except LabrelayError as exc:
            errors.append(f"{path}#{index}: {exc}")
            continue
        item = message.to_json()
        item["file"] = str(path)
        item["index"] = index
        if validate and protocol == "hl7":
            from drivers.hl7.validate import validate_structure

            report = validate_structure(raw)
            item["validation"] = {"structure": report.structure, "version": report.version,
                                  "errors": list(report.errors),
                                  "warnings": list(report.warnings)}
        decoded.append(item)
    return {"protocol": protocol, "messages": decoded, "errors": errors, "notes": notes}


@click.command("decode")
@click.argument("files", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--driver", "driver_name", default="auto", show_default=True,
              help="Driver name (see `labrelay drivers`), or auto to pick by content.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a summary.")
@click.option("--validate", is_flag=True,
              help="HL7: also check the structure against the standard (hl7apy); slower.")
@click.option("--option", "option_pairs", multiple=True, metavar="KEY=VALUE",
              help="A driver option, as an interface's driver_options gives it (value read "
                   "as YAML); repeatable. Tries a setting on a capture before it goes in "
                   "the config.")
def decode_cmd(files: tuple[Path, ...], driver_name: str, as_json: bool, validate: bool,
               option_pairs: tuple[str, ...]) -> None:
    """Decode captured HL7 or ASTM messages and print what the driver sees.

    Needs no database and no network: this is how an interface analyst inspects a
    capture. Exits 1 when any message could not be decoded.

    \b
    Examples:
      labrelay decode ../shared/corpus/hl7/roche_cobas_pure__1.hl7 --json
      labrelay decode capture.astm --driver astm-generic
      labrelay decode new-analyzer.hl7 --validate
      labrelay decode mindray-cl.hl7 --option 'specimen_id_order=[OBR-2, OBR-3]'
    """
    options = parse_driver_options(option_pairs)
    all_messages: list[dict[str, Any]] = []
    all_errors: list[str] = []
    all_notes: list[str] = []
    for path in files:
        try:
            result = decode_file(path, driver_name, validate, options)
        except LabrelayError as exc:
            all_errors.append(f"{path}: {exc}")
            continue
        all_messages.extend(result["messages"])
        all_errors.extend(result["errors"])
        all_notes.extend(f"{path}: {n}" for n in result["notes"])
    if as_json:
        click.echo(json.dumps({"messages": all_messages, "errors": all_errors,
                               "notes": all_notes}, indent=2, ensure_ascii=False))
    else:
        for item in all_messages:
            click.echo(f"{item['file']}#{item['index']}: {item['protocol']} {item['kind']} "
                       f"{item['message_type']} from {item['sender'] or '?'} "
                       f"control id {item['control_id'] or '-'}")
            for specimen in item["specimens"]:
                click.echo(f"  specimen {specimen['specimen_id'] or '(none)'}: "
                           f"{len(specimen['observations'])} observations")
                for obs in specimen["observations"]:
                    flags = ",".join(obs["flags"])
                    click.echo(f"    {obs['code']:<16} {obs['value']:<14} {obs['units']:<10} "
                               f"{obs['reference_range']:<16} {flags:<4} {obs['status']}")
            for query in item["queries"]:
                click.echo(f"  query for {', '.join(query['specimen_ids']) or 'ALL'}")
            for warning in item["warnings"]:
                click.echo(f"  warning: {warning}")
            if "validation" in item:
                check = item["validation"]
                click.echo(f"  structure {check['structure']} v{check['version']}: "
                           f"{len(check['errors'])} errors, {len(check['warnings'])} warnings "
                           "against the standard (real analyzers often deviate)")
                for problem in check["errors"][:20]:
                    click.echo(f"    error: {problem}")
        for note in all_notes:
            click.echo(f"note: {note}", err=True)
    for error in all_errors:
        click.echo(f"error: {error}", err=True)
    if all_errors:
        raise SystemExit(1)


@click.command("drivers")
def drivers_cmd() -> None:
    """List the installed analyzer drivers (entry-point group labrelay.drivers).

    \b
    Example:
      labrelay drivers
    """
    from drivers.registry import available

    for name, target in sorted(available().items()):
        click.echo(f"{name:<20} {target}")


def register(group: click.Group) -> None:
    group.add_command(decode_cmd)
    group.add_command(drivers_cmd)
