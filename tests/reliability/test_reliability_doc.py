"""docs/reliability.md's table is the catalogue, row for row, and every catalogue row is tested."""
from __future__ import annotations

import re
from pathlib import Path

from tests.reliability import catalogue

HERE = Path(__file__).parent
RELIABILITY_DOC = HERE.parent.parent / "docs" / "reliability.md"
SECTION = "\n## Cases\n"


def documented_table() -> str:
    text = RELIABILITY_DOC.read_text(encoding="utf-8")
    assert SECTION in text, f"{RELIABILITY_DOC} has no '## Cases' section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return "\n".join(line for line in section.splitlines() if line.startswith("|"))


def test_documented_table_is_the_catalogue() -> None:
    assert documented_table() == catalogue.markdown_table(), (
        "regenerate the table in docs/reliability.md: python -m tests.reliability.catalogue")


def test_every_runtime_case_is_checked_by_a_test() -> None:
    """Bad-input rows are parametrised over directly; every other row is looked up by a test, by its
    key: ``case("key")``, or as a string in a parametrised list of keys."""
    sources = "".join(p.read_text() for p in HERE.glob("test_*.py"))
    used = set(re.findall(r'"([a-z0-9-]+)"', sources))
    others = {c.key for c in catalogue.ALL_CASES} - {c.key for c in catalogue.BAD_INPUT}
    assert others <= used, others - used
    from tests.reliability.damage import SCENARIOS

    assert set(SCENARIOS) == {c.key for c in catalogue.BAD_INPUT}


def test_the_catalogue_keeps_its_breadth() -> None:
    assert len(catalogue.ALL_CASES) >= 70
    assert len(catalogue.CATALOGUE) == len(catalogue.ALL_CASES), "two rows share a key"
