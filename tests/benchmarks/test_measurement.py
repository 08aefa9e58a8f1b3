"""benchmarks/measurement.py: the peak memory of a region is the region's, the matmul rate is positive."""
from __future__ import annotations

import torch

from benchmarks.measurement import PeakMemory, cpu_model, machine_info, matmul_rate


def test_peak_memory_sees_a_tensor_allocated_and_freed_in_the_region() -> None:
    before = torch.ones(16 * 2**20 // 4)  # 16 MiB touched before the region: not counted
    memory = PeakMemory("cpu")
    memory.start()
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, freed before the region ends
    del big
    result = memory.stop()
    assert result["peak_scope"] == "region"
    assert 60 * 2**20 < result["peak_bytes"] < 100 * 2**20, result
    assert result["peak_total_bytes"] >= result["baseline_bytes"] + result["peak_bytes"] - 4096
    memory.start()
    result = memory.stop()
    assert result["peak_bytes"] < 8 * 2**20, result  # the high-water mark was reset
    del before


def test_machine_and_matmul_rate() -> None:
    info = machine_info("cpu")
    assert info["cpu"] == cpu_model() and info["torch"] == torch.__version__ and info["threads"] >= 1
    rate = matmul_rate("cpu", size=128, repeats=3)
    assert rate["flop_per_s"] > 0 and rate["median_s"] > 0 and rate["dtype"] == "float32"
