"""A sender core and a receiver core on a lossy line, driven by Hypothesis.

The line drops, corrupts and duplicates bytes. Every read delivers what is in flight
in one direction (a duplicated byte arrives next to its original, as line noise does),
and the fake clock only moves while nothing is in flight: LIS01-A2 assumes a reply
either arrives within its 15 s or never (PROTOCOLS 32-33).

At most one fault hits a transmission (what is in flight between two reads): two faults
can cancel out in E1381's modulo-256 checksum (drop one byte, duplicate another of the
same value: the same bytes in another order), which the protocol cannot detect by design
(PROTOCOLS 19); such a line is outside what LIS01-A2 promises.

Invariant: a message the sender reports completed was delivered exactly once; a
message it reports failed was delivered at most once; nothing is delivered that was
not sent, and no content is ever altered (PROTOCOLS 19, 24, 30-33, 36).
"""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.protocols.astm_link import (
    ASTMLink,
    LinkState,
    MessageReceived,
    SendCompleted,
    SendFailed,
)

CORRUPT = ord("?")


class LossyLine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.sender = ASTMLink(role="instrument", frame_size=16, max_send_attempts=1)
        self.receiver = ASTMLink(role="computer")
        self.to_receiver = bytearray()
        self.to_sender = bytearray()
        self.sent: list[bytes] = []
        self.completed: set[bytes] = set()
        self.failed: set[bytes] = set()
        self.delivered: Counter[bytes] = Counter()
        self.fail_next_store = False
        self.damaged = {True: False, False: False}  # by direction: to_receiver?

    # ------------------------------------------------------------- plumbing

    def _collect(self) -> None:
        self.to_receiver += self.sender.data_to_send()
        self.to_sender += self.receiver.data_to_send()
        while (event := self.receiver.next_event()) is not None:
            if isinstance(event, MessageReceived):
                if self.fail_next_store:
                    self.fail_next_store = False
                    self.receiver.message_failed(self.now)
                else:
                    if event.complete:
                        self.delivered[event.text] += 1
                    self.receiver.message_committed(self.now)
        while (event := self.sender.next_event()) is not None:
            if isinstance(event, SendCompleted):
                self.completed.add(event.text)
            elif isinstance(event, SendFailed):
                assert event.final
                self.failed.add(event.text)
        self.to_receiver += self.sender.data_to_send()
        self.to_sender += self.receiver.data_to_send()

    # ---------------------------------------------------------------- rules

    @precondition(lambda self: len(self.sent) < 6)
    @rule(body=st.binary(min_size=0, max_size=60).map(lambda b: bytes(x % 26 + 65 for x in b)))
    def send(self, body: bytes) -> None:
        text = b"H|\\^&|||%d\rR|1|^^^X|" % len(self.sent) + body + b"\rL|1|N\r"
        self.sent.append(text)
        self.sender.send_message(text, self.now)
        self._collect()

    @rule()
    def deliver_to_receiver(self) -> None:
        data, self.to_receiver = bytes(self.to_receiver), bytearray()
        self.damaged[True] = False
        self.receiver.receive_data(data, self.now)
        self._collect()

    @rule()
    def deliver_to_sender(self) -> None:
        data, self.to_sender = bytes(self.to_sender), bytearray()
        self.damaged[False] = False
        self.sender.receive_data(data, self.now)
        self._collect()

    @rule(to_receiver=st.booleans(), where=st.integers(min_value=0))
    def drop(self, to_receiver: bool, where: int) -> None:
        buf = self.to_receiver if to_receiver else self.to_sender
        if buf and not self.damaged[to_receiver]:
            self.damaged[to_receiver] = True
            del buf[where % len(buf)]

    @rule(to_receiver=st.booleans(), where=st.integers(min_value=0))
    def corrupt(self, to_receiver: bool, where: int) -> None:
        buf = self.to_receiver if to_receiver else self.to_sender
        if buf and not self.damaged[to_receiver]:
            self.damaged[to_receiver] = True
            i = where % len(buf)
            buf[i] = CORRUPT if buf[i] != CORRUPT else ord("!")

    @rule(to_receiver=st.booleans(), where=st.integers(min_value=0))
    def duplicate(self, to_receiver: bool, where: int) -> None:
        buf = self.to_receiver if to_receiver else self.to_sender
        if buf and not self.damaged[to_receiver]:
            self.damaged[to_receiver] = True
            i = where % len(buf)
            buf.insert(i, buf[i])

    @rule()
    def storage_fails_once(self) -> None:
        self.fail_next_store = True

    @precondition(lambda self: not self.to_receiver and not self.to_sender)
    @rule(seconds=st.sampled_from([0.5, 1.0, 10.0, 15.0, 20.0, 30.0]))
    def advance_time(self, seconds: float) -> None:
        self.now += seconds
        for link in (self.sender, self.receiver):
            deadline = link.get_timer()
            if deadline is not None and deadline <= self.now:
                link.handle_timer(self.now)
        self._collect()

    # ----------------------------------------------------------- invariants

    @invariant()
    def nothing_delivered_twice_or_invented(self) -> None:
        for text, count in self.delivered.items():
            assert text in self.sent, text
            assert count <= 1, (text, count)
        for text in self.completed:
            assert self.delivered[text] == 1, text

    @invariant()
    def buffers_stay_bounded(self) -> None:
        assert len(self.receiver._text) < 10_000
        assert len(self.receiver._fbuf) < 64_000

    def teardown(self) -> None:
        # A quiet line: everything eventually completes or fails, and both go neutral.
        self.fail_next_store = False
        for _ in range(400):
            self.deliver_to_receiver()
            self.deliver_to_sender()
            if not self.to_receiver and not self.to_sender:
                self.advance_time(1.0)
            idle = (
                self.sender.queued_messages == 0
                and self.sender.state is LinkState.NEUTRAL
                and self.receiver.state is LinkState.NEUTRAL
            )
            if idle:
                break
        assert self.sender.queued_messages == 0
        for text in self.sent:
            assert (text in self.completed) != (text in self.failed), text
        self.nothing_delivered_twice_or_invented()
        for text in self.completed:
            assert self.delivered[text] == 1


TestLossyLine = LossyLine.TestCase
TestLossyLine.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
