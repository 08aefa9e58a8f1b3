"""Helpers the reliability tests share: running the CLI (in process or in a forked child that a
kill point may end), reading the one error line, and proving that no partial output was left."""
from __future__ import annotations

import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np
import pytest

from bids_app import cli, killpoints
from bids_app.io import temp_file_target
from bids_app.image_outputs import image_outputs

FAST = ["--skip-bids-validation"]
CHILD_TIMEOUT_S = 600  # a watchdog against a hung child, not a timing assertion


def run_cli(*args: object) -> int:
    return cli.main([str(a) for a in args])


def error_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def assert_one_error_line(caplog: pytest.LogCaptureFixture, *fragments: str) -> str:
    """Exactly one error line, naming every fragment (the file at fault, the problem)."""
    lines = error_lines(caplog)
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def temp_files(root: Path) -> list[Path]:
    """Our temporary files (``.<name>.<pid>.<hex>.tmp``) anywhere under root."""
    return sorted(p for p in Path(root).rglob(".*") if temp_file_target(p.name) is not None)


def assert_no_partial_output(out: Path) -> None:
    """No temporary file, every image output complete and readable, and each image's set of
    outputs either complete (its lesion mask and every other file) or absent."""
    out = Path(out)
    assert not temp_files(out), temp_files(out)
    for nifti in out.rglob("*.nii.gz"):
        np.asanyarray(nib.load(str(nifti)).dataobj)  # raises on a truncated file
    sources = {json.loads(p.read_text())["Sources"][0].removeprefix("bids:raw:")
               for p in out.glob("sub-*/**/*.json") if not p.name.endswith(("_evaluation.json", "_lesions.json"))}
    for source in sources:
        sets = [image_outputs(out, source, disambiguate) for disambiguate in (False, True)]
        missing = [[p.name for p in outputs.files if not p.is_file()] for outputs in sets]
        assert not all(missing), f"{source}: partial outputs, missing {min(missing, key=len)}"


def file_times(paths: Sequence[Path]) -> dict[Path, int]:
    return {Path(p): Path(p).stat().st_mtime_ns for p in paths}


@dataclass(frozen=True)
class ChildResult:
    """How a forked run ended: its exit code, or the signal that ended (or stopped) it."""

    pid: int
    exit_code: int | None
    signal: int | None
    stopped: bool = False


def fork_cli(argv: Sequence[object], env: Mapping[str, str] | None = None, until_stopped: bool = False) -> ChildResult:
    """Run ``cli.main(argv)`` in a forked child (this process's imports, no start-up cost) so a kill
    point may SIGKILL it. ``until_stopped``: return as soon as the child stops itself (SIGSTOP);
    the caller then owns it (``finish_child``).

    The child runs torch on one thread (``--omp-nthreads 1``): GNU OpenMP is not fork-safe, and a
    child entering a parallel region with the thread team of a parent that used one hangs."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 70
        try:
            os.environ.update(env or {})
            killpoints.reset()
            code = cli.main([*(str(a) for a in argv), "--omp-nthreads", "1"])
        finally:
            os._exit(code)
    previous = signal.signal(signal.SIGALRM, _watchdog(pid))
    signal.alarm(CHILD_TIMEOUT_S)
    try:
        _, status = os.waitpid(pid, os.WUNTRACED if until_stopped else 0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    if os.WIFSTOPPED(status):
        return ChildResult(pid, None, os.WSTOPSIG(status), stopped=True)
    if os.WIFSIGNALED(status):
        return ChildResult(pid, None, os.WTERMSIG(status))
    return ChildResult(pid, os.WEXITSTATUS(status), None)


def finish_child(result: ChildResult) -> None:
    """SIGKILL a stopped child and reap it."""
    os.kill(result.pid, signal.SIGKILL)
    os.waitpid(result.pid, 0)


def _watchdog(pid: int):
    def expire(signum: int, frame: object) -> None:
        os.kill(pid, signal.SIGKILL)
        raise TimeoutError(f"forked run {pid} still running after {CHILD_TIMEOUT_S} s: killed")
    return expire


def kill_env(point: str, signal_name: str = "KILL") -> dict[str, str]:
    return {killpoints.ENV_POINT: point, killpoints.ENV_SIGNAL: signal_name}


def log_of(out: Path, pid: int) -> str:
    """The debug log a run with this process id wrote under ``out/logs``."""
    logs = sorted((Path(out) / "logs").glob(f"counterseg_*_{pid}_*.log"))
    assert logs, f"no log of process {pid}"
    return logs[-1].read_text()
