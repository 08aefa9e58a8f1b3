"""What the benchmark scripts share: the machine's description, peak memory of a region, the dense
matmul rate, and running one measurement in a fresh interpreter.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset at the start of the region); on
CPU the resident set's high-water mark. Linux lets a process reset its own high-water mark
(``echo 5 > /proc/self/clear_refs``), so the CPU figure is the peak *during the region*, reported
as the increase over the resident set at its start: torch's own ~300 MiB and whatever was built
before (models, inputs) are not counted. Where the reset is not available the figure falls back to
the process's lifetime peak (``ru_maxrss``) and says so (``peak_scope``).
"""
from __future__ import annotations

import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ('unknown' elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else (platform.processor() or "unknown")


def machine_info(device: str) -> dict[str, Any]:
    """Platform, CPU, torch, threads (and the GPU when measuring on one)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def preset_settings(preset: str) -> Any:
    """The run settings a group-level run with ``--preset`` resolves to (paths are placeholders)."""
    from bids_app.settings import build_settings

    return build_settings({"bids_dir": "bids", "output_dir": "out", "analysis_level": "group", "preset": preset})


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_cpu_peak() -> bool:
    """Reset this process's resident high-water mark (VmHWM); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


class PeakMemory:
    """Peak memory of a region: ``start()`` before it, ``stop()`` after; ``stop`` returns a dict.

    ``peak_bytes`` is what a benchmark reports: CUDA ``max_memory_allocated`` (absolute: it includes
    the weights already on the GPU), CPU the increase of the resident set over its value at
    ``start``. ``baseline_bytes`` and ``peak_total_bytes`` give the absolute picture on both.
    """

    def __init__(self, device: str) -> None:
        self.device = str(device)
        self.cuda = self.device.startswith("cuda")
        self.baseline = 0
        self.scope = ""

    def start(self) -> None:
        import gc

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            self.scope = "cuda max_memory_allocated"
            return
        self.scope = "region" if _reset_cpu_peak() else "process lifetime (no VmHWM reset)"
        rss = _status_kib("VmRSS")
        self.baseline = rss * 1024 if rss is not None else 0

    def stop(self) -> dict[str, Any]:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            return {"peak_bytes": int(peak), "baseline_bytes": int(self.baseline), "peak_total_bytes": int(peak),
                    "peak_increase_bytes": int(peak - self.baseline), "peak_scope": self.scope}
        hwm = _status_kib("VmHWM") if self.scope == "region" else None
        total = hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        increase = max(0, total - self.baseline)
        return {"peak_bytes": int(increase), "baseline_bytes": int(self.baseline), "peak_total_bytes": int(total),
                "peak_increase_bytes": int(increase), "peak_scope": self.scope}


def timed(function: Callable[[], Any], device: str) -> float:
    """Wall time of one call, with the device synchronised on both sides."""
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def matmul_rate(device: str, size: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The dense matmul rate: FLOP/s of a ``size`` x ``size`` ``torch.mm`` (median of ``repeats`` after a
    warm-up), the practical limit a network's convolutions and matmuls can approach."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    torch.mm(a, b)
    times = [timed(lambda: torch.mm(a, b), device) for _ in range(repeats)]
    median = statistics.median(times)
    return {"size": size, "dtype": str(dtype).replace("torch.", ""), "repeats": repeats, "median_s": median,
            "flop_per_s": 2.0 * size**3 / median}


def run_child(script: Path, spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``script --child SPEC`` in a fresh interpreter; the child prints its result as the last JSON line."""
    result = subprocess.run([sys.executable, str(script), "--child", json.dumps(spec)], capture_output=True,
                            text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"measurement {spec} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20
