"""The README stays a short user guide whose links resolve; docs/usage.md lists every flag and every
segmentation setting; no document speaks of work periods."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from bids_app.cli import build_parser
from bids_app.settings import SegmentationSettings
from bids_app.settings.fields import flatten, to_jsonable

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 250

#: The quick-start commands, exactly as a new user pastes them (CI's .ci/run ends with the tests').
DEMO_COMMAND = ("python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt && "
                ".venv/bin/python run.py --demo demo")
TEST_COMMAND = ("python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt -r requirements-test.txt "
                "&& .venv/bin/python -m pytest -q")

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} +(.+?) *$", text, flags=re.MULTILINE)}


def _local_links(path: Path) -> list[tuple[str, Path, str]]:
    """(link as written, target file, anchor) of every link to a Markdown file of the repository."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    found = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        file, _, anchor = target.partition("#")
        found.append((target, (path.parent / file).resolve() if file else path, anchor))
    return found


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines < MAX_README_LINES, f"README.md has {lines} lines; move reference material to docs/"


def test_readme_links_to_docs_resolve() -> None:
    links = _local_links(README)
    docs_links = [(t, f, a) for t, f, a in links if f.parent == DOCS]
    assert {f.name for _, f, _ in docs_links} >= {"usage.md", "outputs.md", "method.md", "reliability.md",
                                                   "benchmarks.md", "development.md"}
    for target, file, anchor in links:
        assert file.is_file(), f"README.md links to {target}, which does not exist"
        if anchor:
            assert anchor in _anchors(file), f"README.md links to {target}: no such heading in {file.name}"


@pytest.mark.parametrize("doc", sorted(p.name for p in DOCS.glob("*.md")))
def test_links_between_docs_resolve(doc: str) -> None:
    for target, file, anchor in _local_links(DOCS / doc):
        assert file.exists(), f"docs/{doc} links to {target}, which does not exist"
        if anchor and file.suffix == ".md":
            assert anchor in _anchors(file), f"docs/{doc} links to {target}: no such heading in {file.name}"


def test_readme_quick_start_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert f"\n{DEMO_COMMAND}\n" in text
    assert f"\n{TEST_COMMAND}\n" in text
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == "python -m pytest -q", "CI must run exactly the README's test command"
    # the measured test time names its commit
    assert re.search(r"Measured on .*: \d+ tests in [^(]*\(commit [0-9a-f]{7,}", text)


def _section(path: Path, heading: str) -> str:
    text = path.read_text(encoding="utf-8")
    marker = f"\n## {heading}\n"
    assert marker in text, f"{path.name} has no '## {heading}' section"
    return text.split(marker, 1)[1].split("\n## ", 1)[0]


def test_usage_lists_every_flag() -> None:
    table = "\n".join(line for line in _section(DOCS / "usage.md", "Command line").splitlines()
                      if line.startswith("|"))
    missing = []
    for action in build_parser()._actions:
        longs = [s for s in action.option_strings if s.startswith("--")]
        if not longs or longs[0] == "--help":
            continue
        if not re.search(re.escape(longs[0]) + r"(?![\w-])", table):
            missing.append(longs[0])
    assert not missing, f"docs/usage.md's flag table lacks {missing}"


def test_usage_lists_every_segmentation_setting() -> None:
    declared = set(flatten(to_jsonable(dataclasses.asdict(SegmentationSettings())), "segmentation."))
    rows = [line for line in _section(DOCS / "usage.md", "Segmentation settings").splitlines()
            if line.startswith("| `segmentation.")]
    listed = {line.split("`")[1] for line in rows}
    assert listed == declared, (f"missing: {sorted(declared - listed)}; not declared: {sorted(listed - declared)}")


WORK_PERIOD = re.compile(
    r"\b(this|that|previous|next|earlier|later|last) sessions?\b|\bsession \d|\bsession's\b"
    r"|\bwork(ing)? sessions?\b|\bper session\b", re.IGNORECASE)


def test_no_work_period_sessions() -> None:
    """"Session" means a BIDS session (``ses-``) only: never a period of work."""
    files = [README, *DOCS.glob("*.md")]
    for folder in ("bids_app", "tests", "benchmarks", "scripts"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md", ".sh", ".sbatch")]
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
            for p in files if p.resolve() != Path(__file__).resolve()
            for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if WORK_PERIOD.search(line)]
    assert not hits, "\n".join(hits)
