"""ASTM E1381 / LIS01-A2 link core: every rule, fed in chunks of 1..9 bytes and byte by byte.

The core takes ``now`` explicitly, so no clock is needed here.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import LocalProtocolError
from engine.protocols.astm_link import (
    ACK,
    ENQ,
    EOT,
    NAK,
    ASTMLink,
    Contention,
    DuplicateFrame,
    Event,
    FrameAnswered,
    FrameRejected,
    Interrupted,
    LinkState,
    LinkTimeout,
    MessageReceived,
    PeerRestarted,
    SendCompleted,
    SendFailed,
    checksum,
    encode_frames,
    parse_frame,
)

H = b"H|\\^&|||ANALYZER\r"
MSG = H + b"P|1\rO|1|S1||^^^GLU\rR|1|^^^GLU|5.5|mmol/L\rL|1|N\r"


def chunkings(data: bytes) -> list[list[bytes]]:
    """Byte by byte, fixed chunk sizes 1..9 and one random split."""
    out = [[data[i : i + 1] for i in range(len(data))]]
    for size in range(2, 10):
        out.append([data[i : i + size] for i in range(0, len(data), size)])
    rnd = random.Random(len(data))
    parts, i = [], 0
    while i < len(data):
        step = rnd.randint(1, 9)
        parts.append(data[i : i + step])
        i += step
    out.append(parts)
    return out


def events(link: ASTMLink) -> list[Event]:
    found = []
    while (event := link.next_event()) is not None:
        found.append(event)
    return found


def feed(link: ASTMLink, data: bytes, now: float = 0.0, size: int = 0) -> None:
    if size <= 0:
        link.receive_data(data, now)
        return
    for i in range(0, len(data), size):
        link.receive_data(data[i : i + size], now)


def receive_session(link: ASTMLink, frames: list[bytes], now: float = 0.0) -> tuple[bytes, list]:
    """Play ENQ, frames, EOT; commit every message at once. Returns (replies, events)."""
    replies = b""
    seen: list[Event] = []
    for chunk in [bytes([ENQ]), *frames, bytes([EOT])]:
        link.receive_data(chunk, now)
        for event in events(link):
            seen.append(event)
            if isinstance(event, MessageReceived):
                link.message_committed(now)
        replies += link.data_to_send()
    return replies, seen


# ------------------------------------------------------------------ pure helpers


def test_checksum_vectors() -> None:
    # PROTOCOLS 19-21: test vectors verified against captured traffic
    assert checksum(b"7L|1\r\x03") == b"40"
    assert checksum(b"7L|1|N\r\x03") == b"0A"
    architect = (
        b"1H|\\^&|||ARCHITECT^7.01^F5260044206^H1P1O1R1C1Q1L1|||||||P|1|20120217144954\r\x03"
    )
    assert checksum(architect) == b"2A"


def test_encode_frames_splits_at_240_with_etb_and_etx() -> None:
    text = b"R|1|" + b"x" * 600 + b"\r"
    frames = encode_frames(text)
    # PROTOCOLS 12-13, 16: 240 text characters, ETB intermediate, ETX last
    assert len(frames) == 3
    assert all(f.endswith(b"\r\n") for f in frames)
    assert frames[0][-5] == 0x17 and frames[1][-5] == 0x17 and frames[2][-5] == 0x03
    assert b"".join(parse_frame(f)[1] for f in frames) == text
    assert [parse_frame(f)[0] for f in frames] == [1, 2, 3]
    assert all(parse_frame(f)[3] for f in frames)


def test_encode_frames_wraps_fn_7_to_0() -> None:
    # PROTOCOLS 18
    frames = encode_frames(b"x" * 10, first_fn=6, frame_size=2)
    assert [parse_frame(f)[0] for f in frames] == [6, 7, 0, 1, 2]


def test_encode_frames_refuses_restricted_characters() -> None:
    # PROTOCOLS 37
    with pytest.raises(LocalProtocolError, match="0x0A"):
        encode_frames(b"H|\\^&\nL|1\r")
    with pytest.raises(LocalProtocolError):
        encode_frames(b"x", frame_size=63_994)  # PROTOCOLS 13: at most 63,993


# ---------------------------------------------------------------- receiving


SESSION = b"\x05" + b"".join(encode_frames(MSG, frame_size=17)) + b"\x04"


@pytest.mark.parametrize("chunks", chunkings(SESSION))
def test_receives_message_in_any_chunking(chunks: list[bytes]) -> None:
    # PROTOCOLS 3, 12, 17, 28: frames split anywhere, joined before splitting records
    link = ASTMLink()
    got: list[MessageReceived] = []
    for chunk in chunks:
        link.receive_data(chunk, 0.0)
        for event in events(link):
            if isinstance(event, MessageReceived):
                got.append(event)
                link.message_committed(0.0)
    assert [m.text for m in got] == [MSG]
    assert got[0].complete
    assert link.state is LinkState.NEUTRAL


def test_idle_ignores_everything_but_enq() -> None:
    # PROTOCOLS 3
    link = ASTMLink()
    feed(link, b"garbage\x06\x15\x04" + encode_frames(MSG)[0])
    assert link.data_to_send() == b""
    assert link.state is LinkState.NEUTRAL
    feed(link, b"\x05")
    assert link.data_to_send() == bytes([ACK])


def test_busy_or_cannot_receive_naks_enq() -> None:
    # PROTOCOLS 4-5
    link = ASTMLink()
    link.busy = True
    feed(link, b"\x05")
    assert link.data_to_send() == bytes([NAK])
    link = ASTMLink(can_receive=False)
    feed(link, b"\x05")
    assert link.data_to_send() == bytes([NAK])


def test_bad_checksum_is_naked_and_retransmission_accepted() -> None:
    # PROTOCOLS 30(b), 24
    link = ASTMLink()
    good = encode_frames(MSG)[0]
    bad = good[:-4] + (b"00" if good[-4:-2] != b"00" else b"01") + b"\r\n"
    replies, seen = receive_session(link, [bad, good])
    assert replies == bytes([ACK, NAK, ACK])
    assert any(isinstance(e, FrameRejected) and e.reason == "checksum mismatch" for e in seen)
    assert [e.text for e in seen if isinstance(e, MessageReceived)] == [MSG]


def test_lowercase_checksum_is_a_tolerance_option() -> None:
    # PROTOCOLS 20
    text = b"1" + b"H|\\^&\rL|1\r" + b"\x03"
    cs = checksum(text)
    assert cs != cs.lower()  # the vector must contain a letter
    frame = b"\x02" + text + cs.lower() + b"\r\n"
    assert receive_session(ASTMLink(), [frame])[0] == bytes([ACK, ACK])
    strict = ASTMLink(accept_lowercase_checksum=False)
    assert receive_session(strict, [frame])[0] == bytes([ACK, NAK])


def test_repeated_fn_is_a_retransmission_acked_not_stored_twice() -> None:
    # PROTOCOLS 30: the ACK was lost, the sender repeats the frame
    frames = encode_frames(MSG, frame_size=20)
    link = ASTMLink()
    replies, seen = receive_session(link, [frames[0], frames[0], *frames[1:]])
    assert replies.count(bytes([NAK])) == 0
    assert sum(isinstance(e, DuplicateFrame) for e in seen) == 1
    assert [e.text for e in seen if isinstance(e, MessageReceived)] == [MSG]


def test_out_of_sequence_fn_is_naked() -> None:
    # PROTOCOLS 30(c)
    frames = encode_frames(MSG, frame_size=20)
    replies, _ = receive_session(ASTMLink(), [frames[0], frames[2]])
    assert replies == bytes([ACK, ACK, NAK])


def test_lenient_fn_accepts_restarting_numbers() -> None:
    # corpus:horiba_yumizen_h500__1 restarts FN; strict_fn=False accepts it
    frames = encode_frames(MSG, frame_size=20)
    renumbered = [frames[0], *encode_frames(MSG[20:], first_fn=1, frame_size=20)]
    link = ASTMLink(strict_fn=False)
    replies, seen = receive_session(link, renumbered)
    assert NAK not in replies
    assert [e.text for e in seen if isinstance(e, MessageReceived)] == [MSG]


def test_first_fn_strictness_is_optional() -> None:
    # PROTOCOLS 18: FN 1 first; tolerated otherwise unless strict_first_fn
    frames = encode_frames(MSG, first_fn=3)
    assert receive_session(ASTMLink(), frames)[0] == bytes([ACK, ACK])
    assert receive_session(ASTMLink(strict_first_fn=True), frames)[0] == bytes([ACK, NAK])


@pytest.mark.parametrize("trailer", [b"\r\n", b"\n", b"\r", b""])
def test_frame_trailer_tolerance(trailer: bytes) -> None:
    # PROTOCOLS 42: CR LF, LF only, CR only or nothing after the checksum
    frames = [f[:-2] + trailer for f in encode_frames(MSG, frame_size=30)]
    replies, seen = receive_session(ASTMLink(), frames)
    assert NAK not in replies
    assert [e.text for e in seen if isinstance(e, MessageReceived)] == [MSG]


def test_strict_trailer_requires_crlf() -> None:
    frame = encode_frames(MSG)[0]
    assert receive_session(ASTMLink(strict_trailer=True), [frame])[0] == bytes([ACK, ACK])
    replies, _ = receive_session(ASTMLink(strict_trailer=True), [frame[:-2] + b"\n"])
    assert replies == bytes([ACK, NAK])


def test_characters_outside_frames_are_ignored() -> None:
    # PROTOCOLS 29
    frames = encode_frames(MSG, frame_size=40)
    noisy = [b"noise" + f + b"\x00junk" for f in frames]
    replies, seen = receive_session(ASTMLink(), noisy)
    assert NAK not in replies
    assert [e.text for e in seen if isinstance(e, MessageReceived)] == [MSG]


def test_completing_frame_is_acked_only_after_commit() -> None:
    # DESIGN durability rule 1: the frame carrying L waits for message_committed
    frames = encode_frames(MSG, frame_size=40)
    link = ASTMLink()
    feed(link, b"\x05")
    for frame in frames[:-1]:
        feed(link, frame)
    assert link.data_to_send() == bytes([ACK]) * len(frames)  # ENQ + earlier frames
    feed(link, frames[-1])
    assert link.data_to_send() == b""
    assert link.state is LinkState.COMMIT_PENDING
    assert [e.text for e in events(link) if isinstance(e, MessageReceived)] == [MSG]
    link.message_committed(1.0)
    assert link.data_to_send() == bytes([ACK])
    assert link.state is LinkState.RECEIVING


def test_storage_failure_naks_and_retransmission_redelivers() -> None:
    # DESIGN durability rule 2: NAK, the sender resends the frame, the message comes again
    frames = encode_frames(MSG, frame_size=40)
    link = ASTMLink()
    feed(link, b"\x05" + b"".join(frames))
    assert [e.text for e in events(link) if isinstance(e, MessageReceived)] == [MSG]
    link.data_to_send()
    link.message_failed(1.0)
    assert link.data_to_send() == bytes([NAK])
    feed(link, frames[-1], 2.0)
    assert [e.text for e in events(link) if isinstance(e, MessageReceived)] == [MSG]
    link.message_committed(2.0)
    assert link.data_to_send() == bytes([ACK])


def test_several_messages_in_one_session_and_split_inside_a_field() -> None:
    # PROTOCOLS 17, 59: several H...L messages; frames split inside fields
    second = H + b"L|1|N\r"
    # FN runs continuously across both messages (PROTOCOLS 18)
    frames = encode_frames(MSG + second, frame_size=7)
    replies, seen = receive_session(ASTMLink(), frames)
    assert [e.text for e in seen if isinstance(e, MessageReceived)] == [MSG, second]
    assert NAK not in replies


def test_end_frame_with_unterminated_l_record_completes_the_message() -> None:
    # corpus:mindray_cl2000i__2 style: "L|1|N" then ETX with no CR
    body = b"1" + H + b"L|1|N" + b"\x03"
    frame = b"\x02" + body + checksum(body) + b"\r\n"
    _, seen = receive_session(ASTMLink(), [frame])
    assert [e.text for e in seen if isinstance(e, MessageReceived)] == [H + b"L|1|N\r"]


def test_leftover_without_l_is_delivered_incomplete_at_eot() -> None:
    # corpus:mindray_cl8000i__1 has no L record
    text = H + b"Q|1|^S1||ALL\r"
    _, seen = receive_session(ASTMLink(), encode_frames(text))
    received = [e for e in seen if isinstance(e, MessageReceived)]
    assert [(e.text, e.complete) for e in received] == [(text, False)]


def test_receive_timeout_discards_partial_and_returns_to_neutral() -> None:
    # PROTOCOLS 33
    frames = encode_frames(MSG, frame_size=40)
    link = ASTMLink()
    feed(link, b"\x05" + frames[0], 100.0)
    assert link.get_timer() == 130.0
    link.handle_timer(129.9)
    assert link.state is LinkState.RECEIVING
    link.handle_timer(130.0)
    assert link.state is LinkState.NEUTRAL
    seen = events(link)
    assert any(isinstance(e, LinkTimeout) for e in seen)
    assert not any(isinstance(e, MessageReceived) for e in seen)
    assert link.get_timer() is None


def test_enq_during_transfer_means_peer_restarted() -> None:
    # PROTOCOLS 36
    frames = encode_frames(MSG, frame_size=40)
    link = ASTMLink()
    replies, seen = receive_session(link, [frames[0], b"\x05", *frames])
    assert replies == bytes([ACK]) * (3 + len(frames))  # 2 ENQ, the lost frame, all again
    assert any(isinstance(e, PeerRestarted) for e in seen)
    assert [e.text for e in seen if isinstance(e, MessageReceived)] == [MSG]


def test_receiver_interrupt_sends_eot_instead_of_ack() -> None:
    # PROTOCOLS 25-26: the request is repeated until the sender stops
    frames = encode_frames(MSG, frame_size=40)
    link = ASTMLink()
    feed(link, b"\x05")
    link.data_to_send()
    link.request_interrupt()
    feed(link, frames[0])
    feed(link, frames[1])
    assert any(isinstance(e, MessageReceived) for e in events(link))
    link.message_committed(0.0)
    assert link.data_to_send() == bytes([EOT, EOT])


def test_oversized_frame_is_naked_and_buffer_bounded() -> None:
    # PROTOCOLS 13: frames up to 64,000; longer ones are NAKed, memory stays bounded
    link = ASTMLink(max_frame_size=1000)
    feed(link, b"\x05\x021" + b"x" * 5000)
    assert len(link._fbuf) <= 1000
    feed(link, b"\x03AA\r\n")
    assert link.data_to_send() == bytes([ACK, NAK])
    assert any(isinstance(e, FrameRejected) and "longer" in e.reason for e in events(link))


def test_64000_character_frame_is_accepted() -> None:
    # PROTOCOLS 13: LIS01-A2 frames up to 64,000 characters
    text = H + b"M|1|" + b"x" * (63_993 - len(H) - 4 - 6 - 1) + b"\rL|1\r"
    frames = encode_frames(text, frame_size=63_993)
    assert max(len(f) for f in frames) <= 64_002  # plus CR LF trailer
    replies, seen = receive_session(ASTMLink(), frames)
    assert NAK not in replies
    assert [e.text for e in seen if isinstance(e, MessageReceived)] == [text]


def test_garbage_never_grows_state() -> None:
    link = ASTMLink(max_frame_size=200)
    rnd = random.Random(7)
    for step in range(300):
        data = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 64)))
        link.receive_data(data, float(step))
        for event in events(link):
            if isinstance(event, MessageReceived):
                link.message_committed(float(step))
        link.handle_timer(float(step))
        assert len(link._fbuf) <= 200
    link.handle_timer(10_000.0)
    assert link.state in (LinkState.NEUTRAL, LinkState.WAIT_ENQ_REPLY)


def test_lenient_mode_raw_frames_without_fn_or_checksum() -> None:
    # PROTOCOLS 41: MAGLUMI sends STX records ETX, ACK per token, maybe no ENQ
    link = ASTMLink(lenient=True)
    feed(link, b"\x02" + MSG + b"\x03")
    seen = events(link)
    assert [e.text for e in seen if isinstance(e, MessageReceived)] == [MSG]
    link.message_committed(0.0)
    assert link.data_to_send() == bytes([ACK])
    feed(link, b"\x04")
    assert link.state is LinkState.NEUTRAL
    # without lenient mode the same frame is rejected, not parsed
    replies, seen = receive_session(ASTMLink(), [b"\x02" + MSG + b"\x03"])
    assert NAK in replies


def test_commit_without_message_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        ASTMLink().message_committed(0.0)


# ------------------------------------------------------------------ sending


def make_sender(**kwargs: object) -> ASTMLink:
    return ASTMLink(**kwargs)  # type: ignore[arg-type]


def test_send_message_full_transfer() -> None:
    # PROTOCOLS 1, 22-23, 28
    link = make_sender(frame_size=40)
    link.send_message(MSG, 0.0)
    assert link.data_to_send() == bytes([ENQ])
    assert link.get_timer() == 15.0
    feed(link, bytes([ACK]), 1.0)
    frames = encode_frames(MSG, frame_size=40)
    for frame in frames:
        assert link.data_to_send() == frame
        feed(link, bytes([ACK]), 1.0)
    assert link.data_to_send() == bytes([EOT])
    assert any(isinstance(e, SendCompleted) and e.text == MSG for e in events(link))
    assert link.state is LinkState.NEUTRAL


def test_send_message_refuses_restricted_characters() -> None:
    # PROTOCOLS 37
    with pytest.raises(LocalProtocolError, match="escape"):
        ASTMLink().send_message(b"H|\\^&\x02|\r", 0.0)


def test_fn_continues_across_messages_in_one_transfer() -> None:
    # PROTOCOLS 15, 18: each message starts a new frame; FN continues
    link = make_sender()
    link.send_message(MSG, 0.0)
    link.send_message(MSG, 0.0)
    link.data_to_send()
    feed(link, bytes([ACK]))
    first = link.data_to_send()
    feed(link, bytes([ACK]))
    second = link.data_to_send()
    assert parse_frame(first)[0] == 1 and parse_frame(second)[0] == 2
    assert parse_frame(second)[1] == MSG


def test_nak_on_enq_waits_10_seconds() -> None:
    # PROTOCOLS 4
    link = make_sender()
    link.send_message(MSG, 0.0)
    link.data_to_send()
    feed(link, bytes([NAK]), 2.0)
    assert link.state is LinkState.NEUTRAL
    assert link.get_timer() == 12.0
    link.handle_timer(11.9)
    assert link.data_to_send() == b""
    link.handle_timer(12.0)
    assert link.data_to_send() == bytes([ENQ])


def test_enq_reply_timeout_terminates() -> None:
    # PROTOCOLS 10
    link = make_sender()
    link.send_message(MSG, 0.0)
    link.data_to_send()
    link.handle_timer(15.0)
    assert link.data_to_send() == bytes([EOT])
    seen = events(link)
    assert any(isinstance(e, SendFailed) and not e.final for e in seen)
    assert link.queued_messages == 1  # kept for a later retry


def test_contention_computer_yields_and_receives() -> None:
    # PROTOCOLS 6-7, 9: the computer backs off; the instrument's next ENQ gets ACK
    link = make_sender(role="computer")
    link.send_message(MSG, 0.0)
    link.data_to_send()
    feed(link, bytes([ENQ]), 1.0)
    assert link.data_to_send() == b""
    assert any(isinstance(e, Contention) and e.we_yield for e in events(link))
    assert link.get_timer() == 21.0  # 20 s window
    feed(link, bytes([ENQ]), 2.0)
    assert link.data_to_send() == bytes([ACK])
    assert link.state is LinkState.RECEIVING
    # after the instrument's session the computer sends at once
    feed(link, b"".join(encode_frames(MSG)), 3.0)
    events(link)
    link.message_committed(3.0)
    feed(link, bytes([EOT]), 3.0)
    assert link.data_to_send() == bytes([ACK, ENQ])


def test_contention_window_expires_after_20_seconds() -> None:
    # PROTOCOLS 9
    link = make_sender(role="computer")
    link.send_message(MSG, 0.0)
    link.data_to_send()
    feed(link, bytes([ENQ]), 0.0)
    link.handle_timer(19.0)
    assert link.data_to_send() == b""
    link.handle_timer(20.0)
    assert link.data_to_send() == bytes([ENQ])


def test_contention_instrument_retries_after_1_second() -> None:
    # PROTOCOLS 6, 8: the instrument has priority and retries after >= 1 s
    link = make_sender(role="instrument")
    link.send_message(MSG, 0.0)
    link.data_to_send()
    feed(link, bytes([ENQ]), 0.5)
    assert any(isinstance(e, Contention) and not e.we_yield for e in events(link))
    link.handle_timer(1.4)
    assert link.data_to_send() == b""
    link.handle_timer(1.5)
    assert link.data_to_send() == bytes([ENQ])


def test_nak_on_frame_retransmits_same_frame_then_aborts_after_6() -> None:
    # PROTOCOLS 24, 31
    link = make_sender(max_send_attempts=2)
    link.send_message(MSG, 0.0)
    link.data_to_send()
    feed(link, bytes([ACK]))
    frame = link.data_to_send()
    for _ in range(5):
        feed(link, bytes([NAK]))
        assert link.data_to_send() == frame
    feed(link, b"?")  # any other byte is a NAK condition too
    assert link.data_to_send() == bytes([EOT])
    seen = events(link)
    answers = [e.answer for e in seen if isinstance(e, FrameAnswered)]
    assert answers == ["NAK"] * 5 + ["other"]
    failed = [e for e in seen if isinstance(e, SendFailed)]
    assert len(failed) == 1 and not failed[0].final
    assert link.queued_messages == 1


def test_frame_reply_timeout_aborts_and_keeps_message() -> None:
    # PROTOCOLS 32
    link = make_sender(resend_delay=30.0)
    link.send_message(MSG, 0.0)
    link.data_to_send()
    feed(link, bytes([ACK]), 1.0)
    link.data_to_send()
    link.handle_timer(16.0)
    assert link.data_to_send() == bytes([EOT])
    assert link.queued_messages == 1
    link.handle_timer(46.0)
    assert link.data_to_send() == bytes([ENQ])  # the whole message again, later


def test_final_failure_drops_message_after_max_attempts() -> None:
    link = make_sender(max_send_attempts=1)
    link.send_message(MSG, 0.0)
    link.handle_timer(15.0)
    assert any(isinstance(e, SendFailed) and e.final for e in events(link))
    assert link.queued_messages == 0


def test_receiver_interrupt_is_honoured_with_15_second_pause() -> None:
    # PROTOCOLS 25, 27
    link = make_sender(frame_size=40)
    link.send_message(MSG, 0.0)
    link.data_to_send()
    feed(link, bytes([ACK]), 0.0)
    link.data_to_send()
    feed(link, bytes([EOT]), 1.0)
    assert link.data_to_send() == bytes([EOT])
    assert any(isinstance(e, Interrupted) and e.honoured for e in events(link))
    assert link.get_timer() == 16.0
    link.handle_timer(15.9)
    assert link.data_to_send() == b""
    link.handle_timer(16.0)
    assert link.data_to_send() == bytes([ENQ])


def test_ignored_interrupt_counts_as_ack() -> None:
    # PROTOCOLS 26
    link = make_sender(frame_size=40, honour_interrupt=False)
    link.send_message(MSG, 0.0)
    link.data_to_send()
    feed(link, bytes([ACK]))
    first = link.data_to_send()
    feed(link, bytes([EOT]))
    assert link.data_to_send() != first  # the next frame, not a retransmission


def test_sender_ignores_other_bytes_while_waiting_for_enq_reply() -> None:
    # PROTOCOLS 2
    link = make_sender()
    link.send_message(MSG, 0.0)
    link.data_to_send()
    feed(link, b"xyz\x04\x02")
    assert link.state is LinkState.WAIT_ENQ_REPLY
    assert link.data_to_send() == b""


def test_sender_and_receiver_cores_talk() -> None:
    # both roles on one line: instrument sends, computer receives, answer goes back
    instrument = ASTMLink(role="instrument")
    computer = ASTMLink(role="computer")
    instrument.send_message(MSG, 0.0)
    answer = H + b"L|1|I\r"
    delivered: list[bytes] = []
    answered: list[bytes] = []
    for _ in range(200):
        computer.receive_data(instrument.data_to_send(), 0.0)
        for event in events(computer):
            if isinstance(event, MessageReceived):
                delivered.append(event.text)
                computer.message_committed(0.0)
                computer.send_message(answer, 0.0)
        instrument.receive_data(computer.data_to_send(), 0.0)
        for event in events(instrument):
            if isinstance(event, MessageReceived):
                answered.append(event.text)
                instrument.message_committed(0.0)
    assert delivered == [MSG]
    assert answered == [answer]


def test_a_late_commit_of_an_abandoned_message_never_acks_the_next_one() -> None:
    """DESIGN rule 1 / PROTOCOLS 32: the sender gave up on M1 (EOT) and sent M2; M1's late
    commit must not release M2's held frame: only M2's own commit may ACK it."""
    from engine.protocols.astm_link import ASTMLink, encode_frames

    link = ASTMLink()
    m1 = b"H|\\^&|||AN\rP|1\rO|1|S1||^^^GLU\rR|1|^^^GLU|5.5|mmol/L||N||F\rL|1|N\r"
    m2 = b"H|\\^&|||AN\rP|1\rO|1|S2||^^^GLU\rR|1|^^^GLU|9.9|mmol/L||N||F\rL|1|N\r"

    def feed(data: bytes, now: float) -> bytes:
        link.receive_data(data, now)
        while link.next_event() is not None:
            pass
        return link.data_to_send()

    assert feed(b"\x05", 0.0) == b"\x06"
    assert feed(encode_frames(m1)[0], 0.1) == b""  # held until M1 is committed
    feed(b"\x04", 16.0)  # the sender timed out on it and ended the session
    assert feed(b"\x05", 16.5) == b"\x06"
    assert feed(encode_frames(m2)[0], 16.6) == b""  # held until M2 is committed
    link.message_committed(17.0)  # M1's late answer
    assert link.data_to_send() == b""
    link.message_failed(17.1)  # M2 could not be stored
    assert link.data_to_send() == b"\x15"


# A line's worth of pieces: good frames, damaged ones, control characters, garbage,
# text longer than the frame limit.
_PIECES = st.sampled_from([
    bytes([ENQ]), bytes([EOT]), b"\x02", b"\x03", b"\x17", b"\r\n", b"\r", b"xx",
    b"\x021H|\\^&\r\x03", b"\x022L|1\r\x03", b"5A\r\n", b"zz", b"y" * 300, b"\x02abc",
    # frame text right at the limit of max_frame_size=256 and one byte either side
    *(b"\x021" + b"y" * n for n in range(248, 256)),
    *encode_frames(MSG), *encode_frames(H + b"R|1|" + b"v" * 400 + b"\rL|1\r", frame_size=240),
])


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(_PIECES, max_size=30), lenient=st.booleans(),
       strict_trailer=st.booleans())
def test_one_read_or_byte_by_byte_gives_the_same_link(pieces: list[bytes], lenient: bool,
                                                      strict_trailer: bool) -> None:
    """Frame text is taken a slice at a time: the outcome (replies, events, state) must be
    exactly that of the same bytes fed one at a time. PROTOCOLS 13, 29, 37. (No message is
    committed here: when a commit lands between two reads is the adapter's timing, and
    bytes that arrive before it are rightly judged differently.)"""
    data = b"".join(pieces)

    def run(size: int) -> tuple[bytes, list[Event], LinkState]:
        link = ASTMLink(max_frame_size=256, lenient=lenient, strict_trailer=strict_trailer)
        replies, seen = b"", []
        for i in range(0, len(data), size or max(1, len(data))):
            link.receive_data(data[i : i + (size or len(data))], 0.0)
            seen.extend(events(link))
            replies += link.data_to_send()
        return replies, seen, link.state

    assert run(0) == run(1) == run(7)


@pytest.mark.parametrize("lenient", [False, True])
@pytest.mark.parametrize("length", range(246, 258))
def test_frame_text_at_the_size_limit_read_at_once_or_byte_by_byte(length: int,
                                                                   lenient: bool) -> None:
    """PROTOCOLS 13: the frame-size bound is the same however the text is read."""
    body = b"1" + b"y" * length + b"\x03"
    data = b"\x05\x02" + body + checksum(body) + b"\r\n"

    def run(size: int) -> tuple[bytes, list[Event]]:
        link = ASTMLink(max_frame_size=256, lenient=lenient)
        feed(link, data, size=size)
        return link.data_to_send(), events(link)

    assert run(0) == run(1)
