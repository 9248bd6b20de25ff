"""Shipped mappings against observations as real analyzers send them.

Observations are built by hand from the facts in ../shared/corpus/SOURCES.md ("what it says"
and "quirks" lines): decoding is the drivers' job and is tested there.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from drivers.model import Observation, SpecimenResults
from engine.mapping import AnalyzerMapping, load_mapping

MAPPINGS = Path(__file__).resolve().parents[2] / "mappings"


def load(name: str) -> AnalyzerMapping:
    return load_mapping(MAPPINGS / name)


def specimen(*observations: Observation) -> SpecimenResults:
    return SpecimenResults("S1", observations)


def test_roche_cobas_c311_results() -> None:
    # corpus astm/roche_cobas_c311__1: R-3 "^^^685/" (PROTOCOLS 68), lower-case Roche units
    mapping = load("roche_cobas_c311.yaml")
    mapped = mapping.map_specimen(specimen(
        Observation("685/", "22.4", "U/l"),
        Observation("687/", "15.0", "U/l"),
        Observation("712/", "4.1", "umol/l"),
        Observation("158/", "301", "U/l", flags=("A",)),
        Observation("735/", "1.6", "umol/l"),
        Observation("717/", "5.85", "mmol/l", flags=("L",)),
        Observation("690/", "34", "umol/l"),
    ), sex="F", age_years=50)
    assert not mapped.unmapped
    by_test = {r.test_code: r for r in mapped.results}
    assert set(by_test) == {"ALT", "AST", "BILD", "LDH", "BILT", "GLU", "CREA"}
    assert by_test["GLU"].value_number == Decimal("5.9")
    assert by_test["GLU"].flag == "L"          # the analyzer's flag is kept
    assert by_test["CREA"].flag == "L"         # computed: 34 < 44 (female)
    assert by_test["LDH"].flag == "A"
    assert by_test["ALT"].units == "U/L"


def test_roche_rerun_code_in_mg_dl() -> None:
    # corpus astm/roche_cobas_c311__6: "781/dec" 1157 mg/dl, status C
    result = load("roche_cobas_c311.yaml").map_specimen(
        specimen(Observation("781/dec", "1157", "mg/dl", status="C"))).results[0]
    assert (result.test_code, result.value_number, result.units) == (
        "TRIG", Decimal("13.06"), "mmol/L")
    assert result.status == "C"
    assert result.flag == "H"


def test_roche_modular_ise_and_glucose() -> None:
    # corpus astm/roche_modular_p_ise__1: 989 Na 149 mmol/l H, 419 glucose 450 mg/dl HH
    mapped = load("roche_cobas_c311.yaml").map_specimen(specimen(
        Observation("989/", "149", "mmol/l", flags=("H",)),
        Observation("419/", "450", "mg/dl", flags=("HH",)),
    ))
    na, glu = mapped.results
    assert (na.test_code, na.flag, na.is_critical) == ("NA", "H", False)
    assert (glu.test_code, glu.value_number, glu.flag, glu.is_critical) == (
        "GLU", Decimal("25.0"), "HH", True)


def test_roche_orders_go_out_without_suffix() -> None:
    # corpus astm/roche_cobas_c311__4: O-5 "^^^717^\^^^690^"
    assert load("roche_cobas_c311.yaml").analyzer_codes_for(["GLU", "CREA"]) == ["717", "690"]


def test_sysmex_xn550() -> None:
    # corpus astm/sysmex_xn550__1: results, IP messages with "A", image file names
    mapped = load("sysmex_xn.yaml").map_specimen(specimen(
        Observation("WBC", "8.13", "10*3/uL", flags=("N",)),
        Observation("HGB", "8.0", "g/dL", flags=("N",)),
        Observation("HCT", "22.7", "%", flags=("L",)),
        Observation("PLT", "99", "10*3/uL", flags=("N",)),
        Observation("EO#", "1.80", "10*3/uL", flags=("H",)),
        Observation("Anemia", "", flags=("A",)),
        Observation("Blasts/Abn_Lympho?", "40"),
        Observation("SCAT_WDF", "PNG&R&20240628&R&2024_06_27_13_54_27_WDF.PNG", flags=("N",)),
    ), sex="M", age_years=37)
    assert not mapped.unmapped
    assert mapped.ignored == ("Anemia", "Blasts/Abn_Lympho?", "SCAT_WDF")
    by_test = {r.test_code: r for r in mapped.results}
    assert by_test["HGB"].reference_range == "13.5 - 17.5"  # Sysmex sends none
    # The analyzer said N, but the report prints the mapping's range 13.5 - 17.5 beside 8.0:
    # the flag follows the printed range (critical limit 7.0 is not crossed).
    assert by_test["HGB"].flag == "L" and not by_test["HGB"].is_critical
    assert by_test["EO"].flag == "H"


def test_sysmex_is_case_sensitive() -> None:
    mapped = load("sysmex_xn.yaml").map_specimen(specimen(Observation("wbc", "8.1", "10*3/uL")))
    assert [u.code for u in mapped.unmapped] == ["wbc"]


def test_mindray_bs240_astm() -> None:
    # corpus astm/mindray_bs240__1 and __2
    mapped = load("mindray_bs.yaml").map_specimen(specimen(
        Observation("CREAS", "3.216365", "mg/dL", reference_range="^", flags=("N",)),
        Observation("UREA", "72.506096", "mg/dL", flags=("N",)),
        Observation("SGPT", "10.484621", "U/L", flags=("N",)),
        Observation("AST/ALT", "2.808213", ""),
    ))
    assert not mapped.unmapped
    crea, urea, alt, ratio = mapped.results
    assert (crea.test_code, crea.value_number, crea.units) == ("CREA", Decimal("284"), "umol/L")
    assert urea.value_number == Decimal("12.1")
    assert alt.value_number == Decimal("10")
    assert (ratio.test_code, ratio.value_number) == ("ASTALT", Decimal("2.81"))


def test_mindray_hl7_names_from_obx4() -> None:
    # corpus hl7/mindray_cl2000i__1 (" umol/L " padded) and mindray_polish_site__1
    mapped = load("mindray_bs.yaml").map_specimen(specimen(
        Observation("TBil", "100", " umol/L ", reference_range="-", flags=("N",)),
        Observation("HDL C", "57.000000", "mg/dL", reference_range="40.000000-",
                    flags=("Normale",)),
    ))
    assert not mapped.unmapped
    tbil, hdl = mapped.results
    # The analyzer said N with no usable range; the mapping's printed range flags it H.
    assert (tbil.test_code, tbil.value_number, tbil.flag) == ("TBIL", Decimal("100"), "H")
    assert (hdl.test_code, hdl.value_number, hdl.flag) == ("HDL", Decimal("1.47"), "N")
    assert hdl.reference_range == "> 1.03"  # 40 mg/dL converted


@pytest.mark.parametrize("name", ["generic_hl7.yaml"])
def test_generic_hl7_corpus_codes(name: str) -> None:
    mapping = load(name)
    mapped = mapping.map_specimen(specimen(
        # hl7/snibe_maglumi_hl7__1
        Observation("TSH", "4.53", "uIU/mL", "0.3 to 4.5", ("H",)),
        # hl7/nihonkohden_mek9100__1
        Observation("WBC", "3.92", "10*3/uL", "4.00 - 9.00", ("L",)),
        Observation("HGB", "14.28", "g/dL", "12.00 - 18.00", ('""',)),
        # hl7/mindray_bc5380__1: LOINC codes, g/L haemoglobin, ED images, settings rows
        Observation("6690-2", "9.81", "10*9/L", "4.00-10.00", ("N",)),
        Observation("718-7", "65", "g/L", "110-150", ("L",)),
        Observation("08001", "O", value_type="IS"),
        Observation("15008", "^Image^BMP^Base64^", value_type="ED"),
        # hl7/biosystems_ba400__3 and biosystems_ba200__1
        Observation("CREATININE", "69.4413376", "mg/dL", flags=("NONE",)),
        Observation("UREA-BUN-UV", "60.7323189", "mg/dL", flags=("NONE",)),
        Observation("ALBUMIN-MAU", "14.0575142", "mg/L", flags=("025",)),
        # hl7/roche_cobas_pure__1 supplemental rows
        Observation("QC_TARGET", "8.78", "mg/dL"),
    ), sex="F", age_years=30)
    assert not mapped.unmapped, mapped.unmapped
    assert mapped.ignored == ("08001", "15008", "QC_TARGET")
    by_code = {r.analyzer_code: r for r in mapped.results}
    assert by_code["TSH"].reference_range == "0.3 - 4.5"
    assert by_code["TSH"].units == "mIU/L"
    assert by_code["HGB"].flag == "N"
    assert by_code["718-7"].value_number == Decimal("6.5")
    assert by_code["718-7"].reference_range == "11.0 - 15.0"
    assert by_code["718-7"].is_critical  # 6.5 g/dL is below the example critical 7.0
    assert by_code["CREATININE"].value_number == Decimal("6139")
    assert by_code["CREATININE"].is_critical
    assert by_code["UREA-BUN-UV"].test_code == "UREA"
    assert by_code["UREA-BUN-UV"].value_number == Decimal("21.7")
    assert by_code["ALBUMIN-MAU"].flag == "N"
    assert not mapped.warnings


def test_generic_hl7_unitless_hct_is_held() -> None:
    # hl7/mindray_bc5380__1 sends HCT 0.405 with NO units: a fraction, not %; never guessed
    mapped = load("generic_hl7.yaml").map_specimen(specimen(
        Observation("4544-3", "0.405", "", "0.370-0.480", ("N",))))
    assert mapped.unmapped[0].code == "4544-3"
    assert "not declared for HCT" in mapped.unmapped[0].reason


def test_generic_astm_corpus_codes() -> None:
    mapping = load("generic_astm.yaml")
    mapped = mapping.map_specimen(specimen(
        # astm/abbott_afinion2__1
        Observation("HbA1c", "5.9", "%"),
        # astm/horiba_yumizen_h500__1: 10E3/uL, um3, range with ^REFERENCE_RANGE
        Observation("WBC", "8.30", "10E3/uL", "4.0 - 10.0^REFERENCE_RANGE"),
        Observation("MCV", "90.6", "um3", "84.0 - 94.0^REFERENCE_RANGE"),
        # astm/snibe_maglumi_unspecified__1
        Observation("TSH", "8.174", "uIU/mL", "0.3 to 4.5"),
    ))
    assert not mapped.unmapped
    hba1c, wbc, mcv, tsh = mapped.results
    assert (hba1c.test_code, hba1c.value_number, hba1c.flag) == ("HBA1C", Decimal("5.9"), "H")
    assert wbc.reference_range == "4.0 - 10.0"
    assert (mcv.units, mcv.reference_range, mcv.flag) == ("fL", "84.0 - 94.0", "N")
    assert (tsh.value_number, tsh.flag) == (Decimal("8.17"), "H")
