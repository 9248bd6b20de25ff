"""The message path against a real database: per-sample order behind a held message,
reprocess in arrival order, the after_commit ACK policy, and a database that is down."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from twisted.internet import reactor
from twisted.trial import unittest

from drivers.registry import create_driver
from engine.config import InterfaceConfig
from engine.mapping import load_mapping
from engine.pipeline import HL7Handler, InterfaceRuntime, Pipeline, ingest, reprocess
from engine.writer import DatabaseWriter
from lis_bridge.db import make_engine, session_factory, upgrade
from lis_bridge.models import MessageStatus, OutboxJob, RawMessage
from lis_bridge.orders import import_orders_csv
from lis_bridge.results import UNKNOWN_SPECIMEN

REPO = Path(__file__).resolve().parents[2]


def runtime(ack_policy: str = "after_apply") -> InterfaceRuntime:
    config = InterfaceConfig(name="t-hl7", protocol="hl7", driver="hl7-generic",
                             mapping=REPO / "mappings" / "generic_hl7.yaml",
                             listen="tcp:0:interface=127.0.0.1", ack_policy=ack_policy)
    return InterfaceRuntime(config, create_driver("hl7-generic", "hl7"),
                            load_mapping(REPO / "mappings" / "generic_hl7.yaml"))


def astm_runtime() -> InterfaceRuntime:
    config = InterfaceConfig(name="t-astm", protocol="astm", driver="astm-generic",
                             mapping=REPO / "mappings" / "generic_astm.yaml",
                             listen="tcp:0:interface=127.0.0.1")
    return InterfaceRuntime(config, create_driver("astm-generic", "astm"),
                            load_mapping(REPO / "mappings" / "generic_astm.yaml"))


def order_and_receive_p2(session: Session) -> None:
    """The ORDERS imported, and sample P-2 received at the lab."""
    from lis_bridge.lifecycle import transition
    from lis_bridge.models import Sample

    assert import_orders_csv(session, ORDERS, actor="t").ok
    session.commit()
    sample = session.scalars(select(Sample).where(Sample.specimen_id == "P-2")).one()
    transition(session, sample, "RECEIVED_AT_LAB", actor="t", location="Lab")
    session.commit()


def oru(control_id: str, specimen_id: str, code: str = "GLU", value: str = "5.4",
        status: str = "F") -> bytes:
    return (f"MSH|^~\\&|AN|LAB|LIS|LAB|20250303101500||ORU^R01|{control_id}|P|2.5.1\r"
            f"OBR|1|{specimen_id}|{specimen_id}|CHEM\r"
            f"OBX|1|NM|{code}^x||{value}|mmol/L|3.9-6.1||||{status}\r").encode()


ORDERS = (
    "specimen_id,patient_id,patient_name,sex,birth_date,tests,collected_at,location\n"
    "P-1,PX-1,A B,F,1970-01-01,GLU NA,2025-01-01T08:00:00Z,Ward\n"
    "P-2,PX-2,C D,M,1970-01-01,GLU,2025-01-01T08:00:00Z,Ward\n"
)


def apply(sessions: sessionmaker[Session], rt: InterfaceRuntime, raw: bytes):  # type: ignore[no-untyped-def]
    with sessions() as session:
        result = ingest(session, rt, raw, "127.0.0.1:1")
        session.commit()
        return result


def test_later_messages_wait_behind_a_held_one_and_release_in_order(sessions) -> None:  # type: ignore[no-untyped-def]
    """DESIGN rule 4: while P-1 has a held message, its later messages are held behind it;
    other samples are not blocked; reprocessing releases them in arrival order."""
    rt = runtime()
    first = apply(sessions, rt, oru("m1", "P-1"))  # not yet ordered: unknown specimen
    assert first.outcome == "held" and first.hold_reason == UNKNOWN_SPECIMEN
    second = apply(sessions, rt, oru("m2", "P-1", code="NA", value="140"))
    assert second.outcome == "held" and second.hold_reason == "BEHIND_HELD"
    assert f"#{first.message_id}" in second.hold_detail
    with sessions() as session:
        report = import_orders_csv(session, ORDERS, actor="t")
        assert report.ok
        session.commit()
    other = apply(sessions, rt, oru("m3", "P-2"))
    # P-2 is not blocked by P-1's held message: it is held for its own reason only
    assert other.hold_reason == "NOT_RECEIVED"
    # received at the lab, then reprocess: both apply, first one first
    from lis_bridge.lifecycle import transition
    from lis_bridge.models import Sample

    with sessions() as session:
        sample = session.scalars(select(Sample).where(Sample.specimen_id == "P-1")).one()
        transition(session, sample, "RECEIVED_AT_LAB", actor="t", location="Lab")
        session.commit()
    with sessions() as session:
        assert reprocess(session, rt, second.message_id).hold_reason == "BEHIND_HELD"
        session.rollback()
    for message_id in (first.message_id, second.message_id):
        with sessions() as session:
            assert reprocess(session, rt, message_id).status == MessageStatus.APPLIED
            session.commit()
    with sessions() as session:
        alerts = session.scalars(select(OutboxJob).where(OutboxJob.kind == "notify")).all()
        assert any("held" in a.payload for a in alerts)  # a held message raised an alert


def test_duplicate_is_receipted_not_applied(sessions) -> None:  # type: ignore[no-untyped-def]
    rt = runtime()
    with sessions() as session:
        import_orders_csv(session, ORDERS, actor="t")
        session.commit()
    first = apply(sessions, rt, oru("d1", "P-9"))
    again = apply(sessions, rt, oru("d1", "P-9"))
    assert again.outcome == "duplicate"
    with sessions() as session:
        rows = session.scalars(select(RawMessage).order_by(RawMessage.id)).all()
        assert rows[1].duplicate_of_fk == first.message_id
        assert rows[1].payload == oru("d1", "P-9")  # the bytes are kept all the same


def test_undecodable_bytes_are_kept(sessions) -> None:  # type: ignore[no-untyped-def]
    rt = runtime()
    junk = b"MSH|^~\\&|\rthis is not hl7\x00\xff"
    result = apply(sessions, rt, junk)
    assert result.outcome == "rejected"
    with sessions() as session:
        row = session.get(RawMessage, result.message_id)
        assert row is not None and row.payload == junk and row.status == MessageStatus.REJECTED


class StorageDownTests(unittest.TestCase):
    """DESIGN rule 2: with the database down no positive ACK leaves; the analyzer is told
    to resend (AR with ERR), and the engine keeps serving."""

    def test_ar_when_database_is_unreachable(self) -> None:
        # A real connection attempt to a closed port on 127.0.0.1: the database is down.
        engine = make_engine("postgresql+psycopg2://postgres@127.0.0.1:9/labrelay",
                             connect_args={"connect_timeout": 2})
        writer = DatabaseWriter(session_factory(engine), reactor)
        writer.start()
        self.addCleanup(writer.stop)
        rt = runtime()
        handler = HL7Handler(Pipeline(writer, {rt.name: rt}))
        d = handler.message_received(oru("down-1", "P-1"), "127.0.0.1:5", rt.name)

        def check(ack: bytes) -> None:
            assert b"MSA|AR|down-1" in ack
            assert b"resend" in ack and b"ERR|" in ack

        d.addCallback(check)
        return d

    def test_after_commit_policy_acks_before_apply(self) -> None:
        import tempfile

        url = f"sqlite:///{tempfile.mkdtemp()}/lis.db"
        engine = make_engine(url)
        upgrade(engine)
        writer = DatabaseWriter(session_factory(engine), reactor)
        writer.start()
        self.addCleanup(writer.stop)
        rt = runtime("after_commit")
        handler = HL7Handler(Pipeline(writer, {rt.name: rt}))
        d = handler.message_received(oru("fast-1", "NOPE"), "127.0.0.1:5", rt.name)

        def check(ack: bytes) -> None:
            # AA once the bytes are committed; the outcome (held) shows in the engine
            assert b"MSA|AA|fast-1" in ack

        d.addCallback(check)
        return d


class BulkLogTests(unittest.TestCase):
    def test_a_bulk_applied_message_is_logged_once_committed(self) -> None:
        """The fast lane's lines (the sample's move, message.applied) are written by the
        pipeline after the commit, once each, with no patient data."""
        import tempfile

        from structlog.testing import capture_logs


        url = f"sqlite:///{tempfile.mkdtemp()}/lis.db"
        engine = make_engine(url)
        upgrade(engine)
        sessions = session_factory(engine)
        with sessions() as session:
            order_and_receive_p2(session)
        writer = DatabaseWriter(session_factory(make_engine(url, writer=True)), reactor)
        writer.start()
        self.addCleanup(writer.stop)
        rt = runtime()
        handler = HL7Handler(Pipeline(writer, {rt.name: rt}))
        captured = capture_logs()
        logs = captured.__enter__()
        d = handler.message_received(oru("bulk-1", "P-2"), "127.0.0.1:5", rt.name)

        def check(ack: bytes) -> None:
            captured.__exit__(None, None, None)
            assert b"MSA|AA|bulk-1" in ack
            applied = [e for e in logs if e["event"] == "message.applied"]
            moved = [e for e in logs if e["event"] == "lis.sample.transition"
                     and e.get("actor") == f"interface:{rt.name}"]
            assert len(applied) == 1 and applied[0]["control_id"] == "bulk-1"
            assert len(moved) == 1 and moved[0]["to_state"] == "COMPLETED"
            text = repr(logs)
            assert "C D" not in text and "PX-2" not in text  # name, patient id

        d.addCallback(check)
        return d


def test_control_id_reuse_with_other_content_is_not_a_duplicate(sessions) -> None:  # type: ignore[no-untyped-def]
    """PROTOCOLS 90: a resend (same MSH-10, only MSH-7 restamped) is a duplicate; an analyzer
    that restarts its counter sends the same MSH-10 with new results, which must not be
    dropped as a duplicate."""
    rt = runtime()
    first = apply(sessions, rt, oru("c-1", "P-7", value="5.4"))
    restamped = apply(sessions, rt, oru("c-1", "P-7", value="5.4").replace(
        b"20250303101500", b"20250303101600"))
    assert restamped.outcome == "duplicate"
    reused = apply(sessions, rt, oru("c-1", "P-7", value="7.9"))
    assert reused.outcome != "duplicate"
    assert reused.message_id not in (first.message_id, restamped.message_id)


class _FaultyDriver:
    """A driver with a bug: labrelay must keep the bytes and answer, not loop or drop."""

    name = "faulty"
    protocol = "hl7"

    def detect(self, raw: bytes) -> bool:
        return True

    def decode(self, raw: bytes) -> object:
        raise ZeroDivisionError("driver bug")


class InternalErrorTests(unittest.TestCase):
    def test_a_bug_while_processing_keeps_the_bytes_and_answers_ae(self) -> None:
        import tempfile

        url = f"sqlite:///{tempfile.mkdtemp()}/lis.db"
        engine = make_engine(url)
        upgrade(engine)
        writer = DatabaseWriter(session_factory(engine), reactor)
        writer.start()
        self.addCleanup(writer.stop)
        rt = runtime()
        rt.driver = _FaultyDriver()  # type: ignore[assignment]
        handler = HL7Handler(Pipeline(writer, {rt.name: rt}))
        raw = oru("bug-1", "P-1")
        d = handler.message_received(raw, "127.0.0.1:5", rt.name)

        def check(ack: bytes) -> None:
            assert b"MSA|AE|bug-1" in ack and b"INTERNAL_ERROR" in ack
            with session_factory(engine)() as session:
                row = session.scalars(select(RawMessage)).one()
                assert row.payload == raw and row.hold_reason == "INTERNAL_ERROR"

        d.addCallback(check)
        return d


def test_astm_message_cut_before_its_l_record_is_kept_not_applied(sessions) -> None:  # type: ignore[no-untyped-def]
    """An ASTM transfer that ended before the L record may end inside a field (4. of 4.5):
    it is stored and visible, nothing is applied, and the whole resend is not blocked."""
    rt = astm_runtime()
    with sessions() as session:
        import_orders_csv(session, ORDERS.replace("GLU NA", "K"), actor="t")
        session.commit()
    whole = (b"H|\\^&|||an^1|||||host||P|1\rP|1\rO|1|P-1||^^^K|R||||||N||||||||||||||F\r"
             b"R|1|^^^K|4.5|mmol/L|3.5 to 5.1|N||F\rL|1|N\r")
    cut = whole[: whole.index(b"4.5") + 2]  # "...|4."
    first = apply(sessions, rt, cut)
    assert (first.outcome, first.hold_reason) == ("rejected", "INCOMPLETE_MESSAGE")
    with sessions() as session:
        row = session.get(RawMessage, first.message_id)
        assert row is not None and row.payload == cut and not row.specimens
    again = apply(sessions, rt, whole)
    assert again.outcome != "rejected" and again.hold_reason != "BEHIND_HELD"


def test_astm_message_ending_in_a_bare_l_record_is_applied(sessions, corpus: Path) -> None:  # type: ignore[no-untyped-def]
    """PROTOCOLS 55: the L record ends the message. The Ortho VISION's end with ``L`` and
    nothing after it (corpus astm/ortho_vision__3): complete, not INCOMPLETE_MESSAGE (it
    was stored REJECTED and acknowledged, and its results never applied)."""
    from engine.pipeline import _ends_with_l

    assert _ends_with_l((corpus / "astm" / "ortho_vision__3.txt").read_bytes())
    assert _ends_with_l(b"H|\\^&\rL\n") and _ends_with_l(b"H|\\^&\rl|1|N\r")
    assert not _ends_with_l(b"H|\\^&\rR|1|^^^K|4.")
    assert not _ends_with_l(b"H|\\^&\rLX|1\r")
    rt = astm_runtime()
    with sessions() as session:
        import_orders_csv(session, ORDERS.replace("GLU NA", "K"), actor="t")
        session.commit()
    result = apply(sessions, rt, b"H|\\^&|||an^1|||||host||P|1\rP|1\r"
                   b"O|1|P-1||^^^K|R||||||N||||||||||||||F\r"
                   b"R|1|^^^K|4.5|mmol/L|3.5 to 5.1|N||F\rL\r")
    assert result.outcome != "rejected", result.hold_reason


CRITICAL_BY_AGE = """
metadata: {analyzer: test, protocol: hl7, version: "1"}
tests:
  K:
    test: K
    units: {ucum: mmol/L}
    reference_ranges: [{low: 3.5, high: 5.1}]
    critical:
      - {age_max: 0.0833, low: 2.0, high: 7.5}   # the first month of life
      - {low: 2.5, high: 6.5}
