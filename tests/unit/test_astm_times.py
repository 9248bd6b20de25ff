"""ASTM timestamps with a time-zone offset: a garbled offset is "no time", never an error
that rejects the message or a value the database refuses or cannot give back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from drivers.astm.generic import GenericASTMDriver, parse_astm_datetime


@pytest.mark.parametrize("offset", ["+1400", "-1400", "+0530", "-0000", "+0945"])
def test_a_real_offset_is_kept(offset: str) -> None:
    moment = parse_astm_datetime(f"20250301101000{offset}")
    sign = -1 if offset[0] == "-" else 1
    assert moment == datetime(2025, 3, 1, 10, 10, tzinfo=timezone(
        sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5]))))


@pytest.mark.parametrize("text", [
    "20250301101000+1401",  # past +14:00
    "20250301101000+1600",  # PostgreSQL refuses past 15:59
    "20250301101000-1559",
    "20250301101000+2500",  # Python refuses 24 h
    "20250301101000+9999",
    "20250301101000+0070",  # no such minute
    "99991231235959-1400",  # year 10000 in UTC
    "00010101000000+0100",  # year 0 in UTC
])
def test_a_garbled_offset_is_no_time(text: str) -> None:
    assert parse_astm_datetime(text) is None


def test_the_edges_of_the_calendar_that_fit_in_utc_are_kept() -> None:
    assert parse_astm_datetime("99991231235959+0100") == datetime(
        9999, 12, 31, 22, 59, 59, tzinfo=UTC)
    assert parse_astm_datetime("00010101000000-0100") == datetime(1, 1, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("stamp", ["20250301101000+2500", "99991231235959-1500",
                                   "20250301101000+1600"])
def test_a_message_with_a_garbled_offset_decodes_without_its_times(stamp: str) -> None:
    raw = (f"H|\\^&|||AN^1|||||host||P|1|{stamp}\rP|1\r"
           "O|1|S-1||^^^GLU|R||||||N||||||||||||||F\r"
           f"R|1|^^^GLU|5.4|mmol/L||||F||OP||{stamp}|E1\rL|1|N\r").encode()
    message = GenericASTMDriver().decode(raw)
    (specimen,) = message.specimens
    (observation,) = specimen.observations
    assert observation.value_text == "5.4" and observation.observed_at is None
    assert message.sent_at is None
