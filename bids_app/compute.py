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


def configure_threads(omp_nthreads: int | None, nprocs: int | None, processes_per_node: int = 1) -> int:
    """Cap intra-op threads: ``--omp-nthreads`` per process, else this node's CPU budget (``--nprocs``,
    else the CPUs this process may use) shared by the processes torchrun started on the node, so N
    ranks on one node never oversubscribe it."""
    import torch

    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = omp_nthreads or max(1, (nprocs or allowed) // max(1, processes_per_node))
    torch.set_num_threads(threads)
    log.debug("torch intra-op threads: %d (CPUs available: %d, processes on this node: %d)",
              threads, allowed, processes_per_node)
    return threads


def amp_dtype(device: str, precision: str = "auto"):
    """The autocast dtype for ``precision`` (auto, fp32, bf16, fp16) on a device, or None (fp32).

    CUDA only: bf16 where supported, else fp16, unless fp32 is asked for. On CPU always fp32: bf16
    autocast was far slower on a CPU without bf16 instructions (docs/benchmarks.md).
    """
    import torch

    if precision == "fp32" or not str(device).startswith("cuda"):
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16