"""


def test_critical_limits_by_age_reach_the_stored_result(sessions, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A potassium of 7.0 mmol/L is critical for an adult and not for a five-day-old, with
    critical limits by age in the mapping; on the fast lane (several messages, decoded on
    arrival) as one at a time. The mapping's dependence on age makes the pipeline read the
    patient's birth date, as it does for reference ranges by age."""
    from datetime import UTC, datetime, timedelta

    from engine.ingest_bulk import ingest_bulk, prepare_item
    from lis_bridge.lifecycle import transition
    from lis_bridge.models import Result, Sample

    path = tmp_path / "k.yaml"
    path.write_text(CRITICAL_BY_AGE)
    config = InterfaceConfig(name="t-hl7", protocol="hl7", driver="hl7-generic", mapping=path,
                             listen="tcp:0:interface=127.0.0.1")
    rt = InterfaceRuntime(config, create_driver("hl7-generic", "hl7"), load_mapping(path))
    now = datetime.now(UTC)
    newborn = (now - timedelta(days=5)).date().isoformat()
    taken = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    orders = (
        "specimen_id,patient_id,patient_name,sex,birth_date,tests,collected_at,location\n"
        f"N-1,PX-N1,A B,F,{newborn},K,{taken},Neonatal unit\n"
        f"A-1,PX-A1,C D,M,1970-01-01,K,{taken},Ward\n"
        f"N-2,PX-N2,E F,M,{newborn},K,{taken},Neonatal unit\n"
        f"A-2,PX-A2,G H,F,1980-01-01,K,{taken},Ward\n"
    )
    with sessions() as session:
        assert import_orders_csv(session, orders, actor="t").ok
        for sample in session.scalars(select(Sample)):
            transition(session, sample, "RECEIVED_AT_LAB", actor="t", location="Lab")
        session.commit()

    def k(control_id: str, specimen_id: str) -> bytes:
        return (f"MSH|^~\\&|AN|LAB|LIS|LAB|20250303101500||ORU^R01|{control_id}|P|2.5.1\r"
                f"OBR|1|{specimen_id}|{specimen_id}|CHEM\r"
                "OBX|1|NM|K^Potassium||7.0|mmol/L|||||F\r").encode()

    with sessions() as session:  # together, as a group commit
        items = [prepare_item(rt, k(f"b{n}", s), "127.0.0.1:1", True)
                 for n, s in enumerate(("N-1", "A-1"))]
        assert [r.outcome for r in ingest_bulk(session, items)] == ["accepted"] * 2
        session.commit()
    for n, specimen in enumerate(("N-2", "A-2")):  # one at a time
        assert apply(sessions, rt, k(f"o{n}", specimen)).outcome == "accepted"
    with sessions() as session:
        stored = {specimen: (flag, critical) for specimen, flag, critical in session.execute(
            select(Sample.specimen_id, Result.flag, Result.is_critical)
            .join(Result, Result.sample_fk == Sample.id))}
    assert stored == {"N-1": ("H", False), "A-1": ("HH", True),
                      "N-2": ("H", False), "A-2": ("HH", True)}


