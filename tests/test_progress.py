"""Progress a person can watch: on a terminal, bars with an ETA and log lines printed above them
(never through a bar); no bars in a pipe; ``-q`` leaves warnings and errors only on the console.

The terminal is a real pseudo-terminal (:mod:`pty`): the app and small drivers run in a child
process whose stdin, stdout and stderr are the terminal, and :func:`screen` turns the raw bytes into
the lines a person sees (a carriage return goes back to the start of the line, later characters
overwrite earlier ones).
"""
from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path

import pytest

from bids_app import runlog

from tests.conftest import participant_args

REPO = Path(__file__).resolve().parent.parent
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d \[counterseg\] (DEBUG|INFO|WARNING|ERROR): \S")
#: tqdm's right part: "3/4 [00:02<00:01, ...": done/total, elapsed < remaining (the ETA).
ETA = re.compile(r"\b(\d+)/(\d+) \[(?:\d+:)?\d\d:\d\d<(?:\d+:)?\d\d:\d\d\b")


def run_in_terminal(argv: list[str], timeout: float = 300) -> tuple[int, str]:
    """Run ``argv`` on a pseudo-terminal of 120 x 40 (stdin, stdout and stderr); its exit code and
    everything it wrote, raw."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TQDM_", "COLUMNS", "LINES"))}
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=REPO, env=env, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        else:
            proc.kill()
            pytest.fail(f"{argv} ran past {timeout} s")
        code = proc.wait(timeout=60)
    finally:
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


def screen(raw: str) -> list[str]:
    """The lines a terminal shows for ``raw``: ``\\r`` returns to the line's start, later characters
    overwrite earlier ones, ``\\n`` ends the line; escape sequences (colours, cursor moves) are
    dropped."""
    lines: list[str] = []
    line: list[str] = []
    column = 0
    for char in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw):
        if char == "\r":
            column = 0
        elif char == "\n":
            lines.append("".join(line).rstrip())
            line, column = [], 0
        else:
            if column < len(line):
                line[column] = char
            else:
                line.append(char)
            column += 1
    if line:
        lines.append("".join(line).rstrip())
    return lines


def assert_log_lines_whole(lines: list[str]) -> None:
    """Every log line starts at the start of its line and holds no piece of a bar."""
    logged = [line for line in lines if "[counterseg]" in line]
    assert logged, "no log line at all"
    for line in logged:
        assert LOG_LINE.match(line) and "%|" not in line, f"a log line broken by a bar: {line!r}"


def bar_lines(lines: list[str], desc: str) -> list[str]:
    """The finished bar of ``desc``: its lines showing an ETA, all done."""
    bars = [line for line in lines if line.startswith(f"{desc}:")]
    assert all("[counterseg]" not in line for line in bars), bars
    done = [line for line in bars if (m := ETA.search(line)) and m.group(1) == m.group(2)]
    assert done, f"no finished {desc!r} bar with an ETA in {bars}"
    return done


def python_driver(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


# ----------------------------------------------------------------------------- the console handler


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture()
def restore_logging():
    yield
    runlog.close_logging()


@pytest.mark.parametrize("terminal, verbosity, quiet, rank, bars", [
    (True, 0, False, 0, True),
    (True, 1, False, 0, True),
    (False, 0, False, 0, False),  # a pipe, a cluster's job log
    (True, 0, True, 0, False),    # -q
    (True, 0, False, 1, False),   # torchrun's other ranks
])
def test_bars_only_on_a_terminal_that_shows_info(monkeypatch: pytest.MonkeyPatch, restore_logging, terminal: bool,
                                                 verbosity: int, quiet: bool, rank: int, bars: bool) -> None:
    monkeypatch.setattr(sys, "stderr", FakeTerminal() if terminal else io.StringIO())
    runlog.setup_console_logging(verbosity, rank, quiet)
    assert (runlog.bar_stream() is sys.stderr) is bars
    items = [1, 2, 3]
    with runlog.progress(items, "items", "item") as todo:
        assert list(todo) == items
        assert (todo is items) is not bars


@pytest.mark.parametrize("quiet, shown", [(False, {"INFO", "WARNING", "ERROR"}), (True, {"WARNING", "ERROR"})])
def test_quiet_console_keeps_warnings_and_errors_and_the_log_file_keeps_all(
        monkeypatch: pytest.MonkeyPatch, restore_logging, tmp_path: Path, quiet: bool, shown: set[str]) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    runlog.setup_console_logging(0, quiet=quiet)
    handler = runlog.add_file_logging(tmp_path, "test")
    log = logging.getLogger("bids_app.test")
    for level in ("debug", "info", "warning", "error"):
        getattr(log, level)("a %s line", level)
    runlog.remove_handler(handler)
    console = {m.group(1) for m in map(LOG_LINE.match, sys.stderr.getvalue().splitlines()) if m}
    assert console == shown
    written = (tmp_path / "counterseg_test.log").read_text()
    assert all(f"a {level} line" in written for level in ("debug", "info", "warning", "error"))


def test_screen_sees_a_line_written_through_a_bar() -> None:
    """The check can fail: a log line written after a bar without lifting it is caught."""
    broken = screen("items:  33%|###  | 1/3 [00:01<00:02, 1.0item/s]12:00:00 [counterseg] INFO: item 1\n")
    with pytest.raises(AssertionError, match="broken by a bar"):
        assert_log_lines_whole(broken)
    lifted = screen("items:  33%|###  | 1/3 [00:01<00:02]\r" + " " * 40 + "\r12:00:00 [counterseg] INFO: item 1\n")
    assert_log_lines_whole(lifted)


# ----------------------------------------------------------------------------- in a pseudo-terminal


def test_log_lines_print_above_a_bar_on_a_terminal() -> None:
    code, raw = run_in_terminal(python_driver("""
        import logging
        from bids_app import runlog
        runlog.setup_console_logging(0)
        log = logging.getLogger("bids_app.driver")
        with runlog.progress(list(range(5)), "items", "item") as todo:
            for i in todo:
                log.info("item %d of 5", i + 1)
        log.warning("done")
    """), timeout=60)
    lines = screen(raw)
    assert code == 0, raw
    assert_log_lines_whole(lines)
    assert [line.split(": ", 1)[1] for line in lines if "[counterseg]" in line] == [
        *(f"item {i} of 5" for i in range(1, 6)), "done"]
    assert bar_lines(lines, "items")[-1].count("5/5") == 1


def test_calibration_shows_a_bar_on_a_terminal() -> None:
    """The calibration's loop with the per-image work stubbed out: the bar and its log lines."""
    code, raw = run_in_terminal(python_driver("""
        import types
        from bids_app import runlog
        from bids_app.pipelines import calibrate
        runlog.setup_console_logging(0)
        result = types.SimpleNamespace(residual=None, detection_region=None, growth=None, spacing_mm=None,
                                       seconds=0.0)
        calibrate.native_residual = lambda *args: result
        calibrate.lesion_free_threshold = lambda *args: 1.0
        calibrate.calibrate = lambda *args, **kwargs: "calibrated"
        images = [types.SimpleNamespace(name=f"sub-0{i}_T2w.nii.gz") for i in range(1, 4)]
        seg = types.SimpleNamespace(lesions=types.SimpleNamespace(min_lesion_mm3=0.0),
                                    calibration=types.SimpleNamespace(quantile=0.99, image_fpr=0.1))
        assert calibrate.run_calibration(None, None, images, seg, 0) == "calibrated"
    """), timeout=120)
    lines = screen(raw)
    assert code == 0, raw
    assert_log_lines_whole(lines)
    assert sum("calibrate: sub-0" in line for line in lines) == 3
    assert "3/3" in bar_lines(lines, "calibrate")[-1]


