"""benchmarks/counterfactual_cost.py: the methods are what they say, evaluations are counted per chain."""
from __future__ import annotations

import argparse

import pytest
import torch

from benchmarks.counterfactual_cost import METHODS, CountingUNet, method_compute, run_random, table
from bids_app.schedulers import patch_sets
from bids_app.settings import ComputeSettings
from bids_app.settings.segmentation import CounterfactualSettings


def test_methods_differ_only_in_the_batch() -> None:
    assert method_compute("batched") == ComputeSettings()
    assert method_compute("unbatched") == ComputeSettings(inference_batch_size=1)
    assert set(METHODS) == {"batched", "unbatched"}
    with pytest.raises(ValueError, match="unknown method"):
        method_compute("ddim-10")


def test_counting_unet_counts_chains_not_calls() -> None:
    counter = CountingUNet(lambda z, t: z * 2)
    counter(torch.zeros(9, 1, 2, 2, 2), torch.zeros(9))
    counter(torch.zeros(1, 1, 2, 2, 2), torch.zeros(1))
    assert (counter.forwards, counter.evaluations) == (2, 10)


def test_random_weights_run_the_app_pipeline_with_the_same_evaluations() -> None:
    args = argparse.Namespace(preset="tiny", device="cpu", shape=[16, 16, 16], strength=[0.4], n_samples=1,
                              seed=0, repeats=1)
    rows = {m: run_random(argparse.Namespace(**vars(args), child=m)) for m in METHODS}
    # One one-step chain per patch set of the 4^3 latent (the tiny VQ-GAN downsamples 4x).
    layout = CounterfactualSettings()
    chains = len(patch_sets(torch.ones(4, 4, 4, dtype=torch.bool), layout.patch_size, layout.patch_period,
                            layout.patch_offsets))
    assert chains > 1
    assert rows["batched"]["unet_evaluations_per_image"] == rows["unbatched"]["unet_evaluations_per_image"] == chains


def test_table_gives_ratios_to_the_reference() -> None:
    rows = [{"method": "unbatched", "median_unet_evaluations_per_image": 54, "median_seconds_per_image": 10.0,
             "peak_memory_bytes": 2**20, "median_dice": 0.2, "median_oracle_dice": 0.3},
            {"method": "batched", "median_unet_evaluations_per_image": 54, "median_seconds_per_image": 0.5,
             "peak_memory_bytes": 2**20, "median_dice": 0.2, "median_oracle_dice": 0.3}]
    last = table(rows, "unbatched").splitlines()[-1]
    assert "| batched | 54 | 0.50 |" in last and "| 1.0x | 20.0x |" in last
