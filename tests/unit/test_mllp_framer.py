"""MLLP framer (PROTOCOLS 75-78): every input in chunks of 1..9 bytes and byte by byte."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.errors import LocalProtocolError, RemoteProtocolError
from engine.protocols.mllp import (
    COMMIT_ACK,
    COMMIT_NAK,
    AbandonedBlock,
    BufferOverflow,
    MessageTooLarge,
    MLLPCommit,
    MLLPFramer,
    frame,
)

MSG1 = b"MSH|^~\\&|A|B|C|D|20240101||ORU^R01|1|P|2.5\rPID|1\rOBX|1|NM|GLU||5.4|mmol/L\r"
MSG2 = b"MSH|^~\\&|A|B|C|D|20240101||ORU^R01|2|P|2.5\rOBX|1|NM|K||4.1|mmol/L\r"


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def feed(framer: MLLPFramer, data: bytes, size: int) -> list[object]:
    """Feed ``data`` in chunks of ``size`` and collect every event (errors as instances)."""
    events: list[object] = []
    for chunk in chunks(data, size):
        framer.receive_data(chunk)
        while True:
            try:
                event = framer.next_message()
            except RemoteProtocolError as exc:
                events.append(exc)
                continue
            if event is None:
                break
            events.append(event)
    return events


SIZES = [*range(1, 10), 10_000]


@pytest.mark.parametrize("size", SIZES)
def test_two_blocks_any_chunking(size: int) -> None:
    # PROTOCOLS 75, 77: split across reads and several per read both work.
    stream = frame(MSG1) + frame(MSG2)
    assert feed(MLLPFramer(), stream, size) == [MSG1, MSG2]


def test_frame_bytes() -> None:
    # PROTOCOLS 75: VT + message + FS + CR.
    assert frame(b"MSH|x") == b"\x0bMSH|x\x1c\x0d"


def test_frame_refuses_mllp_bytes_in_payload() -> None:
    with pytest.raises(LocalProtocolError):
        frame(b"MSH|\x1c")
    with pytest.raises(LocalProtocolError):
        frame(b"\x0bMSH|")


@pytest.mark.parametrize("size", SIZES)
def test_garbage_between_blocks_is_tolerated(size: int) -> None:
    # PROTOCOLS 77: keep-alive newlines, CR LF and form feed between blocks.
    stream = b"\r\n" + frame(MSG1) + b"\n\n\x0c\r\n" + frame(MSG2) + b"\r\n"
    framer = MLLPFramer()
    assert feed(framer, stream, size) == [MSG1, MSG2]
    assert framer.discarded_bytes == 0


@pytest.mark.parametrize("size", SIZES)
def test_text_outside_a_block_is_discarded_and_counted(size: int) -> None:
    # PROTOCOLS 76: data not started by VT is discarded.
    stream = b"hello" + frame(MSG1) + b"junk"
    framer = MLLPFramer()
    assert feed(framer, stream, size) == [MSG1]
    assert framer.discarded_bytes == 9


@pytest.mark.parametrize("size", SIZES)
def test_missing_cr_after_fs_is_tolerated(size: int) -> None:
    # Decision documented in the module: the block is complete at FS.
    stream = b"\x0b" + MSG1 + b"\x1c" + b"\x0b" + MSG2 + b"\x1c"
    assert feed(MLLPFramer(), stream, size) == [MSG1, MSG2]


def test_message_delivered_as_soon_as_fs_arrives() -> None:
    framer = MLLPFramer()
    framer.receive_data(b"\x0b" + MSG1 + b"\x1c")
    assert framer.next_message() == MSG1
    framer.receive_data(b"\r")
    assert framer.next_message() is None


def test_partial_block_waits() -> None:
    framer = MLLPFramer()
    framer.receive_data(b"\x0b" + MSG1[:10])
    assert framer.next_message() is None
    assert framer.in_block
    framer.receive_data(MSG1[10:] + b"\x1c\r")
    assert framer.next_message() == MSG1
    assert not framer.in_block


@pytest.mark.parametrize("size", SIZES)
def test_oversized_block_raises_then_stream_continues(size: int) -> None:
    big = b"MSH|" + b"x" * 200
    stream = frame(big) + frame(MSG1)
    framer = MLLPFramer(max_message_size=100)
    events = feed(framer, stream, size)
    assert isinstance(events[0], MessageTooLarge)
    assert isinstance(events[0], RemoteProtocolError)
    assert "100 bytes" in str(events[0])
    assert events[1:] == [MSG1]


def test_exactly_max_size_is_accepted() -> None:
    framer = MLLPFramer(max_message_size=len(MSG1))
    assert feed(framer, frame(MSG1), 3) == [MSG1]


@pytest.mark.parametrize("size", [1, 4, 9])
def test_abandoned_block_is_reported_and_next_block_read(size: int) -> None:
    stream = b"\x0b" + MSG1[:20] + frame(MSG2)
    events = feed(MLLPFramer(), stream, size)
    assert isinstance(events[0], AbandonedBlock)
    assert events[1:] == [MSG2]


def test_buffer_bounded_without_any_vt() -> None:
    # The buffer is bounded even when no VT ever arrives: outside a block nothing is kept.
    framer = MLLPFramer(max_message_size=100)
    for _ in range(1000):
        framer.receive_data(b"A" * 1000)
    assert framer.buffered_bytes == 0
    assert framer.next_message() is None


def test_block_without_fs_is_bounded() -> None:
    framer = MLLPFramer(max_message_size=100)
    framer.receive_data(b"\x0b")
    for _ in range(50):
        framer.receive_data(b"A" * 64)
    assert framer.buffered_bytes <= 100
    with pytest.raises(MessageTooLarge):
        framer.next_message()


def test_unread_messages_are_bounded() -> None:
    framer = MLLPFramer(max_message_size=100, max_buffer_size=250)
    with pytest.raises(BufferOverflow):
        for _ in range(10):
            framer.receive_data(frame(b"MSH|" + b"y" * 90))


@pytest.mark.parametrize("size", SIZES)
def test_r2_commit_blocks(size: int) -> None:
    # PROTOCOLS 78: MLLP release 2 commit ACK / NAK blocks.
    stream = COMMIT_ACK + frame(MSG1) + COMMIT_NAK
    assert feed(MLLPFramer(), stream, size) == [
        MLLPCommit(ok=True),
        MSG1,
        MLLPCommit(ok=False),
    ]


def test_commit_constants() -> None:
    assert COMMIT_ACK == b"\x0b\x06\x1c\x0d"
    assert COMMIT_NAK == b"\x0b\x15\x1c\x0d"


payloads = st.binary(max_size=300).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b""))


@given(
    messages=st.lists(payloads.filter(lambda b: b not in (b"\x06", b"\x15")), max_size=6),
    size=st.integers(min_value=1, max_value=9),
    noise=st.sampled_from([b"", b"\r\n", b"\n", b"\x0c"]),
)
def test_round_trip_property(messages: list[bytes], size: int, noise: bytes) -> None:
    # Hypothesis: any payload without VT/FS survives framing, any chunking, any noise.
    stream = noise + noise.join(frame(m) for m in messages)
    assert feed(MLLPFramer(), stream, size) == messages


@given(data=st.binary(max_size=2000), size=st.integers(min_value=1, max_value=9))
def test_arbitrary_bytes_never_crash_and_stay_bounded(data: bytes, size: int) -> None:
    framer = MLLPFramer(max_message_size=64, max_buffer_size=100_000)
    events = feed(framer, data, size)
    for event in events:
        assert isinstance(event, bytes | MLLPCommit | RemoteProtocolError)
        if isinstance(event, bytes):
            assert len(event) <= 64
    assert framer.buffered_bytes <= 64
