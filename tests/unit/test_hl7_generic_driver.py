"""The generic HL7 driver on messages written for these tests (PROTOCOLS 92-99)."""

from __future__ import annotations

from datetime import datetime

import pytest

from drivers.hl7.generic import GenericHL7Driver
from drivers.hl7.parser import HL7ParseError
from drivers.model import MessageKind
from engine.errors import RemoteProtocolError


def msg(*segments: str) -> bytes:
    return ("\r".join(segments) + "\r").encode()


MSH_ORU = "MSH|^~\\&|CHEM1|LAB|LIS|HOSP|20240102030405||ORU^R01^ORU_R01|C1|P|2.5"
MSH_OUL = (
    "MSH|^~\\&|cobas pro|ROCHE|Host||20240102030405+0100||OUL^R22^OUL_R22|C2|P|2.5.1|||NE|AL"
    "||UNICODE UTF-8|||LAB-29^IHE"
)


def test_name_and_protocol() -> None:
    assert GenericHL7Driver.name == "hl7-generic"
    assert GenericHL7Driver.protocol == "hl7"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"MSH|^~\\&|A", True),
        (b"\x0b\r\nMSH|^~\\&|A", True),
        (b"H|\\^&|||", False),
        (b"MSHX", False),
        (b"", False),
    ],
)
def test_detect(raw: bytes, expected: bool) -> None:
    assert GenericHL7Driver().detect(raw) is expected


def test_oru_r01_full_observation() -> None:
    # PROTOCOLS 92, 93: OBX fields read into the Observation.
    raw = msg(
        MSH_ORU,
        "PID|1||PAT1^^^LAB^MR",
        "ORC|RE|ORD1|SPEC1",
        "OBR|1|ORD1|SPEC1|CHEM^Chemistry^L",
        "OBX|1|NM|GLU^Glucose^L|1|> 15.0|mmol/L^^UCUM|3.9-6.1|HH~A|||F|||20240102020000||OP||"
        "MOD1^SN1~X",
        "OBX|2|ST|COM^Comment^L||line\\.br\\two \\T\\ more||||||P",
    )
    decoded = GenericHL7Driver().decode(raw)
    assert decoded.kind is MessageKind.RESULTS
    assert decoded.protocol == "hl7"
    assert decoded.sender == "CHEM1|LAB"
    assert decoded.control_id == "C1"
    assert decoded.message_type == "ORU^R01^ORU_R01"
    assert decoded.version == "2.5"
    assert decoded.sent_at == datetime(2024, 1, 2, 3, 4, 5)
    assert decoded.specimen_ids == ("SPEC1",)
    specimen = decoded.specimens[0]
    assert specimen.patient_id_hint == "PAT1"
    assert specimen.ordered_codes == ("CHEM",)
    assert specimen.action_code == "RE"
    glu, com = specimen.observations
    assert glu.analyzer_code == "GLU"
    assert glu.analyzer_name == "Glucose"
    assert glu.value_text == "> 15.0"
    assert glu.comparator == ">"
    assert str(glu.number) == "15.0"
    assert glu.units == "mmol/L"
    assert glu.reference_range == "3.9-6.1"
    assert glu.flags == ("HH", "A")
    assert glu.status == "F"
    assert glu.observed_at == datetime(2024, 1, 2, 2, 0)
    assert glu.equipment == "MOD1"
    assert glu.value_type == "NM"
    assert glu.sub_id == "1"
    assert com.value_text == "line\ntwo & more"
    assert com.status == "P"
    assert decoded.warnings == ()


def test_several_pid_groups() -> None:
    # PROTOCOLS 92: several patient groups in one ORU.
    raw = msg(
        MSH_ORU,
        "PID|1||PA",
        "OBR|1||S1|A",
        "OBX|1|NM|A||1",
        "PID|2||PB",
        "OBR|1||S2|B",
        "OBX|1|NM|B||2",
    )
    decoded = GenericHL7Driver().decode(raw)
    assert decoded.specimen_ids == ("S1", "S2")
    assert [s.patient_id_hint for s in decoded.specimens] == ["PA", "PB"]
    assert [o.analyzer_code for s in decoded.specimens for o in s.observations] == ["A", "B"]