def test_an_after_commit_message_queued_twice_is_applied_once(db_url: str, sessions) -> None:  # type: ignore[no-untyped-def]
    """after_commit: the engine queues a stored message for applying after its answer, and
    again when it resumes unapplied messages (at start, and each time the ingest process is
    started again). The second finds it applied and leaves it: one set of results, no
    error, no hold."""
    import threading

    from structlog.testing import capture_logs

    from engine.ingest_process import _Answerer
    from engine.pipeline import apply_later, unapplied_messages
    from lis_bridge.models import Result

    with sessions() as session:
        order_and_receive_p2(session)
        rt = runtime("after_commit")
        stored = ingest(session, rt, oru("twice-1", "P-2"), "127.0.0.1:5", apply_now=False)
        session.commit()
        assert stored.status == MessageStatus.RECEIVED
        assert unapplied_messages(session) == [(stored.message_id, rt.name)]
    answers = _Answerer()
    writer = DatabaseWriter(session_factory(make_engine(db_url, writer=True)),
                            answers)  # type: ignore[arg-type]
    writer.start()
    done = threading.Event()
    outcomes: list[object] = []
    with capture_logs() as logs:
        apply_later(writer, rt, stored.message_id).addBoth(outcomes.append)
        second = apply_later(writer, rt, stored.message_id)
        second.addBoth(outcomes.append)
        second.addBoth(lambda _r: done.set())
        assert done.wait(30)
        writer.stop()
        answers.stop(5)
    assert outcomes[1] is None  # left as it was
    assert not [e for e in logs if e["log_level"] == "error"], logs
    with sessions() as session:
        row = session.get(RawMessage, stored.message_id)
        assert row is not None and row.status == MessageStatus.APPLIED and row.attempts == 1
        assert session.scalars(select(Result.test_code)).all() == ["GLU"]
        assert unapplied_messages(session) == []


