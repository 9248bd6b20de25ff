"""The ingest process's answer thread (engine.ingest_process._Answerer): what the writer
hands over after a commit runs in order, off the writer's thread, and all of it before
the process exits."""

from __future__ import annotations

import threading

from engine.ingest_process import _Answerer


def test_calls_run_in_order_off_the_calling_thread_and_are_drained_at_stop() -> None:
    answers = _Answerer()
    done: list[int] = []
    threads: set[int] = set()
    gate = threading.Event()

    def record(n: int) -> None:
        gate.wait(10)  # the first call holds the rest back until all are queued
        threads.add(threading.get_ident())
        done.append(n)

    for n in range(200):
        answers.callFromThread(record, n)
    gate.set()
    answers.stop(10)  # returns once everything queued before it has run
    assert done == list(range(200))
    assert threads and threading.get_ident() not in threads


def test_a_failing_call_does_not_stop_the_answers_after_it() -> None:
    answers = _Answerer()
    done: list[str] = []

    def fail() -> None:
        raise RuntimeError("an answer that could not be sent")

    answers.callFromThread(done.append, "before")
    answers.callFromThread(fail)
    answers.callFromThread(done.append, "after")
    answers.stop(10)
    assert done == ["before", "after"]
