"""Bad input, case by case (the catalogue's BAD_INPUT): the exit code, one error line naming the
file and the problem, nothing written to ``bids_dir``, no partial output. Cases that must work
(symlinks, a read-only dataset, a larger image, an extra column) run to the end."""
from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tests.conftest import tree_digest

from tests.reliability.catalogue import BAD_INPUT, Case
from tests.reliability.damage import SCENARIOS, Setup
from tests.reliability.harness import assert_no_partial_output, assert_one_error_line, run_cli


@pytest.mark.parametrize("item", BAD_INPUT, ids=lambda c: c.key)
def test_bad_input(item: Case, dataset_copy: Path, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
                   caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    setup = Setup(dataset_copy, tmp_path, tiny_model, monkeypatch)
    scenario = SCENARIOS[item.key](setup)
    argv = scenario.argv(setup)
    before = tree_digest(dataset_copy)
    try:
        code = run_cli(*argv)
    finally:
        for path in (dataset_copy, *dataset_copy.rglob("*")):  # undo read-only, for the digest and cleanup
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | stat.S_IWUSR)
    assert code == item.exit_code, caplog.text[-3000:]
    if item.exit_code:
        line = assert_one_error_line(caplog, *item.fragments())
        if scenario.culprit:
            assert str(scenario.culprit) in line, line
    else:
        assert all(part in caplog.text + capsys.readouterr().out for part in item.fragments())
    assert tree_digest(dataset_copy) == before, "the input dataset was changed"
    out = Path(argv[1])
    if out.is_dir():
        assert_no_partial_output(out)
        if item.exit_code:
            assert not [p for p in out.glob("sub-*/**/*") if p.is_file()], "a failed run left image outputs"