def _answers(db_url: str, rt: InterfaceRuntime, messages: list[bytes]) -> list[object]:
    """Each message through HL7Handler, one after the other, on a real writer: the reply
    of each (bytes, a list of them, or None for no reply)."""
    import threading

    from engine.ingest_process import _Answerer

    answers = _Answerer()
    writer = DatabaseWriter(session_factory(make_engine(db_url, writer=True)),
                            answers)  # type: ignore[arg-type]
    writer.start()
    handler = HL7Handler(Pipeline(writer, {rt.name: rt}))
    replies: list[object] = []
    try:
        for raw in messages:
            done = threading.Event()
            d = handler.message_received(raw, "127.0.0.1:5", rt.name)
            d.addBoth(replies.append)
            d.addBoth(lambda _r, done=done: done.set())
            assert done.wait(30)
    finally:
        writer.stop()
        answers.stop(5)
    return replies


ACK_IN = b"MSH|^~\\&|AN|LAB|LIS|LAB|20250303101500||ACK^R01|A1|P|2.5.1\rMSA|AA|LR5\r"


def test_no_ack_is_ever_answered(db_url: str, sessions) -> None:  # type: ignore[no-untyped-def]
    """PROTOCOLS 89: an ACK gets no reply; neither does its resend (a duplicate), one that
    cannot be decoded (a NUL in MSH-10), nor one whose header is unreadable, whatever its
    field separator."""
    replies = _answers(db_url, runtime(), [
        ACK_IN,
        ACK_IN,  # the same bytes again: a duplicate of an ACK
        ACK_IN.replace(b"|A1|", b"|A2\x00|"),
        b"MSH#^~\\&#AN#LAB#LIS#LAB#20250303101500##ACK^R01#A3#P#2.5x\rMSA#AA#LR5\r",
        b"MSH|^~\\&|AN|LAB|LIS|LAB|20250303101500||ACK^R01|A4|P|2.5x\rMSA|AA|LR5\r",
    ])
    assert replies == [None] * 5, replies
    # an ORU that cannot be read is still answered, with AR
    bad = _answers(db_url, runtime(), [oru("bad-1", "P-1").replace(b"|P|2.5.1", b"|P|2.5x")])
    assert isinstance(bad[0], bytes) and b"MSA|AR|" in bad[0]


