"""SIGTERM and SIGINT stop a run cleanly instead of killing it mid-write.

SLURM sends SIGTERM at the time limit (and SIGKILL ``KillWait`` seconds later, 30 by default);
Ctrl-C sends SIGINT. Inside a training loop (``deferred``) the first signal is only recorded: the
loop ends its step, saves a checkpoint and raises ``RunInterrupted``, so a rerun resumes there.
Anywhere else the signal raises ``RunInterrupted`` at once, and the atomic writers remove their
temporary file on the way out. A second signal while deferring stops at once.

The exit code is 128 + the signal number (143 for SIGTERM, 130 for SIGINT): the shell's code for
"ended by this signal", which schedulers and job arrays read as unfinished; 0 would claim success.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Any, Iterator

from bids_app.errors import RunInterrupted

log = logging.getLogger(__name__)

HANDLED = (signal.SIGTERM, signal.SIGINT)
RESUME_HINT = "the run is unfinished: rerun the same command to resume"


class _State:
    deferring = 0
    pending: int | None = None


_state = _State()


class Deferral:
    """What a training loop asks between steps: has a stop been requested, and the error to raise."""

    @property
    def requested(self) -> bool:
        return _state.pending is not None

    def error(self, what: str) -> RunInterrupted:
        signum = _state.pending or signal.SIGTERM
        return RunInterrupted(signum, f"stopped by {signal.Signals(signum).name}: {what}; {RESUME_HINT}")


def _on_signal(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    if _state.deferring and _state.pending is None:
        _state.pending = signum
        log.warning("%s received: stopping after this training step, with a checkpoint", name)
        return
    raise RunInterrupted(signum, f"stopped by {name}; {RESUME_HINT}")


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Install the handlers for one run (main thread only) and restore the previous ones after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _on_signal) for sig in HANDLED}
    _state.pending, _state.deferring = None, 0
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _state.pending, _state.deferring = None, 0


@contextlib.contextmanager
def deferred() -> Iterator[Deferral]:
    """A region where a signal waits for the next safe point (a training step's end)."""
    _state.deferring += 1
    try:
        yield Deferral()
    finally:
        _state.deferring -= 1
    if _state.pending is not None and not _state.deferring:
        raise Deferral().error("stopped at the end of a training stage")
