"""Observation and ResultInput are built as plain slots dataclasses (a frozen one costs
1.5 µs to build against 0.2, fifty times per 25-result message) and declared frozen to the
type checker, which CI runs over the code: an assignment to a field does not type-check."""

from __future__ import annotations

from pathlib import Path

import pytest

from drivers.model import Observation
from lis_bridge.types import ResultInput

REPO = Path(__file__).resolve().parents[2]


def test_values_compare_and_hash_by_their_fields() -> None:
    a, b = Observation("GLU", "5.4", "mmol/L"), Observation("GLU", "5.4", "mmol/L")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert Observation("GLU", "5.5") != a
    r = ResultInput("GLU", "GLU", "5.4")
    assert {r: 1}[ResultInput("GLU", "GLU", "5.4")] == 1


def test_the_type_checker_refuses_an_assignment_to_a_field(tmp_path: Path) -> None:
    api = pytest.importorskip("mypy.api")
    snippet = tmp_path / "assign.py"
    snippet.write_text(
        "from drivers.model import Observation\n"
        "from lis_bridge.types import ResultInput\n"
        "o = Observation('GLU', '5.4')\n"
        "o.value_text = '9.9'\n"
        "r = ResultInput('GLU', 'GLU', '5.4')\n"
        "r.flag = 'H'\n")
    out, _, status = api.run([str(snippet), "--no-incremental", "--follow-imports=silent",
                              "--cache-dir=/dev/null"])
    assert status == 1, out
    assert '"value_text" defined in "Observation" is read-only' in out
    assert '"flag" defined in "ResultInput" is read-only' in out