def test_a_resent_held_message_is_not_answered_aa(db_url: str, sessions) -> None:  # type: ignore[no-untyped-def]
    """PROTOCOLS 88, DESIGN rule 5: a duplicate is answered as the original was. In
    enhanced mode the original's recorded code is its commit ACK (CA) or nothing, so the
    resend of a held message used to get AA; it gets AE, as the original's application
    ACK would be."""
    held = (b"MSH|^~\\&|AN|LAB|LIS|LAB|20250303101500||ORU^R01|H1|P|2.5.1||||SU\r"
            b"OBR|1|UNKNOWN9|UNKNOWN9|X\rOBX|1|NM|GLU||5.0|mmol/L|||||F\r")
    both = held.replace(b"|H1|", b"|H2|").replace(b"||||SU\r", b"|||AL|AL\r")

    def codes(reply: object) -> list[bytes]:
        parts = reply if isinstance(reply, list) else [reply]
        return [p.split(b"MSA|")[1][:2] for p in parts if isinstance(p, bytes)]

    first, again, first_al, again_al = _answers(db_url, runtime(), [held, held, both, both])
    assert codes(first) == [b"CA"] and codes(again) == [b"CA"]  # SU: commit ACK only
    assert codes(first_al) == [b"CA", b"AE"]
    assert codes(again_al) == [b"CA", b"AE"], again_al


