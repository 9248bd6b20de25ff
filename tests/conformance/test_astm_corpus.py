"""Every file of ../shared/corpus/astm: read, replay through the link core, decode, compare.

Expected specimen ids and observations come from manifest.json ("what it says"). Those
lines are written for people, so a few are descriptive ("161 Anti-HCV (F)", "QC lot
0327121801 (O-3)"); :func:`code_matches` and :func:`specimen_matches` read them the
way the analyst wrote them: the analyzer code or specimen id must be the whole text,
its first word, or one of its words.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from drivers.astm.files import read_astm_file
from drivers.astm.generic import GenericASTMDriver
from drivers.model import MessageKind
from engine.protocols.astm_link import (
    ACK,
    ENQ,
    EOT,
    NAK,
    ASTMLink,
    FrameRejected,
    MessageReceived,
)

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus"
MANIFEST = {e["file"]: e for e in json.loads((CORPUS / "manifest.json").read_text())}
ASTM_FILES = sorted(name for name in MANIFEST if name.startswith("astm/"))

# The three negative examples of SOURCES.md: first frame checksum wrong.
NEGATIVE = {
    "astm/roche_cobas_c311__4.txt",
    "astm/roche_cobas_c311__6.txt",
    "astm/abbott_alinity_i__1.txt",
}
# PROTOCOLS 43: vendor "ASTM" that is not E1381/E1394.
NOT_ASTM = {"astm/biomerieux_mini_vidas__1.txt", "astm/arkray_spotchem_el_se1520__1.txt"}

# Per-interface driver settings a lab would configure for these analyzers.
MINDRAY = {"specimen_id_fields": ["O-4", "O-3"]}  # O-3 sample number, O-4 barcode
OPTIONS: dict[str, dict[str, Any]] = {
    "astm/euroimmun_analyzer_i__1.txt": {"specimen_id_fields": ["O-3", "O-4", "P-4"]},
    "astm/cepheid_genexpert__1.txt": {"test_code_component": 2},
    "astm/mindray_bs240__1.txt": MINDRAY,
    "astm/mindray_bs240__2.txt": MINDRAY,
    "astm/mindray_bs240__4.txt": MINDRAY,
    "astm/agappe_mispa_nano__1.txt": MINDRAY,
    "astm/mindray_cl2000i__1.txt": MINDRAY,
    "astm/mindray_cl2000i__3.txt": MINDRAY,
    "astm/mindray_bs_series__1.txt": MINDRAY,
}
# Link options: corpus:horiba_yumizen_h500__1 restarts FN at its large M frames.
LINK_OPTIONS: dict[str, dict[str, Any]] = {
    "astm/horiba_yumizen_h500__1.txt": {"strict_fn": False},
}
# Mindray QC results (H-12 QR): no R record, each control level a repeat of O-12
# (level^name^lot^expiry^mean^?^SD^result); decoded as QC specimens named by control and lot.
MINDRAY_QC = {"astm/mindray_bs240__4.txt", "astm/mindray_cl2000i__4.txt"}


def code_matches(code: str, expected: str) -> bool:
    words = expected.split()
    candidates = {code, code.rstrip("/"), code.split("/")[0]} - {""}
    return expected in candidates or any(c in words for c in candidates)


def specimen_matches(specimen: str, expected: str) -> bool:
    if not specimen:
        return False
    if expected.strip() == "QC (no sample id)":
        # a QC material the file names by its control and lot only
        return specimen.startswith("QC ")
    return (
        specimen == expected.strip()
        or expected.startswith(specimen + " ")
        or specimen in expected.replace(",", " ").split()
    )


def replay(
    sessions: tuple[tuple[bytes, ...], ...], **options: Any
) -> tuple[bytes, list[MessageReceived], list[str]]:
    """Feed every session (ENQ, frames byte by byte, EOT) to a receiving core."""
    link = ASTMLink(**options)
    replies = b""
    received: list[MessageReceived] = []
    rejected: list[str] = []
    for session in sessions:
        for chunk in [bytes([ENQ]), *session, bytes([EOT])]:
            for i in range(len(chunk)):
                link.receive_data(chunk[i : i + 1], 0.0)
                while (event := link.next_event()) is not None:
                    if isinstance(event, MessageReceived):
                        received.append(event)
                        link.message_committed(0.0)
                    elif isinstance(event, FrameRejected):
                        rejected.append(event.reason)
            replies += link.data_to_send()
    return replies, received, rejected


def test_every_corpus_file_is_covered() -> None:
    on_disk = sorted(f"astm/{p.name}" for p in (CORPUS / "astm").glob("*.txt"))
    assert on_disk == ASTM_FILES


@pytest.mark.parametrize("name", ASTM_FILES)
def test_corpus_file(name: str) -> None:
    data = (CORPUS / name).read_bytes()
    expect = MANIFEST[name]["expect"]
    capture = read_astm_file(data)

    if name in NOT_ASTM:
        # PROTOCOLS 43: detected and reported, not decoded
        assert not capture.is_astm
        assert "E1381" in capture.not_astm_reason or "frame" in capture.not_astm_reason
        assert not GenericASTMDriver.detect(data)
        return
    assert capture.is_astm, capture.not_astm_reason
    assert capture.messages

    # the file's checksum problems are reported exactly for the negative examples
    if name in NEGATIVE:
        assert [(p.session, p.frame) for p in capture.problems] == [(0, 0)]
        assert "NAK" in capture.problems[0].describe()
    else:
        assert capture.problems == ()

    # replay through a receiving link core, byte by byte (PROTOCOLS 17, 30, 42)
    replies, received, rejected = replay(capture.sessions, **LINK_OPTIONS.get(name, {}))
    if name in NEGATIVE:
        # PROTOCOLS 30(b): the first frame is NAKed on the wire
        assert replies[:3] == bytes([ACK, NAK, ACK]) or replies[:2] == bytes([ACK, NAK])
        assert rejected[0] == "checksum mismatch"
    else:
        assert NAK not in replies, rejected
        assert replies.count(ACK) == len(capture.frames) + len(capture.sessions)
        delivered = [m.text for m in received]
        assert delivered == list(capture.messages)

    # decode every message with the generic driver
    driver = GenericASTMDriver(OPTIONS.get(name, {}))
    decoded = [driver.decode(m) for m in capture.messages]
    assert all(GenericASTMDriver.detect(m) for m in capture.messages)
    specimen_ids = [s.specimen_id for msg in decoded for s in msg.specimens]
    query_ids = [i for msg in decoded for q in msg.queries for i in q.specimen_ids]
    observations = [o for msg in decoded for s in msg.specimens for o in s.observations]
    ordered = [c for msg in decoded for s in msg.specimens for c in s.ordered_codes]

    if name in MINDRAY_QC:
        assert decoded[0].kind is MessageKind.QC
        assert all(s.is_qc for msg in decoded for s in msg.specimens)

    for wanted in expect["specimen"]:
        assert any(specimen_matches(s, wanted) for s in specimen_ids + query_ids), (
            wanted,
            specimen_ids,
            query_ids,
        )
    for code, value, units in expect["observations"]:
        if code.startswith("order "):
            assert any(code_matches(c, code[len("order ") :]) for c in ordered), (code, ordered)
            continue
        found = [
            o
            for o in observations
            if code_matches(o.analyzer_code, code)
            and o.value_text.strip() == value.strip()
            and o.units == units
        ]
        seen = [(o.analyzer_code, o.value_text, o.units) for o in observations]
        assert found, (code, value, units, seen)

    # kinds the corpus documents
    if query_ids:
        assert decoded[0].kind is MessageKind.QUERY
    if not expect["specimen"] and not expect["observations"] and not query_ids:
        assert decoded[0].kind in (MessageKind.KEEP_ALIVE, MessageKind.OTHER)


def test_keep_alive_is_recognised() -> None:
    # PROTOCOLS 44: corpus:ortho_vision__1 is H + L only
    capture = read_astm_file((CORPUS / "astm/ortho_vision__1.txt").read_bytes())
    assert GenericASTMDriver().decode(capture.messages[0]).kind is MessageKind.KEEP_ALIVE


def test_queries_read_specimen_from_the_vendor_component() -> None:
    # PROTOCOLS 71: component 1 (Immucor), 2 (MAGLUMI), 3 (Roche)
    expected = {
        "astm/immucor_rvt__1.txt": [
            "VALI200301",
            "VALI200302",
            "VALI200303",
            "VALI200304",
            "VALI200305",
        ],
        "astm/snibe_maglumi_x8__1.txt": ["4957636"],
        "astm/roche_cobas_c311__2.txt": ["00002"],
    }
    for name, ids in expected.items():
        capture = read_astm_file((CORPUS / name).read_bytes())
        message = GenericASTMDriver().decode(capture.messages[0])
        assert message.kind is MessageKind.QUERY
        assert [i for q in message.queries for i in q.specimen_ids] == ids


def test_qc_messages_are_flagged() -> None:
    # O-12 = Q (corpus:roche_cobas_c311__3, abbott_alinity_ci__1) or H-12 = Q (Horiba)
    for name in ("roche_cobas_c311__3", "abbott_alinity_ci__1", "horiba_yumizen_h500__1"):
        capture = read_astm_file((CORPUS / f"astm/{name}.txt").read_bytes())
        message = GenericASTMDriver().decode(capture.messages[0])
        assert message.kind is MessageKind.QC, name


def test_order_download_seen_from_the_other_side() -> None:
    # corpus:beckman_access__3 is LIS -> analyzer: O records, no R
    capture = read_astm_file((CORPUS / "astm/beckman_access__3.txt").read_bytes())
    message = GenericASTMDriver().decode(capture.messages[0])
    assert message.kind is MessageKind.ORDERS
    assert message.specimens[0].ordered_codes == ("Ferritin",)
    assert message.specimens[0].action_code == "A"


def test_several_messages_in_one_stream() -> None:
    # PROTOCOLS 59: corpus:abbott_architect_i1000sr__3 holds five H...L messages
    capture = read_astm_file((CORPUS / "astm/abbott_architect_i1000sr__3.txt").read_bytes())
    assert len(capture.messages) == 5


def test_escaped_specimen_id_is_unescaped() -> None:
    # PROTOCOLS 50: corpus:abbott_m2000rt__2 "DB&E&23-33E22" -> "DB&23-33E22"
    capture = read_astm_file((CORPUS / "astm/abbott_m2000rt__2.txt").read_bytes())
    message = GenericASTMDriver().decode(capture.messages[0])
    assert message.specimen_ids == ("DB&23-33E22",)


def test_sequence_deviations_warn_not_reject() -> None:
    # PROTOCOLS 63: corpus:biorad_ih1000__2 restarts P at 1
    capture = read_astm_file((CORPUS / "astm/biorad_ih1000__2.txt").read_bytes())
    message = GenericASTMDriver().decode(capture.messages[0])
    assert any("PROTOCOLS 63" in w for w in message.warnings)
    assert message.kind is MessageKind.RESULTS
