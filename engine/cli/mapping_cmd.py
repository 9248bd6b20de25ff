"""`labrelay mapping`: check, inspect and edit mapping files; list unmapped analyzer codes."""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import click

from engine.cli import CliState, config_option, database_option, pass_state
from engine.errors import MappingError

UNMAPPED_CODE = "UNMAPPED_CODE"  # hold reason the pipeline writes (engine.pipeline)


@click.group("mapping")
def mapping_group() -> None:
    """Check and edit analyzer mappings (analyzer codes -> LIS tests); see mappings/README.md.

    \b
    Examples:
      labrelay mapping check mappings/*.yaml
      labrelay mapping show mappings/generic_hl7.yaml --code GLU
      labrelay mapping unmapped --interface demo-hl7
    """


@mapping_group.command("check")
@click.argument("files", nargs=-1, required=True,
                type=click.Path(dir_okay=False, path_type=Path))
def check_cmd(files: tuple[Path, ...]) -> None:
    """Validate mapping files and print a summary of each; exit 1 listing every problem.

    \b
    Example:
      labrelay mapping check mappings/generic_hl7.yaml mappings/roche_cobas_c311.yaml
    """
    from engine.mapping import load_mapping

    failed = 0
    for path in files:
        try:
            mapping = load_mapping(path)
        except MappingError as exc:
            failed += 1
            click.echo(str(exc), err=True)
            continue
        tests = mapping.tests
        conversions = sum(len(t.conversions) for t in tests)
        units = sorted({t.ucum for t in tests if t.ucum})
        critical = sum(1 for t in tests if t.critical_limits)
        ranges = sum(len(t.reference_ranges) for t in tests)
        panels = sorted({t.panel for t in tests if t.panel})
        aliases = sum(len(t.aliases) for t in tests)
        click.echo(f"{path}: OK - {mapping.analyzer} ({mapping.protocol}), mapping version "
                   f"{mapping.version}")
        click.echo(f"  {len(tests)} analyzer codes (+{aliases} aliases) -> "
                   f"{len(mapping.lis_codes())} LIS tests in {len(panels)} panels")
        click.echo(f"  units: {', '.join(units) or '-'}; {conversions} unit conversions")
        click.echo(f"  {ranges} reference ranges; critical limits on {critical} tests; "
                   f"{len(mapping.ignore_codes)} codes ignored")
        for test in tests:
            limits = test.critical_limits
            if limits and not any(not c.sex and c.age_min is None and c.age_max is None
                                  for c in limits):
                click.echo(f"  note: tests.{test.analyzer_code}.critical has no entry for "
                           "everyone (without sex and ages): a patient no entry matches, or "
                           f"of unknown sex or age, gets no critical limits for {test.test_code}")
    if failed:
        raise SystemExit(1)


@mapping_group.command("show")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--code", "code", default=None, metavar="CODE",
              help="An analyzer code as the analyzer sends it (e.g. 685/ or WBC).")