def test_a_host_query_naming_no_known_sample_does_not_log_the_id(sessions) -> None:  # type: ignore[no-untyped-def]
    """No patient data in logs: some analyzers put the patient id in Q-3 where others put
    the specimen id. A queried id is logged only when it names a sample of the LIS."""
    from structlog.testing import capture_logs

    from engine.pipeline import answer_query

    rt = astm_runtime()
    with sessions() as session:
        import_orders_csv(session, ORDERS, actor="t")
        session.commit()
        for queried in ("PIDQ77311", "P-1"):
            message = rt.driver.decode(
                f"H|\\^&|||an^1|||||host||P|1\rQ|1|{queried}||ALL||||||||O\rL|1|N\r".encode())
            with capture_logs() as logs:
                answer_query(session, rt, message)
            answered = [e for e in logs if e["event"] == "astm.query.answered"]
            assert answered, logs
            assert (queried in repr(logs)) == (queried == "P-1"), logs


def test_training_and_debugging_results_are_not_applied_to_patients(sessions) -> None:  # type: ignore[no-untyped-def]
    """PROTOCOLS 65 (ASTM H-12) and HL7 MSH-11: processing id T (training) or D
    (debugging) marks a message that is not production. Its results are stored with the
    message, IGNORED, logged, and never written to the patient's sample; P is applied."""
    from structlog.testing import capture_logs

    from lis_bridge.models import Result

    with sessions() as session:
        import_orders_csv(session, ORDERS.replace("GLU NA", "K"), actor="t")
        session.commit()
    astm = (b"H|\\^&|||an^1|||||host||%s|1\rP|1\rO|1|P-1||^^^K|R||||||N||||||||||||||F\r"
            b"R|1|^^^K|4.5|mmol/L|3.5 to 5.1|N||F\rL|1|N\r")
    hl7 = oru("train-1", "P-1", code="K", value="4.5").replace(b"|train-1|P|", b"|%s|%s|")
    for rt, raw in ((astm_runtime(), astm), (runtime(), hl7)):
        for processing in (b"T", b"D"):
            message = raw % ((processing,) if rt.config.protocol == "astm"
                             else (b"train-" + processing, processing))
            with capture_logs() as logs:
                result = apply(sessions, rt, message)
            assert result.status == MessageStatus.IGNORED, (rt.name, processing, result)
            assert [e for e in logs if e["event"] == "message.not_applied"]
        with sessions() as session:
            assert session.scalars(select(Result)).all() == []
    assert apply(sessions, astm_runtime(), astm % b"P").status != MessageStatus.IGNORED


