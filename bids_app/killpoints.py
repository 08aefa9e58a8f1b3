"""Deterministic kill points: a test hook that makes this process signal itself at a named place.

The interruption tests must kill a run at a chosen place, never after a sleep. Two environment
variables arm the hook; unset (always, outside tests), ``reached`` costs one dictionary lookup.

- ``COUNTERSEG_KILL_AT=PATTERN[@N]``: fire at the N-th (default 1st) point of this process whose
  name matches PATTERN (``fnmatch``), e.g. ``step:vqgan@3`` or ``write:vqgan/latest.pt@2``.
- ``COUNTERSEG_KILL_SIGNAL``: ``KILL`` (default), ``TERM``, ``INT`` or ``STOP``.

Points: ``step:<stage>`` after each training step (before its checkpoint is saved);
``write:<folder name>/<file name>`` halfway through an atomic write (the temporary file is half
written, the final name untouched; NIfTI files: written, not yet renamed); ``calibrate:image``
after each calibration image.
"""
from __future__ import annotations

import fnmatch
import os
import signal

ENV_POINT = "COUNTERSEG_KILL_AT"
ENV_SIGNAL = "COUNTERSEG_KILL_SIGNAL"

_seen: dict[tuple[int, str], int] = {}  # (pid, armed spec) -> matching points reached so far


def reached(point: str) -> None:
    """Count ``point`` against the armed pattern and signal this process on the chosen occurrence."""
    spec = os.environ.get(ENV_POINT)
    if not spec:
        return
    pattern, _, nth = spec.partition("@")
    if not fnmatch.fnmatchcase(point, pattern):
        return
    key = (os.getpid(), spec)  # a forked child counts afresh
    _seen[key] = _seen.get(key, 0) + 1
    if _seen[key] == int(nth or 1):
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get(ENV_SIGNAL, "KILL").upper()))


def reset() -> None:
    """Forget the counts (tests arming the same pattern twice in one process)."""
    _seen.clear()
