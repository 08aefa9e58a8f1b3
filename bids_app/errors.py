"""Exceptions that carry a BIDS-App exit code.

Library code raises one of these deep down; only ``bids_app.cli.main`` turns it into a one-line
message and a process exit code (BIDS execution spec), so no module below the CLI calls ``sys.exit``.
"""
from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of the BIDS execution specification, as used by this app."""

    OK = 0
    UNEXPECTED = 1
    VALIDATION = 16
    UNKNOWN_LEVEL = 17
    NOTHING_SELECTED = 18
    USAGE = 64
    BAD_DATA = 65
    MISSING_INPUT = 66
    CANNOT_CREATE = 73
    IO_ERROR = 74


class CountersegError(Exception):
    """Base class: a failure the user can act on, with its exit code."""

    exit_code: ExitCode = ExitCode.UNEXPECTED


class BidsValidationError(CountersegError):
    """The input dataset failed BIDS validation."""

    exit_code = ExitCode.VALIDATION


class UnknownLevelError(CountersegError):
    """The analysis level is neither ``participant`` nor ``group``."""

    exit_code = ExitCode.UNKNOWN_LEVEL


class NothingSelectedError(CountersegError):
    """Participant/session labels or filters selected nothing."""

    exit_code = ExitCode.NOTHING_SELECTED


class UsageError(CountersegError):
    """The command line or a settings file is wrong."""

    exit_code = ExitCode.USAGE


class BadDataError(CountersegError):
    """An input file exists but cannot be read or is not a valid image."""

    exit_code = ExitCode.BAD_DATA


class MissingInputError(CountersegError):
    """The dataset lacks files the requested analysis needs."""

    exit_code = ExitCode.MISSING_INPUT


class CannotCreateError(CountersegError):
    """An output directory or file cannot be created."""

    exit_code = ExitCode.CANNOT_CREATE


class OutputIOError(CountersegError):
    """Writing an output failed midway (disk full, I/O error)."""

    exit_code = ExitCode.IO_ERROR


class RunInterrupted(BaseException):
    """SIGTERM/SIGINT stopped the run (exit 128 + signal number).

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way up (a
    report that must never fail the run, a crash-log fallback) can swallow the stop.
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + int(signum)
