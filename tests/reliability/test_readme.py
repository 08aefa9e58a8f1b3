"""The README's Reliability table is the catalogue, row for row, and every catalogue row is tested."""
from __future__ import annotations

import re
from pathlib import Path

from tests.reliability import catalogue

HERE = Path(__file__).parent
README = HERE.parent.parent / "README.md"


def readme_table() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Reliability\n", 1)[1].split("\n## ", 1)[0]
    return "\n".join(line for line in section.splitlines() if line.startswith("|"))


def test_readme_table_is_the_catalogue() -> None:
    assert readme_table() == catalogue.markdown_table(), "regenerate it: python -m tests.reliability.catalogue"


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
