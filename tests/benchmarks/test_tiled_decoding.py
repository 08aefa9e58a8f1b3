"""benchmarks/tiled_decoding.py at a small size: rows, the budget, and the 4x-volume verdict."""
from __future__ import annotations

import pytest

from benchmarks.tiled_decoding import TARGET_RATIO, measure, memory_checks, specs


pytestmark = pytest.mark.usefixtures("single_thread")


def test_a_row_reports_the_decodes_own_peak() -> None:
    whole = measure("tiny", [16, 32, 32], repeats=1)
    tiled = measure("tiny", [16, 32, 32], max_latent_voxels=1600, repeats=1)
    assert whole["latent"] == [8, 16, 16]  # the app's tiny preset downsamples by 2
    assert whole["n_tiles"] == 1 and tiled["n_tiles"] > 1 and tiled["max_latent_voxels"] == 1600
    for row in (whole, tiled):
        assert len(row["times_s"]) == 1 and row["median_s"] > 0 and row["peak_scope"] == "region"
        assert row["peak_bytes"] == row["peak_increase_bytes"] >= 0
        assert row["peak_total_bytes"] >= row["baseline_bytes"] > 100 * 2**20  # torch itself is in the baseline
        assert row["output_bytes"] == 4 * 16 * 32 * 32


def test_budget_is_a_quarter_of_the_smaller_latent_and_pairs_are_4x() -> None:
    todo, budget, pairs = specs("tiny", "cpu", None)
    assert pairs == [((64, 128, 128), (64, 256, 256))]
    assert budget == 32 * 64 * 64 // 4
    budgeted = [s for s in todo if "max_latent_voxels" in s]
    assert [s["shape"] for s in budgeted] == [[64, 128, 128], [64, 256, 256]]
    assert specs("tiny", "cpu", 999)[1] == 999


def test_memory_check_verdict() -> None:
    def row(shape, peak):  # noqa: ANN001, ANN202
        return {"shape": shape, "tiles": None, "max_latent_voxels": 10, "peak_increase_bytes": peak}

    pairs = [((1, 2, 2), (1, 4, 4))]
    (met,) = memory_checks([row([1, 2, 2], 100), row([1, 4, 4], 150)], pairs, 10)
    (missed,) = memory_checks([row([1, 2, 2], 100), row([1, 4, 4], 180)], pairs, 10)
    assert met["met"] and met["ratio"] == pytest.approx(TARGET_RATIO) and met["over_target"] == 0
    assert not missed["met"] and missed["over_target"] == pytest.approx(0.2)