def test_an_astm_message_with_results_and_a_host_query_has_both_handled(sessions) -> None:  # type: ignore[no-untyped-def]
    """PROTOCOLS 71: a Q record asks for a worklist. A message that carries R records as
    well (not what E1394 describes, seen in no corpus file) used to be taken as a query
    only, its results stored with the message and never applied. Both are handled now:
    the results applied, the query answered; through the one-at-a-time path and the
    writer's batch alike."""
    from engine.ingest_bulk import ingest_bulk, prepare_item
    from lis_bridge.models import Result

    rt = astm_runtime()
    with sessions() as session:
        order_and_receive_p2(session)
    template = ("H|\\^&|||an^1|||||host||P|1\rP|1\rO|1|{sample}||^^^GLU|R||||||N||||||||||||||F\r"
                "R|1|^^^GLU|{value}|mmol/L|3.9 to 6.1|N||F\rQ|1|^{queried}||ALL||||||||O\r"
                "L|1|N\r")
    alone = template.format(sample="P-2", value="5.4", queried="P-1").encode()
    message = rt.driver.decode(alone)
    assert message.kind == "results" and len(message.queries) == 1
    assert any("host query" in w for w in message.warnings)
    first = apply(sessions, rt, alone)
    with sessions() as session:
        # P-1 is not received: its result is held, and the worklist still goes out
        batch = ingest_bulk(session, [prepare_item(
            rt, template.format(sample="P-1", value="6.0", queried="P-1").encode(),
            "127.0.0.1:1", True)])
        session.commit()
    assert first.status == MessageStatus.APPLIED, first
    assert batch[0].status == MessageStatus.HELD, batch[0]
    for result in (first, batch[0]):
        assert len(result.outgoing) == 1, result  # the worklist answer: P-1's GLU and NA
        assert b"O|1|P-1|" in result.outgoing[0], result.outgoing
        assert b"GLU" in result.outgoing[0], result.outgoing
    with sessions() as session:
        stored = session.scalars(select(Result)).all()
    assert [(r.test_code, r.value_text) for r in stored] == [("GLU", "5.4")]