def show_cmd(file: Path, code: str | None) -> None:
    """Show how one analyzer code maps (or, without --code, every code in the file).

    \b
    Examples:
      labrelay mapping show mappings/roche_cobas_c311.yaml --code 685/
      labrelay mapping show mappings/generic_hl7.yaml
    """
    from engine.mapping import load_mapping

    mapping = load_mapping(file)
    if code is None:
        for test in mapping.tests:
            aliases = f" (aliases: {', '.join(test.aliases)})" if test.aliases else ""
            click.echo(f"{test.analyzer_code} -> {test.test_code}  {test.name}  "
                       f"[{test.panel or '-'}] {test.ucum}{aliases}")
        for ignored in mapping.ignore_codes:
            click.echo(f"{ignored} -> (ignored)")
        return
    found = mapping.find(code)
    if found is None:
        if mapping.is_ignored(code):
            click.echo(f"{code}: ignored on purpose (listed under ignore: in {file})")
            return
        raise click.ClickException(
            f"{code} is not mapped in {file}; add it with `labrelay mapping set {file} "
            f"--code {code} --test <LIS code> --units <UCUM unit>`"
        )
    test = found
    click.echo(f"analyzer code: {code}  (entry tests.{test.analyzer_code}, line {test.line})")
    if test.aliases:
        click.echo(f"aliases:       {', '.join(test.aliases)}")
    click.echo(f"LIS test:      {test.test_code}  {test.name}")
    click.echo(f"panel:         {test.panel or '-'}")
    click.echo(f"units:         {test.ucum or '(none)'}"
               + (f"; also accepted as sent: {', '.join(test.accepted_units)}"
                  if test.accepted_units else ""))
    for conversion in test.conversions:
        offset = f" + {conversion.offset}" if conversion.offset else ""
        click.echo(f"  convert:     {conversion.from_units} x {conversion.factor}{offset} "
                   f"-> {test.ucum}")
    click.echo(f"decimals:      {test.decimals if test.decimals is not None else 'as sent'}")
    source = "mapping" if test.prefer_mapping_range else "analyzer's, else mapping"
    click.echo(f"ranges ({source}):")
    for band in test.reference_ranges:
        click.echo(f"  {_who(band)}: {band.display(test.decimals)}")
    if not test.reference_ranges:
        click.echo("  (none)")
    if len(test.critical_limits) == 1 and not test.by_patient:
        only = test.critical_limits[0]
        click.echo(f"critical:      low {_or_dash(only.low)}, high {_or_dash(only.high)}")
    else:
        click.echo("critical:" if test.critical_limits else "critical:      (none)")
        for band in test.critical_limits:
            click.echo(f"  {_who(band)}: low {_or_dash(band.low)}, high {_or_dash(band.high)}")
    order = mapping.analyzer_codes_for([test.test_code])
    click.echo(f"ordered as:    {order[0] if order else '-'}")


def _who(band: Any) -> str:
    """Whom a range or a set of critical limits is for: 'female, age 0-0.08 y'."""
    who = {"M": "male", "F": "female"}.get(band.sex, "any sex")
    if band.age_min is not None or band.age_max is not None:
        who += (f", age {band.age_min if band.age_min is not None else 0}-"
                f"{band.age_max if band.age_max is not None else ''} y")
    return who


def _or_dash(value: Any) -> str:
    return "-" if value is None else str(value)


# --------------------------------------------------------------------------- set


def _decimal_option(_ctx: click.Context, _param: click.Parameter, value: str | None
                    ) -> Decimal | None:
    if value is None:
        return None
    try:
        number = Decimal(value)
    except InvalidOperation as exc:
        raise click.BadParameter(f"expected a number, got {value!r}") from exc
    if not number.is_finite():
        raise click.BadParameter(f"expected a finite number, got {value!r}")
    return number


def _yaml_number(value: Decimal) -> Any:
    if value == value.to_integral_value() and "." not in str(value) and "E" not in str(value):
        return int(value)
    return float(value)


