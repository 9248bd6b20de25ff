"""`labrelay samples`: move samples along their lifecycle, show, trace, find overdue ones."""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timedelta
from typing import Any

import click

from engine.cli import CliState, config_option, database_option, pass_state

_DURATION = re.compile(r"\s*(\d{1,6})\s*([smhd])\s*")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_DONE = {"collect": "collected", "dispatch": "dispatched", "receive": "received"}


def _default_user() -> str:
    return os.environ.get("USER", "") or "unknown"


def parse_duration(text: str) -> timedelta:
    """`90s`, `30m`, `2h`, `3d` -> timedelta."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise click.BadParameter(f"{text!r} is not a duration like 90s, 30m, 2h or 3d")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def format_duration(delta: timedelta | None) -> str:
    if delta is None:
        return "-"
    seconds = int(delta.total_seconds())
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{sign}{days}d {hours}h"
    if hours:
        return f"{sign}{hours}h {minutes:02d}m"
    if minutes:
        return f"{sign}{minutes}m {secs:02d}s"
    return f"{sign}{secs}s"


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment is not None else "-"


@click.group("samples")
def samples_group() -> None:
    """Samples: collect, dispatch, receive; show, trace and find overdue ones."""


# ------------------------------------------------------------------ moves


def _move(state: CliState, verb: str, specimens: tuple[str, ...], location: str,
          actor: str) -> None:
    from engine.errors import LabrelayError
    from lis_bridge import lifecycle
    from lis_bridge.db import transaction
    from lis_bridge.models import Sample, SampleState
    from lis_bridge.queries import as_utc

    factory = state.sessions()
    failed = 0
    for specimen_id in specimens:
        try:
            # One transaction per tube: one bad barcode in a rack does not block the others.
            with transaction(factory) as session:
                sample = session.query(Sample).filter_by(specimen_id=specimen_id).one_or_none()
                if verb == "collect":
                    if sample is not None:
                        raise LabrelayError(
                            f"already registered: {sample.state} at "
                            f"{sample.location or 'unknown location'} since "
                            f"{_when(as_utc(sample.state_changed_at))}; nothing changed")
                    sample = Sample(specimen_id=specimen_id)
                    target = SampleState.COLLECTED
                elif sample is None:
                    raise LabrelayError("not in the LIS: check the barcode, or import its "
                                        "order first (`labrelay orders import FILE.csv`)")
                elif verb == "dispatch":
                    target = SampleState.IN_TRANSIT
                else:
                    target = SampleState.RECEIVED_AT_LAB
                before = sample.state or "(new)"
                lifecycle.transition(session, sample, target, actor=actor, location=location,
                                     note=f"labrelay samples {verb}")
        except LabrelayError as exc:
            failed += 1
            message = str(exc)
            if message.startswith(f"sample {specimen_id} "):
                message = message[len(f"sample {specimen_id} "):]
            click.echo(f"FAILED  {specimen_id}: {message}", err=True)
            continue
        click.echo(f"ok      {specimen_id}: {before} -> {target} at {location}")
    done = len(specimens) - failed
    if failed:
        raise click.ClickException(
            f"{failed} of {len(specimens)} specimen(s) not {_DONE[verb]} (see FAILED lines "
            f"above); {done} moved. Fix those and run the command again for them only."
        )
    click.echo(f"{done} specimen(s) {_DONE[verb]}")


def _move_command(verb: str, summary: str, example: str) -> None:
    @samples_group.command(verb, help=f"{summary}\n\n\b\nExample:\n  {example}")
    @click.argument("specimens", nargs=-1, required=True, metavar="SPECIMEN...")
    @click.option("--location", required=True, metavar="NAME",
                  help="Where this happens (ward, courier, lab bench).")
    @click.option("--by", "actor", default=_default_user, show_default="$USER",
                  help="Who does it (recorded in the audit trail).")
    @config_option
    @database_option
    @pass_state
    def command(state: CliState, specimens: tuple[str, ...], location: str,
                actor: str) -> None:
        _move(state, verb, specimens, location, actor)


_move_command(
    "collect",
    "Register specimens as collected (for tubes drawn without an imported order).",
    "labrelay samples collect S1001 S1002 --location 'Ward 7' --by nurse.kim",
)
_move_command(
    "dispatch",
    "Mark collected specimens as sent to the laboratory (COLLECTED -> IN_TRANSIT).",
    "labrelay samples dispatch S1001 S1002 --location 'courier van 2' --by driver.lee",
)
_move_command(
    "receive",
    "Mark specimens as received at the laboratory (-> RECEIVED_AT_LAB).",
    "labrelay samples receive S1001 S1002 --location 'central lab' --by tech.ono",
)


# ------------------------------------------------------------------ show


def _print_detail(detail: Any) -> None:
    click.echo(f"specimen {detail.specimen_id}: {detail.state} at "
               f"{detail.location or 'unknown location'} since "
               f"{_when(detail.state_changed_at)}")
    click.echo(f"  collected: {_when(detail.collected_at)}")
    if detail.patient is not None:
        p = detail.patient
        born = p.birth_date.isoformat() if p.birth_date else "unknown"
        click.echo(f"  patient:   {p.name} ({p.patient_id}), sex {p.sex}, born {born}")
    else:
        click.echo("  patient:   none linked (no order imported)")
    if detail.held_messages:
        click.echo(f"  HELD MESSAGES ({len(detail.held_messages)}): results waiting, not applied")
        for m in detail.held_messages:
            click.echo(f"    #{m.message_id} {_when(m.received_at)} {m.interface} "
                       f"{m.hold_reason}: {m.hold_detail}")
        click.echo("    after fixing the cause: labrelay messages reprocess")
    click.echo("  tests:")
    if not detail.ordered_tests:
        click.echo("    none ordered")
    results = {r.test_code: r for r in detail.results}
    for test in detail.ordered_tests:
        result = results.pop(test.test_code, None)
        click.echo(f"    {test.test_code:<10} {test.status:<12} {_result_text(result)}")
    for result in results.values():  # results without an order (should not happen)
        click.echo(f"    {result.test_code:<10} {'(unordered)':<12} {_result_text(result)}")
    if detail.reports:
        click.echo("  reports:")
        for rep in detail.reports:
            mark = " (superseded)" if rep.superseded else ""
            click.echo(f"    v{rep.version} {_when(rep.created_at)} {rep.path} "
                       f"sha256 {rep.sha256[:16]}...{mark}")


def _result_text(result: Any) -> str:
    if result is None:
        return "-"
    if result.status == "X":
        return "not done (analyzer: cannot be done)"
    value = f"{result.comparator}{result.value_text}"
    parts = [value]
    if result.units:
        parts.append(result.units)
    if result.reference_range:
        parts.append(f"[{result.reference_range}]")
    if result.flag and result.flag != "N":
        parts.append(result.flag)
    if result.is_critical:
        parts.append("CRITICAL")
    if result.status in ("P", "C"):
        parts.append({"P": "(preliminary)", "C": "(corrected)"}[result.status])
    if result.history_count:
        parts.append(f"({result.history_count} earlier value(s))")
    return " ".join(parts)


@samples_group.command("show")
@click.argument("specimen_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--by", "actor", default=_default_user, show_default="$USER",
              help="Who is reading (patient data: the read is audited).")
@config_option
@database_option
@pass_state
def show_cmd(state: CliState, specimen_id: str, as_json: bool, actor: str) -> None:
    """Show one sample: state, patient, tests, results, reports, held messages (audited).

    \b
    Examples:
      labrelay samples show S1001
      labrelay samples show S1001 --json --by jsmith
    """
    from lis_bridge.db import transaction
    from lis_bridge.queries import record_access, sample_detail

    with transaction(state.sessions()) as session:
        detail = sample_detail(session, specimen_id)
        if detail is None:
            raise click.ClickException(
                f"specimen {specimen_id} is not in the LIS: check the barcode, or import its "
                "order (`labrelay orders import FILE.csv`)")
        record_access(session, actor, "sample.show", "sample", specimen_id,
                      "labrelay samples show" + (" --json" if as_json else ""))
    if as_json:
        click.echo(json.dumps(detail.to_dict(), indent=2))
    else:
        _print_detail(detail)


# ------------------------------------------------------------------ trace


@samples_group.command("trace")
@click.argument("specimen_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@config_option
@database_option
@pass_state
def trace_cmd(state: CliState, specimen_id: str, as_json: bool) -> None:
    """Show where a sample has been: every move, who did it, where, and how long it took.

    \b
    Example:
      labrelay samples trace S1001
    """
    from lis_bridge.queries import sample_trace

    with state.sessions()() as session:
        steps = sample_trace(session, specimen_id)
    if not steps:
        raise click.ClickException(
            f"specimen {specimen_id} has no history: it is not in the LIS (check the barcode)")
    if as_json:
        click.echo(json.dumps([s.to_dict() for s in steps], indent=2))
        return
    click.echo(f"specimen {specimen_id}:")
    click.echo(f"  {'when':<23} {'after':>8}  {'move':<34} {'where':<20} who")
    for step in steps:
        move = f"{step.from_state or '(new)'} -> {step.to_state}"
        line = (f"  {_when(step.at):<23} {format_duration(step.since_previous):>8}  "
                f"{move:<34} {step.location or '-':<20} {step.actor}")
        if step.note:
            line += f"  ({step.note})"
        click.echo(line)


# ------------------------------------------------------------------ overdue


@samples_group.command("overdue")
@click.option("--older-than", "older_than", default="2h", show_default=True,
              help="How long in one state counts as overdue: 90s, 30m, 2h, 3d.")
@click.option("--state", "states", multiple=True,
              type=click.Choice(["COLLECTED", "IN_TRANSIT", "RECEIVED_AT_LAB", "PROCESSING",
                                 "COMPLETED"], case_sensitive=False),
              help="Only this state (repeatable). Default: every state before REPORTED.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@config_option
@database_option
@pass_state
def overdue_cmd(state: CliState, older_than: str, states: tuple[str, ...],
                as_json: bool) -> None:
    """List samples stuck in one state for too long (oldest first).

    Exit status 0 either way; the list is the answer.

    \b
    Examples:
      labrelay samples overdue --older-than 2h
      labrelay samples overdue --older-than 1d --state IN_TRANSIT
    """
    from lis_bridge.queries import OPEN_STATES, overdue_samples

    limit = parse_duration(older_than)
    wanted = tuple(s.upper() for s in states) or OPEN_STATES
    with state.sessions()() as session:
        rows = overdue_samples(session, limit, states=wanted)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in rows], indent=2))
        return
    if not rows:
        click.echo(f"no sample has been in one state for more than {older_than}")
        return
    click.echo(f"{len(rows)} sample(s) in one state for more than {older_than}:")
    click.echo(f"  {'specimen':<16} {'state':<16} {'for':>9}  {'since':<23} {'location':<20} "
               "pending tests")
    for r in rows:
        click.echo(f"  {r.specimen_id:<16} {r.state:<16} {format_duration(r.waiting):>9}  "
                   f"{_when(r.since):<23} {r.location or '-':<20} "
                   f"{' '.join(r.pending_tests) or '-'}")


def register(group: click.Group) -> None:
    group.add_command(samples_group)
