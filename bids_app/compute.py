"""Resolve the compute device and thread counts once, at the edge of a run."""
from __future__ import annotations

import logging
import os
import re

from bids_app.errors import UsageError

log = logging.getLogger(__name__)


def resolve_device(spec: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; an unavailable GPU is a usage error."""
    if spec == "cpu":
        return "cpu"
    match = re.fullmatch(r"auto|cuda(?::(\d+))?", spec)
    if match is None:
        raise UsageError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")
    import torch

    available = torch.cuda.is_available()
    if spec == "auto":
        return "cuda" if available else "cpu"
    if not available:
        raise UsageError(
            f"--device {spec}: CUDA is not available (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda or 'none'}); use --device cpu or run with --nv / --gpus"
        )
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise UsageError(f"--device {spec}: only {count} CUDA device(s) visible (0..{count - 1})")
    return f"cuda:{index}"


def configure_threads(omp_nthreads: int | None, nprocs: int | None) -> int:
    """Cap intra-op threads (``--omp-nthreads``, else ``--nprocs``, else the CPUs this process may use)."""
    import torch

    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = omp_nthreads or nprocs or allowed
    torch.set_num_threads(threads)
    log.debug("torch intra-op threads: %d (CPUs available: %d)", threads, allowed)
    return threads
