"""benchmarks/counterfactual_cost.py: the methods are what they say, evaluations are counted per chain."""
from __future__ import annotations

import pytest
import torch

from benchmarks.counterfactual_cost import METHODS, CountingUNet, method_settings, table
from bids_app.pipelines.counterfactual import CounterfactualSettings

BASE = CounterfactualSettings(strengths=(0.5, 0.8), steps=10)


def test_methods_set_sampler_and_steps() -> None:
    seed = method_settings("seed-ddpm-300", BASE)
    assert (seed.sampler, seed.chain_steps) == ("ddpm", 300)
    assert method_settings("ddim-20", BASE).steps == 20
    readout = method_settings("x0-readout", BASE)
    assert (readout.sampler, readout.steps) == ("ddim", 1)
    unbatched = method_settings("ddim-10-unbatched", BASE)
    assert (unbatched.steps, unbatched.batch_size) == (10, 1)
    assert all(method_settings(m, BASE).strengths == BASE.strengths for m in METHODS)
    with pytest.raises(ValueError, match="unknown method"):
        method_settings("euler-3", BASE)


def test_counting_unet_counts_chains_not_calls() -> None:
    counter = CountingUNet(lambda z, t: z * 2)
    counter(torch.zeros(9, 1, 2, 2, 2), torch.zeros(9))
    counter(torch.zeros(1, 1, 2, 2, 2), torch.zeros(1))
    assert (counter.forwards, counter.evaluations) == (2, 10)


def test_table_gives_ratios_to_the_seed_procedure() -> None:
    rows = [{"method": "seed-ddpm-300", "median_unet_evaluations_per_image": 300, "median_seconds_per_image": 10.0,
             "peak_memory_bytes": 2**20, "median_dice": 0.2, "median_oracle_dice": 0.3},
            {"method": "ddim-10", "median_unet_evaluations_per_image": 15, "median_seconds_per_image": 0.5,
             "peak_memory_bytes": 2**20, "median_dice": 0.25, "median_oracle_dice": 0.35}]
    last = table(rows, "seed-ddpm-300").splitlines()[-1]
    assert "| ddim-10 | 15 | 0.50 |" in last and "| 20.0x | 20.0x |" in last
