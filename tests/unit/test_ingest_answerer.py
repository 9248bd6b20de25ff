"""The ingest process's answers (engine.ingest_process._Answerer): what the writer hands
over after a commit runs at once, in order, on the writer's own thread, before its next
batch; one answer that fails is logged and the rest still go."""

from __future__ import annotations

import threading

from structlog.testing import capture_logs

from engine.ingest_process import _Answerer


def test_calls_run_at_once_in_order_on_the_calling_thread() -> None:
    answers = _Answerer()
    done: list[int] = []
    threads: set[int] = set()

    def record(n: int) -> None:
        threads.add(threading.get_ident())
        done.append(n)

    for n in range(200):
        answers.callFromThread(record, n)
        assert done[-1] == n  # sent before the call returns, not queued
    answers.stop(10)
    assert done == list(range(200))
    assert threads == {threading.get_ident()}


def test_a_failing_call_is_logged_and_does_not_stop_the_answers_after_it() -> None:
    answers = _Answerer()
    done: list[str] = []

    def fail() -> None:
        raise RuntimeError("an answer that could not be sent")

    with capture_logs() as logs:
        answers.callFromThread(done.append, "before")
        answers.callFromThread(fail)
        answers.callFromThread(done.append, "after")
    answers.stop(10)
    assert done == ["before", "after"]
    assert [e["event"] for e in logs] == ["ingest.process.answer_failed"]
    assert logs[0]["error"] == "RuntimeError"
