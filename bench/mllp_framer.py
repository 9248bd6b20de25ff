"""Microbenchmark: MLLP framer + HL7 tokenizer + generic decode + ACK, vs python-hl7.

Run: ``.venv/bin/python bench/mllp_framer.py``. Prints milliseconds per 25-OBX ORU^R01.
"""

from __future__ import annotations

import timeit

import hl7

from drivers.hl7.ack import build_ack
from drivers.hl7.generic import GenericHL7Driver
from drivers.hl7.parser import parse_message
from engine.protocols.mllp import MLLPFramer, frame


def make_oru(n_obx: int = 25) -> bytes:
    segments = [
        "MSH|^~\\&|BENCH|LAB|LIS|LAB|20240101120000||ORU^R01^ORU_R01|CTRL0001|P|2.5.1|||NE|AL||"
        "UNICODE UTF-8",
        "PID|1||PAT0001^^^LAB^MR||DOE^JANE",
        "OBR|1|ORD1|SPEC0001|CBC^Complete blood count^L",
    ]
    for i in range(1, n_obx + 1):
        segments.append(
            f"OBX|{i}|NM|{1000 + i}^Test {i}^99LAB||{i}.25|mmol/L|1.0-9.0|N~A|||F|||"
            f"20240101115900||OPER|ANALYZER01^SN123"
        )
    return ("\r".join(segments) + "\r").encode()


def per_call_ms(func: object, number: int) -> float:
    timer = timeit.Timer(func)  # type: ignore[arg-type]
    best = min(timer.repeat(repeat=5, number=number))
    return best / number * 1000


def main() -> None:
    raw = make_oru()
    framed = frame(raw)
    driver = GenericHL7Driver()

    def framer_run() -> None:
        framer = MLLPFramer()
        framer.receive_data(framed)
        framer.next_message()

    text = raw.decode()
    parsed = parse_message(raw, header_only=True)
    rows = [
        ("MLLP framer (one block)", per_call_ms(framer_run, 20000)),
        ("tokenize (parse_message)", per_call_ms(lambda: parse_message(raw), 5000)),
        ("tokenize MSH only", per_call_ms(lambda: parse_message(raw, header_only=True), 20000)),
        ("generic driver decode", per_call_ms(lambda: driver.decode(raw), 2000)),
        (
            "build_ack",
            per_call_ms(lambda: build_ack(parsed, "AA", "ACK0001", "20240101120001"), 20000),
        ),
        ("python-hl7 hl7.parse", per_call_ms(lambda: hl7.parse(text), 200)),
    ]
    for label, ms in rows:
        print(f"{label:28s} {ms:8.4f} ms")


if __name__ == "__main__":
    main()
