"""Run the official BIDS validator (``bids-validator-deno``) on the input dataset.

The validator is run as a subprocess with ``--format json``. Its exit status is 0 when there
are no errors, 16 when there are errors (the JSON report is still complete), and anything
else (e.g. 1 with a Deno stack trace on stderr) when it crashed. It only reads the dataset:
we never pass ``--outfile``, the one option that writes.

JSON report shape (validator 3.x)::

    {"issues": {"issues": [{"code", "subCode"?, "severity": "error"|"warning",
                            "location"?, "issueMessage"?, "rule"?}, ...],
                "codeMessages": {code: text}},
     "summary": {...}}
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bids_app.errors import BidsValidationError, UsageError

logger = logging.getLogger(__name__)

VALIDATOR_NAME = "bids-validator-deno"
SKIP_HINT = "use --skip-bids-validation to bypass"
MAX_EXAMPLES = 3
_STDERR_TAIL = 2000
_OK, _HAS_ERRORS = 0, 16
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass(frozen=True)
class IssueSummary:
    """All occurrences of one issue code (and sub-code) folded into one line."""

    code: str
    sub_code: str | None
    message: str
    count: int
    files: tuple[str, ...]  # first few distinct locations
    n_files: int


@dataclass(frozen=True)
class ValidationResult:
    """Errors and warnings of one validator run, grouped by code; ``raw`` is its JSON."""

    bids_dir: Path
    errors: tuple[IssueSummary, ...]
    warnings: tuple[IssueSummary, ...]
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @property
    def n_errors(self) -> int:
        return sum(issue.count for issue in self.errors)

    @property
    def n_warnings(self) -> int:
        return sum(issue.count for issue in self.warnings)

    @property
    def ok(self) -> bool:
        return not self.errors


def find_validator() -> str | None:
    """Path of ``bids-validator-deno``: the one installed with this Python first, else PATH."""
    local = Path(sys.executable).parent / VALIDATOR_NAME
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(VALIDATOR_NAME)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _first_line(text: str, limit: int = 100) -> str:
    """Short form of a validator message: its first line, cut at ``limit`` characters."""
    line = text.strip().splitlines()[0].strip() if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3].rstrip() + "..."


def _group(
    issues: Iterable[Mapping[str, Any]], code_messages: Mapping[str, str]
) -> tuple[IssueSummary, ...]:
    """Fold issues by (code, subCode), keeping first-seen order."""
    groups: dict[tuple[str, str | None], list[Mapping[str, Any]]] = {}
    for issue in issues:
        key = (str(issue.get("code", "UNKNOWN")), issue.get("subCode"))
        groups.setdefault(key, []).append(issue)
    summaries = []
    for (code, sub_code), members in groups.items():
        locations = list(dict.fromkeys(str(i["location"]) for i in members if i.get("location")))
        message = _first_line(code_messages.get(code, "")) or _first_line(
            str(members[0].get("issueMessage", ""))
        )
        summaries.append(
            IssueSummary(
                code=code,
                sub_code=sub_code,
                message=message,
                count=len(members),
                files=tuple(locations[:MAX_EXAMPLES]),
                n_files=len(locations),
            )
        )
    return tuple(summaries)


def parse_report(bids_dir: str | Path, report: Mapping[str, Any]) -> ValidationResult:
    """Turn the validator's JSON report into a :class:`ValidationResult` (pure)."""
    block = report.get("issues", {})
    issues = block.get("issues", [])
    messages = block.get("codeMessages", {})
    errors = [i for i in issues if i.get("severity") == "error"]
    warnings = [i for i in issues if i.get("severity") == "warning"]
    return ValidationResult(
        bids_dir=Path(bids_dir),
        errors=_group(errors, messages),
        warnings=_group(warnings, messages),
        raw=report,
    )


def _tail(text: str) -> str:
    text = _ANSI.sub("", text).strip()
    return text if len(text) <= _STDERR_TAIL else "..." + text[-_STDERR_TAIL:]


def run_validator(
    bids_dir: str | Path, timeout_s: float = 600, executable: str | None = None
) -> ValidationResult:
    """Validate ``bids_dir`` (read-only) and return its grouped issues.

    Raises UsageError when the validator is not installed, BidsValidationError when it
    crashes, times out or prints something that is not its JSON report.
    """
    bids_dir = Path(bids_dir)
    if not bids_dir.is_dir():
        raise UsageError(f"BIDS dataset directory not found: {bids_dir}")
    exe = executable or find_validator()
    if exe is None:
        raise UsageError(
            f"{VALIDATOR_NAME} is not installed: install it (pip install bids-validator-deno) "
            "or pass --skip-bids-validation"
        )
    cmd = [exe, str(bids_dir), "--format", "json"]
    logger.debug("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            encoding="utf-8",
            errors="replace",
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "NO_COLOR": "1"},
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr
        if isinstance(stderr, bytes):
            stderr = stderr.decode(errors="replace")
        raise BidsValidationError(
            f"{VALIDATOR_NAME} timed out after {timeout_s:g} s on {bids_dir}; {SKIP_HINT}\n"
            f"{_tail(stderr or '')}"
        ) from exc
    except OSError as exc:
        raise UsageError(f"cannot run {exe}: {exc}; pass --skip-bids-validation to bypass") from exc
    report: Any = None
    if proc.returncode in (_OK, _HAS_ERRORS):
        try:
            report = json.loads(proc.stdout)
        except json.JSONDecodeError:
            report = None
    if not isinstance(report, dict):
        raise BidsValidationError(
            f"{VALIDATOR_NAME} failed on {bids_dir} (exit status {proc.returncode}); {SKIP_HINT}\n"
            f"{_tail(proc.stderr or proc.stdout)}"
        )
    return parse_report(bids_dir, report)


def _issue_line(issue: IssueSummary) -> str:
    name = f"{issue.code}[{issue.sub_code}]" if issue.sub_code else issue.code
    where = ""
    if issue.n_files:
        hidden = issue.n_files - len(issue.files)
        more = f", +{hidden} more" if hidden > 0 else ""
        where = f" in {_plural(issue.n_files, 'file')}: {', '.join(issue.files)}{more}"
    message = f" - {issue.message}" if issue.message else ""
    return f"  {name} x{issue.count}{where}{message}"


def summarise(result: ValidationResult) -> str:
    """Human-readable multi-line summary: one line per error code, with example files."""
    n_err, n_warn = result.n_errors, result.n_warnings
    if not result.errors:
        warnings = _plural(n_warn, "warning")
        return f"BIDS validation passed for {result.bids_dir}: 0 errors, {warnings}"
    lines = [f"BIDS validation failed for {result.bids_dir}: {_plural(n_err, 'error')}"]
    lines += [_issue_line(issue) for issue in result.errors]
    if n_warn:
        lines.append(f"  (and {_plural(n_warn, 'warning')})")
    lines.append(SKIP_HINT)
    return "\n".join(lines)


def validate_bids_dataset(
    bids_dir: str | Path, skip: bool = False, timeout_s: float = 600
) -> ValidationResult | None:
    """Validate the input dataset before any work; raise BidsValidationError (16) on errors."""
    if skip:
        logger.info("BIDS validation of %s skipped on request", bids_dir)
        return None
    result = run_validator(bids_dir, timeout_s=timeout_s)
    if result.errors:
        raise BidsValidationError(summarise(result))
    logger.info(
        "BIDS validation passed for %s (%d warnings)", result.bids_dir, result.n_warnings
    )
    return result