def test_same_specimen_in_two_order_groups_is_merged() -> None:
    raw = msg(MSH_ORU, "OBR|1||S1|A", "OBX|1|NM|A||1", "OBR|2||S1|B", "OBX|1|NM|B||2")
    decoded = GenericHL7Driver().decode(raw)
    assert decoded.specimen_ids == ("S1",)
    assert decoded.specimens[0].ordered_codes == ("A", "B")
    assert len(decoded.specimens[0].observations) == 2


def test_oru_without_pid_and_without_structure() -> None:
    # PROTOCOLS 92: no PID (QC), MSH-9 without structure.
    raw = msg(
        "MSH|^~\\&|||||20240102||ORU^R01|9|P|2.3.1",
        "OBR|1||S9|X",
        "OBX|1|NM|X||1",
    )
    decoded = GenericHL7Driver().decode(raw)
    assert decoded.message_type == "ORU^R01"
    assert decoded.sender == ""
    assert decoded.specimen_ids == ("S9",)


def test_oul_r22_spm_before_obr() -> None:
    # PROTOCOLS 98, 99: SPM-2 EIP id&BARCODE, results under each OBR, ORC after OBR.
    raw = msg(
        MSH_OUL,
        "SPM|1|140799&BARCODE||SERPLAS^^99ROC|||||||P^^HL70369",
        "SAC|||140799^BARCODE",
        'OBR|1|""||10020^^99ROC',
        "ORC|SC||||CM",
        "TQ1|||||||||R",
        "OBX|1|NM|10020^10020^99ROC^^^IHELAW|1|112|ng/dL^^99ROC||N^^HL70078|||F|||||||"
        "e801^ROCHE~2037-06^ROCHE|20220812153714",
        'OBR|2|""||10030^^99ROC',
        "ORC|SC||||CM",
        "OBX|1|NM|10030^10030^99ROC|1|7|U/L",
        "SPM|2|140800&BARCODE",
        'OBR|1|""||10020^^99ROC',
        "OBX|1|NM|10020^10020^99ROC|1|99|ng/dL",
    )
    decoded = GenericHL7Driver().decode(raw)
    assert decoded.kind is MessageKind.RESULTS
    assert decoded.sender == "cobas pro|ROCHE"
    assert decoded.specimen_ids == ("140799", "140800")
    first, second = decoded.specimens
    assert [o.analyzer_code for o in first.observations] == ["10020", "10030"]
    assert first.ordered_codes == ("10020", "10030")
    assert first.action_code == "SC"
    assert first.observations[0].equipment == "e801"
    # OBX-14 empty: OBX-19 analysis time is used
    assert first.observations[0].observed_at == datetime(2022, 8, 12, 15, 37, 14)
    assert [o.value_text for o in second.observations] == ["99"]
    assert decoded.extra["profile"] == "LAB-29^IHE"


def test_qc_by_spm11() -> None:
    # PROTOCOLS 99: SPM-11 = Q marks QC; all specimens QC -> kind QC.
    raw = msg(MSH_OUL, "SPM|1|LOT7||SER|||||||Q", "OBR|1|||GLU", "OBX|1|NM|GLU||5")
    decoded = GenericHL7Driver().decode(raw)
    assert decoded.kind is MessageKind.QC
    assert decoded.specimens[0].is_qc


@pytest.mark.parametrize("flag", ["1", "2"])
def test_qc_and_calibration_by_mindray_msh16(flag: str) -> None:
    # PROTOCOLS 88: Mindray MSH-16 = 2 means QC, 1 calibration: neither is a patient result.
    raw = msg(f"MSH|^~\\&|||||20240102||ORU^R01|1|P|2.3.1||||{flag}", "OBR|1||S|X",
              "OBX|1|NM|X||1")
    decoded = GenericHL7Driver().decode(raw)
    assert decoded.kind is MessageKind.QC
    assert decoded.specimens[0].is_qc
    assert decoded.extra["mindray_result_type"] == flag