@mapping_group.command("set")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--code", required=True, metavar="CODE", help="Analyzer code (e.g. GLU, 685).")
@click.option("--test", "test_code", required=True, metavar="LIS_CODE", help="LIS test code.")
@click.option("--units", default=None, metavar="UCUM", help="UCUM unit the LIS stores.")
@click.option("--name", default=None, help="Display name on reports.")
@click.option("--panel", default=None, help="Report panel (e.g. Chemistry).")
@click.option("--decimals", type=click.IntRange(0, 8), default=None, help="Decimals to keep.")
@click.option("--critical-low", callback=_decimal_option, default=None, metavar="N")
@click.option("--critical-high", callback=_decimal_option, default=None, metavar="N")
def set_cmd(
    file: Path,
    code: str,
    test_code: str,
    units: str | None,
    name: str | None,
    panel: str | None,
    decimals: int | None,
    critical_low: Decimal | None,
    critical_high: Decimal | None,
) -> None:
    """Add or change the entry for one analyzer code, keeping comments and key order.

    The edited file is validated before it is written (atomically); an edit that would make
    the mapping invalid is refused and the file is left as it was.

    \b
    Examples:
      labrelay mapping set mappings/generic_hl7.yaml --code GLUC --test GLU --units mmol/L
      labrelay mapping set mappings/roche_cobas_c311.yaml --code 717 --test GLU \\
          --panel Chemistry --critical-low 2.5 --critical-high 25
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    from engine.mapping import load_mapping, load_mapping_text

    code = code.strip()
    if not code or not test_code.strip():
        raise click.BadParameter("--code and --test must not be empty")
    current = load_mapping(file)  # refuse to edit a file that is already broken
    existing = current.find(code)
    entry_key = existing.analyzer_code if existing is not None else code

    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 100
    # The shipped files indent lists under their key ("  - item"); keep that layout.
    yaml.indent(mapping=2, sequence=4, offset=2)
    text = file.read_text(encoding="utf-8")
    document = yaml.load(text)
    tests = document.get("tests")
    if tests is None:
        tests = CommentedMap()
        document["tests"] = tests
    key = next((k for k in tests if str(k) == entry_key), None)
    if key is None:
        key = entry_key
        tests[key] = CommentedMap()
    entry = tests[key]
    if entry is None:
        entry = tests[key] = CommentedMap()
    entry["test"] = test_code.strip()
    if name is not None:
        entry["name"] = name
    if panel is not None:
        entry["panel"] = panel
    if units is not None:
        unit_block = entry.get("units")
        if unit_block is None:
            entry["units"] = CommentedMap([("ucum", units)])
        else:
            unit_block["ucum"] = units
    if decimals is not None:
        entry["decimals"] = decimals
    if critical_low is not None or critical_high is not None:
        critical = entry.get("critical")
        if critical is not None and not isinstance(critical, dict):
            raise click.ClickException(
                f"{file}: tests.{entry_key}.critical is a list of limits by sex and age; edit "
                "that list in the file (then `labrelay mapping check` it)")
        if critical is None:
            critical = entry["critical"] = CommentedMap()
        if critical_low is not None:
            critical["low"] = _yaml_number(critical_low)
        if critical_high is not None:
            critical["high"] = _yaml_number(critical_high)

    buffer = io.StringIO()
    yaml.dump(document, buffer)
    new_text = buffer.getvalue()
    try:
        load_mapping_text(new_text, file)
    except MappingError as exc:
        raise click.ClickException(f"edit refused, {file} is unchanged:\n{exc}") from exc
    _write_atomically(file, new_text)
    action = "changed" if existing is not None else "added"
    click.echo(f"{file}: {action} tests.{entry_key} -> {test_code.strip()} (validated)")


def _write_atomically(path: Path, text: str) -> None:
    mode = path.stat().st_mode & 0o777
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp_name, mode)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- unmapped


@dataclass
class _Seen:
    code: str
    interface: str
    count: int = 0
    first: datetime | None = None
    last: datetime | None = None
    message_ids: list[int] = field(default_factory=list)


@mapping_group.command("unmapped")
@click.option("--interface", "interface", default=None, metavar="NAME",
              help="Only messages received on this interface.")
@click.option("--samples", default=3, show_default=True, type=click.IntRange(1, 50),
              help="Message ids to show per code.")
@config_option
@database_option
@pass_state
def unmapped_cmd(state: CliState, interface: str | None, samples: int) -> None:
    """List analyzer codes that hold messages (hold reason UNMAPPED_CODE).

    Map each code (`labrelay mapping set`) or ignore it in the mapping, then apply the held
    messages with `labrelay messages reprocess`.

    \b
    Examples:
      labrelay mapping unmapped
      labrelay mapping unmapped --interface demo-hl7 --database sqlite:///labrelay.db
    """
    from sqlalchemy import select

    from engine.mapping import parse_unmapped_detail
    from lis_bridge.models import MessageStatus, RawMessage

    query = (
        select(RawMessage.id, RawMessage.interface, RawMessage.received_at,
               RawMessage.hold_detail)
        .where(RawMessage.status == MessageStatus.HELD, RawMessage.hold_reason == UNMAPPED_CODE)
        .order_by(RawMessage.id)
    )
    if interface is not None:
        query = query.where(RawMessage.interface == interface)
    seen: dict[tuple[str, str], _Seen] = {}
    with state.sessions()() as session:
        for message_id, iface, received_at, detail in session.execute(
            query.execution_options(yield_per=500)
        ):
            for code in parse_unmapped_detail(detail or ""):
                row = seen.setdefault((code, iface), _Seen(code, iface))
                row.count += 1
                if row.first is None or received_at < row.first:
                    row.first = received_at
                if row.last is None or received_at > row.last:
                    row.last = received_at
                if len(row.message_ids) < samples:
                    row.message_ids.append(message_id)
    if not seen:
        where = f" on interface {interface}" if interface else ""
        click.echo(f"no held messages with unmapped analyzer codes{where}")
        return
    rows = sorted(seen.values(), key=lambda r: (-r.count, r.interface, r.code))
    headers = ("CODE", "INTERFACE", "COUNT", "FIRST SEEN", "LAST SEEN", "MESSAGES")
    table = [
        (r.code, r.interface, str(r.count), _when(r.first), _when(r.last),
         ", ".join(f"#{i}" for i in r.message_ids))
        for r in rows
    ]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(headers)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for line in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    total = sum(r.count for r in rows)
    click.echo(f"{len(rows)} unmapped codes in {total} code occurrences; map them with "
               "`labrelay mapping set`, then `labrelay messages reprocess`")


@mapping_group.command("reload")
@config_option
@pass_state
def reload_cmd(state: CliState) -> None:
    """Have the running engine read every interface's mapping file again.

    The next message on each interface is mapped with the file as it is now; messages
    already being applied finish with the mapping they started with. A file with a
    mistake is refused and that interface keeps the mapping it had (exit status 1). An
    interface that could not start because of its mapping is started. Transports and the
    rest of the configuration are read only at start: for those, restart the engine.
    Sending the engine SIGHUP does the same (the outcome is then in its log).

    \b
    Example:
      labrelay mapping set mappings/generic_hl7.yaml --code GLUC2 --test GLU --units mmol/L
      labrelay mapping reload --config config/labrelay.example.yaml
      labrelay messages reprocess --all-held --config config/labrelay.example.yaml
    """
    from engine.cli._admin import admin_request

    try:
        code, result = admin_request(state, "POST", "/mappings/reload", timeout=60)
    except OSError as exc:
        raise click.ClickException(
            f"the engine is not reachable on its admin address ({exc}); is `labrelay run` "
            "running with this configuration? (A stopped engine reads the mapping files "
            "when it starts.)") from exc
    if code == 401:
        raise click.ClickException(str(result.get("error", "not authorised")))
    interfaces = result.get("interfaces")
    if not isinstance(interfaces, dict):
        raise click.ClickException(f"the engine answered {code}: {result.get('error', result)}")
    for name, outcome in sorted(interfaces.items()):
        if "error" in outcome:
            click.echo(f"{name}: NOT reloaded, still using the mapping loaded before:\n  "
                       + str(outcome["error"]).replace("\n", "\n  "))
        elif outcome.get("reloaded"):
            what = "started" if outcome.get("started") else (
                "reloaded" if outcome.get("changed") else "reloaded (file unchanged)")
            click.echo(f"{name}: {what}, {outcome.get('tests', 0)} tests, "
                       f"sha256 {str(outcome.get('sha256', ''))[:16]}")
        else:
            click.echo(f"{name}: {outcome.get('detail', 'nothing to reload')}")
    click.echo(f"ingest process: {result.get('ingest_process', '-')}")
    if code != 200 or not result.get("ok"):
        raise SystemExit(1)


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment is not None else "-"


def register(group: click.Group) -> None:
    group.add_command(mapping_group)
