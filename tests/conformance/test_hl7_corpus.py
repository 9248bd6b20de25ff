"""Every HL7 file of the shared corpus through the framer, tokenizer, generic driver and ACK
builder, checked against the "what it says" reading in manifest.json (PROTOCOLS 75-99)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from drivers.hl7.ack import build_ack, is_ack
from drivers.hl7.generic import GenericHL7Driver
from drivers.hl7.parser import HL7ParseError, parse_message, split_messages
from drivers.model import AnalyzerMessage, MessageKind, Observation
from engine.protocols.mllp import MLLPFramer, frame

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus"
NEGATIVE = {"hl7/hmis_lis_rsp_to_ba400__1.hl7"}

# How a lab would configure the interface for these analyzers (per-interface options).
# Mindray CL: OBR-2 is the sample barcode, OBR-3 the sample number (manifest notes).
MINDRAY_CL = {"specimen_id_order": ["OBR-2", "OBR-3"]}
OPTIONS: dict[str, dict[str, Any]] = {
    "hl7/mindray_cl2000i__1.hl7": MINDRAY_CL,
    "hl7/mindray_cl1200i__1.hl7": {**MINDRAY_CL, "code_field": "OBX-3"},
    "hl7/mindray_polish_site__1.hl7": MINDRAY_CL,
    # An order download (LIS -> analyzer) names the specimen in SPM-2.
    "hl7/horiba_yumizen_p8000__1.hl7": {"specimen_id_order": ["SPM-2", "OBR-3"]},
}
# Readings the generic driver does not attempt; a vendor driver's job.
NOT_GENERIC = {
    # Mindray CL QC: the whole result sits in one OBR with private field meanings, no OBX.
    "hl7/mindray_cl2000i__3.hl7": "Mindray private QC layout in OBR-12..21",
}


def _manifest() -> list[dict[str, Any]]:
    path = CORPUS / "manifest.json"
    if not path.exists():
        return []
    entries = json.loads(path.read_text(encoding="utf-8"))
    return [e for e in entries if str(e["file"]).startswith("hl7/")]


ENTRIES = _manifest()
pytestmark = pytest.mark.skipif(not ENTRIES, reason=f"the shared corpus is not at {CORPUS}")


def _ids(entry: dict[str, Any]) -> str:
    return str(entry["file"]).removeprefix("hl7/")


def test_manifest_lists_every_hl7_file() -> None:
    on_disk = {f"hl7/{p.name}" for p in (CORPUS / "hl7").glob("*.hl7")}
    assert on_disk == {e["file"] for e in ENTRIES}


def _decode_file(entry: dict[str, Any]) -> list[AnalyzerMessage]:
    driver = GenericHL7Driver(OPTIONS.get(entry["file"]))
    raw = (CORPUS / entry["file"]).read_bytes()
    return [driver.decode(message) for message in split_messages(raw)]


def _specimen_reading(text: str) -> str:
    # "5 (OBR-3 sample no); patient id PDL24" -> "5"
    return re.split(r" \(|; |, ", text, maxsplit=1)[0].strip()


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e["file"] not in NEGATIVE], ids=_ids)
def test_decodes_as_manifest_says(entry: dict[str, Any]) -> None:
    decoded = _decode_file(entry)
    assert decoded, "no message found in the file"
    expect = entry["expect"]
    kinds = {m.kind for m in decoded}
    if entry.get("kind") == "query":
        assert kinds == {MessageKind.QUERY}
    elif entry.get("kind") == "qc":
        assert kinds == {MessageKind.QC}
    if entry["file"] in NOT_GENERIC:
        # Still decodes and is recognised as QC (Mindray MSH-16 = 2, PROTOCOLS 88).
        assert kinds == {MessageKind.QC}
        return
    specimen_ids = [sid for m in decoded for sid in m.specimen_ids if sid]
    specimen_ids += [sid for m in decoded for q in m.queries for sid in q.specimen_ids]
    assert specimen_ids == [_specimen_reading(s) for s in expect["specimen"]]
    pool = [(s.specimen_id, s, o) for m in decoded for s in m.specimens for o in s.observations]
    for code, value, units in expect["observations"]:
        if code.startswith("order "):  # an ordered test, not a result (OML^O33)
            ordered = {c for m in decoded for s in m.specimens for c in s.ordered_codes}
            assert code.removeprefix("order ") in ordered
            continue
        match = _find(pool, code, value, units)
        assert match is not None, f"no observation {code!r} = {value!r} {units!r} in {pool}"
        pool.remove(match)


def _find(
    pool: list[tuple[str, Any, Observation]], code: str, value: str, units: str
) -> tuple[str, Any, Observation] | None:
    note = ""
    found = re.match(r"^(.*?) \((.*)\)$", code)
    if found:
        code, note = found.group(1), found.group(2)
    sub_id = ""
    found = re.match(r"^(.*?) sub (\S+)$", code)
    if found:
        code, sub_id = found.group(1), found.group(2)
    tokens = code.split()
    candidates = {code, *tokens, " ".join(tokens[1:])}
    candidates.discard("")
    for item in pool:
        specimen_id, _, obs = item
        if obs.value_text != value or obs.units != units:
            continue
        if obs.analyzer_code not in candidates:
            continue
        if sub_id and obs.sub_id != sub_id:
            continue
        if note and note.startswith("h") and note != specimen_id:
            continue  # "TSH (h1)": the reading names the specimen
        return item
    return None


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e["file"] in NEGATIVE], ids=_ids)
def test_negative_example_refused(entry: dict[str, Any]) -> None:
    # The malformed RSP^K11 (MSH-7 missing, later fields shifted) must be refused clearly.
    with pytest.raises(HL7ParseError) as info:
        _decode_file(entry)
    text = str(info.value)
    assert "MSH-9" in text
    assert "shifted" in text


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e["file"] not in NEGATIVE], ids=_ids)
def test_every_message_can_be_acknowledged(entry: dict[str, Any]) -> None:
    # PROTOCOLS 83, 85, 89: MSA-2 echoes MSH-10; ACKs are never answered.
    for raw in split_messages((CORPUS / entry["file"]).read_bytes()):
        message = parse_message(raw)
        if is_ack(message):
            assert message.message_type in ("ACK", "QCK")
            continue
        ack = parse_message(build_ack(message, "AA", "LR1", "20240101000000"))
        msa = ack.segment("MSA")
        assert msa is not None
        assert msa.field(2) == message.control_id
        assert ack.msh.field(3) == message.msh.field(5)
        assert is_ack(ack)


@pytest.mark.parametrize("entry", ENTRIES, ids=_ids)
@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 9])
def test_framed_corpus_survives_any_chunking(entry: dict[str, Any], size: int) -> None:
    # PROTOCOLS 75, 77: every corpus message, framed, read back in chunks of 1..9 bytes.
    messages = split_messages((CORPUS / entry["file"]).read_bytes())
    stream = b"\r\n".join(frame(m) for m in messages)
    framer = MLLPFramer()
    out: list[object] = []
    for i in range(0, len(stream), size):
        framer.receive_data(stream[i : i + size])
        while (event := framer.next_message()) is not None:
            out.append(event)
    assert out == messages