@pytest.mark.parametrize(
    ("obx", "code", "name"),
    [
        ("OBX|1|NM||Na|138|mmol/L", "Na", ""),  # OBX-3 empty
        ("OBX|1|NM|2|TBil|100| umol/L ", "TBil", "2"),  # OBX-3 a bare test number
        ("OBX|1|NM|GLU^Glucose|1|5|mmol/L", "GLU", "Glucose"),  # OBX-4 a real sub-id
        ("OBX|1|ST|CTNG&CT&CT-NG Assay&1|CT|NOT DETECTED^", "CTNG", ""),  # subcomponents
    ],
)
def test_code_field_auto(obx: str, code: str, name: str) -> None:
    # PROTOCOLS 94: test name in OBX-4 when OBX-3 is empty or a bare number (Mindray BS/CL).
    raw = msg(MSH_ORU, "OBR|1||S|X", obx)
    observation = GenericHL7Driver().decode(raw).specimens[0].observations[0]
    assert observation.analyzer_code == code
    assert observation.analyzer_name == name


def test_code_field_forced() -> None:
    raw = msg(MSH_ORU, "OBR|1||S|X", "OBX|1|NM|2|TBil|100")
    assert (
        GenericHL7Driver({"code_field": "OBX-3"})
        .decode(raw)
        .specimens[0]
        .observations[0]
        .analyzer_code
        == "2"
    )
    assert (
        GenericHL7Driver({"code_field": "OBX-4"})
        .decode(raw)
        .specimens[0]
        .observations[0]
        .analyzer_code
        == "TBil"
    )


def test_units_stripped_and_null_flags_dropped() -> None:
    # PROTOCOLS 94: "" nulls in OBX-8; padded units.
    raw = msg(
        MSH_ORU, "OBR|1||S|X", 'OBX|1|NM|X||1| mg/dL ||""^""^HL70078', "OBX|2|NM|Y||2|||002~029"
    )
    observations = GenericHL7Driver().decode(raw).specimens[0].observations
    assert observations[0].units == "mg/dL"
    assert observations[0].flags == ()
    assert observations[1].flags == ("002", "029")


def test_masked_value_kept_raw() -> None:
    # PROTOCOLS 94: masked NM values stay as sent; they parse to no number.
    raw = msg(MSH_ORU, "OBR|1||S|X", "OBX|1|NM|WBC||***.**|10*9/L")
    observation = GenericHL7Driver().decode(raw).specimens[0].observations[0]
    assert observation.value_text == "***.**"
    assert observation.number is None


def test_value_repetitions_and_components_kept() -> None:
    raw = msg(MSH_ORU, "OBR|1||S|X", "OBX|1|NA|CT||41.47^^37.53", "OBX|2|EI|Q||19132~19112^")
    observations = GenericHL7Driver().decode(raw).specimens[0].observations
    assert observations[0].value_text == "41.47^^37.53"
    assert observations[1].value_text == "19132~19112"


def test_specimen_id_order_option() -> None:
    raw = msg(MSH_ORU, "OBR|1|BARCODE1|10|X", "OBX|1|NM|X||1")
    assert GenericHL7Driver().decode(raw).specimen_ids == ("10",)
    driver = GenericHL7Driver({"specimen_id_order": ["OBR-2", "OBR-3"]})
    assert driver.decode(raw).specimen_ids == ("BARCODE1",)


def test_null_ids_are_skipped() -> None:
    raw = msg(MSH_OUL, 'SPM|1|""&&""', "SAC|||25133", 'OBR|1|""||CBC', "OBX|1|NM|WBC||3.9")
    assert GenericHL7Driver().decode(raw).specimen_ids == ("25133",)


def test_no_specimen_id_is_a_warning() -> None:
    raw = msg(MSH_OUL, "OBX|1|NM|UREA||60.7|mg/dL")
    decoded = GenericHL7Driver().decode(raw)
    assert decoded.specimen_ids == ("",)
    assert decoded.specimens[0].observations[0].analyzer_code == "UREA"
    assert any("without a specimen id" in w for w in decoded.warnings)


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="OBR-3"):
        GenericHL7Driver({"specimen_id_order": ["OBR3"]})
    with pytest.raises(ValueError, match="unknown"):
        GenericHL7Driver({"colour": "blue"})
    with pytest.raises(ValueError, match="code_field"):
        GenericHL7Driver({"code_field": "OBX-5"})