def test_content_the_database_refuses_is_held_not_refused_again_and_again(
        db_url: str, sessions) -> None:  # type: ignore[no-untyped-def]
    """DESIGN: content that cannot be applied is stored and HELD. When the database itself
    refuses what a message would write (here a trigger this test adds, standing for any
    such rule), the message got a storage error (AR) and nothing was kept, so the
    analyzer resent it for ever. Only a failure of storage itself (the database down, the
    connection lost) gets that answer now; a refusal of the content keeps the bytes, holds
    them with INTERNAL_ERROR and an alert, and answers AE."""
    from lis_bridge.lifecycle import transition
    from lis_bridge.models import Sample
    from tests.integration.refusals import refuse_results

    with sessions() as session:
        order_and_receive_p2(session)
        p1 = session.scalars(select(Sample).where(Sample.specimen_id == "P-1")).one()
        transition(session, p1, "RECEIVED_AT_LAB", actor="t", location="Lab")
        refuse_results(session.connection(), "NEW.value_text LIKE '666%'")
        session.commit()
    refused, fine = _answers(db_url, runtime(), [
        oru("refused-1", "P-2", value="666"), oru("fine-1", "P-1", value="5.4")])
    assert isinstance(refused, bytes) and b"MSA|AE|refused-1" in refused, refused
    assert isinstance(fine, bytes) and b"MSA|AA|fine-1" in fine, fine
    with sessions() as session:
        rows = [(r.status, r.hold_reason, r.payload) for r in
                session.scalars(select(RawMessage).where(RawMessage.direction == "in"))]
        alerts = [job.dedupe_key for job in session.scalars(
            select(OutboxJob).where(OutboxJob.kind == "notify"))
            if job.dedupe_key.startswith("notify:held:")]
    assert [(status, reason) for status, reason, payload in rows] == [
        (MessageStatus.HELD, "INTERNAL_ERROR"), (MessageStatus.APPLIED, "")], rows
    assert b"|refused-1|" in rows[0][2]  # the bytes kept as sent
    assert len(alerts) == 1, alerts  # an engine alert for the held message


def test_an_hl7_work_order_query_is_refused_not_acknowledged_as_taken(
        db_url: str, sessions, corpus: Path) -> None:  # type: ignore[no-untyped-def]
    """PROTOCOLS 95-97: an analyzer's HL7 work-order query (LAB-27 QBP^Q11, a vendor
    QBP, the older QRY^Q02) expects a worklist, which labrelay does not send over HL7.
    It got a plain AA, so the analyzer waited for work that never came. It is stored,
    IGNORED and logged, and answered AR with error 200 and what to do (PROTOCOLS 91: a
    sender stops on AR); its resend gets the same answer. Corpus files read in place."""
    from structlog.testing import capture_logs

    from drivers.hl7.parser import split_messages

    queries = [split_messages((corpus / "hl7" / name).read_bytes())[0] for name in (
        "biosystems_ba400__2.hl7", "roche_cobas_pro__1.hl7", "cepheid_genexpert__2.hl7",
        "mindray_bs_compatible__1.hl7")]
    with capture_logs() as logs:
        replies = _answers(db_url, runtime(), [*queries, queries[0]])
    for raw, reply in zip([*queries, queries[0]], replies, strict=True):
        control_id = raw.split(b"\r")[0].split(b"|")[9]
        # BA400 asks for enhanced mode (MSH-15 ER, MSH-16 AL): stored, so no commit
        # error; its application ACK is the AR
        assert isinstance(reply, bytes), reply
        assert b"MSA|AR|" + control_id + b"|" in reply, reply
    for reply in replies[:4]:
        assert isinstance(reply, bytes)
        assert b"ERR|||200^Unsupported message type^HL70357|E" in reply, reply
        assert b"program the tests on the analyzer" in reply
    assert len([e for e in logs if e["event"] == "hl7.query.unsupported"]) == 4
    with sessions() as session:
        stored = [r.status for r in session.scalars(
            select(RawMessage).where(RawMessage.direction == "in").order_by(RawMessage.id))]
    assert stored == [MessageStatus.IGNORED] * 4 + [MessageStatus.DUPLICATE]
