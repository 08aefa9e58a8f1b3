"""Tests of the bids-validator-deno wrapper."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import sys
from pathlib import Path

import pytest

from bids_app.bids import validate as v
from bids_app.errors import BidsValidationError, UsageError
from tests.test_derivatives import make_raw_dataset

needs_validator = pytest.mark.skipif(v.find_validator() is None, reason="bids-validator-deno not installed")


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file and directory below root with content hash and mtime (ns)."""
    snap = {".": ("dir", root.stat().st_mtime_ns)}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        snap[rel] = (digest, path.stat().st_mtime_ns)
    return snap


def _fake_validator(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fake-validator"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


@pytest.fixture
def raw_dataset(tmp_path: Path) -> Path:
    return make_raw_dataset(tmp_path / "raw")


@needs_validator
def test_valid_dataset_passes_and_is_untouched(raw_dataset: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = _snapshot(raw_dataset)
    with caplog.at_level(logging.INFO, logger="bids_app.bids.validate"):
        result = v.validate_bids_dataset(raw_dataset)
    assert result is not None and result.ok and result.errors == ()
    assert result.n_warnings > 0 and isinstance(result.raw, dict)
    assert f"{result.n_warnings} warnings" in caplog.text
    assert v.summarise(result).startswith(f"BIDS validation passed for {raw_dataset}: 0 errors")
    assert _snapshot(raw_dataset) == before


@needs_validator
def test_badly_named_file_fails(raw_dataset: Path) -> None:
    bad = raw_dataset / "sub-01/anat/sub-01_T2.nii.gz"
    bad.write_bytes((raw_dataset / "sub-01/anat/sub-01_T2w.nii.gz").read_bytes())
    before = _snapshot(raw_dataset)
    with pytest.raises(BidsValidationError) as info:
        v.validate_bids_dataset(raw_dataset)
    message = str(info.value)
    assert info.value.exit_code == 16
    assert message.splitlines()[0] == f"BIDS validation failed for {raw_dataset}: 1 error"
    assert "NOT_INCLUDED" in message and "/sub-01/anat/sub-01_T2.nii.gz" in message
    assert message.splitlines()[-1] == "use --skip-bids-validation to bypass"
    assert _snapshot(raw_dataset) == before


@needs_validator
def test_missing_bids_version_fails(raw_dataset: Path) -> None:
    desc = raw_dataset / "dataset_description.json"
    desc.write_text(json.dumps({"Name": "x", "DatasetType": "raw"}))
    (raw_dataset / "sub-01/anat/sub-01_T2.nii.gz").write_bytes(b"")
    with pytest.raises(BidsValidationError) as info:
        v.validate_bids_dataset(raw_dataset)
    message = str(info.value)
    assert "JSON_KEY_REQUIRED[BIDSVersion]" in message and "/dataset_description.json" in message
    assert "NOT_INCLUDED" in message
    result = v.run_validator(raw_dataset)  # the lower level returns instead of raising
    assert {e.code for e in result.errors} >= {"JSON_KEY_REQUIRED", "NOT_INCLUDED"}


def test_skip_does_not_run(raw_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(v, "run_validator", lambda *a, **k: pytest.fail("validator ran"))
    assert v.validate_bids_dataset(raw_dataset, skip=True) is None


def test_missing_validator_is_a_usage_error(raw_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(v, "find_validator", lambda: None)
    with pytest.raises(UsageError, match="bids-validator-deno.*--skip-bids-validation") as info:
        v.validate_bids_dataset(raw_dataset)
    assert info.value.exit_code == 64


def test_missing_dataset_dir_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        v.validate_bids_dataset(tmp_path / "nope")


def test_validator_crash_reports_stderr_tail(raw_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_validator(tmp_path, "echo 'error: Uncaught NotFound: boom' >&2; exit 1")
    monkeypatch.setattr(v, "find_validator", lambda: fake)
    with pytest.raises(BidsValidationError, match=r"(?s)exit status 1.*Uncaught NotFound: boom"):
        v.validate_bids_dataset(raw_dataset)


def test_validator_garbage_output_is_a_crash(raw_dataset: Path, tmp_path: Path) -> None:
    fake = _fake_validator(tmp_path, "echo 'not json'; exit 0")
    with pytest.raises(BidsValidationError, match="failed on"):
        v.run_validator(raw_dataset, executable=fake)


def test_validator_timeout(raw_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_validator(tmp_path, "echo started >&2; exec sleep 30")
    monkeypatch.setattr(v, "find_validator", lambda: fake)
    with pytest.raises(BidsValidationError, match="timed out after 0.5 s"):
        v.run_validator(raw_dataset, timeout_s=0.5)


def test_find_validator_prefers_the_one_next_to_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = Path(_fake_validator(tmp_path, "exit 0")).rename(tmp_path / "bids-validator-deno")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    assert v.find_validator() == str(local)
    local.unlink()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert v.find_validator() is None
    bindir = tmp_path / "bin"
    bindir.mkdir()
    on_path = Path(_fake_validator(bindir, "exit 0")).rename(bindir / "bids-validator-deno")
    monkeypatch.setenv("PATH", str(bindir) + os.pathsep + str(tmp_path / "empty"))
    assert v.find_validator() == str(on_path)


def _issue(code: str, location: str | None = None, severity: str = "error", sub: str | None = None) -> dict:
    issue = {"code": code, "severity": severity}
    if location:
        issue["location"] = location
    if sub:
        issue["subCode"] = sub
    return issue


def test_summarise_groups_codes_and_limits_examples() -> None:
    report = {
        "issues": {
            "issues": [
                *[_issue("NOT_INCLUDED", f"/sub-0{i}/anat/sub-0{i}_T2.nii.gz") for i in range(1, 6)],
                _issue("JSON_KEY_REQUIRED", "/dataset_description.json", sub="BIDSVersion"),
                _issue("EMPTY_FILE", "/README"),
                _issue("EMPTY_FILE", "/README"),
                _issue("SUBJECT_FOLDERS"),
                _issue("README_FILE_SMALL", "/README", severity="warning"),
            ],
            "codeMessages": {"NOT_INCLUDED": "Files with such naming scheme are not part of BIDS.\nMore text."},
        },
        "summary": {},
    }
    result = v.parse_report("/data/ds", report)
    assert [(e.code, e.count, e.n_files) for e in result.errors] == [
        ("NOT_INCLUDED", 5, 5),
        ("JSON_KEY_REQUIRED", 1, 1),
        ("EMPTY_FILE", 2, 1),
        ("SUBJECT_FOLDERS", 1, 0),
    ]
    assert result.n_errors == 9 and result.n_warnings == 1 and not result.ok
    text = v.summarise(result)
    lines = text.splitlines()
    assert lines[0] == "BIDS validation failed for /data/ds: 9 errors"
    assert lines[1] == (
        "  NOT_INCLUDED x5 in 5 files: /sub-01/anat/sub-01_T2.nii.gz, /sub-02/anat/sub-02_T2.nii.gz, "
        "/sub-03/anat/sub-03_T2.nii.gz, +2 more - Files with such naming scheme are not part of BIDS."
    )
    assert lines[2].startswith("  JSON_KEY_REQUIRED[BIDSVersion] x1 in 1 file: /dataset_description.json")
    assert lines[4] == "  SUBJECT_FOLDERS x1"
    assert "README_FILE_SMALL" not in text and "(and 1 warning)" in text
    assert lines[-1] == "use --skip-bids-validation to bypass"
    assert v.summarise(result) == text  # pure


def test_parse_empty_report() -> None:
    result = v.parse_report("/x", {})
    assert result.ok and result.n_errors == 0 and v.summarise(result).endswith("0 errors, 0 warnings")