def test_encoding_option() -> None:
    raw = msg(MSH_ORU + "||||||ASCII", "OBR|1||S|X", "OBX|1|ST|X||Zürich").replace(
        "ü".encode(), "ü".encode("latin-1")
    )
    observation = GenericHL7Driver({"encoding": "latin-1"}).decode(raw).specimens[0].observations[0]
    assert observation.value_text == "Zürich"


def test_qbp_q11_query() -> None:
    # PROTOCOLS 95, 97
    raw = msg(
        "MSH|^~\\&|BA400|Biosystems|Host||20230511180307||QBP^Q11^QBP_Q11|Q1|P|2.5.1",
        "QPD|WOS^Work Order Step^IHE_LABTF|tag1|32971968",
        "RCP|I||R",
    )
    decoded = GenericHL7Driver().decode(raw)
    assert decoded.kind is MessageKind.QUERY
    assert [q.specimen_ids for q in decoded.queries] == [("32971968",)]


def test_qbp_wos_all() -> None:
    # PROTOCOLS 97: Query All.
    raw = msg("MSH|^~\\&|A||H||2023||QBP^Q11^QBP_Q11|Q2|P|2.5.1", "QPD|WOS_ALL|tag2")
    decoded = GenericHL7Driver().decode(raw)
    assert decoded.queries[0].all_specimens


def test_qbp_z03_genexpert() -> None:
    # PROTOCOLS 97: GeneXpert Z03 puts the specimen in QPD-4.
    raw = msg("MSH|^~\\&|GX||LIS||2007||QBP^Z03^QBP_Z03|Q3|P|2.5", "QPD|Z03^HOST QUERY|t|PAT|SPEC9")
    assert GenericHL7Driver().decode(raw).queries[0].specimen_ids == ("SPEC9",)


def test_ack_kind() -> None:
    raw = msg("MSH|^~\\&|H||A||2023||ACK^R22^ACK|A1|P|2.5.1", "MSA|AE|C2|held")
    decoded = GenericHL7Driver().decode(raw)
    assert decoded.kind is MessageKind.ACK
    assert decoded.extra["ack_code"] == "AE"
    assert decoded.extra["ack_control_id"] == "C2"
    assert decoded.extra["ack_text"] == "held"


def test_other_kind() -> None:
    raw = msg("MSH|^~\\&|A||B||2023||ADT^A01|X|P|2.5", "PID|1||P")
    assert GenericHL7Driver().decode(raw).kind is MessageKind.OTHER


def test_orders_kind() -> None:
    raw = msg(
        "MSH|^~\\&|LIS||YP8K||2016||OML^O33^OML_O33|O1|P|2.5",
        "SPM|1|2016001",
        "ORC|NW|L1|L1",
        "OBR|1|L1|L1|CBC^CBC profile",
    )
    decoded = GenericHL7Driver({"specimen_id_order": ["SPM-2"]}).decode(raw)
    assert decoded.kind is MessageKind.ORDERS
    assert decoded.specimen_ids == ("2016001",)
    assert decoded.specimens[0].ordered_codes == ("CBC",)


def test_undecodable_raises_remote_protocol_error() -> None:
    with pytest.raises(HL7ParseError) as info:
        GenericHL7Driver().decode(b"MSH|^~\\&|A|B|C|D||RSP^K11|x|P|2.5.1\r")
    assert isinstance(info.value, RemoteProtocolError)
    assert "MSH-9" in str(info.value)


def test_unreadable_msh7_is_a_warning() -> None:
    raw = msg("MSH|^~\\&|A||B||notadate||ORU^R01|X|P|2.5", "OBR|1||S|X", "OBX|1|NM|X||1")
    decoded = GenericHL7Driver().decode(raw)
    assert decoded.sent_at is None
    assert any("MSH-7" in w for w in decoded.warnings)