def run_app(*args: object) -> list[str]:
    return [sys.executable, str(REPO / "run.py"), *map(str, args)]


PLAN_ONLY = ["--preset", "tiny", "--stages", "plan", "--skip-bids-validation", "--omp-nthreads", "1"]


@pytest.mark.slow
def test_group_level_preprocessing_shows_a_bar(simple_dataset: Path, tmp_path: Path) -> None:
    code, raw = run_in_terminal(run_app(simple_dataset, tmp_path / "out", "group", *PLAN_ONLY))
    lines = screen(raw)
    assert code == 0, raw
    assert_log_lines_whole(lines)
    assert "4/4" in bar_lines(lines, "preprocess")[-1]  # the 4 healthy participants' images


@pytest.mark.slow
def test_quiet_prints_only_warnings_on_a_terminal(simple_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, raw = run_in_terminal(run_app(simple_dataset, out, "group", *PLAN_ONLY, "-q"))
    lines = [line for line in screen(raw) if line.strip()]
    assert code == 0, raw
    assert lines, "-q printed nothing, not even the warning that validation was skipped"
    for line in lines:
        assert (m := LOG_LINE.match(line)) and m.group(1) in ("WARNING", "ERROR"), line
    assert any("validation skipped" in line for line in lines)
    assert "%|" not in raw, "a progress bar under -q"
    log_file = next((out / "logs").glob("counterseg_group_*.log")).read_text()
    assert "INFO" in log_file and "preprocessed" in log_file  # the log file stays complete


@pytest.mark.slow
def test_participant_level_shows_a_bar_over_images_with_an_eta(simple_dataset: Path, tiny_model: Path,
                                                                tmp_path: Path) -> None:
    code, raw = run_in_terminal(run_app(simple_dataset, tmp_path / "out", "participant", "--participant-label",
                                        "01", "--skip-bids-validation", "--omp-nthreads", "1",
                                        *participant_args(tiny_model)))
    lines = screen(raw)
    assert code == 0, raw
    assert_log_lines_whole(lines)
    assert any(": segmenting" in line for line in lines)  # logged while the bar is up
    assert "1/1" in bar_lines(lines, "images")[-1]


def test_no_bar_in_a_pipe() -> None:
    """The same driver as on the terminal, through a pipe: log lines only."""
    proc = subprocess.run(python_driver("""
        import logging
        from bids_app import runlog
        runlog.setup_console_logging(0)
        with runlog.progress([1, 2], "items", "item") as todo:
            for i in todo:
                logging.getLogger("bids_app.driver").info("item %d", i)
    """), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert [line.split(": ", 1)[1] for line in proc.stderr.splitlines()] == ["item 1", "item 2"]
    assert "\r" not in proc.stderr and "items:" not in proc.stderr
