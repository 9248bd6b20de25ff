"""The engine <-> ingest process wire format (engine.ingest_process): frames survive any
split into reads, oversized or malformed frames are refused with a clear error, and an
outcome (IngestResult) crosses intact, replies and log lines included."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.ingest_process import (
    MAX_HEADER,
    FrameReader,
    encode_frame,
    result_frame,
    result_from_frame,
)
from engine.pipeline import IngestResult

HEADERS = st.dictionaries(st.text(max_size=8),
                          st.one_of(st.integers(), st.text(max_size=20), st.booleans()),
                          max_size=5)


@given(frames=st.lists(st.tuples(HEADERS, st.binary(max_size=300)), min_size=1, max_size=6),
       cuts=st.lists(st.integers(0, 4000), max_size=10))
def test_frames_come_out_whole_however_the_bytes_are_split(
        frames: list[tuple[dict[str, object], bytes]], cuts: list[int]) -> None:
    data = b"".join(encode_frame(h, p) for h, p in frames)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    reader = FrameReader()
    out = []
    for start, end in itertools.pairwise(points):
        out += reader.feed(data[start:end])
    assert out == frames


def test_an_oversized_frame_is_refused() -> None:
    with pytest.raises(ValueError, match="too large"):
        FrameReader().feed(struct.pack(">II", MAX_HEADER + 1, 0))


def test_a_header_that_is_not_an_object_is_refused() -> None:
    data = b"[1,2]"
    with pytest.raises(ValueError, match="not a JSON object"):
        FrameReader().feed(struct.pack(">II", len(data), 0) + data)


def test_an_outcome_crosses_intact() -> None:
    result = IngestResult(
        42, "HELD", "held", hold_reason="UNKNOWN_SPECIMEN", hold_detail="no sample S-1",
        kind="results", control_id="C1", original_ack_code="AE",
        outgoing=[b"H|\\^&\rL|1|N\r", b"\x00\xff binary"], specimen_ids=("S-1", "S-2"),
        logs=[("message.applied", {"interface": "x", "message_id": 42})])
    frame = result_frame(7, result, {"batches": 1})
    [(header, payload)] = FrameReader().feed(frame)
    assert header["id"] == 7 and header["writer"] == {"batches": 1}
    assert result_from_frame(header, payload) == result
