"""Logs of a run under ``<output_dir>/logs/``: console and file logging, run records, crash logs.

Every file name carries the level, a timestamp, the host, the process id and a random tag, so
concurrent HPC jobs writing into one ``output_dir`` never write the same log file: not even jobs on
different nodes, or in containers, where process ids repeat (every Docker container starts at pid 1).

On a terminal the console shows progress bars (tqdm) and prints each log line above them, never
through one; elsewhere (a pipe, a cluster's job log) the log lines alone are the progress.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import platform
import re
import secrets
import sys
import traceback
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence, TextIO, TypeVar

from bids_app.io import atomic_write_json, atomic_write_text

LOGGER_NAME = "bids_app"
_FORMAT = "%(asctime)s [counterseg] %(levelname)s: %(message)s"


def timestamp() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def run_id(level: str) -> str:
    """A name unique per process, across hosts: level, time, host, pid and a random tag."""
    # platform.node() reads uname(): no socket call, so a run never touches the socket module.
    host = re.sub(r"[^A-Za-z0-9-]", "-", platform.node().split(".")[0])[:32] or "host"
    return f"{level}_{timestamp()}_{host}_{os.getpid()}_{secrets.token_hex(2)}"


def setup_console_logging(verbosity: int, rank: int = 0, quiet: bool = False) -> logging.Logger:
    """INFO by default (progress a user can watch), DEBUG with ``-v``, warnings and errors only with
    ``-q``; library loggers stay quiet. The log file (:func:`add_file_logging`) keeps DEBUG whatever
    the console shows.

    Under torchrun, ranks other than 0 print warnings and errors only, tagged with their rank: the
    progress is rank 0's to report.
    """
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.DEBUG)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    level = logging.WARNING if quiet or rank != 0 else logging.DEBUG if verbosity >= 1 else logging.INFO
    console = ConsoleHandler(sys.stderr, level)
    fmt = _FORMAT if rank == 0 else _FORMAT.replace("[counterseg]", f"[counterseg rank {rank}]")
    console.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    logger.addHandler(console)
    return logger


class ConsoleHandler(logging.StreamHandler):
    """The console's log handler. Where progress bars are shown (``bars``: a terminal that shows
    INFO), each line goes through ``tqdm.write``, which lifts the bars, prints the line and redraws
    them below it, so that a line never lands in the middle of a bar."""

    def __init__(self, stream: TextIO, level: int) -> None:
        super().__init__(stream)
        self.setLevel(level)
        self.bars = level <= logging.INFO and _is_terminal(stream)

    def emit(self, record: logging.LogRecord) -> None:
        if not self.bars:
            super().emit(record)
            return
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging's own rule: a failed log line never stops the run
            self.handleError(record)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def bar_stream() -> TextIO | None:
    """The console stream when progress bars belong on it (see :class:`ConsoleHandler`), else None:
    no bars in a pipe or a job log, with ``-q``, on ranks other than 0, or with no console set up."""
    for handler in logging.getLogger(LOGGER_NAME).handlers:
        if isinstance(handler, ConsoleHandler) and handler.bars:
            return handler.stream
    return None


T = TypeVar("T")


@contextlib.contextmanager
def progress(items: Sequence[T], desc: str, unit: str) -> Iterator[Iterable[T]]:
    """Iterate ``items`` under a progress bar with an ETA where bars are shown, else plainly. A
    context manager, so that the bar is closed (and stops being redrawn) when the loop fails."""
    stream = bar_stream()
    if stream is None:
        yield items
        return
    from tqdm import tqdm

    with tqdm(items, desc=desc, unit=unit, file=stream, dynamic_ncols=True) as bar:
        yield bar


def add_file_logging(logs_dir: Path, name: str) -> logging.Handler:
    """Everything at DEBUG into ``logs/counterseg_<name>.log`` for later inspection."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(logs_dir / f"counterseg_{name}.log", encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(_FORMAT))
    logging.getLogger(LOGGER_NAME).addHandler(handler)
    return handler


def remove_handler(handler: logging.Handler) -> None:
    logging.getLogger(LOGGER_NAME).removeHandler(handler)
    handler.close()


def close_logging() -> None:
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def write_run_record(logs_dir: Path, name: str, record: Mapping[str, Any]) -> Path:
    """The resolved settings, selection and outcome of one run, as JSON."""
    return atomic_write_json(logs_dir / f"run_{name}.json", dict(record))


def write_crash_log(logs_dir: Path, name: str, exc: BaseException) -> Path:
    """Full traceback of an unexpected failure; falls back to the temp dir if logs_dir is unusable."""
    header = f"counterseg crash, {dt.datetime.now().isoformat()}\ncommand: {' '.join(sys.argv)}\n\n"
    return _write_report(logs_dir, f"crash_{name}.txt", header + _traceback(exc))


def write_image_crash_report(logs_dir: Path, name: str, image: str, exc: BaseException, error_line: str,
                             settings: Mapping[str, Any]) -> Path:
    """The crash report of one image that failed while the run went on with the others: the error
    line, the image, the traceback and the run's settings, in ``crash_<name>_<image stem>.txt``."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(image).name.split(".")[0]) or "image"
    text = (f"counterseg crash report, {dt.datetime.now().isoformat()}\n"
            f"image: {image}\nerror: {error_line}\ncommand: {' '.join(sys.argv)}\n\n"
            f"{_traceback(exc)}\nsettings:\n{json.dumps(dict(settings), indent=2, default=str)}\n")
    return _write_report(logs_dir, f"crash_{name}_{stem}.txt", text)


def _traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _write_report(logs_dir: Path, filename: str, text: str) -> Path:
    """Write a crash report into ``logs_dir``, else the temp dir; never raises on top of the failure."""
    for folder in (logs_dir, Path(os.environ.get("TMPDIR", "/tmp"))):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return atomic_write_text(folder / filename, text)
        except Exception:  # the crash log must never raise on top of the crash
            continue
    return Path("<nowhere>")