@pytest.mark.parametrize(
    ("obx5", "value", "comparator", "number"),
    [
        ("^30", "30", "", "30"),
        (">^25", ">25", ">", "25"),
        ("<^2", "<2", "<", "2"),
        ("=^7", "7", "", "7"),
        ("<=^0.5", "<=0.5", "<=", "0.5"),
        ("^1^:^40", "1:40", "", None),  # a ratio stays text
        ("^2^-^5", "2-5", "", None),  # a range stays text
    ],
)
def test_sn_value_reads_comparator_and_number(
    obx5: str, value: str, comparator: str, number: str | None
) -> None:
    # PROTOCOLS 93: OBX-2 SN is comparator^num1[^separator^num2].
    raw = msg(MSH_ORU, "OBR|1||S1|CHEM", f"OBX|1|SN|GLU||{obx5}|mmol/L|3.9-6.1|||F")
    obs = GenericHL7Driver().decode(raw).specimens[0].observations[0]
    assert obs.value_text == value
    assert obs.value_type == "SN"
    assert obs.comparator == comparator
    assert (str(obs.number) if obs.number is not None else None) == number


def test_nte_after_obx_is_its_comment() -> None:
    # PROTOCOLS 92, 98: {OBX [NTE]}; NTE-3 repetitions one line each, components joined.
    raw = msg(
        MSH_OUL,
        "SPM|1|S1",
        "OBR|1||S1|CHEM",
        "NTE|1||order note",  # the order's: no result gets it
        "OBX|1|NM|NA||140|mmol/L",
        "OBX|2|NM|K||6.0|mmol/L",
        "TCD|K",
        "NTE|1|L|Sample haemolysed~K falsely raised",
        "NTE|2|L|Notes^^see report",
        "NTE|3",
        "OBR|2||S2|CHEM",
        "NTE|1||second order note",
        "OBX|1|ST|CMT||x",
    )
    s1, s2 = GenericHL7Driver().decode(raw).specimens
    na, k = s1.observations
    assert na.comments == ()
    assert k.comments == ("Sample haemolysed\nK falsely raised", "Notes see report")
    assert s2.observations[0].comments == ()


def test_orc_before_the_next_obr_belongs_to_it() -> None:
    # PROTOCOLS 92: ORU order is [ORC] OBR; an OBR with no OBX must not take the next ORC.
    raw = msg(
        MSH_ORU,
        "OBR|1||S001|PANEL",
        "ORC|RE||S002",
        "OBR|2||",
        "OBX|1|NM|GLU||5.0|mmol/L|||||F",
    )
    decoded = GenericHL7Driver({"specimen_id_order": ["ORC-3", "OBR-3"]}).decode(raw)
    assert [(s.specimen_id, len(s.observations)) for s in decoded.specimens] == [
        ("S001", 0), ("S002", 1)
    ]
    assert decoded.specimens[1].action_code == "RE"


def test_law_orc_after_obr_without_obx_stays_with_it() -> None:
    # PROTOCOLS 98: LAW order is OBR ORC [TQ1] per order, even when an order has no OBX.
    raw = msg(
        MSH_OUL,
        "SPM|1|S1",
        "OBR|1||S1|A",
        "ORC|SC||S1",
        "TQ1|1",
        "OBR|2||S1|B",
        "ORC|CM||S1",
        "OBX|1|NM|B||1",
    )
    specimen = GenericHL7Driver().decode(raw).specimens[0]
    assert specimen.action_code == "SC"
    assert specimen.ordered_codes == ("A", "B")


def test_mindray_msh16_zero_is_patient_results() -> None:
    raw = msg("MSH|^~\\&|||||20240102||ORU^R01|1|P|2.3.1||||0", "OBR|1||S|X", "OBX|1|NM|X||1")
    decoded = GenericHL7Driver().decode(raw)
    assert decoded.kind is MessageKind.RESULTS
    assert not decoded.specimens[0].is_qc


@pytest.mark.parametrize(
    ("obr3", "specimen_id"),
    [("AB\\T\\12", "AB&12"), ("&ID7&BARCODE", "ID7"), ('""&S9', "S9"), ("S\\F\\1^X", "S|1")],
)
def test_specimen_id_split_on_subcomponents_before_unescaping(
    obr3: str, specimen_id: str
) -> None:
    # PROTOCOLS 81, 99: an escaped "&" (\T\) is part of the id, a raw "&" separates (EIP).
    raw = msg(MSH_ORU, f"OBR|1||{obr3}|X", "OBX|1|NM|GLU||5")
    assert GenericHL7Driver().decode(raw).specimen_ids == (specimen_id,)
